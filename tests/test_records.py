"""Records that cannot be silently lost (issue 29, findings 1 and 2): the bad-release marks, the deploy
log and the journal, torn as a full disk or a crash tears them, on the real sandbox; and the line
format's rules directly."""

import json
import os
import subprocess
from pathlib import Path

import requests

from demo.sandbox import REPO_ROOT
from safedeploy import journals
from safedeploy.state import JsonLog

from helpers import log_records


def version(sb, env):
    return requests.get(sb.url(env, "/"), timeout=5).json()["version"]


def cut(path, n):
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:-n])


# -- the line format ----------------------------------------------------------------------------------
def test_a_torn_last_line_and_a_changed_line_are_damage_named_by_file_and_line(tmp_path):
    from safedeploy import integrity
    log = JsonLog(tmp_path / "dev.bad.jsonl")
    path = log.path
    path.write_text('{"tree": "old", "bad": true}\n')         # an older version's line: no checksum, accepted
    log.append({"tree": "a" * 40, "bad": True, "why": "rolled back"})
    log.append({"tree": "b" * 40, "bad": True, "why": "rolled back"})
    assert [r["tree"] for r in log.read()] == ["old", "a" * 40, "b" * 40]
    cut(path, 3)                                                # a torn last line
    scan = log.scan()
    assert [r["tree"] for r in scan.records] == ["old", "a" * 40]
    assert [(d.path, d.line) for d in scan.damage] == [(str(path), 3)]
    assert f"{path} line 3" in scan.damage[0].describe()
    log.append({"tree": "c" * 40, "bad": False})              # the torn line costs only itself
    text = path.read_text().replace('"why": "rolled back"', '"why": "rolled bask"', 1)   # a changed line
    path.write_text(text)
    scan = log.scan()
    assert [r["tree"] for r in scan.records] == ["old", "c" * 40]
    assert [d.line for d in scan.damage] == [2, 3]
    assert "checksum" in scan.damage[0].why
    moved = integrity.set_aside(path)                         # the repair keeps what it moves
    assert [d.line for d in moved] == [2, 3]
    assert not log.scan().damage and [r["tree"] for r in log.read()] == ["old", "c" * 40]
    assert integrity.aside_path(path).read_text().count("\n") == 2
    assert ("b" * 40) in [t for t, _ in integrity.salvaged_trees(path)]    # still read as a possible mark


def test_a_record_being_appended_is_not_read_as_damage(tmp_path, monkeypatch):
    """A line longer than what is left of a page reaches the file in parts: a reader without the log's
    flock could read half of it and call it damaged (status saying a journal is damaged while a deploy
    writes it). The append is held half-way here, under its exclusive flock, as a page boundary holds it:
    the reader waits and reads it whole. A holder that keeps the flock past READ_LOCK_WAIT does not stop
    the read, and a set-aside under the flock sees the log as it is."""
    import fcntl
    import threading
    import time
    from safedeploy import integrity
    log = JsonLog(tmp_path / "prod.deploys.jsonl")
    log.append({"env": "prod", "tag": "v1"})
    line = integrity.encode({"env": "prod", "tag": "v2", "pad": "x" * 6000})
    fd = os.open(log.path, os.O_WRONLY | os.O_APPEND)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, line[:3000])
    found = []
    reader = threading.Thread(target=lambda: found.append(log.scan()))
    reader.start()
    time.sleep(0.3)
    assert not found                            # it waits for the append
    os.write(fd, line[3000:])
    fcntl.flock(fd, fcntl.LOCK_UN)
    reader.join(60)
    assert [r["tag"] for r in found[0].records] == ["v1", "v2"] and not found[0].damage
    monkeypatch.setattr(integrity, "READ_LOCK_WAIT", 0.5)
    fcntl.flock(fd, fcntl.LOCK_EX)              # a holder that does not let go: read as it is, after the wait
    os.write(fd, b'{"torn')
    start = time.monotonic()
    assert len(log.scan().damage) == 1
    assert integrity.READ_LOCK_WAIT <= time.monotonic() - start < integrity.READ_LOCK_WAIT + 3
    os.close(fd)
    assert [d.line for d in integrity.set_aside(log.path)] == [3] and len(log.read()) == 2
    assert not log.scan().damage
    fifo = tmp_path / "dev.deploys.jsonl"      # a FIFO where a log should be: an error at once, never a hang
    os.mkfifo(fifo, 0o600)
    for read in (integrity.scan, integrity.set_aside):
        try:
            read(fifo)
            raise AssertionError(f"{read.__name__} read a FIFO")
        except integrity.DeployError as exc:
            assert "not a regular file" in str(exc)


def test_a_damaged_journal_is_never_read_as_nothing(tmp_path):
    path = journals.journal_path(tmp_path, "dev")
    journal = journals.DeployJournal(from_="f" * 40, target="t" * 40, backup="/b/x.sqlite3")
    journal.start(path)
    journal.step = "health"
    journal.save()
    cut(path, 40)
    j = journals.read(path)
    assert isinstance(j, journals.DamagedJournal)
    assert j.op in (journals.Op.DEPLOY, journals.Op.UNKNOWN) and j.from_ == "f" * 40
    assert j.path == str(path)


# -- finding 1: a torn bad-release log does not undo a rollback -----------------------------------------
def test_a_torn_bad_log_keeps_a_rolled_back_release_out(sandbox):
    sb = sandbox
    sb.release("dev", {"VERSION": "2\n"}, "v2")
    assert sb.run("deploy.py", "dev").returncode == 0
    sb.merge_to_main()
    proc = sb.run("deploy.py", "prod", "--yes")
    assert proc.returncode == 0, proc.stderr
    for env in ("prod", "dev"):
        proc = sb.run("rollback.py", env, "--yes")
        assert proc.returncode == 0, proc.stderr
        assert version(sb, env) == "1"
    state = sb.root / "state"
    for env in ("prod", "dev"):
        cut(state / f"{env}.bad.jsonl", 3)                    # a torn last line, as a full disk leaves it
    status = sb.run("status.py", "prod")
    assert status.returncode == 1, status.stdout
    assert f"{state / 'prod.bad.jsonl'} line 1" in status.stdout
    proc = sb.run("deploy.py", "prod", "--yes")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "bad release" in proc.stderr and version(sb, "prod") == "1"
    # the tags alone hold the marks: both logs gone entirely
    for env in ("prod", "dev"):
        (state / f"{env}.bad.jsonl").unlink()
    status = sb.run("status.py", "prod", "--json")
    report = json.loads(status.stdout)["envs"]["prod"]
    assert any("holds no mark" in p for p in report["problems"]), report["problems"]
    assert any("--ref" in a["command"] for a in report["advice"]), report["advice"]
    # the deploy refuses the release (the tag is a mark), and its recovery writes the mark back from the tag
    proc = sb.run("deploy.py", "prod", "--yes")
    assert proc.returncode == 1 and "rolled-back-" in proc.stderr, proc.stderr
    assert "written back" in proc.stdout, proc.stdout
    assert any(r.get("bad") for r in JsonLog(state / "prod.bad.jsonl").read())
    assert not any("holds no mark" in p for p in json.loads(sb.run("status.py", "prod", "--json").stdout)
                   ["envs"]["prod"]["problems"])
    assert sb.run("deploy.py", "prod", "--yes").returncode == 1 and version(sb, "prod") == "1"
    # --force --reason clears it (a clearing newer than the tag), and only that
    proc = sb.run("deploy.py", "prod", "--yes", "--force", "--reason", "fixed in config")
    assert proc.returncode == 0, proc.stderr
    assert version(sb, "prod") == "2"


# -- finding 2: a torn journal is not "nothing happened" ---------------------------------------------------
def deploy_killed_at_health(sb):
    """v2 deployed to dev and the deploy killed at its health step: (dev's commit before, its journal)."""
    before = sb.head("dev")
    sb.release("dev", {"VERSION": "2\n"}, "v2")
    argv = [sb.python, str(REPO_ROOT / "deploy.py"), "dev", "--config", str(sb.config)]
    proc = subprocess.run(argv, env={**sb.env, "SAFE_DEPLOY_FAULT": "deploy:health:KILL"}, capture_output=True,
                          text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert proc.returncode != 0
    return before, sb.root / "state" / "dev.journal.json"


def test_a_deploy_killed_at_health_with_a_torn_journal_is_undone(sandbox):
    sb = sandbox
    before, journal = deploy_killed_at_health(sb)
    data = journal.read_bytes()
    journal.write_bytes(data[:len(data) // 2])               # cut in half
    assert version(sb, "dev") == "2"
    proc = sb.run("deploy.py", "dev", "--rehearse")          # any command that takes the lock recovers first
    assert "damaged" in proc.stdout, proc.stdout + proc.stderr
    assert version(sb, "dev") == "1"
    assert sb.head("dev") == before
    recovery = [r for r in log_records(sb, "dev") if r["kind"] == "recovery"][-1]
    assert "undone" in recovery["did"] and recovery["result"] == "ok"
    assert not journal.exists()


def test_a_deploy_killed_by_the_previous_version_is_undone_from_its_journal(sandbox):
    """A journal in the format the version before the typed journals wrote (sorted keys, no checksum) is
    recovered by this one: the deploy killed at health is undone."""
    sb = sandbox
    before, journal = deploy_killed_at_health(sb)
    data = json.loads(journal.read_text())
    assert data.pop("_crc32")
    journal.write_text(json.dumps(data, sort_keys=True))      # state.Journal._write of the previous version
    assert version(sb, "dev") == "2"
    proc = sb.run("deploy.py", "dev", "--rehearse")
    assert "found an interrupted deploy" in proc.stdout and "damaged" not in proc.stdout, proc.stdout + proc.stderr
    assert version(sb, "dev") == "1" and sb.head("dev") == before
    recovery = [r for r in log_records(sb, "dev") if r["kind"] == "recovery"][-1]
    assert "undone" in recovery["did"] and recovery["result"] == "ok"
    assert recovery["interrupted"]["from"] == before and recovery["interrupted"]["step"] == "health"
    assert not journal.exists()


def test_a_tag_without_its_mark_is_a_mark_until_a_newer_clearing(sandbox):
    """Directly: marks read the tags, and a clearing newer than the tag clears it."""
    from safedeploy import config as configmod, marks
    sb = sandbox
    sb.release("dev", {"VERSION": "2\n"}, "v2")
    assert sb.run("deploy.py", "dev").returncode == 0
    v2 = sb.head("dev")
    assert sb.run("rollback.py", "dev", "--yes").returncode == 0
    cfg = configmod.load(str(sb.config))
    env = cfg.env("dev")
    from safedeploy.gitrepo import Repo
    tree = Repo(env.path).tree_of(v2)
    assert marks.bad_mark(cfg, env, tree)
    (sb.root / "state" / "dev.bad.jsonl").unlink()
    mark = marks.bad_mark(cfg, env, tree)
    assert mark and mark["tag"].startswith("dev-rolled-back-")
    assert marks.bad_mark(cfg, cfg.env("prod"), tree)          # bad in every env
    JsonLog(sb.root / "state" / "dev.bad.jsonl").append(
        {"time": "2999-01-01T00:00:00+00:00", "env": "dev", "tree": tree, "bad": False, "why": "forced"})
    assert marks.bad_mark(cfg, env, tree) is None
