#!/usr/bin/env python3
"""Benchmark: `status.py ENV` with the row ledger, by database size: cold (no digests kept yet), warm
(nothing changed since the last look: the cache answers, no row is read), after one row was written
(the copy's digests are kept: only the live rows that differ from them are read again), and `backup.py ENV --restore-rows` of
one row (its lock holds the app's writers while it checks every live row; a writer inserting every 50 ms
meanwhile says for how long). The database holds rows of
about 1 KB (a notes table, as users write them): 1 GB is about a million rows.

    python3 bench/status_bench.py [--sizes 100,1000]   # MB
"""

import argparse
import shutil
import sqlite3
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from demo.sandbox import Sandbox, scratch_host  # noqa: E402

ROW_BYTES = 1000


def fill(db, mb):
    conn = sqlite3.connect(db, timeout=30, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 30000")
    rows = mb * (1 << 20) // (ROW_BYTES + 60)
    for start in range(0, rows, 20000):
        n = min(20000, rows - start)
        conn.execute("BEGIN")
        conn.execute("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < ?) "
                     "INSERT INTO notes (body) SELECT hex(randomblob(?)) FROM c", (n, ROW_BYTES // 2))
        conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return rows


def timed(sb, *argv):
    start = time.monotonic()
    proc = sb.run(*argv, timeout=1800)
    took = time.monotonic() - start
    assert proc.returncode in (0, 1), proc.stderr
    return took, proc


def one_size(root, manager, mb):
    sb = Sandbox(root / f"db{mb}", manager, health_timeout=30, name=f"stb{mb}")
    sb.root.mkdir()
    sb.build()
    rows = fill(sb.db_path("dev"), mb)
    conn = sqlite3.connect(sb.db_path("dev"), isolation_level=None)
    conn.execute("CREATE TABLE IF NOT EXISTS probe (id INTEGER PRIMARY KEY, t REAL)")     # the writer's, below
    conn.close()
    assert sb.run("backup.py", "dev", "--reason", "nightly", timeout=1800).returncode == 0
    shutil.rmtree(sb.root / "state" / "ledger", ignore_errors=True)
    cold, _ = timed(sb, "status.py", "dev", "--json")
    warm, _ = timed(sb, "status.py", "dev", "--json")
    conn = sqlite3.connect(sb.db_path("dev"), isolation_level=None)
    conn.execute("DELETE FROM notes WHERE id = (SELECT max(id) FROM notes)")       # one row the copy holds
    conn.close()
    changed, proc = timed(sb, "status.py", "dev", "--json")
    assert "--restore-rows" in proc.stdout, proc.stdout[-2000:]
    copy = sorted((sb.root / "backups" / "dev").glob("*-nightly.sqlite3"))[-1]
    writer = Writer(sb.db_path("dev"))
    restore, proc = timed(sb, "backup.py", "dev", "--restore-rows", str(copy), "--yes")
    held = writer.stop()
    assert proc.returncode == 0, proc.stderr
    sb.stop_units()
    size = sb.db_path("dev").stat().st_size
    shutil.rmtree(sb.root, ignore_errors=True)
    return rows, size, cold, warm, changed, restore, held


class Writer:
    """A user writing while the rows are put back: a row into the probe table every 50 ms, each insert timed
    (busy_timeout 60 s, so a wait is measured, not failed); stop() gives the longest wait and the inserts."""

    def __init__(self, db: Path) -> None:
        self.conn = sqlite3.connect(db, timeout=60, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA busy_timeout = 60000")
        self.waits: list[float] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.done.is_set():
            start = time.monotonic()
            self.conn.execute("INSERT INTO probe (t) VALUES (?)", (start,))
            self.waits.append(time.monotonic() - start)
            self.done.wait(0.05)

    def stop(self) -> tuple[float, int]:
        self.done.set()
        self.thread.join()
        self.conn.close()
        return max(self.waits, default=0.0), len(self.waits)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="100,1000", help="database sizes in MB")
    args = p.parse_args()
    with scratch_host("status-bench-") as (root, manager):
        results = [(mb, *one_size(root, manager, int(mb))) for mb in args.sizes.split(",")]
    print("status.py dev --json with the row ledger (one nightly copy), sample app:")
    for mb, rows, size, cold, warm, changed, restore, (held, writes) in results:
        print(f"  {size / 1e6:7.0f} MB, {rows} rows: cold {cold:.2f}s, warm (nothing changed) {warm:.2f}s, "
              f"after one row changed {changed:.2f}s; backup.py --restore-rows of that row {restore:.2f}s, "
              f"a writer's longest wait meanwhile {held:.2f}s ({writes} inserts)")


if __name__ == "__main__":
    main()
