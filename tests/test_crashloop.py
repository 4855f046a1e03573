"""A release that crash-loops, rolled back again and again on a busy host: never a false exit 4.

The race seen under load: the rollback of a crash-looping release ended in exit 4 ("t65-dev.service is
active (running, 1 automatic restart(s)): something else answers on the port") while the release it
rolled back to served. systemd carries NRestarts over when a start meets the failed release's pending
automatic restart (a stop queued with --no-block that the start replaced), and health refused every
answer of the unit's own process for it. Now the quick stop is over before the start, restarts count
from the tool's own start, and a restart counts against an answer only where /proc cannot show the
unit's own process holding the port (safedeploy.decisions.answer_problem, tests/test_probe.py).
One sandbox, 20 rounds, under a CPU hog (stress-ng, killed at the end); each round measured by the probe.
"""

import shutil
import subprocess
import time

import pytest
import requests

from helpers import log_records

ROUNDS = 20


@pytest.fixture
def cpu_hog():
    """stress-ng keeping one CPU busy for the test; killed (by its pid) at the end."""
    if not shutil.which("stress-ng"):
        pytest.fail("stress-ng is not installed: this test needs a busy host")
    hog = subprocess.Popen(["stress-ng", "--cpu", "1", "--quiet", "--timeout", "600"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        yield hog
    finally:
        hog.kill()
        hog.wait(timeout=30)


def version(sb, env):
    return requests.get(sb.url(env, "/"), timeout=5).json()["version"]


def test_a_crash_looping_release_rolled_back_20_times_under_load_never_exits_4(sandbox, cpu_hog):
    sb = sandbox
    sb.release("dev", {"VERSION": "2\n"}, "v2")
    proc = sb.run("deploy.py", "dev")
    assert proc.returncode == 0, proc.stderr
    good = sb.head("dev")
    sb.release("dev", {"MODE": "crash\n", "VERSION": "3\n"}, "v3 crash-loops")
    codes, start = [], time.monotonic()
    for i in range(ROUNDS):
        # the first round marks v3 bad; the next ones deploy it again past the mark
        args = ("--force", "--reason", f"round {i}") if i else ()
        proc = sb.run("deploy.py", "dev", *args)
        codes.append(proc.returncode)
        assert proc.returncode == 1, f"round {i}: exit {proc.returncode}\n{proc.stderr}"
        assert "rolled back by itself" in proc.stderr, proc.stderr
        assert sb.head("dev") == good and version(sb, "dev") == "2"
        record = log_records(sb, "dev")[-1]
        assert record["rollback"]["probe"]["requests"] > 0, record     # the rollback measured its own switch
    rounds = [r for r in log_records(sb, "dev") if r["kind"] == "deploy" and r.get("rollback")]
    assert len(rounds) == ROUNDS and all(r["result"] == "rolled-back" and r["rollback"]["result"] == "ok" for r in rounds)
    refused = [(r["probe"]["refused"], r["rollback"]["probe"]["refused"]) for r in rounds]
    slowest_rollback = max(sum(r["rollback"]["steps"].values()) for r in rounds)
    print(f"{ROUNDS} rounds in {time.monotonic() - start:.1f}s, exit codes {sorted(set(codes))}; refused (deploy, "
          f"rollback) {sum(a for a, _ in refused)}, {sum(b for _, b in refused)}; deploy health "
          f"{max(r['steps']['health'] for r in rounds):.2f}s at most, rollback {slowest_rollback:.2f}s at most")
