"""Diagnose, then advise: for each incident, status.py is run, its first advice command is pasted as an
operator pastes it (through a shell, under cron's PATH), and again, until the advice is empty; then every
row must be there (with the right authors), the app must serve, no good release may be marked bad, and the
nightly prune that follows must not forget an off-site copy holding rows. Real restic, the real user
manager, converted envs (the layout adopted hosts have), a webhook received by a real HTTP server."""

import json
import os
import shutil
import sqlite3

import pytest
import requests

from helpers import fill, follow, live_notes, log_records, no_good_release_marked_bad, paste, rebuild, said_lost, status
from test_offsite import enable_offsite, receiver  # noqa: F401 (a fixture)

FLASKR = ('CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY, body TEXT NOT NULL, '
          'created TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP);\n'
          'CREATE TABLE IF NOT EXISTS "user" (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT UNIQUE NOT NULL);\n'
          'CREATE TABLE IF NOT EXISTS post (id INTEGER PRIMARY KEY AUTOINCREMENT, '
          'author_id INTEGER NOT NULL REFERENCES "user" (id), body TEXT NOT NULL);\n')



def follow_advice(sb, env, limit=6):
    """Paste the first advice command until there is none; return (the commands run, the last report)."""
    ran = []
    for _ in range(limit):
        report = status(sb, env)
        if not report["advice"]:
            return ran, report
        command = report["advice"][0]["command"]
        proc = paste(sb, command)
        assert proc.returncode == 0, (command, proc.stdout + proc.stderr)
        ran.append(command)
    raise AssertionError(f"the advice did not end after {limit} commands: {ran}; now {report['advice']}")


def notes(sb, env, n, prefix="n"):
    ids = []
    for i in range(n):
        r = requests.post(sb.url(env, "/notes"), data=f"{prefix}{i}", timeout=5)
        assert r.status_code == 201
        ids.append(r.json()["id"])
    return ids


def bodies(db):
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return sorted(r[0] for r in conn.execute("SELECT body FROM notes"))
    finally:
        conn.close()



def nightly_prune_keeps_the_rows(sb, env, rows):
    """The nightly run that follows (tight retention: one daily) forgets no off-site copy holding the rows."""
    text = sb.config.read_text()
    if "[retention]" not in text:
        sb.config.write_text(text.replace("[env.prod]", "[retention]\ndaily = 1\nweekly = 0\nmonthly = 0\n\n[env.prod]"))
    for _ in range(2):
        proc = sb.run("backup.py", "--all", "--quiet", "--prune")
        assert proc.returncode == 0, proc.stderr
    listed = json.loads(sb.run("backup.py", "--list", "--json").stdout)["backups"]
    offsite_rows = [b for b in listed if b["env"] == env and b["offsite"]]
    assert offsite_rows, listed
    assert any(rows <= (b["rows"] or 0) for b in listed if b["env"] == env), json.dumps(listed, indent=1)



def test_a_rebuilt_host_gets_its_rows_back_by_following_the_advice(sandbox):
    """Incidents 1 and 2: the advice restores the off-site copy with the data (never `backup.py ENV` first,
    which would copy the empty database), without the converted unit file saved with it, onto the plain
    unit the rebuilt host has; then the nightly prune keeps that copy."""
    sb = sandbox
    enable_offsite(sb)
    notes(sb, "dev", 4, "d")
    notes(sb, "prod", 5, "p")
    assert sb.run("backup.py", "--all").returncode == 0
    for env in ("dev", "prod"):
        rebuild(sb, env)
    shutil.rmtree(sb.root / "backups")
    shutil.rmtree(sb.root / "state")
    for env, rows in (("dev", 4), ("prod", 5)):
        first = status(sb, env)
        assert not first["ok"] and "a fresh or an older database" in " ".join(first["problems"]), first["problems"]
        assert "rollback.py" in first["advice"][0]["command"] and "--db-only" in first["advice"][0]["command"]
        assert "backup.py" not in first["advice"][0]["command"]
        ran, last = follow_advice(sb, env)
        assert len(bodies(sb.db_path(env))) == rows, ran
        assert requests.get(sb.url(env, "/"), timeout=5).json()["notes"] == rows
        unit = (sb.manager.unit_dir / sb.unit(env)).read_text()
        assert "releases/current" not in unit and "Requires=" not in unit       # the rebuilt host's own unit
        assert no_good_release_marked_bad(sb, env)
        nightly_prune_keeps_the_rows(sb, env, rows)


def test_an_app_stopped_by_hand_is_started_not_rolled_back(sandbox):
    """Incident 3: the socket and the service stopped by hand: the advice starts them; nothing is rolled
    back, no release is marked bad, and the next deploy of the same tree is not refused."""
    sb = sandbox
    sb.release("dev", {"VERSION": "2\n"}, "v2")
    assert sb.run("deploy.py", "dev").returncode == 0
    assert sb.run("backup.py", "dev").returncode == 0
    sb.stop_app("dev")
    first = status(sb, "dev")
    assert not first["ok"] and first["advice"][0]["command"].startswith("systemctl --user start")
    ran, last = follow_advice(sb, "dev")
    assert last["ok"] and len(ran) == 1, (ran, last["problems"])
    assert requests.get(sb.url("dev", "/"), timeout=5).json()["version"] == "2"
    assert not any(r["kind"] == "rollback" for r in log_records(sb, "dev")) and no_good_release_marked_bad(sb, "dev")


def test_a_database_replaced_by_an_older_copy_gets_the_newest_rows_back(sandbox):
    """Incident 3, the database replaced by a truncated copy: the advice is the newest copy with every row
    (the nightly), not the point before the last deploy, and it puts back only what is missing."""
    sb = sandbox
    notes(sb, "dev", 2, "o")
    sb.release("dev", {"VERSION": "2\n"}, "v2")
    assert sb.run("deploy.py", "dev").returncode == 0
    notes(sb, "dev", 3, "a")
    assert sb.run("backup.py", "dev", "--reason", "nightly").returncode == 0
    older = log_records(sb, "dev")[-1]["backup"]        # the pre-deploy backup: two notes, none of the three
    sb.stop_app("dev")
    db = sb.db_path("dev")
    for suffix in ("-wal", "-shm"):
        if os.path.exists(f"{db}{suffix}"):
            os.unlink(f"{db}{suffix}")
    shutil.copyfile(older, db)
    sb.manager.systemctl("start", sb.unit("dev").replace(".service", ".socket"), sb.unit("dev"))
    sb.wait_serving("dev")
    first = status(sb, "dev")
    assert "a fresh or an older database" in " ".join(first["problems"]), first["problems"]
    assert "nightly" in first["advice"][0]["command"]
    ran, last = follow_advice(sb, "dev")
    assert bodies(db) == ["a0", "a1", "a2", "o0", "o1"] and last["ok"], (ran, last["problems"])
    assert no_good_release_marked_bad(sb, "dev")


def test_a_release_that_deletes_rows_gets_the_gentle_route(sandbox):
    """Incident 4: a release deletes alice's posts, users go on writing; the advice takes the code back
    (not the database: the new rows stay), then puts the deleted rows back with their author; the undo
    line warns that it brings the bad release back."""
    sb = sandbox
    sb.release("dev", {"schema.sql": FLASKR, "VERSION": "1.1\n"}, "posts and users")
    assert sb.run("deploy.py", "dev").returncode == 0
    users = {name: requests.post(sb.url("dev", "/users"), data={"name": name}, timeout=5).json()["id"]
             for name in ("alice", "bob")}
    for author, body in (("alice", "a1"), ("alice", "a2"), ("bob", "b1"), ("alice", "a3")):
        assert requests.post(sb.url("dev", "/posts"), data={"author_id": users[author], "body": body},
                             timeout=5).status_code == 201
    sb.release("dev", {"MODE": "deleteposts alice\n", "VERSION": "2\n"}, "v2: a migration that loses posts")
    assert sb.run("deploy.py", "dev").returncode == 0
    assert log_records(sb, "dev")[-1]["rows_deleted"] == {"post": 3}
    carol = requests.post(sb.url("dev", "/users"), data={"name": "carol"}, timeout=5).json()["id"]
    assert requests.post(sb.url("dev", "/posts"), data={"author_id": carol, "body": "c1"}, timeout=5).status_code == 201
    first = status(sb, "dev")
    commands = [a["command"] for a in first["advice"]]
    assert "--code-only" in commands[0] and "--restore-rows" in commands[1], commands
    ran, last = follow_advice(sb, "dev")
    posts = requests.get(sb.url("dev", "/posts"), timeout=5).json()
    assert sorted((p["author"], p["body"]) for p in posts) == [
        ("alice", "a1"), ("alice", "a2"), ("alice", "a3"), ("bob", "b1"), ("carol", "c1")], (ran, posts)
    assert "2" != requests.get(sb.url("dev", "/"), timeout=5).json()["version"]      # the data bug's code is out
    undo = status(sb, "dev")
    assert undo.get("undo_warning") and "marked bad" in undo["undo_warning"]


def test_a_tree_rolled_back_in_prod_is_flagged_in_dev(sandbox):
    sb = sandbox
    v2 = sb.release("dev", {"VERSION": "2\n"}, "v2")
    assert sb.run("deploy.py", "dev").returncode == 0
    assert sb.run("verify.py", "dev").returncode == 0
    sb.merge_to_main()
    assert sb.run("deploy.py", "prod", "--yes").returncode == 0
    assert sb.run("rollback.py", "prod", "--yes").returncode == 0
    report = sb.run("status.py", "dev", "--json")
    assert report.returncode == 1
    dev = json.loads(report.stdout)["envs"]["dev"]
    assert any("rolled back in prod" in p for p in dev["problems"]) and dev["commit"] == v2
    assert "rollback.py" in dev["advice"][0]["command"]
    sb.stop_app("dev")                  # stopped too: named, and the rollback (pasted, no terminal) still first
    dev = status(sb, "dev")
    assert any("is stopped" in p for p in dev["problems"]) and "rollback.py" in dev["advice"][0]["command"]
    ran, last = follow_advice(sb, "dev")
    assert len(ran) == 1 and last["commit"] != v2, (ran, last["problems"])
    assert requests.get(sb.url("dev", "/"), timeout=5).json()["version"] == "1"


def test_an_edited_release_fails_verify_and_is_built_again(sandbox):
    sb = sandbox
    sb.release("dev", {"VERSION": "2\n"}, "v2")
    assert sb.run("deploy.py", "dev").returncode == 0
    assert sb.run("backup.py", "dev").returncode == 0
    current = sb.path("dev").parent / "dev.releases" / "current"
    (current / "app.py").write_text((current / "app.py").read_text() + "\n# hotfix by hand\n")
    proc = sb.run("verify.py", "dev", "--json")
    assert proc.returncode == 1
    checks = {c["name"]: c for c in json.loads(proc.stdout)["checks"]}
    assert not checks["release"]["ok"] and "app.py" in checks["release"]["detail"]
    assert "release (" in proc.stderr                           # the failed check is named (the alert carries it)
    ran, last = follow_advice(sb, "dev")
    assert len(ran) == 1 and "deploy.py" in ran[0] and last["ok"], (ran, last["problems"])
    assert "hotfix by hand" not in (current / "app.py").read_text()
    assert sb.run("verify.py", "dev").returncode == 0


def test_status_alert_sends_one_problem_and_one_recovered(sandbox, receiver):  # noqa: F811
    sb = sandbox
    enable_offsite(sb, webhook=receiver.url)
    assert sb.run("backup.py", "--all").returncode == 0

    def alert():
        proc = sb.run("status.py", "--alert", "--quiet")
        assert proc.stdout == "" and "Traceback" not in proc.stderr, proc.stderr
        return [e["event"] for e in receiver.events]

    assert alert() == []                                    # everything OK: nothing to say
    sb.stop_app("dev")
    assert alert() == ["problem"] and alert() == ["problem"]        # one per change, not one per run
    event = receiver.events[0]
    assert event["env"] == "dev" and "stopped" in event["message"]
    assert event["command"].startswith("systemctl --user start")
    assert paste(sb, event["command"]).returncode == 0
    sb.wait_serving("dev")
    assert alert() == ["problem", "recovered"] and receiver.events[-1]["env"] == "dev"
    fill(sb, "dev", 300, "n")                               # pages enough that 8 KB in the middle hold rows
    conn = sqlite3.connect(sb.db_path("dev"), timeout=10)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    conn.close()
    with open(sb.db_path("dev"), "r+b") as fh:              # the disk damaged it, not SQLite
        fh.seek(4096 * 12)
        fh.write(os.urandom(8192))
    assert alert() == ["problem", "recovered", "database-corrupt"], receiver.events[-1]
    assert "--db-only" in (receiver.events[-1]["command"] or ""), (receiver.events[-1]["message"], status(sb, "dev")["problems"])
    assert alert() == ["problem", "recovered", "database-corrupt"]      # said once
    said = status(sb, "dev")["problems"]
    restored = paste(sb, receiver.events[-1]["command"])      # the database alone: the code stays, nothing tagged
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert "  tagged" not in restored.stdout and "its rows were salvaged into" in restored.stdout, restored.stdout
    ran, more, last = follow(sb, "dev")         # the only copy holds no note: the base, the salvage on top
    said += more
    lost = {f"n{i}-" + "x" * 300 for i in range(300)} - live_notes(sb, "dev")
    assert len(lost) <= said_lost(said, r"\((\d+) row\(s\) by the ids missing"), (len(lost), said, ran)
    assert last["ok"] and len(ran) <= 2, (ran, last["problems"])
    proc = sb.run("status.py", "--install-timer")
    assert proc.returncode == 0, proc.stderr
    assert sb.manager.systemctl("is-active", "safe-deploy-status.timer").stdout.strip() == "active"
    service = (sb.manager.unit_dir / "safe-deploy-status.service").read_text()
    assert "--alert --quiet" in service and str(sb.config) in service
    sb.manager.systemctl("disable", "--now", "safe-deploy-status.timer", check=False)


@pytest.mark.parametrize("flags", [["--quiet"], ["--install-timer", "dev"], ["--install-timer", "--json"]])
def test_status_flags_that_cannot_go_together_exit_2(sandbox, flags):
    proc = sandbox.run("status.py", *flags)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_an_exit_4_rollback_ends_with_a_command_that_does_not_fail_the_same_way(sandbox):
    """A rollback whose point's release does not serve any more (its kept folder was broken by hand): exit 4,
    and the command it ends with goes back to what ran before (its pre-rollback save), not the same rollback
    again; pasted, it brings the env back, healthy, with every row."""
    sb = sandbox
    sb.release("dev", {"VERSION": "2\n"}, "v2")
    assert sb.run("deploy.py", "dev").returncode == 0
    notes(sb, "dev", 3)
    point = log_records(sb, "dev")[-1]["previous_release"]
    (sb.path("dev").parent / "dev.releases" / "releases" / point / "MODE").write_text("crash\n")
    proc = sb.run("rollback.py", "dev", "--yes")
    assert proc.returncode == 4, proc.stdout + proc.stderr
    command = proc.stderr.strip().splitlines()[0].rsplit("then run: ", 1)[1]
    assert "pre-rollback" in command
    pasted = paste(sb, command)
    assert pasted.returncode == 0, pasted.stdout + pasted.stderr
    assert requests.get(sb.url("dev", "/"), timeout=5).json() == {**requests.get(sb.url("dev", "/"), timeout=5).json(),
                                                                  "version": "2", "notes": 3}


def test_an_exit_4_deploy_whose_record_failed_ends_with_a_command_that_records_it(sandbox):
    """The record step fails (as on a full disk): exit 4, the release serves; the command it ends with,
    pasted, deploys the same commit again (reusing the release) and records it; it does not fail the
    same way, and the log then says what serves."""
    from test_runbook import run_killed
    sb = sandbox
    sb.release("dev", {"VERSION": "2\n"}, "v2")
    assert sb.run("deploy.py", "dev").returncode == 0
    v3 = sb.release("dev", {"VERSION": "3\n"}, "v3")
    proc = run_killed(sb, "deploy:record:RAISE", "deploy.py", "dev")
    assert proc.returncode == 4, proc.stdout + proc.stderr
    command = next(line for line in proc.stderr.splitlines() if "then run: " in line).rsplit("then run: ", 1)[1]
    assert "deploy.py" in command and v3 in command
    pasted = paste(sb, command)
    assert pasted.returncode == 0 and "reused, not rebuilt" in pasted.stdout, pasted.stdout + pasted.stderr
    assert log_records(sb, "dev")[-1]["running"] == v3
    assert status(sb, "dev")["commit"] == v3


def test_a_dry_run_refusal_says_it_did_not_fetch_and_how(sandbox):
    """A bad release refused by a dry run that judged the refs fetched before: the message says so and
    gives the fetch command; pasted, the dry run then sees the fix that was pushed."""
    sb = sandbox
    sb.release("dev", {"MODE": "http500\n", "VERSION": "2\n"}, "v2: broken")
    assert sb.run("deploy.py", "dev").returncode == 1                 # rolled back, marked bad
    sb.release("dev", {"MODE": "ok\n", "VERSION": "3\n"}, "v3: the fix")
    dry = sb.run("deploy.py", "dev", "--dry-run")
    assert dry.returncode == 1 and "this dry run did not fetch" in dry.stderr, dry.stdout + dry.stderr
    fetch = "git -C " + dry.stderr.split("as does: git -C ", 1)[1].rstrip().rstrip(")")
    assert paste(sb, fetch).returncode == 0
    again = sb.run("deploy.py", "dev", "--dry-run")
    assert again.returncode == 0 and "v3: the fix" in again.stdout, again.stdout + again.stderr


def test_no_printed_rollback_line_goes_back_to_a_release_rolled_back_elsewhere(sandbox):
    """dev runs v2, rolled back in prod; a deploy of v3 in dev: its summary's rollback line skips the point
    that holds v2 (as status's does), and a rollback to that point, asked for by hand, warns in its plan."""
    sb = sandbox
    v2 = sb.release("dev", {"VERSION": "2\n"}, "v2")
    assert sb.run("deploy.py", "dev").returncode == 0
    sb.merge_to_main()
    assert sb.run("verify.py", "dev").returncode == 0
    assert sb.run("deploy.py", "prod", "--yes").returncode == 0
    assert sb.run("rollback.py", "prod", "--yes").returncode == 0          # v2 is now a rolled-back release
    sb.release("dev", {"VERSION": "3\n"}, "v3")
    proc = sb.run("deploy.py", "dev")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = proc.stdout.strip().splitlines()[-1]
    v2_point = log_records(sb, "dev")[-1]["tag"]                          # this deploy's before-deploy point: v2
    assert line.startswith("rollback: ") and v2_point not in line, line
    points = {p["id"]: p["commit"] for p in json.loads(sb.run("rollback.py", "dev", "--list", "--json").stdout)["points"]}
    assert points[v2_point] == v2
    plan = sb.run("rollback.py", "dev", "--to", v2_point)                # no terminal: the plan, then exit 2
    assert plan.returncode == 2 and "WARNING" in plan.stdout and "rolled back in prod" in plan.stdout, plan.stdout
