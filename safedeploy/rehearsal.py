"""Rehearsals and drills: a deploy, or a rollback point, played on a copy of the env's data, beside
everything live (deploy.py ENV --rehearse, rollback.py ENV --drill).

A rehearsal's steps (run by safedeploy.runner, under the env's lock and a journal, so that a killed
rehearsal is cleaned up by the next command: its transient units stopped, its scratch folder removed):
  copy         a scratch folder inside the env's backup folder (private, on the backups' disk) and a
               fresh online backup of the live database into it (the live file only read), with the
               database folder's other small files (an instance config)
  build        the target built there as a deploy builds a release (its files, `build`), its shared
               paths linked to the scratch copies (other shared paths start empty)
  pre_restart  the release's pre_restart on the copy, timed, with the unit's environment moved onto the
               copy (safedeploy.transient); the schema compared before and after (safedeploy.schema)
  start        the release as a transient unit of the user manager on a free port
  health, paths  its health and rehearse_paths
  old_start, old_check  (a migration changed the schema) the release that runs now, started on the
               migrated copy, and probed: its health and rehearse_paths, each failure with its status and
               what the app logged meanwhile, and the rows the probes wrote counted
The verdict, "compatible" (the deploy can let the running release serve during pre_restart) or
"breaking" (the deploy stops it first), is breaking when the schema lost or renamed a table or column
the running release may use, or gained a constraint its writes may break, whatever the probes say;
else when a probe failed. A failed rehearsal is recorded as such: the next deploy of that tree stops the
running release first (safedeploy.decisions.migration_mode). Nothing live changes: no restart, no tag,
no switch. The rehearsal is recorded in the deploy log (kind "rehearsal", by the tree it tested).

A drill proves a rollback point: its backup restored and verified in the scratch folder, and the
point's kept release (a copy of its folder, its shared paths linked to the scratch copy) started on
it, healthy, and watched for a moment, since a release that chokes on a row of its own backup may
answer one health check before it dies. A point whose release retention removed is rebuilt from
its commit, and the drill says so.
"""

import os
import shutil
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import backups, commands, dbfiles, oplog, records, releases, schema, transient, unitenv, units
from .errors import DeployError
from .files import make_private_dir
from .journals import DrillJournal, RehearsalJournal, ScratchJournal
from .output import PLAIN, Output
from .records import DrillRecord, RehearsalRecord
from .runner import BEFORE, Operation, Step, execute
from .state import utc_stamp

DRILL_WATCH = 2.0           # seconds a drill keeps watching a point's release after it turned healthy
app_log_tail = transient.log_tail


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
    out: Output = PLAIN                 # where a build's progress goes (the script's cli.output())

    @property
    def db(self):
        return transient.scratch_db(self.env, self.scratch)


def scratch_for(env, kind):
    stamp = f"{utc_stamp()}-{os.getpid()}"
    return (make_private_dir(env.backup_dir) / f".{kind}-{stamp}",
            f"{env.unit.removesuffix('.service')}-{kind}-{stamp}.service")


# -- the rehearsal --------------------------------------------------------------------------------
def rehearse(config, env, repo, commit, out=PLAIN):
    """Play the deploy of commit on a copy of env's data (the caller holds the env's lock; the build's
    progress goes to out); return the RehearsalRecord (recorded)."""
    scratch, unit = scratch_for(env, "rehearsal")
    running = records.running_commit(records.read(env)) or repo.head()
    record = RehearsalRecord(env=env.name, user=unitenv.user(), commit=commit, tree=repo.tree_of(commit),
                             running_commit=running if running != commit else None)
    run = Run(env=env, repo=repo, commit=commit, scratch=scratch, record=record, unit=unit,
              old_unit=unit.replace("-rehearsal-", "-rehearsal-old-"), out=out)
    try:
        execute(REHEARSAL_OPERATION, run, env)
        record.result = "ok"
    except DeployError as exc:
        record.result, record.error = "failed", str(exc)
        run.output = exc.output or (app_log_tail(scratch) if record.failed in ("start", "health", "paths") else "")
        run.output = run.output or "\n".join(units.journal_tail(unit))
    finally:
        keep_app_logs(scratch, ("app.log", "old-app.log"))
        clean_up(RehearsalJournal(units=[run.unit, run.old_unit], scratch=str(scratch)))
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
    for change in record.schema_breaking:
        lines.append(f"  schema    BREAKING for the running release: {change}")
    if record.health:
        lines.append(f"  health    {record.health}")
    for path, answer in record.paths.items():
        lines.append(f"  path      {path}: {answer}")
    if record.compatible is not None:
        lines += verdict_lines(record)
    elif record.ok and env.pre_restart:
        lines.append("  running   " + ("no migration changed the schema: the running release keeps serving"
                                      if not record.schema_changes else "not tried (nothing runs yet)"
                                      + ("; the deploy stops it first all the same" if record.schema_breaking else "")))
    lines.append("  steps     " + ", ".join(f"{k} {v:.2f}s" for k, v in record.steps.items()))
    return lines


def verdict_lines(record):
    """The running release on the migrated copy: the verdict, the probes it rests on and the rows they
    wrote, and (breaking) what the app said while it failed."""
    lines = [f"  running   {record.running_commit[:12]} on the migrated copy: "
             + ("compatible (it serves there: the deploy lets it serve during pre_restart)" if record.compatible
                else f"BREAKING ({record.incompatible}): the deploy stops it before pre_restart")]
    probes = "; ".join(f"GET {path} {answer}" for path, answer in record.probes.items()) or "none answered"
    wrote = ", ".join(f"{n:+d} row(s) in {t}" for t, n in sorted(record.probe_rows.items()))
    lines.append(f"  probes    {probes}; " + (f"they wrote {wrote}" if wrote else
                                              "they wrote no row (reads only: the running release's writes were "
                                              "judged by the schema alone)"))
    lines += [f"  app said  | {line}" for line in record.app_said[-12:]]
    return lines


def failed(run, step, exc):
    """Nothing live was touched: the step is recorded as the one that failed; the runner re-raises."""
    run.record.failed = step


def copy_step(run):
    transient.copy_data(run.env, run.scratch)


def build_step(run):
    run.release = releases.build(run.env, run.repo, run.commit, run.out.say, folder=run.scratch / "releases",
                                 shared=run.scratch / "shared")


def pre_restart_step(run):
    run.schema_before = schema_rows(run.db)
    structure = schema.read(run.db)
    environ = transient.command_environment(run.env, run.release.path, run.scratch)
    start = time.monotonic()
    try:
        commands.run_all(run.env.pre_restart, run.release.path, run.env.command_timeout, environ=environ)
    finally:
        run.record.migration_seconds = round(time.monotonic() - start, 3)
        after = schema_rows(run.db)
        before_set, after_set = set(map(tuple, run.schema_before)), set(map(tuple, after))
        run.record.schema_changes = ([f"+ {kind} {name}" for kind, name, _ in sorted(after_set - before_set)]
                                     + [f"- {kind} {name}" for kind, name, _ in sorted(before_set - after_set)])
        run.record.schema_breaking = list(schema.compare(structure, schema.read(run.db)).breaking)


def start_step(run):
    run.port = transient.free_port()
    transient.start(run.env, run.unit, run.release.path, run.scratch, run.port)


def health_step(run):
    run.record.health = transient.wait_serving(run.env, run.unit, run.port, "the rehearsed release")


def paths_step(run):
    bad = transient.check_paths(run.env, run.port, run.record.paths)
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
    run.port = transient.free_port()
    transient.start(env, run.old_unit, run.old_release.path, run.scratch, run.port, log="old-app.log")


def old_check_step(run):
    """Probe the running release on the migrated copy: health first (it must come up), then health_path and
    rehearse_paths; count the rows the probes wrote. Breaking: a schema change it cannot live with, else a
    failed probe (its status, and what the app logged meanwhile)."""
    env, record, log = run.env, run.record, run.scratch / "old-app.log"
    rows_before = dbfiles.live_rows(run.db) or {}
    results = []
    try:
        transient.wait_serving(env, run.old_unit, run.port, "the running release")
    except DeployError as exc:
        results.append(transient.ProbeResult(env.health_path, False, str(exc), 0,
                                             tuple(transient.log_tail(run.scratch, name=log.name).splitlines()[-20:])))
    else:
        results = [transient.probe(run.port, path, log) for path in dict.fromkeys([env.health_path, *env.rehearse_paths])]
    rows_after = dbfiles.live_rows(run.db) or {}
    record.probes = {r.path: r.answer for r in results}
    record.probe_rows = {t: n - rows_before.get(t, 0) for t, n in rows_after.items() if n != rows_before.get(t, 0)}
    failure = next((r for r in results if not r.ok), None)
    reasons = [f"schema: {change}" for change in record.schema_breaking]
    if failure is not None:
        record.app_said = list(failure.app_said)
        reasons.append(f"GET {failure.path}: {failure.answer}" + (f"; the app said: {failure.said}" if failure.said
                                                                  else "; the app logged nothing"))
    record.compatible = not reasons
    record.incompatible = "; ".join(reasons)


REHEARSAL = [
    Step("copy", BEFORE, copy_step, lambda r: f"a fresh online copy of {r.env.db} into {r.scratch}"),
    Step("build", BEFORE, build_step, lambda r: f"build {r.commit[:12]} in {r.scratch / 'releases'}"),
    Step("pre_restart", BEFORE, pre_restart_step, lambda r: "run pre_restart on the copy, timed",
         when=lambda r: r.env.pre_restart),
    Step("start", BEFORE, start_step, lambda r: f"start {r.unit} on a scratch port"),
    Step("health", BEFORE, health_step, lambda r: "its health"),
    Step("paths", BEFORE, paths_step, lambda r: "its rehearse_paths", when=lambda r: r.env.rehearse_paths),
    Step("old_start", BEFORE, old_start_step, lambda r: "the running release on the migrated copy", when=tries_old),
    Step("old_check", BEFORE, old_check_step, lambda r: "its health and rehearse_paths, the schema's changes: "
                                                        "compatible or breaking", when=tries_old),
]
REHEARSAL_OPERATION = Operation(
    "rehearse", REHEARSAL, before_failed=failed, after_failed=failed,
    journal=lambda r: RehearsalJournal(scratch=str(r.scratch), units=[r.unit, r.old_unit], commit=r.commit))


def keep_app_logs(scratch: Path, names: tuple[str, ...]) -> None:
    """What the app started on the scratch copy wrote (its transient unit's output), into the operation's
    log before the scratch folder goes: its last APP_LOG_KEPT bytes each."""
    for name in names:
        text = transient.log_tail(scratch, limit=APP_LOG_KEPT, name=name)
        if text:
            oplog.line(f"-- what the app wrote on the scratch copy ({name}, its last {APP_LOG_KEPT // 1024} KiB):")
            for line in text.splitlines():
                oplog.line(f"| {line}")


APP_LOG_KEPT = 64 * 1024


def clean_up(j: ScratchJournal) -> str:
    """Stop a rehearsal's or a drill's transient units and remove its scratch folder (also for one that
    was killed: the journal names them). Returns what it did."""
    for unit in j.units:
        if unit:
            units.systemctl("stop", unit, timeout=units.RESTART_TIMEOUT, check=False)
            units.systemctl("reset-failed", unit, check=False)
    if j.scratch and Path(j.scratch).name.startswith((".rehearsal-", ".drill-")):
        shutil.rmtree(j.scratch, ignore_errors=True)
    return f"the interrupted {j.op}'s transient units were stopped and {j.scratch} removed"


# -- the drill ---------------------------------------------------------------------------------
def drill(config, env, repo, point):
    """Prove point on a copy (nothing live touched); return the DrillRecord (recorded)."""
    scratch, unit = scratch_for(env, "drill")
    record = DrillRecord(env=env.name, user=unitenv.user(), point=point.id)
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
        keep_app_logs(scratch, ("app.log",))
        clean_up(DrillJournal(units=[unit], scratch=str(scratch)))
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
        run.record.health = transient.wait_serving(run.env, run.unit, run.port, "the point's release")
        bad = transient.check_paths(run.env, run.port, {})
        if bad:
            raise DeployError("; ".join(bad))
        transient.watch(run.env, run.unit, run.port, DRILL_WATCH)
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
                            journal=lambda r: DrillJournal(scratch=str(r.scratch), units=[r.unit], point=r.point.id))


# -- the scratch copy -----------------------------------------------------------------------------
def schema_rows(db):
    try:
        conn = dbfiles.open_readonly(db)
        try:
            return [list(r) for r in conn.execute(
                "SELECT type, name, coalesce(sql, '') FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' "
                "ORDER BY type, name")]
        finally:
            conn.close()
    except (sqlite3.DatabaseError, DeployError):
        return []


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
