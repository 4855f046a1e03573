"""The environment a service gets from systemd, read from its unit files: what `build`, `pre_restart` and
the rehearsal run with, so that they see what the app sees (a Django settings module that reads
DJANGO_SECRET_KEY), and what redaction must never show.

What it reads, as systemd does (systemd.exec(5)), from the unit's fragment and then its drop-ins, in
order (`systemctl show -p FragmentPath,DropInPaths`: the files on disk, which the next start loads):
- Environment= lines, each a list of NAME=VALUE words (quotes, C escapes and specifiers such as %h
  resolved); an empty Environment= clears what came before;
- EnvironmentFile= lines, one file each (a leading `-`: a missing file is no error); an empty one
  clears the list. The files are read in order, after every Environment=, and override them; within
  each kind a later setting of a name wins;
- ExecStart= (the first command; an empty ExecStart= clears it), for the rehearsal's transient unit.

A command gets the tool's own environment (its PATH, HOME: what a build tool needs) with the unit's
variables over it. The values are never printed: redaction registers them (see safedeploy.redaction).

move() rewrites a path inside a value (a build or a rehearsal moves the live folders to its own copies).
"""

import getpass
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

from . import redaction, unitfiles, units
from .errors import DeployError

NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\", '"': '"',
           "'": "'", "s": " "}


@dataclass(frozen=True)
class ServiceSettings:
    """What the unit files say, in systemd's order."""
    exec_start: tuple[str, ...]
    environment: tuple[tuple[str, str], ...]        # Environment=, in order
    environment_files: tuple[str, ...]              # EnvironmentFile=, as written ("-" prefix: optional)
    files: tuple[str, ...]                          # the unit files read: the fragment, then its drop-ins


@dataclass(frozen=True)
class UnitEnvironment:
    """A unit's environment: its Environment= settings and what its EnvironmentFile= files set."""
    settings: ServiceSettings
    from_files: tuple[tuple[str, str], ...]         # what the EnvironmentFile= files set, in order

    @property
    def pairs(self) -> tuple[tuple[str, str], ...]:
        """Every assignment in systemd's order: Environment= first, the files after (they win)."""
        return self.settings.environment + self.from_files

    def variables(self) -> dict[str, str]:
        return dict(self.pairs)

    def assignments(self) -> list[str]:
        return [f"{k}={v}" for k, v in self.pairs]


# -- parsing (pure) ------------------------------------------------------------------------------------
def split_words(value: str) -> list[str]:
    """systemd's word splitting for Environment=: whitespace separates, quotes group, C escapes."""
    words, word, quote, started, i = [], [], None, False, 0
    while i < len(value):
        c = value[i]
        if c == "\\" and i + 1 < len(value):
            nxt = value[i + 1]
            if nxt == "x" and re.match(r"[0-9a-fA-F]{2}", value[i + 2:i + 4]):
                word.append(chr(int(value[i + 2:i + 4], 16)))
                i += 4
            else:
                word.append(ESCAPES.get(nxt, nxt))
                i += 2
            started = True
            continue
        if quote:
            if c == quote:
                quote = None
            else:
                word.append(c)
        elif c in "\"'":
            quote, started = c, True
        elif c.isspace():
            if started:
                words.append("".join(word))
            word, started = [], False
        else:
            word.append(c)
            started = True
        i += 1
    if started:
        words.append("".join(word))
    return words


def specifiers(unit: str) -> dict[str, str]:
    """The unit specifiers a user unit's Environment= may use (systemd.unit(5)), as this user sees them."""
    home = os.path.expanduser("~")
    stem = unit.rsplit(".", 1)[0]
    prefix, _, instance = stem.partition("@")
    return {"%": "%", "n": unit, "N": stem, "p": prefix, "P": prefix, "i": instance, "I": instance,
            "h": home, "u": user(), "U": str(os.getuid()), "H": socket.gethostname(),
            "t": os.environ.get("XDG_RUNTIME_DIR", f"/run/user/{os.getuid()}"),
            "E": os.environ.get("XDG_CONFIG_HOME", f"{home}/.config"),
            "S": os.environ.get("XDG_STATE_HOME", f"{home}/.local/state"),
            "C": os.environ.get("XDG_CACHE_HOME", f"{home}/.cache"), "T": "/tmp", "V": "/var/tmp"}


def user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def expand(value: str, table: dict[str, str]) -> str:
    return re.sub(r"%(.)", lambda m: table.get(m.group(1), m.group(0)), value)


def parse_service(texts: list[str], table: dict[str, str]) -> tuple[list, list, list]:
    """(ExecStart argv, [(name, value)], [EnvironmentFile]) from the [Service] sections of texts (the
    fragment, then its drop-ins), as systemd merges them."""
    exec_start: list[str] = []
    pairs: list[tuple[str, str]] = []
    files: list[str] = []
    for text in texts:
        section = None
        for line in logical_lines(text):
            if line.startswith("["):
                section = line
                continue
            if section != "[Service]" or "=" not in line:
                continue
            key, value = (part.strip() for part in line.split("=", 1))
            if key == "Environment":
                pairs = [] if not value else pairs + [(w.split("=", 1)[0], w.split("=", 1)[1])
                                                      for w in split_words(expand(value, table))
                                                      if "=" in w and NAME_RE.match(w.split("=", 1)[0])]
            elif key == "EnvironmentFile":
                files = [] if not value else files + [expand(value, table)]
            elif key == "ExecStart":
                exec_start = [] if not value else (exec_start or split_words(value.lstrip("-@:+!")))
    return exec_start, pairs, files


def logical_lines(text: str) -> list[str]:
    """Lines of a unit file: comments dropped, a trailing backslash joins the next line."""
    out, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and line.startswith(("#", ";")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        out.append(pending + line)
        pending = ""
    if pending:
        out.append(pending)
    return out


def parse_env_file(text: str) -> list[tuple[str, str]]:
    """NAME=VALUE assignments of an EnvironmentFile, as systemd reads them: `#` and `;` comment lines,
    single quotes literal, double quotes with backslash escapes (and newlines), a backslash escaping the
    next character, trailing blanks of an unquoted value dropped, a trailing backslash joining lines."""
    out = []
    for line in env_file_lines(text):
        stripped = line.lstrip()
        if not stripped or stripped[0] in "#;" or "=" not in stripped:
            continue
        key, raw = stripped.split("=", 1)
        key = key.strip()
        if NAME_RE.match(key):
            out.append((key, env_value(raw.lstrip())))
    return out


def env_file_lines(text: str) -> list[str]:
    """Logical lines: a newline inside quotes, or after a backslash, does not end one."""
    lines, cur, quote, i = [], [], None, 0
    while i < len(text):
        c = text[i]
        if c == "\\" and quote != "'" and i + 1 < len(text):
            cur.append(text[i:i + 2])
            i += 2
            continue
        if quote and c == quote:
            quote = None
        elif not quote and c in "\"'" and "=" in "".join(cur):
            quote = c
        if c == "\n" and not quote:
            lines.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    lines.append("".join(cur))
    return lines


def env_value(raw: str) -> str:
    value, quote, i, tail = [], None, 0, 0
    while i < len(raw):
        c = raw[i]
        if c == "\\" and quote != "'" and i + 1 < len(raw):
            nxt = raw[i + 1]
            if nxt != "\n":                      # a backslash-newline joins lines
                value.append(nxt if quote != '"' or nxt in '"\\`$' else "\\" + nxt)
            i += 2
            tail = len(value)
            continue
        if quote:
            if c == quote:
                quote = None
            else:
                value.append(c)
            tail = len(value)
        elif c in "\"'":
            quote = c
        else:
            value.append(c)
            if not c.isspace():
                tail = len(value)
        i += 1
    return "".join(value[:tail])


def move(word: str, moves: list[tuple[Path, Path, bool]]) -> str:
    """word with every path that starts with one of moves' old folders moved to its new one; with
    only_where_it_exists, only when the new place has the rest of that path."""
    for old, new, only_where_it_exists in moves:
        def replace(m, new=new, check=only_where_it_exists, text=word):
            rest = re.match(r"[^\s\"':;,]*", text[m.end():]).group(0)      # the rest of that path
            return m.group(0) if check and not os.path.exists(f"{new}{rest}") else str(new)
        word = re.sub(re.escape(str(old)) + BOUNDARY, replace, word)
    return word


BOUNDARY = r"(?=[/\s\"':;,]|$)"


def names_path(value: str, folder: str) -> bool:
    return bool(re.search(re.escape(folder) + BOUNDARY, value))


# -- reading ----------------------------------------------------------------------------------------
def unit_files(unit: str) -> list[str]:
    """The unit's fragment and drop-ins, in the order systemd applies them."""
    proc = units.systemctl("show", unit, "--property=FragmentPath,DropInPaths,LoadState", check=False)
    props = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    if props.get("LoadState") != "loaded" or not props.get("FragmentPath"):
        raise DeployError(f"the systemd user manager does not know {unit}: its environment cannot be read "
                          "(install it in ~/.config/systemd/user/ and run `systemctl --user daemon-reload`)")
    return [props["FragmentPath"], *props.get("DropInPaths", "").split()]


def settings_of(unit: str, files: list[str] | None = None) -> ServiceSettings:
    files = files if files is not None else unit_files(unit)
    texts = []
    for path in files:
        try:
            texts.append(Path(path).read_text())
        except OSError as exc:
            raise DeployError(f"cannot read {unit}'s unit file {path}: {exc.strerror}") from None
    exec_start, pairs, env_files = parse_service(texts, specifiers(unit))
    return ServiceSettings(tuple(exec_start), tuple(pairs), tuple(env_files), tuple(files))


def read_env_file(path: str) -> list[tuple[str, str]]:
    optional = path.startswith("-")
    path = path.lstrip("-")
    try:
        text = Path(path).read_text()
    except OSError as exc:
        if optional and isinstance(exc, FileNotFoundError):
            return []
        raise DeployError(f"cannot read the service's EnvironmentFile {path}: {exc.strerror} (systemd could not "
                          "start the service either)") from None
    return parse_env_file(text)


def read(unit: str, secret_names=(), files: list[str] | None = None) -> UnitEnvironment:
    """The unit's environment, read now from its files on disk; its secret values registered for redaction."""
    settings = settings_of(unit, files)
    redaction.register_pairs(settings.environment, secret_names)     # before a file that fails to read
    from_files = tuple(pair for path in settings.environment_files for pair in read_env_file(path))
    redaction.register_pairs(from_files, secret_names)
    return UnitEnvironment(settings, from_files)


def command_environment(env, moves=None) -> dict[str, str]:
    """What build and pre_restart run with: this process's environment, the unit's variables over it
    (paths moved by moves, for a build or a rehearsal)."""
    found = read(env.unit, env.secret_env)
    variables = {k: move(v, moves) if moves else v for k, v in found.pairs}
    return {**os.environ, **variables}


def register_quietly(env) -> None:
    """Register env's unit's secret values for redaction from its unit files in the user's unit folder
    (no systemctl: every script does this at start); a unit that cannot be read is skipped."""
    folder = unitfiles.user_unit_dir()
    fragment = folder / env.unit
    dropins = sorted((folder / f"{env.unit}.d").glob("*.conf")) if (folder / f"{env.unit}.d").is_dir() else []
    try:
        read(env.unit, env.secret_env, [str(fragment), *map(str, dropins)])
    except (DeployError, OSError):
        pass


# -- moving secrets out of a unit file (adopt.py --move-secrets) ---------------------------------------
def secrets_file(unit: str) -> Path:
    """Where adoption moves a unit's secret variables: ~/.config/safe-deploy/env/<unit>.env, beside the
    user's unit folder, outside every work tree (0600 in a 0700 folder)."""
    return unitfiles.user_unit_dir().parent.parent / "safe-deploy" / "env" / f"{unit.removesuffix('.service')}.env"


def env_file_line(name: str, value: str) -> str:
    """One EnvironmentFile line that reads back as value, whatever it holds (double quotes, escapes)."""
    return f'{name}="' + re.sub(r'(["\\`$])', r"\\\1", value) + '"\n'


def without_secrets(text: str, unit: str, secret_names=(), file: Path | None = None) -> tuple[str, list]:
    """(the unit text with its secret Environment= words taken out and an EnvironmentFile= naming file
    added first in [Service], so that files named after it still override it, [(name, value)] taken out).
    Nothing secret: the text as it was, []."""
    table = specifiers(unit)
    out, taken, section = [], [], None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("["):
            section = stripped
        key, eq, value = stripped.partition("=")
        if section == "[Service]" and eq and key == "Environment" and value:
            words = split_words(value)
            pairs = [tuple(w.split("=", 1)) for w in words if "=" in w]
            secret = set(redaction.secret_values(pairs, secret_names))
            keep = [w for w in words if "=" not in w or w.split("=", 1)[1] not in secret]
            taken += [(k, expand(v, table)) for k, v in pairs if v in secret]
            if len(keep) == len(words):
                out.append(line)
            elif keep:
                out.append("Environment=" + " ".join(quote_word(w) for w in keep))
            continue
        out.append(line)
    if not taken:
        return text, []
    at = next((i for i, line in enumerate(out) if line.strip() == "[Service]"), len(out) - 1)
    out.insert(at + 1, f"EnvironmentFile={file or secrets_file(unit)}")
    return "\n".join(out) + ("\n" if text.endswith("\n") else ""), taken


def quote_word(word: str) -> str:
    return word if re.fullmatch(r"[A-Za-z0-9_=./:@,+-]+", word) else '"' + re.sub(r'(["\\])', r"\\\1", word) + '"'
