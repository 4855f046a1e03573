"""In an incident, following the tool's words literally never loses a row (issue 10, in part): the
pasted rollback command never reinstates a rolled-back release, a plain deploy refuses it, the
copy holding the rows a restore took out survives the nightly prune, and flags that cannot go
together are refused."""

import json
import os
import stat
from pathlib import Path

import requests

from helpers import log_records, tmpfs


def post(sb, n, env="dev"):
    for i in range(n):
        assert requests.post(sb.url(env, "/notes"), data=f"n{i}", timeout=5).status_code == 201


def status(sb, env="dev"):
    proc = sb.run("status.py", env, "--json")
    return proc.returncode, json.loads(proc.stdout)["envs"][env]


def test_after_a_rollback_the_pasted_command_never_reinstates_the_bad_release(sandbox):
    sb = sandbox
    post(sb, 2)
    bad = sb.release("dev", {"VERSION": "2\n"}, "v2 (deletes rows, say)")
    assert sb.run("deploy.py", "dev").returncode == 0
    post(sb, 3)
    proc = sb.run("rollback.py", "dev", "--yes", "--with-db")
    assert proc.returncode == 0, proc.stderr
    pre_rollback = log_records(sb, "dev")[-1]["pre_rollback"]
    code, st = status(sb)
    # the advice: never the pre-rollback copy (the state the rollback left), never v2
    pre_id = os.path.basename(pre_rollback).removesuffix(".sqlite3")
    assert pre_id not in (st["rollback"] or "")
    points = {p["id"]: p for p in json.loads(sb.run("rollback.py", "dev", "--list", "--json").stdout)["points"]}
    advised = (st["rollback"] or "").split("--to ")[1].split()[0] if st["rollback"] else None
    assert advised is None or points[advised]["commit"] != bad
    assert all((p["rolled_back_in"] == "dev") == (p["commit"] == bad) for p in points.values()), points
    assert "ROLLED BACK in dev" in next(line for line in sb.run("rollback.py", "dev", "--list").stdout.splitlines()
                                         if line.startswith(pre_id))
    # "undo this rollback" is its own, labelled command
    assert pre_id in st["undo_rollback"] and "--with-db" in st["undo_rollback"]
    assert "undo      the last rollback" in sb.run("status.py", "dev").stdout
    # origin/dev still points at the bad release: status says so and exits 1
    assert code == 1 and any("rolled back" in p for p in st["problems"])


def test_a_plain_deploy_refuses_a_rolled_back_release_until_forced(sandbox):
    sb = sandbox
    sb.release("dev", {"VERSION": "2\n"}, "v2")
    assert sb.run("deploy.py", "dev").returncode == 0
    assert sb.run("rollback.py", "dev", "--yes").returncode == 0
    for args in (["dev"], ["dev", "--dry-run"]):
        proc = sb.run("deploy.py", *args)
        assert proc.returncode == 1 and "bad release" in proc.stderr and "push a fix" in proc.stderr.lower()
    assert requests.get(sb.url("dev", "/"), timeout=5).json()["version"] == "1"
    # a fix pushed on top deploys as usual
    sb.release("dev", {"VERSION": "3\n"}, "v3: the fix")
    assert sb.run("deploy.py", "dev").returncode == 0
    assert requests.get(sb.url("dev", "/"), timeout=5).json()["version"] == "3"


def test_an_automatic_rollback_marks_the_release_bad(sandbox):
    sb = sandbox
    sb.release("dev", {"VERSION": "2\n", "MODE": "http500\n"}, "v2 answers 500")
    assert sb.run("deploy.py", "dev").returncode == 1
    proc = sb.run("deploy.py", "dev")
    assert proc.returncode == 1 and "bad release" in proc.stderr
    proc = sb.run("deploy.py", "dev", "--force", "--reason", "we know")
    assert proc.returncode == 1 and "rolled back by itself" in proc.stderr     # still bad, rolled back again


def test_the_copy_holding_the_rows_survives_the_nightly_prune_until_released(sandbox):
    sb = sandbox
    sb.write_config()
    (sb.root / "config.toml").write_text(sb.config.read_text().replace(
        "[env.prod]", "[retention]\ndaily = 1\nweekly = 0\nmonthly = 0\n\n[env.prod]"))
    sb.release("dev", {"VERSION": "2\n"}, "v2")
    assert sb.run("deploy.py", "dev").returncode == 0
    post(sb, 4)                        # rows the restore will take out
    assert sb.run("rollback.py", "dev", "--yes", "--with-db").returncode == 0
    saved = log_records(sb, "dev")[-1]["pre_rollback"]
    assert stat.S_IMODE(os.stat(saved).st_mode) == 0o600
    for _ in range(2):
        assert sb.run("backup.py", "--all", "--quiet").returncode == 0
    assert sb.run("backup.py", "--all", "--quiet", "--prune").returncode == 0
    listed = {b["path"]: b for b in json.loads(sb.run("backup.py", "--list", "--json").stdout)["backups"]}
    assert saved in listed and listed[saved]["held"] is True
    assert "HELD" in sb.run("backup.py", "--list").stdout
    assert sb.run("backup.py", "--release-hold", saved).returncode == 0
    listed = {b["path"]: b for b in json.loads(sb.run("backup.py", "--list", "--json").stdout)["backups"]}
    assert listed[saved]["held"] is False        # [retention] (and the last operations' points) decide now


def test_flags_that_cannot_go_together_exit_2(sandbox):
    sb = sandbox
    for script, args in (("backup.py", ["--list", "--prune"]), ("backup.py", ["--verify", "--list"]),
                         ("rollback.py", ["dev", "--list", "--drill"]), ("deploy.py", ["dev", "--notify"]),
                         ("deploy.py", ["dev", "--rehearse", "--dry-run"])):
        proc = sb.run(script, *args)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, (script, args, proc.stderr)


def test_status_is_not_ok_when_what_it_checks_is_not(in_place):
    sb = in_place
    sb.release("dev", {"VERSION": "2\n"}, "v2")
    assert sb.run("deploy.py", "dev").returncode == 0
    assert sb.run("backup.py", "--all").returncode == 0
    code, st = status(sb)
    assert code == 0 and st["problems"] == [], st["problems"]

    def problems():
        code, st = status(sb)
        assert code == 1
        return " | ".join(st["problems"])

    # a hand-edited tracked file in the work tree: named
    (sb.path("dev") / "VERSION").write_text("edited by hand\n")
    assert "differs from its commit: M VERSION" in problems()
    (sb.path("dev") / "VERSION").write_text("2\n")
    # the app answers for another commit than the log says
    revision = sb.path("dev") / "REVISION"
    saved = revision.read_text()
    revision.write_text(json.dumps({"commit": "0" * 40}))
    assert "the app answers for 000000000000" in problems()
    revision.write_text(saved)
    # the newest backup older than a day
    for manifest in (sb.root / "backups" / "dev").glob("*.json"):
        data = json.loads(manifest.read_text())
        data["time"] = "2020-01-01T00:00:00+00:00"
        manifest.write_text(json.dumps(data))
    assert "older than a day" in problems()
    # the database missing
    sb.manager.systemctl("stop", sb.unit("dev"))
    for suffix in ("", "-wal", "-shm"):
        path = Path(f"{sb.db_path('dev')}{suffix}")
        if path.exists():
            path.unlink()
    assert "is missing" in problems()


def test_verify_labels_warnings_and_information_apart_from_passes(in_place):
    sb = in_place
    sb.release("dev", {"VERSION": "2\n"}, "v2")
    assert sb.run("deploy.py", "dev").returncode == 0
    out = sb.run("verify.py", "dev").stdout
    assert "PASS  unit" in out
    assert "INFO  rollback drill" in out and "never drilled" in out
    assert "WARN  restart" in out and "PASS  restart" not in out


def test_a_backup_folder_out_of_inodes_is_named(tmp_path):

    import pytest

    from demo import writer
    from safedeploy import backups
    from safedeploy.errors import DeployError
    with tmpfs(tmp_path / "few-inodes", "size=8m,nr_inodes=12,mode=0700") as small:
        folder = small / "dev"
        folder.mkdir()
        n = 0
        while True:
            try:
                (folder / f"f{n}").touch()
                n += 1
            except OSError:
                break
        db = tmp_path / "live.db"
        writer.create(db)
        with pytest.raises(DeployError, match="inodes") as info:
            backups.backup_database(db, folder, "dev", "manual")
        assert str(folder) in str(info.value) and str(db) not in str(info.value)


def test_the_rows_a_restore_took_out_come_back_without_touching_newer_ones(sandbox):
    import sqlite3
    sb = sandbox
    post(sb, 2)                                            # ids 1, 2: in the point
    sb.release("dev", {"VERSION": "2\n"}, "v2")
    assert sb.run("deploy.py", "dev").returncode == 0
    post(sb, 3)                                            # ids 3, 4, 5: the restore takes them out
    plan = sb.run("rollback.py", "dev", "--with-db", "--yes")
    assert plan.returncode == 0 and "leaving the live database (by content): notes 3" in plan.stdout
    saved = log_records(sb, "dev")[-1]["pre_rollback"]
    assert "--restore-rows" in plan.stdout
    for body in ("after the restore a", "after the restore b"):   # take ids 3 and 4 again
        assert requests.post(sb.url("dev", "/notes"), data=body, timeout=5).status_code == 201
    review = sb.run("backup.py", "dev", "--restore-rows", saved, "--sql")
    assert review.returncode == 0 and review.stdout.count("INSERT OR ABORT") == 3, review.stdout + review.stderr
    assert review.stdout.count("comes back as") == 2            # ids 3 and 4 were taken again
    proc = sb.run("backup.py", "dev", "--restore-rows", saved, "--yes")
    assert proc.returncode == 0 and "verified before COMMIT" in proc.stdout, proc.stdout + proc.stderr
    conn = sqlite3.connect(sb.db_path("dev"))
    rows = dict(conn.execute("SELECT id, body FROM notes"))
    conn.close()
    assert rows[3] == "after the restore a" and rows[4] == "after the restore b"      # newer rows untouched
    assert sorted(rows.values()) == sorted(["n0", "n1", "n0", "n1", "n2", "after the restore a",
                                            "after the restore b"]) and len(rows) == 7
    again = sb.run("backup.py", "dev", "--restore-rows", saved, "--yes")
    assert again.returncode == 0 and "every row of the copy is live" in again.stdout


def test_promoting_dev_s_commit_moves_prod_s_branch_on_the_remote(sandbox):
    from demo.sandbox import git
    sb = sandbox
    verified = sb.release("dev", {"VERSION": "2\n"}, "v2")
    assert sb.run("deploy.py", "dev").returncode == 0
    refused = sb.run("deploy.py", "prod", "--yes")
    assert refused.returncode == 0 and "nothing to deploy" in refused.stdout     # main has not moved
    proc = sb.run("deploy.py", "prod", "--ref", verified, "--yes")
    assert proc.returncode == 0, proc.stderr
    assert f"pushed origin/main to {verified[:12]}" in proc.stdout
    assert git(sb.root / "origin.git", "rev-parse", "main") == verified
    again = sb.run("deploy.py", "prod", "--yes")
    assert again.returncode == 0 and "nothing to deploy" in again.stdout


def test_a_kept_database_is_compared_with_the_point_not_called_whole(sandbox):
    import sqlite3
    sb = sandbox
    post(sb, 4)
    sb.release("dev", {"VERSION": "2\n"}, "v2")
    assert sb.run("deploy.py", "dev").returncode == 0
    conn = sqlite3.connect(sb.db_path("dev"))      # the release deletes 3 rows
    conn.execute("DELETE FROM notes WHERE id <= 3")
    conn.commit()
    conn.close()
    post(sb, 1)
    proc = sb.run("rollback.py", "dev", "--yes")                      # auto: the schema matches
    assert proc.returncode == 0, proc.stderr
    assert "no write lost" not in proc.stdout
    assert "it lacks 3 row(s) of notes" in proc.stdout and "--with-db brings them back" in proc.stdout
    assert "taking out the rows written since (1 of notes)" in proc.stdout
