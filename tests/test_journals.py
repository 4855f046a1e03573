"""The typed journals (safedeploy/journals.py), directly: each kind written and read back whole, a torn or
changed journal read as damaged (never as none, never as defaults), and the journals the previous version
wrote (no checksum, sorted keys) read and acted on as before. The kills themselves: tests/test_faults.py,
bench/fault_matrix.py; a torn journal on the sandbox: tests/test_records.py."""

import json
from pathlib import Path

import pytest

from safedeploy import decisions, journals, runbook
from safedeploy.journals import (BackupJournal, ConversionJournal, DamagedJournal, DeployJournal, DrillJournal, Op,
                                 RehearsalJournal, RollbackJournal)

A, B = "a" * 40, "b" * 40
BACKUP = "/srv/backups/dev/dev-20261205-121214-pre-deploy.sqlite3"

# What main at 3a65741 wrote (state.Journal: json.dumps(sort_keys=True), no checksum), each at the step
# shown, produced by that code replaying its runner's start and its steps' update() calls.
PREVIOUS = {
    "deploy": '{"backup": "/srv/backups/dev/dev-20261205-121214-pre-deploy.sqlite3", "command": "deploy.py dev", '
              '"from": "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "op": "deploy", "pid": 329, "previous_release": '
              '"20261205-101010-aaaaaaaaaaaa", "release": "20261205-121212-bbbbbbbbbbbb", "started": '
              '"2026-12-05T12:39:43.356+00:00", "step": "health", "tag": "dev-before-deploy-20261205-121213", '
              '"target": "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb", "v": 2}',
    "rollback": '{"aside": "/srv/backups/dev/dev-20261205-121300-pre-rollback.sqlite3", "backup": '
                '"/srv/backups/dev/dev-20261205-121214-pre-deploy.sqlite3", "command": "rollback.py dev --yes", '
                '"commit": "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "db_only": false, "db_why": "the schema '
                'changed", "from": "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb", "op": "rollback", "pid": 329, "point": '
                '"dev-before-deploy-20261205-121213", "release": "20261205-101010-aaaaaaaaaaaa", "restore_db": true, '
                '"started": "2026-12-05T12:39:43.365+00:00", "step": "aside", "v": 2}',
    "convert": '{"command": "adopt.py dev", "commit": "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "converting": true, '
               '"first": "20261205-101010-aaaaaaaaaaaa", "made_root": true, "op": "convert", "pairs": '
               '[["/srv/app/db.sqlite3", "/srv/app.releases/shared/db.sqlite3"]], "pid": 329, "saved": '
               '"/home/u/.local/state/safe-deploy/.dev-units-20261205", "started": "2026-12-05T12:39:43.366+00:00", '
               '"step": "data", "v": 2}',
    "rehearse": '{"command": "deploy.py dev --rehearse", "commit": "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb", "op": '
                '"rehearse", "pid": 329, "scratch": "/srv/backups/dev/.rehearsal-20261205-x", "started": '
                '"2026-12-05T12:39:43.368+00:00", "step": "health", "units": ["sd-rehearse-dev-1", ""], "v": 2}',
    "drill": '{"command": "rollback.py dev --drill", "op": "drill", "pid": 329, "point": '
             '"dev-before-deploy-20261205-121213", "scratch": "/srv/backups/dev/.drill-20261205-x", "started": '
             '"2026-12-05T12:39:43.369+00:00", "step": "start", "units": ["sd-drill-dev-1"], "v": 2}',
    "backup": '{"command": "backup.py dev", "op": "backup", "pid": 329, "reason": "nightly", "started": '
              '"2026-12-05T12:39:43.369+00:00", "step": "copy"}',
}


def written(tmp_path, text):
    path = journals.journal_path(tmp_path, "dev")
    path.write_text(text)
    return path


# -- each kind, written whole and read back as itself ------------------------------------------------------
KINDS = [
    DeployJournal(target=B, from_=A, previous_release="r1"),
    RollbackJournal(point="p1", commit=A, restore_db=True, db_why="the schema changed", release="r1",
                    db_only=True, backup=BACKUP, from_=B),
    ConversionJournal(saved="/s/units", commit=A, converting=True, made_root=True, pairs=[["/a/db", "/b/db"]]),
    RehearsalJournal(scratch="/b/.rehearsal-1", units=["u1", ""], commit=B),
    DrillJournal(scratch="/b/.drill-1", units=["u2"], point="p1"),
    BackupJournal(reason="nightly"),
]


@pytest.mark.parametrize("journal", KINDS, ids=lambda j: str(j.op))
def test_each_kind_is_read_back_as_it_was_written(tmp_path, journal):
    path = journals.journal_path(tmp_path, "dev")
    journal.start(path)
    assert journal.pid and journal.started and journal.v == journals.VERSION and journal.step is None
    journal.step = "health"                    # what the step clock does as a step begins
    if isinstance(journal, DeployJournal):
        journal.release, journal.tag, journal.backup = "r2", "dev-before-deploy-x", BACKUP
    journal.save()
    back = journals.read(path)
    assert type(back) is type(journal) and back == journal and back.file == path
    assert json.loads(path.read_text())["op"] == str(journal.op)
    assert path.stat().st_mode & 0o777 == 0o600
    journal.finish()
    assert journals.read(path) is None and not path.exists()
    journal.step = "later"
    journal.save()                             # after its end, as the step clock of a nested run may
    assert not path.exists()


def test_the_keys_on_disk_are_the_previous_version_s():
    for kind, text in PREVIOUS.items():
        old = json.loads(text)
        j = journals.from_json(old, Path("/x"))
        now = j.to_json()
        assert {k: v for k, v in now.items() if k in old} == old, kind
        assert set(now) - set(old) <= {"v"}, kind          # a backup's journal had no version


# -- damage: never read as no journal, never as a journal of defaults ---------------------------------------
def test_a_torn_journal_is_damaged_and_keeps_what_it_shows(tmp_path):
    path = journals.journal_path(tmp_path, "dev")
    j = RollbackJournal(point="p1", commit=A, restore_db=True, db_only=False, backup=BACKUP, from_=B)
    j.start(path)
    data = path.read_bytes()
    for cut in (2, 12, len(data) // 2):          # 1 byte: only the newline, still whole
        path.write_bytes(data[:-cut])
        back = journals.read(path)
        assert isinstance(back, DamagedJournal), cut
        assert back.path == str(path) and back.why
    path.write_bytes(data[:data.index(b'"backup"') + 12])        # torn inside the field after the ones below
    back = journals.read(path)
    assert isinstance(back, DamagedJournal)
    assert back.op is Op.ROLLBACK and back.commit == A and back.restore_db is True and back.db_only is False
    assert "commit=" + A in back.shows() and "op=rollback" in back.shows()


def test_a_journal_changed_after_it_was_written_fails_its_checksum(tmp_path):
    path = journals.journal_path(tmp_path, "dev")
    DeployJournal(target=B, from_=A).start(path)
    path.write_text(path.read_text().replace(A, "c" + A[1:]))       # still JSON, still a deploy journal
    back = journals.read(path)
    assert isinstance(back, DamagedJournal) and "checksum" in back.why and back.from_ == "c" + A[1:]


@pytest.mark.parametrize("text, why", [
    ("", "not valid JSON"),
    ("\0\0\0\0", "not valid JSON"),
    (b"\xff\xfe{}", "not UTF-8"),
    ("[1, 2]", "not a JSON object"),
    ('{"step": "build"}', "names no operation"),
    ('{"op": "teleport", "step": "jump"}', "does not know (teleport)"),
    ('{"op": "deploy", "from": 7}', "'from'"),
    ('{"op": "rollback", "commit": "' + A + '", "restore_db": "yes"}', "'restore_db'"),
    ('{"op": "rehearse", "units": "u1"}', "'units'"),
    ('{"op": "deploy", "pid": true}', "'pid'"),
    ('{"op": "rollback", "point": "p1"}', "lacks its 'commit'"),
    ('{"op": "convert", "step": "data"}', "lacks its 'saved'"),
])
def test_what_is_not_a_whole_journal_is_damaged(tmp_path, text, why):
    path = journals.journal_path(tmp_path, "dev")
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    back = journals.read(path)
    assert isinstance(back, DamagedJournal) and why in back.why, back
    assert back.to_json()["damaged"] is True


def test_a_key_not_known_is_dropped_and_one_missing_takes_its_default(tmp_path):
    back = journals.read(written(tmp_path, '{"op": "deploy", "step": "switch", "from": "' + A + '", "later": 1}'))
    assert isinstance(back, DeployJournal)
    assert back.from_ == A and back.target is None and back.backup is None and back.pid is None and back.v is None
    assert "later" not in back.to_json()
    assert back.describe() == "deploy by pid ? (?), started ?, interrupted at step switch"


def test_status_shows_the_same_keys_for_every_kind(tmp_path):
    for kind, text in PREVIOUS.items():
        back = journals.read(written(tmp_path, text))
        shown = back.summary().to_json()
        assert list(shown) == ["op", "pid", "command", "started", "step", "from", "commit"], kind
        assert shown["op"] == kind and shown["pid"] == 329
        assert journals.Interrupted.from_json(shown) == back.summary()
    shown = journals.read(written(tmp_path, PREVIOUS["rollback"])).summary()
    assert (shown.from_, shown.commit) == (B, A)


# -- the previous version's journals: read, and the recovery acts on them as before ------------------------
ACTIONS = {"deploy": decisions.UNDO_DEPLOY, "rollback": decisions.FINISH_ROLLBACK,
           "convert": decisions.PUT_BACK_CONVERSION, "rehearse": decisions.CLEAN_REHEARSAL,
           "drill": decisions.CLEAN_REHEARSAL, "backup": decisions.NOTHING_LIVE}


@pytest.mark.parametrize("kind", sorted(PREVIOUS))
def test_a_journal_of_the_previous_version_is_read_and_recovered(tmp_path, kind):
    back = journals.read(written(tmp_path, PREVIOUS[kind]))
    assert back is not None and not isinstance(back, DamagedJournal)
    assert str(back.op) == kind and back.pid == 329 and back.step == json.loads(PREVIOUS[kind])["step"]
    assert decisions.recovery_action(back, runbook.before_change()) == ACTIONS[kind]


def test_the_previous_version_s_fields_reach_the_recovery():
    d = journals.from_json(json.loads(PREVIOUS["deploy"]), Path("/x"))
    assert isinstance(d, DeployJournal)
    assert (d.from_, d.target, d.tag, d.backup, d.previous_release) == (
        A, B, "dev-before-deploy-20261205-121213", BACKUP, "20261205-101010-aaaaaaaaaaaa")
    r = journals.from_json(json.loads(PREVIOUS["rollback"]), Path("/x"))
    assert isinstance(r, RollbackJournal)
    assert (r.commit, r.restore_db, r.db_only, r.db_why, r.from_, r.point) == (
        A, True, False, "the schema changed", B, "dev-before-deploy-20261205-121213")
    c = journals.from_json(json.loads(PREVIOUS["convert"]), Path("/x"))
    assert isinstance(c, ConversionJournal)
    assert c.pairs == [["/srv/app/db.sqlite3", "/srv/app.releases/shared/db.sqlite3"]] and c.made_root
    assert c.first == "20261205-101010-aaaaaaaaaaaa"
    s = journals.from_json(json.loads(PREVIOUS["rehearse"]), Path("/x"))
    assert isinstance(s, RehearsalJournal) and s.units == ["sd-rehearse-dev-1", ""]


def test_a_damaged_journal_is_never_saved():
    with pytest.raises(ValueError):
        DamagedJournal(file=Path("/nonexistent/x.json")).save()
    with pytest.raises(ValueError):
        DeployJournal().save()                     # not started: it has no file
