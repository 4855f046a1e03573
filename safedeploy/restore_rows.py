"""backup.py ENV --restore-rows COPY: the users' rows COPY holds that the live database lacks, put back in one
transaction verified before COMMIT (safedeploy.rowrestore), under the env's lock, and recorded in the
deploy log. The copy may be off-site only: it is fetched and verified first, like a rollback's. The script
shows the plan and asks (review); this module returns what was done, or raises."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

from . import offsite, records, rowrestore
from .catalogue import find_backup
from .commandline import script_command
from .errors import DeployError
from .points import backup_id
from .state import EnvLock


def copy_to_restore_from(config, env, wanted: str, say: Callable[[str], None]):
    """A local backup named by wanted, else this config's off-site copy of that name, fetched and verified."""
    try:
        return find_backup([env], wanted)
    except DeployError:
        copies, problem = offsite.copies_for(config, env)
        copy = next((c for c in copies if wanted in (c.name, c.file)), None)
        if copy is None:
            raise
        say(f"{copy.name} is off-site only; fetching {copy.file} (snapshot {copy.id[:8]})")
        return offsite.fetch_for(config, copy, env)


def compare(env, backup) -> rowrestore.Plan:
    try:
        return rowrestore.plan(env, backup.path, backup.sha256)
    except sqlite3.Error as exc:
        raise DeployError(f"cannot compare {backup.path} with {env.db}: {exc}; nothing was changed") from None


def put_back(config, env, backup, user: str, lock_wait: float, started: Callable[[], None],
             review: Callable[[rowrestore.Plan], bool]) -> tuple[rowrestore.Plan, rowrestore.Applied | None]:
    """Under env's lock: started(), the plan, review(plan) (shows it, asks; False: nothing is done), then
    the verified restore, recorded. (the plan, what was done or None)."""
    record = records.RowsRecord(env=env.name, user=user, copy=backup_id(backup))
    with EnvLock(env.state_dir, env.name, "restore-rows", wait=lock_wait):
        started()
        plan = compare(env, backup)
        if not review(plan):
            return plan, None
        try:
            done = rowrestore.apply(env, backup.path, backup.sha256)
        except (rowrestore.RestoreRefused, sqlite3.Error) as exc:
            record.result, record.error = "failed", str(exc)
            records.append(env, record)
            why = str(exc) if isinstance(exc, rowrestore.RestoreRefused) else \
                f"{exc}; the transaction was rolled back, nothing was changed"
            raise DeployError(f"rows of {Path(backup.path).name} not put back: {why}. Review them with: "
                              + script_command(config, "backup.py", env.name, "--restore-rows",
                                               backup_id(backup), "--sql")) from None
        record.result, record.restored, record.rekeyed = "ok", done.restored, done.rekeyed
        record.left_out = done.plan.left_out_total
        records.append(env, record)
    return plan, done
