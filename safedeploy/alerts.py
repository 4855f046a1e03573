"""Alerts ([alerts]): the JSON event of the contract, to a webhook (a POST) and/or a command's stdin.

An alert never holds up the operation it reports or changes its exit code: each channel is bounded
(the webhook: a 3 s connect and 5 s read timeout, and 8 s in all per attempt even for a server
that drips its answer (health.within); one retry after a refused connection, never after a
timeout; the command: 10 s, its process group killed past that), and a failure to deliver comes
back as a line to print, not a raise.

The event goes to the webhook's URL and nowhere else: a redirect is never followed (a 307 would
re-post the event, message and host name, to whatever host the answer names); a 3xx answer is a
failed delivery. The command's stdout is discarded and only a short tail of its stderr is kept
(a command that writes without end costs no memory). Secrets never leave in an event or a
problem line: the tool's messages never hold the repository password, and a user:password@ in
any URL in them (a repository's, the webhook's own) is masked as user:***@ (config.mask).
"""

import json
import socket
import time


from . import commands, health, oplog
from .config import mask
from .redaction import redact
from .state import now_iso

CONNECT_TIMEOUT = 3.0
READ_TIMEOUT = 5.0
COMMAND_TIMEOUT = 10.0
STDERR_TAIL = 400           # bytes of the command's stderr kept to say why it failed
RETRY_PAUSE = 1.0


def event(name, env, message, command=None, log=None):
    """The contract's body; with log (the operation's full output, safedeploy.oplog): "log", its path, and
    "log_tail", its last lines (redacted when written)."""
    body = {"event": name, "env": env, "time": now_iso(), "host": socket.gethostname(),
            "message": redact(" ".join(message.split())), "command": redact(command) if command else command}
    if log is not None:
        body["log"] = str(log)
        body["log_tail"] = [redact(line) for line in oplog.tail(log)]
    return body


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
    return [mask(p) for p in problems]


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
    import requests       # here, not at the top: see health.py
    try:
        response = session.post(url, data=data, headers={"Content-Type": "application/json"},
                                timeout=(CONNECT_TIMEOUT, READ_TIMEOUT), allow_redirects=False)
    except requests.ConnectionError as exc:
        if may_retry and not isinstance(exc, requests.Timeout):
            return True, []
        return False, [f"the alert webhook {url} could not be reached ({type(exc).__name__})"]
    except requests.RequestException as exc:
        return False, [f"the alert webhook {url} did not answer in time ({type(exc).__name__})"]
    if 200 <= response.status_code < 300:
        return False, []
    if 300 <= response.status_code < 400:
        return False, [f"the alert webhook {url} answered {response.status_code}; redirects are not followed"]
    return False, [f"the alert webhook {url} answered HTTP {response.status_code}"]


def run_command(argv, data):
    """The event on the command's stdin; its stdout discarded, the tail of its stderr kept."""
    try:
        done = commands.run(argv, COMMAND_TIMEOUT, stdin=data.encode(), stdout="discard", stderr="tail",
                            tail=STDERR_TAIL)
    except OSError as exc:
        return [f"the alert command {argv[0]} failed: {type(exc).__name__}"]
    if done.timed_out:
        return [f"the alert command {argv[0]} did not finish within {COMMAND_TIMEOUT:g}s (stopped)"]
    if done.returncode != 0:
        said = " ".join(commands.tail_text(done.stderr, STDERR_TAIL).split())
        return [f"the alert command {argv[0]} exited {done.returncode}" + (f": {said}" if said else "")]
    return []
