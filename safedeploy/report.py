"""What status.py shows about one env: the facts (the unit and its socket, HTTP health, what serves and from
which release, an operation running or interrupted, the database and its rows, the backups and off-site
copies, the last deploy, rollback and rehearsal), then safedeploy.diagnosis: the problems, and the advice.

EnvReport is the report as a dataclass; its JSON (status.py --json, per env) is its fields, in their order.
A part that cannot be read says why (a problem) and leaves its fields out of the JSON: the fields that
only a part fills start as ABSENT, which to_json leaves out.
"""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from typing import Any

from . import backups, clock, damaged, datafacts, diagnosis, health, offsite, oplog, planning, recovery, releases, replica, unitfiles, units
from . import records as logs
from .commandline import script_command
from .errors import DeployError
from .gitrepo import Repo
from .marks import bad_mark
from .points import list_points
from .state import age_seconds, lock_holder_of

HEALTH_TIMEOUT = 2.0


class Absent:
    """A field no part filled (its part could not be read, or it does not apply): not in the JSON."""

    def __repr__(self) -> str:
        return "ABSENT"


ABSENT: Any = Absent()


@dataclass
class EnvReport:
    """One env as status.py shows it. The field order is the JSON's key order."""
    commit: str | None = None
    subject: str = ""
    branch: str | None = None
    unit: dict = field(default_factory=lambda: {"active": False, "state": "unknown"})
    health: dict = field(default_factory=lambda: {"ok": False, "status": None, "ms": None})
    last_deploy: dict | None = None
    last_backup: dict | None = None
    rollback: str | None = None
    lock: str | None = None
    interrupted: dict | None = None
    problems: list[str] = field(default_factory=list)
    restart_method: str | None = None
    warning: str | None = None
    replica: dict | None = None
    log: str | None = None                 # the last failed operation's full output
    last_operation: dict | None = None
    head: str | None = ABSENT              # code part: the work tree's HEAD
    release: str | None = ABSENT
    undo_rollback: str = ABSENT            # only after a rollback that kept a pre-rollback copy
    undo_warning: str = ABSENT
    clock: str | None = ABSENT             # data part
    database: dict = ABSENT
    rows: dict = ABSENT
    offsite_problem: str = ABSENT          # only when the off-site copies could not be listed
    last_drill: dict | None = ABSENT       # log part
    last_rollback: dict | None = ABSENT
    last_rehearsal: dict | None = ABSENT
    advice: list[dict] = ABSENT
    ok: bool = ABSENT

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not ABSENT}


def look_at(config, env) -> EnvReport:
    """Everything status shows about one env; a part that cannot be read says why. Each look reads one state:
    one that an operation started or ended during (the lock's holder, or the names of the operation logs, not
    the same after it as before) read facts from before and from the middle of that operation at once, and is
    taken again, up to LOOKS times; a look in the middle of one sees its lock, says wait and gives no command."""
    seen = settled(env)
    for _ in range(LOOKS):
        report = look_once(config, env, seen[0])
        now = settled(env)
        if now == seen:
            return report
        seen = now
    report.problems.insert(1 if report.lock else 0,        # after the lock's line, which is said first
                           f"operations started or ended on {env.name} during each of {LOOKS} looks: what is "
                           "said here may mix states; look again")
    report.advice, report.ok = [], False
    return report


LOOKS = 3


def settled(env) -> tuple[Any, tuple[str, ...]]:
    """What a look must find the same at its end as at its start: who holds the lock, and the names of the
    operation logs (a run that started and ended within the look leaves one; names, not their order, which
    two logs of one second take from their times)."""
    names = tuple(sorted(p.name for p in oplog.env_logs(env.state_dir, env.name)))
    return lock_holder_of(env.state_dir, env.name), names


def look_once(config, env, holder) -> EnvReport:
    """One look, with the lock's holder as found at its start (holders.Holder or None)."""
    report = EnvReport(lock=holder.describe() if holder else None, log=oplog.last_failed(env.state_dir, env.name))
    last_op = oplog.last_operation(env.state_dir, env.name)
    report.last_operation = last_op.to_json() if last_op else None
    facts = diagnosis.Facts(env=env.name, db=str(env.db), unit=env.unit, lock=report.lock,
                            mid_operation=bool(holder and holder.changes_live),
                            health_timeout=env.health_timeout)
    if not report.lock:
        j = recovery.interrupted_any(env)
        if j:
            facts.interrupted = j.summary()
            report.interrupted = facts.interrupted.to_json()
    unreadable: list[str] = []
    with ThreadPoolExecutor(max_workers=1) as pool:
        probe = pool.submit(health.check, env.health_url, HEALTH_TIMEOUT)
        try:
            records = logs.read(env)
        except DeployError as exc:
            records = []
            unreadable.append(str(exc))
        local = backups.list_backups(env.backup_dir)         # read once: data, copies and log parts use it
        for part in (unit_part, code_part, replica_part, data_part, log_part):
            trial = copy.copy(report)           # a part that fails leaves nothing of itself behind
            try:
                part(config, env, records, local, facts, trial)
                report = trial
            except DeployError as exc:
                unreadable.append(str(exc))
        result = probe.result()
    facts.healthy, facts.health = result.ok, result.describe()
    report.health = {"ok": result.ok, "status": result.status, "ms": result.ms, "url": env.health_url}
    if result.error:
        report.health["error"] = result.error
    found = diagnosis.diagnose(facts, lambda script, *a: script_command(config, script, *a))
    report.problems = found.problems + unreadable
    report.advice = found.advice
    add_record_problems(config, env, report, facts)
    report.ok = not report.problems
    return report


def add_record_problems(config, env, report: EnvReport, facts: diagnosis.Facts) -> None:
    """Damaged records and bad marks that only a tag holds (damaged.record_problems): said, and repaired by
    the recovery the next deploy runs first (given the commit that runs, it has nothing more to do). While an
    operation that changes the env holds the lock, a tag without its mark is that operation's (a rollback
    records its mark last); held by anything else (a backup), a lost mark is said as ever."""
    damaged_records = damaged.record_problems(env, marks_too=not facts.mid_operation)
    report.problems += damaged_records
    if damaged_records and facts.running and not facts.lock:     # no command while an operation holds the lock
        report.advice.append({"why": "set the damaged records aside (kept beside them) and write back the marks "
                                     "the rolled-back tags hold: the next deploy does that first",
                              "command": script_command(config, "deploy.py", env.name, "--ref", facts.running, "--yes")})


def unit_part(config, env, records, local, facts: diagnosis.Facts, report: EnvReport) -> None:
    st = units.serving_state(env.unit)         # with a handover slot, the one that serves
    method = units.restart_method(env.unit)
    sock = units.state(unitfiles.socket_name(env.unit))
    facts.socket = sock.name if sock.known else ""
    facts.socket_active = sock.is_active
    facts.held = [str(path) for path in unitfiles.port_holder_files(env.unit) if path.exists()]
    facts.unit_state, facts.serving_unit, facts.uptime = st.active, st.name, st.uptime
    facts.unit_failed = st.active == "failed" or (st.is_active and units.is_restart_looping(st)) or st.sub == "auto-restart"
    if method == "handover" and all(units.state(u).is_active for u in units.slots(env.unit)) and not facts.lock:
        facts.mismatch = (f"both {env.unit} and {unitfiles.helper_name(env.unit)} run outside a deploy (one was killed "
                          "mid-swap); the next deploy.py or rollback.py stops the older")
    report.restart_method = method
    report.warning = None if method != "plain" else unitfiles.DROPS_WARNING.format(
        command=script_command(config, "deploy.py", env.name, "--install-units"))
    report.unit = {"active": st.is_active, "state": st.active, "sub": st.sub, "name": st.name,
                   "since": units.uptime_text(st) or None, "restarts": st.restarts,
                   "looping": units.is_restart_looping(st) if st.is_active else False}


def running_commit(env, repo: Repo, logged: str, current, facts: diagnosis.Facts) -> str:
    """What runs: on releases, read from the serving process (the release folder it runs in), never from
    `current` or the log, which a killed deploy may have moved ahead of it; in place, the log's commit."""
    if not env.converted:
        facts.edited = [f.strip() for f in repo.dirty_files()]
        served = health.served_commit(env.base_url, HEALTH_TIMEOUT)
        if served and served != logged:
            facts.mismatch = (f"the app answers for {served[:12]} (/_deploy/status), the deploy log says "
                              f"{logged[:12]}: what runs is {served[:12]}")
            return served
        return logged
    st = units.serving_state(env.unit)
    serving = releases.serving(env, st.main_pid) if st.is_active else None
    facts.dangling = releases.dangling_current(env)
    if serving and current and serving.id != current.id and not facts.lock:
        facts.mismatch = (f"{env.current_link} points at {current.id} ({current.commit[:12]}), but {serving.id} "
                          f"({serving.commit[:12]}) serves: an operation was interrupted between the switch and "
                          "the restart")
    elif st.is_active and not serving:
        facts.mismatch = f"{st.name} runs, but not from a release of {env.name} that can be read"
    if current:
        facts.edited = releases.differences(env, repo, current)
    return serving.commit if serving else (current.commit if current else logged)


def code_part(config, env, records, local, facts: diagnosis.Facts, report: EnvReport) -> None:
    """What runs (running_commit), the rollback line, the undo of the last rollback, a bad branch tip."""
    repo = Repo(env.path)
    head = repo.head()
    current = releases.current(env)
    commit = facts.running = running_commit(env, repo, logs.running_commit(records) or head, current, facts)
    report.commit, report.subject, report.branch = commit, repo.subject(commit), repo.current_branch()
    report.head, report.release = head, current.id if current else None
    if repo.resolve(commit):
        facts.bad_running = bad_mark(config, env, repo.tree_of(commit), tags_too=not facts.mid_operation)
    points = list_points(env, repo)
    safe = planning.safe_points(config, env, repo, points, commit)     # the rollback line only moves forward in safety
    if safe:
        report.rollback = script_command(config, "rollback.py", env.name, "--to", safe[0].id)
        # the advice is pasted as it is (a terminal or not): it takes --yes; the rollback line asks first
        facts.rollback = script_command(config, "rollback.py", env.name, "--to", safe[0].id, "--yes")
    undo_part(config, env, repo, records, points, report)
    tip = repo.resolve(f"refs/remotes/{env.remote}/{env.branch}") if env.remote else None
    if tip and tip != commit and bad_mark(config, env, repo.tree_of(tip), tags_too=not facts.mid_operation):
        facts.tip_bad = (f"{env.remote}/{env.branch} is still at {tip[:12]} (as last fetched), a release that was "
                         "rolled back: deploy.py refuses it; push a fix")


def undo_part(config, env, repo: Repo, records, points, report: EnvReport) -> None:
    """After a rollback that kept a pre-rollback copy: the command that undoes it, and what that costs."""
    last = next(iter(logs.operations(records, 1)), None)
    if not (last and last.kind == "rollback" and last.ok and last.pre_rollback):
        return
    saved = [p for p in points if p.backup and p.backup.path == last.pre_rollback]
    if not saved:
        return
    report.undo_rollback = script_command(config, "rollback.py", env.name, "--to", saved[0].id, "--with-db")
    marked = (f"it brings back {saved[0].commit[:12]}, the release that rollback took out (marked bad: deploys "
              "refuse it)") if planning.point_mark(config, env, repo, saved[0]) else None
    report.undo_warning = "; ".join(filter(None, [marked, (
        "the rows written since the rollback leave the live database (kept aside, as a pre-rollback copy)")]))


def data_part(config, env, records, local, facts: diagnosis.Facts, report: EnvReport) -> None:
    """The database (there, quick_check), the row ledger over every copy (safedeploy.datafacts), the backups."""
    copies, problem = offsite.copies_for(config, env)
    data = datafacts.gather(config, env, local, records, facts.running, copies)
    for name in ("db_exists", "db_check", "live_rows", "outstanding", "best", "salvage", "deleted_by",
                 "failed_restores"):
        setattr(facts, name, getattr(data, name))
    facts.ledger_incomplete = data.incomplete
    facts.point_in_time = [b.time for b in local if b.reason == "point-in-time"]
    facts.local_backups = len(local)
    present, future = clock.split(local)        # a copy dated in the future is not the newest (clock.py)
    facts.newest_backup_age = age_seconds(present[0].time) if present else None
    report.clock = clock.future_note(future) if future else None
    report.database = {"path": str(env.db), "exists": data.db_exists,
                       "check": data.db_check if data.db_exists else "missing"}
    report.rows = {"live": data.live_rows, "outside": [{"copy": o.id, "where": o.where, "missing": o.missing,
                                                        "lower_bound": o.by_count, "restorable": o.restorable}
                                                       for o in data.outstanding]}
    if problem:
        report.offsite_problem = problem
    if report.clock and (facts.newest_backup_age is None or facts.newest_backup_age > diagnosis.MAX_BACKUP_AGE):
        facts.failed_checks.append(report.clock)       # said as a problem; the backup rule gives the command
    newest = (present or local)[0] if local else None
    report.last_backup = {"path": newest.path, "time": newest.time, "reason": newest.reason,
                          "age_seconds": age_seconds(newest.time), "rows": newest.rows_total} if newest else None


def log_part(config, env, records, local, facts: diagnosis.Facts, report: EnvReport) -> None:
    deploys, rollbacks = logs.of_kind(records, "deploy"), logs.of_kind(records, "rollback")
    rehearsals, drills = logs.of_kind(records, "rehearsal"), logs.of_kind(records, "drill")
    r = rehearsals[-1] if rehearsals else None
    drill = drills[-1] if drills else None
    report.last_deploy = deploys[-1].to_json() if deploys else None
    report.last_drill = {"time": drill.time, "result": drill.result, "point": drill.point} if drill else None
    report.last_rollback = rollbacks[-1].to_json() if rollbacks else None
    report.last_rehearsal = {"time": r.time, "commit": r.commit, "result": r.result, "failed": r.failed,
                             "migration_seconds": r.migration_seconds, "compatible": r.compatible} if r else None


def replica_part(config, env, records, local, facts: diagnosis.Facts, report: EnvReport) -> None:
    """The continuous copies ([replica]): the replicator, the replica's newest moment and how far behind it is."""
    state = replica.look(config, env, lambda script, *a: script_command(config, script, *a))
    if state is not None:
        facts.replica_problem, facts.replica_fix = state.problem, state.fix
        facts.replicated, facts.replica_newest = True, state.newest
    report.replica = state.to_json() if state else None
