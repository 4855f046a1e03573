"""Backups of live SQLite databases: making one, its manifest, the catalogue of a folder, holds and removal,
and sealing the files a restore set aside.

A backup is <backup_dir>/<env>/<env>-<UTC stamp>-<reason>.sqlite3 with a
manifest beside it (same name + .json). Both are written to a temp name,
fsynced, renamed, and the folder fsynced: a partial backup never shows under
a final name. Only a backup with a manifest counts. Files 0600, folders 0700.

The copy itself (a consistent snapshot of the live database, never written or
checkpointed) is safedeploy/dbfiles'; the restore is safedeploy/restore's: callers
import those from there.
"""

import json
import os
import re
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from .dbfiles import (DEFAULT_BOOKKEEPING, check_is_sqlite, copy_snapshot, finish_copy, free_bytes, integrity_of,
                      needed_bytes, removed_on_failure, sha256_file)
from .errors import DeployError
from .files import disk_error, fsync_dir, make_private_dir, remove_quietly, temp_path_for, write_atomic
from .restore import trusted_hash
from .state import StepClock, now_iso
from .unitfiles import user_unit_dir


@dataclass
class Backup:
    """One database copy in a backups folder, as its manifest (NAME.sqlite3.json beside it) records it."""
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


def backup_name(env, reason, folder):
    folder = Path(folder)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    name = f"{env}-{stamp}-{reason}.sqlite3"
    n = 1
    while (folder / name).exists() or (folder / (name + ".json")).exists():
        n += 1
        name = f"{env}-{stamp}-{n}-{reason}.sqlite3"
    return folder / name


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


def orphans(folder):
    """Backup files without a manifest (a backup killed while publishing): never a backup."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir() if p.suffix in (".sqlite3", ".unit")
            and not p.with_suffix(".sqlite3").with_name(p.with_suffix(".sqlite3").name + ".json").exists()
            and "-pre-rollback." not in p.name]     # a save a restore set aside holds rows: sealed, never removed


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
        except FileNotFoundError as exc:
            if os.path.lexists(manifest):       # a link to nowhere: said
                problems.append(f"{manifest}: unreadable ({exc})")
            continue                            # pruned since the listing (a backup running now)
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


# -- sealing what a restore set aside (the restore itself is safedeploy/restore's) ---------------
def aside_name(db_path, backup_folder, env, stamp):
    """Where set_aside() puts the live files: straight into the backup folder when it is on the
    same file system (a rename), else beside the database as DB.rolled-back-<stamp>."""
    db_path, backup_folder = Path(db_path), make_private_dir(backup_folder)
    if os.stat(db_path.parent).st_dev == os.stat(backup_folder).st_dev:
        return backup_name(env, "pre-rollback", backup_folder)
    return db_path.parent / f"{db_path.name}.rolled-back-{stamp}"


def seal(saved, folder, env, commit, unit_file=None, alongside=None, rows=None, checked=None, unit_text=None):
    """Make a database set aside by a restore a verified backup (manifest, sha256) in folder.
    A file already in folder is sealed where it lies; one outside is copied in (and stays).
    alongside: a function reading the saved file, run while it is checked; rows, checked: its row count and
    integrity_check verdict when known (see finish_copy). unit_text: unit_file's bytes as read by the caller
    (a seal in a thread: read before anything could change the file), else read here."""
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
        info = finish_copy(saved, saved, alongside=alongside, rows=rows, checked=checked)
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
        write_atomic(backup.unit_backup, unit_text if unit_text is not None else read_unit_file(unit_file))
    write_atomic(backup.manifest_path, json.dumps(backup.to_json(), indent=2) + "\n")
    return backup


class EarlySeal:
    """seal() started at once in a thread of the lowest CPU priority (a rollback starts it once the restored
    database is in place, when the plan's count stands and only the file's own work is left: fold its WAL, hash
    it, fsync it), so that it runs while the app restarts and answers its health check, and yields the CPU to
    them. result(): the Backup, or the DeployError seal() raised. Touches only the set-aside files."""

    def __init__(self, *args, **kwargs) -> None:
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.future = self.pool.submit(self.lowly, seal, *args, **kwargs)
        self.pool.shutdown(wait=False)

    @staticmethod
    def lowly(fn, *args, **kwargs):
        try:        # this thread alone (Linux: a thread's id is a process id to setpriority); its own threads inherit it
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except OSError:
            pass
        return fn(*args, **kwargs)

    def result(self):
        return self.future.result()

    def wait(self) -> None:
        """Until it is done, however it ended (a failed rollback, before it reports)."""
        try:
            self.future.result()
        except BaseException:       # seal() left the file as it was, or kept it as evidence
            pass


def unsealed(folder):
    """Pre-rollback saves that a killed rollback set aside but did not seal: never to be removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return [p for p in folder.glob("*-pre-rollback.sqlite3") if not Path(f"{p}.json").exists()]
