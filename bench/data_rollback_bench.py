#!/usr/bin/env python3
"""Benchmark: how long the app gives no answer during `rollback.py ENV --with-db`, by database
size. A client asks /health at 200 requests/s throughout; the longest stretch between two
answers is the downtime. The restored copy is prepared (copied, checksummed, integrity-checked)
while the app serves; the live database is saved by a rename; so the stretch should not grow
with the size. Also printed: the rollback's steps, and the app's own bare restart.

    python3 bench/data_rollback_bench.py [--sizes 100,1000]   # MB
"""

import argparse
import json
import shutil
import sqlite3
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from demo.load import Load, summary  # noqa: E402
from demo.sandbox import Sandbox, scratch_host  # noqa: E402


def fill(db, mb):
    conn = sqlite3.connect(db, timeout=30, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 30000")
    conn.execute("CREATE TABLE IF NOT EXISTS filler (b BLOB)")
    for _ in range(mb):
        conn.execute("INSERT INTO filler VALUES (randomblob(1048576))")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def bare_restart(sb):
    start = time.monotonic()
    sb.manager.systemctl("restart", sb.unit("dev"))
    return time.monotonic() - start + sb.wait_serving("dev", 30, interval=0.005)


def one_size(root, manager, mb, releases):
    sb = Sandbox(root / f"db{mb}", manager, health_timeout=30, name=f"drb{mb}")
    sb.root.mkdir()
    sb.build()
    if releases:
        assert sb.run("deploy.py", "dev", "--install-units", "--yes").returncode == 0
    fill(sb.db_path("dev"), mb)
    sb.release("dev", {"VERSION": "2\n"}, "v2")
    proc = sb.run("deploy.py", "dev")           # makes the pre-deploy backup: the point
    assert proc.returncode == 0, proc.stderr
    bare = bare_restart(sb)
    load = Load(sb.url("dev"), rate=200, timeout=30).start()
    time.sleep(1.0)
    start = time.monotonic()
    proc = sb.run("rollback.py", "dev", "--yes", "--with-db", timeout=600)
    took = time.monotonic() - start
    time.sleep(1.0)
    samples = load.stop()
    assert proc.returncode == 0, proc.stderr + proc.stdout
    record = json.loads((sb.root / "state" / "dev.deploys.jsonl").read_text().splitlines()[-1])
    sb.stop_units()
    shutil.rmtree(sb.root, ignore_errors=True)
    return summary(samples), took, record["steps"], bare


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="100,1000", help="database sizes in MB")
    p.add_argument("--releases", action="store_true", help="convert the env to releases first (socket unit)")
    args = p.parse_args()
    with scratch_host("data-rollback-bench-") as (root, manager):
        rows = []
        for mb in (int(x) for x in args.sizes.split(",")):
            rows.append((mb, *one_size(root, manager, mb, args.releases)))
    unit = "socket unit (releases)" if args.releases else "plain unit"
    print(f"rollback.py dev --yes --with-db under 200 req/s, sample app, {unit}:")
    for mb, s, took, steps, bare in rows:
        print(f"  {mb:>5} MB: longest stretch without an answer {s['gap']:.2f}s (bare restart {bare:.2f}s), "
              f"{s['failed']} of {s['requests']} requests failed, command {took:.1f}s")
        print("          steps: " + ", ".join(f"{k} {v:.2f}" for k, v in steps.items()))


if __name__ == "__main__":
    main()
