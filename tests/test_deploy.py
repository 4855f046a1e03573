"""deploy.py against a real user manager, real git (bare origin, worktrees), the sample app."""

import json
import os
import stat
import subprocess
import sys

import requests

from demo.sandbox import REPO_ROOT, git
from safedeploy.state import EnvLock

from helpers import listing, log_records, one_line_error


def version(sb, env):
    return requests.get(sb.url(env, "/"), timeout=5).json()["version"]


def main_pid(sb, env):
    return sb.manager.systemctl("show", sb.unit(env), "-p", "MainPID", "--value").stdout.strip()


def test_deploy_dev_runs_every_step(in_place):
    sb = in_place
    before = sb.head("dev")
    target = sb.release("dev", {"VERSION": "2\n"}, "version 2")
    proc = sb.run("deploy.py", "dev")
    assert proc.returncode == 0, proc.stderr
    assert version(sb, "dev") == "2"
    assert sb.head("dev") == target
    # the tag marks what ran before, annotated, pushed to origin
    (record,) = log_records(sb, "dev")
    tag = record["tag"]
    assert tag.startswith("dev-before-deploy-") and len(tag) == len("dev-before-deploy-20261124-130000")
    assert git(sb.path("dev"), "rev-parse", f"{tag}^{{commit}}") == before
    assert git(sb.path("dev"), "cat-file", "-t", tag) == "tag"
    message = git(sb.path("dev"), "tag", "-l", "--format=%(contents)", tag)
    assert before in message and "branch: dev" in message and f"backup: {record['backup']}" in message
    assert tag in git(sb.root / "origin.git", "tag", "-l")
    # the backup: a consistent copy, private, with a manifest and the unit file
    backup = record["backup"]
    assert os.path.exists(backup) and stat.S_IMODE(os.stat(backup).st_mode) == 0o600
    manifest = json.loads(open(backup + ".json").read())
    assert manifest["reason"] == "pre-deploy" and manifest["commit"] == before
    assert len(manifest["sha256"]) == 64
    assert open(manifest["unit_backup"]).read() == (sb.manager.unit_dir / sb.unit("dev")).read_text()
    assert stat.S_IMODE(os.stat(os.path.dirname(backup)).st_mode) == 0o700
    # REVISION for the app, out of git status
    revision = json.loads((sb.path("dev") / "REVISION").read_text())
    assert revision["commit"] == target and revision["env"] == "dev"
    assert requests.get(sb.url("dev", "/_deploy/status"), timeout=5).json()["commit"] == target
    assert git(sb.path("dev"), "status", "--porcelain") == ""
    # the deploy log and the verified mark
    assert record["result"] == "ok" and record["from"] == before and record["to"] == target
    assert list(record["steps"]) == ["tag", "backup", "switch", "restart", "health", "revision", "record"]
    verified = [json.loads(line) for line in (sb.root / "state" / "dev.verified.jsonl").read_text().splitlines()]
    assert verified[-1]["commit"] == target
    # the summary ends with the rollback command
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("rollback: python3 ") and f"rollback.py dev --to {tag}" in last


def test_nothing_to_deploy_exits_0_and_restarts_nothing(sandbox):
    pid = main_pid(sandbox, "dev")
    proc = sandbox.run("deploy.py", "dev")
    assert proc.returncode == 0 and "nothing to deploy" in proc.stdout
    assert main_pid(sandbox, "dev") == pid
    assert log_records(sandbox, "dev") == []


def test_work_tree_moved_by_hand_is_still_deployed_and_restarted(sandbox):
    sb = sandbox
    sb.release("dev", {"VERSION": "2\n"}, "v2")
    assert sb.run("deploy.py", "dev").returncode == 0
    target = sb.release("dev", {"VERSION": "3\n"}, "v3")
    sb.pull("dev")             # by hand, no restart
    assert version(sb, "dev") == "2"
    proc = sb.run("deploy.py", "dev")
    assert proc.returncode == 0, proc.stderr
    assert version(sb, "dev") == "3" and log_records(sb, "dev")[-1]["to"] == target


def test_preflight_refuses_uncommitted_changes(sandbox):
    sb = sandbox
    sb.release("dev", {"VERSION": "2\n"}, "v2")
    (sb.path("dev") / "app.py").write_text((sb.path("dev") / "app.py").read_text() + "\n# hotfix\n")
    proc = sb.run("deploy.py", "dev")
    assert proc.returncode == 1
    assert "uncommitted changes" in one_line_error(proc) and "app.py" in proc.stderr
    assert version(sb, "dev") == "1" and log_records(sb, "dev") == []


def test_preflight_refuses_wrong_branch_and_unknown_unit(sandbox):
    sb = sandbox
    sb.release("dev", {"VERSION": "2\n"}, "v2")
    git(sb.path("dev"), "switch", "--quiet", "--detach")
    proc = sb.run("deploy.py", "dev")
    assert proc.returncode == 1 and "not on dev's branch 'dev'" in one_line_error(proc)
    git(sb.path("dev"), "switch", "--quiet", "dev")
    sb.config.write_text(sb.config.read_text().replace(sb.unit("dev"), "no-such.service"))
    proc = sb.run("deploy.py", "dev")
    assert proc.returncode == 1 and "does not know no-such.service" in one_line_error(proc)


def test_promotion_gate_both_ways(sandbox):
    sb = sandbox
    dev_sha = sb.release("dev", {"VERSION": "2\n"}, "v2")
    main_sha = sb.merge_to_main()                          # a fast-forward: same commit
    proc = sb.run("deploy.py", "prod", "--yes")
    assert proc.returncode == 1
    line = one_line_error(proc)
    assert "promotion gate" in line and "nothing has been verified in dev yet" in line
    assert version(sb, "prod") == "1"
    # dev deploys it; prod may follow
    assert sb.run("deploy.py", "dev").returncode == 0
    assert main_sha == dev_sha
    proc = sb.run("deploy.py", "prod", "--yes")
    assert proc.returncode == 0, proc.stderr
    assert version(sb, "prod") == "2"
    # a merge commit with the same tree as the verified commit passes too
    sb.release("dev", {"VERSION": "3\n"}, "v3")
    assert sb.run("deploy.py", "dev").returncode == 0
    merge = sb.merge_to_main(message="merge dev into main")
    assert merge != sb.head("dev")
    assert sb.run("deploy.py", "prod", "--yes").returncode == 0
    assert sb.head("prod") == merge and version(sb, "prod") == "3"


def test_promotion_gate_names_what_dev_verified_and_force_overrides(sandbox):
    sb = sandbox
    verified = sb.release("dev", {"VERSION": "2\n"}, "v2")
    assert sb.run("deploy.py", "dev").returncode == 0
    sb.merge_to_main()
    sb.release("main", {"VERSION": "hotfix\n"}, "hotfix straight on main")
    proc = sb.run("deploy.py", "prod", "--yes")
    assert proc.returncode == 1
    line = one_line_error(proc)
    assert f"dev last verified {verified[:12]}" in line and f"deploy.py prod --ref {verified}" in line
    proc = sb.run("deploy.py", "prod", "--yes", "--force")
    assert proc.returncode == 2 and "--reason" in one_line_error(proc)
    proc = sb.run("deploy.py", "prod", "--yes", "--force", "--reason", "login outage")
    assert proc.returncode == 0, proc.stderr
    assert version(sb, "prod") == "hotfix"
    record = log_records(sb, "prod")[-1]
    assert record["reason"] == "login outage" and "promotion gate" in record["forced"][0]


def test_promoted_env_needs_yes_without_a_terminal(sandbox):
    sb = sandbox
    sb.release("dev", {"VERSION": "2\n"}, "v2")
    assert sb.run("deploy.py", "dev").returncode == 0
    sb.merge_to_main()
    proc = sb.run("deploy.py", "prod")
    assert proc.returncode == 2 and "add --yes" in one_line_error(proc)
    assert version(sb, "prod") == "1"


def test_promoted_env_asks_for_its_name_on_a_terminal(sandbox):
    sb = sandbox
    sb.release("dev", {"VERSION": "2\n"}, "v2")
    assert sb.run("deploy.py", "dev").returncode == 0
    sb.merge_to_main()
    wrong = run_on_terminal(sb, ["deploy.py", "prod"], "dev\n")
    assert wrong.returncode == 2 and "not confirmed" in wrong.stdout
    assert version(sb, "prod") == "1"
    right = run_on_terminal(sb, ["deploy.py", "prod"], "prod\n")
    assert right.returncode == 0, right.stdout
    assert version(sb, "prod") == "2"


def run_on_terminal(sb, args, typed):
    """Run a script with a pseudo-terminal as stdin/stdout (util-linux `script`)."""
    sb.ready_for(*args[1:])
    command = " ".join([sys.executable, str(REPO_ROOT / args[0]), *args[1:], "--config", str(sb.config)])
    return subprocess.run(["script", "-qec", command, "/dev/null"], input=typed, env=sb.env,
                          capture_output=True, text=True, timeout=120)


def test_dry_run_changes_nothing(in_place):
    sb = in_place
    sb.release("dev", {"VERSION": "2\n"}, "v2")
    git(sb.path("dev"), "fetch", "--quiet", "origin")
    refs = git(sb.path("dev"), "for-each-ref")
    files = listing(sb.root / "dev", sb.root / "prod", sb.root / "origin.git")
    pid = main_pid(sb, "dev")
    proc = sb.run("deploy.py", "dev", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    for word in ("dev-before-deploy-", "git merge --ff-only", "systemctl --user restart", "REVISION",
                 "backups/dev/", "dev.deploys.jsonl"):
        assert word in proc.stdout
    assert git(sb.path("dev"), "for-each-ref") == refs
    assert listing(sb.root / "dev", sb.root / "prod", sb.root / "origin.git") == files
    assert not (sb.root / "state").exists() and not (sb.root / "backups").exists()
    assert main_pid(sb, "dev") == pid and version(sb, "dev") == "1"


def test_a_held_lock_gives_exit_3_with_holder(sandbox):
    sb = sandbox
    sb.release("dev", {"VERSION": "2\n"}, "v2")
    with EnvLock(sb.root / "state", "dev", "deploy"):
        proc = sb.run("deploy.py", "dev")
    assert proc.returncode == 3
    line = one_line_error(proc)
    assert f"pid {os.getpid()}" in line and "since" in line and "deploy" in line
    assert version(sb, "dev") == "1"


def test_a_lock_whose_holder_died_blocks_nobody(sandbox):
    sb = sandbox
    sb.release("dev", {"VERSION": "2\n"}, "v2")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[1]);"
        "from safedeploy.state import EnvLock;"
        "lock = EnvLock(sys.argv[2], 'dev', 'deploy').__enter__(); print('held', flush=True); time.sleep(60)"),
        str(REPO_ROOT), str(sb.root / "state")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    assert sb.run("deploy.py", "dev").returncode == 3
    holder.kill()
    holder.wait()
    proc = sb.run("deploy.py", "dev")
    assert proc.returncode == 0, proc.stderr
    assert version(sb, "dev") == "2"


def test_pre_restart_commands_run_in_the_work_tree(in_place):
    sb = in_place
    sb.write_config(dev=f'pre_restart = [["{sys.executable}", "-c", "open(\'built.txt\', \'w\').write(\'yes\')"]]')
    sb.release("dev", {"VERSION": "2\n", ".gitignore": "instance/\nbuilt.txt\n"}, "v2")
    assert sb.run("deploy.py", "dev").returncode == 0
    assert (sb.path("dev") / "built.txt").read_text() == "yes"


def test_ref_non_fast_forward_and_bad_refs(sandbox):
    sb = sandbox
    first = sb.head("dev")
    sb.release("dev", {"VERSION": "2\n"}, "v2")
    assert sb.run("deploy.py", "dev").returncode == 0
    proc = sb.run("deploy.py", "dev", "--ref", first)
    assert proc.returncode == 1 and "older than what runs" in one_line_error(proc)
    proc = sb.run("deploy.py", "dev", "--ref", first, "--force", "--reason", "test")
    assert proc.returncode == 0 and version(sb, "dev") == "1"
    for bad in ("no-such-ref", "--upload-pack=evil", "../../etc", "HEAD;rm -rf /"):
        proc = sb.run("deploy.py", "dev", f"--ref={bad}")
        assert proc.returncode == 2, (bad, proc.stderr)
        line = one_line_error(proc)
        assert "--ref" in line and ("no such commit" in line or "named like that" in line)


def test_unreachable_remote_fails_cleanly_and_no_fetch_works(sandbox):
    sb = sandbox
    sb.release("dev", {"VERSION": "2\n"}, "v2")
    git(sb.path("dev"), "fetch", "--quiet", "origin")
    (sb.root / "origin.git").rename(sb.root / "gone.git")
    proc = sb.run("deploy.py", "dev")
    assert proc.returncode == 1 and "git fetch" in one_line_error(proc)
    proc = sb.run("deploy.py", "dev", "--no-fetch")
    assert proc.returncode == 0, proc.stderr
    assert "could not push tag" in proc.stderr and version(sb, "dev") == "2"


def test_the_deploy_measures_what_its_switch_cost_users(sandbox):
    """The deploy probes the health URL itself while it switches: on a socket-activated env, none refused."""
    sb = sandbox
    sb.release("dev", {"VERSION": "2\n"}, "v2")
    proc = sb.run("deploy.py", "dev")
    assert proc.returncode == 0, proc.stderr
    probe = log_records(sb, "dev")[-1]["probe"]
    assert set(probe) == {"requests", "refused", "errors", "slowest_s"}
    assert probe["requests"] > 0 and probe["refused"] == 0, probe
    line = next(line for line in proc.stdout.splitlines() if line.startswith("  probe "))
    assert f"{probe['requests']} request" in line and "none refused" in line
    status = sb.run("status.py", "dev", "--json")
    assert json.loads(status.stdout)["envs"]["dev"]["last_deploy"]["probe"] == probe
    text = sb.run("status.py", "dev").stdout
    assert any(line.startswith("  probe ") and "none refused" in line for line in text.splitlines()), text
    # a rollback by hand measures its own switch
    proc = sb.run("rollback.py", "dev", "--yes", "--code-only")
    assert proc.returncode == 0, proc.stderr
    back = log_records(sb, "dev")[-1]
    assert back["kind"] == "rollback" and back["probe"]["requests"] > 0 and back["probe"]["refused"] == 0
    assert any(line.startswith("  probe ") for line in proc.stdout.splitlines()), proc.stdout
