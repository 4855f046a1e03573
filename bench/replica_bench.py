#!/usr/bin/env python3
"""Benchmark: continuous copies ([replica], Litestream) on the sandbox's prod, a folder replica on the same
disk (the figures are Litestream's own work; over sftp or S3 add the transfer at your link's speed).

- cost: the replicator's CPU (its process's user+system time) and the bytes that reach the replica (the
  size of every file that appears there, compactions included), idle and under a writer of RATE rows/s
  (HTTP POSTs to the app, each acknowledged), over SECONDS each, per hour;
- RPO: the writer at RATE rows/s, a backup.py running; SIGKILL to the app, the replicator and backup.py at
  once; the env's data, every local backup and the state folder removed; the app back on a fresh
  database; then restored as on a rebuilt host (backup.py ENV --at latest, rollback.py ENV --to it
  --with-db): the acknowledged rows lost, and how long before the kill the oldest of them was acknowledged;
- RTO: the same loss with a database of SIZE MB: from the first command to the app serving again.

    python3 bench/replica_bench.py [--trials 5] [--sizes 100,1024] [--seconds 60] [--rate 150]
"""

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from demo.notes_writer import NotesWriter  # noqa: E402
from demo.sandbox import REPO_ROOT, Sandbox, scratch_host  # noqa: E402

ENV = "prod"


def sh(sb, *args, timeout=1800):
    proc = sb.run(*args, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {proc.stdout}{proc.stderr}")
    return proc.stdout


def unit_of(out):
    return next(line.split()[3].rstrip(":") for line in out.splitlines() if line.startswith("installed and"))


def main_pid(sb, unit):
    out = sb.manager.systemctl("show", unit, "--property=MainPID").stdout
    return int(out.strip().split("=")[1])


def cpu_seconds(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Arrivals:
    """The bytes of every file that appears under folder (sampled every 0.2 s: a file that comes and goes
    between two samples is missed; L0 files live 5 minutes)."""

    def __init__(self, folder):
        self.folder, self.seen, self.bytes = Path(folder), {}, 0

    def sample(self):
        for p in self.folder.rglob("*.ltx"):
            if p not in self.seen:
                try:
                    self.seen[p] = p.stat().st_size
                    self.bytes += self.seen[p]
                except FileNotFoundError:
                    pass


def cost(sb, unit, replica, seconds, rate):
    rows = []
    for label, writing in (("idle", False), (f"writer {rate}/s", True)):
        pid, arrivals = main_pid(sb, unit), Arrivals(replica)
        arrivals.sample()
        arrivals.bytes = 0
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        writer = NotesWriter(sb.url(ENV, "/notes"), rate, prefix=f"c{int(t0)}-")
        if writing:
            writer.__enter__()
        while time.monotonic() - t0 < seconds:
            arrivals.sample()
            time.sleep(0.2)
        if writing:
            writer.stop()
        time.sleep(1)
        arrivals.sample()
        span = time.monotonic() - t0
        cpu = cpu_seconds(pid) - cpu0
        rows.append((label, cpu / span * 100, arrivals.bytes / span * 3600, writer.rate_achieved() if writing else 0))
    print("\n## the replicator's cost (a folder replica)\n")
    print("| load | CPU (% of one core) | bytes to the replica per hour | rows/s achieved |")
    print("| --- | --- | --- | --- |")
    for label, cpu, per_hour, achieved in rows:
        print(f"| {label} | {cpu:.2f} | {per_hour / 1e6:.1f} MB | {achieved:.0f} |")


def lose_the_disk(sb, unit, tool):
    killed_at = time.time()
    tool.kill()
    for name in (unit, sb.unit(ENV)):
        sb.manager.systemctl("kill", "--signal=SIGKILL", name, check=False)
    sb.manager.systemctl("stop", unit, check=False)
    sb.stop_app(ENV)
    tool.wait(timeout=30)
    for path in sb.db_path(ENV).parent.iterdir():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    shutil.rmtree(sb.root / "backups", ignore_errors=True)
    shutil.rmtree(sb.root / "state", ignore_errors=True)
    stem = sb.unit(ENV).removesuffix(".service")
    sb.manager.systemctl("start", f"{stem}.socket", sb.unit(ENV))
    sb.wait_serving(ENV, 60)
    sb.manager.systemctl("start", unit)
    return killed_at


def a_running_backup(sb):
    """backup.py in a loop, as cron or an operator might have one running: the tool, to be killed too."""
    return subprocess.Popen(["sh", "-c", f'while :; do "$0" "$1" {ENV} --config "$2" --quiet; done',
                             sb.python, str(REPO_ROOT / "backup.py"), str(sb.config)],
                            env=sb.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


class Tool:
    def __init__(self, proc):
        self.proc = proc

    def kill(self):
        os.killpg(self.proc.pid, 9)

    def wait(self, timeout):
        self.proc.wait(timeout=timeout)


def restore(sb):
    """As status advises on a rebuilt host: the replica's newest as a copy, then the env back to it. Seconds
    of each command."""
    t0 = time.monotonic()
    out = sh(sb, "backup.py", ENV, "--at", "latest")
    copy = Path(out.split(": ", 1)[1].split(" (")[0])
    t1 = time.monotonic()
    sh(sb, "rollback.py", ENV, "--to", copy.name.removesuffix(".sqlite3"), "--with-db", "--yes")
    t2 = time.monotonic()
    return t1 - t0, t2 - t1, t2 - t0


def bodies(db):
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return {r[0] for r in conn.execute("SELECT body FROM notes")}
    finally:
        conn.close()


def wait_caught_up(sb, timeout=1800):
    deadline, rep = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        proc = sb.run("status.py", ENV, "--json")
        rep = json.loads(proc.stdout)["envs"][ENV]["replica"]
        if rep and rep["ok"] and rep["lag_s"] is not None and rep["lag_s"] < 1:
            return
        time.sleep(2)
    raise RuntimeError(f"the replica did not catch up: {rep}")


def rpo(sb, unit, trials, rate):
    print("\n## RPO: SIGKILL to the app, the replicator and backup.py; data, backups and state removed\n")
    print("| trial | rows acknowledged | rows/s | rows lost | oldest lost, acknowledged before the kill | restore |")
    print("| --- | --- | --- | --- | --- | --- |")
    for trial in range(1, trials + 1):
        wait_caught_up(sb)
        tool = Tool(a_running_backup(sb))
        with NotesWriter(sb.url(ENV, "/notes"), rate, prefix=f"t{trial}-") as writer:
            time.sleep(10)
            killed_at = lose_the_disk(sb, unit, tool)
        at, back, total = restore(sb)
        lost = writer.lost(bodies(sb.db_path(ENV)), killed_at)
        oldest = max((ago for _, ago in lost), default=0.0)
        print(f"| {trial} | {len(writer.acked)} | {writer.rate_achieved():.0f} | {len(lost)} | {oldest:.2f} s | "
              f"{total:.1f} s |", flush=True)


def fill(db, mb):
    conn = sqlite3.connect(db, timeout=30, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 30000")
    conn.execute("CREATE TABLE IF NOT EXISTS filler (b BLOB)")
    for _ in range(mb):
        conn.execute("INSERT INTO filler VALUES (randomblob(1048576))")
    conn.close()


def rto(sb, unit, sizes):
    print("\n## RTO: from the first command to serving again, by database size\n")
    print("| database | replica caught up after the fill | backup.py --at latest | rollback.py --with-db | "
          "first command to serving |")
    print("| --- | --- | --- | --- | --- |")
    for mb in sizes:
        t0 = time.monotonic()
        current = sb.db_path(ENV)
        have = current.stat().st_size >> 20
        fill(current, max(0, mb - have))
        wait_caught_up(sb)
        caught = time.monotonic() - t0
        size = current.stat().st_size / 1e6
        lose_the_disk(sb, unit, Tool(a_running_backup(sb)))
        at, back, total = restore(sb)
        sb.wait_serving(ENV, 60)
        print(f"| {size:.0f} MB | {caught:.0f} s | {at:.1f} s | {back:.1f} s | {total:.1f} s |", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--sizes", default="100,1024", help="MB, comma-separated")
    p.add_argument("--seconds", type=float, default=60, help="each cost measurement")
    p.add_argument("--rate", type=int, default=150)
    args = p.parse_args()
    with scratch_host("replica-bench-") as (root, manager):
        sb = Sandbox(root / "host", manager, health_timeout=30, name="rb")
        sb.root.mkdir()
        sb.build()
        sb.convert(ENV)
        replica = root / "replica"
        sb.config.write_text(sb.config.read_text() + f'\n[replica]\nurl = "file://{replica}"\nenvs = ["{ENV}"]\n')
        unit = unit_of(sh(sb, "backup.py", "--install-replica", "--yes"))
        version = subprocess.run([str(Path(sys.executable).parent / "litestream"), "version"], capture_output=True,
                                 text=True, timeout=30).stdout.strip()
        print(f"Litestream {version}, {os.cpu_count()} cores, replica: a folder on the same disk")
        cost(sb, unit, replica, args.seconds, args.rate)
        rpo(sb, unit, args.trials, args.rate)
        rto(sb, unit, [int(s) for s in args.sizes.split(",") if s])
        sb.stop_units()
        manager.systemctl("stop", unit, check=False)


if __name__ == "__main__":
    main()
