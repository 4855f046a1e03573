"""The rules that decide, checked directly, in milliseconds: facts in, a decision and its reasons out
(safedeploy.decisions, and the readers of the deploy log in safedeploy.records)."""

import pytest

from safedeploy import decisions, journals, records, retention, runbook
from safedeploy.backups import Backup
from safedeploy.retention import prune_plan
from safedeploy.decisions import DatabaseFacts, DeployFacts, database_decision, deploy_gates
from safedeploy.errors import EXIT_FAILED, EXIT_HUMAN
from safedeploy.points import Point

A, B = "a" * 40, "b" * 40


def facts(**kw):
    base = dict(env="prod", branch="main", target=B, subject="the fix", head=A, fast_forward=True)
    return DeployFacts(**{**base, **kw})


def test_a_plain_fast_forward_passes_every_gate():
    gates = deploy_gates(facts(), force=False)
    assert gates.refusal is None and gates.forced == []


def test_the_first_refusal_names_what_to_do():
    gates = deploy_gates(facts(promote_from="dev", verified_in_source=False, promotion_hint="dev last verified X"),
                         force=False)
    assert gates.refusal.name == "promotion" and "dev last verified X" in gates.refusal.why
    bad = {"time": "2026-12-01T10:00:00+00:00", "why": "health failed", "env": "dev"}
    gates = deploy_gates(facts(bad_mark=bad, fast_forward=False), force=False)
    assert gates.refusal.name == "bad release" and "rolled back in dev" in gates.refusal.why


def test_force_passes_every_gate_and_says_why_each_was_overridden():
    gates = deploy_gates(facts(bad_mark={"time": "t", "why": "w"}, promote_from="dev", verified_in_source=False,
                               require_rehearsal=True, rehearsed=False, fast_forward=False), force=True)
    assert gates.refusal is None and len(gates.forced) == 4


def test_going_backwards_is_rollback_s_job_and_a_divergence_is_a_merge():
    older = deploy_gates(facts(fast_forward=False, target_is_older=True), force=False).refusal.why
    diverged = deploy_gates(facts(fast_forward=False, target_is_older=False), force=False).refusal.why
    assert "rollback.py" in older and "Merge" in diverged


@pytest.mark.parametrize("target, running, head, serving, present, nothing", [
    (A, A, A, A, True, True),
    (A, A, A, None, True, True),        # in place: nothing serves from a release
    (B, A, A, A, True, False),          # a new target
    (A, A, B, A, True, False),          # the tree was moved by hand
    (A, A, A, B, True, False),          # current and the log say A, B serves (killed after the switch)
    (A, A, A, A, False, False),         # the running release was deleted: repaired
])
def test_nothing_to_deploy_only_when_everything_agrees(target, running, head, serving, present, nothing):
    assert decisions.nothing_to_deploy(target, running, head, serving, present) is nothing


def point(id, kind="before-deploy", backup=None, when="2026-12-01T10:00:00+00:00"):
    return Point(id, kind, A, when, backup)


def test_the_point_is_what_to_names_else_before_the_last_good_deploy():
    points = [point("dev-before-deploy-2"), point("dev-20261201-nightly", "backup"), point("dev-before-deploy-1")]
    assert decisions.choose_point(points, "dev-before-deploy-1", None)[0].id == "dev-before-deploy-1"
    assert decisions.choose_point(points, None, "dev-before-deploy-1")[0].id == "dev-before-deploy-1"
    assert decisions.choose_point(points, None, None)[0].id == "dev-before-deploy-2"
    missing, why = decisions.choose_point(points, "nope", None)
    assert missing is None and "no such rollback point" in why
    assert decisions.choose_point([point("x", "backup")], None, None)[0] is None



def test_every_name_status_prints_for_a_copy_names_its_point():
    """A point's id, its backup's id, file name and path all name it (status and --list print each)."""
    from types import SimpleNamespace
    saved = SimpleNamespace(path="/srv/backups/dev/dev-20261201-031700-nightly.sqlite3")
    points = [point("dev-before-deploy-2"), point("dev-20261201-031700-nightly", "backup", backup=saved)]
    for name in ("dev-20261201-031700-nightly", "dev-20261201-031700-nightly.sqlite3", saved.path):
        assert decisions.choose_point(points, name, None)[0] is points[1], name
    assert decisions.choose_point(points, "/elsewhere/dev-20261201-031700-nightly.sqlite3", None)[0] is None

def dbf(**kw):
    return DatabaseFacts(**{**dict(point_id="p", has_backup=True, backup_path="/b/p.sqlite3", live_schema="s1",
                                   point_schema="s1"), **kw})


@pytest.mark.parametrize("mode, f, restore, words", [
    ("code-only", dbf(live_schema="s2"), False, "--code-only"),
    ("with-db", dbf(), True, "--with-db"),
    ("auto", dbf(has_backup=False), False, "no database backup"),
    ("auto", dbf(live_exists=False), True, "no live database"),
    ("auto", dbf(live_check="database disk image is malformed"), True, "fails quick_check"),
    ("auto", dbf(live_schema="s2"), True, "a migration ran since"),
    ("auto", dbf(), False, "rows were not compared"),
    ("auto", dbf(compared=True), False, "holds every row"),
    ("auto", dbf(compared=True, rows_lacking={"post": 2}, rows_newer={"user": 1}), False, "lacks 2 row(s) of post"),
])
def test_the_database_decision(mode, f, restore, words):
    got, why = database_decision(mode, f)
    assert got is restore and words in why


def test_with_db_needs_a_backup():
    with pytest.raises(ValueError, match="has no database backup"):
        database_decision("with-db", dbf(has_backup=False))


@pytest.mark.parametrize("journal, action", [
    (journals.DeployJournal(step="build", from_=A), decisions.NOTHING_LIVE),
    (journals.DeployJournal(step="backup", from_=A), decisions.NOTHING_LIVE),
    (journals.DeployJournal(step=None, from_=A), decisions.NOTHING_LIVE),
    (journals.DeployJournal(step="switch", from_=None), decisions.NOTHING_LIVE),     # nothing known ran
    (journals.DeployJournal(step="switch", from_=A), decisions.UNDO_DEPLOY),
    (journals.DeployJournal(step="record", from_=A), decisions.UNDO_DEPLOY),
    (journals.RollbackJournal(step="tag", commit=A), decisions.FINISH_ROLLBACK),
    (journals.ConversionJournal(step="build", saved="/s"), decisions.NOTHING_LIVE),
    (journals.ConversionJournal(step="data", saved="/s"), decisions.PUT_BACK_CONVERSION),
    (journals.RehearsalJournal(step="health"), decisions.CLEAN_REHEARSAL),
    (journals.DrillJournal(step="start"), decisions.CLEAN_REHEARSAL),
    (journals.BackupJournal(step="copy"), decisions.NOTHING_LIVE),
    (journals.DamagedJournal(why="not valid JSON"), decisions.NOTHING_LIVE),   # only after damaged.rebuild
])
def test_the_recovery_follows_the_runbook_s_own_phases(journal, action):
    assert decisions.recovery_action(journal, runbook.before_change()) == action


def test_the_exit_code_boundary():
    assert decisions.failure_code(changed=False, put_back=False) == EXIT_FAILED
    assert decisions.failure_code(changed=True, put_back=True) == EXIT_FAILED
    assert decisions.failure_code(changed=True, put_back=False) == EXIT_HUMAN


def test_the_log_s_readers():
    log = [records.DeployRecord(env="dev", result="ok", tag="t1", from_=A, to=B, running=B, backup="/b/1"),
           records.RollbackRecord(env="dev", result="ok", point="t1", from_=B, to=A, running=A, backup="/b/2"),
           records.DeployRecord(env="dev", result="failed", tag="t2", from_=A, to=B, running=A),
           records.RehearsalRecord(env="dev", result="ok", tree="T", commit=B)]
    assert records.running_commit(log) == A and records.last_ok_deploy(log).tag == "t1"
    assert retention.protected_by_records(log) == {"/b/1": f"rollback point of the deploy at {log[0].time}",
                                              "/b/2": f"rollback point of the rollback at {log[1].time}"}
    assert retention.needed_commits(log) == {A, B} and records.passed_rehearsal(log, "T").commit == B
    again = [records.from_json(r.to_json()) for r in log]
    assert again == log and log[0].to_json()["from"] == A and "from_" not in log[0].to_json()
    assert records.from_json({"kind": "nonsense"}) is None and records.from_json([1]) is None


def b(path, when, reason="nightly", held=False):
    return Backup(env="dev", path=path, time=when, bytes=1, sha256="x", reason=reason, page_size=4096, page_count=1,
                  schema="s", source="", commit="", seconds=0.0, held=held)


def test_retention_keeps_what_is_protected_whatever_the_rules_say():
    found = [b(f"/b/dev-2026112{d}-031700-nightly.sqlite3", f"2026-11-2{d}T03:17:00+00:00") for d in range(1, 9)]
    oldest = found[0]
    keep, remove = prune_plan(found, {"daily": 2, "weekly": 0, "monthly": 0}, {oldest.path: "a rollback point"})
    assert keep[oldest.path] == "a rollback point"
    assert len(keep) == 3 and len(remove) == 5


def test_a_holder_command_line_escapes_what_systemd_would_expand():
    from safedeploy.unitfiles import exec_line
    assert exec_line(["/usr/bin/python3", "/srv/a b/50%$HOME.py"]) == "/usr/bin/python3 '/srv/a b/50%%$$HOME.py'"


def test_a_held_app_starts_beside_the_holder_only_when_it_takes_its_socket_and_the_holder_sleeps():
    from safedeploy.unitfiles import holder_sleeps, names_socket, port_holder_files
    sleeping, listener = (list(port_holder_files("app.service", command).values())[1]
                          for command in (None, "/usr/bin/python3 /srv/maintenance.py --retry-after 35"))
    assert holder_sleeps(sleeping) and not holder_sleeps(listener)
    assert names_socket(["[Service]\nExecStart=/bin/app\nSockets=app.socket\n"], "app.service")
    assert names_socket(["[Service]\nSockets=other.socket app.socket\n"], "app.service")
    assert not names_socket(["[Service]\nRequires=app.socket\n"], "app.service")     # it would bind the port itself
    assert not names_socket(["[Service]\nSockets=app.socket\n", "[Service]\nSockets=\n"], "app.service")
    assert names_socket(["[Service]\nSockets=app.socket\n", "[Service]\nSockets=other.socket\n"], "app.service")


def test_the_503_listener_is_asked_for_only_past_what_clients_wait():
    assert decisions.maintenance(None)[0] is None            # not rehearsed: the queue
    assert decisions.maintenance(29.9)[0] is None
    assert decisions.maintenance(30.5)[0] == 35 and decisions.maintenance(41.0)[0] == 45


# -- the seal of a database rollback: the plan's count or a new one ------------------------------------------
def wal_mark(header=b"h" * 48, db=(1, 2, 4096, 10), wal=(1, 3, 8272, 11)):
    from safedeploy.dbfiles import WalMark
    return WalMark(header, db, wal)


def test_the_seal_takes_the_plans_count_only_when_nothing_can_have_been_written():
    same = wal_mark()
    ok, why = decisions.plan_count_reusable(True, True, same, wal_mark(), wal_mark())
    assert ok and "nothing was written" in why
    refusals = {
        "a prompt": (False, True, same, same, same),
        "closed before the stop": (True, False, same, same, same),
        "not looked at the stop": (True, True, same, same, None),
        "not in WAL mode": (True, True, wal_mark(header=None), wal_mark(header=None), wal_mark(header=None)),
        "no -wal file": (True, True, wal_mark(wal=None), wal_mark(wal=None), wal_mark(wal=None)),
        "written during the plan": (True, True, same, wal_mark(header=b"i" * 48), wal_mark(header=b"i" * 48)),
        "a commit after the plan": (True, True, same, same, wal_mark(header=b"i" * 48)),
        "the WAL grew": (True, True, same, same, wal_mark(wal=(1, 3, 12400, 11))),
        "the file touched": (True, True, same, same, wal_mark(db=(1, 2, 4096, 12))),
        "another file": (True, True, same, same, wal_mark(db=(1, 9, 4096, 10))),
        "the WAL replaced": (True, True, same, same, wal_mark(wal=(1, 4, 8272, 11))),
    }
    for what, facts in refusals.items():
        assert decisions.plan_count_reusable(*facts)[0] is False, what
