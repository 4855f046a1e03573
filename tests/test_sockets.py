"""Deploys that drop no request: socket units written by deploy.py --install-units, under the real
user manager, with a client sending requests at a steady rate throughout."""

import json
import time

import requests

from demo.load import Load, summary

from helpers import log_records


def install(sb, env="dev", handover=True):
    proc = sb.run("deploy.py", env, "--install-units", "--yes", *(["--notify"] if handover else []))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def deploy_under_load(sb, files, message, before=1.0, after=1.0):
    """Release files on dev and deploy it while a client sends 100 requests/s; (proc, samples)."""
    sb.release("dev", files, message)
    load = Load(sb.url("dev", "/"), rate=100).start()
    time.sleep(before)
    proc = sb.run("deploy.py", "dev")
    time.sleep(after)
    return proc, load.stop()


def test_install_units_shows_the_diff_saves_the_old_files_and_switches(in_place):
    sb = in_place
    old = (sb.manager.unit_dir / sb.unit("dev")).read_text()
    checks = {c["name"]: c for c in json.loads(sb.run("verify.py", "dev", "--json").stdout)["checks"]}
    assert checks["restart"]["ok"] and "WARNING" in checks["restart"]["detail"]
    assert json.loads(sb.run("status.py", "dev", "--json").stdout)["envs"]["dev"]["restart_method"] == "plain"
    proc = install(sb)
    assert any(line.startswith("probe: ") and " request" in line for line in proc.stdout.splitlines()), proc.stdout
    assert "+Requires=" in proc.stdout and "+ListenStream=127.0.0.1:" in proc.stdout and "+Type=notify" in proc.stdout
    sock = sb.unit("dev").replace(".service", ".socket")
    assert sb.manager.systemctl("is-active", sock).stdout.strip() == "active"
    assert sock in sb.manager.systemctl("show", sb.unit("dev"), "-p", "TriggeredBy", "--value").stdout
    saved = list((sb.root / "backups" / "dev").glob("units-*/" + sb.unit("dev")))
    assert len(saved) == 1 and saved[0].read_text() == old
    status = json.loads(sb.run("status.py", "dev", "--json").stdout)["envs"]["dev"]
    assert status["restart_method"] == "handover" and status["warning"] is None and status["health"]["ok"]
    helper = sb.unit("dev").replace(".service", "-handover.service")
    assert (sb.manager.unit_dir / helper).exists()
    assert sb.manager.systemctl("is-active", helper, check=False).stdout.strip() == "inactive"
    again = sb.run("deploy.py", "dev", "--install-units", "--yes", "--notify")
    assert again.returncode == 0 and "nothing to do" in again.stdout


def test_install_units_needs_yes_without_a_terminal(in_place):
    proc = in_place.run("deploy.py", "dev", "--install-units")
    assert proc.returncode == 2 and "--yes" in proc.stderr


def test_a_deploy_behind_the_socket_fails_no_request(sandbox):
    sb = sandbox
    sb.release("dev", {"MODE": "slow 1\n"}, "starts in a second")
    assert sb.run("deploy.py", "dev").returncode == 0
    proc = install(sb, handover=False)                                    # the socket alone
    assert "-handover.service" not in proc.stdout
    assert json.loads(sb.run("status.py", "dev", "--json").stdout)["envs"]["dev"]["restart_method"] == "socket"
    proc, samples = deploy_under_load(sb, {"MODE": "slow 1\n", "VERSION": "3\n"}, "v3, also slow to start")
    assert proc.returncode == 0, proc.stderr
    result = summary(samples)
    assert result["requests"] > 250 and result["failed"] == 0, result
    assert any(s.latency > 0.5 for s in samples)           # they waited in the socket's queue, none refused
    probe = log_records(sb, "dev")[-1]["probe"]          # the deploy's own measure says the same
    assert probe["requests"] > 0 and probe["refused"] == 0 and probe["slowest_s"] > 0.5, probe


def test_a_release_that_never_turns_healthy_behind_the_socket_fails_no_request(sandbox):
    sb = sandbox
    install(sb, handover=False)
    good = sb.head("dev")
    proc, samples = deploy_under_load(sb, {"MODE": "crash\n"}, "crashes on start", before=0.5)
    assert proc.returncode == 1 and "rolled back by itself" in proc.stderr
    assert sb.head("dev") == good and log_records(sb, "dev")[-1]["result"] == "rolled-back"
    result = summary(samples)
    assert result["failed"] == 0, result


def test_a_database_restore_behind_the_socket_is_not_raced_by_socket_activation(sandbox):
    sb = sandbox
    install(sb)
    sb.release("dev", {"schema.sql": "CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY, body TEXT NOT NULL, "
                       "created TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP);\nCREATE TABLE IF NOT EXISTS tags (id INTEGER);\n"},
               "a migration")
    assert sb.run("deploy.py", "dev").returncode == 0
    load = Load(sb.url("dev", "/"), rate=100, timeout=5).start()
    time.sleep(0.5)
    proc = sb.run("rollback.py", "dev", "--yes")
    time.sleep(0.5)
    samples = load.stop()
    assert proc.returncode == 0, proc.stderr
    assert "a migration ran since" in proc.stdout
    sock = sb.unit("dev").replace(".service", ".socket")
    assert sb.manager.systemctl("is-active", sock).stdout.strip() == "active"
    assert sock in sb.manager.systemctl("show", sb.unit("dev"), "-p", "TriggeredBy", "--value").stdout
    # the app started while the socket still activated the holder, which went afterwards: its files, its unit
    holder = sb.unit("dev").replace(".service", "-port-holder.service")
    assert sb.manager.systemctl("is-active", holder, check=False).stdout.strip() != "active"
    assert not list((sb.manager.config_home / "systemd" / "user").glob("*port-holder*"))
    assert summary(samples)["failed"] == 0
    record = log_records(sb, "dev")[-1]
    assert record["steps"]["stop"] >= 0 and record["db_restored"]
    import sqlite3
    conn = sqlite3.connect(sb.db_path("dev"))
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'tags'").fetchone()[0] == 0


def test_a_deploy_with_the_handover_helper_neither_fails_nor_delays_a_request(sandbox):
    sb = sandbox
    sb.release("dev", {"MODE": "slow 1\n"}, "starts in a second")
    assert sb.run("deploy.py", "dev").returncode == 0
    install(sb)
    proc, samples = deploy_under_load(sb, {"MODE": "slow 1\n", "VERSION": "3\n"}, "v3, also slow to start")
    assert proc.returncode == 0, proc.stderr
    result = summary(samples)
    assert result["failed"] == 0 and result["max"] < 500, result      # nothing waited for the start-up
    assert requests.get(sb.url("dev", "/"), timeout=5).json()["version"] == "3"
    helper = sb.unit("dev").replace(".service", "-handover.service")
    active = [u for u in (sb.unit("dev"), helper)
              if sb.manager.systemctl("is-active", u, check=False).stdout.strip() == "active"]
    assert active == [helper]         # the slot started last serves; the other stopped
    # the next deploy swaps back: one start-up per deploy, no request waits
    proc, samples = deploy_under_load(sb, {"MODE": "slow 1\n", "VERSION": "4\n"}, "v4")
    assert proc.returncode == 0, proc.stderr
    result = summary(samples)
    assert result["failed"] == 0 and result["max"] < 500, result
    assert requests.get(sb.url("dev", "/"), timeout=5).json()["version"] == "4"
    assert sb.manager.systemctl("is-active", helper, check=False).stdout.strip() == "inactive"
    assert json.loads(sb.run("status.py", "dev", "--json").stdout)["envs"]["dev"]["unit"]["active"]


def test_a_release_that_cannot_start_under_handover_keeps_the_old_one_serving(sandbox):
    sb = sandbox
    install(sb)
    good = sb.head("dev")
    proc, samples = deploy_under_load(sb, {"MODE": "crash\n"}, "crashes on start", before=0.5, after=0.5)
    assert proc.returncode == 1 and "handover slot" in proc.stderr and "rolled back by itself" in proc.stderr
    assert "crashing on start" in proc.stderr
    assert sb.head("dev") == good
    result = summary(samples)
    assert result["failed"] == 0 and result["max"] < 1000, result


def test_the_states_of_several_units_come_from_one_systemctl_show_in_the_order_asked(sandbox):
    """units.states: one `systemctl show` for several units (a slot and its handover helper, say), each state
    its own unit's, a unit the manager does not know among them (LoadState=not-found), in the order asked."""
    from safedeploy import units
    service, sock = sandbox.unit("dev"), sandbox.unit("dev").replace(".service", ".socket")
    got = units.states(service, "t-nosuch-slot.service", sock)
    assert [st.name for st in got] == [service, "t-nosuch-slot.service", sock]
    assert got[0].known and got[0].is_active and got[0].main_pid > 0 and got[0].fragment_path.endswith(service)
    assert not got[1].known and got[1].load == "not-found" and not got[1].is_active
    assert got[2].known and got[2].is_active and got[2].main_pid == 0
