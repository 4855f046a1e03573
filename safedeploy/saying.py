"""How a flow of the package that runs long (backup.py's backups, prunes, checks) tells the operator as it
goes: the script makes one Saying from its own printing (safedeploy.cli) and passes it in; the package
never prints by itself. notify: an alert for an event, its delivery problems said as warnings."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import alerts, oplog


def no_log(env: str | None = None) -> str:
    return ""


def plain_mark(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


@dataclass
class Saying:
    say: Callable[[str], None]                       # a line on stdout
    err: Callable[[str], None]                       # a line on stderr ("error: ..." / "warning: ...")
    mark: Callable[[bool], str] = plain_mark         # PASS / FAIL, painted on a terminal
    full_output: Callable[[str | None], str] = no_log    # "(full output: PATH)" of env's log of this run, or ""


def notify(config, out: Saying, name: str, env: str | None, message: str, command: str | None = None) -> None:
    """An alert for an event, when [alerts] is set; a delivery problem is said, never raised. It carries
    the env's log of this run, when one is open."""
    log = oplog.current(env) if env else None
    for problem in alerts.send(config.alerts, alerts.event(name, env, message, command,
                                                           log=log.path if log else None)):
        out.err(f"warning: {problem}")
