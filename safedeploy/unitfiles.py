"""Unit files as text: the names of an env's units (service, socket, handover slot, port holder), where the
user's unit files live, and the texts the tool writes (the socket unit, the handover slot, the service changed to
take its socket, the port holder). Pure: nothing here runs systemctl or writes a file (safedeploy/units does
both); the same arguments (and XDG_CONFIG_HOME) give the same text."""

import os
import shlex
from pathlib import Path


# -- names ----------------------------------------------------------------------------------------
def socket_name(unit: str) -> str:
    return unit.removesuffix(".service") + ".socket"


def helper_name(unit: str) -> str:
    """The second slot of a handover env: the same program on the same socket."""
    return unit.removesuffix(".service") + "-handover.service"


def holder_name(unit: str) -> str:
    """The unit a socket activates instead of the service while the port moves or the app is held
    (see units.move_port_to_socket and units.hold)."""
    return unit.removesuffix(".service") + "-port-holder.service"


# -- where and how unit files are written ---------------------------------------------------------
def user_unit_dir() -> Path:
    """Where systemd --user reads the user's own unit files."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "systemd" / "user"


def holds_environment(text: object) -> bool:
    """Whether a unit file's text sets variables itself (Environment=): their values may be secrets."""
    return any(line.strip().startswith("Environment=") and line.split("=", 1)[1].strip()
               for line in str(text).splitlines())


def unit_file_mode(text: object, mode: int) -> int:
    """The mode a unit file is written with: 0600 when it holds Environment= values (whatever it had: a
    0644 unit with a secret in it is not copied as such), else mode (never group- or world-writable)."""
    return 0o600 if holds_environment(text) else mode & 0o755


def exec_line(argv: list[str]) -> str:
    """argv as an ExecStart= line: quoted, and systemd's own % specifiers and $ variables escaped."""
    return shlex.join(argv).replace("%", "%%").replace("$", "$$")


# -- texts ----------------------------------------------------------------------------------------
METHOD_NOTES = {
    "handover": "{unit} and {helper} take turns on {socket}: a deploy starts the idle one and stops the other "
                "once it is ready, so no request waits and the release starts once",
    "socket": "{socket} holds the port: requests wait while {unit} restarts, none is refused "
              "(a server that signals readiness gets a handover helper too: {command})",
}

DROPS_WARNING = ("a restart closes the port until the new process listens, so requests are refused "
                 "meanwhile: hold the port with a socket unit ({command})")


HOLDER_SLEEP = "/bin/sleep infinity"


def port_holder_files(unit: str, exec_start: str | None = None, why: str | None = None) -> dict[Path, str]:
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
            f"[Service]\nExecStart={exec_start or HOLDER_SLEEP}\n"}


def holder_sleeps(text: str) -> bool:
    """Whether a holder unit's text (port_holder_files) only sleeps: it accepts no connection, so the app may
    start on the socket beside it (a 503 listener, safedeploy/maintenance.py, would answer beside the app)."""
    return [line.split("=", 1)[1].strip() for line in text.splitlines()
            if line.strip().startswith("ExecStart=")] == [HOLDER_SLEEP]


def names_socket(texts: list[str], unit: str) -> bool:
    """Whether a service's unit file and drop-ins (texts, in the order systemd reads them) name its socket in
    Sockets=: systemd then passes it the socket's listening fds whichever unit the socket activates (the holder
    too). An empty Sockets= resets the list, as in systemd."""
    named = False
    for text in texts:
        for line in text.splitlines():
            stripped = line.strip()
            if stripped.startswith("Sockets="):
                value = stripped.split("=", 1)[1].split()
                named = socket_name(unit) in value or (named and bool(value))
    return named


def render_socket(unit: str, port: int) -> str:
    return (f"[Unit]\nDescription=listening socket of {unit} (written by safe-deploy)\n\n"
            f"[Socket]\n# holds the port across restarts of {unit}: requests wait here, none is refused\n"
            f"ListenStream=127.0.0.1:{port}\nBacklog=4096\n\n[Install]\nWantedBy=sockets.target\n")


def render_helper(service_text: str, unit: str) -> str:
    """The handover slot: the same program as the service, on the service's socket, never enabled.
    A deploy starts it beside the serving service and stops the service (or the other way round)."""
    lines: list[str] = []
    section = None
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


class UnitText:
    """A unit file's lines by section, in the order they came (lines before any section header count as
    [Unit]'s), changed in place and written back with one blank line after each section."""

    def __init__(self, text: str) -> None:
        self.order: list[str] = []
        self.sections: dict[str, list[str]] = {}
        current = None
        for line in text.splitlines():
            stripped = line.strip()
            if stripped.startswith("[") and stripped.endswith("]"):
                current = self.start(stripped)
                continue
            if current is None:
                current = self.start("[Unit]")
            self.sections[current].append(line)

    def start(self, section: str) -> str:
        self.order.append(section)
        self.sections[section] = []
        return section

    def has(self, section: str, key: str) -> bool:
        return any(line.strip().startswith(f"{key}=") for line in self.sections.get(section, []))

    def append(self, lines: list[str], key: str, value: str) -> None:
        while lines and not lines[-1].strip():
            lines.pop()
        lines.append(f"{key}={value}")

    def set(self, section: str, key: str, value: str) -> None:
        """key=value in section: the first line setting key replaced, else a line added at its end."""
        lines = self.sections.setdefault(section, [])
        if section not in self.order:
            self.order.append(section)
        for i, line in enumerate(lines):
            if line.strip().startswith(f"{key}="):
                lines[i] = f"{key}={value}"
                return
        self.append(lines, key, value)

    def depend(self, key: str, value: str) -> None:
        """Requires= and After= add up over lines in systemd: the unit's own stay as they are (its
        database, its network) and value gets a line of its own, unless a line names it already."""
        lines = self.sections.setdefault("[Unit]", [])
        if "[Unit]" not in self.order:
            self.order.insert(0, "[Unit]")
        if any(line.strip().startswith(f"{key}=") and value in line.split("=", 1)[1].split() for line in lines):
            return
        self.append(lines, key, value)

    def text(self) -> str:
        out: list[str] = []
        for section in self.order:
            out.append(section)
            out.extend(self.sections[section])
            if out[-1].strip():
                out.append("")
        return "\n".join(out).rstrip("\n") + "\n"


def render_socket_service(text: str, unit: str, notify: bool) -> str:
    """The service unit `text`, changed to take its socket from systemd: Requires/After the
    socket (added beside the unit's own Requires=/After=, which stay), Type=notify (readiness)
    when the server can tell it, a graceful stop."""
    sock = socket_name(unit)
    unit_text = UnitText(text)
    unit_text.depend("Requires", sock)
    unit_text.depend("After", sock)
    unit_text.set("[Service]", "Sockets", sock)     # its fds whichever unit the socket activates (see holder_name)
    if notify:
        unit_text.set("[Service]", "Type", "notify")
        unit_text.set("[Service]", "NotifyAccess", "main")
    unit_text.set("[Service]", "KillMode", "mixed")
    if not unit_text.has("[Service]", "TimeoutStopSec"):
        unit_text.set("[Service]", "TimeoutStopSec", "30")
    if not unit_text.has("[Service]", "RestartSec"):
        # time for a deploy to see a crashing release before systemd's start limit, hit by quick
        # restarts, fails the service and closes the socket with it
        unit_text.set("[Service]", "RestartSec", "2")
    return unit_text.text()
