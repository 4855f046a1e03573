#!/usr/bin/env python3
"""deploy.py ENV: put the env's branch (or --ref) live, safely.

The runbook, in order (step names from safedeploy.runbook): lock the env;
preflight; fetch and pick the target; the promotion gate; confirm; build the
release beside the running one; tag what runs; back up the database and the
unit file; switch `current` to the new release in one rename (and move the
work tree to the commit); run pre_restart in the new release; restart the unit;
wait for health; record the deploy; print the rollback command. An env not yet
converted to releases runs from its work tree, which is moved in place.
"""

import re
import sys
from dataclasses import dataclass, field

from safedeploy import backups, cli, commands, convert, recovery, rehearsal, release, releases, runbook, units
from safedeploy.runbook import BACKUP, BUILD, HEALTH, PRE_RESTART, RECORD, RESTART, REVISION, SWITCH, TAG, WATCH
from safedeploy.errors import EXIT_FAILED, EXIT_HUMAN, EXIT_LOCKED, DeployError, describe_failure, usage_error
from safedeploy.files import same_disk
from safedeploy.gitrepo import Repo
from safedeploy.points import Point
from safedeploy.state import (EnvLock, Journal, StepClock, bad_log, bad_mark, deploy_log, lock_holder, now_iso,
                              running_commit, utc_stamp, verified_log)


REF_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._/@^~-]*$")   # checked before the lock: a bad ref touches nothing
BACKUP_WAIT = 300         # a running backup ends by itself: a deploy waits for it (bounded), then exit 3
STATE_ROOM = 1 << 20      # the deploy log, the journal and the lock need little, but they need it


def main():
    args = parse_arguments()
    config = cli.load_config(args)
    env = config.env(args.env)
    if args.install_units:
        return install_units(config, env, args)
    if args.rehearse:
        return rehearse(config, env, args)
    if args.dry_run:
        return show_plan(config, env, args)
    with EnvLock(env.state_dir, env.name, "deploy", backup_wait=BACKUP_WAIT, on_wait=cli.say):
        recovery.recover(config, env, Repo(env.path), cli.say)      # a killed operation: finish or undo it first
        plan = prepare(config, env, args)
        if plan.nothing_to_deploy:
            cli.say(f"nothing to deploy: {env.name} already runs {plan.target[:12]} ({plan.target_subject})")
            return 0
        if env.promote_from:
            cli.confirm_env(env.name, args.yes, f"deploy {plan.target[:12]}")
        return carry_out(config, env, plan)


def parse_arguments():
    p = cli.parser("deploy.py", "Deploy the env's branch (or --ref) with a backup, a tag and a health check.",
                   ["python3 deploy.py dev", "python3 deploy.py prod --dry-run",
                    "python3 deploy.py prod --ref 3f2a9c1 --yes",
                    "python3 deploy.py prod --force --reason 'hotfix for login outage'"])
    p.add_argument("env", metavar="ENV", help="the env to deploy, as named in config.toml")
    p.add_argument("--ref", help="deploy this commit, tag or branch instead of the env's branch tip")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation (needed without a terminal)")
    p.add_argument("--dry-run", action="store_true", help="print every step it would take; change nothing")
    p.add_argument("--no-fetch", action="store_true", help="do not fetch the remote first")
    p.add_argument("--force", action="store_true", help="deploy past the promotion gate or a non-fast-forward")
    p.add_argument("--reason", help="why --force is needed (recorded in the deploy log)")
    p.add_argument("--rehearse", action="store_true",
                   help="play the deploy on a copy of the env's database (build, pre_restart, start on a scratch "
                        "port, health); nothing live changes. Exit 0 when it passed")
    p.add_argument("--install-units", action="store_true",
                   help="hold the env's port in a socket unit so restarts drop no request (shows the diff first)")
    p.add_argument("--notify", action="store_true",
                   help="with --install-units: the server signals readiness (Type=notify; automatic for gunicorn), "
                        "so a handover helper can serve while the service restarts")
    args = p.parse_args()
    if args.force and not (args.reason or "").strip():
        raise usage_error("--force needs --reason TEXT: the deploy log records why the gate was overridden")
    if args.reason and not args.force:
        raise usage_error("--reason goes with --force")
    if args.notify and not args.install_units:
        raise usage_error("--notify goes with --install-units")
    if args.rehearse and (args.install_units or args.dry_run or args.force):
        raise usage_error("--rehearse changes nothing live already: it takes no --install-units, --dry-run or --force")
    if args.install_units and (args.ref or args.force or args.no_fetch):
        raise usage_error("--install-units converts the env at the commit it runs: it takes no --ref, --force "
                          "or --no-fetch")
    if args.ref is not None and (not REF_RE.match(args.ref) or ".." in args.ref):
        raise usage_error(f"--ref {args.ref!r}: no such commit, tag or branch can be named like that "
                          "(letters, digits and . _ / @ ^ ~ - only)")
    return args


@dataclass
class Plan:
    repo: Repo
    running: str            # what the env runs: its last deploy's commit, else HEAD
    head: str
    target: str
    target_subject: str
    unit_file: str
    fast_forward: bool
    reason: str = ""
    forced_because: list = field(default_factory=list)
    backup_path: object = None          # the pre-deploy backup's file, named before the tag that mentions it
    target_tree: str = ""               # the target's git tree: gates, marks and rehearsals go by it
    running_release: object = None      # releases: the release `current` points at
    release: object = None              # releases: the one this deploy built
    previous_release: str | None = None
    clears_bad: bool = False            # --force past a bad mark: a healthy deploy clears it

    @property
    def nothing_to_deploy(self):
        same_release = self.running_release is None or self.running_release.commit == self.target
        return self.target == self.running == self.head and same_release


# -- preparing: nothing is changed here except fetched remote refs ---------------
def prepare(config, env, args, fetch=True):
    repo, unit_state = preflight(env)
    if fetch and env.remote and not args.no_fetch:
        repo.fetch(env.remote)
    head = repo.head()
    running = running_commit(deploy_log(env).read()) or head
    target = resolve_target(repo, env, args)
    plan = Plan(repo=repo, running=running, head=head, target=target,
                target_subject=repo.subject(target), target_tree=repo.tree_of(target),
                unit_file=unit_state.fragment_path,
                fast_forward=repo.is_ancestor(head, target), reason=args.reason or "",
                running_release=releases.current(env))
    if not plan.nothing_to_deploy:
        runbook.refuse_tracked_database(env, repo, [head, target])
        check_bad_release(env, plan, args)
        check_promotion_gate(config, env, plan, args)
        check_rehearsed(config, env, plan, args)
        check_direction(plan, args)
    return plan


def preflight(env):
    repo = Repo(env.path)
    branch = repo.current_branch()
    if branch != env.branch:
        raise DeployError(f"{env.path} is on {branch or 'a detached HEAD'}, not on {env.name}'s branch "
                          f"{env.branch!r}: run `git -C {env.path} switch {env.branch}`")
    dirty = repo.dirty_files()
    if dirty:
        raise DeployError(f"{env.path} has uncommitted changes to tracked files ({', '.join(f.strip() for f in dirty[:3])}"
                          f"{', ...' if len(dirty) > 3 else ''}): commit or stash them first")
    unit_state = units.require_known(env.unit)
    state_free = backups.free_bytes(env.state_dir)
    if state_free < STATE_ROOM:
        raise DeployError(f"not enough free disk in the state folder {env.state_dir} to record a deploy: "
                          f"{state_free >> 10} KiB free, {STATE_ROOM >> 10} KiB needed")
    if env.db.exists():
        need, free = backups.needed_bytes(env.db), backups.free_bytes(env.backup_dir)
        if free < need:
            raise DeployError(f"not enough free disk for a backup of {env.db} in {env.backup_dir}: "
                              f"{free / 2**20:.1f} MiB free, {need / 2**20:.1f} MiB needed")
    if env.converted:
        need, free = releases.room_needed(env), backups.free_bytes(env.releases_root)
        if env.db.exists() and same_disk(env.releases_root, env.backup_dir):
            need += backups.needed_bytes(env.db)        # the release and the backup share the disk
        if free < need:
            raise DeployError(f"not enough free disk in {env.releases_root} for a new release: "
                              f"{free / 2**20:.1f} MiB free, {need / 2**20:.1f} MiB needed (the running release's "
                              "own files, plus the backup when it shares the disk)")
    return repo, unit_state


def resolve_target(repo, env, args):
    if args.ref:
        candidates = [args.ref] + ([f"refs/remotes/{env.remote}/{args.ref}"] if env.remote else [])
        for ref in candidates:
            sha = repo.resolve(ref)
            if sha:
                return sha
        raise usage_error(f"--ref {args.ref!r}: no such commit, tag or branch in {env.path}")
    # refs/remotes/...: a local tag or branch named like "origin/dev" must never stand in for the fetched branch
    ref = f"refs/remotes/{env.remote}/{env.branch}" if env.remote else f"refs/heads/{env.branch}"
    sha = repo.resolve(ref)
    if not sha:
        raise DeployError(f"{ref} does not exist in {env.path}: push the branch, or fetch it")
    return sha


def check_promotion_gate(config, env, plan, args):
    """A promoted env deploys only a tree that its promote_from env verified."""
    if not env.promote_from:
        return
    source = config.env(env.promote_from)
    verified = verified_log(source.name, source.state_dir).read()
    tree = plan.target_tree
    if any(v.get("tree") == tree for v in verified):
        return
    if args.force:
        plan.forced_because.append(f"promotion gate: {plan.target[:12]} was not verified in {source.name}")
        return
    last = verified[-1] if verified else None
    if last:
        hint = (f"{source.name} last verified {last['commit'][:12]} at {last['time']}; to promote it: "
                + cli.script_command(config, "deploy.py", env.name, "--ref", last["commit"]))
    else:
        hint = (f"nothing has been verified in {source.name} yet: deploy it there and run "
                + cli.script_command(config, "verify.py", source.name))
    raise DeployError(f"promotion gate: {plan.target[:12]} ({plan.target_subject}) has not been verified in "
                      f"{source.name}. {hint} (or override with --force --reason TEXT)")


def check_bad_release(env, plan, args):
    """A release that was rolled back (its tree) stays out unless --force --reason."""
    mark = bad_mark(env, plan.target_tree)
    if not mark:
        return
    if args.force:
        plan.forced_because.append(f"bad release: {plan.target[:12]} was rolled back at {mark.get('time')}")
        plan.clears_bad = True
        return
    raise DeployError(f"{plan.target[:12]} ({plan.target_subject}) is a bad release: it was rolled back at "
                      f"{mark.get('time')} ({mark.get('why')}). Push a fix to {env.branch} and deploy that "
                      "(or, to deploy this very tree again, --force --reason TEXT)")


def check_rehearsed(config, env, plan, args):
    """require_rehearsal: deploy only a tree that passed a rehearsal on this env's data."""
    if not env.require_rehearsal or rehearsal.passed_for(env, plan.target_tree):
        return
    if args.force:
        plan.forced_because.append(f"require_rehearsal: {plan.target[:12]} was not rehearsed in {env.name}")
        return
    ref = ["--ref", args.ref] if args.ref else []
    raise DeployError(f"{env.name} requires a passed rehearsal of what it deploys (require_rehearsal), and "
                      f"{plan.target[:12]} ({plan.target_subject}) has none: run "
                      f"{cli.script_command(config, 'deploy.py', env.name, *ref, '--rehearse')} "
                      "(or override with --force --reason TEXT)")


def check_direction(plan, args):
    if plan.fast_forward:
        return
    if args.force:
        plan.forced_because.append(f"not a fast-forward from {plan.head[:12]}")
        return
    if plan.repo.is_ancestor(plan.target, plan.head):
        raise DeployError(f"{plan.target[:12]} is older than what runs ({plan.head[:12]} contains it): going back is "
                          f"rollback.py's job (it keeps the database and marks what it leaves), or --force --reason TEXT")
    raise DeployError(f"{plan.target[:12]} has diverged from what runs ({plan.head[:12]}): neither contains the other, "
                      f"so deploying it would drop commits that run now. Merge what runs into {plan.target[:12]}'s "
                      "branch (or rebase it) and push, then deploy; or --force --reason TEXT")


# -- carrying it out ---------------------------------------------------------------
def carry_out(config, env, plan):
    if not env.converted:
        cli.say(f"note: {env.name} runs from its work tree, so this deploy changes the running files in place "
                f"and a rollback cannot bring back its dependencies; convert it to releases with: "
                f"{cli.script_command(config, 'deploy.py', env.name, '--install-units')}")
    journal = Journal(env.state_dir, env.name)
    journal.start("deploy", v=runbook.RECORD_VERSION, target=plan.target,
                  previous_release=plan.running_release.id if plan.running_release else None,
                  **{"from": plan.running})
    try:
        return carry_out_steps(config, env, plan, journal)
    finally:
        journal.finish()


def carry_out_steps(config, env, plan, journal):
    clock = StepClock(journal, "deploy")
    record = {"v": runbook.RECORD_VERSION, "kind": "deploy", "env": env.name, "time": now_iso(),
              "user": cli.user_name(), "from": plan.running, "to": plan.target, "forced": plan.forced_because,
              "reason": plan.reason}
    log = deploy_log(env)
    try:
        if env.converted:
            with clock.step(BUILD):
                plan.release = releases.build(env, plan.repo, plan.target, cli.say)
                record["release"] = plan.release.id
                journal.update(release=plan.release.id)
        passed = rehearsal.passed_for(env, plan.target_tree)
        record["rehearsed"] = passed["time"] if passed else None
        with clock.step(TAG):
            record["tag"], record["tag_pushed"] = tag_running_commit(env, plan)
            journal.update(tag=record["tag"])
        with clock.step(BACKUP):
            backup = back_up(env, plan)
            record["backup"] = backup.path if backup else None
            journal.update(backup=record["backup"])
    except (DeployError, KeyboardInterrupt) as exc:
        what = describe_failure(exc)
        record.update(result="failed", failed_step=clock.current, error=what, steps=clock.seconds,
                      running=plan.running)
        log.append(record)
        error = DeployError(f"deploy of {env.name} stopped before any change to what runs "
                            f"({clock.current} failed: {what}); {env.name} still runs {plan.running[:12]}")
        error.output = getattr(exc, "output", "")
        raise error from None
    try:
        with clock.step(SWITCH):
            if plan.release:
                plan.previous_release = releases.switch(env, plan.release)
            switch_work_tree(plan)
        with clock.step(PRE_RESTART):
            commands.run_all(env.pre_restart, plan.release.path if plan.release else env.path, env.command_timeout)
        with clock.step(RESTART):
            release.restart_unit(env)
        with clock.step(HEALTH):
            result = release.wait_until_healthy(env, plan.target if plan.release else None)
        if env.watch:
            with clock.step(WATCH):
                record["watch"] = release.watch(env, env.watch, cli.countdown(f"watching {env.name}"))
        with clock.step(REVISION):
            if not plan.release:
                release.write_revision(env, plan.repo, plan.target)
    except (DeployError, KeyboardInterrupt) as exc:
        return roll_back_after_failure(config, env, plan, record, clock, backup, exc)
    try:
        with clock.step(RECORD):
            record.update(result="ok", running=plan.target, steps=clock.seconds, health=result.describe(),
                          previous_release=plan.previous_release)
            log.append(record)
            mark_verified(env, plan, "deploy")
            if plan.clears_bad:
                bad_log(env).append({"time": now_iso(), "env": env.name, "commit": plan.target, "bad": False,
                                     "tree": plan.target_tree, "why": f"deployed with --force: {plan.reason}"})
    except DeployError as exc:
        cli.err(f"error: {env.name} runs {plan.target[:12]} and is healthy, but the deploy could not be recorded: "
                f"{exc}. Free space in {env.state_dir}, then run: {cli.script_command(config, 'verify.py', env.name)}")
        return EXIT_HUMAN
    push_promoted_branch(env, plan, record)
    removed = prune_releases(env, plan)
    print_summary(config, env, plan, record, backup, result, clock, removed)
    return 0


def push_promoted_branch(env, plan, record):
    """One promotion path: a promoted commit (--ref, verified in promote_from) also moves the env's branch
    on the remote, fast-forward only, so origin, the tree and the log agree and the next plain deploy
    finds nothing to do. A push that fails (not a fast-forward, the remote down) only warns."""
    if not (env.promote_from and env.remote):
        return
    tip = plan.repo.resolve(f"refs/remotes/{env.remote}/{env.branch}")
    if tip == plan.target or (tip and not plan.repo.is_ancestor(tip, plan.target)):
        return
    try:
        plan.repo.push_branch(env.remote, plan.target, env.branch)
        plan.repo.fetch(env.remote)
        record["pushed_branch"] = f"{env.remote}/{env.branch}"
        cli.say(f"pushed {env.remote}/{env.branch} to {plan.target[:12]} (a fast-forward from "
                f"{tip[:12] if tip else 'nothing'}), so it matches what {env.name} runs")
    except DeployError as exc:
        cli.err(f"warning: {env.name} runs {plan.target[:12]}, but {env.remote}/{env.branch} could not be moved "
                f"there ({exc}); push it yourself: git -C {env.path} push {env.remote} {plan.target}:{env.branch}")


def prune_releases(env, plan):
    """keep_releases, never touching the running release, the previous one, or one whose commit a
    rollback point of the last 5 operations needs. A failure here only warns: the deploy is done."""
    if not plan.release:
        return []
    recent = [r for r in deploy_log(env).read() if r.get("kind") in ("deploy", "rollback")][-5:]
    needed = {c for r in recent for c in (r.get("from"), r.get("to"), r.get("running")) if c}
    try:
        return releases.prune(env, plan.previous_release, needed)
    except OSError as exc:
        cli.err(f"warning: could not remove old releases in {env.releases_root}: {exc}")
        return []


def tag_running_commit(env, plan):
    name = f"{env.name}-before-deploy-{utc_stamp()}"
    if env.db.exists():
        plan.backup_path = backups.backup_name(env.name, "pre-deploy", env.backup_dir)   # the next step's file
    message = (f"{env.name} ran {plan.running} on {env.branch} before deploying {plan.target}\n\n"
               f"commit: {plan.running}\nbranch: {env.branch}\nbackup: {plan.backup_path or 'none (no database)'}\n")
    name = plan.repo.create_tag(name, plan.running, message)
    if not env.remote:
        return name, False
    try:
        plan.repo.push_tag(env.remote, name)
        return name, True
    except DeployError as exc:
        cli.err(f"warning: could not push tag {name} to {env.remote} (the deploy goes on): {exc}")
        return name, False


def back_up(env, plan):
    if not env.db.exists():
        cli.say(f"note: {env.db} does not exist yet; no database to back up")
        return None
    return backups.backup_database(env.db, env.backup_dir, env.name, "pre-deploy", commit=plan.running,
                                   unit_file=plan.unit_file or None, final=plan.backup_path)


def switch_work_tree(plan):
    if plan.head == plan.target:
        return
    if plan.fast_forward:
        plan.repo.fast_forward(plan.target)
    else:
        plan.repo.reset_hard(plan.target)


def mark_verified(env, plan, by):
    verified_log(env.name, env.state_dir).append(
        {"time": now_iso(), "commit": plan.target, "tree": plan.target_tree, "by": by})


def roll_back_after_failure(config, env, plan, record, clock, backup, exc):
    """A step after the switch failed: go back to this deploy's own before-deploy point, through
    the runbook's one "roll back and report" path."""
    failed = clock.current
    what = describe_failure(exc)
    details = (getattr(exc, "output", "") or "").splitlines()
    if not details and failed in (RESTART, HEALTH, WATCH):
        details = units.journal_tail(units.serving_state(env.unit).name)
    record.update(result="rolled-back", failed_step=failed, error=what, steps=clock.seconds, running=plan.running)
    report_failure(env, failed, what, details)
    point = Point(record["tag"], "before-deploy", plan.running, record["time"], backup,
                  release=plan.previous_release or (plan.running_release.id if plan.running_release else None))
    restore_db, why = runbook.decide_database(env, point, "auto", compare=False)
    # a release that failed is marked bad; one the operator interrupted (Ctrl-C, SIGTERM) is not judged
    outcome = runbook.roll_back_and_record(config, env, plan.repo, point, restore_db, why, plan.target, record,
                                           nested=True, mark=isinstance(exc, DeployError))
    code = f"release {outcome.release}" if outcome.release else f"code back to {plan.running[:12]}"
    restored = (f"{code}, database restored from {backup.path} ({why})" if restore_db
                else f"{code}, database kept ({why})")
    saved = (f"the failed release's database is saved in {outcome.pre_rollback}" if outcome.pre_rollback
             else f"the failed release's database lies at {outcome.aside} ({outcome.seal_problem})" if outcome.aside
             else "no database to save")
    cli.err(f"rolled back by itself: {restored}; {saved}. {env.name} runs {plan.running[:12]} again and "
            f"{env.health_url} answers {outcome.health.describe()}.")
    return EXIT_FAILED


def report_failure(env, failed, what, details):
    cli.err(f"error: deploy of {env.name} failed at step {failed}: {what}")
    for line in details[-10:]:
        cli.err(f"  | {line}")


def print_summary(config, env, plan, record, backup, result, clock, removed=()):
    steps = ", ".join(f"{name} {secs:.2f}s" for name, secs in clock.seconds.items())
    cli.say(f"{cli.paint('deployed', 'green')} {env.name}: {plan.running[:12]} -> {plan.target[:12]} "
            f"({plan.target_subject}) in {clock.total:.1f}s")
    cli.say(f"  tag     {record['tag']}{' (pushed)' if record['tag_pushed'] else ''}")
    cli.say(f"  backup  {backup.path if backup else 'none (no database yet)'}")
    cli.say(f"  health  {env.health_url}: {result.describe()}")
    if record.get("watch"):
        cli.say(f"  watch   watched {record['watch']:g}s: healthy throughout, same process, no restart")
    if plan.release:
        cli.say(f"  release {plan.release.path} (was {plan.previous_release or 'none'})"
                + (f"; removed {len(removed)} old release(s)" if removed else ""))
    cli.say(f"  steps   {steps}")
    for why in plan.forced_because:
        cli.say(f"  forced  {why}")
    cli.say(f"rollback: {cli.script_command(config, 'rollback.py', env.name, '--to', record['tag'])}")


# -- rehearsing ---------------------------------------------------------------------------------
def rehearse(config, env, args):
    """Build the target and play its pre_restart and start-up on a copy of the env's database."""
    repo = Repo(env.path)
    if env.remote and not args.no_fetch:
        repo.fetch(env.remote)
    target = resolve_target(repo, env, args)
    subject = repo.subject(target)
    cli.say(f"rehearsing the deploy of {target[:12]} ({subject}) on a copy of {env.name}'s database; "
            "nothing live changes")
    result = rehearsal.rehearse(env, repo, target, cli.say)
    steps = ", ".join(f"{k} {v:.2f}s" for k, v in result.seconds.items())
    changes = result.schema_changes()
    if result.migration_seconds is not None:
        cli.say(f"  migration {result.migration_seconds:.2f}s ({len(env.pre_restart)} pre_restart command(s)); "
                f"schema {'; '.join(changes) if changes else 'unchanged'}")
    if result.health:
        cli.say(f"  health    {result.health}")
    for path, answer in result.paths.items():
        cli.say(f"  path      {path}: {answer}")
    cli.say(f"  steps     {steps}")
    if not result.ok:
        cli.err(f"error: the rehearsal of {target[:12]} on {env.name}'s data failed at {result.failed}: {result.error}")
        for line in result.output.splitlines()[-15:]:
            cli.err(f"  | {line}")
        cli.err(f"nothing live was changed: {env.name} still runs what it ran, its database was only read")
        return EXIT_FAILED
    cli.say(f"{cli.paint('rehearsal passed', 'green')}: {target[:12]} on a copy of {env.name}'s data; nothing live "
            "was changed (no restart, no tag, the live database only read)")
    return 0


# -- converting an env: releases and socket units -------------------------------------------
def install_units(config, env, args):
    """Convert the env to releases (when it still runs from its work tree) and socket units:
    plan and unit diff first, then one short switch-over; everything put back if not healthy."""
    with EnvLock(env.state_dir, env.name, "install units"):
        conversion = convert.plan(env, Repo(env.path), args.notify, cli.say, cli.err)
        if not conversion.changes:
            cli.say(f"{env.name}: the socket units are in place already; nothing to do")
            return 0
        if args.dry_run:
            cli.say("dry run: nothing was changed")
            return 0
        confirm_units(env, args)
        convert.carry_out(env, conversion, cli.say)
    return 0


def confirm_units(env, args):
    if args.yes:
        return
    if not sys.stdin.isatty():
        raise usage_error("--install-units changes unit files and restarts the service: add --yes")
    cli.confirm_env(env.name, False, "install the socket units and restart")


# -- the dry run ---------------------------------------------------------------------
def show_plan(config, env, args):
    holder = lock_holder(env.state_dir, env.name)
    if holder:
        raise DeployError(f"env {env.name} is locked: {holder}", EXIT_LOCKED)
    plan = prepare(config, env, args, fetch=False)
    say = cli.say
    say(f"dry run: deploy {env.name}, nothing will be changed")
    j = recovery.interrupted(env)
    if j:
        say(f"  (the real run first recovers an interrupted {recovery.describe(j)})")
    if env.remote and not args.no_fetch:
        say(f"  (the real run fetches first: git -C {env.path} fetch --prune --no-tags {env.remote}; "
            "this dry run uses what is already fetched)")
    if plan.nothing_to_deploy:
        say(f"nothing to deploy: {env.name} already runs {plan.target[:12]} ({plan.target_subject})")
        return 0
    stamp = utc_stamp()
    tag = f"{env.name}-before-deploy-{stamp}"
    steps = [
        f"take the lock {env.state_dir / (env.name + '.lock')}",
        f"confirm by typing {env.name!r} (or --yes)" if env.promote_from else None,
        f"tag {plan.running[:12]} (what runs) as {tag}: git tag --annotate {tag} {plan.running}",
        f"push the tag: git push {env.remote} refs/tags/{tag}" if env.remote else None,
        (f"back up {env.db} (SQLite online backup, integrity_check, sha256) to "
         f"{env.backup_dir}/{env.name}-{stamp}-pre-deploy.sqlite3, and the unit file {plan.unit_file}")
        if env.db.exists() else f"no database at {env.db} yet: no backup",
        (f"move {env.path} to {plan.target[:12]} ({plan.target_subject}): "
         + (f"git merge --ff-only {plan.target}" if plan.fast_forward else f"git reset --hard {plan.target}")),
        *[f"run in {env.path}: {' '.join(argv)}" for argv in env.pre_restart],
        f"restart the unit: systemctl --user restart {env.unit}",
        f"wait up to {env.health_timeout:g}s for {env.health_url} to answer 2xx/3xx",
        (f"watch for {env.watch:g}s: health and the unit (same process, no restart); a failure rolls back"
         if env.watch else None),
        f"write {env.path / 'REVISION'}",
        f"record the deploy in {env.state_dir / (env.name + '.deploys.jsonl')}",
    ]
    for i, step in enumerate(s for s in steps if s):
        say(f"  {i + 1:2}. {step}")
    for why in plan.forced_because:
        say(f"  forced: {why}")
    passed = rehearsal.passed_for(env, plan.target_tree)
    say(f"  rehearsal: passed {passed['time']} on {env.name}'s data" if passed else
        f"  rehearsal: none for this tree (try it on {env.name}'s data first: "
        f"{cli.script_command(config, 'deploy.py', env.name, '--rehearse')})")
    return 0


if __name__ == "__main__":
    cli.run(main, nice=True, alert="deploy")
