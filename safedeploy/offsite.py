"""Off-site copies ([offsite]) through restic's CLI: copies that survive the loss of this host's disk.

restic does what this would otherwise do badly by hand: content-defined chunking (a night in which
1% of a database's pages changed adds about 1% of it, not a whole copy), encryption, any backend
(a folder on another disk, sftp:, S3, B2, rest-server) and `check` that reads the packs back. It
is driven through its CLI with --json; every call has a timeout and never asks for a password.

Each verified local backup becomes one snapshot holding the database copy, its manifest and its
unit file, tagged `safe-deploy`, `env=`, `reason=`, `commit=`, `sha256=`, `file=` (the copy's file
name, which is how a local copy and its off-site twin are matched) and `time=` (the backup's own).
A copy fetched back is written beside the local ones under the same name and is trusted only
after its sha256 and SQLite's integrity_check pass, like a local one.

The password lives in password_file (0600, checked when the config loads); restic reads it
itself, so it never passes through this process's arguments, output, logs or alerts.
"""

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from . import backups
from .errors import DeployError
from .files import fsync_dir, make_private_dir, remove_quietly, temp_path_for, write_atomic
from .state import age_seconds, now_iso

SHORT_TIMEOUT = 300       # listing, forget, init, dump of a manifest
LONG_TIMEOUT = 6 * 3600   # backup, prune, check, dump of a database: bounded, but never cut a big copy short
STALE_HOURS = 26          # a nightly copy more than a day and two hours old: a night was missed


@dataclass
class Copy:
    """One off-site snapshot of one backup."""
    id: str
    env: str
    file: str
    time: str
    reason: str
    commit: str
    sha256: str
    paths: list

    @property
    def name(self):
        return self.file.removesuffix(".sqlite3")

    @property
    def path(self):
        """What retention keys by: the file name (the same for a local copy and its off-site twin)."""
        return self.file


class Restic:
    def __init__(self, offsite):
        self.offsite = offsite

    def run(self, *args, timeout=SHORT_TIMEOUT, stdout=None):
        """restic ARGS; its output as text, or into the open file stdout (a dump). Reads take no lock."""
        lock = ["--no-lock"] if args[0] in ("snapshots", "dump") else []
        options = [x for o in self.offsite.options for x in ("-o", o)]
        argv = ["restic", "--repo", self.offsite.repository, "--password-file", str(self.offsite.password_file),
                *lock, *options, *args]
        env = {k: v for k, v in os.environ.items() if not k.startswith("RESTIC_")}
        try:
            proc = subprocess.run(argv, stdout=stdout or subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout,
                                  env=env, stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            raise DeployError("restic is not installed (apt-get install restic): [offsite] needs it") from None
        except subprocess.TimeoutExpired:
            raise DeployError(f"restic {args[0]} on {self.offsite.repository} did not finish within {timeout}s") from None
        if proc.returncode != 0:
            error = DeployError(f"restic {args[0]} on {self.offsite.repository} failed: {reason(proc.stderr)}")
            error.stderr = proc.stderr.decode(errors="replace")
            raise error
        return proc.stdout.decode(errors="replace") if stdout is None else ""

    def ensure_repository(self):
        """Open the repository; initialise it when there is none there yet (first use)."""
        if not self.exists():
            self.run("init")

    def exists(self):
        """True when the repository opens; False when there is none there yet; DeployError otherwise
        (unreachable, or the password does not open it)."""
        try:
            self.run("cat", "config")
        except DeployError as exc:
            text = getattr(exc, "stderr", "") or str(exc)
            if "wrong password" in text or "no key found" in text:
                raise DeployError(f"off-site repository {self.offsite.repository}: the password in "
                                  f"{self.offsite.password_file} does not open it") from None
            if not any(s in text for s in ("does not exist", "Is there a repository", "unable to open config file")):
                raise
            return False
        return True

    def copies_if_any(self, env_name=None):
        """copies(), or [] when no repository was made yet (no backup has been pushed): listing never creates one."""
        return self.copies(env_name) if self.exists() else []

    # -- copies ----------------------------------------------------------------------------------
    def push(self, backup, host):
        """Store a verified local backup (database, manifest, unit file) as one snapshot."""
        paths = [p for p in (backup.path, str(backup.manifest_path), backup.unit_backup) if p and Path(p).exists()]
        tags = ["safe-deploy", f"env={backup.env}", f"reason={backup.reason}", f"commit={backup.commit}",
                f"sha256={backup.sha256}", f"file={Path(backup.path).name}", f"time={backup.time}"]
        start = time.monotonic()
        out = self.run("backup", "--json", "--host", host, *[x for t in tags for x in ("--tag", t)], *paths,
                       timeout=LONG_TIMEOUT)
        summary = {}
        for line in out.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("message_type") == "summary":
                summary = record
        return {"snapshot": summary.get("snapshot_id", ""), "added": summary.get("data_added", 0),
                "seconds": round(time.monotonic() - start, 2)}

    def copies(self, env_name=None):
        """The off-site copies, newest first (of one env, or all)."""
        tag = "safe-deploy" + (f",env={env_name}" if env_name else "")
        out = self.run("snapshots", "--json", "--tag", tag)
        found = []
        for snap in json.loads(out or "[]") or []:
            tags = dict(t.split("=", 1) for t in snap.get("tags", []) if "=" in t)
            if not tags.get("file") or not tags.get("sha256"):
                continue
            found.append(Copy(id=snap["id"], env=tags.get("env", ""), file=tags["file"],
                              time=tags.get("time") or snap.get("time", ""), reason=tags.get("reason", ""),
                              commit=tags.get("commit", ""), sha256=tags["sha256"], paths=snap.get("paths", [])))
        return sorted(found, key=lambda c: c.time, reverse=True)

    def fetch(self, copy, folder):
        """Bring a copy back into folder under its own name; return the Backup once its sha256 and
        integrity check pass. A copy that fails is removed again and the error says why."""
        folder = make_private_dir(folder)
        db_file = folder / copy.file
        if db_file.exists():
            raise DeployError(f"{db_file} exists already: it is the local copy; use it")
        written = []
        try:
            for source in copy.paths:           # the copy, its manifest, its unit file: their own names
                target = folder / Path(source).name
                self.dump(copy.id, source, target)
                written.append(target)
            manifest = json.loads((folder / (copy.file + ".json")).read_text())
            manifest.update(path=str(db_file), unit_backup=str(db_file.with_suffix(".unit"))
                            if db_file.with_suffix(".unit").exists() else None)
            backup = backups.Backup(**{k: v for k, v in manifest.items() if k in backups.Backup.__dataclass_fields__})
            problem = backups.verify_backup(backup) if backup.sha256 == copy.sha256 else "its sha256 is not the tagged one"
            if problem != "ok":
                raise DeployError(f"the off-site copy {copy.file} (snapshot {copy.id[:8]}) does not verify: {problem}")
            write_atomic(backup.manifest_path, json.dumps(backup.to_json(), indent=2) + "\n")
        except (DeployError, OSError, ValueError, TypeError) as exc:
            for path in written:
                remove_quietly(path)
            if isinstance(exc, DeployError):
                raise
            raise DeployError(f"the off-site copy {copy.file} could not be read back: {exc}") from None
        return backup

    def dump(self, snapshot, source, target):
        tmp = temp_path_for(target)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as fh:
                self.run("dump", snapshot, source, timeout=LONG_TIMEOUT, stdout=fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
            fsync_dir(target.parent)
        except BaseException:
            remove_quietly(tmp)
            raise

    # -- retention and checks ----------------------------------------------------------------------
    def forget(self, copies):
        if copies:
            self.run("forget", *[c.id for c in copies], timeout=LONG_TIMEOUT)

    def prune(self):
        self.run("prune", timeout=LONG_TIMEOUT)

    def check(self, subset="10%"):
        """restic check, reading back a random subset of the data packs."""
        self.run("check", f"--read-data-subset={subset}", timeout=LONG_TIMEOUT)


def reason(stderr):
    """restic's last meaningful line, without the password file's content (restic never prints it)."""
    text = stderr.decode(errors="replace")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    fatal = [line for line in lines if line.startswith("Fatal:")]
    return (fatal[-1] if fatal else lines[-1] if lines else "no message")[:400]


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


# -- what rollback.py asks of the off-site copies ----------------------------------------------------
def copies_for(config, env):
    """(env's off-site copies, None) or ([], why they could not be listed); ([], None) without [offsite]."""
    if not config.offsite:
        return [], None
    try:
        return Restic(config.offsite).copies_if_any(env.name), None
    except DeployError as exc:
        return [], str(exc)


def fetch_for(config, copy, env):
    """A copy fetched back for a rollback, verified: a backups.Backup."""
    return Restic(config.offsite).fetch(copy, env.backup_dir)
