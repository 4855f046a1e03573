"""Planning a deploy or a rollback: the facts gathered (git, the unit, the disk, the logs) and the
decisions taken on them (safedeploy.decisions), before anything is changed. Nothing here changes the
env; a deploy's plan fetches the remote first (refs only), unless told not to.
"""

import os
import re
import sqlite3
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import backups, dbfiles, decisions, records, releases, restore, units, verified_notes
from .commandline import script_command
from .config import Config
from .errors import DeployError, usage_error
from .files import same_disk
from .gitrepo import Repo
from .points import instant, list_points, next_best
from .marks import bad_mark, commit_mark
from .state import verified_log

REF_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._/@^~-]*$")   # checked before the lock: a bad ref touches nothing
STATE_ROOM = 1 << 20      # the deploy log, the journal and the lock need little, but they need it


@dataclass
class DeployPlan:
    """What a deploy decided before it changes anything: what runs, the target, the gates forced, the migration mode."""
    repo: Repo
    running: str            # what the env runs: its last deploy's commit, else HEAD
    head: str
    target: str
    target_subject: str
    target_tree: str
    unit_file: str
    fast_forward: bool
    converted: bool
    reason: str = ""
    forced: list[str] = field(default_factory=list)
    running_release: releases.Release | None = None     # releases: the release `current` points at
    dangling_current: bool = False      # releases: `current` names a folder that is gone
    edited: list[str] = field(default_factory=list)     # releases: files of the running release changed by hand
    reuse: releases.Release | None = None   # releases: a kept release of the target to switch to (no build)
    clears_bad: bool = False            # --force past a bad mark: a healthy deploy clears it
    rehearsed: records.RehearsalRecord | None = None        # the passed rehearsal of the target's tree, if any
    last_rehearsal: records.RehearsalRecord | None = None   # the newest rehearsal of the target's tree, passed or failed
    migration_mode: str = "online"      # online: the old release serves during pre_restart; stop-first
    migration_why: str = ""
    retry_after: int | None = None      # stop-first, a migration longer than clients wait: 503s with this Retry-After
    nothing_to_deploy: bool = False


def check_ref(ref):
    if ref is not None and (not REF_RE.match(ref) or ".." in ref):
        raise usage_error(f"--ref {ref!r}: no such commit, tag or branch can be named like that "
                          "(letters, digits and . _ / @ ^ ~ - only)")


def deploy_plan(config, env, ref=None, fetch=True, force=False, reason=""):
    """Everything a deploy decides before it changes anything; raises the first refusal (exit 1)."""
    repo, unit_state = preflight(env)
    if fetch and env.remote:
        repo.fetch(env.remote)
    head = repo.head()
    log = records.read(env)
    running = records.running_commit(log) or head
    target = resolve_target(repo, env, ref)
    current, dangling = releases.current(env), releases.dangling_current(env)
    plan = DeployPlan(repo=repo, running=running, head=head, target=target, target_subject=repo.subject(target),
                      target_tree=repo.tree_of(target), unit_file=unit_state.fragment_path,
                      fast_forward=repo.is_ancestor(head, target), converted=env.converted, reason=reason,
                      running_release=current, dangling_current=dangling)
    plan.edited = releases.differences(env, repo, current) if current else []
    plan.nothing_to_deploy = decisions.nothing_to_deploy(
        target, running, head, current.commit if current else None, not dangling and not plan.edited)
    if plan.nothing_to_deploy:
        return plan
    refuse_tracked_database(env, repo, [head, target])
    plan.rehearsed = records.passed_rehearsal(log, plan.target_tree)
    mark = bad_mark(config, env, plan.target_tree)
    facts = decisions.DeployFacts(
        env=env.name, branch=env.branch, target=target, subject=plan.target_subject, head=head,
        fast_forward=plan.fast_forward,
        target_is_older=repo.is_ancestor(target, head), bad_mark=mark,
        require_rehearsal=env.require_rehearsal, rehearsed=plan.rehearsed is not None,
        rehearse_command=script_command(config, "deploy.py", env.name, *(["--ref", ref] if ref else []),
                                            "--rehearse"))
    if env.promote_from:
        facts.promote_from = env.promote_from
        facts.verified_in_source, facts.promotion_hint = promotion_facts(config, env, plan.target_tree, repo, fetch)
    gates = decisions.deploy_gates(facts, force)
    if gates.refusal:
        raise DeployError(gates.refusal.why)
    plan.forced = gates.forced
    plan.clears_bad = bool(mark) and force
    plan.migration_mode, plan.migration_why = migration_mode(env, plan)
    if plan.migration_mode == "stop-first":
        if units.restart_method(env.unit) == "plain":
            raise DeployError(f"{env.name}'s migration needs the running release stopped first ({plan.migration_why}), "
                              f"and {env.unit} has no socket unit to hold requests meanwhile (they would be refused); "
                              "install one first: " + script_command(config, "deploy.py", env.name,
                                                                        "--install-units")
                              + "; or find out whether the running release can serve during the migration: "
                              + facts.rehearse_command)
        plan.retry_after, why = decisions.maintenance(plan.rehearsed.migration_seconds if plan.rehearsed else None)
        plan.migration_why += f"; {why}"
    if plan.converted:
        plan.reuse = releases.reusable(env, repo, target)
    return plan


class PromotingEnv(Protocol):
    """What a promotion reads of an env: config.Env (made by make_dataclass, so no class mypy can name)."""
    name: str
    promote_from: str       # the env it promotes from ("" for none)
    remote: str             # the git remote its verifications are shared through ("" for none)


def promotion_facts(config: Config, env: PromotingEnv, tree: str, repo: Repo | None = None,
                    fetch: bool = False) -> tuple[bool, str]:
    """(verified?, the hint when not): the tree was verified in promote_from on this host (its verified log),
    or on any host that shared it through the env's remote (verified_notes; fetched first unless fetch=False)."""
    source = config.envs.get(env.promote_from)
    here = verified_log(source.name, source.state_dir).read() if source else []
    if any(v.get("tree") == tree for v in here):
        return True, ""
    shared, problem = (verified_notes.lookup(repo, env.remote, env.promote_from, fetch) if repo and env.remote
                       else ([], ""))
    if any(v.tree == tree for v in shared):
        return True, ""
    return False, promotion_hint(config, env, here, shared, problem)


def promotion_hint(config: Config, env: PromotingEnv, here: list[dict[str, Any]], shared: list[verified_notes.Verification],
                   problem: str) -> str:
    name = env.promote_from
    last_here = here[-1] if here else None
    last_shared = shared[-1] if shared else None
    fetched = f"; the verifications shared through {env.remote} could not be fetched ({problem})" if problem else ""
    last: dict[str, Any] | None
    if last_shared and (not last_here or instant(last_shared.time) > instant(last_here.get("time"))):
        last = {"commit": last_shared.commit, "time": f"{last_shared.time} on {last_shared.host}"}
    else:
        last = last_here
    if last:
        return (f"{name} last verified {last['commit'][:12]} at {last['time']}{fetched}; to promote it: "
                + script_command(config, "deploy.py", env.name, "--ref", last["commit"]))
    if name in config.envs:
        return (f"nothing has been verified in {name} yet{fetched}: deploy it there and run "
                + script_command(config, "verify.py", name))
    where = f"{env.remote}'s notes ({verified_notes.NOTES_REF})" if env.remote else "this host"
    return (f"no verification in {name} is in {where}{fetched}: deploy it on a {name} host and verify it there "
            f"(python3 verify.py {name}); a healthy deploy or a passing verify pushes its verification")


def migration_mode(env: Any, plan: DeployPlan) -> tuple[str, str]:
    """(mode, why): how pre_restart meets the release that serves meanwhile (safedeploy.decisions.migration_mode:
    safe by default). Facts: the newest rehearsal of the target's tree, passed or failed, and the files that
    look like migrations among those changed since what runs."""
    newest = records.newest_rehearsal(records.read(env), plan.target_tree) if env.pre_restart else None
    plan.last_rehearsal = newest
    files: tuple[str, ...] = ()
    if env.pre_restart and env.migration_mode == "auto":
        words = tuple(w for argv in env.pre_restart for w in argv)
        try:
            files = tuple(p for p in plan.repo.changed_files(plan.running, plan.target)
                          if decisions.looks_like_migration(p, words))
        except DeployError as exc:          # not known: judged as if a migration changed
            files = (f"(the files changed since {plan.running[:12]} could not be listed: {exc})",)
    facts = decisions.MigrationFacts(has_pre_restart=bool(env.pre_restart), configured=env.migration_mode,
                                     rehearsal=rehearsal_facts(newest), migration_files=files)
    decision = decisions.migration_mode(facts)
    return decision.mode.value, decision.why


def rehearsal_facts(r: records.RehearsalRecord | None) -> decisions.RehearsalFacts | None:
    if r is None:
        return None
    return decisions.RehearsalFacts(time=r.time, passed=r.ok, failed_step=r.failed, error=r.error or "",
                                    compatible=r.compatible, incompatible=r.incompatible,
                                    breaking=tuple(r.schema_breaking), schema_changed=bool(r.schema_changes))


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
    state_free = dbfiles.free_bytes(env.state_dir)
    if state_free < STATE_ROOM:
        raise DeployError(f"not enough free disk in the state folder {env.state_dir} to record a deploy: "
                          f"{state_free >> 10} KiB free, {STATE_ROOM >> 10} KiB needed")
    if env.db.exists():
        need, free = dbfiles.needed_bytes(env.db), dbfiles.free_bytes(env.backup_dir)
        if free < need:
            raise DeployError(f"not enough free disk for a backup of {env.db} in {env.backup_dir}: "
                              f"{free / 2**20:.1f} MiB free, {need / 2**20:.1f} MiB needed")
    if env.converted:
        need, free = releases.room_needed(env), dbfiles.free_bytes(env.releases_root)
        if env.db.exists() and same_disk(env.releases_root, env.backup_dir):
            need += dbfiles.needed_bytes(env.db)        # the release and the backup share the disk
        if free < need:
            raise DeployError(f"not enough free disk in {env.releases_root} for a new release: "
                              f"{free / 2**20:.1f} MiB free, {need / 2**20:.1f} MiB needed (the running release's "
                              "own files, plus the backup when it shares the disk)")
    return repo, unit_state


def resolve_target(repo, env, ref):
    if ref:
        for candidate in [ref] + ([f"refs/remotes/{env.remote}/{ref}"] if env.remote else []):
            sha = repo.resolve(candidate)
            if sha:
                return sha
        raise usage_error(f"--ref {ref!r}: no such commit, tag or branch in {env.path}")
    # refs/remotes/...: a local tag or branch named like "origin/dev" must never stand in for the fetched branch
    name = f"refs/remotes/{env.remote}/{env.branch}" if env.remote else f"refs/heads/{env.branch}"
    sha = repo.resolve(name)
    if not sha:
        raise DeployError(f"{name} does not exist in {env.path}: push the branch, or fetch it")
    return sha


def refuse_tracked_database(env, repo, commits):
    """An env that runs from its work tree keeps its database in it: a commit that tracks the
    database file (or its -wal/-shm) would make git replace the live file under a live WAL, and
    one that untracks it would make git delete it. Refused before anything changes."""
    if env.converted:
        return          # the release links the shared folder: git never touches the live file
    rel = os.path.relpath(env.db_in_tree, env.path)
    if rel.startswith(".."):
        return
    names = [rel, f"{rel}-wal", f"{rel}-shm", f"{rel}-journal"]
    for commit in dict.fromkeys(commits):
        found = repo.tracked(commit, names)
        if found:
            raise DeployError(f"commit {commit[:12]} tracks the live database file {', '.join(found)}: moving the work "
                              f"tree to or from it would make git overwrite or delete {env.db}. Untrack it "
                              f"(git rm --cached {rel}; echo '/{rel}*' >> .gitignore; commit and push), or convert "
                              "the env to releases (deploy.py ENV --install-units); nothing was changed")


# -- a rollback's plan -----------------------------------------------------------------------------
def database_facts(env, point, compare):
    """What the database decision looks at; compare=False (an automatic rollback, where every second
    counts) skips comparing rows."""
    f = decisions.DatabaseFacts(point_id=point.id, has_backup=point.backup is not None,
                                backup_path=point.backup.path if point.backup else "", live_exists=env.db.exists())
    if not f.has_backup or not f.live_exists:
        return f
    f.live_check = dbfiles.integrity_of(env.db, quick=True)
    if f.live_check != "ok":
        return f
    f.live_schema, f.point_schema = dbfiles.live_schema(env.db), point.backup.schema
    if compare and f.live_schema == f.point_schema:
        f.compared = True
        try:
            f.rows_lacking = restore.rows_only_in(point.backup.path, env.db)
            f.rows_newer = restore.rows_only_in(env.db, point.backup.path) if f.rows_lacking else {}
        except sqlite3.Error as exc:
            f.compare_error = str(exc)
    return f


def decide_database(env, point, mode, compare=True):
    """(restore?, why). Only "auto" looks at the live database (--with-db and --code-only decide by the flag:
    the plan's row warning, rowloss.leaving, then counts what a restore takes out)."""
    try:
        if mode != "auto":
            return decisions.database_decision(mode, decisions.DatabaseFacts(
                point_id=point.id, has_backup=point.backup is not None,
                backup_path=point.backup.path if point.backup else "", live_exists=env.db.exists()))
        return decisions.database_decision(mode, database_facts(env, point, compare))
    except ValueError as exc:
        raise DeployError(str(exc)) from None


def point_mark(config, env, repo, point):
    """The bad mark of the release a point goes back to (a rollback of its tree, in any env), or None."""
    return commit_mark(config, env, repo, point.commit)


def point_marks(config, env, repo, points) -> dict:
    """{commit: its bad mark or None} for the points' commits, each looked up once."""
    marks: dict = {}
    for p in points:
        if p.commit not in marks:
            marks[p.commit] = point_mark(config, env, repo, p)
    return marks


def safe_points(config, env, repo, points, running):
    """The points a printed rollback line may name, newest first: never the commit that runs, a release
    that was rolled back (in any env), nor a pre-rollback copy (it holds the state a rollback left)."""
    candidates = [p for p in points if p.commit != running and not (p.backup and p.backup.reason == "pre-rollback")]
    marks = point_marks(config, env, repo, candidates)
    return [p for p in candidates if not marks[p.commit]]


def check_point_backup(env, repo, point):
    """Refuse a backup that fails its checksum (the integrity_check it passed when its sha256 was recorded is
    not run again: restore.trusted_hash), naming the next-best point."""
    verdict = backups.verify_backup(point.backup, trust_hash=True)
    if verdict == "ok":
        return
    better = next_best(list_points(env, repo), point)
    hint = f"; the next-best point is {better.id} (--to {better.id})" if better else "; no older point has a good backup"
    raise DeployError(f"point {point.id}'s backup is bad ({verdict}): nothing was changed{hint}")


def choose_point(env, points, wanted):
    point, why = decisions.choose_point(points, wanted, getattr(records.last_ok_deploy(records.read(env)), "tag", None))
    if point is None:
        raise usage_error(why if wanted else f"{env.name} has {why}")
    return point
