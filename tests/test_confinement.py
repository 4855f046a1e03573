"""Issue 19, confinement: nothing the tool runs, reads or restores reaches past its own env, its own
folders and its own copies. Each test reproduces a finding on real parts (real SQLite files in WAL
mode and the sqlite3 shell, real restic repositories, real HTTP servers on 127.0.0.1, real processes),
and failed before its fix."""

import os
import sqlite3
import subprocess
import sys

from demo.sandbox import REPO_ROOT
from safedeploy import backups

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
