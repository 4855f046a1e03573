"""What is wrong with an env, and the commands that take it from there to a healthy env with every
row (status.py shows them, `status.py --alert` sends the first one). Pure: facts in (gathered by
status.py), problems and advice out; tests/test_diagnosis.py checks each rule directly.

The rules, in the order the advice runs (each status run looks again, so the advice is always from
the state as it is now):
- an operation holds the lock: wait (no command); the other problems are said too, with no command
  while it holds (each would wait for it);
- an operation was interrupted: finish or undo it (the next deploy does that first; given the
  commit it leaves, it then has nothing more to do);
- the data first: a missing or damaged database, or a fresh empty one while copies hold rows (a
  rebuilt host): restore the newest good copy (a nightly with every row, not the point before the
  last deploy); a deploy whose release deleted rows (counted as it went live) while the schema stayed:
  the code back without the database, then the deleted rows back from its pre-deploy copy (users'
  rows written since are kept);
- then the code: the running release's folder gone or edited by hand: the same commit built again;
  a release that was rolled back (in any env): roll back here too;
- then the service: stopped by hand: start it (never a rollback: the release is good); failed or
  unhealthy: roll back to the newest safe point;
- then the backups: none yet, or the newest older than a day: back up (never while the live
  database is a fresh empty one and copies hold rows: restore first).
A problem that no command here fixes (the branch tip is a rolled-back release: push a fix) is said,
with no command.
"""

import shlex
from dataclasses import dataclass, field, replace

from .units import holder_name

MAX_BACKUP_AGE = 24 * 3600


@dataclass
class Copy:
    """A copy to restore from (a local backup, or an off-site copy only), as diagnosis needs it."""
    id: str
    time: str
    rows: int | None          # rows it holds; None: not counted (made before copies counted their rows)
    where: str = "local"      # "local" or "off-site"


@dataclass
class Facts:
    env: str
    db: str
    unit: str
    socket: str = ""                  # the socket unit, when the env has one
    unit_state: str = "active"        # systemd's ActiveState of the serving slot
    unit_failed: bool = False         # failed, or restarting again and again
    socket_active: bool = False
    held: list = field(default_factory=list)     # the holder's files: the socket activates it, not the app (units.hold)
    healthy: bool = True
    health: str = ""
    lock: str | None = None
    interrupted: dict | None = None   # the journal's op, step, from, commit
    running: str = ""                 # the commit that serves (what status reports)
    dangling: bool = False            # `current` names a folder that is gone
    edited: list = field(default_factory=list)
    mismatch: str = ""                # `current` or the log disagree with what serves
    db_exists: bool = True
    db_check: str = "ok"
    live_rows: int | None = None      # None: not counted (too large to count within the budget)
    copies: list = field(default_factory=list)      # [Copy], newest first, local and off-site only
    local_backups: int = 0
    newest_backup_age: float | None = None
    deleted_by: dict | None = None    # {"tag", "rows": {table: n}, "backup", "running_it"}: a deploy's data bug
    rows_missing: dict | None = None  # {table: n} of deleted_by's backup still missing live (None: not compared)
    older_copy: dict | None = None    # {"backup", "time", "rows": {table: n}}: the live database looks like an older
                                      # copy of the newest backup (it lacks these rows of it, and holds none it lacks)
    bad_running: dict | None = None   # the mark that makes the tree that serves a rolled-back release
    tip_bad: str = ""
    rollback: str | None = None       # the newest safe point's rollback command
    failed_checks: list = field(default_factory=list)
    replica_problem: str = ""         # the continuous copies' own problem (safedeploy.replica.look): down, behind
    replica_fix: str | None = None


@dataclass
class Diagnosis:
    problems: list = field(default_factory=list)
    advice: list = field(default_factory=list)      # [{"why": str, "command": str}]

    @property
    def ok(self):
        return not self.problems

    def add(self, problem, why=None, command=None):
        self.problems.append(problem)
        if command:
            self.advice.append({"why": why or problem, "command": command})


def restore_target(f):
    """The copy a restore goes to: the newest that holds the most rows (a copy made of an empty database
    after a rebuild holds fewer), else the newest."""
    counted = [c for c in f.copies if c.rows is not None]
    if counted:
        most = max(c.rows for c in counted)
        return next(c for c in counted if c.rows == most)
    return f.copies[0] if f.copies else None


def fresh_and_empty(f):
    """A live database with no row while a copy holds some (a rebuilt host whose app made a new one)."""
    target = restore_target(f)
    return f.live_rows == 0 and target is not None and (target.rows or 0) > 0


def rows_command(cmd, f, backup):
    """The shell line that writes the rows of backup the live database lacks as SQL, and applies it."""
    sql = f"/tmp/{f.env}-rows-to-restore.sql"
    return f"{cmd('backup.py', '--rows-to-restore', backup)} > {sql} && sqlite3 {f.db} < {sql}"


def diagnose(f, cmd):
    """cmd(script, *args): the exact command line of a script for this config (cli.script_command)."""
    d = Diagnosis()
    if f.lock:          # said first; the rest is still looked at (a lock must not hide a damaged database)
        d.add(f"an operation holds {f.env}'s lock: {f.lock}; wait for it to end, then look again")
        rest = diagnose(replace(f, lock=None), cmd)
        d.problems += rest.problems     # no command while it holds: each would wait for the lock, or exit 3
        return d
    if f.interrupted:
        j = f.interrupted
        what = f"an interrupted {j.get('op')} (pid {j.get('pid')}, at step {j.get('step') or 'start'})"
        what += f"; {f.mismatch}" if f.mismatch else ""
        if j.get("op") == "backup":
            d.add(what, "remove what the killed backup left, and back up", cmd("backup.py", f.env))
            return d
        ref = j.get("commit") if j.get("op") == "rollback" else j.get("from") or f.running
        d.add(what, f"finish or undo the interrupted {j.get('op')}: a deploy does that first, and given the commit it "
                    "leaves it has nothing more to do", cmd("deploy.py", f.env, "--ref", ref, "--yes") if ref else None)
        return d
    restore = restore_target(f)

    def restore_command(c):
        return cmd("rollback.py", f.env, "--to", c.id, "--with-db", "--yes")

    def restore_why(c, why):
        held = f"{c.rows} rows" if c.rows is not None else "rows not counted"
        return f"{why}: restore the newest good copy, {c.id} ({c.where}, {held}, {c.time})"

    if not f.db_exists:
        d.add(f"the database {f.db} is missing", restore and restore_why(restore, "the database is missing"),
              restore and restore_command(restore))
    elif f.db_check != "ok":
        d.add(f"the database {f.db} fails quick_check: {f.db_check}",
              restore and restore_why(restore, "the database is damaged (the damaged file is kept as evidence)"),
              restore and restore_command(restore))
    elif fresh_and_empty(f):
        d.add(f"the database {f.db} holds no row, and {restore.id} ({restore.where}) holds {restore.rows}: a fresh "
              "empty database (a rebuilt host?); restore first, a backup now would copy the empty one",
              restore_why(restore, "a fresh empty database while a copy holds the rows"), restore_command(restore))
    elif f.deleted_by and (f.rows_missing is None or f.rows_missing):
        bug = f.deleted_by
        missing = f.rows_missing or bug["rows"]
        lost = ", ".join(f"{n} row(s) of {t}" for t, n in sorted(missing.items()))
        d.problems.append(f"the deploy before {bug['tag']} deleted {lost} (counted as its release went live; the "
                          f"schema did not change); they are in its pre-deploy backup {bug['backup']}")
        if bug["running_it"]:
            d.advice.append({"why": "the data bug's code out first, the database kept (the rows users wrote since "
                                    "stay): roll the code back", "command": cmd("rollback.py", f.env, "--to", bug["tag"],
                                                                                "--code-only", "--yes")})
        d.advice.append({"why": "then the deleted rows back, from the pre-deploy backup (reviewable SQL, one "
                                "transaction; a row whose id was taken since comes back under a new id, with the "
                                "rows that refer to it)", "command": rows_command(cmd, f, bug["backup"])})
    elif f.older_copy:
        o = f.older_copy
        lacks = ", ".join(f"{n} row(s) of {t}" for t, n in sorted(o["rows"].items()))
        d.add(f"the live database lacks {lacks} that the newest backup {o['backup']} ({o['time']}) holds, and holds no "
              "row it lacks: it looks like an older copy (put in place by hand?)",
              "put the missing rows back from that backup (the live rows stay; if they were deleted on purpose, "
              "skip this)", rows_command(cmd, f, o["backup"]))
    if f.dangling or f.edited:
        what = ("the running release's folder is gone" if f.dangling else
                f"the running release differs from its commit: {', '.join(f.edited[:3])}")
        d.add(what, f"{what}: build {f.running[:12]} again (the edited release stays on disk, not run)",
              cmd("deploy.py", f.env, "--ref", f.running, "--yes") if f.running else None)
    elif f.mismatch:
        d.add(f.mismatch)
    if f.bad_running:
        where = f" in {f.bad_running['env']}" if f.bad_running.get("env") != f.env else ""
        d.add(f"{f.env} runs {f.running[:12]}, a release that was rolled back{where} at {f.bad_running.get('time')} "
              f"({f.bad_running.get('why')})", "roll back here too, to the newest safe point", f.rollback)
    if f.held:
        holder = holder_name(f.unit)
        d.add(f"{f.socket or 'the socket'} holds requests for safe-deploy's holder, not the app: an operation stopped "
              "the app for a migration or a restore and did not finish",
              "give the socket back to the app and start it (what `current` names runs)",
              None if d.advice else
              f"rm -f {' '.join(shlex.quote(p) for p in f.held)} && systemctl --user daemon-reload && "
              f"systemctl --user stop {holder} && systemctl --user start {f.unit}")
    elif (f.unit_state in ("inactive", "deactivating") and not f.unit_failed
          and not (f.socket_active and f.healthy)):          # behind its socket, an idle service starts on demand
        units_to_start = " ".join(u for u in (f.socket, f.unit) if u)
        d.add(f"{f.unit} is stopped{' (and ' + f.socket + ')' if f.socket and not f.socket_active else ''}: "
              "stopped by hand, or never started",
              "start it: the release it runs was healthy; nothing is rolled back",
              None if d.advice else f"systemctl --user start {units_to_start}")
    elif f.unit_failed or not f.healthy:
        why = (f"{f.unit} failed ({f.unit_state})" if f.unit_failed else f"health: {f.health}")
        d.add(why, f"{why}: roll back to the newest safe point", None if d.advice else f.rollback)
    if not (fresh_and_empty(f) or not f.db_exists or f.db_check != "ok"):
        if not f.local_backups:
            where = " (its copies are off-site only)" if f.copies else ""
            d.add(f"no local backup of {f.db} yet{where}", "back up the live database", cmd("backup.py", f.env))
        elif f.newest_backup_age is None or f.newest_backup_age > MAX_BACKUP_AGE:
            d.add("the newest backup is older than a day: is the nightly backup running?",
                  "back up now (and look at the nightly timer or cron line)", cmd("backup.py", f.env))
    if f.tip_bad:
        d.add(f.tip_bad)
    for check in f.failed_checks:
        d.add(check)
    if f.replica_problem:           # the replicator down or behind: writes since are on this disk only
        d.add(f.replica_problem, "the continuous copies: " + f.replica_problem, f.replica_fix)
    return d
