#!/usr/bin/env python3
"""Benchmark: backups of a live WAL database while a writer commits small transactions.

For each method (cp of the file, the raw physical limit; SQLite's backup API in
one step; VACUUM INTO; the snapshot copy backup.py uses) it prints the copy's
MB/s and its ratio to cp, the time to verify (integrity_check + sha256), the
writer's commit latency p50/p99/max during the copy against its baseline, and
whether the writer's invariant held in the copy.

    python3 bench/backup_bench.py                # 1 GiB database
    python3 bench/backup_bench.py --size-mb 256  # quicker
"""

import argparse
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from demo import writer  # noqa: E402
from safedeploy import dbfiles  # noqa: E402


def method_cp(db, dest):
    shutil.copyfile(db, dest)          # not consistent under writes: the physical limit only


def method_cp_fsync(db, dest):
    shutil.copyfile(db, dest)
    with open(dest, "rb") as fh:
        os.fsync(fh.fileno())


def method_api(db, dest):
    src = dbfiles.open_readonly(db)
    try:
        dbfiles.api_copy(src, dest, None)
    finally:
        src.close()


def method_vacuum(db, dest):
    src = dbfiles.open_readonly(db)
    try:
        src.execute("VACUUM INTO ?", (str(dest),))
    finally:
        src.close()


def method_snapshot(db, dest):
    src = dbfiles.open_readonly(db)
    try:
        dbfiles.snapshot_copy(src, db, dest, None)
    finally:
        src.close()


METHODS = {"cp": method_cp, "cp+fsync": method_cp_fsync, "api": method_api, "vacuum": method_vacuum, "snapshot": method_snapshot}


def latencies_between(path, start, end):
    values = []
    for line in Path(path).read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and start <= float(parts[0]) <= end:
            values.append(float(parts[1]))
    return values


def pct(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mb", type=float, default=1024)
    p.add_argument("--dir", default=None, help="where to build the database (default: a temp dir)")
    p.add_argument("--rounds", type=int, default=2, help="runs per method; the best is shown")
    p.add_argument("--methods", default="cp,cp+fsync,api,vacuum,snapshot")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="backup-bench-", dir=args.dir))
    try:
        run(work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(work, args):
    db = work / "live.db"
    t = time.monotonic()
    writer.create(db)
    writer.fill(db, args.size_mb)
    size = db.stat().st_size
    print(f"database: {size / 1e6:.0f} MB in WAL mode, built in {time.monotonic() - t:.1f}s; "
          f"{os.cpu_count()} cores; sqlite {sqlite3.sqlite_version}")
    lat = work / "latencies.txt"
    proc = subprocess.Popen([sys.executable, "-m", "demo.writer", str(db), "--pause", "1", "--latencies", str(lat)],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(2)
        base_window = (time.time(), time.time() + 3)
        time.sleep(3)
        results = []
        for name in args.methods.split(","):
            best = None
            for r in range(args.rounds):
                dest = work / f"copy-{name}-{r}.db"
                start_wall, start = time.time(), time.monotonic()
                METHODS[name](db, dest)
                seconds = time.monotonic() - start
                during = (start_wall, time.time())
                v0 = time.monotonic()
                if name.startswith("cp"):
                    ok, detail = True, "n/a (not consistent)"
                    verify_s = float("nan")
                else:
                    if name == "snapshot":       # the copy must be durable before it counts
                        with open(dest, "rb") as fh:
                            os.fsync(fh.fileno())
                        seconds = time.monotonic() - start
                    v0 = time.monotonic()
                    info = dbfiles.finish_copy(db, dest)
                    verify_s = time.monotonic() - v0
                    ok, detail = writer.invariant_holds(dest)
                    assert info["sha256"]
                for leftover in work.glob(f"copy-{name}-{r}.db*"):
                    leftover.unlink()
                row = (seconds, verify_s, during, ok, detail)
                if best is None or seconds < best[0]:
                    best = row
            results.append((name, *best))
    finally:
        proc.terminate()
        count = proc.communicate(timeout=30)[0].strip()
    baseline = latencies_between(lat, *base_window)
    print(f"writer baseline: {len(baseline) / 3:.0f} commits/s, p50 {pct(baseline, .5):.2f} ms, "
          f"p99 {pct(baseline, .99):.2f} ms, max {max(baseline):.2f} ms; {count} commits in all")
    print(f"{'method':<9} {'copy s':>7} {'MB/s':>7} {'x cp':>6} {'x cp+fs':>7} {'verify s':>9} "
          f"{'w p50':>7} {'w p99':>7} {'w max':>7} {'commits':>8} {'invariant':>10}")
    speeds = {}
    for name, seconds, verify_s, window, ok, detail in results:
        during = latencies_between(lat, *window)
        speeds[name] = size / 1e6 / seconds
        ratio = speeds[name] / speeds.get("cp", float("nan"))
        ratio_fs = speeds[name] / speeds.get("cp+fsync", float("nan"))
        print(f"{name:<9} {seconds:7.2f} {speeds[name]:7.0f} {ratio:6.2f} {ratio_fs:7.2f} {verify_s:9.2f} "
              f"{pct(during, .5):7.2f} {pct(during, .99):7.2f} {max(during or [float('nan')]):7.2f} "
              f"{len(during):8} {'held' if ok else 'BROKEN':>10}  {'' if name.startswith('cp') else detail}")
    print("copy s: the copy alone (snapshot: with its fsync); verify s: journal mode, integrity_check and "
          "sha256 in parallel, fsync")


if __name__ == "__main__":
    main()
