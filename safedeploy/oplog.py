"""Every operation keeps its full output: STATE_DIR/logs/ENV-<stamp>-<op>.log.

What goes in: every line the tool prints (cli.say/err, through cli.emit), and every line of every build
and pre_restart command it runs (commands.run_one), each line stamped with the time; then a last line
`# end {json}` with the result. Secrets never: each line is redacted (safedeploy.redaction) before it is
written, a command's output line by line (a secret is never split between two writes).

The files are 0600 in a 0700 folder; a run that touches several envs (backup.py --all) writes one log per
env, each with the whole run's output and its own env's result. The log is opened by the operation's run
(cli.log_operation) and closed by cli.run with the exit code.

Retention (prune): the newest KEEP_PER_ENV logs of each env are kept, whatever their age: an env deployed
once a quarter keeps the log of its last failure, and a loop of retries cannot fill the disk.

A cap per file (MAX_BYTES): a command that prints without end (a build in a loop, a migration logging each
row) cannot fill the disk either. Past the cap the log says so in one line and keeps, in memory, only the
last TAIL_KEPT bytes of what follows, written whole lines at the close before `# end`, with the number of
bytes dropped: the head (what ran) and the tail (how it ended, the error) both stay. A run killed past the
cap keeps the head only (its log reads as interrupted, as any killed run's).

Reading (last_failed, last_operation): a log with no `# end` line is a run still going (its file is
flock'ed by the run) or one that was killed (an interrupted operation: counted as failed). A log gets its
name already locked and with its first line (an unnamed file, O_TMPFILE, linked into the folder), a reader
that finds it unlocked reads its end again under the lock, and a log pruned as it is read is skipped: a
run that starts, ends or prunes as status looks is not read as a killed one (where no unnamed file can be
made or linked, a log is named before it is locked, as before, and a look in that instant still can).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import stat
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from . import redaction
from .errors import EXIT_USAGE
from .files import make_private_dir
from .state import now_iso, utc_stamp

KEEP_PER_ENV = 50
TAIL_LINES = 20             # what an alert carries of the log
MAX_BYTES = 32 << 20        # a log's cap: past it only the last TAIL_KEPT bytes are kept (see above)
TAIL_KEPT = 1 << 20
END = "# end "
ANSI_RE = re.compile(r"\033\[[0-9;]*m")
NAME_RE = re.compile(r"^(?P<env>.+)-(?P<stamp>\d{8}-\d{6})(?:-\d+)?-(?P<op>[a-z-]+)\.log$")


def folder(state_dir) -> Path:
    return Path(state_dir) / "logs"


class OpLog:
    """One open log file of one env."""

    def __init__(self, state_dir, env: str, op: str, max_bytes: int = MAX_BYTES, tail_kept: int = TAIL_KEPT):
        self.env, self.op = env, op
        self.max_bytes, self.tail_kept = max_bytes, tail_kept
        self.written = 0                            # bytes in the file so far
        self.over: deque[bytes] | None = None       # past the cap: the last bytes, kept for the close
        self.over_size = self.dropped = 0
        self.folder = make_private_dir(folder(state_dir))
        self.fd = -1
        self.path = self._open_named(env, op, utc_stamp())
        self.result: bool | None = None                         # set by the run for a multi-env run
        prune(self.folder, env)

    def _open_named(self, env: str, op: str, stamp: str) -> Path:
        """Open the log locked and with its first line, and only then give it its name: a reader never finds
        it unlocked without its end (a killed run's). An unnamed file (O_TMPFILE) linked into the folder;
        where none can be made or linked (a file system without them, no /proc), the name is made first
        (O_EXCL), as before: a reader looking in that instant reads a killed run. Never a temp name that
        could be left behind or planted."""
        header = f"# {op} of {env}, started {now_iso()}, pid {os.getpid()}"
        names = [f"{env}-{stamp}{'-' + str(n) if n else ''}-{op}.log" for n in range(1000)]
        dir_fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            try:
                self.fd = os.open(self.folder, os.O_TMPFILE | os.O_WRONLY | os.O_APPEND, 0o600)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                    raise
            if self.fd >= 0:
                try:
                    fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)     # held while it runs
                    self.write_line(header)
                    for name in names:
                        try:
                            os.link(f"/proc/self/fd/{self.fd}", name, dst_dir_fd=dir_fd)
                            return self.folder / name
                        except FileExistsError:
                            continue
                except OSError:
                    pass            # no link from /proc here (none mounted, a refusal): named first, below
                os.close(self.fd)
                self.fd, self.written, self.over, self.over_size, self.dropped = -1, 0, None, 0, 0
            for name in names:
                try:
                    self.fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_NOFOLLOW,
                                      0o600, dir_fd=dir_fd)
                except FileExistsError:
                    continue
                try:
                    fcntl.flock(self.fd, fcntl.LOCK_EX)     # a reader may hold it shared for its look: wait
                except BaseException:
                    os.close(self.fd)
                    self.fd = -1
                    raise
                self.write_line(header)
                return self.folder / name
            raise FileExistsError(f"{self.folder}: 1,000 logs of {env} named for {stamp}")
        finally:
            os.close(dir_fd)

    def write_line(self, text: str) -> None:
        if self.fd < 0:
            return
        stamp = time.strftime('%H:%M:%S')
        data = "".join(f"{stamp} {line}\n" for line in redaction.redact(ANSI_RE.sub("", text)).splitlines() or [""])
        raw = data.encode(errors="replace")
        if self.over is None and self.written + len(raw) > self.max_bytes:
            self.over = deque()
            self._write(f"# this log reached its cap of {self.max_bytes} bytes: what follows is dropped but for "
                        f"its last {self.tail_kept} bytes, written at the end\n".encode())
        if self.over is None:
            self._write(raw)
            return
        self.over.append(raw)
        self.over_size += len(raw)
        while self.over_size - len(self.over[0]) >= self.tail_kept:
            self.dropped += len(self.over[0])
            self.over_size -= len(self.over.popleft())

    def _write(self, raw: bytes) -> None:
        try:
            os.write(self.fd, raw)
            self.written += len(raw)
        except OSError:
            pass            # a full disk never fails the operation over its log

    def _write_tail(self) -> None:
        """Past the cap: the kept last bytes, from the first whole line, and how much was dropped."""
        if self.over is None:
            return
        kept = b"".join(self.over)
        if len(kept) > self.tail_kept:
            cut = kept.find(b"\n", len(kept) - self.tail_kept)
            self.dropped += cut + 1
            kept = kept[cut + 1:]
        self._write(f"# {self.dropped} bytes past the cap dropped; the last {len(kept)} bytes:\n".encode() + kept)
        self.over = None

    def close(self, code: int) -> None:
        if self.fd < 0:
            return
        ok = self.result if self.result is not None else code == 0
        result = "ok" if ok else "refused" if code == EXIT_USAGE else "failed"     # exit 2: nothing was attempted
        self._write_tail()
        try:
            os.write(self.fd, (END + json.dumps({"result": result, "code": code,
                                                 "time": now_iso()}) + "\n").encode())
            os.fsync(self.fd)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = -1


# -- the logs the running process writes ----------------------------------------------------------
_OPEN: dict[str, OpLog] = {}
_LOCK = threading.Lock()


def open_logs(envs, op: str) -> dict[str, OpLog]:
    """Open a log for each env (objects with .name and .state_dir) of this run."""
    with _LOCK:
        for env in envs:
            if env.name not in _OPEN:
                _OPEN[env.name] = OpLog(env.state_dir, env.name, op)
        return dict(_OPEN)


def current(env: str | None = None) -> OpLog | None:
    if env is not None:
        return _OPEN.get(env)
    return next(iter(_OPEN.values()), None)


def active() -> bool:
    return bool(_OPEN)


def line(text: str) -> None:
    """A line the tool printed, into every open log."""
    with _LOCK:
        for log in _OPEN.values():
            log.write_line(text)


def mark(env: str, ok: bool) -> None:
    """The result of one env of a multi-env run (a backup of --all)."""
    log = _OPEN.get(env)
    if log is not None:
        log.result = ok if log.result is None else (log.result and ok)


def close_all(code: int) -> None:
    with _LOCK:
        for log in _OPEN.values():
            log.close(code)
        _OPEN.clear()


class CommandCopy:
    """A command's output, bytes as they come, into the open logs line by line (redacted per line)."""

    def __init__(self, argv, cwd):
        self.pending = b""
        line(f"$ {redaction.shown(argv)}" + (f"   (in {cwd})" if cwd else ""))

    def __call__(self, data: bytes) -> None:
        self.pending += data
        *lines, self.pending = self.pending.split(b"\n")
        if lines:           # one write for what one read brought: redacted line by line all the same
            line("\n".join("| " + raw.decode(errors="replace").rstrip("\r") for raw in lines))
        if len(self.pending) > 1 << 16:            # a line without end: written in pieces
            line("| " + self.pending.decode(errors="replace"))
            self.pending = b""

    def finish(self, how: str) -> None:
        if self.pending:
            line("| " + self.pending.decode(errors="replace").rstrip("\r"))
            self.pending = b""
        line(f"$ ({how})")


def command_copy(argv, cwd) -> CommandCopy | None:
    return CommandCopy(argv, cwd) if active() else None


# -- retention and reading -------------------------------------------------------------------------
def env_logs(state_dir, env: str) -> list[Path]:
    """env's logs, oldest first (by the stamp in the name, then the name)."""
    try:
        entries = list(folder(state_dir).iterdir())
    except OSError:
        return []
    found = []
    for path in entries:
        m = NAME_RE.match(path.name)
        if m and m.group("env") == env:
            try:
                mtime = path.lstat().st_mtime
            except OSError:
                continue            # pruned since the listing, by a run starting now
            found.append((m.group("stamp"), mtime, path.name, path))
    return [p for *_, p in sorted(found)]


def prune(log_folder: Path, env: str, keep: int = KEEP_PER_ENV) -> list[Path]:
    """env's logs past the newest keep."""
    removed = []
    for path in env_logs(log_folder.parent, env)[:-keep]:
        try:
            path.unlink()
            removed.append(path)
        except OSError:
            pass
    return removed


@dataclass(frozen=True)
class Ending:
    """Where one operation's log stands: its result (or running) and time."""
    path: str
    op: str
    result: str         # "ok", "failed", "refused" (exit 2: nothing attempted), "running", "interrupted"
    time: str | None

    @property
    def failed(self) -> bool:
        return self.result in ("failed", "interrupted")

    def to_json(self) -> dict:
        return {"op": self.op, "result": self.result, "time": self.time, "log": self.path}


def open_log(path: Path) -> BinaryIO:
    """The log at path for reading: a regular file, never followed through a link nor waited on (a FIFO
    planted under a log's name would hang status)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    return os.fdopen(fd, "rb")


def ending(path: Path) -> Ending | None:
    """Where the log at path stands; None when it is gone (pruned since it was listed)."""
    m = NAME_RE.match(path.name)
    op = m.group("op") if m else "?"
    try:
        fh = open_log(path)
    except FileNotFoundError:
        return None
    except OSError:
        return Ending(str(path), op, "interrupted", None)
    try:
        with fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 4096))
            last = fh.read().decode(errors="replace").splitlines()
            if not (last and last[-1].startswith(END)):
                try:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
                except OSError:
                    return Ending(str(path), op, "running", None)
                fh.seek(max(0, os.fstat(fh.fileno()).st_size - 4096))    # it may have ended since the read
                last = fh.read().decode(errors="replace").splitlines()
            if last and last[-1].startswith(END):
                data = json.loads(last[-1][len(END):])
                return Ending(str(path), op, data.get("result", "failed"), data.get("time"))
            return Ending(str(path), op, "interrupted", None)
    except (OSError, ValueError):
        return Ending(str(path), op, "interrupted", None)


def last_operation(state_dir, env: str) -> Ending | None:
    """The newest finished (or killed) operation's log of env; a run still going is skipped."""
    for path in reversed(env_logs(state_dir, env)):
        e = ending(path)
        if e is not None and e.result != "running":
            return e
    return None


def last_failed(state_dir, env: str) -> str | None:
    """The path of env's last failed operation's log, or None."""
    for path in reversed(env_logs(state_dir, env)):
        e = ending(path)
        if e is not None and e.failed:
            return str(path)
    return None


def tail(path, lines: int = TAIL_LINES) -> list[str]:
    try:
        with open_log(path) as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 16384))
            return [ln for ln in fh.read().decode(errors="replace").splitlines() if not ln.startswith(END)][-lines:]
    except OSError:
        return []
