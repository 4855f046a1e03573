"""Two databases' rows compared where they differ: what a rollback's plan and its seal count, in a time
that grows with what changed, not with the file.

Two versions of one database (the live file and a copy of it made earlier, or the pre-rollback save and
the restored file) share almost every row: same key, same columns. SQLite finds the rows whose key or
content differ in one read of each file, in C (`differing_keys`); only those rows are digested
(safedeploy.rowsets), and the comparison by content (safedeploy.rowcompare) runs on them alone. Rows
identical under the same key on both sides have the same digest and cancel out; so the counts are those
of the comparison of every row (see `same_digest_when_equal` for when that holds).

The contract:
- `delta(conn, a, b, bookkeeping)`: with both files attached to conn (read-only), per users' table the rows
  of each side that are not identical under the same key on the other side, as TableRows, and the largest
  key identical on both (rowcompare's rule 3); or None where this cannot stand for the full comparison
  (a schema that differs, a natural key, a foreign key over several columns): the caller then digests
  every row, as before.
- `narrowed(conn, live, copy, bookkeeping, mark, live_as, copy_as)`: delta() of the live database against the
  copy, the rows compared first narrowed by the pages the two files share (safedeploy.rowpages) when the live
  database's WalMark after the pages were read is still mark (taken before conn's read transaction began:
  nothing was committed in between); else every row compared, in the same transaction.
- `rows_after(base, found)`: side a's full rows, from side b's full rows (base: every row, as digested by
  rowsets.digests) and the delta: b's rows with a key the delta names on either side dropped, a's rows of
  the delta added, in key order. The same as digesting every row of side a (what the ledger keeps of the
  live database, from a copy's kept digests: see safedeploy.ledger.live_rows).
- `counters_between(base, d1, d2)`: for two deltas of side a against the same side b (base: b's full rows),
  side a's rows at each as counters of digests, holding only the rows either delta names: b's rows that
  neither names are on side a unchanged at both, so what one counter has that the other lacks is the same
  as between counters of every row.
- Nothing here writes to a database or prints.
"""

from __future__ import annotations

import bisect
import heapq
import json
import sqlite3
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from . import dbfiles, rowpages, rowsets
from .rowsets import Schema, Table, TableRows, quote


@dataclass
class TableDelta:
    """One table's rows that differ between two sides, compared by key and content."""
    a: TableRows                 # rows of side a not identical (same key, same content) on side b
    b: TableRows                 # and the other way round
    same_top: int | None         # the largest key whose row is identical on both sides

    def keys(self) -> set[int]:
        """The keys the delta names, on either side."""
        return set(self.a.keys) | set(self.b.keys)


def same_digest_when_equal(table: Table, other: Table) -> bool:
    """Whether a row stored identically (same key, same values, same types) on both sides has the same digest
    on both: the digest is of the row's own columns and its parents' identity, so the tables must have the
    same shape and the same declared types (SQL compares 5 and 5.0, or '5' and 5, across two affinities as
    equal), a rowid key (a natural key's digest is of its key columns: fine, but rowcompare's classify
    then needs every key), and foreign keys of one column each (a parent that differs is then looked up by
    that column: see `parent_keys_differing`)."""
    return (rowsets.same_shape(table, other) and rowid_keyed(table) and rowid_keyed(other)
            and [t.upper() for t in table.types] == [t.upper() for t in other.types]
            and all(len(r.columns) == 1 for r in table.refs) and all(len(r.columns) == 1 for r in other.refs))


def rowid_keyed(table: Table) -> bool:
    """The table's key is its rowid (or an alias of it): an integer on every row, never NULL. Not a table with a
    column of its own named rowid (or oid, _rowid_): "rowid" in SQL then names that column."""
    if table.without_rowid or any(c.lower() in ("rowid", "oid", "_rowid_") for c in table.columns if c != table.surrogate):
        return False
    return bool(table.surrogate is None and not table.key or table.alias)


def key_of(table: Table) -> str:
    return quote(table.surrogate) if table.surrogate else "rowid"


def mixes_numbers(declared: str) -> bool:
    """Whether a column of this declared type can hold 1 and 1.0 side by side (SQLite finds them equal; their
    digests differ): only a column of BLOB affinity (no type, or a type naming BLOB). INTEGER and NUMERIC
    affinity store an integral real as an integer, REAL affinity an integer as a real, TEXT affinity a number
    as text (SQLite's rules for a column's affinity, in their order)."""
    t = declared.upper()
    if "INT" in t or any(k in t for k in ("CHAR", "CLOB", "TEXT")):
        return False
    return "BLOB" in t or not t


def mixed_checks(c: str) -> str:
    """What else tells two values of a column of no affinity apart for the digest: their types (1 and 1.0), and
    the sign of a zero (-0.0 and 0.0 are equal to SQL, and printed alike; atan2 tells them apart: where SQLite
    has no math functions, the query fails and the caller compares every row)."""
    return (f" OR typeof(x.{c}) != typeof(y.{c})"
            f" OR (typeof(x.{c}) = 'real' AND x.{c} = 0 AND atan2(x.{c}, -1) IS NOT atan2(y.{c}, -1))")


def differing_keys(conn: sqlite3.Connection, table: Table, a: str, b: str,
                   among: set[int] | None = None) -> tuple[set[int], set[int]]:
    """(keys of the table on side a whose row side b holds with another value in a column, keys side b lacks).
    Values are compared bytewise and by type: 1 and 1.0, 'A' and 'a' under NOCASE, '1' and x'31' all differ.
    among: only these keys of side a can differ (safedeploy.rowpages); None: every key."""
    k = key_of(table)
    q = quote(table.name)
    checks = " OR ".join(f"x.{quote(c)} IS NOT y.{quote(c)} COLLATE BINARY"
                         + (mixed_checks(quote(c)) if mixes_numbers(kind) else "")
                         for c, kind in zip(table.columns, table.types) if c != table.surrogate)
    narrow, args = among_clause(k, among)
    where = f"(y.{k} IS NULL" + (f" OR {checks})" if checks else ")") + narrow
    changed: set[int] = set()
    only: set[int] = set()
    for key, missing in conn.execute(f"SELECT x.{k}, y.{k} IS NULL FROM {a}.{q} AS x LEFT JOIN {b}.{q} AS y "
                                     f"ON y.{k} = x.{k} WHERE {where}", args):
        (only if missing else changed).add(key)
    return changed, only


def in_json(expr: str, values: list) -> tuple[str, tuple]:
    """(SQL that holds where expr is one of values, its argument): the values passed as one JSON array, so any
    number of them is one parameter."""
    return f"{expr} IN (SELECT value FROM json_each(?))", (json.dumps(values),)


def among_clause(k: str, among: set[int] | None) -> tuple[str, tuple]:
    """(the SQL that keeps only side x's keys among the given ones, its argument); ("", ()) for every key."""
    if among is None:
        return "", ()
    sql, args = in_json(f"x.{k}", sorted(among))
    return f" AND {sql}", args


def only_keys(conn: sqlite3.Connection, table: Table, a: str, b: str, among: set[int] | None = None) -> list[int]:
    """Keys of side a that side b does not have (among: only these keys of side a can be missing on side b)."""
    k, q = key_of(table), quote(table.name)
    narrow, args = among_clause(k, among)
    return [r[0] for r in conn.execute(f"SELECT x.{k} FROM {a}.{q} AS x WHERE NOT EXISTS "
                                       f"(SELECT 1 FROM {b}.{q} AS y WHERE y.{k} = x.{k}){narrow}", args)]


def parent_keys_differing(lookup_a: dict[tuple, int], lookup_b: dict[tuple, int]) -> set:
    """The parent key values whose row is not the same parent on both sides (changed, or on one side only):
    a child row pointing at one of them has another digest on each side although it is stored identically."""
    return {k[0] for k in set(lookup_a) | set(lookup_b) if lookup_a.get(k) != lookup_b.get(k)}


def keys_pointing_at(conn: sqlite3.Connection, table: Table, side: str, column: str, values: set) -> list[int]:
    """The keys of the rows whose column holds one of values (a few more at most: 1 and 1.0 are one value to
    SQL; a blob's bytes are matched by hex, which a text of the same bytes matches too)."""
    if not values:
        return []
    blobs = [v for v in values if isinstance(v, bytes)]
    where, args = in_json(quote(column), sorted((v for v in values if not isinstance(v, bytes)), key=repr))
    if blobs:
        by_hex, hex_args = in_json(f"hex({quote(column)})", sorted(b.hex().upper() for b in blobs))
        where, args = f"{where} OR {by_hex}", args + hex_args
    return [r[0] for r in conn.execute(f"SELECT {key_of(table)} FROM {side}.{quote(table.name)} WHERE {where}", args)]


def top_same(conn: sqlite3.Connection, table: Table, side: str, differing: set[int]) -> int | None:
    """The largest key of side not in differing (so identical on the other side)."""
    for (key,) in conn.execute(f"SELECT {key_of(table)} FROM {side}.{quote(table.name)} ORDER BY 1 DESC"):
        if key not in differing:
            return key
    return None


def read_keys(conn: sqlite3.Connection, side: str, table: Table, keys: list[int],
              parents: dict[tuple[str, tuple], dict]) -> TableRows:
    """The digests of the rows of table with these keys (rowsets.read_rows, on a few rows)."""
    if not keys:
        return TableRows()
    return rowsets.read_rows(conn, side, table, rowsets.full_shape(table), parents,
                             *in_json(key_of(table), keys))


def parents_of(conn: sqlite3.Connection, side: str, schema: Schema, tables: list[Table]) -> dict[tuple[str, tuple], dict]:
    parents: dict[tuple[str, tuple], dict] = {}
    for table in tables:
        for r in table.refs:
            parent = schema.get(r.parent)
            wanted = (r.parent.lower(), r.parent_columns)
            if parent is not None and parent.kind == rowsets.USERS and wanted not in parents:
                parents[wanted] = rowsets.parent_lookup(conn, side, parent, r.parent_columns,
                                                        rowsets.identity_columns(parent, parent.own))
    return parents


def delta(conn: sqlite3.Connection, a: str, b: str, bookkeeping: tuple[str, ...],
          among: dict[str, tuple[set[int], set[int], int]] | None = None) -> dict[str, TableDelta] | None:
    """See the module's contract. a and b: the names the two files are attached under. among: per table (lower
    case), the only keys of each side whose rows can differ (safedeploy.rowpages.candidates, for the same two
    snapshots); a table it leaves out is compared whole."""
    schema_a = rowsets.read_schema(conn, a, bookkeeping)
    schema_b = rowsets.read_schema(conn, b, bookkeeping)
    users_a, users_b = schema_a.users, schema_b.users
    if {t.name.lower() for t in users_a} != {t.name.lower() for t in users_b}:
        return None
    for t in users_a:           # every table of a is in b (the names are the same): Schema.table
        if not same_digest_when_equal(t, schema_b.table(t.name)):
            return None
    parents_a, parents_b = parents_of(conn, a, schema_a, users_a), parents_of(conn, b, schema_b, users_b)
    out: dict[str, TableDelta] = {}
    for t in users_a:
        other = schema_b.table(t.name)
        narrow_a, narrow_b, _ = among.get(t.name.lower(), (None, None, 0)) if among is not None else (None, None, 0)
        changed, only_a = differing_keys(conn, t, a, b, narrow_a)
        keys_a, keys_b = changed | only_a, changed | set(only_keys(conn, other, b, a, narrow_b))
        for r in t.refs:
            bad = parent_keys_differing(parents_a.get((r.parent.lower(), r.parent_columns), {}),
                                        parents_b.get((r.parent.lower(), r.parent_columns), {}))
            keys_a |= set(keys_pointing_at(conn, t, a, r.columns[0], bad))
            keys_b |= set(keys_pointing_at(conn, other, b, r.columns[0], bad))
        rows_a = read_keys(conn, a, t, sorted(keys_a), parents_a)
        rows_b = read_keys(conn, b, other, sorted(keys_b), parents_b)
        out[t.name.lower()] = TableDelta(rows_a, rows_b, top_same(conn, t, a, keys_a))
    return out


def narrowed(conn: sqlite3.Connection, live: Path, copy: str, bookkeeping: tuple[str, ...], mark: dbfiles.WalMark,
             live_as: str = "live", copy_as: str = "main") -> dict[str, TableDelta] | None:
    """See the module's contract."""
    among = rowpages.pages_differing(conn, live, copy, mark, live_as, copy_as)
    if among is not None and dbfiles.wal_mark(live) != mark:
        among = None            # a commit while the pages were read: they may be a mixture
    return delta(conn, live_as, copy_as, bookkeeping, among)


def rows_after(base: dict[str, TableRows], found: dict[str, TableDelta]) -> dict[str, TableRows] | None:
    """See the module's contract; None when the two name different tables. base's keys are in key order (a
    rowid table's rows as read); the rows of the delta are merged in (no list of pairs the size of the table)."""
    if set(base) != set(found):
        return None
    out: dict[str, TableRows] = {}
    for name, d in found.items():
        rows = base[name]
        drop = d.keys()
        if drop:
            at = [i for i, k in enumerate(rows.keys) if k not in drop]
            keys, digests = [rows.keys[i] for i in at], [rows.digests[i] for i in at]
        else:
            keys, digests = list(rows.keys), list(rows.digests)
        if d.a.keys:
            merged = heapq.merge(zip(keys, digests), sorted(zip(d.a.keys, d.a.digests)), key=lambda kg: kg[0])
            keys, digests = [], []
            for k, g in merged:
                keys.append(k)
                digests.append(g)
        out[name] = TableRows(keys, digests, rows.ordered)
    return out


def counters_between(base: dict[str, TableRows], d1: dict[str, TableDelta], d2: dict[str, TableDelta]
                     ) -> tuple[dict[str, Counter], dict[str, Counter]]:
    """See the module's contract. base's keys are in key order (a rowid table's rows as read)."""
    then: dict[str, Counter] = {}
    now: dict[str, Counter] = {}
    for name, rows in base.items():
        k1, k2 = d1[name].keys(), d2[name].keys()
        held: dict[int, int] = {}           # base's digest of each key either delta names
        for k in k1 | k2:
            i = bisect.bisect_left(rows.keys, k)
            if i < len(rows.keys) and rows.keys[i] == k:
                held[k] = rows.digests[i]
        then[name] = Counter(g for k, g in held.items() if k not in k1) + Counter(d1[name].a.digests)
        now[name] = Counter(g for k, g in held.items() if k not in k2) + Counter(d2[name].a.digests)
    return then, now
