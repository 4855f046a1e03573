"""The rows a rollback's plan and seal count, read only where the two files differ (safedeploy.rowdelta),
give the counts of the comparison of every row (safedeploy.ledger / rowcompare); and the decisions of when
that holds. Real SQLite files, no mocks."""

import shutil
import sqlite3
import types
from pathlib import Path

import pytest

from safedeploy import dbfiles, decisions, rowdelta, rowloss, rowpages, rowsets
from tests.helpers import make_db, run_sql

FLASKR = """
CREATE TABLE user (id INTEGER PRIMARY KEY AUTOINCREMENT, username TEXT UNIQUE NOT NULL, password TEXT NOT NULL);
CREATE TABLE post (id INTEGER PRIMARY KEY, author_id INTEGER NOT NULL REFERENCES user (id),
                   title TEXT NOT NULL COLLATE NOCASE, body BLOB);
CREATE TABLE plain (a, b);
"""
ROWS = [f"INSERT INTO user (username, password) VALUES ('u{i}', 'p{i}')" for i in range(5)] + \
       [f"INSERT INTO post (author_id, title, body) VALUES ({1 + i % 5}, 'T{i}', 'b{i}')" for i in range(60)] + \
       [f"INSERT INTO plain VALUES ({i}, 'x{i}')" for i in range(20)]

CHANGES = {
    "nothing": [],
    "inserts": ["INSERT INTO post (author_id, title, body) VALUES (2, 'new', 'n')", "INSERT INTO plain VALUES (99, 'y')"],
    "deletes": ["DELETE FROM post WHERE id IN (3, 60)", "DELETE FROM plain WHERE a = 4"],
    "updates": ["UPDATE post SET body = 'other' WHERE id = 7", "UPDATE plain SET b = 'z' WHERE a = 5"],
    "case only": ["UPDATE post SET title = 't8' WHERE id = 9"],                # NOCASE: equal for SQL, not the same
    "type only": ["UPDATE plain SET a = 6.0 WHERE a = 6", "UPDATE post SET body = CAST('b11' AS BLOB) WHERE id = 12"],
    "key taken again": ["DELETE FROM post WHERE id = 60",
                        "INSERT INTO post (id, author_id, title, body) VALUES (60, 1, 'quite another', 'row')"],
    "parent renamed": ["UPDATE user SET username = 'renamed' WHERE id = 2"],
    "parent gone": ["DELETE FROM user WHERE id = 3"],
    "parent new, child moved": ["INSERT INTO user (username, password) VALUES ('u9', 'p9')",
                                "UPDATE post SET author_id = 6 WHERE id = 20"],
    "all": ["DELETE FROM post WHERE id % 7 = 0", "UPDATE post SET body = 'x' WHERE id % 5 = 0",
            "INSERT INTO post (author_id, title, body) VALUES (1, 'a', 'b')", "UPDATE user SET password = 'q'"],
}


def pair(tmp_path: Path, changes: list[str]) -> tuple[Path, Path]:
    old = tmp_path / "old.sqlite3"
    make_db(old, FLASKR, ROWS)
    run_sql(old, "PRAGMA wal_checkpoint(TRUNCATE)")
    new = tmp_path / "new.sqlite3"
    shutil.copy(old, new)
    run_sql(new, *changes)
    return old, new


def env_for(tmp_path: Path, live: Path):
    return types.SimpleNamespace(db=live, bookkeeping=list(rowsets.DEFAULT_BOOKKEEPING), state_dir=tmp_path / "state",
                                 name="t")


@pytest.mark.parametrize("case", sorted(CHANGES))
def test_delta_counts_what_every_row_counts(tmp_path, case):
    old, new = pair(tmp_path, CHANGES[case])
    copy = types.SimpleNamespace(path=str(old), sha256=dbfiles.sha256_file(old), reason="r", time="t")
    # the plan: rows of the live (new) database that the copy lacks
    env = env_for(tmp_path, new)
    quick = rowloss.leaving_by_delta(env, copy)
    assert quick is not None
    full_leaving = full(rowloss.leaving, env, copy)
    assert (quick.rows, quick.changed) == (full_leaving.rows, full_leaving.changed)
    # the seal: rows of the set-aside (new) database that the restored (old) one lacks
    env = env_for(tmp_path, old)
    sealed = rowloss.lost_by_delta(env, str(new))
    assert sealed is not None
    assert sealed == full(rowloss.lost, env, str(new), dbfiles.sha256_file(new))


def full(func, *args):
    """func with the delta turned off: the comparison of every row."""
    saved = rowloss.leaving_by_delta, rowloss.lost_by_delta
    rowloss.leaving_by_delta = rowloss.lost_by_delta = lambda *a: None
    try:
        return func(*args)
    finally:
        rowloss.leaving_by_delta, rowloss.lost_by_delta = saved


def test_a_schema_that_differs_takes_the_full_comparison(tmp_path):
    old, new = pair(tmp_path, ["ALTER TABLE plain ADD COLUMN c"])
    env = env_for(tmp_path, new)
    assert rowloss.leaving_by_delta(env, types.SimpleNamespace(path=str(old))) is None


def table(**kw) -> rowsets.Table:
    base = dict(name="t", columns=("id", "a"), types=("INTEGER", ""), notnull=(False, False), defaults=(False, False),
                key=("id",), surrogate="id", alias=True, without_rowid=False, autoincrement=False, unique=(), refs=())
    return rowsets.Table(**{**base, **kw})


def test_when_identical_rows_have_identical_digests():
    assert rowdelta.same_digest_when_equal(table(), table())
    assert rowdelta.same_digest_when_equal(table(key=(), surrogate=None, alias=False), table(key=(), surrogate=None,
                                                                                            alias=False))
    # INTEGER PRIMARY KEY DESC is no rowid alias: it may hold NULL or text
    assert not rowdelta.same_digest_when_equal(table(alias=False), table(alias=False))
    # a natural key, a table without rowid
    assert not rowdelta.same_digest_when_equal(table(surrogate=None, alias=False, types=("TEXT", "")), table())
    assert not rowdelta.same_digest_when_equal(table(without_rowid=True, alias=False), table())
    # another shape
    assert not rowdelta.same_digest_when_equal(table(), table(columns=("id", "a", "b")))
    # a foreign key over two columns
    two = (rowsets.Ref(("a", "id"), "p", ("x", "y")),)
    assert not rowdelta.same_digest_when_equal(table(refs=two), table(refs=two))


def test_parents_that_differ():
    a = {(1,): 10, (2,): 20, (3,): 30}
    b = {(1,): 10, (2,): 21, (4,): 40}
    assert rowdelta.parent_keys_differing(a, b) == {2, 3, 4}
    assert rowdelta.parent_keys_differing(a, dict(a)) == set()



def test_which_columns_can_hold_1_and_1_0_apart():
    for declared in ("", "BLOB", "blob"):
        assert rowdelta.mixes_numbers(declared)
    for declared in ("INTEGER", "int", "TEXT", "VARCHAR(20)", "REAL", "DOUBLE", "NUMERIC", "DECIMAL(10,2)", "BOOLEAN",
                     "TIMESTAMP", "CLOB", "BIGINT"):
        assert not rowdelta.mixes_numbers(declared)


# -- the seal takes the plan's count when nothing was written between (decisions.plan_count_reusable) ----------
@pytest.mark.parametrize("case", sorted(CHANGES))
def test_the_plans_kept_count_is_what_the_seal_counts(tmp_path, case):
    """leaving(keep=True) also counts what the seal counts: the live rows the copy lacks (by content, rowcompare's
    rules), and the live rows per table, as the seal finds them once the live file is set aside and the copy is in;
    and runs integrity_check (not quick_check)."""
    old, new = pair(tmp_path, CHANGES[case])
    copy = types.SimpleNamespace(path=str(old), sha256=dbfiles.sha256_file(old), reason="r", time="t")
    app = sqlite3.connect(new, isolation_level=None)        # the app's connection: the WAL is there
    app.execute("SELECT count(*) FROM sqlite_master").fetchone()
    leaving = rowloss.leaving(env_for(tmp_path, new), copy, keep=True)
    view = leaving.view
    assert view is not None and view.conn is not None
    app.close()
    view.stopped(new)
    assert view.conn is None and view.held_open
    assert view.rows == dbfiles.rows_of(new) and view.integrity == "ok"
    assert view.lost == rowloss.lost_by_delta(env_for(tmp_path, old), str(new))
    assert view.lost == full(rowloss.lost, env_for(tmp_path, old), str(new), dbfiles.sha256_file(new))
    assert decisions.plan_count_reusable(True, view.held_open, view.at_plan, view.after_plan, view.at_stop)[0]


def plan_with_app(tmp_path):
    old, new = pair(tmp_path, CHANGES["inserts"])
    copy = types.SimpleNamespace(path=str(old), sha256=dbfiles.sha256_file(old), reason="r", time="t")
    app = sqlite3.connect(new, isolation_level=None)
    app.execute("SELECT count(*) FROM post").fetchone()
    return new, app, rowloss.leaving(env_for(tmp_path, new), copy, keep=True).view


def reusable(view) -> bool:
    return decisions.plan_count_reusable(True, view.held_open, view.at_plan, view.after_plan, view.at_stop)[0]


def test_a_commit_after_the_plan_makes_the_seal_count_again(tmp_path):
    new, app, view = plan_with_app(tmp_path)
    app.execute("INSERT INTO plain VALUES (1000, 'written after the plan')")
    app.close()
    view.stopped(new)
    assert view.at_stop != view.at_plan and not reusable(view)


def test_an_update_in_place_after_the_plan_makes_the_seal_count_again(tmp_path):
    """Same size, same row count: the WAL index header still changes."""
    new, app, view = plan_with_app(tmp_path)
    app.execute("UPDATE plain SET b = 'Z' WHERE a = 1")
    view.stopped(new)
    app.close()
    assert view.at_stop.header != view.at_plan.header and not reusable(view)


def test_the_apps_last_connection_closing_changes_nothing_while_the_plan_holds_its_own(tmp_path):
    """Reads and the app's connections closing (flaskr opens one per request) leave the marks as they were:
    the plan's connection, held open, keeps the last one to close from checkpointing and removing the WAL."""
    new, app, view = plan_with_app(tmp_path)
    for _ in range(3):
        other = sqlite3.connect(new, isolation_level=None)
        other.execute("SELECT count(*) FROM post").fetchone()
        other.close()
    app.close()
    assert Path(f"{new}-wal").exists()
    view.stopped(new)
    assert view.at_stop == view.at_plan and reusable(view)


def test_a_plan_closed_before_the_stop_is_never_reused(tmp_path):
    new, app, view = plan_with_app(tmp_path)
    view.close()
    app.close()         # the last connection: checkpoints and removes the WAL
    view.stopped(new)
    assert not view.held_open and not reusable(view)


# -- only the rows off the pages both files share are compared (safedeploy.rowpages) ------------------------
FILLER = [f"INSERT INTO plain VALUES ({1000 + i}, '{'f' * 300}{i}')" for i in range(1500)] + \
    ["INSERT INTO plain VALUES (9000, zeroblob(9000))"]           # ~120 leaf pages; a row on overflow pages
ON_PAGES = {"a filler page": ["UPDATE plain SET b = 'changed in place' WHERE a = 1700"],
            "an overflow tail": ["UPDATE plain SET b = zeroblob(8999) || x'01' WHERE a = 9000"],
            "pages past the file's end": [f"INSERT INTO plain VALUES ({20000 + i}, '{'g' * 300}')" for i in range(300)]}


def pair_in_wal(tmp_path: Path, changes: list[str]):
    """(the copy, the live database, the app's connection): the live changes still in the WAL (no checkpoint),
    so the pages are read through it."""
    old = tmp_path / "old.sqlite3"
    make_db(old, FLASKR, ROWS + FILLER)
    run_sql(old, "PRAGMA wal_checkpoint(TRUNCATE)")
    new = tmp_path / "new.sqlite3"
    shutil.copy(old, new)
    app = sqlite3.connect(new, isolation_level=None)
    app.execute("PRAGMA wal_autocheckpoint = 0")
    for sql in changes:
        app.execute(sql)
    return old, new, app


@pytest.mark.parametrize("case", sorted(CHANGES) + sorted(ON_PAGES))
def test_the_pages_both_files_share_are_left_out_and_the_counts_stay(tmp_path, case):
    changes = CHANGES[case] if case in CHANGES else ON_PAGES[case]
    old, new, app = pair_in_wal(tmp_path, changes)
    assert not changes or Path(f"{new}-wal").stat().st_size > 0
    copy = types.SimpleNamespace(path=str(old), sha256=dbfiles.sha256_file(old), reason="r", time="t")
    env = env_for(tmp_path, new)
    leaving = rowloss.leaving(env, copy, keep=True)
    assert leaving.narrowed and leaving.view is not None
    every = full(rowloss.leaving, env, copy)
    assert (leaving.rows, leaving.changed) == (every.rows, every.changed)
    assert leaving.view.rows == dbfiles.rows_of(new)
    assert leaving.view.lost == rowloss.lost_by_delta(env_for(tmp_path, old), str(new))
    leaving.view.close()
    app.close()         # the last connection: the WAL goes into the file (the ledger caches digests by sha256)
    assert leaving.view.lost == full(rowloss.lost, env_for(tmp_path, old), str(new), dbfiles.sha256_file(new))


def candidates_then_close(old, new, app):
    """rowpages.pages_differing of the live file new against the copy old, as a rollback's plan reads them (the
    app's connection still open); then the app's connection closed."""
    conn = rowloss.attached(str(old), new)
    try:
        return rowpages.pages_differing(conn, new, str(old), dbfiles.wal_mark(new))
    finally:
        conn.close()
        app.close()


def test_few_rows_are_read_where_few_pages_differ(tmp_path):
    old, new, app = pair_in_wal(tmp_path, ["UPDATE plain SET b = 'x' WHERE a = 1200"])
    among = candidates_then_close(old, new, app)
    keys_live, keys_copy, rows = among["plain"]
    assert rows == 20 + 1501 and 0 < len(keys_live) < 40 and keys_live == keys_copy
    assert among["post"][0] == set() and among["user"][0] == set()


def test_a_negative_rowid_on_a_page_that_differs_is_a_candidate_as_the_signed_key(tmp_path):
    """A rowid is a signed 64-bit integer; read unsigned from the page, -1 named no row, and a rollback's plan
    missed the row it said was leaving."""
    old, new = tmp_path / "old.db", tmp_path / "new.db"
    conn = sqlite3.connect(old, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    conn.execute("INSERT INTO t VALUES (-1, 'written'), (-9223372036854775808, 'lowest'), (3, 'c')")
    conn.close()
    shutil.copy(old, new)
    app = sqlite3.connect(new, isolation_level=None)
    app.execute("UPDATE t SET v = 'changed' WHERE id = -1")
    among = candidates_then_close(old, new, app)
    assert among is not None and among["t"][0] == {-9223372036854775808, -1, 3} == among["t"][1]


def test_a_commit_while_the_plan_reads_makes_it_compare_every_row(tmp_path, monkeypatch):
    old, new, app = pair_in_wal(tmp_path, CHANGES["inserts"])
    copy = types.SimpleNamespace(path=str(old), sha256=dbfiles.sha256_file(old), reason="r", time="t")
    real = rowpages.candidates

    def with_a_commit(*args):
        found = real(*args)
        app.execute("INSERT INTO plain VALUES (5000, 'between the pages and the rows')")
        return found

    monkeypatch.setattr(rowpages, "candidates", with_a_commit)
    leaving = rowloss.leaving(env_for(tmp_path, new), copy, keep=True)
    assert not leaving.narrowed and leaving.view is None
    app.close()
    assert leaving.rows == full(rowloss.leaving, env_for(tmp_path, new), copy).rows == {"post": 1, "plain": 2}


def test_no_wal_no_narrowing(tmp_path):
    old, new = pair(tmp_path, CHANGES["inserts"])
    run_sql(new, "PRAGMA journal_mode = DELETE")
    assert rowpages.candidates(str(new), str(old), dbfiles.wal_mark(new), {"plain": (2, 2)}) is None


APP = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("PRAGMA wal_autocheckpoint = 0")
conn.execute("INSERT INTO plain VALUES (7000, 'from the app')")
print("ready", flush=True)
sys.stdin.readline()
conn.close()
print("closed", flush=True)
"""


def test_the_plans_raw_reads_keep_its_locks_against_an_app_in_another_process(tmp_path):
    """The raw reads of the live files (the -shm's header, the pages) never close a descriptor of them: that
    would drop this process's SQLite locks, and the app's last connection, in its own process, would then
    checkpoint and remove the WAL under the plan's held connection."""
    import subprocess
    import sys
    old, new = pair(tmp_path, CHANGES["inserts"])
    run_sql(old, "PRAGMA journal_mode = DELETE")        # a backup is self-contained
    copy = types.SimpleNamespace(path=str(old), sha256=dbfiles.sha256_file(old), reason="r", time="t")
    app = subprocess.Popen([sys.executable, "-c", APP, str(new)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           text=True)
    try:
        assert app.stdout.readline().strip() == "ready"
        leaving = rowloss.leaving(env_for(tmp_path, new), copy, keep=True)
        assert leaving.narrowed and leaving.view is not None
        app.stdin.write("close\n")
        app.stdin.flush()
        assert app.stdout.readline().strip() == "closed"
    finally:
        app.wait(timeout=30)
    assert Path(f"{new}-wal").exists() and Path(f"{new}-shm").exists()
    leaving.view.stopped(new)
    assert leaving.view.at_stop == leaving.view.at_plan and reusable(leaving.view)
    assert leaving.rows == {"post": 1, "plain": 2}


def test_pages_past_the_files_end_are_read_from_the_wal(tmp_path):
    old, new, app = pair_in_wal(tmp_path, ON_PAGES["pages past the file's end"])
    mark = dbfiles.wal_mark(new)
    pages = rowpages.Pages(str(new), mark, held=True)
    assert pages.pages * pages.page_size > new.stat().st_size      # the file has not grown: the WAL holds them
    conn = rowloss.attached(str(old), new)
    try:
        among = rowpages.pages_differing(conn, new, str(old), mark)
    finally:
        conn.close()
        app.close()
    assert among is not None and among["plain"][2] == 20 + 1501 + 300 and len(among["plain"][0]) >= 300
