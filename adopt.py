#!/usr/bin/env python3
"""adopt.py: the seed's migration plan as a command, from a host as it runs today to a host on the tool.

  --discover [--write [FILE]] propose config.toml from the running user units (reads no config); --write
                              writes it to your own ~/.config/safe-deploy/config.toml, or to FILE
  ENV [--yes] [--dry-run] [--move-secrets]
                              phase 1 for every env the first time (tags pushed, verified backups,
                              unit files saved, adoption.json), then ENV onto its branch and the
                              tool (releases, socket units), checked healthy; put back if not
  --checklist                 the seed's checklist before prod; exit 0 only when every line holds

An env with promote_from (prod) is adopted only after its source (dev) was, has a passing verify
of a deploy made with the tool, and the checklist passes. No other env is touched.
"""

import os
import sys
from pathlib import Path

from safedeploy import adoption, cli, discovery, replica
from safedeploy.config import own_config_file
from safedeploy.errors import EXIT_FAILED, EXIT_LOCKED, DeployError, usage_error
from safedeploy.files import make_private_dir, write_new
from safedeploy.state import EnvLock, lock_holder, now_iso


def main():
    args = parse_arguments()
    if args.discover:
        return discover(args)
    config = cli.load_config(args)
    if args.checklist:
        return show_checklist(config)
    env = config.env(args.env)
    doc = adoption.read_doc(config)
    if env.name in doc["envs"] and doc["envs"][env.name].get("adopted"):
        cli.say(f"{env.name} is adopted already ({doc['envs'][env.name]['adopted']['time']}): "
                f"deploy it with {cli.script_command(config, 'deploy.py', env.name)}")
        return 0
    check_promotion(config, env, doc)
    first_time = adoption.needs_phase_one(config, doc)
    if args.dry_run:
        cli.only_looking()
        return dry_run(config, env, first_time, args.move_secrets)
    with EnvLock(env.state_dir, env.name, "adopt"):
        cli.log_operation([env], "adoption")
        phase_one = show_phase_one(config, first_time)
        plan = adoption.env_plan(env, cli.say, cli.err, args.move_secrets)
        confirm(env, args)
        if phase_one:
            cli.say("phase 1: back up everything")
            doc = adoption.phase_one(config, phase_one, doc, cli.say, held=env.name)
            cli.say(f"phase 1 done: recorded in {adoption.doc_path(config)}")
        adoption.adopt(config, plan, doc, cli.output())
    print_next(config, env)
    return 0


def parse_arguments():
    p = cli.parser("adopt.py", "Move a host as it runs today onto the tool, dev first (the seed's migration plan).",
                   ["python3 adopt.py --discover                         # show the config proposed from the running units",
                    "python3 adopt.py --discover --write                 # write it to ~/.config/safe-deploy/config.toml",
                    "python3 adopt.py dev --dry-run                      # what adopting dev would do",
                    "python3 adopt.py dev                                # phase 1, then dev onto branch dev and the tool",
                    "python3 adopt.py --checklist                        # the seed's checklist before prod",
                    "python3 adopt.py prod --yes"])
    p.add_argument("env", metavar="ENV", nargs="?", help="the env to adopt, as named in config.toml")
    p.add_argument("--discover", action="store_true", help="propose config.toml from the running user units")
    p.add_argument("--write", metavar="FILE", nargs="?", const="",
                   help="with --discover: write the proposal to your own config, $XDG_CONFIG_HOME/safe-deploy/config.toml "
                        "(~/.config/...; folder 0700, file 0600), or to FILE; never overwrites")
    p.add_argument("--checklist", action="store_true", help="print the seed's checklist; exit 0 only when all hold")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation (needed without a terminal)")
    p.add_argument("--dry-run", action="store_true", help="print what it would do; change nothing")
    p.add_argument("--move-secrets", action="store_true",
                   help="move the secret values of the unit's Environment= into a 0600 file outside the work tree, "
                        "named by EnvironmentFile= (the plan says which)")
    args = p.parse_args()
    modes = [m for m, on in (("--discover", args.discover), ("--checklist", args.checklist), ("ENV", args.env)) if on]
    if len(modes) > 1:
        raise usage_error(f"{' and '.join(modes)} cannot go together: run them one at a time")
    if not modes:
        raise usage_error("name the env to adopt, or give --discover or --checklist (see --help)")
    if args.write is not None and not args.discover:
        raise usage_error("--write goes with --discover")
    if (args.yes or args.dry_run or args.move_secrets) and not args.env:
        raise usage_error("--yes, --dry-run and --move-secrets go with an env to adopt")
    if args.discover and args.config:
        raise usage_error("--discover reads no config: it proposes one (use --write, or --write FILE)")
    return args


# -- discover --------------------------------------------------------------------------------------
def discover(args):
    target = write_target(args.write)
    if target is not None and (target.exists() or target.is_symlink()):
        raise usage_error(f"--write {target}: the file exists; adopt.py never overwrites a config "
                          "(write to a new name with --write FILE and compare)")
    proposal = discovery.discover()
    text = discovery.render(proposal, now_iso(), *([data_folders()] if args.write == "" else []))
    if target is None:
        sys.stdout.write(text)
        return 0
    if args.write == "":
        make_own_folder(target.parent)
    try:
        write_new(target, text, mode=0o600)
    except FileExistsError:
        raise usage_error(f"--write {target}: the file appeared while the proposal was made; adopt.py never "
                          "overwrites a config (nothing was written)") from None
    first = discovery.first_to_adopt(proposal)
    cli.say(f"wrote {target}: read it, fix what it marks GUESS, UNSURE or NOT FOUND, then see what adopting "
            f"{first} would do: {cli.command_line('adopt.py', first, '--dry-run', config_file=target.absolute())}")
    unsure = [line.strip() for line in text.splitlines()[discovery.HEADER_LINES:]
              if any(mark in line for mark in discovery.MARKS)]
    for line in unsure:
        cli.err(f"check: {line}")
    return 0


def data_folders() -> tuple[str, str]:
    """backup_dir and state_dir for the operator's own config: the user's data and state folders
    ($XDG_DATA_HOME, $XDG_STATE_HOME), never beside the config in ~/.config (relative paths follow the file)."""
    home = Path.home()
    data = Path(os.environ.get("XDG_DATA_HOME") or home / ".local" / "share") / "safe-deploy" / "backups"
    state = Path(os.environ.get("XDG_STATE_HOME") or home / ".local" / "state") / "safe-deploy"
    return str(data), str(state)


def write_target(value):
    """Where --write writes: None (stdout), FILE, or the operator's own config ("" = --write alone)."""
    if value is None:
        return None
    if value:
        return Path(value)
    own = own_config_file()
    if own is None:
        raise usage_error("--write: no home folder to find ~/.config in: give --write FILE")
    return own


def make_own_folder(folder):
    """$XDG_CONFIG_HOME (~/.config) and its safe-deploy folder, each made 0700 when missing."""
    if not folder.parent.is_dir():
        folder.parent.mkdir(mode=0o700, parents=True)
        folder.parent.chmod(0o700)
    make_private_dir(folder)


# -- the checklist and the promotion gate ------------------------------------------------------------
def show_checklist(config):
    items = adoption.checklist(config, adoption.read_doc(config))
    cli.say("the checklist before prod (each line checked now):")
    for item in items:
        cli.say(f"  {cli.mark(item.ok)} {item.text}: {item.detail}")
    ok = all(item.ok for item in items)
    cli.say(cli.paint("all hold: prod may be adopted", "green") if ok else
            cli.paint(f"{sum(not i.ok for i in items)} line(s) do not hold", "red"))
    return 0 if ok else EXIT_FAILED


def check_promotion(config, env, doc):
    """An env others promote from comes first; an env with promote_from waits for the checklist."""
    if not env.promote_from:
        return
    source = env.promote_from
    if not (doc["envs"].get(source) or {}).get("adopted"):
        raise DeployError(f"{env.name} is adopted after {source}, which is not adopted yet: run "
                          f"{cli.script_command(config, 'adopt.py', source)} first (nothing was changed)")
    failing = [i for i in adoption.checklist(config, doc, [source]) if not i.ok]
    if failing:
        raise DeployError(f"{env.name} is adopted once the checklist holds; not yet: "
                          + "; ".join(f"{i.text} ({i.detail})" for i in failing)
                          + f". See: {cli.script_command(config, 'adopt.py', '--checklist')} (nothing was changed)")


# -- the runbook's steps ---------------------------------------------------------------------------
def show_phase_one(config, envs):
    if not envs:
        return None
    plan = adoption.phase_one_plan(config, envs)
    cli.say(f"phase 1 (first time): back up everything, for {', '.join(f.env.name for f in plan.facts)}:")
    for f in plan.facts:
        env = f.env
        cli.say(f"  - {env.name}: tag {f.commit[:12]} (what runs, on {f.branch or 'a detached HEAD'}) as {f.tag}"
                + (f" and push it to {env.remote}" if env.remote else " (no remote: kept here)"))
        cli.say(f"  - {env.name}: back up {env.db} (online, verified) with {Path(f.unit_file).name}"
                if env.db.exists() else f"  - {env.name}: no database at {env.db}; save {Path(f.unit_file).name}")
    cli.say(f"  - record commit, branch, unit, port and the backup's sha256 per env in {adoption.doc_path(config)}")
    return plan


def dry_run(config, env, first_time, move_secrets=False):
    holder = lock_holder(env.state_dir, env.name)
    if holder:
        raise DeployError(f"env {env.name} is locked: {holder}", EXIT_LOCKED)
    show_phase_one(config, first_time)
    adoption.env_plan(env, cli.say, cli.err, move_secrets)
    cli.say("dry run: nothing was changed")
    return 0


def confirm(env, args):
    if args.yes:
        return
    if not sys.stdin.isatty():
        raise usage_error(f"adopting {env.name} pushes tags and a branch, changes its unit files and restarts it: "
                          "add --yes")
    cli.confirm_env(env.name, False, "adopt (tags, backups, branch, releases, restart)")


def print_next(config, env):
    cli.say(f"adopted: {env.name} runs from {env.current_link} on branch {env.branch}; other envs were not touched")
    if any(e.promote_from == env.name for e in config.envs.values()):
        cli.say(f"next: push a commit to {env.branch}, then {cli.script_command(config, 'deploy.py', env.name)} and "
                f"{cli.script_command(config, 'verify.py', env.name)}; then "
                f"{cli.script_command(config, 'adopt.py', '--checklist')}")
    else:
        cli.say(f"next: {cli.script_command(config, 'status.py')}")
    offer = replica.offer(config)
    if offer:
        cli.say(f"{offer}: {cli.script_command(config, 'backup.py', '--install-replica')}")


if __name__ == "__main__":
    cli.run(main, nice=True, alert="adopt")
