"""A writer that keeps an invariant, for tests and benchmarks of backups under load.

`accounts` holds ACCOUNTS rows whose balances always sum to TOTAL; every
transaction moves money between two accounts and appends a row to `ledger`.
A consistent copy of the database, taken at any moment, has the same sum and
one ledger row per committed transfer (sum of ledger amounts = 0 net drift).

Run as a process: python3 -m demo.writer DB [--seconds S] [--pause MS] [--latencies FILE]
It prints the number of committed transactions when it stops (SIGTERM or time).
"""

import argparse
import random
import signal
import sqlite3
import sys
import time

ACCOUNTS = 100
TOTAL = 1_000_000


def create(db_path):
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE IF NOT EXISTS accounts (id INTEGER PRIMARY KEY, balance INTEGER NOT NULL)")
    conn.execute("CREATE TABLE IF NOT EXISTS ledger (id INTEGER PRIMARY KEY, src INTEGER, dst INTEGER, amount INTEGER)")
    if conn.execute("SELECT count(*) FROM accounts").fetchone()[0] == 0:
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO accounts (id, balance) VALUES (?, ?)",
                         [(i, TOTAL // ACCOUNTS) for i in range(ACCOUNTS)])
        conn.execute("COMMIT")
    conn.close()


def fill(db_path, megabytes, blob=4000):
    """Grow the database to about `megabytes` with random blobs."""
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.execute("CREATE TABLE IF NOT EXISTS filler (id INTEGER PRIMARY KEY, data BLOB)")
    rows = int(megabytes * 1024 * 1024 / (blob + 100))
    batch = 2000
    for start in range(0, rows, batch):
        n = min(batch, rows - start)
        conn.execute("BEGIN")
        conn.execute("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < ?) "
                     "INSERT INTO filler (data) SELECT randomblob(?) FROM c", (n, blob))
        conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def invariant_holds(db_path):
    """(ok, detail) for a copy: balances sum to TOTAL and the ledger nets to zero drift."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        total = conn.execute("SELECT sum(balance) FROM accounts").fetchone()[0]
        check = conn.execute("PRAGMA integrity_check").fetchone()[0]
        transfers = conn.execute("SELECT count(*) FROM ledger").fetchone()[0]
    finally:
        conn.close()
    return total == TOTAL and check == "ok", f"sum={total} integrity={check} transfers={transfers}"


def run(db_path, seconds, pause_ms, latencies_path=None):
    conn = sqlite3.connect(db_path, isolation_level=None, timeout=30)
    conn.execute("PRAGMA busy_timeout = 30000")
    stop = [False]
    signal.signal(signal.SIGTERM, lambda *a: stop.__setitem__(0, True))
    rng = random.Random()
    out = open(latencies_path, "w") if latencies_path else None
    deadline = time.monotonic() + seconds
    count = 0
    while not stop[0] and time.monotonic() < deadline:
        src, dst = rng.sample(range(ACCOUNTS), 2)
        amount = rng.randint(1, 50)
        start = time.monotonic()
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("UPDATE accounts SET balance = balance - ? WHERE id = ?", (amount, src))
        conn.execute("UPDATE accounts SET balance = balance + ? WHERE id = ?", (amount, dst))
        conn.execute("INSERT INTO ledger (src, dst, amount) VALUES (?, ?, ?)", (src, dst, amount))
        conn.execute("COMMIT")
        end = time.monotonic()
        count += 1
        if out:
            out.write(f"{time.time():.6f} {(end - start) * 1000:.3f}\n")
        if pause_ms:
            time.sleep(pause_ms / 1000)
    if out:
        out.close()
    conn.close()
    print(count, flush=True)
    return count


def main():
    p = argparse.ArgumentParser()
    p.add_argument("db")
    p.add_argument("--seconds", type=float, default=3600)
    p.add_argument("--pause", type=float, default=1.0, help="milliseconds between transactions")
    p.add_argument("--latencies")
    args = p.parse_args()
    create(args.db)
    run(args.db, args.seconds, args.pause, args.latencies)


if __name__ == "__main__":
    sys.exit(main())
