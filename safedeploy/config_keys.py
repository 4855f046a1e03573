"""Every key of config.toml, defined once: its name, default, check, the expected value an error names, and
its meaning for docs/config.md. The loader (safedeploy.config) checks and converts with these tables, and
docs/generate_config.py writes docs/config.md from them (tests/test_docs.py compares the page with it).

A check takes the value as written and returns True (good), False ("expected EXPECT, got VALUE"), or
(suffix, message) for a message of its own about KEY+suffix (e.g. one argv list of pre_restart).
"""

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")
UNIT_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9:_.\\@-]*\.service$")     # never "-...": systemctl would take an option
REMOTE_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
DOMAIN_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
VARIABLE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
SHELL_CHARS = set(";&|$`<>()'\"!{}#")
REQUIRED = object()         # the default of a key that must be given

Check = Callable[[Any], "bool | tuple[str, str]"]
Predicate = Callable[[Any], bool]      # a check with no message of its own: good or not
Convert = Callable[[Any, Path, str], Any]      # (value, the config's folder, the env's name) -> the Env's value


def as_is(value: Any, base: Path, name: str) -> Any:
    return list(value) if isinstance(value, list) else value


def as_float(value: Any, base: Path, name: str) -> float:
    return float(value)


def resolve(base: Path | str, value: str) -> Path:
    return Path(os.path.normpath(Path(base) / os.path.expanduser(value)))


def as_folder(value: Any, base: Path, name: str) -> Path:
    return resolve(base, value)


def as_env_folder(value: Any, base: Path, name: str) -> Path:
    return resolve(base, value) / name


def as_argv_lists(value: Any, base: Path, name: str) -> list:
    return [list(argv) for argv in value]


@dataclass(frozen=True)
class Key:
    """One config key: its default, the check of its value, and what docs/config.md says of it."""
    name: str
    default: Any                # REQUIRED: the key must be given
    expect: str                 # what an error says is expected: "expected EXPECT, got VALUE"
    meaning: str                # docs/config.md
    check: Check = lambda value: True
    shown: str = ""             # the default as docs/config.md shows it, when it is no TOML value
    attr: str = ""              # the Env attribute (default: the key's name)
    type: Any = str             # the Env attribute's type
    convert: Convert = as_is
    hint: str = ""              # added to "expected EXPECT, got VALUE"

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def field(self) -> str:
        return self.attr or self.name


# -- checks ------------------------------------------------------------------------------------------
def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def a_path(value: Any) -> bool:
    return isinstance(value, str) and value != "" and "\0" not in value


def int_in(low: int, high: int) -> Predicate:
    return lambda value: is_int(value) and low <= value <= high


def number_in(low: float, high: float) -> Predicate:
    return lambda value: is_number(value) and low <= value <= high


def matching(pattern: re.Pattern, empty_ok: bool = False) -> Predicate:
    return lambda value: isinstance(value, str) and ((empty_ok and value == "") or bool(pattern.match(value)))


def list_of(ok: Predicate) -> Predicate:
    return lambda value: isinstance(value, list) and all(ok(v) for v in value)


def url_path(value: Any) -> bool:
    return isinstance(value, str) and value.startswith("/") and not any(c.isspace() for c in value)


def valid_branch(name: Any) -> bool:
    """git check-ref-format rules for a branch name, checked without running git."""
    if not isinstance(name, str):
        return False
    if not name or name.startswith(("-", "/", ".")) or name.endswith(("/", ".", ".lock")) or name == "@":
        return False
    if ".." in name or "//" in name or "@{" in name or "/." in name:
        return False
    if any(c in name for c in SHELL_CHARS):
        return False        # legal in git, but never in a name an operator pastes into a shell
    return not any(c in name for c in " ~^:?*[\\\t\n\r\x7f") and all(ord(c) >= 32 for c in name)


def valid_relative(p: Any) -> bool:
    """A path inside a release: relative, no '..', not empty."""
    if not isinstance(p, str) or not p or "\0" in p or os.path.isabs(p) or p.startswith("~"):
        return False
    norm = os.path.normpath(p)
    return norm not in (".", "..") and not norm.startswith("../")


def argv_lists(value: Any) -> bool | tuple[str, str]:
    """A list of argv lists (commands run without a shell)."""
    if not isinstance(value, list):
        return False
    for i, argv in enumerate(value):
        if not isinstance(argv, list) or not argv or not all(isinstance(w, str) and w for w in argv):
            return f"[{i}]", f"expected a non-empty list of non-empty strings (an argv list, no shell), got {argv!r}"
    return True


ARGV_HINT = ": commands run without a shell, so write each as a list of words"     # a pre_restart or build that is no list


# -- the tables ----------------------------------------------------------------------------------------
TABLES = {      # name -> what docs/config.md says of it
    "defaults": ("[defaults]", "optional; any env key but `path`, for every env; an env's own value wins"),
    "env": ("[env.NAME]", "one per environment, at least one; NAME holds letters, digits, `-` and `_` (it names files and tags)"),
    "retention": ("[retention]", "optional: how many backups `backup.py --prune` keeps, per env"),
    "offsite": ("[offsite]", "optional: copies of every backup on another machine ([offsite-and-alerts.md](offsite-and-alerts.md))"),
    "alerts": ("[alerts]", "optional: where failures are reported ([offsite-and-alerts.md](offsite-and-alerts.md#alerts))"),
    "replica": ("[replica]", "optional: continuous copies of the databases, about every half second, with Litestream "
                             "([offsite-and-alerts.md](offsite-and-alerts.md#continuous-copies-litestream))"),
}
ENV = [     # [env.NAME] and [defaults], in the order they are checked
    Key("path", REQUIRED, "a folder", check=a_path, type=Path, convert=as_folder,
        meaning="the env's git work tree; its releases live beside it in `PATH.releases/`; the tree stays a checkout "
                'of the deployed commit, so `git log` there shows what runs; only in `[env.NAME]`'),
    Key("branch", REQUIRED, "a branch name", check=valid_branch,
        meaning='the branch this env deploys: `deploy.py ENV` takes the tip of `REMOTE/BRANCH`; shell metacharacters '
                'are refused'),
    Key("port", REQUIRED, "an integer from 1 to 65535", check=int_in(1, 65535), type=int,
        meaning='the port the app listens on; health is checked at `http://127.0.0.1:PORT`'),
    Key("db", REQUIRED, "a file path", check=a_path, attr="db_setting",
        meaning="the env's SQLite database, relative to `path` (on releases: a file in `PATH.releases/shared/`) or "
                'absolute; a relative one must lie in the tree, and in a folder (`instance/app.db`) once `build` or '
                '`shared` is set'),
    Key("unit", REQUIRED, "a systemd unit name ending in .service", check=matching(UNIT_RE),
        meaning='the systemd `--user` service that runs the env, e.g. `datatracker.service`'),
    Key("domain", "", "a host name", check=matching(DOMAIN_RE, empty_ok=True),
        meaning="the env's public host name: `verify.py` also checks `https://DOMAIN/HEALTH_PATH` with certificate "
                'verification; empty skips that check'),
    Key("promote_from", "", "the name of another env", check=matching(NAME_RE, empty_ok=True),
        meaning='the env this one promotes from: a deploy takes only a tree verified there (on this host, or on any '
                "host that shared it through the remote), asks you to type the env's name, and moves the env's branch "
                'on the remote to what it deployed; it may name an env of another host when a remote is set and every '
                'other env of this file promotes from somewhere too ([many-hosts.md](many-hosts.md))'),
    Key("pre_restart", [], "a list of argv lists, e.g. [[\"venv/bin/pip\", \"install\", \"-r\", \"requirements.txt\"]]",
        check=argv_lists, type=list, convert=as_argv_lists, hint=ARGV_HINT,
        meaning='argv lists (no shell) run after the switch, before the restart: the migration; in the new release, '
                'or in the work tree of an env not on releases ([migrations.md](migrations.md))'),
    Key("remote", "origin", "a remote name, or \"\" for none", check=matching(REMOTE_RE, empty_ok=True),
        meaning='the git remote fetched before a deploy and pushed tags to; `""` for none (the local branch is '
                'deployed, nothing is pushed)'),
    Key("health_path", "/", "a path starting with /", check=url_path,
        meaning='the page polled after a restart; 2xx or 3xx is healthy, so pick one that answers 200 only when the '
                'app works'),
    Key("health_timeout", 30, "a number of seconds from 1 to 3600", check=number_in(1, 3600), type=float, convert=as_float,
        meaning='seconds a deploy or rollback waits for the app to turn healthy (1 to 3600)'),
    Key("command_timeout", 900, "a number of seconds from 1 to 86400", check=number_in(1, 86400), type=float, convert=as_float,
        meaning='seconds each `build` and `pre_restart` command may run before its whole process group is killed (1 '
                'to 86400)'),
    Key("build", [], "a list of argv lists run inside a new release, e.g. [[\"python3\", \"-m\", \"venv\", \"venv\"]]",
        check=argv_lists, type=list, convert=as_argv_lists, hint=ARGV_HINT,
        meaning='argv lists run inside a new release before it goes live (its own venv, its requirements); a failure '
                'stops the deploy with nothing live changed'),
    Key("shared", [], "a list of paths relative to a release, e.g. [\"instance\"]", check=list_of(valid_relative), type=list,
        meaning='paths of a release kept across releases in `PATH.releases/shared/` (uploads, an instance config); '
                "the database's folder always is; shared paths may not nest"),
    Key("keep_releases", 5, "a whole number of releases from 1 to 100", check=int_in(1, 100), type=int,
        meaning='release folders kept per env (1 to 100); never removed: the running one, the previous one, one a '
                'recent rollback point needs'),
    Key("watch", 0, "a number of seconds from 0 to 3600 (0 = off)", check=number_in(0, 3600), type=float, convert=as_float,
        meaning='seconds to keep watching after a deploy or rollback turns healthy (0 = off): same process, no '
                'restart, health not failing twice in a row; a failure rolls the deploy back'),
    Key("rehearse_paths", [], "a list of URL paths starting with /, e.g. [\"/\", \"/rfc/1\"]", check=list_of(url_path), type=list,
        meaning='URL paths a rehearsal and a drill must answer 2xx/3xx on besides `health_path`, e.g. `["/", '
                '"/rfc/1"]`'),
    Key("require_rehearsal", False, "true or false", check=lambda v: isinstance(v, bool), type=bool,
        meaning='when true, a deploy refuses a tree that has not passed `deploy.py ENV --rehearse` on this env '
                '(`--force --reason` overrides, recorded)'),
    Key("migration_mode", "auto", "\"auto\" (the rehearsal's verdict, else online), \"online\" or \"stop-first\"",
        check=lambda v: v in ("auto", "online", "stop-first"),
        meaning='how `pre_restart` meets the release that serves meanwhile: `"online"` (it keeps serving), '
                '`"stop-first"` (it stops first; requests wait in the socket\'s queue), `"auto"` (safe by default: '
                'online only after a passed rehearsal found the running release lives with the new schema, or when no '
                'file that looks like a migration changed; a failed rehearsal, a breaking schema change or unjudged '
                'migration files: stop-first; see [migrations.md](migrations.md))'),
    Key("bookkeeping_tables", ["django_migrations", "alembic_version", "sqlite_sequence", "django_session"],
        "a list of table names a framework keeps for itself, e.g. [\"django_migrations\"]",
        check=list_of(lambda n: isinstance(n, str) and n != "" and "\0" not in n), attr="bookkeeping", type=list,
        meaning='tables a framework keeps for itself: left out of row counts, the row ledger, warnings and row '
                "restores (a restore never offers Django's migration records back); `sqlite_sequence`, virtual tables "
                '(FTS) and their shadow tables are always left out'),
    Key("secret_env", [], "a list of variable names whose values are never shown, e.g. [\"DJANGO_SECRET_KEY\"]",
        check=list_of(matching(VARIABLE_RE)), type=list,
        meaning='names of variables whose values are never shown, whatever they look like, e.g. '
                '`["DJANGO_SECRET_KEY", "SIGNUP_CODE"]`; values of names that say secret (`*_KEY`, `*SECRET*`, '
                '`*PASSWORD*`, `*TOKEN*`, ...) and values that look like credentials are hidden without it '
                '([hardening.md](hardening.md#secrets))'),
    Key("backup_dir", "backups", "a folder", check=a_path, type=Path, convert=as_env_folder,
        meaning="where backups go, one folder per env (`BACKUP_DIR/ENV/`); outside every env's tree, private to you"),
    Key("state_dir", "state", "a folder", check=a_path, type=Path, convert=as_folder,
        meaning="locks, the deploy log, verified trees and journals; outside every env's tree, private to you"),
]
RETENTION = [      # a whole number of backups to keep, 0 or more
    Key("daily", 7, "a whole number of backups to keep (0 or more)", check=lambda v: is_int(v) and v >= 0, type=int,
        meaning='keep the newest backup of each of the last N days that have one'),
    Key("weekly", 4, "a whole number of backups to keep (0 or more)", check=lambda v: is_int(v) and v >= 0, type=int,
        meaning='keep the newest backup of each of the last N weeks not already kept by `daily`'),
    Key("monthly", 6, "a whole number of backups to keep (0 or more)", check=lambda v: is_int(v) and v >= 0, type=int,
        meaning='keep the newest backup of each of the last N months not already kept by the rules above'),
]
OFFSITE = [
    Key("engine", "restic",
        "\"restic\" (the default) or \"borg\"",
        meaning='which program keeps the off-site copies: `"restic"` for S3, B2, sftp, REST and the rest; `"borg"` '
                'with a fixed chunker sized to the database page, for `ssh://` repositories and local folders: far '
                'fewer bytes per night when changed pages are scattered'),
    Key("repository", REQUIRED,
        "a restic repository, e.g. \"sftp:backup@nas:/srv/restic/app\" or a folder; with borg, a "
        "folder or \"ssh://backup@nas:22/srv/borg/app\"",
        meaning='where the copies go: any restic repository (`sftp:user@host:/path`, `s3:`, `b2:`, `rest:`, or a '
                "folder); with borg a folder or `ssh://user@host[:port]/path`; a folder is relative to the config's "
                "folder and lies outside every env's tree and backup folder"),
    Key("password_file", REQUIRED,
        "a file holding the repository's password, mode 0600",
        meaning="the file holding the repository's password; group and others may not read it (`chmod 600`), or every "
                'script refuses (exit 2); the password is never printed, logged or alerted'),
    Key("options", [],
        "a list of restic -o options, e.g. [\"sftp.command=ssh -i /home/u/.ssh/backup nas -s sftp\"]; "
        "with borg, NAME=VALUE environment settings, e.g. [\"BORG_RSH=ssh -i /home/u/.ssh/backup\"]",
        meaning='restic `-o` options, e.g. `["sftp.command=ssh -i /home/u/.ssh/backup nas -s sftp"]` to name an ssh '
                'key; with borg, `BORG_*` settings such as `BORG_RSH`'),
    Key("host", "",
        "the host name this host's copies carry (default: this machine's), e.g. \"web1\"", shown="this machine's name",
        meaning="the host name this config's copies carry; set it on a host rebuilt under another name to find its "
                'old copies'),
    Key("id", "",
        "this config's id on its copies (default: a hash of host and the config's path), e.g. \"3f2a9c1b7e4d\"",
        shown="a hash of host and config path",
        meaning="this config's id on its copies (12 hex digits by default); listing, restoring and pruning see only "
                'copies with this host and id'),
]
ALERTS = [      # give a webhook, a command, or both
    Key("webhook", "", "an http:// or https:// URL (a JSON POST)",
        meaning='an `http://` or `https://` URL the JSON event is POSTed to; redirects are never followed'),
    Key("command", [], "an argv list, e.g. [\"/usr/bin/mail\", \"-s\", \"safe-deploy\", \"ops@example.org\"]",
        meaning='an argv list run with the JSON event on its standard input, e.g. `["/usr/bin/mail", "-s", '
                '"safe-deploy", "ops@example.org"]`; 10 s at most'),
]
REPLICA = [     # checked by safedeploy.replica_config
    Key("url", REQUIRED,
        "where each env's continuous copies go (a folder per env under it): \"file:///mnt/backup/replica\", "
        "\"sftp://user@nas.example.org:22/srv/replica\" or \"s3://bucket/path\"",
        meaning='where the copies go, one folder per env under it: `file:///mnt/backup/replica` (a folder, best on '
                "another disk; outside every env's tree, backup and state folder), "
                '`sftp://user@nas.example.org:22/srv/replica`, or `s3://bucket/path` (`?endpoint=...&region=...` for '
                'an S3-compatible store); a password in the url is refused'),
    Key("envs", [],
        "a list of env names, e.g. [\"prod\"] (default: every env)", shown="every env",
        meaning='the envs whose databases are replicated, e.g. `["prod"]`; they must share one `state_dir`, where the '
                'replicator keeps its files'),
    Key("key_file", None,
        "sftp: the private key file, mode 0600, e.g. \"/home/u/.ssh/replica\"", shown="none",
        meaning='sftp: the private key the replicator logs in with; it must be yours and mode 0600, or every script '
                'refuses (exit 2)'),
    Key("password_file", None,
        "sftp: a file holding the password, mode 0600", shown="none",
        meaning="sftp: a file holding the account's password (mode 0600); it goes only into the replicator's own "
                'config, written 0600 in the state folder'),
    Key("known_hosts", "~/.ssh/known_hosts",
        "sftp: the known_hosts file holding the server's host key (default \"~/.ssh/known_hosts\")",
        meaning="sftp: where the server's host key is read; the replicator accepts that key only, and a server not "
                'found there is refused with the `ssh` command that adds it'),
]

ENV_BY_NAME = {k.name: k for k in ENV}
REQUIRED_ENV_KEYS = [k.name for k in ENV if k.required]
# the shapes older code and tests read: name -> (default or None when required, expected); name -> default; name -> expected
ENV_KEYS = {k.name: (None if k.required else k.default, k.expect) for k in ENV}
RETENTION_KEYS = {k.name: k.default for k in RETENTION}
OFFSITE_KEYS = {k.name: k.expect for k in OFFSITE}
ALERT_KEYS = {k.name: k.expect for k in ALERTS}
REPLICA_KEYS = {k.name: k.expect for k in REPLICA}
TOP_KEYS = list(TABLES)
