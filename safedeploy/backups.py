"""Consistent online backups of live SQLite databases, and their manifests.

A backup is <backup_dir>/<env>/<env>-<UTC stamp>-<reason>.sqlite3 with a
manifest beside it (same name + .json). Both are written to a temp name,
fsynced, renamed, and the folder fsynced: a partial backup never shows under
a final name. Only a backup with a manifest counts. Files 0600, folders 0700.

The copy uses SQLite's online backup API in one step from a read-only
connection: one read transaction pins a consistent snapshot (WAL readers do not
block writers), and the live database is never written or checkpointed.
"""

import hashlib
import json
import os
import shutil
import sqlite3
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import quote

from .errors import DeployError
from .files import disk_error, fsync_dir, make_private_dir, remove_quietly, temp_path_for, write_atomic
from .state import now_iso

SQLITE_MAGIC = b"SQLite format 3\x00"
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

    @property
    def manifest_path(self):
        return Path(self.path + ".json")

    def to_json(self):
        return asdict(self)


def open_readonly(db_path):
    """A read-only connection that never writes, checkpoints or creates the database."""
    uri = f"file:{quote(str(db_path))}?mode=ro"
    conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    return conn


def check_is_sqlite(db_path):
    db_path = Path(db_path)
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
                        "WHERE name NOT LIKE 'sqlite_%' ORDER BY type, name").fetchall()
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def live_schema(db_path):
    conn = open_readonly(db_path)
    try:
        return schema_fingerprint(conn)
    finally:
        conn.close()


def sha256_file(path, chunk=1 << 20):
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def backup_name(env, reason, folder):
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
    return int(size * 1.1) + (16 << 20)


def backup_database(db_path, folder, env, reason, commit="", unit_file=None):
    """Back up a live database (and the unit file, if given); return the verified Backup."""
    db_path = Path(db_path)
    check_is_sqlite(db_path)
    try:
        folder = make_private_dir(folder)
    except OSError as exc:
        raise disk_error(exc, folder) from exc
    need, free = needed_bytes(db_path), free_bytes(folder)
    if free < need:
        raise DeployError(f"not enough free disk in {folder} for a backup of {db_path}: "
                          f"{free >> 20} MiB free, {need >> 20} MiB needed")
    final = backup_name(env, reason, folder)
    tmp = temp_path_for(final)
    start = time.monotonic()
    try:
        info = copy_database(db_path, tmp)
        os.replace(tmp, final)
        fsync_dir(folder)
    except sqlite3.DatabaseError as exc:
        remove_quietly(tmp)
        raise DeployError(f"backup of {db_path} failed: {exc}") from None
    except OSError as exc:
        remove_quietly(tmp)
        raise disk_error(exc, final) from exc
    except BaseException:
        remove_quietly(tmp)
        raise
    backup = Backup(env=env, path=str(final), time=now_iso(), reason=reason, source=str(db_path),
                    commit=commit, seconds=round(time.monotonic() - start, 3), **info)
    try:
        if unit_file:
            backup.unit_file = str(unit_file)
            backup.unit_backup = str(final.with_suffix(".unit"))
            write_atomic(backup.unit_backup, Path(unit_file).read_bytes())
        write_atomic(backup.manifest_path, json.dumps(backup.to_json(), indent=2) + "\n")
    except BaseException:
        for leftover in (final, backup.unit_backup):
            if leftover:
                remove_quietly(leftover)
        raise
    return backup


def copy_database(db_path, tmp):
    """Copy a consistent snapshot of db_path to tmp (0600), check it, describe it."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    src = open_readonly(db_path)
    dst = sqlite3.connect(tmp, isolation_level=None)
    try:
        src.backup(dst, pages=-1)
        dst.execute("PRAGMA journal_mode = DELETE")      # a self-contained file, no -wal beside it
        verdict = integrity(dst)
        if verdict != "ok":
            raise DeployError(f"the backup copy of {db_path} fails integrity_check: {verdict}")
        page_size = dst.execute("PRAGMA page_size").fetchone()[0]
        page_count = dst.execute("PRAGMA page_count").fetchone()[0]
        schema = schema_fingerprint(dst)
    finally:
        dst.close()
        src.close()
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return {"bytes": os.stat(tmp).st_size, "sha256": sha256_file(tmp), "page_size": page_size,
            "page_count": page_count, "schema": schema}


def list_backups(folder):
    """Every backup with a readable manifest in folder, newest first."""
    backups = []
    for manifest in Path(folder).glob("*.sqlite3.json"):
        try:
            data = json.loads(manifest.read_text())
            backups.append(Backup(**{k: data.get(k) for k in Backup.__dataclass_fields__}))
        except (OSError, ValueError, TypeError):
            continue
    return sorted(backups, key=lambda b: (b.time or "", b.path), reverse=True)


def verify_backup(backup):
    """'ok', or what is wrong with the backup file (missing, checksum, integrity)."""
    path = Path(backup.path)
    if not path.exists():
        return f"{path} is missing"
    if sha256_file(path) != backup.sha256:
        return f"{path} does not match its recorded sha256"
    try:
        conn = open_readonly(path)
        try:
            return integrity(conn)
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        return f"{path} is not a readable SQLite database: {exc}"
