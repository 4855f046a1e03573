"""Rollback points: where an env can go back to.

Every before-deploy tag (with the pre-deploy backup its deploy made) and every
backup (its manifest records the commit the env ran) is a point. A point's id is
the tag name or the backup's file name without `.sqlite3`; that is what
`rollback.py --to` takes.
"""

from dataclasses import dataclass
from pathlib import Path

from . import backups, records
from .state import parse_time


@dataclass
class Point:
    """A point a rollback can go to: a before-deploy tag or a backup, its commit, copy and release."""
    id: str
    kind: str                 # "before-deploy" or "backup"
    commit: str
    time: str
    backup: backups.Backup | None
    release: str | None = None      # the release to go back to, when the caller knows it (releases)
    copy: object = None             # its database's off-site copy (offsite.Copy), when there is one

    @property
    def offsite(self):
        return self.copy is not None

    def to_json(self, subject="", schema_differs=None):
        return {"id": self.id, "kind": self.kind, "commit": self.commit, "subject": subject, "time": self.time,
                "backup": self.backup.path if self.backup else None, "schema_differs": schema_differs,
                "offsite": self.offsite}


def backup_id(backup):
    return Path(backup.path).name.removesuffix(".sqlite3")


def list_points(env, repo, copies=()):
    """Every rollback point of the env, newest first. copies: the env's off-site copies; a point
    whose database copy is only off-site has backup None and its copy set (it restores from there)."""
    found = backups.list_backups(env.backup_dir)
    by_path = {b.path: b for b in found}
    by_file = {c.file: c for c in copies}
    tag_backup = records.tag_backups(records.read(env))
    points, used = [], set()
    for name, commit, when in repo.tags(f"{env.name}-before-deploy-*"):
        wanted = tag_backup.get(name) or ""
        backup = by_path.get(wanted)
        copy = by_file.get(Path(wanted).name) if wanted else None
        used.add(Path(wanted).name)
        points.append(Point(name, "before-deploy", commit, when, backup, copy=copy))
    for b in found:
        if Path(b.path).name not in used and b.commit:
            points.append(Point(backup_id(b), "backup", b.commit, b.time, b, copy=by_file.get(Path(b.path).name)))
            used.add(Path(b.path).name)
    for c in copies:
        if c.file not in used and c.commit:
            points.append(Point(c.name, "backup", c.commit, c.time, None, copy=c))
    return sorted(points, key=lambda p: instant(p.time), reverse=True)


def instant(text):
    """A point's time as seconds since the epoch (0 when unknown): times in other offsets sort right."""
    value = parse_time(text or "")
    return value.timestamp() if value else 0.0


def next_best(points, bad):
    """The newest point older than `bad` whose backup verifies, or None."""
    older = [p for p in points if instant(p.time) < instant(bad.time) and p.backup]
    for p in older:
        if backups.verify_backup(p.backup) == "ok":
            return p
    return None
