"""backup.py --list, --verify, --release-hold: every backup, local and off-site, named and checked.

listing: every backup of the envs, newest first, with where its copies are (local, offsite, or both), as
backup.py --list --json prints them; verify: each local backup re-hashed and integrity-checked, then the
off-site repository's own check and the newest off-site copy of each env restored and checked."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from . import backups, offsite
from .errors import DeployError, usage_error
from .output import Output
from .state import JsonLog, now_iso

KEYS = ("env", "path", "time", "bytes", "sha256", "reason", "commit", "schema", "held")


@dataclass
class Listing:
    """backup.py --list's rows (local and off-site copies, newest first), and why off-site ones could not be listed."""
    rows: list[dict] = field(default_factory=list)     # newest first
    identity: dict | None = None        # which of the off-site repository's copies are this config's
    problem: str | None = None          # why the off-site copies could not be listed

    def to_json(self) -> dict:
        return {"backups": self.rows, **({"offsite": self.identity} if self.identity else {})}


def listing(config, envs) -> Listing:
    """Every backup, newest first, with where its copies are: local, offsite, or both."""
    found = [b for env in envs for b in backups.list_backups(env.backup_dir)]
    names = {e.name for e in envs}
    remote: list = []
    problem, others = None, 0
    if config.offsite:
        try:
            remote, others = offsite.engine(config.offsite).scan()      # this config's copies only
            remote = [c for c in remote if c.env in names]
        except DeployError as exc:
            problem = str(exc)
    remote_files = {c.file for c in remote}
    local_files = {Path(b.path).name for b in found}
    known = bool(config.offsite) and not problem        # else whether a copy is off-site too is not known

    def where(b) -> dict:
        there = Path(b.path).name in remote_files
        return {"location": "both" if known and there else "local", "offsite": there if known else None}

    rows = [{**{k: getattr(b, k) for k in KEYS}, "rows": b.rows_total, **where(b)} for b in found]
    rows += [{"env": c.env, "path": None, "time": c.time, "bytes": None, "sha256": c.sha256, "reason": c.reason,
              "commit": c.commit, "schema": None, "held": False, "rows": c.rows_total, "location": "offsite",
              "offsite": True,
              "snapshot": c.id, "file": c.file} for c in remote if c.file not in local_files]
    rows.sort(key=lambda r: r["time"] or "", reverse=True)
    identity = {"repository": config.offsite.shown, "host": config.offsite.host, "config": config.offsite.id,
                "others": others} if config.offsite else None
    return Listing(rows, identity, problem)


def find_backup(envs, name: str):
    """A backup named by its path, its file name or its id (the file name without .sqlite3), as status, --list
    and rollback.py --list print them."""
    wanted = Path(name.removesuffix(".json")).resolve()
    for env in envs:
        for b in backups.list_backups(env.backup_dir):
            if Path(b.path).resolve() == wanted or name in (Path(b.path).name, Path(b.path).name.removesuffix(".sqlite3")):
                return b
    raise usage_error(f"{name}: not a backup with a manifest in any env's backup folder")


def env_of(envs, backup):
    return next(e for e in envs if Path(backup.path).parent == e.backup_dir)


def release_hold(envs, wanted: str, user: str):
    """The rows a copy holds that the live database lacks are not wanted back (deleted on purpose): the row
    ledger stops counting the copy, and a held copy is no longer kept from prune. The backup."""
    backup = find_backup(envs, wanted)
    env = env_of(envs, backup)
    JsonLog(env.state_dir / f"{env.name}.dismissed.jsonl").append(
        {"time": now_iso(), "id": Path(backup.path).name.removesuffix(".sqlite3"), "sha256": backup.sha256, "by": user})
    if backup.held:
        backups.release_hold(backup)
    return backup


def verify(config, envs, file: str, quiet: bool, out: Output) -> list[str]:
    """--verify [FILE]: FILE, else every local backup of envs and (with [offsite]) the off-site side; the problems."""
    targets = [find_backup(envs, file)] if file else [b for env in envs for b in backups.list_backups(env.backup_dir)]
    problems = []
    for b in targets:
        verdict = backups.verify_backup(b)
        if verdict != "ok":
            problems.append(f"BAD backup {b.path}: {verdict}")
            out.err(f"error: {problems[-1]}")
        elif not quiet:
            out.say(f"{out.mark(True)}  {b.path}")
    if not quiet:
        out.say(f"{len(targets) - len(problems)} of {len(targets)} backups good")
    if config.offsite and not file:
        problems += verify_offsite(config, envs, quiet, out)
    return problems


def verify_offsite(config, envs, quiet: bool, out: Output) -> list[str]:
    """The engine's check (restic: a tenth of the data packs read back; borg: the newest archives' data
    verified), then the newest off-site copy of each env
    restored to a temp folder and checked (sha256, integrity) like a local one."""
    engine = offsite.engine(config.offsite)
    try:
        if not engine.exists():
            raise DeployError(f"there is no repository at {config.offsite.shown} yet: no backup has reached "
                              "off-site (the next backup.py run makes it)")
        checked = engine.check()
        copies = engine.copies()
    except DeployError as exc:
        out.err(f"error: off-site repository: {exc}")
        return [str(exc)]
    if not quiet:
        out.say(f"{out.mark(True)}  off-site repository {config.offsite.shown}: {checked}")
    problems = []
    for env in envs:
        newest = next((c for c in copies if c.env == env.name), None)
        problem = check_newest(engine, env, newest, quiet, out)
        if problem:
            problems.append(problem)
    return problems


def check_newest(engine, env, newest, quiet: bool, out: Output) -> str | None:
    """env's newest off-site copy restored to a temp folder and checked; the problem, or None."""
    if newest is None:
        if not quiet:
            out.say(f"   {env.name}: no off-site copy yet")
        return None
    with tempfile.TemporaryDirectory(prefix="safe-deploy-verify-") as scratch:
        try:
            engine.fetch(newest, Path(scratch), env.name)
        except DeployError as exc:
            out.err(f"error: BAD off-site copy of {env.name}: {exc}")
            return str(exc)
    if not quiet:
        out.say(f"{out.mark(True)}  {env.name}: newest off-site copy {newest.file} restored to a temp folder: "
                "sha256 and integrity ok")
    return None
