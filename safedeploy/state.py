"""Locks and the deploy log, kept in state_dir.

- <env>.lock: an flock()ed file; the kernel drops the lock when its holder dies,
  so a dead holder never blocks anyone. The file holds who holds it (pid,
  command, start time) for the message others see.
- <env>.deploys.jsonl: one JSON object a line, one line an operation
  (deploy, rollback, ...), appended under an flock of the file.
- <env>.verified.jsonl: the commits and trees verified in the env
  (by a passing verify.py or a healthy deploy); the promotion gate reads it.
"""

import errno
import fcntl
import json
import os
import signal
import stat
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from . import holders, integrity, redaction
from .errors import EXIT_LOCKED, DeployError, LockLost
from .files import disk_error, make_private_dir


def now_iso():
    """Now, ISO 8601 with the local offset, to the millisecond: records are compared by time (the
    checklist: a deploy after the adoption), and two can fall in one second."""
    return datetime.now(timezone.utc).astimezone().isoformat(timespec="milliseconds")


def utc_stamp():
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")


def parse_time(text):
    try:
        value = datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def age_seconds(text):
    value = parse_time(text)
    return None if value is None else (datetime.now(timezone.utc) - value).total_seconds()


def human_age(seconds):
    if seconds is None:
        return "unknown age"
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


UNSEEN_RETRIES = 20                      # looks again at a passing holder (take_or_name) before it is named
HELD_LOCKS: list["EnvLock"] = []         # the EnvLocks this process holds; every step checks they still hold (check_locks)


class EnvLock:
    """Exclusive lock on one env. Use as a context manager."""

    def __init__(self, state_dir, env, operation, wait=0.0, backup_wait=0.0, on_wait=None):
        """wait: seconds to wait for any holder; backup_wait: seconds to wait when the holder is one of this
        tool's backups (it ends by itself, and changes nothing that runs). on_wait(text) is called once, as
        the wait begins: that it waits, for whom, and how long at most (holders.waiting_text)."""
        self.path = Path(state_dir) / f"{env}.lock"
        self.env = env
        self.operation = operation
        self.wait = wait
        self.backup_wait = backup_wait
        self.on_wait = on_wait
        self.fd = None

    def __enter__(self):
        try:
            make_private_dir(self.path.parent)
            self.fd = open_lock_file(self.path, os.O_RDWR | os.O_CREAT)
        except OSError as exc:
            raise disk_error(exc, self.path) from exc
        start = time.monotonic()
        told = None
        while (holder := take_or_name(self.fd, self.path, fcntl.LOCK_EX)) is not None:
            limit = max(self.wait, self.backup_wait) if self.backup_wait and holder.is_backup else self.wait
            if time.monotonic() >= start + limit:
                os.close(self.fd)
                self.fd = None
                raise DeployError(f"env {self.env} is locked: {holder.describe()}", EXIT_LOCKED)
            if self.on_wait and told != holder:
                self.on_wait(holders.waiting_text(self.env, holder, limit))
                told = holder
            time.sleep(0.2)
        info = {"pid": os.getpid(), "operation": self.operation,
                "command": " ".join(sys.argv), "since": now_iso()}
        try:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, json.dumps(info).encode(), 0)
        except OSError:
            pass             # who holds it is only for others' messages; a full disk must not stop here
        HELD_LOCKS.append(self)
        return self

    def still_held(self):
        """Whether the lock file is still the one this process locked: a removed or replaced file
        (rm -r state/ mid-deploy) lets another process take "the" lock on a new file."""
        try:
            return os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(self.fd).st_ino
        except OSError:
            return False

    def __exit__(self, *exc):
        if self in HELD_LOCKS:
            HELD_LOCKS.remove(self)
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def take_or_name(fd: int, path: Path, mode: int) -> holders.Holder | None:
    """Take the flock (mode) on fd without waiting: None when taken, else who holds it. A holder may let go
    while it is looked up (a backup ending as a deploy starts): the lock is tried again after each look. A
    passing holder (no one visible, or one of the tool's scripts not yet named: a status look) is looked at
    again, up to UNSEEN_RETRIES more times 10 ms apart, before it is named."""
    looks = 0
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return None
        except BlockingIOError:
            pass
        holder = holders.identify(path)
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return None                 # let go while we looked
        except BlockingIOError:
            pass
        looks += 1
        if not holder.passing or looks > UNSEEN_RETRIES:
            return holder
        time.sleep(0.01)


def open_lock_file(path, flags):
    """Open a lock file without following a link (a link planted at state/ENV.lock must never make
    this tool write, or truncate, the file it points at); refuse anything but a regular file."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NOCTTY | os.O_NONBLOCK, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DeployError(f"{path} is a symbolic link; a lock file must be a plain file: remove the link "
                              f"(rm {path}) and run again") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise DeployError(f"{path} is not a regular file; remove it and run again")
    return fd


def read_holder(path):
    return holders.written_holder(path)


def lock_holder_of(state_dir, env) -> holders.Holder | None:
    """Who holds the env's lock now (holders.Holder), or None. Reads only; creates nothing."""
    path = Path(state_dir) / f"{env}.lock"
    try:
        fd = open_lock_file(path, os.O_RDONLY)
    except (OSError, DeployError):
        return None
    try:
        holder = take_or_name(fd, path, fcntl.LOCK_SH)
        if holder is None:
            fcntl.flock(fd, fcntl.LOCK_UN)
        return holder
    finally:
        os.close(fd)


def lock_holder(state_dir, env):
    """Who holds the env's lock now, said in a line (holders.Holder.describe), or None."""
    holder = lock_holder_of(state_dir, env)
    return holder.describe() if holder else None


class JsonLog:
    """An append-only list of JSON records, one a line (see append); each line carries its checksum and a
    damaged line is found when read (safedeploy/integrity.py)."""

    def __init__(self, path):
        self.path = Path(path)

    def read(self):
        """The records; a damaged line is not among them (scan says which, and status reports it)."""
        return self.scan().records

    def scan(self):
        """integrity.Scan: the records and the damaged lines (file, line number, why)."""
        return integrity.scan(self.path)

    def append(self, record):
        """Add one line, under an flock of the log itself: two processes appending at once (a drill
        and a verify, which take no env lock) never lose each other's records. O_APPEND, one
        write, fsync; a line torn by a crash is closed first, so it costs only itself. A log replaced
        while this waited for its flock (a damaged line set aside) is opened again."""
        make_private_dir(self.path.parent)
        # in the record's own order (its steps as they ran), secrets hidden (safedeploy.redaction)
        line = integrity.encode(json.loads(redaction.redact(json.dumps(record))))
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            except OSError as exc:
                raise disk_error(exc, self.path) from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                if not same_file(fd, self.path):
                    continue            # replaced under us: append to the file that is there now
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    line = b"\n" + line
                view = memoryview(line)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
                return
            except OSError as exc:
                raise disk_error(exc, self.path) from exc
            finally:
                os.close(fd)


def same_file(fd, path):
    try:
        return os.fstat(fd).st_ino == os.stat(path, follow_symlinks=False).st_ino
    except FileNotFoundError:
        return False


def deploy_log(env):
    return JsonLog(env.state_dir / f"{env.name}.deploys.jsonl")


def bad_log(env):
    """<env>.bad.jsonl: releases that were rolled back, by tree; a deploy refuses them."""
    return JsonLog(env.state_dir / f"{env.name}.bad.jsonl")


def verified_log(env_name, state_dir):
    return JsonLog(Path(state_dir) / f"{env_name}.verified.jsonl")


FAULT_VARIABLE = "SAFE_DEPLOY_FAULT"     # test-only: "OP:STEP:SIGNAL" kills the process entering STEP


class InjectedFault(RuntimeError):
    """What SAFE_DEPLOY_FAULT=OP:STEP:RAISE raises: an error that is not the tool's own (a bug's stand-in)."""


def inject_fault(op, step):
    """The test-only fault switch: SAFE_DEPLOY_FAULT=deploy:switch:KILL sends SIGKILL to this
    process as it enters the step `switch` of a deploy (TERM, INT and HUP work alike; RAISE raises
    InjectedFault, an exception that is not a DeployError)."""
    wanted = os.environ.get(FAULT_VARIABLE, "")
    if wanted.count(":") == 2:
        w_op, w_step, w_signal = wanted.split(":")
        if (w_op, w_step) == (op, step):
            if w_signal == "RAISE":
                raise InjectedFault(f"injected fault at {op}:{step} (test-only)")
            os.kill(os.getpid(), getattr(signal, f"SIG{w_signal}"))
            time.sleep(1)            # let the handler run here, inside the step


def check_locks(look_with=None):
    """Stop when a lock this process holds was removed under it: another operation may be running.
    look_with(env name): the command that shows the env (the step clock's owner knows the config)."""
    for lock in HELD_LOCKS:
        if not lock.still_held():
            look = f". Look with: {look_with(lock.env)}" if look_with else ""
            raise LockLost(f"the lock file {lock.path} was removed or replaced while this {lock.operation} ran, "
                           f"so another operation may have started on env {lock.env} at the same time; this one "
                           f"stops here{look}", lock.env)


class StepClock:
    """Times the named steps of an operation; remembers which one was running when it failed;
    keeps the operation's journal (a journals.OpJournal) at the step it is in."""

    def __init__(self, journal=None, op="", look_with=None):
        self.seconds = {}
        self.current = None
        self.journal = journal
        self.op = op
        self.look_with = look_with          # env name -> the command that shows it (see check_locks)

    def step(self, name):
        clock = self

        class _Step:
            def __enter__(self):
                clock.current = name
                clock.seconds[name] = 0.0       # listed from its start: a record written in it, or of its failure, names it
                check_locks(clock.look_with)
                if clock.journal:
                    clock.journal.step = name
                    clock.journal.save()
                self.start = time.monotonic()
                inject_fault(clock.op, name)

            def __exit__(self, exc_type, *rest):
                clock.seconds[name] = round(time.monotonic() - self.start, 3)
                if exc_type is None:
                    clock.current = None
                return False

        return _Step()

    @property
    def total(self):
        return round(sum(self.seconds.values()), 3)
