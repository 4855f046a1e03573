"""A steady load on an app: requests sent at a fixed rate from a pool of threads (a slow answer
does not slow the rate), each recorded with its send time, latency and outcome."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import requests


@dataclass
class Sample:
    sent: float
    latency: float
    ok: bool
    error: str = ""
    status: int = 0             # the HTTP status (0: no answer: refused, reset or timed out)
    retry_after: str = ""       # its Retry-After header, if any


class Load:
    def __init__(self, url, rate=200, timeout=30, workers=64):
        self.url, self.rate, self.timeout = url, rate, timeout
        self.samples = []
        self.lock = threading.Lock()
        self.halt = threading.Event()
        self.pool = ThreadPoolExecutor(max_workers=workers)
        self.thread = threading.Thread(target=self._schedule, daemon=True)

    def start(self):
        self.thread.start()
        return self

    def _schedule(self):
        interval, due = 1.0 / self.rate, time.monotonic()
        while not self.halt.is_set():
            self.pool.submit(self._one, time.monotonic())
            due += interval
            time.sleep(max(0.0, due - time.monotonic()))

    def _one(self, sent):
        try:
            r = requests.get(self.url, timeout=self.timeout)
            sample = Sample(sent, time.monotonic() - sent, r.status_code == 200, "" if r.ok else str(r.status_code),
                            r.status_code, r.headers.get("Retry-After", ""))
        except requests.RequestException as exc:
            sample = Sample(sent, time.monotonic() - sent, False, type(exc).__name__)
        with self.lock:
            self.samples.append(sample)

    def stop(self):
        self.halt.set()
        self.thread.join()
        self.pool.shutdown(wait=True)
        return sorted(self.samples, key=lambda s: s.sent)

    def between(self, start, end):
        return [s for s in self.samples if start <= s.sent <= end]


def shapes(samples):
    """What a migration test and bench count: answered 200, 503 (with Retry-After), other 5xx, no answer at
    all (refused, reset, timed out), and the slowest answer (s)."""
    return {"requests": len(samples), "ok": sum(s.status == 200 for s in samples),
            "503": sum(s.status == 503 for s in samples),
            "503 without Retry-After": sum(s.status == 503 and not s.retry_after for s in samples),
            "5xx": sum(500 <= s.status < 600 and s.status != 503 for s in samples),
            "failed": sum(s.status == 0 for s in samples),
            "slowest": max((s.latency for s in samples), default=0.0)}


def summary(samples):
    """failed, longest gap between successful answers (s), p50, p99, max latency (ms)."""
    if not samples:
        return {"requests": 0, "failed": 0, "gap": 0.0, "p50": 0.0, "p99": 0.0, "max": 0.0}
    lat = sorted(s.latency * 1000 for s in samples)
    done = sorted(s.sent + s.latency for s in samples if s.ok)
    gap = max((b - a for a, b in zip(done, done[1:])), default=0.0)
    return {"requests": len(samples), "failed": sum(not s.ok for s in samples), "gap": gap,
            "p50": lat[len(lat) // 2], "p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))], "max": lat[-1]}
