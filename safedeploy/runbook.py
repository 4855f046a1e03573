"""The runbook: deploy, rollback and conversion as lists of named steps (safedeploy.runner runs them).

Each operation is one list, read by the real run, the dry run (--dry-run, --dry-run --json, the
rollback's plan), the journal, the fault matrix and the recovery of a killed run. The three share
one bring-up, BRING_UP: restart (or hand over between the two slots), health, watch, revision.
And there is one "roll back and report" path, roll_back(): a deploy whose step after the switch
fails goes through it to its own before-deploy point, so does rollback.py, so does the recovery of
a deploy killed after its switch.

A deploy, in order (`when` skips a step that does not apply; BEFORE steps change nothing live):
  build        (releases) build the target beside the running release, the shared paths linked to
               stand-ins while `build` runs, or reuse a kept release of it built the same way   BEFORE
  tag          tag what runs ENV-before-deploy-<stamp>, push the tag                             BEFORE
  backup       back up the database and the unit file (online, verified)                          BEFORE
  stop         (migration_mode stop-first) stop the old release; requests wait in the socket     AFTER
  switch       `current` to the new release in one rename; the work tree to the target           AFTER
  pre_restart  the migration, in the new release                                                 AFTER
  restart, health, watch, revision                                                               AFTER
  record       the deploy log, the verified mark                                                 AFTER
A failure in a BEFORE step: recorded, exit 1, nothing live changed. After: the automatic rollback.

A rollback, in order:
  tag          tag the commit it leaves ENV-rolled-back-<stamp>                                  BEFORE
  build        (releases) the point's kept release, or rebuild it when retention removed it      BEFORE
  prepare      (database) copy the point's backup beside the live file, check its sha256 against
               the one recorded with its integrity_check, while the app still serves: a bad
               backup or a full disk stops here                                                  BEFORE
  stop         (database) stop the app (its socket and handover slot too)                        BEFORE
  save         database restored: rename the stopped app's files aside (that rename is the
               pre-rollback save); kept: an online backup, the app serving                       BEFORE
  code         (releases) `current` to the point's release; the work tree to the point's commit
               (uncommitted changes are stashed, never lost)                                     AFTER
  unit         put back the point's unit file, only where it fits the layout that exists         AFTER
  database     rename the prepared copy into place                                               AFTER
  restart, health, watch (rollback.py, with `watch`), revision                                   AFTER
  seal         make the set-aside files a verified backup; count its rows the restore lacks      AFTER
  record                                                                                         AFTER
A failure before `code` puts back what ran (the app restarted if it was stopped): exit 1. After it:
exit 4, with the command to run.
"""

import json
import os
from dataclasses import dataclass, field

from . import (backups, commands, convert, marks, probe, records, redaction, release, releases, replica, retention,
               rowloss, unitenv, units, verified_notes)
from .commandline import script_command
from .decisions import Blame, FailureFacts, failure_code, judge_failure
from .errors import EXIT_FAILED, EXIT_HUMAN, DeployError, after_undo, describe_failure
from .files import write_atomic
from .output import PLAIN, Output
from .points import Point
from .records import DeployRecord, RollbackRecord
from .runner import AFTER, BEFORE, Operation, Step, describe, execute, signals_deferred
from .state import bad_log, now_iso, utc_stamp, verified_log

QUICK_STOP = 5.0        # seconds a failed release may take to stop when it is rolled back, then it is killed


# -- the bring-up: deploy, rollback and conversion ---------------------------------------------------
def bring_up_steps():
    """restart (or hand over), health, watch, revision. The ctx says: env, expect (the commit the new
    process must name, releases), watch_seconds, revision (the commit REVISION records, in place),
    quick_stop (a failed release being replaced: its stop is bounded)."""
    return [
        Step("restart", AFTER, restart_step, restart_detail),
        Step("health", AFTER, lambda c: setattr(c, "health", release.wait_until_healthy(c.env, c.expect, c.started)),
             lambda c: f"wait up to {c.env.health_timeout:g}s for {c.env.health_url} to answer 2xx/3xx from the unit's "
                       "own process" + (f" naming {c.expect[:12]} at /_deploy/status" if c.expect else "")),
        Step("watch", AFTER, lambda c: setattr(c, "watched", release.watch(
                c.env, c.watch_seconds, c.out.countdown(f"watching {c.env.name}"))),
             lambda c: f"watch for {c.watch_seconds:g}s: health and the unit (same process, no restart); a failure "
                       "rolls back",
             when=lambda c: c.watch_seconds),
        Step("revision", AFTER, lambda c: release.write_revision(c.env, c.repo, c.revision),
             lambda c: f"write {c.env.path / 'REVISION'} ({c.revision[:12]})",
             when=lambda c: c.revision is not None),
    ]


def restart_step(c: "Run") -> None:
    """The restart (or handover), measured: the probe starts just before it (when a stop before it has not
    started it already), and the restart counters it leaves are what the health step counts from."""
    start_probe(c)
    c.started = units.restart(c.env.unit, c.quick_stop)


def start_probe(run: "Run") -> None:
    """From here until health is confirmed (and through the watch), the operation measures what the switch
    costs users (safedeploy.probe); stop_probe ends it on every path out."""
    if run.probe is None:
        run.probe = probe.Probe(run.env.health_url).start()


def stop_probe(run: "Run") -> dict | None:
    """The probe's tally ({"requests", "refused", "errors", "slowest_s"}), or None when it never started.
    Safe to call again: the same tally."""
    return run.probe.stop() if run.probe is not None else None


def restart_detail(c):
    """The restart as the dry run and the plans say it: after a stop-first stop or a restore's, the socket
    is held (units.hold), and the restart gives it back to the app and starts it."""
    plan = getattr(c, "plan", None)
    held = ((plan is not None and plan.migration_mode == "stop-first") or
            (getattr(c, "restore_db", False) and units.restart_method(c.env.unit) != "plain"
             and units.state(units.socket_name(c.env.unit)).is_active))
    if held:
        return (f"give {units.socket_name(c.env.unit)} back to the app and start {c.env.unit}: it answers the requests "
                "that waited")
    return units.describe_restart(c.env.unit)


@dataclass(kw_only=True)
class Run:
    """What the runner and the bring-up keep on any run: the step clock and journal (set by the runner),
    the health answer, the seconds watched, how long a process being replaced may take to stop, the
    restart counters the tool's own start left (health counts restarts from them), and the probe."""
    quick_stop: float | None = None
    started: dict | None = None
    probe: object = None
    health: object = None
    watched: float = 0.0
    clock: object = None
    journal: object = None
    out: Output = PLAIN             # where the run's own lines go: the script's cli.output()


# -- deploy ---------------------------------------------------------------------------------------
@dataclass
class DeployRun(Run):
    config: object
    env: object
    plan: object
    record: DeployRecord = None
    stamp: str = field(default_factory=utc_stamp)
    release: object = None
    backup: object = None
    backup_path: object = None
    previous_release: str | None = None
    recorded: bool = False          # the record step wrote the deploy's record (an interrupt past it: it stands)
    rows_before: object = None      # the live rows' digests as the new release was switched in (rowloss)

    @property
    def repo(self):
        return self.plan.repo

    @property
    def expect(self):
        return self.plan.target if self.plan.converted else None

    @property
    def revision(self):
        return None if self.plan.converted else self.plan.target

    @property
    def watch_seconds(self):
        return self.env.watch

    @property
    def tag_name(self):
        return f"{self.env.name}-before-deploy-{self.stamp}"


def deploy_run(config, env, plan, out=PLAIN):
    run = DeployRun(config=config, env=env, plan=plan, out=out)
    run.record = DeployRecord(env=env.name, user=unitenv.user(), from_=plan.running, to=plan.target,
                              forced=plan.forced, reason=plan.reason, migration_mode=plan.migration_mode,
                              rehearsed=plan.rehearsed.time if plan.rehearsed else None)
    if env.db.exists():
        run.backup_path = backups.backup_name(env.name, "pre-deploy", env.backup_dir)     # the tag names it
    return run


def build_release(run):
    plan, env = run.plan, run.env
    run.release = plan.reuse or releases.build(env, plan.repo, plan.target, run.out.say)
    run.record.release = run.release.id
    run.record.shadowed = shadowed(run.release)
    run.journal.update(release=run.release.id)
    for name in run.record.shadowed:
        run.out.warn(f"{name} is tracked in {plan.target[:12]} but lies under a shared path: the release uses "
                f"the shared copy in {env.releases_root / 'shared'}, which differs; the commit's version never runs")


def shadowed(rel):
    try:
        return json.loads((rel.path / "REVISION").read_text()).get("shadowed") or []
    except (OSError, ValueError):
        return []


def tag_running(run):
    env, plan = run.env, run.plan
    message = (f"{env.name} ran {plan.running} on {env.branch} before deploying {plan.target}\n\n"
               f"commit: {plan.running}\nbranch: {env.branch}\nbackup: {run.backup_path or 'none (no database)'}\n")
    run.record.tag = plan.repo.create_tag(run.tag_name, plan.running, message)
    run.record.tag_pushed = False
    run.journal.update(tag=run.record.tag)
    if env.remote:
        try:
            plan.repo.push_tag(env.remote, run.record.tag)
            run.record.tag_pushed = True
        except DeployError as exc:
            run.out.warn(f"could not push tag {run.record.tag} to {env.remote} (the deploy goes on): {exc}")


def back_up(run):
    env = run.env
    if not env.db.exists():
        run.out.say(f"note: {env.db} does not exist yet; no database to back up")
        return
    run.backup = backups.backup_database(env.db, env.backup_dir, env.name, "pre-deploy", commit=run.plan.running,
                                         unit_file=current_unit_file(env), final=run.backup_path,
                                         bookkeeping=env.bookkeeping)
    run.record.backup = run.backup.path
    run.journal.update(backup=run.backup.path)


def switch(run):
    plan = run.plan
    run.rows_before = rowloss.snapshot(run.env)      # what the new release finds: what it deletes is counted
    if run.release is not None:
        run.previous_release = releases.switch(run.env, run.release)
    if plan.head != plan.target:
        (plan.repo.fast_forward if plan.fast_forward else plan.repo.reset_hard)(plan.target)


def record_deploy(run):
    env, plan, record = run.env, run.plan, run.record
    record.rows_deleted, record.rows_in_no_copy = rowloss.deleted(env, run.rows_before, run.backup)
    if record.rows_deleted and run.backup is not None:
        try:
            rowloss.hold(run.backup)        # it holds the rows the release deleted: kept, and the ledger counts it
        except (OSError, ValueError, DeployError):
            pass
    record.result, record.running, record.steps = "ok", plan.target, run.clock.seconds
    record.running_release = run.release.id if run.release else None
    record.health = run.health.describe() if run.health else None
    record.watch = run.watched or None
    record.probe = stop_probe(run)
    record.previous_release = run.previous_release
    with signals_deferred():          # the record whole or not at all: a Ctrl-C here arrives once it is written
        records.append(env, record)
        verified_log(env.name, env.state_dir).append(
            {"time": now_iso(), "commit": plan.target, "tree": plan.target_tree, "by": "deploy"})
        if plan.clears_bad:
            bad_log(env).append({"time": now_iso(), "env": env.name, "commit": plan.target, "bad": False,
                                 "tree": plan.target_tree, "why": f"deployed with --force: {plan.reason}"})
        run.recorded = True


def switch_detail(run):
    plan, env = run.plan, run.env
    tree = (f"move {env.path} to {plan.target[:12]} ({plan.target_subject}): "
            + (f"git merge --ff-only {plan.target}" if plan.fast_forward else f"git reset --hard {plan.target}")
            if plan.head != plan.target else f"{env.path} is at {plan.target[:12]} already")
    if not plan.converted:
        return tree
    return f"point {env.current_link} at releases/{release_name(run)} in one rename; {tree}"


def release_name(run):
    if run.release is not None:
        return run.release.id
    return run.plan.reuse.id if run.plan.reuse else f"{run.stamp}-{run.plan.target[:12]}"


def build_detail(run):
    plan, env = run.plan, run.env
    if plan.reuse:
        return f"reuse the kept release {plan.reuse.path} of {plan.target[:12]} (built the same way, unchanged): no build"
    commands_text = "; ".join(redaction.shown(argv) for argv in env.build) or "no build commands"
    return (f"build {env.releases_root / 'releases' / release_name(run)} from {plan.target[:12]} (git archive), the "
            f"shared paths ({', '.join(releases.shared_paths(env)) or 'none'}) linked to stand-ins, not live data, "
            f"while it runs: {commands_text}; then linked to {env.releases_root / 'shared'}")


def backup_detail(run):
    env = run.env
    if not env.db.exists():
        return f"no database at {env.db} yet: no backup"
    return (f"back up {env.db} (SQLite online copy, integrity_check, sha256) to {run.backup_path}, and the unit file "
            f"{run.plan.unit_file}")


def stop_old(run):
    """The running release cannot live with the migration: it stops before pre_restart, and the socket
    activates the holder meanwhile (requests wait in its queue, or get 503s: see units.hold); the restart
    step gives the socket back to the app."""
    page = (run.release.path / "maintenance.html") if run.release else run.env.path / "maintenance.html"
    start_probe(run)            # the switch, for users, starts here
    units.hold(run.env.unit, run.plan.retry_after, page if run.plan.retry_after else None)


def stop_detail(run):
    wait = (f"requests get a 503 with Retry-After: {run.plan.retry_after} from the tool's listener"
            if run.plan.retry_after else "requests wait in its queue")
    return (f"stop {units.serving_state(run.env.unit).name} before pre_restart ({run.plan.migration_why}); "
            f"{units.socket_name(run.env.unit)} keeps the port and starts no app: {wait}")


DEPLOY = [
    Step("build", BEFORE, build_release, build_detail, when=lambda r: r.plan.converted),
    Step("tag", BEFORE, tag_running,
         lambda r: f"tag {r.plan.running[:12]} (what runs) as {r.tag_name}: git tag --annotate {r.tag_name} "
                   f"{r.plan.running}" + (f"; git push {r.env.remote} refs/tags/{r.tag_name}" if r.env.remote else "")),
    Step("backup", BEFORE, back_up, backup_detail),
    Step("stop", AFTER, stop_old, stop_detail, when=lambda r: r.plan.migration_mode == "stop-first"),
    Step("switch", AFTER, switch, switch_detail),
    Step("pre_restart", AFTER,
         lambda r: commands.run_all(r.env.pre_restart, r.release.path if r.release else r.env.path,
                                    r.env.command_timeout, environ=unitenv.command_environment(r.env)),
         lambda r: "; ".join(f"run in {r.env.releases_root / 'releases' / release_name(r) if r.plan.converted else r.env.path}: "
                             f"{redaction.shown(argv)}" for argv in r.env.pre_restart)
         + " (with the unit's environment)"
         + (f" ({r.plan.migration_why})" if r.plan.migration_mode == "online" else ""),
         when=lambda r: r.env.pre_restart),
    *bring_up_steps(),
    Step("record", AFTER, record_deploy,
         lambda r: f"record the deploy in {r.env.state_dir / (r.env.name + '.deploys.jsonl')}; mark its tree verified"
                   + (f" (then shared through {r.env.remote}'s git notes)" if r.env.remote else "")),
]
DEPLOY_BEFORE = {s.name for s in DEPLOY if s.phase == BEFORE}


def deploy_failed_before(run, step, exc):
    env, plan, record = run.env, run.plan, run.record
    record.result, record.failed_step, record.error = "failed", step, describe_failure(exc)
    record.steps, record.running = run.clock.seconds, plan.running
    records.append(env, record)
    raise after_undo(exc, f"deploy of {env.name} stopped before any change to what runs ({step} failed: "
                          f"{describe_failure(exc)}); {env.name} still runs {plan.running[:12]}") from None


def deploy_failed_after(run, step, exc):
    """A step after the switch failed: go back to this deploy's own before-deploy point, through the one
    "roll back and report" path. The record step is the exception: the env runs the new release and is
    healthy, only its record is missing."""
    env, plan, record = run.env, run.plan, run.record
    if step == "record" and run.recorded:           # interrupted once the record was written: the deploy stands
        run.out.err(f"interrupted after the deploy of {env.name} was recorded: it stands ({plan.target[:12]} serves, its "
                f"health check passed); nothing was rolled back")
        return 0
    if step == "record" and not isinstance(exc, KeyboardInterrupt):
        raise DeployError(f"{env.name} runs {plan.target[:12]} and its health check passed, but the deploy could not "
                          f"be recorded: {describe_failure(exc)}. Free space in {env.state_dir} (df -h {env.state_dir}), "
                          "then deploy the same commit again: it reuses the release and records it",
                          EXIT_HUMAN, command=script_command(run.config, "deploy.py", env.name, "--ref", plan.target,
                                                                "--yes"))
    if step in ("restart", "health", "watch"):
        try:                # a crash loop stops here, the socket kept: it must not burn the start limit meanwhile
            units.hold_crashing(env.unit, run.started, QUICK_STOP)
        except DeployError:
            pass            # the rollback's restart stops it as it would have
    record.probe = stop_probe(run)         # the deploy's own switch; the rollback measures its own
    what = describe_failure(exc)
    details = (getattr(exc, "output", "") or "").splitlines()
    if not details and step in ("restart", "health", "watch"):
        details = units.journal_tail(units.serving_state(env.unit).name)
    judged = judge(step, exc, what, details)
    record.result, record.failed_step, record.error = "rolled-back", step, what
    record.steps, record.running, record.blame = dict(run.clock.seconds), plan.running, judged.blame.value
    run.out.err(f"error: deploy of {env.name} failed at step {step}: {what}")
    for line in details[-10:]:
        run.out.err(f"  | {line}")
    point = Point(record.tag or "interrupted", "before-deploy", plan.running, record.time, run.backup,
                  release=run.previous_release or (plan.running_release.id if plan.running_release else None))
    from .planning import decide_database
    restore_db, why = decide_database(env, point, "auto", compare=False)
    # a release that failed is marked bad; a failure of the host or its config is not (the same commit deploys
    # once it is fixed), nor one the operator interrupted (Ctrl-C, SIGTERM)
    back = roll_back(run.config, env, plan.repo, point, restore_db, why, plan.target, parent=record,
                     mark=judged.blame == Blame.RELEASE, quick_stop=QUICK_STOP, why_marked=judged.why, out=run.out)
    done = back.record
    run.out.err(f"rolled back by itself: {env.name} runs {plan.running[:12]} again, and {env.health_url} answers "
            f"{back.health.describe()}")
    run.out.err(f"  code      {'release ' + done.release if done.release else 'the work tree at ' + plan.running[:12]}")
    run.out.err(f"  database  {'restored from ' + run.backup.path if restore_db else 'kept'}: {why}")
    run.out.err(f"  probe     the deploy: {probe.describe(record.probe)}; the rollback: {probe.describe(done.probe)}")
    run.out.err("  saved     " + (f"the failed release's database, in {done.pre_rollback}" if done.pre_rollback else
                             f"the failed release's database lies at {done.aside}: {done.seal_problem}" if done.aside
                             else "no database to save"))
    if done.rows_lost:
        lost = ", ".join(f"{n} row(s) of {t}" for t, n in sorted(done.rows_lost.items()))
        run.out.err(f"  rows      {lost} written since the backup are in that copy, not live: put them back with: "
                + script_command(run.config, "backup.py", env.name, "--restore-rows",
                                     done.pre_rollback or done.salvaged or "", "--yes"))
    if judged.blame == Blame.HOST:
        run.out.err(f"  cause     the host or its config, not the release: {judged.why}. {plan.target[:12]} is not "
                f"marked bad: fix it, then deploy again: {script_command(run.config, 'deploy.py', env.name)}")
    if not isinstance(exc, (DeployError, KeyboardInterrupt)):
        raise after_undo(exc, f"deploy of {env.name} failed at {step} ({what}); rolled back by itself to "
                              f"{plan.running[:12]}") from None
    return EXIT_FAILED


def judge(step, exc, what, details):
    """The release or the host to blame (safedeploy.decisions.judge_failure) for a failure after the switch."""
    failure = getattr(exc, "failure", None)
    return judge_failure(FailureFacts(step=step, message=what, output="\n".join(details),
                                      could_not_start=failure is not None and failure.kind == commands.FailureKind.COULD_NOT_START,
                                      interrupted=isinstance(exc, KeyboardInterrupt)))


def deploy_operation():
    return Operation("deploy", DEPLOY, deploy_failed_before, deploy_failed_after,
                     journal_data=lambda r: {"v": records.VERSION, "target": r.plan.target, "from": r.plan.running,
                                             "previous_release": r.plan.running_release.id if r.plan.running_release
                                             else None})


def deploy(config, env, plan, out=PLAIN):
    """Carry out a deploy plan (its lines to out); 0, or EXIT_FAILED after the automatic rollback; raises otherwise."""
    run = deploy_run(config, env, plan, out)
    try:
        failed = execute(deploy_operation(), run, env)
    finally:
        stop_probe(run)             # every way out, a Ctrl-C and a bug included
    if failed is not None:
        return failed, run
    return 0, run


def after_deploy(run):
    """What follows a deploy that went through, none of which can undo it: a promotion moves the env's
    branch on the remote (fast-forward only), so origin, the tree and the log agree and the next plain
    deploy finds nothing to do; keep_releases removes old releases (never the running one, the previous
    one, or one whose commit a rollback point of the last 5 operations needs). Returns (lines to print,
    the releases removed); a failure is a "warning:" line, never an error."""
    env, plan, notes = run.env, run.plan, []
    tip = plan.repo.resolve(f"refs/remotes/{env.remote}/{env.branch}") if env.promote_from and env.remote else None
    if env.promote_from and env.remote and tip != plan.target and not (tip and not plan.repo.is_ancestor(tip, plan.target)):
        try:
            plan.repo.push_branch(env.remote, plan.target, env.branch)
            plan.repo.fetch(env.remote)
            notes.append(f"pushed {env.remote}/{env.branch} to {plan.target[:12]} (a fast-forward from "
                         f"{tip[:12] if tip else 'nothing'}), so it matches what {env.name} runs")
        except DeployError as exc:
            notes.append(f"warning: {env.name} runs {plan.target[:12]}, but {env.remote}/{env.branch} could not be moved "
                         f"there ({exc}); push it yourself: git -C {env.path} push {env.remote} {plan.target}:{env.branch}")
    shared = verified_notes.share_line(plan.repo, env.remote, verified_notes.verification(
        env.name, plan.target, plan.target_tree, "deploy"))          # the tree verified here, for other hosts
    notes += [shared] if shared else []
    removed = []
    if run.release:
        try:
            removed = releases.prune(env, run.previous_release, retention.needed_commits(records.read(env)))
        except OSError as exc:
            notes.append(f"warning: could not remove old releases in {env.releases_root}: {exc}")
    return notes, removed


def deploy_steps(config, env, plan):
    """The dry run: exactly the steps a deploy of plan takes, with their details."""
    run = deploy_run(config, env, plan)
    return describe(deploy_operation(), run)


# -- rollback ----------------------------------------------------------------------------------
@dataclass
class RollbackRun(Run):
    config: object
    env: object
    repo: object
    point: object
    restore_db: bool
    db_why: str
    running: str                        # the commit it leaves
    record: RollbackRecord = None
    stamp: str = field(default_factory=utc_stamp)
    target: object = None               # the release it switches to (releases)
    kept: object = None                 # the point's kept release, found when planned
    prepared: object = None
    early: object = None                # a backups.EarlyPrepare the plan started, which prepare waits for
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
    socket_needed = f"Requires={units.socket_name(env.unit)}" in saved.decode(errors="replace")
    if socket_needed and not units.state(units.socket_name(env.unit)).known:
        return "keep", f"the point's unit file needs {units.socket_name(env.unit)}, which this host does not have"
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
    run.journal.update(release=run.target.id)


def prepare(run):
    early, run.early = run.early, None
    run.prepared = early.result() if early is not None else backups.prepare_restore(run.point.backup, run.env.db)


def stop_for_restore(run):
    start_probe(run)            # the switch, for users, starts with this stop
    run.stopped = True
    units.stop_for_restore(run.env.unit)
    replica.pause(run.env)          # its last writes reach the replica; nothing reads the file while it moves


def put_database(run):
    backups.put_in_place(run.prepared, run.env.db)
    replica.resume(run.env, swapped=True)       # the replica continues from the restored database


def save(run):
    """The pre-rollback save. Restoring: the stopped app's files renamed aside (see backups). Keeping
    the database: an online backup while the app serves."""
    env = run.env
    if not env.db.exists():
        return
    if run.restore_db:
        run.record.aside = str(backups.set_aside(env.db, backups.aside_name(env.db, env.backup_dir, env.name,
                                                                            run.stamp)))
        run.record.pre_rollback = run.record.aside
    else:
        run.record.pre_rollback = backups.backup_database(env.db, env.backup_dir, env.name, "pre-rollback",
                                                          commit=run.running, unit_file=current_unit_file(env)).path
    run.record.backup = run.record.pre_rollback
    run.journal.update(aside=run.record.aside)


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
    write_atomic(b.unit_file, data, mode=units.unit_file_mode(data.decode(errors="replace"), mode))
    units.daemon_reload()
    run.record.unit_restored = True


def seal(run):
    """Once the app is back: the set-aside database becomes a verified backup; its rows that the restored
    database lacks are counted. A file SQLite cannot read stays where it is, as evidence."""
    env, record = run.env, run.record
    if record.aside is None:
        return              # there was no live database to set aside (or a killed run's save was sealed already)
    counted: dict = {}

    def count():            # while the seal checks and hashes the file: only the rows that differ are read
        try:
            counted["lost"] = rowloss.lost_quickly(env, record.aside)
        except Exception:   # a count is a report: the full comparison below then makes it, the seal goes on
            counted["lost"] = None
    try:
        sealed = backups.seal(record.aside, env.backup_dir, env.name, run.running, current_unit_file(env),
                              alongside=count)
    except DeployError as exc:
        record.pre_rollback, record.seal_problem = None, str(exc)
        record.aside = exc.evidence or record.aside
        salvage_evidence(run)
        return
    record.pre_rollback = record.aside = record.backup = sealed.path
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


def current_unit_file(env):
    return units.state(env.unit).fragment_path or None


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
         lambda r: f"copy {r.point.backup.path} beside {r.env.db} and check its sha256 (hashed as it is copied) against "
                   "the one recorded when the backup passed integrity_check, the app serving",
         when=lambda r: r.restore_db),
    Step("stop", BEFORE, stop_for_restore,
         lambda r: f"stop {r.env.unit} so that nothing opens the database" + (
             f" ({units.socket_name(r.env.unit)} keeps the port and starts no app: requests wait in its queue)"
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
                   "that the restored database lacks", when=lambda r: r.restore_db),
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
    if run.prepared:
        backups.remove_temp(run.prepared)
    if run.restore_db and run.stopped and not env.db.exists():
        return False            # the app stays stopped: it must not start on an empty database
    if run.stopped:
        replica.resume(env, swapped=False)
        try:
            release.restart_unit(env)
        except DeployError:
            return False
    return True


def rollback_operation():
    return Operation(
        "rollback", ROLLBACK,
        before_failed=lambda r, step, exc: rollback_failed(r, step, exc, changed=False),
        after_failed=lambda r, step, exc: rollback_failed(r, step, exc, changed=True), shielded=True,
        journal_data=lambda r: {"v": records.VERSION, "point": r.point.id, "commit": r.point.commit,
                                "restore_db": r.restore_db, "db_why": r.db_why, "release": r.point.release,
                                "db_only": r.db_only,
                                "backup": r.point.backup.path if r.point.backup else None, "from": r.running})


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


# -- conversion: an env that runs from its work tree, onto releases and socket units ----------------
@dataclass
class ConversionRun(Run):
    env: object
    conversion: object
    saved: object = None
    modes: dict = field(default_factory=dict)
    first: object = None
    moves: object = field(default_factory=convert.Moves)
    held_by_socket: bool = False
    made_root: bool = False
    watch_seconds: float = 0
    revision: object = None
    repo: object = None

    @property
    def expect(self):
        return self.first.commit if self.first else None


def build_first(run):
    run.first = releases.build(run.env, run.conversion.repo, run.conversion.commit, run.out.say)
    run.journal.update(first=run.first.id)


def finish_conversion(run):
    units.release_holder(run.env.unit)
    replica.resume(run.env, swapped=False)     # the replicator restarts on the database's new path
    stop_probe(run)


def conversion_steps():
    restart, health = bring_up_steps()[:2]
    return [
        Step("build", BEFORE, build_first,
             lambda c: f"build {c.conversion.commit[:12]} (what runs) as the first release in "
                       f"{c.env.releases_root / 'releases'}", when=lambda c: c.conversion.converting),
        Step("units", AFTER, convert.install_units,
             lambda c: f"install the unit files (diff above) and enable {units.socket_name(c.env.unit)}, the app serving"),
        Step("stop", AFTER, lambda c: (start_probe(c), convert.stop_for_move(c)),
             lambda c: f"stop {c.env.unit}; the moment the port is free {units.socket_name(c.env.unit)} listens "
                       "(requests wait in its queue)"),
        Step("data", AFTER, lambda c: convert.move_data(c.conversion.pairs, c.moves),
             lambda c: f"rename the untracked data into {c.env.releases_root / 'shared'}",
             when=lambda c: c.conversion.converting),
        Step("switch", AFTER, lambda c: releases.switch(c.env, c.first),
             lambda c: f"point {c.env.current_link} at the first release", when=lambda c: c.conversion.converting),
        restart, health,
        Step("finish", AFTER, finish_conversion,
             lambda c: f"{units.socket_name(c.env.unit)} activates {c.env.unit} again"),
    ]


CONVERSION = conversion_steps()
CONVERSION_BEFORE = {s.name for s in CONVERSION if s.phase == BEFORE}


def conversion_failed_before(run, step, exc):
    convert.remove_layout(run.env, run.first)
    convert.discard(run)
    raise after_undo(exc, f"converting {run.env.name} failed at {step} ({describe_failure(exc)}); nothing live was "
                          f"changed: the built release is removed, {run.env.unit} runs as it ran") from None


def conversion_failed_after(run, step, exc):
    env, converting = run.env, run.conversion.converting
    why = describe_failure(exc)
    try:
        convert.put_back(env, run.conversion.files, run.saved, run.modes, run.first, run.moves)
        convert.discard(run)
    except DeployError as back_exc:
        raise DeployError(f"{'converting' if converting else 'installing the socket units for'} {env.name} failed "
                          f"({why}) and putting it back failed too ({back_exc}). The old unit files are in "
                          f"{run.saved}. Look with: systemctl --user status {env.unit}", EXIT_HUMAN,
                          command=f"systemctl --user restart {env.unit}") from None
    raise after_undo(exc, f"converting {env.name} failed at {step} ({why}); everything is put back: the old unit "
                          f"files, the data in {env.path}, and {env.unit} restarted from its work tree" if converting else
                     f"installing the socket units failed at {step} ({why}); the old unit files are back and "
                     f"{env.unit} was restarted as it was") from None


def conversion_operation():
    return Operation("convert", CONVERSION, conversion_failed_before, conversion_failed_after,
                     journal_data=lambda c: {"v": records.VERSION, "saved": str(c.saved), "commit": c.conversion.commit,
                                             "converting": c.conversion.converting, "made_root": c.made_root,
                                             "pairs": [[str(a), str(b)] for a, b in c.conversion.pairs]})


def convert_env(env, conversion, out: Output):
    """Carry out a conversion plan (convert.plan): build the first release, then the one short switch-over
    (what it says goes to out); on any failure every move is put back. Returns the first release (None:
    only the units changed)."""
    run = ConversionRun(env=env, conversion=conversion, repo=conversion.repo,
                        made_root=not env.releases_root.exists(), out=out)
    run.saved, run.modes = convert.save_unit_files(env, conversion.files)
    try:
        execute(conversion_operation(), run, env)
    finally:
        stop_probe(run)
    convert.report(env, conversion, run, out.say)
    return run.first


# -- recovery -----------------------------------------------------------------------------------
def before_change():
    """{op: names of the steps of its BEFORE phase}: where a killed operation had changed nothing live."""
    return {"deploy": DEPLOY_BEFORE, "rollback": ROLLBACK_BEFORE, "convert": CONVERSION_BEFORE}


