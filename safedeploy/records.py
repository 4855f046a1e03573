"""The deploy log's records, typed, and the readers every module shares.

state/ENV.deploys.jsonl holds one JSON object a line, one line an operation, appended under an
flock of the file by state.JsonLog, each line with its checksum (a damaged line is not read here:
integrity.py names it, status reports it, the next recovery sets it aside). Here each kind of record is a dataclass:
what a deploy, a rollback, a recovery, a drill and a rehearsal write, read back the same way by
every module through the readers at the bottom (what runs, the last good deploy, which backups
and commits the last operations still need, the newest passed rehearsal of a tree). A line that
is not a record of a known kind is skipped; a key this version does not know is dropped when read
(the line on disk keeps it).

`steps` is {step name: seconds}, in the order the steps ran (the runner writes the step it is in
as soon as it starts it, so a failed step is there too).
"""

import dataclasses
from dataclasses import dataclass, field

from .state import deploy_log, now_iso

VERSION = 2         # records and journals carry it as "v"


@dataclass
class Record:
    """What every record of the deploy log holds: its kind, env, time, result and steps."""
    kind: str = ""
    env: str = ""
    time: str = field(default_factory=now_iso)
    v: int = VERSION
    user: str = ""
    result: str = ""                    # "ok", "failed", "rolled-back"
    steps: dict = field(default_factory=dict)
    failed_step: str | None = None
    error: str | None = None
    running: str | None = None          # the commit the env runs after it (None: not known from this record)
    running_release: str | None = None

    def to_json(self):
        data = dataclasses.asdict(self)
        if "from_" in data:
            data["from"] = data.pop("from_")
        return data

    @property
    def ok(self):
        return self.result == "ok"


@dataclass
class DeployRecord(Record):
    """A deploy's record: from what to what, the release, and the rollback it made when it failed."""
    kind: str = "deploy"
    from_: str | None = None
    to: str | None = None
    forced: list = field(default_factory=list)
    reason: str = ""
    release: str | None = None          # the release it built (or reused)
    previous_release: str | None = None
    rehearsed: str | None = None        # when the target's tree passed a rehearsal here
    migration_mode: str | None = None   # how pre_restart met the running release: online or stop-first
    tag: str | None = None
    tag_pushed: bool | None = None
    backup: str | None = None
    health: str | None = None
    watch: float | None = None
    probe: dict | None = None           # what the switch cost users (safedeploy.probe): requests, refused, errors, slowest_s
    shadowed: list = field(default_factory=list)    # tracked files the shared copy stands in for
    rows_deleted: dict = field(default_factory=dict)    # {table: rows} live as the release was switched in and gone
                                                        # once it served (by content): a data bug
    rows_in_no_copy: dict = field(default_factory=dict)     # of those, the rows no copy holds (written after the backup)
    rollback: dict | None = None        # the automatic rollback's record, when there was one
    blame: str | None = None            # a failure's cause: "release" (marked bad), "host" (not), "interrupted"


@dataclass
class RollbackRecord(Record):
    """A rollback's record: the point, the release it went back to, and its database decision."""
    kind: str = "rollback"
    from_: str | None = None
    to: str | None = None
    point: str | None = None
    tag: str | None = None
    release: str | None = None
    rebuilt: bool = False
    backup: str | None = None           # the pre-rollback save: a verified backup of what it replaced or kept
    db_restored: bool = False
    db_why: str = ""
    pre_rollback: str | None = None
    aside: str | None = None
    rows_lost: dict = field(default_factory=dict)
    rows_counted: str = ""              # how the seal came by rows_lost: "plan: why" (the plan's count) or "seal: why"
    seal_problem: str = ""
    unit_restored: bool = False
    unit_why: str = ""
    stash: str | None = None
    watch: float | None = None
    probe: dict | None = None           # what its switch cost users, as a deploy's
    db_only: bool = False               # the database alone went back (rollback.py --db-only): the code stayed
    salvaged: str | None = None         # the held copy of what an unreadable replaced database still held


@dataclass
class RecoveryRecord(Record):
    """A recovery's record: what was interrupted and what the recovery did."""
    kind: str = "recovery"
    interrupted: dict = field(default_factory=dict)
    did: str = ""
    rollback: dict | None = None


@dataclass
class DrillRecord(Record):
    """A drill's record: the point it booted, and how its health and problems were."""
    kind: str = "drill"
    point: str | None = None
    release: str | None = None          # the kept release it booted, or None (rebuilt)
    rebuilt: bool = False
    health: str = ""
    problems: list = field(default_factory=list)


@dataclass
class RehearsalRecord(Record):
    """A rehearsal's record: the commit and tree it rehearsed, the migration's time and schema changes."""
    kind: str = "rehearsal"
    commit: str = ""
    tree: str = ""
    failed: str = ""
    migration_seconds: float | None = None
    schema_changes: list = field(default_factory=list)
    health: str = ""
    paths: dict = field(default_factory=dict)
    running_commit: str | None = None   # the release that ran when it was rehearsed (tried on the new schema)
    compatible: bool | None = None      # whether that release served on the migrated copy (None: not tried)
    incompatible: str = ""              # where it did not: the schema's breaking changes, the failing path and the app's line
    schema_breaking: list = field(default_factory=list)     # schema changes the running release cannot live with
    probes: dict = field(default_factory=dict)      # {path: answer} the running release gave on the migrated copy
    probe_rows: dict = field(default_factory=dict)  # {table: rows} the probes wrote there (+ added, - removed)
    app_said: list = field(default_factory=list)    # the app's log lines while its failing probe was answered


@dataclass
class RowsRecord(Record):
    """backup.py ENV --restore-rows COPY: what went back, or why nothing did."""
    kind: str = "restore-rows"
    copy: str = ""                      # the copy's id
    restored: dict = field(default_factory=dict)
    rekeyed: dict = field(default_factory=dict)
    left_out: int = 0


KINDS = {"deploy": DeployRecord, "rollback": RollbackRecord, "recovery": RecoveryRecord, "drill": DrillRecord,
         "rehearsal": RehearsalRecord, "restore-rows": RowsRecord}


def from_json(data):
    """The record a log line holds, or None (not an object, or not a kind this version knows)."""
    if not isinstance(data, dict) or data.get("kind") not in KINDS:
        return None
    cls = KINDS[data["kind"]]
    names = {f.name for f in dataclasses.fields(cls)}
    values = {("from_" if k == "from" else k): v for k, v in data.items()}
    try:
        return cls(**{k: v for k, v in values.items() if k in names})
    except TypeError:
        return None


def read(env):
    return [r for r in map(from_json, deploy_log(env).read()) if r is not None]


def append(env, record):
    deploy_log(env).append(record.to_json())


# -- the readers ---------------------------------------------------------------------------------
def running_commit(records):
    """The commit the env runs according to its log (the newest record that says), or None."""
    for record in reversed(records):
        if record.running:
            return record.running
    return None


def last_ok_deploy(records):
    return next((r for r in reversed(records) if r.kind == "deploy" and r.ok and r.tag), None)


def of_kind(records, kind):
    return [r for r in records if r.kind == kind]


def operations(records, n):
    """The last n deploys and rollbacks."""
    return [r for r in records if r.kind in ("deploy", "rollback")][-n:]


def tag_backups(records):
    """{before-deploy tag: the pre-deploy backup its deploy made}."""
    return {r.tag: r.backup for r in records if r.kind == "deploy" and r.tag}


def passed_rehearsal(records, tree):
    """The newest passed rehearsal of tree, or None."""
    return next((r for r in reversed(of_kind(records, "rehearsal")) if r.tree == tree and r.ok), None)


def newest_rehearsal(records, tree):
    """The newest rehearsal of tree, passed or failed, or None: a failed one counts (the next deploy of that
    tree stops the running release first), it is never the same as none."""
    return next((r for r in reversed(of_kind(records, "rehearsal")) if r.tree == tree), None)
