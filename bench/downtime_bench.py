#!/usr/bin/env python3
"""Benchmark: requests dropped during a deploy, by restart method.

A client sends GET / at a steady rate (default 200/s) to the sample app, which takes about a
second to start (MODE "slow 1"), on a private user manager. For each method it measures a
steady state, then a deploy: failed requests, the longest gap between successful answers, and
latency p50/p99/max during the deploy against steady state.

Methods: "plain" (the unit binds the port itself: systemctl restart closes it), "socket" (the
units `deploy.py --install-units` writes: a .socket unit holds the port, requests wait in its
queue while the new process starts), "handover" (`--install-units --notify`: a helper unit
running the new release serves from the same socket while the service restarts), "trial"
(orchestrated here by hand, not by deploy.py: two instances of a template unit share the
socket, each running its own release folder; the new one starts beside the old one, which stops
gracefully once the new one is ready).

    python3 bench/downtime_bench.py [--rate 200] [--startup 1.0] [--rounds 2]
"""

import argparse
import shutil
import sys
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from demo.load import Load, summary  # noqa: E402
from demo.sandbox import Sandbox, scratch_host  # noqa: E402


HANDOVER_SOCKET = """[Socket]
ListenStream=127.0.0.1:{port}
Backlog=4096
# a socket needs a service to name; the instances take it through Sockets= and it is never activated
Service={name}@{first}.service
"""

HANDOVER_TEMPLATE = """[Unit]
Requires={name}.socket
After={name}.socket

[Service]
Type=notify
NotifyAccess=main
Sockets={name}.socket
WorkingDirectory={releases}/%i
ExecStart={python} app.py --port {port} --db {db}
KillMode=mixed
TimeoutStopSec=30
"""


def measure_handover(manager, root, args, n):
    """The trial: old and new release serve from one socket during the switch."""
    from demo.sandbox import git
    sb = Sandbox(root / f"trial{n}", manager, health_timeout=30, name=f"dth{n}")
    sb.root.mkdir()
    sb.build()
    name = f"dth{n}"
    try:
        mode = f"slow {args.startup}\n"
        old = sb.release("dev", {"MODE": mode}, "slow start")
        new = sb.release("dev", {"MODE": mode, "VERSION": "3\n"}, "the release to deploy")
        releases = sb.root / "releases"
        git(sb.path("prod"), "fetch", "--quiet", "origin")
        for sha in (old, new):
            git(sb.path("prod"), "worktree", "add", "--quiet", "--detach", str(releases / sha), sha)
        sb.manager.systemctl("stop", sb.unit("dev"))
        db = sb.path("dev") / "instance" / "app.db"
        (manager.unit_dir / f"{name}.socket").write_text(HANDOVER_SOCKET.format(port=sb.ports["dev"], name=name, first=old))
        (manager.unit_dir / f"{name}@.service").write_text(HANDOVER_TEMPLATE.format(
            name=name, releases=releases, python=sys.executable, port=sb.ports["dev"], db=db))
        sb.manager.systemctl("daemon-reload")
        sb.manager.systemctl("start", f"{name}.socket")
        sb.manager.systemctl("start", f"{name}@{old}.service")
        sb.wait_serving("dev")
        load = Load(sb.url("dev", "/"), rate=args.rate).start()
        time.sleep(3)
        steady = (time.monotonic() - 2.5, time.monotonic())
        start = time.monotonic()
        sb.manager.systemctl("start", f"{name}@{new}.service")      # returns once the new one is READY
        sb.manager.systemctl("stop", f"{name}@{old}.service")       # graceful: finishes what it has
        end = time.monotonic()
        time.sleep(1.5)
        load.stop()
        versions = {requests.get(sb.url("dev", "/"), timeout=5).json()["version"] for _ in range(5)}
        assert versions == {"3"}, versions
        return summary(load.between(*steady)), summary(load.between(start, end + 1.0)), end - start
    finally:
        for unit in (f"{name}@{old}.service", f"{name}@{new}.service", f"{name}.socket"):
            sb.manager.systemctl("stop", unit, check=False)
        sb.stop_units()
        shutil.rmtree(sb.root, ignore_errors=True)


def measure(manager, root, method, args, n):
    if method == "trial":
        return measure_handover(manager, root, args, n)
    sb = Sandbox(root / f"{method}{n}", manager, health_timeout=30, name=f"dt{method}{n}")
    sb.root.mkdir()
    sb.build()
    try:
        mode = f"slow {args.startup}\n"
        sb.release("dev", {"MODE": mode}, "slow start")
        assert sb.run("deploy.py", "dev").returncode == 0
        if method in ("socket", "handover"):
            extra = ["--notify"] if method == "handover" else []
            proc = sb.run("deploy.py", "dev", "--install-units", "--yes", *extra)
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
    p.add_argument("--methods", default="plain,socket,handover,trial")
    args = p.parse_args()
    with scratch_host("downtime-bench-") as (root, manager):
        print(f"{args.rate} requests/s, app start-up {args.startup:.1f}s, {args.rounds} deploys per method")
        print(f"{'method':<7} {'deploy s':>8} {'requests':>8} {'failed':>6} {'gap s':>6} "
              f"{'p50 ms':>7} {'p99 ms':>8} {'max ms':>8}   {'steady p50/p99/max ms':>22}")
        for method in args.methods.split(","):
            for n in range(args.rounds):
                steady, during, seconds = measure(manager, root, method, args, n)
                print(f"{method:<7} {seconds:8.2f} {during['requests']:8} {during['failed']:6} {during['gap']:6.2f} "
                      f"{during['p50']:7.1f} {during['p99']:8.1f} {during['max']:8.1f}   "
                      f"{steady['p50']:6.1f}/{steady['p99']:6.1f}/{steady['max']:6.1f}", flush=True)


if __name__ == "__main__":
    main()
