#!/usr/bin/env python3
"""Benchmark: the test suite (the README's `make test` command: .venv's pytest with its configured workers), run N
times in a row while `stress-ng --cpu 1` keeps one core busy beside it (issue 32's bar: at most 6 min on
this 2-core machine, 0 failures in 5 consecutive runs under a hog). Prints per run: wall seconds, the CPU
seconds of pytest and everything it started (children's user+sys, the apps in the tests' user managers
included: they are its descendants; not the hog), passed/failed/errors, the load average before and
after; then the totals. The hog is started before each run and killed after it; a run's failures are listed by test id.

With --cpu-top N, each run also prints the N tests that took the most CPU (set-up and teardown, the scripts
they ran and their user managers' apps included: tests/conftest.py's pytest_runtest_protocol) and the sum
over all tests; --cpu-file F keeps every test's line (CPU s, wall s, the CPU's parts: the worker, the scripts it reaped, the
user managers, the preloaded server; test id; the last run's) in F, to compare two runs.

    python3 bench/suite_under_hog.py [--runs 5] [--no-hog] [--tail N] [--cpu-top N] [--cpu-file F] [-- PYTEST-ARGS...]
"""

import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUMMARY = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed)")


def children_cpu():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def start_hog():
    if not shutil.which("stress-ng"):
        raise SystemExit("stress-ng is not installed (.ci/system-packages installs it)")
    return subprocess.Popen(["stress-ng", "--cpu", "1", "--quiet", "--timeout", "3600"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_hog(hog):
    if hog is None:
        return
    hog.terminate()
    try:
        hog.wait(timeout=30)
    except subprocess.TimeoutExpired:
        hog.kill()
        hog.wait(timeout=30)


def one_run(number, hog_on, pytest_args, tail=0, cpu_top=0, cpu_file=None):
    with tempfile.TemporaryDirectory(prefix="suite-cpu-") as folder:
        per_test = Path(folder) / "tests.txt"
        env = {**os.environ, "SAFEDEPLOY_TEST_CPU": str(per_test)} if cpu_top or cpu_file else None
        hog = start_hog() if hog_on else None
        try:
            proc, wall, cpu, load_before = run_suite(pytest_args, env)
        finally:
            stop_hog(hog)
        report(number, proc, wall, cpu, load_before, tail)
        if cpu_top:
            print_cpu_top(per_test, cpu_top)
        if cpu_file:        # the last run's lines, none if it wrote none: never an earlier run's
            Path(cpu_file).write_text(per_test.read_text() if per_test.exists() else "")
    return wall, proc.returncode == 0


def run_suite(pytest_args, env):
    """The suite, as `make test` runs it (.venv's python; this one where there is no .venv)."""
    python = ROOT / ".venv" / "bin" / "python"
    load_before = os.getloadavg()[0]
    cpu_before = children_cpu()
    start = time.monotonic()
    proc = subprocess.run([str(python) if python.exists() else sys.executable, "-m", "pytest", "-q", "-p",
                           "no:cacheprovider", *pytest_args],
                          cwd=ROOT, capture_output=True, text=True, timeout=3600, env=env)
    wall = time.monotonic() - start
    cpu = children_cpu() - cpu_before       # pytest and its descendants; the hog is not reaped yet: not counted
    return proc, wall, cpu, load_before


def report(number, proc, wall, cpu, load_before, tail):
    counts = {kind.rstrip("s"): int(n) for n, kind in SUMMARY.findall(proc.stdout.strip().splitlines()[-1])} \
        if proc.stdout.strip() else {}
    failed = [line.split(" ", 2)[1] for line in proc.stdout.splitlines()
              if line.startswith(("FAILED ", "ERROR "))]
    print(f"run {number}: {wall:6.1f} s wall, {cpu:7.1f} s CPU (pytest and descendants), "
          f"passed {counts.get('passed', 0)}, failed {counts.get('failed', 0)}, errors {counts.get('error', 0)}, "
          f"load {load_before:.1f} -> {os.getloadavg()[0]:.1f}, exit {proc.returncode}", flush=True)
    for test in failed:
        print(f"    {test}", flush=True)
    if tail:
        print("\n".join(proc.stdout.splitlines()[-tail:]), flush=True)
    if proc.returncode not in (0, 1):
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n", flush=True)


PARTS = ("the workers", "the scripts they ran", "the user managers", "the preloaded servers")


def print_cpu_top(per_test, top):
    rows = []
    for line in per_test.read_text().splitlines() if per_test.exists() else []:
        cpu, wall, *parts, test = line.split(" ", 2 + len(PARTS))
        rows.append((float(cpu), float(wall), [float(part) for part in parts], test))
    rows.sort(reverse=True)
    sums = ", ".join(f"{name} {sum(r[2][i] for r in rows):.1f}" for i, name in enumerate(PARTS))
    print(f"    CPU of {len(rows)} tests: {sum(r[0] for r in rows):.1f} s ({sums}); "
          f"the {top} that took most (CPU s, wall s):")
    for cpu, wall, _, test in rows[:top]:
        print(f"    {cpu:7.1f} {wall:7.1f}  {test}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-hog", action="store_true", help="without stress-ng beside it")
    parser.add_argument("--tail", type=int, default=0, help="print the last N lines of each run's pytest output")
    parser.add_argument("--cpu-top", type=int, default=0, help="print the N tests that took the most CPU")
    parser.add_argument("--cpu-file", help="keep each test's CPU line (the last run's) in this file")
    parser.add_argument("pytest_args", nargs="*", help="after --: passed to pytest")
    args = parser.parse_args()
    walls, green = [], 0
    for number in range(1, args.runs + 1):
        wall, ok = one_run(number, not args.no_hog, args.pytest_args, args.tail, args.cpu_top, args.cpu_file)
        walls.append(wall)
        green += ok
    print(f"{green} of {args.runs} runs green; wall min {min(walls):.1f} s, max {max(walls):.1f} s "
          f"(bar: 360 s, 0 failures){'' if args.no_hog else ', beside stress-ng --cpu 1'}")
    return 0 if green == args.runs else 1


if __name__ == "__main__":
    sys.exit(main())
