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
- Reads only; nothing here writes to a file or prints.
"""

from __future__ import annotations

import os
import struct

from .dbfiles import WalMark

WAL_MAGIC = (0x377F0682, 0x377F0683)
READ_RUN = 2048         # pages read at once where leaves are consecutive


class Pages:
    """A database's pages as one snapshot sees them: the file, with the WAL's frames 1..mx_frame over it."""

    def __init__(self, path: str, mark: WalMark | None = None) -> None:
        self.fd = os.open(path, os.O_RDONLY)
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
        self.wal_fd = os.open(f"{path}-wal", os.O_RDONLY)
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

    def run(self, first: int, count: int) -> list[bytes]:
        """Pages first..first+count-1, read at once from the file where no WAL frame stands over them."""
        if any(n in self.overlay for n in range(first, first + count)):
            return [self.page(n) for n in range(first, first + count)]
        data = os.pread(self.fd, count * self.page_size, (first - 1) * self.page_size)
        if len(data) != count * self.page_size:
            raise ValueError(f"pages {first}..{first + count - 1} cannot be read whole")
        ps = self.page_size
        return [data[i * ps:(i + 1) * ps] for i in range(count)]

    def close(self) -> None:
        for fd in (self.fd, self.wal_fd):
            if fd is not None:
                os.close(fd)
        self.wal_fd = None


def varint(data: bytes, at: int) -> tuple[int, int]:
    """SQLite's varint at data[at:]: (value, the offset after it)."""
    value = 0
    for i in range(8):
        b = data[at + i]
        value = (value << 7) | (b & 0x7F)
        if b < 0x80:
            return value, at + i + 1
    return (value << 8) | data[at + 8], at + 9


def leaves(pages: Pages, root: int) -> list[int]:
    """The leaf pages of the table b-tree rooted at root, in key order. ValueError: not a table b-tree."""
    out: list[int] = []
    todo = [root]
    seen = set()
    while todo:
        n = todo.pop()
        if n in seen or n < 1 or n > pages.pages:
            raise ValueError(f"page {n} is not in the table's b-tree")
        seen.add(n)
        data = pages.page(n)
        off = 100 if n == 1 else 0
        kind = data[off]
        if kind == 0x0D:
            out.append(n)
            continue
        if kind != 0x05:
            raise ValueError(f"page {n} is not a page of a table b-tree")
        cells = struct.unpack(">H", data[off + 3:off + 5])[0]
        children = [struct.unpack(">I", data[p:p + 4])[0] for p in cell_offsets(data, off, 12, cells)]
        children.append(struct.unpack(">I", data[off + 8:off + 12])[0])
        todo.extend(reversed(children))      # popped in key order
    return out


def cell_offsets(data: bytes, off: int, header: int, cells: int) -> list[int]:
    start = off + header
    return [struct.unpack(">H", data[start + 2 * i:start + 2 * i + 2])[0] for i in range(cells)]


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
        keys.append(key)
        if size > max_local:
            local = False
    return keys, local


def candidates(live: str, copy: str, mark: WalMark, tables: dict[str, tuple[int, int]]
               ) -> dict[str, tuple[set[int], set[int], int]] | None:
    """See the module's contract. tables: {name: (its root page live, its root page in the copy)}."""
    if mark.header is None or wal_frames(copy):
        return None             # not a WAL database (no snapshot to name), or a copy with frames in a WAL of its own
    try:
        a = Pages(live, mark)
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
        out = {}
        for name, (root_a, root_b) in tables.items():
            leaves_a, leaves_b = leaves(a, root_a), leaves(b, root_b)
            out[name] = differing_rows(a, b, leaves_a, set(leaves_b))
        return out
    except (OSError, ValueError, IndexError, struct.error):
        return None
    finally:
        a.close()
        b.close()


def wal_frames(path: str) -> bool:
    """Whether a WAL beside the file at path holds anything."""
    try:
        return os.path.getsize(f"{path}-wal") > 0
    except OSError:
        return False


def differing_rows(a: Pages, b: Pages, leaves_a: list[int], leaves_b: set[int]) -> tuple[set[int], set[int], int]:
    """(rowids on a's leaves not the same page in b, rowids on b's leaves not the same page in a, a's rows)."""
    keys_a: set[int] = set()
    same: set[int] = set()
    rows = 0
    for first, count in runs(leaves_a):
        pages_a = a.run(first, count)
        in_b = [first + i for i in range(count) if first + i in leaves_b and first + i <= b.pages]
        pages_b = dict(zip(range(first, first + count), b.run(first, count))) if len(in_b) == count else \
            {n: b.page(n) for n in in_b}
        for i, data in enumerate(pages_a):
            n = first + i
            keys, local = leaf_cells(data, n, a.usable)
            rows += len(keys)
            if local and pages_b.get(n) == data:
                same.add(n)
            else:
                keys_a.update(keys)
    keys_b: set[int] = set()
    for n in sorted(leaves_b - same):
        keys, _ = leaf_cells(b.page(n), n, b.usable)
        keys_b.update(keys)
    return keys_a, keys_b, rows


def runs(numbers: list[int]) -> list[tuple[int, int]]:
    """Consecutive page numbers as (first, count), at most READ_RUN pages each."""
    out: list[tuple[int, int]] = []
    for n in sorted(numbers):
        if out and out[-1][0] + out[-1][1] == n and out[-1][1] < READ_RUN:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((n, 1))
    return out
