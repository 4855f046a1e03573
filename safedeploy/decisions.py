"""The rules that decide, as pure functions: facts in, a decision and its reasons out.

Nothing here reads a file, runs a command or asks systemd: callers gather the facts (planning,
status, recovery) and turn the decisions into steps and text. That is what lets the tests check
every rule in milliseconds (tests/test_decisions.py), apart from the end-to-end tests that check
the facts are gathered right.

- the deploy gates: a bad release, the promotion gate, a required rehearsal, the direction;
- which rollback point: --to, else the state before the last good deploy;
- the database decision of a rollback: restore or keep, and why;
- what the recovery of an interrupted operation does;
- the exit code when an operation fails: 1 (back as it was) or 4 (a human is needed);
- who is to blame for a failed deploy, the release (marked bad) or the host and its config (not);
- how pre_restart meets the release that serves meanwhile (online or stop-first), safe by default;
- whether a database rollback's seal may take the plan's row count rather than count again.
"""

import re
from dataclasses import dataclass, field
from enum import Enum

from .errors import EXIT_FAILED, EXIT_HUMAN
from .journals import ConversionJournal, DeployJournal, Op, OpJournal, RollbackJournal, ScratchJournal


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
    """The gates a deploy met, in order; the first that did not pass refuses it."""
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
    """What a rollback's database decision reads: the point's copy, the live database and both schemas."""
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


class DatabaseMode(str, Enum):
    """What a rollback does with the database (rollback.py's --with-db / --db-only, --code-only, or neither)."""
    AUTO = "auto"               # back too when what was compared says so (schema, damage, rows)
    WITH_DB = "with-db"         # back to the point's copy, whatever the comparison
    CODE_ONLY = "code-only"     # left as it is

    def __str__(self) -> str:
        return self.value       # said and recorded as the flag's word


def database_decision(mode: DatabaseMode | str, f) -> tuple[bool, str]:
    """(restore?, why) for a DatabaseMode: only what was compared is said.
    Raises ValueError (the caller's refusal) for --with-db without a backup."""
    mode = DatabaseMode(mode)
    if mode == DatabaseMode.CODE_ONLY:
        return False, "--code-only: the database is left as it is"
    if not f.has_backup:
        if mode == DatabaseMode.WITH_DB:
            raise ValueError(f"--with-db: point {f.point_id} has no database backup; choose another with --to")
        return False, f"point {f.point_id} has no database backup: the database is left as it is"
    if mode == DatabaseMode.WITH_DB:
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


# -- the seal of a database rollback: count again, or take the plan's count -----------------------
def plan_count_reusable(without_prompt: bool, held_open: bool, at_plan, after_plan, at_stop) -> tuple[bool, str]:
    """(whether the seal may take the plan's count of the live rows the restore takes out, of the live rows per
    table, and its integrity_check verdict, instead of reading the set-aside file again for them; why). The marks are dbfiles.WalMark (or None:
    not taken) of the live database: at_plan just before the plan's read transaction began, after_plan once
    it had counted (the same: no commit during the count), at_stop once the app was stopped, before anything
    moved. Only when nothing can have been written between: no prompt between the plan and the stop (--yes),
    the plan's connection held open until the stop (so that no last connection of the app checkpoints and
    removes the WAL meanwhile), a WAL index header to compare, and every part of the mark unchanged."""
    if not without_prompt:
        return False, "the plan asked for confirmation: the live database may have changed meanwhile"
    if not held_open:
        return False, "the plan did not keep its connection to the live database open until the stop"
    if at_plan is None or after_plan is None or at_stop is None:
        return False, "the live database's files were not looked at before and after"
    if at_plan.header is None or at_plan.db is None or at_plan.wal is None:
        return False, "the live database has no WAL index to compare (not in WAL mode, or caught mid-update)"
    if after_plan != at_plan:
        return False, "the live database was written while the plan counted"
    if at_stop != at_plan:
        return False, "the live database was written (or its files changed) between the plan and the stop"
    return True, "nothing was written to the live database between the plan and the stop: the plan's count stands"


# -- recovery ------------------------------------------------------------------------------------
NOTHING_LIVE, UNDO_DEPLOY, FINISH_ROLLBACK, PUT_BACK_CONVERSION, CLEAN_REHEARSAL = (
    "nothing-live", "undo-deploy", "finish-rollback", "put-back-conversion", "clean-rehearsal")


def recovery_action(journal: OpJournal, before_change: dict[Op, set[str]]) -> str:
    """What the next command does about an interrupted operation's journal. before_change: {op: the
    step names of its BEFORE phase} (from the runbook's lists), so the rule follows the lists."""
    step = journal.step
    if isinstance(journal, DeployJournal) and step not in before_change[Op.DEPLOY] | {None} and journal.from_:
        return UNDO_DEPLOY
    if isinstance(journal, RollbackJournal) and journal.commit:
        return FINISH_ROLLBACK
    if isinstance(journal, ConversionJournal) and step not in before_change[Op.CONVERT] | {None}:
        return PUT_BACK_CONVERSION
    if isinstance(journal, ScratchJournal):
        return CLEAN_REHEARSAL
    return NOTHING_LIVE             # a backup's, or a damaged journal the recovery found changed nothing


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


# -- who is to blame for a failed deploy: the release, or the host and its config -----------------------
class Blame(Enum):
    RELEASE = "release"         # the release failed: it is marked bad, the gates keep it out
    HOST = "host"               # the host or its config: nothing marked; fix it and deploy the same commit again
    INTERRUPTED = "interrupted"     # the operator stopped it: nothing judged


@dataclass(frozen=True)
class FailureFacts:
    """A failed step as the blame decision reads it: the step, its message and output."""
    step: str                   # the step that failed
    message: str                # the error's one line
    output: str = ""            # the command's output, or the unit's last log lines
    could_not_start: bool = False   # a build or pre_restart command could not start (not found, not executable)
    interrupted: bool = False


@dataclass(frozen=True)
class Judgement:
    """Whose fault a failure is (the release's or the host's; or interrupted: nothing judged), and why."""
    blame: Blame
    why: str                    # what failed, named: the step, and the cause when it is the host's


# a variable the release reads from its environment and does not find: os.environ["NAME"], django-environ,
# "NAME is not set", Django's empty SECRET_KEY
MISSING_VARIABLE = [
    re.compile(r"environ\b.*\n(?:.*\n){0,6}?\s*KeyError: '(?P<name>[A-Z][A-Z0-9_]*)'"),
    re.compile(r"[Ss]et the (?P<name>[A-Z][A-Z0-9_]+) environment variable"),
    re.compile(r"environment variable '?(?P<name>[A-Z][A-Z0-9_]+)'? (?:is )?(?:not set|missing|required|undefined)"),
    re.compile(r"\b(?P<name>[A-Z][A-Z0-9_]{2,}) (?:environment variable )?is not set\b"),
    re.compile(r"The (?P<name>SECRET_KEY) setting must not be empty"),
]
HOST_TROUBLE = [
    (re.compile(r"No space left on device|Disk quota exceeded"), "the disk is full"),
    (re.compile(r"Read-only file system"), "a file system is read-only"),
    (re.compile(r"cannot read the service's EnvironmentFile|cannot read \S+'s unit file"), "the unit's environment "
                                                                                           "cannot be read"),
    (re.compile(r"status=203/EXEC|Failed to locate executable|Failed at step EXEC"), "the unit's program cannot be "
                                                                                       "started (not found or not "
                                                                                       "executable)"),
]


def judge_failure(f: FailureFacts) -> Judgement:
    """Blame a failure after the switch on the release (marked bad) or on the host and its config (not
    marked: "a bad mark is for a bad release"): a command that could not start, a variable the release
    needs and its environment lacks, a full or read-only disk, an environment file that cannot be read."""
    what = f"failed at {f.step}: {f.message}"
    if f.interrupted:
        return Judgement(Blame.INTERRUPTED, f"interrupted at {f.step}")
    if f.could_not_start:
        return Judgement(Blame.HOST, f"{what} (a command that cannot start is the config's or the host's)")
    text = f"{f.message}\n{f.output}"
    for pattern in MISSING_VARIABLE:
        found = pattern.search(text)
        if found:
            return Judgement(Blame.HOST, f"{what} ({found.group('name')} is not set in the environment the release "
                                         "runs with: the unit's Environment= or EnvironmentFile=)")
    for pattern, cause in HOST_TROUBLE:
        if pattern.search(text):
            return Judgement(Blame.HOST, f"{what} ({cause})")
    return Judgement(Blame.RELEASE, what)


# -- how pre_restart meets the release that serves meanwhile ----------------------------------------
class MigrationMode(Enum):
    ONLINE = "online"           # the running release serves during pre_restart
    STOP_FIRST = "stop-first"   # it is stopped first; requests wait in the socket's queue


@dataclass(frozen=True)
class RehearsalFacts:
    """The newest rehearsal of the target's tree, whatever its result."""
    time: str
    passed: bool
    failed_step: str = ""
    error: str = ""
    compatible: bool | None = None      # the running release served on the migrated copy (None: not tried)
    incompatible: str = ""
    breaking: tuple[str, ...] = ()      # schema changes that break the running release, whatever the probes say
    schema_changed: bool = False


@dataclass(frozen=True)
class MigrationFacts:
    """What decides how pre_restart meets the running release: the setting, a rehearsal, the files changed."""
    has_pre_restart: bool
    configured: str                     # migration_mode: "auto", "online" or "stop-first"
    rehearsal: RehearsalFacts | None    # None: this tree was never rehearsed here
    migration_files: tuple[str, ...] = ()   # files that look like migrations, changed from what runs to the target


@dataclass(frozen=True)
class MigrationDecision:
    """How pre_restart runs (online or stop-first), and why."""
    mode: MigrationMode
    why: str


MIGRATION_DIRS = {"migrations", "migration", "migrate", "alembic"}


def looks_like_migration(path: str, commands: tuple[str, ...] = ()) -> bool:
    """A file a migration is made of: under a folder named migrations, migration, migrate or alembic, a
    .sql file, or a file pre_restart runs (commands: the words of its argv lists)."""
    parts = path.split("/")
    return bool(MIGRATION_DIRS & set(parts[:-1])) or path.endswith(".sql") or path in commands


def migration_mode(f: MigrationFacts) -> MigrationDecision:
    """Safe by default: online only when a passed rehearsal of this tree found the running release serves on
    the migrated schema and the schema lost nothing it uses, or when nothing that looks like a migration
    changed. A failed rehearsal, a breaking schema change (whatever the probes say), or migration files
    that no rehearsal judged: stop-first."""
    online, stop = MigrationMode.ONLINE, MigrationMode.STOP_FIRST
    if not f.has_pre_restart:
        return MigrationDecision(online, "no pre_restart: nothing changes the schema before the new release starts")
    if f.configured in ("online", "stop-first"):
        return MigrationDecision(MigrationMode(f.configured), f"migration_mode = \"{f.configured}\"")
    r = f.rehearsal
    if r is not None and not r.passed:
        return MigrationDecision(stop, f"the rehearsal of this tree at {r.time} FAILED at {r.failed_step or '?'} "
                                       f"({r.error or 'no detail'}): a migration that fails may leave the schema "
                                       "half-changed, which the running release must not serve; it stops first")
    if r is not None and r.breaking:
        return MigrationDecision(stop, f"the rehearsal at {r.time} found the migration breaks the running release's "
                                       f"schema ({'; '.join(r.breaking[:3])}): it stops before pre_restart")
    if r is not None and r.compatible is False:
        return MigrationDecision(stop, f"the rehearsal at {r.time} found the running release breaks on the migrated "
                                       f"schema ({r.incompatible}): it stops before pre_restart")
    if r is not None and (r.compatible or not r.schema_changed):
        return MigrationDecision(online, f"the rehearsal at {r.time} found the running release serves on the migrated "
                                         "schema" if r.compatible else
                                 f"the rehearsal at {r.time} found the migration changes no schema")
    if f.migration_files:
        files = ", ".join(f.migration_files[:3]) + (f" and {len(f.migration_files) - 3} more"
                                                     if len(f.migration_files) > 3 else "")
        judged = ("it did not try the running release on the migrated copy" if r is not None
                  else "no rehearsal of this tree says the running release survives them")
        return MigrationDecision(stop, f"the target changes its migrations ({files}) and {judged}: it stops before "
                                       "pre_restart; to let it serve, rehearse first (--rehearse)")
    if r is not None:
        return MigrationDecision(online, f"the rehearsal at {r.time} did not try the running release on the migrated "
                                         "schema, and no file that looks like a migration changed")
    return MigrationDecision(online, "the migration's effect on the running release is unknown (no rehearsal of this "
                                     "tree), and no file that looks like a migration changed since what runs: the old "
                                     "release serves during pre_restart; find out first with --rehearse")


# -- whose answer a health check got ----------------------------------------------------------------
@dataclass
class AnswerFacts:
    """What was seen as a health check answered 2xx/3xx, for the unit that should be serving.
    restarts_since_start: systemd's automatic restarts since the tool's own start of the unit (NRestarts
    then and now: a counter carried over from the release being replaced does not count). port_problem:
    what else holds the port ('' when nothing else does, or /proc cannot tell); port_confirmed: /proc showed
    the unit's main process (or a child) holding it. process_release: the release folder the main process
    runs in (its cwd), expected_release: the one `current` names; None where it is not known (an env that
    runs from its work tree). served_commit: what /_deploy/status names (None: not served)."""
    unit: str
    active: str
    sub: str
    restarts_since_start: int = 0
    port_problem: str = ""
    port_confirmed: bool = False
    process_release: str | None = None
    expected_release: str | None = None
    served_commit: str | None = None
    expected_commit: str | None = None


def answer_problem(f: AnswerFacts) -> str:
    """'' when the answer is the unit's own (the release's own process), else why it is not, in words.

    The unit must be running (an answer while it is not comes from something else). A process holding
    the port other than the unit's own answers for it (a stray server while the unit crash-loops on
    EADDRINUSE). A restart since the tool's start counts
    against the answer only where /proc could not confirm that the unit's own process holds the port:
    confirmed, the answer is the release's own whatever the counter says. A main process that runs in
    another release than `current` names is the old one, still stopping (or not yet replaced)."""
    if f.active != "active" or f.sub not in ("running", "listening"):
        return f"{f.unit} is {f.active} ({f.sub}), not running: something else answers on the port"
    if f.port_problem:
        return f"{f.port_problem}: something else answers on the port"
    if f.restarts_since_start > 0 and not f.port_confirmed:
        return (f"{f.unit} restarted {f.restarts_since_start} time(s) by itself since it was started, and the port "
                "cannot be shown to be its own: something else may answer on the port")
    if f.process_release and f.expected_release and f.process_release != f.expected_release:
        return (f"{f.unit}'s main process runs release {f.process_release}, not {f.expected_release}: the process "
                "being replaced answers (still stopping, or the new one is not started yet)")
    if f.expected_commit and f.served_commit and f.served_commit != f.expected_commit:
        return (f"/_deploy/status names {f.served_commit[:12]}, not {f.expected_commit[:12]}: another process "
                "answers")
    return ""
