#!/usr/bin/env python3
"""backup.py [ENV ... | --all]: consistent, verified online backups of live SQLite databases.

Each backup is taken under the env's lock (waiting a bounded time if a deploy
holds it), copied with SQLite's online backup API from a read-only connection,
integrity-checked, hashed, and written with a manifest (commit, reason, sha256,
schema) so that it is also a rollback point. Safe from cron: --quiet prints
nothing on success and one line per failure on stderr.
"""

import argparse
import json
import re
import shlex
import sqlite3
import sys
import tempfile
from pathlib import Path

from safedeploy import (adoption, alerts, backups, cli, convert, offsite, oplog, recovery, replica, replica_copy,
                         retention, rowrestore, units)
from safedeploy.errors import EXIT_FAILED, EXIT_LOCKED, DeployError, usage_error
from safedeploy.gitrepo import Repo
from safedeploy.points import backup_id
from safedeploy import records
from safedeploy.state import EnvLock, JsonLog, Journal, StepClock, age_seconds, human_age, now_iso, parse_time

REASON_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-")
TIME_RE = re.compile(r"^([01][0-9]|2[0-3]):[0-5][0-9]$")


def main():
    args = parse_arguments()
    config = cli.load_config(args)
    envs = select_envs(config, args)
    if args.verify is not None:
        return verify(config, envs, args)
    if args.list:
        return show_list(config, envs, args.json)
    if args.release_hold:
        return release_hold(envs, args.release_hold)
    if args.rows_to_restore:
        return rows_to_restore(envs, args.rows_to_restore)
    if args.restore_rows:
        return restore_rows(config, envs, args)
    if args.install_timer:
        return install_timer(config, args)
    if args.test_alert:
        return test_alert(config)
    if args.alert_failed:
        return alert_failed(config, args.alert_failed)
    if args.at:
        return point_in_time(config, envs, args)
    if args.install_replica:
        return install_replica(config, args.yes)
    if args.replica_start:
        return replica_start(config)
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
    reason = args.reason or ("nightly" if args.quiet else "manual")
    cli.log_operation(envs, "backup")
    remote = OffsiteRun(config, args.quiet)
    remote.warn_if_stale(envs)
    codes = []
    for env in envs:
        try:
            backup = back_up_env(config, env, reason, args.lock_wait, None if args.quiet else progress_printer(env))
        except DeployError as exc:
            cli.err(f"error: backup of {env.name} failed: {exc} {cli.full_output(env.name)}".rstrip())
            oplog.mark(env.name, False)
            codes.append(exc.code)
            if exc.code != EXIT_LOCKED:
                notify(config, "backup-failed", env.name, f"the {reason} backup of {env.name} failed: {exc}",
                       cli.script_command(config, "backup.py", env.name))
            continue
        if not args.quiet:
            cli.say(f"backed up {env.name}: {backup.path} ({backup.bytes / 1e6:.1f} MB, "
                    f"sha256 {backup.sha256[:12]}, integrity ok, {backup.seconds:.2f}s)")
        if not remote.push(env, backup):
            oplog.mark(env.name, False)
            codes.append(EXIT_FAILED)
        else:
            oplog.mark(env.name, True)
    if not codes:
        return 0
    return EXIT_LOCKED if EXIT_LOCKED in codes and len(set(codes)) == 1 else EXIT_FAILED


class OffsiteRun:
    """The off-site side of one backup.py run: the repository opened (and initialised) once."""

    def __init__(self, config, quiet):
        self.config, self.quiet = config, quiet
        self.engine = offsite.engine(config.offsite) if config.offsite else None
        self.opened = False

    def open(self):
        if not self.opened:
            self.engine.ensure_repository()
            self.opened = True
        return self.engine

    def warn_if_stale(self, envs):
        if not self.engine:
            return
        for env in envs:
            try:
                why = offsite.stale(env)
            except DeployError as exc:         # the state folder is full or unwritable: the backup still runs
                why = f"when {env.name}'s last copy reached off-site is unknown: {exc}"
            if why:
                cli.err(f"warning: off-site copies are stale: {why}")
                notify(self.config, "offsite-stale", env.name, why, cli.script_command(self.config, "backup.py", env.name))

    def push(self, env, backup):
        """Copy a verified local backup off-site, then every earlier one of env that is not there yet (the
        copies deploys, rollbacks and adoption made: they are pushed here, never during a deploy, so the
        network never slows one down). False (said, alerted) when that failed."""
        if not self.engine:
            return True
        try:
            result = self.open().push(backup)
            offsite.record_push(env, backup, result)
        except DeployError as exc:
            return self.failed(env, f"the off-site copy of {env.name}'s backup {backup.path} failed: {exc}. The "
                               "local backup is verified; it is on this host's disk only")
        if not self.quiet:
            cli.say(f"  off-site: snapshot {result['snapshot'][:8]} in {self.config.offsite.shown}, "
                    f"{result['added'] / 1e6:.1f} MB added, {result['seconds']:.1f}s")
        try:
            caught_up = self.catch_up(env, backup)
        except DeployError as exc:
            return self.failed(env, f"{backup.path} reached off-site, but an earlier backup of {env.name} that was "
                               f"not there yet could not be copied: {exc}")
        if caught_up and not self.quiet:
            cli.say(f"  off-site: also {len(caught_up)} earlier backup(s) not yet there: {', '.join(caught_up)}")
        return True

    def failed(self, env, message):
        cli.err(f"error: {message} {cli.full_output(env.name)}".rstrip())
        notify(self.config, "offsite-failed", env.name, message, cli.script_command(self.config, "backup.py", env.name))
        return False

    def catch_up(self, env, pushed):
        there = {c.file for c in self.engine.copies(env.name)}
        done = []
        for b in reversed(backups.list_backups(env.backup_dir)):        # oldest first
            name = Path(b.path).name
            if name in there or b.path == pushed.path or backups.verify_backup(b) != "ok":
                continue
            self.engine.push(b)
            done.append(f"{name.removesuffix('.sqlite3')}")
        return done


def notify(config, name, env, message, command=None):
    """An alert for an event, when [alerts] is set; a delivery problem is printed, never raised. It carries
    the env's log of this run, when one is open."""
    log = oplog.current(env) if env else None
    for problem in alerts.send(config.alerts, alerts.event(name, env, message, command,
                                                           log=log.path if log else None)):
        cli.err(f"warning: {problem}")


def look_with(config):
    return lambda name: cli.script_command(config, "status.py", name)


def back_up_env(config, env, reason, lock_wait, progress=None):
    with EnvLock(env.state_dir, env.name, f"backup ({reason})", wait=lock_wait):
        clean_up_interrupted(env)
        journal = Journal(env.state_dir, env.name, "backup-journal")
        journal.start("backup", reason=reason)
        try:
            return backups.backup_database(env.db, env.backup_dir, env.name, reason, commit=commit_running(env),
                                           unit_file=unit_file(env), progress=progress,
                                           clock=StepClock(journal, "backup", look_with=look_with(config)),
                                           bookkeeping=env.bookkeeping)
        finally:
            journal.finish()


def clean_up_interrupted(env):
    """A killed backup left temp files: remove them. A killed deploy or rollback is left for the
    next deploy.py or rollback.py, which finishes or undoes it (backups never change what runs)."""
    journal = Journal(env.state_dir, env.name, "backup-journal")
    if journal.read():
        recovery.remove_temp_files(env)
        journal.finish()


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


def commit_running(env):
    try:
        return records.running_commit(records.read(env)) or Repo(env.path).head()
    except DeployError:
        return ""


def unit_file(env):
    try:
        path = units.state(env.unit).fragment_path
    except DeployError:
        return None
    return path if path and Path(path).is_file() else None


# -- listing and verifying ----------------------------------------------------------
def show_list(config, envs, as_json):
    """Every backup, newest first, with where its copies are: local, offsite, or both."""
    found = [b for env in envs for b in backups.list_backups(env.backup_dir)]
    names = {e.name for e in envs}
    remote, problem, others = [], None, 0
    if config.offsite:
        try:
            remote, others = offsite.engine(config.offsite).scan()      # this config's copies only
            remote = [c for c in remote if c.env in names]
        except DeployError as exc:
            problem = str(exc)
    remote_files = {c.file for c in remote}
    local_files = {Path(b.path).name for b in found}
    known = bool(config.offsite) and not problem        # else whether a copy is off-site too is not known

    def where(b):
        there = Path(b.path).name in remote_files
        return {"location": "both" if known and there else "local", "offsite": there if known else None}

    keys = ("env", "path", "time", "bytes", "sha256", "reason", "commit", "schema", "held")
    rows = [{**{k: getattr(b, k) for k in keys}, "rows": b.rows_total, **where(b)} for b in found]
    rows += [{"env": c.env, "path": None, "time": c.time, "bytes": None, "sha256": c.sha256, "reason": c.reason,
              "commit": c.commit, "schema": None, "held": False, "rows": c.rows_total, "location": "offsite",
              "offsite": True,
              "snapshot": c.id, "file": c.file} for c in remote if c.file not in local_files]
    rows.sort(key=lambda r: r["time"] or "", reverse=True)
    identity = {"repository": config.offsite.shown, "host": config.offsite.host, "config": config.offsite.id,
                "others": others} if config.offsite else None
    if as_json:
        cli.say(json.dumps({"backups": rows, **({"offsite": identity} if identity else {})}, indent=2))
    else:
        if not rows:
            cli.say("no backups yet")
        for r in rows:
            size = f"{r['bytes'] / 1e6:9.1f} MB" if r["bytes"] is not None else "         ? MB"
            where = r["path"] or f"{r['file']} (off-site only, snapshot {r['snapshot'][:8]})"
            rows_text = f"{r['rows']:>8} rows" if r["rows"] is not None else "       ? rows"
            cli.say(f"{r['time']}  {r['env']:<8} {r['reason']:<12} {size} {rows_text}  {(r['commit'] or '?')[:12]}  "
                    f"{human_age(age_seconds(r['time'])):>8}  {r['location']:<7} {where}"
                    + ("  HELD: holds rows a restore took out; kept until --release-hold" if r["held"] else ""))
        if identity and not problem:
            cli.say(f"off-site: {identity['repository']}, this config's copies (host={identity['host']}, "
                    f"config={identity['config']})" + (f"; {others} copies of other hosts or configs there, not listed"
                                                       if others else ""))
    if problem:
        cli.err(f"error: the off-site copies could not be listed: {problem}")
        return EXIT_FAILED
    return 0


def rows_to_restore(envs, wanted):
    """The older spelling: the SQL of a restore, for review only."""
    backup = find_backup(envs, wanted)
    env = next(e for e in envs if Path(backup.path).parent == e.backup_dir)
    cli.say("\n".join(rowrestore.sql(rowrestore.plan(env, backup.path))))
    return 0


def restore_rows(config, envs, args):
    """--restore-rows: the plan, then (asked, or --yes) the verified restore, under the env's lock. The copy
    may be off-site only: it is fetched and verified first, like a rollback's."""
    env = envs[0]
    backup = copy_to_restore_from(config, env, args.restore_rows)
    record = records.RowsRecord(env=env.name, user=cli.user_name(), copy=backup_id(backup))
    with EnvLock(env.state_dir, env.name, "restore-rows", wait=args.lock_wait):
        if not args.sql:
            cli.log_operation([env], "restore-rows")
        try:
            plan = rowrestore.plan(env, backup.path, backup.sha256)
        except sqlite3.Error as exc:
            raise DeployError(f"cannot compare {backup.path} with {env.db}: {exc}; nothing was changed") from None
        if args.sql:
            cli.say("\n".join(rowrestore.sql(plan)))
            return 0
        show_restore_plan(env, backup, plan)
        if not plan.total:
            cli.say("nothing to put back" + (": what is left out above stays in the copy" if plan.refused or
                                              plan.left_out_total else ": every row of the copy is live"))
            return EXIT_FAILED if plan.refused else 0
        confirm_restore(env, args.yes, plan.total)
        try:
            done = rowrestore.apply(env, backup.path, backup.sha256)
        except (rowrestore.RestoreRefused, sqlite3.Error) as exc:
            record.result, record.error = "failed", str(exc)
            records.append(env, record)
            why = str(exc) if isinstance(exc, rowrestore.RestoreRefused) else \
                f"{exc}; the transaction was rolled back, nothing was changed"
            raise DeployError(f"rows of {Path(backup.path).name} not put back: {why}. Review them with: "
                              + cli.script_command(config, "backup.py", env.name, "--restore-rows",
                                                   backup_id(backup), "--sql")) from None
        record.result, record.restored, record.rekeyed = "ok", done.restored, done.rekeyed
        record.left_out = done.plan.left_out_total
        records.append(env, record)
    restored = ", ".join(f"{n} row(s) of {t}" for t, n in sorted(done.restored.items())) or "no row"
    cli.say(f"put back {restored} into {env.db}, in one transaction, verified before COMMIT: every live row "
            "unchanged, the rows added exactly those planned, with their references")
    for table, n in sorted(done.rekeyed.items()):
        cli.say(f"  {table}: {n} of them under a new id (a newer row took theirs); the rows referring to them follow")
    if done.plan.refused or done.plan.left_out_total:
        cli.say("  left out (still in the copy): see above")
    return 0


def copy_to_restore_from(config, env, wanted):
    """A local backup named by wanted, else this config's off-site copy of that name, fetched and verified."""
    try:
        return find_backup([env], wanted)
    except DeployError:
        copies, problem = offsite.copies_for(config, env)
        copy = next((c for c in copies if wanted in (c.name, c.file)), None)
        if copy is None:
            raise
        cli.say(f"{copy.name} is off-site only; fetching {copy.file} (snapshot {copy.id[:8]})")
        return offsite.fetch_for(config, copy, env)


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


def release_hold(envs, wanted):
    """The rows a copy holds that the live database lacks are not wanted back (deleted on purpose): the row
    ledger stops counting the copy, and a held copy is no longer kept from prune."""
    backup = find_backup(envs, wanted)
    env = next(e for e in envs if Path(backup.path).parent == e.backup_dir)
    JsonLog(env.state_dir / f"{env.name}.dismissed.jsonl").append(
        {"time": now_iso(), "id": Path(backup.path).name.removesuffix(".sqlite3"), "sha256": backup.sha256,
         "by": cli.user_name()})
    if backup.held:
        backups.release_hold(backup)
    cli.say(f"released: the rows of {backup.path} the live database lacks are not counted any more (status stops "
            "advising them back); prune treats it as any backup, [retention] decides from now on")
    return 0


def verify(config, envs, args):
    if args.verify:
        targets = [find_backup(envs, args.verify)]
    else:
        targets = [b for env in envs for b in backups.list_backups(env.backup_dir)]
    problems = []
    for b in targets:
        verdict = backups.verify_backup(b)
        if verdict != "ok":
            problems.append(f"BAD backup {b.path}: {verdict}")
            cli.err(f"error: {problems[-1]}")
        elif not args.quiet:
            cli.say(f"{cli.mark(True)}  {b.path}")
    if not args.quiet:
        cli.say(f"{len(targets) - len(problems)} of {len(targets)} backups good")
    if config.offsite and not args.verify:
        problems += verify_offsite(config, envs, args.quiet)
    if problems:
        notify(config, "verify-failed", ",".join(e.name for e in envs), "backup.py --verify found: " + "; ".join(problems),
               cli.script_command(config, "backup.py", "--verify"))
    return EXIT_FAILED if problems else 0


def verify_offsite(config, envs, quiet):
    """The engine's check (restic: a tenth of the data packs read back; borg: the newest archives' data
    verified), then the newest off-site copy of each env
    restored to a temp folder and checked (sha256, integrity) like a local one."""
    engine, problems = offsite.engine(config.offsite), []
    try:
        if not engine.exists():
            raise DeployError(f"there is no repository at {config.offsite.shown} yet: no backup has reached "
                              "off-site (the next backup.py run makes it)")
        checked = engine.check()
        copies = engine.copies()
    except DeployError as exc:
        cli.err(f"error: off-site repository: {exc}")
        return [str(exc)]
    if not quiet:
        cli.say(f"{cli.mark(True)}  off-site repository {config.offsite.shown}: {checked}")
    for env in envs:
        newest = next((c for c in copies if c.env == env.name), None)
        if newest is None:
            if not quiet:
                cli.say(f"   {env.name}: no off-site copy yet")
            continue
        with tempfile.TemporaryDirectory(prefix="safe-deploy-verify-") as scratch:
            try:
                engine.fetch(newest, Path(scratch), env.name)
            except DeployError as exc:
                cli.err(f"error: BAD off-site copy of {env.name}: {exc}")
                problems.append(str(exc))
                continue
        if not quiet:
            cli.say(f"{cli.mark(True)}  {env.name}: newest off-site copy {newest.file} restored to a temp folder: "
                    "sha256 and integrity ok")
    return problems


# -- retention ------------------------------------------------------------------------
def prune(config, envs, args):
    """Local prune of each env under its lock; then the off-site side with no lock held: a repository
    that does not answer must never keep a rollback waiting (a black-holed one held the env lock for
    300 s, and every rollback behind it)."""
    bad, plans = False, []
    for env in envs:
        with EnvLock(env.state_dir, env.name, "prune", wait=args.lock_wait):
            found = backups.list_backups(env.backup_dir)
            protected = retention.protected(
                env, found, (adoption.read_doc(config)["envs"].get(env.name) or {}).get("backup"))
            keep, remove = retention.prune_plan(found, config.retention, protected)
            held = [b for b in remove if b.held]
            remove = [b for b in remove if not b.held]
            for b in held:
                keep[b.path] = "holds rows a restore took out (backup.py --release-hold FILE lets prune remove it)"
            for b in remove:
                if not args.dry_run:
                    backups.remove_backup(b)
                if not args.quiet or args.dry_run:
                    cli.say(f"{'would remove' if args.dry_run else 'removed'} {b.path} ({b.reason}, {b.time})")
            if not keep and found:
                bad = True
            if not args.quiet:
                cli.say(f"{env.name}: kept {len(keep)}, {'would remove' if args.dry_run else 'removed'} {len(remove)}")
            # what must stay off-site, by file name: decided under the lock, applied after it
            by_name = {Path(path).name: why for path, why in protected.items()}
            by_name.update({Path(b.path).name: "held" for b in found if b.held})
            plans.append((env, by_name))
    if config.offsite and not prune_offsite(config, plans, args):
        bad = True
    return EXIT_FAILED if bad else 0


def prune_offsite(config, plans, args):
    """[retention] on this config's off-site copies (never another host's or config's), env by env,
    then one prune (restic prune, borg compact). Stale locks (a restic killed mid-push) are cleared first:
    restic unlock removes only stale ones (borg removes its own). True when all went well."""
    engine, ok, forgot = offsite.engine(config.offsite), True, False
    try:
        if not args.dry_run:
            engine.unlock()
        mine = engine.copies()          # one listing for every env
    except DeployError as exc:
        return offsite_prune_failed(config, None, exc)
    for env, by_name in plans:
        try:
            copies = [c for c in mine if c.env == env.name]
            most = retention.richest(copies + [b for b in backups.list_backups(env.backup_dir)])
            if most:            # the copy with the data, wherever it is (off-site only on a rebuilt host)
                by_name.setdefault(Path(most.path).name, retention.RICHEST.format(n=most.rows_total))
            keep, remove = retention.prune_plan(copies, config.retention, by_name)
            for c in remove:
                if not args.quiet or args.dry_run:
                    cli.say(f"{'would forget' if args.dry_run else 'forgot'} off-site {c.file} (snapshot {c.id[:8]}, {c.time})")
            if not args.dry_run:
                engine.forget(remove)
        except DeployError as exc:
            ok = offsite_prune_failed(config, env.name, exc) and ok
            continue
        if not args.quiet:
            cli.say(f"{env.name} off-site: kept {len(keep)}, {'would forget' if args.dry_run else 'forgot'} {len(remove)}")
        forgot = forgot or (bool(remove) and not args.dry_run)
    if forgot:
        try:
            engine.prune()      # once for every env: restic's prune rewrites packs, borg's compact frees segments
        except DeployError as exc:
            cli.err(f"error: off-site prune failed: {exc}; the forgotten copies' data stays in the repository until "
                    "the next --prune")
            notify(config, "offsite-failed", None, f"the off-site prune failed: {exc}",
                   cli.script_command(config, "backup.py", "--prune"))
            ok = False
    return ok


def offsite_prune_failed(config, env_name, exc):
    what = f"the off-site prune of {env_name}" if env_name else "the off-site prune"
    cli.err(f"error: {what} failed: {exc}; nothing more was removed off-site")
    notify(config, "offsite-failed", env_name, f"{what} failed: {exc}", cli.script_command(config, "backup.py", "--prune"))
    return False


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
    notify(config, "backup-failed", None, f"the systemd unit {unit} failed: the nightly backup did not finish",
           f"journalctl --user -u {unit} -n 50")
    return 0


# -- continuous copies ([replica]) -------------------------------------------------------------------
def point_in_time(config, envs, args):
    """backup.py ENV --at TIME: the env's database as it was at TIME, out of its replica, as a verified backup."""
    env, when = envs[0], replica_copy.parse_when(args.at)
    with EnvLock(env.state_dir, env.name, "backup (point-in-time)", wait=args.lock_wait):
        clean_up_interrupted(env)
        backup, point = replica_copy.copy_at(config, env, when, lambda moment: commit_at(env, moment))
    asked = "the replica's newest moment" if when is None else f"the replica's last moment at or before {args.at}"
    name = Path(backup.path).name.removesuffix(".sqlite3")
    cli.say(f"{env.name} as it was at {backup.time} ({asked}): {backup.path} ({backup.rows_total} rows, "
            f"{backup.bytes / 1e6:.1f} MB, sha256 {backup.sha256[:12]}, integrity ok)")
    cli.say(f"  its rows the live database lacks: {cli.script_command(config, 'backup.py', '--rows-to-restore', backup.path)}")
    cli.say(f"  or the env back to it: {cli.script_command(config, 'rollback.py', env.name, '--to', name, '--with-db')}")
    return 0


def commit_at(env, moment):
    """The commit env ran at moment, by its deploy log (else what runs now)."""
    try:
        found = records.read(env)
    except DeployError:
        found = []
    before = [r for r in found if r.running and parse_time(r.time) and parse_time(r.time) <= moment]
    if before:
        return before[-1].running
    first = next((getattr(r, "from_", None) for r in found if getattr(r, "from_", None)), None)
    return first or commit_running(env)


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


def find_backup(envs, name):
    """A backup named by its path, its file name or its id (the file name without .sqlite3), as status, --list
    and rollback.py --list print them."""
    wanted = Path(name.removesuffix(".json")).resolve()
    for env in envs:
        for b in backups.list_backups(env.backup_dir):
            if Path(b.path).resolve() == wanted or name in (Path(b.path).name, Path(b.path).name.removesuffix(".sqlite3")):
                return b
    raise usage_error(f"{name}: not a backup with a manifest in any env's backup folder")


if __name__ == "__main__":
    cli.run(main)
