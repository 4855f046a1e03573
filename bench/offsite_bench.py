#!/usr/bin/env python3
"""Benchmark: off-site copies with each engine (restic, borg) of a database of SIZE MB in which 1% of
the pages change each day, over NIGHTS nightly backups: bytes added to the repository per night, time
per push, time to restore the newest copy from off-site; against copying the whole file each night.

The repository is a local folder (the same disk): the figures are the engine's own work (chunking,
hashing, encryption, writing), without a network. Over ssh, sftp or S3 the bytes added are the same
and the time adds their transfer at your link's speed.

    python3 bench/offsite_bench.py [--size-mb 1024] [--nights 7] [--changed 0.01]
                                   [--patterns random,clustered,append] [--engines restic,borg]

restic cuts files into content-defined chunks of about 1 MiB (512 KiB to 8 MiB): a night adds
every chunk that holds a changed page. borg, as the tool drives it, cuts them into fixed chunks of
the database's page size. Where the changes fall therefore decides the figure, so three patterns are
measured: pages at random (a 1 MiB chunk holds 256 pages, so 1% of pages at random touch most
restic chunks), runs of 256 pages, and appended rows. The last table compares the engines.
"""

import argparse
import os
import random
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from safedeploy import backups, offsite  # noqa: E402
from safedeploy.config import Offsite  # noqa: E402

ROW_BYTES = 3900          # about one row per 4 KiB page: "1% of the rows" is about 1% of the pages


def folder_bytes(path):
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def create(db, size_mb):
    conn = sqlite3.connect(db)
    conn.execute("pragma journal_mode=wal")
    conn.execute("create table pages (id integer primary key, body blob)")
    rows = size_mb * (1 << 20) // 4096
    with conn:
        for start in range(0, rows, 10_000):
            conn.executemany("insert into pages values (?, ?)",
                             ((i, os.urandom(ROW_BYTES)) for i in range(start, min(rows, start + 10_000))))
    conn.close()
    return rows


def change(db, rows, fraction, rng, pattern):
    """A day's writes, touching `fraction` of the pages: scattered at random (the worst case for any
    chunking), in runs of 256 pages (1 MiB: a hot table or index region), or appended (new rows)."""
    n = int(rows * fraction)
    if pattern == "random":
        ids = rng.sample(range(rows), n)
    elif pattern == "clustered":
        ids = []
        while len(ids) < n:
            start = rng.randrange(0, rows - 256)
            ids.extend(range(start, start + 256))
        ids = ids[:n]
    else:
        ids = []
    conn = sqlite3.connect(db)
    with conn:
        conn.executemany("update pages set body = ? where id = ?", ((os.urandom(ROW_BYTES), i) for i in ids))
        if pattern == "append":
            top = conn.execute("select max(id) from pages").fetchone()[0] + 1
            conn.executemany("insert into pages values (?, ?)", ((i, os.urandom(ROW_BYTES)) for i in range(top, top + n)))
    conn.execute("pragma wal_checkpoint(truncate)")
    conn.close()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mb", type=int, default=1024)
    p.add_argument("--nights", type=int, default=7)
    p.add_argument("--changed", type=float, default=0.01, help="fraction of the pages changed per day")
    p.add_argument("--patterns", default="random,clustered,append",
                   help="where the day's changes fall: random pages, 1 MiB runs, or appended rows")
    p.add_argument("--engines", default="restic,borg")
    args = p.parse_args()
    table = [run(args, pattern, engine) for pattern in args.patterns.split(",") for engine in args.engines.split(",")]
    changed = args.size_mb * (1 << 20) * args.changed / 1e6
    print(f"\n## per engine: {args.size_mb} MB, {args.changed:.0%} of the pages changed per night "
          f"(about {changed:.1f} MB), {args.nights} nights")
    print(f"{'pattern':<10} {'engine':<7} {'added MB/night':>14} {'x changed':>9} {'push s':>7} {'restore s':>9} "
          f"{'repo MB':>8}")
    for pattern, engine, added, push, restore, repo in table:
        print(f"{pattern:<10} {engine:<7} {added / 1e6:>14.1f} {added / 1e6 / changed:>9.1f} {push:>7.1f} "
              f"{restore:>9.1f} {repo / 1e6:>8.0f}")


def run(args, pattern, engine="restic"):
    root = Path(tempfile.mkdtemp(prefix="offsite-bench-"))
    try:
        pw = root / "password"
        pw.write_text("bench password\n")
        pw.chmod(0o600)
        restic = offsite.engine(Offsite(repository=str(root / "repo"), password_file=pw, options=[],
                                        host="bench", id="bench", engine=engine))
        restic.ensure_repository()
        db, rng = root / "live.db", random.Random(7)
        start = time.monotonic()
        rows = create(db, args.size_mb)
        print(f"\n## {engine}, {pattern}: database {db.stat().st_size / 1e6:.0f} MB ({rows} rows) made in "
              f"{time.monotonic() - start:.1f}s; {args.changed:.0%} of the pages change per day ({pattern})")
        print(f"{'night':>5} {'backup s':>9} {'push s':>7} {'added MB':>9} {'repo MB':>8} {'cp s':>6} {'cp MB':>6}")
        pushes, added = [], []
        for night in range(1, args.nights + 1):
            if night > 1:
                change(db, rows, args.changed, rng, pattern)
            t = time.monotonic()
            backup = backups.backup_database(db, root / "backups", "prod", "nightly", commit="bench")
            local_s = time.monotonic() - t
            result = restic.push(backup)
            t = time.monotonic()
            shutil.copyfile(backup.path, root / "full-copy")
            os.sync()
            cp_s = time.monotonic() - t
            (root / "full-copy").unlink()
            pushes.append(result["seconds"])
            added.append(result["added"])
            print(f"{night:>5} {local_s:>9.2f} {result['seconds']:>7.2f} {result['added'] / 1e6:>9.1f} "
                  f"{folder_bytes(root / 'repo') / 1e6:>8.0f} {cp_s:>6.2f} {backup.bytes / 1e6:>6.0f}")
            backups.remove_backup(backup)
        newest = restic.copies("prod")[0]
        t = time.monotonic()
        restored = restic.fetch(newest, root / "restored", "prod")
        fetch_s = time.monotonic() - t
        later = added[1:] or added
        print(f"\nafter the first night: {sum(later) / len(later) / 1e6:.1f} MB added per night on average "
              f"({sum(later) / len(later) / os.path.getsize(restored.path):.1%} of the database), "
              f"push {sum(pushes[1:] or pushes) / len(pushes[1:] or pushes):.1f}s per night; "
              f"a whole copy would add {os.path.getsize(restored.path) / 1e6:.0f} MB per night")
        print(f"repository after {args.nights} nights: {folder_bytes(root / 'repo') / 1e6:.0f} MB, against "
              f"{args.nights * os.path.getsize(restored.path) / 1e6:.0f} MB for {args.nights} whole copies")
        print(f"restore of the newest copy from off-site (fetch, sha256, integrity_check): {fetch_s:.1f}s")
        return (pattern, engine, sum(later) / len(later), sum(pushes[1:] or pushes) / len(pushes[1:] or pushes),
                fetch_s, folder_bytes(root / "repo"))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
