"""Recovery of an operation that was killed (kill -9, a power cut) before it could clean up.

The journal (journals.py: one dataclass per kind of operation) says which operation ran and the step
it was in. The next deploy, rollback or rehearsal, holding the env's lock (so the killed process is
surely gone), calls recover() before anything else, and decisions.recovery_action() says what to do,
from the runbook's own lists of steps (which of them change nothing live):

- a deploy killed in a BEFORE step (build, tag, backup): nothing live had changed; temp files
  and a half-built release are removed and the unit is started if it is not running;
- a deploy killed after its switch: undone, by the runbook's rollback to its own before-deploy
  point (the database only if the deploy changed its schema);
- a rollback: finished, by running it again to the same point, with the database decision it made;
- a conversion killed after it changed something: put back from its journal (the data renamed
  into shared/ goes back into the tree, the old unit files return);
- a rehearsal or a drill: its transient units stopped, its scratch folder removed;
- a backup (its own journal): its temp files removed; the live database was never written;
- a journal that is damaged (damaged.py): taken as an operation that changed things; a deploy is
  undone to its before-deploy point, read from the journal's fields still whole, else from the
  newest `ENV-before-deploy-*` tag no finished deploy recorded.

Before that, damaged lines of the env's deploy log and bad log are set aside (kept) and the marks
of rolled-back tags missing from the bad log are written back (damaged.repair_records).
"""

import os

from . import backups, convert, damaged, decisions, journals, records, rehearsal, releases, restart, runbook, units
from .errors import EXIT_HUMAN, DeployError
from .files import remove_quietly
from .journals import ConversionJournal, DamagedJournal, DeployJournal, OpJournal, RollbackJournal, ScratchJournal
from .planning import decide_database
from .points import Point


def interrupted(env) -> OpJournal | None:
    """The journal of an operation that did not end (a DamagedJournal when it is not whole), or None."""
    return journals.read(journals.journal_path(env.state_dir, env.name))


def interrupted_any(env) -> OpJournal | None:
    """What status shows: an interrupted operation, else an interrupted backup."""
    return interrupted(env) or journals.read(journals.backup_journal_path(env.state_dir, env.name))


def recover(config, env, repo, say):
    """Finish or undo an interrupted operation on env (the caller holds the lock). Returns what it did."""
    sealed = seal_unsealed(env, say)
    for line in damaged.repair_records(env):
        say(f"recovering: {line}")
    j = interrupted(env)
    if j is None:
        return sealed
    if isinstance(j, DamagedJournal):
        j = damaged.rebuild(config, env, repo, j, say)
    say(f"recovering: found an interrupted {j.describe()}")
    removed = remove_temp_files(env) + remove_stale_git_lock(repo) + releases.remove_leftovers(env)
    if removed:
        say(f"recovering: removed {len(removed)} temp file(s): {', '.join(str(p) for p in removed[:4])}")
    record = records.RecoveryRecord(env=env.name, interrupted=j.to_json())
    action = decisions.recovery_action(j, runbook.before_change())
    if action == decisions.UNDO_DEPLOY and isinstance(j, DeployJournal):
        what = undo_deploy(config, env, repo, j, record, say)
    elif action == decisions.FINISH_ROLLBACK and isinstance(j, RollbackJournal):
        what = finish_rollback(config, env, repo, j, record, say)
    else:
        if action == decisions.PUT_BACK_CONVERSION and isinstance(j, ConversionJournal):
            convert.put_back_interrupted(env, j)
            what = f"the interrupted conversion was put back: {env.name} runs from its work tree as before"
        elif action == decisions.CLEAN_REHEARSAL and isinstance(j, ScratchJournal):
            what = rehearsal.clean_up(j)
        else:
            what = "nothing live had changed"
        try:
            ensure_running(env, say)
        except DeployError as exc:
            raise DeployError(f"recovering the interrupted {j.op} of {env.name} failed: {exc}. Look with: "
                              f"systemctl --user status {env.unit}", EXIT_HUMAN,
                              command=f"systemctl --user restart {env.unit}") from None
        record.result, record.did = "ok", what
        records.append(env, record)
    journals.remove(journals.journal_path(env.state_dir, env.name))
    journals.remove(journals.backup_journal_path(env.state_dir, env.name))     # its temp files went above
    say(f"recovering: done, {what}")
    return what


def seal_unsealed(env, say):
    """A rollback killed after it set the live database aside: make that save a verified backup."""
    done = []
    for path in backups.unsealed(env.backup_dir):
        try:
            sealed = backups.seal(path, env.backup_dir, env.name, "")
            done.append(sealed.path)
            say(f"recovering: the pre-rollback save {sealed.path} is now a verified backup")
        except DeployError as exc:
            say(f"recovering: {path} holds the database a rollback replaced, but SQLite cannot read it ({exc}); "
                "it is kept as it is")
    return f"sealed {len(done)} pre-rollback save(s)" if done else None


def remove_temp_files(env):
    """Temp files an interrupted backup, deploy or restore of this env may have left (never another env's:
    a state folder may be shared, so only names that carry this env's name)."""
    found = []
    if env.backup_dir.is_dir():
        found += [p for p in env.backup_dir.iterdir() if ".tmp-" in p.name] + backups.orphans(env.backup_dir)
    if env.db.parent.is_dir():
        found += [p for p in env.db.parent.iterdir() if p.name.startswith(f".{env.db.name}.restore-")]
    if env.state_dir.is_dir():
        found += [p for p in env.state_dir.iterdir() if p.name.startswith(f".{env.name}.") and ".tmp-" in p.name]
    mine = f"-{os.getpid()}"
    found = [p for p in found if not p.name.endswith(mine)]
    for p in found:
        remove_quietly(p)
    return found


def remove_stale_git_lock(repo):
    """A git command killed with its operation leaves index.lock, and every git command after it fails."""
    lock = repo.git_dir() / "index.lock"
    if lock.exists():
        remove_quietly(lock)
        return [lock]
    return []


def ensure_running(env, say):
    if not units.serving_state(env.unit).is_active:
        say(f"recovering: {env.unit} was not running; starting it")
        restart.wait_until_healthy(env, since=restart.restart_unit(env))


def point_of(env, name: str | None, commit: str, release: str | None, backup_path: str | None,
             started: str | None) -> Point:
    """The point an interrupted deploy or rollback goes to, from its journal."""
    backup = None
    if backup_path:
        found = [b for b in backups.list_backups(env.backup_dir) if b.path == backup_path]
        backup = found[0] if found else None
    return Point(name or "interrupted", "before-deploy", commit, started or "", backup, release=release)


def undo_deploy(config, env, repo, j: DeployJournal, record, say) -> str:
    back_to = j.from_ or ""
    point = point_of(env, j.tag, back_to, j.previous_release, j.backup, j.started)
    restore_db, why = decide_database(env, point, decisions.DatabaseMode.AUTO, compare=False)
    say(f"recovering: undoing the deploy of {(j.target or '?')[:12]}: back to {back_to[:12]} ({why})")
    check_backup(point, restore_db)
    record.did = f"the interrupted deploy was undone: {env.name} runs {back_to[:12]} again"
    runbook.roll_back(config, env, repo, point, restore_db, why, j.target or repo.head(), parent=record,
                      mark=False, quick_stop=runbook.QUICK_STOP)
    return record.did


def finish_rollback(config, env, repo, j: RollbackJournal, record, say) -> str:
    point = point_of(env, j.point, j.commit, j.release, j.backup, j.started)
    say(f"recovering: finishing the rollback to {point.id} ({'with' if j.restore_db else 'without'} the database)")
    check_backup(point, j.restore_db)
    record.did = (f"the interrupted restore of the database was finished: {env.name} runs {j.commit[:12]}"
                  if j.db_only else f"the interrupted rollback was finished: {env.name} runs {j.commit[:12]}")
    runbook.roll_back(config, env, repo, point, j.restore_db, j.db_why or "as the interrupted rollback decided",
                      j.from_ or repo.head(), parent=record, mark=False, db_only=j.db_only)
    return record.did


def check_backup(point, restore_db):
    if restore_db and point.backup is None:
        raise DeployError(f"cannot finish the interrupted operation: the backup of point {point.id} is gone; "
                          "choose another point with rollback.py --list", EXIT_HUMAN)
