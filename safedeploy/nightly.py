"""backup.py's backups: each env's database copied under its lock (safedeploy.backups), then off-site
(OffsiteRun: the repository opened once, every earlier copy not there yet pushed after the new one).
What happens is said through an Output (safedeploy.output); the exit code is returned."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from . import backups, journals, offsite, oplog, records, recovery, units
from .commandline import script_command
from .errors import EXIT_FAILED, EXIT_LOCKED, DeployError
from .gitrepo import Repo
from .output import Output
from .saying import notify
from .journals import BackupJournal, backup_journal_path
from .state import EnvLock, StepClock, parse_time

Progress = Callable[[int, int], None]


def back_up_all(config, envs, reason: str, lock_wait: float, quiet: bool, out: Output,
                progress_for: Callable[[object], Progress | None]) -> int:
    """Back up each env (then off-site); 0, EXIT_LOCKED when every failure was a lock held, else EXIT_FAILED."""
    remote = OffsiteRun(config, quiet, out)
    remote.warn_if_stale(envs)
    codes = []
    for env in envs:
        try:
            backup = back_up_env(config, env, reason, lock_wait, None if quiet else progress_for(env))
        except DeployError as exc:
            out.err(f"error: backup of {env.name} failed: {exc} {out.full_output(env.name)}".rstrip())
            oplog.mark(env.name, False)
            codes.append(exc.code)
            if exc.code != EXIT_LOCKED:
                notify(config, out, "backup-failed", env.name, f"the {reason} backup of {env.name} failed: {exc}",
                       script_command(config, "backup.py", env.name))
            continue
        if not quiet:
            out.say(f"backed up {env.name}: {backup.path} ({backup.bytes / 1e6:.1f} MB, "
                    f"sha256 {backup.sha256[:12]}, integrity ok, {backup.seconds:.2f}s)")
        ok = remote.push(env, backup)
        oplog.mark(env.name, ok)
        if not ok:
            codes.append(EXIT_FAILED)
    if not codes:
        return 0
    return EXIT_LOCKED if EXIT_LOCKED in codes and len(set(codes)) == 1 else EXIT_FAILED


class OffsiteRun:
    """The off-site side of one backup.py run: the repository opened (and initialised) once."""

    def __init__(self, config, quiet: bool, out: Output):
        self.config, self.quiet, self.out = config, quiet, out
        self.engine = offsite.engine(config.offsite) if config.offsite else None
        self.opened = False

    def open(self):
        if not self.opened:
            self.engine.ensure_repository()
            self.opened = True
        return self.engine

    def warn_if_stale(self, envs) -> None:
        if not self.engine:
            return
        for env in envs:
            try:
                why = offsite.stale(env)
            except DeployError as exc:         # the state folder is full or unwritable: the backup still runs
                why = f"when {env.name}'s last copy reached off-site is unknown: {exc}"
            if why:
                self.out.err(f"warning: off-site copies are stale: {why}")
                notify(self.config, self.out, "offsite-stale", env.name, why,
                       script_command(self.config, "backup.py", env.name))

    def push(self, env, backup) -> bool:
        """Copy a verified local backup off-site, then every earlier one of env that is not there yet (the
        copies deploys, rollbacks and adoption made: they are pushed here, never during a deploy, so the
        network never slows one down). False (said, alerted) when that failed."""
        if not self.engine:
            return True
        try:
            result = self.open().push(backup)
            offsite.record_push(env, backup, result)
        except DeployError as exc:
            return self.failed(env, f"the off-site copy of {env.name}'s backup {backup.path} failed: {exc}. The "
                               "local backup is verified; it is on this host's disk only")
        if not self.quiet:
            self.out.say(f"  off-site: snapshot {result['snapshot'][:8]} in {self.config.offsite.shown}, "
                         f"{result['added'] / 1e6:.1f} MB added, {result['seconds']:.1f}s")
        try:
            caught_up = self.catch_up(env, backup)
        except DeployError as exc:
            return self.failed(env, f"{backup.path} reached off-site, but an earlier backup of {env.name} that was "
                               f"not there yet could not be copied: {exc}")
        if caught_up and not self.quiet:
            self.out.say(f"  off-site: also sent {len(caught_up)} earlier backup(s) that were on this host only: "
                         f"{', '.join(caught_up)}")
        return True

    def failed(self, env, message: str) -> bool:
        self.out.err(f"error: {message} {self.out.full_output(env.name)}".rstrip())
        notify(self.config, self.out, "offsite-failed", env.name, message,
               script_command(self.config, "backup.py", env.name))
        return False

    def catch_up(self, env, pushed) -> list[str]:
        engine = self.open()
        there = {c.file for c in engine.copies(env.name)}
        done = []
        for b in reversed(backups.list_backups(env.backup_dir)):        # oldest first
            name = Path(b.path).name
            if name in there or b.path == pushed.path or backups.verify_backup(b) != "ok":
                continue
            engine.push(b)
            done.append(f"{name.removesuffix('.sqlite3')}")
        return done


def look_with(config) -> Callable[[str], str]:
    return lambda name: script_command(config, "status.py", name)


def back_up_env(config, env, reason: str, lock_wait: float, progress: Progress | None = None):
    with EnvLock(env.state_dir, env.name, f"backup ({reason})", wait=lock_wait):
        clean_up_interrupted(env)
        journal = BackupJournal(reason=reason)
        journal.start(backup_journal_path(env.state_dir, env.name))
        try:
            return backups.backup_database(env.db, env.backup_dir, env.name, reason, commit=commit_running(env),
                                           unit_file=unit_file(env), progress=progress,
                                           clock=StepClock(journal, "backup", look_with=look_with(config)),
                                           bookkeeping=env.bookkeeping)
        finally:
            journal.finish()


def clean_up_interrupted(env) -> None:
    """A killed backup left temp files: remove them. A killed deploy or rollback is left for the
    next deploy.py or rollback.py, which finishes or undoes it (backups never change what runs)."""
    path = backup_journal_path(env.state_dir, env.name)
    if journals.read(path) is not None:            # whole or damaged: a backup was killed
        recovery.remove_temp_files(env)
        journals.remove(path)


def commit_running(env) -> str:
    try:
        return records.running_commit(records.read(env)) or Repo(env.path).head()
    except DeployError:
        return ""


def unit_file(env) -> str | None:
    try:
        path = units.state(env.unit).fragment_path
    except DeployError:
        return None
    return path if path and Path(path).is_file() else None


def commit_at(env, moment) -> str:
    """The commit env ran at moment, by its deploy log (else what runs now)."""
    try:
        found = records.read(env)
    except DeployError:
        found = []
    before = [r for r in found if r.running and parse_time(r.time) and parse_time(r.time) <= moment]
    if before:
        return before[-1].running
    first = next((getattr(r, "from_", None) for r in found if getattr(r, "from_", None)), None)
    return first or commit_running(env)
