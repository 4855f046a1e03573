#!/usr/bin/env python3
"""The runbook, end to end, on a throwaway sandbox in a temp dir.

It starts from the seed's host as it runs before the tool (prod and dev both on
main, two units, two databases, no config) under a private systemd --user
manager: discover the config, adopt dev (backups, tags, a dev branch, releases),
deploy and verify dev, the checklist, adopt prod and promote, a failed deploy
that rolls itself back by switching to the previous release, a drill and a
rollback, status, off-site copies with restic, then an incident status
answers with a start, not a rollback.
Everything lives in one temp folder, removed at the end (pass --keep to look
around afterwards).
"""

import argparse
import json
import os
import shlex
import shutil
import subprocess
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
        sb = Sandbox(root / "host", manager, health_timeout=5, name="demo", seed=True)
        sb.root.mkdir()
        sb.build_seed()
        step(f"the seed's host in {sb.root}: prod (demo.service) and dev (demo-dev.service) both run main, "
             "each with its own SQLite database; no config.toml yet")

        def run(*argv, expect=0, config=True):
            print(f"\n$ python3 {shlex.join(argv)}", flush=True)
            proc = sb.run(*argv, config=config)
            print((proc.stdout + proc.stderr).rstrip())
            print(f"[exit {proc.returncode}]")
            if proc.returncode != expect:
                failures.append(f"{' '.join(argv)}: exit {proc.returncode}, expected {expect}")

        step("discover: the running units become a proposed config.toml, every guess marked")
        run("adopt.py", "--discover", "--write", str(sb.config), config=False)
        print(sb.config.read_text())
        build = [[sys.executable, "-m", "venv", "--without-pip", "venv"]]
        sb.config.write_text(sb.config.read_text().replace('health_path = "/"', 'health_path = "/health"'))
        sb.add_env_keys(f"build = {json.dumps(build)}\nshared = [\"instance\"]\nkeep_releases = 5")
        step("the operator reads it, sets the health page it guessed, and gives each release its own venv "
             "(`build`); prod cannot be adopted before dev")
        run("adopt.py", "prod", "--yes", expect=1)
        step("adopt dev: phase 1 backs up everything (both databases, verified; both unit files; the running "
             "commit tagged production-stable-DATE and pushed), then dev moves onto a new dev branch and the "
             "tool's releases; prod is not touched")
        run("adopt.py", "dev", "--yes")
        show_layout(sb, "dev")
        run("adopt.py", "--checklist", expect=1)
        step("a developer pushes version 2 to the dev branch; the deploy builds it beside the running release "
             "and switches `current` in one rename; verify; now the checklist holds")
        sb.release("dev", {"VERSION": "2\n"}, "version 2: a new feature")
        run("deploy.py", "dev")
        show_layout(sb, "dev")
        run("verify.py", "dev")
        run("adopt.py", "--checklist")
        step("adopt prod, then merge dev into main and promote: prod deploys only what dev verified")
        run("adopt.py", "prod", "--yes")
        sb.merge_to_main()
        run("deploy.py", "prod", "--yes")
        run("verify.py", "prod")
        step("a bad release reaches dev: it answers 500 on /health; the deploy rolls itself back (exit 1) by "
             "pointing `current` at the release before it: no rebuild")
        sb.release("dev", {"MODE": "http500\n", "VERSION": "3\n"}, "version 3: broken health check")
        run("deploy.py", "dev", expect=1)
        run("verify.py", "dev")
        step("prod turns out to need version 1 back: list the points, rehearse, roll back (a switch to the "
             "kept release)")
        run("rollback.py", "prod", "--list")
        run("rollback.py", "prod", "--drill")
        run("rollback.py", "prod", "--yes")
        step("status tells the truth: exit 1, since origin still holds releases that were rolled back (deploy.py "
             "refuses them until a fix is pushed); the rollback line never points at them, `undo` is labelled")
        run("status.py", expect=1)
        step("off-site copies: [offsite] names a restic repository (here a folder; in real life another disk, "
             "sftp:, S3); the nightly backup also goes there, --list says where each copy is, --verify reads "
             "the repository back and restores the newest copy of each env")
        password = sb.root / "restic-password"
        password.write_text("demo password, never printed\n")
        password.chmod(0o600)
        sb.config.write_text(sb.config.read_text() + f'\n[offsite]\nrepository = "{sb.root / "offsite"}"\n'
                             f'password_file = "{password}"\n')
        run("backup.py", "--all")
        run("backup.py", "--list")
        run("backup.py", "--verify")
        step("an incident whose answer is not a rollback: someone stops prod's app by hand. status says what is "
             "wrong and the command that fixes it (start it: the release is good); pasted under cron's PATH, prod "
             "serves again and nothing is rolled back or marked bad")
        sb.stop_app("prod")
        run("status.py", "prod", expect=1)
        advice = json.loads(sb.run("status.py", "prod", "--json").stdout)["envs"]["prod"]["advice"]
        command = advice[0]["command"] if advice else "true"
        print(f"\n$ {command}", flush=True)
        pasted = subprocess.run(["sh", "-c", command], env={"PATH": "/usr/bin:/bin", **sb.manager.env},
                                capture_output=True, text=True, timeout=60)
        print((pasted.stdout + pasted.stderr).rstrip() + f"\n[exit {pasted.returncode}]")
        if pasted.returncode != 0 or not command.startswith("systemctl --user start"):
            failures.append(f"the advice {command!r}: exit {pasted.returncode}")
        try:
            sb.wait_serving("prod")
        except RuntimeError as exc:
            failures.append(str(exc))
        run("status.py", "prod", expect=1)          # still exit 1: origin/main is version 2, rolled back
        problems = json.loads(sb.run("status.py", "prod", "--json").stdout)["envs"]["prod"]["problems"]
        if any("stopped" in p for p in problems):
            failures.append(f"prod still stopped after the advice: {problems}")
        if not args.keep:
            sb.stop_units()
    finally:
        if args.keep:
            print(f"\nsandbox kept in {root}, its user manager still running (pid {manager.proc.pid}). To use it:")
            print(f"  export XDG_RUNTIME_DIR={manager.runtime} XDG_CONFIG_HOME={manager.config_home}")
            print(f"  export DEPLOY_CONFIG={root / 'host' / 'config.toml'}")
            print("  python3 status.py; systemctl --user status 'demo*'")
            print(f"When done: kill {manager.proc.pid} (the manager stops the apps), then rm -r {root}; "
                  f"find {manager.cgroup} -depth -type d -delete (the cgroup it ran in)")
        else:
            manager.stop()
            shutil.rmtree(root, ignore_errors=True)
    if failures:
        print("\ndemo FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    print("\ndemo finished: every step did what the runbook says. status still says PROBLEM, on purpose: the"
          "\nbranch's tip is the release that was rolled back in prod (no command fixes that: a new commit does),"
          "\nand dev still runs it (its advice, pasted, rolls dev back too).")
    return 0


def show_layout(sb, env):
    root = Path(f"{sb.path(env)}.releases")
    print(f"\n$ ls {root}/releases; readlink {root}/current")
    for release in sorted((root / "releases").iterdir()):
        print(f"  {release.name}/   ({', '.join(sorted(p.name for p in release.iterdir()))})")
    print(f"  current -> {os.readlink(root / 'current')}")


def step(text):
    print(f"\n### {text}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
