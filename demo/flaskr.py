"""A flaskr-like app under gunicorn (2 workers) for the migration tests and bench/migration_bench.py:
posts whose text column the release names (COLUMN: "body", or "content" after a rename), a notes table
for a writer, and a migration script (pre_restart) whose shape the release names in MIGRATION:

- "none": nothing changes;
- "rename SECONDS": post.body renamed to content (the running release, which reads body, breaks), then
  SECONDS of work after the change (a backfill);
- "additive SECONDS": a new column (the running release does not care), then SECONDS of work;
- "fail": the rename, then the migration fails (exit 1).

The releases' venvs are installed from a wheel folder made from this python's own Flask and gunicorn
(demo.wheels.wheels_of_installed), with uv (demo.wheels.uv_build): no network.
"""

import json

from demo.wheels import uv_build, wheels_of_installed

APP = '''\
import json
import sqlite3
from pathlib import Path

from flask import Flask, request

HERE = Path(__file__).resolve().parent
VERSION = (HERE / "VERSION").read_text().strip()
COLUMN = (HERE / "COLUMN").read_text().strip()
app = Flask(__name__)


def db():
    conn = sqlite3.connect(HERE / "instance" / "app.db", timeout=10)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY, body TEXT)")
    if COLUMN == "body":
        conn.execute("CREATE TABLE IF NOT EXISTS post (id INTEGER PRIMARY KEY, body TEXT NOT NULL)")
    return conn


@app.get("/health")
def health():
    return {"ok": True}


@app.get("/")
def index():
    conn = db()
    try:
        posts = conn.execute(f"SELECT id, {COLUMN} FROM post ORDER BY id").fetchall()
        return {"version": VERSION, "posts": len(posts)}
    finally:
        conn.close()


@app.post("/notes")
def add_note():
    conn = db()
    try:
        with conn:
            cur = conn.execute("INSERT INTO notes (body) VALUES (?)", (request.get_data(as_text=True),))
        return {"id": cur.lastrowid}, 201
    finally:
        conn.close()


@app.get("/_deploy/status")
def status():
    return json.loads((HERE / "REVISION").read_text())
'''

MIGRATE = '''\
import sqlite3
import time
from pathlib import Path

here = Path(__file__).resolve().parent
kind, *rest = (here / "MIGRATION").read_text().split()
seconds = float(rest[0]) if rest else 0.0
conn = sqlite3.connect(here / "instance" / "app.db", timeout=30)
columns = [r[1] for r in conn.execute("PRAGMA table_info(post)")]
if kind in ("rename", "fail") and "body" in columns:
    conn.execute("ALTER TABLE post RENAME COLUMN body TO content")
    conn.commit()
if kind == "additive" and "tag" not in columns:
    conn.execute("ALTER TABLE post ADD COLUMN tag TEXT")
    conn.commit()
if kind == "fail":
    print("migration: the backfill failed", file=sys.stderr)
    sys.exit(1)
time.sleep(seconds)
print(f"migration {kind}: done")
'''

UNIT = """\
[Unit]
Description=flaskr under gunicorn ({env})

[Service]
WorkingDirectory={path}
ExecStart={path}/venv/bin/gunicorn --preload --workers 2 --bind 127.0.0.1:{port} app:app
StandardOutput=append:{log}
StandardError=inherit
Restart=on-failure

[Install]
WantedBy=default.target
"""


def wheel_folder(root):
    """(folder, requirements.txt text): Flask and gunicorn as this python has them."""
    folder = root / "wheels"
    made = wheels_of_installed(folder, ["flask", "gunicorn"])
    pins = sorted({p.name.split("-")[0].lower(): p.name.split("-")[1] for p in made}.items())
    return folder, "".join(f"{n}=={v}\n" for n, v in pins if n in ("flask", "gunicorn"))


def build_argv(wheels):
    """The config's `build`: the release's venv from the wheel folder, with uv."""
    return uv_build(wheels)


def release_files(version, column, migration):
    return {"VERSION": f"{version}\n", "COLUMN": f"{column}\n", "MIGRATION": f"{migration}\n"}


def set_up(sb, env="dev", extra=""):
    """dev runs flaskr v1 (three posts) under gunicorn, converted to releases and socket units by
    deploy.py --install-units, with the migration as pre_restart; returns the wheel folder."""
    import subprocess
    wheels, requirements = wheel_folder(sb.root)
    sb.release(env, {"app.py": APP, "migrate.py": MIGRATE, "requirements.txt": requirements,
                     **release_files(1, "body", "none"), "MODE": "ok\n"}, "flaskr under gunicorn")
    tree = sb.path(env)
    sb.pull(env)
    for argv in build_argv(wheels):
        subprocess.run(argv, cwd=tree, check=True, timeout=300)
    (sb.root / "logs").mkdir(exist_ok=True)
    (sb.manager.unit_dir / sb.unit(env)).write_text(UNIT.format(env=env, path=tree, port=sb.ports[env],
                                                                log=sb.root / "logs" / f"{env}.log"))
    sb.manager.systemctl("daemon-reload")
    sb.manager.systemctl("restart", sb.unit(env))
    sb.wait_serving(env, 30)
    import sqlite3
    conn = sqlite3.connect(sb.db_path(env))
    with conn:
        conn.execute("CREATE TABLE IF NOT EXISTS post (id INTEGER PRIMARY KEY, body TEXT NOT NULL)")
        conn.executemany("INSERT INTO post (body) VALUES (?)", [("first",), ("second",), ("third",)])
    conn.close()
    sb.write_config(**{env: f"build = {json.dumps(build_argv(wheels))}\n"
                            f'pre_restart = [["venv/bin/python", "migrate.py"]]\n'
                            f'rehearse_paths = ["/"]\nhealth_timeout = 30\n{extra}'})
    proc = sb.run("deploy.py", env, "--install-units", "--yes")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return wheels
