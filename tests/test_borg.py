"""Off-site copies with borg ([offsite] engine = "borg"): the same features as restic through the same
code paths (safedeploy.offsite.Engine), on real borg repositories: a local folder, and ssh:// to an
sshd the test starts on 127.0.0.1 with a key it makes (borg on both ends: this machine)."""

import json
import os
import shutil
import sqlite3
import subprocess

import pytest
import requests

from safedeploy import offsite
from safedeploy.errors import DeployError
from test_offsite import PASSWORD, enable_offsite, lose_local_copies_then_verify, no_password, ssh_command, start_sshd


def borg_archives(off):
    return offsite.engine(off).copies()


def notes(sb, env, n):
    for i in range(n):
        assert requests.post(sb.url(env, "/notes"), data=f"borg {i}", timeout=5).status_code == 201


def test_a_borg_repository_takes_every_backup_lists_verifies_restores_and_prunes(sandbox):
    sb = sandbox
    off = enable_offsite(sb, engine="borg")
    assert isinstance(offsite.engine(off), offsite.Borg)
    notes(sb, "prod", 3)
    first = sb.run("backup.py", "--all")
    assert first.returncode == 0 and "off-site" in first.stdout, first.stdout + first.stderr
    copies = borg_archives(off)
    assert {c.env for c in copies} == {"prod", "dev"} and all(c.config == off.id for c in copies)
    assert all(c.rows is not None for c in copies)
    listed = json.loads(sb.run("backup.py", "--list", "--json").stdout)["backups"]
    assert all(b["location"] == "both" for b in listed), listed
    verify = sb.run("backup.py", "--verify")
    assert verify.returncode == 0 and "borg check passed" in verify.stdout, verify.stdout + verify.stderr
    no_password(first, verify)
    # the host loses its backups: the off-site copy is a point, and restores every row
    shutil.rmtree(sb.root / "backups")
    points = json.loads(sb.run("rollback.py", "prod", "--list", "--json").stdout)["points"]
    there = [p for p in points if p["offsite"] and p["backup"] is None]
    assert there, points
    notes(sb, "prod", 2)            # written after the copy: the restore takes them out, and keeps them aside
    back = sb.run("rollback.py", "prod", "--to", there[0]["id"], "--with-db", "--yes")
    assert back.returncode == 0, back.stdout + back.stderr
    assert requests.get(sb.url("prod", "/"), timeout=5).json()["notes"] == 3
    # retention through borg delete + compact: one daily kept per env (and never the copy with the most rows)
    text = sb.config.read_text().replace("[env.prod]", "[retention]\ndaily = 1\nweekly = 0\nmonthly = 0\n\n[env.prod]")
    sb.config.write_text(text)
    for _ in range(2):
        assert sb.run("backup.py", "--all", "--quiet").returncode == 0
    before = len(borg_archives(off))
    pruned = sb.run("backup.py", "--prune")
    assert pruned.returncode == 0, pruned.stdout + pruned.stderr
    after = borg_archives(off)
    assert len(after) < before and {c.env for c in after} == {"prod", "dev"}, (before, after)


def test_borg_chunks_follow_the_database_page_size(sandbox):
    """A database with 8 KiB pages is chunked in 8 KiB blocks: one page changed adds about one page."""
    sb = sandbox
    enable_offsite(sb, engine="borg")
    db = sb.db_path("dev")
    sb.stop_app("dev")
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode=DELETE")
    conn.execute("PRAGMA page_size=8192")
    conn.execute("VACUUM")
    conn.execute("CREATE TABLE IF NOT EXISTS big (x BLOB)")
    with conn:
        conn.executemany("INSERT INTO big VALUES (?)", [(os.urandom(3000),) for _ in range(2000)])
    conn.execute("PRAGMA journal_mode=WAL")
    conn.close()
    assert offsite.page_size(db) == 8192
    assert sb.run("backup.py", "dev").returncode == 0
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("UPDATE big SET x = ? WHERE rowid = 1000", (os.urandom(3000),))
    conn.close()
    pushed = sb.run("backup.py", "dev")
    assert pushed.returncode == 0, pushed.stderr
    added = json.loads((sb.root / "state" / "dev.offsite.json").read_text())["added"]
    size = os.path.getsize(db)
    assert size > 5_000_000 and added < 200_000, (added, size)       # a few pages (and the manifest), not the file


@pytest.mark.both_converted         # it breaks the config or the state first
def test_borg_refuses_what_it_cannot_reach_and_secrets_in_options(sandbox):
    sb = sandbox
    for kw, key in (({"repository": "sftp:u@nas:/srv/x"}, "offsite.repository"),
                    ({"options": ["BORG_PASSPHRASE=hunter2"]}, "offsite.options"),
                    ({"options": ["LD_PRELOAD=/tmp/x.so"]}, "offsite.options")):
        with pytest.raises(DeployError):
            enable_offsite(sb, engine="borg", **kw)
        proc = sb.run("backup.py", "--list")
        assert proc.returncode == 2 and key in proc.stderr and "hunter2" not in proc.stderr, proc.stderr
    with pytest.raises(DeployError):
        enable_offsite(sb, engine="tape")
    assert sb.run("backup.py", "--list").returncode == 2


def test_a_wrong_borg_password_is_a_clear_error_and_loses_nothing(sandbox):
    sb = sandbox
    enable_offsite(sb, engine="borg")
    assert sb.run("backup.py", "prod").returncode == 0
    enable_offsite(sb, engine="borg", password="not the password")
    proc = sb.run("backup.py", "prod")
    assert proc.returncode != 0 and "does not open it" in proc.stderr, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and PASSWORD not in proc.stderr
    assert any(p.suffix == ".sqlite3" for p in (sb.root / "backups" / "prod").iterdir())   # the local copy stays


@pytest.fixture
def borg_over_ssh(tmp_path):
    proc, port, user, key = start_sshd(tmp_path)
    yield f"ssh://{user}@127.0.0.1:{port}{tmp_path / 'borg-repo'}", f"BORG_RSH={ssh_command(port, key)}"
    proc.terminate()
    proc.wait(timeout=10)


def test_borg_over_ssh_to_a_real_sshd(sandbox, borg_over_ssh):
    sb = sandbox
    repository, rsh = borg_over_ssh
    off = enable_offsite(sb, repository=repository, options=[rsh], engine="borg")
    notes(sb, "dev", 2)
    proc = sb.run("backup.py", "dev")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (copy,) = borg_archives(off)
    assert copy.env == "dev" and copy.config == off.id
    lose_local_copies_then_verify(sb, "dev", proc)
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, timeout=10).stdout
    assert PASSWORD not in ps
