"""Converting an env that runs from its work tree to releases and socket units
(deploy.py ENV --install-units), with everything put back when the result is not healthy.

In order: the running commit is built as the first release (the app still serves from its
tree); the unit files are rendered: the service's absolute paths into the work tree
(WorkingDirectory, Exec*, Environment*) now reach `current`, so a venv inside the tree becomes
each release's own, and it takes its socket from a .socket unit; then, in the one short stop:
the app (and its socket) stop, the untracked files of every shared path (the database's
folder always: the database, its -wal and -shm, an instance config) are renamed into shared/,
`current` is created, the units installed, the socket and the service started. Renames only:
the stop lasts as long as systemd's stop and start, whatever the database's size.

put_back() reverses each move it made: the files go back into the tree, `current` and the
built release are removed, the old unit files return, and the service starts as it was.
"""

import os
import re
import shutil
from dataclasses import dataclass, field

from . import releases, units
from .errors import DeployError
from .files import fsync_dir

PATH_KEYS = ("WorkingDirectory=", "ExecStart=", "ExecStartPre=", "ExecStartPost=", "ExecReload=", "ExecStop=",
             "Environment=", "EnvironmentFile=")


def rewrite_paths(text, env):
    """The unit text with the work tree's absolute path replaced by `current` in the lines that
    name what runs. A longer path that only starts the same (datatracker-dev) is left alone."""
    old, new = str(env.path), str(env.current_link)
    pattern = re.compile(re.escape(old) + r"(?=[/\s\"':]|$)")
    out = []
    for line in text.splitlines():
        stripped = line.lstrip().lstrip("-")
        if any(stripped.startswith(k) for k in PATH_KEYS):
            line = pattern.sub(new, line)
        out.append(line)
    return "\n".join(out) + ("\n" if text.endswith("\n") else "")


@dataclass
class Moves:
    """The renames made so far, to reverse them in put_back()."""
    done: list = field(default_factory=list)        # (from, to)


def data_to_move(env, repo):
    """[(in the tree, in shared/)] for every untracked entry of each shared path: the live data."""
    tracked = set(repo.run("ls-files", "-z").split("\0"))
    shared = env.releases_root / "shared"
    pairs = []
    for rel in releases.shared_paths(env):
        inside = env.path / rel
        if not inside.exists() and not inside.is_symlink():
            continue
        if inside.is_symlink():         # data linked to another disk: the link itself moves
            if rel not in tracked:
                pairs.append((inside, shared / rel))
        elif inside.is_dir():
            for child in sorted(inside.iterdir()):
                name = os.path.relpath(child, env.path)
                if name not in tracked and not any(t.startswith(name + "/") for t in tracked):
                    pairs.append((child, shared / rel / child.name))
        elif rel not in tracked:
            pairs.append((inside, shared / rel))
    return pairs


def check_moves(pairs):
    """Refuse before anything stops: a name taken in shared/, or shared/ on another file system."""
    for src, dst in pairs:
        if dst.exists() or dst.is_symlink():
            raise DeployError(f"cannot convert: {dst} exists already, and {src} would move there; "
                              "move it away first (nothing was changed)")
        parent = dst.parent
        while not parent.exists():
            parent = parent.parent
        if os.stat(parent).st_dev != os.stat(src.parent).st_dev:
            raise DeployError(f"cannot convert: {src} and {parent} are on different file systems, so the move "
                              "would be a copy while the app is down; nothing was changed")


def move_data(pairs, moves):
    for src, dst in pairs:
        if not src.exists() and not src.is_symlink():
            continue        # SQLite removes -wal and -shm when the stopped app closed the database cleanly
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink() and dst.is_dir() and not dst.is_symlink() and not any(dst.iterdir()):
            dst.rmdir()         # the empty folder the first build made for a shared path that is a link
        os.rename(src, dst)
        moves.done.append((src, dst))
        fsync_dir(dst.parent)
        fsync_dir(src.parent)


def put_data_back(moves):
    for src, dst in reversed(moves.done):
        if dst.exists() or dst.is_symlink():
            if src.exists():        # something recreated it meanwhile (an app start): keep both
                os.rename(src, src.with_name(src.name + ".created-during-conversion"))
            os.rename(dst, src)
    moves.done.clear()


def remove_layout(env, release):
    """Undo what conversion created in the releases folder: `current` and the first release."""
    if env.current_link.is_symlink():
        env.current_link.unlink()
    if release is not None:
        shutil.rmtree(release.path, ignore_errors=True)


def stop_all(env):
    """The app, its socket (so a request cannot start it mid-move) and its helper."""
    sock = units.socket_name(env.unit)
    if units.state(sock).known:
        units.systemctl("stop", sock, timeout=units.RESTART_TIMEOUT, check=False)
    units.systemctl("stop", units.helper_name(env.unit), timeout=units.RESTART_TIMEOUT, check=False)
    units.stop(env.unit)
