"""status.py's report as a dataclass (safedeploy.report) and --alert's decisions (safedeploy.status_alerts):
pure parts, checked directly; the end-to-end runs are in test_verify_status.py, test_advice.py, test_alert_once.py."""

from safedeploy.report import ABSENT, EnvReport
from safedeploy.status_alerts import as_news, change_event

FIRST_KEYS = ["commit", "subject", "branch", "unit", "health", "last_deploy", "last_backup", "rollback", "lock",
              "interrupted", "problems", "restart_method", "warning", "replica", "log", "last_operation"]


def test_a_report_no_part_filled_has_the_first_keys_only_in_their_order():
    assert list(EnvReport().to_json()) == FIRST_KEYS
    assert EnvReport().to_json()["unit"] == {"active": False, "state": "unknown"}


def test_the_parts_keys_follow_in_the_order_they_were_added():
    r = EnvReport(head="abc", release=None, clock=None, database={"check": "ok"}, rows={}, last_drill=None,
                  last_rollback=None, last_rehearsal=None, advice=[], ok=True)
    assert list(r.to_json()) == FIRST_KEYS + ["head", "release", "clock", "database", "rows", "last_drill",
                                             "last_rollback", "last_rehearsal", "advice", "ok"]
    r.undo_rollback, r.offsite_problem = "python3 rollback.py prod --to x --with-db", "no answer"
    keys = list(r.to_json())
    assert keys.index("release") < keys.index("undo_rollback") < keys.index("clock")
    assert keys.index("rows") < keys.index("offsite_problem") < keys.index("last_drill")
    assert "undo_warning" not in keys and r.undo_warning is ABSENT


def test_each_report_has_its_own_lists():
    a, b = EnvReport(), EnvReport()
    a.problems.append("x")
    assert b.problems == []


def report(ok, check="ok", advice=()):
    return {"ok": ok, "problems": [] if ok else ["down"], "advice": list(advice), "database": {"check": check}}


def test_alerts_once_per_change():
    assert change_event("prod", report(True), None, False) is None           # never looked, OK: no news
    assert change_event("prod", report(False), False, False) is None         # still not OK: said already
    assert change_event("prod", report(True), True, False) is None
    problem = change_event("prod", report(False, advice=[{"why": "w", "command": "c"}]), None, False)
    assert problem["event"] == "problem" and problem["command"] == "c" and problem["message"] == "down"
    assert change_event("prod", report(True), False, False)["event"] == "recovered"


def test_a_database_turning_damaged_is_news_at_once():
    damaged = report(False, check="malformed")
    was = as_news(damaged, False, False)
    assert was is None
    assert change_event("prod", damaged, was, False)["event"] == "database-corrupt"
    assert as_news(damaged, False, True) is False         # said already
    assert change_event("prod", damaged, False, True) is None


def test_a_look_that_operations_keep_changing_under_is_taken_again_then_said_unsettled(monkeypatch):
    """report.look_at takes a look again when the lock's holder or the newest operation log changed during
    it; after LOOKS looks that each changed, it says so and gives no command."""
    import itertools
    from types import SimpleNamespace

    from safedeploy import report

    ticks = itertools.count()
    looks = []

    def look_once(config, env, holder):
        looks.append(holder)
        return report.EnvReport(problems=[], advice=[{"why": "w", "command": "c"}], ok=True)

    monkeypatch.setattr(report, "look_once", look_once)
    monkeypatch.setattr(report, "settled", lambda env: (None, f"log-{next(ticks)}"))
    r = report.look_at(None, SimpleNamespace(name="dev"))
    assert len(looks) == report.LOOKS and r.advice == [] and r.ok is False
    assert r.problems[0].startswith("operations started or ended on dev during each of 3 looks"), r.problems
    steady = iter([(None, "a"), (None, "b"), (None, "b")])      # one change, then a settled look
    monkeypatch.setattr(report, "settled", lambda env: next(steady))
    looks.clear()
    r = report.look_at(None, SimpleNamespace(name="dev"))
    assert len(looks) == 2 and r.ok and r.advice
