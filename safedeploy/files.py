"""Durable file writes: temp file, fsync, atomic rename, fsync of the folder."""

import errno
import fcntl
import os
import time
from pathlib import Path

from .errors import DeployError


def fsync_dir(folder):
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_private_dir(folder):
    """Create folder (and parents) as 0700; tighten it if it is looser."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    if folder.stat().st_mode & 0o077:
        os.chmod(folder, 0o700)
    return folder


def temp_path_for(final):
    final = Path(final)
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


def write_atomic(path, data, mode=0o600):
    """Write bytes or str to path so that readers see the old or the new file, never half."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode()
    tmp = temp_path_for(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        remove_quietly(tmp)
        raise disk_error(exc, path) from exc


def write_new(path, data, mode=0o600):
    """Write a file that must not exist yet, atomically: a temp file beside it, fsynced, then hard-linked to
    its name (link refuses a name that exists: no check-then-write race). FileExistsError when it exists."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode()
    tmp = temp_path_for(path)
    try:
        write_atomic(tmp, data, mode)
        os.link(tmp, path)
        fsync_dir(path.parent)
    except FileExistsError:
        raise
    except OSError as exc:
        raise disk_error(exc, path) from exc
    finally:
        remove_quietly(tmp)


def remove_quietly(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def disk_error(exc, path):
    """Turn an OSError into a one-line DeployError that says what to do."""
    if exc.errno == errno.ENOSPC:
        try:
            no_inodes = os.statvfs(Path(path).parent).f_favail == 0
        except OSError:
            no_inodes = False
        if no_inodes:
            return DeployError(f"no free inodes in {Path(path).parent} (writing {path}): remove files on that "
                               "file system and run again")
        return DeployError(f"disk full while writing {path}: free some space and run again")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return DeployError(f"cannot write {path}: {exc.strerror}")
    other = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(path) else ""
    return DeployError(f"cannot write {path}: {exc.strerror or exc}{other}")


def existing_ancestor(path):
    path = Path(path)
    while not path.exists():
        path = path.parent
    return path


def same_disk(a, b):
    """Whether a and b (or, where they do not exist yet, their nearest existing folders) share a file system."""
    return os.stat(existing_ancestor(a)).st_dev == os.stat(existing_ancestor(b)).st_dev


def flock_by(fd: int, mode: int, deadline: float, step: float = 0.1) -> bool:
    """Take the flock (fcntl.LOCK_SH or LOCK_EX) on fd, trying every step seconds until the monotonic
    deadline: whether it was taken."""
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(step)
