"""The diagnosis rules, one by one (safedeploy/diagnosis.py is pure: facts in, problems and advice out).
The end-to-end incidents, with the advice pasted, are in tests/test_advice.py."""

from safedeploy.datafacts import Outstanding, best_copy
from safedeploy.diagnosis import Facts, diagnose
from safedeploy.journals import Interrupted


def cmd(script, *args):
    return " ".join(["py", script, *args])


def facts(**kw):
    base = dict(env="prod", db="/srv/prod.db", unit="app.service", running="a" * 40, live_rows=10,
                local_backups=1, newest_backup_age=60.0,
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


def test_what_an_operation_under_way_does_is_said_as_such_and_only_while_it_holds_the_lock():
    """A database renamed aside and a socket held for the holder are what a rollback with the database does
    in its middle: said as that while one of the tool's operations holds the lock; as a failure without it."""
    held = ["/run/user/0/systemd/user/app-port-holder.service"]
    d = diagnose(facts(lock="rollback (pid 7)", mid_operation=True, db_exists=False, held=held, socket="app.socket"), cmd)
    assert d.advice == [] and "holds prod's lock" in d.problems[0], d.problems
    assert "is not in place now: the operation under way may be replacing it" in d.problems[1]
    assert "while the operation under way has the app stopped" in d.problems[2]
    assert not any("missing" in p or "did not finish" in p for p in d.problems)
    d = diagnose(facts(lock="pid 9 (flock ...), not a safe-deploy operation", db_exists=False, held=held), cmd)
    assert "is missing" in d.problems[1] and "did not finish" in d.problems[2] and d.advice == []
    d = diagnose(facts(db_exists=False, held=held), cmd)
    assert "is missing" in d.problems[0] and first(d)


def test_an_interrupted_deploy_is_finished_by_a_deploy_of_the_commit_it_left():
    d = diagnose(facts(interrupted=Interrupted(op="deploy", pid=9, step="switch", from_="b" * 40)), cmd)
    assert first(d) == f"py deploy.py prod --ref {'b' * 40} --yes"
    d = diagnose(facts(interrupted=Interrupted(op="rollback", pid=9, step="restore", commit="c" * 40)), cmd)
    assert first(d) == f"py deploy.py prod --ref {'c' * 40} --yes"
    d = diagnose(facts(interrupted=Interrupted(op="backup", pid=9, step="copy")), cmd)
    assert first(d) == "py backup.py prod"


def copy(id, total, missing=None, reason="nightly", where="local", held=False, time="t2", restorable=None, **kw):
    missing = missing if missing is not None else {"notes": total}
    return Outstanding(id=id, path=f"/b/{id}.sqlite3" if where == "local" else None, where=where, reason=reason,
                       time=time, held=held, total=total, missing=missing,
                       restorable=sum(missing.values()) if restorable is None else restorable, **kw)


def test_the_restore_target_is_the_copy_with_the_most_rows_not_the_newest():
    found = [copy("empty-after-rebuild", 0, {}, time="t3"), copy("nightly", 12, where="off-site"),
             copy("older", 12, where="off-site", time="t1"), copy("save", 99, reason="pre-rollback", held=True)]
    assert best_copy(found).id == "nightly"
    assert best_copy([]) is None


def test_a_fresh_database_is_restored_alone_first_and_never_backed_up():
    rich = copy("nightly", 12, where="off-site")
    d = diagnose(facts(live_rows=3, local_backups=0, outstanding=[rich], best=rich), cmd)
    assert first(d) == "py rollback.py prod --to nightly --db-only --yes"
    assert "a backup now would copy it" in d.problems[0]
    assert not any("backup.py" in a["command"] for a in d.advice)


def test_an_empty_database_with_no_copy_holding_rows_is_just_new():
    assert diagnose(facts(live_rows=0), cmd).ok


def test_a_missing_or_damaged_database_is_restored_alone_from_the_richest_copy():
    rich = copy("rich", 9)
    for kw in ({"db_exists": False}, {"db_check": "*** page 3: btree",
                                      "salvage": {"rows": 7, "bad_pages": 2, "lost_estimate": 3, "lost_and_found": 0}}):
        d = diagnose(facts(outstanding=[copy("new", 2, time="t3"), rich], best=rich, **kw), cmd)
        assert first(d) == "py rollback.py prod --to rich --db-only --yes"
        assert len(d.advice) == 1
    assert "still holds 7 users' row(s)" in d.problems[0] and "(3 row(s)" in d.problems[0]


def test_a_newer_moment_in_the_continuous_copies_is_copied_first():
    rich = copy("rich", 9, time="2026-12-04T10:00:00+00:00")
    d = diagnose(facts(db_exists=False, outstanding=[rich], best=rich, replicated=True,
                       replica_newest="2026-12-04T11:00:00+00:00"), cmd)
    assert first(d) == "py backup.py prod --at latest"
    d = diagnose(facts(db_exists=False, outstanding=[rich], best=rich, replicated=True,
                       replica_newest="2026-12-04T11:00:00+00:00", point_in_time=["2026-12-04T11:00:00+00:00"]), cmd)
    assert first(d) == "py rollback.py prod --to rich --db-only --yes"


def test_a_data_bug_gets_code_back_without_the_database_then_the_rows():
    pre = copy("pre-deploy", 10, {"post": 3}, reason="pre-deploy", held=True)
    bug = {"tag": "deploy-1", "to": "b" * 40, "rows": {"post": 3}, "backup": pre.path, "running_it": True,
           "uncopied": {}}
    d = diagnose(facts(deleted_by=bug, outstanding=[pre]), cmd)
    commands = [a["command"] for a in d.advice]
    assert commands == ["py rollback.py prod --to deploy-1 --code-only --yes",
                        "py backup.py prod --restore-rows pre-deploy --yes"]
    # once the code is back, only the rows remain; once the rows are back, nothing
    d = diagnose(facts(deleted_by={**bug, "running_it": False}, outstanding=[pre]), cmd)
    assert [a["command"] for a in d.advice] == ["py backup.py prod --restore-rows pre-deploy --yes"]
    assert diagnose(facts(deleted_by={**bug, "running_it": False}), cmd).ok


def test_rows_no_copy_holds_are_counted_and_taken_from_the_continuous_copies():
    bug = {"tag": "deploy-1", "to": "b" * 40, "rows": {"post": 4}, "backup": "/b/pre.sqlite3", "running_it": False,
           "uncopied": {"post": 1}, "switched_at": "2026-12-04T10:00:00+00:00"}
    d = diagnose(facts(deleted_by=bug), cmd)
    assert not d.ok and d.advice == [] and "1 row(s) that no copy held" in d.problems[0]
    d = diagnose(facts(deleted_by=bug, replicated=True), cmd)
    assert first(d) == "py backup.py prod --at 2026-12-04T10:00:00+00:00"
    assert diagnose(facts(deleted_by=bug, replicated=True, point_in_time=["2026-12-04T09:59:59+00:00"]), cmd).ok


def test_rows_outside_the_live_database_keep_status_not_ok_until_back_or_dismissed():
    save = copy("save", 50, {"notes": 4}, reason="pre-rollback", held=True)
    d = diagnose(facts(outstanding=[save]), cmd)
    assert not d.ok and first(d) == "py backup.py prod --restore-rows save --yes"
    assert "--release-hold save" in d.problems[0]
    # what the tool cannot put back is said, and no command loops on it
    stuck = copy("save", 50, {"notes": 4}, reason="pre-rollback", held=True, restorable=0,
                 left_out={"notes: column mood of the copy is not in the live schema": 4})
    d = diagnose(facts(outstanding=[stuck]), cmd)
    assert not d.ok and d.advice == [] and "column mood" in d.problems[0]
    # a restore that failed when pasted is not advised again unchanged
    d = diagnose(facts(outstanding=[save], failed_restores={"save": "a trigger would delete live rows"}), cmd)
    assert d.advice == [] and "--restore-rows save --sql" in d.problems[0]


def test_a_hung_process_is_restarted_and_a_release_failing_after_a_fresh_start_rolled_back():
    d = diagnose(facts(healthy=False, health="timed out", uptime=3600.0, health_timeout=5.0,
                       serving_unit="app.service"), cmd)
    assert first(d) == "systemctl --user restart app.service" and "does not answer" in d.problems[0]
    d = diagnose(facts(healthy=False, health="timed out", uptime=4.0, health_timeout=5.0), cmd)
    assert first(d) == "py rollback.py prod --to p1 --yes"


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
    for kw in ({"unit_failed": True, "unit_state": "failed"}, {"healthy": False, "health": "500", "uptime": 2.0}):
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
