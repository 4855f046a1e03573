"""SQLite database files, read and copied without writing the live one.

Checks (a regular file, SQLite's header, integrity_check), the schema fingerprint, row counts, and a
consistent copy of a live database into a temp file: made from a read-only connection whose one read
transaction pins a consistent snapshot (WAL readers do not block writers): for a WAL database, the file
and its WAL copied raw under that snapshot (copy_snapshot says why that is consistent); otherwise SQLite's
online backup API in one step. finish_copy then makes the copy self-contained, checks, hashes and fsyncs
it. The live database is never written or checkpointed; a temp copy that fails is removed with its
-wal/-shm/-journal (removed_on_failure), and an OSError becomes one line about the target. Naming,
manifests and the catalogue of backups are safedeploy/backups'.
"""

import contextlib
import ctypes
import hashlib
import json
import os
import shutil
import sqlite3
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from . import rowsets
from .errors import DeployError
from .files import disk_error, remove_quietly

SQLITE_MAGIC = b"SQLite format 3\x00"
DEFAULT_BOOKKEEPING = rowsets.DEFAULT_BOOKKEEPING
NOT_TOOLS = r"AND name NOT LIKE '\_litestream\_%' ESCAPE '\'"
BUSY_TIMEOUT_MS = 10_000


def require_regular_file(db_path):
    """A FIFO or a device at the database's path would make every open() wait forever."""
    try:
        mode = os.stat(db_path).st_mode
    except FileNotFoundError:
        raise DeployError(f"database {db_path} does not exist") from None
    except OSError as exc:
        raise DeployError(f"cannot look at database {db_path}: {exc.strerror}") from None
    if stat.S_ISDIR(mode):
        raise DeployError(f"database {db_path} is a folder, not a file")
    if not stat.S_ISREG(mode):
        raise DeployError(f"database {db_path} is not a regular file (a FIFO, socket or device): refused")


def open_readonly(db_path):
    """A read-only connection that never writes, checkpoints or creates the database."""
    require_regular_file(db_path)
    uri = f"file:{quote(str(db_path))}?mode=ro"
    conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    return conn


def check_is_sqlite(db_path):
    db_path = Path(db_path)
    require_regular_file(db_path)
    try:
        with open(db_path, "rb") as fh:
            header = fh.read(16)
    except FileNotFoundError:
        raise DeployError(f"database {db_path} does not exist") from None
    except IsADirectoryError:
        raise DeployError(f"database {db_path} is a folder, not a file") from None
    except PermissionError:
        raise DeployError(f"database {db_path} is not readable by this user") from None
    if header != SQLITE_MAGIC and not (header == b"" and db_path.stat().st_size == 0):
        raise DeployError(f"{db_path} is not an SQLite database")


def integrity(conn, quick=False):
    """'ok' or the first problem SQLite reports."""
    rows = conn.execute("PRAGMA quick_check" if quick else "PRAGMA integrity_check").fetchall()
    problems = [r[0] for r in rows if r[0] != "ok"]
    return "ok" if not problems else problems[0]


def integrity_of(path, quick=False):
    """'ok', or the first problem SQLite finds in the database at path (opened read-only)."""
    try:
        require_regular_file(path)
    except DeployError as exc:
        return str(exc)
    try:
        conn = open_readonly(path)
        try:
            return integrity(conn, quick)
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        return f"{path} is not a readable SQLite database: {exc}"


def schema_fingerprint(conn):
    rows = conn.execute("SELECT type, name, tbl_name, coalesce(sql, '') FROM sqlite_master "
                        f"WHERE name NOT LIKE 'sqlite_%' {NOT_TOOLS} ORDER BY type, name").fetchall()
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def live_schema(db_path):
    """The schema fingerprint of a database, or None when SQLite cannot read it (corrupt, not SQLite)."""
    try:
        conn = open_readonly(db_path)
        try:
            return schema_fingerprint(conn)
        finally:
            conn.close()
    except sqlite3.DatabaseError:
        return None


def sha256_file(path, chunk=1 << 20):
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class WalMark:
    """What tells whether a WAL database was written between two looks: the WAL index header as its -shm file
    holds it (SQLite changes it on every commit: iChange, mxFrame, the salts and checksums; None when the file
    is missing or its two copies of the header differ, as they do in the middle of an update), and the
    (device, inode, size, mtime) of the database file and its -wal (None: the file is missing)."""
    header: bytes | None
    db: tuple[int, int, int, int] | None
    wal: tuple[int, int, int, int] | None


def wal_mark(db_path) -> WalMark:
    """The WalMark of the database at db_path now (reads 96 bytes of its -shm and stats two files; writes nothing)."""
    try:
        raw = os.pread(held_fd(f"{db_path}-shm"), 96, 0)
        header = raw[:48] if len(raw) == 96 and raw[:48] == raw[48:] else None
    except OSError:
        header = None
    return WalMark(header, file_state(db_path), file_state(f"{db_path}-wal"))


_HELD: dict[tuple[int, int], int] = {}


def held_fd(path) -> int:
    """A read-only descriptor of the file at path, opened once per file (device, inode) and never closed while
    this process runs. Closing any descriptor of a file drops every POSIX lock the process holds on it: the
    read locks of this process's own SQLite connections to the live database (its SHARED lock on the file,
    its WAL read marks in -shm) would go, and with them what keeps the app from checkpointing under them or
    removing the WAL. So the raw reads of a live database's files (wal_mark, safedeploy.rowpages) never close
    what they open."""
    st = os.stat(path)
    fd = _HELD.get((st.st_dev, st.st_ino))
    if fd is not None:
        return fd
    fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
    opened = os.fstat(fd)
    key = (opened.st_dev, opened.st_ino)
    if key in _HELD:            # replaced and put back between the stat and the open: keep the first one
        return _HELD[key]
    _HELD[key] = fd
    return fd


def file_state(path) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def free_bytes(folder):
    folder = Path(folder)
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


def needed_bytes(db_path):
    """Room a backup of db_path needs: the file, its WAL, and a margin."""
    size = 0
    for suffix in ("", "-wal"):
        try:
            size += os.stat(f"{db_path}{suffix}").st_size
        except FileNotFoundError:
            pass
    return int(size * 1.1) + (1 << 20)


@contextlib.contextmanager
def removed_on_failure(*paths, target):
    """If the block fails: remove paths (with a temp database's -wal, -shm, -journal), and turn an
    OSError into one line about target. Nothing half-written stays under any name."""
    try:
        yield
    except BaseException as exc:
        for path in paths:
            if path:
                remove_temp(path)
        if isinstance(exc, OSError):
            raise disk_error(exc, target) from exc
        raise


def remove_temp(tmp):
    for suffix in ("", "-wal", "-shm", "-journal"):
        remove_quietly(f"{tmp}{suffix}")


def copy_snapshot(db_path, tmp, progress=None, method="auto"):
    """Copy a consistent snapshot of db_path to tmp (an empty file, 0600).

    method "snapshot" (the default for WAL databases): raw-copy the database
    file and then its WAL while one read transaction pins a snapshot. While a
    reader holds the snapshot, a checkpoint may only copy WAL frames it already
    sees into the database file, and the WAL cannot be restarted under it, so
    the file copy plus the WAL copy, recovered by SQLite up to the last valid
    commit, is a consistent state at or after the snapshot. SQLite then folds
    the WAL into the copy (checkpoint) and makes it a self-contained file.
    method "api": SQLite's online backup API in one step (the fallback for
    databases not in WAL mode, where a raw copy would not be safe).
    """
    require_regular_file(db_path)
    # The file is opened before the connection and closed after it: closing any descriptor of a file drops
    # every POSIX lock this process holds on it, the connection's read lock included; the app's last
    # connection to close would then checkpoint into the file being copied and delete its WAL.
    raw = os.open(db_path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        src = open_readonly(db_path)
        try:
            if method == "auto":
                method = "snapshot" if src.execute("PRAGMA journal_mode").fetchone()[0] == "wal" else "api"
            if method == "snapshot":
                snapshot_copy(src, db_path, tmp, progress, raw=raw)
            else:
                api_copy(src, tmp, progress)
        finally:
            src.close()
    finally:
        os.close(raw)


def api_copy(src, tmp, progress):
    dst = sqlite3.connect(tmp, isolation_level=None)
    try:
        src.backup(dst, pages=-1)
    finally:
        dst.close()
    if progress:
        progress(1, 1)


def snapshot_copy(src, db_path, tmp, progress, raw: int | None = None):
    """raw: a descriptor of db_path opened before src and closed after it (see copy_snapshot); without
    one, the file is opened by path, and the caller must hold no other connection to it open."""
    wal_tmp = Path(f"{tmp}-wal")
    src.execute("BEGIN")
    try:
        src.execute("SELECT count(*) FROM sqlite_master").fetchone()     # the read transaction starts here
        sizes = [file_size(db_path), file_size(f"{db_path}-wal")]
        done = [0]

        def step(n):
            done[0] += n
            if progress:
                progress(min(done[0], sum(sizes)), sum(sizes))

        # Bytes past these sizes belong to commits after the snapshot: never chase a growing WAL.
        copy_file(db_path, tmp, step, limit=sizes[0], src_fd=raw)
        copy_file(f"{db_path}-wal", wal_tmp, step, limit=sizes[1]) if sizes[1] else remove_quietly(wal_tmp)
    finally:
        src.execute("COMMIT")
    dst = sqlite3.connect(tmp, isolation_level=None)
    try:
        dst.execute("PRAGMA synchronous = OFF")         # one fsync at the end, in finish_copy
        dst.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        dst.execute("PRAGMA journal_mode = DELETE").fetchone()
    finally:
        dst.close()
    for leftover in (wal_tmp, Path(f"{tmp}-shm")):
        remove_quietly(leftover)


def file_size(path):
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def copy_file(src_path, dst_path, step, limit, chunk=2 << 20, src_fd: int | None = None):
    """Copy a file's bytes in small chunks (copy_file_range where the kernel has it), pushing
    each chunk to disk as it goes and waiting for the one before: dirty pages never pile up,
    so the app's own commits (which fsync) wait a few milliseconds at most, not for one big
    flush at the end. src_fd: read from this descriptor (from its start), left open."""
    dst_fd = os.open(dst_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    if src_fd is not None:
        os.lseek(src_fd, 0, os.SEEK_SET)
    source = open(src_fd, "rb", buffering=0, closefd=False) if src_fd is not None else open(src_path, "rb", buffering=0)
    with source as src, open(dst_fd, "wb", buffering=0) as dst:
        offset = 0
        while offset < limit:
            want = min(chunk, limit - offset)
            try:
                n = os.copy_file_range(src.fileno(), dst.fileno(), want)
            except OSError:
                block = src.read(want)
                n = len(block)
                view = memoryview(block)
                while view:
                    view = view[dst.write(view):]
            if n == 0:
                break
            write_behind(dst.fileno(), offset, n, chunk)
            offset += n
            step(n)


_SYNC_FILE_RANGE = None


def write_behind(fd, offset, length, chunk):
    """Start writing [offset, offset+length) to disk; wait for the chunk before it."""
    global _SYNC_FILE_RANGE
    if _SYNC_FILE_RANGE is None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
            _SYNC_FILE_RANGE = libc.sync_file_range
        except (OSError, AttributeError):
            _SYNC_FILE_RANGE = False
    if not _SYNC_FILE_RANGE:
        os.fdatasync(fd)
        return
    write, wait_before, wait_after = 2, 1, 4
    _SYNC_FILE_RANGE(fd, offset, length, write)
    if offset >= chunk:
        _SYNC_FILE_RANGE(fd, offset - chunk, chunk, wait_before | write | wait_after)


def finish_copy(db_path, tmp, bookkeeping=DEFAULT_BOOKKEEPING, alongside=None, rows=None, checked=None):
    """Make the copy self-contained, then check it (integrity_check), hash it and count its rows, all three at
    once (threads: SQLite and hashlib let go of the GIL), then fsync it. alongside: a function that reads the
    self-contained copy (read-only), run at the same time (a restore's seal counts the rows the restore took
    out meanwhile). rows: the count, when the caller knows it for these very bytes (a seal that takes the
    plan's: see decisions.plan_count_reusable); then it is not counted again. checked: likewise, the verdict of an
    integrity_check of the same content ("ok"); then it is not checked again."""
    dst = sqlite3.connect(tmp, isolation_level=None)
    try:
        dst.execute("PRAGMA synchronous = OFF")
        if dst.execute("PRAGMA journal_mode").fetchone()[0] != "delete":
            dst.execute("PRAGMA journal_mode = DELETE")      # a self-contained file, no -wal beside it
        with ThreadPoolExecutor(max_workers=3) as pool:
            digest = pool.submit(sha256_file, tmp)           # hashlib and SQLite both release the GIL
            counted = pool.submit(rows_of, tmp, bookkeeping) if rows is None else None   # its own connection
            extra = pool.submit(alongside) if alongside is not None else None
            verdict = integrity(dst) if checked is None else checked
            sha256 = digest.result()
            if extra is not None:
                extra.result()
            try:
                rows = counted.result() if counted is not None else rows
            except sqlite3.DatabaseError:
                if verdict == "ok":
                    raise
                rows = None             # the file is damaged: integrity_check's verdict says so below
        if verdict != "ok":
            raise DeployError(f"the backup copy of {db_path} fails integrity_check: {verdict}")
        page_size = dst.execute("PRAGMA page_size").fetchone()[0]
        page_count = dst.execute("PRAGMA page_count").fetchone()[0]
        schema = schema_fingerprint(dst)
    finally:
        dst.close()
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return {"bytes": os.stat(tmp).st_size, "sha256": sha256, "page_size": page_size,
            "page_count": page_count, "schema": schema, "rows": rows}


def rows_of(path, bookkeeping=DEFAULT_BOOKKEEPING):
    """count_rows of the database at path, on a read-only connection of its own."""
    conn = open_readonly(path)
    try:
        return count_rows(conn, bookkeeping=bookkeeping)
    finally:
        conn.close()


def count_rows(conn, schema="main", bookkeeping=DEFAULT_BOOKKEEPING):
    """{table: rows} of a database's users' tables (a framework's bookkeeping tables, virtual tables and their
    shadow tables left out): what tells a copy with the data from a fresh empty one (a rebuilt host's)."""
    tables = rowsets.read_schema(conn, schema, bookkeeping).users
    return {t.name: conn.execute(f"SELECT count(*) FROM {schema}.{rowsets.quote(t.name)}").fetchone()[0]
            for t in tables}


def live_rows(db_path, seconds=2.0, bookkeeping=DEFAULT_BOOKKEEPING):
    """{table: rows} of the live database (read-only), or None when it cannot be counted within seconds
    (a large database: status does not wait on it) or read at all."""
    try:
        conn = open_readonly(db_path)
    except (DeployError, sqlite3.Error):
        return None
    deadline = time.monotonic() + seconds
    conn.set_progress_handler(lambda: 1 if time.monotonic() > deadline else 0, 10000)
    try:
        return count_rows(conn, bookkeeping=bookkeeping)
    except sqlite3.Error:
        return None
    finally:
        conn.close()
