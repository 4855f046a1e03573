#!/usr/bin/env python3
"""backup.py [ENV ... | --all]: consistent, verified online backups of live SQLite databases.

Each backup is taken under the env's lock (waiting a bounded time if a deploy
holds it), copied with SQLite's online backup API from a read-only connection,
integrity-checked, hashed, and written with a manifest (commit, reason, sha256,
schema) so that it is also a rollback point. Safe from cron: --quiet prints
nothing on success and one line per failure on stderr.
"""

import json
from pathlib import Path

from safedeploy import backups, cli, units
from safedeploy.errors import EXIT_FAILED, EXIT_LOCKED, DeployError, usage_error
from safedeploy.gitrepo import Repo
from safedeploy.state import EnvLock, deploy_log, human_age, age_seconds, running_commit

REASON_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-")


def main():
    args = parse_arguments()
    config = cli.load_config(args)
    envs = select_envs(config, args)
    if args.verify is not None:
        return verify(envs, args)
    if args.list:
        return show_list(envs, args.json)
    if args.prune:
        raise usage_error("backup.py --prune is not built yet; nothing was removed")
    return back_up_all(envs, args)


def parse_arguments():
    p = cli.parser("backup.py", "Back up env databases online, verified; list, verify and prune backups.",
                   ["python3 backup.py --all --quiet        # from cron, every night",
                    "python3 backup.py prod --reason manual", "python3 backup.py --list --json",
                    "python3 backup.py --verify", "python3 backup.py --verify backups/prod/prod-20261124-020000-nightly.sqlite3"])
    p.add_argument("envs", metavar="ENV", nargs="*", help="the envs to back up")
    p.add_argument("--all", action="store_true", help="every env in config.toml")
    p.add_argument("--list", action="store_true", help="list backups, newest first")
    p.add_argument("--json", action="store_true", help="with --list: print JSON")
    p.add_argument("--verify", nargs="?", const="", metavar="FILE",
                   help="re-hash and integrity-check FILE, or every backup of the envs")
    p.add_argument("--prune", action="store_true", help="apply [retention]")
    p.add_argument("--quiet", action="store_true", help="print nothing on success (for cron)")
    p.add_argument("--reason", default="", help="recorded in the manifest (default: nightly with --quiet, else manual)")
    p.add_argument("--lock-wait", type=float, default=300, metavar="SECONDS",
                   help="how long to wait for a running deploy of the env to finish (default 300)")
    args = p.parse_args()
    if args.reason and (set(args.reason) - REASON_CHARS or len(args.reason) > 40):
        raise usage_error(f"--reason {args.reason!r}: use lowercase letters, digits and '-' (it names the file)")
    return args


def select_envs(config, args):
    if args.all and args.envs:
        raise usage_error("name envs or give --all, not both")
    if args.envs:
        return [config.env(name) for name in args.envs]
    if args.all or args.list or args.verify is not None:
        return list(config.envs.values())
    raise usage_error("name the envs to back up, or give --all")


# -- taking backups -------------------------------------------------------------
def back_up_all(envs, args):
    reason = args.reason or ("nightly" if args.quiet else "manual")
    codes = []
    for env in envs:
        try:
            backup = back_up_env(env, reason, args.lock_wait)
        except DeployError as exc:
            cli.err(f"error: backup of {env.name} failed: {exc}")
            codes.append(exc.code)
            continue
        if not args.quiet:
            cli.say(f"backed up {env.name}: {backup.path} ({backup.bytes / 1e6:.1f} MB, "
                    f"sha256 {backup.sha256[:12]}, integrity ok, {backup.seconds:.2f}s)")
    if not codes:
        return 0
    return EXIT_LOCKED if EXIT_LOCKED in codes and len(set(codes)) == 1 else EXIT_FAILED


def back_up_env(env, reason, lock_wait):
    with EnvLock(env.state_dir, env.name, f"backup ({reason})", wait=lock_wait):
        return backups.backup_database(env.db, env.backup_dir, env.name, reason,
                                       commit=commit_running(env), unit_file=unit_file(env))


def commit_running(env):
    try:
        return running_commit(deploy_log(env).read()) or Repo(env.path).head()
    except DeployError:
        return ""


def unit_file(env):
    try:
        path = units.state(env.unit).fragment_path
    except DeployError:
        return None
    return path if path and Path(path).is_file() else None


# -- listing and verifying ----------------------------------------------------------
def show_list(envs, as_json):
    found = sorted((b for env in envs for b in backups.list_backups(env.backup_dir)),
                   key=lambda b: b.time or "", reverse=True)
    if as_json:
        keys = ("env", "path", "time", "bytes", "sha256", "reason", "commit", "schema")
        print(json.dumps({"backups": [{k: getattr(b, k) for k in keys} for b in found]}, indent=2))
        return 0
    if not found:
        cli.say("no backups yet")
    for b in found:
        cli.say(f"{b.time}  {b.env:<8} {b.reason:<12} {b.bytes / 1e6:9.1f} MB  {(b.commit or '?')[:12]}  "
                f"{human_age(age_seconds(b.time)):>8}  {b.path}")
    return 0


def verify(envs, args):
    if args.verify:
        targets = [find_backup(envs, args.verify)]
    else:
        targets = [b for env in envs for b in backups.list_backups(env.backup_dir)]
    bad = 0
    for b in targets:
        verdict = backups.verify_backup(b)
        if verdict != "ok":
            bad += 1
            cli.err(f"error: BAD backup {b.path}: {verdict}")
        elif not args.quiet:
            cli.say(f"{cli.mark(True)}  {b.path}")
    if not args.quiet:
        cli.say(f"{len(targets) - bad} of {len(targets)} backups good")
    return EXIT_FAILED if bad else 0


def find_backup(envs, name):
    wanted = Path(name.removesuffix(".json")).resolve()
    for env in envs:
        for b in backups.list_backups(env.backup_dir):
            if Path(b.path).resolve() == wanted:
                return b
    raise usage_error(f"--verify {name}: not a backup with a manifest in any env's backup folder")


if __name__ == "__main__":
    cli.run(main)
