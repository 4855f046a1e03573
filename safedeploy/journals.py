"""What the recovery does with records that are damaged: a torn journal, damaged log lines.

A journal is written whole (temp file, fsync, rename), so a damaged one means the disk or a hand
damaged it; it is never read as "nothing happened". state.Journal.read gives {"damaged": True, ...}
with the fields that are still whole, and `rebuild` turns that into the journal the recovery acts on,
on the safe side (an operation whose journal is damaged is taken as having changed things):

- a deploy (or an operation whose kind cannot be read): undone to its before-deploy point. The point
  is the journal's `tag`/`from` when whole, else the newest `ENV-before-deploy-*` tag that no deploy
  record names (the tag a deploy makes before it changes anything: a deploy that did not make one had
  changed nothing). Its database copy: the journal's `backup`, else the pre-deploy backup of that
  commit made after the tag;
- a rollback whose point (`commit`) is whole: finished, as from an intact journal;
- anything else that may have changed things (a conversion, a rollback whose point cannot be read, a
  rolled-back tag no rollback record names): the journal is moved aside, kept, and the recovery stops
  with exit 4 and what to run.

`repair_records` sets aside the damaged lines of the env's logs and writes back the bad marks only a
tag still holds (marks.repair), so that status and the next decisions read whole records again.
"""

import os
import re
from pathlib import Path

from . import backups, integrity, marks, records
from .commandline import script_command
from .errors import EXIT_HUMAN, DeployError
from .points import instant
from .state import deploy_log, utc_stamp, verified_log

DAMAGED_STEP = "unknown (its journal is damaged)"
PRE_DEPLOY_SLACK = 60.0          # seconds: a pre-deploy backup is made right after its tag


def repair_records(env) -> list:
    """Set aside the damaged lines of env's deploy log, verified log and bad log (kept in LOG.damaged), and
    write back the bad marks its rolled-back tags hold that the bad log lost. Returns what it did."""
    done = []
    for log in (deploy_log(env), verified_log(env.name, env.state_dir)):
        done += [f"{d.describe()}: set aside in {integrity.aside_path(log.path)}"
                 for d in integrity.set_aside(log.path)]
    return done + marks.repair(env)


def rebuild(config, env, repo, j: dict, say) -> dict:
    """The journal the recovery acts on, from a damaged one (see the module). Raises DeployError (exit 4)
    where what was under way cannot be read well enough to finish or undo it."""
    where = j.get("path", f"{env.state_dir}/{env.name}.journal.json")
    op = j.get("op")
    say(f"recovering: the journal {where} is damaged; what it still shows: "
        + (", ".join(f"{k}={v}" for k, v in j.items() if k not in ("damaged", "path", "step") and v) or "nothing"))
    if op == "rollback" and j.get("commit"):
        text = _text(where)
        return {**j, "restore_db": bool(re.search(r'"restore_db": true', text)), "step": DAMAGED_STEP}
    if op in ("deploy", "unknown"):
        rebuilt = deploy_journal(env, repo, j)
        if rebuilt:
            return rebuilt
        if op == "deploy":
            return {**j, "step": None}          # no tag of its own: it had changed nothing live
        pending = unrecorded_rollback_tags(env)
        if not pending:
            return {**j, "step": None}
        why = f"the tag {pending[0]} shows a rollback that no record says ended"
    elif op in ("rehearse", "drill"):
        return j
    else:
        why = f"the interrupted {op} cannot be read well enough to finish or undo it"
    raise human_needed(config, env, where, why)


def deploy_journal(env, repo, j: dict) -> dict | None:
    """The undo of a deploy a damaged journal recorded, or None when it had made no before-deploy tag."""
    recorded = {r.tag for r in records.read(env) if r.kind == "deploy" and r.tag}      # finished, ok or not
    tags = repo.tags(f"{env.name}-before-deploy-*")
    tag = j.get("tag") or j.get("point")
    found = next((t for t in tags if t[0] == tag), None) if tag else None
    if found is None and not j.get("from"):
        found = tags[0] if tags and tags[0][0] not in recorded else None
        if found is None:
            return None
    commit = j.get("from") or (found[1] if found else "")
    rebuilt = {**j, "op": "deploy", "from": commit, "step": DAMAGED_STEP}
    if found:
        rebuilt["tag"] = found[0]
    if not j.get("backup"):
        since = instant(found[2]) - PRE_DEPLOY_SLACK if found else 0.0
        made = [b for b in backups.list_backups(env.backup_dir)
                if b.reason == "pre-deploy" and b.commit == commit and instant(b.time) >= since]
        if made:
            rebuilt["backup"] = made[0].path
    if not rebuilt.get("target"):
        rebuilt.pop("target", None)
    return rebuilt


def unrecorded_rollback_tags(env) -> list:
    """Names of env's rolled-back tags newer than every record: a rollback that began and did not end."""
    log = records.read(env)
    named = ({getattr(r, "tag", None) for r in log}
             | {(getattr(r, "rollback", None) or {}).get("tag") for r in log})
    newest = max((instant(r.time) for r in log), default=0.0)
    return [t.name for t in marks.rolled_back_tags(env) if t.name not in named and instant(t.time) > newest]


def human_needed(config, env, where: str, why: str) -> DeployError:
    """Move the damaged journal aside (kept) so that the next command can run, and say what to do."""
    aside = Path(f"{where}.damaged-{utc_stamp()}")
    try:
        os.replace(where, aside)
    except OSError:
        aside = Path(where)
    return DeployError(f"the journal of an interrupted operation on {env.name} is damaged ({aside}, kept): {why}. "
                       "Look at what runs and pick the point to go to", EXIT_HUMAN,
                       command=script_command(config, "rollback.py", env.name, "--list"))


def _text(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def record_problems(env) -> list:
    """What status reports about env's records: damaged lines of its logs (file and line), and the
    disagreements of its bad log with its rolled-back tags (marks.disagreements)."""
    said = []
    for log in (deploy_log(env), verified_log(env.name, env.state_dir)):
        said += [f"{d.describe()}: it is not read; the records around it are" for d in log.scan().damage]
    return said + marks.disagreements(env)
