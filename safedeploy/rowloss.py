"""What an operation did to users' rows, counted by content (safedeploy.rowsets), for the records and
the messages of deploys and restores; and the salvage of a damaged database into a held copy.

The contract:
- `snapshot(env)`: the live rows' digests just before a new release first runs (the deploy's switch),
  or None when they cannot be read (the deploy goes on; the count then falls back to the backup's).
- `deleted(env, before, backup)`: per table, the rows that were live at the snapshot and are not live
  now (the release deleted them, or users did meanwhile), and how many of those no copy holds (written
  after the pre-deploy backup): ({table: n}, {table: n in no copy}).
- `lost(env, copy_path)`: per table, the rows of a copy (a pre-rollback save) that the live database
  lacks by content, bookkeeping tables left out.
- `leaving(env, backup, keep)`: the plan's count of the live rows a restore of backup takes out; with keep,
  also what the seal counts, the live files held open until the stop (PlanView; see
  decisions.plan_count_reusable for when the seal takes it).
- `salvage_into_copy(env, damaged, reason)`: what the damaged file still holds, as a verified, held
  backup in the env's backup folder (safedeploy.salvage), with the rows it found; None when nothing
  could be read.
Nothing here prints; nothing raises for a count it could not make (a count is a report).
"""

from __future__ import annotations

import sqlite3
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote as url_quote

from . import backups, dbfiles, ledger, rowcompare, rowdelta, rowpages, rowsets, salvage
from .files import make_private_dir
from .rowsets import TableRows


def snapshot(env) -> dict[str, TableRows] | None:
    try:
        return ledger.live_rows(env) if env.db.exists() else None
    except sqlite3.Error:
        return None


def deleted(env, before: dict[str, TableRows] | None, backup) -> tuple[dict[str, int], dict[str, int]]:
    if before is None:
        return counted_fewer(env, backup), {}
    try:
        now = ledger.live_rows(env)
        kept = ledger.copy_rows(env, ledger.Known(id="", time="", reason="", path=backup.path, sha256=backup.sha256)) \
            if backup is not None else {}
    except sqlite3.Error:
        return counted_fewer(env, backup), {}
    gone, uncopied = {}, {}
    for table, rows in before.items():
        live = now.get(table, TableRows())
        left = Counter(rows.digests) - Counter(live.digests)
        outside = sum((left - Counter(kept.get(table, TableRows()).digests)).values())
        since = written_and_gone(rows, live)
        if left or since:
            gone[table] = sum(left.values()) + since
        if outside or since:
            uncopied[table] = outside + since
    return gone, uncopied


def written_and_gone(before: TableRows, now: TableRows) -> int:
    """Rows written after the snapshot and deleted again before the count (the new release deleted them as it
    started): the keys handed out past the snapshot's largest that are not live. SQLite hands out the largest
    key plus one, so these are rows that were there; a key handed out again (no AUTOINCREMENT, the largest
    row deleted) hides one, so this is a lower bound where the largest rows went."""
    if not before.keys or not now.keys or not (before.ordered and now.ordered):
        return 0
    floor, top = max(before.keys), max(now.keys)
    live = {k for k in now.keys if k > floor}
    return max(0, (top - floor) - len(live))


def counted_fewer(env, backup) -> dict[str, int]:
    """The old measure, when digests cannot be read: tables holding fewer rows than the backup."""
    if backup is None or not isinstance(backup.rows, dict):
        return {}
    live = dbfiles.live_rows(env.db, bookkeeping=env.bookkeeping)
    return {t: n - live.get(t, 0) for t, n in backup.rows.items() if live is not None and live.get(t, 0) < n}


def lost(env, copy_path: str, sha256: str) -> dict[str, int]:
    try:
        quick = lost_by_delta(env, copy_path)
        if quick is not None:
            return quick
    except sqlite3.Error:
        pass
    known = ledger.Known(id=Path(copy_path).name, time="", reason="pre-rollback", path=copy_path, sha256=sha256)
    try:
        return ledger.compare_file(env, known, ledger.live_rows(env), None).missing
    except sqlite3.Error:
        return {}


def lost_quickly(env, copy_path: str | Path) -> dict[str, int] | None:
    """lost() by the rows that differ only (lost_by_delta), or None: then lost() compares every row."""
    try:
        return lost_by_delta(env, str(copy_path))
    except sqlite3.Error:
        return None


def attached(copy_path: str | Path, live: Path) -> sqlite3.Connection:
    """The copy (main) and the live database (live) on one read-only connection, in one read transaction
    (closing the connection ends it)."""
    conn = ledger.open_ro(copy_path)
    conn.execute("ATTACH DATABASE ? AS live", (f"file:{url_quote(str(live))}?mode=ro",))
    conn.execute("BEGIN")       # one read transaction: every statement sees the same moment of the live database
    return conn


def lost_by_delta(env, copy_path: str) -> dict[str, int] | None:
    """lost(), reading only the rows that differ between the copy and the live database (safedeploy.rowdelta);
    None where that cannot stand for the comparison of every row."""
    conn = attached(copy_path, env.db)
    try:
        found = rowdelta.delta(conn, "main", "live", tuple(env.bookkeeping))
        if found is None:
            return None
        return missing_in(conn, found, "main", "live", tuple(env.bookkeeping))
    finally:
        conn.close()


def missing_in(conn: sqlite3.Connection, found: dict[str, rowdelta.TableDelta], copy_db: str, live_db: str,
               bookkeeping: tuple[str, ...]) -> dict[str, int]:
    """Per table, the rows of copy_db that live_db lacks (rowcompare's rules, classify included), from a delta
    of copy_db (its side a) against live_db."""
    mine = rowsets.read_schema(conn, copy_db, bookkeeping)
    theirs = rowsets.read_schema(conn, live_db, bookkeeping)
    missing = {}
    for name, d in found.items():
        copy_table, live_table = mine.table(name), theirs.table(name)    # delta found it on both sides
        diff = rowcompare.compare(d.a, d.b)
        diff = rowcompare.classify(conn, copy_table, live_table, rowsets.pair_tables(copy_table, live_table),
                                   d.a, d.b, diff, copy_db=copy_db, live_db=live_db, same_top=d.same_top)
        if diff.missing:
            missing[copy_table.name] = len(diff.missing)
    return missing


class PlanView:
    """What a rollback's plan found in the live database, with a read-only connection held open until the app is
    stopped (while it is open, no connection of the app that closes last checkpoints and removes the WAL: the
    files stay as the plan saw them unless something commits). lost: the live rows the point's copy lacks, as
    the seal counts them (missing_in: the set-aside file against the restored copy as it goes in); rows:
    count_rows of the live database; integrity: its integrity_check verdict; at_plan, after_plan: its WalMark
    before and after all three; at_stop: the mark once the app is stopped (stopped()). close() is idempotent."""

    def __init__(self, conn: sqlite3.Connection, at_plan: dbfiles.WalMark | None, after_plan: dbfiles.WalMark,
                 lost: dict[str, int], rows: dict[str, int], integrity: str) -> None:
        self.conn: sqlite3.Connection | None = conn
        self.at_plan, self.after_plan = at_plan, after_plan
        self.at_stop: dbfiles.WalMark | None = None
        self.lost, self.rows, self.integrity = lost, rows, integrity
        self.held_open = True

    def stopped(self, db_path) -> None:
        """The app is stopped: take the mark, then let go of the live files."""
        if self.conn is not None:
            self.at_stop = dbfiles.wal_mark(db_path)
        self.close()

    def close(self) -> None:
        if self.conn is not None:
            if self.at_stop is None:
                self.held_open = False      # closed before the stop: the plan's count cannot be vouched for
            self.conn.close()
            self.conn = None


def hold(backup) -> None:
    """Mark a copy held: it holds rows an operation took out of the live database; prune keeps it."""
    backups.set_held(backup, True)


def salvage_into_copy(env, damaged: Path, commit: str, reason: str = "salvaged"):
    """(the held backup of what damaged still holds, salvage.Salvaged) or (None, why)."""
    folder = make_private_dir(env.backup_dir)
    with tempfile.TemporaryDirectory(prefix=".salvage-", dir=folder) as scratch:
        out = Path(scratch) / "salvaged.sqlite3"
        try:
            found = salvage.salvage(Path(damaged), out)
        except (salvage.Unsalvageable, OSError, sqlite3.Error, ValueError) as exc:
            return None, str(exc)
        backup = backups.backup_database(out, folder, env.name, reason, commit=commit, bookkeeping=env.bookkeeping)
    hold(backup)
    return backup, found


@dataclass
class Leaving:
    """What a restore of a copy takes out of the live database."""
    rows: dict[str, int] = field(default_factory=dict)       # live rows the copy lacks, by content
    changed: dict[str, int] = field(default_factory=dict)    # live rows updated since the copy (same key)
    unreadable: bool = False                                 # the live database cannot be read: salvaged instead
    salvage: dict | None = None                              # datafacts.preview_salvage's findings
    view: PlanView | None = None                             # leaving(keep=True): what the seal may take
    seal: tuple[dict[str, int], dict[str, int]] | None = None    # leaving_by_delta(keep=True): lost, rows
    narrowed: bool = False                                   # only the rows off the shared pages were compared


def leaving(env, backup, keep: bool = False) -> Leaving:
    """The rows a restore of backup takes out of the live database (all kept in the pre-rollback copy). keep: the
    plan goes on to the stop without a prompt: count also what the seal would count (the rows per table, the
    rows lost as the seal counts them) and run integrity_check rather than quick_check, between two marks of
    the live files, which a connection held open keeps as they are (Leaving.view: a PlanView for the seal,
    which the caller closes)."""
    from . import datafacts     # datafacts reads the ledger as this module does; imported where needed
    quick, verdict = compared(env, backup, keep)
    readable = verdict == "ok"
    if readable and quick is not None:
        return quick
    if not readable:
        best = datafacts.Outstanding(id="", path=backup.path, where="local", reason=backup.reason, time=backup.time,
                                     held=False, total=None, missing={})
        return Leaving(unreadable=True, salvage=datafacts.preview_salvage(env, best))
    try:
        same, _, _ = ledger.same_schema(backup.path, env.db, tuple(env.bookkeeping))
        if same:
            live = ledger.live_rows(env)
            kept = ledger.copy_rows(env, ledger.Known(id="", time="", reason="", path=backup.path, sha256=backup.sha256))
        else:
            kept, live = ledger.paired_rows(env, ledger.Known(id="", time="", reason="", path=backup.path,
                                                              sha256=backup.sha256),
                                            *ledger.same_schema(backup.path, env.db, tuple(env.bookkeeping))[1:], None)
    except sqlite3.Error:
        return Leaving()
    out = Leaving()
    for table, rows in live.items():
        diff = rowcompare.compare(rows, kept.get(table))
        if diff.missing:
            out.rows[table] = len(diff.missing)
        if diff.candidates:
            out.changed[table] = len(diff.candidates)
    return out


def compared(env, backup, keep: bool) -> tuple[Leaving | None, str]:
    """(leaving_by_delta's answer, with its PlanView when keep; the live database's quick_check, or with keep
    integrity_check, verdict), the two at once."""
    holder, at_plan = hold_open(env.db) if keep else (None, None)
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:     # SQLite lets go of the GIL: the check and the rows at once
            check = pool.submit(dbfiles.integrity_of, env.db, not keep)
            try:
                quick = leaving_by_delta(env, backup, keep, at_plan)
            except sqlite3.Error:
                quick = None
            verdict = check.result()
        after_plan = dbfiles.wal_mark(env.db) if holder is not None else None
        if quick is not None and quick.narrowed and after_plan != at_plan:
            try:        # a commit while the pages were read: they may be a mixture; compare every row instead
                quick = leaving_by_delta(env, backup)
            except sqlite3.Error:
                quick = None
        if holder is not None and after_plan is not None and verdict == "ok" and quick is not None \
                and quick.seal is not None:
            quick.view = PlanView(holder, at_plan, after_plan, *quick.seal, integrity=verdict)
            holder = None
    finally:
        if holder is not None:
            holder.close()
    return quick, verdict


def hold_open(db_path) -> tuple[sqlite3.Connection | None, dbfiles.WalMark | None]:
    """(a read-only connection to the live database that has read it once: its files are held from here on,
    so that no connection of the app, closing last, checkpoints and removes the WAL; the WalMark taken after
    that read), or (None, None) when it cannot be opened."""
    try:
        conn = ledger.open_ro(db_path)
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.Error:
        return None, None
    return conn, dbfiles.wal_mark(db_path)


def leaving_by_delta(env, backup, keep: bool = False, mark: dbfiles.WalMark | None = None) -> Leaving | None:
    """leaving(), reading only the rows that differ between the live database and the copy (safedeploy.rowdelta);
    None where that cannot stand for the comparison of every row. keep: also what the seal counts, in the same
    read transaction (Leaving.seal: (the rows lost, the rows per table)). mark: the live database's WalMark
    before this read (leaving(keep=True)): then only the rows off the pages the two files share are compared
    (safedeploy.rowpages; Leaving.narrowed), and the caller checks the mark is unchanged after."""
    conn = attached(backup.path, env.db)
    bookkeeping = tuple(env.bookkeeping)
    try:
        among = rowpages.pages_differing(conn, env.db, backup.path, mark) if mark is not None else None
        found = rowdelta.delta(conn, "live", "main", bookkeeping, among)
        if found is None:
            return None
        out = Leaving(narrowed=among is not None)
        for table, d in found.items():
            diff = rowcompare.compare(d.a, d.b)
            if diff.missing:
                out.rows[table] = len(diff.missing)
            if diff.candidates:
                out.changed[table] = len(diff.candidates)
        if keep:
            schema = rowsets.read_schema(conn, "live", bookkeeping)
            rows = ({t.name: among[t.name.lower()][2] for t in schema.users} if among is not None
                    else dbfiles.count_rows(conn, "live", bookkeeping))
            out.seal = (missing_in(conn, found, "live", "main", bookkeeping), rows)
        return out
    finally:
        conn.close()
