"""What is kept, and why: every rule that protects a backup, an off-site copy or a release from removal,
in one place.

- `PROTECT_LAST` (5): the backups the last deploys and rollbacks refer to, and the commits their
  rollback points name (whose releases stay), are never removed.
- `retention_keep`: [retention] daily/weekly/monthly, as borg's --keep-* counts them.
- `richest`: the newest copy holding the most rows is never removed (a rebuilt host backing up its fresh,
  empty database night after night must not push the copy with the data out).
- `protected(env, found, before_adoption)`: the local backups prune keeps whatever the rules say: the host's copy
  from before adoption, the newest that verifies, the last operations' ones, the richest.
- `prune_plan`: (keep {path: why}, remove) for a list of copies, local or off-site.
A held copy (rows a restore took out) is kept by the caller until released (backup.py --release-hold).
Pure decisions over what is listed; nothing here removes or prints.
"""

from datetime import datetime, timezone

from . import backups, records
from .backups import sort_key

PROTECT_LAST = 5        # the last deploys and rollbacks: their backups and their points' releases stay

PERIODS = {
    "daily": lambda t: t.strftime("%Y-%m-%d"),
    "weekly": lambda t: "%d-W%02d" % t.isocalendar()[:2],
    "monthly": lambda t: t.strftime("%Y-%m"),
}


def local_time(backup):
    value = datetime.fromisoformat(backup.time)
    return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).astimezone()


def retention_keep(found, retention):
    """What borg's --keep-daily/--keep-weekly/--keep-monthly would keep: {path: why}.

    For each rule in turn, newest first: the newest backup of each period counts,
    unless an earlier rule kept it already (then the period is skipped, not
    counted); a rule that runs out of backups before N keeps the oldest one."""
    kept = {}
    ordered = sorted(found, key=sort_key, reverse=True)
    for rule in ("daily", "weekly", "monthly"):
        n, last, count, backup = retention.get(rule, 0), None, 0, None
        if n <= 0:
            continue
        for backup in ordered:
            period = PERIODS[rule](local_time(backup))
            if period == last:
                continue
            last = period
            if backup.path not in kept:
                count += 1
                kept[backup.path] = f"{rule} #{count}"
                if count == n:
                    break
        if backup is not None and count < n and backup.path not in kept:
            kept[backup.path] = f"{rule} (oldest)"
    return kept


def richest(found):
    """Of backups or off-site copies, the newest that holds the most rows (None: none was counted). Retention
    never removes it: after a rebuilt host backs up its fresh empty database night after night, tight
    rules would otherwise keep only empty copies and forget the one with the data."""
    counted = [b for b in found if b.rows_total is not None]
    if not counted:
        return None
    most = max(b.rows_total for b in counted)
    return max((b for b in counted if b.rows_total == most), key=lambda b: local_time(b).timestamp())


RICHEST = "holds the most rows of any copy ({n}): a copy of a database with fewer never counts against it"


def prune_plan(found, retention, protected):
    """(keep {path: why}, remove [Backup]); protected maps paths that must stay to why."""
    keep = retention_keep(found, retention)
    for path, why in protected.items():
        keep.setdefault(path, why)
    return keep, [b for b in found if b.path not in keep]


def protected_by_records(found_records, n: int = PROTECT_LAST) -> dict:
    """{backup path: why} the last n operations refer to: prune never removes them."""
    out: dict = {}
    for r in [r for r in found_records if getattr(r, "backup", None)][-n:]:
        out.setdefault(r.backup, f"rollback point of the {r.kind} at {r.time}")
    return out


def needed_commits(found_records, n: int = PROTECT_LAST) -> set:
    """Commits a rollback point of the last n operations names: their releases are kept."""
    return {c for r in records.operations(found_records, n)
            for c in (getattr(r, "from_", None), getattr(r, "to", None), r.running) if c}


def protected(env, found, before_adoption: str | None) -> dict:
    """Backups prune must never remove: the newest one that verifies, the last deploys' ones, the one
    adopt.py took of the host as it ran before the tool (before_adoption: the seed's "backup everything",
    from adoption.read_doc), the richest."""
    out = {}
    if before_adoption:
        out[before_adoption] = "the host before adoption (adopt.py phase 1); remove it by hand when done"
    for b in found:
        if backups.verify_backup(b) == "ok":
            out[b.path] = "newest verified backup"
            break
    for path, why in protected_by_records(records.read(env)).items():
        out.setdefault(path, why)
    most = richest(found)
    if most:
        out.setdefault(most.path, RICHEST.format(n=most.rows_total))
    return out
