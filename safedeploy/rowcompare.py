"""One copy against the live database, by content: which users' rows of the copy the live database
lacks, and which of those are the same row updated since (same key) rather than a row gone.

The contract: `compare(copy_rows, live_rows, ...)` is pure (digests in, counts and row keys out) for
rows found nowhere live; `classify()` then looks at the rows whose key the live table still has, with
both files attached to one read-only connection, and decides for each, by the rules below, whether the
live row is that row updated (reported as `changed`: never put back, the live version stays) or another
row that took its key (the copy's row is `missing`: it comes back under a new key):

1. a natural key (a text or composite PRIMARY KEY) names one thing: same key, same row, updated;
2. (AUTOINCREMENT is no rule: a restored older copy takes its sqlite_sequence back with it, so the keys
   handed out after the copy are handed out again to other rows; rules 3-5 decide as for a plain rowid)
3. SQLite gives a new row the largest key plus one, so a key is taken again only above every row that
   survived: a key below a row that is identical in both is updated;
4. a UNIQUE column (or set) with the same value in both rows: updated;
5. more than half of the row's own columns that hold a value in either row are equal: updated; else
   another row. (Half is not enough: in a table of a text and its creation time, a row written in the
   same second under a key a rollback freed would pass for the lost row updated, and stay lost. A row
   that was really updated in one of two columns comes back beside its new version: a duplicate the
   operator sees, never a row gone without a word.)
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from dataclasses import dataclass, field

from .rowsets import Pairing, Table, TableRows, natural_key, quote


@dataclass
class TableDiff:
    """One table of one copy against live: the copy's row keys (indexes into its TableRows) by verdict."""
    missing: list[int] = field(default_factory=list)       # not live in any form: they come back
    changed: list[int] = field(default_factory=list)       # live under the same key, updated since
    candidates: list[int] = field(default_factory=list)    # key live, content not: until classify() decides


def compare(copy_rows: TableRows, live_rows: TableRows | None) -> TableDiff:
    """The copy's rows whose content no live row has (as many times as the copy has it), split by whether
    their key is live (candidates for classify) or not (missing)."""
    diff = TableDiff()
    if live_rows is None:
        diff.missing = list(range(len(copy_rows.digests)))
        return diff
    left = Counter(live_rows.digests)
    live_keys = set(live_rows.keys)
    for i, d in enumerate(copy_rows.digests):
        if left[d] > 0:
            left[d] -= 1
        elif copy_rows.keys[i] in live_keys:
            diff.candidates.append(i)
        else:
            diff.missing.append(i)
    return diff


def survivor_key(copy_rows: TableRows, live_rows: TableRows) -> int | None:
    """The largest key whose row is identical (same key, same content) in the copy and live (rule 3)."""
    live = dict(zip(live_rows.keys, live_rows.digests))
    same = [k for k, d in zip(copy_rows.keys, copy_rows.digests) if live.get(k) == d]
    return max(same) if same else None


def classify(conn: sqlite3.Connection, copy_table: Table, live_table: Table, pairing: Pairing,
             copy_rows: TableRows, live_rows: TableRows, diff: TableDiff, copy_db: str = "copy",
             live_db: str = "main", same_top: int | None = None) -> TableDiff:
    """Decide the candidates of diff (see the module's rules); returns diff with them moved. A missing row
    whose UNIQUE value a live row holds under another key is that row too (re-keyed, and updated): changed.
    same_top: the largest key identical on both sides among rows the caller left out (rule 3)."""
    if diff.missing and copy_table.unique:
        held = unique_held(conn, copy_table, live_table, pairing, [copy_rows.keys[i] for i in diff.missing],
                           copy_db, live_db)
        diff.changed += [i for i in diff.missing if copy_rows.keys[i] in held]
        diff.missing = [i for i in diff.missing if copy_rows.keys[i] not in held]
    if not diff.candidates:
        return diff
    if natural_key(copy_table):
        diff.changed += diff.candidates
        diff.candidates = []
        return diff
    highest = survivor_key(copy_rows, live_rows)
    if same_top is not None and (highest is None or same_top > highest):
        highest = same_top      # rows left out of copy_rows and live_rows as identical (safedeploy.rowdelta)
    rest: list[int] = []
    for i in diff.candidates:
        key = copy_rows.keys[i]
        (diff.changed if highest is not None and key < highest else rest).append(i)
    if rest:
        values = row_pairs(conn, copy_table, live_table, pairing, [copy_rows.keys[i] for i in rest], copy_db, live_db)
        for i in rest:
            pair = values.get(copy_rows.keys[i])
            (diff.changed if pair and same_row(copy_table, pairing, *pair) else diff.missing).append(i)
    diff.candidates = []
    return diff


def row_pairs(conn: sqlite3.Connection, copy_table: Table, live_table: Table, pairing: Pairing, keys: list[int],
              copy_db: str, live_db: str) -> dict[int, tuple[dict, dict]]:
    """{key: (the copy's row, the live row)} as {copy column name: value}, for rowid-keyed tables."""
    copy_cols = [c for c, _ in pairing.columns]
    live_cols = [twin for _, twin in pairing.columns]
    key_c = quote(copy_table.surrogate) if copy_table.surrogate else "rowid"
    key_l = quote(live_table.surrogate) if live_table.surrogate else "rowid"
    found: dict[int, tuple[dict, dict]] = {}
    for start in range(0, len(keys), 500):
        chunk = keys[start:start + 500]
        marks = ", ".join("?" * len(chunk))
        mine = {r[0]: dict(zip(copy_cols, r[1:])) for r in conn.execute(
            f"SELECT {key_c}, {', '.join(quote(c) for c in copy_cols)} FROM {copy_db}.{quote(copy_table.name)} "
            f"WHERE {key_c} IN ({marks})", chunk)}
        theirs = {r[0]: dict(zip(copy_cols, r[1:])) for r in conn.execute(
            f"SELECT {key_l}, {', '.join(quote(c) for c in live_cols)} FROM {live_db}.{quote(live_table.name)} "
            f"WHERE {key_l} IN ({marks})", chunk)}
        for k in chunk:
            if k in mine and k in theirs:
                found[k] = (mine[k], theirs[k])
    return found


def same_row(table: Table, pairing: Pairing, mine: dict, theirs: dict) -> bool:
    """Rules 4 and 5 for one pair of rows with the same key."""
    for cols in table.unique:
        values = [mine.get(c) for c in cols]
        if all(v is not None for v in values) and values == [theirs.get(c) for c in cols]:
            return True
    own = [c for c in pairing.copy.own]
    if not own:
        return True         # nothing but the key and references: the same row, its references moved
    told = [c for c in own if mine.get(c) is not None or theirs.get(c) is not None]   # NULL in both says nothing
    equal = sum(1 for c in told if mine.get(c) == theirs.get(c) and type(mine.get(c)) is type(theirs.get(c)))
    return equal * 2 > len(told)


def unique_held(conn: sqlite3.Connection, copy_table: Table, live_table: Table, pairing: Pairing, keys: list[int],
                copy_db: str, live_db: str) -> dict[int, int]:
    """{copy key: live key} for the rows (of keys) whose UNIQUE column set has the same values in a live row."""
    if rowsets_natural(copy_table):
        return {}
    names = dict(pairing.columns)
    key_c = quote(copy_table.surrogate) if copy_table.surrogate else "rowid"
    key_l = quote(live_table.surrogate) if live_table.surrogate else "rowid"
    found: dict[int, int] = {}
    for cols in copy_table.unique:
        if not all(c in names for c in cols):
            continue
        on = " AND ".join(f"l.{quote(names[c])} = c.{quote(c)}" for c in cols)
        for start in range(0, len(keys), 500):
            chunk = [k for k in keys[start:start + 500] if k not in found]
            if not chunk:
                continue
            for ck, lk in conn.execute(f"SELECT c.{key_c}, l.{key_l} FROM {copy_db}.{quote(copy_table.name)} AS c "
                                       f"JOIN {live_db}.{quote(live_table.name)} AS l ON {on} "
                                       f"WHERE c.{key_c} IN ({', '.join('?' * len(chunk))})", chunk):
                found[ck] = lk
    return found


def rowsets_natural(table: Table) -> bool:
    return natural_key(table)
