#!/usr/bin/env python3
"""Benchmark: requests dropped during a deploy, by restart method.

A client sends GET / at a steady rate (default 200/s) to the sample app, which takes about a
second to start (MODE "slow 1"), on a private user manager. For each method it measures a
steady state, then a deploy: failed requests, the longest gap between successful answers, and
latency p50/p99/max during the deploy against steady state.

Methods: "plain" (the unit binds the port itself: systemctl restart closes it), "socket" (the
units `deploy.py --install-units` writes: a .socket unit holds the port, requests wait in its
queue while the new process starts).

    python3 bench/downtime_bench.py [--rate 200] [--startup 1.0] [--rounds 2]
"""

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from demo.load import Load, summary  # noqa: E402
from demo.sandbox import Sandbox, UserManager  # noqa: E402


def measure(manager, root, method, args, n):
    sb = Sandbox(root / f"{method}{n}", manager, health_timeout=30, name=f"dt{method}{n}")
    sb.root.mkdir()
    sb.build()
    try:
        mode = f"slow {args.startup}\n"
        sb.release("dev", {"MODE": mode}, "slow start")
        assert sb.run("deploy.py", "dev").returncode == 0
        if method == "socket":
            proc = sb.run("deploy.py", "dev", "--install-units", "--yes", "--notify")
            assert proc.returncode == 0, proc.stderr
        sb.release("dev", {"MODE": mode, "VERSION": "3\n"}, "the release to deploy")
        load = Load(sb.url("dev", "/"), rate=args.rate).start()
        time.sleep(3)
        steady = (time.monotonic() - 2.5, time.monotonic())
        start = time.monotonic()
        proc = sb.run("deploy.py", "dev")
        end = time.monotonic()
        time.sleep(1.5)
        load.stop()
        assert proc.returncode == 0, proc.stderr
        return summary(load.between(*steady)), summary(load.between(start, end + 1.0)), end - start
    finally:
        sb.stop_units()
        shutil.rmtree(sb.root, ignore_errors=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=int, default=200)
    p.add_argument("--startup", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--methods", default="plain,socket")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="downtime-bench-"))
    manager = UserManager(root / "systemd").start()
    os.environ.update(manager.env)
    try:
        print(f"{args.rate} requests/s, app start-up {args.startup:.1f}s, {args.rounds} deploys per method")
        print(f"{'method':<7} {'deploy s':>8} {'requests':>8} {'failed':>6} {'gap s':>6} "
              f"{'p50 ms':>7} {'p99 ms':>8} {'max ms':>8}   {'steady p50/p99/max ms':>22}")
        for method in args.methods.split(","):
            for n in range(args.rounds):
                steady, during, seconds = measure(manager, root, method, args, n)
                print(f"{method:<7} {seconds:8.2f} {during['requests']:8} {during['failed']:6} {during['gap']:6.2f} "
                      f"{during['p50']:7.1f} {during['p99']:8.1f} {during['max']:8.1f}   "
                      f"{steady['p50']:6.1f}/{steady['p99']:6.1f}/{steady['max']:6.1f}", flush=True)
    finally:
        manager.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
