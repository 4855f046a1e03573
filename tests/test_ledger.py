"""The row ledger's comparison (safedeploy.ledger, rowcompare, rowsets) on real SQLite files: rows by content
(a reused id cannot hide a loss), bookkeeping tables left out, renamed columns, which copies count, and the
cache that lets an unchanged database be looked at without reading a row. No user manager needed."""

import hashlib
import shutil
import sqlite3
import time
from pathlib import Path
from types import SimpleNamespace

from helpers import make_db, run_sql
from safedeploy import dbfiles, ledger, rowpages
from safedeploy.rowsets import DEFAULT_BOOKKEEPING


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def env_at(tmp_path):
    return SimpleNamespace(name="prod", db=tmp_path / "live.db", state_dir=tmp_path / "state",
                           bookkeeping=list(DEFAULT_BOOKKEEPING))


def copy_of(env, name, reason="nightly", time_="2026-12-01T03:00:00+00:00", held=False):
    path = env.db.parent / f"{name}.sqlite3"
    shutil.copy(env.db, path)
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    rows = {t: conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for (t,) in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")
        if t not in DEFAULT_BOOKKEEPING}
    conn.close()
    return ledger.Known(id=name, time=time_, reason=reason, path=str(path), sha256=sha(path), rows=rows, held=held)


NOTES = "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT, created TEXT);"


def test_a_row_whose_id_a_newer_row_took_is_still_missing(tmp_path):
    env = env_at(tmp_path)
    make_db(env.db, NOTES, ["INSERT INTO notes (body, created) VALUES ('a', 't1'), ('b', 't2'), ('lost', 't3')"])
    nightly = copy_of(env, "nightly")
    run_sql(env.db, "DELETE FROM notes WHERE id = 3", "INSERT INTO notes (body, created) VALUES ('new', 't4')")
    book = ledger.look(env, [nightly])
    assert [o.missing for o in book.outstanding] == [{"notes": 1}]          # by id, nothing looked missing



def test_a_new_row_written_in_the_same_second_under_a_freed_key_does_not_pass_for_the_lost_one(tmp_path):
    """Half the columns equal is no evidence: a note and its creation second, its key freed by a rollback and
    taken by a note written in that same second, is another row (rule 5 needs more than half)."""
    env = env_at(tmp_path)
    make_db(env.db, NOTES, ["INSERT INTO notes (body, created) VALUES ('a', 't1'), ('lost', 't2')"])
    nightly = copy_of(env, "nightly")
    run_sql(env.db, "DELETE FROM notes WHERE id = 2", "INSERT INTO notes (body, created) VALUES ('new', 't2')")
    book = ledger.look(env, [nightly])
    assert [o.missing for o in book.outstanding] == [{"notes": 1}]

def test_an_updated_row_is_the_same_row_and_bookkeeping_never_counts(tmp_path):
    env = env_at(tmp_path)
    make_db(env.db, 'CREATE TABLE "user" (id INTEGER PRIMARY KEY, name TEXT UNIQUE, last_login TEXT);'
                 "CREATE TABLE django_migrations (id INTEGER PRIMARY KEY, app TEXT);",
         ["INSERT INTO user (name, last_login) VALUES ('ann', 'mon'), ('bob', 'mon')",
          "INSERT INTO django_migrations (app) VALUES ('a'), ('b')"])
    nightly = copy_of(env, "nightly")
    run_sql(env.db, "UPDATE user SET last_login = 'tue'", "DELETE FROM django_migrations")
    book = ledger.look(env, [nightly])
    assert book.outstanding == [] and book.compared[0].changed == {"user": 2}


def test_rows_are_compared_across_a_renamed_column(tmp_path):
    env = env_at(tmp_path)
    make_db(env.db, "CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT);",
         ["INSERT INTO notes (text) VALUES ('one'), ('two'), ('three')"])
    save = copy_of(env, "save", reason="pre-rollback", held=True)
    run_sql(env.db, "ALTER TABLE notes RENAME COLUMN text TO body", "DELETE FROM notes WHERE id = 2",
        "ALTER TABLE notes ADD COLUMN mood TEXT")
    book = ledger.look(env, [save])
    assert [o.missing for o in book.outstanding] == [{"notes": 1}]


def test_a_later_copy_supersedes_an_earlier_one_unless_it_lost_most_of_it(tmp_path):
    env = env_at(tmp_path)
    make_db(env.db, NOTES, [f"INSERT INTO notes (body, created) VALUES ('n{i}', 't')" for i in range(10)])
    early = copy_of(env, "early", time_="2026-12-01T03:00:00+00:00")
    run_sql(env.db, "DELETE FROM notes WHERE id = 1")                       # a user deleted one: the app at work
    later = copy_of(env, "later", time_="2026-12-02T03:00:00+00:00")
    book = ledger.look(env, [early, later])
    assert book.superseded == {"early": "later"} and book.outstanding == []
    run_sql(env.db, "DELETE FROM notes")                                    # a fresh database, backed up at night
    run_sql(env.db, "INSERT INTO notes (body, created) VALUES ('fresh', 't')")
    fresh = copy_of(env, "fresh", time_="2026-12-03T03:00:00+00:00")
    book = ledger.look(env, [early, later, fresh])
    assert "later" not in book.superseded and [o.copy.id for o in book.outstanding] == ["later"]
    assert book.outstanding[0].missing == {"notes": 9}


def test_an_off_site_copy_with_no_file_here_is_compared_by_count(tmp_path):
    env = env_at(tmp_path)
    make_db(env.db, NOTES, ["INSERT INTO notes (body) VALUES ('x')"])
    far = ledger.Known(id="far", time="2026-12-01T03:00:00+00:00", reason="nightly", rows={"notes": 872},
                       where="off-site")
    (o,) = ledger.look(env, [far]).outstanding
    assert o.by_count and o.missing == {"notes": 871}


def test_a_dismissed_copy_does_not_count(tmp_path):
    env = env_at(tmp_path)
    make_db(env.db, NOTES, ["INSERT INTO notes (body) VALUES ('x'), ('y')"])
    nightly = copy_of(env, "nightly")
    run_sql(env.db, "DELETE FROM notes WHERE body = 'y'")
    assert ledger.look(env, [nightly], {nightly.sha256}).outstanding == []


def test_an_unchanged_database_is_looked_at_without_reading_a_row(tmp_path):
    env = env_at(tmp_path)
    make_db(env.db, NOTES + "CREATE TABLE blob (id INTEGER PRIMARY KEY, data BLOB);",
         ["WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 20000) "
          "INSERT INTO blob (data) SELECT randomblob(200) FROM c"])
    nightly = copy_of(env, "nightly")
    start = time.monotonic()
    ledger.look(env, [nightly])
    cold = time.monotonic() - start
    start = time.monotonic()
    book = ledger.look(env, [nightly])
    warm = time.monotonic() - start
    assert book.outstanding == [] and warm < cold
    kept = list((env.state_dir / "ledger").iterdir())
    assert kept and all(p.stat().st_mode & 0o077 == 0 for p in kept)
    torn = next(p for p in kept if p.name.startswith("live-"))
    torn.write_bytes(torn.read_bytes()[:-5])                            # a torn cache file is computed again
    assert ledger.look(env, [nightly]).outstanding == []


def test_a_cache_folder_that_cannot_be_made_costs_the_cache_not_the_look(tmp_path):
    """A file where the cache's folder should be (as a full or read-only state disk, or another user's
    folder): the rows are read and compared all the same, nothing is kept, nothing raises."""
    env = env_at(tmp_path)
    make_db(env.db, NOTES, ["INSERT INTO notes (body) VALUES ('kept'), ('lost')"])
    nightly = copy_of(env, "nightly")
    run_sql(env.db, "DELETE FROM notes WHERE body = 'lost'")
    env.state_dir.mkdir()
    (env.state_dir / "ledger").write_text("not a folder")
    book = ledger.look(env, [nightly])
    assert [o.missing_total for o in book.outstanding] == [1]
    assert (env.state_dir / "ledger").read_text() == "not a folder"


# -- the live rows from a copy's kept digests (ledger.rows_from_base) --------------------------------
SHOP = ("CREATE TABLE owners (id INTEGER PRIMARY KEY, name TEXT);"
        "CREATE TABLE notes (id INTEGER PRIMARY KEY, owner INTEGER REFERENCES owners(id), body TEXT);"
        "CREATE TABLE tags (name TEXT, weight REAL);")      # a rowid table without a declared key


def shop(env):
    make_db(env.db, SHOP, [
        "INSERT INTO owners (name) VALUES ('ann'), ('bob'), ('cy')",
        "WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < 3000) "
        "INSERT INTO notes (owner, body) SELECT 1 + i % 3, hex(randomblob(100 + (i % 7) * 900)) FROM s",
        "INSERT INTO tags VALUES ('x', 1), ('y', 2.5)"])


CHANGES = [
    "UPDATE notes SET body = 'short now' WHERE id = 17",                       # a row with overflow pages
    "UPDATE notes SET body = hex(randomblob(3000)) WHERE id = 1500",           # a small row grows overflow
    "DELETE FROM notes WHERE id BETWEEN 200 AND 260",
    "INSERT INTO notes (owner, body) VALUES (2, 'written since the copy')",
    "UPDATE owners SET name = 'bobby' WHERE id = 2",       # every note of bob's digests another parent now
    "DELETE FROM tags WHERE name = 'x'",
    "INSERT INTO tags VALUES ('x', 1)",                    # the same content back under another rowid
]


def test_the_live_rows_from_a_copy_s_kept_digests_are_every_live_row_read(tmp_path):
    env = env_at(tmp_path)
    shop(env)
    nightly = copy_of(env, "nightly")
    kept = ledger.copy_rows(env, nightly)                 # its digests kept, as a backup run leaves them
    app = sqlite3.connect(env.db, isolation_level=None)    # the app's connection: the WAL stays, with frames
    for statement in CHANGES:
        app.execute(statement)
    assert dbfiles.wal_mark(env.db).header is not None
    conn = sqlite3.connect(f"file:{nightly.path}?mode=ro", uri=True)
    conn.execute("ATTACH DATABASE ? AS live", (f"file:{env.db}?mode=ro",))
    assert rowpages.pages_differing(conn, env.db, nightly.path, dbfiles.wal_mark(env.db)) is not None   # narrowed
    conn.close()
    _, every = ledger.rows_of(env.db, tuple(env.bookkeeping))
    assert ledger.rows_from_base(env, nightly, kept, None) == every
    app.close()                                            # the last connection: checkpointed, no WAL to name
    _, every = ledger.rows_of(env.db, tuple(env.bookkeeping))
    assert ledger.rows_from_base(env, nightly, kept, None) == every


def test_a_look_after_a_write_reads_only_the_rows_that_differ_from_the_newest_copy(tmp_path, monkeypatch):
    env = env_at(tmp_path)
    shop(env)
    older = copy_of(env, "older", time_="2026-11-30T03:00:00+00:00")
    run_sql(env.db, "DELETE FROM notes WHERE id = 5")
    nightly = copy_of(env, "nightly")
    for c in (older, nightly):
        ledger.copy_rows(env, c)
    run_sql(env.db, "DELETE FROM notes WHERE id = 9", "INSERT INTO notes (owner, body) VALUES (1, 'new')")
    _, every = ledger.rows_of(env.db, tuple(env.bookkeeping))
    read_whole = []
    real_rows_of = ledger.rows_of
    monkeypatch.setattr(ledger, "rows_of", lambda path, *a, **k: read_whole.append(path) or real_rows_of(path, *a, **k))
    book = ledger.look(env, [older, nightly])
    assert read_whole == [] and [o.missing for o in book.outstanding] == [{"notes": 1}]
    assert ledger.live_rows(env) == every and read_whole == []      # what the look kept: read from the cache


def test_another_schema_live_is_read_whole(tmp_path):
    env = env_at(tmp_path)
    shop(env)
    nightly = copy_of(env, "nightly")
    kept = ledger.copy_rows(env, nightly)
    run_sql(env.db, "ALTER TABLE notes ADD COLUMN pinned INTEGER DEFAULT 0")
    assert ledger.rows_from_base(env, nightly, kept, None) is None
    another = ledger.Known(id="gone", time="", reason="nightly", path=nightly.path, sha256="0" * 64)
    assert ledger.kept_digests(env, [another]) == {}      # no digests kept: never a base, the look reads every row


def kept_copy(env):
    """A copy of the live database (the backup API) with its digests kept, as a backup run leaves them."""
    path = env.db.parent / "copy.sqlite3"
    src, dst = sqlite3.connect(env.db), sqlite3.connect(path)
    src.backup(dst)
    src.close()
    dst.close()
    known = ledger.Known(id="copy", time="2026-12-01T03:00:00+00:00", reason="nightly", path=str(path), sha256=sha(path))
    ledger.copy_rows(env, known)
    return known


def same_as_every_row(env, known):
    got = ledger.rows_from_base(env, known, ledger.copy_rows(env, known), None)
    return got is None or got == ledger.rows_of(env.db, tuple(env.bookkeeping))[1]


def test_a_negative_rowid_deleted_since_the_copy_is_missing_and_comes_back(tmp_path):
    """A rowid is a signed 64-bit integer: read from the pages as unsigned, -1 was a key no row has, so the row's
    deletion went unseen by the ledger and the restore's check refused a good restore."""
    from safedeploy import rowrestore
    env = env_at(tmp_path)
    make_db(env.db, "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT);", ["INSERT INTO t VALUES (-1, 'lost'), (5, 'b')"])
    known = kept_copy(env)
    app = sqlite3.connect(env.db, isolation_level=None)         # the app's connection: the WAL stays, with frames
    app.execute("DELETE FROM t WHERE id = -1")
    assert same_as_every_row(env, known)
    assert [o.missing for o in ledger.look(env, [known]).outstanding] == [{"t": 1}]
    assert rowrestore.apply(env, known.path, known.sha256).restored == {"t": 1}
    app.close()


def test_a_blob_key_a_reference_points_at_changed_since_the_copy_is_compared_not_a_crash(tmp_path):
    env = env_at(tmp_path)
    make_db(env.db, "CREATE TABLE p (id INTEGER PRIMARY KEY, code BLOB UNIQUE, n TEXT);"
                    "CREATE TABLE ch (id INTEGER PRIMARY KEY, pc REFERENCES p(code));",
            ["INSERT INTO p (code, n) VALUES (x'01', 'a')", "INSERT INTO ch (pc) VALUES (x'01')"])
    known = kept_copy(env)
    run_sql(env.db, "UPDATE p SET code = x'02' WHERE id = 1")
    assert same_as_every_row(env, known) and ledger.look(env, [known]).live == {"ch": 1, "p": 1}


def test_a_column_whose_type_changed_or_a_signed_zero_is_never_taken_for_the_copy_s_value(tmp_path):
    """5.0 in a REAL column and 5 in the INTEGER column a migration rebuilt it as are equal to SQL, and so are
    -0.0 and 0.0 in an untyped one; their digests differ, so the live rows must be read."""
    env = env_at(tmp_path)
    make_db(env.db, "CREATE TABLE t (id INTEGER PRIMARY KEY, v REAL); CREATE TABLE u (id INTEGER PRIMARY KEY, w);",
            ["INSERT INTO t VALUES (1, 5.0)", "INSERT INTO u VALUES (1, 0.0), (2, 1)"])
    known = kept_copy(env)
    app = sqlite3.connect(env.db, isolation_level=None)
    app.execute("UPDATE u SET w = -0.0 WHERE id = 1")
    assert same_as_every_row(env, known)
    app.executescript("CREATE TABLE new__t (id INTEGER PRIMARY KEY, v INTEGER); INSERT INTO new__t SELECT * FROM t;"
                      "DROP TABLE t; ALTER TABLE new__t RENAME TO t;")
    assert same_as_every_row(env, known)
    app.close()


def test_a_column_of_its_own_named_rowid_is_not_taken_for_the_key(tmp_path):
    env = env_at(tmp_path)
    make_db(env.db, "CREATE TABLE r (rowid INTEGER, v TEXT);", ["INSERT INTO r VALUES (7, 'a'), (7, 'b'), (9, 'c')"])
    known = kept_copy(env)
    app = sqlite3.connect(env.db, isolation_level=None)
    app.execute("UPDATE r SET v = 'changed' WHERE v = 'b'")
    assert same_as_every_row(env, known)
    app.close()
