"""HTTP health checks with requests: every call has a timeout."""

import time
from dataclasses import dataclass

import requests


@dataclass
class Health:
    ok: bool
    status: int | None
    ms: float | None
    error: str = ""

    def describe(self):
        if self.status is not None:
            return f"HTTP {self.status} in {self.ms:.0f} ms"
        return self.error


def check(url, timeout=5.0, verify=True):
    """One GET; 2xx and 3xx count as healthy. Never raises for network trouble."""
    start = time.monotonic()
    try:
        response = requests.get(url, timeout=timeout, allow_redirects=False, verify=verify,
                                headers={"User-Agent": "safe-deploy health check"})
    except requests.exceptions.SSLError as exc:
        return Health(False, None, None, f"TLS certificate problem: {short(exc)}")
    except requests.exceptions.Timeout:
        return Health(False, None, None, f"no answer within {timeout:g}s")
    except requests.exceptions.ConnectionError as exc:
        return Health(False, None, None, f"cannot connect: {short(exc)}")
    except requests.exceptions.RequestException as exc:
        return Health(False, None, None, short(exc))
    ms = (time.monotonic() - start) * 1000
    response.close()
    return Health(200 <= response.status_code < 400, response.status_code, round(ms, 1))


def short(exc):
    text = str(exc)
    for marker in ("Connection refused", "Name or service not known", "certificate verify failed",
                   "timed out", "Temporary failure in name resolution"):
        if marker in text:
            return marker
    return text.splitlines()[0][:160] if text else type(exc).__name__


ATTEMPT_TIMEOUT = 1.0


def wait_healthy(url, timeout, still_starting=lambda: True, interval=0.05):
    """Poll url until healthy or timeout seconds pass, or still_starting() says give up.

    Returns (Health of the last attempt, seconds waited)."""
    start = time.monotonic()
    deadline = start + timeout
    while True:
        remaining = deadline - time.monotonic()
        # short attempts: behind a socket unit a request to an app that crashed waits in the queue,
        # and the crash must be seen (still_starting) before systemd's start limit closes the socket
        result = check(url, timeout=max(0.5, min(ATTEMPT_TIMEOUT, remaining)))
        if result.ok:
            return result, time.monotonic() - start
        if time.monotonic() >= deadline or not still_starting():
            return result, time.monotonic() - start
        time.sleep(interval)
