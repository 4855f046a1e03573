"""What the recovery does with records that are damaged: a torn journal, damaged log lines.

A journal is written whole (temp file, fsync, rename, its checksum inside), so a damaged one means the
disk or a hand damaged it; it is never read as "nothing happened". journals.read gives a DamagedJournal
with the fields that are still whole, and `rebuild` turns that into the typed journal the recovery acts
on, on the safe side (an operation whose journal is damaged is taken as having changed things):

- a deploy (or an operation whose kind cannot be read): undone to its before-deploy point. The point
  is the journal's `tag`/`from` when whole, else the newest `ENV-before-deploy-*` tag that no deploy
  record names (the tag a deploy makes before it changes anything: a deploy that did not make one had
  changed nothing). Its database copy: the journal's `backup`, else the pre-deploy backup of that
  commit made after the tag;
- a rollback whose point (`commit`) is whole: finished, as from an intact journal (its database
  decision `restore_db` and `db_only` as the text still shows them, else no);
- a rehearsal or a drill: cleaned up as from an intact journal (its scratch folder when still shown);
- anything else that may have changed things (a conversion, a rollback whose point cannot be read, a
  kind of operation this version does not know, a rolled-back tag no rollback record names): the
  journal is moved aside, kept, and the recovery stops with exit 4 and what to run.

`repair_records` sets aside the damaged lines of the env's logs and writes back the bad marks only a
tag still holds (marks.repair), so that status and the next decisions read whole records again.
"""

import dataclasses
import os
from pathlib import Path

from . import backups, integrity, marks, records
from .commandline import script_command
from .errors import EXIT_HUMAN, DeployError
from .journals import (DamagedJournal, DeployJournal, DrillJournal, Op, OpJournal, RehearsalJournal,
                       RollbackJournal)
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


def rebuild(config, env, repo, j: DamagedJournal, say) -> OpJournal:
    """The journal the recovery acts on, from a damaged one (see the module). Raises DeployError (exit 4)
    where what was under way cannot be read well enough to finish or undo it."""
    op = j.op
    say(f"recovering: the journal {j.path} is damaged ({j.why}); what it still shows: {j.shows()}")
    if op is Op.ROLLBACK and j.commit:
        return RollbackJournal(command=j.command, started=j.started, step=DAMAGED_STEP, point=j.point,
                               commit=j.commit, restore_db=bool(j.restore_db), db_only=bool(j.db_only),
                               release=j.release, backup=j.backup, from_=j.from_, file=j.file)
    if op is Op.UNKNOWN and j.said_op:
        why = f"it names a kind of operation this version does not know ({j.said_op})"
    elif op in (Op.DEPLOY, Op.UNKNOWN):
        rebuilt = deploy_journal(env, repo, j)
        if rebuilt:
            return rebuilt
        if op is Op.DEPLOY:             # no tag of its own: it had changed nothing live
            return DeployJournal(command=j.command, started=j.started, step=None, target=j.target, from_=j.from_,
                                 file=j.file)
        pending = unrecorded_rollback_tags(env)
        if not pending:
            return dataclasses.replace(j, step=None)
        why = f"the tag {pending[0]} shows a rollback that no record says ended"
    elif op is Op.REHEARSE:
        return RehearsalJournal(command=j.command, started=j.started, step=j.step, scratch=j.scratch,
                                commit=j.commit, file=j.file)
    elif op is Op.DRILL:
        return DrillJournal(command=j.command, started=j.started, step=j.step, scratch=j.scratch, point=j.point,
                            file=j.file)
    else:
        why = f"the interrupted {op} cannot be read well enough to finish or undo it"
    raise human_needed(config, env, j.path, why)


def deploy_journal(env, repo, j: DamagedJournal) -> DeployJournal | None:
    """The undo of a deploy a damaged journal recorded, or None when it had made no before-deploy tag."""
    recorded = {r.tag for r in records.read(env) if r.kind == "deploy" and r.tag}      # finished, ok or not
    tags = repo.tags(f"{env.name}-before-deploy-*")
    tag = j.tag or j.point
    found = next((t for t in tags if t[0] == tag), None) if tag else None
    if found is None and not j.from_:
        found = tags[0] if tags and tags[0][0] not in recorded else None
        if found is None:
            return None
    commit = j.from_ or (found[1] if found else "")
    rebuilt = DeployJournal(command=j.command, started=j.started, step=DAMAGED_STEP, target=j.target or None,
                            from_=commit, previous_release=j.previous_release, release=j.release,
                            tag=found[0] if found else j.tag, backup=j.backup, file=j.file)
    if not rebuilt.backup:
        since = instant(found[2]) - PRE_DEPLOY_SLACK if found else 0.0
        made = [b for b in backups.list_backups(env.backup_dir)
                if b.reason == "pre-deploy" and b.commit == commit and instant(b.time) >= since]
        if made:
            rebuilt.backup = made[0].path
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


def record_problems(env, marks_too: bool = True) -> list:
    """What status reports about env's records: damaged lines of its logs (file and line), and the
    disagreements of its bad log with its rolled-back tags (marks.disagreements). marks_too=False while
    a deploy, rollback or conversion holds the env's lock (Holder.changes_live): a rollback tags first and
    records its mark last, so in between a tag without its mark is the rollback under way, not a lost mark."""
    said = []
    for log in (deploy_log(env), verified_log(env.name, env.state_dir)):
        said += [f"{d.describe()}: it is not read; the records around it are" for d in log.scan().damage]
    return said + (marks.disagreements(env) if marks_too else [])
