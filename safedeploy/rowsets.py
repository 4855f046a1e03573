"""What a database's rows are, by content: the schema as the row ledger and the row restore read it,
and one digest per row.

The contract:
- `read_schema(conn, schema, bookkeeping)` describes every table of one attached database: its
  columns, its key, whether that key is a surrogate (one INTEGER PRIMARY KEY column: a rowid alias, or
  `INTEGER PRIMARY KEY DESC`, which SQLite keeps apart from the rowid), AUTOINCREMENT, its UNIQUE column
  sets, its foreign keys (parent tables matched case-insensitively, as SQLite matches them), and its
  kind: a users' table, a framework's bookkeeping table (`bookkeeping_tables`, `sqlite_sequence`), a
  virtual table or a virtual table's shadow table (derived data: never counted, never restored).
- A row's identity is its content, never its id: `digests(conn, schema, tables)` gives, per users'
  table, each row's surrogate key (or rowid) and a 64-bit digest of its content, where the surrogate
  key is left out and each foreign key is replaced by the content of the row it points at (that
  row's own columns). So a row that came back under a new id, or whose parent did, has the digest it
  had; a row whose id a newer row took has a digest of its own.
- Nothing here writes to a database or prints; reads are read-only statements on the connection given.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

DEFAULT_BOOKKEEPING = ("django_migrations", "alembic_version", "sqlite_sequence", "django_session")
USERS, BOOKKEEPING, VIRTUAL, SHADOW = "users", "bookkeeping", "virtual", "shadow"


@dataclass(frozen=True)
class Ref:
    """A foreign key: columns of the child, the parent table (as declared in the schema) and its columns."""
    columns: tuple[str, ...]
    parent: str
    parent_columns: tuple[str, ...]

    @property
    def to_key(self) -> bool:
        return bool(self.parent_columns)


@dataclass(frozen=True)
class Table:
    """One table as the row comparison reads it: its stored columns, types and key."""
    name: str
    columns: tuple[str, ...]            # every stored column, in order (generated columns left out)
    types: tuple[str, ...]              # their declared types
    notnull: tuple[bool, ...]
    defaults: tuple[bool, ...]          # whether each has a DEFAULT
    key: tuple[str, ...]                # the PRIMARY KEY columns ((): the rowid)
    surrogate: str | None               # the one INTEGER PRIMARY KEY column, when there is one
    alias: bool                         # that column is the rowid
    without_rowid: bool
    autoincrement: bool
    unique: tuple[tuple[str, ...], ...]
    refs: tuple[Ref, ...]
    kind: str = USERS

    @property
    def own(self) -> tuple[str, ...]:
        """The columns that make up a row's own content: all but the surrogate key and foreign keys."""
        skip = {c.lower() for r in self.refs for c in r.columns}
        if self.surrogate:
            skip.add(self.surrogate.lower())
        return tuple(c for c in self.columns if c.lower() not in skip)

    def column(self, name: str) -> str | None:
        return next((c for c in self.columns if c.lower() == name.lower()), None)


@dataclass
class Schema:
    """The tables of a database the row comparison reads, by lower-cased name."""
    tables: dict[str, Table] = field(default_factory=dict)     # by lower-cased name

    def get(self, name: str) -> Table | None:
        return self.tables.get(name.lower())

    def table(self, name: str) -> Table:
        """The table a caller knows is there (paired, listed): KeyError naming it otherwise."""
        return self.tables[name.lower()]

    def same_users_as(self, other: "Schema") -> bool:
        """Every users' table of this schema is in other with the same shape (digests of both compare whole)."""
        for t in self.users:
            twin = other.get(t.name)
            if twin is None or not same_shape(t, twin):
                return False
        return True

    def users_also_in(self, other: "Schema") -> list[tuple[Table, Table]]:
        """(this table, other's table of the same name) for each users' table both have as a users' table."""
        out = []
        for t in self.users:
            twin = other.get(t.name)
            if twin is not None and twin.kind == USERS:
                out.append((t, twin))
        return out

    def of_kind(self, kind: str) -> list[Table]:
        return [t for t in self.tables.values() if t.kind == kind]

    @property
    def users(self) -> list[Table]:
        return self.of_kind(USERS)


def quote(name: str) -> str:
    """An SQL identifier, double-quoted. A name with a control character in it is refused (never written)."""
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ValueError(f"a table or column name holds a control character ({name!r})")
    return '"' + name.replace('"', '""') + '"'


def read_schema(conn: sqlite3.Connection, schema: str = "main", bookkeeping: Iterable[str] = DEFAULT_BOOKKEEPING
                ) -> Schema:
    """The tables of the attached database `schema` (see the module's contract)."""
    keep = {b.lower() for b in bookkeeping} | {"sqlite_sequence", "sqlite_stat1", "sqlite_stat4"}
    listed = table_list(conn, schema)
    found = Schema()
    for name, (kind_hint, without_rowid, sql) in listed.items():
        if kind_hint == "virtual":
            found.tables[name.lower()] = bare(name, VIRTUAL)
            continue
        table = describe_table(conn, schema, name, without_rowid, sql)
        tools = name.lower().startswith("_litestream_")      # what Litestream adds to a database it replicates
        kind = SHADOW if kind_hint == "shadow" else BOOKKEEPING if name.lower() in keep or tools else USERS
        found.tables[name.lower()] = table if kind == USERS else replace_kind(table, kind)
    names = {t.name.lower(): t.name for t in found.tables.values()}
    for key, table in list(found.tables.items()):        # parents as declared, whatever case the child wrote
        refs = tuple(Ref(r.columns, names.get(r.parent.lower(), r.parent), r.parent_columns) for r in table.refs)
        found.tables[key] = Table(**{**table.__dict__, "refs": refs})
    return found


def bare(name: str, kind: str) -> Table:
    return Table(name, (), (), (), (), (), None, False, False, False, (), (), kind)


def replace_kind(table: Table, kind: str) -> Table:
    return Table(**{**table.__dict__, "kind": kind})


def table_list(conn: sqlite3.Connection, schema: str) -> dict[str, tuple[str, bool, str]]:
    """{name: (kind: table | virtual | shadow, without rowid, its CREATE statement)}."""
    master = {r[0]: (r[1] or "") for r in conn.execute(
        f"SELECT name, sql FROM {schema}.sqlite_master WHERE type = 'table'")}
    found: dict[str, tuple[str, bool, str]] = {}
    try:
        for r in conn.execute(f"PRAGMA {schema}.table_list"):
            if r[0] == schema and r[1] in master and not r[1].startswith("sqlite_"):
                found[r[1]] = (r[2], bool(r[4]), master[r[1]])
        return found
    except sqlite3.OperationalError:        # SQLite before 3.37: from the CREATE statements
        pass
    for name, sql in master.items():
        if name.startswith("sqlite_"):
            continue
        upper = " ".join(sql.upper().split())
        kind = "virtual" if upper.startswith("CREATE VIRTUAL TABLE") else "table"
        found[name] = (kind, upper.rstrip(" ;").endswith("WITHOUT ROWID"), sql)
    for name in list(found):                # a virtual table's shadow tables are named after it
        if any(found[v][0] == "virtual" and name.lower().startswith(v.lower() + "_") for v in found):
            found[name] = ("shadow", found[name][1], found[name][2])
    return found


def describe_table(conn: sqlite3.Connection, schema: str, name: str, without_rowid: bool, sql: str) -> Table:
    q = quote(name)
    info = [r for r in conn.execute(f"PRAGMA {schema}.table_xinfo({q})") if r[6] in (0, 1)]   # 2, 3: generated
    columns = tuple(r[1] for r in info)
    key = tuple(r[1] for r in sorted((r for r in info if r[5]), key=lambda r: r[5]))
    indexes = conn.execute(f"PRAGMA {schema}.index_list({q})").fetchall()
    pk_index = any(r[3] == "pk" for r in indexes)
    surrogate = None
    if len(key) == 1 and not without_rowid:
        declared = next(r[2] for r in info if r[1] == key[0])
        if declared.upper() == "INTEGER":
            surrogate = key[0]
    unique = []
    for r in indexes:
        if r[2] and r[3] in ("u", "pk") and not r[4]:      # unique, from the table's definition, not partial
            cols = tuple(c[2] for c in conn.execute(f"PRAGMA {schema}.index_info({quote(r[1])})") if c[2])
            if cols and cols != key:
                unique.append(cols)
    refs: dict[int, list] = {}
    for r in conn.execute(f"PRAGMA {schema}.foreign_key_list({q})"):
        refs.setdefault(r[0], []).append(r)
    ref_list = tuple(Ref(tuple(x[3] for x in sorted(rows, key=lambda x: x[1])), rows[0][2],
                         tuple(x[4] for x in sorted(rows, key=lambda x: x[1]) if x[4]))
                     for _, rows in sorted(refs.items()))
    return Table(name=name, columns=columns, types=tuple(r[2] for r in info), notnull=tuple(bool(r[3]) for r in info),
                 defaults=tuple(r[4] is not None for r in info), key=key, surrogate=surrogate,
                 alias=surrogate is not None and not pk_index, without_rowid=without_rowid,
                 autoincrement="AUTOINCREMENT" in sql.upper(), unique=tuple(unique), refs=ref_list)


# -- digests ------------------------------------------------------------------------------------------
def digest(values: Iterable[object]) -> int:
    """64 bits of a stable hash of values (SQLite's types kept apart: 1, 1.0, '1' and x'31' differ): BLAKE2b of
    their repr, which Python writes the same in every process (unlike hash()), one call in C for a whole row."""
    text = repr(values if type(values) is tuple else tuple(values)).encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big", signed=True)


@dataclass(frozen=True)
class Shape:
    """Which columns make up a table's content on one side of a comparison: own columns and foreign keys,
    in the order both sides agree on (see project())."""
    own: tuple[str, ...]
    refs: tuple[Ref, ...]


def full_shape(table: Table) -> Shape:
    return Shape(table.own, table.refs)


def identity_columns(parent: Table, own: tuple[str, ...]) -> tuple[str, ...]:
    """What a reference to a row of parent stands for: its first UNIQUE column set, else its natural key, else its
    own columns (own: those both sides of a comparison share). A user's last login changing does not change
    which user a post is by."""
    shared = {c.lower() for c in own} | {c.lower() for c in parent.key}
    for cols in parent.unique:
        if all(c.lower() in shared for c in cols):
            return cols
    if natural_key(parent):
        return parent.key
    return own


def parent_lookup(conn: sqlite3.Connection, schema: str, parent: Table, columns: tuple[str, ...], own: tuple[str, ...]
                  ) -> dict[tuple, int]:
    """{value of the parent's columns: the digest of what identifies the parent row (identity_columns)}."""
    cols = columns or (parent.key if parent.key else ("rowid",))
    select = ", ".join([quote(c) if c != "rowid" else "rowid" for c in cols] + [quote(c) for c in own])
    n = len(cols)
    found: dict[tuple, int] = {}
    for row in conn.execute(f"SELECT {select} FROM {schema}.{quote(parent.name)}"):
        found[tuple(row[:n])] = digest((parent.name.lower(), *row[n:]))
    return found


@dataclass
class TableRows:
    """One table's rows: parallel lists of key (the surrogate key or rowid; a natural key's digest) and content
    digest, both 64-bit integers."""
    keys: list[int] = field(default_factory=list)
    digests: list[int] = field(default_factory=list)
    ordered: bool = True        # keys are rowids or an integer key SQLite hands out in order (not digests)


def key_columns(table: Table) -> list[str]:
    """What identifies a row of table for the ledger: its surrogate key, else its natural PRIMARY KEY (a text
    or composite key: the row's key digest is kept), else its rowid."""
    if table.surrogate:
        return [quote(table.surrogate)]
    if table.key:
        return [quote(c) for c in table.key]
    return ["rowid"]


def natural_key(table: Table) -> bool:
    return table.surrogate is None and bool(table.key)


def read_rows(conn: sqlite3.Connection, schema: str, table: Table, shape: Shape, parents: dict[tuple[str, tuple], dict],
              where: str = "", args: tuple = ()) -> TableRows:
    """Every row of table with its digest (see the module's contract); where: only the rows it selects."""
    ref_cols = [c for r in shape.refs for c in r.columns]
    keys = key_columns(table)
    k = len(keys)
    natural = natural_key(table)
    select = ", ".join(keys + [quote(c) for c in shape.own] + [quote(c) for c in ref_cols])
    out = TableRows(ordered=not natural)
    n_own = len(shape.own)
    cursor = conn.execute(f"SELECT {select} FROM {schema}.{quote(table.name)}" + (f" WHERE {where}" if where else ""),
                          args)
    if not shape.refs and not natural:          # the common case, kept tight: a million rows a few seconds
        prefix = (table.name.lower(),)
        keys_, digests_ = out.keys, out.digests
        for row in cursor:
            key = row[0]
            keys_.append(key if isinstance(key, int) else digest(row[:k]))
            digests_.append(digest(prefix + row[k:]))
        return out
    for row in cursor:
        values: list[object] = [table.name.lower(), *row[k:k + n_own]]
        i = k + n_own
        for r in shape.refs:
            value = tuple(row[i:i + len(r.columns)])
            i += len(r.columns)
            if all(v is None for v in value):
                values.append(None)
                continue
            lookup = parents.get((r.parent.lower(), r.parent_columns))
            values.append(("->", lookup[value]) if lookup is not None and value in lookup else ("dangling", value))
        out.keys.append(digest(row[:k]) if natural or not isinstance(row[0], int) else row[0])
        out.digests.append(digest(flatten(values)))
    return out


def flatten(values: list[object]) -> Iterator[object]:
    for v in values:
        if isinstance(v, tuple):
            yield from v
        else:
            yield v


def digests(conn: sqlite3.Connection, schema: Schema, attached: str = "main",
            shapes: dict[str, Shape] | None = None) -> dict[str, TableRows]:
    """{table name (lower case): its rows} for every users' table of the attached database (or those shapes
    names: a comparison across schema changes digests the columns both sides share, see project())."""
    def shape_of(t: Table) -> Shape:
        return shapes[t.name.lower()] if shapes is not None else full_shape(t)

    tables = [t for t in schema.users if shapes is None or t.name.lower() in shapes]
    parents: dict[tuple[str, tuple], dict] = {}
    for table in tables:
        for r in shape_of(table).refs:
            parent = schema.get(r.parent)
            wanted = (r.parent.lower(), r.parent_columns)
            if parent is not None and parent.kind == USERS and wanted not in parents:
                own = shape_of(parent).own if shapes is None or parent.name.lower() in shapes else parent.own
                parents[wanted] = parent_lookup(conn, attached, parent, r.parent_columns, identity_columns(parent, own))
    return {t.name.lower(): read_rows(conn, attached, t, shape_of(t), parents) for t in tables}


# -- across schema changes ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Pairing:
    """How one table of a copy meets the same table live: the shapes to digest on each side, the columns
    matched (copy name, live name), the renames inferred, and the copy's columns the live table lacks."""
    copy: Shape
    live: Shape
    columns: tuple[tuple[str, str], ...]
    renamed: tuple[tuple[str, str], ...] = ()
    dropped: tuple[str, ...] = ()


def pair_tables(copy: Table, live: Table) -> Pairing:
    """Columns matched by name (case-insensitively, as SQLite does); a column the copy has and the live table
    lacks, where the live table has one the copy lacks in the same place with the same declared type, is
    taken as renamed (a RenameField, ALTER TABLE ... RENAME COLUMN keep the place; added columns go last)."""
    live_by = {c.lower(): c for c in live.columns}
    pairs = [(c, live_by[c.lower()]) for c in copy.columns if c.lower() in live_by]
    only_copy = [c for c in copy.columns if c.lower() not in live_by]
    copy_by = {c.lower() for c in copy.columns}
    only_live = [c for c in live.columns if c not in copy_by and c.lower() not in copy_by]
    renamed: list[tuple[str, str]] = []
    for a in list(only_copy):           # renamed: the live column in its place is new, of the same declared type
        i = copy.columns.index(a)
        b = live.columns[i] if i < len(live.columns) else None
        if b in only_live and copy.types[i].upper() == live.types[i].upper():
            renamed.append((a, b))
            pairs.append((a, b))
            only_copy.remove(a)
            only_live.remove(b)
    matched = {c.lower(): twin for c, twin in pairs}
    own_copy = tuple(c for c in copy.own if c.lower() in matched)
    own_live = tuple(matched[c.lower()] for c in own_copy)
    refs_copy, refs_live = [], []
    live_refs = {(tuple(c.lower() for c in r.columns), r.parent.lower()): r for r in live.refs}
    for r in copy.refs:
        cols = tuple(matched.get(c.lower(), "").lower() for c in r.columns)
        twin = live_refs.get((cols, r.parent.lower()))
        if twin is not None:
            refs_copy.append(r)
            refs_live.append(twin)
    return Pairing(Shape(own_copy, tuple(refs_copy)), Shape(own_live, tuple(refs_live)), tuple(pairs),
                   tuple(renamed), tuple(only_copy))


def same_shape(copy: Table, live: Table) -> bool:
    return [c.lower() for c in copy.columns] == [c.lower() for c in live.columns] and \
        [(tuple(c.lower() for c in r.columns), r.parent.lower()) for r in copy.refs] == \
        [(tuple(c.lower() for c in r.columns), r.parent.lower()) for r in live.refs]
