"""Commands the tool runs: the env's `build` and `pre_restart` (argv lists, no shell, a timeout each),
and the one bounded way every other program is started (restic, the alert command).

What run() guarantees, whatever the program does:
- it returns within `timeout` seconds (plus a moment to reap): past the deadline the program's whole
  process group is killed (SIGKILL), its children with it; a program starts in a group of its own,
  and is killed too when this process dies (a kill -9 of the tool leaves no restic behind);
- it returns as soon as the program itself exits, even when a child it left in the background still
  holds its stdout or stderr: the pipes are read until the program exits, then drained of what is
  already in them, and abandoned (a build that ran `some-daemon &` waited out its 900 s timeout);
- what it keeps of the output is bounded: everything (restic's JSON), the tail only (a command's
  output shown on failure), or nothing; 400 MB written by an alert command cost 1.1 GiB of memory.
"""

import ctypes
import os
import selectors
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from . import oplog, redaction
from .errors import DeployError


class FailureKind(Enum):
    """Why a build or pre_restart command failed: it could not start (the host or the config: a program
    not found or not executable), it ran past command_timeout, or it exited non-zero."""
    COULD_NOT_START = "could-not-start"
    TIMED_OUT = "timed-out"
    EXIT = "exit"


@dataclass(frozen=True)
class CommandFailure:
    """Why a command failed: its argv, the reason, its output, and its kind (could not start, timed out, exit)."""
    argv: list
    why: str
    output: str
    kind: FailureKind = FailureKind.EXIT


@dataclass
class Finished:
    """A command that ended: its exit code (None: timed out and killed), output and seconds."""
    returncode: int | None      # None: it timed out, and its process group was killed
    stdout: bytes               # all of it, its tail, or b"" (see run)
    stderr: bytes
    seconds: float

    @property
    def timed_out(self):
        return self.returncode is None


TAIL_BYTES = 64 * 1024      # what is kept of an output whose tail is enough (15 lines are shown)
DRAIN_SECONDS = 0.5         # after the program exits: output already in the pipe is read, for this long at most


def run(argv, timeout, cwd=None, env=None, stdin=None, stdout="tail", stderr="tail", tail=TAIL_BYTES, nice=0,
        pass_fds=(), copy=None):
    """Run argv (a list, never a shell) bounded as the module says; return Finished.

    stdin: bytes to feed it (through an unlinked temp file: a program that never reads cannot block
    us), or None for /dev/null. stdout, stderr: "all", "tail" (the last `tail` bytes), "discard",
    "stdout" (stderr only: into the same stream), or an open file to write into (a restic dump).
    copy: a callable given every piece of what is read from its pipes, as it comes (the operation's log).
    Raises FileNotFoundError / PermissionError when the program cannot start."""
    start = time.monotonic()
    deadline = start + timeout
    proc = start_program(argv, cwd, env, stdin, stdout, stderr, nice, pass_fds)
    pipes = Pipes(proc, {proc.stdout: stdout, proc.stderr: stderr}, tail, copy)
    timed_out = False
    try:
        timed_out = pipes.read_until_exit(deadline)
        pipes.drain()
    finally:
        pipes.close()
        if proc.poll() is None:          # an exception (Ctrl-C) while it ran: it must not outlive us
            kill_group(proc)
    return Finished(None if timed_out else proc.returncode, bytes(pipes.kept.get(proc.stdout, b"")),
                    bytes(pipes.kept.get(proc.stderr, b"")), round(time.monotonic() - start, 3))


def pipe_target(mode: Any) -> Any:
    """What Popen is given for an output mode of run()."""
    if mode in ("all", "tail"):
        return subprocess.PIPE
    if mode == "discard":
        return subprocess.DEVNULL
    if mode == "stdout":
        return subprocess.STDOUT
    return mode


def start_program(argv: list, cwd: Any, env: Any, stdin: bytes | None, stdout: Any, stderr: Any, nice: int,
                  pass_fds: Any) -> subprocess.Popen:
    """Popen argv in a process group of its own that dies with us, fed stdin (bytes) through an unlinked
    temp file, or /dev/null."""
    feed = None
    if stdin is not None:
        feed = tempfile.TemporaryFile()
        feed.write(stdin)
        feed.seek(0)

    def in_child():
        # its own group (start_new_session), so the group can be killed; and it dies with us: a tool
        # killed with SIGKILL leaves no restic waiting on a dead network, nor a build writing on
        os.nice(nice) if nice else None
        die_with_parent()

    try:
        return subprocess.Popen(argv, cwd=cwd, env=env, stdin=feed if feed is not None else subprocess.DEVNULL,
                                stdout=pipe_target(stdout), stderr=pipe_target(stderr), start_new_session=True,
                                pass_fds=pass_fds, preexec_fn=in_child)
    finally:
        if feed is not None:
            feed.close()


class Pipes:
    """The program's stdout and stderr pipes (those run() reads), read without blocking until it exits: what
    is kept of each (all, or its tail), and the pidfd whose readiness says it exited (None: polled)."""

    def __init__(self, proc: subprocess.Popen, modes: dict, tail: int, copy: Callable[[bytes], object] | None) -> None:
        self.proc, self.copy = proc, copy
        self.kept: dict = {}
        self.limits: dict = {}
        self.sel = selectors.DefaultSelector()
        for stream, mode in modes.items():
            if stream is not None:
                os.set_blocking(stream.fileno(), False)
                self.sel.register(stream, selectors.EVENT_READ)
                self.kept[stream] = bytearray()
                self.limits[stream] = None if mode == "all" else tail
        self.exited = pidfd_of(proc)
        if self.exited is not None:
            self.sel.register(self.exited, selectors.EVENT_READ)

    def read_until_exit(self, deadline: float) -> bool:
        """Read until the program exits; past deadline kill its group. Returns whether it timed out."""
        while self.proc.poll() is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                kill_group(self.proc)
                return True
            # with a pidfd the program's exit wakes the select; without one, look every 50 ms
            for key, _ in self.sel.select(remaining if self.exited is not None else min(remaining, 0.05)):
                if key.fileobj is not self.exited:
                    read_some(self.sel, key.fileobj, self.kept, self.limits, self.copy)
        return False

    def drain(self) -> None:
        """What is already in the pipes once the program exited, for DRAIN_SECONDS at most."""
        drain_until = time.monotonic() + DRAIN_SECONDS
        while len(self.sel.get_map()) > (self.exited is not None) and time.monotonic() < drain_until:
            ready = [key for key, _ in self.sel.select(0) if key.fileobj is not self.exited]
            if not ready:
                break           # nothing more is there: a child still holding the pipe is not waited for
            for key in ready:
                read_some(self.sel, key.fileobj, self.kept, self.limits, self.copy)

    def close(self) -> None:
        self.sel.close()
        if self.exited is not None:
            os.close(self.exited)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


PR_SET_PDEATHSIG = 1
_PRCTL: Callable[..., int] | None
try:
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl       # looked up here: the child only calls it
except (OSError, AttributeError):
    _PRCTL = None


def die_with_parent():
    """In the child, before exec: SIGKILL when the process that started it dies (Linux prctl)."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def pidfd_of(proc):
    """A descriptor that turns readable when proc exits (Linux 5.3+), or None (then run() polls)."""
    try:
        return os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        return None


def read_some(sel, stream, kept, limits, copy=None):
    try:
        data = os.read(stream.fileno(), 1 << 16)
    except BlockingIOError:
        return
    if not data:
        sel.unregister(stream)
        return
    if copy is not None:
        copy(data)
    buf = kept[stream]
    buf += data
    limit = limits[stream]
    if limit is not None and len(buf) > 2 * limit:
        del buf[:-limit]


def kill_group(proc):
    """SIGKILL the program's process group (it leads its own), then reap the program."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    except PermissionError:
        proc.kill()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass            # unkillable (uninterruptible sleep on a dead mount): abandoned, never waited on


def tail_text(data, limit=TAIL_BYTES):
    return data[-limit:].decode(errors="replace")


def run_all(argvs, cwd, timeout, environ=None):
    """Run each argv in cwd (with environ: the unit's environment, see safedeploy.unitenv); raise
    DeployError naming the first that fails, with its output (secrets hidden), its CommandFailure as
    `failure` (what decides whether the host or the release is to blame)."""
    for argv in argvs:
        failure = run_one(argv, cwd, timeout, environ=environ)
        if failure:
            tail = "\n".join(failure.output.splitlines()[-15:])
            exc = DeployError(f"pre_restart command `{redaction.shown(argv)}` {failure.why}", output=tail)
            exc.failure = failure
            raise exc


BUILD_NICE = 10     # a build runs while the app serves: it yields the CPU to the app's workers


def run_one(argv, cwd, timeout, nice=0, environ=None):
    """One build or pre_restart command: None when it exited 0, else a CommandFailure with the tail
    of its output (stdout and stderr as they came, secrets hidden). environ: the whole environment it
    gets (None: this process's). All of its output goes to the operation's log, when one is open."""
    copy = oplog.command_copy(argv, cwd)
    try:
        done = run(argv, timeout, cwd=cwd, env=environ, stdout="tail", stderr="stdout", nice=nice, copy=copy)
    except FileNotFoundError:
        if copy:
            copy.finish("could not start: not found")
        return CommandFailure(argv, f"could not start: {argv[0]} not found (relative to {cwd})", "",
                              FailureKind.COULD_NOT_START)
    except PermissionError:
        if copy:
            copy.finish("could not start: not executable")
        return CommandFailure(argv, f"could not start: {argv[0]} is not executable", "", FailureKind.COULD_NOT_START)
    if copy:
        copy.finish(f"timed out after {timeout:g}s" if done.timed_out else f"exit {done.returncode} in {done.seconds:.1f}s")
    output = redaction.redact(tail_text(done.stdout))
    if done.timed_out:
        return CommandFailure(argv, f"timed out after {timeout:g}s (command_timeout); its processes were killed",
                              output, FailureKind.TIMED_OUT)
    if done.returncode != 0:
        return CommandFailure(argv, f"failed with exit {done.returncode}", output)
    return None
