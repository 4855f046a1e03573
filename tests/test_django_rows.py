"""Every acknowledged row accounted for, on a Django project under gunicorn: the incidents of
test_rows_incidents.py replayed on the real Django 5.2 site (demo.django_site: notes in SQLite WAL, gunicorn
with 2 workers, migrations as pre_restart). A writer logs every row the site answered 201 to; status's advice
is pasted as an operator pastes it (a shell, cron's PATH) until it ends; then every acknowledged row is live,
or the tool said beforehand how many it could not save. Real SQLite, git, gunicorn and systemd --user."""

import os
import sqlite3
import time

from demo import django_site
from demo.notes_writer import NotesWriter
from helpers import (fill, follow, live_notes, log_records, no_good_release_marked_bad, paste, rebuilt_host_incident, said_lost,
                     status)
from test_django import django_venv, host, site  # noqa: F401 (fixtures)

# A data migration that deletes notes: every other one the writer "a" wrote (its bug: a cleanup meant for
# another table), some of them written between the pre-deploy backup and the new release's start.
DELETES = '''\
from django.db import migrations


def clean_up(apps, schema_editor):
    Note = apps.get_model("notes", "Note")
    gone = [n.id for n in Note.objects.all() if n.body.startswith("a") and int(n.body[1:]) % 2 == 0]
    Note.objects.filter(id__in=gone).delete()


class Migration(migrations.Migration):
    dependencies = [("notes", "0001_initial")]
    operations = [migrations.RunPython(clean_up, migrations.RunPython.noop)]
'''


def acked(*writers):
    return {body for w in writers for body, _, _ in w.acked}


def test_a_django_database_damaged_while_the_site_writes_is_salvaged_and_its_rows_put_back(host):  # noqa: F811
    sb = host
    fill(sb, "dev", 400, "old")
    assert sb.run("backup.py", "dev", "--reason", "nightly").returncode == 0
    with NotesWriter(sb.url("dev", "/notes"), rate=40, prefix="w") as writer:
        time.sleep(1.5)
        db = sb.db_path("dev")
        conn = sqlite3.connect(db, timeout=10)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        conn.close()
        with open(db, "r+b") as fh:                           # 8 KB overwritten mid-file while gunicorn writes
            fh.seek(4096 * 12)
            fh.write(os.urandom(8192))
        time.sleep(1.5)
        first = status(sb, "dev")
        assert not first["ok"] and any("quick_check" in p for p in first["problems"]), first
        ran, said, last = follow(sb, "dev")
        time.sleep(1.0)
    lost = acked(writer) - live_notes(sb, "dev")
    allowed = said_lost(said, r"\((\d+) row\(s\) by the ids missing")
    assert len(lost) <= allowed, (len(lost), allowed, sorted(lost)[:5], said)
    assert last["ok"] and len(ran) <= 3, (ran, last["problems"])
    assert {f"old{i}-" + "x" * 300 for i in range(400)} <= live_notes(sb, "dev")
    assert no_good_release_marked_bad(sb, "dev")


def test_a_rebuilt_django_host_that_took_writes_on_an_empty_database_gets_the_rows_of_both(host):  # noqa: F811
    rebuilt_host_incident(host)

def test_a_django_data_migration_that_deletes_notes_is_taken_out_and_the_notes_put_back(host):  # noqa: F811
    sb = host
    sb.release("dev", {"notes/migrations/0002_clean_up.py": DELETES, "VERSION": "2\n"}, "v2: a cleanup that "
                                                                                         "deletes notes")
    with NotesWriter(sb.url("dev", "/notes"), rate=30, prefix="a") as writer:
        time.sleep(2)
        started = time.time()                           # the pre-deploy backup is made after this
        deployed = sb.run("deploy.py", "dev", timeout=300)
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        time.sleep(1)
        deploy = log_records(sb, "dev")[-1]
        assert deploy["rows_deleted"].get("notes", 0) > 0, deploy
        ran, said, last = follow(sb, "dev")
        time.sleep(1)
    live = live_notes(sb, "dev")
    lost = acked(writer) - live
    allowed = said_lost(said, r"deleted (\d+) row\(s\) that no copy held")
    assert len(lost) <= allowed, (sorted(lost)[:5], allowed, said)
    assert "--code-only" in ran[0] and any("--restore-rows" in c for c in ran) and len(ran) <= 3, ran
    written_after_backup = [b for b, sent, _ in writer.acked if sent > started and int(b[1:]) % 2 == 0]
    assert written_after_backup and set(written_after_backup) - lost, written_after_backup


def test_a_failed_django_migration_rolled_back_by_the_deploy_keeps_the_rows_written_meanwhile(host):  # noqa: F811
    sb = host
    fill(sb, "dev", 6, "word ")
    sb.release("dev", django_site.release_files("runpython-fail"), "v2: count the words of each note")
    with NotesWriter(sb.url("dev", "/notes"), rate=40, prefix="m") as writer:
        time.sleep(1)
        proc = sb.run("deploy.py", "dev", timeout=300)
        assert proc.returncode == 1 and "rolled back by itself" in proc.stderr, proc.stdout + proc.stderr
        ran, said, last = follow(sb, "dev")
        time.sleep(1)
    lost = acked(writer) - live_notes(sb, "dev")
    assert not lost, (sorted(lost)[:5], ran, said)
    assert all("rolled back" in p for p in last["problems"]), last["problems"]   # the failed release: a fix is due
    assert len(ran) <= 3, ran
    rolled = next(r for r in reversed(log_records(sb, "dev")) if r["kind"] == "deploy")
    assert "django_migrations" not in (rolled.get("rollback") or {}).get("rows_lost", {}), rolled


def test_a_rollback_with_the_database_across_a_rename_then_the_advice_puts_back_the_rows_written_since(host):  # noqa: F811
    sb = host
    fill(sb, "prod", 20, "kept")
    sb.release("main", django_site.release_files("rename"), "v2: body renamed to text")
    deployed = sb.run("deploy.py", "prod", "--yes", "--force", "--reason", "a hotfix straight to prod", timeout=300)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    with NotesWriter(sb.url("prod", "/notes"), rate=30, prefix="r") as writer:
        time.sleep(2)                                    # rows in notes.text, after the pre-deploy backup
        proc = paste(sb, f"{sb.python} {django_site.Path(__file__).resolve().parent.parent / 'rollback.py'} prod "
                         f"--with-db --yes --config {sb.config}")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        time.sleep(1)
        ran, said, last = follow(sb, "prod")
        time.sleep(1)
    live = live_notes(sb, "prod")
    lost = acked(writer) - live
    assert not lost, (sorted(lost)[:5], ran, said)
    assert {f"kept{i}-" + "x" * 300 for i in range(20)} <= live
    assert any("--restore-rows" in c for c in ran) and len(ran) <= 3, ran


def test_a_hung_django_site_is_restarted_never_rolled_back(host):  # noqa: F811
    """Every process of the site stopped (SIGSTOP to the master and both workers): status advises a restart,
    never a rollback; pasted, it serves again, no release is marked bad, no row is lost."""
    sb = host
    fill(sb, "dev", 10, "kept")
    assert sb.run("backup.py", "dev").returncode == 0
    time.sleep(max(0.0, sb.health_timeout + 6 - 0.5))           # past its health window: not a fresh start
    sb.manager.systemctl("kill", "--signal=SIGSTOP", sb.unit("dev"))
    try:
        first = status(sb, "dev")
        assert first["advice"] and first["advice"][0]["command"].startswith("systemctl --user restart"), first
        ran, said, last = follow(sb, "dev")
    finally:
        sb.manager.systemctl("kill", "--signal=SIGCONT", sb.unit("dev"), check=False)
    assert last["ok"] and len(ran) == 1, (ran, last["problems"])
    assert {f"kept{i}-" + "x" * 300 for i in range(10)} <= live_notes(sb, "dev")
    assert not any(r["kind"] == "rollback" for r in log_records(sb, "dev")) and no_good_release_marked_bad(sb, "dev")
