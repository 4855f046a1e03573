"""The [replica] table of config.toml: where continuous copies (Litestream) of the env databases go.

parse() checks the table when the config loads (exit 2, one line naming the key) and returns a
ReplicaSettings, or None without the table. The contract:
- url: file:///ABSOLUTE/FOLDER, sftp://USER@HOST[:PORT]/PATH, or s3://BUCKET/PATH[?endpoint=...&region=...];
  each env's copies go to URL/ENV. A password in the URL is refused: credentials come from files or
  the environment only, never from the config's text, an argument or an output.
- envs: the envs replicated (default: every env); they share one state folder, where the one
  replicator of this config keeps its files.
- key_file, password_file (sftp): files only the user may read (mode 0600, as ssh demands).
- known_hosts (sftp): where the server's host key is looked up; a server not in it is refused when
  the replicator's config is written (Litestream would otherwise accept any host key).
S3 credentials: the usual AWS_* variables or ~/.aws/credentials, read by Litestream itself.
"""

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from .config_keys import REPLICA_KEYS

SCHEMES = ("file", "sftp", "s3")
USER_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")

Fail = Callable[[str, str], None]


@dataclass(frozen=True)
class ReplicaSettings:
    """The [replica] table: where continuous copies go, for which envs, with which keys."""
    url: str                      # as written (never holds a password)
    scheme: str                   # "file", "sftp" or "s3"
    envs: tuple[str, ...]         # the envs replicated, in config order
    key_file: Path | None = None
    password_file: Path | None = None
    known_hosts: Path = Path("~/.ssh/known_hosts")

    @property
    def parts(self):
        return urlsplit(self.url)

    @property
    def folder(self) -> Path | None:
        """The replica's folder on this machine (file:// only)."""
        return Path(os.path.normpath(self.parts.path)) if self.scheme == "file" else None

    def env_path(self, env: str) -> str:
        """Where env's copies go: the URL's path with /ENV added."""
        return f"{self.parts.path.rstrip('/')}/{env}"

    def env_url(self, env: str) -> str:
        p = self.parts
        return f"{p.scheme}://{p.netloc}{self.env_path(env)}" + (f"?{p.query}" if p.query else "")


def parse(table: object, base: Path, env_names: list[str], fail: Fail) -> ReplicaSettings | None:
    if table is None:
        return None
    if not isinstance(table, dict):
        fail("replica", "must be a table: [replica]")
        return None
    for key in table:
        if key not in REPLICA_KEYS:
            fail(f"replica.{key}", "unknown key (expected one of: " + ", ".join(REPLICA_KEYS) + ")")
    url = table.get("url")
    if not isinstance(url, str) or not url.strip() or any(c.isspace() or c == "\0" for c in url):
        fail("replica.url", f"expected {REPLICA_KEYS['url']}")
        return None
    scheme = check_url(url, fail)
    envs = check_envs(table.get("envs", env_names), env_names, fail)
    if scheme != "sftp":
        for key in ("key_file", "password_file", "known_hosts"):
            if key in table:
                fail(f"replica.{key}", f"only for an sftp:// url (with {scheme}://, "
                                       + ("nothing is needed" if scheme == "file" else
                                          "credentials come from the AWS_* variables or ~/.aws/credentials") + ")")
    files = {key: private_file(table.get(key), base, f"replica.{key}", fail) for key in ("key_file", "password_file")}
    if scheme == "sftp" and not (files["key_file"] or files["password_file"]):
        fail("replica", "an sftp:// url needs key_file or password_file (never a password in the url)")
    known = table.get("known_hosts", "~/.ssh/known_hosts")
    if not isinstance(known, str) or not known.strip():
        fail("replica.known_hosts", f"expected {REPLICA_KEYS['known_hosts']}")
    known_path = Path(os.path.normpath(base / os.path.expanduser(known)))
    return ReplicaSettings(url=url, scheme=scheme, envs=envs, key_file=files["key_file"],
                           password_file=files["password_file"], known_hosts=known_path)


def check_url(url: str, fail: Fail) -> str:
    p = urlsplit(url)
    if p.scheme not in SCHEMES:
        fail("replica.url", f"{url!r}: expected a file://, sftp:// or s3:// url, e.g. \"file:///mnt/backup/replica\"")
    if p.password is not None:
        fail("replica.url", "the url holds a password: put it in password_file (mode 0600); a password in the config "
                            "would be shown wherever the url is")
    if p.fragment:
        fail("replica.url", f"{url!r}: a url with a #fragment is not a replica")
    if p.scheme == "file":
        if p.netloc or not p.path.startswith("/") or os.path.normpath(p.path) == "/" or p.query:
            fail("replica.url", f"{url!r}: a folder is file:///ABSOLUTE/PATH (three slashes), e.g. "
                                "\"file:///mnt/backup/replica\", on another disk than the databases")
    elif p.scheme == "sftp":
        try:
            port = p.port
        except ValueError:
            port = -1
        if not p.hostname or not p.username or not USER_RE.match(p.username) or port == -1:
            fail("replica.url", f"{url!r}: expected sftp://USER@HOST[:PORT]/PATH")
        if not p.path.startswith("/") or os.path.normpath(p.path) == "/" or p.query:
            fail("replica.url", f"{url!r}: give the folder on the server as an absolute path, e.g. /srv/replica")
    elif not p.netloc or p.username is not None:
        fail("replica.url", f"{url!r}: expected s3://BUCKET/PATH (credentials from AWS_* variables or ~/.aws)")
    return p.scheme


def check_envs(value: object, env_names: list[str], fail: Fail) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        fail("replica.envs", f"expected {REPLICA_KEYS['envs']}")
        return ()
    for name in value:
        if name not in env_names:
            fail("replica.envs", f"no env named {name!r} (envs: {', '.join(env_names)})")
    return tuple(n for n in env_names if n in value)


def private_file(value: object, base: Path, key: str, fail: Fail) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        fail(key, "expected a file path")
    path = Path(os.path.normpath(base / os.path.expanduser(str(value))))
    try:
        st = os.stat(path)
    except OSError as exc:
        fail(key, f"cannot read {path}: {exc.strerror}")
        return None
    if st.st_mode & 0o077:
        fail(key, f"{path} may be read by others (mode {st.st_mode & 0o777:04o}); it holds a credential: chmod 600 {path}")
    return path
