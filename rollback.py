#!/usr/bin/env python3
"""rollback.py ENV [--to POINT]: back to a chosen point without losing a single write.

The runbook: pick the point (default: the state before the last deploy); decide
about the database (--code-only never touches it, --with-db restores the point's
backup, by default it goes back only when the live schema differs from the
point's); show the plan; confirm; lock the env; then the steps of
safedeploy.runbook (tag, build only if the point's release is gone, prepare the
restored copy while the app serves, stop, save, switch, unit file, database,
restart, health, seal), and record.
--list shows the points; --drill rehearses a rollback without touching the env.
"""

import json
import re
import sqlite3
import shutil
import sys
import tempfile
import time
from pathlib import Path

from safedeploy import backups, cli, offsite, recovery, rehearsal, runbook, units
from safedeploy.errors import EXIT_FAILED, DeployError, usage_error
from safedeploy.gitrepo import Repo
from safedeploy.points import default_point, find_point, list_points
from safedeploy.state import EnvLock, deploy_log, now_iso, running_commit


BACKUP_WAIT = 300         # a running backup ends by itself: a rollback waits for it (bounded), then exit 3
POINT_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")      # a tag or a backup's name


def main():
    args = parse_arguments()
    config = cli.load_config(args)
    env = config.env(args.env)
    repo = Repo(env.path)
    if args.list:
        copies, problem = offsite_copies(config, env)
        return show_points(env, repo, list_points(env, repo, copies), args.json, problem)
    if args.drill:
        return drill(env, repo, choose_point(config, env, repo, args))
    with EnvLock(env.state_dir, env.name, "rollback", backup_wait=BACKUP_WAIT, on_wait=cli.say):
        recovery.recover(config, env, repo, cli.say)      # a killed operation: finish or undo it first
        point = choose_point(config, env, repo, args)
        runbook.refuse_tracked_database(env, repo, [repo.head(), point.commit])
        restore_db, why = runbook.decide_database(env, point, db_mode(args))
        if restore_db:
            runbook.check_point_backup(point, list_points(env, repo))
        show_plan(env, repo, point, restore_db, why)
        confirm(env, args)
        units.require_known(env.unit)
        return carry_out(config, env, repo, point, restore_db, why)


def choose_point(config, env, repo, args):
    """The point --to names (or the default one). Its database copy, if only off-site, is fetched
    into the backup folder and verified like a local one (not for --code-only: it is not needed)."""
    copies, problem = offsite_copies(config, env)
    if problem:
        cli.err(f"warning: off-site copies are not considered: {problem}")
    points = list_points(env, repo, copies)
    point = find_point(points, args.to) if args.to else default_point(env, points)
    if point.backup is None and point.copy is not None and db_mode(args) != "code-only":
        cli.say(f"{point.id}: its database copy is off-site only; fetching {point.copy.file} (snapshot "
                f"{point.copy.id[:8]}) into {env.backup_dir}")
        point.backup = offsite.Restic(config.offsite).fetch(point.copy, env.backup_dir)
        cli.say(f"fetched {point.backup.path}: sha256 {point.backup.sha256[:12]} matches, integrity ok")
    return point


def offsite_copies(config, env):
    """(env's off-site copies, None) or ([], why they could not be listed); ([], None) without [offsite]."""
    if not config.offsite:
        return [], None
    try:
        return offsite.Restic(config.offsite).copies_if_any(env.name), None
    except DeployError as exc:
        return [], str(exc)


def parse_arguments():
    p = cli.parser("rollback.py", "Roll an env back to a point: code, unit file, and the database when needed.",
                   ["python3 rollback.py prod                 # to the state before the last deploy",
                    "python3 rollback.py prod --list",
                    "python3 rollback.py prod --to prod-before-deploy-20261124-130000 --yes",
                    "python3 rollback.py prod --to prod-20261124-031700-nightly --with-db",
                    "python3 rollback.py prod --drill"])
    p.add_argument("env", metavar="ENV", help="the env to roll back, as named in config.toml")
    p.add_argument("--to", metavar="POINT", help="a point id from --list (default: before the last deploy)")
    p.add_argument("--list", action="store_true", help="list the rollback points, newest first")
    p.add_argument("--json", action="store_true", help="with --list: print JSON")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--with-db", action="store_true", help="also restore the point's database backup")
    group.add_argument("--code-only", action="store_true", help="never touch the database")
    p.add_argument("--yes", action="store_true", help="do not ask (needed without a terminal)")
    p.add_argument("--drill", action="store_true", help="rehearse: check the point's backup and commit, change nothing")
    args = p.parse_args()
    if args.json and not args.list:
        raise usage_error("--json goes with --list")
    if args.list and (args.drill or args.to or args.with_db or args.code_only or args.yes):
        raise usage_error("--list only lists: it takes no --drill, --to, --with-db, --code-only or --yes")
    if args.drill and (args.with_db or args.code_only or args.yes):
        raise usage_error("--drill changes nothing: it takes no --with-db, --code-only or --yes")
    if args.to is not None and not (POINT_RE.match(args.to) or (args.to.startswith("/") and args.to.endswith(".sqlite3")
                                                               and "/../" not in args.to)):
        raise usage_error(f"--to {args.to!r}: no such rollback point can be named like that (see --list)")
    return args


def db_mode(args):
    return "with-db" if args.with_db else "code-only" if args.code_only else "auto"


# -- looking -------------------------------------------------------------------------------
def show_points(env, repo, points, as_json, problem=None):
    live = backups.live_schema(env.db) if env.db.exists() else None      # None: missing or unreadable
    rows = [p.to_json(repo.subject(p.commit), (p.backup.schema != live) if p.backup and live else None)
            for p in points]
    if as_json:
        print(json.dumps({"env": env.name, "points": rows}, indent=2))
        return 0
    if not rows:
        cli.say(f"{env.name} has no rollback points yet (a deploy or a backup makes one)")
    for r in rows:
        schema = " SCHEMA DIFFERS" if r["schema_differs"] else ""
        where = ("  (database: local and off-site)" if r["backup"] and r["offsite"] else
                 "  (database: off-site only)" if r["offsite"] else "" if r["backup"] else "  (no backup)")
        cli.say(f"{r['id']:<42} {r['commit'][:12]} {r['time']}  {r['subject'][:40]}{where}{schema}")
    if problem:
        cli.err(f"error: the off-site copies could not be listed ({problem}); the points above are local only")
        return EXIT_FAILED
    return 0


def show_plan(env, repo, point, restore_db, why):
    head = repo.head()
    cli.say(f"rollback plan for {env.name}:")
    cli.say(f"  code      {head[:12]} -> {point.commit[:12]} ({repo.subject(point.commit)}), point {point.id}")
    if env.converted:
        kept = runbook.release_for(env, point)
        what = (f"switch back to {kept.path} (kept: no rebuild, no network)" if kept else
                f"REBUILD from {point.commit[:12]}: its release is no longer kept (runs the build commands)")
        cli.say(f"  release   {what}")
    cli.say(f"  database  {'RESTORE ' + point.backup.path if restore_db else 'keep'}: {why}")
    if restore_db and env.db.exists():
        try:
            leaving = backups.rows_only_in(env.db, point.backup.path)
        except sqlite3.Error as exc:
            leaving = {"(not counted)": str(exc)}
        cli.say("  rows      leaving the live database: " + (", ".join(f"{t} {n}" for t, n in sorted(leaving.items()))
                                                             or "none (every live row is in the point's backup)"))
    if restore_db:
        cli.say("  safety    the backup is copied and checked while the app serves; then the app stops, its "
                "database is renamed aside (kept as a pre-rollback backup) and the copy renamed in")
    else:
        cli.say("  safety    the live database is saved first as a pre-rollback backup")
    cli.say(f"  tag       the commit it leaves is tagged {env.name}-rolled-back-<time>")


def confirm(env, args):
    if args.yes:
        return
    if env.promote_from:
        cli.confirm_env(env.name, args.yes, "roll back")
    elif not sys.stdin.isatty():
        raise usage_error(f"rollback of {env.name} needs --yes when there is no terminal to ask")


# -- doing ---------------------------------------------------------------------------------
def carry_out(config, env, repo, point, restore_db, why):
    running = running_commit(deploy_log(env).read()) or repo.head()
    record = {"v": runbook.RECORD_VERSION, "kind": "rollback", "env": env.name, "time": now_iso(),
              "user": cli.user_name(), "from": running, "to": point.commit, "point": point.id}
    outcome = runbook.roll_back_and_record(config, env, repo, point, restore_db, why, running, record,
                                           watch=env.watch)
    print_summary(config, env, repo, outcome, record["steps"])
    return 0


def print_summary(config, env, repo, outcome, steps):
    p = outcome.point
    cli.say(f"{cli.paint('rolled back', 'green')} {env.name} to {p.id}: {outcome.left[:12]} -> {p.commit[:12]} "
            f"({repo.subject(p.commit)}) in {sum(steps.values()):.1f}s")
    if outcome.release:
        cli.say(f"  release   {outcome.release}{' (rebuilt from its commit)' if outcome.rebuilt else ' (kept; no rebuild)'}")
    cli.say(f"  database  {'restored from ' + p.backup.path if outcome.restore_db else 'kept'} ({outcome.db_why})")
    if outcome.restore_db:
        if outcome.rows_lost:
            for table, n in sorted(outcome.rows_lost.items()):
                cli.say(f"  rows      {table}: {n} row(s) written since the point are not in the restored database")
            cli.say(f"            they are all in the pre-rollback copy {outcome.pre_rollback}; to put them back as "
                    f"reviewable SQL: {cli.script_command(config, 'backup.py', '--rows-to-restore', outcome.pre_rollback)}")
        elif outcome.pre_rollback:
            cli.say("  rows      the restore took away no rows")
        if outcome.seal_problem:
            cli.say(f"  aside     the replaced database lies at {outcome.aside}: {outcome.seal_problem}")
    cli.say(f"  saved     pre-rollback backup {outcome.pre_rollback or 'none (no live database)'}")
    cli.say(f"  tagged    {outcome.left_tag} marks the commit it left")
    if outcome.unit_restored:
        cli.say("  unit      the point's unit file was restored (daemon-reload done)")
    if outcome.stash:
        cli.say(f"  stashed   uncommitted changes in the work tree: git -C {env.path} stash show -p {outcome.stash}")
    cli.say(f"  health    {env.health_url}: {outcome.health.describe()}")
    if outcome.watched:
        cli.say(f"  watch     watched {outcome.watched:g}s: healthy throughout, same process, no restart")
    cli.say("  steps     " + ", ".join(f"{k} {v:.2f}s" for k, v in steps.items()))


# -- rehearsing ----------------------------------------------------------------------------
def drill(env, repo, point):
    """Restore the point's backup to a temp file and check it; check out its commit in a temp worktree."""
    timings, problems, health_text = {}, [], ""
    try:
        work = Path(tempfile.mkdtemp(prefix=f"safe-deploy-drill-{env.name}-"))
    except OSError as exc:
        raise DeployError(f"cannot make a temp folder for the drill in {tempfile.gettempdir()}: "
                          f"{exc.strerror or exc} (set TMPDIR to a folder with room)") from None
    try:
        start = time.monotonic()
        if point.backup:
            copy = work / "restored.sqlite3"
            try:
                shutil.copyfile(point.backup.path, copy)
                verdict = backups.verify_backup(backups.Backup(**{**point.backup.to_json(), "path": str(copy)}))
            except OSError as exc:
                verdict = f"cannot copy it to {copy}: {exc.strerror or exc}"
            if verdict != "ok":
                problems.append(f"backup {point.backup.path}: {verdict}")
        else:
            problems.append(f"point {point.id} has no database backup")
        timings["database"] = time.monotonic() - start
        start = time.monotonic()
        if point.backup and not problems:
            # the proof: the point's release, built in the temp folder, boots on the restored copy
            booted = rehearsal.boot_on_copy(env, repo, point.commit, copy, work)
            if booted.ok:
                timings.update(booted.seconds)
                health_text = booted.health
            else:
                problems.append(f"the point's release did not serve on the restored copy (at {booted.failed}): "
                                f"{booted.error}" + "".join(f"\n  | {line}" for line in booted.output.splitlines()[-8:]))
        timings["code"] = time.monotonic() - start
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ok = not problems
    deploy_log(env).append({"kind": "drill", "env": env.name, "time": now_iso(), "user": cli.user_name(),
                            "point": point.id, "result": "ok" if ok else "failed", "problems": problems,
                            "steps": {k: round(v, 3) for k, v in timings.items()}})
    steps = ", ".join(f"{k} {v:.2f}s" for k, v in timings.items())
    if not ok:
        for problem in problems:
            cli.err(f"error: drill of {env.name} to {point.id}: {problem}")
        return EXIT_FAILED
    cli.say(f"rollback plan tested: {env.name} to {point.id} ({point.commit[:12]}); backup restored and verified "
            f"in a temp file, and the point's release built and started on it on a scratch port "
            f"(a transient unit; health {health_text}); stopped ({steps}); nothing live was touched")
    return 0


if __name__ == "__main__":
    cli.run(main, nice=True, alert="rollback")
