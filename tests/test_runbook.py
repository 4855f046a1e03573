"""The runbook is the program: the dry run is the real run's steps, and what status says after a kill
is what serves. On the layout users have (an env converted to releases), on the real user manager."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import requests

from demo.faults import MIGRATION
from demo.sandbox import REPO_ROOT, git
from helpers import log_records


def converted(sb, **extra):
    lines = [f'build = [["{sys.executable}", "-c", "open(\'BUILT\', \'w\').close()"]]',
             f'pre_restart = [["{sys.executable}", "-c", "{MIGRATION}"]]', "watch = 1"]
    sb.write_config(dev="\n".join(lines + [f"{k} = {json.dumps(v)}" for k, v in extra.items()]))
    proc = sb.run("deploy.py", "dev", "--install-units", "--yes")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def dry_run_then_deploy(sb):
    git(sb.path("dev"), "fetch", "--quiet", "origin")       # a dry run uses what is fetched already
    dry = sb.run("deploy.py", "dev", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    planned = json.loads(dry.stdout)
    proc = sb.run("deploy.py", "dev")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return planned, log_records(sb, "dev")[-1]


def test_the_dry_run_is_the_steps_the_deploy_takes_on_releases(sandbox):
    sb = sandbox
    converted(sb)
    sb.release("dev", {"VERSION": "2\n"}, "v2")
    planned, record = dry_run_then_deploy(sb)
    assert planned["env"] == "dev" and [s["name"] for s in planned["steps"]] == list(record["steps"])
    assert [s["name"] for s in planned["steps"]] == ["build", "tag", "backup", "switch", "pre_restart", "restart",
                                                     "health", "watch", "record"]
    details = {s["name"]: s["detail"] for s in planned["steps"]}
    release = f"{sb.path('dev')}.releases/releases/"
    assert release in details["build"] and "stand-ins" in details["build"]
    assert release in details["pre_restart"] and str(sb.path("dev")) + ":" not in details["pre_restart"]
    assert "point " in details["switch"] and "current" in details["switch"]
    assert "systemctl --user restart" in details["restart"] and "requests wait" in details["restart"]
    text = sb.run("deploy.py", "dev", "--dry-run")
    assert "nothing to deploy" in text.stdout


def test_the_dry_run_is_the_steps_the_deploy_takes_in_place(in_place):
    sb = in_place
    sb.write_config(dev=f'pre_restart = [["{sys.executable}", "-c", "pass"]]')
    sb.release("dev", {"VERSION": "2\n"}, "v2")
    planned, record = dry_run_then_deploy(sb)
    assert [s["name"] for s in planned["steps"]] == list(record["steps"]) == [
        "tag", "backup", "switch", "pre_restart", "restart", "health", "revision", "record"]
    details = {s["name"]: s["detail"] for s in planned["steps"]}
    assert f"run in {sb.path('dev')}: " in details["pre_restart"] and "git merge --ff-only" in details["switch"]


def test_the_rollback_plan_is_the_steps_it_takes(sandbox):
    sb = sandbox
    converted(sb)
    sb.release("dev", {"VERSION": "2\n"}, "v2")
    assert sb.run("deploy.py", "dev").returncode == 0
    proc = sb.run("rollback.py", "dev", "--yes")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    shown = [line.split(":", 1)[0].split(".", 1)[1].strip() for line in proc.stdout.splitlines()
             if line[:5].strip().rstrip(".").isdigit()]
    assert shown == list(log_records(sb, "dev")[-1]["steps"])
    assert "database" in shown and "prepare" in shown      # the migration changed the schema: it goes back too


def run_killed(sb, fault, *args):
    sb.ready_for(*args[1:])
    argv = [sys.executable, str(REPO_ROOT / args[0]), *args[1:], "--config", str(sb.config)]
    return subprocess.run(argv, env={**sb.env, "SAFE_DEPLOY_FAULT": fault}, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


def test_after_a_kill_right_after_the_switch_status_says_what_serves(sandbox):
    """`current` and the log point at the new release, the old one still serves: status names the one
    that serves (from its process), with its own subject, and says what happened."""
    sb = sandbox
    converted(sb)
    old = sb.head("dev")
    new = sb.release("dev", {"VERSION": "2\n"}, "v2: the new subject")
    assert run_killed(sb, "deploy:pre_restart:KILL", "deploy.py", "dev").returncode == -9
    assert requests.get(sb.url("dev", "/"), timeout=5).json()["version"] == "1"
    st = json.loads(sb.run("status.py", "dev", "--json").stdout)["envs"]["dev"]
    assert st["commit"] == old and st["subject"] != "v2: the new subject" and new != old
    assert any("serves" in p and "interrupted" in p for p in st["problems"]), st["problems"]
    follow = sb.run("deploy.py", "dev")
    assert follow.returncode == 0 and "recovering:" in follow.stdout, follow.stdout + follow.stderr
    assert json.loads(sb.run("status.py", "dev", "--json").stdout)["envs"]["dev"]["commit"] == new


def test_a_killed_deploy_leaves_no_duplicate_release_and_keep_releases_holds(sandbox):
    sb = sandbox
    converted(sb, keep_releases=2)
    releases = Path(f"{sb.path('dev')}.releases/releases")
    for v in range(2, 6):
        target = sb.release("dev", {"VERSION": f"{v}\n"}, f"v{v}")
        assert run_killed(sb, "deploy:tag:KILL", "deploy.py", "dev").returncode == -9      # built, then killed
        proc = sb.run("deploy.py", "dev")
        assert proc.returncode == 0 and "reused, not rebuilt" in proc.stdout, proc.stdout + proc.stderr
        commits = [json.loads((r / "REVISION").read_text())["commit"] for r in releases.iterdir()]
        assert commits.count(target) == 1 and len(commits) == len(set(commits)), commits
    # keep_releases = 2, plus those a rollback point of the last 5 operations names: never a duplicate
    assert len(list(releases.iterdir())) == len({c for r in log_records(sb, "dev") if r["kind"] == "deploy"
                                                  for c in (r["from"], r["to"])})


def test_a_running_release_deleted_by_hand_is_named_and_rebuilt(sandbox):
    sb = sandbox
    converted(sb)
    sb.release("dev", {"VERSION": "2\n"}, "v2")
    assert sb.run("deploy.py", "dev").returncode == 0
    shutil.rmtree(Path(f"{sb.path('dev')}.releases") / os.readlink(f"{sb.path('dev')}.releases/current"))
    status = sb.run("status.py", "dev", "--json")
    assert status.returncode == 1
    assert any("is gone" in p for p in json.loads(status.stdout)["envs"]["dev"]["problems"])
    proc = sb.run("deploy.py", "dev")
    assert proc.returncode == 0 and "nothing to deploy" not in proc.stdout, proc.stdout + proc.stderr
    assert Path(f"{sb.path('dev')}.releases/current/REVISION").exists()
    sb.manager.systemctl("restart", sb.unit("dev"))
    assert sb.wait_serving("dev") < 5 and requests.get(sb.url("dev", "/"), timeout=5).json()["version"] == "2"
