"""Salvage: the rows a damaged SQLite file still holds, read page by page, into a new sound database.

SQLite's own `.recover` needs the `sqlite_dbpage` virtual table, which neither Debian's sqlite3 shell
nor Python's module is built with, so the tool reads the file format itself (https://sqlite.org/fileformat.html):

- the newest committed version of each page: the file's page, or the last frame of it in the WAL up to
  the WAL's last commit whose salts match its header;
- the schema from sqlite_schema (page 1) when it can be read;
- each table's b-tree walked from its root page, skipping a page that is not a valid b-tree page;
  every table leaf page that no walk reached (its parent was damaged) is read too, unless it is on the
  freelist (deleted rows stay deleted), and its rows go to the one table whose column count matches
  (of several, the one whose own walk met a damaged page: an orphan leaf's parent was one of those),
  else to a `lost_and_found` table;
- records decoded with their overflow chains; a cell that does not decode is counted as lost.

`salvage(damaged, dest)` never opens or writes the damaged file with SQLite (it reads bytes); it writes
dest (a new database: the schema's tables, no indexes or triggers, every row recovered under its rowid)
and returns what it found. Nothing here prints.
"""

from __future__ import annotations

import os
import sqlite3
import struct
from dataclasses import dataclass, field
from pathlib import Path

from .rowsets import quote


class Unsalvageable(Exception):
    """Not even a page size or a schema could be read."""


@dataclass
class Salvaged:
    """What a salvage recovered from a damaged database: rows per table, and what it could not place."""
    tables: dict[str, int] = field(default_factory=dict)       # rows recovered per table
    lost_and_found: int = 0                                     # rows whose table could not be told
    bad_pages: int = 0                                          # pages that were not what they should be
    bad_cells: int = 0


def varint(buf: bytes, at: int) -> tuple[int, int]:
    value = 0
    for i in range(9):
        if at + i >= len(buf):
            raise ValueError("varint past the end")
        b = buf[at + i]
        if i == 8:
            return (value << 8) | b, at + 9
        value = (value << 7) | (b & 0x7F)
        if b < 0x80:
            return value, at + i + 1
    raise ValueError("varint")


class Pages:
    """The newest committed version of each page of a database file and its WAL."""

    def __init__(self, path: Path) -> None:
        self.data = Path(path).read_bytes()
        if len(self.data) < 100 or self.data[:16] != b"SQLite format 3\x00":
            raise Unsalvageable(f"{path} has no SQLite header")
        size = struct.unpack(">H", self.data[16:18])[0]
        self.size = 65536 if size == 1 else size
        if self.size < 512 or self.size & (self.size - 1):
            raise Unsalvageable(f"{path}: page size {size} is not one SQLite writes")
        self.reserved = self.data[20]
        self.count = len(self.data) // self.size
        self.wal = self.read_wal(Path(f"{path}-wal"))
        if self.wal:
            self.count = max(self.count, max(self.wal))

    def read_wal(self, path: Path) -> dict[int, bytes]:
        try:
            wal = path.read_bytes()
        except OSError:
            return {}
        if len(wal) < 32 or struct.unpack(">I", wal[:4])[0] not in (0x377F0682, 0x377F0683):
            return {}
        if struct.unpack(">I", wal[8:12])[0] != self.size:
            return {}
        salts = wal[16:24]
        frames, pending, at = {}, {}, 32
        while at + 24 + self.size <= len(wal):
            head = wal[at:at + 24]
            if head[8:16] != salts:
                break
            number, commit = struct.unpack(">II", head[:8])
            pending[number] = wal[at + 24:at + 24 + self.size]
            if commit:
                frames.update(pending)
                pending = {}
            at += 24 + self.size
        return frames

    def page(self, number: int) -> bytes | None:
        if number < 1 or number > self.count:
            return None
        if number in self.wal:
            return self.wal[number]
        start = (number - 1) * self.size
        chunk = self.data[start:start + self.size]
        return chunk if len(chunk) == self.size else None

    @property
    def usable(self) -> int:
        return self.size - self.reserved

    def freelist(self) -> set[int]:
        first = self.page(1)
        trunk = struct.unpack(">I", first[32:36])[0] if first else 0
        found: set[int] = set()
        while trunk and trunk not in found and len(found) < self.count:
            found.add(trunk)
            page = self.page(trunk)
            if page is None:
                break
            n = struct.unpack(">I", page[4:8])[0]
            if n > (self.usable - 8) // 4:
                break
            found.update(struct.unpack(">I", page[8 + 4 * i:12 + 4 * i])[0] for i in range(n))
            trunk = struct.unpack(">I", page[:4])[0]
        return found


def decode_record(payload: bytes) -> list[object]:
    header_size, at = varint(payload, 0)
    types = []
    while at < header_size:
        t, at = varint(payload, at)
        types.append(t)
    values: list[object] = []
    at = header_size
    for t in types:
        if t == 0:
            values.append(None)
        elif 1 <= t <= 6:
            width = (1, 2, 3, 4, 6, 8)[t - 1]
            values.append(int.from_bytes(payload[at:at + width], "big", signed=True))
            at += width
        elif t == 7:
            values.append(struct.unpack(">d", payload[at:at + 8])[0])
            at += 8
        elif t in (8, 9):
            values.append(t - 8)
        elif t >= 12:
            n = (t - 12) // 2
            raw = payload[at:at + n]
            if len(raw) != n:
                raise ValueError("record past its payload")
            values.append(raw if t % 2 == 0 else raw.decode("utf-8", "replace"))
            at += n
        else:
            raise ValueError(f"serial type {t}")
    return values


class Reader:
    def __init__(self, pages: Pages) -> None:
        self.pages = pages
        self.found = Salvaged()
        self.visited: set[int] = set()

    def header_at(self, number: int) -> int:
        return 100 if number == 1 else 0

    def payload(self, page: bytes, at: int, size: int) -> bytes:
        """A table leaf cell's payload from at, following its overflow pages."""
        usable = self.pages.usable
        most, least = usable - 35, ((usable - 12) * 32 // 255) - 23
        if size <= most:
            return page[at:at + size]
        local = least + (size - least) % (usable - 4)
        if local > most:
            local = least
        data = bytearray(page[at:at + local])
        nxt = struct.unpack(">I", page[at + local:at + local + 4])[0]
        seen = set()
        while len(data) < size and nxt and nxt not in seen:
            seen.add(nxt)
            over = self.pages.page(nxt)
            if over is None:
                raise ValueError("overflow page missing")
            self.visited.add(nxt)
            data += over[4:4 + min(usable - 4, size - len(data))]
            nxt = struct.unpack(">I", over[:4])[0]
        if len(data) < size:
            raise ValueError("overflow chain cut short")
        return bytes(data)

    def leaf_rows(self, number: int, page: bytes) -> list[tuple[int, list[object]]]:
        base = self.header_at(number)
        cells = struct.unpack(">H", page[base + 3:base + 5])[0]
        rows = []
        for i in range(cells):
            try:
                at = struct.unpack(">H", page[base + 8 + 2 * i:base + 10 + 2 * i])[0]
                size, at = varint(page, at)
                rowid, at = varint(page, at)
                if rowid >= 1 << 63:
                    rowid -= 1 << 64
                rows.append((rowid, decode_record(self.payload(page, at, size))))
            except (ValueError, struct.error, IndexError):
                self.found.bad_cells += 1
        return rows

    def walk(self, root: int) -> list[tuple[int, list[object]]]:
        """Every row of the table b-tree at root that can be read."""
        rows, todo = [], [root]
        while todo:
            number = todo.pop()
            if number in self.visited:
                continue
            page = self.pages.page(number)
            self.visited.add(number)
            if page is None:
                self.found.bad_pages += 1
                continue
            base = self.header_at(number)
            kind = page[base]
            if kind == 0x0D:
                rows += self.leaf_rows(number, page)
            elif kind == 0x05 and (kids := self.children(number, page)) is not None:
                todo += kids
            else:
                self.found.bad_pages += 1
        return rows

    def children(self, number: int, page: bytes) -> list[int] | None:
        """The child pages an interior table page names, or None when the page cannot be one (its cell
        pointers or cells reach past its end: damaged bytes that look like an interior page; counted bad)."""
        base = self.header_at(number)
        cells = struct.unpack(">H", page[base + 3:base + 5])[0]
        if base + 12 + 2 * cells > len(page):
            return None
        out = [struct.unpack(">I", page[base + 8:base + 12])[0]]
        for i in range(cells):
            at = struct.unpack(">H", page[base + 12 + 2 * i:base + 14 + 2 * i])[0]
            if at + 4 > len(page):
                return None
            out.append(struct.unpack(">I", page[at:at + 4])[0])
        return [c for c in out if 1 <= c <= self.pages.count]

    def orphans(self) -> list[tuple[int, list[object]]]:
        """Table leaf pages no walk reached and the freelist does not hold."""
        free = self.pages.freelist()
        rows = []
        for number in range(2, self.pages.count + 1):
            if number in self.visited or number in free:
                continue
            page = self.pages.page(number)
            if page is not None and page[0] == 0x0D:
                self.visited.add(number)
                rows += self.leaf_rows(number, page)
        return rows


def schema_rows(reader: Reader) -> list[tuple[str, str, int, str]]:
    """(type, name, root page, sql) of sqlite_schema, read from page 1's b-tree."""
    out = []
    for _, values in reader.walk(1):
        if len(values) >= 5 and values[0] == "table" and isinstance(values[3], int) and isinstance(values[4], str):
            out.append((values[0], str(values[1]), values[3], values[4]))
    return out


def salvage(damaged: Path, dest: Path) -> Salvaged:
    """Read what damaged (and its -wal) still hold into a new database at dest (see the module's contract)."""
    pages = Pages(damaged)
    reader = Reader(pages)
    schema = schema_rows(reader)
    tables = [(name, root, sql) for _, name, root, sql in schema
              if not name.startswith("sqlite_") and not sql.upper().lstrip().startswith("CREATE VIRTUAL")]
    for _, name, root, _ in schema:         # SQLite's own (sqlite_sequence): its pages are no orphans
        if name.startswith("sqlite_") and root > 1:
            reader.walk(root)
    if not tables:
        raise Unsalvageable(f"no table could be read from the schema of {damaged}")
    conn = sqlite3.connect(dest, isolation_level=None)
    try:
        conn.execute("BEGIN")
        widths: dict[str, int] = {}
        for name, _, sql in tables:
            conn.execute(sql)
            widths[name] = len(conn.execute(f"PRAGMA table_info({quote(name)})").fetchall())
        holed: set[str] = set()         # the tables whose walk met a page that was not what it should be
        for name, root, _ in tables:
            bad = reader.found.bad_pages
            reader.found.tables[name] = insert(conn, name, widths[name], reader.walk(root))
            if reader.found.bad_pages > bad:
                holed.add(name)
        by_width: dict[int, list[str]] = {}
        for name, n in widths.items():
            by_width.setdefault(n, []).append(name)
        for rowid, values in reader.orphans():
            owners = orphan_owners(by_width.get(len(values), []), holed)
            if len(owners) == 1:
                reader.found.tables[owners[0]] += insert(conn, owners[0], widths[owners[0]], [(rowid, values)])
            else:
                lost_and_found(conn, rowid, values)
                reader.found.lost_and_found += 1
        conn.execute("COMMIT")
    finally:
        conn.close()
    os.chmod(dest, 0o600)
    return reader.found


def orphan_owners(same_width: list[str], holed: set[str]) -> list[str]:
    """The tables an orphan row (of a leaf page no walk reached) may belong to: those with its column count;
    of several, those whose walk met a damaged page (the orphan's parent was one of their pages)."""
    if len(same_width) > 1:
        return [t for t in same_width if t in holed]
    return same_width


def insert(conn: sqlite3.Connection, table: str, width: int, rows: list[tuple[int, list[object]]]) -> int:
    """Insert rows under their rowids (an INTEGER PRIMARY KEY's value is the rowid: the record holds NULL)."""
    info = conn.execute(f"PRAGMA table_info({quote(table)})").fetchall()
    keys = [r for r in info if r[5]]
    alias = keys[0][0] if len(keys) == 1 and keys[0][2].upper() == "INTEGER" else None
    columns = ", ".join(quote(r[1]) for r in info)
    sql = f"INSERT OR IGNORE INTO {quote(table)} (rowid, {columns}) VALUES ({', '.join('?' * (width + 1))})"
    done = 0
    for rowid, values in rows:
        values = (values + [None] * width)[:width]
        if alias is not None and values[alias] is None:
            values[alias] = rowid
        try:
            done += conn.execute(sql, [rowid, *values]).rowcount
        except sqlite3.Error:
            continue            # a value its column refuses (a CHECK, NOT NULL): that row is lost
    return done


def lost_and_found(conn: sqlite3.Connection, rowid: int, values: list[object]) -> None:
    conn.execute("CREATE TABLE IF NOT EXISTS lost_and_found (rowid_was INTEGER, fields INTEGER, data TEXT)")
    conn.execute("INSERT INTO lost_and_found VALUES (?, ?, ?)", (rowid, len(values), repr(values)))
