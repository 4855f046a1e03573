"""Recovery of an operation that was killed (kill -9, a power cut) before it could clean up.

The journal (state.Journal) says which operation ran and the step it was in.
The next deploy or rollback, holding the env's lock (so the killed process is
surely gone), calls recover() before anything else:

- a backup: its temp files are removed; the live database was never written;
- a deploy killed before the switch (tag, backup): nothing live had changed;
  temp files are removed and the unit is started if it is not running;
- a deploy killed after the switch: undone, by the rollback to its own
  before-deploy point (database only if the deploy changed its schema);
- a rollback: finished, by running it again to the same point, with the
  database decision it had made.
"""

import os

from . import backups, release, rollbacks, units
from .errors import EXIT_HUMAN, DeployError
from .files import remove_quietly
from .points import Point
from .state import Journal, StepClock, deploy_log, now_iso


def interrupted(env):
    """The journal of a deploy or rollback that did not end, or None."""
    return Journal(env.state_dir, env.name).read()


def interrupted_any(env):
    """What status shows: an interrupted deploy or rollback, else an interrupted backup."""
    return interrupted(env) or Journal(env.state_dir, env.name, "backup-journal").read()


def describe(j):
    return (f"{j.get('op', 'an operation')} by pid {j.get('pid', '?')} ({j.get('command', '?')}), "
            f"started {j.get('started', '?')}, interrupted at step {j.get('step') or 'start'}")


def recover(env, repo, say):
    """Finish or undo an interrupted operation on env (the caller holds the lock). Returns what it did."""
    j = interrupted(env)
    if not j:
        return None
    say(f"recovering: found an interrupted {describe(j)}")
    removed = remove_temp_files(env) + remove_stale_git_lock(repo)
    if removed:
        say(f"recovering: removed {len(removed)} temp file(s): {', '.join(str(p) for p in removed[:4])}")
    op, step = j.get("op"), j.get("step")
    try:
        if op == "deploy" and step not in (None, "tag", "backup") and j.get("from"):
            what = undo_deploy(env, repo, j, say)
        elif op == "rollback" and j.get("commit"):
            what = finish_rollback(env, repo, j, say)
        else:
            what = "nothing live had changed"
            ensure_running(env, say)
    except DeployError as exc:
        point = j.get("point") or j.get("tag")
        command = (f"python3 rollback.py {env.name} --to {point} --yes" if point
                   else f"systemctl --user restart {env.unit}")
        raise DeployError(f"recovering the interrupted {op} of {env.name} failed: {exc}. Look with: "
                          f"systemctl --user status {env.unit}; then run: {command}", EXIT_HUMAN) from None
    deploy_log(env).append({"kind": "recovery", "env": env.name, "time": now_iso(), "interrupted": j,
                            "result": "ok", "did": what, **({"running": j["running_after"]}
                                                             if j.get("running_after") else {})})
    Journal(env.state_dir, env.name).finish()
    Journal(env.state_dir, env.name, "backup-journal").finish()       # its temp files went above
    say(f"recovering: done, {what}")
    return what


def remove_temp_files(env):
    """Temp files an interrupted backup, deploy or restore may have left."""
    found = []
    if env.backup_dir.is_dir():
        found += [p for p in env.backup_dir.iterdir() if ".tmp-" in p.name] + backups.orphans(env.backup_dir)
    if env.db.parent.is_dir():
        found += [p for p in env.db.parent.iterdir() if p.name.startswith(f".{env.db.name}.restore-")]
    if env.state_dir.is_dir():
        found += [p for p in env.state_dir.iterdir() if ".tmp-" in p.name]
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
    if not units.state(env.unit).is_active:
        say(f"recovering: {env.unit} was not running; starting it")
        release.restart_unit(env)
        release.wait_until_healthy(env)


def point_of(env, j, commit_key):
    backup = None
    if j.get("backup"):
        found = [b for b in backups.list_backups(env.backup_dir) if b.path == j["backup"]]
        backup = found[0] if found else None
    return Point(j.get("point") or j.get("tag") or "interrupted", "before-deploy", j[commit_key], j.get("started", ""),
                 backup)


def undo_deploy(env, repo, j, say):
    point = point_of(env, j, "from")
    restore_db, why = rollbacks.decide_database(env, point, "auto")
    say(f"recovering: undoing the deploy of {j.get('target', '?')[:12]}: back to {j['from'][:12]} ({why})")
    run_rollback(env, repo, point, restore_db, why, j.get("target") or repo.head())
    j["running_after"] = j["from"]
    return f"the interrupted deploy was undone: {env.name} runs {j['from'][:12]} again"


def finish_rollback(env, repo, j, say):
    point = point_of(env, j, "commit")
    restore_db = bool(j.get("restore_db"))
    say(f"recovering: finishing the rollback to {point.id} ({'with' if restore_db else 'without'} the database)")
    run_rollback(env, repo, point, restore_db, j.get("db_why", "as the interrupted rollback decided"),
                 j.get("from") or repo.head())
    j["running_after"] = j["commit"]
    return f"the interrupted rollback was finished: {env.name} runs {j['commit'][:12]}"


def run_rollback(env, repo, point, restore_db, why, running):
    if restore_db and point.backup is None:
        raise DeployError(f"cannot finish the interrupted rollback: the backup of point {point.id} is gone")
    rollbacks.roll_back(env, repo, point, restore_db, why, StepClock(), running)
