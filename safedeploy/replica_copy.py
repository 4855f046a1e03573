"""Copies out of an env's replica: `backup.py ENV --at TIME` and verify.py's replica check.

copy_at(): the env's database as it was at TIME (or the replica's newest moment), restored by Litestream
into a scratch folder inside the env's backup folder, then published through backups.backup_database as
an ordinary verified backup (manifest, sha256, integrity, rows) with reason "point-in-time". Its manifest's
"time" is the moment the copy holds (not when it was made, which is "made"): a copy of 03:00 made at 09:00
sorts, ages and is kept as a copy of 03:00. A TIME outside what the replica holds is refused, naming both
ends. The copy holds the transactions the replicator had read from the WAL by the newest moment it can
reach at or before TIME (it reads the WAL every 0.25 s; a replica whose times are to the second, sftp or
S3, is taken a second earlier, so that nothing after TIME is ever in it).

check_newest(): the replica's newest moment restored into a private temp folder, checked (integrity, rows,
schema against the live database), bounded in time.
"""

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from . import backups, dbfiles, replica
from .backups import Backup
from .errors import DeployError, usage_error
from .files import make_private_dir, write_atomic
from .litestream import Point, at_or_before

CHECK_TIMEOUT = 120.0


def parse_when(text: str) -> datetime | None:
    """An ISO 8601 time (with an offset, or none: local time) as an aware datetime; "latest": None."""
    if text == "latest":
        return None
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise usage_error(f"--at {text!r}: give an ISO 8601 time, e.g. 2026-11-25T14:03:00 (local time) or "
                          "2026-11-25T14:03:00+01:00, or latest") from None
    return value if value.tzinfo else value.astimezone()


def target(found: list[Point], when: datetime | None, env_name: str) -> Point:
    """The point to restore for `when` (None: the newest); a usage error naming both ends when outside."""
    if not found:
        raise DeployError(f"the replica of {env_name} holds no copy yet (is the replicator running? status.py says)")
    oldest, newest = found[0], found[-1]
    if when is None:
        return newest
    span = f"the replica of {env_name} holds {replica.iso(oldest.lo)} to {replica.iso(newest.lo)}"
    if when > newest.hi:
        raise usage_error(f"--at {replica.iso(when)} is after the newest moment the replica holds: {span}; for the "
                          "newest, give --at latest")
    point = at_or_before(found, when)
    if when < oldest.lo or point is None:
        raise usage_error(f"--at {replica.iso(when)} is before the oldest moment the replica holds: {span}")
    return point


def copy_at(config, env, when: datetime | None, commit_of: Callable[[datetime], str]) -> tuple[Backup, Point]:
    """A verified backup of env's database as it was at `when` (None: the replica's newest moment); its
    manifest names the commit commit_of(the copy's moment) gives (what ran then)."""
    if not replica.replicated(config, env):
        raise usage_error(f"{config.file}: env {env.name} has no continuous copies: add it to [replica] "
                          "(docs/config.md)")
    e = replica.entry(config, env)
    point = target(replica.replica_points(config, e), when, env.name)
    folder = make_private_dir(env.backup_dir)
    scratch = Path(tempfile.mkdtemp(prefix=".point-in-time-", dir=folder))
    try:
        restored = scratch / "restored.sqlite3"
        replica.restore_to(config, e, point, restored)
        backup = backups.backup_database(restored, folder, env.name, "point-in-time", commit=commit_of(point.lo))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    data = json.loads(backup.manifest_path.read_text())
    data.update(time=replica.iso(point.lo), made=backup.time, at=replica.iso(when) if when else "latest",
                txid=f"{point.txid:016x}", source=config.replica.url)
    write_atomic(backup.manifest_path, json.dumps(data, indent=2) + "\n")
    return replace(backup, time=data["time"], source=data["source"]), point


def check_newest(config, env, timeout: float = CHECK_TIMEOUT) -> tuple[bool, str]:
    """(ok, detail): the replica's newest moment restores (within timeout), passes integrity_check, holds
    rows when the live database does, and has the live schema."""
    e = replica.entry(config, env)
    start = time.monotonic()
    found = replica.replica_points(config, e)
    if not found:
        return False, "the replica holds no copy yet"
    scratch = Path(tempfile.mkdtemp(prefix="safe-deploy-replica-check-"))
    try:
        out = scratch / "newest.sqlite3"
        replica.restore_to(config, e, found[-1], out, timeout)
        verdict = dbfiles.integrity_of(out)
        conn = dbfiles.open_readonly(out)
        try:
            rows, schema = sum(dbfiles.count_rows(conn).values()), dbfiles.schema_fingerprint(conn)
        finally:
            conn.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    live = dbfiles.live_rows(env.db) if env.db.exists() else None
    live_total = sum(live.values()) if live is not None else None
    age = (datetime.now(timezone.utc) - found[-1].lo).total_seconds()
    detail = (f"newest copy {replica.iso(found[-1].lo)} ({age:.0f}s old) restored in {time.monotonic() - start:.1f}s: "
              f"integrity {verdict}, {rows} rows (live: {live_total if live_total is not None else '?'})")
    if verdict != "ok":
        return False, detail
    if rows == 0 and live_total:
        return False, detail + ": the replica's newest copy is empty"
    if env.db.exists() and dbfiles.live_schema(env.db) not in (None, schema):
        return False, detail + ": its schema is not the live database's"
    return True, detail
