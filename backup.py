#!/usr/bin/env python3
"""backup.py [ENV ... | --all]: consistent, verified online backups of live SQLite databases.

Each backup is taken under the env's lock (waiting a bounded time if a deploy
holds it), copied with SQLite's online backup API from a read-only connection,
integrity-checked, hashed, and written with a manifest (commit, reason, sha256,
schema) so that it is also a rollback point. Safe from cron: --quiet prints
nothing on success and one line per failure on stderr.

This script parses and prints; the flows are the package's: safedeploy.nightly (backups and their
off-site copies), safedeploy.pruning (--prune), safedeploy.catalogue (--list, --verify, --release-hold),
safedeploy.restore_rows (--restore-rows), safedeploy.replica_copy (--at).
"""

import argparse
import json
import re
import shlex
import sys
from pathlib import Path

from safedeploy import alerts, catalogue, cli, convert, nightly, pruning, replica, replica_copy, restore_rows, rowrestore, units
from safedeploy.errors import EXIT_FAILED, DeployError, usage_error
from safedeploy.saying import notify
from safedeploy.state import EnvLock, age_seconds, human_age

REASON_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-")
TIME_RE = re.compile(r"^([01][0-9]|2[0-3]):[0-5][0-9]$")
OUT = cli.output()


def main():
    args = parse_arguments()
    config = cli.load_config(args)
    envs = select_envs(config, args)
    for wanted, handler in MODES:
        if wanted(args):
            return handler(config, envs, args)
    code = 0 if args.prune and not args.envs and not args.all else back_up_all(config, envs, args)
    if args.prune and code == 0:
        code = prune(config, envs, args)
    return code


def parse_arguments():
    p = cli.parser("backup.py", "Back up env databases online, verified; list, verify and prune backups.",
                   ["python3 backup.py --all --quiet        # from cron, every night",
                    "python3 backup.py prod --reason manual", "python3 backup.py --list --json",
                    "python3 backup.py --verify", "python3 backup.py --verify backups/prod/prod-20261124-020000-nightly.sqlite3",
                    "python3 backup.py prod --restore-rows prod-20261124-020000-nightly --yes"])
    p.add_argument("envs", metavar="ENV", nargs="*", help="the envs to back up")
    p.add_argument("--all", action="store_true", help="every env in config.toml")
    p.add_argument("--list", action="store_true", help="list backups, newest first")
    p.add_argument("--json", action="store_true", help="with --list: print JSON")
    p.add_argument("--verify", nargs="?", const="", metavar="FILE",
                   help="re-hash and integrity-check FILE, or every backup of the envs")
    p.add_argument("--prune", action="store_true",
                   help="apply [retention] (after backing up, when envs or --all are given too)")
    p.add_argument("--dry-run", action="store_true", help="with --prune: say what would be removed, remove nothing")
    p.add_argument("--install-timer", metavar="HH:MM", nargs="?", const="03:17",
                   help="install a systemd --user timer running `--all --quiet --prune` daily (default 03:17)")
    p.add_argument("--restore-rows", metavar="COPY",
                   help="put back into ENV's live database the users' rows COPY (a backup: its id, file name or path) "
                        "holds that it lacks, compared by content, in one transaction verified before COMMIT (every "
                        "live row unchanged); the app keeps running. A row whose id a newer row took comes back "
                        "under a new id, with the rows that refer to it")
    p.add_argument("--sql", action="store_true",
                   help="with --restore-rows: print the inserts it would make, for review; change nothing")
    p.add_argument("--yes", action="store_true", help="with --restore-rows or --install-replica: do not ask (needed without a terminal)")
    p.add_argument("--rows-to-restore", metavar="FILE",
                   help="print the rows of FILE (a backup) the env's live database lacks as SQL, for review only "
                        "(the same as --restore-rows FILE --sql)")
    p.add_argument("--release-hold", metavar="FILE",
                   help="let prune remove FILE, a pre-rollback copy held because it holds rows a restore took out")
    p.add_argument("--test-alert", action="store_true", help="send a test event to [alerts]; exit 0 when delivered")
    p.add_argument("--alert-failed", metavar="UNIT", help=argparse.SUPPRESS)     # the timer's OnFailure= unit
    p.add_argument("--at", metavar="TIME",
                   help="with one ENV: a verified backup of its database as it was at TIME, from its continuous copies "
                        "([replica]): an ISO 8601 time (no offset: local time), or latest")
    p.add_argument("--install-replica", action="store_true",
                   help="install the replicator of [replica] (Litestream) as a systemd --user unit; shows the unit first")
    p.add_argument("--replica-start", action="store_true", help=argparse.SUPPRESS)     # the replicator's ExecStartPre
    p.add_argument("--quiet", action="store_true", help="print nothing on success (for cron)")
    p.add_argument("--reason", default="", help="recorded in the manifest (default: nightly with --quiet, else manual)")
    p.add_argument("--lock-wait", type=float, default=300, metavar="SECONDS",
                   help="how long to wait for a running deploy of the env to finish (default 300)")
    args = p.parse_args()
    if args.dry_run and not args.prune:
        raise usage_error("--dry-run goes with --prune")
    modes = [name for name, on in (("--list", args.list), ("--verify", args.verify is not None),
                                   ("--prune", args.prune), ("--install-timer", bool(args.install_timer)),
                                   ("--release-hold", bool(args.release_hold)),
                                   ("--rows-to-restore", bool(args.rows_to_restore)),
                                   ("--restore-rows", bool(args.restore_rows)),
                                   ("--test-alert", args.test_alert), ("--alert-failed", bool(args.alert_failed)),
                                   ("--at", bool(args.at)), ("--install-replica", args.install_replica),
                                   ("--replica-start", args.replica_start)) if on]
    if len(modes) > 1:
        raise usage_error(f"{' and '.join(modes)} cannot go together: run them one at a time")
    if args.json and not args.list:
        raise usage_error("--json goes with --list")
    if args.sql and not args.restore_rows:
        raise usage_error("--sql goes with --restore-rows")
    if args.yes and not (args.install_replica or args.restore_rows):
        raise usage_error("--yes goes with --restore-rows or --install-replica")
    if args.restore_rows and len(args.envs) != 1:
        raise usage_error("--restore-rows puts rows back into one env: name it, e.g. backup.py prod --restore-rows COPY")
    if args.at and (len(args.envs) != 1 or args.all):
        raise usage_error("--at TIME takes one ENV, e.g. backup.py prod --at 2026-11-25T14:03:00")
    if args.install_timer and not TIME_RE.match(args.install_timer):
        raise usage_error(f"--install-timer {args.install_timer!r}: give a time of day as HH:MM, e.g. 03:17")
    if args.reason and (set(args.reason) - REASON_CHARS or len(args.reason) > 40):
        raise usage_error(f"--reason {args.reason!r}: use lowercase letters, digits and '-' (it names the file)")
    return args


def select_envs(config, args):
    if args.all and args.envs:
        raise usage_error("name envs or give --all, not both")
    if args.envs:
        return [config.env(name) for name in args.envs]
    if (args.all or args.list or args.verify is not None or args.prune or args.install_timer or args.release_hold
            or args.rows_to_restore or args.restore_rows or args.test_alert or args.alert_failed or args.install_replica
            or args.replica_start):
        return list(config.envs.values())
    raise usage_error("name the envs to back up, or give --all")


# -- taking backups -------------------------------------------------------------
def back_up_all(config, envs, args):
    cli.log_operation(envs, "backup")
    return nightly.back_up_all(config, envs, args.reason or ("nightly" if args.quiet else "manual"), args.lock_wait,
                               args.quiet, OUT, progress_printer)


def progress_printer(env):
    """Progress on a terminal only (stderr), for databases large enough to need it."""
    if not sys.stderr.isatty():
        return None

    def show(done, total):
        if total >= 64 << 20:
            end = "\n" if done >= total else ""
            print(f"\r  {env.name}: copied {done >> 20} of {total >> 20} MiB ({100 * done // max(total, 1)}%)",
                  end=end, file=sys.stderr, flush=True)
    return show


# -- listing and verifying ----------------------------------------------------------
def show_list(config, envs, args):
    """Every backup, newest first, with where its copies are: local, offsite, or both."""
    found = catalogue.listing(config, envs)
    if args.json:
        cli.say(json.dumps(found.to_json(), indent=2))
    else:
        show_rows(found)
    if found.problem:
        cli.err(f"error: the off-site copies could not be listed: {found.problem}")
        return EXIT_FAILED
    return 0


def show_rows(found):
    if not found.rows:
        cli.say("no backups yet")
    for r in found.rows:
        size = f"{r['bytes'] / 1e6:9.1f} MB" if r["bytes"] is not None else "         ? MB"
        where = r["path"] or f"{r['file']} (off-site only, snapshot {r['snapshot'][:8]})"
        rows_text = f"{r['rows']:>8} rows" if r["rows"] is not None else "       ? rows"
        cli.say(f"{r['time']}  {r['env']:<8} {r['reason']:<12} {size} {rows_text}  {(r['commit'] or '?')[:12]}  "
                f"{human_age(age_seconds(r['time'])):>8}  {r['location']:<7} {where}"
                + ("  HELD: holds rows a restore took out; kept until --release-hold" if r["held"] else ""))
    identity = found.identity
    if identity and not found.problem:
        others = identity["others"]
        cli.say(f"off-site: {identity['repository']}, this config's copies (host={identity['host']}, "
                f"config={identity['config']})" + (f"; {others} copies of other hosts or configs there, not listed"
                                                   if others else ""))


def verify(config, envs, args):
    problems = catalogue.verify(config, envs, args.verify, args.quiet, OUT)
    if problems:
        notify(config, OUT, "verify-failed", ",".join(e.name for e in envs),
               "backup.py --verify found: " + "; ".join(problems), cli.script_command(config, "backup.py", "--verify"))
    return EXIT_FAILED if problems else 0


# -- putting rows back ----------------------------------------------------------------
def rows_to_restore(config, envs, args):
    """The older spelling: the SQL of a restore, for review only."""
    backup = catalogue.find_backup(envs, args.rows_to_restore)
    env = catalogue.env_of(envs, backup)
    cli.say("\n".join(rowrestore.sql(rowrestore.plan(env, backup.path))))
    return 0


def restore_rows_mode(config, envs, args):
    """--restore-rows: the plan, then (asked, or --yes) the verified restore, under the env's lock. The copy
    may be off-site only: it is fetched and verified first, like a rollback's."""
    env = envs[0]
    backup = restore_rows.copy_to_restore_from(config, env, args.restore_rows, cli.say)

    def review(plan):
        if args.sql:
            cli.say("\n".join(rowrestore.sql(plan)))
            return False
        show_restore_plan(env, backup, plan)
        if plan.total:
            confirm_restore(env, args.yes, plan.total)
        return bool(plan.total)

    plan, done = restore_rows.put_back(config, env, backup, cli.user_name(), args.lock_wait,
                                       lambda: None if args.sql else cli.log_operation([env], "restore-rows"), review)
    if done is None:
        if args.sql:
            return 0
        cli.say("nothing to put back" + (": what is left out above stays in the copy" if plan.refused or
                                          plan.left_out_total else ": every row of the copy is live"))
        return EXIT_FAILED if plan.refused else 0
    restored = ", ".join(f"{n} row(s) of {t}" for t, n in sorted(done.restored.items())) or "no row"
    cli.say(f"put back {restored} into {env.db}, in one transaction, verified before COMMIT: every live row "
            "unchanged, the rows added exactly those planned, with their references")
    for table, n in sorted(done.rekeyed.items()):
        cli.say(f"  {table}: {n} of them under a new id (a newer row took theirs); the rows referring to them follow")
    if done.plan.refused or done.plan.left_out_total:
        cli.say("  left out (still in the copy): see above")
    return 0


def show_restore_plan(env, backup, plan):
    cli.say(f"rows of {backup.path} that {env.db} lacks (compared by content):")
    for t in plan.tables:
        parts = [f"{len(t.rows)} to put back"] if t.rows else []
        if t.rekeyed:
            parts.append(f"{len(t.rekeyed)} of them under a new id (a newer row took theirs)")
        if t.changed:
            parts.append(f"{t.changed} live under the same key, updated since (kept as they are live)")
        parts += [f"{n} left out: {why}" for why, n in sorted(t.left_out.items())]
        cli.say(f"  {t.table:<20} " + "; ".join(parts))
    for table, why in sorted(plan.refused.items()):
        cli.say(f"  {table:<20} left out: {why}")
    for note in plan.notes:
        cli.say(f"  {note}")


def confirm_restore(env, yes, n):
    if yes:
        return
    if env.promote_from:
        cli.confirm_env(env.name, yes, f"put {n} row(s) back")
    elif not sys.stdin.isatty():
        raise usage_error(f"putting rows back into {env.name} needs --yes when there is no terminal to ask")


def release_hold(config, envs, args):
    """The rows a copy holds that the live database lacks are not wanted back (deleted on purpose)."""
    backup = catalogue.release_hold(envs, args.release_hold, cli.user_name())
    cli.say(f"released: the rows of {backup.path} the live database lacks are not counted any more (status stops "
            "advising them back); prune treats it as any backup, [retention] decides from now on")
    return 0


# -- retention ------------------------------------------------------------------------
def prune(config, envs, args):
    return pruning.prune(config, envs, args.lock_wait, args.dry_run, args.quiet, OUT)


# -- the systemd timer -------------------------------------------------------------------
TIMER_NAME = "safe-deploy-backup"


def install_timer(config, args):
    command = cli.script_command(config, "backup.py", "--all", "--quiet", "--prune").split(" ", 1)[1]
    on_failure = cli.script_command(config, "backup.py", "--alert-failed", f"{TIMER_NAME}.service").split(" ", 1)[1]
    service = (f"[Unit]\nDescription=safe-deploy nightly backup of every env\nOnFailure={TIMER_NAME}-failed.service\n\n"
               f"[Service]\nType=oneshot\nExecStart={sys.executable} {command}\n")
    failed = (f"[Unit]\nDescription=safe-deploy: alert that the nightly backup failed\n\n"
              f"[Service]\nType=oneshot\nExecStart={sys.executable} {on_failure}\n")
    timer = (f"[Unit]\nDescription=safe-deploy nightly backup at {args.install_timer}\n\n"
             f"[Timer]\nOnCalendar=*-*-* {args.install_timer}:00\nPersistent=true\n\n"
             f"[Install]\nWantedBy=timers.target\n")
    folder = units.install_unit_files({f"{TIMER_NAME}.service": service, f"{TIMER_NAME}.timer": timer,
                                       f"{TIMER_NAME}-failed.service": failed})
    units.systemctl("enable", "--now", f"{TIMER_NAME}.timer")
    cli.say(f"installed {folder}/{TIMER_NAME}.timer (daily at {args.install_timer}, catches up a missed run) "
            f"running: {sys.executable} {command}")
    cli.say(f"see it with: systemctl --user list-timers {TIMER_NAME}.timer; "
            f"remove it with: systemctl --user disable --now {TIMER_NAME}.timer")
    return 0


def test_alert(config):
    if config.alerts is None:
        raise usage_error(f"{config.file}: no [alerts] table: add a webhook or a command first")
    problems = alerts.send(config.alerts, alerts.event("test", None, "a test alert from backup.py --test-alert: "
                                                       "if you read this, alerts reach you", None))
    for problem in problems:
        cli.err(f"error: {problem}")
    if not problems:
        cli.say("test alert delivered to " + " and ".join(
            x for x in (config.alerts.webhook, config.alerts.command and config.alerts.command[0]) if x))
    return EXIT_FAILED if problems else 0


def alert_failed(config, unit):
    """Run by the timer's OnFailure= unit: backup.py itself could not say (killed, out of memory)."""
    notify(config, OUT, "backup-failed", None, f"the systemd unit {unit} failed: the nightly backup did not finish",
           f"journalctl --user -u {unit} -n 50")
    return 0


# -- continuous copies ([replica]) -------------------------------------------------------------------
def point_in_time(config, envs, args):
    """backup.py ENV --at TIME: the env's database as it was at TIME, out of its replica, as a verified backup."""
    env, when = envs[0], replica_copy.parse_when(args.at)
    with EnvLock(env.state_dir, env.name, "backup (point-in-time)", wait=args.lock_wait):
        nightly.clean_up_interrupted(env)
        backup, point = replica_copy.copy_at(config, env, when, lambda moment: nightly.commit_at(env, moment))
    asked = "the replica's newest moment" if when is None else f"the replica's last moment at or before {args.at}"
    name = Path(backup.path).name.removesuffix(".sqlite3")
    cli.say(f"{env.name} as it was at {backup.time} ({asked}): {backup.path} ({backup.rows_total} rows, "
            f"{backup.bytes / 1e6:.1f} MB, sha256 {backup.sha256[:12]}, integrity ok)")
    cli.say(f"  its rows the live database lacks: {cli.script_command(config, 'backup.py', '--rows-to-restore', backup.path)}")
    cli.say(f"  or the env back to it: {cli.script_command(config, 'rollback.py', env.name, '--to', name, '--with-db')}")
    return 0


def install_replica(config, yes):
    """The replicator's unit, shown as a diff first; then installed, enabled and (re)started."""
    if config.replica is None:
        raise usage_error(f"{config.file}: no [replica] table: add one first (docs/config.md#replica)")
    for name in replica.write_aws_env(config):
        cli.say(f"  for the unit: {name} (from this shell, in a file only you can read)")
    decisions = show_decisions(replica.start(config))
    argv = [sys.executable, *shlex.split(cli.command_line("backup.py", "--replica-start",
                                                          config_file=config.file))[1:]]
    files = replica.unit_files(config, argv)
    unit = replica.unit_name(config)
    if not convert.show_unit_diffs(files, cli.say) and units.state(unit).is_active:
        cli.say(f"{unit} is installed and runs already; nothing to do")
        return 0
    if not yes:
        if not sys.stdin.isatty():
            raise usage_error("--install-replica installs and starts a user unit: add --yes")
        if input(f"install and start {unit}? [y/N] ").strip().lower() not in ("y", "yes"):
            raise DeployError("not confirmed; nothing was changed", EXIT_FAILED)
    units.install_unit_files({path.name: text for path, text in files.items()})
    replica.enable(config)
    cli.say(f"installed and started {unit}: continuous copies of "
            f"{', '.join(d.env for d in decisions if d.replicating) or 'no env yet'} to {config.replica.url}")
    cli.say(f"see it with: {cli.script_command(config, 'status.py')}; journalctl --user -u {unit}")
    return 0


def show_decisions(decisions):
    for d in decisions:
        cli.say(f"  {d.env}: {'replicated' if d.replicating else 'NOT replicated'}: {d.why}")
    return decisions


def replica_start(config):
    """The replicator's ExecStartPre: which envs it may replicate now, and its config (safedeploy.replica)."""
    if config.replica is None:
        raise usage_error(f"{config.file}: no [replica] table any more: remove the unit with: systemctl --user "
                          f"disable --now {replica.unit_name(config)}")
    show_decisions(replica.start(config))
    return 0


MODES = [  # (is this the mode asked for, what runs it): the first that is; else backups (and --prune)
    (lambda a: a.verify is not None, verify),
    (lambda a: a.list, show_list),
    (lambda a: a.release_hold, release_hold),
    (lambda a: a.rows_to_restore, rows_to_restore),
    (lambda a: a.restore_rows, restore_rows_mode),
    (lambda a: a.install_timer, lambda config, envs, args: install_timer(config, args)),
    (lambda a: a.test_alert, lambda config, envs, args: test_alert(config)),
    (lambda a: a.alert_failed, lambda config, envs, args: alert_failed(config, args.alert_failed)),
    (lambda a: a.at, point_in_time),
    (lambda a: a.install_replica, lambda config, envs, args: install_replica(config, args.yes)),
    (lambda a: a.replica_start, lambda config, envs, args: replica_start(config)),
]


if __name__ == "__main__":
    cli.run(main)
