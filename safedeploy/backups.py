"""Consistent online backups of live SQLite databases, and their manifests.

A backup is <backup_dir>/<env>/<env>-<UTC stamp>-<reason>.sqlite3 with a
manifest beside it (same name + .json). Both are written to a temp name,
fsynced, renamed, and the folder fsynced: a partial backup never shows under
a final name. Only a backup with a manifest counts. Files 0600, folders 0700.

The copy is made from a read-only connection whose one read transaction pins a
consistent snapshot (WAL readers do not block writers): for a WAL database, the
file and its WAL copied raw under that snapshot (copy_snapshot says why that is
consistent); otherwise SQLite's online backup API in one step. The live database
is never written or checkpointed.
"""

import contextlib
import ctypes
import hashlib
import json
import os
import re
import shutil
import sqlite3
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from urllib.parse import quote

from . import rowsets
from .errors import DeployError
from .files import disk_error, fsync_dir, make_private_dir, remove_quietly, temp_path_for, write_atomic
from .state import StepClock, now_iso
from .units import user_unit_dir

SQLITE_MAGIC = b"SQLite format 3\x00"
DEFAULT_BOOKKEEPING = rowsets.DEFAULT_BOOKKEEPING
# Litestream's own tables (_litestream_seq, _litestream_lock), which it adds to a database it replicates:
# never the users' rows, never a schema change
NOT_TOOLS = r"AND name NOT LIKE '\_litestream\_%' ESCAPE '\'"
BUSY_TIMEOUT_MS = 10_000


@dataclass
class Backup:
    env: str
    path: str
    time: str
    bytes: int
    sha256: str
    reason: str
    page_size: int
    page_count: int
    schema: str
    source: str
    commit: str
    seconds: float
    unit_file: str | None = None
    unit_backup: str | None = None
    held: bool = False          # holds rows a restore took out of the live database: prune keeps it until released
    rows: dict | None = None    # {table: rows} the copy holds (None: a backup made before they were counted)

    @property
    def rows_total(self):
        return sum(self.rows.values()) if isinstance(self.rows, dict) else None

    @property
    def manifest_path(self):
        return Path(self.path + ".json")

    def to_json(self):
        return asdict(self)


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


def backup_name(env, reason, folder):
    folder = Path(folder)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    name = f"{env}-{stamp}-{reason}.sqlite3"
    n = 1
    while (folder / name).exists() or (folder / (name + ".json")).exists():
        n += 1
        name = f"{env}-{stamp}-{n}-{reason}.sqlite3"
    return folder / name


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


def backup_database(db_path, folder, env, reason, commit="", unit_file=None, progress=None, clock=None,
                    final=None, bookkeeping=DEFAULT_BOOKKEEPING):
    """Back up a live database (and the unit file, if given); return the verified Backup.
    clock (a state.StepClock) times the steps copy, verify and publish, and journals them."""
    clock = clock or StepClock()
    db_path = Path(db_path)
    check_is_sqlite(db_path)
    try:
        folder = make_private_dir(folder)
    except OSError as exc:
        raise disk_error(exc, folder) from exc
    need, free = needed_bytes(db_path), free_bytes(folder)
    if free < need:
        raise DeployError(f"not enough free disk in {folder} for a backup of {db_path}: "
                          f"{free / 2**20:.1f} MiB free, {need / 2**20:.1f} MiB needed")
    final = Path(final) if final and not Path(final).exists() else backup_name(env, reason, folder)
    unit_text = read_unit_file(unit_file) if unit_file else None    # as it is with this copy of the database
    tmp = temp_path_for(final)
    start = time.monotonic()
    with removed_on_failure(tmp, target=final):
        try:
            with clock.step("copy"):
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                os.close(fd)
                copy_snapshot(db_path, tmp, progress)
            with clock.step("verify"):
                info = finish_copy(db_path, tmp, bookkeeping)
        except sqlite3.DatabaseError as exc:
            if "disk is full" in str(exc):
                raise DeployError(f"disk full while writing a backup in {folder}: free some space and run again") from None
            if os.statvfs(folder).f_favail == 0:
                raise DeployError(f"the backup folder {folder} is out of inodes (no file can be created there): "
                                  "remove files on that file system and run again") from None
            raise DeployError(f"backup of {db_path} failed: {exc}") from None
    backup = Backup(env=env, path=str(final), time=now_iso(), reason=reason, source=str(db_path),
                    commit=commit, seconds=round(time.monotonic() - start, 3), **info)
    if unit_file:
        backup.unit_file, backup.unit_backup = str(unit_file), str(final.with_suffix(".unit"))
    with removed_on_failure(tmp, final, backup.unit_backup, target=final), clock.step("publish"):
        if unit_text is not None:
            write_atomic(backup.unit_backup, unit_text)
        os.replace(tmp, final)
        write_atomic(backup.manifest_path, json.dumps(backup.to_json(), indent=2) + "\n")   # last: now it counts
    return backup


def read_unit_file(unit_file) -> bytes:
    try:
        return Path(unit_file).read_bytes()
    except OSError as exc:
        raise DeployError(f"cannot read the unit file {unit_file} to keep it with the backup: "
                          f"{exc.strerror or exc}") from None


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


def orphans(folder):
    """Backup files without a manifest (a backup killed while publishing): never a backup."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir() if p.suffix in (".sqlite3", ".unit")
            and not p.with_suffix(".sqlite3").with_name(p.with_suffix(".sqlite3").name + ".json").exists()
            and "-pre-rollback." not in p.name]     # a save a restore set aside holds rows: sealed, never removed


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
    src = open_readonly(db_path)
    try:
        if method == "auto":
            method = "snapshot" if src.execute("PRAGMA journal_mode").fetchone()[0] == "wal" else "api"
        if method == "snapshot":
            snapshot_copy(src, db_path, tmp, progress)
        else:
            api_copy(src, tmp, progress)
    finally:
        src.close()


def api_copy(src, tmp, progress):
    dst = sqlite3.connect(tmp, isolation_level=None)
    try:
        src.backup(dst, pages=-1)
    finally:
        dst.close()
    if progress:
        progress(1, 1)


def snapshot_copy(src, db_path, tmp, progress):
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
        copy_file(db_path, tmp, step, limit=sizes[0])
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


def copy_file(src_path, dst_path, step, limit, chunk=2 << 20):
    """Copy a file's bytes in small chunks (copy_file_range where the kernel has it), pushing
    each chunk to disk as it goes and waiting for the one before: dirty pages never pile up,
    so the app's own commits (which fsync) wait a few milliseconds at most, not for one big
    flush at the end."""
    dst_fd = os.open(dst_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(src_path, "rb", buffering=0) as src, open(dst_fd, "wb", buffering=0) as dst:
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


def finish_copy(db_path, tmp, bookkeeping=DEFAULT_BOOKKEEPING, alongside=None):
    """Make the copy self-contained, then check it and hash it (in parallel), then fsync it. alongside: a
    function that reads the self-contained copy (read-only), run at the same time (a restore's seal counts
    the rows the restore took out meanwhile)."""
    dst = sqlite3.connect(tmp, isolation_level=None)
    try:
        dst.execute("PRAGMA synchronous = OFF")
        if dst.execute("PRAGMA journal_mode").fetchone()[0] != "delete":
            dst.execute("PRAGMA journal_mode = DELETE")      # a self-contained file, no -wal beside it
        with ThreadPoolExecutor(max_workers=2) as pool:
            digest = pool.submit(sha256_file, tmp)           # hashlib and SQLite both release the GIL
            extra = pool.submit(alongside) if alongside is not None else None
            verdict = integrity(dst)
            sha256 = digest.result()
            if extra is not None:
                extra.result()
        if verdict != "ok":
            raise DeployError(f"the backup copy of {db_path} fails integrity_check: {verdict}")
        page_size = dst.execute("PRAGMA page_size").fetchone()[0]
        page_count = dst.execute("PRAGMA page_count").fetchone()[0]
        schema = schema_fingerprint(dst)
        rows = count_rows(dst, bookkeeping=bookkeeping)
    finally:
        dst.close()
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return {"bytes": os.stat(tmp).st_size, "sha256": sha256, "page_size": page_size,
            "page_count": page_count, "schema": schema, "rows": rows}


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


def list_backups(folder):
    """Every backup with a sound manifest in folder, newest first (see scan_backups)."""
    return scan_backups(folder)[0]


FIELD_TYPES = {"env": str, "time": str, "bytes": int, "sha256": str, "reason": str, "page_size": int,
               "rows": dict,
               "page_count": int, "schema": str, "source": str, "commit": str, "seconds": (int, float)}


def scan_backups(folder):
    """([Backup], [problem]) for the manifests in folder. A manifest is data, never trusted with a
    path: the backup is the file beside it (whatever its "path" says), its unit copy the .unit
    beside it, and the unit file it restores must lie in the user's unit folder. A manifest that
    is not a JSON object of the right types is reported and skipped; the rest still count."""
    folder = Path(folder)
    found, problems = [], []
    try:
        manifests = sorted(folder.glob("*.sqlite3.json"))
    except OSError as exc:
        return [], [f"{folder}: {exc.strerror}"]
    for manifest in manifests:
        try:
            data = json.loads(manifest.read_text())
        except (OSError, ValueError) as exc:
            problems.append(f"{manifest}: unreadable ({exc})")
            continue
        why = manifest_problem(data)
        if why:
            problems.append(f"{manifest}: {why}; skipped")
            continue
        path = manifest.with_name(manifest.name.removesuffix(".json"))
        fields = {k: data.get(k) for k in Backup.__dataclass_fields__}
        fields.update(path=str(path), unit_backup=None, unit_file=None, held=data.get("held") is True)
        unit_copy = path.with_suffix(".unit")
        unit_file = data.get("unit_file")
        if (isinstance(unit_file, str) and unit_file.endswith(".service") and unit_copy.is_file()
                and Path(unit_file).parent == user_unit_dir() and not Path(unit_file).name.startswith("-")):
            fields.update(unit_backup=str(unit_copy), unit_file=unit_file)
        found.append(Backup(**fields))
    return sorted(found, key=sort_key, reverse=True), problems


def manifest_problem(data):
    if not isinstance(data, dict):
        return f"not a JSON object ({type(data).__name__})"
    for key, kind in FIELD_TYPES.items():
        value = data.get(key)
        if value is None and key in ("source", "commit", "schema", "seconds", "page_size", "page_count", "rows"):
            continue
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"{key!r} is {value!r}, not a {getattr(kind, '__name__', 'number')}"
    if isinstance(data.get("rows"), dict) and not all(isinstance(n, int) for n in data["rows"].values()):
        return "'rows' is not a table of counts"
    try:
        when = datetime.fromisoformat(data["time"])
    except ValueError:
        return f"'time' {data['time']!r} is not an ISO 8601 time"
    if when.tzinfo is None:
        return f"'time' {data['time']!r} has no UTC offset"
    return ""


STAMP_RE = re.compile(r"-\d{8}-\d{6}(?:-(\d+))?-[^/]*\.sqlite3$")


def sort_key(backup):
    """By the instant, not by the text (a backup made under another TZ sorts right); within one
    second by the counter backup_name() adds (-2-, -3-): the later backup is the newer."""
    when = datetime.fromisoformat(backup.time)
    match = STAMP_RE.search(backup.path)
    return (when.timestamp(), int(match.group(1) or 1) if match else 0, backup.path)


def verify_backup(backup, trust_hash=False):
    """'ok', or what is wrong with the backup file (missing, checksum, integrity). trust_hash: a file matching
    the sha256 its manifest recorded after an integrity_check (trusted_hash) is not checked again."""
    path = Path(backup.path)
    if not path.exists():
        return f"{path} is missing"
    if sha256_file(path) != backup.sha256:
        return f"{path} does not match its recorded sha256"
    if trust_hash and trusted_hash(backup):
        return "ok"
    return integrity_of(path)


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


# -- holds and removal (what is kept is safedeploy/retention's) ---------------------------------
def set_held(backup, held):
    """held: the copy holds rows an operation took out of the live database (prune keeps it, the row ledger
    always compares it); released: the operator has the rows back, or does not want them."""
    data = json.loads(backup.manifest_path.read_text())
    data["held"] = bool(held)
    data["held" if held else "released"] = bool(held) if held else now_iso()
    write_atomic(backup.manifest_path, json.dumps(data, indent=2) + "\n")
    backup.held = bool(held)


def release_hold(backup):
    """The operator has the rows back (or does not want them): prune may treat it as any backup."""
    set_held(backup, False)


def remove_backup(backup):
    """Remove a backup: its manifest first, so that it stops counting at once."""
    for path in (backup.manifest_path, Path(backup.path), backup.unit_backup):
        if path:
            remove_quietly(path)
    fsync_dir(Path(backup.path).parent)


# -- restoring -----------------------------------------------------------------------------
# A database restore keeps the app down only for stop, renames and start, whatever the size:
# prepare_restore() copies and checks the backup beside the live file while the app still
# serves; set_aside() renames the stopped app's files away (that rename IS the pre-rollback
# save: no copy is made while the app is down); put_in_place() renames the prepared copy in;
# seal() makes the set-aside files a verified backup with a manifest once the app is back.
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


def aside_name(db_path, backup_folder, env, stamp):
    """Where set_aside() puts the live files: straight into the backup folder when it is on the
    same file system (a rename), else beside the database as DB.rolled-back-<stamp>."""
    db_path, backup_folder = Path(db_path), make_private_dir(backup_folder)
    if os.stat(db_path.parent).st_dev == os.stat(backup_folder).st_dev:
        return backup_name(env, "pre-rollback", backup_folder)
    return db_path.parent / f"{db_path.name}.rolled-back-{stamp}"


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


def seal(saved, folder, env, commit, unit_file=None, alongside=None):
    """Make a database set aside by a restore a verified backup (manifest, sha256) in folder.
    A file already in folder is sealed where it lies; one outside is copied in (and stays).
    alongside: a function reading the saved file, run while it is checked (see finish_copy)."""
    saved, folder = Path(saved), Path(folder)
    if saved.parent != folder:
        backup = backup_database(saved, folder, env, "pre-rollback", commit=commit, unit_file=unit_file)
        if alongside is not None:
            alongside()
        backup.held = True
        write_atomic(backup.manifest_path, json.dumps(backup.to_json(), indent=2) + "\n")
        os.chmod(saved, 0o600)
        return backup
    start = time.monotonic()
    try:
        info = finish_copy(saved, saved, alongside=alongside)
    except (sqlite3.DatabaseError, DeployError) as exc:
        evidence = saved.with_name(saved.name.removesuffix(".sqlite3") + ".unreadable.sqlite3")
        for suffix in ("-wal", "-shm", ""):
            if Path(f"{saved}{suffix}").exists():
                os.replace(f"{saved}{suffix}", f"{evidence}{suffix}")
        raise DeployError(f"the replaced database is not a readable SQLite database ({exc}); it is kept as "
                          f"evidence in {evidence}", evidence=str(evidence)) from None
    for suffix in ("-wal", "-shm"):
        remove_quietly(f"{saved}{suffix}")
    os.chmod(saved, 0o600)
    backup = Backup(env=env, path=str(saved), time=now_iso(), reason="pre-rollback", source=str(saved),
                    commit=commit, seconds=round(time.monotonic() - start, 3), held=True, **info)
    if unit_file:
        backup.unit_file, backup.unit_backup = str(unit_file), str(saved.with_suffix(".unit"))
        write_atomic(backup.unit_backup, Path(unit_file).read_bytes())
    write_atomic(backup.manifest_path, json.dumps(backup.to_json(), indent=2) + "\n")
    return backup


def unsealed(folder):
    """Pre-rollback saves that a killed rollback set aside but did not seal: never to be removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return [p for p in folder.glob("*-pre-rollback.sqlite3") if not Path(f"{p}.json").exists()]


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
