"""rollback.py and deploy.py's automatic rollback, on the real user manager with the sample app."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import requests

from demo.sandbox import REPO_ROOT, git
from safedeploy import dbfiles, restore

from helpers import log_records, one_line_error

MIGRATION = ("CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY, body TEXT NOT NULL, "
             "created TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP);\n"
             "CREATE TABLE IF NOT EXISTS tags (id INTEGER PRIMARY KEY, name TEXT NOT NULL);\n")


def version(sb, env):
    return requests.get(sb.url(env, "/"), timeout=5).json()["version"]


def write_notes(sb, env, n):
    for i in range(n):
        assert requests.post(sb.url(env, "/notes"), data=f"note {i}", timeout=5).status_code == 201


def notes(sb, env):
    return requests.get(sb.url(env, "/"), timeout=5).json()["notes"]


def db_ok(sb, env):
    conn = sqlite3.connect(f"file:{sb.db_path(env)}?mode=ro", uri=True)
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()


def deploy_v2(sb):
    sb.release("dev", {"VERSION": "2\n"}, "v2")
    proc = sb.run("deploy.py", "dev")
    assert proc.returncode == 0, proc.stderr
    return sb.head("dev")


# -- automatic rollback --------------------------------------------------------------------
@pytest.mark.parametrize("mode, words", [
    ("crash", "did not turn healthy"),
    ("http500", "HTTP 500"),
    ("nobind", "no answer"),            # the socket holds the port: the request waits, nothing answers it
])
def test_a_bad_release_rolls_itself_back(sandbox, mode, words):
    sb = sandbox
    good = deploy_v2(sb)
    write_notes(sb, "dev", 3)
    sb.release("dev", {"MODE": f"{mode}\n", "VERSION": "3\n"}, f"broken: {mode}")
    proc = sb.run("deploy.py", "dev")
    assert proc.returncode == 1, proc.stderr
    assert "failed at step health" in proc.stderr and words in proc.stderr
    assert "rolled back by itself" in proc.stderr and f"dev runs {good[:12]} again" in proc.stderr
    assert sb.head("dev") == good and version(sb, "dev") == "2"
    assert notes(sb, "dev") == 3 and db_ok(sb, "dev")
    record = log_records(sb, "dev")[-1]
    assert record["result"] == "rolled-back" and record["running"] == good
    assert record["rollback"]["db_restored"] is False
    assert json.loads((sb.path("dev").parent / "dev.releases" / "current" / "REVISION").read_text())["commit"] == good
    assert git(sb.path("dev"), "status", "--porcelain") == ""
    verify = sb.run("verify.py", "dev")
    assert verify.returncode == 0, verify.stdout


def test_a_crash_shows_the_units_last_lines(sandbox):
    sb = sandbox
    deploy_v2(sb)
    sb.release("dev", {"MODE": "crash\n"}, "crashes")
    proc = sb.run("deploy.py", "dev")
    assert proc.returncode == 1
    assert "crashing on start, as MODE asks" in proc.stderr


def test_a_failing_pre_restart_rolls_back_and_shows_its_output(sandbox):
    sb = sandbox
    good = deploy_v2(sb)
    sb.write_config(dev=f'pre_restart = [["{sys.executable}", "-c", "import sys; print(\'pip says no\'); sys.exit(7)"]]')
    sb.release("dev", {"VERSION": "3\n"}, "v3")
    proc = sb.run("deploy.py", "dev")
    assert proc.returncode == 1
    assert "failed with exit 7" in proc.stderr and "pip says no" in proc.stderr
    assert sb.head("dev") == good and version(sb, "dev") == "2"
    assert log_records(sb, "dev")[-1]["failed_step"] == "pre_restart"


def test_ctrl_c_in_the_middle_rolls_back(sandbox):
    sb = sandbox
    good = deploy_v2(sb)
    sb.write_config(dev=f'pre_restart = [["{sys.executable}", "-c", "import time; print(\'building\', flush=True); '
                        f'time.sleep(30)"]]')
    sb.release("dev", {"VERSION": "3\n"}, "v3")
    argv = [sys.executable, str(REPO_ROOT / "deploy.py"), "dev", "--config", str(sb.config)]
    proc = subprocess.Popen(argv, env=sb.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while sb.head("dev") == good and time.monotonic() < deadline:      # wait for the switch
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert "interrupted by Ctrl-C" in err and "rolled back by itself" in err
    assert sb.head("dev") == good and version(sb, "dev") == "2" and db_ok(sb, "dev")


def test_a_failed_release_with_a_migration_restores_the_database(sandbox):
    sb = sandbox
    deploy_v2(sb)
    write_notes(sb, "dev", 2)
    before = dbfiles.live_schema(sb.db_path("dev"))
    sb.release("dev", {"schema.sql": MIGRATION, "MODE": "http500\n"}, "migration, and broken")
    proc = sb.run("deploy.py", "dev")
    assert proc.returncode == 1
    assert "  database  restored from" in proc.stderr
    assert dbfiles.live_schema(sb.db_path("dev")) == before
    assert notes(sb, "dev") == 2 and db_ok(sb, "dev")


# -- rollback.py ---------------------------------------------------------------------------
def test_rollback_after_a_migration_keeps_every_write_and_reports_it(sandbox):
    sb = sandbox
    deploy_v2(sb)
    write_notes(sb, "dev", 2)
    before_deploy = sb.head("dev")
    sb.release("dev", {"schema.sql": MIGRATION, "VERSION": "3\n"}, "v3 with a migration")
    assert sb.run("deploy.py", "dev").returncode == 0
    write_notes(sb, "dev", 5)                                 # writes made after the deploy
    assert notes(sb, "dev") == 7
    points = json.loads(sb.run("rollback.py", "dev", "--list", "--json").stdout)
    assert points["env"] == "dev" and points["points"][0]["schema_differs"] is True
    proc = sb.run("rollback.py", "dev", "--yes")
    assert proc.returncode == 0, proc.stderr
    assert sb.head("dev") == before_deploy and version(sb, "dev") == "2"
    assert "a migration ran since" in proc.stdout
    assert "notes: 5 row(s) written since the point" in proc.stdout
    record = log_records(sb, "dev")[-1]
    assert record["kind"] == "rollback" and record["rows_lost"] == {"notes": 5}
    assert record["rows_counted"].startswith("seal: ")      # the schema differs: no plan's count to take
    saved = sqlite3.connect(record["pre_rollback"])
    assert saved.execute("SELECT count(*) FROM notes").fetchone()[0] == 7          # nothing lost
    assert notes(sb, "dev") == 2
    aside = record["aside"]
    assert os.path.exists(aside)          # the replaced database, moved aside with its -wal, is kept
    assert db_ok(sb, "dev")
    tags = git(sb.path("dev"), "tag", "-l", "dev-rolled-back-*")
    assert record["tag"] in tags and git(sb.path("dev"), "rev-parse", f"{record['tag']}^{{commit}}") != before_deploy


def test_code_only_rollback_keeps_the_database_and_new_writes(sandbox):
    sb = sandbox
    first = sb.head("dev")
    deploy_v2(sb)
    write_notes(sb, "dev", 4)
    proc = sb.run("rollback.py", "dev", "--code-only", "--yes")
    assert proc.returncode == 0, proc.stderr
    assert sb.head("dev") == first and version(sb, "dev") == "1" and notes(sb, "dev") == 4
    assert "--code-only" in proc.stdout


def test_with_db_restores_the_points_backup(sandbox):
    sb = sandbox
    write_notes(sb, "dev", 1)
    deploy_v2(sb)
    write_notes(sb, "dev", 2)
    proc = sb.run("rollback.py", "dev", "--with-db", "--yes")
    assert proc.returncode == 0, proc.stderr
    assert notes(sb, "dev") == 1 and "notes: 2 row(s)" in proc.stdout
    record = log_records(sb, "dev")[-1]     # counted by the seal, or taken from the plan: the same rows
    assert record["rows_lost"] == {"notes": 2} and record["rows_counted"].startswith(("plan: ", "seal: "))
    saved = record["pre_rollback"]          # sealed (by the seal step, or started early and waited for)
    manifest = json.loads(open(saved + ".json").read())
    assert manifest["sha256"] == dbfiles.sha256_file(saved) and not os.path.exists(saved + "-wal")
    assert os.stat(saved).st_mode & 0o777 == 0o600 and manifest["held"] is True


def test_rollback_to_a_nightly_backup(sandbox):
    sb = sandbox
    first = sb.head("dev")
    write_notes(sb, "dev", 1)
    assert sb.run("backup.py", "dev", "--reason", "nightly").returncode == 0
    nightly = json.loads(sb.run("backup.py", "--list", "--json").stdout)["backups"][0]
    deploy_v2(sb)
    write_notes(sb, "dev", 3)
    point = os.path.basename(nightly["path"]).removesuffix(".sqlite3")
    proc = sb.run("rollback.py", "dev", "--to", point, "--with-db", "--yes")
    assert proc.returncode == 0, proc.stderr
    assert sb.head("dev") == first and notes(sb, "dev") == 1


def damage(path, at=300):
    with open(path, "r+b") as fh:
        fh.seek(at)
        fh.write(b"\xde\xad")


def test_a_corrupt_backup_is_refused_naming_the_next_best_point(sandbox):
    sb = sandbox
    assert sb.run("backup.py", "dev", "--reason", "nightly").returncode == 0
    time.sleep(1.1)
    deploy_v2(sb)
    record = log_records(sb, "dev")[-1]
    for spare in restore.spares(sb.db_path("dev")):     # without it the backup is what the restore reads
        spare.unlink()
    damage(record["backup"])
    pid = sb.manager.systemctl("show", sb.unit("dev"), "-p", "MainPID", "--value").stdout
    proc = sb.run("rollback.py", "dev", "--with-db", "--yes")
    assert proc.returncode == 1
    line = one_line_error(proc)
    assert "backup is bad" in line and "nothing was changed" in line and "next-best point is dev-" in line
    assert "nightly" in line
    assert sb.head("dev") == record["to"]
    assert sb.manager.systemctl("show", sb.unit("dev"), "-p", "MainPID", "--value").stdout == pid


def test_a_rollback_takes_the_deploys_spare_and_checks_it_by_its_sha256(sandbox):
    """The deploy leaves a checked copy of its point's backup beside the live file; the rollback to that point
    takes it by a rename (no copy), having hashed it: a damaged spare is removed and the backup copied instead.
    Either way the live database is, byte for byte, the backup its manifest describes."""
    sb = sandbox
    db = sb.db_path("dev")
    for damaged_spare in (False, True):
        if damaged_spare:
            deploy_v3(sb)
        else:
            deploy_v2(sb)
        record = log_records(sb, "dev")[-1]
        sha = json.loads(open(record["backup"] + ".json").read())["sha256"]
        spares = restore.spares(db)
        assert spares == [restore.spare_name(db, sha)]          # one: an earlier deploy's was replaced
        assert os.stat(spares[0]).st_mode & 0o777 == 0o600 and dbfiles.sha256_file(spares[0]) == sha
        inode = spares[0].stat().st_ino
        if damaged_spare:
            damage(spares[0], at=spares[0].stat().st_size // 2)
        else:
            damage(record["backup"])        # the backup is not read: its spare is the point's bytes
        before = notes(sb, "dev")
        write_notes(sb, "dev", 2)
        proc = sb.run("rollback.py", "dev", "--with-db", "--yes")
        assert proc.returncode == 0, proc.stderr
        if not damaged_spare:
            assert db.stat().st_ino == inode            # the spare itself is the live file
        assert notes(sb, "dev") == before and db_ok(sb, "dev")
        assert restore.spares(db) == [] and not [p for p in db.parent.iterdir() if ".restore-" in p.name]


def deploy_v3(sb):
    sb.release("dev", {"VERSION": "3\n"}, "v3")
    proc = sb.run("deploy.py", "dev")
    assert proc.returncode == 0, proc.stderr


def test_rollback_restores_a_changed_unit_file(sandbox):
    sb = sandbox
    deploy_v2(sb)
    unit = sb.manager.unit_dir / sb.unit("dev")
    original = unit.read_text()
    unit.write_text(original.replace("Environment=DEPLOY_STATUS=1", "Environment=DEPLOY_STATUS=0"))
    sb.manager.systemctl("daemon-reload")
    proc = sb.run("rollback.py", "dev", "--yes")
    assert proc.returncode == 0, proc.stderr
    assert unit.read_text() == original and "unit file was restored" in proc.stdout


def test_rollback_needs_yes_without_a_terminal_and_checks_its_arguments(sandbox):
    sb = sandbox
    deploy_v2(sb)
    proc = sb.run("rollback.py", "dev")
    assert proc.returncode == 2 and "--yes" in one_line_error(proc)
    proc = sb.run("rollback.py", "prod", "--yes")
    assert proc.returncode == 2 and "no before-deploy point" in one_line_error(proc)
    for bad in ("nope", "../../etc/passwd", "dev;reboot"):
        proc = sb.run("rollback.py", "dev", "--to", bad, "--yes")
        assert proc.returncode == 2 and "no such rollback point" in one_line_error(proc)
    proc = sb.run("rollback.py", "dev", "--with-db", "--code-only")
    assert proc.returncode == 2
    assert sb.head("dev") == log_records(sb, "dev")[-1]["to"]


def test_drill_changes_nothing_and_verify_shows_it(sandbox):
    sb = sandbox
    deploy_v2(sb)
    head, pid = sb.head("dev"), sb.manager.systemctl("show", sb.unit("dev"), "-p", "MainPID", "--value").stdout
    worktrees = git(sb.path("prod"), "worktree", "list")
    proc = sb.run("rollback.py", "dev", "--drill")
    assert proc.returncode == 0, proc.stderr
    assert "rollback plan tested" in proc.stdout
    assert sb.head("dev") == head and git(sb.path("prod"), "worktree", "list") == worktrees
    assert sb.manager.systemctl("show", sb.unit("dev"), "-p", "MainPID", "--value").stdout == pid
    checks = {c["name"]: c for c in json.loads(sb.run("verify.py", "dev", "--json").stdout)["checks"]}
    assert "last drill" in checks["rollback drill"]["detail"]


def test_many_restarts_in_a_row_are_not_refused_by_the_start_limit(sandbox):
    from safedeploy import restart, units
    from safedeploy.config import load
    env = load(str(sandbox.config)).env("dev")
    for _ in range(8):                          # systemd's default limit is 5 starts in 10 s
        restart.restart_unit(env)
    restart.wait_until_healthy(env)
    assert units.state(env.unit).is_active


def test_a_drill_boots_the_point_s_release_on_the_restored_copy(sandbox):
    """The drill proves a backup by running the app on it: a point whose release cannot start on its
    backup fails the drill, and nothing live is touched either way."""
    sb = sandbox
    deploy_v2(sb)
    proc = sb.run("rollback.py", "dev", "--drill")
    assert proc.returncode == 0 and "started on it on a scratch port" in proc.stdout and "HTTP 200" in proc.stdout
    # a point whose release cannot serve on its own backup: the drill fails and says why
    sb.release("dev", {"VERSION": "3\n", "MODE": "crashonrow poison\n"}, "v3 chokes on one row")
    assert sb.run("deploy.py", "dev").returncode == 0
    requests.post(sb.url("dev", "/notes"), data="poison", timeout=5)
    proc = sb.run("backup.py", "dev")
    assert proc.returncode == 0
    point = json.loads(sb.run("rollback.py", "dev", "--list", "--json").stdout)["points"][0]["id"]
    pid = sb.manager.systemctl("show", sb.unit("dev"), "-p", "MainPID", "--value").stdout
    proc = sb.run("rollback.py", "dev", "--drill", "--to", point)
    assert proc.returncode == 1 and "did not serve on the restored copy" in proc.stderr, proc.stderr
    assert "crashes on a row" in proc.stderr
    assert sb.manager.systemctl("show", sb.unit("dev"), "-p", "MainPID", "--value").stdout == pid
    leftover = sb.manager.systemctl("list-units", "--all", "--plain", "--no-legend", "*drill*").stdout.strip()
    assert leftover == ""
