"""Continuous copies of the env databases ([replica]): one Litestream per config, run by a systemd --user
unit the tool writes, and the tool's own database swaps made to cooperate with it.

Files, in the replicated envs' state folder, under replica/ (0700; files 0600):
  litestream.yml   the replicator's config, written by start() each time the unit starts
  state.json       what start() decided: the unit, the control socket, and per env its database and
                   whether it is replicated (and why not)
  ENV.json         the env's lineage mark: this database file (device, inode) is the one whose copies the
                   replica holds, or the tool itself put it in place (a restore); "reset": Litestream's
                   local state for it is cleared at the next start, so its next copy is a full snapshot
  meta/ENV/        Litestream's local state for the env's database
  aws.env          (s3) the AWS_* variables found when the unit was installed, for the unit

The rule that keeps a replica's history (start(), before Litestream runs): an env is replicated when its
database is the mark's file, or the replica is empty, or the database holds every row of the replica's
newest copy (restored to a scratch file and compared by content). Otherwise (a rebuilt host whose app
made a fresh database, a file replaced by hand) the env is left out and says why: Litestream would
otherwise take the fresh database as the next state and its newest copy would be empty.

The swaps (pause() before, resume() after; neither ever raises, a problem comes back as a line):
a restore (the rollback's stop/database steps), a conversion that moves the database, adoption. pause()
stops the env's replication after a last sync; resume(swapped=True) marks the new file as the tool's and
restarts the unit, whose start takes a full snapshot of it: the replica continues from the restored
database. Rehearsal and drill copies are never in the replicator's config.
"""

import hashlib
import json
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from . import backups, litestream, restore, unitfiles, units
from .errors import DeployError
from .files import make_private_dir, remove_quietly, write_atomic
from .litestream import DbEntry, Point
from .points import backup_id
from .state import age_seconds, now_iso, parse_time

MAX_LAG = 60.0                  # seconds of writes the replica may miss before it is a problem
LIST_TIMEOUT = 15.0
RESTORE_TIMEOUT = 900.0
COMPARE_SECONDS = 300.0
AWS_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION",
                 "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE",
                 "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE")
Command = Callable[..., str]      # cli.script_command bound to the config: (script, *args) -> a command line


@dataclass(frozen=True)
class Decision:
    """Whether an env's database is replicated, and why."""
    env: str
    db: str
    replicating: bool
    why: str


@dataclass(frozen=True)
class ReplicaState:
    """What status shows of an env's replica."""
    ok: bool
    lag_s: float | None           # seconds of the newest local writes the replica does not hold (None: unknown)
    newest: str | None            # the newest moment a restore reaches (ISO 8601)
    oldest: str | None
    unit: str
    problem: str = ""
    fix: str | None = None        # the command that fixes the problem

    def to_json(self) -> dict:
        return {"ok": self.ok, "lag_s": self.lag_s, "newest": self.newest, "oldest": self.oldest,
                "unit": self.unit, "problem": self.problem or None, "fix": self.fix}


# -- where things are ------------------------------------------------------------------------------------
def replicated(config, env) -> bool:
    return config.replica is not None and env.name in config.replica.envs


def folder_of(config) -> Path:
    return config.envs[config.replica.envs[0]].state_dir / "replica"


def unit_name(config) -> str:
    """One unit per config file: safe-deploy-replica-<8 hex of its path>.service."""
    return f"safe-deploy-replica-{hashlib.sha256(str(config.file).encode()).hexdigest()[:8]}.service"


def socket_path(config) -> Path:
    """The control socket: in the user's runtime folder (a socket path is limited to 107 bytes)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
    name = unit_name(config).removesuffix(".service") + ".sock"
    return Path(runtime) / name if os.path.isdir(runtime) else folder_of(config) / name


def entry(config, env) -> DbEntry:
    return DbEntry(env=env.name, db=env.db, meta=folder_of(config) / "meta" / env.name)


def entries(config) -> list[DbEntry]:
    return [entry(config, config.envs[name]) for name in config.replica.envs]


def read_state(env) -> dict:
    """state.json of the replicator that replicates env (by env's state folder), or {}."""
    try:
        doc = json.loads((env.state_dir / "replica" / "state.json").read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) and isinstance(doc.get("envs"), dict) else {}


@contextmanager
def read_config(config, wanted: list[DbEntry]) -> Iterator[Path]:
    """A private Litestream config naming wanted (for `ltx` and `restore`), removed afterwards."""
    folder = make_private_dir(folder_of(config))
    fd, name = tempfile.mkstemp(prefix=".read-", suffix=".yml", dir=folder)
    try:
        os.write(fd, litestream.render(config.replica, wanted).encode())
        os.close(fd)
        yield Path(name)
    finally:
        remove_quietly(name)


# -- the lineage mark ------------------------------------------------------------------------------------
def identity(db: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(db)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def read_mark(folder: Path, env_name: str) -> dict:
    try:
        mark = json.loads((folder / f"{env_name}.json").read_text())
    except (OSError, ValueError):
        return {}
    return mark if isinstance(mark, dict) else {}


def write_mark(folder: Path, env_name: str, db: Path, how: str, reset: bool = False) -> None:
    ident = identity(db)
    if ident is None:
        return
    write_atomic(folder / f"{env_name}.json", json.dumps({"db": str(db), "dev": ident[0], "ino": ident[1],
                                                          "since": now_iso(), "how": how, "reset": reset}) + "\n")


def marked(mark: dict, db: Path) -> bool:
    return bool(mark) and identity(db) == (mark.get("dev"), mark.get("ino"))


# -- the unit's start: which envs are replicated -----------------------------------------------------------
def start(config) -> list[Decision]:
    """Decide, env by env, what may be replicated (the module's rule), then write litestream.yml and
    state.json. Run by the unit before Litestream starts (ExecStartPre), and by --install-replica."""
    folder = make_private_dir(folder_of(config))
    decisions = [decide(config, folder, e) for e in entries(config)]
    chosen = [e for e, d in zip(entries(config), decisions) if d.replicating]
    for e in chosen:
        mark = read_mark(folder, e.env)
        if mark.get("reset"):           # a database the tool put in place: a full snapshot starts its copies
            shutil.rmtree(e.meta, ignore_errors=True)
            write_mark(folder, e.env, e.db, mark.get("how", "put in place by safe-deploy"))
        make_private_dir(e.meta)
    write_atomic(folder / "litestream.yml", litestream.render(config.replica, chosen, socket_path(config)))
    write_atomic(folder / "state.json", json.dumps({
        "unit": unit_name(config), "socket": str(socket_path(config)), "url": config.replica.url, "time": now_iso(),
        "envs": {d.env: {"db": d.db, "replicating": d.replicating, "why": d.why} for d in decisions}}, indent=2) + "\n")
    return decisions


def decide(config, folder: Path, e: DbEntry) -> Decision:
    def verdict(ok: bool, why: str, how: str | None = None) -> Decision:
        if ok and how:
            write_mark(folder, e.env, e.db, how)
        return Decision(e.env, str(e.db), ok, why)

    if marked(read_mark(folder, e.env), e.db):
        return verdict(True, "the database whose copies the replica holds")
    try:
        found = replica_points(config, e)
    except DeployError as exc:
        return verdict(False, f"the replica cannot be read, so whether this database continues it is not known: {exc}")
    if not found:
        return verdict(True, "the replica is empty: its copies start from this database",
                       "the replica was empty")
    if not e.db.exists():
        return verdict(False, f"there is no database at {e.db}, and the replica holds copies up to "
                              f"{iso(found[-1].lo)}: restore it first")
    missing = rows_missing(config, e, found[-1])
    if missing is None:
        return verdict(True, "holds every row of the replica's newest copy", "held every row of the replica's newest")
    return verdict(False, f"{e.db} lacks {missing} of the rows the replica's newest copy ({iso(found[-1].lo)}) holds "
                          "(a rebuilt host, or a database replaced by hand): replicating it would make that copy the "
                          "replica's past; restore the newest copy first")


def rows_missing(config, e: DbEntry, newest: Point) -> str | None:
    """None when e's database holds every row of the replica's newest copy; else how many it lacks (text)."""
    scratch = Path(tempfile.mkdtemp(prefix=".compare-", dir=folder_of(config)))
    try:
        out = scratch / "newest.sqlite3"
        restore_to(config, e, newest, out)
        try:
            lacks = restore.rows_only_in(out, e.db, COMPARE_SECONDS)
        except (sqlite3.Error, OSError) as exc:
            return f"rows that could not be compared ({exc})"
        return f"{sum(lacks.values())} row(s)" if lacks else None
    except DeployError as exc:
        return f"rows that could not be compared ({exc})"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def replica_points(config, e: DbEntry) -> list[Point]:
    """Every moment e's replica can restore, oldest first (empty: no copy yet)."""
    if config.replica.scheme == "file":
        return litestream.points(litestream.files(config.replica, e, None, LIST_TIMEOUT))
    with read_config(config, [e]) as cfg:
        return litestream.points(litestream.files(config.replica, e, cfg, LIST_TIMEOUT))


def newest(config, env) -> datetime | None:
    """The newest moment env's replica can restore (None: not replicated, or no copy yet); for the data
    rules. DeployError when the replica cannot be read. A copy of it: replica_copy.copy_at(config, env, None, ...)."""
    if not replicated(config, env):
        return None
    found = replica_points(config, entry(config, env))
    return found[-1].lo if found else None


def restore_to(config, e: DbEntry, point: Point, out: Path, timeout: float = RESTORE_TIMEOUT) -> None:
    with read_config(config, [e]) as cfg:
        litestream.restore(cfg, e.db, point.txid, out, timeout)


def iso(moment: datetime) -> str:
    return moment.astimezone().isoformat(timespec="milliseconds")


# -- the unit -------------------------------------------------------------------------------------------------
def unit_files(config, start_argv: list[str]) -> dict[Path, str]:
    """{path: text} of the replicator's unit. start_argv: the command that runs start() (backup.py
    --replica-start with this config)."""
    folder = folder_of(config)
    envs = ", ".join(config.replica.envs)
    aws = f"EnvironmentFile=-{folder / 'aws.env'}\n" if config.replica.scheme == "s3" else ""
    text = (f"[Unit]\nDescription=safe-deploy: continuous copies of {envs} (Litestream) for {config.file}\n"
            "StartLimitIntervalSec=600\nStartLimitBurst=20\n\n"
            "[Service]\nType=simple\n"
            f"ExecStartPre={unitfiles.exec_line(start_argv)}\n"
            f"ExecStart={unitfiles.exec_line([str(litestream.binary()), 'replicate', '-config', str(folder / 'litestream.yml'), '-no-expand-env'])}\n"
            f"{aws}Restart=always\nRestartSec=5\nTimeoutStartSec=20min\nTimeoutStopSec=60\n"
            "Nice=10\nIOSchedulingClass=best-effort\nIOSchedulingPriority=7\nMemoryMax=1G\nUMask=0077\n\n"
            "[Install]\nWantedBy=default.target\n")
    return {unitfiles.user_unit_dir() / unit_name(config): text}


def write_aws_env(config) -> list[str]:
    """(s3) The AWS_* variables of this process, for the unit (0600); the names written (never the values)."""
    found = {k: os.environ[k] for k in AWS_VARIABLES if os.environ.get(k)}
    if config.replica.scheme == "s3":
        write_atomic(make_private_dir(folder_of(config)) / "aws.env",
                     "".join(f"{k}={json.dumps(v)}\n" for k, v in found.items()))
    return sorted(found)


def enable(config) -> None:
    """(Re)start the installed unit and enable it at boot (the caller installed its files)."""
    unit = unit_name(config)
    units.systemctl("enable", unit)
    units.systemctl("reset-failed", unit, check=False)
    units.systemctl("restart", unit, timeout=units.RESTART_TIMEOUT)


# -- the tool's own swaps -------------------------------------------------------------------------------------
def pause(env) -> str | None:
    """Before the tool moves env's database away: a last sync, then no more replication of it (other envs go
    on). Nothing when env is not replicated here. Never raises: a problem comes back as a line."""
    doc = read_state(env)
    entry_doc = doc.get("envs", {}).get(env.name) or {}
    if not entry_doc.get("replicating"):
        return None
    try:
        litestream.stop_db(Path(doc["socket"]), Path(entry_doc["db"]))
    except (DeployError, KeyError, TypeError) as exc:
        return f"the replication of {env.name} could not be paused ({exc}); its replicator restarts after the swap"
    return None


def resume(env, swapped: bool) -> str | None:
    """After the swap: when swapped, the new database file is marked as the tool's (its copies continue the
    replica, from a full snapshot); then the unit restarts (without waiting) and replicates it. Never raises."""
    folder, doc = env.state_dir / "replica", read_state(env)
    if not folder.is_dir() or (doc and env.name not in doc["envs"]):
        return None
    try:
        if swapped:
            write_mark(folder, env.name, env.db, "put in place by safe-deploy (a restore)", reset=True)
        unit = doc.get("unit")
        if unit and units.state(unit).known:
            units.systemctl("reset-failed", unit, check=False)
            units.systemctl("restart", "--no-block", unit)
    except DeployError as exc:
        return f"the replication of {env.name} could not be restarted: {exc}"
    return None


# -- what status shows ------------------------------------------------------------------------------------------
def look(config, env, cmd: Command) -> ReplicaState | None:
    """The replica of env as it is now (None: env is not replicated). Bounded: one listing of the replica."""
    if not replicated(config, env):
        return None
    unit = unit_name(config)
    restart = f"systemctl --user reset-failed {unit}; systemctl --user restart {unit}"
    try:
        found = replica_points(config, entry(config, env))
        listing = ""
    except DeployError as exc:
        found, listing = [], f"the replica of {env.name} cannot be read: {exc}"
    lag = lag_seconds(env.db, found[-1] if found else None)

    def state(problem: str = "", fix: str | None = None) -> ReplicaState:
        return ReplicaState(ok=not problem, lag_s=lag, newest=iso(found[-1].lo) if found else None,
                            oldest=iso(found[0].lo) if found else None, unit=unit, problem=problem, fix=fix)

    problem, fix = unit_problem(config, env, unit, restart, cmd)
    if problem:
        return state(problem, held_fix(env, found, cmd) if fix == HELD else fix)
    if listing:
        return state(listing, None)
    started = age_seconds(read_state(env).get("time", ""))
    if not found and env.db.exists() and started is not None and started > MAX_LAG:
        return state(f"the replica of {env.name} holds no copy yet, {started:.0f} s after the replicator started "
                     "(see: journalctl --user -u " + unit + ")", restart)
    if lag is not None and lag > MAX_LAG:
        return state(f"the replica of {env.name} is {lag:.0f} s behind its database (the newest copy is "
                     f"{iso(found[-1].lo)}): writes since are on this disk only", restart)
    return state()


def unit_problem(config, env, unit: str, restart: str, cmd: Command) -> tuple[str, str | None]:
    st = units.state(unit)
    if not st.known:
        return (f"[replica] is set, but its replicator {unit} is not installed: nothing reaches the replica",
                cmd("backup.py", "--install-replica", "--yes"))
    if not st.is_active:
        return (f"the replicator {unit} is {st.active} ({st.sub}): nothing reaches the replica (why: journalctl "
                f"--user -u {unit} -n 20)", restart)
    doc = read_state(env)
    mine = doc.get("envs", {}).get(env.name) or {}
    if not mine.get("replicating"):
        return (f"{env.name} is not replicated: {mine.get('why') or 'the replicator has not decided yet'}",
                HELD if "restore" in (mine.get("why") or "") else restart)
    mark = read_mark(env.state_dir / "replica", env.name)
    if env.db.exists() and mark and not marked(mark, env.db):
        return (f"{env.db} is not the file the replicator started with (replaced outside the tool?): its copies "
                "would continue from it", restart)
    try:
        listed = litestream.daemon_dbs(Path(doc.get("socket", "")))
    except DeployError as exc:
        return f"the replicator {unit} does not answer: {exc}", restart
    status = (listed.get(mine.get("db", "")) or {}).get("status")
    if status != "replicating":
        return (f"the replication of {env.name} is {status or 'not running'} (paused by an operation that did not "
                "finish?)", restart)
    return "", None


HELD = "held"       # unit_problem's fix for an env left out until its newest copy is back: see held_fix


def held_fix(env, found: list[Point], cmd: Command) -> str:
    """An env left out until the replica's newest copy is back: that copy as a backup first (--at latest),
    then the env back to it (the newest point-in-time copy made of that moment or later)."""
    newest = found[-1].lo if found else None
    for b in backups.list_backups(env.backup_dir):
        made = parse_time(b.time)
        if b.reason == "point-in-time" and newest and made and made >= newest.replace(microsecond=newest.microsecond // 1000 * 1000):
            return cmd("rollback.py", env.name, "--to", backup_id(b), "--with-db", "--yes")
    return cmd("backup.py", env.name, "--at", "latest")


def lag_seconds(db: Path, newest: Point | None) -> float | None:
    """How many seconds of the newest local writes the replica lacks: from its newest copy to the database's
    last write (0 when it holds them all). None when there is no database here."""
    times = []
    for suffix in ("", "-wal"):
        try:
            times.append(os.stat(f"{db}{suffix}").st_mtime)
        except OSError:
            pass
    if not times:
        return None
    if newest is None:
        return round(max(0.0, datetime.now(timezone.utc).timestamp() - max(times)), 1)
    return round(max(0.0, max(times) - newest.lo.timestamp()), 1)


def alert_change(config, env, state: dict | None, send: Callable[[dict], list[str]],
                 event: Callable[..., dict]) -> list[str]:
    """One replica-behind alert when env's replica (ReplicaState.to_json) turns not OK (kept in
    replica/ENV.alert.json); the delivery problems. send, event: alerts.send bound to [alerts], and alerts.event."""
    if state is None:
        return []
    path = make_private_dir(folder_of(config)) / f"{env.name}.alert.json"
    try:
        was = json.loads(path.read_text()).get("ok")
    except (OSError, ValueError, AttributeError):
        was = True
    problems: list[str] = []
    if was and not state["ok"]:
        problems = send(event("replica-behind", env.name, state["problem"], state.get("fix")))
    if not problems and was != state["ok"]:
        write_atomic(path, json.dumps({"ok": state["ok"], "time": now_iso()}) + "\n")
    return problems


def offer(config) -> str | None:
    """The line adoption and --install-units end with when [replica] is set and its unit is not installed."""
    if config.replica is None:
        return None
    try:
        if units.state(unit_name(config)).known:
            return None
    except DeployError:
        pass
    return "[replica] is set: install the replicator (continuous copies, about every second)"
