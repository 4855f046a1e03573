"""backup.py --prune: [retention] on each env's local backups under its lock, then on this config's
off-site copies with no lock held (a repository that does not answer must never keep a rollback waiting:
a black-holed one held the env lock for 300 s, and every rollback behind it). Said through an Output."""

from __future__ import annotations

from pathlib import Path

from . import adoption, backups, offsite, restore, retention
from .commandline import script_command
from .errors import EXIT_FAILED, DeployError
from .output import Output
from .saying import notify
from .state import EnvLock

HELD = "holds rows a restore took out (backup.py --release-hold FILE lets prune remove it)"


def prune(config, envs, lock_wait: float, dry_run: bool, quiet: bool, out: Output) -> int:
    """Local prune of each env under its lock; then the off-site side. 0, or EXIT_FAILED."""
    bad, plans = False, []
    for env in envs:
        with EnvLock(env.state_dir, env.name, "prune", wait=lock_wait):
            found = backups.list_backups(env.backup_dir)
            protected = retention.protected(
                env, found, (adoption.read_doc(config)["envs"].get(env.name) or {}).get("backup"))
            keep, remove = prune_local(env, found, config.retention, protected, dry_run, quiet, out)
            if not keep and found:
                bad = True
            # what must stay off-site, by file name: decided under the lock, applied after it
            by_name = {Path(path).name: why for path, why in protected.items()}
            by_name.update({Path(b.path).name: "held" for b in found if b.held})
            plans.append((env, by_name))
    if config.offsite and not prune_offsite(config, plans, dry_run, quiet, out):
        bad = True
    return EXIT_FAILED if bad else 0


def prune_local(env, found, policy, protected, dry_run: bool, quiet: bool, out: Output):
    """The plan for env's backups, applied (unless dry_run): (kept {path: why}, removed)."""
    keep, remove = retention.prune_plan(found, policy, protected)
    for b in remove:
        if b.held:
            keep[b.path] = HELD
    remove = [b for b in remove if not b.held]
    for b in remove:
        if not dry_run:
            backups.remove_backup(b)
        if not quiet or dry_run:
            out.say(f"{'would remove' if dry_run else 'removed'} {b.path} ({b.reason}, {b.time})")
    drop_stale_spares(env, [b for b in found if b.path in keep], dry_run, quiet, out)
    if not quiet:
        out.say(f"{env.name}: kept {len(keep)}, {'would remove' if dry_run else 'removed'} {len(remove)}")
    return keep, remove


def drop_stale_spares(env, kept, dry_run: bool, quiet: bool, out: Output) -> None:
    """A deploy's spare (restore.make_spare) whose backup is not kept goes with it: no rollback can take it."""
    for spare in restore.stale_spares(env.db, {b.sha256 for b in kept}):
        if not dry_run:
            try:
                restore.remove_spare(spare)
            except DeployError as exc:
                out.warn(str(exc))
                continue
        if not quiet or dry_run:
            out.say(f"{'would remove' if dry_run else 'removed'} {spare} (the deploy's spare of a backup not kept)")


def prune_offsite(config, plans, dry_run: bool, quiet: bool, out: Output) -> bool:
    """[retention] on this config's off-site copies (never another host's or config's), env by env,
    then one prune (restic prune, borg compact). Stale locks (a restic killed mid-push) are cleared first:
    restic unlock removes only stale ones (borg removes its own). True when all went well."""
    engine, ok, forgot = offsite.engine(config.offsite), True, False
    try:
        if not dry_run:
            engine.unlock()
        mine = engine.copies()          # one listing for every env
    except DeployError as exc:
        return offsite_prune_failed(config, out, None, exc)
    for env, by_name in plans:
        try:
            removed = forget_env(config, engine, env, [c for c in mine if c.env == env.name], by_name, dry_run, quiet, out)
        except DeployError as exc:
            ok = offsite_prune_failed(config, out, env.name, exc) and ok
            continue
        forgot = forgot or (bool(removed) and not dry_run)
    if forgot:
        try:
            engine.prune()      # once for every env: restic's prune rewrites packs, borg's compact frees segments
        except DeployError as exc:
            out.err(f"error: off-site prune failed: {exc}; the forgotten copies' data stays in the repository until "
                    "the next --prune")
            notify(config, out, "offsite-failed", None, f"the off-site prune failed: {exc}",
                   script_command(config, "backup.py", "--prune"))
            ok = False
    return ok


def forget_env(config, engine, env, copies, by_name: dict, dry_run: bool, quiet: bool, out: Output) -> list:
    """[retention] on env's off-site copies (the copy with the most rows kept, wherever it is); the forgotten."""
    most = retention.richest(copies + [b for b in backups.list_backups(env.backup_dir)])
    if most:            # the copy with the data, wherever it is (off-site only on a rebuilt host)
        by_name.setdefault(Path(most.path).name, retention.RICHEST.format(n=most.rows_total))
    keep, remove = retention.prune_plan(copies, config.retention, by_name)
    for c in remove:
        if not quiet or dry_run:
            out.say(f"{'would forget' if dry_run else 'forgot'} off-site {c.file} (snapshot {c.id[:8]}, {c.time})")
    if not dry_run:
        engine.forget(remove)
    if not quiet:
        out.say(f"{env.name} off-site: kept {len(keep)}, {'would forget' if dry_run else 'forgot'} {len(remove)}")
    return remove


def offsite_prune_failed(config, out: Output, env_name: str | None, exc: DeployError) -> bool:
    what = f"the off-site prune of {env_name}" if env_name else "the off-site prune"
    out.err(f"error: {what} failed: {exc}; nothing more was removed off-site")
    notify(config, out, "offsite-failed", env_name, f"{what} failed: {exc}", script_command(config, "backup.py", "--prune"))
    return False
