"""Load and validate config.toml (see the contract). Every error names the file and the key.

Every key is defined once, in safedeploy.config_keys (name, default, check, meaning); this module finds
the file, reads it, checks each key with its definition and builds the Env, Offsite, Alerts and retention
values from them. Every configured path is resolved once, here, relative to the config file's folder where
it is relative (`path`, `backup_dir`, `state_dir`, `[offsite] password_file`, and `[offsite] repository`
when it is a local folder; `db` relative to `path`, as the contract says). The checks that span keys and
envs (confinement: no two envs overlap, shared paths stay inside) are safedeploy.config_checks'.

The file is found as: --config FILE, else $DEPLOY_CONFIG, else the operator's own
$XDG_CONFIG_HOME/safe-deploy/config.toml (~/.config/safe-deploy/config.toml) when it exists, else
config.toml beside the scripts (the shipped example for the seed's host).
"""

import hashlib
import os
import re
import shlex
import socket
import stat
import sys
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from urllib.parse import quote, unquote

from . import SCRIPTS_DIR
from .config_checks import check_across_envs, check_inside, check_replica, check_repository, did_you_mean
from .config_keys import (ALERT_KEYS, ENV, ENV_KEYS, NAME_RE, OFFSITE_KEYS, REPLICA_KEYS, REQUIRED_ENV_KEYS,  # noqa: F401
                          RETENTION, RETENTION_KEYS, TOP_KEYS, UNIT_RE, Key, resolve)
from .errors import DeployError, usage_error
from .replica_config import ReplicaSettings
from .replica_config import parse as parse_replica

if sys.version_info >= (3, 11):
    import tomllib  # novermin: Python 3.11 and later
else:                   # Python 3.10 (Ubuntu 22.04): the same parser, packaged as tomli (python3-tomli)
    import tomli as tomllib

# user:password@ in a URL (rest:https://u:pw@host/, s3:https://KEY:SECRET@host/, sftp://u:pw@host/):
# what mask() hides; the scheme-less sftp:u:pw@host:/path form too
USERINFO_RE = re.compile(r"(?P<head>(?:[A-Za-z][A-Za-z0-9+.-]*:)+(?://)?)(?P<user>[^:@/\s]*):(?P<pw>[^@\s]*)@")
# restic's backends other than a local folder ("local:PATH", or any other string, is a folder)
REMOTE_BACKENDS = ("sftp:", "rest:", "s3:", "swift:", "b2:", "azure:", "gs:", "rclone:", "ssh://")
ENGINES = ("restic", "borg")
# borg's settings ([offsite] options with engine = "borg"): environment variables borg reads; never the
# passphrase (password_file is the one place for it) nor the repository (repository is)
BORG_OPTION_RE = re.compile(r"^BORG_[A-Z_]+=")
BORG_REFUSED = ("BORG_PASSPHRASE", "BORG_PASSCOMMAND", "BORG_PASSPHRASE_FD", "BORG_REPO", "BORG_NEW_PASSPHRASE")
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
OWN_CONFIG = Path("safe-deploy") / "config.toml"     # under $XDG_CONFIG_HOME (~/.config)


@dataclass
class Offsite:
    """The [offsite] table: where copies go, with which program, under which identity."""
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
    """The [alerts] table: the webhook URL and the command an alert is sent to."""
    webhook: str
    command: list


class EnvPlaces:
    """What an env's settings imply: where its releases, database and health page are. The settings
    themselves are the fields of Env, one per key of config_keys.ENV."""

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


Env = make_dataclass("Env", [("name", str), *[(key.field, key.type) for key in ENV],
                            # key -> where it was set ("env.prod.db", "defaults.db")
                            ("keys", dict, field(default_factory=dict, repr=False))], bases=(EnvPlaces,),
                     namespace={"__doc__": "One [env.NAME], its [defaults] applied: a field per key of "
                                           "config_keys.ENV (db as db_setting)."})
Env.__module__ = __name__


@dataclass
class Config:
    """A loaded config.toml: its envs, retention, and the [offsite], [alerts] and [replica] tables."""
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


# -- where the file is ------------------------------------------------------------------------------
def own_config_file() -> Path | None:
    """The operator's own config: $XDG_CONFIG_HOME/safe-deploy/config.toml, ~/.config/safe-deploy/config.toml
    when XDG_CONFIG_HOME is unset or not absolute (as the XDG spec says); None without a home folder."""
    xdg = os.environ.get("XDG_CONFIG_HOME", "")
    if os.path.isabs(xdg):
        return Path(xdg) / OWN_CONFIG
    home = os.path.expanduser("~")
    return Path(home) / ".config" / OWN_CONFIG if os.path.isabs(home) else None


def default_config_file() -> Path:
    """The file found when neither --config nor $DEPLOY_CONFIG names one: the operator's own when it
    exists (a dangling link too: an error about it, not a silent fallback), else config.toml beside the scripts."""
    own = own_config_file()
    if own is not None and (own.exists() or own.is_symlink()):
        return own
    return SCRIPTS_DIR / "config.toml"


def find_config_file(cli_value=None) -> tuple[Path, bool]:
    """(the config file, whether it was named): --config FILE, else $DEPLOY_CONFIG, else the operator's
    own, else config.toml beside the scripts."""
    if cli_value:
        return Path(cli_value), True
    if os.environ.get("DEPLOY_CONFIG"):
        return Path(os.environ["DEPLOY_CONFIG"]), True
    return default_config_file(), False


def not_found(file: Path, explicit: bool) -> str:
    """The one line for a config file that is not there."""
    if explicit:
        return f"{file}: config file not found (use --config FILE or $DEPLOY_CONFIG)"
    own = own_config_file()
    write = shlex.join(["python3", str(SCRIPTS_DIR / "adopt.py"), "--discover", "--write"])
    return (f"{file}: config file not found, and no {own or '~/.config/safe-deploy/config.toml'} either (looked for "
            f"--config FILE, then $DEPLOY_CONFIG, then your own, then config.toml beside the scripts): write your "
            f"own from the running units with: {write}")


def load(cli_value=None):
    file, explicit = find_config_file(cli_value)
    file = file.absolute()
    data = read_toml(file, explicit)
    check_private(file, "config file", "it names commands this tool runs")
    try:
        config = parse(data, file)
    except DeployError as exc:
        if explicit or file != (SCRIPTS_DIR / "config.toml").absolute():
            raise
        write = shlex.join(["python3", str(SCRIPTS_DIR / "adopt.py"), "--discover", "--write"])
        raise DeployError(f"{exc} (this is the example config.toml shipped beside the scripts, for the seed's "
                          f"host: no --config, no $DEPLOY_CONFIG and no file of your own was found; write yours "
                          f"from the running units with: {write})", exc.code) from None
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


def read_toml(file, explicit=True):
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        raise usage_error(not_found(file, explicit)) from None
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


# -- the tables -----------------------------------------------------------------------------------
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
    envs = parse_envs(data.get("env"), defaults, file.parent, fail)
    check_across_envs(envs, fail)
    offsite = parse_offsite(data.get("offsite"), file.parent, fail)
    if offsite and offsite.local:
        check_repository(offsite, envs, fail)
    replica = parse_replica(data.get("replica"), file.parent, list(envs), fail)
    if replica:
        check_replica(replica, envs, fail)
    return Config(file=file, envs=envs, retention=retention, offsite=offsite,
                  alerts=parse_alerts(data.get("alerts"), fail), replica=replica)


def parse_envs(env_tables, defaults, base, fail):
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
        envs[name] = parse_env(name, table, defaults, base, fail)
    return envs


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
    check_offsite_engine(engine, table["repository"], options, fail)
    password_file = check_password_file(resolve(base, table["password_file"]), fail)
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


def check_offsite_engine(engine, repository, options, fail):
    """options and repository as the engine takes them."""
    if not isinstance(options, list) or not all(isinstance(o, str) and "=" in o for o in options):
        fail("offsite.options", f"expected {OFFSITE_KEYS['options']}")
    for o in options if engine == "borg" else []:
        if not BORG_OPTION_RE.match(o) or o.split("=", 1)[0] in BORG_REFUSED:
            fail("offsite.options", f"{o.split('=', 1)[0]!r}: with borg, options are BORG_* settings (the passphrase "
                                    "only in password_file, the repository only in repository), e.g. "
                                    "\"BORG_RSH=ssh -i /home/u/.ssh/backup\"")
    if engine == "borg" and repository.startswith(REMOTE_BACKENDS) and not repository.startswith("ssh://"):
        fail("offsite.repository", "borg reaches a folder or ssh://user@host[:port]/path; restic (engine = \"restic\") "
                                   "reaches sftp:, S3, B2, REST and the others")
    if engine == "restic" and repository.startswith("ssh://"):
        fail("offsite.repository", "ssh:// is borg's (engine = \"borg\"); restic reaches an ssh host as sftp:user@host:/path")


def check_password_file(password_file, fail):
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
    return password_file


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
    by_name = {key.name: key for key in RETENTION}
    for name, value in table.items():
        if name not in by_name:
            fail(f"retention.{name}", f"unknown key{did_you_mean(name, RETENTION_KEYS)}")
        if not by_name[name].check(value):
            fail(f"retention.{name}", f"must be {by_name[name].expect}, got {value!r}")
        retention[name] = value
    return retention


def parse_env(name, table, defaults, base, fail):
    """One [env.NAME] with [defaults] under it: every key checked with its definition, then the checks that
    span keys; an Env whose fields are the keys' converted values."""
    for key in table:
        if key not in ENV_KEYS:
            fail(f"env.{name}.{key}", f"unknown key{did_you_mean(key, ENV_KEYS)}")
    merged = {key.name: key.default for key in ENV if not key.required}
    merged.update(defaults)
    merged.update(table)
    for key in REQUIRED_ENV_KEYS:
        if key not in merged:
            fail(f"env.{name}.{key}", f"missing; expected {ENV_KEYS[key][1]}")

    def key_of(k):
        return f"env.{name}.{k}" if k in table else f"defaults.{k}"

    for key in ENV:
        check_key(key, merged[key.name], key_of(key.name), fail)
    if not os.path.isabs(os.path.expanduser(merged["db"])) and not os.path.dirname(os.path.normpath(merged["db"])):
        if merged["build"] or merged["shared"]:
            fail(key_of("db"), f"{merged['db']!r} lies at the top of a release; releases share the database's "
                               "folder, so give it one, e.g. \"instance/app.db\"")
    path = resolve(base, merged["path"])
    if not path.is_dir():
        fail(key_of("path"), f"{path} is not an existing folder")
    check_inside(name, path, merged["db"], merged["shared"], key_of, fail)
    return Env(name=name, **{key.field: key.convert(merged[key.name], base, name) for key in ENV},
               keys={key.name: key_of(key.name) for key in ENV})


def check_key(key: Key, value, where: str, fail) -> None:
    """fail() unless value passes key's check: "expected EXPECT, got VALUE", or the check's own message."""
    verdict = key.check(value)
    if verdict is True:
        return
    if isinstance(verdict, tuple):
        fail(where + verdict[0], verdict[1])
    fail(where, f"expected {key.expect}, got {value!r}{key.hint}")
