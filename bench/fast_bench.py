#!/usr/bin/env python3
"""Benchmark: how fast a database rollback is, and what users feel during deploys and rollbacks, in one run.

A flaskr-like app under gunicorn (2 workers, `--preload`), converted to releases and socket units
(demo.flaskr, no network), a client asking GET / at a steady rate. For each database size (its `notes`
table filled with ~1 KiB rows until the file is that size, then a deploy, which makes the point's backup,
then a few rows written through the app, which the plan warns about; the record says whether the seal
took the plan's count):

- `rollback.py dev --yes --with-db`, command to exit, beside `cp` of the same file (page cache warm), the
  rollback's steps, the longest stretch without an answer during it and the app's bare restart
  (`systemctl --user restart` of the slot that serves: the longest stretch without an answer the same
  client saw, and the seconds until the bench's own poll got an answer);
- on the first size: p99 during steady stretches, during deploys and during rollbacks (--code-only).

Targets: rollback at most 5 s at 1 GB, the stretch at most the bare restart plus 0.1 s;
p99 during a deploy or a rollback at most 1.5 x steady + 5 ms, no request failed.

    python3 bench/fast_bench.py [--sizes 100,1000] [--rate 200] [--rounds 2]
"""

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from demo import flaskr  # noqa: E402
from demo.load import Load, summary  # noqa: E402
from demo.sandbox import Sandbox, scratch_host  # noqa: E402
from safedeploy import restore, units  # noqa: E402
from safedeploy.dbfiles import sha256_file  # noqa: E402

ROW = 1000          # bytes of text per row


def fill(db: Path, mb: int) -> int:
    """Fill the notes table with ~1 KiB rows until the database holds mb MB (10^6 bytes) by its real size
    (pages in use x page size: the rows and SQLite's overhead, whatever the schema); return the file's size."""
    target = mb * 1_000_000
    conn = sqlite3.connect(db, timeout=30, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 30000")
    conn.execute("CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY, body TEXT)")
    page = conn.execute("PRAGMA page_size").fetchone()[0]

    def size() -> int:
        return conn.execute("PRAGMA page_count").fetchone()[0] * page

    per_row = float(ROW + 40)       # a first guess, then what the file really grew by per row
    while (have := size()) < target:
        n = max(1, min(50_000, int((target - have) / per_row)))
        conn.execute(f"WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < {n}) "
                     f"INSERT INTO notes (body) SELECT hex(randomblob({ROW // 2})) FROM s")
        per_row = max(1.0, (size() - have) / n)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return os.stat(db).st_size


def bare_restart(sb: Sandbox, load: Load) -> dict:
    """`systemctl --user restart` of the slot that serves (with two slots, a deploy leaves either serving: a
    restart of the one that does not would cost users nothing), measured two ways: seconds until the bench's
    own poll (every 5 ms) gets an answer, and the longest stretch without an answer the load client saw, the
    client and the measure the rollback's "no answer" comes from."""
    slot = units.serving_state(sb.unit("dev")).name
    start = time.monotonic()
    sb.manager.systemctl("restart", slot)
    polled = time.monotonic() - start + sb.wait_serving("dev", 30, interval=0.005)
    time.sleep(1.0)
    return {"slot": slot, "polled": polled, "gap": summary(load.between(start - 0.5, time.monotonic()))["gap"]}


def cp_seconds(db: Path) -> float:
    with tempfile.TemporaryDirectory(prefix="cp-", dir=db.parent.parent) as scratch:
        start = time.monotonic()
        subprocess.run(["cp", str(db), str(Path(scratch) / "copy")], check=True, timeout=600)
        return time.monotonic() - start


def durable_copy_seconds(db: Path) -> float:
    """The restore's own copy of the same file, alone (safedeploy.restore.copy_checked: the kernel copies, the copy
    is read back and hashed, every chunk pushed to disk as it goes, then fsync): what the disk takes to hold a
    second copy of the file, the floor of any restore that writes one."""
    sha = sha256_file(db)
    with tempfile.TemporaryDirectory(prefix="copy-", dir=db.parent.parent) as scratch:
        start = time.monotonic()
        restore.copy_checked(db, Path(scratch) / "copy", sha)
        return time.monotonic() - start


def run(sb: Sandbox, *argv: str) -> tuple[float, float, subprocess.CompletedProcess]:
    start = time.monotonic()
    proc = sb.run(*argv, timeout=900)
    end = time.monotonic()
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return start, end, proc


def last_record(sb: Sandbox) -> dict:
    return json.loads((sb.root / "state" / "dev.deploys.jsonl").read_text().splitlines()[-1])


def p99_rounds(sb: Sandbox, load: Load, rounds: int, version: int) -> list[tuple[str, dict, float]]:
    rows = []
    time.sleep(4)
    rows.append(("steady", summary(load.between(time.monotonic() - 3.5, time.monotonic())), 0.0))
    for i in range(rounds):
        sb.release("dev", flaskr.release_files(version + i, "body", "none"), f"release {version + i}")
        start, end, _ = run(sb, "deploy.py", "dev")
        time.sleep(1.5)
        rows.append(("deploy", summary(load.between(start, end + 1.0)), end - start))
        start, end, _ = run(sb, "rollback.py", "dev", "--yes", "--code-only")
        time.sleep(1.5)
        rows.append(("rollback", summary(load.between(start, end + 1.0)), end - start))
        time.sleep(2.5)
        rows.append(("steady", summary(load.between(time.monotonic() - 2.0, time.monotonic())), 0.0))
    return rows


def one_size(root: Path, manager, mb: int, rate: int, rounds: int) -> dict:
    sb = Sandbox(root / f"f{mb}", manager, health_timeout=30, name=f"fb{mb}")
    sb.root.mkdir()
    sb.build()
    flaskr.set_up(sb)
    db = sb.db_path("dev")
    filled = fill(db, mb)
    load = Load(sb.url("dev", "/"), rate=rate, timeout=30).start()
    p99 = p99_rounds(sb, load, rounds, 2) if rounds else []
    sb.release("dev", flaskr.release_files(90, "body", "none"), "the release rolled back")
    run(sb, "deploy.py", "dev")                 # its pre-deploy backup is the point
    for i in range(20):                          # rows users write after the point: the plan warns of them
        subprocess.run(["curl", "-s", "-o", os.devnull, "-X", "POST", "--data", f"note {i}", sb.url("dev", "/notes")],
                       check=True, timeout=30)
    copy = cp_seconds(db)
    durable = durable_copy_seconds(db)
    bare = bare_restart(sb, load)
    time.sleep(1.0)
    start, end, proc = run(sb, "rollback.py", "dev", "--yes", "--with-db")
    time.sleep(1.0)
    during = summary(load.between(start, end + 0.5))
    load.stop()
    record = last_record(sb)
    size = os.stat(db).st_size
    warning = next((line.strip() for line in proc.stdout.splitlines() if line.strip().startswith("rows")), "")
    sb.stop_units()
    return {"mb": mb, "filled": filled, "bytes": size, "wall": end - start, "cp": copy, "durable": durable, "bare": bare,
            "during": during, "steps": record["steps"], "warning": warning, "p99": p99, "lost": record.get("rows_lost"),
            "counted": record.get("rows_counted", "")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="100,1000", help="database sizes in MB")
    p.add_argument("--rate", type=int, default=200)
    p.add_argument("--rounds", type=int, default=2, help="deploy + rollback rounds for the p99 (first size)")
    args = p.parse_args()
    load_before = os.getloadavg()
    results = []
    with scratch_host("fast-bench-") as (root, manager):
        for i, mb in enumerate(int(x) for x in args.sizes.split(",")):
            results.append(one_size(root, manager, mb, args.rate, args.rounds if i == 0 else 0))
    print(f"flaskr under gunicorn (2 workers), releases + socket + handover, GET / at {args.rate}/s; "
          f"load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}")
    print(f"{'database':>10} {'rollback --with-db':>18} {'cp':>6} {'no answer':>9} {'bare restart':>12} "
          f"{'(polled)':>8} {'failed':>6} {'p99 ms':>7}")
    for r in results:
        d, bare = r["during"], r["bare"]
        print(f"{r['bytes'] / 1e6:8.0f}MB {r['wall']:17.2f}s {r['cp']:5.2f}s {d['gap']:8.2f}s {bare['gap']:11.2f}s "
              f"{bare['polled']:7.2f}s {d['failed']:6} {d['p99']:7.1f}")
        print(f"            no answer {d['gap'] - bare['gap']:+.2f}s against a bare restart of {bare['slot']} "
              f"(target +0.10 s): {'met' if d['gap'] <= bare['gap'] + 0.1 else 'NOT met'}")
        print(f"            the restore's own copy of the file alone (read back, hashed, on disk): {r['durable']:.2f}s")
        print("            steps: " + ", ".join(f"{k} {v:.2f}" for k, v in r["steps"].items()))
        print(f"            plan: {r['warning']}; rows the restore took away: {r['lost']}; filled to "
              f"{r['filled'] / 1e6:.0f} MB")
        print(f"            rows counted by the {r['counted']}")
    rows = results[0]["p99"] if results else []
    if rows:
        steady = max(s["p99"] for what, s, _ in rows if what == "steady")
        print(f"{'what':<9} {'seconds':>7} {'requests':>8} {'failed':>6} {'gap s':>6} {'p50 ms':>7} {'p99 ms':>7} "
              f"{'max ms':>7}")
        for what, s, secs in rows:
            print(f"{what:<9} {secs:7.2f} {s['requests']:8} {s['failed']:6} {s['gap']:6.2f} {s['p50']:7.1f} "
                  f"{s['p99']:7.1f} {s['max']:7.1f}")
        worst = max(s["p99"] for what, s, _ in rows if what != "steady")
        goal = 1.5 * steady + 5
        print(f"worst p99 during a deploy or rollback {worst:.1f} ms; target 1.5 x steady {steady:.1f} + 5 = "
              f"{goal:.1f} ms: {'met' if worst <= goal else 'NOT met'}; failed "
              f"{sum(s['failed'] for what, s, _ in rows if what != 'steady')}")


if __name__ == "__main__":
    main()
