"""What status needs to know about an env's data, gathered once: the live database (there, readable,
its users' rows), the row ledger over every copy the tool holds or knows (safedeploy.ledger), what each
copy that holds rows the live database lacks could put back (safedeploy.rowrestore's plan), what a
damaged database still holds (safedeploy.salvage, counted into a scratch file), the last deploy whose
release deleted rows, and the restores the operator tried that failed.

The contract: `gather(config, env, local, records, running, offsite_copies)` returns DataFacts, which
safedeploy.diagnosis turns into problems and advice. It reads; it writes nothing but the ledger's cache
(STATE_DIR/ledger/) and scratch files in a private temporary folder. Nothing here prints.
"""

from __future__ import annotations

import json
import sqlite3
import tempfile
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from . import dbfiles, ledger, rowrestore, rowsets, salvage
from .errors import DeployError
from .files import make_private_dir, write_atomic
from .points import backup_id
from .state import JsonLog, parse_time

CHECK_AGAIN = 3600.0
NOT_A_WHOLE_RESTORE = ("pre-rollback", "salvaged")       # copies whose rows come back row by row, never whole


@dataclass(frozen=True)
class Outstanding:
    """A copy holding users' rows the live database lacks."""
    id: str
    path: str | None
    where: str                  # "local" or "off-site"
    reason: str
    time: str
    held: bool
    total: int | None           # the rows the copy holds
    missing: dict[str, int]     # rows by content no live row has
    by_count: bool = False      # off-site only: a lower bound, by count
    restorable: int | None = None          # what --restore-rows would put back now (None: not planned here)
    left_out: dict[str, int] = field(default_factory=dict)      # why -> rows it cannot put back

    @property
    def missing_total(self) -> int:
        return sum(self.missing.values())

    @property
    def bulk(self) -> bool:
        """The live database lacks at least half of what this copy holds: a whole restore, not rows."""
        return bool(self.total) and self.missing_total >= ledger.CONTINUES * (self.total or 0)


@dataclass
class DataFacts:
    """What status knows of an env's data: the live database, its rows, and the copies that hold rows it lacks."""
    db_exists: bool = True
    db_check: str = "ok"
    live_rows: int | None = None            # users' rows live (None: not counted)
    outstanding: list[Outstanding] = field(default_factory=list)
    best: Outstanding | None = None         # the copy a whole restore would go to (most rows, newest)
    salvage: dict | None = None             # a damaged database: {"rows", "lost_and_found", "bad_pages"} or {"error"}
    deleted_by: dict | None = None          # {"tag", "to", "backup", "rows", "uncopied", "switched_at"}
    failed_restores: dict[str, str] = field(default_factory=dict)     # copy id -> the error of the last try
    incomplete: str = ""


def quick_check(env) -> str:
    """quick_check's verdict of the live database, kept by the identity of its files (an unchanged 1 GB
    database is not read again on the next look), and checked again at least every CHECK_AGAIN seconds
    (damage that changes no file time: the disk itself)."""
    kept = make_private_dir(env.state_dir / "ledger") / f"check-{env.name}.json"
    identity = ledger.file_identity(env.db)
    try:
        data = json.loads(kept.read_text())
        fresh = time.time() - float(data.get("at", 0)) < CHECK_AGAIN
        if data.get("identity") == identity and isinstance(data.get("verdict"), str) and fresh:
            return data["verdict"]
    except (OSError, ValueError, AttributeError):
        pass
    verdict = dbfiles.integrity_of(env.db, quick=True)
    try:
        write_atomic(kept, json.dumps({"identity": identity, "verdict": verdict, "at": time.time()}))
    except DeployError:
        pass                    # a full state disk costs the cache, never the look
    return verdict


def known_copies(env, local: list, offsite_copies: list) -> list[ledger.Known]:
    keep = set(n.lower() for n in env.bookkeeping) | {"sqlite_sequence"}

    def users(rows):
        return {t: n for t, n in rows.items() if t.lower() not in keep} if isinstance(rows, dict) else None

    found = [ledger.Known(id=backup_id(b), time=b.time, reason=b.reason, path=b.path, sha256=b.sha256,
                          rows=users(b.rows), held=b.held) for b in local]
    names = {k.id for k in found}
    for c in offsite_copies:
        if c.name not in names:
            rows = {"(rows)": c.rows} if isinstance(c.rows, int) else None
            found.append(ledger.Known(id=c.name, time=c.time, reason=c.reason, sha256=c.sha256, rows=rows,
                                      where="off-site"))
    return found


def dismissed(env) -> set[str]:
    """The copies the operator said hold nothing wanted (backup.py --release-hold), by sha256 and id."""
    found: set[str] = set()
    for r in JsonLog(env.state_dir / f"{env.name}.dismissed.jsonl").read():
        found.update(v for v in (r.get("sha256"), r.get("id")) if isinstance(v, str))
    return found


def gather(config, env, local: list, records: list, running: str, offsite_copies: list) -> DataFacts:
    facts = DataFacts(db_exists=env.db.exists())
    if facts.db_exists:
        facts.db_check = quick_check(env)
    copies = known_copies(env, local, offsite_copies)
    gone = dismissed(env)
    book = ledger.look(env, copies, gone)
    facts.incomplete = book.incomplete
    if book.live is not None and facts.db_check == "ok":
        facts.live_rows = sum(book.live.values())
    facts.outstanding = [outstanding(env, o) for o in book.outstanding]
    facts.best = best_copy(facts.outstanding)
    if facts.best is None and (not facts.db_exists or facts.db_check != "ok"):
        facts.best = best_copy([base_copy(c) for c in copies if c.sha256 not in gone and c.id not in gone])
    if facts.db_exists and facts.db_check != "ok":
        facts.salvage = preview_salvage(env, facts.best)
    facts.deleted_by = release_deleted(records, running)
    if facts.deleted_by and Path(facts.deleted_by.get("backup") or "").name.removesuffix(".sqlite3") in gone:
        facts.deleted_by["uncopied"] = {}       # the operator released its copy: nothing more is asked of them
    facts.failed_restores = failed_restores(records)
    return facts


def outstanding(env, o: ledger.Outside) -> Outstanding:
    c = o.copy
    item = Outstanding(id=c.id, path=c.path, where=c.where, reason=c.reason, time=c.time, held=c.held,
                       total=c.total, missing=dict(o.missing), by_count=o.by_count)
    if not c.path or not env.db.exists():
        return item
    try:
        the_plan = rowrestore.plan(env, c.path, c.sha256)
    except (sqlite3.Error, OSError):
        return item
    left = {}
    for t in the_plan.tables:
        for why, n in t.left_out.items():
            left[f"{t.table}: {why}"] = n
    for table, why in the_plan.refused.items():
        left[why] = o.missing.get(table, 0) or 1
    return Outstanding(**{**item.__dict__, "restorable": the_plan.total, "left_out": left})


def base_copy(c: ledger.Known) -> Outstanding:
    """A copy that holds no row the live database lacks, as a whole restore's base: a missing or damaged
    database still goes back to a sound file (its schema, whatever rows it has), the damaged one salvaged
    as it is replaced and its rows put back from there."""
    return Outstanding(id=c.id, path=c.path, where=c.where, reason=c.reason, time=c.time, held=c.held,
                       total=c.total, missing={})


def best_copy(found: list[Outstanding]) -> Outstanding | None:
    """Of the copies a whole restore may go to (not a save a restore set aside, not a salvage), the one that
    holds the most rows, the newest of those."""
    whole = [o for o in found if o.reason not in NOT_A_WHOLE_RESTORE and not o.held]
    if not whole:
        return None
    return max(whole, key=lambda o: ((o.total or 0), o.time))


def preview_salvage(env, best: Outstanding | None) -> dict:
    """What a salvage of the damaged live database would find now (into a scratch file, then removed), and how
    many rows it cannot save: per table with an integer key, the ids past the best copy's newest that are
    missing from what the file still holds (rows on pages that cannot be read; an upper bound: a row users
    deleted since the copy counts too)."""
    folder = make_private_dir(env.state_dir / "ledger")
    with tempfile.TemporaryDirectory(prefix="salvage-", dir=folder) as scratch:
        out = Path(scratch) / "preview.sqlite3"
        try:
            found = salvage.salvage(Path(env.db), out)
            lost = ids_missing(out, best.path if best and best.path else None, env.bookkeeping)
        except (salvage.Unsalvageable, OSError, sqlite3.Error, ValueError) as exc:
            return {"error": str(exc)}
    keep = {n.lower() for n in env.bookkeeping}
    rows = sum(n for t, n in found.tables.items() if t.lower() not in keep)
    return {"rows": rows, "lost_and_found": found.lost_and_found, "bad_pages": found.bad_pages,
            "bad_cells": found.bad_cells, "lost_estimate": lost}


def ids_missing(salvaged: Path, copy: str | None, bookkeeping: list[str]) -> int:
    conn = ledger.open_ro(salvaged)
    try:
        schema = rowsets.read_schema(conn, "main", bookkeeping)
        copy_conn = ledger.open_ro(copy) if copy else None
        total = 0
        for t in schema.users:
            if not t.surrogate:
                continue
            key = rowsets.quote(t.surrogate)
            ids = {r[0] for r in conn.execute(f"SELECT {key} FROM {rowsets.quote(t.name)}") if isinstance(r[0], int)}
            if not ids:
                continue
            floor = 0
            if copy_conn is not None:
                try:
                    floor = copy_conn.execute(f"SELECT max({key}) FROM {rowsets.quote(t.name)}").fetchone()[0] or 0
                except sqlite3.Error:
                    floor = 0
            top = max(ids)
            total += sum(1 for i in range(floor + 1, top + 1) if i not in ids)
        if copy_conn is not None:
            copy_conn.close()
        return total
    finally:
        conn.close()


def release_deleted(records: list, running: str) -> dict | None:
    """The newest good deploy whose release deleted rows as it went live, with the moment its restart began
    (switched_at: the last moment the continuous copies hold the rows it deleted)."""
    bug = next((r for r in reversed(records) if r.kind == "deploy" and r.ok and r.rows_deleted), None)
    if bug is None:
        return None
    start = parse_time(bug.time)
    before_switch = 0.0
    for name, seconds in (bug.steps or {}).items():     # the moment the new release was started: its restart
        if name == "restart":
            break
        before_switch += float(seconds or 0)
    switched = (start + timedelta(seconds=before_switch)).isoformat(timespec="milliseconds") if start else None
    return {"tag": bug.tag, "to": bug.to, "backup": bug.backup, "rows": bug.rows_deleted,
            "uncopied": getattr(bug, "rows_in_no_copy", {}) or {}, "switched_at": switched,
            "running_it": running == bug.to}


def failed_restores(records: list) -> dict[str, str]:
    """copy id -> error, for the copies whose last --restore-rows failed (and none succeeded since)."""
    out: dict[str, str] = {}
    for r in records:
        if r.kind == "restore-rows":
            if r.ok:
                out.pop(r.copy, None)
            else:
                out[r.copy] = r.error or "failed"
    return out
