"""Bad-release marks, read from both places that hold them.

A rollback records what it took out twice: first the tag `ENV-rolled-back-STAMP` on the commit it
leaves (its first step), then, once done, a mark in `state/ENV.bad.jsonl` by tree. A deploy refuses a
tree that is marked in any env (the same code that failed in dev fails in prod), unless `--force
--reason`, which writes a clearing record. Both records are read:

- a mark in a bad log counts as before: each env's newest record of the tree (a mark, or its
  clearing); the deploying env's own clearing overrides the marks made before it in any env;
- a tag counts as a mark of its commit's tree unless a clearing record newer than the tag (in the
  tag's env or the deploying env) clears it, or the rollback did not mean to mark (a recovery's undo,
  a rollback that left the commit it went to, or one that failed: its tag says "not marked bad", or
  the deploy log says so). A tag with no matching mark in its env's log is a mark all the same (the
  safe side), and `disagreements` reports it;
- a damaged line of a bad log (integrity.py) that still names a tree marks that tree (the safe side);
  one whose tree cannot be read leaves the tags to stand in for it. Both are reported.

The recovery at the start of the next deploy or rollback repairs the log (`repair`): damaged lines
go aside to `ENV.bad.jsonl.damaged` (still read for the trees they name) and a tag's missing mark is
written back, so the two places agree again.
"""

import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from . import integrity, records
from .gitrepo import Repo
from .state import bad_log, now_iso, parse_time

NOT_MARKED = "not marked bad"           # what a rollback's tag message says when it marks nothing
EPOCH = datetime.min.replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class TagMark:
    """A rollback's tag ENV-rolled-back-STAMP: the commit and tree it names, and whether it meant to mark them."""
    name: str
    env: str
    commit: str
    tree: str
    time: str
    marks: bool                         # whether the rollback meant to mark what it left


def _when(record):
    return parse_time((record or {}).get("time") or "") or EPOCH


_TAG_CACHE: dict = {}


def _tag_signature(repo):
    common = _TAG_CACHE.setdefault(("common", str(repo.path)), repo.common_dir())
    sig = []
    for part in ("packed-refs", "refs/tags"):
        try:
            st = os.stat(os.path.join(common, part))
            sig.append((st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            sig.append(None)
    return tuple(sig)


def rolled_back_tags(env):
    """[TagMark] of env's rolled-back tags (in env's repository), newest name first."""
    repo = Repo(env.path)
    try:
        key = (str(env.path), env.name, _tag_signature(repo))
    except Exception:                   # not a repository (yet): no tags
        return []
    if key in _TAG_CACHE:
        return _TAG_CACHE[key]
    status, out, _ = repo.run("for-each-ref", "--format=%(refname:short)%00%(creatordate:iso-strict)%00"
                              "%(*objectname)%00%(*tree)%00%(contents:subject)",
                              f"refs/tags/{env.name}-rolled-back-*", check=False)
    found = []
    for line in out.splitlines() if status == 0 else []:
        parts = line.split("\0")
        if len(parts) == 5 and parts[2] and parts[3]:
            name, when, commit, tree, subject = parts
            found.append(TagMark(name, env.name, commit, tree, when, NOT_MARKED not in subject))
    found.sort(key=lambda t: t.name, reverse=True)
    _TAG_CACHE[key] = found
    return found


def unmarking_tags(env):
    """Names of env's rolled-back tags whose rollback marked nothing, as the deploy log says (tags made
    before their messages said so): a recovery's undo, a rollback to the commit it ran, a failed one."""
    names = set()
    for r in records.read(env):
        nested = getattr(r, "rollback", None) if r.kind in ("deploy", "recovery") else None
        if r.kind == "rollback" and r.tag and (not r.ok or (r.from_ and r.from_ == r.to)):
            names.add(r.tag)
        elif nested and nested.get("tag") and (r.kind == "recovery" or nested.get("result") != "ok"):
            names.add(nested["tag"])
    return names


def tag_marks(env):
    """The tags of env that mark what they left."""
    skip = None
    found = []
    for t in rolled_back_tags(env):
        if not t.marks:
            continue
        if skip is None:
            skip = unmarking_tags(env)
        if t.name not in skip:
            found.append(t)
    return found


def _env_marks(e, own, tree, own_cleared):
    """The marks of tree that env e's records hold (its log, its damaged lines, its tags)."""
    scan = bad_log(e).scan()
    mine = [r for r in scan.records if r.get("tree") == tree]
    newest = mine[-1] if mine else None
    clearings = [_when(r) for r in mine if not r.get("bad")]
    if own is not e:
        clearings += own_cleared
    cleared_at = max(clearings, default=None)
    found = []
    if newest and newest.get("bad") and (not own_cleared or _when(newest) > max(own_cleared)):
        found.append({**newest, "env": newest.get("env") or e.name})
    for salvaged_tree, text in integrity.salvaged_trees(bad_log(e).path):
        when = integrity.salvage(text, "time").get("time")
        if salvaged_tree == tree and not (cleared_at and (parse_time(when or "") or EPOCH) <= cleared_at):
            found.append({"time": when, "env": e.name, "tree": tree, "bad": True, "damaged": True,
                          "why": f"a damaged record in {bad_log(e).path} names this tree; taken as a mark"})
    for t in tag_marks(e):
        if t.tree == tree and not (cleared_at and (parse_time(t.time) or EPOCH) <= cleared_at):
            found.append({"time": t.time, "env": e.name, "commit": t.commit, "tree": tree, "bad": True, "tag": t.name,
                          "why": f"the tag {t.name} records that rollback"})
    return found


def bad_mark(config, env, tree, tags_too=True):
    """The record that makes tree a bad release for env, or None (the newest of its marks; see the module).
    tags_too=False: a mark that only a tag holds does not count (while a rollback runs, its tag is made first
    and its mark written last: the tag alone is a rollback under way, not one that was made)."""
    own_records = [r for r in bad_log(env).scan().records if r.get("tree") == tree]
    own_cleared = [_when(r) for r in own_records if not r.get("bad")]
    marks = []
    for e in config.envs.values():
        marks += _env_marks(e, env, tree, own_cleared)
    if not tags_too:
        marks = [m for m in marks if not m.get("tag")]
    if not marks:
        return None
    logged = [m for m in marks if not m.get("tag") and not m.get("damaged")]
    return max(logged or marks, key=_when)


def commit_mark(config, env, repo, commit):
    """The bad mark of a commit's tree (a rollback of that tree, in any env), or None; None as well for a
    commit the repository does not have."""
    return bad_mark(config, env, repo.tree_of(commit)) if repo.resolve(commit) else None


def missing_marks(env):
    """[TagMark] of env's marking tags that its bad log holds no mark for (of that tree, made at or after
    the tag) and that no clearing after the tag undid."""
    good = bad_log(env).scan().records
    missing = []
    for t in tag_marks(env):
        mine = [r for r in good if r.get("tree") == t.tree]
        tagged = parse_time(t.time) or EPOCH
        if any(r.get("bad") and _when(r) >= tagged for r in mine):
            continue
        if any(not r.get("bad") and _when(r) > tagged for r in mine):
            continue
        missing.append(t)
    return missing


def disagreements(env):
    """What status reports about env's marks: damaged lines of its bad log, and tags with no mark."""
    path = bad_log(env).path
    said = []
    for d in bad_log(env).scan().damage:
        tree = integrity.salvage(d.text, "tree").get("tree")
        said.append(d.describe() + (f"; it names the tree {tree[:12]}, which deploys refuse as bad" if tree else
                                    "; the rolled-back tags stand in for the marks it may hold"))
    for t in missing_marks(env):
        said.append(f"the tag {t.name} records a rollback that took out {t.commit[:12]}, but {path} holds no mark "
                    "of it: it is taken as bad (a deploy refuses it; --force --reason clears it)")
    return said


def repair(env):
    """Under env's lock: set the bad log's damaged lines aside and write back the marks of tags that lack
    one (the tag's time, so a later clearing still wins). Returns what it did, as lines."""
    log = bad_log(env)
    done = [f"{d.describe()}: set aside in {integrity.aside_path(log.path)}"
            for d in integrity.set_aside(log.path)]
    for t in missing_marks(env):
        log.append({"time": t.time, "env": env.name, "commit": t.commit, "tree": t.tree, "bad": True,
                    "why": f"restored from the tag {t.name} ({Path(log.path).name} had lost it) at {now_iso()}"})
        done.append(f"the mark of {t.commit[:12]} (tag {t.name}) written back to {log.path}")
    return done
