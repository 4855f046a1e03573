"""The rollback runbook, shared by rollback.py and deploy.py's automatic rollback.

roll_back() takes the env (already locked by the caller) to a point, in order:
decide about the database; check the point's backup; tag the commit it leaves;
save the live database as a pre-rollback backup (after stopping the app when the
database will be replaced, so no write is lost in between); move the work tree;
restore the unit file; restore the database; restart; wait for health; write
REVISION. Every step is timed; the caller records the result.
"""

import signal
from dataclasses import dataclass, field

from . import backups, release, units
from .errors import DeployError
from .files import write_atomic
from .points import next_best
from .state import Journal, utc_stamp

DB_MODES = ("auto", "with-db", "code-only")


@dataclass
class Outcome:
    point: object
    left: str                        # the commit it left
    left_tag: str
    restore_db: bool
    db_why: str
    pre_rollback: str | None = None
    aside: str | None = None
    rows_lost: dict = field(default_factory=dict)
    unit_restored: bool = False
    stash: str | None = None
    health: object = None


def decide_database(env, point, mode):
    """(restore?, why), as the operator will read it."""
    if mode == "code-only":
        return False, "--code-only: the database is left as it is"
    if not point.backup:
        if mode == "with-db":
            raise DeployError(f"--with-db: point {point.id} has no database backup; choose another with --to")
        return False, f"point {point.id} has no database backup: the database is left as it is"
    if mode == "with-db":
        return True, f"--with-db: restoring {point.backup.path}"
    if not env.db.exists():
        return True, "there is no live database: restoring the point's backup"
    live = backups.live_schema(env.db)
    if live != point.backup.schema:
        return True, (f"the live schema ({live}) differs from the point's ({point.backup.schema}): "
                      "a migration ran since, so the database goes back too")
    return False, "the live schema matches the point's: the database is left as it is (no write lost)"


def check_point_backup(point, points):
    """Refuse a backup that fails its checksum or integrity check, naming the next-best point."""
    verdict = backups.verify_backup(point.backup)
    if verdict == "ok":
        return
    better = next_best(points, point)
    hint = f"; the next-best point is {better.id} (--to {better.id})" if better else "; no older point has a good backup"
    raise DeployError(f"point {point.id}'s backup is bad ({verdict}): nothing was changed{hint}")


def roll_back(env, repo, point, restore_db, db_why, clock, running):
    """Take the env to point. Ctrl-C, SIGTERM and SIGHUP are ignored while it runs (a half
    rollback helps nobody); a kill -9 leaves the journal, and the next command finishes it."""
    journal = Journal(env.state_dir, env.name)
    journal.start("rollback", point=point.id, commit=point.commit, restore_db=restore_db, db_why=db_why,
                  backup=point.backup.path if point.backup else None, **{"from": running})
    clock.journal, clock.op = journal, "rollback"
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        return _roll_back(env, repo, point, restore_db, db_why, clock, running)
    finally:
        journal.finish()
        for s, handler in previous.items():
            signal.signal(s, handler)


def _roll_back(env, repo, point, restore_db, db_why, clock, running):
    stamp = utc_stamp()
    outcome = Outcome(point=point, left=repo.head(), left_tag="", restore_db=restore_db, db_why=db_why)
    with clock.step("tag"):
        outcome.left_tag = repo.create_tag(f"{env.name}-rolled-back-{stamp}", outcome.left,
                                           f"{env.name} ran {running} before rolling back to {point.id}\n")
    if restore_db:
        with clock.step("stop"):
            units.stop_for_restore(env.unit)
    with clock.step("save"):
        try:
            outcome.pre_rollback = save_live_database(env, running)
        except DeployError as exc:
            if restore_db:
                release.restart_unit(env)        # nothing changed yet: bring the app back as it was
            raise DeployError(f"could not save the live database first, so nothing was rolled back "
                              f"({exc}); {env.name} runs what it ran") from None
    with clock.step("code"):
        outcome.stash = move_work_tree(repo, point.commit, stamp)
    with clock.step("unit"):
        outcome.unit_restored = restore_unit_file(env, point)
    if restore_db:
        with clock.step("database"):
            outcome.aside = str(backups.restore_database(point.backup, env.db, stamp))
            if outcome.pre_rollback:
                outcome.rows_lost = backups.rows_only_in(outcome.pre_rollback, env.db)
    with clock.step("restart"):
        release.restart_unit(env)
    with clock.step("health"):
        outcome.health = release.wait_until_healthy(env)
    with clock.step("revision"):
        release.write_revision(env, repo, point.commit)
    return outcome


def save_live_database(env, running):
    if not env.db.exists():
        return None
    return backups.backup_database(env.db, env.backup_dir, env.name, "pre-rollback", commit=running,
                                   unit_file=current_unit_file(env)).path


def current_unit_file(env):
    path = units.state(env.unit).fragment_path
    return path or None


def move_work_tree(repo, commit, stamp):
    """Reset the branch to commit; uncommitted changes to tracked files are stashed, never lost."""
    stash = None
    if repo.dirty_files():
        stash = repo.stash(f"safe-deploy: uncommitted changes found by the rollback at {stamp}")
    repo.reset_hard(commit)
    return stash


def restore_unit_file(env, point):
    """Put back the point's unit file where it differs from the live one; daemon-reload."""
    if not point.backup or not point.backup.unit_backup or not point.backup.unit_file:
        return False
    try:
        saved = open(point.backup.unit_backup, "rb").read()
    except OSError:
        return False
    try:
        live = open(point.backup.unit_file, "rb").read()
    except OSError:
        live = None
    if live == saved:
        return False
    write_atomic(point.backup.unit_file, saved, mode=0o644)
    units.daemon_reload()
    return True
