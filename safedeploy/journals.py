"""The journal of an operation under way, typed: one dataclass per kind of operation.

state/ENV.journal.json (a backup's: state/ENV.backup-journal.json) says which operation runs and the step
it is in. It is the contract between a run that is killed (kill -9 at any step, a power cut) and its
recovery: the next deploy, rollback or rehearsal finishes or undoes what was under way (recovery.py),
status shows it. Each kind of operation has its dataclass here (Op names the kinds), the way records.py
has one per record: the runner makes it at the start (Operation.journal), the steps set its fields and
save() it, the step clock saves the step it enters, and the recovery reads it back into the same
dataclass and uses its attributes.

Written whole at every save: one JSON object carrying its CRC-32 the way the logs' lines do
(integrity.encode), into a temp file, fsynced, renamed over the journal (files.write_atomic). Read:

- no file: no operation under way (None);
- a file that is not the whole of what was written (not JSON, not UTF-8, its checksum does not match),
  that names no operation or one this version does not know, or that holds a key this version knows
  with a value of the wrong type, or lacks a key the recovery cannot act without (a rollback's commit, a
  conversion's saved folder): a DamagedJournal, never "no journal" nor a journal of defaults. It keeps
  what the text still shows whole, and the recovery rebuilds from that on the safe side (damaged.py);
- a journal of an older version (no checksum: the format before this one) is read as it is;
- a key this version does not know is dropped; a key it knows that is missing takes its default
  (None: not known; False; empty).

The JSON keys are the dataclass's fields, `from_` written "from", with "op" first.
"""

import dataclasses
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar

from . import integrity
from .files import make_private_dir, remove_quietly, write_atomic
from .records import VERSION
from .state import now_iso


class Op(str, Enum):
    """The kinds of operation that keep a journal (the journal's "op", the runner's Operation.name)."""
    DEPLOY = "deploy"
    ROLLBACK = "rollback"
    CONVERT = "convert"
    REHEARSE = "rehearse"
    DRILL = "drill"
    BACKUP = "backup"
    UNKNOWN = "unknown"         # a damaged journal whose kind cannot be read

    def __str__(self) -> str:
        return self.value


def journal_path(state_dir: Path | str, env: str) -> Path:
    return Path(state_dir) / f"{env}.journal.json"


def backup_journal_path(state_dir: Path | str, env: str) -> Path:
    """A backup keeps its own journal: it may run beside nothing else, and never changes what runs."""
    return Path(state_dir) / f"{env}.backup-journal.json"


@dataclass(frozen=True)
class Interrupted:
    """What status shows of an interrupted operation ("interrupted" in its JSON) and its advice reads."""
    op: str
    pid: int | None = None
    command: str | None = None
    started: str | None = None
    step: str | None = None
    from_: str | None = None            # a deploy's or rollback's running commit as it began
    commit: str | None = None           # where a rollback goes; what a rehearsal or conversion builds

    def to_json(self) -> dict[str, Any]:
        return {"op": self.op, "pid": self.pid, "command": self.command, "started": self.started,
                "step": self.step, "from": self.from_, "commit": self.commit}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Interrupted":
        return cls(op=data.get("op") or "unknown", pid=data.get("pid"), command=data.get("command"),
                   started=data.get("started"), step=data.get("step"), from_=data.get("from"),
                   commit=data.get("commit"))

    def describe(self) -> str:
        return (f"{self.op} by pid {self.pid if self.pid is not None else '?'} ({self.command or '?'}), "
                f"started {self.started or '?'}, interrupted at step {self.step or 'start'}")


@dataclass
class OpJournal:
    """What every journal holds. `file` is where it is saved, `ended` whether finish() ran (neither is
    written into it)."""
    OP: ClassVar[Op]
    REQUIRED: ClassVar[tuple[str, ...]] = ()    # fields a whole journal of this kind cannot lack
    v: int | None = None
    pid: int | None = None
    command: str | None = None
    started: str | None = None
    step: str | None = None             # the step it is in; None: before the first
    file: Path | None = field(default=None, repr=False, compare=False)
    ended: bool = field(default=False, repr=False, compare=False)

    @property
    def op(self) -> Op:
        return self.OP

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"op": str(self.op)}
        for f in dataclasses.fields(self):
            if f.name not in NOT_WRITTEN:
                data[json_key(f.name)] = getattr(self, f.name)
        return data

    def start(self, path: Path) -> None:
        """Begin the journal at path for this process (its version, pid, command line, time), and save it."""
        self.file, self.ended, self.v, self.pid = Path(path), False, VERSION, os.getpid()
        self.command, self.started, self.step = " ".join(sys.argv), now_iso(), None
        self.save()

    def save(self) -> None:
        """Write the journal whole (temp file, fsync, rename), its checksum inside. Once the operation ended
        (finish), nothing: the journal is gone and stays gone."""
        if self.file is None:
            raise ValueError("a journal is saved only after start()")
        if self.ended:
            return
        make_private_dir(self.file.parent)
        write_atomic(self.file, integrity.encode(self.to_json()))

    def finish(self) -> None:
        """The operation ended (however it ended, short of a kill): its journal goes."""
        self.ended = True
        if self.file is not None:
            remove_quietly(self.file)

    def summary(self) -> Interrupted:
        return Interrupted(op=str(self.op), pid=self.pid, command=self.command, started=self.started, step=self.step)

    def describe(self) -> str:
        return self.summary().describe()


@dataclass
class DeployJournal(OpJournal):
    """A deploy's journal: its target, the release and tag and backup each step made."""
    OP = Op.DEPLOY
    target: str | None = None           # the commit it deploys
    from_: str | None = None            # the commit that ran (None: nothing known ran)
    previous_release: str | None = None
    release: str | None = None          # set at build: the release it switches to
    tag: str | None = None              # set at tag: its before-deploy point
    backup: str | None = None           # set at backup: the pre-deploy copy

    def summary(self) -> Interrupted:
        return dataclasses.replace(super().summary(), from_=self.from_)


@dataclass
class RollbackJournal(OpJournal):
    """A rollback's journal: the point it goes to, its database decision, the release it switches to."""
    OP = Op.ROLLBACK
    REQUIRED = ("commit",)
    point: str | None = None
    commit: str = ""                    # the point's commit: where it goes
    restore_db: bool = False            # the database decision it made, kept when it is finished
    db_why: str = ""
    release: str | None = None          # the point's release (at release: the one it switches to)
    db_only: bool = False
    backup: str | None = None           # the point's database copy
    from_: str | None = None            # the commit that ran
    aside: str | None = None            # set at aside: where the live database was set aside

    def summary(self) -> Interrupted:
        return dataclasses.replace(super().summary(), from_=self.from_, commit=self.commit)


@dataclass
class ConversionJournal(OpJournal):
    """A conversion's journal: where the old unit files are, and the data it moved."""
    OP = Op.CONVERT
    REQUIRED = ("saved",)
    saved: str = ""                     # the folder holding the old unit files
    commit: str | None = None
    converting: bool = False            # onto releases (False: the socket units only)
    made_root: bool = False             # it made the releases folder (removed when put back)
    pairs: list[list[str]] = field(default_factory=list)    # [data in the tree, its place in shared/]
    first: str | None = None            # set at build: the first release

    def summary(self) -> Interrupted:
        return dataclasses.replace(super().summary(), commit=self.commit)


@dataclass
class ScratchJournal(OpJournal):
    """A rehearsal's or a drill's: what the recovery stops and removes."""
    scratch: str | None = None
    units: list[str] = field(default_factory=list)


@dataclass
class RehearsalJournal(ScratchJournal):
    """A rehearsal's journal: the commit it rehearses in its scratch copy."""
    OP = Op.REHEARSE
    commit: str | None = None

    def summary(self) -> Interrupted:
        return dataclasses.replace(super().summary(), commit=self.commit)


@dataclass
class DrillJournal(ScratchJournal):
    """A drill's journal: the point it boots in its scratch copy."""
    OP = Op.DRILL
    point: str | None = None


@dataclass
class BackupJournal(OpJournal):
    """A backup's journal: why it was taken."""
    OP = Op.BACKUP
    reason: str = ""


@dataclass
class DamagedJournal(OpJournal):
    """A journal that is not whole: why, where, and what it still shows (each None when it does not)."""
    OP = Op.UNKNOWN
    path: str = ""
    why: str = ""
    said_op: str | None = None          # the "op" it still shows, known to this version or not
    from_: str | None = None
    target: str | None = None
    tag: str | None = None
    point: str | None = None
    commit: str | None = None
    backup: str | None = None
    previous_release: str | None = None
    release: str | None = None
    scratch: str | None = None
    restore_db: bool | None = None
    db_only: bool | None = None

    @property
    def op(self) -> Op:
        return Op(self.said_op) if self.said_op in KINDS else Op.UNKNOWN

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "op": self.said_op or str(Op.UNKNOWN), "damaged": True}

    def shows(self) -> str:
        """What it still shows, said: "from=..., commit=..." (the fields still whole)."""
        hidden = {"path", "why", "step", *NOT_WRITTEN}
        said = [f"{'op' if f.name == 'said_op' else json_key(f.name)}={getattr(self, f.name)}"
                for f in dataclasses.fields(self) if f.name not in hidden and getattr(self, f.name) not in (None, "")]
        return ", ".join(said) or "nothing"

    def summary(self) -> Interrupted:
        return dataclasses.replace(super().summary(), op=self.said_op or str(Op.UNKNOWN), from_=self.from_,
                                   commit=self.commit)

    def save(self) -> None:
        raise ValueError("a damaged journal is never written back")


KINDS: dict[str, type[OpJournal]] = {k.OP.value: k for k in (DeployJournal, RollbackJournal, ConversionJournal,
                                                             RehearsalJournal, DrillJournal, BackupJournal)}
NOT_WRITTEN = ("file", "ended")
SALVAGED = ("command", "started", "step", "from", "target", "tag", "point", "commit", "backup",
            "previous_release", "release", "scratch")


def json_key(name: str) -> str:
    return "from" if name == "from_" else name


def field_name(key: str) -> str:
    """json_key's inverse: the field a JSON key is read into."""
    return "from_" if key == "from" else key


def read(path: Path) -> OpJournal | None:
    """The journal at path as its dataclass; None when there is none; a DamagedJournal when it is not
    whole (see the module)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return damaged(path, "", f"it cannot be read ({exc.strerror})")
    text = raw.decode(errors="replace")
    try:
        data, why = integrity.decode(raw.decode().strip())
    except UnicodeDecodeError:
        data, why = None, "not UTF-8: a lost block or an edit"
    if data is None:
        return damaged(path, text, why)
    return from_json(data, path, text)


def from_json(data: dict[str, Any], path: Path, text: str = "") -> OpJournal:
    """The journal a whole JSON object holds, or a DamagedJournal saying what is wrong with it."""
    cls = KINDS.get(data.get("op"))  # type: ignore[arg-type]
    if cls is None:
        said = data.get("op")
        return damaged(path, text, f"a kind of operation this version does not know ({said})" if said
                       else "it names no operation")
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        key = json_key(f.name)
        if f.name in NOT_WRITTEN or key not in data:
            if f.name in cls.REQUIRED:
                return damaged(path, text, f"it lacks its {key!r}")
            continue
        if not fits(hints[f.name], data[key]):
            return damaged(path, text, f"its {key!r} is not what this tool writes there ({data[key]!r})")
        values[f.name] = data[key]
    return cls(**values, file=path)


def fits(tp: Any, value: Any) -> bool:
    """Whether a JSON value is of the field's type (str | None, bool, int, list[str], list[list[str]])."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(fits(arg, value) for arg in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is list:
        (inner,) = typing.get_args(tp)
        return isinstance(value, list) and all(fits(inner, v) for v in value)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def damaged(path: Path, text: str, why: str) -> DamagedJournal:
    """The fields a damaged journal's text still shows whole."""
    found = integrity.salvage(text, "op", *SALVAGED)
    j = DamagedJournal(path=str(path), why=why, said_op=found.pop("op", None), file=path,
                       restore_db=flag(text, "restore_db"), db_only=flag(text, "db_only"))
    for key, value in found.items():
        setattr(j, field_name(key), value)
    return j


def flag(text: str, key: str) -> bool | None:
    """A true/false field a damaged journal's text still shows, or None."""
    match = re.search(rf'"{re.escape(key)}": (true|false)', text)
    return match.group(1) == "true" if match else None


def remove(path: Path) -> None:
    """Remove the journal at path (a recovery finished what it said)."""
    remove_quietly(path)
