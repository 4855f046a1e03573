#!/usr/bin/env python3
"""Benchmark: connections refused while prod's adoption moves its port to the socket unit.

The seed's host (prod and dev on main, no config) on a private user manager: discover, adopt dev,
deploy and verify dev, then adopt prod with a prober sending GET /health to prod at a steady rate
(default 50/s, a request every 20 ms). Prints, per round, the requests that failed (refused or
reset), the longest gap between successful answers, and how long `adopt.py prod` took. The goal:
at most 0.2 s of refused connections, at most 10 failures at 50/s.

    python3 bench/adopt_bench.py [--rate 50] [--rounds 3] [--gunicorn]

--gunicorn: prod and dev run Flask under gunicorn (2 workers, --preload) from a venv in each tree
(the wheels are downloaded once), so the stop is a real server's graceful stop; the first releases
are built by the build discovery proposes (the running venv's packages, pinned).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.gunicorn_bench import FLASK_APP  # noqa: E402
from demo.flaskr import UNIT as GUNICORN_UNIT  # noqa: E402
from demo.load import Load, summary  # noqa: E402
from demo.sandbox import REPO_ROOT, Sandbox, scratch_host  # noqa: E402
from demo.wheels import download_flask  # noqa: E402



def to_gunicorn(sb, wheels):
    """The seed's host, both envs on Flask under gunicorn from a venv inside each tree."""
    sb.release("main", {"app.py": FLASK_APP, "VERSION": "1\n", ".gitignore": "venv/\ninstance/\n"},
               "flask under gunicorn")
    for env in ("prod", "dev"):
        tree = sb.path(env)
        sb.pull(env)
        subprocess.run([sys.executable, "-m", "venv", str(tree / "venv")], check=True, timeout=300)
        subprocess.run([str(tree / "venv/bin/pip"), "install", "--quiet", "--no-index", "--find-links", str(wheels),
                        "flask", "gunicorn"], check=True, timeout=300)
        (sb.manager.unit_dir / sb.unit(env)).write_text(GUNICORN_UNIT.format(
            env=env, path=tree, port=sb.ports[env], log=sb.root / "logs" / f"{env}.log"))
    sb.manager.systemctl("daemon-reload")
    for env in ("prod", "dev"):
        sb.manager.systemctl("restart", sb.unit(env))
        sb.wait_serving(env, 30)


def adopt(sb, *args, config=True):
    argv = [sys.executable, str(REPO_ROOT / "adopt.py"), *args] + (["--config", str(sb.config)] if config else [])
    proc = subprocess.run(argv, env=sb.env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise SystemExit(f"adopt.py {' '.join(args)} failed: {proc.stdout}{proc.stderr}")
    return proc


def one_round(root, manager, n, rate, wheels=None):
    sb = Sandbox(root / f"round{n}", manager, health_timeout=30, name=f"adb{n}", seed=True)
    sb.root.mkdir()
    sb.build_seed()
    try:
        if wheels:
            to_gunicorn(sb, wheels)
        adopt(sb, "--discover", "--write", str(sb.config), config=False)
        sb.config.write_text(sb.config.read_text().replace('health_path = "/"', 'health_path = "/health"'))
        adopt(sb, "dev", "--yes")
        sb.release("dev", {"VERSION": "2\n"}, "v2")
        for script in ("deploy.py", "verify.py"):
            proc = sb.run(script, "dev")
            if proc.returncode != 0:
                raise SystemExit(f"{script} dev failed: {proc.stdout}{proc.stderr}")
        load = Load(sb.url("prod"), rate=rate, timeout=5).start()
        time.sleep(2)
        start = time.monotonic()
        adopt(sb, "prod", "--yes")
        seconds = time.monotonic() - start
        time.sleep(2)
        samples = load.stop()
        during = summary([s for s in samples if start <= s.sent <= start + seconds])
        errors = sorted({s.error for s in samples if not s.ok})
        return {"round": n, "requests": during["requests"], "failed": during["failed"],
                "gap_s": round(during["gap"], 3), "adopt_s": round(seconds, 2), "errors": errors}
    finally:
        sb.stop_units()
        for path in manager.unit_dir.glob(f"adb{n}*"):
            manager.systemctl("stop", path.name, check=False)
            path.unlink()
        manager.systemctl("daemon-reload", check=False)
        shutil.rmtree(sb.root, ignore_errors=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=int, default=50)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--gunicorn", action="store_true", help="Flask under gunicorn instead of the sample app")
    args = p.parse_args()
    results = []
    with scratch_host("adopt-bench-") as (root, manager):
        wheels = None
        if args.gunicorn:
            wheels = root / "wheels"
            download_flask(wheels)
            os.environ.update(PIP_NO_INDEX="1", PIP_FIND_LINKS=str(wheels))     # the builds install from there
        for n in range(1, args.rounds + 1):
            results.append(one_round(root, manager, n, args.rate, wheels))
            print(json.dumps(results[-1]), flush=True)
    worst = max(r["failed"] for r in results)
    print(f"\nprod's adoption ({'gunicorn, 2 workers' if args.gunicorn else 'the sample app'}) at {args.rate} "
          f"requests/s: failed {', '.join(str(r['failed']) for r in results)} "
          f"(worst {worst}, {worst / args.rate:.2f} s of refused connections); longest gap "
          f"{max(r['gap_s'] for r in results):.3f} s; adopt.py prod {min(r['adopt_s'] for r in results):.2f}-"
          f"{max(r['adopt_s'] for r in results):.2f} s")
    return 0 if worst <= args.rate // 5 else 1


if __name__ == "__main__":
    sys.exit(main())
