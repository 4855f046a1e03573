"""Issue 19, confinement: nothing the tool runs, reads or restores reaches past its own env, its own
folders and its own copies. Each test reproduces a finding on real parts (real SQLite files in WAL
mode and the sqlite3 shell, real restic repositories, real HTTP servers on 127.0.0.1, real processes),
and failed before its fix."""

import http.server
import json
import os
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from demo.sandbox import REPO_ROOT, free_port
from safedeploy import alerts, backups, commands, config, offsite, unitfiles
from safedeploy.config import Alerts
from safedeploy.errors import DeployError
from safedeploy.state import EnvLock
from tests import cheap_restic
from tests.helpers import listing, one_line_error

HOST_CONFIG = """
[defaults]
remote = ""
[env.live]
path = "app"
branch = "main"
port = 18998
db = "live.db"
unit = "nothing-here.service"
"""


def make_host(tmp_path, text=HOST_CONFIG):
    """A config with one env (no unit, no remote) whose work tree is a real git repository."""
    (tmp_path / "app").mkdir(exist_ok=True)
    subprocess.run(["git", "init", "-q", "-b", "main", str(tmp_path / "app")], check=True, timeout=30)
    cfg = tmp_path / "config.toml"
    cfg.write_text(text)
    cfg.chmod(0o600)
    return cfg


def script(name, cfg, *args, timeout=120, env=None):
    return subprocess.run([sys.executable, str(REPO_ROOT / name), *args, "--config", str(cfg)],
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                          env={**os.environ, **(env or {})})


# -- 3: the row export never executes user data --------------------------------------------------------
HOSTILE_BODY = "my day\nDELETE FROM post;--"
FREE_BODY = "line one\nline two\r\n\ttabbed; -- not a comment\x7f 'quoted' \"too\""


def test_rows_to_restore_never_runs_a_value_as_sql_even_in_a_conflict(tmp_path):
    """The review text of a restore (backup.py --rows-to-restore, as --restore-rows --sql): a newline in a
    value used to end a comment and run the rest as SQL (`sqlite3 LIVE < rows.sql` emptied the table). No
    value can end a comment or a statement; read by the real sqlite3 shell, the free rows come back byte
    for byte and the taken id under a new one."""
    cfg = make_host(tmp_path)
    live = tmp_path / "app" / "live.db"
    conn = sqlite3.connect(live, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE post (id INTEGER PRIMARY KEY, body TEXT, pic BLOB)")
    conn.executemany("INSERT INTO post VALUES (?, ?, ?)",
                     [(1, "kept", None), (2, FREE_BODY, b"\x00\n\xff"), (3, HOSTILE_BODY, None)])
    conn.close()
    proc = script("backup.py", cfg, "live")
    assert proc.returncode == 0, proc.stderr
    (saved,) = backups.list_backups(tmp_path / "backups" / "live")
    conn = sqlite3.connect(live, isolation_level=None)
    conn.execute("DELETE FROM post WHERE id IN (2, 3)")                 # the restore took 2 and 3 out
    conn.execute("INSERT INTO post VALUES (3, 'written since the restore', NULL)")      # 3 is taken again
    conn.close()
    proc = script("backup.py", cfg, "--rows-to-restore", saved.path)
    assert proc.returncode == 0, proc.stderr
    sql = proc.stdout
    assert sql.count("INSERT OR ABORT") == 2 and sql.count("comes back as 4") == 1     # the review text
    applied = subprocess.run(["sqlite3", str(live)], input=sql, capture_output=True, text=True, timeout=30)
    assert applied.returncode == 0, applied.stderr
    conn = sqlite3.connect(live)
    rows = {r[0]: r[1:] for r in conn.execute("SELECT id, body, pic FROM post")}
    conn.close()
    # the conflicting row comes back under a new id, its hostile body as text: nothing ran, nothing was lost
    assert rows == {1: ("kept", None), 2: (FREE_BODY, b"\x00\n\xff"), 3: ("written since the restore", None),
                    4: (HOSTILE_BODY, None)}
    for line in sql.splitlines():           # every statement and comment is one line: nothing spans two
        assert line.startswith("-- ") or line.endswith(";") or not line.strip(), line


# -- a command's pipes are closed when it exits, whatever its children do --------------------------------
def process_gone(pid):
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in state           # a zombie has stopped: it only waits to be reaped


def test_a_command_that_leaves_a_child_holding_its_output_returns_when_it_exits(tmp_path):
    """A build step that starts something in the background (it keeps stdout open) used to hold
    run_one until command_timeout (900 s by default), then failed the deploy."""
    pidfile = tmp_path / "child.pid"
    start = time.monotonic()
    failure = commands.run_one(["sh", "-c", f"sleep 120 & echo $! > {pidfile}; echo built"], tmp_path, timeout=20)
    took = time.monotonic() - start
    child = int(pidfile.read_text())
    try:
        assert failure is None and took < 3, (failure, took)
        done = commands.run(["sh", "-c", "sleep 120 & echo out; echo err >&2; exit 3"], 20)
        assert done.returncode == 3 and done.stdout == b"out\n" and done.stderr == b"err\n" and done.seconds < 3
    finally:
        os.kill(child, signal.SIGKILL)


def test_a_timed_out_command_is_killed_with_its_whole_process_group(tmp_path):
    pidfile = tmp_path / "child.pid"
    start = time.monotonic()
    failure = commands.run_one(["sh", "-c", f"sleep 120 & echo $! > {pidfile}; echo working; sleep 120"],
                               tmp_path, timeout=1)
    assert time.monotonic() - start < 4
    assert failure and "timed out after 1s" in failure.why and "working" in failure.output
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while not process_gone(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process_gone(child), "the timed-out command's background child still runs"


def test_a_command_keeps_only_the_tail_of_a_huge_output():
    """400 MB of output cost 1.1 GiB of memory when read whole; now the tail is kept (and stdout of
    an alert command is discarded)."""
    done = commands.run([sys.executable, "-c", "import sys\nfor _ in range(200): sys.stdout.write('x' * 1000000)\n"
                         "sys.stdout.write('THE END')"], 60, stdout="tail", stderr="discard")
    assert done.returncode == 0 and done.stdout.endswith(b"THE END") and len(done.stdout) <= 2 * commands.TAIL_BYTES


# -- 9: the webhook never follows a redirect; the alert command's output is bounded -------------------------
class Server:
    """A real HTTP server on 127.0.0.1: records each POST; answers `status` (with Location: `location`)."""

    def __init__(self, status=200, location=None):
        self.posts, self.status, self.location = [], status, location
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                server.posts.append(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                self.send_response(server.status)
                if server.location:
                    self.send_header("Location", server.location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_a_webhook_that_redirects_is_a_failed_delivery_and_the_event_goes_nowhere_else():
    elsewhere = Server()
    for status in (307, 308, 302):
        hook = Server(status, location=elsewhere.url)
        try:
            problems = alerts.send(Alerts(webhook=hook.url, command=[]), alerts.event("test", "prod", "hello"))
        finally:
            hook.close()
        assert len(hook.posts) == 1
        assert problems == [f"the alert webhook {hook.url} answered {status}; redirects are not followed"], problems
    elsewhere.close()
    assert elsewhere.posts == [], "the event was re-posted to the redirect's target"


def test_the_alert_command_s_output_is_not_read_into_memory(tmp_path):
    """An alert command that writes 300 MB: the old capture read it whole (RSS past 600 MB)."""
    probe = ("import resource, sys\nfrom safedeploy import alerts\n"
             "problems = alerts.run_command([sys.executable, '-c', 'import sys\\nfor _ in range(300): "
             "sys.stdout.write(\"x\" * 1000000); sys.stderr.write(\"e\" * 10000)\\nsys.exit(5)'], '{}')\n"
             "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, problems)\n")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rss_mib, problems = proc.stdout.split(" ", 1)
    assert int(rss_mib) < 100, f"peak RSS {rss_mib} MiB"
    assert "exited 5" in problems and "eeee" in problems and len(problems) < 1000


# -- conversion keeps the unit's own dependencies ------------------------------------------------------------
def test_the_socket_service_keeps_the_unit_s_own_requires_and_after():
    text = ("[Unit]\nDescription=app\nRequires=postgresql.service\nAfter=network-online.target postgresql.service\n"
            "Wants=network-online.target\n\n[Service]\nExecStart=/srv/app/venv/bin/gunicorn app:app\n")
    out = unitfiles.render_socket_service(text, "app.service", notify=True)
    unit_lines = out.split("[Service]")[0].splitlines()
    assert "Requires=postgresql.service" in unit_lines and "After=network-online.target postgresql.service" in unit_lines
    assert "Wants=network-online.target" in unit_lines
    assert "Requires=app.socket" in unit_lines and "After=app.socket" in unit_lines
    assert unitfiles.render_socket_service(out, "app.service", notify=True) == out          # idempotent: nothing doubled


# -- 1, 2: overlapping shared paths, a db that climbs out of its tree: refused before anything runs ----------
def test_overlapping_shared_paths_and_a_db_outside_the_tree_stop_every_script_at_load(in_place):
    """1: `shared = ["instance/uploads"]` beside the database's folder `instance`: the next build removed
    the live uploads (exit 0). 2: `db = "../data/dev.sqlite"`: converting dev renamed prod's live
    database into dev's releases (exit 0). Both are refused at load now, naming both sides, and
    nothing on the host changes."""
    sb = in_place
    good = sb.config.read_text()
    prod_db, dev_db = sb.db_path("prod"), sb.db_path("dev")
    data = sb.root / "data"
    data.mkdir()
    sqlite3.connect(data / "prod.sqlite").close()
    head, dev = good.split("[env.dev]")
    cases = [(head + "[env.dev]" + dev.replace('unit =', 'shared = ["instance/uploads"]\nunit =', 1),
              ["deploy.py", "dev", "--install-units", "--yes"], "env.dev.shared: 'instance/uploads' lies inside 'instance'"),
             (head + "[env.dev]" + dev.replace('db = "instance/app.db"', 'db = "../data/dev.sqlite"'),
              ["deploy.py", "dev", "--install-units", "--yes"], "env.dev.db: '../data/dev.sqlite' climbs out of env dev's tree")]
    before = listing(sb.root / "prod", sb.root / "dev", data)
    for text, argv, words in cases:
        sb.config.write_text(text)
        for command in (argv, ["backup.py", "--all"], ["status.py"]):
            proc = sb.run(*command)
            assert proc.returncode == 2 and words in one_line_error(proc), (command, proc.stderr)
    assert listing(sb.root / "prod", sb.root / "dev", data) == before
    assert not Path(f"{sb.path('dev')}.releases").exists() and prod_db.exists() and dev_db.exists()


# -- 6, 7, 8, 11: off-site copies are this config's, fetched safely, secrets masked, the network bounded ----
PASSWORD = "restic password 4b1d"
URL_SECRET = "s3cr3t-4b1d-in-the-url"


def with_offsite(sb, repository=None, options=(), extra="", webhook=None, file=None):
    """[offsite] (and [alerts]) in the sandbox's config (or in `file`, another config of the same host)."""
    file = file or sb.config
    pw = sb.root / "restic-password"
    pw.write_text(PASSWORD + "\n")
    pw.chmod(0o600)
    if repository is None:
        cheap_restic.premade(sb.root / "offsite-repo", PASSWORD)     # made ahead, with a cheap key
    repository = repository or str(sb.root / "offsite-repo")
    text = file.read_text().split("\n[offsite]")[0]
    text += f'\n[offsite]\nrepository = "{repository}"\npassword_file = "{pw}"\n{extra}\n'
    if options:
        text += "options = [" + ", ".join(f'"{o}"' for o in options) + "]\n"
    if webhook:
        text += f'\n[alerts]\nwebhook = "{webhook}"\n'
    file.write_text(text)
    file.chmod(0o600)
    return config.load(str(file))


def other_config(sb, extra):
    """A second config on this host (another folder, its own backups and state), same envs, same
    repository: another config's copies (or, with host = "...", another host's)."""
    folder = sb.root / "other"
    folder.mkdir(exist_ok=True)
    file = folder / "config.toml"
    file.write_text(sb.config.read_text())
    return with_offsite(sb, extra=extra, file=file), file


def restic(cfg, *args):
    """restic itself, as a test harness (the repository in argv is fine here)."""
    return subprocess.run(["restic", "--repo", cfg.offsite.repository, "--password-file", str(cfg.offsite.password_file),
                           *args], capture_output=True, text=True, timeout=120)


def all_snapshots(cfg):
    return json.loads(restic(cfg, "snapshots", "--json").stdout or "[]")


def test_another_host_s_or_config_s_copies_are_never_listed_restored_or_forgotten(sandbox):
    """6: copies were matched by their env= tag alone: another host's dev copy in the same repository
    was listed and restored into this dev, and this host's prune forgot the other host's snapshots."""
    sb = sandbox
    ours = with_offsite(sb)
    assert sb.run("backup.py", "prod").returncode == 0
    theirs, their_file = other_config(sb, 'host = "otherhost"')
    for _ in range(3):          # three in one day: a prune that saw them would forget some
        proc = sb.run("backup.py", "dev", "--config", str(their_file), config=False)
        assert proc.returncode == 0, proc.stderr
    before = {s["id"] for s in all_snapshots(ours)}
    assert len(before) == 4
    listed = json.loads(sb.run("backup.py", "--list", "--json").stdout)
    assert [b["env"] for b in listed["backups"]] == ["prod"] and listed["offsite"]["others"] == 3
    assert listed["offsite"]["host"] == ours.offsite.host and listed["offsite"]["config"] == ours.offsite.id
    points = json.loads(sb.run("rollback.py", "dev", "--list", "--json").stdout)["points"]
    assert not any(p["offsite"] for p in points), points
    copies, problem = offsite.copies_for(ours, ours.envs["dev"])
    assert copies == [] and problem is None
    (their_copy, *_) = offsite.copies_for(theirs, theirs.envs["dev"])[0]
    with pytest.raises(DeployError, match="is not this config's"):
        offsite.fetch_for(ours, their_copy, ours.envs["dev"])
    proc = sb.run("backup.py", "--prune")
    assert proc.returncode == 0, proc.stderr
    assert {s["id"] for s in all_snapshots(ours)} == before          # the other's three are all still there
    # a copy pushed before the config tag existed counts as this host's by restic's own --host
    legacy = restic(ours, "backup", "--host", ours.offsite.host, "--tag", "safe-deploy", "--tag", "env=prod",
                    "--tag", "file=prod-20260101-000000-nightly.sqlite3", "--tag", "sha256=00",
                    "--tag", "time=2026-01-01T00:00:00+00:00", "--tag", "commit=abc", str(sb.config))
    assert legacy.returncode == 0, legacy.stderr
    assert [c.file for c in offsite.copies_for(ours, ours.envs["prod"])[0]][-1] == "prod-20260101-000000-nightly.sqlite3"
    assert not any(c.file.startswith("prod-2026010") for c in offsite.copies_for(theirs, theirs.envs["prod"])[0])


def hostile_snapshot(cfg, folder, files, tags):
    """A snapshot of this config (its host and id tags) holding `files` (name -> bytes), tagged `tags`."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    args = ["backup", "--host", cfg.offsite.host, "--tag", "safe-deploy", "--tag", f"config={cfg.offsite.id}",
            *[x for t in tags for x in ("--tag", t)], *[str(folder / n) for n in files]]
    proc = restic(cfg, *args)
    assert proc.returncode == 0, proc.stderr


def test_a_copy_whose_manifest_names_another_env_is_refused(in_place):
    """6: a copy tagged env=dev whose manifest says prod was accepted and restored into dev."""
    sb = in_place
    cfg = with_offsite(sb)
    assert sb.run("backup.py", "prod").returncode == 0
    (prod_backup,) = backups.list_backups(sb.root / "backups" / "prod")
    name = Path(prod_backup.path).name.replace("prod-", "dev-")
    hostile_snapshot(cfg, sb.root / "forged", {name: Path(prod_backup.path).read_bytes(),
                                               name + ".json": prod_backup.manifest_path.read_bytes()},
                     ["env=dev", f"file={name}", f"sha256={prod_backup.sha256}", f"time={prod_backup.time}",
                      "commit=abc", "reason=nightly"])
    (copy,) = offsite.copies_for(cfg, cfg.envs["dev"])[0]
    before = listing(sb.root / "backups")
    with pytest.raises(DeployError, match="its manifest is env 'prod''s, not 'dev''s"):
        offsite.fetch_for(cfg, copy, cfg.envs["dev"])
    assert listing(sb.root / "backups") == before and sorted(os.listdir(sb.root / "backups" / "dev")) == []


def test_a_hostile_snapshot_named_like_held_backups_overwrites_and_removes_nothing(in_place):
    """7: a fetch wrote each snapshot path by its file name into the backup folder, replacing a HELD
    pre-rollback copy, then removed what it wrote when the copy did not verify."""
    sb = in_place
    cfg = with_offsite(sb)
    assert sb.run("backup.py", "dev").returncode == 0
    (held,) = backups.list_backups(sb.root / "backups" / "dev")
    data = json.loads(held.manifest_path.read_text())
    data["held"] = True
    held.manifest_path.write_text(json.dumps(data))
    held_name = Path(held.path).name
    folder = sb.root / "backups" / "dev"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    fake = "dev-20990101-000000-nightly.sqlite3"
    hostile_snapshot(cfg, sb.root / "hostile", {fake: b"SQLite format 3\x00 not really", fake + ".json": b"{}",
                                                held_name: b"overwritten", held_name + ".json": b"{}"},
                     ["env=dev", f"file={fake}", "sha256=" + "0" * 64, "time=2099-01-01T00:00:00+00:00",
                      "commit=abc", "reason=nightly"])
    copy = next(c for c in offsite.copies_for(cfg, cfg.envs["dev"])[0] if c.file == fake)
    with pytest.raises(DeployError, match="does not verify"):
        offsite.fetch_for(cfg, copy, cfg.envs["dev"])
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before       # nothing replaced, removed or left
    # a copy whose every name is taken already is refused as a manifest-less name, never written over
    name_taken = {held_name: b"x", held_name + ".json": b"{}"}
    hostile_snapshot(cfg, sb.root / "hostile2", name_taken,
                     ["env=dev", f"file={held_name}", "sha256=" + "0" * 64, "time=2099-01-02T00:00:00+00:00", "commit=abc"])
    copy = next(c for c in offsite.copies_for(cfg, cfg.envs["dev"])[0] if c.time.startswith("2099-01-02"))
    with pytest.raises(DeployError):
        offsite.fetch_for(cfg, copy, cfg.envs["dev"])
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def pushed_then_lost_here(sb):
    """dev backed up and pushed off-site, then its local files removed: (config, dev's backup folder, the
    local backup as it was, its off-site copy)."""
    cfg = with_offsite(sb)
    assert sb.run("backup.py", "dev").returncode == 0
    folder = sb.root / "backups" / "dev"
    (local,) = backups.list_backups(folder)
    (copy,) = offsite.copies_for(cfg, cfg.envs["dev"])[0]
    for p in (Path(local.path), local.manifest_path, Path(local.unit_backup)):
        p.unlink()
    return cfg, folder, local, copy


def test_a_good_copy_is_fetched_private_verified_and_never_over_a_file(in_place):
    sb = in_place
    cfg, folder, local, copy = pushed_then_lost_here(sb)
    # its name is taken by a file that is not that backup (a manifest-less leftover): it stays untouched,
    # and the fetched copy stays in its own private folder
    Path(local.path).write_bytes(b"someone else's file")
    fetched = offsite.fetch_for(cfg, copy, cfg.envs["dev"])
    assert Path(local.path).read_bytes() == b"someone else's file"
    stage = Path(fetched.path).parent
    assert stage.parent == folder and stat.S_IMODE(stage.stat().st_mode) == 0o700
    assert stat.S_IMODE(os.stat(fetched.path).st_mode) == 0o600 and backups.verify_backup(fetched) == "ok"
    # the name free: linked in as a local backup like any other, its folder gone
    shutil.rmtree(stage)
    Path(local.path).unlink()
    fetched = offsite.fetch_for(cfg, copy, cfg.envs["dev"])
    assert fetched.path == local.path and [b.path for b in backups.list_backups(folder)] == [local.path]
    assert sorted(os.listdir(folder)) == sorted([Path(local.path).name, Path(local.path).name + ".json",
                                                 Path(local.unit_backup).name])


class Silent:
    """A TCP server on 127.0.0.1 that accepts and never answers: a black-holed repository."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.held, self.accepted = [], threading.Event()
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)
            self.accepted.set()

    def close(self):
        for conn in self.held:
            conn.close()
        self.sock.close()


@pytest.fixture
def silent():
    s = Silent()
    yield s
    s.close()


def restic_argvs(root):
    """The argv of every restic running for the sandbox under root (its password file is there): the other
    tests' restic, running beside this one, are not this test's."""
    found = []
    for pid in os.listdir("/proc"):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        line = b" ".join(argv).decode(errors="replace")
        if argv and argv[0].endswith(b"restic") and str(root) in line:
            found.append(line)
    return found


def test_a_password_in_the_repository_url_is_never_shown_alerted_or_in_argv(sandbox, silent):
    """8: rest:https://user:pw@... appeared raw in stderr, in alert bodies and in `ps`."""
    sb = sandbox
    hook = Server()
    try:
        with_offsite(sb, repository=f"rest:http://backup:{URL_SECRET}@127.0.0.1:{silent.port}/repo", webhook=hook.url)
        proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "backup.py"), "prod", "--config", str(sb.config)],
                                env=sb.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        reached = silent.accepted.wait(30)
        argvs = restic_argvs(sb.root)
        proc.kill()
        out, err = proc.communicate(timeout=30)
        assert reached, out + err
        deadline = time.monotonic() + 5         # and its restic died with it: nothing left waiting on the network
        while restic_argvs(sb.root) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not restic_argvs(sb.root), restic_argvs(sb.root)
        assert argvs and not any(URL_SECRET in a for a in argvs), argvs
        # sftp://user:pw@ (restic repeats it raw in its own message) and rest: to a closed port: the failures
        for repository in (f"sftp://backup:{URL_SECRET}@127.0.0.1:{free_port()}//srv/repo",
                           f"rest:http://backup:{URL_SECRET}@127.0.0.1:{free_port()}/repo"):
            with_offsite(sb, repository=repository, webhook=hook.url,
                         options=["sftp.command=ssh -p 1 -o BatchMode=yes 127.0.0.1 -s sftp"] if "sftp" in repository else ())
            for args in (["prod"], ["--list"], ["--verify"], ["--prune"]):
                done = sb.run("backup.py", *args)
                assert done.returncode == 1 and URL_SECRET not in done.stdout + done.stderr, (args, done.stderr, sb.config.read_text())
                assert "backup:***@127.0.0.1" in done.stderr, done.stderr
        assert hook.posts and not any(URL_SECRET.encode() in body for body in hook.posts)
    finally:
        hook.close()


def test_a_black_holed_repository_holds_no_lock_and_a_rollback_s_listing_seconds_only(sandbox, silent):
    """11: a repository that never answers held the env lock 300 s in --prune, and every rollback.py
    spent another 300 s listing off-site copies."""
    sb = sandbox
    cfg = with_offsite(sb, repository=f"rest:http://127.0.0.1:{silent.port}/repo")
    start = time.monotonic()
    copies, problem = offsite.copies_for(cfg, cfg.envs["prod"], timeout=3)
    took = time.monotonic() - start
    assert copies == [] and "did not finish within 3s" in problem and took < 5, (problem, took)
    prune = subprocess.Popen([sys.executable, str(REPO_ROOT / "backup.py"), "--prune", "--config", str(sb.config)],
                             env=sb.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert silent.accepted.wait(30), "the prune never reached the repository"
        for env in ("prod", "dev"):
            with EnvLock(sb.root / "state", env, "test", wait=0):       # free: a rollback would not wait
                pass
    finally:
        prune.kill()
        prune.communicate(timeout=30)


def test_a_push_killed_mid_way_leaves_no_lock_that_blocks_prune(sandbox):
    """A restic killed with SIGKILL mid-push left its lock: forget and prune failed ('repository is
    already locked') until someone ran restic unlock."""
    sb = sandbox
    cfg = with_offsite(sb)
    for _ in range(3):
        assert sb.run("backup.py", "prod").returncode == 0
    big = sb.root / "big.bin"
    with open(big, "wb") as fh:
        fh.write(os.urandom(64 << 20))
    push = subprocess.Popen(["restic", "--repo", cfg.offsite.repository, "--password-file", str(cfg.offsite.password_file),
                             "backup", "--host", cfg.offsite.host, str(big)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    locks = Path(cfg.offsite.repository) / "locks"
    deadline = time.monotonic() + 30
    while not any(locks.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.01)
    push.send_signal(signal.SIGKILL)
    push.wait(timeout=30)
    assert any(locks.iterdir()), "restic finished before it was killed"
    proc = sb.run("backup.py", "--prune")
    assert proc.returncode == 0, proc.stderr
    assert "prod off-site: kept 2, forgot 1" in proc.stdout


def test_a_prune_killed_mid_way_leaves_no_lock_that_blocks_the_next_push(sandbox):
    """A restic prune killed with SIGKILL leaves an exclusive lock: every push after it failed."""
    sb = sandbox
    cfg = with_offsite(sb)
    assert sb.run("backup.py", "prod").returncode == 0
    big = sb.root / "big.bin"
    with open(big, "wb") as fh:
        fh.write(os.urandom(64 << 20))
    assert restic(cfg, "backup", str(big)).returncode == 0
    assert restic(cfg, "forget", "--keep-last", "1", "--host", socket.gethostname(), "--path", str(big)).returncode == 0
    locks = Path(cfg.offsite.repository) / "locks"
    for _ in range(5):          # kill it while it holds its lock (the first tries may be too quick or too slow)
        prune = subprocess.Popen(["restic", "--repo", cfg.offsite.repository, "--password-file",
                                  str(cfg.offsite.password_file), "prune"], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not any(locks.iterdir()) and prune.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        prune.send_signal(signal.SIGKILL)
        prune.wait(timeout=30)
        if any(locks.iterdir()):
            break
    assert any(locks.iterdir()), "restic prune finished before it could be killed"
    proc = sb.run("backup.py", "prod")
    assert proc.returncode == 0 and "off-site: snapshot" in proc.stdout, proc.stderr


def test_a_fetch_killed_before_its_copy_verified_is_cleared_by_the_next_one(sandbox):
    sb = sandbox
    cfg, folder, local, copy = pushed_then_lost_here(sb)
    killed = folder / f"{offsite.STAGE_PREFIX}deadbeef-x1"          # what a kill -9 mid-download leaves
    killed.mkdir(mode=0o700)
    (killed / Path(local.path).name).write_bytes(b"half a database")
    old = time.time() - 2 * offsite.UNFINISHED_AGE
    os.utime(killed / Path(local.path).name, (old, old))
    os.utime(killed, (old, old))
    fetched = offsite.fetch_for(cfg, copy, cfg.envs["dev"])
    assert fetched.path == local.path and not killed.exists()
