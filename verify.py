#!/usr/bin/env python3
"""verify.py ENV: the checklist that says an env is good, with an exit code scripts can trust.

Checks, in order: the unit is active and not restart-looping; HTTP health on the
port; HTTPS on the domain with a valid certificate (when a domain is set); the
work tree at the last deployed commit, clean, on its branch; PRAGMA quick_check
of the database; the newest backup present, younger than a day and matching its
checksum; a before-deploy tag to roll back to. Exit 0 only when all pass; then
the commit's tree is recorded as verified in this env (the promotion gate reads it).
"""

import json
from dataclasses import asdict, dataclass

from safedeploy import backups, cli, clock, dbfiles, health, releases, replica, replica_copy, unitfiles, units, verified_notes
from safedeploy.errors import DeployError
from safedeploy.gitrepo import Repo
from safedeploy import records
from safedeploy.state import age_seconds, human_age, verified_log

MAX_BACKUP_AGE = 24 * 3600
INFORMATIONAL = ("rollback drill", "restart")    # shown, never failing the checklist


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def main():
    args = parse_arguments()
    config = cli.load_config(args)
    env = config.env(args.env)
    checks = run_checks(config, env)
    ok = all(c.ok for c in checks)
    shared = record_verified(env) if ok else ""
    show(env, checks, ok, args.json)
    if shared.startswith("warning:"):
        cli.err(shared)
    elif shared and not args.json:
        cli.say(shared)
    if not ok:          # one line that names them: the verify-failed alert carries it
        failed = [c for c in checks if not c.ok]
        raise DeployError(f"{env.name} NOT verified: {len(failed)} check(s) failed: "
                          + "; ".join(f"{c.name} ({c.detail})" for c in failed))
    return 0


def parse_arguments():
    p = cli.parser("verify.py", "Check that an env is healthy; exit 0 only when every check passes.",
                   ["python3 verify.py dev", "python3 verify.py prod --json"])
    p.add_argument("env", metavar="ENV", help="the env to check, as named in config.toml")
    p.add_argument("--json", action="store_true", help="print the checklist as JSON")
    return p.parse_args()


def run_checks(config, env):
    replicated = [("replica", check_replica)] if replica.replicated(config, env) else []
    return [guarded(name, fn, config, env) for name, fn in (
        ("unit", check_unit), ("health", check_health), ("domain", check_domain),
        ("commit", check_commit), ("release", check_release), ("database", check_database), ("backup", check_backup),
        ("rollback point", check_rollback_point), *replicated, ("rollback drill", check_drill),
        ("restart", check_restart))]


def guarded(name, fn, config, env):
    """A check that cannot run fails with the reason; it never stops the checklist."""
    try:
        ok, detail = fn(config, env)
    except DeployError as exc:
        ok, detail = False, str(exc)
    return Check(name, ok, detail)


def check_unit(config, env):
    if not units.state(env.unit).known:
        return False, f"{env.unit} is not known to the user manager ({units.state(env.unit).load})"
    st = units.serving_state(env.unit)          # with a handover slot, the one that serves
    detail = f"{st.name} is {st.active} ({st.sub}), {st.restarts} automatic restarts"
    if not st.is_active:
        return False, detail
    if units.is_restart_looping(st):
        return False, detail + f", up only {st.uptime or 0:.0f}s: restart-looping"
    return True, detail + (f", up {human_age(st.uptime).removesuffix(' ago')}" if st.uptime is not None else "")


def check_health(config, env):
    result = health.check(env.health_url, timeout=5)
    return result.ok, f"{env.health_url}: {result.describe()}"


def check_replica(config, env):
    """The continuous copies: the replicator runs and keeps up, and the replica's newest moment restores (to a
    private temp folder, bounded) into a sound database with the live schema and rows."""
    state = replica.look(config, env, lambda script, *a: cli.script_command(config, script, *a))
    if state is None or not state.ok:
        return False, state.problem if state else "not replicated"
    return replica_copy.check_newest(config, env)


def check_domain(config, env):
    if not env.domain:
        return True, "no domain set for this env: skipped"
    result = health.check(env.domain_url, timeout=10, verify=True)
    return result.ok, f"{env.domain_url}: {result.describe()}"


def check_commit(config, env):
    repo = Repo(env.path)
    head, branch, dirty = repo.head(), repo.current_branch(), repo.dirty_files()
    problems = []
    if branch != env.branch:
        problems.append(f"on {branch or 'a detached HEAD'}, not {env.branch}")
    if dirty:
        problems.append(f"{len(dirty)} tracked files changed")
    deployed = records.running_commit(records.read(env))
    if deployed and deployed != head:
        problems.append(f"HEAD {head[:12]} is not the last deployed commit {deployed[:12]}")
    where = f"{head[:12]} ({repo.subject(head)}) on {branch}"
    if problems:
        return False, f"{where}: " + "; ".join(problems)
    return True, where + ("" if deployed else ", no deploy recorded yet")


def check_release(config, env):
    """The running release's files are its commit's (as status checks): a file edited by hand in a release
    runs code no commit holds, and a verify of it would let it be promoted."""
    if not env.converted:
        return True, "runs from its work tree (see commit)"
    current = releases.current(env)
    if current is None:
        return False, f"{env.current_link} names a release folder that is gone"
    changed = releases.differences(env, Repo(env.path), current)
    if changed:
        return False, f"{current.path} differs from {current.commit[:12]}: {', '.join(changed[:5])}"
    return True, f"{current.id}: every tracked file is its commit's"


def check_database(config, env):
    verdict = dbfiles.integrity_of(env.db, quick=True)
    return verdict == "ok", f"{env.db}: quick_check {verdict}"


def check_backup(config, env):
    found = backups.list_backups(env.backup_dir)
    if not found:
        return False, f"no backup in {env.backup_dir}: run {cli.script_command(config, 'backup.py', env.name)}"
    present, future = clock.split(found)        # a copy dated in the future is not the newest: its age is unknown
    also = f"; note: {clock.future_note(future)}" if future else ""
    if not present:
        return False, (f"{clock.future_note(future)}; make a copy dated now: "
                       f"{cli.script_command(config, 'backup.py', env.name)}")
    newest = present[0]
    age = age_seconds(newest.time)
    verdict = backups.verify_backup(newest)
    if verdict != "ok":
        return False, f"newest backup {newest.path}: {verdict}{also}"
    if age is None or age > MAX_BACKUP_AGE:
        return False, (f"newest backup {newest.path} is {human_age(age)}, older than a day: "
                       f"{cli.script_command(config, 'backup.py', env.name)}{also}")
    return True, f"{newest.path} ({newest.reason}, {human_age(age)}, checksum and integrity ok){also}"


def check_rollback_point(config, env):
    tags = Repo(env.path).tags(f"{env.name}-before-deploy-*")
    if not tags:
        return False, f"no {env.name}-before-deploy-* tag yet (the first deploy makes one)"
    name, commit, _ = tags[0]
    return True, f"{name} -> {commit[:12]}"


def check_drill(config, env):
    """Shows the age of the last rollback drill; informational, it never fails the checklist."""
    drills = records.of_kind(records.read(env), "drill")
    if not drills:
        return True, f"never drilled: rehearse with {cli.script_command(config, 'rollback.py', env.name, '--drill')}"
    last = drills[-1]
    return True, f"last drill {human_age(age_seconds(last.time))} to {last.point}: {last.result}"


def check_restart(config, env):
    """Warns when a restart will drop requests; informational, it never fails the checklist."""
    method = units.restart_method(env.unit)
    if method in unitfiles.METHOD_NOTES:
        return True, unitfiles.METHOD_NOTES[method].format(helper=unitfiles.helper_name(env.unit), unit=env.unit,
                                                       socket=unitfiles.socket_name(env.unit),
                                                       command=cli.script_command(config, "deploy.py", env.name,
                                                                                  "--install-units", "--notify"))
    return True, "WARNING: " + unitfiles.DROPS_WARNING.format(command=cli.script_command(config, "deploy.py", env.name, "--install-units"))


def record_verified(env) -> str:
    """Record the verified tree here; then share it through the remote (verified_notes). Returns that line."""
    repo = Repo(env.path)
    head = repo.head()
    v = verified_notes.verification(env.name, head, repo.tree_of(head), "verify")
    verified_log(env.name, env.state_dir).append({"time": v.time, "commit": v.commit, "tree": v.tree, "by": v.by})
    return verified_notes.share_line(repo, env.remote, v)


def label(check):
    """PASS only beside what passed; an informational check that warns says WARN, one that only
    informs (never drilled, how restarts work) says INFO."""
    if not check.ok:
        return cli.mark(False)
    if check.detail.startswith("WARNING"):
        return cli.paint("WARN", "yellow")
    if check.name in INFORMATIONAL:
        return cli.paint("INFO", "dim")
    return cli.mark(True)


def show(env, checks, ok, as_json):
    if as_json:
        cli.say(json.dumps({"env": env.name, "ok": ok, "checks": [asdict(c) for c in checks]}, indent=2))
        return
    for c in checks:
        cli.say(f"{label(c)}  {c.name:<15} {c.detail}")
    if ok:
        cli.say(cli.paint(f"{env.name} verified", "green"))


if __name__ == "__main__":
    cli.run(main, alert="verify")
