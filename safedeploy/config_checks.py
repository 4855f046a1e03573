"""The checks of config.toml that span keys and envs (safedeploy.config runs them at load: exit 2, one line
naming both sides). Confinement, one rule:
- a relative `db` and every `shared` path stay inside the env's tree (no `..` out of it);
- shared paths do not overlap: none lies inside another, nor inside (or around) the database's
  folder, which is always shared;
- no two envs overlap: work trees and their releases folders, databases, shared folders (through
  links too: compared by real path); a database, backup folder, state folder or local off-site
  repository never lies inside an env's tree.
"""

import difflib
import os
from pathlib import Path

from .config_keys import resolve


def did_you_mean(word, choices):
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_across_envs(envs, fail):
    for field_name in ("port", "db", "unit"):
        seen = {}
        for env in envs.values():
            value = getattr(env, field_name)
            if field_name == "db":      # through links too: a folder linked to another env's is the same file
                value = Path(os.path.realpath(value))
            if value in seen:
                fail(f"env.{env.name}.{field_name}", f"{getattr(env, field_name)} is also env {seen[value]}'s; "
                                                     "each env needs its own")
            seen[value] = env.name
    seen = {}
    for env in envs.values():
        tree = env.path.resolve()
        if tree in seen:
            other = envs[seen[tree]]
            if other.branch == env.branch:
                fail(f"env.{env.name}.path", f"{env.path} is also env {other.name}'s; each env needs its own work tree")
            fail(f"env.{env.name}.path",
                 f"{env.path} is also env {other.name}'s work tree, but on branch {other.branch!r}, not "
                 f"{env.branch!r}: one folder can hold one branch; give {env.name} its own work tree with: "
                 f"git -C {other.path} worktree add {other.path}-{env.name} {env.branch}")
        seen[tree] = env.name
    check_envs_apart(envs, fail)
    for env in envs.values():
        if env.promote_from:
            if env.promote_from == env.name:
                fail(f"env.{env.name}.promote_from", "an env cannot promote from itself")
            # an env of another host: its verifications come through the remote (verified_notes). Only on a host
            # where every other env promotes from somewhere too; else a name that is none of this file's is a typo
            sources_here = [e.name for e in envs.values() if e.name != env.name and not e.promote_from]
            if env.promote_from not in envs and (sources_here or not env.remote):
                fail(f"env.{env.name}.promote_from", f"no env named {env.promote_from!r}"
                     + (did_you_mean(env.promote_from, envs) if sources_here else
                        " here, and no remote to read another host's verifications from"))


# -- confinement -----------------------------------------------------------------------------------
def inside(child, parent):
    """child is parent, or lies under it (both normalised absolute paths, as text)."""
    child, parent = str(child), str(parent).rstrip("/") or "/"
    return child == parent or child.startswith(parent if parent == "/" else parent + "/")


def real(path):
    return os.path.realpath(path)


def db_folder(db_setting):
    """The database's folder, relative to a release ("" when none), or None for an absolute db."""
    if os.path.isabs(os.path.expanduser(db_setting)):
        return None
    return os.path.dirname(os.path.normpath(db_setting))


def check_inside(name, path, db, shared, key_of, fail):
    """Within one env: a relative db inside the tree; shared paths not nested in each other or in
    (or around) the database's folder."""
    folder = db_folder(db)
    if folder is not None:
        norm = os.path.normpath(db)
        if norm in (".", "..") or norm.startswith("../"):
            fail(key_of("db"), f"{db!r} climbs out of env {name}'s tree ({path}): a relative db must lie inside it "
                               f"(its folder is shared by the releases, and converting the env moves it into "
                               f"{path}.releases/shared); give an absolute path for a database kept elsewhere")
    paths = ([(folder, "the database's folder, always shared")] if folder else []) + \
        [(os.path.normpath(p), "") for p in shared]
    for i, (a, why_a) in enumerate(paths):
        for b, why_b in paths[i + 1:]:
            if a == b:
                continue            # the same folder named twice (the db's folder in `shared` too): one link
            if inside(a, b) or inside(b, a):
                (inner, why_in), (outer, why_out) = ((a, why_a), (b, why_b)) if inside(a, b) else ((b, why_b), (a, why_a))
                fail(key_of("shared") if not why_in or why_out else key_of("db"),
                     f"{inner!r}{f' ({why_in})' if why_in else ''} lies inside {outer!r}"
                     f"{f' ({why_out})' if why_out else ', also shared'}: shared paths may not overlap (the inner one "
                     f"would be linked through the outer one's link, and a build removes the live data under it); "
                     f"share {outer!r} only")


def shared_folders(env):
    """(relative path, real path) of every shared folder of env: in its work tree and in its releases."""
    rels = ([db_folder(env.db_setting)] if db_folder(env.db_setting) else []) + [os.path.normpath(p) for p in env.shared]
    return [(rel, real(base / rel)) for rel in dict.fromkeys(rels)
            for base in (env.path, env.releases_root / "shared")]


def env_trees(env):
    return [real(env.path), real(env.releases_root)]


def env_dbs(env):
    found = [real(env.db_in_tree)]
    if db_folder(env.db_setting) is not None:
        found.append(real(resolve(env.releases_root / "shared", env.db_setting)))
    return found


def check_envs_apart(envs, fail):
    """No two envs overlap, through links too; nothing of the tool's lies in an env's tree."""
    for a in envs.values():
        for b in envs.values():
            if a is not b:
                check_pair_apart(a, b, fail)
    for a in envs.values():
        for key, folder in (("backup_dir", a.backup_dir), ("state_dir", a.state_dir)):
            for b in envs.values():
                for tb in env_trees(b):
                    if inside(real(folder), tb):
                        fail(a.keys[key], f"{folder} lies inside env {b.name}'s tree ({tb}): the tool's own "
                                          f"folders stay out of the app's (a release, a rehearsal or a conversion "
                                          "would copy, move or remove them)")


def check_pair_apart(a, b, fail):
    """Env a's trees, databases and shared folders overlap none of env b's."""
    for ta in env_trees(a):
        for tb in env_trees(b):
            if inside(ta, tb):
                fail(a.keys["path"], f"{a.path} lies inside env {b.name}'s tree ({tb}): each env needs a "
                                     "tree of its own, beside the others' (a conversion or a build of one "
                                     "would move or remove the other's files)")
    for db in env_dbs(a):
        for tb in env_trees(b):
            if inside(db, tb):
                fail(a.keys["db"], f"{db} lies inside env {b.name}'s tree ({tb}): {b.name}'s deploys, "
                                   f"conversion and rollbacks would move or replace env {a.name}'s database")
    for rel, folder in shared_folders(a):
        key = a.keys["shared"] if rel != db_folder(a.db_setting) else a.keys["db"]
        for tb in env_trees(b):
            if inside(folder, tb) or inside(tb, folder):
                fail(key, f"{a.name}'s shared folder {rel!r} is {folder}, which overlaps env {b.name}'s tree ({tb}): "
                          "each env's shared data must be its own")
        for rel_b, other in shared_folders(b):
            if inside(folder, other) or inside(other, folder):
                fail(key, f"{a.name}'s shared folder {rel!r} ({folder}) overlaps env {b.name}'s {rel_b!r} ({other}): "
                          "a conversion of one would move the other's live data")


def check_repository(offsite, envs, fail):
    """A local off-site repository lies outside every env's tree and backup folder: the copies that
    survive the loss of the app's folders cannot live in them."""
    repo = real(offsite.repository)
    for env in envs.values():
        for folder in env_trees(env) + [real(env.backup_dir)]:
            if inside(repo, folder):
                fail("offsite.repository", f"{offsite.repository} lies inside env {env.name}'s "
                                           f"{'backup folder' if folder == real(env.backup_dir) else 'tree'} ({folder}): "
                                           "off-site copies must live elsewhere")


def check_replica(replica, envs, fail):
    """The replicated envs share one state folder (the one replicator of this config keeps its files there);
    a replica folder lies outside every env's tree and backup folder."""
    folders = {envs[name].state_dir for name in replica.envs}
    if len(folders) > 1:
        fail("replica.envs", f"the envs {', '.join(replica.envs)} keep their state in different folders "
                             f"({', '.join(sorted(map(str, folders)))}): one replicator keeps its files in one; "
                             "give them one state_dir")
    if replica.folder is not None:
        for env in envs.values():
            for folder in env_trees(env) + [real(env.backup_dir), real(env.state_dir)]:
                if inside(real(replica.folder), folder) or inside(folder, real(replica.folder)):
                    fail("replica.url", f"{replica.folder} overlaps env {env.name}'s folder {folder}: continuous "
                                        "copies must live elsewhere (another disk)")
