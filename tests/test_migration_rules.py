"""The rules behind a migration's verdict and a failed deploy's blame, checked directly (pure functions, and
the schema of real SQLite files): what breaks the running release whatever the probes say, when a deploy
stops it first, and when a failure is the host's rather than the release's."""

import sqlite3

import pytest

from safedeploy import schema
from safedeploy.decisions import (Blame, FailureFacts, MigrationFacts, MigrationMode, RehearsalFacts, judge_failure,
                                  looks_like_migration, migration_mode)

BASE = """
CREATE TABLE notes (id INTEGER PRIMARY KEY, author TEXT NOT NULL, body TEXT NOT NULL, created TEXT);
CREATE TABLE tags (id INTEGER PRIMARY KEY, name TEXT);
"""


def schema_after(tmp_path, *statements):
    db = tmp_path / f"db{len(list(tmp_path.iterdir()))}.sqlite3"
    conn = sqlite3.connect(db)
    conn.executescript(BASE + "\n".join(s + ";" for s in statements))
    conn.close()
    return schema.read(db)


@pytest.mark.parametrize("statements, breaking", [
    (["ALTER TABLE notes RENAME COLUMN body TO text"], ["column notes.body renamed to text"]),
    (["ALTER TABLE notes DROP COLUMN created"], ["column notes.created dropped"]),
    (["DROP TABLE tags"], ["table tags dropped"]),
    (["ALTER TABLE tags RENAME TO labels"], ["table tags renamed to labels"]),
    (["ALTER TABLE notes ADD COLUMN words INTEGER NOT NULL DEFAULT 0"], []),
    (["ALTER TABLE notes ADD COLUMN tag TEXT"], []),
    (["CREATE TABLE notes2 (id INTEGER PRIMARY KEY, author TEXT NOT NULL, body TEXT NOT NULL, created TEXT, "
      "words INTEGER NOT NULL)", "INSERT INTO notes2 SELECT *, 0 FROM notes", "DROP TABLE notes",
      "ALTER TABLE notes2 RENAME TO notes"],             # Django's remade table: NOT NULL, its default only in Python
     ["column notes.words added NOT NULL without a default (an INSERT that does not name it fails)"]),
    (["CREATE UNIQUE INDEX notes_body ON notes (body)"], ["unique index on notes(body) added"]),
    (["CREATE INDEX notes_author ON notes (author)"], []),
    (["CREATE TABLE posts (id INTEGER PRIMARY KEY, title TEXT NOT NULL UNIQUE)"], []),
])
def test_what_a_migration_breaks_for_the_running_release(tmp_path, statements, breaking):
    before = schema_after(tmp_path)
    after = schema_after(tmp_path, *statements)
    assert list(schema.compare(before, after).breaking) == breaking


def test_a_column_that_becomes_not_null_is_breaking_and_a_type_change_is_not(tmp_path):
    before = schema_after(tmp_path)
    remade = ["CREATE TABLE t2 (id INTEGER PRIMARY KEY, name VARCHAR(20) NOT NULL)", "DROP TABLE tags",
              "ALTER TABLE t2 RENAME TO tags"]
    changes = schema.compare(before, schema_after(tmp_path, *remade))
    assert changes.breaking == ("column tags.name became NOT NULL without a default",)
    loose = ["CREATE TABLE t2 (id INTEGER PRIMARY KEY, name VARCHAR(20))", "DROP TABLE tags",
             "ALTER TABLE t2 RENAME TO tags"]
    changes = schema.compare(before, schema_after(tmp_path, *loose))
    assert changes.breaking == () and changes.compatible == ("column tags.name TEXT -> VARCHAR(20)",)


def test_a_file_sqlite_cannot_read_has_no_schema_to_guess_from(tmp_path):
    bad = tmp_path / "bad.sqlite3"
    bad.write_bytes(b"not a database at all" * 100)
    assert schema.read(bad) == schema.Schema(())


# -- the migration mode ---------------------------------------------------------------------------------
def rehearsal(**kw):
    return RehearsalFacts(time="T", **{"passed": True, "schema_changed": True, **kw})


@pytest.mark.parametrize("facts, mode, words", [
    (MigrationFacts(False, "auto", None), "online", "no pre_restart"),
    (MigrationFacts(True, "online", rehearsal(passed=False)), "online", 'migration_mode = "online"'),
    (MigrationFacts(True, "stop-first", rehearsal(compatible=True)), "stop-first", 'migration_mode = "stop-first"'),
    (MigrationFacts(True, "auto", rehearsal(passed=False, failed_step="pre_restart", error="exit 1")), "stop-first",
     "FAILED at pre_restart"),
    (MigrationFacts(True, "auto", rehearsal(compatible=True, breaking=("column notes.body renamed to text",))),
     "stop-first", "column notes.body renamed to text"),
    (MigrationFacts(True, "auto", rehearsal(compatible=False, incompatible="GET /: HTTP 500")), "stop-first",
     "GET /: HTTP 500"),
    (MigrationFacts(True, "auto", rehearsal(compatible=True)), "online", "serves on the migrated schema"),
    (MigrationFacts(True, "auto", rehearsal(schema_changed=False)), "online", "changes no schema"),
    (MigrationFacts(True, "auto", rehearsal(), ("notes/migrations/0002.py",)), "stop-first",
     "did not try the running release"),
    (MigrationFacts(True, "auto", None, ("notes/migrations/0002.py",)), "stop-first", "0002.py"),
    (MigrationFacts(True, "auto", None, ()), "online", "effect on the running release is unknown"),
])
def test_the_migration_mode_is_safe_by_default(facts, mode, words):
    decision = migration_mode(facts)
    assert decision.mode == MigrationMode(mode) and words in decision.why, decision.why


@pytest.mark.parametrize("path, yes", [
    ("notes/migrations/0002_rename.py", True), ("migrations/versions/ab12_add.py", True),
    ("db/migrate/20240101_add.rb", True), ("schema/001.sql", True), ("migrate.py", True),
    ("app/models.py", False), ("MIGRATION", False), ("docs/migrations.md", False),
])
def test_which_files_look_like_migrations(path, yes):
    assert looks_like_migration(path, ("venv/bin/python", "migrate.py")) is yes


# -- who is to blame ------------------------------------------------------------------------------
DJANGO_KEYERROR = """\
  File "/srv/notes.releases/releases/x/notes_site/settings.py", line 7, in <module>
    SECRET_KEY = os.environ["DJANGO_SECRET_KEY"]
                 ~~~~~~~~~~^^^^^^^^^^^^^^^^^^^^^
  File "<frozen os>", line 679, in __getitem__
KeyError: 'DJANGO_SECRET_KEY'"""


@pytest.mark.parametrize("facts, blame, words", [
    (FailureFacts("pre_restart", "pre_restart command `m` failed with exit 1", DJANGO_KEYERROR), Blame.HOST,
     "DJANGO_SECRET_KEY is not set"),
    (FailureFacts("health", "not healthy", "django.core.exceptions.ImproperlyConfigured: Set the DATABASE_URL "
                                           "environment variable"), Blame.HOST, "DATABASE_URL is not set"),
    (FailureFacts("pre_restart", "could not start: venv/bin/python not found", could_not_start=True), Blame.HOST,
     "cannot start"),
    (FailureFacts("pre_restart", "failed with exit 1", "OSError: [Errno 28] No space left on device"), Blame.HOST,
     "disk is full"),
    (FailureFacts("restart", "did not start", "Main process exited, code=exited, status=203/EXEC"), Blame.HOST,
     "program cannot be started"),
    (FailureFacts("pre_restart", "failed with exit 1", "KeyError: 'ID'\n  in row lookup"), Blame.RELEASE,
     "failed at pre_restart"),
    (FailureFacts("pre_restart", "failed with exit 1", "RuntimeError: cannot count the words of note 4"),
     Blame.RELEASE, "failed at pre_restart: failed with exit 1"),
    (FailureFacts("health", "HTTP 500", "", interrupted=True), Blame.INTERRUPTED, "interrupted"),
])
def test_a_bad_mark_is_for_a_bad_release(facts, blame, words):
    judged = judge_failure(facts)
    assert judged.blame == blame and words in judged.why, judged.why
