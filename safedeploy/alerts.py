"""Alerts ([alerts]): the JSON event of the contract, to a webhook (a POST) and/or a command's stdin.

An alert never holds up the operation it reports or changes its exit code: each channel is bounded
(the webhook: a 3 s connect and 5 s read timeout, one retry after a refused connection, never after
a timeout; the command: 10 s), and a failure to deliver comes back as a line to print, not a raise.
The repository password, or any secret, is never part of an event: events carry the tool's own
messages, which never contain it.
"""

import json
import socket
import subprocess
import time

import requests

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
        try:
            response = requests.post(url, data=data, headers={"Content-Type": "application/json"},
                                     timeout=(CONNECT_TIMEOUT, READ_TIMEOUT))
        except requests.ConnectionError as exc:
            if attempt == 1 and not isinstance(exc, requests.Timeout):     # refused: the server may be restarting
                time.sleep(RETRY_PAUSE)
                continue
            return [f"the alert webhook {url} could not be reached ({type(exc).__name__})"]
        except requests.RequestException as exc:
            return [f"the alert webhook {url} did not answer in time ({type(exc).__name__})"]
        if 200 <= response.status_code < 300:
            return []
        return [f"the alert webhook {url} answered HTTP {response.status_code}"]
    return []


def run_command(argv, data):
    try:
        proc = subprocess.run(argv, input=data, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [f"the alert command {argv[0]} failed: {type(exc).__name__}"]
    if proc.returncode != 0:
        return [f"the alert command {argv[0]} exited {proc.returncode}"]
    return []
