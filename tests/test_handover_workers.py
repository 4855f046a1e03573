"""A handover stops the old slot only once the new one's workers are booted (gunicorn says READY=1 before it
forks them): the decision, and the children of a real process."""

import os
import subprocess
import time

from safedeploy import processes


def test_a_handover_waits_for_every_worker_seen_idle():
    seen: set[int] = set()
    assert processes.workers_booted(0, {}, seen)                           # no workers: ready when it says so
    assert not processes.workers_booted(2, {}, seen)                       # READY=1 came before the fork
    assert not processes.workers_booted(2, {10: "S"}, seen)                # one of two
    assert not processes.workers_booted(2, {10: "S", 11: "R"}, seen)       # the second still booting
    assert processes.workers_booted(2, {10: "R", 11: "S"}, seen)           # each seen idle once: busy now is fine


def test_children_of_a_real_process():
    child = subprocess.Popen(["sleep", "5"])
    try:
        deadline = time.monotonic() + 5
        while processes.children_of(os.getpid()).get(child.pid) != "S" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert processes.children_of(os.getpid()).get(child.pid) == "S"
    finally:
        child.kill()
        child.wait()
    assert processes.children_of(-1) == {}
