"""The seed's migration plan as code (adopt.py): a host as it runs today onto the tool, dev first.

Phase 1, once for every env in the config (before the first env is adopted): back up everything.
Each env's running commit is tagged (`production-stable-YYYYMMDD` for the env that others promote
into, `<env>-stable-YYYYMMDD` for the rest) and the tags pushed; each database is backed up
online and verified, with its unit file beside it; and a state document, adoption.json in the
state folder, records per env the commit, branch, unit, port, the backup and its sha256. The
order makes "nothing half-done" cheap: every check that needs the network or the disk comes
first, the backups next (copies only), the tags after them, and the document last; a failure
anywhere removes what this run made, so a rerun starts clean. A live database's own checksum
changes with every write, so the one recorded is the verified backup's.

Phase 2, for one env: its branch is created on the remote from the commit it runs (if missing),
its tree switched onto it (the same commit: no file changes), and the env converted with
convert.py (releases and socket units), then checked healthy. A failure puts back the conversion
(convert.py does), then the tree's branch, then the branch it created on the remote. No other env
is touched: not restarted, not moved.

An env with promote_from is adopted only after its source env was, and the checklist passes:
the seed's own list (backups created and verified, tags on the remote, the dev branch on the
remote, a deploy of dev made with the tool and a passing verify of it, dev stable since). Every
line is checked from the state, never assumed.
"""

import contextlib
import json
import socket
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from . import backups, convert, dbfiles, health, records, runbook, units
from .commandline import script_command
from .errors import DeployError, after_undo, describe_failure
from .files import make_private_dir, write_atomic
from .gitrepo import NETWORK_TIMEOUT, Repo
from .marks import commit_mark
from .output import Output
from .state import EnvLock, inject_fault, now_iso, parse_time, utc_stamp, verified_log

DOC_VERSION = 1
BACKUP_WAIT = 300
STABLE_SLACK = 2.0      # seconds between the wall clock and the monotonic one when comparing times


# -- the state document --------------------------------------------------------------------------
def doc_path(config):
    """adoption.json in the state folder (of the first env, where envs name different ones)."""
    return next(iter(config.envs.values())).state_dir / "adoption.json"


def read_doc(config):
    path = doc_path(config)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return {"v": DOC_VERSION, "envs": {}}
    except (OSError, ValueError) as exc:
        raise DeployError(f"cannot read {path}: {exc}; it records the host as it was before adoption: "
                          "restore it from a copy rather than delete it") from None
    doc.setdefault("envs", {})
    return doc


def write_doc(config, doc):
    path = doc_path(config)
    make_private_dir(path.parent)
    write_atomic(path, json.dumps(doc, indent=2, sort_keys=True) + "\n")


def needs_phase_one(config, doc):
    return [env for env in config.envs.values() if env.name not in doc["envs"]]


def production_envs(config):
    """The envs the seed calls production: those others promote into, else one named prod."""
    promoted = [e.name for e in config.envs.values() if e.promote_from]
    return set(promoted) or ({"prod"} & set(config.envs))


def tag_base(config, env, day):
    return f"production-stable-{day}" if env.name in production_envs(config) else f"{env.name}-stable-{day}"


# -- Phase 1: back up everything -----------------------------------------------------------------
@dataclass
class EnvFacts:
    """One env as Phase 1 found it: its tree, commit, branch and unit file, and the tag and backup made for it."""
    env: object
    repo: Repo
    commit: str
    branch: str | None
    unit_file: str
    tag: str = ""
    backup: object = None
    unit_copy: Path | None = None


@dataclass
class PhaseOne:
    """Phase 1's plan: every env's facts, and the tags each remote already has."""
    facts: list
    remote_tags: dict = field(default_factory=dict)      # remote -> {tag name: sha}


def phase_one_plan(config, envs):
    """Everything Phase 1 needs, checked before anything is made: each tree, unit and database,
    and each remote reachable (its tags read, so a tag name is free there too)."""
    day = datetime.now(timezone.utc).strftime("%Y%m%d")
    plan = PhaseOne(facts=[])
    for env in envs:
        repo = Repo(env.path)
        st = units.require_known(env.unit)
        if env.db.exists():
            dbfiles.check_is_sqlite(env.db)
        facts = EnvFacts(env=env, repo=repo, commit=repo.head(), branch=repo.current_branch(),
                         unit_file=st.fragment_path)
        if env.remote and env.remote not in plan.remote_tags:
            plan.remote_tags[env.remote] = remote_refs(repo, env.remote, "--tags")
        taken = set(plan.remote_tags.get(env.remote, {})) | {f.tag for f in plan.facts}
        base, n, name = tag_base(config, env, day), 1, tag_base(config, env, day)
        while name in taken or repo.resolve(f"refs/tags/{name}"):
            n += 1
            name = f"{base}-{n}"
        facts.tag = name
        plan.facts.append(facts)
    return plan


def remote_refs(repo, remote, kind):
    """{short name: sha} of the remote's tags or heads; DeployError naming the remote if it cannot be read."""
    status, out, err = repo.run("ls-remote", kind, remote, timeout=NETWORK_TIMEOUT, check=False)
    if status != 0:
        why = (err or out or f"exit {status}").strip().splitlines()
        raise DeployError(f"cannot reach the remote {remote!r} from {repo.path}: {why[-1] if why else status}")
    refs = {}
    for line in out.splitlines():
        sha, _, ref = line.partition("\t")
        name = ref.split("/", 2)[-1]
        if name.endswith("^{}"):
            refs[name[:-3]] = sha           # an annotated tag: the commit it names
        else:
            refs.setdefault(name, sha)
    return refs


def phase_one(config, plan, doc, say, held=""):
    """Back up every env, tag and push, then record; on any failure remove what this run made.
    held: the env whose lock the caller holds already."""
    made_tags, pushed = [], []
    stamp = utc_stamp()
    with contextlib.ExitStack() as locks:
        for f in (f for f in plan.facts if f.env.name != held):
            locks.enter_context(EnvLock(f.env.state_dir, f.env.name, "adopt (phase 1)", backup_wait=BACKUP_WAIT,
                                        on_wait=say))
        try:
            for f in plan.facts:
                back_up(f, stamp, say)
            inject_fault("adopt", "tag")
            for f in plan.facts:
                f.tag = f.repo.create_tag(f.tag, f.commit, f"{f.env.name} ran {f.commit} before adoption "
                                                           f"({f.branch or 'detached'})")
                made_tags.append(f)
            for f in plan.facts:
                if f.env.remote:
                    f.repo.push_tag(f.env.remote, f.tag)
                    pushed.append(f)
                    say(f"  tagged {f.commit[:12]} ({f.env.name}) as {f.tag} and pushed it to {f.env.remote}")
                else:
                    say(f"  tagged {f.commit[:12]} ({f.env.name}) as {f.tag} (no remote: kept here only)")
            for f in plan.facts:
                doc["envs"][f.env.name] = phase_one_record(f)
            doc.setdefault("phase1", {"time": now_iso(), "host": socket.gethostname()})
            write_doc(config, doc)
        except BaseException as exc:    # a bug too: what it made is removed, then its traceback shows
            undo_phase_one(plan, made_tags, pushed)
            raise after_undo(exc, f"phase 1 (back up everything) failed: {describe_failure(exc)}; what it had made "
                                  "is removed (backups, unit copies, tags), nothing else was changed: run it again") from None
    return doc


def back_up(f, stamp, say):
    env = f.env
    if env.db.exists():
        f.backup = backups.backup_database(env.db, env.backup_dir, env.name, "adopt", f.commit, unit_file=f.unit_file)
        problem = backups.verify_backup(f.backup)
        if problem != "ok":
            raise DeployError(f"the backup of {env.name} does not verify: {problem}")
        say(f"  backed up {env.db} to {f.backup.path} (sha256 {f.backup.sha256[:12]}, re-read: integrity ok) "
            f"with {Path(f.unit_file).name}")
    else:
        make_private_dir(env.backup_dir)
        f.unit_copy = env.backup_dir / f"{env.name}-{stamp}-adopt.unit"
        write_atomic(f.unit_copy, Path(f.unit_file).read_bytes())
        say(f"  {env.name} has no database at {env.db}: saved {Path(f.unit_file).name} to {f.unit_copy}")


def undo_phase_one(plan, made_tags, pushed):
    for f in pushed:
        f.repo.run("push", "--quiet", f.env.remote, f":refs/tags/{f.tag}", timeout=NETWORK_TIMEOUT, check=False)
    for f in made_tags:
        f.repo.run("tag", "--delete", f.tag, check=False)
    for f in plan.facts:
        if f.backup is not None:
            backups.remove_backup(f.backup)
        if f.unit_copy is not None:
            f.unit_copy.unlink(missing_ok=True)


def phase_one_record(f):
    env = f.env
    return {"time": now_iso(), "path": str(env.path), "commit": f.commit, "branch": f.branch, "unit": env.unit,
            "unit_file": f.unit_file, "unit_copy": str(f.backup.unit_backup if f.backup else f.unit_copy),
            "port": env.port, "db": str(env.db), "tag": f.tag, "remote": env.remote,
            "backup": f.backup.path if f.backup else None, "db_sha256": f.backup.sha256 if f.backup else None,
            "adopted": None}


# -- Phase 2: one env onto its branch and the tool -----------------------------------------------
@dataclass
class EnvPlan:
    """Phase 2 for one env: the commit it runs, where its branch is locally and on the remote, its conversion."""
    env: object
    repo: Repo
    commit: str
    branch_before: str | None
    remote_branch: str | None        # sha of env.branch on the remote, None when it must be created
    local_branch: str | None         # sha of the local branch, None when it must be created
    conversion: object = None
    created_remote: bool = False
    created_local: bool = False
    switched: bool = False


def env_plan(env, say, warn, move_secrets=False):
    """What adopting env does; refuses, before any change, what it cannot do safely. move_secrets: the
    service's secret Environment= values go into a 0600 EnvironmentFile= (see convert.offer_secrets)."""
    repo = Repo(env.path)
    convert.refuse_dirty(env, repo, "adopt")
    commit, branch_before = repo.head(), repo.current_branch()
    switching = branch_before != env.branch     # the remote is read only when the tree changes branch
    remote = remote_refs(repo, env.remote, "--heads").get(env.branch) if env.remote and switching else None
    local = repo.resolve(f"refs/heads/{env.branch}")
    plan = EnvPlan(env=env, repo=repo, commit=commit, branch_before=branch_before, remote_branch=remote,
                   local_branch=local)
    if plan.branch_before != env.branch and local and local != commit:
        raise DeployError(f"cannot adopt {env.name}: the branch {env.branch} exists in {env.path} at {local[:12]}, "
                          f"but {env.name} runs {commit[:12]}; switching would change what runs. Deploy it with "
                          f"the tool after adoption, or delete or rename that local branch (nothing was changed)")
    say(f"adopt {env.name} ({env.unit}, runs {commit[:12]} on {plan.branch_before or 'a detached HEAD'}):")
    if plan.branch_before == env.branch:
        say(f"  - branch: {env.path} is on {env.branch} already")
    else:
        if env.remote and remote is None:
            say(f"  - create {env.branch} on {env.remote} from {commit[:12]}: git push {env.remote} "
                f"{commit[:12]}:refs/heads/{env.branch}")
        elif env.remote:
            moves = "" if remote == commit else f"; the next deploy.py {env.name} moves it to {remote[:12]}"
            say(f"  - {env.branch} exists on {env.remote} at {remote[:12]}{moves}")
        say(f"  - switch {env.path} onto {env.branch} at {commit[:12]} (the commit it runs: no file changes)")
    plan.conversion = convert.plan(env, repo, False, say, warn, move_secrets=move_secrets)
    return plan


def adopt(config, plan, doc, out: Output):
    """Carry out env_plan's plan (what it says goes to out); on failure put everything back and raise (exit 1),
    or exit 4."""
    env = plan.env
    try:
        move_onto_branch(plan)
        inject_fault("adopt", "convert")
        if plan.conversion.changes:
            first = runbook.convert_env(env, plan.conversion, out)
        else:
            first = None
    except BaseException as exc:        # a bug too: what it made is put back, then its traceback shows
        if isinstance(exc, DeployError) and exc.code != 1:
            raise       # the conversion could not put itself back: its message says what to run
        undo_branch(plan)
        why = getattr(exc, "undone", None) or describe_failure(exc)
        gone = f"; the branch {env.branch} it created on {env.remote} is removed" if plan.created_remote else ""
        raise after_undo(exc, f"adopting {env.name} failed: {why}; {env.path} is back on "
                              f"{plan.branch_before or plan.commit[:12]}{gone}") from None
    entry = doc["envs"].setdefault(env.name, {})
    entry["adopted"] = {"time": now_iso(), "branch": env.branch, "commit": plan.commit,
                        "release": first.id if first else None}
    write_doc(config, doc)
    return first


def move_onto_branch(plan):
    env, repo = plan.env, plan.repo
    if plan.branch_before == env.branch:
        return
    if env.remote and plan.remote_branch is None:
        repo.push_branch(env.remote, plan.commit, env.branch)
        plan.created_remote = True
    if plan.local_branch is None:
        repo.run("branch", "--quiet", env.branch, plan.commit)
        plan.created_local = True
    repo.run("switch", "--quiet", env.branch)
    plan.switched = True
    if env.remote:
        repo.run("fetch", "--quiet", "--no-tags", env.remote, env.branch, timeout=NETWORK_TIMEOUT, check=False)
        repo.run("branch", "--quiet", f"--set-upstream-to={env.remote}/{env.branch}", env.branch, check=False)


def undo_branch(plan):
    env, repo = plan.env, plan.repo
    if plan.switched:
        if plan.branch_before:
            repo.run("switch", "--quiet", plan.branch_before)
        else:
            repo.run("switch", "--quiet", "--detach", plan.commit)
    if plan.created_local:
        repo.run("branch", "--quiet", "-D", env.branch, check=False)
    if plan.created_remote:
        repo.run("push", "--quiet", f"--force-with-lease=refs/heads/{env.branch}:{plan.commit}", env.remote,
                 f":refs/heads/{env.branch}", timeout=NETWORK_TIMEOUT, check=False)


# -- the checklist ---------------------------------------------------------------------------------
@dataclass
class Item:
    """One line of the seed's checklist: whether it holds, what it checks, and what was found."""
    ok: bool
    text: str
    detail: str


def checklist(config, doc, sources=None):
    """The seed's checklist before prod, every line checked from the state."""
    sources = sources if sources is not None else source_envs(config)
    items = [backups_item(config, doc), tags_item(config, doc)]
    for name in sources:
        source = config.env(name)
        items += source_items(config, doc, source)
    return items


def source_envs(config):
    names = [e.promote_from for e in config.envs.values() if e.promote_from]
    return list(dict.fromkeys(names)) or (["dev"] if "dev" in config.envs else [])


def backups_item(config, doc):
    text = "backups created and verified (phase 1)"
    missing = [e.name for e in config.envs.values() if e.name not in doc["envs"]]
    if missing:
        return Item(False, text, f"no phase 1 for {', '.join(missing)}: run "
                                 f"{script_command(config, 'adopt.py', missing[0])}")
    bad = []
    for name, entry in doc["envs"].items():
        if entry.get("backup"):
            found = {b.path: b for b in backups.list_backups(Path(entry["backup"]).parent)}
            b = found.get(entry["backup"])
            problem = "its manifest is gone" if b is None else backups.verify_backup(b)
            if problem == "ok" and b.sha256 != entry.get("db_sha256"):
                problem = "its sha256 differs from the one adoption recorded"
            if problem != "ok":
                bad.append(f"{name}: {problem}")
        if not Path(entry.get("unit_copy") or "/nonexistent").exists():
            bad.append(f"{name}: the saved unit file {entry.get('unit_copy')} is missing")
    if bad:
        return Item(False, text, "; ".join(bad))
    return Item(True, text, "; ".join(f"{n}: {Path(e['backup']).name if e.get('backup') else 'no database'}, "
                                      "sha256 and integrity re-checked now" for n, e in doc["envs"].items()))


def tags_item(config, doc):
    text = "git tags created, on the remote"
    done, bad = [], []
    for name, entry in doc["envs"].items():
        if name not in config.envs or not entry.get("tag"):
            continue
        env = config.env(name)
        if not env.remote:
            done.append(f"{entry['tag']} (no remote: local only)")
            continue
        try:
            sha = remote_refs(Repo(env.path), env.remote, "--tags").get(entry["tag"])
        except DeployError as exc:
            bad.append(str(exc))
            continue
        if sha == entry["commit"]:
            done.append(f"{entry['tag']} = {sha[:12]} on {env.remote}")
        else:
            bad.append(f"{entry['tag']} is {'missing' if sha is None else 'at ' + sha[:12]} on {env.remote}")
    if bad or not done:
        return Item(False, text, "; ".join(bad) or "no tag recorded yet (phase 1 has not run)")
    return Item(True, text, "; ".join(done))


def source_items(config, doc, source):
    entry = doc["envs"].get(source.name) or {}
    adopted = entry.get("adopted")
    items = [branch_item(config, source), adopted_item(config, source, adopted)]
    deploy, verify = tool_deploy_and_verify(source, adopted)
    # a release rolled back after its verify (marked bad, in any env) is not a tested one
    mark = deploy and verify and commit_mark(config, source, Repo(source.path), deploy.running)
    if mark:
        items.append(Item(False, f"{source.name} tested: a deploy made with the tool, and a passing verify of it",
                          f"{deploy.running[:12]} passed its verify, then was rolled back in {mark.get('env')} at "
                          f"{mark.get('time')} (marked bad): deploy a fix to {source.name} and verify it"))
    elif deploy and verify:
        items.append(Item(True, f"{source.name} tested: a deploy made with the tool, and a passing verify of it",
                          f"deployed {deploy.running[:12]} at {deploy.time}, verified at {verify['time']}"))
    else:
        why = ("not adopted yet" if not adopted else
               f"no deploy of {source.name} made with the tool since its adoption: push a commit to "
               f"{source.branch} and run {script_command(config, 'deploy.py', source.name)}" if not deploy else
               f"{deploy.running[:12]} (deployed {deploy.time}) has no passing verify since: run "
               f"{script_command(config, 'verify.py', source.name)}")
        items.append(Item(False, f"{source.name} tested: a deploy made with the tool, and a passing verify of it", why))
    items.append(stable_item(source, verify))
    return items


def branch_item(config, source):
    text = f"{source.branch} branch created, on the remote"
    if not source.remote:
        found = Repo(source.path).resolve(f"refs/heads/{source.branch}")
        return Item(bool(found), text, f"{source.branch} at {found[:12]} (no remote)" if found else "missing")
    try:
        sha = remote_refs(Repo(source.path), source.remote, "--heads").get(source.branch)
    except DeployError as exc:
        return Item(False, text, str(exc))
    return Item(bool(sha), text, f"{source.remote}/{source.branch} at {sha[:12]}" if sha else
                f"{source.remote} has no branch {source.branch}: run {script_command(config, 'adopt.py', source.name)}")


def adopted_item(config, source, adopted):
    text = f"new scripts work in {source.name}: adopted, converted, healthy now"
    if not adopted:
        return Item(False, text, f"not adopted yet: run {script_command(config, 'adopt.py', source.name)}")
    if not source.converted:
        return Item(False, text, f"{source.current_link} is missing: {source.name} no longer runs releases")
    result = health.check(source.health_url, timeout=5)
    return Item(result.ok, text, f"adopted {adopted['time']}; {source.health_url}: {result.describe()}")


def tool_deploy_and_verify(source, adopted):
    """The newest successful deploy made with the tool since adoption, and a verify of its commit after it."""
    if not adopted:
        return None, None
    since = parse_time(adopted["time"])
    deploys = [r for r in records.of_kind(records.read(source), "deploy") if r.ok
               and (parse_time(r.time) or since) > since]
    if not deploys:
        return None, None
    deploy = deploys[-1]
    at = parse_time(deploy.time)
    verifies = [v for v in verified_log(source.name, source.state_dir).read()
                if v.get("by") == "verify" and v.get("commit") == deploy.running and (parse_time(v.get("time")) or at) >= at]
    return deploy, (verifies[-1] if verifies else None)


def stable_item(source, verify):
    text = f"{source.name} stable with the new system: no restart since its verify"
    if not verify:
        return Item(False, text, "no passing verify to measure from")
    st = units.serving_state(source.unit)
    if not st.is_active or st.uptime is None:
        return Item(False, text, f"{st.name} is {st.active}")
    since = datetime.now(timezone.utc).timestamp() - st.uptime
    verified_at = parse_time(verify["time"]).timestamp()
    if st.restarts:
        return Item(False, text, f"{st.name} restarted {st.restarts} time(s) by itself (NRestarts)")
    if since > verified_at + STABLE_SLACK:
        started = datetime.fromtimestamp(since, timezone.utc).astimezone().isoformat(timespec="seconds")
        return Item(False, text, f"{st.name} (re)started at {started}, after the verify at {verify['time']}")
    return Item(True, text, f"{st.name} active since before the verify, 0 restarts")
