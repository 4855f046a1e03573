"""What is never shown: secret values of a unit's Environment= and EnvironmentFile=, of the variables an
env names in `secret_env`, and of this process's own secret-named variables, wherever the tool prints,
logs or records text (cli.say/err, the JSON logs of safedeploy.state, alerts).

Which values are secret (secret_values, a pure rule):
- every value of a variable named in `secret_env`;
- every value of a variable whose name says so: a part of the name (split at `_`) is KEY, AUTH, DSN,
  SALT, PASS, CREDENTIAL(S), PRIVATE or APIKEY, or contains SECRET, PASSWORD, PASSWD, PASSPHRASE or
  TOKEN (DJANGO_SECRET_KEY, DB_PASSWORD, GITHUB_TOKEN);
- any other value that looks like a credential: 16 characters or more, no blanks, letters and digits,
  not a path, a URL or a dotted name (a generated key in a variable with a plain name);
- the password of a URL's user:password@ (DATABASE_URL=postgres://app:pw@db/app).

How they are hidden:
- in free text, each registered value of MIN_FREE_TEXT characters or more becomes <redacted> (shorter
  ones would garble ordinary words; the rule above never calls them secret unless named so);
- an argv (build, pre_restart: the log records it) word by word: a secret value (any length), the
  value of NAME=VALUE or --flag=VALUE whose name says secret, and the word after such a --flag;
- a unit file shown to the user (a diff): every Environment= value, secret or not, but an absolute path
  (the conversion rewrites those; a path is no secret), and the Exec lines' words as an argv.

The registry is this process's: one command, one set of envs. Nothing is ever removed from it.
"""

import json
import re
import shlex

from .config import mask

REDACTED = "<redacted>"
MIN_FREE_TEXT = 6
SECRET_PARTS = {"KEY", "AUTH", "DSN", "SALT", "PASS", "PASSWD", "CREDENTIAL", "CREDENTIALS", "PRIVATE", "APIKEY"}
SECRET_WITHIN = ("SECRET", "PASSWORD", "PASSWD", "PASSPHRASE", "TOKEN")
PLAIN_RE = re.compile(r"^(?:[/~.]|[A-Za-z][A-Za-z0-9+.-]*://)|^[A-Za-z_][A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]+)+$")
URL_PASSWORD_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^:@/\s]*:(?P<pw>[^@\s]+)@")

_SECRETS: set[str] = set()


def secret_name(name: str) -> bool:
    parts = name.upper().split("_")
    return any(p in SECRET_PARTS for p in parts) or any(w in p for p in parts for w in SECRET_WITHIN)


def looks_like_credential(value: str) -> bool:
    return (len(value) >= 16 and not any(c.isspace() for c in value) and not PLAIN_RE.match(value)
            and any(c.isalpha() for c in value) and any(c.isdigit() for c in value))


def secret_values(pairs, secret_names=()) -> list[str]:
    """The values of pairs [(name, value)] that are secret (the rule in the module's docstring)."""
    found = []
    for name, value in pairs:
        if not value:
            continue
        if name in secret_names or secret_name(name) or looks_like_credential(value):
            found.append(value)
        found += [m.group("pw") for m in URL_PASSWORD_RE.finditer(value)]
    return found


def register(values) -> None:
    _SECRETS.update(v for v in values if v)


def register_pairs(pairs, secret_names=()) -> None:
    register(secret_values(pairs, secret_names))


def register_environment(environ) -> None:
    """This process's own secret-named variables (a password exported for a backup tool)."""
    register_pairs(((k, v) for k, v in environ.items() if secret_name(k)), ())


def redact(text):
    """text with every registered secret (MIN_FREE_TEXT characters or more), and every URL password, as
    <redacted>; also as they appear inside a JSON string. Anything but a str is returned as it is."""
    if not isinstance(text, str) or not text:
        return text
    for value in sorted((v for v in _SECRETS if len(v) >= MIN_FREE_TEXT), key=len, reverse=True):
        if value in text:
            text = text.replace(value, REDACTED)
        escaped = json.dumps(value)[1:-1]
        if escaped != value and escaped in text:
            text = text.replace(escaped, REDACTED)
    return mask(text)


def redact_argv(argv) -> list[str]:
    """argv with its secret words hidden (see the module's docstring)."""
    out, hide_next = [], False
    for word in argv:
        word = str(word)
        name, eq, value = word.partition("=")
        if hide_next or word in _SECRETS:
            out.append(REDACTED)
        elif eq and value and (value in _SECRETS or secret_name(name.lstrip("-").replace("-", "_"))):
            out.append(f"{name}={REDACTED}")
        else:
            out.append(redact(word))
        hide_next = word.startswith("--") and not eq and secret_name(word.lstrip("-").replace("-", "_"))
    return out


def shown(argv) -> str:
    """argv as a message shows it: quoted as a shell would take it, its secrets hidden (<redacted> itself
    left unquoted, so that it reads as what it is)."""
    return join(redact_argv(argv))


def join(words) -> str:
    out = []
    for word in words:
        plain = word.replace(REDACTED, "X")
        out.append(word if shlex.quote(plain) == plain else shlex.quote(word))
    return " ".join(out)


def redact_unit_text(text: str) -> str:
    """A unit file as the tool shows it (a diff): Environment= values hidden but absolute paths, Exec
    lines' secret words hidden, then every registered secret."""
    out = []
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\n")
        key, eq, value = body.strip().partition("=")
        if eq and key == "Environment" and value:
            words = []
            for word in shlex.split(value, posix=True) if balanced(value) else [value]:
                name, has, val = word.partition("=")
                words.append(f"{name}={val}" if has and val.startswith("/") and val not in _SECRETS
                             else f"{name}={REDACTED}" if has else REDACTED)
            body = body[:len(body) - len(body.lstrip())] + "Environment=" + " ".join(words)
        elif eq and key.startswith("Exec") and value and balanced(value):
            prefix = value[:len(value) - len(value.lstrip("-@:+!"))]
            words = shlex.split(value[len(prefix):], posix=True)
            if redact_argv(words) != words:
                body = f"{body[:len(body) - len(body.lstrip())]}{key}={prefix}{join(redact_argv(words))}"
        out.append(redact(body) + line[len(line.rstrip("\n")):])
    return "".join(out)


def balanced(value: str) -> bool:
    try:
        shlex.split(value, posix=True)
        return True
    except ValueError:
        return False
