"""The plan of a restore of rows (see safedeploy.rowrestore's contract): which of a copy's rows the live
database lacks and how each goes in (its final key, its references resolved to live rows by content), and
what is left out and why. Pure reads over one connection with the copy attached as "copy"; nothing here
writes or prints.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field

from . import rowcompare, rowdelta, rowsets
from .rowsets import Pairing, Schema, Table, TableRows, quote


@dataclass
class TablePlan:
    """The rows of one table to put back: their final values and digests, and what is left out."""
    table: str                                  # the live table's name
    rows: list[dict] = field(default_factory=list)       # {live column: value}, keys and references final
    digests: list[int] = field(default_factory=list)     # what each row's digest must be once in
    rekeyed: dict[object, object] = field(default_factory=dict)   # old key -> new key
    changed: int = 0                            # rows updated live since the copy: reported only
    left_out: dict[str, int] = field(default_factory=dict)        # why -> rows


@dataclass
class Plan:
    """Every table's rows to put back from one copy, in insert order, and what cannot come back."""
    copy: str
    tables: list[TablePlan] = field(default_factory=list)        # in insert order (parents first)
    refused: dict[str, str] = field(default_factory=dict)       # table -> why none of its rows can come back
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(len(t.rows) for t in self.tables)

    @property
    def left_out_total(self) -> int:
        return sum(sum(t.left_out.values()) for t in self.tables)


@dataclass
class Side:
    """One database as the plan sees it."""
    schema: Schema
    rows: dict[str, TableRows]


def sides(conn: sqlite3.Connection, bookkeeping: tuple[str, ...]) -> tuple[Side, Side, dict[str, Pairing]]:
    mine = rowsets.read_schema(conn, "copy", bookkeeping)
    theirs = rowsets.read_schema(conn, "main", bookkeeping)
    pairs = {t.name.lower(): rowsets.pair_tables(t, twin) for t, twin in mine.users_also_in(theirs)}
    copy_rows = rowsets.digests(conn, mine, "copy", {k: p.copy for k, p in pairs.items()})
    live_rows = rowsets.digests(conn, theirs, "main", {k: p.live for k, p in pairs.items()})
    return Side(mine, copy_rows), Side(theirs, live_rows), pairs


def make_plan(conn: sqlite3.Connection, copy_path: str, bookkeeping: tuple[str, ...], known=None) -> Plan:
    copy, live, pairs = known or sides(conn, bookkeeping)
    result = Plan(copy=copy_path)
    for t in copy.schema.users:
        if t.name.lower() not in pairs and copy.rows.get(t.name.lower()) and copy.rows[t.name.lower()].digests:
            result.refused[t.name] = f"table {t.name} is not in the live schema"
    kinds = {rowsets.VIRTUAL: "a virtual table: derived data (the app's own triggers or code keep it), never restored",
             rowsets.BOOKKEEPING: "a framework's bookkeeping table (bookkeeping_tables): never restored"}
    notes = [f"{t.name}: {kinds[t.kind]}" for t in copy.schema.tables.values() if t.kind in kinds]
    verdicts = {}
    for name, pairing in pairs.items():
        ctable, ltable = copy.schema.table(name), live.schema.table(name)
        diff = rowcompare.compare(copy.rows[name], live.rows[name])
        verdicts[name] = rowcompare.classify(conn, ctable, ltable, pairing, copy.rows[name], live.rows[name], diff,
                                             copy_db="copy", live_db="main")
    resolver = Resolver(conn, copy, live, pairs, verdicts)
    order = parents_first(copy.schema, list(pairs))
    ahead = migrations_ahead(conn, copy.schema, live.schema)
    for name in order:
        rows = resolver.missing_rows(name)
        why = table_refusal(copy.schema.table(name), live.schema.table(name), pairs[name], rows, ahead)
        if why:
            result.refused[ltable_name(live, name)] = why
            resolver.refuse_all(name)
        elif ahead and rows and pairs[name].dropped:
            notes.append(f"{ltable_name(live, name)}: column(s) {', '.join(pairs[name].dropped)} of the copy left out: "
                         f"a migration the live database has not run ({', '.join(ahead[:3])}) added them")
    resolver.resolve()
    for name in order:
        if ltable_name(live, name) not in result.refused:
            table_plan = resolver.table_plan(name)
            if table_plan is not None:
                result.tables.append(table_plan)
    result.notes = sorted(notes)
    return result


def ltable_name(live: Side, name: str) -> str:
    table = live.schema.get(name)
    return table.name if table else name


def migrations_ahead(conn: sqlite3.Connection, copy: Schema, live: Schema) -> list[str]:
    """The migrations the copy's bookkeeping tables record beyond the live database's (django_migrations: both
    sides have the table, and the live one's rows are all in the copy's): the copy was made on a schema
    migrated past the live one (a pre-rollback save of a release whose migration was rolled back with the
    database). A table holding only the current version (alembic_version) says no direction: never ahead."""
    out: list[str] = []
    for t in copy.of_kind(rowsets.BOOKKEEPING):
        twin = live.get(t.name)
        if twin is None or t.name.lower() in ("sqlite_sequence", "django_session"):
            continue
        cols = [c for c in t.own if c.lower() != "applied" and c in twin.columns]
        if not cols:
            continue
        select = ", ".join(quote(c) for c in cols)
        live_rows = set(conn.execute(f"SELECT {select} FROM main.{quote(twin.name)}"))
        copy_rows = set(conn.execute(f"SELECT {select} FROM copy.{quote(t.name)}"))
        if live_rows and live_rows < copy_rows:
            out += sorted(" ".join(str(v) for v in r) for r in copy_rows - live_rows)
    return out


def table_refusal(copy_t: Table, live_t: Table, pairing: Pairing, rows: list[tuple[object, dict]],
                  ahead: list[str] | None = None) -> str:
    """Why none of a table's rows can come back, or ''. ahead: the migrations the copy has run and the live
    database has not (migrations_ahead): a column only the copy has was added by one of them, and its values
    (the migration's fill, or what the release rolled back wrote) go with that release; the rows come back."""
    if not rows:
        return ""
    for col in () if ahead else pairing.dropped:
        if any(values.get(col) is not None for _, values in rows):
            return f"{live_t.name}: column {col} of the copy is not in the live schema (its values would be lost)"
    given = {twin.lower() for _, twin in pairing.columns}
    for col, notnull, default in zip(live_t.columns, live_t.notnull, live_t.defaults):
        if notnull and not default and col.lower() not in given and col != live_t.surrogate:
            return f"{live_t.name}: live column {col} is NOT NULL with no default, and the copy has no value for it"
    return ""


def parents_first(schema: Schema, names: list[str]) -> list[str]:
    done: list[str] = []

    def visit(name: str, path: tuple[str, ...] = ()) -> None:
        if name in done or name in path:
            return
        table = schema.get(name)
        for r in table.refs if table else ():
            if r.parent.lower() in names and r.parent.lower() != name:
                visit(r.parent.lower(), path + (name,))
        done.append(name)

    for name in sorted(names):
        visit(name)
    return done


class Resolver:
    """Final keys and references for the rows that come back (see the module's contract), in three passes:
    every table's new keys first (so that self and cyclic references find their rows), then each row's
    references and UNIQUE values, then whatever refers to a row that cannot come back stays out too."""

    def __init__(self, conn: sqlite3.Connection, copy: Side, live: Side, pairs: dict[str, Pairing],
                 verdicts: dict[str, rowcompare.TableDiff]) -> None:
        self.conn, self.copy, self.live, self.pairs, self.verdicts = conn, copy, live, pairs, verdicts
        self.rows: dict[str, list[tuple[object, dict]]] = {}    # table -> [(copy key, copy values)]
        self.assigned: dict[str, dict[object, object]] = {}    # table -> copy key -> its key live
        self.rekeyed: dict[str, dict[object, object]] = {}
        self.blocked: dict[str, dict[object, str]] = {}        # table -> copy key -> why it stays out
        self.needs: dict[tuple[str, object], list[tuple[str, object]]] = {}   # (parent, key) -> its restored children
        self.resolved: dict[tuple[str, object], dict] = {}     # (table, key) -> its values live
        self._matched: dict[str, dict[object, object]] = {}      # matched(): only for the parents of a row coming back
        for name in pairs:
            self.assign(name)

    def matched(self, name: str) -> dict[object, object]:
        """match_by_content(name), worked out once, when a reference first needs it (a table no row coming back
        points at is never matched row by row: at a million rows that is seconds the app's writers wait)."""
        if name not in self._matched:
            self._matched[name] = self.match_by_content(name)
        return self._matched[name]

    def match_by_content(self, name: str) -> dict[object, object]:
        """copy key -> live key for the copy's rows live in any form (same content, or updated under their key)."""
        crow, lrow = self.copy.rows[name], self.live.rows[name]
        by_digest: dict[int, list] = {}
        for k, d in zip(lrow.keys, lrow.digests):
            by_digest.setdefault(d, []).append(k)
        found: dict[object, object] = {}
        changed = {crow.keys[i] for i in self.verdicts[name].changed}
        ctable, ltable = self.copy.schema.table(name), self.live.schema.table(name)
        moved = rowcompare.unique_held(self.conn, ctable, ltable, self.pairs[name], sorted(changed, key=str),
                                       "copy", "main") if changed else {}
        for k, d in zip(crow.keys, crow.digests):
            if by_digest.get(d):
                found[k] = by_digest[d].pop()
            elif k in changed:
                found[k] = moved.get(k, k)
        return found

    def missing_rows(self, name: str) -> list[tuple[object, dict]]:
        if name not in self.rows:
            ctable = self.copy.schema.table(name)
            keys = [self.copy.rows[name].keys[i] for i in self.verdicts[name].missing]
            self.rows[name] = self.fetch(ctable, self.pairs[name], keys) if keys else []
        return self.rows[name]

    def assign(self, name: str) -> None:
        ctable, ltable = self.copy.schema.table(name), self.live.schema.table(name)
        rows = self.missing_rows(name)
        assigned, rekeyed = self.assigned.setdefault(name, {}), self.rekeyed.setdefault(name, {})
        surrogate = bool(ltable.surrogate and ctable.surrogate)
        taken, top = self.live_keys(ltable, [key for key, _ in rows]) if surrogate else (set(), 0)
        next_key = top + 1
        used = set(taken)
        for key, _ in rows:             # first every row whose key is free keeps it
            if not surrogate or key not in used:
                assigned[key] = key
                used.add(key)
        for key, _ in rows:             # then the rows whose key a live row took get the next free ones
            if key not in assigned:
                while next_key in used:
                    next_key += 1
                assigned[key] = rekeyed[key] = next_key
                used.add(next_key)

    def refuse_all(self, name: str) -> None:
        why = "its table cannot come back"
        self.blocked.setdefault(name, {}).update({key: why for key, _ in self.missing_rows(name)})

    def resolve(self) -> None:
        for name in self.pairs:
            for key, values in self.missing_rows(name):
                if key in self.blocked.get(name, {}):
                    continue
                live_values, why = self.resolve_row(name, key, values)
                if why:
                    self.block(name, key, why)
                else:
                    self.resolved[(name, key)] = live_values

    def block(self, name: str, key: object, why: str) -> None:
        """key of name stays out, and so does every row coming back that refers to it (to a fixpoint)."""
        todo = [(name, key, why)]
        while todo:
            table, k, reason = todo.pop()
            if k in self.blocked.setdefault(table, {}):
                continue
            self.blocked[table][k] = reason
            self.resolved.pop((table, k), None)
            for child in self.needs.get((table, k), []):
                todo.append((child[0], child[1], f"it refers to a {table} row that cannot come back"))

    def resolve_row(self, name: str, key: object, values: dict) -> tuple[dict, str]:
        """(the row's values as it goes in live, '') or ({}, why it cannot)."""
        ctable, ltable, pairing = self.copy.schema.table(name), self.live.schema.table(name), self.pairs[name]
        for cols in ltable.unique:
            mine = [values.get(self.copy_name(pairing, c)) for c in cols]
            if all(v is not None for v in mine):
                where = " AND ".join(f"{quote(c)} IS ?" for c in cols)
                if self.conn.execute(f"SELECT 1 FROM main.{quote(ltable.name)} WHERE {where} LIMIT 1", mine).fetchone():
                    return {}, f"its {', '.join(cols)} is held by a live row (UNIQUE)"
        out = dict(values)
        for r in pairing.copy.refs:
            value = tuple(values.get(c) for c in r.columns)
            if all(v is None for v in value):
                continue
            target = self.target(name, key, r, value)
            if target is None:
                return {}, f"it refers to a {r.parent} row that is neither live nor coming back"
            out.update(zip(r.columns, target))
        live_row = {twin: out.get(c) for c, twin in pairing.columns}
        if ltable.surrogate and ctable.surrogate:
            live_row[ltable.surrogate] = self.assigned[name][key]
        return live_row, ""

    def table_plan(self, name: str) -> TablePlan | None:
        ltable = self.live.schema.table(name)
        out = TablePlan(table=ltable.name, changed=len(self.verdicts[name].changed))
        for key, _ in self.missing_rows(name):
            why = self.blocked.get(name, {}).get(key)
            if why:
                out.left_out[why] = out.left_out.get(why, 0) + 1
            elif (name, key) in self.resolved:
                out.rows.append(self.resolved[(name, key)])
                if key in self.rekeyed.get(name, {}):
                    out.rekeyed[key] = self.rekeyed[name][key]
        return out if out.rows or out.changed or out.left_out else None

    def fetch(self, table: Table, pairing: Pairing, keys: list) -> list[tuple[object, dict]]:
        """The copy's rows with these keys (as the ledger keys rows): a rowid-keyed table's picked by SQLite,
        any other's (a natural key, an INTEGER PRIMARY KEY DESC that may hold text) found by reading them all."""
        cols = [c for c, _ in pairing.columns] + list(pairing.dropped)
        wanted = set(keys)
        out: list[tuple[object, dict]] = []
        kcols = rowsets.key_columns(table)
        natural = rowsets.natural_key(table)
        select = ", ".join(kcols + [quote(c) for c in cols])
        where, args = "", ()
        if rowdelta.rowid_keyed(table):         # its key is an integer on every row: the rows are picked by it
            where, args = rowdelta.in_json(kcols[0], sorted(wanted))
            where = f" WHERE {where}"
        for r in self.conn.execute(f"SELECT {select} FROM copy.{quote(table.name)}{where}", args):
            k = rowsets.digest(r[:len(kcols)]) if natural or not isinstance(r[0], int) else r[0]
            if k in wanted:
                out.append((k, dict(zip(cols, r[len(kcols):]))))
        return out

    def live_keys(self, table: Table, among: list) -> tuple[set, int]:
        """(the keys among these that a live row holds, the largest integer key live, 0 for none). A rowid alias
        is an integer on every row and SQLite answers both from the key; any other surrogate is read whole."""
        assert table.surrogate, table.name          # called for tables with a surrogate key only
        q, k = quote(table.name), quote(table.surrogate)
        if table.alias:
            top = max(self.conn.execute(f"SELECT max({k}) FROM main.{q}").fetchone()[0] or 0, 0)
            where, args = rowdelta.in_json(k, sorted(key for key in among if isinstance(key, int)))
            held = {r[0] for r in self.conn.execute(f"SELECT {k} FROM main.{q} WHERE {where}", args)}
            return held, top
        every = {r[0] for r in self.conn.execute(f"SELECT {k} FROM main.{q}")}
        return every & set(among), max([v for v in every if isinstance(v, int)] + [0])

    def copy_name(self, pairing: Pairing, live_col: str) -> str:
        return next((c for c, twin in pairing.columns if twin.lower() == live_col.lower()), live_col)

    def live_name(self, pairing: Pairing, copy_col: str) -> str:
        return next((twin for c, twin in pairing.columns if c.lower() == copy_col.lower()), copy_col)

    def parent_key(self, ptable: Table, pcols: tuple[str, ...], value: tuple) -> object | None:
        """The copy key (as the ledger keys rows) of the copy's parent row that value points at."""
        where = " AND ".join(f"{quote(c) if c != 'rowid' else 'rowid'} IS ?" for c in pcols)
        kcols = rowsets.key_columns(ptable)
        found = self.conn.execute(f"SELECT {', '.join(kcols)} FROM copy.{quote(ptable.name)} WHERE {where} LIMIT 1",
                                  value).fetchone()
        if found is None:
            return None
        natural = rowsets.natural_key(ptable) or not isinstance(found[0], int)
        return rowsets.digest(found) if natural else found[0]

    def target(self, child: str, child_key: object, ref: rowsets.Ref, value: tuple) -> tuple | None:
        """The live values of the parent columns for a reference that held value in the copy, or None."""
        parent = ref.parent.lower()
        ptable = self.copy.schema.get(parent)
        if ptable is None or parent not in self.pairs:
            return None
        pcols = ref.parent_columns or (ptable.key or ("rowid",))
        ckey = self.parent_key(ptable, pcols, value)
        if ckey is None or ckey in self.blocked.get(parent, {}):
            return None
        ltable = self.live.schema.table(parent)
        lcols = [self.live_name(self.pairs[parent], c) for c in pcols]
        if ckey in self.assigned.get(parent, {}):           # coming back too
            self.needs.setdefault((parent, ckey), []).append((child, child_key))
            if ltable.surrogate and [c.lower() for c in lcols] == [ltable.surrogate.lower()]:
                return (self.assigned[parent][ckey],)
            return value            # a restored parent keeps its other values
        lkey = self.matched(parent).get(ckey)
        if lkey is None:
            return None
        if rowsets.natural_key(ltable):
            key_where = " AND ".join(f"{quote(c)} IS ?" for c in ltable.key)
            params: tuple = tuple(value) if [c.lower() for c in lcols] == [c.lower() for c in ltable.key] else ()
            if params:
                return params       # the same natural key live: the same row
            row = self.conn.execute(f"SELECT {', '.join(quote(c) for c in lcols)} FROM main.{quote(ltable.name)} "
                                    f"WHERE {key_where}", value).fetchone()
            return tuple(row) if row else None
        lkey_expr = quote(ltable.surrogate) if ltable.surrogate else "rowid"
        row = self.conn.execute(f"SELECT {', '.join(quote(c) if c != 'rowid' else 'rowid' for c in lcols)} "
                                f"FROM main.{quote(ltable.name)} WHERE {lkey_expr} = ?", (lkey,)).fetchone()
        return tuple(row) if row else None
