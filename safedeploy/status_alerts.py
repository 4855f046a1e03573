"""status.py --alert: one alert per change of an env's state, kept per env (state/ENV.status.json).

"problem" when an env turns not OK (its command: the first advice), "recovered" when it is OK again,
"database-corrupt" at once when its database turns damaged; and replica-behind, once, when an env's
replica turns not OK (safedeploy.replica.alert_change). A run that finds what the last one found sends nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import alerts, replica
from .files import make_private_dir, write_atomic
from .state import now_iso


def is_corrupt(report: dict) -> bool:
    return report.get("database", {}).get("check", "ok") != "ok"


def last_seen(path: Path) -> tuple[bool | None, bool]:
    """What the last run found: (ok, corrupt); (None, False) when never looked."""
    try:
        last = json.loads(path.read_text())
        return last.get("ok"), last.get("corrupt", False)
    except (OSError, ValueError, AttributeError):
        return None, False          # never looked: a problem now is news, an OK is not


def as_news(report: dict, was: bool | None, was_corrupt: bool) -> bool | None:
    """A database that turned damaged is news at once, whatever else was already said: the data is at stake."""
    if is_corrupt(report) and not was_corrupt:
        return None if was is False else was
    return was


def change_event(name: str, report: dict, was: bool | None, was_corrupt: bool) -> dict | None:
    """The alert for env name's report given what the last run found (after as_news), or None when nothing changed."""
    corrupt = is_corrupt(report)
    if (report["ok"] == was and corrupt == was_corrupt) or (report["ok"] and was is None):
        return None
    if report["ok"]:
        return alerts.event("recovered", name, f"{name} is OK again", None)
    first = report["advice"][0]["command"] if report["advice"] else None
    op = report.get("last_operation") or {}
    failed_log = op.get("log") if op.get("result") in ("failed", "interrupted") else None
    return alerts.event("database-corrupt" if corrupt and not was_corrupt else "problem", name,
                        "; ".join(report["problems"]), first, log=failed_log)


def send_changes(config, envs, reports: dict[str, dict]) -> list[str]:
    """Send one alert per change (reports: status's JSON per env); the delivery problems, to be said."""
    said: list[str] = []
    for env in envs:
        r, path = reports[env.name], env.state_dir / f"{env.name}.status.json"
        was, was_corrupt = last_seen(path)
        was = as_news(r, was, was_corrupt)
        event = change_event(env.name, r, was, was_corrupt)
        if event is None:
            if was is None:
                remember(path, r)
            continue
        problems = alerts.send(config.alerts, event)
        said += problems
        if not problems:
            remember(path, r)               # not delivered: the next run tries again
    for env in envs:                        # and replica-behind, once, when an env's replica turns not OK
        said += replica.alert_change(config, env, reports[env.name].get("replica"),
                                     lambda body: alerts.send(config.alerts, body), alerts.event)
    return said


def remember(path: Path, report: dict) -> None:
    make_private_dir(path.parent)
    write_atomic(path, json.dumps({"ok": report["ok"], "time": now_iso(), "problems": report["problems"],
                                   "corrupt": is_corrupt(report)}) + "\n")
