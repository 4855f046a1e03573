"""Alerts ([alerts]): the JSON event of the contract, to a webhook (a POST) and/or a command's stdin.

An alert never holds up the operation it reports or changes its exit code: each channel is bounded
(the webhook: a 3 s connect and 5 s read timeout, and 8 s in all per attempt even for a server
that drips its answer (health.within); one retry after a refused connection, never after a
timeout; the command: 10 s), and a failure to deliver comes back as a line to print, not a raise.
The repository password, or any secret, is never part of an event: events carry the tool's own
messages, which never contain it.
"""

import json
import socket
import subprocess
import time

import requests

from . import health
from .state import now_iso

CONNECT_TIMEOUT = 3.0
READ_TIMEOUT = 5.0
COMMAND_TIMEOUT = 10.0
RETRY_PAUSE = 1.0
EVENTS = ("backup-failed", "deploy-failed", "rollback-failed", "needs-human", "offsite-failed", "offsite-stale",
          "verify-failed", "test")


def event(name, env, message, command=None):
    return {"event": name, "env": env, "time": now_iso(), "host": socket.gethostname(),
            "message": " ".join(message.split()), "command": command}


def send(alerts, body):
    """Deliver body on every configured channel; return the problems (empty: delivered)."""
    if alerts is None:
        return []
    problems = []
    data = json.dumps(body)
    if alerts.webhook:
        problems += post(alerts.webhook, data)
    if alerts.command:
        problems += run_command(alerts.command, data)
    return problems


def post(url, data):
    for attempt in (1, 2):
        done, outcome = health.within(CONNECT_TIMEOUT + READ_TIMEOUT,
                                      lambda session: post_once(session, url, data, attempt == 1))
        if not done:
            return [f"the alert webhook {url} did not answer in time (no complete answer within "
                    f"{CONNECT_TIMEOUT + READ_TIMEOUT:g}s)"]
        retry, problems = outcome
        if not retry:
            return problems
        time.sleep(RETRY_PAUSE)
    return []


def post_once(session, url, data, may_retry):
    """(retry?, problems): [] when delivered. A refused connection is worth one retry (the server may
    be restarting); a timeout is not."""
    try:
        response = session.post(url, data=data, headers={"Content-Type": "application/json"},
                                timeout=(CONNECT_TIMEOUT, READ_TIMEOUT))
    except requests.ConnectionError as exc:
        if may_retry and not isinstance(exc, requests.Timeout):
            return True, []
        return False, [f"the alert webhook {url} could not be reached ({type(exc).__name__})"]
    except requests.RequestException as exc:
        return False, [f"the alert webhook {url} did not answer in time ({type(exc).__name__})"]
    if 200 <= response.status_code < 300:
        return False, []
    return False, [f"the alert webhook {url} answered HTTP {response.status_code}"]


def run_command(argv, data):
    try:
        proc = subprocess.run(argv, input=data, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [f"the alert command {argv[0]} failed: {type(exc).__name__}"]
    if proc.returncode != 0:
        return [f"the alert command {argv[0]} exited {proc.returncode}"]
    return []
