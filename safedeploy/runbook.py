"""The runbook that deploy, rollback and the recovery of a killed operation share.

It names every step once (the journal, the deploy log, the fault-injection switch and the
tests all use these names), and it owns the one way back: roll_back() takes a locked env to a
point, and roll_back_and_record() is the one "roll back and report" path: it runs the
rollback, writes the deploy-log record, and on failure says exactly what to paste next.

A rollback, in order:
  tag       tag the commit it leaves ENV-rolled-back-<stamp>
  build     (releases) rebuild the point's release when it is no longer kept
  prepare   (database) copy the point's backup beside the live file, check sha256 and
            integrity, while the app still serves: a bad backup or a full disk stops here
  stop      (database) stop the app (its socket and handover helper too)
  save      database restored: rename the stopped app's files aside (that rename is the
            pre-rollback save); database kept: an online backup, the app serving
  code      (releases) switch `current` to the point's release; the work tree goes to the
            point's commit (uncommitted changes are stashed, never lost)
  unit      put back the point's unit file when it differs
  database  rename the prepared copy into place
  restart, health, watch (rollback.py only, with `watch`), revision
  seal      make the set-aside files a verified backup; count the rows it holds that the
            restored database lacks
So with the database, the app is down for stop, renames and start, whatever the size.
"""

import os
import signal
import sqlite3
from dataclasses import dataclass, field

from . import backups, cli, release, releases, units
from .errors import EXIT_HUMAN, DeployError
from .files import write_atomic
from .points import next_best
from .state import Journal, StepClock, bad_log, deploy_log, now_iso, utc_stamp

RECORD_VERSION = 2          # deploy-log records and journals carry it as "v"

# the steps, by name
BUILD, TAG, BACKUP, SWITCH, PRE_RESTART, RESTART, HEALTH, REVISION, RECORD = (
    "build", "tag", "backup", "switch", "pre_restart", "restart", "health", "revision", "record")
PREPARE, STOP, SAVE, CODE, UNIT, DATABASE, SEAL = "prepare", "stop", "save", "code", "unit", "database", "seal"
WATCH = "watch"

DEPLOY_STEPS = [BUILD, TAG, BACKUP, SWITCH, PRE_RESTART, RESTART, HEALTH, WATCH, REVISION, RECORD]
DEPLOY_BEFORE_SWITCH = {None, BUILD, TAG, BACKUP}           # killed here, a deploy changed nothing live
ROLLBACK_STEPS = [TAG, BUILD, PREPARE, STOP, SAVE, CODE, UNIT, DATABASE, RESTART, HEALTH, WATCH, REVISION, SEAL]
ROLLBACK_BEFORE_CHANGE = {None, TAG, BUILD, PREPARE, STOP, SAVE}   # failed here: what ran is put back as it was

DB_MODES = ("auto", "with-db", "code-only")


@dataclass
class Outcome:
    point: object
    left: str                        # the commit it left
    left_tag: str
    restore_db: bool
    db_why: str
    release: str | None = None       # the release it switched to (releases)
    rebuilt: bool = False
    pre_rollback: str | None = None  # the verified backup of the live database it replaced or kept
    aside: str | None = None         # where the replaced files lie
    seal_problem: str = ""
    rows_lost: dict = field(default_factory=dict)
    unit_restored: bool = False
    stash: str | None = None
    health: object = None
    watched: float = 0.0


def decide_database(env, point, mode, compare=True):
    """(restore?, why), as the operator will read it. Only what was compared is said. compare=False
    (an automatic rollback, where every second counts) skips comparing the rows, and says so."""
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
    health = backups.integrity_of(env.db, quick=True)
    if health != "ok":
        return True, (f"the live database fails quick_check ({health}): restoring the point's backup; the "
                      "damaged file is kept aside as evidence")
    live = backups.live_schema(env.db)
    if live != point.backup.schema:
        return True, (f"the live schema ({live}) differs from the point's ({point.backup.schema}): "
                      "a migration ran since, so the database goes back too")
    if not compare:
        return False, ("the live schema matches the point's, so the database is left as it is (its rows were not "
                       "compared with the point's backup: rollback.py's plan does that)")
    return False, "the live schema matches the point's, so the database is left as it is; " + compare_rows(env, point)


def compare_rows(env, point):
    """What a kept database lacks of the point's backup, per table, and what --with-db would cost."""
    try:
        missing = backups.rows_only_in(point.backup.path, env.db)
        newer = backups.rows_only_in(env.db, point.backup.path) if missing else {}
    except sqlite3.Error as exc:
        return f"its rows could not be compared with the point's backup ({exc})"
    if not missing:
        return "it holds every row of the point's backup"
    lacks = ", ".join(f"{n} row(s) of {t}" for t, n in sorted(missing.items()))
    cost = ", ".join(f"{n} of {t}" for t, n in sorted(newer.items())) or "none"
    return (f"but it lacks {lacks} that the point's backup has (deleted since, by the release or by users): "
            f"--with-db brings them back, taking out the rows written since ({cost})")


def check_point_backup(point, points):
    """Refuse a backup that fails its checksum or integrity check, naming the next-best point."""
    verdict = backups.verify_backup(point.backup)
    if verdict == "ok":
        return
    better = next_best(points, point)
    hint = f"; the next-best point is {better.id} (--to {better.id})" if better else "; no older point has a good backup"
    raise DeployError(f"point {point.id}'s backup is bad ({verdict}): nothing was changed{hint}")


def refuse_tracked_database(env, repo, commits):
    """An env that runs from its work tree keeps its database in it: a commit that tracks the
    database file (or its -wal/-shm) would make git replace the live file under a live WAL, and
    one that untracks it would make git delete it. Refused before anything changes."""
    if env.converted:
        return          # the release links the shared folder: git never touches the live file
    rel = os.path.relpath(env.db_in_tree, env.path)
    if rel.startswith(".."):
        return
    names = [rel, f"{rel}-wal", f"{rel}-shm", f"{rel}-journal"]
    for commit in dict.fromkeys(commits):
        found = repo.tracked(commit, names)
        if found:
            raise DeployError(f"commit {commit[:12]} tracks the live database file {', '.join(found)}: moving the work "
                              f"tree to or from it would make git overwrite or delete {env.db}. Untrack it "
                              f"(git rm --cached {rel}; echo '/{rel}*' >> .gitignore; commit and push), or convert "
                              "the env to releases (deploy.py ENV --install-units); nothing was changed")


def release_for(env, point):
    """The kept release a rollback to point switches to, or None (it will be rebuilt from the commit)."""
    if not env.converted:
        return None
    if point.release:
        kept = releases.read_release(env.releases_root / "releases" / point.release)
        if kept and kept.commit == point.commit:
            return kept
    return releases.find(env, point.commit)


def roll_back(env, repo, point, restore_db, db_why, clock, running, watch=0):
    """Take the env (locked by the caller) to point. Ctrl-C, SIGTERM and SIGHUP are ignored while it
    runs (a half rollback helps nobody); a kill -9 leaves the journal, and the next command finishes it."""
    journal = Journal(env.state_dir, env.name)
    journal.start("rollback", v=RECORD_VERSION, point=point.id, commit=point.commit, restore_db=restore_db,
                  db_why=db_why, release=point.release, backup=point.backup.path if point.backup else None,
                  **{"from": running})
    clock.journal, clock.op = journal, "rollback"
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        return _roll_back(env, repo, point, restore_db, db_why, clock, running, journal, watch)
    finally:
        journal.finish()
        for s, handler in previous.items():
            signal.signal(s, handler)


def _roll_back(env, repo, point, restore_db, db_why, clock, running, journal, watch):
    stamp = utc_stamp()
    outcome = Outcome(point=point, left=repo.head(), left_tag="", restore_db=restore_db, db_why=db_why)
    with clock.step(TAG):
        outcome.left_tag = repo.create_tag(f"{env.name}-rolled-back-{stamp}", outcome.left,
                                           f"{env.name} ran {running} before rolling back to {point.id}\n")
    target = None
    if env.converted:
        with clock.step(BUILD):
            target = release_for(env, point)
            if target is None:
                target, outcome.rebuilt = releases.build(env, repo, point.commit), True
            outcome.release = target.id
            journal.update(release=target.id)
    prepared = None
    if restore_db:
        with clock.step(PREPARE):
            prepared = backups.prepare_restore(point.backup, env.db)
    try:
        if restore_db:
            with clock.step(STOP):
                units.stop_for_restore(env.unit)
        with clock.step(SAVE):
            outcome.pre_rollback = outcome.aside = save_live_database(env, running, restore_db, stamp)
            journal.update(aside=outcome.aside)
    except DeployError as exc:
        if prepared:
            backups.remove_temp(prepared)
        if restore_db and not env.db.exists():
            raise DeployError(f"the live database {env.db} was being set aside when this failed ({exc}); "
                              f"the app stays stopped so that it does not start on an empty database",
                              EXIT_HUMAN) from None
        if restore_db:
            release.restart_unit(env)        # nothing changed yet: bring the app back as it was
        raise DeployError(f"could not save the live database first, so nothing was rolled back "
                          f"({exc}); {env.name} runs what it ran") from None
    with clock.step(CODE):
        if target is not None:
            releases.switch(env, target)
        outcome.stash = move_work_tree(repo, point.commit, stamp)
    with clock.step(UNIT):
        outcome.unit_restored = restore_unit_file(env, point)
    if restore_db:
        with clock.step(DATABASE):
            backups.put_in_place(prepared, env.db)
    with clock.step(RESTART):
        release.restart_unit(env)
    with clock.step(HEALTH):
        outcome.health = release.wait_until_healthy(env, point.commit if target is not None else None)
    if watch:
        with clock.step(WATCH):
            outcome.watched = release.watch(env, watch, cli.countdown(f"watching {env.name}"))
    with clock.step(REVISION):
        if target is None:
            release.write_revision(env, repo, point.commit)
    if restore_db and outcome.aside:
        with clock.step(SEAL):
            seal_saved(env, running, outcome)
    return outcome


def save_live_database(env, running, restore_db, stamp):
    """The pre-rollback save. Restoring: the stopped app's files renamed aside (see backups).
    Keeping the database: an online backup while the app serves."""
    if not env.db.exists():
        return None
    if restore_db:
        return str(backups.set_aside(env.db, backups.aside_name(env.db, env.backup_dir, env.name, stamp)))
    return backups.backup_database(env.db, env.backup_dir, env.name, "pre-rollback", commit=running,
                                   unit_file=current_unit_file(env)).path


def seal_saved(env, running, outcome):
    """Once the app is back: the set-aside database becomes a verified backup; its rows that the
    restored database lacks are counted. A file SQLite cannot read stays where it is, as evidence."""
    try:
        sealed = backups.seal(outcome.aside, env.backup_dir, env.name, running, current_unit_file(env))
    except DeployError as exc:
        outcome.pre_rollback, outcome.seal_problem = None, str(exc)
        outcome.aside = getattr(exc, "evidence", outcome.aside)
        return
    outcome.pre_rollback = outcome.aside = sealed.path
    try:
        outcome.rows_lost = backups.rows_only_in(sealed.path, env.db)
    except Exception as exc:          # counting is a report; the rows are safe in the sealed copy either way
        outcome.seal_problem = f"rows not counted: {exc}"


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
    try:        # never widen: a unit holding Environment= secrets may be 0600
        mode = os.stat(point.backup.unit_file).st_mode & 0o755
    except OSError:
        mode = 0o600
    write_atomic(point.backup.unit_file, saved, mode=mode)
    units.daemon_reload()
    return True


# -- the one "roll back and report" path ----------------------------------------------------------
def again_command(config, env, point, restore_db):
    """What a human pastes when a rollback could not finish: the same rollback, to the same point."""
    args = ["--to", point.id, "--yes"] + (["--with-db"] if restore_db else ["--code-only"])
    return cli.script_command(config, "rollback.py", env.name, *args)


def rollback_fields(outcome, clock):
    return {"result": "ok", "steps": clock.seconds, "db_restored": outcome.restore_db, "db_why": outcome.db_why,
            "pre_rollback": outcome.pre_rollback, "aside": outcome.aside, "rows_lost": outcome.rows_lost,
            "seal_problem": outcome.seal_problem, "tag": outcome.left_tag, "release": outcome.release,
            "rebuilt": outcome.rebuilt, "unit_restored": outcome.unit_restored, "stash": outcome.stash,
            "watch": outcome.watched or None}


def mark_bad(env, repo, commit, why):
    """A release that was rolled back stays out: deploy.py refuses its tree unless --force --reason."""
    bad_log(env).append({"time": now_iso(), "env": env.name, "commit": commit, "tree": repo.tree_of(commit),
                         "bad": True, "why": why})


def roll_back_and_record(config, env, repo, point, restore_db, why, running, record, nested=False, watch=0,
                         mark=True):
    """Roll back, write record (with the rollback's result; under "rollback" when nested in a
    deploy's record) to the deploy log, and return the Outcome. Failure before any change:
    DeployError (exit 1). Failure after: DeployError with EXIT_HUMAN, ending with the command."""
    clock = StepClock()
    record.setdefault("v", RECORD_VERSION)
    log = deploy_log(env)
    try:
        outcome = roll_back(env, repo, point, restore_db, why, clock, running, watch)
    except (DeployError, KeyboardInterrupt) as exc:
        unchanged = clock.current in ROLLBACK_BEFORE_CHANGE and getattr(exc, "code", None) != EXIT_HUMAN
        failed = {"result": "failed", "failed_step": clock.current, "error": str(exc), "steps": clock.seconds}
        if nested:
            record["rollback"] = failed
            record["result"] = "failed"
            if unchanged:
                record["running"] = record.get("to")
        else:
            record.update(failed, **({"running": running} if unchanged else {}))
        log.append(record)
        if unchanged and not nested:
            raise DeployError(f"rollback of {env.name} failed at {clock.current}, before any change: {exc}") from None
        raise DeployError(
            f"the rollback of {env.name} to {point.id} failed at step {clock.current}: {exc}. {env.name} is NOT "
            f"back as it was. Look with: systemctl --user status {env.unit}; journalctl --user -u {env.unit} -n 50; "
            f"then run: {again_command(config, env, point, restore_db)}", EXIT_HUMAN) from None
    fields = rollback_fields(outcome, clock)
    if nested:
        record["rollback"] = fields
    else:
        record.update(fields, backup=outcome.pre_rollback)
    record.update(running=point.commit, running_release=outcome.release)
    record.setdefault("time", now_iso())
    log.append(record)
    if mark and outcome.left != point.commit:
        try:
            mark_bad(env, repo, outcome.left, f"rolled back to {point.id} ({record.get('error') or 'by hand'})")
        except DeployError:
            pass            # the rollback is done and recorded; a mark that could not be written is not worth exit 4
    return outcome
