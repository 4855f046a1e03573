"""What is wrong with an env, and the commands that take it from there to a healthy env with every
row (status.py shows them, `status.py --alert` sends the first one). Pure: facts in (gathered by
status.py and safedeploy.datafacts), problems and advice out; tests/test_diagnosis.py checks each rule.

The rules are a list, RULES, in the order the advice runs; each is `facts -> [Finding]`. Each status run
looks again, so the advice is always from the state as it is now. The order is the priority:
1. lock: an operation holds the env's lock: wait; the other problems are still said, with no command
   (each would wait for it);
2. interrupted: finish or undo it (the next deploy does that first); nothing after it is advised;
3. database: missing, damaged (what a salvage finds in it is said first), or lacking most of what a copy
   holds (a fresh database on a rebuilt host, an older one put in place): the database alone back to
   the copy with the most rows (`rollback.py --to COPY --db-only`: the code stays, nothing is marked bad;
   the database it replaces is kept, and salvaged when unreadable); when the continuous copies hold a
   newer moment than every copy, a copy of that moment first (`backup.py --at latest`);
4. rows: every copy that holds users' rows the live database lacks (the row ledger, by content): put
   them back (`backup.py --restore-rows COPY --yes`), after taking out the release that deleted them
   when it still runs; rows no copy holds are said with their number; rows the tool cannot put back are
   said with why, and no command loops on them;
5. code: the running release's folder gone or edited: built again;
6. bad release: what serves was rolled back in some env: roll back here too;
7. service: the socket left holding requests: given back; stopped by hand: started; running but not
   answering for longer than its health window (hung, stopped): restarted; failed, or failing after a
   fresh start: roll back (only then is the release at fault). Its command only when nothing before it
   advised one (those change what serves);
8. backups: none, or the newest older than a day (never while a restore of the database is due);
9. branch tip, failed checks, continuous copies: said (with the command that fixes them, if any).
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from .journals import Interrupted, Op
from .unitfiles import holder_name

if TYPE_CHECKING:
    from .datafacts import Outstanding

MAX_BACKUP_AGE = 24 * 3600
Cmd = Callable[..., str]


@dataclass
class Facts:
    """One env's report, flattened into what the findings read."""
    env: str
    db: str
    unit: str
    socket: str = ""                  # the socket unit, when the env has one
    serving_unit: str = ""            # the slot that serves (the unit, or its handover twin)
    unit_state: str = "active"        # systemd's ActiveState of the serving slot
    unit_failed: bool = False         # failed, or restarting again and again
    uptime: float | None = None       # seconds since the serving process started
    health_timeout: float = 30.0
    socket_active: bool = False
    held: list = field(default_factory=list)     # the holder's files: the socket activates it, not the app (units.hold)
    healthy: bool = True
    health: str = ""
    lock: str | None = None
    mid_operation: bool = False       # a deploy, rollback or conversion of the tool holds the lock (Holder.changes_live)
    interrupted: Interrupted | None = None   # the journal's op, pid, step, from, commit
    running: str = ""                 # the commit that serves (what status reports)
    dangling: bool = False            # `current` names a folder that is gone
    edited: list = field(default_factory=list)
    mismatch: str = ""                # `current` or the log disagree with what serves
    db_exists: bool = True
    db_check: str = "ok"
    live_rows: int | None = None      # users' rows live (None: not counted)
    outstanding: list[Outstanding] = field(default_factory=list)     # copies holding rows live lacks
    best: Outstanding | None = None   # the copy a whole restore goes to
    salvage: dict | None = None       # what the damaged database still holds (datafacts.preview_salvage)
    deleted_by: dict | None = None    # the last deploy whose release deleted rows (datafacts.release_deleted)
    failed_restores: dict = field(default_factory=dict)  # copy id -> why its last --restore-rows failed
    replicated: bool = False          # the env has continuous copies
    replica_newest: str | None = None # their newest moment
    point_in_time: list = field(default_factory=list)    # times of the point-in-time copies here
    ledger_incomplete: str = ""
    local_backups: int = 0
    newest_backup_age: float | None = None
    bad_running: dict | None = None   # the mark that makes the tree that serves a rolled-back release
    tip_bad: str = ""
    rollback: str | None = None       # the newest safe point's rollback command
    failed_checks: list = field(default_factory=list)
    replica_problem: str = ""         # the continuous copies' own problem (safedeploy.replica.look): down, behind
    replica_fix: str | None = None


@dataclass(frozen=True)
class Finding:
    """One problem, with the commands that fix it in order."""
    problem: str
    advice: tuple[tuple[str, str], ...] = ()       # (why, command), in order
    quiet_after_advice: bool = False               # its command only when nothing before advised one
    final: bool = False                            # nothing after it is looked at


@dataclass
class Diagnosis:
    """An env's problems and the advice, the commands to run in order."""
    problems: list = field(default_factory=list)
    advice: list = field(default_factory=list)      # [{"why": str, "command": str}]

    @property
    def ok(self):
        return not self.problems

    def take(self, finding: Finding) -> None:
        self.problems.append(finding.problem)
        if finding.quiet_after_advice and self.advice:
            return
        self.advice += [{"why": why, "command": command} for why, command in finding.advice if command]


def one(problem: str, why: str | None = None, command: str | None = None, **kw) -> list[Finding]:
    return [Finding(problem, ((why or problem, command),) if command else (), **kw)]


# -- 1, 2: a lock, an interrupted operation ------------------------------------------------------------
def interrupted_rule(f: Facts, cmd: Cmd) -> list[Finding]:
    if not f.interrupted:
        return []
    j = f.interrupted
    what = f"an interrupted {j.op} (pid {j.pid}, at step {j.step or 'start'})"
    what += f"; {f.mismatch}" if f.mismatch else ""
    if j.op == Op.BACKUP:
        return one(what, "remove what the killed backup left, and back up", cmd("backup.py", f.env), final=True)
    ref = j.commit if j.op == Op.ROLLBACK else j.from_ or f.running
    return one(what, f"finish or undo the interrupted {j.op}: a deploy does that first, and given the commit it "
                     "leaves it has nothing more to do", cmd("deploy.py", f.env, "--ref", ref, "--yes") if ref else None,
               final=True)


# -- 3: the database -------------------------------------------------------------------------------
def replica_first(f: Facts, cmd: Cmd) -> tuple[str, str] | None:
    """A copy of the continuous copies' newest moment, when it is newer than every copy here."""
    if not f.replica_newest:
        return None
    best_time = f.best.time if f.best else ""
    if any(t >= f.replica_newest for t in f.point_in_time) or best_time >= f.replica_newest:
        return None
    return ("the continuous copies hold a newer moment than any copy: a copy of it first (status then restores it)",
            cmd("backup.py", f.env, "--at", "latest"))


def restore_advice(f: Facts, cmd: Cmd, why: str) -> tuple[tuple[str, str], ...]:
    first = replica_first(f, cmd)
    if first:
        return (first,)
    if f.best is None:
        return ()
    b = f.best
    held = f"{b.total} rows" if b.total is not None else "rows not counted"
    return ((f"{why}: the database alone back to the copy with the most rows, {b.id} ({b.where}, {held}, {b.time}); "
             "the code stays, nothing is marked bad; the database it replaces is kept (salvaged if unreadable), "
             "and its rows come back next", cmd("rollback.py", f.env, "--to", b.id, "--db-only", "--yes")),)


def salvage_text(f: Facts) -> str:
    s = f.salvage or {}
    if "error" in s:
        return f"; nothing can be salvaged from it ({s['error']})"
    if not s:
        return ""
    lost = (f"{s['bad_pages']} of its pages cannot be read: the rows on them that no copy holds cannot be saved "
            f"({s['lost_estimate']} row(s) by the ids missing past the copy)" if s.get("bad_pages") else
            "every page of it can be read")
    return f"; it still holds {s['rows']} users' row(s) (read page by page: they are salvaged as it is replaced); {lost}"


def database_rule(f: Facts, cmd: Cmd) -> list[Finding]:
    if not f.db_exists and f.mid_operation:      # a rollback with the database renames the live file aside, then the copy in
        return [Finding(f"the database {f.db} is not in place now: the operation under way may be replacing it")]
    if not f.db_exists:
        return [Finding(f"the database {f.db} is missing", restore_advice(f, cmd, "the database is missing"))]
    if f.db_check != "ok":
        return [Finding(f"the database {f.db} fails quick_check: {f.db_check}{salvage_text(f)}",
                        restore_advice(f, cmd, "the database is damaged"))]
    b = bulk(f)
    if b is not None:
        return [Finding(f"the live database lacks {b.missing_total} of the {b.total} users' rows {b.id} ({b.where}, "
                        f"{b.time}) holds: a fresh or an older database (a rebuilt host?); restore first, a backup now "
                        "would copy it", restore_advice(f, cmd, "the live database lacks most rows"))]
    return []


def bulk(f: Facts):
    """The copy a whole restore goes to when the live database lacks most of it (else None)."""
    b = f.best
    return b if b is not None and b.bulk and b.id not in f.failed_restores else None


def restoring_whole(f: Facts) -> bool:
    return not f.db_exists or f.db_check != "ok" or bulk(f) is not None


# -- 4: rows outside the live database ------------------------------------------------------------------
def rows_rule(f: Facts, cmd: Cmd) -> list[Finding]:
    if restoring_whole(f):
        return []
    found: list[Finding] = []
    bug = f.deleted_by
    ordered = sorted(f.outstanding, key=lambda o: (not o.held, o.time), reverse=False)
    for o in ordered:
        found.append(copy_finding(f, cmd, o, bug))
    if bug and bug.get("uncopied"):
        found += uncopied_finding(f, cmd, bug)
    if f.ledger_incomplete:
        found += one(f"the rows of the copies were not all compared with the live database: {f.ledger_incomplete}")
    return found


def copy_finding(f: Facts, cmd: Cmd, o, bug: dict | None) -> Finding:
    lacks = ", ".join(f"{n} row(s) of {t}" for t, n in sorted(o.missing.items()))
    bound = "at least " if o.by_count else ""
    dismiss = cmd("backup.py", f.env, "--release-hold", o.id)
    problem = (f"{o.id} ({o.reason}, {o.where}, {o.time}) holds {bound}{lacks} that the live database lacks "
               f"(compared by content); if they were deleted on purpose: {dismiss}")
    advice: list[tuple[str, str]] = []
    if bug and o.path and o.path == bug.get("backup"):
        problem = f"the release of {bug['to'][:12]} deleted rows as it went live ({bug['tag']}): " + problem
        if bug.get("running_it"):
            advice.append(("the data bug's code out first, the database kept (the rows users wrote since stay)",
                           cmd("rollback.py", f.env, "--to", bug["tag"], "--code-only", "--yes")))
    if o.id in f.failed_restores:
        problem += (f"; putting them back failed ({f.failed_restores[o.id]}): review them with "
                    f"{cmd('backup.py', f.env, '--restore-rows', o.id, '--sql')}")
        return Finding(problem, tuple(advice))
    if o.restorable == 0:
        why = "; ".join(f"{n} row(s): {w}" for w, n in sorted(o.left_out.items())) or "nothing it can insert"
        problem += f"; the tool cannot put them back ({why}): they stay in the copy for a person to merge"
        return Finding(problem, tuple(advice))
    if o.left_out:
        problem += "; " + "; ".join(f"{n} row(s) will stay out: {w}" for w, n in sorted(o.left_out.items()))
    advice.append(("put them back: one transaction verified before it commits, the app running; a row whose id a "
                   "newer row took comes back under a new id, with the rows that refer to it",
                   cmd("backup.py", f.env, "--restore-rows", o.id, "--yes")))
    return Finding(problem, tuple(advice))


def uncopied_finding(f: Facts, cmd: Cmd, bug: dict) -> list[Finding]:
    n = sum(bug["uncopied"].values())
    text = (f"the release of {bug['to'][:12]} deleted {n} row(s) that no copy held when it went live (written after "
            f"its pre-deploy backup, at {bug.get('switched_at')})")
    moment = bug.get("switched_at")
    if f.replicated and moment:
        if any(abs_time_before(t, moment) for t in f.point_in_time):
            return []               # the copy of that moment is here: the rows rule above compares it
        return one(text + ": the continuous copies hold them", "a copy of the moment the release was switched in; its "
                   "rows come back next", cmd("backup.py", f.env, "--at", moment))
    release = cmd("backup.py", f.env, "--release-hold", Path(bug["backup"]).name.removesuffix(".sqlite3")) \
        if bug.get("backup") else None
    return one(text + ": they cannot be put back (no continuous copies: [replica])"
               + (f"; once that is understood: {release}" if release else ""))


def abs_time_before(t: str, moment: str) -> bool:
    return t <= moment


# -- 5, 6: the code ---------------------------------------------------------------------------------
def code_rule(f: Facts, cmd: Cmd) -> list[Finding]:
    if f.dangling or f.edited:
        what = ("the running release's folder is gone" if f.dangling else
                f"the running release differs from its commit: {', '.join(f.edited[:3])}")
        return one(what, f"{what}: build {f.running[:12]} again (the edited release stays on disk, not run)",
                   cmd("deploy.py", f.env, "--ref", f.running, "--yes") if f.running else None)
    return one(f.mismatch) if f.mismatch else []


def bad_release_rule(f: Facts, cmd: Cmd) -> list[Finding]:
    if not f.bad_running:
        return []
    where = f" in {f.bad_running['env']}" if f.bad_running.get("env") != f.env else ""
    return one(f"{f.env} runs {f.running[:12]}, a release that was rolled back{where} at {f.bad_running.get('time')} "
               f"({f.bad_running.get('why')})", "roll back here too, to the newest safe point", f.rollback)


# -- 7: the service ---------------------------------------------------------------------------------
def service_rule(f: Facts, cmd: Cmd) -> list[Finding]:
    if f.held and f.mid_operation:
        return one(f"{f.socket or 'the socket'} holds requests for safe-deploy's holder while the operation under way "
                   "has the app stopped (a migration or a restore)")
    if f.held:
        return one(f"{f.socket or 'the socket'} holds requests for safe-deploy's holder, not the app: an operation "
                   "stopped the app for a migration or a restore and did not finish",
                   "give the socket back to the app and start it (what `current` names runs)",
                   f"rm -f {' '.join(shlex.quote(p) for p in f.held)} && systemctl --user daemon-reload && "
                   f"systemctl --user stop {holder_name(f.unit)} && systemctl --user start {f.unit}",
                   quiet_after_advice=True)
    if (f.unit_state in ("inactive", "deactivating") and not f.unit_failed
            and not (f.socket_active and f.healthy)):          # behind its socket, an idle service starts on demand
        units_to_start = " ".join(u for u in (f.socket, f.unit) if u)
        return one(f"{f.unit} is stopped{' (and ' + f.socket + ')' if f.socket and not f.socket_active else ''}: "
                   "stopped by hand, or never started", "start it: the release it runs was healthy; nothing is "
                   "rolled back", f"systemctl --user start {units_to_start}", quiet_after_advice=True)
    if f.unit_failed:
        why = f"{f.unit} failed ({f.unit_state})"
        return one(why, f"{why}: roll back to the newest safe point", f.rollback, quiet_after_advice=True)
    if not f.healthy:
        return unhealthy(f)
    return []


def unhealthy(f: Facts) -> list[Finding]:
    why = f"health: {f.health}"
    fresh = f.uptime is not None and f.uptime <= f.health_timeout + 5
    if f.unit_state == "active" and not fresh:
        unit = f.serving_unit or f.unit
        return one(f"{why}; {unit} runs but does not answer (hung, or stopped)",
                   f"{why}: restart it (a fresh start; the release is judged only if it fails after one, and then "
                   "the advice is a rollback)", f"systemctl --user restart {unit}", quiet_after_advice=True)
    return one(why, f"{why} after a fresh start: the release is at fault; roll back to the newest safe point",
               f.rollback, quiet_after_advice=True)


# -- 8, 9: backups and the rest ----------------------------------------------------------------------
def backups_rule(f: Facts, cmd: Cmd) -> list[Finding]:
    if restoring_whole(f):
        return []
    if not f.local_backups:
        return one(f"no local backup of {f.db} yet", "back up the live database", cmd("backup.py", f.env))
    if f.newest_backup_age is None or f.newest_backup_age > MAX_BACKUP_AGE:
        return one("the newest backup is older than a day: is the nightly backup running?",
                   "back up now (and look at the nightly timer or cron line)", cmd("backup.py", f.env))
    return []


def rest_rule(f: Facts, cmd: Cmd) -> list[Finding]:
    found = one(f.tip_bad) if f.tip_bad else []
    found += [Finding(check) for check in f.failed_checks]
    if f.replica_problem:           # the replicator down or behind: writes since are on this disk only
        found += one(f.replica_problem, "the continuous copies: " + f.replica_problem, f.replica_fix)
    return found


RULES: list[tuple[str, Callable[[Facts, Cmd], list[Finding]]]] = [
    ("interrupted", interrupted_rule),
    ("database", database_rule),
    ("rows", rows_rule),
    ("code", code_rule),
    ("bad release", bad_release_rule),
    ("service", service_rule),
    ("backups", backups_rule),
    ("the rest", rest_rule),
]


def diagnose(f: Facts, cmd: Cmd) -> Diagnosis:
    """cmd(script, *args): the exact command line of a script for this config (cli.script_command)."""
    d = Diagnosis()
    if f.lock:          # said first; the rest is still looked at (a lock must not hide a damaged database)
        d.problems.append(f"an operation holds {f.env}'s lock: {f.lock}; wait for it to end, then look again")
        d.problems += diagnose(replace(f, lock=None), cmd).problems     # no command while it holds
        return d
    for _, rule in RULES:
        findings = rule(f, cmd)
        for finding in findings:
            d.take(finding)
        if any(finding.final for finding in findings):
            break
    return d
