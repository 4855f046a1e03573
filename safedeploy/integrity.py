"""Records that a torn write cannot make silently absent: the line format of the JSON logs, and what
a damaged line is.

Each log (the deploy log, the bad-release marks, the verified commits) is one JSON object a line,
appended. A line written by this version ends with its own checksum, inside the object so that any
JSON reader still reads it: `{..., "_crc32": "1a2b3c4d"}`, the CRC-32 of the line as it was before the
key was added (`{...}`). Reading a log:

- a line with a checksum that matches is a record; one that does not match is damaged;
- a line without a checksum (written by an older version) is a record when it is a JSON object;
- anything else (not JSON: a line torn by a crash or a full disk, NUL bytes from a lost block) is
  damaged, and said: the file and the line number, never skipped in silence.

A log reads up to its damage and past it (an append after a torn line closes it first, so a torn line
costs only itself). `scan` returns both the records and the damage; each caller decides what the damage
means for its decision (the safe side: a release that may be bad is refused, see marks.py). A damaged
line can be set aside (moved, under the log's flock, to `LOG.damaged`, where it stays to be read):
the recovery at the start of the next deploy or rollback does it, and says so.
"""

import fcntl
import json
import os
import re
import stat
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from .errors import DeployError
from .files import disk_error, flock_by, fsync_dir, make_private_dir, write_atomic

CHECKSUM_KEY = "_crc32"
READ_LOCK_WAIT = 5.0        # seconds a reader waits for an appender's flock (scan)
_SUFFIX = re.compile(r'(?:, )?"' + CHECKSUM_KEY + r'": "([0-9a-f]{8})"\}$')


@dataclass(frozen=True)
class Damage:
    """One damaged line of a log: where, why, and the start of what it holds."""
    path: str
    line: int
    why: str
    text: str

    def describe(self) -> str:
        return f"{self.path} line {self.line}: a damaged record ({self.why})"


@dataclass(frozen=True)
class Scan:
    """A record file read whole: the records that are whole, and the damage found."""
    records: list
    damage: list

    def first_damage(self) -> Damage | None:
        return self.damage[0] if self.damage else None


class DamagedRecord(DeployError):
    """A record a decision needs is damaged: the message names the file and the line."""

    def __init__(self, damage: Damage, consequence: str = ""):
        super().__init__(damage.describe() + (f": {consequence}" if consequence else ""))
        self.damage = damage


def encode(record: dict) -> bytes:
    """One log line, newline included, carrying its checksum."""
    body = json.dumps(record)
    crc = f"{zlib.crc32(body.encode()) & 0xFFFFFFFF:08x}"
    sep = "" if body == "{}" else ", "
    return f'{body[:-1]}{sep}"{CHECKSUM_KEY}": "{crc}"}}\n'.encode()


def decode(line: str) -> tuple[dict | None, str]:
    """(the record, "") or (None, why the line is damaged)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None, "not valid JSON: a torn write or an edit"
    if not isinstance(record, dict):
        return None, "not a JSON object"
    if CHECKSUM_KEY not in record:
        return record, ""             # an older version's line: no checksum to check
    match = _SUFFIX.search(line)
    if not match:
        return None, "its checksum is not where this tool writes it"
    body = line[:match.start()] + "}"
    if f"{zlib.crc32(body.encode()) & 0xFFFFFFFF:08x}" != match.group(1):
        return None, "its checksum does not match: changed after it was written"
    record.pop(CHECKSUM_KEY)
    return record, ""


def scan_text(path: Path, data: bytes) -> Scan:
    records, damage = [], []
    for number, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            line = raw.decode()
        except UnicodeDecodeError:
            damage.append(Damage(str(path), number, "not UTF-8: a lost block or an edit",
                                 raw[:1000].decode(errors="replace")))
            continue
        record, why = decode(line)
        if record is None:
            damage.append(Damage(str(path), number, why, line[:1000]))
        else:
            records.append(record)
    return Scan(records, damage)


def scan(path: Path) -> Scan:
    """Every record of the log at path and every damaged line; a missing log is empty. Read under a shared
    flock of the log: an appender holds it exclusively while it writes, and a line longer than what is
    left of a page reaches the file in parts, so a reader without it could find half a line, a record
    being appended, and call it damaged. Waited for up to READ_LOCK_WAIT s (held that long, it is not an
    append: the log is read as it is); anything but a regular file is an error, never waited on."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return Scan([], [])
    except OSError as exc:
        raise DeployError(f"cannot read {path}: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise DeployError(f"cannot read {path}: not a regular file")
        flock_by(fd, fcntl.LOCK_SH, time.monotonic() + READ_LOCK_WAIT, 0.01)    # not taken: read as it is
        return scan_text(Path(path), read_all(fd))
    except OSError as exc:
        raise DeployError(f"cannot read {path}: {exc.strerror}") from None
    finally:
        os.close(fd)


def read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def aside_path(path: Path) -> Path:
    return Path(path).with_name(Path(path).name + ".damaged")


def set_aside(path: Path) -> list:
    """Move the damaged lines of the log at path to LOG.damaged (appended, kept), under the log's flock,
    the log rewritten atomically with the good lines as they were. Returns the Damage moved."""
    path = Path(path)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise disk_error(exc, path) from exc
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise DeployError(f"cannot set aside the damage of {path}: not a regular file")
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.fstat(fd).st_ino != os.stat(path, follow_symlinks=False).st_ino:
                    continue            # set aside by another while this waited: the log that is there now
            except FileNotFoundError:
                return []
            whole = read_all(fd)
            return moved_aside(path, whole, scan_text(path, whole))
        except OSError as exc:
            raise disk_error(exc, path) from exc
        finally:
            os.close(fd)


def moved_aside(path: Path, whole: bytes, found: Scan) -> list:
    """set_aside's work, the log's exclusive flock held and whole its content."""
    if not found.damage:
        return []
    bad_lines = {d.line for d in found.damage}
    data = whole.split(b"\n")
    kept = [raw for n, raw in enumerate(data, 1) if n not in bad_lines and raw.strip()]
    moved = [raw for n, raw in enumerate(data, 1) if n in bad_lines]
    aside = aside_path(path)
    make_private_dir(aside.parent)
    afd = os.open(aside, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        os.write(afd, b"".join(raw + b"\n" for raw in moved))
        os.fsync(afd)
    finally:
        os.close(afd)
    write_atomic(path, b"".join(raw + b"\n" for raw in kept))
    fsync_dir(path.parent)
    return found.damage


_FIELD = r'"{key}": "([^"\\]*)"'


def salvage(text: str, *keys: str) -> dict:
    """The string fields a damaged line still shows whole ({key: value}), e.g. the tree of a torn bad mark."""
    found = {}
    for key in keys:
        match = re.search(_FIELD.format(key=re.escape(key)), text)
        if match:
            found[key] = match.group(1)
    return found


def salvaged_trees(path: Path) -> list:
    """[(tree, line text)] of the damaged lines of a bad-mark log, in it and set aside, that still name a
    tree and may mark it bad (not a clearing whose "bad": false is whole)."""
    texts = [d.text for d in scan(path).damage]
    try:
        texts += [raw for raw in aside_path(path).read_text(errors="replace").splitlines() if raw.strip()]
    except OSError:
        pass
    found = []
    for text in texts:
        tree = salvage(text, "tree").get("tree")
        if tree and not re.search(r'"bad": false', text):
            found.append((tree, text))
    return found
