"""Releases: every deploy builds the target commit in a folder of its own, beside the release
that runs, and the env moves to it in one atomic step; going back is the same step.

Layout, for an env whose work tree (`path`) is P:

    P.releases/
      releases/<id>/         one release: the commit's files (git archive), the shared paths as
                             links into shared/, REVISION, and whatever `build` made (its venv)
                             (a folder there without REVISION is a build that did not finish:
                             never live; removed when the build fails, or by the next command's
                             recovery when it was killed)
      shared/                kept across releases: the database's folder, always, and the
                             paths of the `shared` key
      current -> releases/<id>   what the unit runs (WorkingDirectory and ExecStart go through it)

<id> is `<UTC yyyymmdd-HHMMSS>-<commit[:12]>`. `current` is switched by renaming a new symlink
over it (rename(2) is atomic: a reader sees the old or the new target, never neither). A
release's files are never written after it was built: a rollback points `current` back at a
kept release, with no rebuild and no network. The running process keeps its working folder
(the old release's inode), so nothing it loads lazily changes under it before its restart.

An env is "converted" when `current` exists; until then it runs from its work tree and
deploys move the tree in place (deploy.py ENV --install-units converts it).
"""

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import commands, redaction, unitenv
from .errors import DeployError
from .files import fsync_dir, write_atomic
from .state import now_iso, utc_stamp


@dataclass
class Release:
    """One built release: its id, folder, commit and build time."""
    id: str
    path: Path
    commit: str
    time: str

    def to_json(self):
        return {"id": self.id, "path": str(self.path), "commit": self.commit, "time": self.time}


def layout(env):
    root = env.releases_root
    return root, root / "releases", root / "shared", root / "current"


def read_release(folder):
    """The Release in folder (from its REVISION), or None when it is not a finished release."""
    folder = Path(folder)
    try:
        data = json.loads((folder / "REVISION").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("commit"), str):
        return None
    return Release(folder.name, folder, data["commit"], str(data.get("built") or data.get("time") or ""))


def list_releases(env):
    """Every finished release of the env, newest first."""
    _, folder, _, _ = layout(env)
    if not folder.is_dir():
        return []
    found = [read_release(p) for p in folder.iterdir() if p.is_dir() and not p.is_symlink()]
    return sorted((r for r in found if r), key=lambda r: r.id, reverse=True)


def current(env):
    """The Release `current` points at, or None (not converted)."""
    link = env.current_link
    if not link.is_symlink():
        return None
    target = link.parent / os.readlink(link)
    return read_release(target)


def find(env, commit, exclude=()):
    """The newest kept release of commit (skipping ids in exclude), or None."""
    for r in list_releases(env):
        if r.commit == commit and r.id not in exclude:
            return r
    return None


def shared_paths(env):
    """Relative paths kept across releases: the database's folder, then the `shared` key's."""
    paths = []
    if not os.path.isabs(env.db_setting):
        folder = os.path.dirname(os.path.normpath(env.db_setting))
        if folder:
            paths.append(folder)
    for p in env.shared:
        p = os.path.normpath(p)
        if p not in paths:
            paths.append(p)
    return paths


def build(env, repo, commit, say=None, folder=None, shared=None):
    """Build a release of commit beside the running one; return it. Nothing live changes, and the build
    cannot reach live data: while `build` runs, each shared path of the release links to a stand-in (a
    private copy of the commit's own files at that path, or an empty folder) in the release's build
    folder; only once the build succeeded do the links point at shared/. So a build that runs
    `flask init-db` initialises a stand-in, never the live database. A failure removes the half-built
    folder and raises DeployError with the build's output.
    folder and shared: elsewhere than the env's own (a rehearsal builds in a scratch folder)."""
    _, own_folder, own_shared, _ = layout(env)
    folder, shared = Path(folder or own_folder), Path(shared or own_shared)
    folder.mkdir(parents=True, exist_ok=True)
    shared.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(shared, 0o700)             # it holds the database: private, like every folder of user data
    rid = f"{utc_stamp()}-{commit[:12]}"
    n = 1
    while (folder / rid).exists():
        n += 1
        rid = f"{utc_stamp()}-{commit[:12]}-{n}"
    work = folder / rid         # built under its final name: a venv records its own absolute path
    originals, stand_ins = folder / f".originals-{rid}", folder / f".stand-ins-{rid}"
    try:
        work.mkdir()
        extract_commit(repo, commit, work)
        set_aside_shared(env, work, originals)
        link_shared(env, work, stand_ins, originals)
        if env.build and say:
            say(f"building release {rid}: {len(env.build)} command(s) in {work} (shared paths: stand-ins)")
        run_build(env, work, stand_ins)
        shadowed = link_shared(env, work, shared, originals)
        # REVISION last: a folder without it is a build that did not finish, never a release
        revision = {"commit": commit, "env": env.name, "branch": env.branch, "release": rid, "built": now_iso(),
                    "build": build_fingerprint(env), "shadowed": shadowed}
        write_atomic(work / "REVISION", json.dumps(revision, indent=2) + "\n", mode=0o644)
        fsync_dir(folder)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(stand_ins, ignore_errors=True)
        shutil.rmtree(originals, ignore_errors=True)
    return read_release(work)


def build_fingerprint(env):
    """What a release was built with (the `build` commands and the shared paths): a kept release is reused
    for a deploy of the same commit only when it was built the same way."""
    data = json.dumps({"build": env.build, "shared": shared_paths(env)}, sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()[:16]


def reusable(env, repo, commit):
    """A kept release of commit built the way `build` builds now and unchanged since (no file differs
    from its commit), which a deploy switches to instead of building the same release again (a deploy
    killed after its build left one); else None."""
    for r in list_releases(env):
        if r.commit != commit:
            continue
        try:
            fingerprint = json.loads((r.path / "REVISION").read_text()).get("build")
        except (OSError, ValueError):
            continue
        if fingerprint == build_fingerprint(env) and not differences(env, repo, r):
            return r
    return None


def serving(env, pid):
    """The release of env the process pid runs in (its working folder: systemd resolved `current` when it
    started it), or None (not running, not in a release of env, or /proc does not say)."""
    if not pid:
        return None
    try:
        cwd = Path(os.readlink(f"/proc/{pid}/cwd").removesuffix(" (deleted)"))
    except OSError:
        return None
    folder = Path(os.path.realpath(env.releases_root / "releases"))
    return read_release(cwd) if cwd.parent == folder else None


def dangling_current(env):
    """Whether `current` names a release folder that is gone (deleted by hand): the app cannot start."""
    link = env.current_link
    return link.is_symlink() and read_release(link.parent / os.readlink(link)) is None


def extract_commit(repo, commit, dest):
    """The commit's files (no .git) into dest, through `git archive` and extract_safely()."""
    fd, archive = tempfile.mkstemp(prefix=".archive-", suffix=".tar", dir=dest.parent)
    os.close(fd)
    try:
        repo.run("archive", "--format=tar", "-o", archive, commit)
        with tarfile.open(archive) as tar:
            extract_safely(tar, dest)
    except (OSError, tarfile.TarError) as exc:
        raise DeployError(f"cannot unpack {commit[:12]} into {dest}: {exc}") from None
    finally:
        os.unlink(archive)


# Python 3.10 and Debian 12's 3.11.2 have no extraction filter (`filter=` came in 3.11.4), so the
# check is this code's own, on every python. Where the stdlib has the data filter it applies too.
FILTER = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}


def extract_safely(tar, dest):
    """Unpack the archive into dest, member by member: each must be a plain file, folder or symbolic
    link; its folder, as it resolves on disk at that moment (through links unpacked before it), and a
    link's target must lie inside dest; modes keep only what a release needs (no setuid, nothing
    others may write). Links are checked again at the end (one may name a folder unpacked after it).
    Raises tarfile.TarError naming the first member that would reach outside."""
    root = os.path.realpath(dest)

    def inside(path):
        real = os.path.realpath(path)
        return real == root or real.startswith(root + os.sep)

    links = []
    for m in tar.getmembers():
        name = os.path.normpath(m.name)
        if os.path.isabs(m.name) or name == ".." or name.startswith("../") or "\0" in m.name:
            raise tarfile.TarError(f"{m.name!r} would land outside the release")
        if not (m.isfile() or m.isdir() or m.issym()):
            raise tarfile.TarError(f"{m.name!r} is neither a file, a folder nor a symbolic link")
        folder = os.path.join(dest, os.path.dirname(name))
        if not inside(folder):
            raise tarfile.TarError(f"{m.name!r} would be written through a link that leads outside the release")
        if m.issym():
            if os.path.isabs(m.linkname) or not inside(os.path.join(folder, m.linkname)):
                raise tarfile.TarError(f"the link {m.name!r} -> {m.linkname!r} points outside the release")
            links.append(name)
        m.mode &= 0o755
        m.uid = m.gid = 0
        m.uname = m.gname = ""
        tar.extract(m, dest, **FILTER)
    for name in links:
        if not inside(os.path.join(dest, name)):
            raise tarfile.TarError(f"the link {name!r} points outside the release")


def set_aside_shared(env, work, originals):
    """Move the commit's own files at each shared path out of the release, into originals (they seed a
    shared folder that does not have the path yet). No path is followed through a link: a shared path
    whose parent in the release is a link (another shared path, or a link in the commit) is refused, so
    a link can never lead this code to move, or later remove, files outside the release."""
    for rel in shared_paths(env):
        parent = work
        for part in Path(rel).parent.parts:
            parent = parent / part
            if parent.is_symlink():
                raise DeployError(f"the shared path {rel!r} lies under {parent.relative_to(work)}, which is a link in "
                                  "the release: shared paths may not be nested in one another or reached through "
                                  "a link; nothing live was changed")
        inside = work / rel
        if inside.exists() or inside.is_symlink():
            (originals / rel).parent.mkdir(parents=True, exist_ok=True)
            os.rename(inside, originals / rel)


def link_shared(env, work, shared, originals):
    """Make each shared path of the release a link into shared (the env's shared/, or the build's
    stand-ins). A path missing there is seeded from the commit's own files (originals), else made an
    empty folder; a path present there wins. Returns the tracked files the shared copy stands in for
    and holds otherwise ("shadowed": the commit's version never runs; a deploy reports them)."""
    shadowed = []
    for rel in shared_paths(env):
        inside, kept, source = work / rel, shared / rel, originals / rel
        if not kept.exists() and not kept.is_symlink():
            kept.parent.mkdir(parents=True, exist_ok=True)
            if source.is_dir() and not source.is_symlink():
                shutil.copytree(source, kept, symlinks=True)
            elif source.exists() and not source.is_symlink():
                shutil.copy2(source, kept)
            else:
                kept.mkdir(mode=0o700)
        else:
            shadowed += differing(source, kept, rel)
        if inside.is_symlink():
            inside.unlink()             # the stand-in's link, after the build
        inside.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(kept, inside.parent), inside)
        if kept.is_dir() and not kept.is_symlink() and rel == (shared_paths(env) or [None])[0] \
                and not os.path.isabs(env.db_setting):
            os.chmod(kept, 0o700)           # the database's folder
    return shadowed


def differing(source, kept, rel):
    """The files under source (the commit's, at a shared path) that kept (the shared copy) holds otherwise."""
    found = []
    if source.is_file() and not source.is_symlink():
        pairs = [(source, kept, rel)]
    elif source.is_dir() and not source.is_symlink():
        pairs = [(Path(root) / name, kept / Path(root).relative_to(source) / name,
                  str(Path(rel) / Path(root).relative_to(source) / name))
                 for root, _, files in os.walk(source) for name in files]
    else:
        pairs = []
    for mine, theirs, name in pairs:
        try:
            if mine.read_bytes() != theirs.read_bytes():
                found.append(os.path.normpath(name))
        except OSError:
            found.append(os.path.normpath(name))
    return found


def run_build(env, work, stand_ins):
    """The `build` commands in work, with the unit's environment as the app will see it from this release:
    `current` and the work tree moved to work, the shared folder to the stand-ins (a build that names the
    live database through a variable reaches a stand-in, never live data)."""
    if not env.build:
        return
    moves = [(env.current_link, work, False), (env.releases_root / "shared", stand_ins, False), (env.path, work, True)]
    environ = unitenv.command_environment(env, moves)
    for argv in env.build:
        failure = commands.run_one(argv, work, env.command_timeout, nice=commands.BUILD_NICE, environ=environ)
        if failure:
            exc = DeployError(f"build command `{redaction.shown(argv)}` {failure.why}; nothing live was changed",
                              output="\n".join(failure.output.splitlines()[-15:]))
            exc.failure = failure
            raise exc


def switch(env, release):
    """Point `current` at release in one rename; return the id it pointed at before (or None)."""
    link = env.current_link
    before = current(env)
    tmp = link.with_name(f".current-{os.getpid()}")
    try:
        if tmp.is_symlink():
            tmp.unlink()
        os.symlink(os.path.relpath(release.path, link.parent), tmp)
        os.replace(tmp, link)
        fsync_dir(link.parent)
    except OSError as exc:
        raise DeployError(f"cannot switch {link} to {release.id}: {exc.strerror or exc}") from None
    return before.id if before else None


def leftovers(env):
    """Half-built releases (no REVISION yet) and switch temp links a killed command left."""
    _, folder, _, link = layout(env)
    found = []
    if folder.is_dir():
        found += [p for p in folder.iterdir() if p.name.startswith(".archive-")
                  or (p.is_dir() and not p.is_symlink() and not (p / "REVISION").exists())]
    if link.parent.is_dir():
        found += [p for p in link.parent.iterdir() if p.name.startswith(".current-")]
    return found


def remove_leftovers(env):
    found = leftovers(env)
    for p in found:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return found


# -- retention -----------------------------------------------------------------------------------
def to_remove(found, current_id, previous_id, protected_commits, keep):
    """Which releases retention removes (pure): beyond the `keep` newest, never the current one,
    the previous one, nor one whose commit a rollback point still needs."""
    ordered = sorted(found, key=lambda r: r.id, reverse=True)
    stay = {r.id for r in ordered[:max(keep, 1)]} | {current_id, previous_id}
    return [r for r in ordered if r.id not in stay and r.commit not in protected_commits]


def prune(env, previous_id, protected_commits):
    """Apply keep_releases; return the removed releases."""
    cur = current(env)
    gone = to_remove(list_releases(env), cur.id if cur else None, previous_id, set(protected_commits),
                     env.keep_releases)
    for r in gone:
        shutil.rmtree(r.path, ignore_errors=True)
    return gone


def room_needed(env):
    """Bytes a new release is likely to take: the current release's files that are its own
    (a file hard-linked from elsewhere, as uv installs from its cache, costs nothing more)."""
    cur = current(env)
    if not cur:
        return 0
    total = 0
    for root, _, files in os.walk(cur.path):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            if st.st_nlink == 1:
                total += st.st_blocks * 512
    return total


def differences(env, repo, release):
    """Tracked files of the release's commit that are missing or changed in its folder (the shared
    paths and what `build` added are not compared). A release's files never change after it went
    live: anything listed here was changed by hand or by the app."""
    skip = [p.rstrip("/") + "/" for p in shared_paths(env)] + shared_paths(env)
    out = repo.run("ls-tree", "-r", "-z", "--full-tree", release.commit)
    changed = []
    for entry in out.split("\0"):
        if not entry:
            continue
        meta, path = entry.split("\t", 1)
        mode, kind, sha = meta.split()
        if kind != "blob" or any(path == s or path.startswith(s) for s in skip):
            continue
        local = release.path / path
        try:
            data = os.readlink(local).encode() if mode == "120000" else local.read_bytes()
        except OSError:
            changed.append(f"{path} (missing)")
            continue
        if hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() != sha:
            changed.append(path)
    return changed
