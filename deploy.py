#!/usr/bin/env python3
"""deploy.py ENV: put the env's branch (or --ref) live, safely.

The runbook, in order: lock the env; finish or undo an interrupted operation; plan (preflight,
fetch, the target, the gates: a bad release, the promotion gate, a required rehearsal, the
direction); confirm; then the steps of safedeploy.runbook.DEPLOY (build beside the running
release, tag, back up, switch, pre_restart, restart or hand over, health, watch, record), rolled
back by the runbook itself when a step after the switch fails; then the branch pushed (a
promotion), old releases removed, and the rollback command printed. --dry-run prints the same
steps, --dry-run --json as JSON.
"""

import json
import sys

from safedeploy import cli, convert, planning, probe, recovery, rehearsal, replica, runbook
from safedeploy.errors import EXIT_FAILED, EXIT_LOCKED, DeployError, usage_error
from safedeploy.gitrepo import Repo
from safedeploy.points import list_points
from safedeploy.state import EnvLock, lock_holder

BACKUP_WAIT = 300         # a running backup ends by itself: a deploy waits for it (bounded), then exit 3


def main():
    args = parse_arguments()
    config = cli.load_config(args)
    env = config.env(args.env)
    if args.install_units:
        return install_units(config, env, args)
    if args.dry_run:
        cli.only_looking()
        return show_plan(config, env, args)
    with EnvLock(env.state_dir, env.name, "rehearse" if args.rehearse else "deploy", backup_wait=BACKUP_WAIT,
                 on_wait=cli.say):
        cli.log_operation([env], "rehearsal" if args.rehearse else "deploy")
        recovery.recover(config, env, Repo(env.path), cli.say)      # a killed operation: finish or undo it first
        if args.rehearse:
            return rehearse(config, env, args)
        plan = planning.deploy_plan(config, env, args.ref, fetch=not args.no_fetch, force=args.force,
                                    reason=args.reason or "")
        if plan.nothing_to_deploy:
            cli.say(f"nothing to deploy: {env.name} already runs {plan.target[:12]} ({plan.target_subject})")
            return 0
        announce(config, env, plan)
        if env.promote_from:
            cli.confirm_env(env.name, args.yes, f"deploy {plan.target[:12]}")
        code, run = runbook.deploy(config, env, plan, cli.output())
        if code:
            return code
        notes, removed = runbook.after_deploy(run)
        for line in notes:
            (cli.err if line.startswith("warning:") else cli.say)(line)
        print_summary(config, env, run, removed)
        return 0


def parse_arguments():
    p = cli.parser("deploy.py", "Deploy the env's branch (or --ref) with a backup, a tag and a health check.",
                   ["python3 deploy.py dev", "python3 deploy.py prod --dry-run", "python3 deploy.py dev --dry-run --json",
                    "python3 deploy.py prod --ref 3f2a9c1 --yes",
                    "python3 deploy.py prod --force --reason 'hotfix for login outage'"])
    p.add_argument("env", metavar="ENV", help="the env to deploy, as named in config.toml")
    p.add_argument("--ref", help="deploy this commit, tag or branch instead of the env's branch tip")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation (needed without a terminal)")
    p.add_argument("--dry-run", action="store_true", help="print every step it would take; change nothing")
    p.add_argument("--json", action="store_true", help="with --dry-run: the steps as JSON")
    p.add_argument("--no-fetch", action="store_true", help="do not fetch the remote first")
    p.add_argument("--force", action="store_true", help="deploy past the promotion gate or a non-fast-forward")
    p.add_argument("--reason", help="why --force is needed (recorded in the deploy log)")
    p.add_argument("--rehearse", action="store_true",
                   help="play the deploy on a copy of the env's database (build, pre_restart, start on a scratch "
                        "port, health; the running release on the migrated copy too); nothing live changes")
    p.add_argument("--install-units", action="store_true",
                   help="hold the env's port in a socket unit so restarts drop no request (shows the diff first)")
    p.add_argument("--notify", action="store_true",
                   help="with --install-units: the server signals readiness (Type=notify; automatic for gunicorn), "
                        "so a handover helper can serve while the service restarts")
    args = p.parse_args()
    if args.force and not (args.reason or "").strip():
        raise usage_error("--force needs --reason TEXT: the deploy log records why the gate was overridden")
    for flag, needs, value in (("--reason", "--force", args.reason), ("--notify", "--install-units", args.notify),
                               ("--json", "--dry-run", args.json)):
        if value and not getattr(args, needs.strip("-").replace("-", "_")):
            raise usage_error(f"{flag} goes with {needs}")
    if args.rehearse and (args.install_units or args.dry_run or args.force):
        raise usage_error("--rehearse changes nothing live already: it takes no --install-units, --dry-run or --force")
    if args.install_units and (args.ref or args.force or args.no_fetch):
        raise usage_error("--install-units converts the env at the commit it runs: it takes no --ref, --force "
                          "or --no-fetch")
    planning.check_ref(args.ref)
    return args


def announce(config, env, plan):
    if not plan.converted:
        cli.say(f"note: {env.name} runs from its work tree, so this deploy changes the running files in place "
                f"and a rollback cannot bring back its dependencies; convert it to releases with: "
                f"{cli.script_command(config, 'deploy.py', env.name, '--install-units')}")
    if plan.dangling_current or plan.edited:
        what = "names a release folder that is gone" if plan.dangling_current else \
            f"runs a release edited by hand ({', '.join(plan.edited[:3])})"
        cli.say(f"note: {env.current_link} {what}: this deploy builds {plan.target[:12]} again and switches to it")
    if env.pre_restart:
        cli.say(f"migration: {plan.migration_mode}: {plan.migration_why}")


def print_summary(config, env, run, removed):
    record, plan = run.record, run.plan
    cli.say(f"{cli.paint('deployed', 'green')} {env.name}: {plan.running[:12]} -> {plan.target[:12]} "
            f"({plan.target_subject}) in {run.clock.total:.1f}s")
    cli.say(f"  tag     {record.tag}{' (pushed)' if record.tag_pushed else ''}")
    cli.say(f"  backup  {record.backup or 'none (no database yet)'}")
    cli.say(f"  health  {env.health_url}: {record.health}")
    if record.watch:
        cli.say(f"  watch   watched {record.watch:g}s: healthy throughout, same process, no restart")
    if record.probe:
        cli.say(f"  probe   {probe.describe(record.probe)}")
    if run.release:
        cli.say(f"  release {run.release.path} (was {run.previous_release or 'none'})"
                + ("; reused, not rebuilt" if plan.reuse else "") + (f"; removed {len(removed)} old" if removed else ""))
    cli.say("  steps   " + ", ".join(f"{name} {secs:.2f}s" for name, secs in record.steps.items()))
    for why in plan.forced:
        cli.say(f"  forced  {why}")
    safe = planning.safe_points(config, env, plan.repo, list_points(env, plan.repo), plan.target)
    cli.say("rollback: " + (cli.script_command(config, "rollback.py", env.name, "--to", safe[0].id) if safe else
                            f"none to paste: every point before it is a rolled-back release (see "
                            f"{cli.script_command(config, 'rollback.py', env.name, '--list')})"))


def show_plan(config, env, args):
    """The dry run: the runbook's own steps for this plan, with their real paths and commands."""
    holder = lock_holder(env.state_dir, env.name)
    if holder:
        raise DeployError(f"env {env.name} is locked: {holder}", EXIT_LOCKED)
    try:
        plan = planning.deploy_plan(config, env, args.ref, fetch=False, force=args.force, reason=args.reason or "")
    except DeployError as exc:
        if not env.remote or args.no_fetch or exc.code != EXIT_FAILED:
            raise
        exc.args = (f"{exc} (this dry run did not fetch: it judged what was fetched before; the real run fetches "
                    f"first, as does: git -C {env.path} fetch --prune --no-tags {env.remote})",)
        raise
    steps = [] if plan.nothing_to_deploy else runbook.deploy_steps(config, env, plan)
    if args.json:
        cli.say(json.dumps({"env": env.name, "target": plan.target, "steps": steps}, indent=2))
        return 0
    cli.say(f"dry run: deploy {env.name}, nothing will be changed")
    j = recovery.interrupted(env)
    if j:
        cli.say(f"  (the real run first recovers an interrupted {j.describe()})")
    if env.remote and not args.no_fetch:
        cli.say(f"  (the real run fetches first: git -C {env.path} fetch --prune --no-tags {env.remote}; "
                "this dry run uses what is already fetched)")
    if plan.nothing_to_deploy:
        cli.say(f"nothing to deploy: {env.name} already runs {plan.target[:12]} ({plan.target_subject})")
        return 0
    if env.promote_from:
        cli.say(f"  (the real run asks you to type {env.name!r}, or takes --yes)")
    for i, step in enumerate(steps, 1):
        cli.say(f"  {i:2}. {step['name']}: {step['detail']}")
    for why in plan.forced:
        cli.say(f"  forced: {why}")
    if env.pre_restart:
        cli.say(f"  migration: {plan.migration_mode}: {plan.migration_why}")
    last = plan.last_rehearsal
    cli.say(f"  rehearsal: FAILED {last.time} at {last.failed} on {env.name}'s data (fix it and rehearse again: "
            f"{cli.script_command(config, 'deploy.py', env.name, '--rehearse')})" if last and not last.ok else
            f"  rehearsal: passed {plan.rehearsed.time} on {env.name}'s data" if plan.rehearsed else
            f"  rehearsal: none for this tree (try it on {env.name}'s data first: "
            f"{cli.script_command(config, 'deploy.py', env.name, '--rehearse')})")
    return 0


def rehearse(config, env, args):
    """Build the target and play its pre_restart and start-up on a copy of the env's database (held under
    the env's lock, journaled: a killed rehearsal is cleaned up by the next command)."""
    repo = Repo(env.path)
    if env.remote and not args.no_fetch:
        repo.fetch(env.remote)
    target = planning.resolve_target(repo, env, args.ref)
    cli.say(f"rehearsing the deploy of {target[:12]} ({repo.subject(target)}) on a copy of {env.name}'s database; "
            "nothing live changes")
    result = rehearsal.rehearse(config, env, repo, target, cli.output())
    for line in rehearsal.report(env, result):
        cli.say(line)
    if not result.ok:
        raise DeployError(f"the rehearsal of {target[:12]} on {env.name}'s data failed at {result.failed}: "
                          f"{result.error}; nothing live was changed: {env.name} still runs what it ran, its database "
                          "was only read", output="\n".join(f"  | {line}" for line in result.output.splitlines()[-15:]))
    cli.say(f"{cli.paint('rehearsal passed', 'green')}: {target[:12]} on a copy of {env.name}'s data; nothing live "
            "was changed (no restart, no tag, the live database only read)")
    return 0


def install_units(config, env, args):
    """Convert the env to releases (when it still runs from its work tree) and socket units: plan and unit
    diff first, then the runbook's CONVERSION steps; everything put back if not healthy."""
    with EnvLock(env.state_dir, env.name, "install units"):
        if not args.dry_run:
            cli.log_operation([env], "conversion")
            recovery.recover(config, env, Repo(env.path), cli.say)
        conversion = convert.plan(env, Repo(env.path), args.notify, cli.say, cli.err)
        if not conversion.changes:
            cli.say(f"{env.name}: the socket units are in place already; nothing to do")
            return 0
        if args.dry_run:
            cli.say("dry run: nothing was changed")
            return 0
        if not args.yes:
            if not sys.stdin.isatty():
                raise usage_error("--install-units changes unit files and restarts the service: add --yes")
            cli.confirm_env(env.name, False, "install the socket units and restart")
        runbook.convert_env(env, conversion, cli.output())
    offer = replica.offer(config)
    if offer:
        cli.say(f"{offer}: {cli.script_command(config, 'backup.py', '--install-replica')}")
    return 0


if __name__ == "__main__":
    cli.run(main, nice=True, alert="deploy")
