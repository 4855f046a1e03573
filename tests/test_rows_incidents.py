"""Every acknowledged row accounted for: each incident with a writer that logs every row the app answered
201 to, status's advice pasted as an operator pastes it (through a shell, under cron's PATH) while the
writer keeps writing, until status says OK; then every acknowledged row is live, or the tool said
beforehand how many it could not save, no good release is marked bad, and it took at most 3 commands.
Real SQLite damaged on disk, the real user manager, the sample app converted to releases."""

import json
import os
import re
import signal
import sqlite3
import sys
import time

import requests

from demo.notes_writer import NotesWriter
from helpers import fill, follow, live_notes, log_records, no_good_release_marked_bad, paste, rebuilt_host_incident, said_lost, status
from test_advice import FLASKR
from test_offsite import receiver  # noqa: F401 (a fixture)






def copy_notes(path):
    """{body: (its id, created)} of the notes a copy holds, read before anything else reads it."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {r[0]: (r[1], r[2]) for r in conn.execute("SELECT body, id, created FROM notes")}
    finally:
        conn.close()


def test_a_database_damaged_while_the_app_writes_is_salvaged_restored_and_its_rows_put_back(sandbox):
    sb = sandbox
    fill(sb, "dev", 400, "old")
    assert sb.run("backup.py", "dev", "--reason", "nightly").returncode == 0
    with NotesWriter(sb.url("dev", "/notes"), rate=40, prefix="w") as writer:
        time.sleep(1.5)
        db = sb.db_path("dev")
        conn = sqlite3.connect(db, timeout=10)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        conn.close()
        with open(db, "r+b") as fh:                           # 8 KB overwritten while the app runs
            fh.seek(4096 * 12)
            fh.write(os.urandom(8192))
        time.sleep(1.5)
        first = status(sb, "dev")
        assert not first["ok"] and any("quick_check" in p and "still holds" in p for p in first["problems"]), first
        assert "--db-only" in first["advice"][0]["command"] and "backup.py dev\n" not in first["advice"][0]["command"]
        ran, said, last = follow(sb, "dev")
        time.sleep(1.0)
    acked = {body for body, _, _ in writer.acked}
    live = live_notes(sb, "dev")
    lost = acked - live
    allowed = said_lost(said, r"\((\d+) row\(s\) by the ids missing")
    assert len(lost) <= allowed, (len(lost), allowed, sorted(lost)[:5], said)
    assert last["ok"] and len(ran) <= 3, (ran, last["problems"])
    assert {f"old{i}-" + "x" * 300 for i in range(400)} <= live
    assert "--restore-rows" in ran[-1]
    assert no_good_release_marked_bad(sb, "dev") and not any(r.get("kind") == "rollback" and not r.get("db_only")
                                                             for r in log_records(sb, "dev"))


def test_a_release_that_deletes_rows_users_were_writing_is_taken_out_and_the_rows_put_back(sandbox):
    sb = sandbox
    sb.release("dev", {"schema.sql": FLASKR, "VERSION": "1.1\n"}, "posts and users")
    assert sb.run("deploy.py", "dev").returncode == 0
    alice = requests.post(sb.url("dev", "/users"), data={"name": "alice"}, timeout=5).json()["id"]
    bob = requests.post(sb.url("dev", "/users"), data={"name": "bob"}, timeout=5).json()["id"]
    sb.release("dev", {"MODE": "deleteposts alice\n", "VERSION": "2\n"}, "v2: loses alice's posts")
    with NotesWriter(sb.url("dev", "/posts"), rate=30, prefix="a", fields={"author_id": alice}) as by_alice, \
            NotesWriter(sb.url("dev", "/posts"), rate=10, prefix="b", fields={"author_id": bob}) as by_bob:
        time.sleep(2)
        assert sb.run("deploy.py", "dev").returncode == 0
        time.sleep(1)
        deploy = log_records(sb, "dev")[-1]
        assert deploy["rows_deleted"].get("post", 0) > 0, deploy
        ran, said, last = follow(sb, "dev")
        time.sleep(1)
    posts = {(p["author"], p["body"]) for p in requests.get(sb.url("dev", "/posts"), timeout=5).json()}
    acked = {("alice", b) for b, _, _ in by_alice.acked} | {("bob", b) for b, _, _ in by_bob.acked}
    lost = acked - posts
    allowed = said_lost(said, r"deleted (\d+) row\(s\) that no copy held")
    assert len(lost) <= allowed and all(author == "alice" for author, _ in lost), (lost, allowed, said)
    assert "--code-only" in ran[0] and any("--restore-rows" in c for c in ran) and len(ran) <= 3, ran
    assert requests.get(sb.url("dev", "/"), timeout=5).json()["version"] != "2"
    assert all("no copy held" in p or "rolled back" in p for p in last["problems"]), last["problems"]
    release = re.search(r"once that is understood: (.*)$", next(p for p in last["problems"] if "no copy held" in p))
    assert paste(sb, release.group(1)).returncode == 0
    assert all("rolled back" in p for p in status(sb, "dev")["problems"])      # only the tip, which needs a fix pushed


def test_a_failed_migration_rolled_back_by_the_deploy_keeps_the_rows_written_meanwhile(sandbox):
    sb = sandbox
    script = ("import sqlite3, sys, time; c = sqlite3.connect(sys.argv[1]); "
              "c.execute('ALTER TABLE notes ADD COLUMN mood TEXT'); c.commit(); time.sleep(1.5); sys.exit(1)")
    sb.write_config(dev=f"pre_restart = [[{json.dumps(sys.executable)}, \"-c\", {json.dumps(script)}, "
                        f"{json.dumps(str(sb.db_path('dev')))}]]")
    sb.release("dev", {"VERSION": "2\n"}, "v2: a migration that fails half-way")
    with NotesWriter(sb.url("dev", "/notes"), rate=40, prefix="m") as writer:
        time.sleep(1)
        proc = sb.run("deploy.py", "dev")
        assert proc.returncode == 1 and "--restore-rows" in proc.stderr, proc.stdout + proc.stderr
        ran, said, last = follow(sb, "dev")
        time.sleep(1)
    lost = {b for b, _, _ in writer.acked} - live_notes(sb, "dev")
    assert not lost, (sorted(lost)[:5], ran, last["problems"])
    assert all("rolled back" in p for p in last["problems"]), last["problems"]   # the failed release: a fix is due
    assert len(ran) <= 3 and "--restore-rows" in ran[0], ran
    records = log_records(sb, "dev")
    rolled = next(r for r in reversed(records) if r["kind"] == "deploy")
    assert "django_migrations" not in (rolled.get("rollback") or {}).get("rows_lost", {})


def test_a_hung_process_is_restarted_never_rolled_back(sandbox):
    sb = sandbox
    assert sb.run("backup.py", "dev").returncode == 0
    pid = int(sb.manager.systemctl("show", "--property=MainPID", "--value", sb.unit("dev")).stdout.strip())
    time.sleep(max(0.0, sb.health_timeout + 6 - 0.5))           # past its health window: not a fresh start
    os.kill(pid, signal.SIGSTOP)
    try:
        first = status(sb, "dev")
        assert first["advice"][0]["command"].startswith("systemctl --user restart"), first
        ran, said, last = follow(sb, "dev")
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert last["ok"] and len(ran) == 1, (ran, last["problems"])
    assert not any(r["kind"] == "rollback" for r in log_records(sb, "dev")) and no_good_release_marked_bad(sb, "dev")


def test_a_closed_pipe_a_list_or_a_dry_run_never_sends_a_failure(sandbox, receiver):  # noqa: F811
    from test_offsite import enable_offsite
    sb = sandbox
    enable_offsite(sb, webhook=receiver.url)
    assert sb.run("backup.py", "dev").returncode == 0
    py, config = sys.executable, str(sb.config)
    sb.release("dev", {"VERSION": "2\n"}, "v2")
    scripts = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for command in (f"{py} {scripts}/rollback.py dev --list --config {config} | head -1",
                    f"{py} {scripts}/deploy.py dev --dry-run --config {config} | head -1",
                    f"{py} {scripts}/deploy.py dev --config {config} | head -1"):
        proc = paste(sb, command)
        assert proc.returncode == 0, (command, proc.stdout + proc.stderr)
    assert receiver.events == [], receiver.events
    assert log_records(sb, "dev")[-1]["result"] == "ok"
    assert requests.get(sb.url("dev", "/"), timeout=5).json()["version"] == "2"
    listed = sb.run("backup.py", "--list")
    assert " rows " in listed.stdout, listed.stdout


def test_rows_put_back_while_a_writer_writes_to_the_same_table(sandbox):
    """A restore of rows in one transaction while users keep writing: every writer row and every restored row
    are there after (the writers wait for the lock the restore holds; none is refused)."""
    sb = sandbox
    fill(sb, "dev", 300, "kept")
    sb.release("dev", {"VERSION": "2\n"}, "v2")
    assert sb.run("deploy.py", "dev").returncode == 0
    fill(sb, "dev", 200, "gone")                            # the restore below takes these out
    rolled = sb.run("rollback.py", "dev", "--with-db", "--yes")
    assert rolled.returncode == 0, rolled.stdout + rolled.stderr
    saved = log_records(sb, "dev")[-1]["pre_rollback"]
    in_copy = copy_notes(saved)
    with NotesWriter(sb.url("dev", "/notes"), rate=60, prefix="live") as writer:
        time.sleep(1)
        proc = sb.run("backup.py", "dev", "--restore-rows", saved, "--yes")
        time.sleep(1)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    live = live_notes(sb, "dev")
    assert {b for b, _, _ in writer.acked} <= live and len(writer.acked) > 60
    lost = ({f"gone{i}-" + "x" * 300 for i in range(200)} | {f"kept{i}-" + "x" * 300 for i in range(300)}) - live
    conn = sqlite3.connect(f"file:{sb.db_path('dev')}?mode=ro", uri=True)
    if lost:        # what a failure needs to be told apart: the copy lacked them, or which live row holds their key
        held = {i: (b[:12], c) for i, b, c in conn.execute("SELECT id, body, created FROM notes")}
        found = {b.split("-")[0]: (in_copy.get(b), held.get(in_copy.get(b, (None,))[0])) for b in sorted(lost)}
        raise AssertionError(f"lost {found} (name: (its id and created in the pre-rollback copy, the live row at that "
                             f"id now)); the restore printed:\n{proc.stdout}\nthe rollback printed:\n{rolled.stdout}")
    assert conn.execute("SELECT count(*) FROM notes").fetchone()[0] == 500 + len(writer.acked)
    conn.close()


def test_a_rebuilt_host_that_took_writes_on_an_empty_database_gets_the_rows_of_both(sandbox):
    """On the sample app (on Django: test_django_rows); the incident is helpers.rebuilt_host_incident."""
    rebuilt_host_incident(sandbox)
