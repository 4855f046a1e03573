"""Hostile and unlucky hosts (issue 14, findings 1, 8, 9, 10): each reproduced on the real sandbox."""

import json
import os
import shutil
import sqlite3
import stat

import requests

from helpers import log_records


def post_notes(sb, n, env="dev"):
    for i in range(n):
        assert requests.post(sb.url(env, "/notes"), data=f"n{i}", timeout=5).status_code == 201


def ids_in(path):
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {r[0] for r in conn.execute("SELECT id FROM notes")}
    finally:
        conn.close()


def test_1_a_symlinked_database_is_backed_up_with_its_wal_and_restored_in_place(sandbox, tmp_path):
    sb = sandbox
    data = tmp_path / "data"
    data.mkdir()
    live = sb.path("dev") / "instance" / "app.db"
    sb.manager.systemctl("stop", sb.unit("dev"))
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(f"{live}{suffix}"):
            shutil.move(f"{live}{suffix}", f"{data / 'dev.db'}{suffix}")
    os.symlink(data / "dev.db", live)
    sb.manager.systemctl("start", sb.unit("dev"))
    sb.wait_serving("dev")
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
