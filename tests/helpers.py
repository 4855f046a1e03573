"""Small helpers for the tests: listings of folders, one-line error checks."""

import contextlib
import json
import os
import subprocess
from pathlib import Path


def listing(*folders):
    """Every file under the folders with its size and mtime, to prove nothing changed."""
    result = {}
    for folder in folders:
        for root, _, files in os.walk(folder):
            for name in files:
                p = Path(root) / name
                st = p.stat()
                result[str(p)] = (st.st_size, st.st_mtime_ns)
    return result


def one_line_error(proc):
    """The process failed with one clear line on stderr and no traceback."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr
    return lines[0]


def log_records(sandbox, env):
    path = sandbox.root / "state" / f"{env}.deploys.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


@contextlib.contextmanager
def tmpfs(folder, options):
    """A small file system of its own at folder (made if missing), e.g. options "size=2m,mode=0700":
    a full disk, a read-only one, or one out of inodes, for real. Unmounted afterwards."""
    Path(folder).mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], check=True, timeout=30)
    try:
        yield Path(folder)
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True, timeout=30)


def paste(sb, command, timeout=180):
    """Run a command the tool printed as an operator pastes it: through a shell, with cron's PATH
    (/usr/bin:/bin, so `python3` is the system python), and the sandbox's user manager."""
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8", "NO_COLOR": "1",
           **sb.manager.env}
    return subprocess.run(["sh", "-c", command], env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def make_db(path, script, rows=()):
    """An SQLite file in WAL mode with script's schema and the rows the statements insert."""
    import sqlite3
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.executescript(script)
    for sql in rows:
        conn.execute(sql)
    conn.close()


def run_sql(db, *statements):
    import sqlite3
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        for statement in statements:
            conn.execute(statement)
    finally:
        conn.close()
