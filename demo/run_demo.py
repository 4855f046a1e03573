#!/usr/bin/env python3
"""The runbook, end to end, on a throwaway sandbox in a temp dir.

The sample app in dev and prod under a private systemd --user manager: deploy
dev, verify dev, promote to prod, a failed deploy that rolls itself back, a
drill and a rollback, then status. Everything lives in one temp
folder, removed at the end (pass --keep to look around afterwards).
"""

import argparse
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from demo.sandbox import Sandbox, UserManager, UserManagerError  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the sandbox folder")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="safe-deploy-demo-"))
    manager = UserManager(root / "systemd")
    try:
        manager.start()
    except UserManagerError as exc:
        print(f"demo: cannot start a private systemd --user manager: {exc}", file=sys.stderr)
        return 2
    failures = []
    try:
        sb = Sandbox(root / "host", manager, health_timeout=5, name="demo")
        sb.root.mkdir()
        sb.build()
        step(f"a sandbox host in {sb.root}: prod on main, dev on dev (a git worktree), both running version 1")

        def run(*argv, expect=0):
            print(f"\n$ python3 {shlex.join(argv)}", flush=True)
            proc = sb.run(*argv)
            print((proc.stdout + proc.stderr).rstrip())
            print(f"[exit {proc.returncode}]")
            if proc.returncode != expect:
                failures.append(f"{' '.join(argv)}: exit {proc.returncode}, expected {expect}")

        run("status.py")
        step("a developer pushes version 2 to the dev branch")
        sb.release("dev", {"VERSION": "2\n"}, "version 2: a new feature")
        run("deploy.py", "dev")
        run("verify.py", "dev")
        step("prod deploys only what dev verified: main has not moved yet, so there is nothing to deploy")
        run("deploy.py", "prod", "--yes")
        step("the release is merged to main and pushed; prod takes it")
        sb.merge_to_main()
        run("deploy.py", "prod", "--yes")
        run("verify.py", "prod")
        step("a bad release reaches dev: it answers 500 on /health; the deploy rolls itself back (exit 1)")
        sb.release("dev", {"MODE": "http500\n", "VERSION": "3\n"}, "version 3: broken health check")
        run("deploy.py", "dev", expect=1)
        run("verify.py", "dev")
        step("prod turns out to need version 1 back: list the points, rehearse, roll back")
        run("rollback.py", "prod", "--list")
        run("rollback.py", "prod", "--drill")
        run("rollback.py", "prod", "--yes")
        run("status.py")
        sb.stop_units()
    finally:
        manager.stop()
        if args.keep:
            print(f"\nsandbox kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    if failures:
        print("\ndemo FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    print("\ndemo finished: every step did what the runbook says")
    return 0


def step(text):
    print(f"\n### {text}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
