"""Which rows of two versions of one database can differ, from their pages: the rows on a table's leaf pages
that are byte for byte the same in both files (same page number, a leaf of the same table on both sides, every
cell held on the page itself) are the same rows, stored the same way; only the others need SQL's comparison.

A rollback's plan compares the live database with the point's copy (safedeploy.rowdelta). The copy was made
from the live file, so most of their pages are the same bytes; reading both files raw and comparing pages
costs a memcmp per page, where SQL's comparison decodes and compares every row of both. SQLite's sqlite_dbpage
is not compiled into Debian's library, so the pages are read from the files: the copy's alone (no WAL: a
backup is self-contained), the live database's through its WAL, the frames up to the snapshot its WAL index
header names (mxFrame) laid over the file, as SQLite's readers do.

The contract:
- `candidates(live, copy, mark, tables)`: per table name, (the rowids on the live side's leaf pages that are
  not the same as the copy's, the rowids on the copy's leaf pages that are not the same as the live side's,
  the live side's row count); or None when this cannot be said from the pages (a page size that differs, a
  WAL whose header is not the one its index names, a page that is not what a table b-tree holds). mark: the
  live database's dbfiles.WalMark, taken before and checked unchanged after by the caller (a commit between
  would make the pages read a mixture: the caller then throws the answer away).
- `pages_differing(conn, live, copy, mark)`: candidates() for every table, the two files attached to conn
  (by default the live one as "live", the copy as "main"); None where a table or an index is on one side only.
- Reads only; nothing here writes to a file or prints.
"""

from __future__ import annotations

import bisect
import os
import sqlite3
import struct
from pathlib import Path

from .dbfiles import WalMark, held_fd
from .salvage import varint

WAL_MAGIC = (0x377F0682, 0x377F0683)
READ_RUN = 2048         # pages read and compared at once (8 MB of 4 KiB pages)


class Pages:
    """A database's pages as one snapshot sees them: the file, with the WAL's frames 1..mx_frame over it."""

    def __init__(self, path: str, mark: WalMark | None = None, held: bool = False) -> None:
        """held: a live database, which this process's own connections may hold locks on: its files are read
        through descriptors never closed (dbfiles.held_fd); a copy's own descriptor is closed by close()."""
        self.held = held
        self.fd = held_fd(path) if held else os.open(path, os.O_RDONLY)
        self.wal_fd: int | None = None
        self.overlay: dict[int, int] = {}       # page number -> offset of its newest frame's page in the WAL
        try:
            header = os.pread(self.fd, 100, 0)
            if len(header) < 100 or not header.startswith(b"SQLite format 3\x00"):
                raise ValueError("not an SQLite file")
            size = struct.unpack(">H", header[16:18])[0]
            self.page_size = 65536 if size == 1 else size
            self.usable = self.page_size - header[20]
            self.pages = os.fstat(self.fd).st_size // self.page_size
            if mark is not None and mark.header is not None:
                self.read_wal(path, mark.header)
        except BaseException:
            self.close()
            raise

    def read_wal(self, path: str, index: bytes) -> None:
        """Lay the WAL's frames up to the index's mxFrame over the file (the index's own byte order: native)."""
        sz_page, mx_frame, n_page = struct.unpack("=HII", index[14:24])
        salts = index[32:40]          # the WAL header's bytes as they are (wal.c copies them)
        if n_page:
            self.pages = n_page
        if mx_frame == 0:
            return
        if (65536 if sz_page == 1 else sz_page) != self.page_size:
            raise ValueError("the WAL index names another page size")
        self.wal_fd = held_fd(f"{path}-wal")
        head = os.pread(self.wal_fd, 32, 0)
        if len(head) < 32 or struct.unpack(">I", head[:4])[0] not in WAL_MAGIC or head[16:24] != salts:
            raise ValueError("the WAL is not the one its index names")
        frame = 24 + self.page_size
        for i in range(mx_frame):
            at = 32 + i * frame
            fh = os.pread(self.wal_fd, 24, at)
            if len(fh) < 24 or fh[8:16] != head[16:24]:
                raise ValueError("a WAL frame the index names is not there")
            self.overlay[struct.unpack(">I", fh[:4])[0]] = at + 24

    def page(self, n: int) -> bytes:
        at = self.overlay.get(n)
        if at is not None and self.wal_fd is not None:
            data = os.pread(self.wal_fd, self.page_size, at)
        else:
            data = os.pread(self.fd, self.page_size, (n - 1) * self.page_size)
        if len(data) != self.page_size:
            raise ValueError(f"page {n} cannot be read whole")
        return data

    def raw(self, first: int, count: int) -> bytes:
        """Pages first..first+count-1 as one run of bytes, the WAL's frames laid over the file's (pages past the
        file's end are in the WAL: rows appended since the last checkpoint)."""
        data = os.pread(self.fd, count * self.page_size, (first - 1) * self.page_size)
        over = [n for n in range(first, first + count) if n in self.overlay] if self.overlay else []
        if len(data) == count * self.page_size and not over:
            return data
        whole = len(data) // self.page_size
        out = bytearray(data[:whole * self.page_size])
        out.extend(bytes(count * self.page_size - len(out)))
        for n in range(first + whole, first + count):
            if n not in self.overlay:
                raise ValueError(f"page {n} is past the file's end and in no WAL frame")
        for n in over:
            at = (n - first) * self.page_size
            out[at:at + self.page_size] = self.page(n)
        return bytes(out)

    def close(self) -> None:
        if not self.held:
            os.close(self.fd)


def btree(pages: Pages, root: int, leaf_kind: int, interior_kind: int) -> tuple[list[int], list[int]]:
    """(the leaf pages, the interior pages) of the b-tree rooted at root, leaves in key order, reading the
    interior pages only: a b-tree's leaves are all at one depth, so one child per level says whether the
    level below is the leaves (the caller checks each leaf's kind as it reads it). ValueError: not such a
    b-tree."""
    interiors: list[int] = []
    level = [root]
    while True:
        first = pages.page(level[0])
        kind = first[100 if level[0] == 1 else 0]
        if kind == leaf_kind:
            return level, interiors
        if kind != interior_kind:
            raise ValueError(f"page {level[0]} is not a page of the b-tree")
        below: list[int] = []
        for n in level:
            if n < 1 or n > pages.pages:
                raise ValueError(f"page {n} is not in the file")
            data = first if n == level[0] else pages.page(n)
            off = 100 if n == 1 else 0
            if data[off] != interior_kind:
                raise ValueError(f"page {n} is not an interior page of the b-tree")
            interiors.append(n)
            cells = struct.unpack(">H", data[off + 3:off + 5])[0]
            below += [int.from_bytes(data[p:p + 4], "big") for p in cell_offsets(data, off, 12, cells)]
            below.append(struct.unpack(">I", data[off + 8:off + 12])[0])
        if len(interiors) > pages.pages:
            raise ValueError("a b-tree with more pages than the file")
        level = below


def cell_offsets(data: bytes, off: int, header: int, cells: int) -> tuple[int, ...]:
    return struct.unpack_from(f">{cells}H", data, off + header)


def leaf_cells(data: bytes, n: int, usable: int) -> tuple[list[int], bool]:
    """(the rowids of a table leaf page's cells, whether every cell's payload is on the page itself)."""
    off = 100 if n == 1 else 0
    cells = struct.unpack(">H", data[off + 3:off + 5])[0]
    keys = []
    local = True
    max_local = usable - 35
    for p in cell_offsets(data, off, 8, cells):
        size, p = varint(data, p)
        key, _ = varint(data, p)
        keys.append(key - (1 << 64) if key >= 1 << 63 else key)        # a rowid is a signed 64-bit integer
        if size > max_local:
            local = False
    return keys, local


def candidates(live: str, copy: str, mark: WalMark, tables: dict[str, tuple[int, int]],
               indexes: dict[str, tuple[int, int]] | None = None) -> dict[str, tuple[set[int], set[int], int]] | None:
    """See the module's contract. tables: {name: (its root page live, its root page in the copy)}; indexes: the
    same for the indexes (their pages are told from overflow pages by them: see differing_rows)."""
    if mark.header is None or wal_frames(copy):
        return None             # not a WAL database (no snapshot to name), or a copy with frames in a WAL of its own
    try:
        a = Pages(live, mark, held=True)
    except (OSError, ValueError, struct.error):
        return None
    try:
        b = Pages(copy)
    except (OSError, ValueError, struct.error):
        a.close()
        return None
    try:
        if a.page_size != b.page_size or a.usable != b.usable:
            return None
        trees_a = {name: btree(a, root_a, 0x0D, 0x05) for name, (root_a, _) in tables.items()}
        trees_b = {name: btree(b, root_b, 0x0D, 0x05) for name, (_, root_b) in tables.items()}
        known = {1}             # page 1 (sqlite_master's root, and the file's header)
        for name, (root_a, root_b) in (indexes or {}).items():
            for pages, root in ((a, root_a), (b, root_b)):
                leaf_pages, interior = btree(pages, root, 0x0A, 0x02)
                known.update(leaf_pages, interior)
        for trees in (trees_a, trees_b):
            for leaf_pages, interior in trees.values():
                known.update(leaf_pages, interior)
        leaf_of = {n: name for name, (leaf_pages, _) in trees_a.items() for n in leaf_pages}
        differ, cells = differing_pages(a, b, leaf_of)
        whole = differ <= known     # no overflow (or free) page differs: a leaf the same is its rows the same
        out = {}
        for name in tables:
            keys_a, keys_b = table_keys(a, b, trees_a[name][0], set(trees_b[name][0]), differ, whole)
            out[name] = (keys_a, keys_b, sum(cells[n] for n in trees_a[name][0]))
        return out
    except (OSError, ValueError, IndexError, struct.error):
        return None
    finally:
        a.close()
        b.close()


def table_keys(a: Pages, b: Pages, leaves_a: list[int], leaves_b: set[int], differ: set[int], whole: bool
               ) -> tuple[set[int], set[int]]:
    """(the rowids on a's leaves that are not a leaf of b with the same bytes, and the other way round). whole:
    no overflow page differs; else a leaf the same counts only when every cell is on the page itself."""
    same = {n for n in leaves_a if n in leaves_b and n not in differ}
    if not whole:
        same = {n for n in same if leaf_cells(a.page(n), n, a.usable)[1]}
    keys_a: set[int] = set()
    for n in leaves_a:
        if n not in same:
            keys_a.update(leaf_cells(a.page(n), n, a.usable)[0])
    keys_b: set[int] = set()
    for n in leaves_b - same:
        keys_b.update(leaf_cells(b.page(n), n, b.usable)[0])
    return keys_a, keys_b


def wal_frames(path: str) -> bool:
    """Whether a WAL beside the file at path holds anything."""
    try:
        return os.path.getsize(f"{path}-wal") > 0
    except OSError:
        return False


def differing_pages(a: Pages, b: Pages, leaf_of: dict[int, str]) -> tuple[set[int], dict[int, int]]:
    """(the page numbers whose bytes differ between a and b, or that one of them lacks; {leaf page of a: its
    cells}), in one read of each, a run of pages at a time (one memcmp where the run is the same)."""
    differ = set(range(min(a.pages, b.pages) + 1, max(a.pages, b.pages) + 1))
    cells: dict[int, int] = {}
    ps = a.page_size
    leaves = sorted(leaf_of)
    at_leaf = 0
    first = 1
    last = min(a.pages, b.pages)
    while first <= last:
        count = min(READ_RUN, last - first + 1)
        run_a, run_b = a.raw(first, count), b.raw(first, count)
        if run_a != run_b:
            for i in range(count):
                if run_a[i * ps:(i + 1) * ps] != run_b[i * ps:(i + 1) * ps]:
                    differ.add(first + i)
        end = bisect.bisect_left(leaves, first + count, at_leaf)
        for n in leaves[at_leaf:end]:
            at = (n - first) * ps
            if run_a[at] != 0x0D:
                raise ValueError(f"page {n} is not a leaf of {leaf_of[n]}")
            cells[n] = struct.unpack_from(">H", run_a, at + 3)[0]
        at_leaf = end
        first += count
    for n in leaves[at_leaf:]:          # past the copy's end: read alone
        data = a.page(n)
        if data[0] != 0x0D:
            raise ValueError(f"page {n} is not a leaf of {leaf_of[n]}")
        cells[n] = struct.unpack_from(">H", data, 3)[0]
    return differ, cells


def pages_differing(conn: sqlite3.Connection, live: str | Path, copy: str, mark: WalMark, live_as: str = "live",
                    copy_as: str = "main") -> dict[str, tuple[set[int], set[int], int]] | None:
    """candidates() for every table both sides hold, the live database attached to conn as live_as and the copy
    as copy_as (root pages read in conn's read transaction), or None (then every row is compared)."""
    roots: dict[str, dict[tuple[str, str], int]] = {}
    for side in (live_as, copy_as):
        roots[side] = {(kind, name.lower()): root for kind, name, root in conn.execute(
            f"SELECT type, name, rootpage FROM {side}.sqlite_master WHERE type IN ('table', 'index') AND rootpage > 0")}
    if set(roots[live_as]) != set(roots[copy_as]):
        return None         # a table or an index on one side only: every row is compared
    theirs = roots[copy_as]
    tables = {name: (root, theirs[(kind, name)]) for (kind, name), root in roots[live_as].items() if kind == "table"}
    indexes = {name: (root, theirs[(kind, name)]) for (kind, name), root in roots[live_as].items() if kind == "index"}
    return candidates(str(live), copy, mark, tables, indexes)
