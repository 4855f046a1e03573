"""Putting a copy's rows back into the live database, the app running, without touching a live row.

The contract:
- `plan(env, copy_path)` reads the copy and the live database (read-only) and says what a restore would
  do: per users' table, the rows that come back (by content, see safedeploy.rowcompare: rows whose key a
  newer row took come back under a new key), the rows the live database has updated since (reported,
  never put back), and what is left out and why (a table or column the live schema lacks, a NOT NULL
  column the copy has no value for, a UNIQUE value a live row holds, a reference to a row that cannot
  come back). Bookkeeping, virtual and shadow tables are never touched. Names are compared as SQLite
  compares them (case-insensitively); columns are matched by name across schema changes (one renamed
  column is recognised by its place and type, see rowsets.pair_tables).
- `apply(env, copy_path, sha256)` does it in one `BEGIN IMMEDIATE` transaction on the live database: the
  plan is made again inside it (the rows the app wrote meanwhile count; with the copy's verified sha256 its
  digests come from the row ledger's cache, computed before the lock, and the live rows read for the check
  serve the plan too), every row is inserted with its final
  key and its references already pointing at the right rows (`INSERT OR ABORT`: a table's `ON CONFLICT
  REPLACE` cannot delete a live row), under an authorizer that refuses any UPDATE or DELETE (a trigger's
  too) outside virtual tables' shadow tables. Then, before COMMIT, every users' and bookkeeping table is
  read again: every row that was there is there with the same content, the rows added are exactly the
  rows planned, with their references to the same rows by content. Any difference: ROLLBACK, nothing
  changed, RestoreRefused naming the table and the reason. The two reads of the live database (before
  and after the inserts) are of every row's content, but where the schemas are the same only the rows
  that differ from the copy's are digested again (quick_delta), and only they are compared (look_after):
  before the inserts, only the rows off the
  pages the live file shares with the copy are compared (safedeploy.rowpages); after, every row, in C
  (safedeploy.rowdelta). So the app's writers wait for what changed, not for the whole database.
- `sql(plan)` is the same inserts as text, for review: nothing applies it.
The plan itself is made in safedeploy.rowplan.
Callers hold the env's lock. Nothing here prints.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple
from urllib.parse import quote as url_quote

from . import dbfiles, rowdelta, rowsets
from .errors import DeployError
from .rowplan import Plan, Side, TablePlan, make_plan, sides
from .rowsets import quote

__all__ = ["Plan", "RestoreRefused", "TablePlan", "apply", "plan", "sql", "sides"]

BUSY_MS = 15_000


class RestoreRefused(Exception):
    """The restore cannot be done as asked: nothing was changed. One line: the table and the reason."""


def connect(env, write: bool) -> sqlite3.Connection:
    """The live database (read-only unless write), with the copy attached later as "copy"."""
    uri = f"file:{url_quote(str(env.db))}" + ("" if write else "?mode=ro")
    conn = sqlite3.connect(uri, uri=True, timeout=BUSY_MS / 1000, isolation_level=None)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_MS}")
    return conn


def attach_copy(conn: sqlite3.Connection, copy_path: str | Path) -> None:
    conn.execute("ATTACH DATABASE ? AS copy", (f"file:{url_quote(str(copy_path))}?mode=ro",))


# -- the plan -----------------------------------------------------------------------------------------
def plan(env, copy_path: str | Path, sha256: str | None = None) -> Plan:
    """What apply() would do now (read-only). sha256: the copy's, to use the row ledger's kept digests of both
    sides when their schemas are the same (status plans every copy that holds missing rows on every look)."""
    conn = connect(env, write=False)
    try:
        attach_copy(conn, copy_path)
        known = kept_sides(env, conn, str(copy_path), sha256) if sha256 else None
        return make_plan(conn, str(copy_path), tuple(env.bookkeeping), known)
    finally:
        conn.close()


def kept_sides(env, conn: sqlite3.Connection, copy_path: str, sha256: str,
               live: dict[str, rowsets.TableRows] | None = None, copy_rows: dict[str, rowsets.TableRows] | None = None):
    """(copy, live, pairs) from the ledger's cache, or None when the schemas differ. live: the live rows as
    just read (apply's snapshot inside its transaction) instead of the ledger's; copy_rows: the copy's digests
    as already loaded (kept_copy_rows)."""
    from . import ledger
    bookkeeping = tuple(env.bookkeeping)
    mine = rowsets.read_schema(conn, "copy", bookkeeping)
    theirs = rowsets.read_schema(conn, "main", bookkeeping)
    if not mine.same_users_as(theirs):
        return None
    known = ledger.Known(id="", time="", reason="", path=copy_path, sha256=sha256)
    copy_rows = ledger.copy_rows(env, known) if copy_rows is None else copy_rows
    live_rows = ledger.live_rows(env, base=(known, copy_rows)) if live is None else live    # what differs read again
    pairs = {t.name.lower(): rowsets.pair_tables(t, twin) for t, twin in mine.users_also_in(theirs)}
    return Side(mine, copy_rows), Side(theirs, live_rows), pairs


# -- applying it ---------------------------------------------------------------------------------------
WRITES = {sqlite3.SQLITE_UPDATE: "update", sqlite3.SQLITE_DELETE: "delete"}


def guard(shadow: set[str]):
    """An authorizer: no UPDATE or DELETE of any table but virtual tables' shadow tables and sqlite_sequence."""
    def check(action: int, arg1: str | None, arg2: str | None, db: str | None, source: str | None) -> int:
        if action in WRITES and arg1 and arg1.lower() not in shadow and arg1.lower() != "sqlite_sequence":
            return sqlite3.SQLITE_DENY
        return sqlite3.SQLITE_OK
    return check


@dataclass
class Applied:
    """A plan put back and committed: rows restored and re-keyed per table."""
    plan: Plan
    restored: dict[str, int]
    rekeyed: dict[str, int]


def apply(env, copy_path: str | Path, sha256: str | None = None) -> Applied:
    """Put the rows back (see the module's contract); RestoreRefused when it cannot, nothing changed.
    sha256: the copy's (its manifest's, verified), so the copy's digests come from the row ledger's cache
    and, the schemas being the same, the plan uses the live rows read for the check: inside the write
    transaction the live database is read twice (before and after the inserts, look_before and look_after), the copy only
    where it differs."""
    bookkeeping = tuple(env.bookkeeping)
    copy_rows = kept_copy_rows(env, copy_path, sha256)      # read before the lock, when not kept yet
    conn = connect(env, write=True)
    try:
        attach_copy(conn, copy_path)
        conn.execute("BEGIN IMMEDIATE")
        try:
            seen = look_before(conn, env, copy_path, copy_rows)
            known = kept_sides(env, conn, str(copy_path), sha256, seen.live, copy_rows) if sha256 else None
            the_plan = make_plan(conn, str(copy_path), bookkeeping, known)
            if the_plan.refused and not the_plan.total:
                raise RestoreRefused("; ".join(the_plan.refused.values()))
            shadow = {t.name.lower() for t in rowsets.read_schema(conn, "main", bookkeeping).of_kind(rowsets.SHADOW)}
            conn.set_authorizer(guard(shadow))
            rowids = insert_all(conn, the_plan)
            conn.set_authorizer(None)
            before, after = look_after(conn, env, copy_path, copy_rows, seen)
            verify(conn, bookkeeping, before, after, the_plan, rowids)
            conn.execute("COMMIT")
        except BaseException:
            conn.set_authorizer(None)
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    finally:
        conn.close()
    return Applied(the_plan, {t.table: len(t.rows) for t in the_plan.tables if t.rows},
                   {t.table: len(t.rekeyed) for t in the_plan.tables if t.rekeyed})


def insert_all(conn: sqlite3.Connection, the_plan: Plan) -> dict[str, list[int]]:
    """Insert every planned row; {table: the rowid of each row inserted, in plan order}."""
    rowids: dict[str, list[int]] = {}
    for t in the_plan.tables:
        for row in t.rows:
            cols = list(row)
            try:
                cur = conn.execute(f"INSERT OR ABORT INTO main.{quote(t.table)} ({', '.join(quote(c) for c in cols)}) "
                                   f"VALUES ({', '.join('?' * len(cols))})", [row[c] for c in cols])
            except sqlite3.DatabaseError as exc:
                why = str(exc)
                if "not authorized" in why:
                    why = "a trigger would update or delete live rows when a row is inserted"
                raise RestoreRefused(f"{t.table}: {why}; nothing was changed") from None
            rowids.setdefault(t.table, []).append(cur.lastrowid or 0)   # 0: a WITHOUT ROWID table
    return rowids


def kept_copy_rows(env, copy_path: str | Path, sha256: str | None) -> dict[str, rowsets.TableRows] | None:
    """The copy's digests (the row ledger's, computed and kept now if they are not), or None without a sha256."""
    if not sha256:
        return None
    from . import ledger
    return ledger.copy_rows(env, ledger.Known(id="", time="", reason="", path=str(copy_path), sha256=sha256))


def quick_delta(conn: sqlite3.Connection, env, copy_path: str | Path, copy_rows: dict[str, rowsets.TableRows] | None,
                narrow: bool) -> dict[str, rowdelta.TableDelta] | None:
    """The live users' tables' rows that differ from the copy's, as conn sees them (its own inserts included):
    with the copy's kept digests, every live row's digest follows (rowdelta.rows_after), the same as reading
    every row. narrow: before any insert of this transaction, so the raw pages are what it sees: only the rows
    off the pages the two files share are compared (safedeploy.rowpages; a checkpoint by another connection
    while they are read: every row is, in C). None where this cannot stand for reading every row (then every
    row is read)."""
    if copy_rows is None:
        return None
    bookkeeping = tuple(env.bookkeeping)
    try:
        found = (rowdelta.narrowed(conn, env.db, str(copy_path), bookkeeping, dbfiles.wal_mark(env.db), "main", "copy")
                 if narrow else rowdelta.delta(conn, "main", "copy", bookkeeping))
    except sqlite3.Error:
        return None
    return found if found is not None and set(found) == set(copy_rows) else None


class Before(NamedTuple):
    """What the check before the inserts saw (look_before)."""
    live: dict[str, rowsets.TableRows]          # every live users' row's digest: the plan uses them
    counters: dict[str, Counter]                # what look_after compares with (users' tables: unless delta)
    delta: dict[str, rowdelta.TableDelta] | None    # the rows that differ from the copy's, or None: every row read


def look_before(conn: sqlite3.Connection, env, copy_path: str | Path,
                copy_rows: dict[str, rowsets.TableRows] | None) -> Before:
    """The check before the inserts (see Before). With a delta (quick_delta), the users' tables' counters are
    left to look_after, which compares only the rows either delta names."""
    bookkeeping = tuple(env.bookkeeping)
    found = quick_delta(conn, env, copy_path, copy_rows, True)
    live = rowdelta.rows_after(copy_rows, found) if found is not None and copy_rows is not None else None
    if live is None:
        return Before(*snapshot_rows(conn, bookkeeping), None)
    return Before(live, bookkeeping_counters(conn, bookkeeping), found)


def look_after(conn: sqlite3.Connection, env, copy_path: str | Path, copy_rows: dict[str, rowsets.TableRows] | None,
               before: Before) -> tuple[dict[str, Counter], dict[str, Counter]]:
    """(the counters before the inserts, after them), per users' and bookkeeping table. Where both checks have a
    delta from the copy, a users' table's counters hold only the rows either delta names (the copy's rows
    neither names are live, unchanged, on both sides: they cancel, so what went and what was added are the
    same as between counters of every row); else every live row is read again."""
    live, counters, before_delta = before.live, before.counters, before.delta
    bookkeeping = tuple(env.bookkeeping)
    after_delta = quick_delta(conn, env, copy_path, copy_rows, False) if before_delta is not None else None
    if before_delta is not None and after_delta is not None and copy_rows is not None:
        then, now = rowdelta.counters_between(copy_rows, before_delta, after_delta)
        return {**counters, **then}, {**bookkeeping_counters(conn, bookkeeping), **now}
    if before_delta is not None:
        counters = {**counters, **{name: Counter(rows.digests) for name, rows in live.items()}}
    return counters, snapshot(conn, bookkeeping)


def snapshot(conn: sqlite3.Connection, bookkeeping: tuple[str, ...]) -> dict[str, Counter]:
    """Every users' and bookkeeping table's rows, as digests (full shape), sqlite_sequence aside."""
    return snapshot_rows(conn, bookkeeping)[1]


def snapshot_rows(conn: sqlite3.Connection, bookkeeping: tuple[str, ...]
                  ) -> tuple[dict[str, rowsets.TableRows], dict[str, Counter]]:
    """The users' tables' rows as read (full shape), and snapshot()'s counters of them: one read."""
    schema = rowsets.read_schema(conn, "main", bookkeeping)
    users = rowsets.digests(conn, schema, "main")
    return users, {**{name: Counter(rows.digests) for name, rows in users.items()}, **bookkeeping_counters(conn, bookkeeping)}


def bookkeeping_counters(conn: sqlite3.Connection, bookkeeping: tuple[str, ...]) -> dict[str, Counter]:
    """The bookkeeping tables' rows as digests, sqlite_sequence aside (read whole: a framework's few rows)."""
    schema = rowsets.read_schema(conn, "main", bookkeeping)
    return {t.name.lower(): Counter(rowsets.digest(r) for r in conn.execute(f"SELECT * FROM main.{quote(t.name)}"))
            for t in schema.of_kind(rowsets.BOOKKEEPING) if t.name.lower() != "sqlite_sequence"}


def verify(conn: sqlite3.Connection, bookkeeping: tuple[str, ...], before: dict[str, Counter],
           after: dict[str, Counter], the_plan: Plan, rowids: dict[str, list[int]]) -> None:
    """Before COMMIT: every live row still there with its content; the rows added are the rows planned, with
    their references to the same rows (by content). before, after: the counters look_after gives."""
    expected = expected_digests(conn, the_plan, bookkeeping, rowids)
    for name, rows in before.items():
        gone = rows - after.get(name, Counter())
        if gone:
            raise RestoreRefused(f"{name}: {sum(gone.values())} live row(s) would change or go (a trigger or a "
                                 "conflict clause); ROLLBACK, nothing was changed")
    for name, rows in after.items():
        added = rows - before.get(name, Counter())
        want = expected.get(name, Counter())
        if added != want:
            raise RestoreRefused(f"{name}: the rows added ({sum(added.values())}) are not the rows planned "
                                 f"({sum(want.values())}) with their references; ROLLBACK, nothing was changed")


def expected_digests(conn: sqlite3.Connection, the_plan: Plan, bookkeeping: tuple[str, ...],
                     rowids: dict[str, list[int]]) -> dict[str, Counter]:
    """What the restored rows' digests must be live: the values planned, references through the live rows they
    were resolved to (their identity, see rowsets.identity_columns). A column the plan does not set (a live
    column the copy lacks) holds what its DEFAULT gave: read back from the row, it is not a live row's."""
    schema = rowsets.read_schema(conn, "main", bookkeeping)
    out: dict[str, Counter] = {}
    lookups: dict[tuple, dict] = {}
    for t in the_plan.tables:
        table = schema.get(t.table)
        if table is None or not t.rows:
            continue
        shape = rowsets.full_shape(table)
        counter = out.setdefault(t.table.lower(), Counter())
        for row, rowid in zip(t.rows, rowids.get(t.table, [])):
            unset = [c for c in shape.own if c not in row]
            filled = dict(row)
            if unset:
                got = conn.execute(f"SELECT {', '.join(quote(c) for c in unset)} FROM main.{quote(table.name)} "
                                   "WHERE rowid = ?", (rowid,)).fetchone() or [None] * len(unset)
                filled.update(zip(unset, got))
            values: list[object] = [table.name.lower(), *[filled.get(c) for c in shape.own]]
            for r in shape.refs:
                value = tuple(filled.get(c) for c in r.columns)
                if all(v is None for v in value):
                    values.append(None)
                    continue
                key = (r.parent.lower(), r.parent_columns)
                if key not in lookups:
                    parent = schema.get(r.parent)
                    lookups[key] = rowsets.parent_lookup(conn, "main", parent, r.parent_columns,
                                                         rowsets.identity_columns(parent, parent.own)) if parent else {}
                lookup = lookups[key]
                values.append(("->", lookup[value]) if value in lookup else ("dangling", value))
            counter[rowsets.digest(rowsets.flatten(values))] += 1
    return out


# -- for review ----------------------------------------------------------------------------------------
def sql(the_plan: Plan) -> list[str]:
    """The inserts of the plan as SQL text, for review only (the tool applies them itself, verified)."""
    lines = [f"-- the rows of {the_plan.copy} the live database lacks, as `backup.py ENV --restore-rows` would put "
             "them back: for review only; it applies them itself, in one transaction verified before COMMIT"]
    for table, why in sorted(the_plan.refused.items()):
        lines.append(f"-- left out: {why}")
    for t in the_plan.tables:
        for why, n in sorted(t.left_out.items()):
            lines.append(f"-- {t.table}: {n} row(s) left out: {why}")
        if t.changed:
            lines.append(f"-- {t.table}: {t.changed} row(s) are live under the same key, updated since: not put back")
        for old, new in sorted(t.rekeyed.items(), key=lambda kv: str(kv[0])):
            lines.append(f"-- {t.table}: the row with key {old} comes back as {new} (a newer row took {old})")
        for row in t.rows:
            cols = list(row)
            values = ", ".join(sql_literal(kind_of(row[c]), row[c]) for c in cols)
            lines.append(f"INSERT OR ABORT INTO {sql_name(t.table)} ({', '.join(sql_name(c) for c in cols)}) "
                         f"VALUES ({values});")
    return lines


def kind_of(value: object) -> str:
    return "blob" if isinstance(value, (bytes, memoryview)) else "text"


def sql_name(name):
    """An identifier, double-quoted. The schema is the app's, but a name with a control character
    in it would be the one way left to break a line: refused, never written."""
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise DeployError(f"a table or column name holds a control character ({name!r}): refused; "
                          "export those rows by hand")
    return '"' + name.replace('"', '""') + '"'


def sql_literal(kind, value):
    """value (SQLite type kind) as an SQL literal on one line, which no value can end early.

    Text: 'pieces' with '' for a quote, and every control character (newline, CR, NUL, ...) as
    char(N) between them: 'my day' || char(10) || 'DELETE ...' stays one literal on one line. Text
    that is not UTF-8 is written as CAST(X'...' AS TEXT). Blobs are X'hex'; numbers as SQLite reads
    them back (an infinite real as 9e999); NULL."""
    if value is None:
        return "NULL"
    if isinstance(value, (int, float)):
        return number_literal(value)
    if kind == "blob":
        return f"X'{bytes(value).hex().upper()}'"
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return f"CAST(X'{value.hex().upper()}' AS TEXT)"
    return text_literal(value)


def number_literal(value: int | float) -> str:
    if isinstance(value, int):
        return str(value)
    if value != value:
        return "NULL"           # SQLite stores a NaN as NULL anyway
    if value in (float("inf"), float("-inf")):
        return "9e999" if value > 0 else "-9e999"
    return repr(value)


def text_literal(value: str) -> str:
    """'pieces' with '' for a quote, each control character as char(N) between them."""
    pieces, plain = [], ""
    for ch in value:
        if ord(ch) < 32 or ord(ch) == 127:
            if plain:
                pieces.append("'" + plain.replace("'", "''") + "'")
                plain = ""
            pieces.append(f"char({ord(ch)})")
        else:
            plain += ch
    if plain or not pieces:
        pieces.append("'" + plain.replace("'", "''") + "'")
    return " || ".join(pieces)
