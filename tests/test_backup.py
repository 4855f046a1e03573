"""backup.py and safedeploy.backups: consistency under a live writer, checksums, retention,
failures (full disk, missing, not SQLite, unwritable), permissions, locks, the systemd timer."""

import json
import os
import sqlite3
import stat
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from demo import writer
from demo.sandbox import REPO_ROOT
from safedeploy import backups, dbfiles, restore, retention
from safedeploy.errors import DeployError
from safedeploy.state import EnvLock

from helpers import one_line_error, tmpfs

CONFIG = """
[defaults]
remote = ""
[retention]
daily = {daily}
weekly = {weekly}
monthly = {monthly}
[env.live]
path = "app"
branch = "main"
port = 18999
db = "{db}"
unit = "nothing-here.service"
"""


def make_host(tmp_path, db="live.db", daily=7, weekly=4, monthly=6):
    (tmp_path / "app").mkdir(exist_ok=True)
    subprocess.run(["git", "init", "-q", "-b", "main", str(tmp_path / "app")], check=True)
    cfg = tmp_path / "config.toml"
    cfg.write_text(CONFIG.format(db=db, daily=daily, weekly=weekly, monthly=monthly))
    return cfg


def run_backup(cfg, *args, env=None):
    return subprocess.run([sys.executable, str(REPO_ROOT / "backup.py"), *args, "--config", str(cfg)],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                          env={**os.environ, **(env or {})})


@pytest.fixture
def live_db(tmp_path):
    """A WAL database with 48 MB of filler and a writer committing transfers all the time."""
    db = tmp_path / "app" / "live.db"
    db.parent.mkdir()
    writer.create(db)
    writer.fill(db, 48)
    proc = subprocess.Popen([sys.executable, "-m", "demo.writer", str(db), "--pause", "0.5"],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    checkpointer = subprocess.Popen([sys.executable, "-c", (
        "import sqlite3, sys, time\n"
        "c = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)\n"
        "while True:\n"
        "    c.execute('PRAGMA wal_checkpoint(PASSIVE)').fetchall(); time.sleep(0.01)\n"), str(db)])
    time.sleep(0.5)
    yield db
    checkpointer.kill()
    proc.terminate()
    assert int(proc.communicate(timeout=30)[0]) > 0
    checkpointer.wait()


def test_every_backup_under_a_live_writer_is_consistent(live_db, tmp_path):
    folder = tmp_path / "backups"
    seen = set()
    slow = lambda done, total: time.sleep(0.05)          # noqa: E731  let writes and checkpoints interleave
    for i in range(12):
        b = backups.backup_database(live_db, folder, "live", "test", progress=slow)
        ok, detail = writer.invariant_holds(b.path)
        assert ok, detail
        assert dbfiles.sha256_file(b.path) == b.sha256
        assert backups.verify_backup(b) == "ok"
        seen.add(detail.split("transfers=")[1])
        assert not Path(b.path + "-wal").exists() and not Path(b.path + "-shm").exists()
    assert len(seen) > 6                                 # the writer really was writing between backups
    assert not [p for p in folder.iterdir() if ".tmp-" in p.name]


def test_backup_never_writes_the_live_database(tmp_path):
    db = tmp_path / "live.db"
    writer.create(db)
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    for _ in range(50):
        conn.execute("INSERT INTO ledger (src, dst, amount) VALUES (1, 2, 3)")
    wal_before = Path(f"{db}-wal").stat().st_size
    before = db.read_bytes()
    b = backups.backup_database(db, tmp_path / "b", "live", "test")
    assert db.read_bytes() == before and Path(f"{db}-wal").stat().st_size == wal_before   # no checkpoint
    copy = sqlite3.connect(b.path)
    assert copy.execute("SELECT count(*) FROM ledger").fetchone()[0] == 50                # the WAL's rows too
    assert copy.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    conn.close()


def test_the_copys_read_lock_holds_while_the_apps_last_connection_closes(tmp_path):
    """Django opens a connection per request: the last one to close checkpoints and deletes the WAL unless
    another connection holds the database. Seen under load: a backup failed with the WAL gone mid-copy
    (closing the copy's own descriptor of the file had dropped the connection's read lock)."""
    db = tmp_path / "live.db"
    writer.create(db)
    one_write = ("import sqlite3, sys; c = sqlite3.connect(sys.argv[1], isolation_level=None); "
                 "c.execute('INSERT INTO ledger (src, dst, amount) VALUES (1, 2, 3)'); c.close()")
    subprocess.run([sys.executable, "-c", one_write, str(db)], check=True, timeout=30)
    assert Path(f"{db}-wal").exists() is False                  # the last connection closed: WAL folded, gone
    holding = ("import sqlite3, sys; c = sqlite3.connect(sys.argv[1], isolation_level=None); "
               "c.execute('PRAGMA wal_autocheckpoint = 0'); "
               "[c.execute('INSERT INTO ledger (src, dst, amount) VALUES (1, 2, 3)') for _ in range(20)]; "
               "print('ready', flush=True); sys.stdin.readline(); c.close()")
    app = subprocess.Popen([sys.executable, "-c", holding, str(db)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           text=True)          # the app's connection, in the app's own process
    assert app.stdout.readline() == "ready\n"
    seen = []

    def progress(done, total):
        if done == total and not seen:           # the file and its WAL copied, the snapshot still held
            app.communicate("close\n", timeout=30)
            subprocess.run([sys.executable, "-c", one_write, str(db)], check=True, timeout=30)
            seen.append(Path(f"{db}-wal").exists())

    try:
        b = backups.backup_database(db, tmp_path / "b", "live", "test", progress=progress)
    finally:
        app.kill()
        app.wait(timeout=30)
    assert seen == [True]                        # the app's last close could not take the WAL away
    assert sqlite3.connect(b.path).execute("SELECT count(*) FROM ledger").fetchone()[0] == 21


def test_a_rollback_journal_database_uses_the_backup_api(tmp_path):
    db = tmp_path / "old.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE t (x)")
    conn.execute("INSERT INTO t VALUES (42)")
    conn.commit()
    b = backups.backup_database(db, tmp_path / "b", "old", "test")
    assert sqlite3.connect(b.path).execute("SELECT x FROM t").fetchone() == (42,)
    conn.close()


def test_files_are_private_and_described_by_their_manifest(tmp_path):
    cfg = make_host(tmp_path)
    writer.create(tmp_path / "app" / "live.db")
    proc = run_backup(cfg, "live")
    assert proc.returncode == 0, proc.stderr
    assert "backed up live" in proc.stdout
    folder = tmp_path / "backups" / "live"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    (db_file,) = folder.glob("*.sqlite3")
    manifest = json.loads((folder / (db_file.name + ".json")).read_text())
    for f in (db_file, folder / (db_file.name + ".json")):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
    assert manifest["reason"] == "manual" and manifest["source"] == str(tmp_path / "app" / "live.db")
    for key in ("sha256", "bytes", "page_size", "page_count", "schema", "commit", "seconds", "time"):
        assert key in manifest
    assert manifest["bytes"] == db_file.stat().st_size
    assert manifest["schema"] == dbfiles.live_schema(tmp_path / "app" / "live.db")


def test_flipped_byte_is_caught_by_verify(tmp_path):
    cfg = make_host(tmp_path)
    writer.create(tmp_path / "app" / "live.db")
    assert run_backup(cfg, "live").returncode == 0
    assert run_backup(cfg, "live").returncode == 0
    listed = json.loads(run_backup(cfg, "--list", "--json").stdout)["backups"]
    assert len(listed) == 2 and listed[0]["time"] >= listed[1]["time"]
    path = listed[1]["path"]
    data = bytearray(Path(path).read_bytes())
    data[len(data) // 2] ^= 0x01
    Path(path).write_bytes(bytes(data))
    proc = run_backup(cfg, "--verify")
    assert proc.returncode == 1 and f"BAD backup {path}" in proc.stderr and "1 of 2 backups good" in proc.stdout
    assert run_backup(cfg, "--verify", listed[0]["path"]).returncode == 0
    proc = run_backup(cfg, "--verify", "/etc/passwd")
    assert proc.returncode == 2 and "not a backup" in one_line_error(proc)


@pytest.mark.parametrize("case", ["missing", "not-sqlite", "folder"])
def test_bad_databases_give_a_clear_error_and_leave_nothing(tmp_path, case):
    cfg = make_host(tmp_path)
    db = tmp_path / "app" / "live.db"
    if case == "not-sqlite":
        db.write_text("hello, I am a text file pretending\n" * 10)
    if case == "folder":
        db.mkdir()
    proc = run_backup(cfg, "live", "--quiet")
    assert proc.returncode == 1 and proc.stdout == ""
    line = one_line_error(proc)
    assert {"missing": "does not exist", "not-sqlite": "is not an SQLite database", "folder": "is a folder"}[case] in line
    folder = tmp_path / "backups" / "live"
    assert not folder.exists() or list(folder.iterdir()) == []


@pytest.fixture
def small_disk(tmp_path):
    with tmpfs(tmp_path / "small", "size=6m,mode=0700") as mount:
        yield mount


def test_full_disk_fails_cleanly_and_keeps_older_backups(tmp_path, small_disk):
    db = tmp_path / "live.db"
    writer.create(db)
    first = backups.backup_database(db, small_disk / "live", "live", "small")
    writer.fill(db, 12)
    with pytest.raises(DeployError, match="not enough free disk|disk full") as info:
        backups.backup_database(db, small_disk / "live", "live", "big")
    assert info.value.code == 1
    assert sorted(p.name for p in (small_disk / "live").iterdir()) == sorted(
        [Path(first.path).name, Path(first.path).name + ".json"])
    assert backups.verify_backup(first) == "ok"


def test_disk_filling_up_during_the_copy_is_caught(tmp_path, small_disk, monkeypatch):
    db = tmp_path / "live.db"
    writer.create(db)
    writer.fill(db, 12)
    monkeypatch.setattr(backups, "needed_bytes", lambda path: 0)    # the space check passed, then the disk filled
    with pytest.raises(DeployError, match="disk full"):
        backups.backup_database(db, small_disk / "live", "live", "big")
    assert list((small_disk / "live").iterdir()) == []


def test_unwritable_backup_folder(tmp_path):
    with tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        db = tmp_path / "live.db"
        writer.create(db)
        with pytest.raises(DeployError, match="cannot write"):
            backups.backup_database(db, ro / "live", "live", "x")


def test_a_backup_waits_for_a_deploy_then_gives_exit_3(tmp_path):
    cfg = make_host(tmp_path)
    writer.create(tmp_path / "app" / "live.db")
    with EnvLock(tmp_path / "state", "live", "deploy"):
        start = time.monotonic()
        proc = run_backup(cfg, "--all", "--quiet", "--lock-wait", "1")
        waited = time.monotonic() - start
    assert proc.returncode == 3 and waited >= 1
    assert "locked" in one_line_error(proc) and f"pid {os.getpid()}" in proc.stderr
    assert run_backup(cfg, "--all", "--quiet").returncode == 0


def test_progress_is_quiet_without_a_terminal(tmp_path):
    cfg = make_host(tmp_path)
    db = tmp_path / "app" / "live.db"
    writer.create(db)
    writer.fill(db, 70)
    proc = run_backup(cfg, "live")
    assert proc.returncode == 0 and "copied" not in proc.stderr
    on_tty = subprocess.run(["script", "-qec", f"{sys.executable} {REPO_ROOT / 'backup.py'} live --config {cfg}",
                             "/dev/null"], capture_output=True, text=True, timeout=120)
    assert on_tty.returncode == 0 and "copied" in on_tty.stdout and "(100%)" in on_tty.stdout


# -- retention over a synthetic year --------------------------------------------------------
def fake_backups(tmp_path, times):
    folder = tmp_path / "backups" / "live"
    folder.mkdir(parents=True, exist_ok=True)
    found = []
    for t in times:
        path = folder / f"live-{t.strftime('%Y%m%d-%H%M%S')}-nightly.sqlite3"
        b = backups.Backup(env="live", path=str(path), time=t.isoformat(), bytes=0, sha256="", reason="nightly",
                           page_size=4096, page_count=0, schema="", source="", commit="", seconds=0)
        found.append(b)
    return found


def test_retention_keeps_what_borg_would_over_a_year():
    tz = timezone.utc
    start = datetime(2026, 1, 1, 3, 0, tzinfo=tz)
    times = [start + timedelta(days=d) for d in range(365) if d not in (360, 361)]      # two nights missed
    times += [start + timedelta(days=364, hours=12)]                                   # and a manual one
    found = fake_backups(Path("/nonexistent"), times)
    keep = retention.retention_keep(found, {"daily": 7, "weekly": 4, "monthly": 6})
    when = {b.path: datetime.fromisoformat(b.time) for b in found}

    def kept_by(rule):
        return sorted(when[p].strftime("%m-%d %H") for p, why in keep.items() if why.startswith(rule))
    # daily: the newest of each of the last 7 days that have one (Dec 31 at 15h beats 03h; Dec 27, 28 missing)
    assert kept_by("daily") == ["12-23 03", "12-24 03", "12-25 03", "12-26 03", "12-29 03", "12-30 03", "12-31 15"]
    # weekly: 4 more weeks, the weeks already kept skipped: the Sundays Dec 20, 13, 6 and Nov 29
    assert kept_by("weekly") == ["11-29 03", "12-06 03", "12-13 03", "12-20 03"]
    # monthly: 6 more months, December (already kept) skipped: the ends of Jun ... Nov
    assert kept_by("monthly") == ["06-30 03", "07-31 03", "08-31 03", "09-30 03", "10-31 03", "11-30 03"]
    assert len(keep) == 17


def test_retention_keeps_the_oldest_when_there_are_too_few():
    start = datetime(2026, 3, 1, 3, 0, tzinfo=timezone.utc)
    found = fake_backups(Path("/nonexistent"), [start + timedelta(days=d) for d in range(3)])
    assert len(retention.retention_keep(found, {"daily": 7, "weekly": 0, "monthly": 0})) == 3


def test_a_copy_pruned_while_the_copies_are_listed_is_no_problem(tmp_path, monkeypatch):
    """A backup prunes its oldest copies while status lists them: a manifest gone since the listing is not
    "unreadable" (status would report a problem with the copies); a link to nowhere still is."""
    folder = tmp_path / "backups"
    folder.mkdir()
    (folder / "dangling.sqlite3.json").symlink_to(folder / "nowhere")
    real_glob = Path.glob
    monkeypatch.setattr(Path, "glob", lambda self, pattern: [*real_glob(self, pattern),
                                                             folder / "pruned.sqlite3.json"])
    found, problems = backups.scan_backups(folder)
    assert found == [] and len(problems) == 1 and "dangling" in problems[0], problems


def test_prune_removes_what_retention_drops_but_never_the_newest_verified(tmp_path):
    cfg = make_host(tmp_path, daily=1, weekly=0, monthly=0)
    writer.create(tmp_path / "app" / "live.db")
    for _ in range(3):
        assert run_backup(cfg, "live").returncode == 0
    found = backups.list_backups(tmp_path / "backups" / "live")
    # make the newest one bad: prune must keep the newest one that verifies as well
    Path(found[0].path).write_bytes(b"garbage")
    proc = run_backup(cfg, "--prune", "--dry-run")
    assert proc.returncode == 0 and proc.stdout.count("would remove") == 2      # one line + the summary
    assert len(backups.list_backups(tmp_path / "backups" / "live")) == 3
    proc = run_backup(cfg, "--prune")
    assert proc.returncode == 0, proc.stderr
    left = {b.path for b in backups.list_backups(tmp_path / "backups" / "live")}
    assert left == {found[0].path, found[1].path}
    assert f"removed {found[2].path}" in proc.stdout
    assert not Path(found[2].path).exists() and not Path(found[2].path + ".json").exists()


def test_prune_removes_the_spare_of_a_backup_it_removes_and_keeps_the_others(tmp_path):
    cfg = make_host(tmp_path, daily=1, weekly=0, monthly=0)
    live = tmp_path / "app" / "live.db"
    writer.create(live)
    for _ in range(2):
        writer.fill(live, 1)                          # two backups of different bytes
        assert run_backup(cfg, "live").returncode == 0
    newest, oldest = backups.list_backups(tmp_path / "backups" / "live")
    assert newest.sha256 != oldest.sha256
    stale = restore.make_spare(oldest, live)          # a deploy's spare of a point retention drops
    proc = run_backup(cfg, "--prune", "--dry-run")
    assert proc.returncode == 0 and f"would remove {stale} (the deploy's spare of a backup not kept)" in proc.stdout
    assert stale.exists()
    proc = run_backup(cfg, "--prune")
    assert proc.returncode == 0, proc.stderr
    assert f"removed {stale}" in proc.stdout and restore.spares(live) == []
    kept = restore.make_spare(newest, live)           # the kept point's spare stays
    assert run_backup(cfg, "--prune").returncode == 0 and restore.spares(live) == [kept]
    kept.unlink()
    restore.spare_name(live, "f" * 64).mkdir()        # a folder in a spare's place: said, the prune goes on
    proc = run_backup(cfg, "--prune")
    assert proc.returncode == 0 and one_line_error(proc).startswith("warning: cannot remove ")


def test_prune_never_removes_a_backup_the_last_deploys_refer_to(tmp_path):
    cfg = make_host(tmp_path, daily=1, weekly=0, monthly=0)
    writer.create(tmp_path / "app" / "live.db")
    for _ in range(3):
        assert run_backup(cfg, "live").returncode == 0
    oldest = backups.list_backups(tmp_path / "backups" / "live")[-1]
    (tmp_path / "state").mkdir(exist_ok=True)
    (tmp_path / "state" / "live.deploys.jsonl").write_text(json.dumps(
        {"kind": "deploy", "backup": oldest.path, "time": oldest.time, "result": "ok"}) + "\n")
    assert run_backup(cfg, "--prune", "--quiet").returncode == 0
    assert oldest.path in {b.path for b in backups.list_backups(tmp_path / "backups" / "live")}


# -- the timer, under the real user manager --------------------------------------------------
APPEND_STDIN = "import sys; open(sys.argv[1], 'a').write(sys.stdin.read() + chr(10))"


def test_timer_installs_and_its_service_backs_up(user_manager, tmp_path):
    cfg = make_host(tmp_path)
    writer.create(tmp_path / "app" / "live.db")
    proc = run_backup(cfg, "--install-timer", "04:05", env=user_manager.env)
    assert proc.returncode == 0, proc.stderr
    timer = (user_manager.unit_dir / "safe-deploy-backup.timer").read_text()
    assert "OnCalendar=*-*-* 04:05:00" in timer and "Persistent=true" in timer
    assert user_manager.systemctl("is-enabled", "safe-deploy-backup.timer").stdout.strip() == "enabled"
    assert user_manager.systemctl("is-active", "safe-deploy-backup.timer").stdout.strip() == "active"
    user_manager.systemctl("start", "safe-deploy-backup.service", timeout=120)      # oneshot: waits for it
    found = backups.list_backups(tmp_path / "backups" / "live")
    assert len(found) == 1 and found[0].reason == "nightly"
    # a night that fails: backup.py alerts, and so does the timer's OnFailure= unit (for a crash it could not report)
    got = tmp_path / "alerts.jsonl"
    cfg.write_text(cfg.read_text() + f"\n[alerts]\ncommand = {json.dumps([sys.executable, '-c', APPEND_STDIN, str(got)])}\n")
    (tmp_path / "app" / "live.db").write_bytes(b"not a database" * 100)
    user_manager.systemctl("reset-failed", check=False)
    assert user_manager.systemctl("start", "safe-deploy-backup.service", check=False, timeout=120).returncode != 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (not got.exists() or len(got.read_text().splitlines()) < 2):
        time.sleep(0.2)
    events = [json.loads(line) for line in got.read_text().splitlines()]
    assert [e["event"] for e in events] == ["backup-failed", "backup-failed"]
    assert "systemd unit safe-deploy-backup.service failed" in events[1]["message"]
    assert events[1]["command"].startswith("journalctl --user -u safe-deploy-backup.service")
    user_manager.systemctl("disable", "--now", "safe-deploy-backup.timer")
    for name in ("safe-deploy-backup.timer", "safe-deploy-backup.service", "safe-deploy-backup-failed.service"):
        (user_manager.unit_dir / name).unlink()
    user_manager.systemctl("reset-failed", check=False)
    user_manager.systemctl("daemon-reload")


def test_backup_arguments_are_checked(tmp_path):
    cfg = make_host(tmp_path)
    for args, words in ((["live", "--all"], "not both"), ([], "--all"), (["--reason", "../x", "live"], "--reason"),
                        (["--install-timer", "25:00"], "HH:MM"), (["--dry-run", "live"], "--prune"),
                        (["nosuch"], "no env named 'nosuch'")):
        proc = run_backup(cfg, *args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert words in one_line_error(proc)
