#!/usr/bin/env python3
"""Benchmark: what a release costs. For the sample app (no build) and for a Flask app with real
requirements (Flask + gunicorn from a local wheel folder, the cache warm), built with pip and
with uv: the `build` step's seconds (from the deploy log) and the disk each new release adds
(du of the whole releases folder, which counts a hard-linked file once), against a full venv.

    python3 bench/release_bench.py [--rounds 3]      # needs the network once, to fetch the wheels
"""

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from demo.wheels import flask_wheelhouse  # noqa: E402
from demo.sandbox import Sandbox, scratch_host  # noqa: E402

UV = shutil.which("uv") or str(Path(sys.executable).parent / "uv")


def du_kib(path, count_links=False):
    argv = ["du", "-sk"] + (["-l"] if count_links else []) + [str(path)]
    return int(subprocess.run(argv, capture_output=True, text=True, check=True, timeout=120).stdout.split()[0])


def builds(wheels):
    pip = [[sys.executable, "-m", "venv", "--without-pip", "venv"],
           [sys.executable, "-m", "pip", "--python", "venv/bin/python", "install", "--quiet",
            "--disable-pip-version-check", "--no-index", "--find-links", str(wheels), "-r", "requirements.txt"]]
    uv = [[UV, "venv", "--quiet", "venv"],
          [UV, "pip", "install", "--quiet", "--python", "venv/bin/python", "--no-index", "--find-links", str(wheels),
           "-r", "requirements.txt"]]
    return {"none (sample app)": [], "pip": pip, "uv": uv}


def measure(root, manager, name, build, requirements, rounds):
    sb = Sandbox(root / name.split()[0], manager, health_timeout=30, name=f"rb{name.split()[0]}")
    sb.root.mkdir()
    sb.build()
    files = {"requirements.txt": requirements} if build else {}
    if files:
        sb.release("dev", files, "requirements")
        sb.run("deploy.py", "dev")
    sb.write_config(dev=f"build = {json.dumps(build)}\nkeep_releases = {rounds + 2}")
    proc = sb.run("deploy.py", "dev", "--install-units", "--yes")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    rel = Path(f"{sb.path('dev')}.releases") / "releases"
    seconds, added = [], []
    for i in range(rounds):
        before = du_kib(rel)
        sb.release("dev", {"VERSION": f"{i + 2}\n"}, f"code only {i}")
        proc = sb.run("deploy.py", "dev")
        assert proc.returncode == 0, proc.stderr + proc.stdout
        record = json.loads((sb.root / "state" / "dev.deploys.jsonl").read_text().splitlines()[-1])
        seconds.append(record["steps"]["build"])
        added.append(du_kib(rel) - before)
    current = Path(f"{sb.path('dev')}.releases") / "current"
    venv = current / "venv"
    full = du_kib(venv.resolve(), count_links=True) if venv.exists() else 0
    release_full = du_kib(current.resolve(), count_links=True)
    sb.stop_units()
    return seconds, added, full, release_full


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    with scratch_host("release-bench-") as (root, manager):
        wheels, requirements = flask_wheelhouse(root)
        rows = []
        for name, build in builds(wheels).items():
            rows.append((name, *measure(root, manager, name, build, requirements if build else "", args.rounds)))
    print(f"requirements: {requirements.strip().replace(chr(10), ', ')}")
    print(f"{'build':<18} {'build s (median)':>16} {'KiB added/release':>18} {'full venv KiB':>14} "
          f"{'release KiB':>12} {'added vs venv':>14}")
    for name, seconds, added, full, release_full in rows:
        share = f"{100 * statistics.median(added) / full:.1f}%" if full else "-"
        print(f"{name:<18} {statistics.median(seconds):>16.2f} {statistics.median(added):>18} {full:>14} "
              f"{release_full:>12} {share:>14}")


if __name__ == "__main__":
    main()
