"""systemd --user units, through systemctl and journalctl (argv lists, timeouts)."""

import contextlib
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .errors import DeployError
from .files import remove_quietly, write_atomic
from .state import inject_fault

SYSTEMCTL_TIMEOUT = 30
RESTART_TIMEOUT = 120
PROPS = ["LoadState", "ActiveState", "SubState", "FragmentPath", "NRestarts",
         "ActiveEnterTimestampMonotonic", "NeedDaemonReload", "MainPID"]


def systemctl(*args, timeout=SYSTEMCTL_TIMEOUT, check=True):
    argv = ["systemctl", "--user", *args]
    proc = run_command(argv, timeout)
    if check and proc.returncode != 0:
        why = (proc.stderr or proc.stdout).strip().splitlines()
        raise DeployError(f"`{' '.join(argv)}` failed: {why[-1] if why else f'exit {proc.returncode}'}")
    return proc


def run_command(argv, timeout=SYSTEMCTL_TIMEOUT, check_timeout=True):
    """Run a systemd tool (systemctl, systemd-run) with a timeout; the CompletedProcess, never a raise
    for its exit code. Past the timeout: DeployError, or None with check_timeout=False."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise DeployError(f"{argv[0]} is not installed: this tool needs systemd") from None
    except subprocess.TimeoutExpired:
        if not check_timeout:
            return None
        raise DeployError(f"`{' '.join(argv)}` did not answer within {timeout}s") from None


@dataclass
class UnitState:
    name: str
    load: str
    active: str
    sub: str
    fragment_path: str
    restarts: int
    uptime: float | None
    need_reload: bool
    main_pid: int = 0

    @property
    def is_active(self):
        return self.active == "active"

    @property
    def known(self):
        return self.load == "loaded"


def state(unit):
    proc = systemctl("show", unit, "--property=" + ",".join(PROPS), check=False)
    if proc.returncode != 0:
        why = (proc.stderr or "no answer").strip().splitlines()
        raise DeployError(f"cannot ask the systemd user manager about {unit}: {why[-1] if why else ''}"
                          " (is `systemctl --user` working for this user? see README: loginctl enable-linger)")
    props = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    entered = int(props.get("ActiveEnterTimestampMonotonic") or 0)
    uptime = None
    if props.get("ActiveState") == "active" and entered:
        uptime = max(0.0, time.clock_gettime(time.CLOCK_MONOTONIC) - entered / 1e6)
    return UnitState(
        name=unit,
        load=props.get("LoadState", ""),
        active=props.get("ActiveState", ""),
        sub=props.get("SubState", ""),
        fragment_path=props.get("FragmentPath", ""),
        restarts=int(props.get("NRestarts") or 0),
        uptime=uptime,
        need_reload=props.get("NeedDaemonReload") == "yes",
        main_pid=int(props.get("MainPID") or 0),
    )


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


def require_known(unit):
    st = state(unit)
    if not st.known:
        raise DeployError(f"the systemd user manager does not know {unit} (LoadState={st.load or 'none'}): "
                          f"install it in ~/.config/systemd/user/ and run `systemctl --user daemon-reload`")
    return st


def daemon_reload():
    systemctl("daemon-reload")


def restart(unit, quick_stop=None):
    """Restart the unit (reloading unit files first if they changed on disk). A deliberate
    restart clears the failed state and the start rate limit first: several deploys and
    rollbacks in a few seconds must not be refused as "start request repeated too quickly".
    quick_stop: seconds the process that stops may take before it is killed (a failed release being
    rolled back: its graceful stop would wait out a request it never answers); None: its own
    TimeoutStopSec. Returns restart_counts() once started: health counts restarts from there."""
    if holding(unit):               # the app was stopped (a migration, a restore): the socket activates it again
        release_holder(unit)        # (a queued request may start it at once: `start` then waits for that start)
        systemctl("reset-failed", unit, check=False)
        systemctl("start", unit, timeout=RESTART_TIMEOUT)
        return restart_counts(unit)
    st = state(unit)
    if st.need_reload or state(helper_name(unit)).need_reload:
        daemon_reload()
    systemctl("reset-failed", unit, check=False)
    start_socket_if_stopped(unit)
    if restart_method(unit) == "handover" and serving_state(unit).is_active:
        handover_restart(unit, quick_stop)
    elif quick_stop is not None:
        stop_within(unit, quick_stop)
        systemctl("start", unit, timeout=RESTART_TIMEOUT)
    else:
        systemctl("restart", unit, timeout=RESTART_TIMEOUT)
    return restart_counts(unit)


def restart_counts(unit: str) -> dict[str, int]:
    """{slot: its NRestarts} now: what a health check after the tool's own start counts restarts from (a
    counter carried over from the release being replaced is not the new release's)."""
    return {st.name: st.restarts for st in slot_states(unit)}


def describe_restart(unit):
    """The restart step, as the dry run and the plans say it."""
    method = restart_method(unit)
    if method == "handover":
        serving = serving_state(unit)
        idle = next((u for u in slots(unit) if u != serving.name), helper_name(unit))
        return (f"hand over on {socket_name(unit)}: start {idle} (it serves once ready), then stop {serving.name} "
                "(it finishes the requests it has)" if serving.is_active else
                f"systemctl --user restart {unit} (on {socket_name(unit)}: requests wait, none is refused)")
    if method == "socket":
        return f"systemctl --user restart {unit} ({socket_name(unit)} holds the port: requests wait, none is refused)"
    return f"systemctl --user restart {unit} (the port closes meanwhile: requests are refused)"


def stop_within(unit: str, seconds: float) -> None:
    """Stop unit, killing what is left of its process after seconds (SIGKILL). Returns once the stop job
    is over: the unit is inactive, so the start that follows is the tool's own, not systemd's. (A stop
    queued with --no-block and not yet run is replaced by that start; and a start met by a crashing
    release waiting in auto-restart waits for that automatic restart, whose process then counts as
    "1 automatic restart" though it is the new release's.) Behind a socket, a queued request may start
    the unit again once it stopped (from the release `current` names now), and that start is left alone."""
    if run_command(["systemctl", "--user", "stop", unit], timeout=seconds, check_timeout=False) is None:
        systemctl("kill", "--signal=SIGKILL", unit, check=False)
        systemctl("stop", unit, timeout=RESTART_TIMEOUT, check=False)


def stop(unit):
    systemctl("stop", unit, timeout=RESTART_TIMEOUT)


def stop_serving(unit):
    """Stop every slot that serves, never the socket: requests wait in its queue until a slot starts
    (a deploy whose migration the running release cannot live with stops it first)."""
    for name in reversed(slots(unit)):
        systemctl("stop", name, timeout=RESTART_TIMEOUT, check=False)


def stop_for_restore(unit):
    """Stop the app so nothing opens its database. Behind a listening socket, the socket stays and
    activates the holder instead of the app (hold): a request waits in its queue through the restore
    and cannot start the app in its middle; the restart gives the socket back. A socket that is not
    listening stops with the app (it would start the service on the first request)."""
    if restart_method(unit) != "plain":
        if state(socket_name(unit)).is_active:
            hold(unit, why="while the database is restored")
        else:
            systemctl("stop", socket_name(unit), timeout=RESTART_TIMEOUT)
            systemctl("stop", helper_name(unit), timeout=RESTART_TIMEOUT, check=False)
    stop(unit)


def is_restart_looping(st):
    """Active but restarted by systemd recently, or waiting to be restarted again."""
    if st.sub == "auto-restart" or st.active in ("activating", "failed"):
        return True
    return st.restarts > 0 and (st.uptime or 0) < 60


def journal_tail(unit, lines=10):
    """The unit's last log lines: from the journal, else from the file its output is appended to."""
    try:
        proc = subprocess.run(["journalctl", "--user", "--unit", unit, "--lines", str(lines),
                               "--no-pager", "--output", "cat", "--quiet"],
                              capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL)
        found = [line for line in proc.stdout.splitlines() if line.strip()]
    except (OSError, subprocess.TimeoutExpired):
        found = []
    if not found:
        found = output_file_tail(unit)
    return found[-lines:]


def output_file_tail(unit, limit=16384):
    """The tail of the file a unit's StandardOutput= appends to (systemctl show does not name it)."""
    proc = systemctl("show", unit, "--property=FragmentPath,DropInPaths", check=False)
    props = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    target = ""
    for path in [props.get("FragmentPath", "")] + props.get("DropInPaths", "").split():
        try:
            for line in Path(path).read_text(errors="replace").splitlines():
                if line.strip().startswith("StandardOutput="):
                    target = line.split("=", 1)[1].strip()
        except OSError:
            continue
    for prefix in ("append:", "file:", "truncate:"):
        if target.startswith(prefix):
            try:
                with open(target[len(prefix):], "rb") as fh:
                    fh.seek(0, os.SEEK_END)
                    fh.seek(max(0, fh.tell() - limit))
                    return [line for line in fh.read().decode(errors="replace").splitlines() if line.strip()]
            except OSError:
                return []
    return []


def uptime_text(st):
    if st.uptime is None:
        return ""
    since = datetime.now(timezone.utc).timestamp() - st.uptime
    return datetime.fromtimestamp(since, timezone.utc).astimezone().isoformat(timespec="seconds")


def user_unit_dir():
    """Where systemd --user reads the user's own unit files."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "systemd" / "user"


def holds_environment(text):
    """Whether a unit file's text sets variables itself (Environment=): their values may be secrets."""
    return any(line.strip().startswith("Environment=") and line.split("=", 1)[1].strip()
               for line in str(text).splitlines())


def unit_file_mode(text, mode):
    """The mode a unit file is written with: 0600 when it holds Environment= values (whatever it had: a
    0644 unit with a secret in it is not copied as such), else mode (never group- or world-writable)."""
    return 0o600 if holds_environment(text) else mode & 0o755


def install_unit_files(files, modes=None, reload=True):
    """Write {name or path: text} into the user's unit folder (atomically), then daemon-reload.
    A file keeps the mode it had; modes {path: mode} sets it for new files; otherwise 0644. A file that
    holds Environment= values is 0600 whatever its mode was (unit_file_mode)."""
    folder = user_unit_dir()
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        path = folder / name
        mode = (modes or {}).get(path)
        if mode is None:
            try:
                mode = os.stat(path).st_mode & 0o777
            except OSError:
                mode = 0o644
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, text, mode=unit_file_mode(text, mode))
    if reload:
        daemon_reload()
    return folder


# -- moving a port from a service to its socket unit, in the shortest window ---------------------
# systemd refuses to start a socket while the service it activates is active, and runs a stop before a
# start of units ordered either way. So a socket that activated the service itself could start only once
# the old process is gone: gunicorn lets the port go 0.06 s into its stop but exits 0.23 s in, and every
# connection in between is refused. For the move, the socket activates a holder instead: a unit that,
# if a connection starts it, only sleeps (the connection waits in the queue, nothing touches the data).
# The socket then starts the moment the port is free; the service, which names the socket in Sockets=,
# starts on it once its data is in place, and the socket goes back to activating the service.
def holder_name(unit):
    return unit.removesuffix(".service") + "-port-holder.service"


def port_holder_files(unit, exec_start=None, why=None):
    """{path: text}: the socket's drop-in that makes it activate the holder, and the holder. exec_start:
    what the holder runs when a connection starts it (default: a sleep, so connections wait in the queue)."""
    folder = user_unit_dir()
    why = why or f"while {unit}'s port moves to this socket"
    return {folder / f"{socket_name(unit)}.d" / "50-safe-deploy-move.conf":
            f"# written by safe-deploy {why}; removed right after\n"
            f"[Socket]\nService={holder_name(unit)}\n",
            folder / holder_name(unit):
            f"[Unit]\nDescription=holds {socket_name(unit)}'s connections {why} "
            "(written by safe-deploy, removed right after)\n\n"
            f"[Service]\nExecStart={exec_start or '/bin/sleep infinity'}\n"}


MAINTENANCE = Path(__file__).resolve().parent / "maintenance.py"


def exec_line(argv):
    """argv as an ExecStart= line: quoted, and systemd's own % specifiers and $ variables escaped."""
    return shlex.join(argv).replace("%", "%%").replace("$", "$$")


def hold(unit, retry_after=None, page=None, why="while the app is stopped for a migration"):
    """Stop every slot that serves, the socket kept, activating the holder instead of the app: requests
    wait in the socket's queue (none refused, none answered by the code that stopped), or, with
    retry_after, get a quick 503 with Retry-After (and page, when readable) from the tool's own listener
    (safedeploy/maintenance.py). The restart step puts the socket back (release_holder) and starts the app."""
    command = None
    if retry_after is not None:
        command = exec_line([sys.executable, str(MAINTENANCE), "--retry-after", str(int(retry_after))]
                            + (["--page", str(page)] if page else []))
    install_unit_files(port_holder_files(unit, command, why=why))
    stop_serving(unit)


def hold_crashing(unit: str, started: dict[str, int] | None, seconds: float) -> bool:
    """A release that crash-loops behind a socket, found failed: stop it now, the socket kept and activating the
    holder (requests wait in its queue), so systemd restarts it no more while it is rolled back. Each restart
    counts against the start limit (5 in 10 s), and the limit, once hit, fails the socket with the service:
    the port closes and requests are refused until the rollback starts the socket again (seen under load:
    2 to 4 refused per rollback). A release that is not crashing (it answers badly, or the old slot of a
    handover still serves) is left to the rollback. Returns whether it held."""
    if restart_method(unit) == "plain" or holding(unit):
        return False
    st = serving_state(unit)
    crashing = (st.sub == "auto-restart" or st.active in ("activating", "failed")
                or st.restarts > (started or {}).get(st.name, 0))
    if not crashing:
        return False
    install_unit_files(port_holder_files(unit, why="while the release that crashed is rolled back"))
    for name in reversed(slots(unit)):
        stop_within(name, seconds)
    return True


def holding(unit):
    """Whether the socket activates the holder (a hold or a port move that did not end)."""
    return any(path.exists() for path in port_holder_files(unit))


def alive(pid):
    return bool(pid) and Path(f"/proc/{pid}").exists()


def move_port_to_socket(unit, port, timeout=RESTART_TIMEOUT):
    """Stop unit and have its socket (activating the holder) listen the moment the port is free: the
    connections refused are those from the old process letting the port go to the socket's bind.
    Returns once the old process is gone and the socket listens."""
    old = state(unit).main_pid
    systemctl("stop", "--no-block", unit)
    deadline = time.monotonic() + timeout
    while listening_inodes(port) and alive(old) and time.monotonic() < deadline:
        time.sleep(0.002)
    # ignore-dependencies: no ordering after the service's stop job (the socket is ordered before it)
    systemctl("start", "--job-mode=ignore-dependencies", socket_name(unit))
    while time.monotonic() < deadline:
        if not alive(old) and state(unit).active not in ("active", "deactivating", "reloading"):
            return
        time.sleep(0.01)
    raise DeployError(f"{unit} did not stop within {timeout}s")


def release_holder(unit):
    """The socket activates the service again; the holder goes (stopped if a connection started it)."""
    files = port_holder_files(unit)
    dropin = next(iter(files))
    if not holding(unit):
        return
    remove_quietly(dropin)
    with contextlib.suppress(OSError):
        dropin.parent.rmdir()
    remove_quietly(user_unit_dir() / holder_name(unit))
    daemon_reload()         # before the stop: once the holder stops, the socket must activate the service, not it
    systemctl("stop", holder_name(unit), check=False)


# -- socket activation ------------------------------------------------------------------------
def socket_name(unit):
    return unit.removesuffix(".service") + ".socket"


def start_socket_if_stopped(unit):
    """A socket unit of the service that a restore (or a person) stopped: listen again first."""
    sock = socket_name(unit)
    st = state(sock)
    if st.known and st.active != "active" and systemctl("is-enabled", sock, check=False).stdout.strip() == "enabled":
        systemctl("reset-failed", sock, check=False)      # a crash-looping service can take its socket down
        systemctl("start", sock)


def helper_name(unit):
    """The second slot of a handover env: the same program on the same socket."""
    return unit.removesuffix(".service") + "-handover.service"


def slot_states(unit):
    """The states of the units that may serve the env: the service, and its handover slot when it has one."""
    helper = state(helper_name(unit))
    return [state(unit), helper] if helper.known else [state(unit)]


def slots(unit):
    return [st.name for st in slot_states(unit)]


def serving_state(unit):
    """The state of the slot that serves (or is starting to): with a handover slot, a deploy leaves
    whichever it started last serving. Both running (a deploy killed mid-swap): the newer."""
    states = slot_states(unit)
    running = [st for st in states if st.is_active]
    if running:
        return min(running, key=lambda st: st.uptime if st.uptime is not None else 0.0)
    starting = [st for st in states if st.active in ("activating", "reloading")]
    return starting[0] if starting else states[0]


def restart_method(unit):
    """'handover' when a helper serves from the socket while the service restarts (no request
    waits), 'socket' when a socket unit holds the port (requests wait, none is refused), else
    'plain' (the port closes: requests are refused)."""
    proc = systemctl("show", unit, "--property=TriggeredBy", "--value", check=False)
    if not any(name.endswith(".socket") for name in proc.stdout.split()):
        return "plain"
    return "handover" if state(helper_name(unit)).known else "socket"


METHOD_NOTES = {
    "handover": "{unit} and {helper} take turns on {socket}: a deploy starts the idle one and stops the other "
                "once it is ready, so no request waits and the release starts once",
    "socket": "{socket} holds the port: requests wait while {unit} restarts, none is refused "
              "(a server that signals readiness gets a handover helper too: {command})",
}

DROPS_WARNING = ("a restart closes the port until the new process listens, so requests are refused "
                 "meanwhile: hold the port with a socket unit ({command})")


def render_socket(unit, port):
    return (f"[Unit]\nDescription=listening socket of {unit} (written by safe-deploy)\n\n"
            f"[Socket]\n# holds the port across restarts of {unit}: requests wait here, none is refused\n"
            f"ListenStream=127.0.0.1:{port}\nBacklog=4096\n\n[Install]\nWantedBy=sockets.target\n")


def render_helper(service_text, unit):
    """The handover slot: the same program as the service, on the service's socket, never enabled.
    A deploy starts it beside the serving service and stops the service (or the other way round)."""
    lines, section = [], None
    for line in service_text.splitlines():
        stripped = line.strip()
        if stripped.startswith("["):
            section = stripped
        if section == "[Install]" or stripped.startswith("Description="):
            continue
        lines.append(line)
        if stripped == "[Unit]":
            lines.append(f"Description=second slot of {unit} (written by safe-deploy; started by deploys, "
                         "it serves until the next one)")
        if stripped == "[Service]" and f"Sockets={socket_name(unit)}" not in service_text:
            lines.append(f"Sockets={socket_name(unit)}")
    return "\n".join(lines).rstrip("\n") + "\n"


def handover_restart(unit, quick_stop=None):
    """Move a socket-activated env to a new process with no request waiting and one start-up: the
    idle slot starts on the same socket (systemctl start returns once it is ready, so the server
    must signal readiness only once it can answer: gunicorn needs --preload), then the slot that
    served stops gracefully (it finishes the requests it has). Whichever slot started last serves
    from then on. A slot that cannot start fails while the other keeps serving."""
    active = [u for u in slots(unit) if state(u).is_active]
    if len(active) == 2:         # a deploy killed mid-swap: keep the newer, stop the other first
        keep = serving_state(unit).name
        systemctl("stop", next(u for u in active if u != keep), timeout=RESTART_TIMEOUT, check=False)
        active = [keep]
    old = active[0]
    new = next(u for u in slots(unit) if u != old)
    old_workers = len(children_of(state(old).main_pid))
    systemctl("reset-failed", new, check=False)
    inject_fault("restart", "handover")        # test-only: kill before the new slot is up
    if systemctl("start", new, timeout=RESTART_TIMEOUT, check=False).returncode != 0:
        output = "\n".join(journal_tail(new))
        systemctl("stop", new, timeout=RESTART_TIMEOUT, check=False)
        raise DeployError(f"the new release did not start (its handover slot {new} failed); "
                          f"{old} still serves the release before it", output=output)
    wait_for_workers(state(new).main_pid, old_workers)
    if quick_stop is not None:
        stop_within(old, quick_stop)
    else:
        systemctl("stop", old, timeout=RESTART_TIMEOUT)


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


def render_socket_service(text, unit, notify):
    """The service unit `text`, changed to take its socket from systemd: Requires/After the
    socket (added beside the unit's own Requires=/After=, which stay), Type=notify (readiness)
    when the server can tell it, a graceful stop."""
    sock = socket_name(unit)
    sections, current = {}, None
    order = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            current = stripped
            order.append(current)
            sections[current] = []
            continue
        if current is None:
            current = "[Unit]"
            order.append(current)
            sections[current] = []
        sections[current].append(line)

    def setting(section, key, value):
        lines = sections.setdefault(section, [])
        if section not in order:
            order.append(section)
        for i, line in enumerate(lines):
            if line.strip().startswith(f"{key}="):
                lines[i] = f"{key}={value}"
                return
        while lines and not lines[-1].strip():
            lines.pop()
        lines.append(f"{key}={value}")

    def depend(key, value):
        """Requires= and After= add up over lines in systemd: the unit's own stay as they are (its
        database, its network) and the socket gets a line of its own, unless a line names it already."""
        lines = sections.setdefault("[Unit]", [])
        if "[Unit]" not in order:
            order.insert(0, "[Unit]")
        if any(line.strip().startswith(f"{key}=") and value in line.split("=", 1)[1].split() for line in lines):
            return
        while lines and not lines[-1].strip():
            lines.pop()
        lines.append(f"{key}={value}")

    depend("Requires", sock)
    depend("After", sock)
    setting("[Service]", "Sockets", sock)      # its fds whichever unit the socket activates (see holder_name)
    if notify:
        setting("[Service]", "Type", "notify")
        setting("[Service]", "NotifyAccess", "main")
    setting("[Service]", "KillMode", "mixed")
    if not any(line.strip().startswith("TimeoutStopSec=") for line in sections.get("[Service]", [])):
        setting("[Service]", "TimeoutStopSec", "30")
    if not any(line.strip().startswith("RestartSec=") for line in sections.get("[Service]", [])):
        # time for a deploy to see a crashing release before systemd's start limit, hit by quick
        # restarts, fails the service and closes the socket with it
        setting("[Service]", "RestartSec", "2")
    out = []
    for section in order:
        out.append(section)
        out.extend(line for line in sections[section])
        if out[-1].strip():
            out.append("")
    return "\n".join(out).rstrip("\n") + "\n"
