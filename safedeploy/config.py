"""Load and validate config.toml (see the contract). Every error names the file and the key.

Confinement: every configured path is resolved once, here, relative to the config
file's folder where it is relative (`path`, `backup_dir`, `state_dir`, `[offsite] password_file`,
and `[offsite] repository` when it is a local folder; `db` relative to `path`, as the contract
says). Then one rule, checked at load (exit 2, one line naming both sides):
- a relative `db` and every `shared` path stay inside the env's tree (no `..` out of it);
- shared paths do not overlap: none lies inside another, nor inside (or around) the database's
  folder, which is always shared;
- no two envs overlap: work trees and their releases folders, databases, shared folders (through
  links too: compared by real path); a database, backup folder, state folder or local off-site
  repository never lies inside an env's tree.
"""

import difflib
import hashlib
import os
import re
import socket
import stat
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote

from . import SCRIPTS_DIR
from .errors import usage_error
from .replica_config import REPLICA_KEYS, ReplicaSettings  # noqa: F401 (REPLICA_KEYS: the docs' key table)
from .replica_config import parse as parse_replica

try:
    import tomllib  # novermin: Python 3.11 and later
except ImportError:     # Python 3.10 (Ubuntu 22.04): the same parser, packaged as tomli (python3-tomli)
    import tomli as tomllib

NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")
UNIT_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9:_.\\@-]*\.service$")     # never "-...": systemctl would take an option
REMOTE_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
DOMAIN_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")

SHELL_CHARS = set(";&|$`<>()'\"!{}#")
# user:password@ in a URL (rest:https://u:pw@host/, s3:https://KEY:SECRET@host/, sftp://u:pw@host/):
# what mask() hides; the scheme-less sftp:u:pw@host:/path form too
USERINFO_RE = re.compile(r"(?P<head>(?:[A-Za-z][A-Za-z0-9+.-]*:)+(?://)?)(?P<user>[^:@/\s]*):(?P<pw>[^@\s]*)@")

# key -> (default, description of the expected value); None default = required.
ENV_KEYS = {
    "path": (None, "a folder"),
    "branch": (None, "a branch name"),
    "port": (None, "an integer from 1 to 65535"),
    "db": (None, "a file path"),
    "unit": (None, "a systemd unit name ending in .service"),
    "domain": ("", "a host name"),
    "promote_from": ("", "the name of another env"),
    "pre_restart": ([], "a list of argv lists, e.g. [[\"venv/bin/pip\", \"install\", \"-r\", \"requirements.txt\"]]"),
    "remote": ("origin", "a remote name, or \"\" for none"),
    "health_path": ("/", "a path starting with /"),
    "health_timeout": (30, "a number of seconds from 1 to 3600"),
    "command_timeout": (900, "a number of seconds from 1 to 86400"),
    "build": ([], "a list of argv lists run inside a new release, e.g. [[\"python3\", \"-m\", \"venv\", \"venv\"]]"),
    "shared": ([], "a list of paths relative to a release, e.g. [\"instance\"]"),
    "keep_releases": (5, "a whole number of releases from 1 to 100"),
    "watch": (0, "a number of seconds from 0 to 3600 (0 = off)"),
    "rehearse_paths": ([], "a list of URL paths starting with /, e.g. [\"/\", \"/rfc/1\"]"),
    "require_rehearsal": (False, "true or false"),
    "migration_mode": ("auto", "\"auto\" (the rehearsal's verdict, else online), \"online\" or \"stop-first\""),
    "bookkeeping_tables": (["django_migrations", "alembic_version", "sqlite_sequence", "django_session"],
                           "a list of table names a framework keeps for itself, e.g. [\"django_migrations\"]"),
    "secret_env": ([], "a list of variable names whose values are never shown, e.g. [\"DJANGO_SECRET_KEY\"]"),
    "backup_dir": ("backups", "a folder"),
    "state_dir": ("state", "a folder"),
}
REQUIRED_ENV_KEYS = [k for k, (default, _) in ENV_KEYS.items() if default is None]
RETENTION_KEYS = {"daily": 7, "weekly": 4, "monthly": 6}
TOP_KEYS = ["defaults", "retention", "env", "offsite", "alerts", "replica"]
OFFSITE_KEYS = {"engine": "\"restic\" (the default) or \"borg\"",
                "repository": "a restic repository, e.g. \"sftp:backup@nas:/srv/restic/app\" or a folder; with borg, a "
                              "folder or \"ssh://backup@nas:22/srv/borg/app\"",
                "password_file": "a file holding the repository's password, mode 0600",
                "options": "a list of restic -o options, e.g. [\"sftp.command=ssh -i /home/u/.ssh/backup nas -s sftp\"]; "
                           "with borg, NAME=VALUE environment settings, e.g. [\"BORG_RSH=ssh -i /home/u/.ssh/backup\"]",
                "host": "the host name this host's copies carry (default: this machine's), e.g. \"web1\"",
                "id": "this config's id on its copies (default: a hash of host and the config's path), e.g. \"3f2a9c1b7e4d\""}
# restic's backends other than a local folder ("local:PATH", or any other string, is a folder)
REMOTE_BACKENDS = ("sftp:", "rest:", "s3:", "swift:", "b2:", "azure:", "gs:", "rclone:", "ssh://")
ENGINES = ("restic", "borg")
# borg's settings ([offsite] options with engine = "borg"): environment variables borg reads; never the
# passphrase (password_file is the one place for it) nor the repository (repository is)
BORG_OPTION_RE = re.compile(r"^BORG_[A-Z_]+=")
BORG_REFUSED = ("BORG_PASSPHRASE", "BORG_PASSCOMMAND", "BORG_PASSPHRASE_FD", "BORG_REPO", "BORG_NEW_PASSPHRASE")
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
ALERT_KEYS = {"webhook": "an http:// or https:// URL (a JSON POST)",
              "command": "an argv list, e.g. [\"/usr/bin/mail\", \"-s\", \"safe-deploy\", \"ops@example.org\"]"}


@dataclass
class Offsite:
    repository: str           # a local folder resolved against the config's folder; else as written
    password_file: Path
    options: list
    host: str = ""            # the identity this config's copies carry (see safedeploy.offsite):
    id: str = ""              # "" = this machine's host name, and the hash identity() makes
    engine: str = "restic"    # which program keeps the copies: "restic" or "borg"

    @property
    def secrets(self):
        """The password in the repository's URL, if any, as written and as a URL escapes it: masked
        wherever restic repeats it (even one that is no valid URL: restic quotes it raw)."""
        if self.local:
            return []
        rest = self.repository.split(":", 1)[1]
        rest = rest.split("//", 1)[1] if rest.startswith("//") or "://" in rest[:12] else rest
        userinfo = rest.rsplit("@", 1)[0] if "@" in rest else ""
        password = userinfo.split(":", 1)[1] if ":" in userinfo else ""
        return [p for p in dict.fromkeys((password, quote(password, safe=""), unquote(password))) if p]

    @property
    def shown(self):
        """The repository as every message shows it: a password in its URL masked."""
        text = mask(self.repository)
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text

    @property
    def local(self):
        return not self.repository.startswith(REMOTE_BACKENDS)


@dataclass
class Alerts:
    webhook: str
    command: list


@dataclass
class Env:
    name: str
    path: Path
    branch: str
    port: int
    db_setting: str           # as written in config.toml: relative to a release (or the work tree), or absolute
    unit: str
    domain: str
    promote_from: str
    pre_restart: list
    remote: str
    health_path: str
    health_timeout: float
    command_timeout: float
    backup_dir: Path          # this env's own folder: <backup_dir>/<env>
    state_dir: Path
    build: list = field(default_factory=list)
    shared: list = field(default_factory=list)
    keep_releases: int = 5
    watch: float = 0
    rehearse_paths: list = field(default_factory=list)
    require_rehearsal: bool = False
    migration_mode: str = "auto"
    bookkeeping: list = field(default_factory=lambda: ["django_migrations", "alembic_version", "sqlite_sequence",
                                                       "django_session"])
    secret_env: list = field(default_factory=list)
    keys: dict = field(default_factory=dict, repr=False)     # key -> where it was set ("env.prod.db", "defaults.db")

    @property
    def releases_root(self):
        """Where the env's releases live: beside its work tree (see safedeploy.releases)."""
        return Path(f"{self.path}.releases")

    @property
    def current_link(self):
        return self.releases_root / "current"

    @property
    def converted(self):
        return self.current_link.is_symlink()

    @property
    def db_in_tree(self):
        """The database as it lies before the env is converted to releases."""
        return resolve(self.path, self.db_setting)

    @property
    def db(self):
        """The live database: in the shared folder once the env runs releases, else in the work tree."""
        if os.path.isabs(os.path.expanduser(self.db_setting)) or not self.converted:
            named = self.db_in_tree
        else:
            named = resolve(self.releases_root / "shared", self.db_setting)
        # a database moved to another disk and linked back keeps its -wal beside the target: back up,
        # set aside and restore the real file (the link stays a link)
        return Path(os.path.realpath(named))

    @property
    def base_url(self):
        return f"http://127.0.0.1:{self.port}"

    @property
    def health_url(self):
        return f"{self.base_url}{self.health_path}"

    @property
    def domain_url(self):
        return f"https://{self.domain}{self.health_path}" if self.domain else ""


@dataclass
class Config:
    file: Path
    envs: dict
    retention: dict = field(default_factory=lambda: dict(RETENTION_KEYS))
    explicit: bool = False      # named with --config or $DEPLOY_CONFIG
    offsite: Offsite | None = None
    alerts: Alerts | None = None
    replica: ReplicaSettings | None = None      # [replica]: continuous copies (safedeploy.replica)

    def env(self, name):
        if name not in self.envs:
            raise usage_error(f"{self.file}: no env named {name!r}{did_you_mean(name, self.envs)}"
                              f" (envs: {', '.join(self.envs)})")
        return self.envs[name]


def mask(text):
    """text with the password of every user:password@ in a URL shown as ***: for every message,
    alert and argument the tool writes (a repository URL may carry a password; restic's own
    messages repeat it)."""
    if not text:
        return text
    return USERINFO_RE.sub(lambda m: f"{m['head']}{m['user']}:***@", str(text))


def find_config_file(cli_value=None):
    """--config FILE, else $DEPLOY_CONFIG, else config.toml beside the scripts."""
    if cli_value:
        return Path(cli_value), True
    if os.environ.get("DEPLOY_CONFIG"):
        return Path(os.environ["DEPLOY_CONFIG"]), True
    return SCRIPTS_DIR / "config.toml", False


def load(cli_value=None):
    file, explicit = find_config_file(cli_value)
    file = file.absolute()
    data = read_toml(file)
    check_private(file, "config file", "it names commands this tool runs")
    config = parse(data, file)
    if config.offsite:
        config.offsite.host = config.offsite.host or socket.gethostname()
        config.offsite.id = config.offsite.id or identity(config.offsite.host, file)
    for env in config.envs.values():
        if env.state_dir.is_dir():
            check_private(env.state_dir, "state folder", "it holds the locks and the deploy log")
        if env.backup_dir.parent.is_dir():
            check_private(env.backup_dir.parent, "backup folder", "it holds the copies of your data that "
                                                                   "rollbacks restore and prune deletes")
        if env.backup_dir.is_symlink():
            raise usage_error(f"{env.backup_dir}: env {env.name}'s backup folder is a symbolic link; it must be a "
                              "plain folder (this tool sets its mode and removes files in it)")
    config.explicit = explicit
    return config


def identity(host, file):
    """This config's id on its off-site copies: 12 hex digits of sha256(host, the config's absolute path).
    Two configs on one host, or one config path on two hosts, get different ids."""
    return hashlib.sha256(f"{host}\0{Path(file).absolute()}".encode()).hexdigest()[:12]


def check_private(path, what, why):
    """Refuse, as ssh does, a file or folder that others could change."""
    st = path.stat()
    if st.st_mode & 0o022:
        raise usage_error(f"{path}: the {what} is writable by group or others, and {why}: "
                          f"fix it with: chmod go-w {path}")
    if st.st_uid not in (os.getuid(), 0):
        raise usage_error(f"{path}: the {what} belongs to uid {st.st_uid}, not to you (uid {os.getuid()}) or root")


def read_toml(file):
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        raise usage_error(f"{file}: config file not found (use --config FILE or $DEPLOY_CONFIG)") from None
    except OSError as exc:
        raise usage_error(f"{file}: cannot read config file: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise usage_error(f"{file}: not UTF-8 text (byte {exc.start})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise usage_error(f"{file}: TOML syntax error: {exc}") from None


def did_you_mean(word, choices):
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def parse(data, file):
    def fail(key, message):
        raise usage_error(f"{file}: {key}: {message}")

    for key in data:
        if key not in TOP_KEYS:
            fail(key, f"unknown key{did_you_mean(key, TOP_KEYS)}")
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        fail("defaults", "must be a table: [defaults]")
    for key in defaults:
        if key not in ENV_KEYS or key == "path":
            fail(f"defaults.{key}", f"unknown key{did_you_mean(key, ENV_KEYS)}")

    retention = parse_retention(data.get("retention", {}), fail)

    env_tables = data.get("env")
    if not env_tables:
        fail("env", "no environments: add at least one [env.NAME] table")
    if not isinstance(env_tables, dict):
        fail("env", "must be tables: [env.NAME]")
    envs = {}
    for name, table in env_tables.items():
        if not NAME_RE.match(name):
            fail(f"env.{name}", "env names may hold only letters, digits, '-' and '_' (they name files and tags)")
        if not isinstance(table, dict):
            fail(f"env.{name}", "must be a table: [env.NAME]")
        envs[name] = parse_env(name, table, defaults, file.parent, fail)
    check_across_envs(envs, fail)
    offsite = parse_offsite(data.get("offsite"), file.parent, fail)
    if offsite and offsite.local:
        check_repository(offsite, envs, fail)
    replica = parse_replica(data.get("replica"), file.parent, list(envs), fail)
    if replica:
        check_replica(replica, envs, fail)
    return Config(file=file, envs=envs, retention=retention, offsite=offsite,
                  alerts=parse_alerts(data.get("alerts"), fail), replica=replica)


def check_table(table, name, keys, fail):
    if not isinstance(table, dict):
        fail(name, f"must be a table: [{name}]")
    for key in table:
        if key not in keys:
            fail(f"{name}.{key}", f"unknown key{did_you_mean(key, keys)}")


def file_kind(mode):
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))
    return next((name for test, name in kinds if test(mode)), "not a plain file")


def parse_offsite(table, base, fail):
    """[offsite]: where restic keeps the copies. The password file must be the user's alone: ssh
    refuses a private key others can read, and so does this (exit 2, before anything runs)."""
    if table is None:
        return None
    check_table(table, "offsite", OFFSITE_KEYS, fail)
    for key in ("repository", "password_file"):
        if not isinstance(table.get(key), str) or not table[key].strip() or "\0" in table[key]:
            fail(f"offsite.{key}", f"expected {OFFSITE_KEYS[key]}")
    engine = table.get("engine", "restic")
    if engine not in ENGINES:
        fail("offsite.engine", f"expected {OFFSITE_KEYS['engine']}")
    options = table.get("options", [])
    if not isinstance(options, list) or not all(isinstance(o, str) and "=" in o for o in options):
        fail("offsite.options", f"expected {OFFSITE_KEYS['options']}")
    for o in options if engine == "borg" else []:
        if not BORG_OPTION_RE.match(o) or o.split("=", 1)[0] in BORG_REFUSED:
            fail("offsite.options", f"{o.split('=', 1)[0]!r}: with borg, options are BORG_* settings (the passphrase "
                                    "only in password_file, the repository only in repository), e.g. "
                                    "\"BORG_RSH=ssh -i /home/u/.ssh/backup\"")
    if engine == "borg" and table["repository"].startswith(REMOTE_BACKENDS) and not table["repository"].startswith(
            "ssh://"):
        fail("offsite.repository", "borg reaches a folder or ssh://user@host[:port]/path; restic (engine = \"restic\") "
                                   "reaches sftp:, S3, B2, REST and the others")
    if engine == "restic" and table["repository"].startswith("ssh://"):
        fail("offsite.repository", "ssh:// is borg's (engine = \"borg\"); restic reaches an ssh host as sftp:user@host:/path")
    password_file = resolve(base, table["password_file"])
    try:
        st = os.stat(password_file)
    except OSError as exc:
        fail("offsite.password_file", f"cannot read {password_file}: {exc.strerror}")
    if not stat.S_ISREG(st.st_mode):        # a FIFO hung borg for 300 s holding the repository's lock
        fail("offsite.password_file", f"{password_file} is not a regular file ({file_kind(st.st_mode)}"
                                      f"{', through a link' if os.path.islink(password_file) else ''}): it must be a "
                                      "plain file holding the password")
    if st.st_mode & 0o077:
        fail("offsite.password_file", f"{password_file} may be read by others (mode {st.st_mode & 0o777:04o}); "
                                      f"it holds the key to every off-site copy: chmod 600 {password_file}")
    for key in ("host", "id"):
        if key in table and not (isinstance(table[key], str) and ID_RE.match(table[key])):
            fail(f"offsite.{key}", f"expected {OFFSITE_KEYS[key]}: letters, digits, '.', '_' and '-'")
    repository = table["repository"]
    if not repository.startswith(REMOTE_BACKENDS):
        # a folder: relative to the config's folder, like every other path here (not to wherever the
        # command was started: copies scattered into each folder cron or a shell happened to be in)
        repository = str(resolve(base, repository.removeprefix("local:")))
    return Offsite(repository=repository, password_file=password_file, options=list(options),
                   host=table.get("host", ""), id=table.get("id", ""), engine=engine)


def parse_alerts(table, fail):
    if table is None:
        return None
    check_table(table, "alerts", ALERT_KEYS, fail)
    webhook, command = table.get("webhook", ""), table.get("command", [])
    if not isinstance(webhook, str) or (webhook and not re.match(r"^https?://[^\s]+$", webhook)):
        fail("alerts.webhook", f"expected {ALERT_KEYS['webhook']}")
    if not isinstance(command, list) or not all(isinstance(a, str) for a in command):
        fail("alerts.command", f"expected {ALERT_KEYS['command']}")
    if not webhook and not command:
        fail("alerts", "give a webhook, a command, or both")
    return Alerts(webhook=webhook, command=list(command))


def parse_retention(table, fail):
    if not isinstance(table, dict):
        fail("retention", "must be a table: [retention]")
    retention = dict(RETENTION_KEYS)
    for key, value in table.items():
        if key not in RETENTION_KEYS:
            fail(f"retention.{key}", f"unknown key{did_you_mean(key, RETENTION_KEYS)}")
        if not is_int(value) or value < 0:
            fail(f"retention.{key}", f"must be a whole number of backups to keep (0 or more), got {value!r}")
        retention[key] = value
    return retention


def is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_env(name, table, defaults, base, fail):
    for key in table:
        if key not in ENV_KEYS:
            fail(f"env.{name}.{key}", f"unknown key{did_you_mean(key, ENV_KEYS)}")
    merged = {k: default for k, (default, _) in ENV_KEYS.items() if default is not None}
    merged.update(defaults)
    merged.update(table)
    for key in REQUIRED_ENV_KEYS:
        if key not in merged:
            fail(f"env.{name}.{key}", f"missing; expected {ENV_KEYS[key][1]}")

    def key_of(k):
        return f"env.{name}.{k}" if k in table else f"defaults.{k}"

    def expect(k, ok):
        if not ok:
            fail(key_of(k), f"expected {ENV_KEYS[k][1]}, got {merged[k]!r}")
        return merged[k]

    for k in ("path", "branch", "db", "unit", "domain", "promote_from", "remote",
              "health_path", "backup_dir", "state_dir"):
        expect(k, isinstance(merged[k], str))
    for k in ("path", "db", "backup_dir", "state_dir"):
        expect(k, merged[k] != "" and "\0" not in merged[k])
    expect("branch", valid_branch(merged["branch"]))
    expect("port", is_int(merged["port"]) and 1 <= merged["port"] <= 65535)
    expect("unit", bool(UNIT_RE.match(merged["unit"])))
    expect("domain", merged["domain"] == "" or bool(DOMAIN_RE.match(merged["domain"])))
    expect("promote_from", merged["promote_from"] == "" or bool(NAME_RE.match(merged["promote_from"])))
    expect("remote", merged["remote"] == "" or bool(REMOTE_RE.match(merged["remote"])))
    expect("health_path", merged["health_path"].startswith("/") and not any(c.isspace() for c in merged["health_path"]))
    expect("health_timeout", is_number(merged["health_timeout"]) and 1 <= merged["health_timeout"] <= 3600)
    expect("command_timeout", is_number(merged["command_timeout"]) and 1 <= merged["command_timeout"] <= 86400)
    check_pre_restart(merged["pre_restart"], key_of("pre_restart"), fail)
    check_pre_restart(merged["build"], key_of("build"), fail, "build")
    expect("shared", isinstance(merged["shared"], list) and all(valid_relative(p) for p in merged["shared"]))
    expect("keep_releases", is_int(merged["keep_releases"]) and 1 <= merged["keep_releases"] <= 100)
    expect("watch", is_number(merged["watch"]) and 0 <= merged["watch"] <= 3600)
    expect("rehearse_paths", isinstance(merged["rehearse_paths"], list) and all(
        isinstance(p, str) and p.startswith("/") and not any(c.isspace() for c in p) for p in merged["rehearse_paths"]))
    expect("require_rehearsal", isinstance(merged["require_rehearsal"], bool))
    expect("migration_mode", merged["migration_mode"] in ("auto", "online", "stop-first"))
    expect("bookkeeping_tables", isinstance(merged["bookkeeping_tables"], list) and all(
        isinstance(n, str) and n and "\0" not in n for n in merged["bookkeeping_tables"]))
    expect("secret_env", isinstance(merged["secret_env"], list) and all(
        isinstance(n, str) and re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", n) for n in merged["secret_env"]))
    if not os.path.isabs(os.path.expanduser(merged["db"])) and not os.path.dirname(os.path.normpath(merged["db"])):
        if merged["build"] or merged["shared"]:
            fail(key_of("db"), f"{merged['db']!r} lies at the top of a release; releases share the database's "
                               "folder, so give it one, e.g. \"instance/app.db\"")

    path = resolve(base, merged["path"])
    if not path.is_dir():
        fail(key_of("path"), f"{path} is not an existing folder")
    check_inside(name, path, merged["db"], merged["shared"], key_of, fail)
    return Env(
        name=name,
        path=path,
        branch=merged["branch"],
        port=merged["port"],
        db_setting=merged["db"],
        unit=merged["unit"],
        domain=merged["domain"],
        promote_from=merged["promote_from"],
        pre_restart=[list(argv) for argv in merged["pre_restart"]],
        remote=merged["remote"],
        health_path=merged["health_path"],
        health_timeout=float(merged["health_timeout"]),
        command_timeout=float(merged["command_timeout"]),
        backup_dir=resolve(base, merged["backup_dir"]) / name,
        state_dir=resolve(base, merged["state_dir"]),
        build=[list(argv) for argv in merged["build"]],
        shared=list(merged["shared"]),
        keep_releases=merged["keep_releases"],
        watch=float(merged["watch"]),
        rehearse_paths=list(merged["rehearse_paths"]),
        require_rehearsal=merged["require_rehearsal"],
        migration_mode=merged["migration_mode"],
        bookkeeping=list(merged["bookkeeping_tables"]),
        secret_env=list(merged["secret_env"]),
        keys={k: key_of(k) for k in ENV_KEYS},
    )


def resolve(base, value):
    return Path(os.path.normpath(Path(base) / os.path.expanduser(value)))


def valid_branch(name):
    """git check-ref-format rules for a branch name, checked without running git."""
    if not name or name.startswith(("-", "/", ".")) or name.endswith(("/", ".", ".lock")) or name == "@":
        return False
    if ".." in name or "//" in name or "@{" in name or "/." in name:
        return False
    if any(c in name for c in SHELL_CHARS):
        return False        # legal in git, but never in a name an operator pastes into a shell
    return not any(c in name for c in " ~^:?*[\\\t\n\r\x7f") and all(ord(c) >= 32 for c in name)


def valid_relative(p):
    """A path inside a release: relative, no '..', not empty."""
    if not isinstance(p, str) or not p or "\0" in p or os.path.isabs(p) or p.startswith("~"):
        return False
    norm = os.path.normpath(p)
    return norm not in (".", "..") and not norm.startswith("../")


def check_pre_restart(value, key, fail, name="pre_restart"):
    if not isinstance(value, list):
        fail(key, f"expected {ENV_KEYS[name][1]}, got {value!r}: commands run without a shell, "
                  "so write each as a list of words")
    for i, argv in enumerate(value):
        if not isinstance(argv, list) or not argv or not all(isinstance(w, str) and w for w in argv):
            fail(f"{key}[{i}]", f"expected a non-empty list of non-empty strings (an argv list, no shell), got {argv!r}")


def check_across_envs(envs, fail):
    for field_name in ("port", "db", "unit"):
        seen = {}
        for env in envs.values():
            value = getattr(env, field_name)
            if field_name == "db":      # through links too: a folder linked to another env's is the same file
                value = Path(os.path.realpath(value))
            if value in seen:
                fail(f"env.{env.name}.{field_name}", f"{getattr(env, field_name)} is also env {seen[value]}'s; "
                                                     "each env needs its own")
            seen[value] = env.name
    seen = {}
    for env in envs.values():
        tree = env.path.resolve()
        if tree in seen:
            other = envs[seen[tree]]
            if other.branch == env.branch:
                fail(f"env.{env.name}.path", f"{env.path} is also env {other.name}'s; each env needs its own work tree")
            fail(f"env.{env.name}.path",
                 f"{env.path} is also env {other.name}'s work tree, but on branch {other.branch!r}, not "
                 f"{env.branch!r}: one folder can hold one branch; give {env.name} its own work tree with: "
                 f"git -C {other.path} worktree add {other.path}-{env.name} {env.branch}")
        seen[tree] = env.name
    check_envs_apart(envs, fail)
    for env in envs.values():
        if env.promote_from:
            if env.promote_from == env.name:
                fail(f"env.{env.name}.promote_from", "an env cannot promote from itself")
            # an env of another host: its verifications come through the remote (verified_notes). Only on a host
            # where every other env promotes from somewhere too; else a name that is none of this file's is a typo
            sources_here = [e.name for e in envs.values() if e.name != env.name and not e.promote_from]
            if env.promote_from not in envs and (sources_here or not env.remote):
                fail(f"env.{env.name}.promote_from", f"no env named {env.promote_from!r}"
                     + (did_you_mean(env.promote_from, envs) if sources_here else
                        " here, and no remote to read another host's verifications from"))


# -- confinement -----------------------------------------------------------------------------------
def inside(child, parent):
    """child is parent, or lies under it (both normalised absolute paths, as text)."""
    child, parent = str(child), str(parent).rstrip("/") or "/"
    return child == parent or child.startswith(parent if parent == "/" else parent + "/")


def real(path):
    return os.path.realpath(path)


def db_folder(db_setting):
    """The database's folder, relative to a release ("" when none), or None for an absolute db."""
    if os.path.isabs(os.path.expanduser(db_setting)):
        return None
    return os.path.dirname(os.path.normpath(db_setting))


def check_inside(name, path, db, shared, key_of, fail):
    """Within one env: a relative db inside the tree; shared paths not nested in each other or in
    (or around) the database's folder."""
    folder = db_folder(db)
    if folder is not None:
        norm = os.path.normpath(db)
        if norm in (".", "..") or norm.startswith("../"):
            fail(key_of("db"), f"{db!r} climbs out of env {name}'s tree ({path}): a relative db must lie inside it "
                               f"(its folder is shared by the releases, and converting the env moves it into "
                               f"{path}.releases/shared); give an absolute path for a database kept elsewhere")
    paths = ([(folder, "the database's folder, always shared")] if folder else []) + \
        [(os.path.normpath(p), "") for p in shared]
    for i, (a, why_a) in enumerate(paths):
        for b, why_b in paths[i + 1:]:
            if a == b:
                continue            # the same folder named twice (the db's folder in `shared` too): one link
            if inside(a, b) or inside(b, a):
                (inner, why_in), (outer, why_out) = ((a, why_a), (b, why_b)) if inside(a, b) else ((b, why_b), (a, why_a))
                fail(key_of("shared") if not why_in or why_out else key_of("db"),
                     f"{inner!r}{f' ({why_in})' if why_in else ''} lies inside {outer!r}"
                     f"{f' ({why_out})' if why_out else ', also shared'}: shared paths may not overlap (the inner one "
                     f"would be linked through the outer one's link, and a build removes the live data under it); "
                     f"share {outer!r} only")


def shared_folders(env):
    """(relative path, real path) of every shared folder of env: in its work tree and in its releases."""
    rels = ([db_folder(env.db_setting)] if db_folder(env.db_setting) else []) + [os.path.normpath(p) for p in env.shared]
    return [(rel, real(base / rel)) for rel in dict.fromkeys(rels)
            for base in (env.path, env.releases_root / "shared")]


def env_trees(env):
    return [real(env.path), real(env.releases_root)]


def env_dbs(env):
    found = [real(env.db_in_tree)]
    if db_folder(env.db_setting) is not None:
        found.append(real(resolve(env.releases_root / "shared", env.db_setting)))
    return found


def check_envs_apart(envs, fail):
    """No two envs overlap, through links too; nothing of the tool's lies in an env's tree."""
    for a in envs.values():
        for b in envs.values():
            if a is b:
                continue
            for ta in env_trees(a):
                for tb in env_trees(b):
                    if inside(ta, tb):
                        fail(a.keys["path"], f"{a.path} lies inside env {b.name}'s tree ({tb}): each env needs a "
                                             "tree of its own, beside the others' (a conversion or a build of one "
                                             "would move or remove the other's files)")
            for db in env_dbs(a):
                for tb in env_trees(b):
                    if inside(db, tb):
                        fail(a.keys["db"], f"{db} lies inside env {b.name}'s tree ({tb}): {b.name}'s deploys, "
                                           f"conversion and rollbacks would move or replace env {a.name}'s database")
            for rel, folder in shared_folders(a):
                for tb in env_trees(b):
                    if inside(folder, tb) or inside(tb, folder):
                        fail(a.keys["shared"] if rel != db_folder(a.db_setting) else a.keys["db"],
                             f"{a.name}'s shared folder {rel!r} is {folder}, which overlaps env {b.name}'s tree ({tb}): "
                             "each env's shared data must be its own")
                for rel_b, other in shared_folders(b):
                    if inside(folder, other) or inside(other, folder):
                        fail(a.keys["shared"] if rel != db_folder(a.db_setting) else a.keys["db"],
                             f"{a.name}'s shared folder {rel!r} ({folder}) overlaps env {b.name}'s {rel_b!r} ({other}): "
                             "a conversion of one would move the other's live data")
    for a in envs.values():
        for key, folder in (("backup_dir", a.backup_dir), ("state_dir", a.state_dir)):
            for b in envs.values():
                for tb in env_trees(b):
                    if inside(real(folder), tb):
                        fail(a.keys[key], f"{folder} lies inside env {b.name}'s tree ({tb}): the tool's own "
                                          f"folders stay out of the app's (a release, a rehearsal or a conversion "
                                          "would copy, move or remove them)")


def check_repository(offsite, envs, fail):
    """A local off-site repository lies outside every env's tree and backup folder: the copies that
    survive the loss of the app's folders cannot live in them."""
    repo = real(offsite.repository)
    for env in envs.values():
        for folder in env_trees(env) + [real(env.backup_dir)]:
            if inside(repo, folder):
                fail("offsite.repository", f"{offsite.repository} lies inside env {env.name}'s "
                                           f"{'backup folder' if folder == real(env.backup_dir) else 'tree'} ({folder}): "
                                           "off-site copies must live elsewhere")


def check_replica(replica, envs, fail):
    """The replicated envs share one state folder (the one replicator of this config keeps its files there);
    a replica folder lies outside every env's tree and backup folder."""
    folders = {envs[name].state_dir for name in replica.envs}
    if len(folders) > 1:
        fail("replica.envs", f"the envs {', '.join(replica.envs)} keep their state in different folders "
                             f"({', '.join(sorted(map(str, folders)))}): one replicator keeps its files in one; "
                             "give them one state_dir")
    if replica.folder is not None:
        for env in envs.values():
            for folder in env_trees(env) + [real(env.backup_dir), real(env.state_dir)]:
                if inside(real(replica.folder), folder) or inside(folder, real(replica.folder)):
                    fail("replica.url", f"{replica.folder} overlaps env {env.name}'s folder {folder}: continuous "
                                        "copies must live elsewhere (another disk)")
