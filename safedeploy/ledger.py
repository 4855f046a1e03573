"""The row ledger of an env: which users' rows the copies the tool holds or knows have that the live
database lacks, compared by content (safedeploy.rowsets, safedeploy.rowcompare).

The contract:
- `look(env, copies, dismissed)` returns a Ledger: for each copy it compares, the rows (per table) that
  no live row holds (`missing`: they can come back), the rows the live database has under the same key,
  updated since (`changed`: reported only), and which copies it did not need to compare and why.
- Which copies count: every copy held by a restore (a pre-rollback save, a salvaged copy, the pre-deploy
  copy of a release that deleted rows: `held` in its manifest), and every copy that no later copy
  continues. A later ordinary copy continues an earlier one when it holds at least half of the earlier
  one's rows (by content when both are known here, else by count): users deleting a few rows between two
  nightlies is the app at work, and the later copy supersedes the earlier; a fresh database backed up on
  a rebuilt host holds none of the old rows, and the old copy stays a head. The newest copy is always a
  head: rows users deleted since it was made show until the next backup (or until dismissed).
- A copy the operator dismissed (`backup.py --release-hold FILE`: the rows were deleted on purpose) never
  counts. Bookkeeping tables (`bookkeeping_tables`), virtual and shadow tables never count.
- Cost: each copy's digests are computed once and kept beside the state (`STATE_DIR/ledger/`, 0600, a
  checksum detects a torn file, which is then computed again), keyed by the copy's sha256; the live
  database's, keyed by the identity of its files (device, inode, size, mtime of the file and its WAL),
  so a look at an unchanged database reads no row. After a write, the live digests are the newest local
  copy's kept ones with only the rows that differ between the two files read again (rows_from_base:
  the pages the files share are skipped, see safedeploy.rowpages and rowdelta), or every row where that
  cannot stand (another schema, a natural key). A copy only off-site, with no digests here, is
  compared by count: what it holds beyond the live count is a lower bound of what is missing.
- Nothing here prints or writes to a database; the live database is opened read-only.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from array import array
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote as url_quote

from . import dbfiles, rowcompare, rowdelta, rowsets
from .files import make_private_dir, remove_quietly, write_atomic
from .rowsets import Schema, TableRows

CACHE_VERSION = 3
CONTINUES = 0.5           # a later copy holding this share of an earlier one's rows continues it
NOT_A_CONTINUATION = ("pre-rollback", "salvaged", "point-in-time")      # copies that never supersede another


@dataclass(frozen=True)
class Known:
    """A copy the ledger may look at (a local backup, or an off-site copy not here)."""
    id: str
    time: str
    reason: str
    path: str | None = None                 # the file, when it is on this host
    sha256: str | None = None
    rows: dict[str, int] | None = None      # users' rows per table, from its manifest (None: not counted)
    held: bool = False
    where: str = "local"                    # "local" or "off-site"

    @property
    def total(self) -> int | None:
        return sum(self.rows.values()) if isinstance(self.rows, dict) else None


@dataclass(frozen=True)
class Outside:
    """What one copy holds that the live database lacks."""
    copy: Known
    missing: dict[str, int]                 # rows by content no live row has: they can come back
    changed: dict[str, int] = field(default_factory=dict)    # live under the same key, updated since
    by_count: bool = False                  # compared by count only: missing is a lower bound
    not_live: tuple[str, ...] = ()          # its tables the live schema lacks

    @property
    def missing_total(self) -> int:
        return sum(self.missing.values())

    def describe(self) -> str:
        parts = ", ".join(f"{n} row(s) of {t}" for t, n in sorted(self.missing.items()))
        bound = "at least " if self.by_count else ""
        return f"{bound}{parts}"


@dataclass
class Ledger:
    """The row ledger: for each copy compared (held copies and heads; off-site-only ones by count), the rows it
    holds that the live database lacks; the copies superseded or dismissed; why not every copy was compared."""
    live: dict[str, int] | None             # users' rows per table live (None: the live database unreadable)
    compared: list[Outside] = field(default_factory=list)
    superseded: dict[str, str] = field(default_factory=dict)      # copy id -> the copy that continues it
    dismissed: list[str] = field(default_factory=list)
    incomplete: str = ""                    # why not every copy was compared (time)
    seconds: float = 0.0

    @property
    def outstanding(self) -> list[Outside]:
        return [o for o in self.compared if o.missing_total]


# -- the cache ---------------------------------------------------------------------------------------
def cache_dir(state_dir: Path) -> Path | None:
    """The digests' cache folder, or None where it cannot be made (a file in its place, a state disk full or
    read-only, a folder another user owns): the look reads the rows and keeps nothing."""
    try:
        return make_private_dir(Path(state_dir) / "ledger")
    except OSError:
        return None


def save_rows(path: Path, rows: dict[str, TableRows], identity: str) -> None:
    payload = bytearray()
    tables = {}
    for name, t in rows.items():
        tables[name] = [len(t.digests), t.ordered]
        payload += array("q", t.keys).tobytes() + array("q", t.digests).tobytes()
    head = {"v": CACHE_VERSION, "identity": identity, "tables": tables,
            "blake2b": hashlib.blake2b(bytes(payload), digest_size=16).hexdigest()}
    write_atomic(path, json.dumps(head).encode() + b"\n" + bytes(payload))


def load_rows(path: Path, identity: str) -> dict[str, TableRows] | None:
    """The rows kept at path for identity, or None (none, another identity, or torn: computed again)."""
    try:
        data = path.read_bytes()
        head_end = data.index(b"\n")
        head = json.loads(data[:head_end])
    except (OSError, ValueError):
        return None
    payload = data[head_end + 1:]
    if (not isinstance(head, dict) or head.get("v") != CACHE_VERSION or head.get("identity") != identity
            or hashlib.blake2b(payload, digest_size=16).hexdigest() != head.get("blake2b")):
        return None
    out, at = {}, 0
    for name, (n, ordered) in head["tables"].items():
        size = 8 * n
        keys, digests = array("q"), array("q")
        keys.frombytes(payload[at:at + size])
        digests.frombytes(payload[at + size:at + 2 * size])
        at += 2 * size
        out[name] = TableRows(list(keys), list(digests), bool(ordered))
    return out


def file_identity(db: Path) -> str:
    """Device, inode, size and mtime of the database and its WAL: unchanged, the rows are unchanged."""
    parts = []
    for suffix in ("", "-wal"):
        try:
            st = os.stat(f"{db}{suffix}")
            parts.append(f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}")
        except FileNotFoundError:
            parts.append("-")
    return "|".join(parts)


def open_ro(path: str | Path) -> sqlite3.Connection:
    conn = sqlite3.connect(f"file:{url_quote(str(path))}?mode=ro", uri=True, timeout=10, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 10000")
    return conn


def rows_of(path: str | Path, bookkeeping: tuple[str, ...], deadline: float | None = None
            ) -> tuple[Schema, dict[str, TableRows]]:
    """The schema and digests of the database at path (read-only); sqlite3.Error when unreadable, or
    sqlite3.OperationalError ("interrupted") past deadline."""
    conn = open_ro(path)
    try:
        if deadline is not None:
            conn.set_progress_handler(lambda: 1 if time.monotonic() > deadline else 0, 20000)
        schema = rowsets.read_schema(conn, "main", bookkeeping)
        return schema, rowsets.digests(conn, schema)
    finally:
        conn.close()


def cached_rows(cache: Path | None, name: str, identity: str, path: str | Path, bookkeeping: tuple[str, ...],
                deadline: float | None = None,
                quicker: Callable[[], dict[str, TableRows] | None] | None = None) -> dict[str, TableRows]:
    """The rows kept for identity, else quicker()'s (None: it cannot say), else every row read; kept."""
    kept = cache / f"{name}.rows" if cache is not None else None
    identity = f"{identity}|{','.join(sorted(bookkeeping))}"
    found = load_rows(kept, identity) if kept is not None else None
    if found is not None:
        return found
    found = quicker() if quicker is not None else None
    if found is None:
        _, found = rows_of(path, bookkeeping, deadline)
    if kept is not None:
        try:
            save_rows(kept, found, identity)
        except Exception:           # a full state disk costs the cache, never the look
            remove_quietly(kept)
    return found


def live_rows(env, deadline: float | None = None,
              base: tuple[Known, dict[str, TableRows]] | None = None) -> dict[str, TableRows]:
    """The live database's digests: kept ones while its files are unchanged; else, with base (a local copy and
    its digests), the copy's digests with only the rows that differ read again (rows_from_base); else every
    row read."""
    cache = cache_dir(env.state_dir)
    quicker = (lambda: rows_from_base(env, *base, deadline)) if base is not None else None
    return cached_rows(cache, f"live-{env.name}", file_identity(env.db), env.db, tuple(env.bookkeeping), deadline,
                       quicker)


def rows_from_base(env, base: Known, rows: dict[str, TableRows], deadline: float | None
                   ) -> dict[str, TableRows] | None:
    """The live database's digests from a copy's kept ones and the rows that differ between the two files
    (safedeploy.rowdelta): the same as reading every live row, in a time that grows with what changed. The rows
    that can differ are first narrowed by the pages the two files share (safedeploy.rowpages), which holds
    only when nothing was committed from before the read transaction began to after the pages were read (the
    WalMark the same); else the delta compares every row, in C, in that same read transaction. None where this
    cannot stand for reading every row (another schema, a key or a reference rowdelta cannot follow, a file
    that cannot be read). rows: the copy's digests."""
    bookkeeping = tuple(env.bookkeeping)
    if not base.path:
        return None
    try:
        conn = open_ro(base.path)
    except sqlite3.Error:
        return None
    try:
        if deadline is not None:
            conn.set_progress_handler(lambda: 1 if time.monotonic() > deadline else 0, 20000)
        conn.execute("ATTACH DATABASE ? AS live", (f"file:{url_quote(str(env.db))}?mode=ro",))
        mark = dbfiles.wal_mark(env.db)
        conn.execute("BEGIN")       # one read transaction: every statement sees the same moment of both files
        conn.execute("SELECT count(*) FROM live.sqlite_master").fetchone()
        found = rowdelta.narrowed(conn, env.db, base.path, bookkeeping, mark)
    except sqlite3.OperationalError as exc:
        if "interrupt" in str(exc):
            raise
        return None
    except sqlite3.Error:
        return None
    finally:
        conn.close()
    return rowdelta.rows_after(rows, found) if found is not None else None


def copy_rows(env, copy: Known, deadline: float | None = None) -> dict[str, TableRows]:
    return cached_rows(cache_dir(env.state_dir), f"copy-{copy.sha256}", copy.sha256 or "", copy.path or "",
                       tuple(env.bookkeeping), deadline)


def remember(env, path: str | Path, sha256: str) -> None:
    """Keep the digests of a copy just made (a backup run warms the cache, so later looks read no row of it)."""
    try:
        copy_rows(env, Known(id="", time="", reason="", path=str(path), sha256=sha256))
    except sqlite3.Error:
        pass


# -- one copy against live -------------------------------------------------------------------------
def same_schema(copy_path: str, live_path: Path, bookkeeping: tuple[str, ...]) -> tuple[bool, Schema, Schema]:
    conn = open_ro(copy_path)
    try:
        conn.execute("ATTACH DATABASE ? AS live", (f"file:{url_quote(str(live_path))}?mode=ro",))
        mine = rowsets.read_schema(conn, "main", bookkeeping)
        theirs = rowsets.read_schema(conn, "live", bookkeeping)
    finally:
        conn.close()
    return mine.same_users_as(theirs), mine, theirs


def compare_file(env, copy: Known, live: dict[str, TableRows] | None, deadline: float | None) -> Outside:
    """A copy on this host against the live database, row by row (see rowcompare)."""
    bookkeeping = tuple(env.bookkeeping)
    same, mine, theirs = same_schema(copy.path or "", env.db, bookkeeping)
    if same and live is not None:
        rows, live_side = copy_rows(env, copy, deadline), live
    else:
        rows, live_side = paired_rows(env, copy, mine, theirs, deadline)
    missing, changed, not_live = {}, {}, []
    conn = open_ro(copy.path or "")
    try:
        conn.execute("ATTACH DATABASE ? AS live", (f"file:{url_quote(str(env.db))}?mode=ro",))
        for name, table_rows in rows.items():
            copy_table, live_table = mine.table(name), theirs.get(name)
            if live_table is None or live_table.kind != rowsets.USERS:
                not_live.append(copy_table.name)
                if table_rows.digests:
                    missing[copy_table.name] = len(table_rows.digests)
                continue
            pairing = rowsets.pair_tables(copy_table, live_table)
            if copy_table.own and not pairing.copy.own:         # no column in common: nothing can be compared
                not_live.append(copy_table.name)
                missing[copy_table.name] = len(table_rows.digests)
                continue
            diff = rowcompare.compare(table_rows, live_side.get(name))
            diff = rowcompare.classify(conn, copy_table, live_table, pairing, table_rows, live_side[name], diff,
                                       copy_db="main", live_db="live")
            if diff.missing:
                missing[copy_table.name] = len(diff.missing)
            if diff.changed:
                changed[copy_table.name] = len(diff.changed)
    finally:
        conn.close()
    return Outside(copy, missing, changed, False, tuple(not_live))


def paired_rows(env, copy: Known, mine: Schema, theirs: Schema, deadline: float | None
                ) -> tuple[dict[str, TableRows], dict[str, TableRows]]:
    """Digests of both sides over the columns they share (a copy from before or after a migration)."""
    pairs = {t.name.lower(): rowsets.pair_tables(t, twin) for t, twin in mine.users_also_in(theirs)}
    conn = open_ro(copy.path or "")
    try:
        if deadline is not None:
            conn.set_progress_handler(lambda: 1 if time.monotonic() > deadline else 0, 20000)
        conn.execute("ATTACH DATABASE ? AS live", (f"file:{url_quote(str(env.db))}?mode=ro",))
        copy_side = rowsets.digests(conn, mine, "main", {k: p.copy for k, p in pairs.items()})
        if any(t.name.lower() not in pairs for t in mine.users):      # tables the live schema lacks: all of them
            whole = rowsets.digests(conn, mine, "main")
            copy_side.update({k: v for k, v in whole.items() if k not in pairs})
        live_side = rowsets.digests(conn, theirs, "live", {k: p.live for k, p in pairs.items()})
    finally:
        conn.close()
    return copy_side, live_side


def compare_counts(copy: Known, live: dict[str, int] | None) -> Outside:
    """An off-site copy with no digests here: per table, what it holds beyond the live count."""
    rows = copy.rows or {}
    missing = {t: n - (live or {}).get(t.lower(), 0) for t, n in rows.items() if n > (live or {}).get(t.lower(), 0)}
    return Outside(copy, missing, {}, True)


# -- which copies count ------------------------------------------------------------------------------
def continues(later: Known, earlier: Known, env, known_rows: dict[str, dict[str, TableRows]]) -> bool:
    """Whether the later ordinary copy holds at least half of the earlier one's rows."""
    if earlier.total is None or later.total is None:
        return True             # made before copies counted their rows: nothing to go on, as before
    if earlier.total == 0:
        return True
    a, b = known_rows.get(earlier.id), known_rows.get(later.id)
    if a is not None and b is not None:
        kept = 0
        for name, rows in a.items():
            other = b.get(name)
            if other is not None:
                left = dict.fromkeys(other.digests, 0)
                for d in other.digests:
                    left[d] += 1
                for d in rows.digests:
                    if left.get(d, 0) > 0:
                        left[d] -= 1
                        kept += 1
        return kept >= CONTINUES * earlier.total
    return later.total >= CONTINUES * earlier.total


def heads(env, copies: list[Known], known_rows: dict[str, dict[str, TableRows]]) -> tuple[list[Known], dict[str, str]]:
    """(the copies that count, {superseded copy id: the copy that continues it}), newest first."""
    ordered = sorted(copies, key=lambda c: c.time)
    superseded: dict[str, str] = {}
    for i, copy in enumerate(ordered):
        if copy.held:
            continue
        later = next((c for c in ordered[i + 1:] if c.reason not in NOT_A_CONTINUATION), None)
        if later is not None and continues(later, copy, env, known_rows):
            superseded[copy.id] = later.id
    return [c for c in reversed(ordered) if c.id not in superseded], superseded


def kept_digests(env, copies: list[Known]) -> dict[str, dict[str, TableRows]]:
    """{copy id: its digests} for the copies on this host whose digests are kept (none is computed here)."""
    cache = cache_dir(env.state_dir)
    out = {}
    for c in copies:
        if c.path and c.sha256 and cache is not None:
            rows = load_rows(cache / f"copy-{c.sha256}.rows", f"{c.sha256}|{','.join(sorted(env.bookkeeping))}")
            if rows is not None:
                out[c.id] = rows
    return out


def look(env, copies: list[Known], dismissed: AbstractSet[str] = frozenset(), seconds: float = 60.0) -> Ledger:
    """The ledger of env (see the module's contract). copies: local and off-site, deduplicated by the caller."""
    start = time.monotonic()
    deadline = start + seconds
    ledger = Ledger(live=None)
    kept = [c for c in copies if not (c.sha256 and c.sha256 in dismissed) and c.id not in dismissed]
    ledger.dismissed = [c.id for c in copies if c not in kept]
    known_rows = kept_digests(env, kept)
    base = max((c for c in kept if c.id in known_rows and c.path and os.path.exists(c.path)),
               key=lambda c: c.time, default=None)      # the newest copy here with its digests kept
    live: dict[str, TableRows] | None = None
    try:
        live = live_rows(env, deadline, (base, known_rows[base.id]) if base is not None else None)
        ledger.live = {k: len(v.digests) for k, v in live.items()}
    except sqlite3.OperationalError as exc:
        if "interrupt" in str(exc):
            ledger.incomplete = f"the live database's rows could not be read within {seconds:g}s"
            return ledger
    except sqlite3.Error:
        pass                    # unreadable: every copy's rows are outside it
    if live is None:
        known_rows = {}
    counting, ledger.superseded = heads(env, kept, known_rows)
    for c in counting:
        try:
            if c.path and live is not None and os.path.exists(c.path):
                ledger.compared.append(compare_file(env, c, live, deadline))
            else:
                ledger.compared.append(compare_counts(c, ledger.live))
        except sqlite3.OperationalError as exc:
            if "interrupt" in str(exc):
                ledger.incomplete = f"{c.id} could not be compared within {seconds:g}s"
                break
            ledger.compared.append(compare_counts(c, ledger.live))
        except sqlite3.Error:
            ledger.compared.append(compare_counts(c, ledger.live))
    ledger.seconds = round(time.monotonic() - start, 3)
    return ledger
