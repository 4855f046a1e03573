"""A release started beside everything live, on a copy of the env's data: the transient units and the
scratch copies of rehearsals and drills (safedeploy.rehearsal), and the probes that judge them.

The settings (settings): the service's ExecStart and its environment (Environment=, EnvironmentFile=,
in systemd's order: safedeploy.unitenv) with every path into the env's live folders moved into the
scratch copy (`current` and the work tree to the release started, the shared folder and the
database's folder to the scratch shared copy) and the port moved to the scratch one. A value that
still names a live path after that makes it refuse (DeployError): it cannot be sure the app, or a
rehearsed pre_restart, would not write there. The variables reach a transient unit through a 0600
file, never its command line.

A probe (probe()) asks one path and, when the answer is not 2xx/3xx, keeps the request's status and
what the app wrote to its log meanwhile (its error output: Django with DEBUG = False logs the
traceback on stderr when its LOGGING says so; see docs/django.md).
"""

import os
import re
import shutil
import socket
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from . import dbfiles, health, unitenv, units
from .errors import DeployError
from .files import write_atomic

SMALL_FILE = 10 << 20       # files of the database's folder copied into a rehearsal (not the database)
LOG_SETTLE = 0.3            # seconds a failed request's log lines get to reach the file
ERROR_WORDS = re.compile(r"Error|Exception|Traceback|error:|FATAL|CRITICAL")


# -- the scratch copy -----------------------------------------------------------------------------
def scratch_db(env, scratch: Path) -> Path:
    if os.path.isabs(os.path.expanduser(env.db_setting)):
        return scratch / "shared" / "db" / Path(env.db_setting).name
    return scratch / "shared" / os.path.normpath(env.db_setting)


def copy_data(env, scratch: Path) -> None:
    """The database's folder as the scratch shared copy: a fresh online backup of the live database
    (read-only: the live file is never written) and the folder's other small files."""
    scratch.mkdir(mode=0o700, exist_ok=True)
    db = scratch_db(env, scratch)
    db.parent.mkdir(parents=True, mode=0o700)
    if env.db.exists():
        need, free = dbfiles.needed_bytes(env.db), dbfiles.free_bytes(scratch)
        if free < need:
            raise DeployError(f"not enough free disk in {scratch.parent} for a copy of {env.db}: "
                              f"{free / 2**20:.1f} MiB free, {need / 2**20:.1f} MiB needed")
        dbfiles.check_is_sqlite(env.db)
        fd = os.open(db, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        try:
            dbfiles.copy_snapshot(env.db, db)
        except sqlite3.DatabaseError as exc:
            raise DeployError(f"cannot copy {env.db} for the rehearsal: {exc}") from None
        for entry in env.db.parent.iterdir():
            if entry.name.startswith(env.db.name) or entry.is_symlink() or not entry.is_file():
                continue
            if entry.stat().st_size <= SMALL_FILE:
                shutil.copy2(entry, db.parent / entry.name)


def free_port() -> int:
    """A loopback port for a transient app, reserved until the app binds it. A port found by bind(0) and
    closed again is from the kernel's ephemeral range, which every outgoing connection draws from: on a
    busy host a client could take it before the app starts, and the app then fails to bind (a false
    "the rehearsed release does not start"). So the port is left in TIME_WAIT (listened on, connected
    to, closed from the accepting side first): for a minute the kernel hands it to no outgoing
    connection, while a server that sets SO_REUSEADDR, as gunicorn, werkzeug and Python's socketserver
    do, binds it at once."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            accepted, _ = listener.accept()
            accepted.close()        # the accepting side closes first: its end waits in TIME_WAIT
    return port


# -- the settings, moved off the live data ---------------------------------------------------------
def live_prefixes(env) -> list[str]:
    """Folders whose files are live: the work tree, the releases folder, the database's folder."""
    found = [str(env.path), str(env.releases_root), str(Path(env.db).parent)]
    return sorted(set(found), key=len, reverse=True)


def moves(env, release: Path, scratch: Path) -> list:
    """`current` and the work tree to the release (a path into the tree only where the release has that
    file), the shared folder and the database's folder to the scratch shared copy."""
    return [(env.current_link, release, False), (env.releases_root / "shared", scratch / "shared", False),
            (Path(env.db).parent, scratch_db(env, scratch).parent, False), (env.path, release, True)]


def settings(env, release: Path, scratch: Path, port: int) -> tuple[list[str], list[str]]:
    """(argv, [NAME=VALUE]) for a release started on the scratch copy, or its pre_restart. The program
    itself may stay where it is (a venv in the work tree: it is only run); any other value that still
    names a live folder after the move makes it refuse (DeployError): the app could write there."""
    found = unitenv.read(env.unit, env.secret_env)
    if not found.settings.exec_start:
        raise DeployError(f"{env.unit} has no ExecStart= to start the rehearsal with")
    table = moves(env, release, scratch)
    port_re = re.compile(rf"(?<![0-9]){env.port}(?![0-9])")
    argv = [port_re.sub(str(port), unitenv.move(word, table)) for word in found.settings.exec_start]
    assignments = [unitenv.move(a, table) for a in found.assignments()]
    for value in argv[1:] + assignments:
        for live in live_prefixes(env):
            if unitenv.names_path(value, live):
                name = value.split("=", 1)[0] if "=" in value else value
                raise DeployError(f"the service names {live} (live data) in {name!r}, and the rehearsal could not "
                                  "move it into its copy: it does not start the app, which could write there")
    return argv, assignments


def command_environment(env, release: Path, scratch: Path) -> dict[str, str]:
    """What a rehearsed pre_restart runs with: this process's environment, the unit's moved over it."""
    _, assignments = settings(env, release, scratch, free_port())
    return {**os.environ, **dict(a.split("=", 1) for a in assignments)}


def start(env, unit: str, release: Path, scratch: Path, port: int, log: str = "app.log") -> None:
    argv, assignments = settings(env, release, scratch, port)
    env_file = scratch / f"{log}.environment"
    write_atomic(env_file, "".join(f"{a.split('=', 1)[0]}={quote(a.split('=', 1)[1])}\n" for a in assignments))
    units.systemctl("reset-failed", unit, check=False)
    command = ["systemd-run", "--user", "--quiet", "--collect", f"--unit={unit}",
               f"--property=WorkingDirectory={release}", f"--property=EnvironmentFile={env_file}",
               f"--property=StandardOutput=append:{scratch / log}", "--property=StandardError=inherit",
               "--property=Restart=no", "--", *argv]
    proc = units.run_command(command)
    if proc.returncode != 0:
        raise DeployError(f"could not start the transient unit {unit}: {(proc.stderr or proc.stdout).strip()}")


def quote(value: str) -> str:
    """A value as an EnvironmentFile line reads it back whole (double quotes, backslash escapes)."""
    return '"' + re.sub(r'(["\\`$])', r"\\\1", value) + '"'


# -- what it answers -------------------------------------------------------------------------------
def log_tail(scratch: Path, limit: int = 16384, name: str = "app.log") -> str:
    try:
        with open(scratch / name, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - limit))
            return "\n".join(line for line in fh.read().decode(errors="replace").splitlines() if line.strip())
    except OSError:
        return ""


def log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def log_since(path: Path, offset: int, limit: int = 16384) -> list[str]:
    """The lines the app wrote to path from offset on (the last limit bytes of them)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(max(offset, log_size(path) - limit))
            return [line for line in fh.read().decode(errors="replace").splitlines() if line.strip()]
    except OSError:
        return []


def wait_serving(env, unit: str, port: int, what: str) -> str:
    url = f"http://127.0.0.1:{port}{env.health_path}"

    def still_starting():
        return units.state(unit).active in ("active", "activating")

    answer, waited = health.wait_healthy(url, env.health_timeout, still_starting)
    if not answer.ok:
        raise DeployError(f"{what} did not turn healthy within {waited:.1f}s: {url} gave {answer.describe()}")
    return answer.describe()


def watch(env, unit: str, port: int, seconds: float) -> None:
    """The unit stays active with the same process and health keeps answering, for seconds."""
    first = units.state(unit)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.25)
        st = units.state(unit)
        if not st.is_active or st.main_pid != first.main_pid:
            raise DeployError(f"it answered, then its process ended ({st.active}, {st.sub})")
    answer = health.check(f"http://127.0.0.1:{port}{env.health_path}", timeout=2)
    if not answer.ok:
        raise DeployError(f"it answered, then {env.health_path} gave {answer.describe()}")


def check_paths(env, port: int, found: dict) -> list[str]:
    """The rehearse_paths that do not answer 2xx/3xx (found: {path: answer}, filled in)."""
    bad = []
    for path in env.rehearse_paths:
        answer = health.check(f"http://127.0.0.1:{port}{path}", timeout=10)
        found[path] = answer.describe()
        if not answer.ok:
            bad.append(f"{path}: {answer.describe()}")
    return bad


@dataclass(frozen=True)
class ProbeResult:
    """One path a scratch copy answered (or not), with the app's log lines when it failed."""
    path: str
    ok: bool
    answer: str                         # "HTTP 200 in 12 ms", "HTTP 500 in 30 ms", "no answer: ..."
    status: int = 0
    app_said: tuple[str, ...] = ()      # the app's log lines written while it answered (a failure only)

    @property
    def said(self) -> str:
        """The line that says most: the last one naming an error, else the last one."""
        telling = [line for line in self.app_said if ERROR_WORDS.search(line)]
        return (telling or list(self.app_said) or [""])[-1]


def probe(port: int, path: str, log: Path) -> ProbeResult:
    """GET path; on a failure, the app's log lines written meanwhile."""
    start = log_size(log)
    answer = health.check(f"http://127.0.0.1:{port}{path}", timeout=10)
    if answer.ok:
        return ProbeResult(path, True, answer.describe(), answer.status or 0)
    time.sleep(LOG_SETTLE)
    return ProbeResult(path, False, answer.describe(), answer.status or 0, around(log_since(log, start), path))


def around(lines: list[str], path: str, keep: int = 12) -> tuple[str, ...]:
    """What the app logged for one request: from its first error line (a traceback's start) to the access
    log line of the request, what followed it left out; a long traceback keeps its head and its tail."""
    access = re.compile(r'"GET ' + re.escape(path) + r'[ ?"]')
    end = next((i + 1 for i, line in enumerate(lines) if access.search(line)), len(lines))
    start = next((i for i, line in enumerate(lines[:end]) if ERROR_WORDS.search(line)), max(0, end - keep))
    shown = lines[start:end]
    if len(shown) > keep:
        shown = shown[:3] + ["..."] + shown[-(keep - 4):]
    return tuple(shown)
