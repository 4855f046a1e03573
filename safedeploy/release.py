"""Moving an env between releases, shared by deploy and rollback: restart the unit,
wait for health, write REVISION."""

import json

from . import health, units
from .errors import DeployError
from .files import write_atomic
from .state import now_iso


def restart_unit(env):
    units.restart(env.unit)


def wait_until_healthy(env):
    """Poll the env's health URL until healthy; raise with the unit's state and journal if not."""
    def still_starting():
        st = units.state(env.unit)          # a crash shows at once as auto-restart: stop waiting then
        return st.active in ("active", "activating", "reloading") and st.sub != "auto-restart"

    result, waited = health.wait_healthy(env.health_url, env.health_timeout, still_starting)
    if not result.ok:
        st = units.state(env.unit)
        error = DeployError(f"{env.unit} did not turn healthy within {waited:.1f}s: {env.health_url} gave "
                            f"{result.describe()}; the unit is {st.active} ({st.sub})")
        error.output = "\n".join(units.journal_tail(env.unit))
        raise error
    return result


def write_revision(env, repo, commit):
    """REVISION in the work tree (commit, env, branch, time), kept out of git status."""
    repo.exclude("/REVISION")
    data = {"commit": commit, "env": env.name, "branch": env.branch, "time": now_iso()}
    write_atomic(env.path / "REVISION", json.dumps(data, indent=2) + "\n", mode=0o644)
