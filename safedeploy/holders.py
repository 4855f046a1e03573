"""Who holds an env's lock, whoever it is.

The tool's own holders write who they are into the lock file (pid, operation, command, since). A
lock can also be held by something else (an operator's `flock state/prod.lock ...`, a script), or by
one of ours in the instant before it wrote its name. The kernel knows in every case: /proc/locks
lists each flock with the pid that took it and the file's device and inode; /proc/PID/cmdline and
/proc/PID/stat give its command line and start time; /proc/PID/cwd where a relative script path
lies. One of the tool's scripts is a name of ours in a folder with the tool's package beside it; an
operator's own `backup.py` is not. A holder this module cannot name is said to be unknown, never
taken for a backup (a deploy waits for a backup, and for nothing else).
"""

import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path


@dataclass(frozen=True)
class Holder:
    """The process holding an env's lock: its pid, operation, command and since when."""
    pid: int | None
    operation: str          # the tool's own operation ("deploy", "backup (nightly)", ...); "" when not known
    command: str
    since: str
    ours: bool              # the tool's: named by its holder file, or one of its scripts by the command line

    @property
    def passing(self) -> bool:
        """Held by no one this host shows, or by one of the tool's scripts that has not written its name (a
        status look at the lock, an operation in its first instant): it lets go, or names itself, at once."""
        return self.pid is None or (self.ours and not self.operation)

    @property
    def changes_live(self) -> bool:
        """A deploy, a rollback or a conversion of this tool: it stops the app, holds its socket, moves the
        database, tags what it leaves, in steps of its own (after finishing or undoing a killed one first)."""
        return self.ours and self.operation in CHANGING_OPERATIONS

    @property
    def is_backup(self) -> bool:
        """A backup or a prune of this tool: it ends by itself and changes nothing that runs."""
        return self.ours and self.operation.startswith(("backup", "prune"))

    def describe(self) -> str:
        if self.ours and not self.operation:
            script = Path(script_arg(self.command.split(" "))).name or "a script"
            return (f"safe-deploy's {script} by pid {self.pid or '?'} ({self.command or '?'}), its name not written "
                    f"(a look at the lock, or an operation in its first instant), since {self.since or '?'}")
        if self.ours:
            return (f"{self.operation} by pid {self.pid or '?'} ({self.command or '?'}) "
                    f"since {self.since or '?'}")
        if self.pid:
            return (f"pid {self.pid} ({self.command or 'command line not readable'}), not a safe-deploy operation, "
                    f"since {self.since or 'an unknown time'}")
        return "a process this host does not show (/proc/locks names none we can see)"


def written_holder(path: Path) -> dict:
    """What the lock file says (the tool's holders write it), or {}."""
    try:
        data = json.loads(Path(path).read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def kernel_holders(path: Path) -> list:
    """The pids holding an flock (or a POSIX lock) on path's inode, as /proc/locks shows them."""
    try:
        st = os.stat(path)
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return []
    exact: list[int] = []
    by_inode: list[int] = []
    for line in lines:
        fields = line.split()
        if "->" in fields or len(fields) < 6:
            continue                        # a waiter, not a holder
        try:
            pid = int(fields[4])
            major, minor, inode = fields[5].split(":")
        except ValueError:
            continue
        if int(inode) != st.st_ino:
            continue
        (exact if (int(major, 16), int(minor, 16)) == (os.major(st.st_dev), os.minor(st.st_dev)) else by_inode).append(pid)
    return exact or by_inode                # overlay file systems show the lower device: the inode still tells


OUR_SCRIPTS = ("deploy.py", "rollback.py", "backup.py", "adopt.py", "status.py")
CHANGING_OPERATIONS = ("deploy", "rollback", "install units")     # Holder.changes_live


def process_argv(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def script_arg(argv: list[str]) -> str:
    """The script an interpreter's command line runs, as written (`python3 -u backup.py dev` -> "backup.py"),
    or "": the first argument after the interpreter's options; none with -c or -m."""
    args = iter(argv[1:])
    for arg in args:
        if arg in ("-c", "-m"):
            return ""                   # a command or a module, not a script
        if arg in ("-X", "-W"):
            next(args, None)            # an option with its value apart
        elif not arg.startswith("-"):
            return arg
    return ""


def our_script(argv: list[str], cwd: Path | None) -> str:
    """The tool's script a command line runs ("backup.py"), or "": one of its names, in a folder that holds
    the tool's package beside it (a checkout of the tool, whichever). An operator's own `backup.py` is not
    the tool's. A relative path is taken from cwd, the process's working folder; without one, not ours."""
    arg = script_arg(argv)
    name = Path(arg).name
    if name not in OUR_SCRIPTS:
        return ""
    script = Path(arg) if os.path.isabs(arg) else (cwd / arg if cwd is not None else None)
    try:        # through a link (/usr/local/bin/backup.py), as Python itself finds the package: the real file's folder
        beside = script is not None and (Path(os.path.realpath(script)).parent / "safedeploy" / "__init__.py").is_file()
    except OSError:
        beside = False
    return name if beside else ""


def process_cwd(pid: int) -> Path | None:
    """A process's working folder, or None where /proc does not show it (another user's process)."""
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return None


def process_start(pid: int) -> str:
    """When pid started, ISO 8601 with the local offset, or ""."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
        ticks = int(stat_line.rsplit(")", 1)[1].split()[19])
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
    except (OSError, ValueError, IndexError, StopIteration):
        return ""
    started = boot + ticks / os.sysconf("SC_CLK_TCK")
    return datetime.fromtimestamp(started, timezone.utc).astimezone().isoformat(timespec="seconds")


def identify(path: Path) -> Holder:
    """Who holds the lock at path now (the caller found it held)."""
    info = written_holder(path)
    pids = kernel_holders(path)
    if info.get("pid") and (not pids or info.get("pid") in pids):
        return Holder(info.get("pid"), str(info.get("operation") or ""), str(info.get("command") or ""),
                      str(info.get("since") or ""), True)
    if not pids:
        return Holder(None, "", "", "", False)
    if info.get("pid"):
        info = {}           # a name left by a holder that was killed: not who holds it now
    pid = pids[0]
    argv = process_argv(pid)
    command = " ".join(argv)[:300]
    own = our_script(argv, process_cwd(pid))
    if own and not info:    # one of ours that has not written its name (yet): a backup says so by its command line
        operation = ("prune" if "--prune" in argv else "backup") if own == "backup.py" else ""
        return Holder(pid, operation, command, process_start(pid), True)
    return Holder(pid, "", command, process_start(pid), False)


def waiting_text(env: str, holder: Holder, seconds: float) -> str:
    """The line a waiting operation prints once: that it waits, for whom, and how long at most."""
    whom = f"a backup of {env} to finish" if holder.is_backup else f"the lock of {env}"
    return f"waiting for {whom}, held by {holder.describe()}: up to {seconds:g}s, then exit 3"
