"""Issue 19, confinement: nothing the tool runs, reads or restores reaches past its own env, its own
folders and its own copies. Each test reproduces a finding on real parts (real SQLite files in WAL
mode and the sqlite3 shell, real restic repositories, real HTTP servers on 127.0.0.1, real processes),
and failed before its fix."""

import http.server
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

from demo.sandbox import REPO_ROOT
from safedeploy import alerts, backups, commands, units
from safedeploy.config import Alerts
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
    """A conflicting row is written commented out; a newline in its value used to end the comment and
    run the rest as SQL: `sqlite3 LIVE < rows.sql` emptied the table. Now no value can end a comment
    or a statement, and the free rows come back byte for byte."""
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
    assert "post: 2 row(s), 1 of them flagged" in sql and sql.count("-- CONFLICT") == 1
    applied = subprocess.run(["sqlite3", str(live)], input=sql, capture_output=True, text=True, timeout=30)
    assert applied.returncode == 0, applied.stderr
    conn = sqlite3.connect(live)
    rows = {r[0]: r[1:] for r in conn.execute("SELECT id, body, pic FROM post")}
    conn.close()
    assert rows == {1: ("kept", None), 2: (FREE_BODY, b"\x00\n\xff"), 3: ("written since the restore", None)}
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
    out = units.render_socket_service(text, "app.service", notify=True)
    unit_lines = out.split("[Service]")[0].splitlines()
    assert "Requires=postgresql.service" in unit_lines and "After=network-online.target postgresql.service" in unit_lines
    assert "Wants=network-online.target" in unit_lines
    assert "Requires=app.socket" in unit_lines and "After=app.socket" in unit_lines
    assert units.render_socket_service(out, "app.service", notify=True) == out          # idempotent: nothing doubled


# -- 1, 2: overlapping shared paths, a db that climbs out of its tree: refused before anything runs ----------
def test_overlapping_shared_paths_and_a_db_outside_the_tree_stop_every_script_at_load(sandbox):
    """1: `shared = ["instance/uploads"]` beside the database's folder `instance`: the next build removed
    the live uploads (exit 0). 2: `db = "../data/dev.sqlite"`: converting dev renamed prod's live
    database into dev's releases (exit 0). Both are refused at load now, naming both sides, and
    nothing on the host changes."""
    sb = sandbox
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
