"""What /proc says about processes and listening TCP sockets: which process holds a port, a process's parent and
children, whether a new server's workers have booted. Reads /proc only: never systemctl, never a signal; where
/proc cannot tell, the answer says so ('' / False / {}) rather than guess."""

import os
import time
from pathlib import Path


def listening_sockets():
    """{socket inode: port} of every listening TCP socket (any address), from /proc/net/tcp and tcp6."""
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A":
                found[fields[9]] = int(fields[1].rsplit(":", 1)[1], 16)
    return found


def listening_inodes(port):
    """Socket inodes listening on TCP port (any address)."""
    return {inode for inode, p in listening_sockets().items() if p == port}


def parent_of(pid):
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
        return int(stat_line.rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def port_owner(unit: str, port: int, main_pid: int) -> tuple[str, bool]:
    """(problem, confirmed): problem is '' when the socket listening on port is held by the unit's main
    process or its children (a socket unit's passed socket counts), else what holds it; confirmed says
    /proc showed the main process (or a child) holding it. Where /proc cannot tell: ('', False)."""
    inodes = listening_inodes(port)
    if not inodes or not main_pid:
        return "", False
    wanted = {f"socket:[{i}]" for i in inodes}
    holders = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                if os.readlink(fd) in wanted:
                    holders.add(int(entry.name))
                    break
        except OSError:
            continue
    if not holders:
        return "", False
    for pid in holders:
        seen = 0
        while pid > 1 and seen < 64:
            if pid == main_pid:
                return "", True
            pid, seen = parent_of(pid), seen + 1
    return (f"port {port} is held by pid {', '.join(map(str, sorted(holders)))}, not by {unit} "
            f"(main pid {main_pid})"), False


def port_owner_problem(unit, port, main_pid):
    """'' when the port is the unit's own (or /proc cannot tell), else what holds it (see port_owner)."""
    return port_owner(unit, port, main_pid)[0]


def alive(pid):
    return bool(pid) and Path(f"/proc/{pid}").exists()


WORKERS_WAIT = 5.0      # seconds the old slot keeps serving while the new one's workers boot, at most


def children_of(pid: int) -> dict[int, str]:
    """{child pid: its state letter (R running, S sleeping, ...)} of a process; {} when it is gone."""
    if pid <= 0:
        return {}
    try:
        kids = [int(k) for k in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return {}
    found = {}
    for kid in kids:
        try:
            found[kid] = Path(f"/proc/{kid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
    return found


def workers_booted(want: int, kids: dict[int, str], seen_idle: set[int]) -> bool:
    """Whether a new server's workers can all answer: as many as the old server has (want), and each seen
    idle (sleeping, waiting for a connection) at least once since it appeared. A server without workers
    (want 0) is ready when it says so."""
    seen_idle |= {k for k, st in kids.items() if st in ("S", "I")}
    return len(kids) >= want and all(k in seen_idle for k in kids)


def wait_for_workers(new_pid: int, want: int, timeout: float = WORKERS_WAIT) -> None:
    """A server that tells systemd it is ready before its workers exist (gunicorn sends READY=1, then forks its
    workers): the old slot is stopped only once the new one's workers are booted, else requests wait in the
    socket meanwhile. Bounded: past timeout the handover goes on (the workers take the queue when they come)."""
    if want <= 0:
        return
    seen: set[int] = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if workers_booted(want, children_of(new_pid), seen):
            return
        time.sleep(0.01)
