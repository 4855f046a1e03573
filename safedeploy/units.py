"""systemd --user units, through systemctl and journalctl (argv lists, timeouts): their states, restarts,
handovers between slots, holding a port in its socket, installing unit files. The unit files' names and texts
are safedeploy/unitfiles' (pure), what /proc says of processes and sockets safedeploy/processes': callers
import those from there."""

import contextlib
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .errors import DeployError
from .files import remove_quietly, write_atomic
from .processes import alive, children_of, listening_inodes, wait_for_workers
from .state import inject_fault
from .unitfiles import (exec_line, helper_name, holder_name, holder_sleeps, names_socket, port_holder_files,
                        socket_name, unit_file_mode, user_unit_dir)

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
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                              env=manager_env())
    except FileNotFoundError:
        raise DeployError(f"{argv[0]} is not installed: this tool needs systemd") from None
    except subprocess.TimeoutExpired:
        if not check_timeout:
            return None
        raise DeployError(f"`{' '.join(argv)}` did not answer within {timeout}s") from None


def manager_env(root: str = "/run/user") -> dict[str, str] | None:
    """The environment for systemctl: this one, with XDG_RUNTIME_DIR set to the user's own /run/user/UID
    when it is unset and that folder is this user's (cron and `env -i` give none: systemctl --user then
    cannot find the user manager's bus). None: this environment as it is."""
    if os.environ.get("XDG_RUNTIME_DIR"):
        return None
    runtime = f"{root}/{os.getuid()}"
    try:
        if os.stat(runtime).st_uid != os.getuid():
            return None
    except OSError:
        return None
    return {**os.environ, "XDG_RUNTIME_DIR": runtime}


@dataclass
class UnitState:
    """One unit as systemctl show reports it: load and active state, restarts, uptime."""
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
    return states(unit)[0]


def states(*names):
    """The UnitState of each unit named, in that order, from one `systemctl show` (it prints one block of
    properties per unit, blank lines between; a unit it does not know has LoadState=not-found)."""
    proc = systemctl("show", *names, "--property=" + ",".join(PROPS), check=False)
    blocks = proc.stdout.strip("\n").split("\n\n") if proc.returncode == 0 else []
    if len(blocks) != len(names):
        why = (proc.stderr or "no answer").strip().splitlines()
        raise DeployError(f"cannot ask the systemd user manager about {names[0]}: {why[-1] if why else ''}"
                          " (is `systemctl --user` working for this user, with XDG_RUNTIME_DIR set? see README: "
                          "loginctl enable-linger)")
    return [unit_state(unit, block) for unit, block in zip(names, blocks)]


def unit_state(unit, block):
    """A UnitState from the lines `systemctl show` printed for unit."""
    props = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
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
        return restart_held(unit)
    if any(st.need_reload for st in states(unit, helper_name(unit))):
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


def restart_held(unit: str) -> dict[str, int]:
    """Start the app the socket holds requests for (hold), and give the socket back to it (release_holder).
    Requests wait in the socket's queue from the stop until the app answers, so this is the stretch users wait
    through: when the holder only sleeps and the service names its socket in Sockets= (systemd passes it the
    listening fds whichever unit the socket activates), the app starts first and the holder goes afterwards,
    its daemon-reload and stop while the app answers. Otherwise (a 503 listener would answer beside the app, a
    service without Sockets= would bind the port itself, unit files changed on disk) the holder goes first: a
    queued request may then start the app at once, and `start` waits for that start. Returns restart_counts()."""
    if start_beside_holder(unit):
        systemctl("reset-failed", unit, check=False)
        try:
            systemctl("start", unit, timeout=RESTART_TIMEOUT)
        except DeployError:
            with contextlib.suppress(DeployError):
                release_holder(unit)        # as if the holder had gone first: the socket activates the app
            raise
        counts = restart_counts(unit)
        inject_fault("restart", "held")         # test-only: kill with the app started, the holder not yet gone
        release_holder(unit)
        return counts
    release_holder(unit)
    systemctl("reset-failed", unit, check=False)
    systemctl("start", unit, timeout=RESTART_TIMEOUT)
    return restart_counts(unit)


def start_beside_holder(unit: str) -> bool:
    """Whether the held app may start while its socket still activates the holder: the holder only sleeps,
    the service's unit file (as loaded: none changed on disk since) names the socket in Sockets=."""
    try:
        holder = (user_unit_dir() / holder_name(unit)).read_text()
    except OSError:
        return False
    if not holder_sleeps(holder):
        return False
    proc = systemctl("show", unit, "--property=FragmentPath,DropInPaths,NeedDaemonReload", check=False)
    props = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    if proc.returncode != 0 or props.get("NeedDaemonReload") != "no" or not props.get("FragmentPath"):
        return False
    texts = []
    for path in [props["FragmentPath"], *props.get("DropInPaths", "").split()]:
        try:
            texts.append(Path(path).read_text(errors="replace"))
        except OSError:
            return False
    return names_socket(texts, unit)


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
    (a deploy whose migration the running release cannot live with stops it first). The slot that serves
    stops last: the idle one's stop is not part of the stretch without an answer. Returns the slots whose stop
    failed (a stop job canceled by a start queued meanwhile, say): a caller that must not go on beside the app
    stops them again."""
    states = slot_states(unit)
    serving = serving_state(unit, states).name
    failed = []
    for name in sorted((st.name for st in states), key=lambda name: name == serving):
        if systemctl("stop", name, timeout=RESTART_TIMEOUT, check=False).returncode != 0:
            failed.append(name)
    return failed


def stop_for_restore(unit):
    """Stop the app so nothing opens its database. Behind a listening socket, the socket stays and
    activates the holder instead of the app (hold): a request waits in its queue through the restore
    and cannot start the app in its middle; the restart gives the socket back. A socket that is not
    listening stops with the app (it would start the service on the first request)."""
    if restart_method(unit) != "plain":
        if state(socket_name(unit)).is_active:
            # every slot stopped by the hold: the env's own unit is stopped again (raising) only when its stop failed
            if unit in hold(unit, why="while the database is restored"):
                stop(unit)
            return
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
MAINTENANCE = Path(__file__).resolve().parent / "maintenance.py"


def hold(unit, retry_after=None, page=None, why="while the app is stopped for a migration") -> list[str]:
    """Stop every slot that serves, the socket kept, activating the holder instead of the app: requests
    wait in the socket's queue (none refused, none answered by the code that stopped), or, with
    retry_after, get a quick 503 with Retry-After (and page, when readable) from the tool's own listener
    (safedeploy/maintenance.py). The restart step puts the socket back (release_holder) and starts the app.
    Returns the slots whose stop failed (stop_serving)."""
    command = None
    if retry_after is not None:
        command = exec_line([sys.executable, str(MAINTENANCE), "--retry-after", str(int(retry_after))]
                            + (["--page", str(page)] if page else []))
    install_unit_files(port_holder_files(unit, command, why=why))
    return stop_serving(unit)


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
def start_socket_if_stopped(unit):
    """A socket unit of the service that a restore (or a person) stopped: listen again first."""
    sock = socket_name(unit)
    st = state(sock)
    if st.known and st.active != "active" and systemctl("is-enabled", sock, check=False).stdout.strip() == "enabled":
        systemctl("reset-failed", sock, check=False)      # a crash-looping service can take its socket down
        systemctl("start", sock)


def slot_states(unit):
    """The states of the units that may serve the env: the service, and its handover slot when it has one."""
    own, helper = states(unit, helper_name(unit))
    return [own, helper] if helper.known else [own]


def slots(unit):
    return [st.name for st in slot_states(unit)]


def serving_state(unit, states=None):
    """The state of the slot that serves (or is starting to): with a handover slot, a deploy leaves
    whichever it started last serving. Both running (a deploy killed mid-swap): the newer. states: the
    slot_states(unit) the caller has (default: asked now)."""
    states = slot_states(unit) if states is None else states
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
    if proc.returncode != 0:
        state(unit)             # raises, naming the env's own unit (not its helper's) and why
    if not any(name.endswith(".socket") for name in proc.stdout.split()):
        return "plain"
    return "handover" if state(helper_name(unit)).known else "socket"


def handover_restart(unit, quick_stop=None):
    """Move a socket-activated env to a new process with no request waiting and one start-up: the
    idle slot starts on the same socket (systemctl start returns once it is ready, so the server
    must signal readiness only once it can answer: gunicorn needs --preload), then the slot that
    served stops gracefully (it finishes the requests it has). Whichever slot started last serves
    from then on. A slot that cannot start fails while the other keeps serving."""
    now = slot_states(unit)
    active = [st.name for st in now if st.is_active]
    if len(active) == 2:         # a deploy killed mid-swap: keep the newer, stop the other first
        keep = serving_state(unit, now).name
        systemctl("stop", next(u for u in active if u != keep), timeout=RESTART_TIMEOUT, check=False)
        active = [keep]
    old = active[0]
    new = next(st.name for st in now if st.name != old)
    old_workers = len(children_of(next(st.main_pid for st in now if st.name == old)))
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
