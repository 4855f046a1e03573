"""HTTP health checks with requests: every call has a timeout."""

import json
import threading
import time
from dataclasses import dataclass

# requests (and urllib3) are imported where an HTTP call is made: they cost a script 65 ms of its start,
# and most runs of most scripts (a backup, a config error, --help) make none


@dataclass
class Health:
    """One HTTP GET's outcome: its status, how long it took, the error, the body."""
    ok: bool
    status: int | None
    ms: float | None
    error: str = ""
    body: bytes = b""

    def describe(self):
        if self.status is not None and self.error:
            return f"HTTP {self.status} in {self.ms:.0f} ms, but {self.error}"
        if self.status is not None:
            return f"HTTP {self.status} in {self.ms:.0f} ms"
        return self.error


MAX_BODY = 64 * 1024        # a health answer is small; more is read no further


def check(url, timeout=5.0, verify=True):
    """One GET; 2xx and 3xx count as healthy. Never raises for network trouble, and never takes
    longer than timeout (+0.5 s) in all (see within)."""
    done, result = within(timeout + 0.5, lambda session: _check(session, url, timeout, verify))
    return result if done else Health(False, None, None, f"no complete answer within {timeout:g}s")


def within(seconds, call):
    """call(session) bounded in total time: requests' timeout bounds each read, so a server that
    drips a byte at a time would hold a plain call forever. call runs in a daemon thread with its
    own session; past the deadline that session is closed and the thread abandoned.
    Returns (True, what call returned) or (False, None)."""
    import requests
    box = {}
    session = requests.Session()
    worker = threading.Thread(target=lambda: box.update(value=call(session)), name="bounded-http", daemon=True)
    worker.start()
    worker.join(seconds)
    session.close()
    return ("value" in box and not worker.is_alive()), box.get("value")


def _check(session, url, timeout, verify):
    import requests
    from urllib3.exceptions import HTTPError as Urllib3Error
    start = time.monotonic()
    try:
        response = session.get(url, timeout=timeout, allow_redirects=False, verify=verify, stream=True,
                               headers={"User-Agent": "safe-deploy health check"})
        try:
            body = response.raw.read(MAX_BODY, decode_content=True) or b""
        finally:
            response.close()
    except requests.exceptions.SSLError as exc:
        return Health(False, None, None, f"TLS certificate problem: {short(exc)}")
    except requests.exceptions.Timeout:
        return Health(False, None, None, f"no answer within {timeout:g}s")
    except requests.exceptions.ConnectionError as exc:
        return Health(False, None, None, f"cannot connect: {short(exc)}")
    except (requests.exceptions.RequestException, OSError) as exc:
        return Health(False, None, None, short(exc))
    except Urllib3Error as exc:      # a body read that fails (ProtocolError, ReadTimeoutError)
        return Health(False, None, None, short(exc))
    ms = (time.monotonic() - start) * 1000
    return Health(200 <= response.status_code < 400, response.status_code, round(ms, 1), body=body)


def served_commit(base_url, timeout=2.0):
    """The commit the app says it runs (/_deploy/status, when it serves it), or None."""
    answer = check(base_url + "/_deploy/status", timeout=timeout)
    try:
        return json.loads(answer.body).get("commit") if answer.ok else None
    except (ValueError, AttributeError):
        return None


def short(exc):
    text = str(exc)
    for marker in ("Connection refused", "Name or service not known", "certificate verify failed",
                   "timed out", "Temporary failure in name resolution"):
        if marker in text:
            return marker
    return text.splitlines()[0][:160] if text else type(exc).__name__


ATTEMPT_TIMEOUT = 1.0


def wait_healthy(url, timeout, still_starting=lambda: True, interval=0.05, confirm=lambda result: ""):
    """Poll url until healthy or timeout seconds pass, or still_starting() says give up. An answer
    counts only when confirm(result) finds nothing wrong (it names the problem otherwise).

    Returns (Health of the last attempt, seconds waited)."""
    start = time.monotonic()
    deadline = start + timeout
    while True:
        remaining = deadline - time.monotonic()
        # short attempts: behind a socket unit a request to an app that crashed waits in the queue,
        # and the crash must be seen (still_starting) before systemd's start limit closes the socket
        result = check(url, timeout=max(0.5, min(ATTEMPT_TIMEOUT, remaining)))
        if result.ok:
            problem = confirm(result)
            if not problem:
                return result, time.monotonic() - start
            result = Health(False, result.status, result.ms, problem)
        if time.monotonic() >= deadline or not still_starting():
            return result, time.monotonic() - start
        time.sleep(interval)
