"""The rules that decide, as pure functions: facts in, a decision and its reasons out.

Nothing here reads a file, runs a command or asks systemd: callers gather the facts (planning,
status, recovery) and turn the decisions into steps and text. That is what lets the tests check
every rule in milliseconds (tests/test_decisions.py), apart from the end-to-end tests that check
the facts are gathered right.

- the deploy gates: a bad release, the promotion gate, a required rehearsal, the direction;
- which rollback point: --to, else the state before the last good deploy;
- the database decision of a rollback: restore or keep, and why;
- what the recovery of an interrupted operation does;
- the exit code when an operation fails: 1 (back as it was) or 4 (a human is needed).
"""

from dataclasses import dataclass, field

from .errors import EXIT_FAILED, EXIT_HUMAN


# -- the deploy gates ---------------------------------------------------------------------------
@dataclass
class Gate:
    """One gate's verdict: passed, or refused with why (and, with --force, passed with why recorded)."""
    name: str
    passed: bool
    why: str = ""                       # the refusal, or what --force overrode

    @property
    def forced(self):
        return self.passed and bool(self.why)


@dataclass
class Gates:
    verdicts: list = field(default_factory=list)

    @property
    def refusal(self):
        return next((g for g in self.verdicts if not g.passed), None)

    @property
    def forced(self):
        return [g.why for g in self.verdicts if g.forced]


def gate(name, ok, why, force, forced_why):
    if ok:
        return Gate(name, True)
    return Gate(name, True, forced_why) if force else Gate(name, False, why)


def deploy_gates(facts, force):
    """facts: a DeployFacts. The gates in the order they are checked; the first refusal wins."""
    f = facts
    short = f.target[:12]
    verdicts = []
    if f.bad_mark:
        where = f" in {f.bad_mark['env']}" if f.bad_mark.get("env") and f.bad_mark["env"] != f.env else ""
        verdicts.append(gate("bad release", False,
                             f"{short} ({f.subject}) is a bad release: it was rolled back{where} at "
                             f"{f.bad_mark.get('time')} ({f.bad_mark.get('why')}). Push a fix to {f.branch} and "
                             "deploy that (or, to deploy this very tree again, --force --reason TEXT)",
                             force, f"bad release: {short} was rolled back{where} at {f.bad_mark.get('time')}"))
    if f.promote_from:
        verdicts.append(gate("promotion", f.verified_in_source,
                             f"promotion gate: {short} ({f.subject}) has not been verified in {f.promote_from}. "
                             f"{f.promotion_hint} (or override with --force --reason TEXT)",
                             force, f"promotion gate: {short} was not verified in {f.promote_from}"))
    if f.require_rehearsal:
        verdicts.append(gate("rehearsal", f.rehearsed,
                             f"{f.env} requires a passed rehearsal of what it deploys (require_rehearsal), and {short} "
                             f"({f.subject}) has none: run {f.rehearse_command} (or override with --force --reason TEXT)",
                             force, f"require_rehearsal: {short} was not rehearsed in {f.env}"))
    if not f.fast_forward:
        if f.target_is_older:
            why = (f"{short} is older than what runs ({f.head[:12]} contains it): going back is rollback.py's job "
                   "(it keeps the database and marks what it leaves), or --force --reason TEXT")
        else:
            why = (f"{short} has diverged from what runs ({f.head[:12]}): neither contains the other, so deploying "
                   f"it would drop commits that run now. Merge what runs into {short}'s branch (or rebase it) and "
                   "push, then deploy; or --force --reason TEXT")
        verdicts.append(gate("direction", False, why, force, f"not a fast-forward from {f.head[:12]}"))
    return Gates(verdicts)


@dataclass
class DeployFacts:
    """What the gates look at (gathered by planning)."""
    env: str
    branch: str
    target: str
    subject: str
    head: str
    fast_forward: bool
    target_is_older: bool = False
    bad_mark: dict | None = None        # the record that marks the target's tree bad (in any env)
    promote_from: str = ""
    verified_in_source: bool = True
    promotion_hint: str = ""
    require_rehearsal: bool = False
    rehearsed: bool = True
    rehearse_command: str = ""


def nothing_to_deploy(target, running, head, serving_commit, release_sound):
    """A deploy has nothing to do only when the target is what runs, the tree is there, and (releases) the
    release that should serve it exists, unchanged, and serves it: a running release deleted or edited by
    hand is built again."""
    return target == running == head and release_sound and serving_commit in (None, target)


# -- which point ---------------------------------------------------------------------------------
def choose_point(points, wanted, last_ok_deploy_tag):
    """(point, None) or (None, why). wanted: what --to named (an id or a backup path), or None: the state
    before the last good deploy, else the newest before-deploy point."""
    if wanted:
        for p in points:
            if wanted == p.id:
                return p, None
        for p in points:        # a backup's own id, file name or path names the point that has it
            names = backup_names(p.backup.path) if p.backup else ()
            if wanted in names or (p.copy is not None and wanted in (p.copy.name, p.copy.file)):
                return p, None
        ids = ", ".join(p.id for p in points[:5]) or "none yet"
        return None, f"--to {wanted!r}: no such rollback point (newest: {ids}; see --list)"
    if last_ok_deploy_tag:
        for p in points:
            if p.id == last_ok_deploy_tag:
                return p, None
    tagged = [p for p in points if p.kind == "before-deploy"]
    if tagged:
        return tagged[0], None
    return None, "no before-deploy point yet; choose one with --to (see --list)"


def backup_names(path):
    """What names a backup: its path, its file name, and its id (the file name without .sqlite3)."""
    name = path.rsplit("/", 1)[-1]
    return (path, name, name.removesuffix(".sqlite3"))


# -- the database decision of a rollback ----------------------------------------------------------
@dataclass
class DatabaseFacts:
    point_id: str
    has_backup: bool
    backup_path: str = ""
    live_exists: bool = True
    live_check: str = "ok"              # quick_check's verdict of the live database
    live_schema: str | None = None
    point_schema: str | None = None
    compared: bool = False              # whether rows were compared (rows_lacking, rows_newer)
    compare_error: str = ""
    rows_lacking: dict = field(default_factory=dict)     # rows of the point's backup the live database lacks
    rows_newer: dict = field(default_factory=dict)       # rows of the live database the backup lacks


def database_decision(mode, f):
    """(restore?, why) for mode "auto", "with-db" or "code-only": only what was compared is said.
    Raises ValueError (the caller's refusal) for --with-db without a backup."""
    if mode == "code-only":
        return False, "--code-only: the database is left as it is"
    if not f.has_backup:
        if mode == "with-db":
            raise ValueError(f"--with-db: point {f.point_id} has no database backup; choose another with --to")
        return False, f"point {f.point_id} has no database backup: the database is left as it is"
    if mode == "with-db":
        return True, f"--with-db: restoring {f.backup_path}"
    if not f.live_exists:
        return True, "there is no live database: restoring the point's backup"
    if f.live_check != "ok":
        return True, (f"the live database fails quick_check ({f.live_check}): restoring the point's backup; the "
                      "damaged file is kept aside as evidence")
    if f.live_schema != f.point_schema:
        return True, (f"the live schema ({f.live_schema}) differs from the point's ({f.point_schema}): "
                      "a migration ran since, so the database goes back too")
    kept = "the live schema matches the point's, so the database is left as it is"
    if not f.compared:
        return False, f"{kept}; its rows were not compared with the point's backup, as rollback.py's plan does"
    if f.compare_error:
        return False, f"{kept}; its rows could not be compared with the point's backup ({f.compare_error})"
    if not f.rows_lacking:
        return False, f"{kept}; it holds every row of the point's backup"
    lacks = ", ".join(f"{n} row(s) of {t}" for t, n in sorted(f.rows_lacking.items()))
    cost = ", ".join(f"{n} of {t}" for t, n in sorted(f.rows_newer.items())) or "none"
    return False, (f"{kept}; but it lacks {lacks} that the point's backup has (deleted since, by the release or by "
                   f"users): --with-db brings them back, taking out the rows written since ({cost})")


# -- recovery ------------------------------------------------------------------------------------
NOTHING_LIVE, UNDO_DEPLOY, FINISH_ROLLBACK, PUT_BACK_CONVERSION, CLEAN_REHEARSAL = (
    "nothing-live", "undo-deploy", "finish-rollback", "put-back-conversion", "clean-rehearsal")


def recovery_action(journal, before_change):
    """What the next command does about an interrupted operation's journal. before_change: {op: the
    step names of its BEFORE phase} (from the runbook's lists), so the rule follows the lists."""
    op, step = journal.get("op"), journal.get("step")
    if op == "deploy" and step not in before_change["deploy"] | {None} and journal.get("from"):
        return UNDO_DEPLOY
    if op == "rollback" and journal.get("commit"):
        return FINISH_ROLLBACK
    if op == "convert" and step not in before_change["convert"] | {None}:
        return PUT_BACK_CONVERSION
    if op in ("rehearse", "drill"):
        return CLEAN_REHEARSAL
    return NOTHING_LIVE


# -- the exit code ----------------------------------------------------------------------------------
def failure_code(changed, put_back):
    """1 when nothing live changed, or what changed was put back; else 4 (a human is needed)."""
    return EXIT_FAILED if not changed or put_back else EXIT_HUMAN


LONG_MIGRATION = 30.0       # seconds: longer than a client waits for an answer (browsers, proxies, monitors)


def maintenance(migration_seconds):
    """(Retry-After seconds or None, why): while the app is stopped for a migration, requests wait in the
    socket's queue, unless the rehearsal measured a migration longer than clients wait: then the tool's
    listener answers each with a quick 503 and Retry-After (the migration's time, rounded up to 5 s)."""
    if migration_seconds is None:
        return None, "requests wait in the socket's queue (the migration's length is not known: no rehearsal)"
    if migration_seconds <= LONG_MIGRATION:
        return None, (f"requests wait in the socket's queue (the rehearsal's migration took {migration_seconds:.1f}s)")
    retry = int(-(-migration_seconds // 5) * 5)
    return retry, (f"the rehearsal's migration took {migration_seconds:.0f}s, longer than clients wait "
                   f"({LONG_MIGRATION:.0f}s): meanwhile every request gets a quick 503 with Retry-After: {retry} "
                   "(the page: the release's maintenance.html, else a short default)")
