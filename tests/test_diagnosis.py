"""The diagnosis rules, one by one (safedeploy/diagnosis.py is pure: facts in, problems and advice out).
The end-to-end incidents, with the advice pasted, are in tests/test_advice.py."""

from safedeploy.diagnosis import Copy, Facts, diagnose, restore_target


def cmd(script, *args):
    return " ".join(["py", script, *args])


def facts(**kw):
    base = dict(env="prod", db="/srv/prod.db", unit="app.service", running="a" * 40, live_rows=10,
                copies=[Copy("prod-2-nightly", "t2", 10)], local_backups=1, newest_backup_age=60.0,
                rollback="py rollback.py prod --to p1 --yes")
    base.update(kw)
    return Facts(**base)


def first(d):
    return d.advice[0]["command"] if d.advice else None


def test_a_healthy_env_is_ok_with_no_advice():
    d = diagnose(facts(), cmd)
    assert d.ok and d.advice == []


def test_a_held_lock_says_wait_first_and_still_says_the_rest_with_no_command():
    d = diagnose(facts(lock="deploy (pid 7)", unit_failed=True, healthy=False, db_check="malformed"), cmd)
    assert not d.ok and d.advice == [] and len(d.problems) == 3
    assert "holds prod's lock" in d.problems[0] and "quick_check" in d.problems[1]


def test_an_interrupted_deploy_is_finished_by_a_deploy_of_the_commit_it_left():
    d = diagnose(facts(interrupted={"op": "deploy", "pid": 9, "step": "switch", "from": "b" * 40}), cmd)
    assert first(d) == f"py deploy.py prod --ref {'b' * 40} --yes"
    d = diagnose(facts(interrupted={"op": "rollback", "pid": 9, "step": "restore", "commit": "c" * 40}), cmd)
    assert first(d) == f"py deploy.py prod --ref {'c' * 40} --yes"
    d = diagnose(facts(interrupted={"op": "backup", "pid": 9, "step": "copy"}), cmd)
    assert first(d) == "py backup.py prod"


def test_the_restore_target_is_the_copy_with_the_most_rows_not_the_newest():
    copies = [Copy("empty-after-rebuild", "t3", 0, "local"), Copy("nightly", "t2", 12, "off-site"),
              Copy("older", "t1", 12, "off-site"), Copy("uncounted", "t0", None)]
    assert restore_target(facts(copies=copies)).id == "nightly"
    assert restore_target(facts(copies=[Copy("x", "t", None)])).id == "x"
    assert restore_target(facts(copies=[])) is None


def test_a_fresh_empty_database_is_restored_first_and_never_backed_up():
    d = diagnose(facts(live_rows=0, local_backups=0, copies=[Copy("nightly", "t2", 12, "off-site")],
                       unit_state="active"), cmd)
    assert first(d) == "py rollback.py prod --to nightly --with-db --yes"
    assert not any("backup.py" in a["command"] for a in d.advice)


def test_an_empty_database_with_no_copy_holding_rows_is_just_new():
    d = diagnose(facts(live_rows=0, copies=[Copy("nightly", "t2", 0)]), cmd)
    assert d.ok


def test_a_missing_or_damaged_database_is_restored_from_the_richest_copy():
    for kw in ({"db_exists": False}, {"db_check": "*** page 3: btree"}):
        d = diagnose(facts(copies=[Copy("new", "t3", 2), Copy("rich", "t2", 9)], **kw), cmd)
        assert first(d) == "py rollback.py prod --to rich --with-db --yes"


def test_a_data_bug_gets_code_back_without_the_database_then_the_rows():
    bug = {"tag": "deploy-1", "rows": {"post": 3}, "backup": "/b/pre-deploy.sqlite3", "running_it": True}
    d = diagnose(facts(deleted_by=bug), cmd)
    commands = [a["command"] for a in d.advice]
    assert commands[0] == "py rollback.py prod --to deploy-1 --code-only --yes"
    assert commands[1].startswith("py backup.py --rows-to-restore /b/pre-deploy.sqlite3 > ")
    assert "sqlite3 /srv/prod.db <" in commands[1]
    # once the code is back, only the rows remain; once the rows are back, nothing
    d = diagnose(facts(deleted_by={**bug, "running_it": False}, rows_missing={"post": 3}), cmd)
    assert len(d.advice) == 1 and "--rows-to-restore" in first(d)
    assert diagnose(facts(deleted_by={**bug, "running_it": False}, rows_missing={}), cmd).ok


def test_an_older_copy_gets_the_missing_rows_not_a_rollback():
    d = diagnose(facts(older_copy={"backup": "/b/nightly.sqlite3", "time": "t2", "rows": {"notes": 3}}), cmd)
    assert "older copy" in d.problems[0] and "--rows-to-restore /b/nightly.sqlite3" in first(d)
    assert "rollback.py" not in first(d)


def test_an_edited_or_missing_release_is_built_again_from_its_commit():
    for kw in ({"edited": ["app.py"]}, {"dangling": True}):
        d = diagnose(facts(**kw), cmd)
        assert first(d) == f"py deploy.py prod --ref {'a' * 40} --yes"


def test_stopped_by_hand_is_started_never_rolled_back():
    d = diagnose(facts(unit_state="inactive", socket="app.socket", socket_active=False, healthy=False), cmd)
    assert first(d) == "systemctl --user start app.socket app.service"
    # behind an active socket an idle service is not a problem: it starts on the first request
    assert diagnose(facts(unit_state="inactive", socket="app.socket", socket_active=True, healthy=True), cmd).ok


def test_failed_or_unhealthy_rolls_back_to_the_newest_safe_point():
    for kw in ({"unit_failed": True, "unit_state": "failed"}, {"healthy": False, "health": "500"}):
        assert first(diagnose(facts(**kw), cmd)) == "py rollback.py prod --to p1 --yes"


def test_a_release_rolled_back_elsewhere_is_rolled_back_here():
    d = diagnose(facts(bad_running={"env": "prod", "time": "t", "why": "health"}, env="dev"), cmd)
    assert "rolled back in prod" in d.problems[0] and first(d) == "py rollback.py prod --to p1 --yes"


def test_backups_none_or_stale_are_taken():
    assert first(diagnose(facts(local_backups=0), cmd)) == "py backup.py prod"
    assert first(diagnose(facts(newest_backup_age=3 * 24 * 3600.0), cmd)) == "py backup.py prod"
    assert first(diagnose(facts(newest_backup_age=None), cmd)) == "py backup.py prod"


def test_a_problem_no_command_fixes_is_said_without_a_command():
    d = diagnose(facts(tip_bad="the branch tip is a rolled-back release: push a fix"), cmd)
    assert not d.ok and d.advice == []


def test_a_socket_left_holding_requests_is_given_back_to_the_app():
    d = diagnose(facts(held=["/u/app.socket.d/50-safe-deploy-move.conf", "/u/app-port-holder.service"],
                       unit_state="inactive", socket="app.socket", socket_active=True), cmd)
    assert "holder" in d.problems[0]
    assert first(d) == ("rm -f /u/app.socket.d/50-safe-deploy-move.conf /u/app-port-holder.service && systemctl "
                        "--user daemon-reload && systemctl --user stop app-port-holder.service && systemctl --user "
                        "start app.service")


def test_a_stopped_app_is_named_even_when_another_problem_comes_first():
    d = diagnose(facts(bad_running={"env": "prod", "time": "t", "why": "health"}, env="dev", unit_state="inactive",
                       healthy=False), cmd)
    assert first(d) == "py rollback.py prod --to p1 --yes" and len(d.advice) == 1
    assert any("is stopped" in p for p in d.problems) and d.problems[0].startswith("dev runs ")
