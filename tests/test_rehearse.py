"""Rehearsals on a copy of the env's data, and the watch after a deploy turns healthy, on the real
sandbox: a migration that only prod's rows break, code that crashes on a row only prod has, a
release that dies a few seconds after it turned healthy, and Ctrl-C during the watch."""

import hashlib
import json
import signal
import subprocess
import sys
import time

import requests

from demo.sandbox import REPO_ROOT
from helpers import log_records

MIGRATION = """\
import sqlite3
conn = sqlite3.connect("instance/app.db")
conn.execute("CREATE UNIQUE INDEX IF NOT EXISTS notes_body ON notes (body)")
conn.commit()
"""


def post(sb, env, *bodies):
    for body in bodies:
        assert requests.post(sb.url(env, "/notes"), data=body, timeout=5).status_code == 201


def main_pid(sb, env):
    return sb.manager.systemctl("show", sb.unit(env), "-p", "MainPID", "--value").stdout.strip()


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def live_state(sb, env):
    db = sb.db_path(env)
    return main_pid(sb, env), sb.head(env), digest(db), [t for t in sb.manager.systemctl(
        "list-units", "--all", "--plain", "--no-legend", "*rehearsal*").stdout.splitlines() if t.strip()]


def config_with(sb, **extra):
    pre = f'pre_restart = [["{sys.executable}", "migrate.py"]]'
    sb.write_config(dev="\n".join([pre, extra.get("dev", "")]), prod="\n".join([pre, extra.get("prod", "")]))


def test_a_unique_index_migration_fails_on_prods_data_and_passes_on_devs(sandbox):
    sb = sandbox
    post(sb, "prod", "same title", "same title")          # prod's users wrote two rows with one title
    post(sb, "dev", "one", "two")
    sb.release("dev", {"migrate.py": MIGRATION, "VERSION": "2\n"}, "v2: titles are unique")
    sb.merge_to_main()
    config_with(sb)
    before = live_state(sb, "prod")
    proc = sb.run("deploy.py", "dev", "--rehearse")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rehearsal passed" in proc.stdout and "+ index notes_body" in proc.stdout
    proc = sb.run("deploy.py", "prod", "--rehearse")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "pre_restart" in proc.stderr and "UNIQUE constraint failed" in proc.stderr
    assert live_state(sb, "prod") == before                # PID, commit, database bytes, no unit left
    assert [r["kind"] for r in log_records(sb, "prod")] == ["rehearsal"]       # no deploy, tag or rollback
    assert not list((sb.root / "backups" / "prod").glob(".rehearsal-*"))


def test_a_release_that_crashes_on_a_row_only_prod_has_fails_its_rehearsal(sandbox):
    sb = sandbox
    post(sb, "prod", "a row dev never saw")
    sb.release("dev", {"MODE": "crashonrow a row dev never saw\n", "VERSION": "2\n"}, "v2: chokes on one row")
    sb.merge_to_main()
    before = live_state(sb, "prod")
    assert sb.run("deploy.py", "dev", "--rehearse").returncode == 0
    proc = sb.run("deploy.py", "prod", "--rehearse")
    assert proc.returncode == 1 and "did not turn healthy" in proc.stderr, proc.stderr
    assert "crashes on a row" in proc.stderr                 # the app's own words, from its log
    assert live_state(sb, "prod") == before


def test_an_env_may_require_a_rehearsal_of_the_same_tree(sandbox):
    sb = sandbox
    sb.write_config(dev="require_rehearsal = true")
    sb.release("dev", {"VERSION": "2\n"}, "v2")
    proc = sb.run("deploy.py", "dev")
    assert proc.returncode == 1 and "deploy.py" in proc.stderr and "--rehearse" in proc.stderr
    dry = sb.run("deploy.py", "dev", "--dry-run")           # the dry run refuses as the real run would
    assert dry.returncode == 1 and "--rehearse" in dry.stderr
    assert sb.run("deploy.py", "dev", "--rehearse").returncode == 0
    assert "rehearsal: passed" in sb.run("deploy.py", "dev", "--dry-run").stdout
    proc = sb.run("deploy.py", "dev")
    assert proc.returncode == 0, proc.stderr
    assert log_records(sb, "dev")[-1]["rehearsed"]                  # the deploy log names the rehearsal
    assert requests.get(sb.url("dev", "/"), timeout=5).json()["version"] == "2"


def test_a_release_that_fails_after_turning_healthy_is_rolled_back_by_the_watch(sandbox):
    sb = sandbox
    sb.write_config(dev="watch = 8")
    sb.release("dev", {"MODE": "dieafter 3\n", "VERSION": "2\n"}, "v2: dies 3 s after start")
    proc = sb.run("deploy.py", "dev")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "failed at step watch" in proc.stderr and "rolled back by itself" in proc.stderr
    assert requests.get(sb.url("dev", "/"), timeout=5).json()["version"] == "1"
    record = log_records(sb, "dev")[-1]
    assert record["failed_step"] == "watch" and record["result"] == "rolled-back"


def test_a_release_that_stays_healthy_through_the_watch_is_kept(sandbox):
    sb = sandbox
    sb.write_config(dev="watch = 4")
    sb.release("dev", {"VERSION": "2\n"}, "v2")
    start = time.monotonic()
    proc = sb.run("deploy.py", "dev")
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - start >= 4
    assert "watched 4s" in proc.stdout
    assert log_records(sb, "dev")[-1]["steps"]["watch"] >= 4
    status = json.loads(sb.run("status.py", "dev", "--json").stdout)["envs"]["dev"]
    assert status["last_deploy"]["watch"] == 4


def test_ctrl_c_during_the_watch_rolls_back(sandbox):
    sb = sandbox
    sb.write_config(dev="watch = 30")
    sb.release("dev", {"VERSION": "2\n"}, "v2")
    argv = [sys.executable, str(REPO_ROOT / "deploy.py"), "dev", "--config", str(sb.config)]
    proc = subprocess.Popen(argv, env=sb.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    journal = sb.root / "state" / "dev.journal.json"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if journal.exists() and '"watch"' in journal.read_text():
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, out + err
    assert "failed at step watch" in err and "Ctrl-C" in err and "rolled back by itself" in err
    assert requests.get(sb.url("dev", "/"), timeout=5).json()["version"] == "1"
    record = log_records(sb, "dev")[-1]         # the probe stopped with the Ctrl-C: the deploy's and the rollback's
    assert record["probe"]["requests"] > 0 and record["rollback"]["probe"]["requests"] > 0, record
    assert "  probe     the deploy: " in err


def test_a_rehearsal_port_is_reserved_until_the_app_binds_it():
    """free_port leaves the port in TIME_WAIT: a plain bind (what an outgoing connection's port needs) is
    refused, a server's SO_REUSEADDR bind succeeds at once."""
    import socket
    from safedeploy.transient import free_port
    port = free_port()
    with socket.socket() as plain:
        try:
            plain.bind(("127.0.0.1", port))
            raise AssertionError(f"port {port} could still be handed out")
        except OSError:
            pass
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", port))
        server.listen(1)
