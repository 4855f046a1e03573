"""The off-site engines behind one interface (Engine): restic (Restic, the default) and borg (Borg).

restic does what this would otherwise do badly by hand: content-defined chunking (a night in which
a run of pages changed adds about that run, not a whole copy; scattered pages touch most of its
~1 MiB chunks, which is where borg's fixed chunker does better), encryption, any backend
(a folder on another disk, sftp:, S3, B2, rest-server) and `check` that reads the packs back. It
is driven through its CLI with --json, through commands.run: every call is bounded (a listing for
a rollback by a few seconds, see copies_for), killed with its process group past its bound (an
ssh it started too), and never asks for a password.

Identity, confinement and masking are Engine's, once (see safedeploy.offsite's contract); how to list,
store, read and delete is each engine's own.
"""

import json
import os
import shlex
import shutil
import socket
import tempfile
import time
from pathlib import Path

from . import backups, commands
from .config import mask
from .errors import DeployError
from .files import fsync_dir, make_private_dir, remove_quietly, write_atomic
from .offsite_copies import FILE_RE, Copy, fetched_manifest_problem, sources_in

LIST_TIMEOUT = 60         # a listing for backup.py (a rollback's: copies_for, a few seconds)
SHORT_TIMEOUT = 300       # forget, init, unlock, the repository's config, the dump of a manifest
LONG_TIMEOUT = 6 * 3600   # backup, prune, check, dump of a database: bounded, but never cut a big copy short
MANIFEST_LIMIT = 1 << 20  # a manifest is a few hundred bytes: a bigger one is not read
# "no repository there yet": restic cannot open the config file because it is not there. restic says
# "Is there a repository at ...?" after every failure to open it, a refused connection included:
# that alone is trouble, never "none yet" (a dead server listed as an empty repository, exit 0)
NOT_THERE = ("no such file or directory", "does not exist", "not found", "404")


class Engine:
    """What backup.py and rollback.py use of an off-site engine, whichever it is (engine() picks it):
    scan/copies (this config's copies), push (a verified backup), fetch (a copy back, verified), forget,
    prune, check, unlock, ensure_repository. Identity, confinement, masking and the verified fetch are
    here, once; how to list, store, read and delete is each engine's own (run, scan, push, dump,
    forget, prune, check, unlock, exists, no_repository)."""
    program = ""

    def __init__(self, offsite):
        self.offsite = offsite
        self.host = offsite.host or socket.gethostname()
        if not offsite.id:
            raise DeployError("[offsite] has no config id (config.load sets one): refusing to list or push copies "
                              "that would not say whose they are")
        self.id = offsite.id

    @property
    def shown(self):
        return self.offsite.shown

    def mask(self, text):
        text = mask(text)
        for secret in self.offsite.secrets:
            text = text.replace(secret, "***")
        return text

    # -- whose copies -------------------------------------------------------------------------------
    def tags(self, backup):
        """The labels a copy carries (restic: tags; borg: the archive's comment): whose, and what it is."""
        return ["safe-deploy", f"host={self.host}", f"config={self.id}", f"env={backup.env}", f"reason={backup.reason}",
                f"commit={backup.commit}", f"sha256={backup.sha256}", f"file={Path(backup.path).name}",
                f"time={backup.time}"] + ([f"rows={backup.rows_total}"] if backup.rows_total is not None else [])

    def copy_from(self, id, labels, paths, host, fallback_time=""):
        """A Copy from a copy's labels (None: not a safe-deploy copy of a backup)."""
        tags = dict(t.split("=", 1) for t in labels if "=" in t)
        if "safe-deploy" not in labels or not tags.get("file") or not tags.get("sha256"):
            return None
        return Copy(id=id, env=tags.get("env", ""), file=tags["file"], time=tags.get("time") or fallback_time,
                    reason=tags.get("reason", ""), commit=tags.get("commit", ""), sha256=tags["sha256"],
                    paths=paths, host=host, config=tags.get("config", ""),
                    rows=int(tags["rows"]) if tags.get("rows", "").isdigit() else None)

    def sorted_ours(self, found):
        """(this config's copies newest first, how many other safe-deploy copies)."""
        mine = [c for c in found if self.ours(c)]
        return sorted(mine, key=lambda c: c.time, reverse=True), len(found) - len(mine)

    def ensure_repository(self):
        """Open the repository; initialise it when there is none there yet (first use)."""
        if not self.exists():
            self.run(*self.INIT)

    def exists(self, timeout=SHORT_TIMEOUT):
        """True when the repository opens; False when there is none there yet; DeployError otherwise
        (unreachable, or the password does not open it)."""
        return self.run_if_there(*self.PROBE, timeout=timeout) is not None

    def run_if_there(self, *args, timeout=SHORT_TIMEOUT):
        """run(ARGS)'s output, or None when there is no repository there yet (listing, probing and
        unlocking never make one); any other failure raises (no_repository says which)."""
        try:
            return self.run(*args, timeout=timeout)
        except DeployError as exc:
            if not self.no_repository(exc):
                raise
            return None

    def no_repository(self, exc):
        """Whether exc says there is no repository there yet (else: raise it, or a clearer one)."""
        text = getattr(exc, "stderr", "") or str(exc)
        if self.wrong_password(text):
            raise DeployError(f"off-site repository {self.shown}: the password in "
                              f"{self.offsite.password_file} does not open it") from None
        return self.not_there(text)

    def outcome(self, what, done, timeout, stdout, ok=(0,)):
        """What a finished call of the engine gives: its output as text (or "" when it went into the file
        stdout); raises when it ran past timeout or exited with a code not in ok."""
        if done.timed_out:
            raise DeployError(f"{self.program} {what} on {self.shown} did not finish within {timeout:g}s (stopped)")
        if done.returncode not in ok:
            raise self.failed(what, done)
        return done.stdout.decode(errors="replace") if stdout is None else ""

    def failed(self, what, done):
        error = DeployError(f"{self.program} {what} on {self.shown} failed: {self.mask(reason(done.stderr))}")
        error.stderr = self.mask(done.stderr.decode(errors="replace"))
        return error

    def write_dump(self, target, limit, read):
        """read(open file) writes one stored file into target, a new file (O_EXCL: never an existing one)."""
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as fh:
            read(fh)
            fh.flush()
            os.fsync(fh.fileno())
            if limit and fh.tell() > limit:
                raise DeployError(f"{os.path.basename(target)} is {fh.tell()} bytes: not a manifest or a unit file")
        fsync_dir(target.parent)

    def ours(self, copy):
        """This config's copy: its config id; or, pushed before that tag existed, this host's (restic's --host)."""
        return copy.config == self.id if copy.config else copy.host == self.host

    def copies(self, env_name=None, timeout=LIST_TIMEOUT):
        """This config's off-site copies, newest first (of one env, or all)."""
        found, _ = self.scan(timeout)
        return [c for c in found if env_name is None or c.env == env_name]

    # -- copies ----------------------------------------------------------------------------------
    def refuse_unless_wanted(self, copy: Copy, env_name: str) -> None:
        """A DeployError unless copy is this config's, of env_name, under a backup's file name."""
        if not self.ours(copy):
            raise DeployError(f"the off-site copy {copy.file} (snapshot {copy.id[:8]}) is not this config's "
                              f"(host {copy.host!r}, config {copy.config or '-'}): refused")
        if copy.env != env_name:
            raise DeployError(f"the off-site copy {copy.file} (snapshot {copy.id[:8]}) is tagged env {copy.env!r}, "
                              f"not {env_name!r}: refused")
        if not FILE_RE.match(copy.file):
            raise DeployError(f"the off-site copy {copy.id[:8]} names its file {copy.file!r}: not a backup's name, refused")

    def fetch(self, copy, folder, env_name=None):
        """Bring a copy of env_name (default: the env its tag names) back into a fresh private folder
        made under folder; return the Backup there once it verifies (see the module's contract). A
        copy that fails is removed, with its folder, and the error says why; nothing outside that
        folder is written or removed. (fetch_for also links it beside the local backups.)"""
        env_name = env_name or copy.env
        self.refuse_unless_wanted(copy, env_name)
        stem = copy.file.removesuffix(".sqlite3")
        sources = sources_in(copy)
        folder = make_private_dir(folder)
        remove_unfinished(folder)
        stage = Path(tempfile.mkdtemp(prefix=STAGE_PREFIX + f"{copy.id[:8]}-", dir=folder))
        try:
            # the snapshot's manifest under a name of its own: <file>.json appears only once the copy verifies
            db_file, manifest_file = stage / copy.file, stage / "snapshot-manifest"
            self.dump(copy.id, sources["db"], db_file)
            self.dump(copy.id, sources["manifest"], manifest_file, limit=MANIFEST_LIMIT)
            unit_file = stage / (stem + ".unit")
            if "unit" in sources:
                self.dump(copy.id, sources["unit"], unit_file, limit=MANIFEST_LIMIT)
            manifest = json.loads(manifest_file.read_text())
            problem = fetched_manifest_problem(manifest, copy, env_name)
            if problem:
                raise DeployError(f"the off-site copy {copy.file} (snapshot {copy.id[:8]}) does not verify: {problem}")
            manifest.update(path=str(db_file), unit_backup=str(unit_file) if unit_file.exists() else None)
            backup = backups.Backup(**{k: v for k, v in manifest.items() if k in backups.Backup.__dataclass_fields__})
            verdict = backups.verify_backup(backup)
            if verdict != "ok":
                raise DeployError(f"the off-site copy {copy.file} (snapshot {copy.id[:8]}) does not verify: {verdict}")
            write_atomic(backup.manifest_path, json.dumps(backup.to_json(), indent=2) + "\n")
            remove_quietly(manifest_file)
        except BaseException as exc:
            shutil.rmtree(stage, ignore_errors=True)        # the folder made for it: nothing else
            if isinstance(exc, (OSError, ValueError, TypeError)):
                raise DeployError(f"the off-site copy {copy.file} could not be read back: {exc}") from None
            raise
        return backup


class Restic(Engine):
    """restic: content-defined chunks (about 1 MiB), any backend (a folder, sftp:, S3, B2, REST...)."""
    program = "restic"

    def run(self, *args, timeout=SHORT_TIMEOUT, stdout=None):
        """restic ARGS; its output as text, or into the open file stdout (a dump). Reads take no lock.
        A call refused because the repository is locked runs once more after `restic unlock`, which
        removes only stale locks (a restic killed with SIGKILL left its own); a live one still refuses."""
        try:
            return self.run_once(*args, timeout=timeout, stdout=stdout)
        except DeployError as exc:
            if args[0] == "unlock" or "already locked" not in getattr(exc, "stderr", ""):
                raise
        self.unlock()
        if stdout is not None:
            stdout.seek(0)
            stdout.truncate()
        return self.run_once(*args, timeout=timeout, stdout=stdout)

    def run_once(self, *args, timeout=SHORT_TIMEOUT, stdout=None):
        lock = ["--no-lock"] if args[0] in ("snapshots", "dump", "cat") else []
        options = [x for o in self.offsite.options for x in ("-o", o)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("RESTIC_")}
        # the repository through a pipe restic reads as its --repository-file: never in argv (ps shows
        # argv to every user), never in a file left behind by a kill
        read_end, write_end = os.pipe()
        try:
            os.write(write_end, self.offsite.repository.encode() + b"\n")
            os.close(write_end)
            write_end = None
            argv = ["restic", "--repository-file", f"/dev/fd/{read_end}", "--password-file",
                    str(self.offsite.password_file), *lock, *options, *args]
            done = commands.run(argv, timeout, env=env, stdout="all" if stdout is None else stdout, stderr="tail",
                                pass_fds=(read_end,))
        except FileNotFoundError:
            raise DeployError("restic is not installed (apt-get install restic): [offsite] needs it") from None
        finally:
            os.close(read_end)
            if write_end is not None:
                os.close(write_end)
        return self.outcome(args[0], done, timeout, stdout)

    INIT = ("init",)
    PROBE = ("cat", "config")

    def wrong_password(self, text):
        return "wrong password" in text or "no key found" in text

    def not_there(self, text):
        lines = [line for line in text.splitlines() if "unable to open config file" in line]
        return any(s in line.lower() for line in lines for s in NOT_THERE)

    def scan(self, timeout=LIST_TIMEOUT):
        """(this config's copies, how many other safe-deploy copies the repository holds), newest first.
        One restic call; no repository yet is ([], 0): listing never creates one."""
        out = self.run_if_there("snapshots", "--json", "--tag", "safe-deploy", timeout=timeout)
        if out is None:
            return [], 0
        found = [self.copy_from(snap["id"], snap.get("tags") or [], snap.get("paths") or [], snap.get("hostname", ""),
                                snap.get("time", "")) for snap in json.loads(out or "[]") or []]
        return self.sorted_ours([c for c in found if c])

    def push(self, backup):
        """Store a verified local backup (database, manifest, unit file) as one snapshot of this config."""
        paths = [p for p in (backup.path, str(backup.manifest_path), backup.unit_backup) if p and Path(p).exists()]
        start = time.monotonic()
        out = self.run("backup", "--json", "--host", self.host, *[x for t in self.tags(backup) for x in ("--tag", t)],
                       *paths, timeout=LONG_TIMEOUT)
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

    def dump(self, snapshot, source, target, limit=None):
        """restic dump of one path into target."""
        self.write_dump(target, limit, lambda fh: self.run("dump", snapshot, str(source), stdout=fh,
                                                           timeout=SHORT_TIMEOUT if limit else LONG_TIMEOUT))

    # -- retention and checks ----------------------------------------------------------------------
    def unlock(self):
        """restic unlock: removes only stale locks (a restic killed mid-push, e.g. by kill -9, left one
        that made every forget and prune fail with 'repository is already locked'). No repository yet:
        nothing to unlock."""
        self.run_if_there("unlock", timeout=SHORT_TIMEOUT)

    def forget(self, copies):
        mine = [c for c in copies if self.ours(c)]       # never another host's or config's
        if mine:
            self.run("forget", *[c.id for c in mine], timeout=SHORT_TIMEOUT)

    def prune(self):
        self.run("prune", timeout=LONG_TIMEOUT)

    def check(self, subset="10%"):
        """restic check, reading back a random subset of the data packs; what was checked."""
        self.run("check", f"--read-data-subset={subset}", timeout=LONG_TIMEOUT)
        return f"restic check passed (structure, and {subset} of the data read back)"


class Borg(Engine):
    """borg (1.2): a fixed chunker sized to the database's page (`--chunker-params fixed,PAGE_SIZE`), so a
    night in which scattered pages changed adds about those pages, where restic's ~1 MiB content-defined
    chunks (256 pages each) add most of the file. SQLite's 100-byte header lives inside page 1, so the
    pages start at offsets 0, PAGE_SIZE, 2*PAGE_SIZE... and line up with the chunks with no header
    offset. Repositories: a folder, or ssh://user@host[:port]/path with borg on the other end.

    One archive per backup, named CONFIG_ID-FILE_STEM-SHA256[:12], holding the database, its manifest and its unit
    file under their own names (stored from inside the backup folder); the labels restic keeps as tags
    are the archive's comment (space-separated, no braces: borg expands {placeholders} in comments).
    Secrets: the repository reaches borg as BORG_REPO and the passphrase through BORG_PASSCOMMAND
    (`cat password_file`, run by borg itself), never in argv; options are BORG_* settings. borg removes
    the stale lock of a borg that was killed on this host itself (BORG_HOSTNAME_IS_UNIQUE)."""
    program = "borg"

    def run(self, *args, timeout=SHORT_TIMEOUT, stdout=None, cwd=None):
        env = {k: v for k, v in os.environ.items() if not k.startswith("BORG_")}
        env.update(BORG_REPO=self.offsite.repository,
                   BORG_PASSCOMMAND=shlex.join(["cat", str(self.offsite.password_file)]),
                   BORG_HOSTNAME_IS_UNIQUE="yes", BORG_DISPLAY_PASSPHRASE="no",
                   BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="no", BORG_RELOCATED_REPO_ACCESS_IS_OK="no",
                   BORG_CHECK_I_KNOW_WHAT_I_AM_DOING="NO", BORG_DELETE_I_KNOW_WHAT_I_AM_DOING="NO")
        env.update(o.split("=", 1) for o in self.offsite.options)
        try:
            done = commands.run(["borg", *args], timeout, cwd=cwd, env=env, stdout="all" if stdout is None else stdout,
                                stderr="tail")
        except FileNotFoundError:
            raise DeployError("borg is not installed (apt-get install borgbackup): [offsite] engine = \"borg\" "
                              "needs it") from None
        # 1 is borg's "warning" (a file changed while it was read): fine for a create, a failure for the rest
        return self.outcome(args[0], done, timeout, stdout, ok=(0, 1) if args[0] == "create" else (0,))

    INIT = ("init", "--encryption=repokey-blake2", "--make-parent-dirs")
    PROBE = ("info", "--json")

    def wrong_password(self, text):
        return "passphrase supplied" in text and "is incorrect" in text

    def not_there(self, text):
        return any(line.strip().startswith("Repository ") and line.strip().endswith("does not exist.")
                   for line in text.splitlines())

    def scan(self, timeout=LIST_TIMEOUT):
        out = self.run_if_there("list", "--json", "--format", "{comment}{hostname}", timeout=timeout)
        if out is None:
            return [], 0
        found = []
        for archive in json.loads(out or "{}").get("archives") or []:
            if ".checkpoint" in archive.get("name", ""):
                continue            # what a killed create left: not a copy
            labels = (archive.get("comment") or "").split()
            paths = next((t.split("=", 1)[1].split(",") for t in labels if t.startswith("paths=")), [])
            found.append(self.copy_from(archive["name"], labels, paths, archive.get("hostname", ""),
                                        archive.get("time", "")))
        return self.sorted_ours([c for c in found if c])

    def push(self, backup):
        folder = Path(backup.path).parent
        names = [Path(p).name for p in (backup.path, str(backup.manifest_path), backup.unit_backup)
                 if p and Path(p).exists()]
        name = f"{self.id}-{Path(backup.path).stem}-{backup.sha256[:12]}"      # unique: a name reused holds the same copy
        comment = " ".join(self.tags(backup) + [f"paths={','.join(names)}"])
        start = time.monotonic()
        try:
            out = self.run("create", "--json", "--chunker-params", f"fixed,{page_size(backup.path)}",
                           "--compression", "lz4", "--comment", comment, f"::{name}", *names, cwd=folder,
                           timeout=LONG_TIMEOUT)
        except DeployError as exc:
            if "already exists" not in (getattr(exc, "stderr", "") or ""):
                raise
            same = [c for c in self.copies(backup.env) if c.id == name and c.sha256 == backup.sha256]
            if not same:
                raise
            return {"snapshot": name, "added": 0, "seconds": round(time.monotonic() - start, 2)}
        stats = (json.loads(out or "{}").get("archive") or {}).get("stats") or {}
        return {"snapshot": name, "added": stats.get("deduplicated_size", 0),
                "seconds": round(time.monotonic() - start, 2)}

    def dump(self, archive, source, target, limit=None):
        self.write_dump(target, limit, lambda fh: self.run("extract", "--stdout", f"::{archive}", str(source), stdout=fh,
                                                           timeout=SHORT_TIMEOUT if limit else LONG_TIMEOUT))

    def unlock(self):
        """Nothing to do: borg itself removes a stale lock left on this host by a borg that was killed
        (BORG_HOSTNAME_IS_UNIQUE); a live lock still refuses, as it should."""

    def forget(self, copies):
        mine = [c for c in copies if self.ours(c)]       # never another host's or config's
        if mine:
            self.run("delete", "::", *[c.id for c in mine], timeout=SHORT_TIMEOUT)

    def prune(self):
        self.run("compact", timeout=LONG_TIMEOUT)

    def check(self, subset="10%"):
        """borg check of the repository and the archives, reading back and verifying the data of the
        newest three archives (borg 1.x has no random subset)."""
        self.run("check", "--verify-data", "--last", "3", timeout=LONG_TIMEOUT)
        return "borg check passed (the repository, and the data of the newest 3 archives read back and verified)"


def page_size(path):
    """The SQLite page size of a backup (bytes 16-17 of its header; 1 means 65536), else 4096."""
    try:
        with open(path, "rb") as f:
            header = f.read(100)
    except OSError:
        return 4096
    if len(header) < 18 or not header.startswith(b"SQLite format 3\0"):
        return 4096
    size = int.from_bytes(header[16:18], "big")
    return 65536 if size == 1 else size if size >= 512 and size & (size - 1) == 0 else 4096


def engine(offsite):
    """The engine [offsite] names: Restic or Borg (one interface: Engine)."""
    return Borg(offsite) if offsite.engine == "borg" else Restic(offsite)


def reason(stderr):
    """restic's last meaningful line (the caller masks it; restic never prints the password file's content)."""
    text = stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    fatal = [line for line in lines if line.startswith("Fatal:") or "already locked" in line]
    return (fatal[-1] if fatal else lines[-1] if lines else "no message")[:400]


STAGE_PREFIX = "offsite-fetch-"
UNFINISHED_AGE = 600


def remove_unfinished(folder):
    """The folders of fetches that were killed before their copy verified (no <file>.json in them yet):
    partial downloads, never a backup. A verified copy kept in its folder (its name was taken) stays.
    One written to in the last UNFINISHED_AGE seconds may be a fetch running now (a --drill takes no
    lock): it is left alone."""
    for stage in Path(folder).glob(STAGE_PREFIX + "*"):
        if stage.is_dir() and not stage.is_symlink() and not any(stage.glob("*.sqlite3.json")):
            try:
                newest = max([stage.stat().st_mtime] + [p.stat().st_mtime for p in stage.iterdir()])
            except OSError:
                continue
            if time.time() - newest > UNFINISHED_AGE:
                shutil.rmtree(stage, ignore_errors=True)
