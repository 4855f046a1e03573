"""Small helpers for the tests: listings of folders, one-line error checks."""

import contextlib
import json
import os
import re
import sqlite3
import shutil
import subprocess
from pathlib import Path

import requests

from demo.sandbox import git


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


def status(sb, env):
    proc = sb.run("status.py", env, "--json")
    assert proc.returncode in (0, 1) and "Traceback" not in proc.stderr, proc.stderr
    return json.loads(proc.stdout)["envs"][env]


def no_good_release_marked_bad(sb, env):
    bad = sb.root / "state" / f"{env}.bad.jsonl"
    return not bad.exists() or all(not json.loads(line)["bad"] for line in bad.read_text().splitlines())


def live_notes(sb, env, column="body"):
    """The bodies of the notes live in env's database (column: the name the note's text has there)."""
    conn = sqlite3.connect(f"file:{sb.db_path(env)}?mode=ro", uri=True)
    try:
        return {r[0] for r in conn.execute(f"SELECT {column} FROM notes")}
    finally:
        conn.close()


def follow(sb, env, limit=4):
    """Paste the first advice until there is none; (the commands, the problems status showed, the last report)."""
    ran, said = [], []
    for _ in range(limit):
        report = status(sb, env)
        said += report["problems"]
        if not report["advice"]:
            return ran, said, report
        command = report["advice"][0]["command"]
        proc = paste(sb, command)
        assert proc.returncode == 0, (command, proc.stdout + proc.stderr)
        ran.append(command)
    raise AssertionError(f"the advice did not end after {limit} commands: {ran}; now {report['advice']}")


def said_lost(problems, pattern):
    """The number of rows the tool said, beforehand, it could not save."""
    found = [int(m.group(1)) for p in problems for m in [re.search(pattern, p)] if m]
    return max(found, default=0)


def fill(sb, env, n, prefix):
    """n notes of 300 bytes and more, each acknowledged (201)."""
    session = requests.Session()
    for i in range(n):
        assert session.post(sb.url(env, "/notes"), data=f"{prefix}{i}-" + "x" * 300, timeout=5).status_code == 201


def rebuild(sb, env):
    """The backup disk died and the host was reinstalled: the backups, the state, the releases and the
    socket units are gone; the tree is cloned again and runs from a plain unit on a new, empty database."""
    stem = sb.unit(env).removesuffix(".service")
    for name in (f"{stem}.socket", sb.unit(env), f"{stem}-handover.service"):
        sb.manager.systemctl("stop", name, check=False)
        (sb.manager.unit_dir / name).unlink(missing_ok=True)
    shutil.rmtree(f"{sb.path(env)}.releases")
    if env == "dev" and (sb.path("dev") / ".git").is_file():        # dev was a work tree of prod's clone
        git(sb.path("prod"), "worktree", "remove", "--force", str(sb.path("dev")))
    shutil.rmtree(sb.path(env), ignore_errors=True)      # (the work tree removal took dev already)
    branch = "main" if env == "prod" else "dev"
    git(sb.root, "clone", "--quiet", "--branch", branch, str(sb.root / "origin.git"), str(sb.path(env)))
    if sb.app is not None:          # a Django site: its venv, its empty database migrated, static files
        sb.app.prepare(sb.path(env), env)
    sb.write_unit(env)
    sb.manager.systemctl("daemon-reload")
    sb.manager.systemctl("start", sb.unit(env))
    sb.wait_serving(env)


def rebuilt_host_incident(sb, env="dev"):
    """The incident on any app: the host rebuilt (releases, units and state gone, the backups kept), the app
    restarted on a new, empty database and took writes before anyone looked. status is never OK with the
    copy's rows outside; its advice, pasted, ends with the rows of both live, in at most 3 commands."""
    fill(sb, env, 30, "before")
    assert sb.run("backup.py", env).returncode == 0
    rebuild(sb, env)
    shutil.rmtree(sb.root / "state")
    fill(sb, env, 5, "after")                            # writes on the new, empty database
    first = status(sb, env)
    assert not first["ok"] and first["advice"], first
    ran, said, last = follow(sb, env)
    live = live_notes(sb, env)
    assert {f"before{i}-" + "x" * 300 for i in range(30)} <= live, (ran, said)
    assert {f"after{i}-" + "x" * 300 for i in range(5)} <= live, (ran, said)
    assert last["ok"] and len(ran) <= 3, (ran, last["problems"])
    assert no_good_release_marked_bad(sb, env)
