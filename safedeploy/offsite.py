"""Off-site copies ([offsite]): copies that survive the loss of this host's disk, kept by restic (the
default) or borg ([offsite] engine = "borg", see Borg), behind one interface (Engine, picked by engine();
the engines are in safedeploy.offsite_engines).

Each verified local backup becomes one snapshot holding the database copy, its manifest and its
unit file, tagged `safe-deploy`, `host=` and `config=` (whose copy it is: this host's name and
this config's id, see config.identity), `env=`, `reason=`, `commit=`, `sha256=`, `file=` (the
copy's file name, which is how a local copy and its off-site twin are matched) and `time=` (the
backup's own); restic's own --host is this host's name too.

Confinement: listing, restoring and pruning see only this config's copies: those
tagged with its config id, and copies pushed before the tag existed (no `config=` tag) whose
restic host is this host's name. Another host's or another config's copies in a shared repository
are never listed, restored or forgotten. A copy fetched back is written into a fresh private
folder (mkdtemp, 0700) under names this module chooses (never the snapshot's own paths), and is
used only when its manifest's env is the env asked for, its sha256 is the tagged one (file and
manifest) and SQLite's integrity_check passes; then it is linked beside the local backups under
its own name only when no file has that name (a link never replaces), else it stays in its folder.
A hostile snapshot therefore can neither overwrite nor delete anything: it writes only into a
folder made for it, and a copy that fails is removed from there alone.

Secrets: the password lives in password_file (0600, checked when the config loads), which restic
reads itself. The repository reaches restic through --repository-file on a pipe, never through
argv (visible in `ps`), and every message shows it with a password in its URL masked
(user:***@), restic's own messages included.
"""

import json
import os
import shutil
from pathlib import Path

from . import backups
from .errors import DeployError
from .files import fsync_dir, make_private_dir, remove_quietly, write_atomic
from .offsite_engines import (  # noqa: F401 (the engines' names, as offsite's callers know them)
    FILE_RE, LIST_TIMEOUT, LONG_TIMEOUT, MANIFEST_LIMIT, NOT_THERE, SHORT_TIMEOUT, STAGE_PREFIX, UNFINISHED_AGE, Borg,
    Copy, Engine, Restic, engine, page_size, reason, remove_unfinished)
from .state import age_seconds, now_iso

ROLLBACK_LIST_TIMEOUT = 5  # a rollback never waits longer than this on the off-site listing
STALE_HOURS = 26          # a nightly copy more than a day and two hours old: a night was missed


# -- for rollback.py: bounded listing, verified fetch ------------------------------------------------
def copies_for(config, env, timeout=ROLLBACK_LIST_TIMEOUT):
    """(env's off-site copies of this config, newest first; None) or ([], why they could not be
    listed), within timeout seconds whatever the network does (a black-holed repository held every
    rollback for 300 s); ([], None) without [offsite]. Never raises for the repository's trouble."""
    if not config.offsite:
        return [], None
    try:
        return engine(config.offsite).copies(env.name, timeout=timeout), None
    except DeployError as exc:
        return [], str(exc)


def fetch_for(config, copy, env):
    """Fetch copy (one of copies_for's) for a rollback of env: verified (env, sha256, integrity) in a
    fresh private folder under env's backup folder, then linked beside the local backups under its
    own name when no file there has that name (a local backup like any other: listed, pruned by
    [retention]); else it stays in that folder. Returns the backups.Backup; raises DeployError."""
    if not config.offsite:
        raise DeployError(f"{copy.file} is an off-site copy, but {config.file} has no [offsite] any more")
    backup = engine(config.offsite).fetch(copy, env.backup_dir, env.name)
    return publish(backup, env.backup_dir)


def publish(backup, folder):
    """Link a fetched, verified backup from its own folder into folder under its name: the database and
    unit file first, the manifest last (then it counts). os.link never replaces a file: if any name is
    taken, the links made are undone and the backup stays where it is. Returns the Backup where it is."""
    stage, folder = Path(backup.path).parent, Path(folder)
    names = [(Path(backup.path), folder / Path(backup.path).name)]
    if backup.unit_backup:
        names.append((Path(backup.unit_backup), folder / Path(backup.unit_backup).name))
    made = []
    moved = backups.Backup(**{**backup.to_json(), "path": str(folder / Path(backup.path).name),
                              "unit_backup": str(names[1][1]) if backup.unit_backup else None})
    manifest_tmp = stage / ".published.json"
    try:
        for source, target in names:
            os.link(source, target)
            made.append((source, target))
        write_atomic(manifest_tmp, json.dumps(moved.to_json(), indent=2) + "\n")
        os.link(manifest_tmp, moved.manifest_path)
        remove_quietly(manifest_tmp)
    except (OSError, DeployError):          # a name taken (or a link refused): it stays in its own folder
        for source, target in made:
            try:
                if os.path.samefile(source, target):    # ours: the same inode, never a file someone else made
                    remove_quietly(target)
            except OSError:
                pass
        remove_quietly(manifest_tmp)
        return backup
    fsync_dir(folder)
    shutil.rmtree(stage, ignore_errors=True)
    return moved


# -- when the last copy reached off-site ------------------------------------------------------------
def pushed_path(env):
    return env.state_dir / f"{env.name}.offsite.json"


def record_push(env, backup, result):
    make_private_dir(env.state_dir)
    write_atomic(pushed_path(env), json.dumps({"time": backup.time, "file": Path(backup.path).name, **result}) + "\n")


def last_push(env):
    try:
        return json.loads(pushed_path(env).read_text())
    except (OSError, ValueError):
        return None


def stale(env):
    """Why env's off-site copies are stale (a message), or None: the last copy that reached off-site
    is older than STALE_HOURS, or none has since the first run that expected one (recorded then)."""
    last = last_push(env)
    if last is None:
        make_private_dir(env.state_dir)
        write_atomic(pushed_path(env), json.dumps({"expected_since": now_iso()}) + "\n")
        return None
    when = last.get("time") or last.get("expected_since")
    age = age_seconds(when)
    if age is None or age <= STALE_HOURS * 3600:
        return None
    if last.get("time"):
        return (f"the last backup of {env.name} that reached off-site was taken {age / 3600:.0f} hours ago "
                f"({last.get('file')}); every copy since stayed on this host's disk")
    return f"no backup of {env.name} has reached off-site in the {age / 3600:.0f} hours since [offsite] was first used"
