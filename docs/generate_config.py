#!/usr/bin/env python3
"""Write docs/config.md, the config.toml reference, from the key tables in safedeploy/config_keys.py (so the
page cannot drift from what the loader accepts).

    python3 docs/generate_config.py            # rewrite docs/config.md (make docs)
    python3 docs/generate_config.py --check    # exit 1 when docs/config.md is not what the tables say now

The prose that is not about one key is TEMPLATE below; each key's row (name, default, meaning) comes from
its one definition. tests/test_docs.py compares the committed page with render().
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from safedeploy import config_keys  # noqa: E402

PAGE = ROOT / "docs" / "config.md"

TEMPLATE = """\
# config.toml

<!-- Generated from safedeploy/config_keys.py by docs/generate_config.py (make docs); edit those, not this
page: a test compares it with what they say. -->

Every script reads one TOML file, the first of: `--config FILE`; `$DEPLOY_CONFIG`; your own
`$XDG_CONFIG_HOME/safe-deploy/config.toml` (`~/.config/safe-deploy/config.toml` when XDG_CONFIG_HOME
is unset), when it exists; `config.toml` beside the scripts. That last one,
[config.toml](../config.toml), ships with the tool: a working example for the seed's host with a
comment on every key (the seed is the first user's host: prod and dev of a Flask app on one
machine). Keep your own settings in your own file, so that updating the tool (`git pull`) never
conflicts with them: start it from the running host with
`python3 adopt.py --discover --write` ([install-and-adopt.md](install-and-adopt.md)), which writes
`~/.config/safe-deploy/config.toml` (its folder 0700, the file 0600; an existing file is never
overwritten, and `--write FILE` writes elsewhere; its `backup_dir` and `state_dir` are
`~/.local/share/safe-deploy/backups` and `~/.local/state/safe-deploy`, your data kept out of `~/.config`),
or from the example:
`mkdir -p -m 700 ~/.config/safe-deploy && install -m 600 config.toml ~/.config/safe-deploy/`, setting
`backup_dir` and `state_dir` there to absolute folders first (relative ones follow the file's folder).
`python3 status.py` loads the file and shows what it found. The commands the tool prints name the file
with `--config` when `--config` or `$DEPLOY_CONFIG` named it, so that they work when pasted elsewhere.

The file is checked before anything runs. A mistake is exit 2 and one line, `FILE: KEY: message`:
an unknown key (with "did you mean"), a missing required key, a value of the wrong kind, two envs
sharing a port, unit, database or work tree, or paths that overlap (see
[hardening.md](hardening.md#paths)). The file must not be writable by group or others and must
belong to you or root, since it names commands the tool runs; the message gives the `chmod`.

Relative paths are relative to the config file's folder (`db`: to the env's `path`), never to
the folder a command is started in. Defaults below are written as TOML.

## Tables

| table | meaning |
| --- | --- |
{tables}

## Env keys: `[env.NAME]` and `[defaults]`

{env}

## `[retention]`

`backup.py --prune` keeps what borg's `--keep-daily`/`--keep-weekly`/`--keep-monthly` would,
plus the backups nothing may remove ([how-it-works.md](how-it-works.md#pruning)). 0 turns a
rule off.

{retention}

## `[offsite]`

{offsite}

## `[alerts]`

Give a webhook, a command, or both.

{alerts}

## `[replica]`

Continuous copies: each replicated env's database is copied to `URL/ENV` about every half second by one
Litestream process per config, which `python3 backup.py --install-replica` installs as a user unit
([offsite-and-alerts.md](offsite-and-alerts.md#continuous-copies-litestream)). **Litestream 0.5 does not
encrypt its copies**: the folder, the sftp account or the bucket holds your rows in the clear (restic and
borg copies stay encrypted). Credentials come from files or the environment only, never from this file,
an argument or an output: for sftp `key_file` or `password_file`; for S3 the usual `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY` (and `AWS_REGION`, `AWS_ENDPOINT_URL_S3` for S3-compatible stores) in the shell
that runs `--install-replica` (kept for the unit in a 0600 file in the state folder), or `~/.aws/credentials`.

{replica}

## An example

Two envs of one repository, converted to releases, with off-site copies and alerts:

```toml
[defaults]
health_path = "/health"
build = [["uv", "venv", "venv"], ["uv", "pip", "install", "--python", "venv/bin/python", "-r", "requirements.txt"]]
shared = ["instance"]
pre_restart = [["venv/bin/flask", "db", "upgrade"]]

[env.prod]
path = "/home/ubuntu/datatracker"
branch = "main"
port = 8000
domain = "rfc.themetalayer.org"
db = "instance/datatracker.db"
unit = "datatracker.service"
promote_from = "dev"
watch = 60
rehearse_paths = ["/", "/rfc/8446"]

[env.dev]
path = "/home/ubuntu/datatracker-dev"
branch = "dev"
port = 8001
domain = "dev.rfc.themetalayer.org"
db = "instance/datatracker.db"
unit = "datatracker-dev.service"

[offsite]
repository = "sftp:backup@nas.example.org:/srv/restic/datatracker"
password_file = "/home/ubuntu/.config/safe-deploy/restic-password"

[alerts]
webhook = "https://ntfy.example.org/datatracker"
```
"""


def toml(value):
    """A default as TOML writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml(v) for v in value) + "]"
    raise TypeError(value)


def default_cell(key):
    if key.required:
        return "required"
    return key.shown or f"`{toml(key.default)}`"


def cell(text):
    return text.replace("|", "\\|")


def key_table(keys):
    rows = [f"| `{k.name}` | {cell(default_cell(k))} | {cell(k.meaning)} |" for k in keys]
    return "\n".join(["| key | default | meaning |", "| --- | --- | --- |", *rows])


def render():
    tables = "\n".join(f"| `{shown}` | {cell(meaning)} |" for shown, meaning in config_keys.TABLES.values())
    return TEMPLATE.format(tables=tables, env=key_table(config_keys.ENV), retention=key_table(config_keys.RETENTION),
                           offsite=key_table(config_keys.OFFSITE), alerts=key_table(config_keys.ALERTS),
                           replica=key_table(config_keys.REPLICA))


def main():
    p = argparse.ArgumentParser(description="Write docs/config.md from safedeploy/config_keys.py.")
    p.add_argument("--check", action="store_true", help="exit 1 when docs/config.md differs; write nothing")
    args = p.parse_args()
    text = render()
    if args.check:
        same = PAGE.exists() and PAGE.read_text() == text
        print(f"{PAGE} is {'up to date' if same else 'out of date: run make docs'}")
        return 0 if same else 1
    PAGE.write_text(text)
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
