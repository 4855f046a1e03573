"""Migrations the running release cannot live with, on a flaskr-like app under gunicorn (2 workers),
converted to releases and socket units, with a prober sending GET / throughout (demo.load): the
rehearsal finds out whether the running release serves on the migrated schema, and the deploy never
lets old code answer on a new schema. Real gunicorn, the real user manager, venvs from a wheel folder."""

import json
import sqlite3
import threading
import time
from pathlib import Path

import pytest
import requests

from demo import flaskr
from demo.sandbox import git
from demo.faults import NoteWriter, everywhere
from demo.load import Load, shapes
from demo.notes_writer import NotesWriter
from helpers import fill, follow, live_notes, log_records, paste

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def host(in_place):
    flaskr.set_up(in_place)
    return in_place


@pytest.fixture
def stop_first_host(in_place):
    flaskr.set_up(in_place, extra='migration_mode = "stop-first"\n')
    return in_place


def probed(sb, *argv, rate=40):
    """Run a script while the prober sends GET / at rate; (the process, what the answers were)."""
    load = Load(sb.url("dev", "/"), rate=rate, timeout=60).start()
    time.sleep(1.0)
    proc = sb.run(*argv, timeout=300)
    time.sleep(1.0)
    return proc, shapes(load.stop())


def dry_run(sb):
    git(sb.path("dev"), "fetch", "--quiet", "origin")          # what the real run fetches first
    return sb.run("deploy.py", "dev", "--dry-run").stdout


def version(sb):
    return requests.get(sb.url("dev", "/"), timeout=10).json()["version"]


def test_a_column_rename_after_a_rehearsal_drops_no_request_and_old_code_never_answers(host):
    sb = host
    sb.release("dev", flaskr.release_files(2, "content", "rename 0"), "v2: post.body renamed to content")
    rehearsal = sb.run("deploy.py", "dev", "--rehearse", timeout=300)
    assert rehearsal.returncode == 0, rehearsal.stdout + rehearsal.stderr
    assert "BREAKING" in rehearsal.stdout and "/" in rehearsal.stdout
    plan = dry_run(sb)
    assert "migration: stop-first" in plan and "wait in the socket's queue" in plan and "back to the app" in plan, plan
    proc, seen = probed(sb, "deploy.py", "dev")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert seen["failed"] == 0 and seen["5xx"] == 0 and seen["503"] == 0 and seen["ok"] == seen["requests"], seen
    assert version(sb) == "2" and log_records(sb, "dev")[-1]["migration_mode"] == "stop-first"


def test_an_additive_migration_of_15_s_is_served_by_the_old_release_throughout(host):
    sb = host
    sb.release("dev", flaskr.release_files(2, "body", "additive 15"), "v2: a new column, and 15 s of backfill")
    plan = dry_run(sb)
    assert "effect on the running release is unknown" in plan and "--rehearse" in plan, plan
    proc, seen = probed(sb, "deploy.py", "dev")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert log_records(sb, "dev")[-1]["steps"]["pre_restart"] >= 15
    assert seen["failed"] == 0 and seen["ok"] == seen["requests"] and seen["slowest"] <= 3.0, seen


def test_a_40_s_breaking_migration_answers_503_with_retry_after_quickly_and_refuses_none(host):
    sb = host
    sb.release("dev", {**flaskr.release_files(2, "content", "rename 40"),
                       "maintenance.html": "<h1>flaskr is moving its posts; back in a minute</h1>\n"},
               "v2: a rename, then 40 s of backfill")
    rehearsal = sb.run("deploy.py", "dev", "--rehearse", timeout=300)
    assert rehearsal.returncode == 0 and "BREAKING" in rehearsal.stdout, rehearsal.stdout + rehearsal.stderr
    plan = dry_run(sb)
    assert "503 with Retry-After" in plan, plan
    pages, done = set(), threading.Event()

    def look():
        while not done.wait(1.0):
            r = requests.get(sb.url("dev", "/"), timeout=10)
            if r.status_code == 503:
                pages.add(r.text)

    looker = threading.Thread(target=look)
    looker.start()
    proc, seen = probed(sb, "deploy.py", "dev")
    done.set()
    looker.join()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert seen["failed"] == 0 and seen["5xx"] == 0, seen
    assert seen["503"] > 0 and seen["503 without Retry-After"] == 0 and seen["slowest"] <= 2.0, seen
    assert pages == {"<h1>flaskr is moving its posts; back in a minute</h1>\n"}      # the release's own page
    assert version(sb) == "2"


def test_a_failing_breaking_migration_rolls_back_with_the_database_and_loses_no_row(stop_first_host):
    sb = stop_first_host
    sb.release("dev", flaskr.release_files(2, "content", "fail"), "v2: a rename whose backfill fails")
    writer = NoteWriter(sb.url("dev", "/notes"), pause=0.05)
    writer.start()
    proc, seen = probed(sb, "deploy.py", "dev")
    writer.halt.set()
    writer.join()
    assert proc.returncode == 1 and "rolled back by itself" in proc.stderr, proc.stdout + proc.stderr
    assert version(sb) == "1" and seen["5xx"] == 0 and seen["failed"] == 0, seen
    columns = [r[1] for r in sqlite3.connect(sb.db_path("dev")).execute("PRAGMA table_info(post)")]
    assert "body" in columns and "content" not in columns          # the database came back with the code
    assert writer.acked and not (writer.acked - everywhere(sb, "dev"))


# -- on the sample app: the socket a stop-first deploy holds ---------------------------------------
def stop_first(sb):
    sb.write_config(dev='pre_restart = [["true"]]\nmigration_mode = "stop-first"')


def test_stop_first_without_a_socket_unit_is_refused_with_the_command_that_installs_one(in_place):
    sb = in_place
    stop_first(sb)
    sb.release("dev", {"VERSION": "2\n"}, "v2")
    proc = sb.run("deploy.py", "dev")
    assert proc.returncode == 1 and "--install-units" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert version(sb) == "1"


def test_a_deploy_killed_while_it_holds_the_socket_is_given_back_by_the_advice(sandbox):
    """Killed (SIGKILL) during pre_restart with the app stopped and the socket held: status says so, its
    advice (pasted) finishes the deploy, and the socket activates the app again."""
    from helpers import paste
    from safedeploy import units
    from test_runbook import run_killed
    sb = sandbox
    stop_first(sb)
    sb.release("dev", {"VERSION": "2\n"}, "v2")
    assert run_killed(sb, "deploy:pre_restart:KILL", "deploy.py", "dev").returncode == -9
    assert units.holding(sb.unit("dev"))
    report = json.loads(sb.run("status.py", "dev", "--json").stdout)["envs"]["dev"]
    assert not report["ok"] and report["advice"], report
    for _ in range(3):
        report = json.loads(sb.run("status.py", "dev", "--json").stdout)["envs"]["dev"]
        if not report["advice"]:
            break
        pasted = paste(sb, report["advice"][0]["command"])
        assert pasted.returncode == 0, pasted.stdout + pasted.stderr
    assert not units.holding(sb.unit("dev")) and report["ok"], report["problems"]
    sb.wait_serving("dev")
    assert version(sb) in ("1", "2")


def test_a_rollback_with_the_database_across_a_rename_then_the_advice_puts_back_the_rows_written_since(host):
    """The sample app's twin of the Django incident: v2 renames post.body; users keep writing notes through it;
    rollback.py --with-db takes the database back across the rename, the rows written since into the
    pre-rollback copy; status's advice, pasted, puts them back (a copy whose schema differs: by name)."""
    sb = host
    fill(sb, "dev", 20, "kept")
    sb.release("dev", flaskr.release_files(2, "content", "rename 0"), "v2: post.body renamed to content")
    assert sb.run("deploy.py", "dev", "--rehearse", timeout=300).returncode == 0
    deployed = sb.run("deploy.py", "dev", timeout=300)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    with NotesWriter(sb.url("dev", "/notes"), rate=30, prefix="r") as writer:
        time.sleep(2)                                   # rows written by v2, after its pre-deploy backup
        proc = paste(sb, f"{sb.python} {ROOT / 'rollback.py'} dev --with-db --yes --config {sb.config}")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        time.sleep(1)
        ran, said, last = follow(sb, "dev")
        time.sleep(1)
    live = live_notes(sb, "dev")
    lost = {body for body, _, _ in writer.acked} - live
    assert not lost, (sorted(lost)[:5], ran, said)
    assert {f"kept{i}-" + "x" * 300 for i in range(20)} <= live
    assert any("--restore-rows" in c for c in ran) and len(ran) <= 3, ran
    assert all("rolled back" in p for p in last["problems"]), last["problems"]      # a fix is due: no command
    assert version(sb) == "1"
