"""Restoring a database from a backup, with the app down only for stop, renames and start, whatever the size.

prepare_restore() copies and checks the backup beside the live file (a temp name) while the app still
serves, and fails before anything is stopped (out of room, a copy that does not match its sha256 or fails
integrity_check); EarlyPrepare starts it in a thread. set_aside() renames the stopped app's files away (that
rename IS the pre-rollback save: no copy is made while the app is down; backups.aside_name says where);
put_in_place() renames the prepared copy in; backups.seal() makes the set-aside files a verified backup with
a manifest once the app is back. rows_only_in() counts the rows a copy holds that another lacks.
Nothing here writes the live database before the app is stopped (rows_only_in only reads it), and every
rename is followed by an fsync of its folder.
"""

import hashlib
import os
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

from .dbfiles import NOT_TOOLS, free_bytes, integrity_of, remove_temp, removed_on_failure, write_behind
from .errors import DeployError
from .files import fsync_dir


def prepare_restore(backup, db_path):
    """Copy backup beside db_path (a temp name) and check its sha256 (integrity too, unless trusted_hash); return the
    temp path. Runs while the app serves; out of room, it fails before anything is stopped."""
    db_path = Path(db_path)
    folder = db_path.parent
    folder.mkdir(parents=True, exist_ok=True)
    need, free = int(backup.bytes or 0) + (1 << 20), free_bytes(folder)
    if free < need:
        raise DeployError(f"not enough free disk in {folder} to prepare the restore of {backup.path}: "
                          f"{free / 2**20:.1f} MiB free, {need / 2**20:.1f} MiB needed; nothing was stopped or changed")
    tmp = folder / f".{db_path.name}.restore-{os.getpid()}"
    with removed_on_failure(tmp, target=db_path):
        if copy_hashed(backup.path, tmp) != backup.sha256:
            raise DeployError(f"the copy of {backup.path} does not match its sha256; the live database was not touched")
        if not trusted_hash(backup):
            verdict = integrity_of(tmp)
            if verdict != "ok":
                raise DeployError(f"the copy of {backup.path} fails integrity_check ({verdict}); the live database "
                                  "was not touched")
        if db_path.exists():
            st = db_path.stat()
            os.chmod(tmp, stat_mode(st.st_mode))
            os.chown(tmp, st.st_uid, st.st_gid)
    return tmp


class EarlyPrepare:
    """prepare_restore() started at once in a thread (a rollback's plan starts it: the copy, bound by the disk,
    goes on while the plan compares rows, bound by the CPU). result(): the temp path, or the DeployError;
    discard(): wait for it and remove what it made (a plan not confirmed). Changes nothing live."""

    def __init__(self, backup, db_path) -> None:
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.future = self.pool.submit(prepare_restore, backup, db_path)
        self.pool.shutdown(wait=False)

    def result(self):
        return self.future.result()

    def discard(self) -> None:
        try:
            remove_temp(self.future.result())
        except BaseException:       # it failed: it removed what it made itself
            pass


def trusted_hash(backup) -> bool:
    """Whether a file matching backup's sha256 needs no integrity_check of its own: the tool writes a manifest
    with a sha256 only after the file passed integrity_check (backup_database, seal, a verified fetch), so the
    same bytes pass it again. A manifest without a sha256 proves nothing."""
    return isinstance(getattr(backup, "sha256", None), str) and len(backup.sha256) == 64


def copy_hashed(src_path, dst_path, chunk: int = 2 << 20) -> str:
    """Copy a file (new file, 0600) and return the sha256 of the bytes written, in one read of the source: each
    chunk is hashed from the buffer it is written from, pushed to disk as it goes (see write_behind)."""
    digest = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    fd = os.open(dst_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with open(src_path, "rb", buffering=0) as src:
            offset = 0
            while n := src.readinto(buf):
                digest.update(view[:n])
                out = view[:n]
                while out:
                    out = out[os.write(fd, out):]
                write_behind(fd, offset, n, chunk)
                offset += n
        os.fsync(fd)
    finally:
        os.close(fd)
    return digest.hexdigest()


def set_aside(db_path, dest):
    """Rename the stopped app's database, with its -wal and -shm, to dest (+ the same suffixes).
    The WAL is folded in first when SQLite can open the file; a corrupt database is moved as it
    is, its files together (evidence, and whatever rows it still holds)."""
    db_path, dest = Path(db_path), Path(dest)
    try:
        fold_wal(db_path)     # every write into the main file: a kill between the moves below loses none
    except DeployError:
        pass
    for suffix in ("-wal", "-shm", ""):       # the WAL first: never a stale -wal beside a database
        if Path(f"{db_path}{suffix}").exists():
            os.replace(f"{db_path}{suffix}", f"{dest}{suffix}")
    if dest.parent != db_path.parent:
        os.chmod(dest, 0o600)
        fsync_dir(dest.parent)
    fsync_dir(db_path.parent)
    return dest


def put_in_place(tmp, db_path):
    os.replace(tmp, db_path)
    fsync_dir(Path(db_path).parent)


def fold_wal(db_path):
    """Checkpoint the (stopped) app's WAL into its database file."""
    try:
        conn = sqlite3.connect(db_path, timeout=10, isolation_level=None)
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise DeployError(f"cannot fold the WAL of {db_path} into it before the restore: {exc}") from None


def stat_mode(mode):
    return mode & 0o7777


def rows_only_in(saved_path, restored_path, seconds=None):
    """Per table: how many rows of the saved copy the restored database does not have. seconds: a bound
    (sqlite3.OperationalError "interrupted" past it: status does not wait on a large database)."""
    saved = sqlite3.connect(f"file:{quote(str(saved_path))}?mode=ro", uri=True)
    if seconds is not None:
        deadline = time.monotonic() + seconds
        saved.set_progress_handler(lambda: 1 if time.monotonic() > deadline else 0, 10000)
    try:
        saved.execute("ATTACH DATABASE ? AS restored", (f"file:{quote(str(restored_path))}?mode=ro",))
        tables = [r[0] for r in saved.execute(
            f"SELECT name FROM main.sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' {NOT_TOOLS} "
            "ORDER BY name")]
        restored_tables = {r[0] for r in saved.execute(
            "SELECT name FROM restored.sqlite_master WHERE type = 'table'")}
        lost = {}
        for table in tables:
            q = '"' + table.replace('"', '""') + '"'
            if table not in restored_tables:
                n = saved.execute(f"SELECT count(*) FROM main.{q}").fetchone()[0]
            else:
                n = count_missing(saved, q)
            if n:
                lost[table] = n
        return lost
    finally:
        saved.close()


def count_missing(conn, q):
    for sql in (f"SELECT count(*) FROM (SELECT * FROM main.{q} EXCEPT SELECT * FROM restored.{q})",
                f"SELECT count(*) FROM main.{q} WHERE rowid NOT IN (SELECT rowid FROM restored.{q})"):
        try:
            return conn.execute(sql).fetchone()[0]
        except sqlite3.OperationalError:
            continue
    a = conn.execute(f"SELECT count(*) FROM main.{q}").fetchone()[0]
    b = conn.execute(f"SELECT count(*) FROM restored.{q}").fetchone()[0]
    return max(0, a - b)
