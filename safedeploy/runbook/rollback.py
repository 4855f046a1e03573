"""The rollback: its steps (ROLLBACK), its run (RollbackRun), and the one "roll back and report" path.

roll_back() takes an env (locked by the caller) to a point and records it, alone or inside the record of the
operation that ran it: rollback.py, a deploy whose step after the switch failed, and the recovery of a deploy
killed after its switch all go through it. rollback_run() plans it (the point's kept release, the unit file);
rollback_steps() describes it for the plan. Failure before any change: DeployError (exit 1); after: EXIT_HUMAN
with the command to run.

A rollback, in order:
A rollback, in order:
  tag          tag the commit it leaves ENV-rolled-back-<stamp>                                  BEFORE
  build        (releases) the point's kept release, or rebuild it when retention removed it      BEFORE
  prepare      (database) take the deploy's spare of the point's backup (a rename), else copy the
               backup beside the live file; check its sha256 against the one recorded with its
               integrity_check, while the app still serves: a bad backup or a full disk stops here BEFORE
  stop         (database) stop the app (its socket and handover slot too)                        BEFORE
  save         database restored: rename the stopped app's files aside (that rename is the
               pre-rollback save); kept: an online backup, the app serving                       BEFORE
  code         (releases) `current` to the point's release; the work tree to the point's commit
               (uncommitted changes are stashed, never lost)                                     AFTER
  unit         put back the point's unit file, only where it fits the layout that exists         AFTER
  database     rename the prepared copy into place                                               AFTER
  restart, health, watch (rollback.py, with `watch`), revision                                   AFTER
  seal         make the set-aside files a verified backup; count its rows the restore lacks      AFTER
               (the plan's count standing: its hash, started when the database is in place)
  record                                                                                         AFTER
A failure before `code` puts back what ran (the app restarted if it was stopped): exit 1. After it:
exit 4, with the command to run.
"""

import os
from dataclasses import dataclass, field

from .. import backups, dbfiles, marks, records, releases, replica, restart, restore, rowloss, unitenv, unitfiles, units
from .. import decisions
from ..commandline import script_command
from ..decisions import failure_code
from ..errors import EXIT_FAILED, EXIT_HUMAN, DeployError, after_undo, describe_failure
from ..files import write_atomic
from ..journals import RollbackJournal
from ..output import PLAIN
from ..records import RollbackRecord
from ..runner import AFTER, BEFORE, Operation, Step, describe, execute
from ..state import bad_log, now_iso, utc_stamp
from .bringup import Run, bring_up_steps, current_unit_file, start_probe, stop_probe


# -- rollback ----------------------------------------------------------------------------------
@dataclass
class RollbackRun(Run):
    """What a rollback carries from step to step."""
    config: object
    env: object
    repo: object
    point: object
    restore_db: bool
    db_why: str
    running: str                        # the commit it leaves
    record: RollbackRecord | None = None  # set by rollback_run
    stamp: str = field(default_factory=utc_stamp)
    target: object = None               # the release it switches to (releases)
    kept: object = None                 # the point's kept release, found when planned
    prepared: object = None
    early: object = None                # a restore.EarlyPrepare the plan started, which prepare waits for
    plan_view: object = None            # a rowloss.PlanView the plan kept open (--yes): the seal may take its count
    sealing: object = None              # a backups.EarlySeal the database step started (the plan's count standing)
    without_prompt: bool = False        # nothing asked between the plan and the steps (rollback.py --yes)
    stopped: bool = False
    unit_action: str = "keep"           # "restore" or "keep", with unit_why
    unit_why: str = ""
    watch_seconds: float = 0
    mark: bool = True
    parent: object = None               # the record it goes inside (a deploy's, a recovery's), or None
    why_marked: str = "by hand"
    db_only: bool = False               # the database alone: the code, its unit file and the marks stay

    @property
    def converted(self):
        return self.env.converted

    @property
    def commit(self):
        """The commit that runs once the rollback is done: the point's, or (the database alone) what ran."""
        return self.running if self.db_only else self.point.commit

    @property
    def expect(self):
        return self.commit if self.converted else None

    @property
    def revision(self):
        return None if self.converted or self.db_only else self.point.commit


def rollback_run(config, env, repo, point, restore_db, why, running, watch=0, quick_stop=None, mark=True,
                 db_only=False, out=PLAIN):
    run = RollbackRun(config=config, env=env, repo=repo, point=point, restore_db=restore_db, db_why=why,
                      running=running, watch_seconds=watch, quick_stop=quick_stop, mark=mark and not db_only,
                      db_only=db_only, out=out)
    run.record = RollbackRecord(env=env.name, user=unitenv.user(), from_=running, to=point.commit, point=point.id,
                                db_restored=restore_db, db_why=why, db_only=db_only)
    if db_only:
        run.unit_action, run.unit_why = "keep", "the database alone: the code and its unit file stay as they are"
        return run
    run.kept = release_for(env, point)
    run.unit_action, run.unit_why = unit_file_plan(env, point)
    return run


def release_for(env, point):
    """The kept release a rollback to point switches to, or None (it will be rebuilt from the commit)."""
    if not env.converted:
        return None
    if point.release:
        kept = releases.read_release(env.releases_root / "releases" / point.release)
        if kept and kept.commit == point.commit:
            return kept
    return releases.find(env, point.commit)


def unit_file_plan(env, point):
    """("restore" | "keep", why): the point's unit file comes back only where it differs and fits the
    layout that exists: a unit written for releases (WorkingDirectory through `current`, a socket) on an
    env that runs from its tree (a rebuilt host), or the other way round (a point from before the env was
    converted), would leave the app unable to start."""
    b = point.backup
    if not b or not b.unit_backup or not b.unit_file:
        return "keep", "the point has no unit file saved"
    try:
        saved = open(b.unit_backup, "rb").read()
    except OSError:
        return "keep", f"the point's unit file copy {b.unit_backup} cannot be read"
    try:
        live = open(b.unit_file, "rb").read()
    except OSError:
        live = None
    if live == saved:
        return "keep", "the point's unit file is the live one"
    for_releases = str(env.current_link) in saved.decode(errors="replace")
    if for_releases != env.converted:
        layout = "releases" if for_releases else "its work tree"
        return "keep", (f"the point's unit file runs the app from {layout}, and {env.name} runs from "
                        f"{'releases' if env.converted else 'its work tree'} now: the live unit file is kept")
    socket_needed = f"Requires={unitfiles.socket_name(env.unit)}" in saved.decode(errors="replace")
    if socket_needed and not units.state(unitfiles.socket_name(env.unit)).known:
        return "keep", f"the point's unit file needs {unitfiles.socket_name(env.unit)}, which this host does not have"
    return "restore", f"put back {b.unit_file} as it was at the point (daemon-reload)"


def rollback_tag(run):
    env = run.env
    unmarked = "" if run.mark and run.running != run.point.commit else f" ({marks.NOT_MARKED})"
    run.record.tag = run.repo.create_tag(f"{env.name}-rolled-back-{run.stamp}", run.running,
                                         f"{env.name} ran {run.running} before rolling back to {run.point.id}"
                                         f"{unmarked}\n")


def rollback_build(run):
    run.target = run.kept
    if run.target is None:
        run.target, run.record.rebuilt = releases.build(run.env, run.repo, run.point.commit), True
    run.record.release = run.target.id
    run.journal.release = run.target.id
    run.journal.save()


def prepare(run):
    early, run.early = run.early, None
    run.prepared = early.result() if early is not None else restore.prepare_restore(run.point.backup, run.env.db)


def stop_for_restore(run):
    start_probe(run)            # the switch, for users, starts with this stop
    run.stopped = True
    units.stop_for_restore(run.env.unit)
    replica.pause(run.env)          # its last writes reach the replica; nothing reads the file while it moves


def put_database(run):
    restore.put_in_place(run.prepared, run.env.db)
    replica.resume(run.env, swapped=True)       # the replica continues from the restored database
    run.sealing = start_seal(run)


def start_seal(run):
    """When the plan's count stands, all the seal has left is the set-aside file's own work (fold its WAL, hash
    it, fsync it): it starts now, at the lowest CPU priority, while the app restarts (1 GB: about a second of
    the rollback's wall that no longer comes after health). The unit file is read now, as seal() would read it:
    the point's, put back by the unit step. Else None: seal() does it all."""
    env, record = run.env, run.record
    reuse, _ = plan_count(run)
    if record.aside is None or not reuse:
        return None
    unit_file = current_unit_file(env)
    return backups.EarlySeal(record.aside, env.backup_dir, env.name, run.running, unit_file,
                             rows=dict(run.plan_view.rows), checked=run.plan_view.integrity,
                             unit_text=backups.read_unit_file(unit_file) if unit_file else None)


def plan_count(run):
    """(whether the seal may take the plan's count, why): decisions.plan_count_reusable on the plan's view,
    closed first (close() is idempotent)."""
    view = run.plan_view
    if view is None:
        return False, "no plan's count to take"
    view.close()
    return decisions.plan_count_reusable(run.without_prompt, view.held_open, view.at_plan, view.after_plan,
                                         view.at_stop)


def save(run):
    """The pre-rollback save. Restoring: the stopped app's files renamed aside (see backups). Keeping
    the database: an online backup while the app serves. The plan's view of the live files (if any) takes
    its last look first, the app stopped and nothing moved yet."""
    env = run.env
    if run.plan_view is not None:
        run.plan_view.stopped(env.db)
    if not env.db.exists():
        return
    if run.restore_db:
        run.record.aside = str(restore.set_aside(env.db, backups.aside_name(env.db, env.backup_dir, env.name,
                                                                            run.stamp)))
        run.record.pre_rollback = run.record.aside
    else:
        run.record.pre_rollback = backups.backup_database(env.db, env.backup_dir, env.name, "pre-rollback",
                                                          commit=run.running, unit_file=current_unit_file(env)).path
    run.record.backup = run.record.pre_rollback
    run.journal.aside = run.record.aside
    run.journal.save()


def code(run):
    if run.target is not None:
        releases.switch(run.env, run.target)
    if run.repo.dirty_files():
        run.record.stash = run.repo.stash(f"safe-deploy: uncommitted changes found by the rollback at {run.stamp}")
    run.repo.reset_hard(run.point.commit)


def restore_unit(run):
    b = run.point.backup
    try:        # never widen: a unit holding Environment= secrets is 0600
        mode = os.stat(b.unit_file).st_mode & 0o755
    except OSError:
        mode = 0o600
    data = open(b.unit_backup, "rb").read()
    write_atomic(b.unit_file, data, mode=unitfiles.unit_file_mode(data.decode(errors="replace"), mode))
    units.daemon_reload()
    run.record.unit_restored = True


def seal(run):
    """Once the app is back: the set-aside database becomes a verified backup; its rows that the restored
    database lacks are counted (or, with its rows per table and its integrity_check, taken from the plan, when
    nothing can have been written between the plan and the stop: decisions.plan_count_reusable); its sha256 is
    always computed from the file. A file SQLite cannot read stays where it is, as evidence."""
    env, record = run.env, run.record
    early, run.sealing = run.sealing, None
    if record.aside is None:
        return              # there was no live database to set aside (or a killed run's save was sealed already)
    view = run.plan_view
    reuse, why = plan_count(run)
    counted: dict = {}

    def count():            # while the seal checks and hashes the file: only the rows that differ are read
        try:
            counted["lost"] = rowloss.lost_quickly(env, record.aside)
        except Exception:   # a count is a report: the full comparison below then makes it, the seal goes on
            counted["lost"] = None
    if reuse:
        counted["lost"] = dict(view.lost)
    try:
        sealed = early.result() if early is not None else backups.seal(
            record.aside, env.backup_dir, env.name, run.running, current_unit_file(env),
            alongside=None if reuse else count, rows=dict(view.rows) if reuse else None,
            checked=view.integrity if reuse else None)
    except DeployError as exc:
        record.pre_rollback, record.seal_problem = None, str(exc)
        record.aside = exc.evidence or record.aside
        salvage_evidence(run)
        return
    record.pre_rollback = record.aside = record.backup = sealed.path
    record.rows_counted = ("plan: " if reuse else "seal: ") + why
    lost = counted.get("lost")
    record.rows_lost = lost if lost is not None else rowloss.lost(env, sealed.path, sealed.sha256)


def salvage_evidence(run):
    """The replaced database could not be read: what it still holds is salvaged into a held copy (the evidence
    stays as it is), so the row ledger sees its rows and `backup.py ENV --restore-rows` can put them back."""
    record = run.record
    if not record.aside:
        return
    copy, found = rowloss.salvage_into_copy(run.env, record.aside, run.running)
    if copy is None:
        record.seal_problem += f"; nothing could be salvaged from it ({found})"
        return
    record.salvaged = copy.path
    record.rows_lost = rowloss.lost(run.env, copy.path, copy.sha256)


def current_release_id(env):
    current = releases.current(env)
    return current.id if current else None



def record_rollback(run):
    record = run.record
    record.result, record.steps = "ok", run.clock.seconds
    record.running = run.commit
    record.running_release = run.target.id if run.target else (current_release_id(run.env) if run.db_only else None)
    record.watch = run.watched or None
    record.probe = stop_probe(run)
    write_rollback_record(run)
    if run.mark and run.running != run.point.commit:
        try:
            mark_bad(run.env, run.repo, run.running, f"rolled back to {run.point.id} ({run.why_marked})")
        except DeployError:
            pass            # the rollback is done and recorded; a mark that could not be written is not worth exit 4


def write_rollback_record(run):
    """A rollback's record stands alone, or goes inside the record of the operation that ran it (a deploy's
    automatic rollback, a recovery), which is then written."""
    if run.parent is None:
        records.append(run.env, run.record)
        return
    nested = run.record.to_json()
    for key in ("kind", "env", "v", "user"):
        nested.pop(key, None)
    run.parent.rollback = nested
    if run.record.ok:
        run.parent.running, run.parent.running_release = run.record.running, run.record.running_release
        run.parent.result = run.parent.result or "ok"
    else:
        run.parent.result = "failed"
    records.append(run.env, run.parent)


def save_detail(run):
    env = run.env
    if not env.db.exists():
        return f"no live database at {env.db}: nothing to save"
    if run.restore_db:
        return (f"rename the stopped app's {env.db} (with -wal, -shm) aside into {env.backup_dir} as the pre-rollback "
                "save (no copy while the app is down)")
    return f"back up {env.db} online as a pre-rollback backup in {env.backup_dir}, the app serving"


def build_rollback_detail(run):
    if run.kept:
        return f"switch back to the kept release {run.kept.path} (no rebuild, no network)"
    return f"REBUILD from {run.point.commit[:12]}: its release is no longer kept (runs the build commands)"


ROLLBACK = [
    Step("tag", BEFORE, rollback_tag, lambda r: f"tag {r.running[:12]} (what it leaves) {r.env.name}-rolled-back-"
                                                f"{r.stamp}", when=lambda r: not r.db_only),
    Step("build", BEFORE, rollback_build, build_rollback_detail, when=lambda r: r.converted and not r.db_only),
    Step("prepare", BEFORE, prepare,
         lambda r: f"take the deploy's spare of {r.point.backup.path} beside {r.env.db} by a rename, else copy the backup "
                   "there; check its sha256 (the spare read whole, the copy read back and hashed as the kernel copies it) "
                   "against the one recorded when the backup passed integrity_check, the app serving",
         when=lambda r: r.restore_db),
    Step("stop", BEFORE, stop_for_restore,
         lambda r: f"stop {r.env.unit} so that nothing opens the database" + (
             f" ({unitfiles.socket_name(r.env.unit)} keeps the port and starts no app: requests wait in its queue)"
             if units.restart_method(r.env.unit) != "plain" else ""), when=lambda r: r.restore_db),
    Step("save", BEFORE, save, save_detail),
    Step("code", AFTER, code,
         lambda r: (f"point {r.env.current_link} at {r.kept.id if r.kept else 'the rebuilt release'}; " if r.converted
                    else "") + f"move {r.env.path} to {r.point.commit[:12]} (git reset --hard; uncommitted changes "
                               "are stashed)", when=lambda r: not r.db_only),
    Step("unit", AFTER, restore_unit, lambda r: r.unit_why, when=lambda r: r.unit_action == "restore" and not r.db_only),
    Step("database", AFTER, put_database,
         lambda r: f"rename the prepared copy of {r.point.backup.path} into place as {r.env.db}",
         when=lambda r: r.restore_db),
    *bring_up_steps(),
    Step("seal", AFTER, seal,
         lambda r: "make the set-aside database a verified backup (held: prune keeps it) and count the rows it holds "
                   "that the restored database lacks (with the plan's count standing, only its hash is left, started "
                   "at the lowest CPU priority once the database is in place)", when=lambda r: r.restore_db),
    Step("record", AFTER, record_rollback,
         lambda r: f"record the rollback in {r.env.state_dir / (r.env.name + '.deploys.jsonl')}; mark the release it "
                   "leaves bad" if r.mark else f"record the rollback in {r.env.state_dir}"),
]
ROLLBACK_BEFORE = {s.name for s in ROLLBACK if s.phase == BEFORE}


def again_command(config, env, point, restore_db, db_only=False):
    """What a human pastes when a rollback could not finish: the same rollback, to the same point."""
    mode = "--db-only" if db_only else "--with-db" if restore_db else "--code-only"
    return script_command(config, "rollback.py", env.name, "--to", point.id, "--yes", mode)


def rollback_failed(run, step, exc, changed):
    env, record = run.env, run.record
    early, run.sealing = run.sealing, None
    if early is not None:
        early.wait()        # the set-aside file sealed or as it was, not half-way, before anything reports
    record.result, record.failed_step, record.error = "failed", step, describe_failure(exc)
    record.steps = run.clock.seconds
    record.probe = stop_probe(run)
    put_back = not changed and put_back_before_change(run)
    if put_back and run.parent is None:
        record.running = run.running
    elif run.parent is not None and put_back and getattr(run.parent, "to", None):
        run.parent.running = run.parent.to          # the deploy's release still runs: it was not rolled back
    write_rollback_record(run)
    if failure_code(changed, put_back) == EXIT_FAILED and run.parent is None:
        raise after_undo(exc, f"rollback of {env.name} failed at {step}, before any change: {describe_failure(exc)}; "
                              f"{env.name} runs what it ran") from None
    back = next_command(run, step)
    raise DeployError(
        f"the rollback of {env.name} to {run.point.id} failed at step {step}: {describe_failure(exc)}. {env.name} is "
        f"NOT back as it was. Look with: systemctl --user status {env.unit}; journalctl --user -u {env.unit} -n 50"
        + ("; the point's release does not serve: go back to what ran before, from its pre-rollback save"
           if back != again_command(run.config, env, run.point, run.restore_db, run.db_only) else ""),
        EXIT_HUMAN, command=back, output=exc.output if isinstance(exc, DeployError) else "") from None


def next_command(run, step):
    """What a human runs after a rollback failed past its change: when the point's release does not serve
    (restart, health, watch), running the same rollback again fails the same way, so: back to what ran before,
    from the pre-rollback save (the next command seals it first, when the failure left it unsealed); else the
    same rollback again (a step that moved files, which a second run finishes)."""
    saved = run.record.pre_rollback
    if step in ("restart", "health", "watch") and saved:
        mode = "--db-only" if run.db_only else "--with-db" if run.restore_db else "--code-only"
        return script_command(run.config, "rollback.py", run.env.name, "--to",
                                  os.path.basename(saved).removesuffix(".sqlite3"), "--yes", mode)
    return again_command(run.config, run.env, run.point, run.restore_db, run.db_only)


def put_back_before_change(run):
    """A failure before `code`: what ran is put back (the prepared copy removed, the app started again if it
    was stopped). False when that cannot be done safely (the live database was being set aside)."""
    env = run.env
    if run.plan_view is not None:
        run.plan_view.close()
    if run.prepared:
        dbfiles.remove_temp(run.prepared)
    if run.restore_db and run.stopped and not env.db.exists():
        return False            # the app stays stopped: it must not start on an empty database
    if run.stopped:
        replica.resume(env, swapped=False)
        try:
            restart.restart_unit(env)
        except DeployError:
            return False
    return True


def rollback_operation():
    return Operation(
        "rollback", ROLLBACK,
        before_failed=lambda r, step, exc: rollback_failed(r, step, exc, changed=False),
        after_failed=lambda r, step, exc: rollback_failed(r, step, exc, changed=True), shielded=True,
        journal=lambda r: RollbackJournal(point=r.point.id, commit=r.point.commit, restore_db=r.restore_db,
                                          db_why=r.db_why, release=r.point.release, db_only=r.db_only,
                                          backup=r.point.backup.path if r.point.backup else None, from_=r.running))


def roll_back(config, env, repo, point, restore_db, why, running, parent=None, watch=0, quick_stop=None, mark=True,
              run=None, why_marked=None, db_only=False, out=PLAIN):
    """The one "roll back and report" path: take the env (locked by the caller) to point, record it (alone,
    or inside parent's record), mark what it left bad (mark, naming why_marked: what failed); return the
    RollbackRun. Failure before any change: DeployError (exit 1). After: DeployError with EXIT_HUMAN and the
    command to run."""
    run = run or rollback_run(config, env, repo, point, restore_db, why, running, watch, quick_stop, mark, db_only, out)
    run.parent = parent
    run.why_marked = why_marked or getattr(parent, "error", None) or "by hand"
    try:
        execute(rollback_operation(), run, env)
    finally:
        stop_probe(run)
    return run


def rollback_steps(run):
    return describe(rollback_operation(), run)


def mark_bad(env, repo, commit, why):
    """A release that was rolled back stays out: deploy.py refuses its tree unless --force --reason."""
    bad_log(env).append({"time": now_iso(), "env": env.name, "commit": commit, "tree": repo.tree_of(commit),
                         "bad": True, "why": why})

