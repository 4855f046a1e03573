"""What a switch costs users, measured by the operation itself: while it switches (from just before
the app stops or hands over until health is confirmed and, when configured, through the watch), a
thread GETs the env's health URL a few times a second, each with a short timeout, and tallies:
requests made, refused (connection refused or reset: the port closed, or the process went away
mid-answer), errors (5xx, or no answer within the timeout), and the longest wait.

The probe's requests are GETs of the health URL (what a monitor sends anyway), marked with their own
User-Agent and an X-Safe-Deploy-Probe header, so an app's access log can tell them from users'. One
request at a time: never more than a few a second, whatever the app does. The thread is a daemon
and stop() is bounded: a request in flight when it stops is waited for a second at most, and a probe
never holds an operation up or outlives the process.

The deploy records it as "probe": {"requests": N, "refused": N, "errors": N, "slowest_s": 0.4}
(DeployRecord and RollbackRecord), and deploy.py, rollback.py and status.py show it.
"""

import errno
import signal
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass

INTERVAL = 0.25         # seconds from one request's start to the next (4 a second at most)
TIMEOUT = 2.0           # seconds a request may take before it counts as an error
STOP_WAIT = 1.0         # seconds stop() waits for a request in flight (it then ends on its own, uncounted)
USER_AGENT = "safe-deploy probe"
# http.client (with ssl and email) is imported by the first request: 20 ms of a script's start that only the
# runs which switch an env need (see health.py)
REFUSED_ERRNOS = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE}


@dataclass(frozen=True)
class Outcome:
    """One request: "ok", "refused" or "error", and the seconds it took (to its answer or its failure)."""
    kind: str
    seconds: float


def classify(status: int | None, error: BaseException | None) -> str:
    """A request's kind: "refused" when the connection was refused or reset (before or during the answer),
    "error" when it timed out or the answer was a 5xx (or anything else went wrong), else "ok"."""
    import http.client
    if error is not None:
        if isinstance(error, (ConnectionRefusedError, ConnectionResetError, ConnectionAbortedError, BrokenPipeError,
                              http.client.RemoteDisconnected)):
            return "refused"
        if isinstance(error, OSError) and error.errno in REFUSED_ERRNOS:
            return "refused"
        return "error"
    if status is None or status >= 500:
        return "error"
    return "ok"


def tally(outcomes: list[Outcome]) -> dict:
    """The record's "probe": requests, refused, errors, and the longest wait (seconds, 3 decimals)."""
    return {"requests": len(outcomes),
            "refused": sum(1 for o in outcomes if o.kind == "refused"),
            "errors": sum(1 for o in outcomes if o.kind == "error"),
            "slowest_s": round(max((o.seconds for o in outcomes), default=0.0), 3)}


def describe(probe: dict | None) -> str:
    """The summary line's text: "12 requests to the health URL while it switched: none refused, no errors,
    the slowest 0.41 s"."""
    if not probe:
        return "not measured"
    requests, refused, errors = probe.get("requests", 0), probe.get("refused", 0), probe.get("errors", 0)
    return (f"{plural(requests, 'request')} to the health URL while it switched: {refused or 'none'} refused, "
            f"{plural(errors, 'error') if errors else 'no errors'}, the slowest {probe.get('slowest_s', 0):.2f} s")


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def request_once(url: str, timeout: float) -> Outcome:
    """One GET of url: its Outcome. Never raises."""
    import http.client
    parts = urllib.parse.urlsplit(url)
    start = time.monotonic()
    status, error = None, None
    connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = connection_class(parts.hostname or "127.0.0.1", parts.port, timeout=timeout)
    try:
        conn.request("GET", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
                     headers={"User-Agent": USER_AGENT, "X-Safe-Deploy-Probe": "1", "Connection": "close"})
        response = conn.getresponse()
        status = response.status
        response.read(64 * 1024)
    except (OSError, http.client.HTTPException, socket.timeout) as exc:
        error = exc
    finally:
        conn.close()
    return Outcome(classify(status, error), time.monotonic() - start)


class Probe:
    """The measuring thread. start() is idempotent; stop() returns the tally (and may be called again:
    the same tally). Use as a context manager, or call stop() on every path out."""

    def __init__(self, url: str, interval: float = INTERVAL, timeout: float = TIMEOUT):
        self.url, self.interval, self.timeout = url, interval, timeout
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._tally: dict | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and not self._stop.is_set()

    def start(self) -> "Probe":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="safe-deploy-probe", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        # the signals an operator sends are the main thread's: delivered here, they would slip past a block that
        # the main thread defers them in (runner.signals_deferred, while a record is written)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
        while not self._stop.is_set():
            began = time.monotonic()
            outcome = request_once(self.url, self.timeout)
            with self._lock:
                self.outcomes.append(outcome)
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - began)))

    def stop(self) -> dict:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(STOP_WAIT)        # a request in flight counts if it ends by then
        with self._lock:
            if self._tally is None:
                self._tally = tally(self.outcomes)
            return self._tally

    def __enter__(self) -> "Probe":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
