"""A SQLite database's schema as a running release meets it (tables, columns, NOT NULL and defaults,
unique indexes, foreign keys), and what a migration changed in it: the part of a rehearsal's verdict
that does not depend on which pages the probes happen to ask for.

compare(before, after) is pure. What breaks the release that runs now, whatever the probes say:
- a table or a column dropped, or renamed (a dropped one beside an added one of the same shape): its
  queries name it;
- a column added NOT NULL without a default: its INSERTs do not name it, and fail;
- a column that became NOT NULL, or lost the default of a NOT NULL column;
- a new unique index or constraint, or a new foreign key, on a table it writes: its writes may break it.
Compatible: a new table, a column that is nullable or has a default, a non-unique index, a type change
(SQLite does not enforce declared types), a constraint removed.

read(db) opens the file read-only; a table SQLite cannot describe is left out, never guessed.
"""

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from . import dbfiles
from .errors import DeployError


@dataclass(frozen=True)
class Column:
    """One column of a table as PRAGMA table_info shows it."""
    name: str
    type: str
    notnull: bool
    default: str | None
    pk: bool

    @property
    def required(self) -> bool:
        """An INSERT that leaves it out fails."""
        return self.notnull and self.default is None and not self.pk


@dataclass(frozen=True)
class Table:
    """One table: its columns, unique sets and foreign keys."""
    name: str
    columns: tuple[Column, ...]
    unique: frozenset                   # frozensets of column-name tuples, one per unique index or constraint
    foreign_keys: frozenset             # (column, referenced table, referenced column)

    def column(self, name: str) -> Column | None:
        return next((c for c in self.columns if c.name == name), None)


@dataclass(frozen=True)
class Schema:
    """A database's tables, as the migration rules compare them."""
    tables: tuple[Table, ...]

    def table(self, name: str) -> Table | None:
        return next((t for t in self.tables if t.name == name), None)


@dataclass(frozen=True)
class Changes:
    """A schema change split into what the running release cannot live with and what it can."""
    breaking: tuple[str, ...]           # what the running release cannot live with
    compatible: tuple[str, ...]


def quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def read(db: Path) -> Schema:
    """The schema of the database file db (read-only)."""
    try:
        conn = dbfiles.open_readonly(db)
    except (DeployError, sqlite3.Error):
        return Schema(())
    try:
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE "
                                            "'sqlite_%' ORDER BY name")]
        return Schema(tuple(t for t in (read_table(conn, n) for n in names) if t is not None))
    except sqlite3.Error:
        return Schema(())
    finally:
        conn.close()


def read_table(conn: sqlite3.Connection, name: str) -> Table | None:
    try:
        columns = tuple(Column(r[1], (r[2] or "").upper(), bool(r[3]), r[4], bool(r[5]))
                        for r in conn.execute(f"PRAGMA table_info({quoted(name)})"))
        unique = set()
        for _, index, is_unique, origin, *_ in conn.execute(f"PRAGMA index_list({quoted(name)})"):
            if is_unique and origin != "pk":
                unique.add(tuple(r[2] for r in conn.execute(f"PRAGMA index_info({quoted(index)})")))
        keys = frozenset((r[3], r[2], r[4] or "") for r in conn.execute(f"PRAGMA foreign_key_list({quoted(name)})"))
    except sqlite3.Error:
        return None
    return Table(name, columns, frozenset(unique), keys)


def shape(table: Table) -> tuple:
    return tuple(sorted((c.type, c.notnull, c.pk) for c in table.columns))


def compare(before: Schema, after: Schema) -> Changes:
    """What the migration from before to after changed, split into breaking and compatible (see the
    module's docstring)."""
    breaking, compatible = [], []
    gone = [t for t in before.tables if after.table(t.name) is None]
    new = [t for t in after.tables if before.table(t.name) is None]
    for t in gone:
        twin = next((n for n in new if shape(n) == shape(t)), None)
        if twin is not None:
            new.remove(twin)
            breaking.append(f"table {t.name} renamed to {twin.name}")
        else:
            breaking.append(f"table {t.name} dropped")
    compatible += [f"table {t.name} added" for t in new]
    for old in before.tables:
        now = after.table(old.name)
        if now is not None:
            table_changes(old, now, breaking, compatible)
    return Changes(tuple(breaking), tuple(compatible))


def table_changes(old: Table, now: Table, breaking: list, compatible: list) -> None:
    name = old.name
    removed = [c for c in old.columns if now.column(c.name) is None]
    added = [c for c in now.columns if old.column(c.name) is None]
    for c in removed:
        twin = next((a for a in added if (a.type, a.notnull, a.pk) == (c.type, c.notnull, c.pk)), None)
        if twin is not None:
            added.remove(twin)
            breaking.append(f"column {name}.{c.name} renamed to {twin.name}")
        else:
            breaking.append(f"column {name}.{c.name} dropped")
    for c in added:
        if c.required:
            breaking.append(f"column {name}.{c.name} added NOT NULL without a default (an INSERT that does not "
                            "name it fails)")
        else:
            compatible.append(f"column {name}.{c.name} added")
    column_changes(old, now, breaking, compatible)
    existing = {c.name for c in old.columns}
    for cols in sorted(now.unique - old.unique):
        if set(cols) <= existing:
            breaking.append(f"unique index on {name}({', '.join(cols)}) added")
    for key in sorted(now.foreign_keys - old.foreign_keys):
        if key[0] in existing:
            breaking.append(f"foreign key {name}.{key[0]} -> {key[1]}.{key[2] or 'id'} added")


def column_changes(old: Table, now: Table, breaking: list, compatible: list) -> None:
    """The columns both schemas have: a new NOT NULL without a default breaks, a type change does not."""
    for c in old.columns:
        n = now.column(c.name)
        if n is None:
            continue
        if n.required and not c.required:
            breaking.append(f"column {old.name}.{c.name} became NOT NULL without a default")
        elif n.type != c.type:
            compatible.append(f"column {old.name}.{c.name} {c.type or 'untyped'} -> {n.type or 'untyped'}")
