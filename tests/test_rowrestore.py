"""Rows put back by the tool itself (safedeploy.rowrestore), on the schemas real apps have and the attacks
that broke the printed SQL: every case either puts the rows back with every live row unchanged and every
reference right, or refuses with one line and changes nothing. Real SQLite files; no user manager needed."""

import hashlib
import shutil
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import pytest

from helpers import make_db, run_sql
from safedeploy import rowrestore
from safedeploy.rowsets import DEFAULT_BOOKKEEPING


def query(db, sql):
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def dump(db):
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


@pytest.fixture(params=["read", "kept", "kept-app-open"])
def pair(tmp_path, request, monkeypatch):
    """(env, copy path): make_db(schema, rows) writes the copy; then the test changes the live database.
    Every test runs three times: the copy read whole inside the transaction ("read"); the copy's digests
    from the row ledger's cache by its sha256, the plan using the live rows read for the check ("kept",
    as backup.py --restore-rows runs it: only the rows that differ from the copy's are digested, the live
    database here without a WAL); and the same with the app's connection open, the changes since the
    copy still in its WAL ("kept-app-open": the rows compared are narrowed by the pages the files share)."""
    env = SimpleNamespace(db=tmp_path / "live.db", bookkeeping=list(DEFAULT_BOOKKEEPING), name="t",
                          state_dir=tmp_path / "state")
    if request.param.startswith("kept"):
        apply, plan = rowrestore.apply, rowrestore.plan

        def sha(path):
            return hashlib.sha256(Path(path).read_bytes()).hexdigest()
        monkeypatch.setattr(rowrestore, "apply", lambda e, c: apply(e, c, sha(c)))
        monkeypatch.setattr(rowrestore, "plan", lambda e, c: plan(e, c, sha(c)))
    copy = tmp_path / "copy.db"

    def build(script, rows, since):
        make_db(copy, script, rows)
        shutil.copy(copy, env.db)
        if request.param == "kept-app-open":
            app = sqlite3.connect(env.db, isolation_level=None)
            request.addfinalizer(app.close)
            app.execute("PRAGMA journal_mode = WAL")
            for statement in since:
                app.execute(statement)
        else:
            run_sql(env.db, *since)
        return env, copy
    return build


FLASKR = """CREATE TABLE "user" (id INTEGER PRIMARY KEY AUTOINCREMENT, username TEXT UNIQUE NOT NULL, last_login TEXT);
CREATE TABLE post (id INTEGER PRIMARY KEY AUTOINCREMENT, author_id INTEGER NOT NULL REFERENCES "user" (id),
                   title TEXT NOT NULL, body TEXT NOT NULL);"""


def test_a_deleted_row_comes_back_and_a_row_whose_id_was_taken_comes_back_under_a_new_id(pair):
    env, copy = pair("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT NOT NULL);",
                     ["INSERT INTO notes (body) VALUES ('a'), ('b'), ('c'), ('d')"],
                     ["DELETE FROM notes WHERE id IN (2, 4)", "INSERT INTO notes (body) VALUES ('new')"])   # 'new' takes 4
    live_before = query(env.db, "SELECT id, body FROM notes")
    done = rowrestore.apply(env, copy)
    assert done.restored == {"notes": 2} and done.rekeyed == {"notes": 1}
    rows = query(env.db, "SELECT id, body FROM notes ORDER BY id")
    assert set(live_before) <= set(rows)
    assert sorted(b for _, b in rows) == ["a", "b", "c", "d", "new"]
    assert (2, "b") in rows and (4, "new") in rows            # b keeps its free id; d comes back under a new one
    assert rowrestore.plan(env, copy).total == 0              # run again: nothing more to put back


def test_unique_on_conflict_replace_never_deletes_the_live_user(pair):
    env, copy = pair('CREATE TABLE "user" (id INTEGER PRIMARY KEY, email TEXT UNIQUE ON CONFLICT REPLACE, name TEXT);'
                     "CREATE TABLE post (id INTEGER PRIMARY KEY, author_id INTEGER REFERENCES user(id), body TEXT);"
                     "CREATE TABLE invite (id INTEGER PRIMARY KEY, code TEXT UNIQUE ON CONFLICT REPLACE, note TEXT);",
                     ["INSERT INTO user VALUES (1, 'ann@x', 'Ann'), (2, 'bob@x', 'Bob')",
                      "INSERT INTO post VALUES (1, 2, 'hi bob')", "INSERT INTO invite VALUES (1, 'XYZ', 'for dan')"],
                     ["DELETE FROM post WHERE id = 1", "DELETE FROM user WHERE id = 2",
                      "INSERT INTO user VALUES (3, 'bob@x', 'Robert')", "INSERT INTO post VALUES (2, 3, 'new bob post')"])
    live_before = dump(env.db)
    the_plan = rowrestore.plan(env, copy)
    user = next(t for t in the_plan.tables if t.table == "user")
    assert user.changed == 1 and not user.rows          # bob@x is live (re-registered): the same user, never re-inserted
    rowrestore.apply(env, copy)
    after = dump(env.db)
    assert set(live_before) <= set(after)               # nothing of the live rows went or changed
    assert query(env.db, "SELECT u.name FROM post p JOIN user u ON u.id = p.author_id WHERE p.body = 'hi bob'") \
        == [("Robert",)]                                  # bob's post back, credited to the live bob@x
    assert query(env.db, "SELECT id, email, name FROM user ORDER BY id") == [(1, "ann@x", "Ann"), (3, "bob@x", "Robert")]


def test_a_unique_value_a_different_live_row_holds_keeps_that_row_out(pair):
    env, copy = pair("CREATE TABLE slot (id INTEGER PRIMARY KEY, day TEXT, hour INT, who TEXT, UNIQUE (day, hour) "
                     "ON CONFLICT REPLACE);",
                     ["INSERT INTO slot VALUES (1, 'mon', 9, 'ann'), (2, 'mon', 10, 'bob')"],
                     ["DELETE FROM slot WHERE id = 2", "INSERT INTO slot VALUES (3, 'tue', 10, 'cy')"])
    done = rowrestore.apply(env, copy)
    assert done.restored == {"slot": 1}
    assert sorted(query(env.db, "SELECT day, hour, who FROM slot")) == [("mon", 9, "ann"), ("mon", 10, "bob"),
                                                                         ("tue", 10, "cy")]


def test_a_trigger_that_deletes_a_live_row_makes_the_restore_refuse_and_change_nothing(pair):
    env, copy = pair("CREATE TABLE session (id INTEGER PRIMARY KEY, user_id INTEGER, token TEXT);"
                     "CREATE TRIGGER one_session AFTER INSERT ON session BEGIN "
                     "DELETE FROM session WHERE user_id = NEW.user_id AND id != NEW.id; END;",
                     ["INSERT INTO session VALUES (1, 7, 'old')"],
                     ["DELETE FROM session", "INSERT INTO session VALUES (2, 7, 'current')"])
    env.bookkeeping = ["django_migrations"]         # session here is a users' table, not Django's
    before = dump(env.db)
    with pytest.raises(rowrestore.RestoreRefused) as caught:
        rowrestore.apply(env, copy)
    assert "session" in str(caught.value) and "\n" not in str(caught.value)
    assert dump(env.db) == before


def test_self_and_cyclic_references_follow_their_rows(pair):
    env, copy = pair('CREATE TABLE user (id INTEGER PRIMARY KEY, name TEXT, pinned_post INTEGER REFERENCES post(id));'
                     "CREATE TABLE post (id INTEGER PRIMARY KEY, author_id INTEGER REFERENCES user(id), body TEXT);"
                     "CREATE TABLE comment (id INTEGER PRIMARY KEY, parent_id INTEGER REFERENCES comment(id), body TEXT);",
                     ["INSERT INTO user VALUES (1, 'ann', NULL), (2, 'bob', 2)",
                      "INSERT INTO post VALUES (1, 1, 'ann post'), (2, 2, 'bob pinned')",
                      "INSERT INTO comment VALUES (1, NULL, 'root'), (2, NULL, 'question'), (3, 2, 'answer')"],
                     ["DELETE FROM user WHERE id = 2", "DELETE FROM post WHERE id = 2", "DELETE FROM comment WHERE id > 1",
                      "INSERT INTO user VALUES (2, 'cy', NULL)", "INSERT INTO post VALUES (2, 2, 'cy post')",
                      "INSERT INTO comment VALUES (2, NULL, 'stranger'), (3, 1, 'reply to root')"])
    rowrestore.apply(env, copy)
    bob = query(env.db, "SELECT id, pinned_post FROM user WHERE name = 'bob'")[0]
    pinned = query(env.db, f"SELECT author_id, body FROM post WHERE id = {bob[1]}")[0]
    assert pinned == (bob[0], "bob pinned")                          # bob's pin is his own post, both re-keyed
    answer = query(env.db, "SELECT c.body, p.body FROM comment c JOIN comment p ON p.id = c.parent_id "
                           "WHERE c.body = 'answer'")
    assert answer == [("answer", "question")]                        # under its own question, not the stranger
    assert query(env.db, "SELECT name FROM user WHERE id = 2") == [("cy",)]
    assert query(env.db, "SELECT body FROM post WHERE id = 2") == [("cy post",)]


def test_a_reference_written_in_another_case_still_follows_its_row(pair):
    env, copy = pair('CREATE TABLE user (id INTEGER PRIMARY KEY, name TEXT);'
                     "CREATE TABLE post (id INTEGER PRIMARY KEY, author_id INTEGER REFERENCES User(id), body TEXT);",
                     ["INSERT INTO user VALUES (1, 'ann'), (2, 'bob')", "INSERT INTO post VALUES (1, 2, 'by bob')"],
                     ["DELETE FROM post", "DELETE FROM user WHERE id = 2", "INSERT INTO user VALUES (2, 'cy')"])
    rowrestore.apply(env, copy)
    assert query(env.db, "SELECT u.name FROM post p JOIN user u ON u.id = p.author_id") == [("bob",)]


def test_an_integer_primary_key_desc_is_given_its_key_explicitly(pair):
    env, copy = pair("CREATE TABLE author (id INTEGER PRIMARY KEY DESC, name TEXT);"
                     "CREATE TABLE book (id INTEGER PRIMARY KEY, author_id INTEGER REFERENCES author(id), title TEXT);",
                     ["INSERT INTO author VALUES (1, 'ann'), (2, 'bea')", "INSERT INTO book VALUES (1, 2, 'bea book')"],
                     ["DELETE FROM book", "DELETE FROM author WHERE id = 2", "INSERT INTO author VALUES (2, 'cat')"])
    rowrestore.apply(env, copy)
    rows = query(env.db, "SELECT a.id, a.name, b.title FROM book b JOIN author a ON a.id = b.author_id")
    assert len(rows) == 1 and rows[0][1:] == ("bea", "bea book") and rows[0][0] not in (None, 2)
    assert query(env.db, "SELECT name FROM author WHERE id = 2") == [("cat",)]


def test_a_key_to_a_non_key_column_keeps_the_payment_on_its_account(pair):
    env, copy = pair("CREATE TABLE account (id INTEGER PRIMARY KEY, number TEXT UNIQUE, owner TEXT);"
                     "CREATE TABLE payment (id INTEGER PRIMARY KEY, account TEXT REFERENCES account(number), amount INT);",
                     ["INSERT INTO account VALUES (1, 'A-1', 'ann'), (2, 'B-2', 'bob')", "INSERT INTO payment VALUES (1, 'B-2', 50)"],
                     ["DELETE FROM payment", "INSERT INTO account VALUES (3, 'C-3', 'cy')"])
    rowrestore.apply(env, copy)
    assert query(env.db, "SELECT a.owner, p.amount FROM payment p JOIN account a ON a.number = p.account") == [("bob", 50)]


def test_a_row_updated_since_the_copy_is_reported_not_inserted_again(pair):
    env, copy = pair(FLASKR,
                     ["INSERT INTO user (username, last_login) VALUES ('ann', 'mon'), ('bob', 'mon')",
                      "INSERT INTO post (author_id, title, body) VALUES (2, 't', 'by bob')"],
                     ["UPDATE user SET last_login = 'tue'", "DELETE FROM post"])
    the_plan = rowrestore.plan(env, copy)
    user = next(t for t in the_plan.tables if t.table == "user")
    assert user.changed == 2 and not user.rows
    rowrestore.apply(env, copy)
    assert query(env.db, "SELECT count(*) FROM user") == [(2,)]
    assert query(env.db, 'SELECT u.username FROM post p JOIN "user" u ON u.id = p.author_id') == [("bob",)]


def test_fts_shadow_tables_are_left_to_sqlite_and_the_index_stays_sound(pair):
    env, copy = pair("CREATE TABLE doc (id INTEGER PRIMARY KEY, body TEXT);"
                     "CREATE VIRTUAL TABLE doc_fts USING fts5(body, content='doc', content_rowid='id');"
                     "CREATE TRIGGER doc_ai AFTER INSERT ON doc BEGIN "
                     "INSERT INTO doc_fts(rowid, body) VALUES (new.id, new.body); END;",
                     ["INSERT INTO doc (body) VALUES ('alpha'), ('beta')"],
                     ["INSERT INTO doc_fts(doc_fts, rowid, body) VALUES ('delete', 2, 'beta')", "DELETE FROM doc WHERE id = 2"])
    the_plan = rowrestore.plan(env, copy)
    assert [t.table for t in the_plan.tables] == ["doc"]
    assert any("doc_fts" in note for note in the_plan.notes)
    rowrestore.apply(env, copy)
    run_sql(env.db, "INSERT INTO doc_fts(doc_fts) VALUES ('integrity-check')")
    assert query(env.db, "SELECT rowid FROM doc_fts WHERE doc_fts MATCH 'beta'") == [(2,)]


def test_a_without_rowid_table_whose_key_is_taken_keeps_the_live_row(pair):
    env, copy = pair("CREATE TABLE setting (name TEXT PRIMARY KEY, value TEXT) WITHOUT ROWID;",
                     ["INSERT INTO setting VALUES ('theme', 'dark'), ('lang', 'en')"],
                     ["UPDATE setting SET value = 'light' WHERE name = 'theme'", "DELETE FROM setting WHERE name = 'lang'"])
    done = rowrestore.apply(env, copy)
    assert done.restored == {"setting": 1}
    assert sorted(query(env.db, "SELECT name, value FROM setting")) == [("lang", "en"), ("theme", "light")]


def test_a_column_the_live_schema_lacks_is_a_one_line_refusal_for_that_table(pair, tmp_path):
    env, copy = pair("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT, mood TEXT, stars INT);",
                     ["INSERT INTO notes VALUES (1, 'a', 'happy', 3), (2, 'b', 'sad', 1)"], [])
    make_db(env.db, "DROP TABLE notes; CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT);")
    the_plan = rowrestore.plan(env, copy)
    assert "notes" in the_plan.refused and "not in the live schema" in the_plan.refused["notes"]
    with pytest.raises(rowrestore.RestoreRefused):
        rowrestore.apply(env, copy)
    assert query(env.db, "SELECT count(*) FROM notes") == [(0,)]


def test_a_renamed_column_is_mapped_and_bookkeeping_rows_are_never_offered(pair):
    env, copy = pair("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT NOT NULL);"
                     "CREATE TABLE django_migrations (id INTEGER PRIMARY KEY, app TEXT, name TEXT);",
                     ["INSERT INTO notes (text) VALUES ('one'), ('two'), ('three')",
                      "INSERT INTO django_migrations (app, name) VALUES ('notes', '0002_rename')"],
                     ["ALTER TABLE notes RENAME COLUMN text TO body", "DELETE FROM notes WHERE id = 3",
                      "DELETE FROM django_migrations"])
    done = rowrestore.apply(env, copy)
    assert done.restored == {"notes": 1}
    assert sorted(r[0] for r in query(env.db, "SELECT body FROM notes")) == ["one", "three", "two"]
    assert query(env.db, "SELECT count(*) FROM django_migrations") == [(0,)]


def test_the_sql_for_review_is_what_apply_does_and_changes_nothing(pair):
    env, copy = pair("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT);",
                     ["INSERT INTO notes (body) VALUES ('a'), ('it''s' || char(10) || 'DROP TABLE notes;')"],
                     ["DELETE FROM notes"])
    before = dump(env.db)
    lines = rowrestore.sql(rowrestore.plan(env, copy))
    assert dump(env.db) == before
    inserts = [line for line in lines if line.startswith("INSERT")]
    assert len(inserts) == 2 and all("\n" not in line for line in lines)
    assert all(line.startswith(("INSERT", "--")) for line in lines)


def test_an_autoincrement_key_handed_out_again_after_an_older_copy_was_restored_is_another_row(pair):
    """A restored older copy takes its sqlite_sequence back: the keys after it go to new rows again. The copy's
    rows under those keys are missing (they come back under new keys), not "updated since"."""
    env, copy = pair("CREATE TABLE notes (id INTEGER PRIMARY KEY AUTOINCREMENT, author TEXT NOT NULL, "
                     "body TEXT NOT NULL, created TEXT NOT NULL);",
                     ["INSERT INTO notes (author, body, created) VALUES ('w', 'one', 't1'), ('w', 'two', 't2'), "
                      "('w', 'three', 't3'), ('w', 'four', 't4'), ('w', 'five', 't5')"],
                     ["DELETE FROM notes WHERE id > 3", "UPDATE sqlite_sequence SET seq = 3",
                      "INSERT INTO notes (author, body, created) VALUES ('w', 'six', 't6'), ('w', 'seven', 't7')"])
    the_plan = rowrestore.plan(env, copy)
    notes = next(t for t in the_plan.tables if t.table == "notes")
    assert notes.changed == 0 and len(notes.rows) == 2 and notes.rekeyed == {4: 6, 5: 7}
    rowrestore.apply(env, copy)
    assert sorted(r[0] for r in query(env.db, "SELECT body FROM notes")) == \
        ["five", "four", "one", "seven", "six", "three", "two"]


DJANGO_NOTES = ("CREATE TABLE django_migrations (id INTEGER PRIMARY KEY AUTOINCREMENT, app TEXT, name TEXT, "
                "applied TEXT);"
                "CREATE TABLE notes (id INTEGER PRIMARY KEY AUTOINCREMENT, author TEXT NOT NULL, body TEXT NOT NULL, "
                "words INTEGER NOT NULL);")


def test_a_column_a_migration_the_live_database_has_not_run_added_is_left_out_and_the_rows_come_back(pair):
    """A pre-rollback save of a release whose migration (0002: a NOT NULL column) was rolled back with the
    database: the live schema lacks the column, its django_migrations lacks 0002. The rows written
    meanwhile come back without the column's values (the migration's fill), with a note that says so."""
    env, copy = pair(DJANGO_NOTES,
                     ["INSERT INTO django_migrations (app, name, applied) VALUES ('notes', '0001_initial', 't'), "
                      "('notes', '0002_note_words', 't')",
                      "INSERT INTO notes (author, body, words) VALUES ('w', 'one', 0), ('w', 'two', 2), ('w', 'new', 0)"],
                     [])
    make_db(env.db, "DROP TABLE notes; CREATE TABLE notes (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                    "author TEXT NOT NULL, body TEXT NOT NULL);",
            ["INSERT INTO notes (author, body) VALUES ('w', 'one'), ('w', 'two')",
             "DELETE FROM django_migrations WHERE name = '0002_note_words'"])
    the_plan = rowrestore.plan(env, copy)
    assert not the_plan.refused and any("words" in n and "0002_note_words" in n for n in the_plan.notes)
    assert rowrestore.apply(env, copy).restored == {"notes": 1}
    assert sorted(r[0] for r in query(env.db, "SELECT body FROM notes")) == ["new", "one", "two"]


def test_a_column_only_the_copy_has_is_still_refused_when_the_live_database_ran_other_migrations(pair):
    """The live database is not behind the copy (it ran a migration the copy lacks): no direction, refused."""
    env, copy = pair(DJANGO_NOTES,
                     ["INSERT INTO django_migrations (app, name, applied) VALUES ('notes', '0001_initial', 't'), "
                      "('notes', '0002_note_words', 't')",
                      "INSERT INTO notes (author, body, words) VALUES ('w', 'one', 1)"], [])
    make_db(env.db, "DROP TABLE notes; CREATE TABLE notes (id INTEGER PRIMARY KEY, author TEXT, body TEXT);",
            ["DELETE FROM django_migrations WHERE name = '0002_note_words'",
             "INSERT INTO django_migrations (app, name, applied) VALUES ('notes', '0002_other', 't')"])
    assert "notes" in rowrestore.plan(env, copy).refused


def test_orphan_rows_go_to_the_table_of_their_width_whose_walk_met_a_damaged_page():
    from safedeploy.salvage import orphan_owners
    assert orphan_owners(["notes"], set()) == ["notes"]
    assert orphan_owners(["django_migrations", "notes"], {"notes"}) == ["notes"]
    assert orphan_owners(["django_migrations", "notes"], set()) == []           # lost_and_found
    assert orphan_owners(["a", "b"], {"a", "b"}) == ["a", "b"]                   # lost_and_found


def test_a_salvage_puts_the_rows_under_a_damaged_interior_page_back_in_their_table_not_lost_and_found(tmp_path):
    """Django's notes and django_migrations have four columns each: the leaf pages under the notes' damaged
    interior page are read as orphans, and go to notes (the table whose walk met the damage)."""
    from safedeploy import salvage
    db = tmp_path / "app.db"
    make_db(db, DJANGO_NOTES.replace(", words INTEGER NOT NULL", ", created TEXT NOT NULL"),
            ["INSERT INTO django_migrations (app, name, applied) VALUES ('notes', '0001_initial', 't')"])
    run_sql(db, *[f"INSERT INTO notes (author, body, created) VALUES ('w', 'n{i}-{'x' * 300}', 't{i}')"
                  for i in range(400)], "PRAGMA wal_checkpoint(TRUNCATE)")
    root = query(db, "SELECT rootpage FROM sqlite_schema WHERE name = 'notes'")[0][0]
    with open(db, "r+b") as fh:                           # the notes' root (an interior page) overwritten
        fh.seek(4096 * (root - 1))
        fh.write(b"\x00" * 4096)
    found = salvage.salvage(db, tmp_path / "salvaged.db")
    assert found.lost_and_found == 0 and found.tables["notes"] == 400 and found.tables["django_migrations"] == 1


def test_a_damaged_interior_page_whose_cells_reach_past_its_end_is_a_bad_page_not_a_crash(tmp_path):
    """Random bytes can look like an interior page (kind 0x05) whose cell pointers name offsets at the page's
    very end (seen: os.urandom damage, struct.error out of status.py): counted bad, its leaves read as orphans."""
    from safedeploy import salvage
    db = tmp_path / "app.db"
    make_db(db, DJANGO_NOTES.replace(", words INTEGER NOT NULL", ", created TEXT NOT NULL"), [])
    run_sql(db, *[f"INSERT INTO notes (author, body, created) VALUES ('w', 'n{i}-{'x' * 300}', 't{i}')"
                  for i in range(400)], "PRAGMA wal_checkpoint(TRUNCATE)")
    root = query(db, "SELECT rootpage FROM sqlite_schema WHERE name = 'notes'")[0][0]
    with open(db, "r+b") as fh:                           # still kind 0x05, two cells, one at offset 4094
        fh.seek(4096 * (root - 1))
        page = bytearray(fh.read(4096))
        page[3:5] = (2).to_bytes(2, "big")
        page[12:16] = (100).to_bytes(2, "big") + (4094).to_bytes(2, "big")
        fh.seek(4096 * (root - 1))
        fh.write(bytes(page))
    found = salvage.salvage(db, tmp_path / "salvaged.db")
    assert found.bad_pages >= 1 and found.tables["notes"] == 400


def test_inside_the_lock_only_the_rows_that_differ_from_the_copy_are_digested(tmp_path, monkeypatch):
    """backup.py --restore-rows holds the app's writers while it checks every live row: with the copy's digests
    kept and the app's WAL open, the check before the inserts compares only the rows off the pages the two
    files share, and neither check digests every live row; the rows come back all the same."""
    from safedeploy import rowpages, rowsets
    env = SimpleNamespace(db=tmp_path / "live.db", bookkeeping=list(DEFAULT_BOOKKEEPING), name="t",
                          state_dir=tmp_path / "state")
    copy = tmp_path / "copy.db"
    make_db(copy, "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT);",
            ["WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < 3000) "
             "INSERT INTO notes (body) SELECT hex(randomblob(200)) FROM s"])
    shutil.copy(copy, env.db)
    app = sqlite3.connect(env.db, isolation_level=None)
    app.execute("DELETE FROM notes WHERE id IN (10, 2000)")
    app.execute("INSERT INTO notes (body) VALUES ('written since')")
    narrowed, digested = [], []
    real_pages, real_digests = rowpages.pages_differing, rowsets.digests
    monkeypatch.setattr(rowpages, "pages_differing", lambda *a, **k: narrowed.append(real_pages(*a, **k)) or narrowed[-1])
    monkeypatch.setattr(rowsets, "digests", lambda conn, schema, attached="main", *a: digested.append(attached) or
                        real_digests(conn, schema, attached, *a))
    rowrestore.kept_copy_rows(env, copy, hashlib.sha256(copy.read_bytes()).hexdigest())    # as a backup run keeps them
    digested.clear()
    done = rowrestore.apply(env, copy, hashlib.sha256(copy.read_bytes()).hexdigest())
    assert done.restored == {"notes": 2} and query(env.db, "SELECT count(*) FROM notes") == [(3001,)]
    assert narrowed and narrowed[0] is not None and len(narrowed[0]["notes"][0]) < 100
    assert "main" not in digested
    app.close()


def test_a_row_whose_negative_key_a_newer_row_took_comes_back_under_the_first_key_above_zero(pair):
    env, copy = pair("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT);", ["INSERT INTO t VALUES (-5, 'old'), (-1, 'lost')"],
                     ["DELETE FROM t WHERE id = -1", "INSERT INTO t VALUES (-1, 'newer')"])
    done = rowrestore.apply(env, copy)
    assert done.restored == {"t": 1} and sorted(query(env.db, "SELECT id, v FROM t")) == \
        [(-5, "old"), (-1, "newer"), (1, "lost")]
