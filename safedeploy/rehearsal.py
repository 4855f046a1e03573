"""Rehearsal: a deploy played on a copy of the env's data, beside everything live
(deploy.py ENV --rehearse).

In order: a scratch folder inside the env's backup folder (private, on the backups' disk);
a fresh online backup of the live database into it (the live file is opened read-only); the
target commit built there as a deploy builds a release (its files, the `build` commands),
its shared paths linked to scratch copies: the database's folder holds the copy and the
other small files of the live folder (an instance config), other shared paths start empty;
the release's `pre_restart` run there, timed, with the schema compared before and after; the
release started as a transient unit of the user manager on a free port (the service's
ExecStart and Environment, with its paths and port moved to the scratch ones; the variables
go through a 0600 file, never the command line); health and the `rehearse_paths` checked;
the unit stopped; the scratch folder removed. Nothing live changes: no restart, no tag, no
switch. The rehearsal is recorded in the deploy log (kind "rehearsal", by the tree it
tested), where `require_rehearsal` makes deploys look for a passed one.
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

from . import backups, commands, health, releases, units
from .errors import DeployError
from .files import make_private_dir, write_atomic
from .state import deploy_log, now_iso, utc_stamp

SMALL_FILE = 10 << 20       # files of the database's folder copied into a rehearsal (not the database)


@dataclass
class Result:
    commit: str
    tree: str
    ok: bool = False
    failed: str = ""                 # the stage that failed: build, copy, pre_restart, start, health
    error: str = ""
    output: str = ""
    migration_seconds: float | None = None
    schema_before: list = field(default_factory=list)
    schema_after: list = field(default_factory=list)
    health: str = ""
    paths: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)

    def schema_changes(self):
        before, after = set(map(tuple, self.schema_before)), set(map(tuple, self.schema_after))
        return ([f"+ {kind} {name}" for kind, name, _ in sorted(after - before)]
                + [f"- {kind} {name}" for kind, name, _ in sorted(before - after)])

    def to_json(self):
        return {"commit": self.commit, "tree": self.tree, "result": "ok" if self.ok else "failed",
                "failed": self.failed, "error": self.error, "migration_seconds": self.migration_seconds,
                "schema_changes": self.schema_changes(), "health": self.health, "paths": self.paths,
                "steps": self.seconds}


def rehearsals(env):
    """The env's rehearsals, oldest first (from its deploy log)."""
    return [r for r in deploy_log(env).read() if r.get("kind") == "rehearsal"]


def passed_for(env, tree):
    """The newest passed rehearsal of tree in env, or None."""
    for record in reversed(rehearsals(env)):
        if record.get("tree") == tree and record.get("result") == "ok":
            return record
    return None


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


def rehearse(env, repo, commit, say):
    """Play the deploy of commit on a copy of env's data; return the Result (recorded)."""
    result = Result(commit=commit, tree=repo.tree_of(commit))
    scratch = make_private_dir(env.backup_dir) / f".rehearsal-{utc_stamp()}-{os.getpid()}"
    unit = f"{env.unit.removesuffix('.service')}-rehearsal-{utc_stamp()}.service"
    try:
        scratch.mkdir(mode=0o700)
        stage(result, "copy", lambda: copy_data(env, scratch))
        release = stage(result, "build", lambda: releases.build(env, repo, commit, say, folder=scratch / "releases",
                                                                shared=scratch / "shared"))
        db = scratch_db(env, scratch)
        result.schema_before = schema_rows(db)
        start = time.monotonic()
        stage(result, "pre_restart", lambda: commands.run_all(env.pre_restart, release.path, env.command_timeout))
        result.migration_seconds = round(time.monotonic() - start, 3)
        result.schema_after = schema_rows(db)
        start_and_check(env, unit, release, scratch, result)
        result.ok = True
    except DeployError as exc:
        result.error = str(exc)
        result.output = getattr(exc, "output", "") or ""
        if result.failed in ("start", "health", "paths") and not result.output:
            result.output = app_log_tail(scratch) or "\n".join(units.journal_tail(unit))
    finally:
        stop_transient(unit)
        shutil.rmtree(scratch, ignore_errors=True)
    deploy_log(env).append({"kind": "rehearsal", "time": now_iso(), "env": env.name, **result.to_json()})
    return result


def start_and_check(env, unit, release, scratch, result):
    """Start release as a transient unit on a free port, against the scratch shared folder; check
    its health and rehearse_paths. The caller stops the unit (stop_transient)."""
    port = free_port()
    stage(result, "start", lambda: start_transient(env, unit, release.path, scratch, port))
    url = f"http://127.0.0.1:{port}{env.health_path}"
    stage(result, "health", lambda: wait_serving(env, unit, url, result))
    stage(result, "paths", lambda: check_paths(env, port, result))


def boot_on_copy(env, repo, commit, copy, scratch, say=None):
    """The drill's proof: commit built in scratch, started on the database copy (moved into the scratch
    shared folder), health and rehearse_paths checked, stopped. Returns the Result (not recorded)."""
    result = Result(commit=commit, tree=repo.tree_of(commit))
    unit = f"{env.unit.removesuffix('.service')}-drill-{utc_stamp()}.service"
    try:
        db = scratch_db(env, scratch)
        db.parent.mkdir(parents=True, mode=0o700, exist_ok=True)
        os.replace(copy, db)
        release = stage(result, "build", lambda: releases.build(env, repo, commit, say, folder=scratch / "releases",
                                                                shared=scratch / "shared"))
        start_and_check(env, unit, release, scratch, result)
        result.ok = True
    except DeployError as exc:
        result.error = str(exc)
        result.output = getattr(exc, "output", "") or app_log_tail(scratch) or "\n".join(units.journal_tail(unit))
    finally:
        stop_transient(unit)
    return result


def stop_transient(unit):
    """Stop the transient unit (if it started) and forget it, whatever state it ended in."""
    units.systemctl("stop", unit, timeout=units.RESTART_TIMEOUT, check=False)
    units.systemctl("reset-failed", unit, check=False)


def stage(result, name, fn):
    result.failed = name
    start = time.monotonic()
    value = fn()
    result.seconds[name] = round(time.monotonic() - start, 3)
    result.failed = ""
    return value


def scratch_db(env, scratch):
    if os.path.isabs(os.path.expanduser(env.db_setting)):
        return scratch / "shared" / "db" / Path(env.db_setting).name
    return scratch / "shared" / os.path.normpath(env.db_setting)


def copy_data(env, scratch):
    """The database's folder as the rehearsal's shared copy: a fresh online backup of the live
    database (read-only: the live file is never written) and the folder's other small files."""
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


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unit_settings(env):
    """(ExecStart argv, [Environment assignments]) of the env's service, from its unit file."""
    text = Path(units.require_known(env.unit).fragment_path).read_text()
    exec_start, assignments, section = None, [], None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("["):
            section = stripped
        elif section == "[Service]" and stripped.startswith("ExecStart=") and exec_start is None:
            exec_start = shlex.split(stripped.split("=", 1)[1].lstrip("-@:+!"))
        elif section == "[Service]" and stripped.startswith("Environment="):
            assignments += shlex.split(stripped.split("=", 1)[1])
    if not exec_start:
        raise DeployError(f"{env.unit} has no ExecStart= to start the rehearsal with")
    return exec_start, assignments


def moved_argv(env, argv, release, port):
    """The service's command with the env's paths moved to the rehearsal's release and its port to
    the scratch one. A path into the work tree moves only where the release has the same file."""
    out = []
    port_re = re.compile(rf"(?<![0-9]){env.port}(?![0-9])")
    for word in argv:
        for prefix in (str(env.current_link), str(env.path)):
            if word == prefix or word.startswith(prefix + "/"):
                candidate = str(release) + word[len(prefix):]
                if prefix == str(env.current_link) or os.path.exists(candidate):
                    word = candidate
                break
        out.append(port_re.sub(str(port), word))
    return out


def start_transient(env, unit, release, scratch, port):
    argv, assignments = unit_settings(env)
    env_file = scratch / "environment"
    write_atomic(env_file, "".join(f"{a.split('=', 1)[0]}={shlex.quote(a.split('=', 1)[1])}\n"
                                   for a in assignments if "=" in a))
    units.systemctl("reset-failed", unit, check=False)
    command = ["systemd-run", "--user", "--quiet", "--collect", f"--unit={unit}",
               f"--property=WorkingDirectory={release}", f"--property=EnvironmentFile={env_file}",
               f"--property=StandardOutput=append:{scratch / 'app.log'}", "--property=StandardError=inherit",
               "--property=Restart=no", "--", *moved_argv(env, argv, release, port)]
    proc = units.run_command(command)
    if proc.returncode != 0:
        raise DeployError(f"could not start the rehearsal's transient unit: {(proc.stderr or proc.stdout).strip()}")


def app_log_tail(scratch, limit=16384):
    try:
        with open(scratch / "app.log", "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - limit))
            return "\n".join(line for line in fh.read().decode(errors="replace").splitlines() if line.strip())
    except OSError:
        return ""


def wait_serving(env, unit, url, result):
    def still_starting():
        st = units.state(unit)
        return st.active in ("active", "activating")

    answer, waited = health.wait_healthy(url, env.health_timeout, still_starting)
    result.health = answer.describe()
    if not answer.ok:
        raise DeployError(f"the rehearsed release did not turn healthy within {waited:.1f}s: {url} gave "
                          f"{answer.describe()}")


def check_paths(env, port, result):
    bad = []
    for path in env.rehearse_paths:
        answer = health.check(f"http://127.0.0.1:{port}{path}", timeout=10)
        result.paths[path] = answer.describe()
        if not answer.ok:
            bad.append(f"{path}: {answer.describe()}")
    if bad:
        raise DeployError("the rehearsed release failed on " + "; ".join(bad))
