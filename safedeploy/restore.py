"""Restoring a database from a backup, with the app down only for stop, renames and start, whatever the size.

prepare_restore() copies and checks the backup beside the live file (a temp name) while the app still
serves, and fails before anything is stopped (out of room, a copy that does not match its sha256 or fails
integrity_check); EarlyPrepare starts it in a thread. A deploy leaves a spare (make_spare): a checked copy of
its point's backup beside the live file, which prepare_restore takes by a rename and checks by its sha256
instead of writing the file while the operator waits; one that does not match is removed and the backup
copied; prune removes a spare whose backup it removed (stale_spares). set_aside() renames the stopped
app's files away (that rename IS the pre-rollback save: no copy is made while the app is down;
backups.aside_name says where); put_in_place() renames the prepared copy in;
backups.seal() makes the set-aside files a verified backup with a manifest once the app is back.
rows_only_in() counts the rows a copy holds that another lacks.
Nothing here writes the live database before the app is stopped (rows_only_in only reads it), and every
rename is followed by an fsync of its folder.
"""

import errno
import hashlib
import os
import queue
import sqlite3
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

from .dbfiles import NOT_TOOLS, free_bytes, integrity_of, remove_temp, removed_on_failure, sha256_file, write_behind
from .errors import DeployError
from .files import fsync_dir, remove_quietly


def prepare_restore(backup, db_path):
    """Copy backup beside db_path (a temp name) and check its sha256 (integrity too, unless trusted_hash); return the
    temp path. The deploy's spare of backup, where one lies there, is taken instead of a copy (take_spare). Runs
    while the app serves; out of room, it fails before anything is stopped."""
    return prepare_restore_taking(backup, db_path)[0]


def prepare_restore_taking(backup, db_path) -> tuple[Path, bool]:
    """prepare_restore(): (the temp path, whether it is the deploy's spare, taken: EarlyPrepare gives it back)."""
    db_path = Path(db_path)
    folder = db_path.parent
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{db_path.name}.restore-{os.getpid()}"
    with removed_on_failure(tmp, target=db_path):
        spare = take_spare(backup, db_path, tmp)
        if not spare:
            need, free = int(backup.bytes or 0) + (1 << 20), free_bytes(folder)
            if free < need:
                raise DeployError(f"not enough free disk in {folder} to prepare the restore of {backup.path}: "
                                  f"{free / 2**20:.1f} MiB free, {need / 2**20:.1f} MiB needed; nothing was stopped "
                                  "or changed")
            copy_checked(backup.path, tmp, backup.sha256)
        if not trusted_hash(backup):
            verdict = integrity_of(tmp)
            if verdict != "ok":
                raise DeployError(f"the copy of {backup.path} fails integrity_check ({verdict}); the live database "
                                  "was not touched")
        if db_path.exists():
            st = db_path.stat()
            os.chmod(tmp, stat_mode(st.st_mode))
            os.chown(tmp, st.st_uid, st.st_gid)
    return tmp, spare


SPARE_ROOM = 64 << 20        # bytes a spare leaves free beyond another copy of the database (the next backup)


def spare_name(db_path, sha256: str) -> Path:
    """Where the spare of the backup with this sha256 lies: beside the live database, on its file system, so
    that a restore takes it by a rename."""
    db_path = Path(db_path)
    return db_path.parent / f".{db_path.name}.spare-{sha256[:16]}"


def spares(db_path) -> list[Path]:
    """The spares beside db_path (at most one, unless a crash came between making one and removing the old)."""
    db_path = Path(db_path)
    if not db_path.parent.is_dir():
        return []
    return sorted(p for p in db_path.parent.iterdir() if p.name.startswith(f".{db_path.name}.spare-"))


def stale_spares(db_path, kept_sha256: set[str]) -> list[Path]:
    """The spares beside db_path whose backup is none of the kept ones (by sha256): a rollback can no longer take
    them (the backup was pruned or removed), so they are a database's worth of disk for nothing."""
    prefixes = {s[:16] for s in kept_sha256 if isinstance(s, str)}
    return [p for p in spares(db_path) if p.name.rsplit(".spare-", 1)[1] not in prefixes]


def remove_spare(path: Path) -> None:
    """A spare removed, or DeployError (a folder or an unwritable one in its place: said, never a traceback)."""
    try:
        remove_quietly(path)
    except OSError as exc:
        raise DeployError(f"cannot remove {path}: {exc.strerror or exc}") from None


def make_spare(backup, db_path) -> Path | None:
    """Leave a checked copy of backup (a deploy's point) beside the live database, for a rollback to that point
    to take by a rename (take_spare). Any other spare of the database is removed first: at most one, the last
    deploy's. Made only when the disk keeps room for another copy of the database after it (SPARE_ROOM); None
    when it is not made. A copy that fails its sha256 is removed (DeployError). Changes nothing live."""
    db_path = Path(db_path)
    final = spare_name(db_path, backup.sha256) if trusted_hash(backup) else None
    for old in spares(db_path):
        if old != final:
            remove_spare(old)
    size = int(backup.bytes or 0)
    if final is None or size <= 0 or not db_path.parent.is_dir():
        return None
    if final.exists():
        return final            # the same backup's: its sha256 is checked when it is taken
    if free_bytes(db_path.parent) < 2 * size + SPARE_ROOM:
        return None
    tmp = db_path.parent / f".{db_path.name}.restore-spare-{os.getpid()}"
    with removed_on_failure(tmp, target=db_path):
        copy_checked(backup.path, tmp, backup.sha256)
        os.replace(tmp, final)
    fsync_dir(db_path.parent)
    return final


def take_spare(backup, db_path: Path, tmp: Path) -> bool:
    """Whether the spare of backup is now tmp, checked: renamed to tmp (so that nothing else takes it), then a
    regular file of the backup's size whose sha256, read whole, is the backup's. One that is not is removed
    (False: the caller copies the backup)."""
    if not trusted_hash(backup):
        return False
    try:
        os.rename(spare_name(db_path, backup.sha256), tmp)
    except FileNotFoundError:
        return False
    try:
        st = os.lstat(tmp)
        if stat.S_ISREG(st.st_mode) and st.st_size == int(backup.bytes or -1) and sha256_file(tmp) == backup.sha256:
            return True
    except OSError:         # unreadable: as good as a wrong one
        pass
    remove_temp(tmp)
    return False


def give_back(tmp: Path, backup, db_path) -> None:
    """A taken spare (a plan not confirmed) is the spare again."""
    os.replace(tmp, spare_name(db_path, backup.sha256))
    fsync_dir(Path(db_path).parent)


class EarlyPrepare:
    """prepare_restore() started at once in a thread (a rollback's plan starts it: the copy, bound by the disk,
    goes on while the plan compares rows, bound by the CPU). result(): the temp path, or the DeployError;
    discard(): wait for it and remove what it made (a plan not confirmed). Changes nothing live."""

    def __init__(self, backup, db_path) -> None:
        self.backup, self.db_path = backup, Path(db_path)
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.future = self.pool.submit(prepare_restore_taking, backup, self.db_path)
        self.pool.shutdown(wait=False)

    def result(self):
        return self.future.result()[0]

    def discard(self) -> None:
        """Wait for it; a spare it took is the spare again, a copy it made is removed."""
        try:
            tmp, spare = self.future.result()
        except BaseException:       # it failed: it removed what it made itself
            return
        if spare:
            try:
                give_back(tmp, self.backup, self.db_path)
                return
            except OSError:         # not given back: removed like a copy
                pass
        remove_temp(tmp)


def trusted_hash(backup) -> bool:
    """Whether a file matching backup's sha256 needs no integrity_check of its own: the tool writes a manifest
    with a sha256 only after the file passed integrity_check (backup_database, seal, a verified fetch), so the
    same bytes pass it again. A manifest without a sha256 proves nothing."""
    return isinstance(getattr(backup, "sha256", None), str) and len(backup.sha256) == 64


COPY_CHUNK = 8 << 20         # bytes the kernel copies per call; the copy is checked as it goes, chunk by chunk
_NOT_HERE = (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EBADF, errno.EPERM)


def copy_checked(src_path, dst_path, sha256: str, chunk: int = COPY_CHUNK, method: str = "copy_file_range") -> None:
    """Copy a file (a new file, 0600) by the kernel and check the copy against sha256: the kernel moves the bytes
    (os.copy_file_range; os.sendfile, then read and write where the file system or kernel lacks it: method names
    the first to try), chunk by chunk, each pushed to disk as it goes (see write_behind), while a second thread
    reads the COPY back and hashes it (the bytes that will be the database, not the source's). A copy shorter or
    longer than the source was when it started, or whose sha256 is not the one given: DeployError (the caller
    removes what was written). Nothing is taken from a cached hash or an attribute of the file."""
    src = os.open(src_path, os.O_RDONLY)
    try:
        size = os.fstat(src).st_size
        dst = os.open(dst_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            back = os.open(dst_path, os.O_RDONLY)
            try:
                hasher = ReadBack(back, chunk)
                try:
                    offset = 0
                    while offset < size:
                        n, method = copy_chunk(src, dst, offset, min(chunk, size - offset), method)
                        if n == 0:
                            break           # the source is shorter than it was: the size check below says so
                        write_behind(dst, offset, n, chunk)
                        hasher.put(offset, n)
                        offset += n
                finally:
                    digest, hashed = hasher.finish()
                os.fsync(dst)
                copied = os.fstat(dst).st_size
            finally:
                os.close(back)
        finally:
            os.close(dst)
    finally:
        os.close(src)
    if offset != size or copied != size or hashed != size:
        raise DeployError(f"the copy of {src_path} is {copied} bytes, not {size}: the backup file changed or could "
                          "not be read whole; the live database was not touched")
    if digest != sha256:
        raise DeployError(f"the copy of {src_path} does not match its sha256; the live database was not touched")


def copy_chunk(src: int, dst: int, offset: int, n: int, method: str) -> tuple[int, str]:
    """(bytes copied from src at offset to dst at offset, at most n; the method that did it). A method the
    kernel or the file system refuses gives way to the next: copy_file_range, sendfile, read and write."""
    if method == "copy_file_range":
        try:
            return os.copy_file_range(src, dst, n, offset, offset), method
        except OSError as exc:
            if exc.errno not in _NOT_HERE:
                raise
            method = "sendfile"
    if method == "sendfile":
        try:
            os.lseek(dst, offset, os.SEEK_SET)
            return os.sendfile(dst, src, offset, n), method
        except OSError as exc:
            if exc.errno not in _NOT_HERE:
                raise
            method = "read"
    data = os.pread(src, n, offset)
    view = memoryview(data)
    done = 0
    while done < len(data):
        done += os.pwrite(dst, view[done:], offset + done)
    return len(data), "read"


class ReadBack:
    """A thread hashing what was written to a file, read back from it (fd) range by range, in the order given
    (put), while the next range is copied: hashlib and os.preadv let go of the GIL. finish(): (the sha256 of
    the ranges read, bytes read); a range that reads short stops the hash there (the caller's size check
    fails)."""

    def __init__(self, fd: int, chunk: int) -> None:
        self.fd, self.buf = fd, bytearray(chunk)
        self.todo: queue.Queue = queue.Queue()
        self.digest, self.hashed = hashlib.sha256(), 0
        self.error: OSError | None = None
        self.thread = threading.Thread(target=self.run, name="restore-readback", daemon=True)
        self.thread.start()

    def put(self, offset: int, n: int) -> None:
        self.todo.put((offset, n))

    def run(self) -> None:
        view = memoryview(self.buf)
        short = False
        while (job := self.todo.get()) is not None:
            if short or self.error is not None:
                continue
            offset, n = job
            try:
                while n > 0:
                    got = os.preadv(self.fd, [view[:min(n, len(view))]], offset)
                    if got <= 0:
                        short = True
                        break
                    self.digest.update(view[:got])
                    self.hashed += got
                    offset, n = offset + got, n - got
            except OSError as exc:
                self.error = exc

    def finish(self) -> tuple[str, int]:
        self.todo.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.digest.hexdigest(), self.hashed


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
