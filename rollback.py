#!/usr/bin/env python3
"""rollback.py ENV [--to POINT]: back to a chosen point without losing a single write.

The runbook: pick the point (default: the state before the last deploy); decide about the
database (--code-only never touches it, --with-db restores the point's backup, by default it goes
back only when the live schema differs from the point's); show the plan (the steps of
safedeploy.runbook.ROLLBACK this rollback takes, and what it does to the rows and the unit file);
confirm; lock the env; run the steps; record. --list shows the points; --drill proves a point
without touching the env.
"""

import json
import re
import sys
from pathlib import Path

from safedeploy import cli, dbfiles, decisions, offsite, planning, probe, recovery, rehearsal, restore, rowloss, runbook, units
from safedeploy.errors import EXIT_FAILED, DeployError, usage_error
from safedeploy.gitrepo import Repo
from safedeploy.points import list_points
from safedeploy.records import read, running_commit
from safedeploy.state import EnvLock

BACKUP_WAIT = 300         # a running backup ends by itself: a rollback waits for it (bounded), then exit 3
POINT_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")      # a tag or a backup's name


def main():
    args = parse_arguments()
    config = cli.load_config(args)
    env = config.env(args.env)
    repo = Repo(env.path)
    if args.list:
        cli.only_looking()
        copies, problem = offsite.copies_for(config, env)
        return show_points(config, env, repo, list_points(env, repo, copies), args.json, problem)
    if args.drill:
        return drill(config, env, repo, args)
    with EnvLock(env.state_dir, env.name, "rollback", backup_wait=BACKUP_WAIT, on_wait=cli.say):
        cli.log_operation([env], "rollback")
        recovery.recover(config, env, repo, cli.say)      # a killed operation: finish or undo it first
        run = plan(config, env, repo, args)
        try:
            run.without_prompt = bool(args.yes)
            show_plan(env, repo, run)
            check_early_copy(env, repo, run)
            confirm(env, args)
            units.require_known(env.unit)
        except BaseException:
            if run.early is not None:
                run.early.discard()
            if run.plan_view is not None:
                run.plan_view.close()
            raise
        runbook.roll_back(config, env, repo, run.point, run.restore_db, run.db_why, run.running, run=run,
                          db_only=run.db_only)
        print_summary(config, env, repo, run)
        return 0


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
    group.add_argument("--db-only", action="store_true",
                       help="the database alone back to the copy --to names (a point, a backup's id, file name or path): "
                            "the running code and its unit file stay, nothing is marked bad")
    p.add_argument("--yes", action="store_true", help="do not ask (needed without a terminal)")
    p.add_argument("--drill", action="store_true", help="rehearse: check the point's backup and release, change nothing")
    args = p.parse_args()
    if args.json and not args.list:
        raise usage_error("--json goes with --list")
    if args.list and (args.drill or args.to or args.with_db or args.code_only or args.yes):
        raise usage_error("--list only lists: it takes no --drill, --to, --with-db, --code-only or --yes")
    if args.db_only and not args.to:
        raise usage_error("--db-only needs --to COPY: the copy the database goes back to (see backup.py --list)")
    if args.list and args.db_only:
        raise usage_error("--list only lists: it takes no --db-only")
    if args.drill and (args.with_db or args.code_only or args.yes or args.db_only):
        raise usage_error("--drill changes nothing: it takes no --with-db, --code-only or --yes")
    if args.to is not None and not (POINT_RE.match(args.to) or (args.to.startswith("/") and args.to.endswith(".sqlite3")
                                                               and "/../" not in args.to)):
        raise usage_error(f"--to {args.to!r}: no such rollback point can be named like that (see --list)")
    return args


def db_mode(args) -> decisions.DatabaseMode:
    if args.with_db or args.db_only:
        return decisions.DatabaseMode.WITH_DB
    return decisions.DatabaseMode.CODE_ONLY if args.code_only else decisions.DatabaseMode.AUTO


def choose_point(config, env, repo, args):
    """The point --to names (or the default one). Its database copy, if only off-site, is fetched into a
    private folder and verified like a local one (not for --code-only: it is not needed)."""
    copies, problem = offsite.copies_for(config, env)
    if problem:
        cli.err(f"warning: off-site copies are not considered: {problem}")
    point = planning.choose_point(env, list_points(env, repo, copies), args.to)
    if point.backup is None and point.copy is not None and db_mode(args) != decisions.DatabaseMode.CODE_ONLY:
        cli.say(f"{point.id}: its database copy is off-site only; fetching {point.copy.file} (snapshot "
                f"{point.copy.id[:8]})")
        point.backup = offsite.fetch_for(config, point.copy, env)
        cli.say(f"fetched {point.backup.path}: sha256 {point.backup.sha256[:12]} matches, integrity ok")
    return point


def plan(config, env, repo, args):
    point = choose_point(config, env, repo, args)
    running = running_commit(read(env)) or repo.head()
    if args.db_only:
        planning.refuse_tracked_database(env, repo, [repo.head()])
        why = (f"--db-only: the database back to {point.backup.path}; {running[:12]} keeps running" if point.backup
               else "")
        if point.backup is None:
            raise DeployError(f"--db-only: {point.id} has no database copy; choose another with --to (backup.py --list)")
        run = runbook.rollback_run(config, env, repo, point, True, why, running, watch=env.watch, db_only=True,
                                   out=cli.output())
        return start_copy(run)
    planning.refuse_tracked_database(env, repo, [repo.head(), point.commit])
    restore_db, why = planning.decide_database(env, point, db_mode(args))
    run = runbook.rollback_run(config, env, repo, point, restore_db, why, running, watch=env.watch,
                               out=cli.output())
    return start_copy(run) if restore_db else run


def start_copy(run):
    """A restore's copy of the point's backup starts now, beside the live file (the prepare step), while the
    plan is worked out and shown: its sha256, computed as it copies, is the check of the backup (see
    check_early_copy). A backup file gone is refused at once."""
    if not Path(run.point.backup.path).exists():
        planning.check_point_backup(run.env, run.repo, run.point)
    run.early = restore.EarlyPrepare(run.point.backup, run.env.db)
    return run


def check_early_copy(env, repo, run):
    """A backup whose copy does not match its recorded sha256 is refused before anything is stopped, naming the
    next-best point (planning.check_point_backup, which hashes it again to say what is wrong)."""
    if run.early is None:
        return
    try:
        run.early.result()
    except DeployError:
        run.early = None
        planning.check_point_backup(env, repo, run.point)
        raise


# -- looking -------------------------------------------------------------------------------
def show_points(config, env, repo, points, as_json, problem=None):
    live = dbfiles.live_schema(env.db) if env.db.exists() else None      # None: missing or unreadable
    marks = planning.point_marks(config, env, repo, points)     # a release rolled back in any env: said
    rows = [{**p.to_json(repo.subject(p.commit), (p.backup.schema != live) if p.backup and live else None),
             "rolled_back_in": (marks[p.commit] or {}).get("env")} for p in points]
    if as_json:     # a listing that failed is said (offsite_problem: "offsite" is then only what this host knows),
        # and exits 0: the local points are right, and a rolling rollback (ansible/rollback.yml) goes on with them
        cli.say(json.dumps({"env": env.name, "points": rows, **({"offsite_problem": problem} if problem else {})},
                           indent=2))
        if problem:
            cli.err(f"error: the off-site copies could not be listed ({problem}); the points are local only")
        return 0
    if not rows:
        cli.say(f"{env.name} has no rollback points yet (a deploy or a backup makes one)")
    # with [offsite], a copy on this host only is said: it goes with the disk (the next backup.py pushes it)
    local_only = "  (database: this host only, not off-site yet)" if config.offsite and not problem else ""
    for r in rows:
        schema = " SCHEMA DIFFERS" if r["schema_differs"] else ""
        schema += f" ROLLED BACK in {r['rolled_back_in']}" if r["rolled_back_in"] else ""
        where = ("  (database: local and off-site)" if r["backup"] and r["offsite"] else
                 "  (database: off-site only)" if r["offsite"] else
                 local_only if r["backup"] else "  (no backup)")
        cli.say(f"{r['id']:<42} {r['commit'][:12]} {r['time']}  {r['subject'][:40]}{where}{schema}")
    if problem:
        cli.err(f"error: the off-site copies could not be listed ({problem}); the points above are local only")
        return EXIT_FAILED
    return 0


def show_plan(env, repo, run):
    """The plan: the steps this rollback takes (the runbook's own descriptions), and the rows it moves."""
    point = run.point
    if run.db_only:
        cli.say(f"restore plan for {env.name}'s database: {point.backup.path} ({point.id}); the code stays at "
                f"{run.running[:12]} ({repo.subject(run.running)})")
    else:
        cli.say(f"rollback plan for {env.name}: {repo.head()[:12]} -> {point.commit[:12]} ({repo.subject(point.commit)}), "
                f"point {point.id}")
    cli.say(f"  database  {'RESTORE ' + point.backup.path if run.restore_db else 'keep'}: {run.db_why}")
    if run.restore_db and env.db.exists():
        run.plan_view = show_rows_leaving(env, point, keep=run.without_prompt)
    cli.say(f"  unit file {'RESTORE' if run.unit_action == 'restore' else 'keep'}: {run.unit_why}")
    mark = planning.point_mark(run.config, env, repo, point)
    if mark:
        cli.say(cli.paint(f"  WARNING   {point.commit[:12]} is a release that was rolled back in {mark.get('env')} at "
                          f"{mark.get('time')} ({mark.get('why')}): this brings it back", "yellow"))
    for i, step in enumerate(runbook.rollback_steps(run), 1):
        cli.say(f"  {i:2}. {step['name']}: {step['detail']}")


def show_rows_leaving(env, point, keep=False):
    """The rows the restore takes out of the live database (by content), or what a salvage of a damaged one
    finds: all of them are kept, in the pre-rollback copy or a salvaged one, for `backup.py --restore-rows`.
    keep (--yes: no prompt before the stop): returns the plan's view of the live database, held open for the
    seal (rowloss.PlanView), or None."""
    leaving = rowloss.leaving(env, point.backup, keep=keep)
    if leaving.unreadable:
        s = leaving.salvage or {}
        if "error" in s:
            cli.say(f"  rows      the live database cannot be read, and nothing can be salvaged from it ({s['error']})")
            return None
        cli.say(f"  rows      the live database cannot be read; read page by page it still holds {s.get('rows', 0)} "
                "row(s): they are salvaged into a held copy as it is replaced"
                + (f"; {s['bad_pages']} page(s) cannot be read: up to {s['lost_estimate']} row(s) past the copy's "
                   "newest cannot be saved" if s.get("bad_pages") else ""))
        return None
    text = ", ".join(f"{t} {n}" for t, n in sorted(leaving.rows.items()))
    cli.say("  rows      leaving the live database (by content): " + (
        f"{text} (kept in the pre-rollback copy; status then advises them back)" if text else
        "none (every live row is in the copy)")
            + (f"; {sum(leaving.changed.values())} row(s) updated since go back to the copy's version"
               if leaving.changed else ""))
    return leaving.view


def confirm(env, args):
    if args.yes:
        return
    if env.promote_from:
        cli.confirm_env(env.name, args.yes, "roll back")
    elif not sys.stdin.isatty():
        raise usage_error(f"rollback of {env.name} needs --yes when there is no terminal to ask")


def print_summary(config, env, repo, run):
    p, r = run.point, run.record
    cli.say(f"{cli.paint('rolled back', 'green')} {env.name} to {p.id}: {run.running[:12]} -> {p.commit[:12]} "
            f"({repo.subject(p.commit)}) in {run.clock.total:.1f}s")
    if r.release:
        cli.say(f"  release   {r.release}{' (rebuilt from its commit)' if r.rebuilt else ' (kept; no rebuild)'}")
    cli.say(f"  database  {'restored from ' + p.backup.path if r.db_restored else 'kept'} ({r.db_why})")
    if r.db_restored:
        for table, n in sorted(r.rows_lost.items()):
            cli.say(f"  rows      {table}: {n} row(s) written since the point are not in the restored database")
        if r.rows_lost:
            cli.say(f"            they are all in the pre-rollback copy {r.pre_rollback or r.salvaged}; to put them "
                    f"back: {cli.script_command(config, 'backup.py', env.name, '--restore-rows', r.pre_rollback or r.salvaged, '--yes')}")
        elif r.pre_rollback:
            cli.say("  rows      the restore took away no rows")
        if r.seal_problem:
            cli.say(f"  aside     the replaced database lies at {r.aside}: {r.seal_problem}")
    saved = r.pre_rollback or (f"none: the live database could not be read; its rows were salvaged into {r.salvaged}"
                               if r.salvaged else "none (no live database)")
    cli.say(f"  saved     pre-rollback backup {saved}")
    if r.tag:                   # a --db-only restore tags nothing: the code stays
        cli.say(f"  tagged    {r.tag} marks the commit it left")
    cli.say(f"  unit      {'the point' + chr(39) + 's unit file was restored (daemon-reload done)' if r.unit_restored else 'kept: ' + run.unit_why}")
    if r.stash:
        cli.say(f"  stashed   uncommitted changes in the work tree: git -C {env.path} stash show -p {r.stash}")
    cli.say(f"  health    {env.health_url}: {run.health.describe()}")
    if r.watch:
        cli.say(f"  watch     watched {r.watch:g}s: healthy throughout, same process, no restart")
    if r.probe:
        cli.say(f"  probe     {probe.describe(r.probe)}")
    cli.say("  steps     " + ", ".join(f"{k} {v:.2f}s" for k, v in r.steps.items()))


def drill(config, env, repo, args):
    """Prove a point without touching the env: its backup restored and checked in a private folder, its
    kept release (rebuilt only when retention removed it, and then it says so) started on that copy."""
    cli.log_operation([env], "drill")
    point = choose_point(config, env, repo, args)
    record = rehearsal.drill(config, env, repo, point)
    if not record.ok:
        raise DeployError(f"drill of {env.name} to {point.id}: " + "; ".join(record.problems))
    steps = ", ".join(f"{k} {v:.2f}s" for k, v in record.steps.items())
    release = (f"its kept release {record.release}" if not record.rebuilt else
               "its release, REBUILT from its commit (retention removed the kept one)")
    cli.say(f"rollback plan tested: {env.name} to {point.id} ({point.commit[:12]}); backup restored and verified in a "
            f"private folder, and {release} started on it on a scratch port (a transient unit; health "
            f"{record.health}, then watched {rehearsal.DRILL_WATCH:g}s); stopped ({steps}); nothing live was touched")
    return 0


if __name__ == "__main__":
    cli.run(main, nice=True, alert="rollback")
