"""The deploy: its steps (DEPLOY), its run (DeployRun), what a failure does, and what follows a deploy.

deploy(config, env, plan, out) carries out a plan (safedeploy.planning): 0, or EXIT_FAILED after the automatic
rollback (a step after the switch failed: runbook.rollback.roll_back to this deploy's own before-deploy point,
its report to out); raises otherwise. deploy_steps() is the dry run: the same list, described.

A deploy, in order (`when` skips a step that does not apply; BEFORE steps change nothing live):
  build        (releases) build the target beside the running release, the shared paths linked to
               stand-ins while `build` runs, or reuse a kept release of it built the same way   BEFORE
  tag          tag what runs ENV-before-deploy-<stamp>, push the tag                             BEFORE
  backup       back up the database and the unit file (online, verified); its spare beside the live
               file, which a rollback to this point takes by a rename (room permitting)          BEFORE
  stop         (migration_mode stop-first) stop the old release; requests wait in the socket     AFTER
  switch       `current` to the new release in one rename; the work tree to the target           AFTER
  pre_restart  the migration, in the new release                                                 AFTER
  restart, health, watch, revision                                                               AFTER
  record       the deploy log, the verified mark                                                 AFTER
A failure in a BEFORE step: recorded, exit 1, nothing live changed. After: the automatic rollback.
"""

import json
from dataclasses import dataclass, field

from .. import (backups, commands, probe, records, redaction, releases, restore, retention, rowloss, unitenv, unitfiles, units,
               verified_notes)
from ..commandline import script_command
from ..decisions import Blame, DatabaseMode, FailureFacts, judge_failure
from ..errors import EXIT_FAILED, EXIT_HUMAN, DeployError, after_undo, describe_failure
from ..journals import DeployJournal
from ..output import PLAIN
from ..points import Point
from ..records import DeployRecord
from ..runner import AFTER, BEFORE, Operation, Step, describe, execute, signals_deferred
from ..state import bad_log, now_iso, utc_stamp, verified_log
from .bringup import QUICK_STOP, Run, bring_up_steps, current_unit_file, start_probe, stop_probe
from .rollback import roll_back


# -- deploy ---------------------------------------------------------------------------------------
@dataclass
class DeployRun(Run):
    """What a deploy carries from step to step."""
    config: object
    env: object
    plan: object
    record: DeployRecord | None = None   # set by deploy_run
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
    run.journal.release = run.release.id
    run.journal.save()
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
    run.journal.tag = run.record.tag
    run.journal.save()
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
    run.journal.backup = run.backup.path
    run.journal.save()
    leave_spare(run)


def leave_spare(run):
    """The backup's spare beside the live database, for a rollback to this point to take instead of copying the
    file while the operator waits (restore.make_spare). Not made (no room, a copy that fails its check): a
    warning, and the deploy goes on; such a rollback copies the backup, as without one."""
    try:
        spare = restore.make_spare(run.backup, run.env.db)
    except DeployError as exc:
        run.out.warn(f"no spare copy of {run.backup.path} for a fast rollback (the deploy goes on): {exc}")
        return
    if spare is None:
        run.out.say(f"note: no spare copy of the backup beside {run.env.db} (the disk would keep less than room for "
                    "another copy of the database): a rollback to this point copies the backup")


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
            f"{run.plan.unit_file}; leave a spare copy of it beside {env.db} (checked by its sha256) that a rollback to "
            "this point takes instead of copying, where the disk keeps room for another copy after it")


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
            f"{unitfiles.socket_name(run.env.unit)} keeps the port and starts no app: {wait}")


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
    from ..planning import decide_database
    restore_db, why = decide_database(env, point, DatabaseMode.AUTO, compare=False)
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
                     journal=lambda r: DeployJournal(target=r.plan.target, from_=r.plan.running,
                                                     previous_release=r.plan.running_release.id
                                                     if r.plan.running_release else None))


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

