"""Hostile and unlucky hosts (issue 14): each finding reproduced on the real sandbox, then held."""

import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import time

import requests

from demo.sandbox import REPO_ROOT
from helpers import paste
from helpers import log_records, tmpfs


def post_notes(sb, n, env="dev"):
    for i in range(n):
        assert requests.post(sb.url(env, "/notes"), data=f"n{i}", timeout=5).status_code == 201


def ids_in(path):
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {r[0] for r in conn.execute("SELECT id FROM notes")}
    finally:
        conn.close()


def test_1_a_symlinked_database_is_backed_up_with_its_wal_and_restored_in_place(in_place, tmp_path):
    sb = in_place
    data = tmp_path / "data"
    data.mkdir()
    live = sb.db_path("dev")
    move_db_to(sb, data)
    post_notes(sb, 5)          # in the WAL beside the target, not beside the link
    assert os.path.getsize(data / "dev.db-wal") > 0
    proc = sb.run("backup.py", "dev")
    assert proc.returncode == 0, proc.stderr
    (manifest,) = (sb.root / "backups" / "dev").glob("*.sqlite3.json")
    backup = json.loads(manifest.read_text())["path"]
    assert len(ids_in(backup)) == 5
    # a database restore replaces the target and keeps the link
    sb.release("dev", {"VERSION": "2\n"}, "v2")
    assert sb.run("deploy.py", "dev").returncode == 0
    post_notes(sb, 2)
    proc = sb.run("rollback.py", "dev", "--yes", "--with-db")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert os.path.islink(live) and os.readlink(live) == str(data / "dev.db")
    assert len(ids_in(data / "dev.db")) == 5


def test_8_manifests_never_name_files_outside_the_backup_folder(sandbox, tmp_path):
    sb = sandbox
    assert sb.run("backup.py", "dev").returncode == 0
    folder = sb.root / "backups" / "dev"
    (manifest,) = folder.glob("*.sqlite3.json")
    victim, unit_victim = tmp_path / "victim", tmp_path / "victim.service"
    victim.write_text("precious")
    unit_victim.write_text("precious unit")
    # a forged manifest: its path, unit copy and unit file all point outside
    data = json.loads(manifest.read_text())
    forged = folder / "dev-20200101-000000-nightly.sqlite3.json"
    forged.write_text(json.dumps({**data, "time": "2020-01-01T00:00:00+00:00", "path": str(victim),
                                  "unit_backup": str(victim), "unit_file": str(unit_victim)}))
    # and manifests that are not manifests at all
    for i, junk in enumerate([[], "str", {**data, "time": 5}, {**data, "time": "garbage"}, {**data, "bytes": None}]):
        (folder / f"dev-junk-{i}.sqlite3.json").write_text(json.dumps(junk))
    for script, args in (("backup.py", ["--list"]), ("backup.py", ["--list", "--json"]), ("status.py", []),
                         ("rollback.py", ["dev", "--list"]), ("verify.py", ["dev"])):
        proc = sb.run(script, *args)
        assert "Traceback" not in proc.stderr, (script, proc.stderr)
    proc = sb.run("backup.py", "--prune")
    assert "Traceback" not in proc.stderr, proc.stderr
    assert victim.read_text() == "precious" and unit_victim.read_text() == "precious unit"
    # a rollback to the forged point restores no unit file from outside either
    proc = sb.run("rollback.py", "dev", "--to", "dev-20200101-000000-nightly", "--code-only", "--yes")
    assert "Traceback" not in proc.stderr, proc.stderr
    assert unit_victim.read_text() == "precious unit" and victim.read_text() == "precious"


def test_8_a_backup_folder_others_may_write_or_a_linked_env_folder_is_refused(sandbox, tmp_path):
    sb = sandbox
    assert sb.run("backup.py", "dev").returncode == 0
    os.chmod(sb.root / "backups", 0o777)
    proc = sb.run("status.py")
    assert proc.returncode == 2 and "chmod go-w" in proc.stderr
    os.chmod(sb.root / "backups", 0o700)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o755)
    shutil.rmtree(sb.root / "backups" / "prod", ignore_errors=True)
    os.symlink(elsewhere, sb.root / "backups" / "prod")
    proc = sb.run("backup.py", "prod")
    assert proc.returncode == 2 and "symbolic link" in proc.stderr
    assert stat.S_IMODE(os.stat(elsewhere).st_mode) == 0o755


def test_9_a_lock_file_that_is_a_link_is_refused_and_its_target_untouched(sandbox, tmp_path):
    sb = sandbox
    victim = tmp_path / "victim"
    victim.write_text("root:x:0:0:root:/root:/bin/bash\n")
    (sb.root / "state").mkdir(mode=0o700, exist_ok=True)
    (sb.root / "state" / "dev.lock").unlink(missing_ok=True)        # the conversion's lock file
    os.symlink(victim, sb.root / "state" / "dev.lock")
    sb.release("dev", {"VERSION": "2\n"}, "v2")
    proc = sb.run("deploy.py", "dev")
    assert proc.returncode != 0 and "symbolic link" in proc.stderr and "Traceback" not in proc.stderr
    assert victim.read_text() == "root:x:0:0:root:/root:/bin/bash\n"


def test_10_unit_files_with_secrets_never_become_readable_by_others(sandbox):
    sb = sandbox
    unit = sb.manager.unit_dir / sb.unit("dev")
    unit.write_text(unit.read_text().replace("Environment=DEPLOY_STATUS=1",
                                             "Environment=DEPLOY_STATUS=1\nEnvironment=SECRET_TOKEN=hunter2"))
    os.chmod(unit, 0o600)
    sb.manager.systemctl("daemon-reload")
    proc = sb.run("deploy.py", "dev", "--install-units", "--yes", "--notify")
    assert proc.returncode == 0, proc.stderr
    helper = sb.manager.unit_dir / sb.unit("dev").replace(".service", "-handover.service")
    assert "SECRET_TOKEN" in helper.read_text()
    for path in (unit, helper):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
    # a rollback that restores the unit file keeps its mode
    sb.release("dev", {"VERSION": "2\n"}, "v2")
    assert sb.run("deploy.py", "dev").returncode == 0
    unit.write_text(unit.read_text().replace("hunter2", "hunter3"))
    sb.manager.systemctl("daemon-reload")
    tag = log_records(sb, "dev")[-1]["tag"]
    proc = sb.run("rollback.py", "dev", "--to", tag, "--yes", "--code-only")
    assert proc.returncode == 0, proc.stderr
    assert "hunter2" in unit.read_text() and stat.S_IMODE(os.stat(unit).st_mode) == 0o600


def move_db_to(sb, folder):
    """Stop dev, move its database into folder and link it back (as an operator with a second disk)."""
    live = sb.db_path("dev")
    sb.manager.systemctl("stop", sb.unit("dev"))
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(f"{live}{suffix}"):
            shutil.move(f"{live}{suffix}", f"{folder / 'dev.db'}{suffix}")
    os.symlink(folder / "dev.db", live)
    sb.manager.systemctl("start", sb.unit("dev"))
    sb.wait_serving("dev")
    return folder / "dev.db"


def main_pid(sb, env="dev"):
    return sb.manager.systemctl("show", sb.unit(env), "-p", "MainPID", "--value").stdout.strip()


def corrupt(db):
    """Overwrite the second page with garbage: the file still opens, quick_check fails. The WAL is
    folded first (a stopped app may leave one, whose copy of the page would hide the damage)."""
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    with open(db, "r+b") as fh:
        fh.seek(4096)
        fh.write(b"\xff" * 4096)


def test_2_a_commit_that_tracks_the_database_is_refused_before_anything_changes(in_place):
    sb = in_place
    post_notes(sb, 3)
    seed = sb.root / "seed"
    (seed / "instance").mkdir(exist_ok=True)
    (seed / "instance" / "app.db").write_bytes(b"SQLite format 3\x00" + b"\0" * 100)
    from demo.sandbox import git
    git(seed, "checkout", "--quiet", "dev")
    git(seed, "pull", "--quiet", "--ff-only", "origin", "dev")
    git(seed, "add", "-f", "instance/app.db")
    git(seed, "commit", "--quiet", "-m", "oops: the database is committed")
    git(seed, "push", "--quiet", "origin", "dev")
    head, pid = sb.head("dev"), main_pid(sb)
    proc = sb.run("deploy.py", "dev")
    assert proc.returncode == 1 and "tracks the live database file" in proc.stderr
    assert sb.head("dev") == head and main_pid(sb) == pid
    assert len(ids_in(sb.db_path("dev"))) == 3


def test_3_a_corrupt_live_database_is_restored_over_and_kept_as_evidence(sandbox):
    sb = sandbox
    sb.release("dev", {"VERSION": "2\n"}, "v2")
    assert sb.run("deploy.py", "dev").returncode == 0
    sb.manager.systemctl("stop", sb.unit("dev"))
    corrupt(sb.db_path("dev"))
    sb.manager.systemctl("start", sb.unit("dev"))
    sb.wait_serving("dev")
    proc = sb.run("rollback.py", "dev", "--list")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr
    status = sb.run("status.py", "dev")
    assert status.returncode == 1 and "fails quick_check" in status.stdout
    proc = sb.run("rollback.py", "dev", "--yes")           # auto: the damaged database goes back
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "fails quick_check" in proc.stdout and "evidence" in proc.stdout
    conn = sqlite3.connect(sb.db_path("dev"))
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    assert list((sb.root / "backups" / "dev").glob("*.unreadable.sqlite3"))


def test_3_a_pre_restart_that_corrupts_the_database_is_rolled_back_with_it(sandbox):
    sb = sandbox
    db = sb.db_path("dev")
    script = (f"f = open({str(db)!r}, 'r+b'); f.seek(4096); f.write(b'\\xff' * 4096); f.close(); "
              "raise SystemExit('migration failed halfway')")
    sb.write_config(dev=f'pre_restart = [["{sys.executable}", "-c", {json.dumps(script)}]]')
    sb.release("dev", {"VERSION": "2\n"}, "v2 with a migration that breaks the database")
    proc = sb.run("deploy.py", "dev")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "rolled back by itself" in proc.stderr
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    assert requests.get(sb.url("dev", "/"), timeout=5).json()["version"] == "1"


def test_4_out_of_room_for_the_restore_stops_nothing(in_place, tmp_path):
    sb = in_place
    with tmpfs(tmp_path / "small", "size=2m,mode=0700") as small:
        try:
            move_db_to(sb, small)
            sb.release("dev", {"VERSION": "2\n"}, "v2")
            assert sb.run("deploy.py", "dev").returncode == 0
            (small / "filler").write_bytes(b"\0" * (1536 * 1024))
            pid = main_pid(sb)
            proc = sb.run("rollback.py", "dev", "--yes", "--with-db")
            assert proc.returncode == 1 and "nothing was stopped" in proc.stderr, proc.stderr
            assert main_pid(sb) == pid
            assert requests.get(sb.url("dev", "/"), timeout=5).json()["version"] == "2"
        finally:
            sb.manager.systemctl("stop", sb.unit("dev"))


STRAY = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", "2"); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def test_5_a_stray_server_on_the_port_does_not_make_a_deploy_healthy(in_place):
    sb = in_place
    sb.manager.systemctl("stop", sb.unit("dev"))
    stray = subprocess.Popen([sys.executable, "-c", STRAY, str(sb.ports["dev"])])
    try:
        sb.wait_serving("dev")
        target = sb.release("dev", {"VERSION": "2\n"}, "v2")
        proc = sb.run("deploy.py", "dev")
        assert proc.returncode in (1, 4), proc.stdout + proc.stderr
        assert "something else answers" in proc.stderr
        verified = sb.root / "state" / "dev.verified.jsonl"
        assert not verified.exists() or target not in verified.read_text()
    finally:
        stray.kill()
        stray.wait()


def test_6_a_health_endpoint_that_drips_bytes_is_bounded(sandbox):
    sb = sandbox
    sb.release("dev", {"VERSION": "2\n", "MODE": "drip\n"}, "v2 drips its health answer")
    start = time.monotonic()
    proc = sb.run("deploy.py", "dev", timeout=120)
    took = time.monotonic() - start
    assert proc.returncode == 1, proc.stderr
    assert "rolled back by itself" in proc.stderr
    assert took < 40, took                  # health_timeout is 5 s; each attempt at most 1.5 s
    start = time.monotonic()
    proc = sb.run("status.py", "dev")           # exit 1: origin/dev still holds the release that was rolled back
    assert proc.returncode in (0, 1) and "Traceback" not in proc.stderr
    assert time.monotonic() - start < 15


def test_7_concurrent_appends_to_the_deploy_log_lose_nothing(tmp_path):
    script = ("import sys; sys.path.insert(0, sys.argv[1]); from safedeploy.state import JsonLog; "
              "log = JsonLog(sys.argv[2]); [log.append({'who': sys.argv[3], 'n': i}) for i in range(200)]")
    path = tmp_path / "state" / "dev.deploys.jsonl"
    procs = [subprocess.Popen([sys.executable, "-c", script, str(REPO_ROOT), str(path), who]) for who in "ab"]
    for p in procs:
        assert p.wait(timeout=120) == 0
    lines = path.read_text().splitlines()
    assert len(lines) == 400 and len({(json.loads(x)["who"], json.loads(x)["n"]) for x in lines}) == 400


def test_11_a_fifo_in_place_of_the_database_gives_a_clear_error_not_a_hang(in_place):
    sb = in_place
    live = sb.db_path("dev")
    sb.manager.systemctl("stop", sb.unit("dev"))
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(f"{live}{suffix}"):
            os.rename(f"{live}{suffix}", f"{live}.saved{suffix}")
    os.mkfifo(live)
    for script, args in (("backup.py", ["dev"]), ("verify.py", ["dev"]), ("rollback.py", ["dev", "--list"])):
        proc = sb.run(script, *args, timeout=30)
        assert "Traceback" not in proc.stderr, (script, proc.stderr)
    proc = sb.run("backup.py", "dev", timeout=30)
    assert proc.returncode != 0 and "not a regular file" in proc.stderr


def test_11_a_drill_with_its_backup_gone_reports_it(sandbox):
    sb = sandbox
    sb.release("dev", {"VERSION": "2\n"}, "v2")
    assert sb.run("deploy.py", "dev").returncode == 0
    backup = log_records(sb, "dev")[-1]["backup"]
    os.unlink(backup)
    proc = sb.run("rollback.py", "dev", "--drill")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr


def test_12_the_repository_hooks_never_run(sandbox):
    sb = sandbox
    marker = sb.root / "hook-ran"
    hooks = sb.path("prod") / ".git" / "hooks"
    for name in ("post-merge", "pre-push", "post-checkout", "reference-transaction"):
        (hooks / name).write_text(f"#!/bin/sh\necho {name} >> {marker}\n")
        os.chmod(hooks / name, 0o755)
    sb.release("dev", {"VERSION": "2\n"}, "v2")
    assert sb.run("deploy.py", "dev").returncode == 0
    assert sb.run("rollback.py", "dev", "--drill").returncode == 0
    assert not marker.exists(), marker.read_text()


def test_13_a_subject_with_escape_codes_reaches_the_terminal_escaped(sandbox):
    sb = sandbox
    sb.release("dev", {"VERSION": "2\n"}, "v2 \x1b]0;pwned\x07 \x1b[2J")
    proc = sb.run("deploy.py", "dev")
    assert proc.returncode == 0
    assert "\x1b" not in proc.stdout and "\\x1b" in proc.stdout


def test_13_a_local_tag_named_like_the_remote_branch_does_not_stand_in_for_it(sandbox):
    sb = sandbox
    from demo.sandbox import git
    old = sb.head("dev")
    target = sb.release("dev", {"VERSION": "2\n"}, "v2")
    git(sb.path("dev"), "tag", "origin/dev", old)
    assert sb.run("deploy.py", "dev").returncode == 0
    assert sb.head("dev") == target


def test_13_backups_sort_by_instant_and_by_order_within_a_second():
    from safedeploy.backups import Backup, sort_key
    from safedeploy.retention import retention_keep

    def b(path, time):
        return Backup(env="dev", path=path, time=time, bytes=1, sha256="", reason="nightly", page_size=4096,
                      page_count=1, schema="", source="", commit="", seconds=0.0)
    east = b("/b/dev-20261125-150000-nightly.sqlite3", "2026-11-25T10:00:00-05:00")     # 15:00 UTC
    utc = b("/b/dev-20261125-140000-nightly.sqlite3", "2026-11-25T14:00:00+00:00")
    assert sorted([utc, east], key=sort_key)[-1] is east
    first = b("/b/dev-20261125-140000-nightly.sqlite3", "2026-11-25T14:00:00+00:00")
    second = b("/b/dev-20261125-140000-2-nightly.sqlite3", "2026-11-25T14:00:00+00:00")
    kept = retention_keep([first, second], {"daily": 1, "weekly": 0, "monthly": 0})
    assert list(kept) == [second.path]


def test_13_a_unit_name_that_starts_with_a_dash_is_refused():
    from safedeploy.config import UNIT_RE
    assert not UNIT_RE.match("--now.service") and UNIT_RE.match("datatracker-dev.service")


def test_13_removing_the_state_folder_mid_deploy_stops_the_deploy_instead_of_a_false_success(sandbox):
    sb = sandbox
    sb.write_config(dev=f'pre_restart = [["{sys.executable}", "-c", "import time; time.sleep(3)"]]')
    alert = sb.root / "alert.json"           # every exit 4 is a needs-human alert
    copy_stdin = [sys.executable, "-c", f"import sys; open({str(alert)!r}, 'w').write(sys.stdin.read())"]
    sb.config.write_text(sb.config.read_text() + f"\n[alerts]\ncommand = {json.dumps(copy_stdin)}\n")
    sb.release("dev", {"VERSION": "2\n"}, "v2")
    argv = [sys.executable, str(REPO_ROOT / "deploy.py"), "dev", "--config", str(sb.config)]
    proc = subprocess.Popen(argv, env=sb.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        journal = sb.root / "state" / "dev.journal.json"
        if journal.exists() and '"pre_restart"' in journal.read_text():
            break
        time.sleep(0.05)
    shutil.rmtree(sb.root / "state")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 4, out + err
    assert "was removed or replaced" in err and "Traceback" not in err
    pasted = paste(sb, err.split("Look with: ", 1)[1].strip().splitlines()[0])      # as printed, cron's PATH
    assert pasted.returncode in (0, 1) and "== dev" in pasted.stdout, pasted.stderr
    event = json.loads(alert.read_text())
    assert event["event"] == "needs-human" and event["env"] == "dev" and "removed or replaced" in event["message"]
