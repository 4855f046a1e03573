#!/usr/bin/env python3
"""Benchmark: latency during a deploy and a rollback of a real server: a Flask app under gunicorn
with 2 workers, converted to releases and socket units by deploy.py --install-units (gunicorn
signals readiness, so deploys use the handover helper). A client sends GET / at a steady rate;
for a steady stretch, each deploy and each rollback: failed requests, longest gap, p50/p99/max.
Target: p99 during a deploy or rollback at most twice steady plus 20 ms.

    python3 bench/gunicorn_bench.py [--rate 200] [--rounds 3]   # needs the network once (wheels)
"""

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from demo import flaskr  # noqa: E402
from demo.load import Load, summary  # noqa: E402
from demo.wheels import flask_wheelhouse  # noqa: E402
from demo.sandbox import Sandbox, scratch_host  # noqa: E402

UV = shutil.which("uv") or str(Path(sys.executable).parent / "uv")

FLASK_APP = '''\
import json
import sqlite3
from pathlib import Path

from flask import Flask

HERE = Path(__file__).resolve().parent
VERSION = (HERE / "VERSION").read_text().strip()
app = Flask(__name__)


def db():
    conn = sqlite3.connect(HERE / "instance" / "app.db", timeout=10)
    conn.execute("CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY, body TEXT)")
    return conn


@app.get("/health")
def health():
    return {"ok": True}


@app.get("/")
def index():
    conn = db()
    try:
        return {"version": VERSION, "notes": conn.execute("SELECT count(*) FROM notes").fetchone()[0]}
    finally:
        conn.close()


@app.get("/_deploy/status")
def status():
    return json.loads((HERE / "REVISION").read_text())
'''

def build_argv(wheels):
    return [[UV, "venv", "--quiet", "venv"],
            [UV, "pip", "install", "--quiet", "--python", "venv/bin/python", "--no-index", "--find-links", str(wheels),
             "-r", "requirements.txt"]]


def setup(root, manager, wheels, requirements):
    sb = Sandbox(root / "host", manager, health_timeout=30, name="gb")
    sb.root.mkdir()
    sb.build()
    sb.release("dev", {"app.py": FLASK_APP, "requirements.txt": requirements, "VERSION": "1\n", "MODE": "ok\n"},
               "flask under gunicorn")
    tree = sb.path("dev")
    sb.pull("dev")
    for argv in build_argv(wheels):
        subprocess.run(argv, cwd=tree, check=True, timeout=300)
    (manager.unit_dir / sb.unit("dev")).write_text(flaskr.UNIT.format(env="dev", path=tree, port=sb.ports["dev"],
                                                              log=sb.root / "logs" / "dev.log"))
    manager.systemctl("daemon-reload")
    manager.systemctl("restart", sb.unit("dev"))
    sb.wait_serving("dev", 30)
    sb.write_config(dev=f"build = {json.dumps(build_argv(wheels))}")
    proc = sb.run("deploy.py", "dev", "--install-units", "--yes")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return sb


def timed(sb, load, argv, settle=1.5):
    start = time.monotonic()
    proc = sb.run(*argv)
    end = time.monotonic()
    assert proc.returncode == 0, proc.stderr + proc.stdout
    time.sleep(settle)
    return start, end


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    with scratch_host("gunicorn-bench-") as (root, manager):
        wheels, requirements = flask_wheelhouse(root)
        rows = []
        sb = setup(root, manager, wheels, requirements)
        load = Load(sb.url("dev", "/"), rate=args.rate).start()
        time.sleep(4)
        rows.append(("steady", summary(load.between(time.monotonic() - 3.5, time.monotonic())), 0.0))
        for i in range(args.rounds):
            sb.release("dev", {"VERSION": f"{i + 2}\n"}, f"release {i + 2}")
            start, end = timed(sb, load, ["deploy.py", "dev"])
            rows.append(("deploy", summary(load.between(start, end + 1.0)), end - start))
            start, end = timed(sb, load, ["rollback.py", "dev", "--yes", "--code-only"])
            rows.append(("rollback", summary(load.between(start, end + 1.0)), end - start))
            sb.release("dev", {"VERSION": f"{i + 2}b\n"}, f"release {i + 2}b")
            start, end = timed(sb, load, ["deploy.py", "dev"])
            rows.append(("deploy", summary(load.between(start, end + 1.0)), end - start))
        time.sleep(3)
        rows.append(("steady", summary(load.between(time.monotonic() - 2.5, time.monotonic())), 0.0))
        load.stop()
        sb.stop_units()
    steady = max(r[1]["p99"] for r in rows if r[0] == "steady")
    print(f"flask + gunicorn (2 workers), releases + socket + handover, {args.rate} requests/s")
    print(f"{'what':<9} {'seconds':>7} {'requests':>8} {'failed':>6} {'gap s':>6} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7}")
    for what, s, secs in rows:
        print(f"{what:<9} {secs:7.2f} {s['requests']:8} {s['failed']:6} {s['gap']:6.2f} {s['p50']:7.1f} "
              f"{s['p99']:7.1f} {s['max']:7.1f}")
    worst = max(r[1]["p99"] for r in rows if r[0] != "steady")
    print(f"worst p99 during a deploy or rollback {worst:.1f} ms; target 2 x steady {steady:.1f} + 20 = "
          f"{2 * steady + 20:.1f} ms: {'met' if worst <= 2 * steady + 20 else 'NOT met'}")


if __name__ == "__main__":
    main()
