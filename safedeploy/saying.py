"""notify: an alert for an event, from a flow of the package that runs long (backup.py's backups, prunes,
checks), its delivery problems said as warnings through the flow's Output (safedeploy.output): the package
never prints by itself."""

from __future__ import annotations

from . import alerts, oplog
from .output import Output


def notify(config, out: Output, name: str, env: str | None, message: str, command: str | None = None) -> None:
    """An alert for an event, when [alerts] is set; a delivery problem is said, never raised. It carries
    the env's log of this run, when one is open."""
    log = oplog.current(env) if env else None
    for problem in alerts.send(config.alerts, alerts.event(name, env, message, command,
                                                           log=log.path if log else None)):
        out.err(f"warning: {problem}")
