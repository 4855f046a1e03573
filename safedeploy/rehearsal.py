"""Rehearsals and drills: a deploy, or a rollback point, played on a copy of the env's data, beside
everything live (deploy.py ENV --rehearse, rollback.py ENV --drill).

A rehearsal's steps (run by safedeploy.runner, under the env's lock and a journal, so that a killed
rehearsal is cleaned up by the next command: its transient units stopped, its scratch folder removed):
  copy         a scratch folder inside the env's backup folder (private, on the backups' disk) and a
               fresh online backup of the live database into it (the live file only read), with the
               database folder's other small files (an instance config)
  build        the target built there as a deploy builds a release (its files, `build`), its shared
               paths linked to the scratch copies (other shared paths start empty)
  pre_restart  the release's pre_restart on the copy, timed, the schema compared before and after
  start        the release as a transient unit of the user manager on a free port
  health, paths  its health and rehearse_paths
  old_start, old_health, old_paths  (a migration changed the schema) the release that runs now,
               started on the migrated copy: "compatible" when it serves there (the deploy can let it
               serve during pre_restart), "breaking" when it does not (the deploy stops it first)
Nothing live changes: no restart, no tag, no switch. The rehearsal is recorded in the deploy log
(kind "rehearsal", by the tree it tested).

A transient unit gets the service's ExecStart and environment (Environment=, EnvironmentFile=) with
every path into the env's live folders moved into the scratch copy (the release, the database, the
shared folder) and the port moved to the scratch one; a value that still names a live path after
that makes the rehearsal refuse to start it (it cannot be sure the app would not write there). The
variables go through a 0600 file, never the command line.

A drill proves a rollback point: its backup restored and verified in the scratch folder, and the
point's kept release (a copy of its folder, its shared paths linked to the scratch copy) started on
it, healthy, and watched for a moment, since a release that chokes on a row of its own backup may
answer one health check before it dies. A point whose release retention removed is rebuilt from
its commit, and the drill says so.
"""

import os
import re
import shlex
import shutil
import socket
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import backups, cli, commands, health, records, releases, units
from .errors import DeployError
from .files import make_private_dir, write_atomic
from .records import DrillRecord, RehearsalRecord
from .runner import BEFORE, Operation, Step, execute
from .state import utc_stamp

SMALL_FILE = 10 << 20       # files of the database's folder copied into a rehearsal (not the database)
DRILL_WATCH = 2.0           # seconds a drill keeps watching a point's release after it turned healthy


@dataclass
class Run:
    """One rehearsal or drill: where it plays, and what it found (the record)."""
    env: object
    repo: object
    commit: str
    scratch: Path
    record: object
    release: object = None
    old_release: object = None
    unit: str = ""
    old_unit: str = ""
    port: int = 0
    schema_before: list = field(default_factory=list)
    output: str = ""
    clock: object = None
    journal: object = None

    @property
    def db(self):
        return scratch_db(self.env, self.scratch)


def scratch_for(env, kind):
    stamp = f"{utc_stamp()}-{os.getpid()}"
    return (make_private_dir(env.backup_dir) / f".{kind}-{stamp}",
            f"{env.unit.removesuffix('.service')}-{kind}-{stamp}.service")


# -- the rehearsal --------------------------------------------------------------------------------
def rehearse(config, env, repo, commit, say):
    """Play the deploy of commit on a copy of env's data (the caller holds the env's lock); return the
    RehearsalRecord (recorded)."""
    scratch, unit = scratch_for(env, "rehearsal")
    running = records.running_commit(records.read(env)) or repo.head()
    record = RehearsalRecord(env=env.name, user=cli.user_name(), commit=commit, tree=repo.tree_of(commit),
                             running_commit=running if running != commit else None)
    run = Run(env=env, repo=repo, commit=commit, scratch=scratch, record=record, unit=unit,
              old_unit=unit.replace("-rehearsal-", "-rehearsal-old-"))
    try:
        execute(REHEARSAL_OPERATION, run, env)
        record.result = "ok"
    except DeployError as exc:
        record.result, record.error = "failed", str(exc)
        run.output = exc.output or (app_log_tail(scratch) if record.failed in ("start", "health", "paths") else "")
        run.output = run.output or "\n".join(units.journal_tail(unit))
    finally:
        clean_up({"units": [run.unit, run.old_unit], "scratch": str(scratch)})
        record.steps = run.clock.seconds if run.clock else {}
    records.append(env, record)
    record.output = run.output
    return record


def report(env, record):
    """What --rehearse prints about a rehearsal (the caller adds the verdict line)."""
    lines = []
    if record.migration_seconds is not None:
        lines.append(f"  migration {record.migration_seconds:.2f}s ({len(env.pre_restart)} pre_restart command(s)); "
                     f"schema {'; '.join(record.schema_changes) if record.schema_changes else 'unchanged'}")
    if record.health:
        lines.append(f"  health    {record.health}")
    for path, answer in record.paths.items():
        lines.append(f"  path      {path}: {answer}")
    if record.compatible is not None:
        lines.append(f"  running   {record.running_commit[:12]} on the migrated copy: "
                     + ("compatible (it serves there: the deploy lets it serve during pre_restart)" if record.compatible
                        else f"BREAKING ({record.incompatible}): the deploy stops it before pre_restart"))
    elif record.ok and env.pre_restart:
        lines.append("  running   " + ("no migration changed the schema: the running release keeps serving"
                                      if not record.schema_changes else "not tried (nothing runs yet)"))
    lines.append("  steps     " + ", ".join(f"{k} {v:.2f}s" for k, v in record.steps.items()))
    return lines


def failed(run, step, exc):
    """Nothing live was touched: the step is recorded as the one that failed; the runner re-raises."""
    run.record.failed = step


def copy_step(run):
    copy_data(run.env, run.scratch)


def build_step(run):
    run.release = releases.build(run.env, run.repo, run.commit, cli.say, folder=run.scratch / "releases",
                                 shared=run.scratch / "shared")


def pre_restart_step(run):
    run.schema_before = schema_rows(run.db)
    start = time.monotonic()
    commands.run_all(run.env.pre_restart, run.release.path, run.env.command_timeout)
    run.record.migration_seconds = round(time.monotonic() - start, 3)
    after = schema_rows(run.db)
    before_set, after_set = set(map(tuple, run.schema_before)), set(map(tuple, after))
    run.record.schema_changes = ([f"+ {kind} {name}" for kind, name, _ in sorted(after_set - before_set)]
                                 + [f"- {kind} {name}" for kind, name, _ in sorted(before_set - after_set)])


def start_step(run):
    run.port = free_port()
    start_transient(run.env, run.unit, run.release.path, run.scratch, run.port)


def health_step(run):
    run.record.health = wait_serving(run.env, run.unit, run.port, "the rehearsed release")


def paths_step(run):
    bad = check_paths(run.env, run.port, run.record.paths)
    if bad:
        raise DeployError("the rehearsed release failed on " + "; ".join(bad))


def tries_old(run):
    return bool(run.record.schema_changes) and run.record.running_commit is not None


def old_start_step(run):
    """The running release (a copy of its folder, or, in place, its commit built in the scratch folder) on
    the migrated copy. What this finds is the verdict, never the rehearsal's failure."""
    units.systemctl("stop", run.unit, timeout=units.RESTART_TIMEOUT, check=False)     # one app on the copy at a time
    env, current = run.env, releases.current(run.env)
    if current and current.commit == run.record.running_commit:
        run.old_release = stage_release_copy(env, current, run.scratch)
    else:
        run.old_release = releases.build(env, run.repo, run.record.running_commit, None,
                                         folder=run.scratch / "old", shared=run.scratch / "shared")
    run.port = free_port()
    start_transient(env, run.old_unit, run.old_release.path, run.scratch, run.port, log="old-app.log")


def old_check_step(run):
    try:
        wait_serving(run.env, run.old_unit, run.port, "the running release")
        bad = check_paths(run.env, run.port, {})
    except DeployError as exc:
        bad = [str(exc)]
    run.record.compatible = not bad
    if bad:
        tail = app_log_tail(run.scratch, name="old-app.log").splitlines()
        run.record.incompatible = "; ".join(bad) + (f"; the app said: {tail[-1]}" if tail else "")


REHEARSAL = [
    Step("copy", BEFORE, copy_step, lambda r: f"a fresh online copy of {r.env.db} into {r.scratch}"),
    Step("build", BEFORE, build_step, lambda r: f"build {r.commit[:12]} in {r.scratch / 'releases'}"),
    Step("pre_restart", BEFORE, pre_restart_step, lambda r: "run pre_restart on the copy, timed",
         when=lambda r: r.env.pre_restart),
    Step("start", BEFORE, start_step, lambda r: f"start {r.unit} on a scratch port"),
    Step("health", BEFORE, health_step, lambda r: "its health"),
    Step("paths", BEFORE, paths_step, lambda r: "its rehearse_paths", when=lambda r: r.env.rehearse_paths),
    Step("old_start", BEFORE, old_start_step, lambda r: "the running release on the migrated copy", when=tries_old),
    Step("old_check", BEFORE, old_check_step, lambda r: "its health and rehearse_paths: compatible or breaking",
         when=tries_old),
]
REHEARSAL_OPERATION = Operation(
    "rehearse", REHEARSAL, before_failed=failed, after_failed=failed,
    journal_data=lambda r: {"v": records.VERSION, "scratch": str(r.scratch), "units": [r.unit, r.old_unit],
                            "commit": r.commit})


def clean_up(j):
    """Stop a rehearsal's or a drill's transient units and remove its scratch folder (also for one that
    was killed: the journal names them). Returns what it did."""
    for unit in j.get("units") or []:
        if unit:
            units.systemctl("stop", unit, timeout=units.RESTART_TIMEOUT, check=False)
            units.systemctl("reset-failed", unit, check=False)
    scratch = j.get("scratch")
    if scratch and Path(scratch).name.startswith((".rehearsal-", ".drill-")):
        shutil.rmtree(scratch, ignore_errors=True)
    return f"the interrupted {j.get('op', 'rehearsal')}'s transient units were stopped and {scratch} removed"


# -- the drill ---------------------------------------------------------------------------------
def drill(config, env, repo, point):
    """Prove point on a copy (nothing live touched); return the DrillRecord (recorded)."""
    scratch, unit = scratch_for(env, "drill")
    record = DrillRecord(env=env.name, user=cli.user_name(), point=point.id)
    run = Run(env=env, repo=repo, commit=point.commit, scratch=scratch, record=record, unit=unit)
    run.point = point
    try:
        execute(DRILL_OPERATION, run, env)
        record.result = "ok"
    except DeployError as exc:
        record.result = "failed"
        record.problems.append(str(exc) + "".join(f"\n  | {line}" for line in (exc.output or "").splitlines()[-8:]))
    except OSError as exc:
        record.result = "failed"
        record.problems.append(f"cannot use {scratch}: {exc.strerror or exc} (the backup folder's disk)")
    finally:
        clean_up({"units": [unit], "scratch": str(scratch)})
        record.steps = run.clock.seconds if run.clock else {}
    records.append(env, record)
    return record


def drill_database(run):
    point = run.point
    if not point.backup:
        raise DeployError(f"point {point.id} has no database backup")
    run.db.parent.mkdir(parents=True, mode=0o700, exist_ok=True)
    shutil.copyfile(point.backup.path, run.db)
    verdict = backups.verify_backup(backups.Backup(**{**point.backup.to_json(), "path": str(run.db)}))
    if verdict != "ok":
        raise DeployError(f"backup {point.backup.path}: {verdict}")


def drill_release(run):
    env, point = run.env, run.point
    from .runbook import release_for
    kept = release_for(env, point)
    if kept is not None:
        run.release = stage_release_copy(env, kept, run.scratch)
        run.record.release = kept.id
    else:
        run.release = releases.build(env, run.repo, point.commit, None, folder=run.scratch / "releases",
                                     shared=run.scratch / "shared")
        run.record.rebuilt = True


def drill_health(run):
    try:
        run.record.health = wait_serving(run.env, run.unit, run.port, "the point's release")
        bad = check_paths(run.env, run.port, {})
        if bad:
            raise DeployError("; ".join(bad))
        watch_transient(run.env, run.unit, run.port, DRILL_WATCH)
    except DeployError as exc:
        raise DeployError(f"the point's release did not serve on the restored copy: {exc}",
                          output=app_log_tail(run.scratch) or "\n".join(units.journal_tail(run.unit))) from None


DRILL = [
    Step("database", BEFORE, drill_database, lambda r: "the point's backup copied and verified (sha256, integrity)"),
    Step("release", BEFORE, drill_release, lambda r: "the point's kept release copied, or rebuilt"),
    Step("start", BEFORE, start_step, lambda r: f"start {r.unit} on a scratch port"),
    Step("health", BEFORE, drill_health, lambda r: f"health, rehearse_paths, watched {DRILL_WATCH:g}s"),
]
DRILL_OPERATION = Operation("drill", DRILL, before_failed=failed, after_failed=failed,
                            journal_data=lambda r: {"v": records.VERSION, "scratch": str(r.scratch), "units": [r.unit],
                                                    "point": r.point.id})


# -- the scratch copy -----------------------------------------------------------------------------
def schema_rows(db):
    try:
        conn = backups.open_readonly(db)
        try:
            return [list(r) for r in conn.execute(
                "SELECT type, name, coalesce(sql, '') FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' "
                "ORDER BY type, name")]
        finally:
            conn.close()
    except (sqlite3.DatabaseError, DeployError):
        return []


def scratch_db(env, scratch):
    if os.path.isabs(os.path.expanduser(env.db_setting)):
        return scratch / "shared" / "db" / Path(env.db_setting).name
    return scratch / "shared" / os.path.normpath(env.db_setting)


def copy_data(env, scratch):
    """The database's folder as the rehearsal's shared copy: a fresh online backup of the live
    database (read-only: the live file is never written) and the folder's other small files."""
    scratch.mkdir(mode=0o700, exist_ok=True)
    db = scratch_db(env, scratch)
    db.parent.mkdir(parents=True, mode=0o700)
    if env.db.exists():
        need, free = backups.needed_bytes(env.db), backups.free_bytes(scratch)
        if free < need:
            raise DeployError(f"not enough free disk in {scratch.parent} for a copy of {env.db}: "
                              f"{free / 2**20:.1f} MiB free, {need / 2**20:.1f} MiB needed")
        backups.check_is_sqlite(env.db)
        fd = os.open(db, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        try:
            backups.copy_snapshot(env.db, db)
        except sqlite3.DatabaseError as exc:
            raise DeployError(f"cannot copy {env.db} for the rehearsal: {exc}") from None
        for entry in env.db.parent.iterdir():
            if entry.name.startswith(env.db.name) or entry.is_symlink() or not entry.is_file():
                continue
            if entry.stat().st_size <= SMALL_FILE:
                shutil.copy2(entry, db.parent / entry.name)


def stage_release_copy(env, kept, scratch):
    """A copy of a kept release in scratch (files hard-linked where the disk allows: a release is never
    written after it was built), its shared paths linked to scratch's shared copy instead of the live one."""
    dest = scratch / "kept" / kept.id
    dest.parent.mkdir(parents=True, exist_ok=True)

    def link_or_copy(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(kept.path, dest, symlinks=True, copy_function=link_or_copy)
    for rel in releases.shared_paths(env):
        inside, stand_in = dest / rel, scratch / "shared" / rel
        if inside.is_symlink():
            inside.unlink()
        stand_in.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.symlink(os.path.relpath(stand_in, inside.parent), inside)
    return releases.Release(kept.id, dest, kept.commit, kept.time)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the transient unit -----------------------------------------------------------------------------
def unit_settings(env):
    """(ExecStart argv, [Environment assignments], [EnvironmentFile paths]) of the env's service."""
    text = Path(units.require_known(env.unit).fragment_path).read_text()
    exec_start, assignments, files, section = None, [], [], None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("["):
            section = stripped
        elif section == "[Service]" and stripped.startswith("ExecStart=") and exec_start is None:
            exec_start = shlex.split(stripped.split("=", 1)[1].lstrip("-@:+!"))
        elif section == "[Service]" and stripped.startswith("Environment="):
            assignments += shlex.split(stripped.split("=", 1)[1])
        elif section == "[Service]" and stripped.startswith("EnvironmentFile="):
            files.append(stripped.split("=", 1)[1])
    if not exec_start:
        raise DeployError(f"{env.unit} has no ExecStart= to start the rehearsal with")
    return exec_start, assignments, files


def environment_file(path):
    """The assignments of an EnvironmentFile= (`-` prefix: optional), as systemd reads them."""
    optional = path.startswith("-")
    path = path.lstrip("-")
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        if optional:
            return []
        raise DeployError(f"cannot read the service's EnvironmentFile {path}: {exc.strerror}") from None
    out = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        try:
            words = shlex.split(line)
        except ValueError:
            raise DeployError(f"{path}: cannot read the line {line[:40]!r} for sure; the rehearsal does not start "
                              "the app with an environment it cannot move off the live data") from None
        out += [w for w in words if "=" in w]
    return out


def live_prefixes(env):
    """Folders whose files are live: the work tree, the releases folder, the database's folder."""
    found = [str(env.path), str(env.releases_root), str(Path(env.db).parent)]
    return sorted(set(found), key=len, reverse=True)


def moved(env, word, release, scratch):
    """word with every path into the env's live folders moved into the scratch copy: `current` and the
    work tree to the rehearsed release (a path into the tree only where the release has that file),
    the shared folder and the database's folder to the scratch shared copy."""
    moves = [(env.current_link, release, False), (env.releases_root / "shared", scratch / "shared", False),
             (Path(env.db).parent, scratch_db(env, scratch).parent, False), (env.path, release, True)]
    for old, new, only_where_it_exists in moves:
        def replace(m, new=new, check=only_where_it_exists, text=word):
            rest = re.match(r"[^\s\"':;,]*", text[m.end():]).group(0)      # the rest of that path
            return m.group(0) if check and not os.path.exists(f"{new}{rest}") else str(new)
        word = re.sub(re.escape(str(old)) + BOUNDARY, replace, word)
    return word


BOUNDARY = r"(?=[/\s\"':;,]|$)"


def moved_settings(env, release, scratch, port):
    """(argv, assignments) for the transient unit. The program itself may stay where it is (a venv in the
    work tree: it is only run); any other value that still names a live folder after the move makes the
    rehearsal refuse (DeployError): the app could write there."""
    argv, assignments, files = unit_settings(env)
    for path in files:
        assignments += environment_file(path)
    port_re = re.compile(rf"(?<![0-9]){env.port}(?![0-9])")
    argv = [port_re.sub(str(port), moved(env, word, release, scratch)) for word in argv]
    assignments = [moved(env, a, release, scratch) for a in assignments if "=" in a]
    for value in argv[1:] + assignments:
        for live in live_prefixes(env):
            if re.search(re.escape(live) + BOUNDARY, value):
                name = value.split("=", 1)[0] if "=" in value else value
                raise DeployError(f"the service names {live} (live data) in {name!r}, and the rehearsal could not "
                                  "move it into its copy: it does not start the app, which could write there")
    return argv, assignments


def start_transient(env, unit, release, scratch, port, log="app.log"):
    argv, assignments = moved_settings(env, release, scratch, port)
    env_file = scratch / f"{log}.environment"
    write_atomic(env_file, "".join(f"{a.split('=', 1)[0]}={shlex.quote(a.split('=', 1)[1])}\n" for a in assignments))
    units.systemctl("reset-failed", unit, check=False)
    command = ["systemd-run", "--user", "--quiet", "--collect", f"--unit={unit}",
               f"--property=WorkingDirectory={release}", f"--property=EnvironmentFile={env_file}",
               f"--property=StandardOutput=append:{scratch / log}", "--property=StandardError=inherit",
               "--property=Restart=no", "--", *argv]
    proc = units.run_command(command)
    if proc.returncode != 0:
        raise DeployError(f"could not start the transient unit {unit}: {(proc.stderr or proc.stdout).strip()}")


def app_log_tail(scratch, limit=16384, name="app.log"):
    try:
        with open(scratch / name, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - limit))
            return "\n".join(line for line in fh.read().decode(errors="replace").splitlines() if line.strip())
    except OSError:
        return ""


def wait_serving(env, unit, port, what):
    url = f"http://127.0.0.1:{port}{env.health_path}"

    def still_starting():
        return units.state(unit).active in ("active", "activating")

    answer, waited = health.wait_healthy(url, env.health_timeout, still_starting)
    if not answer.ok:
        raise DeployError(f"{what} did not turn healthy within {waited:.1f}s: {url} gave {answer.describe()}")
    return answer.describe()


def watch_transient(env, unit, port, seconds):
    """The unit stays active with the same process and health keeps answering, for seconds."""
    first = units.state(unit)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.25)
        st = units.state(unit)
        if not st.is_active or st.main_pid != first.main_pid:
            raise DeployError(f"it answered, then its process ended ({st.active}, {st.sub})")
    answer = health.check(f"http://127.0.0.1:{port}{env.health_path}", timeout=2)
    if not answer.ok:
        raise DeployError(f"it answered, then {env.health_path} gave {answer.describe()}")


def check_paths(env, port, found):
    """The rehearse_paths that do not answer 2xx/3xx (found: {path: answer}, filled in)."""
    bad = []
    for path in env.rehearse_paths:
        answer = health.check(f"http://127.0.0.1:{port}{path}", timeout=10)
        found[path] = answer.describe()
        if not answer.ok:
            bad.append(f"{path}: {answer.describe()}")
    return bad

