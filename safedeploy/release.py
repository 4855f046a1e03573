"""Moving an env between releases, shared by deploy and rollback: restart the unit,
wait for health, write REVISION."""

import json
import time

from . import health, units
from .errors import DeployError
from .files import write_atomic
from .state import now_iso


def restart_unit(env):
    units.restart(env.unit)


def wait_until_healthy(env, expect_commit=None):
    """Poll the env's health URL until healthy; raise with the unit's state and journal if not.

    An answer counts only when it is the unit's own: the unit active (running) and not restarted by
    systemd since this restart (a stray server on the port answers while the unit crash-loops on
    EADDRINUSE), and, with expect_commit, the release's /_deploy/status (when the app serves it)
    naming that commit."""
    def still_starting():
        st = units.serving_state(env.unit)  # a crash shows at once as auto-restart: stop waiting then
        return st.active in ("active", "activating", "reloading") and st.sub != "auto-restart"

    def own_answer(result):
        st = units.serving_state(env.unit)
        if st.active != "active" or st.sub not in ("running", "listening") or st.restarts:
            return (f"{st.name} is {st.active} ({st.sub}, {st.restarts} automatic restart(s)): "
                    "something else answers on the port")
        owner = units.port_owner_problem(st.name, env.port, st.main_pid)
        if owner:
            return f"{owner}: something else answers on the port"
        if expect_commit:
            commit = health.served_commit(env.base_url)
            if commit and commit != expect_commit:
                return f"/_deploy/status names {commit[:12]}, not {expect_commit[:12]}: another process answers"
        return ""

    result, waited = health.wait_healthy(env.health_url, env.health_timeout, still_starting, confirm=own_answer)
    if not result.ok:
        st = units.serving_state(env.unit)
        raise DeployError(f"{st.name} did not turn healthy within {waited:.1f}s: {env.health_url} gave "
                          f"{result.describe()}; the unit is {st.active} ({st.sub})",
                          output="\n".join(units.journal_tail(st.name)))
    return result


def watch(env, seconds, show=None):
    """After the env turned healthy: keep checking for seconds that the serving unit stays active
    with the same main process and no automatic restart, and that health answers (two failed
    checks in a row: one slow answer on a busy host is not a failure). Raise DeployError on the
    first failure; show(seconds_left) is called about once a second (a countdown on a terminal)."""
    start = time.monotonic()
    first = units.serving_state(env.unit)
    failed_checks = 0
    while True:
        elapsed = time.monotonic() - start
        left = seconds - elapsed
        if left <= 0:
            return float(seconds)           # watched the whole configured time (a busy host overshoots it a little)
        if show:
            show(left)
        st = units.serving_state(env.unit)
        if not st.is_active or st.restarts or st.main_pid != first.main_pid or st.name != first.name:
            raise DeployError(f"watch: after {elapsed:.1f}s of {seconds:g}s, {st.name} is {st.active} ({st.sub}), "
                              f"main pid {st.main_pid} (was {first.main_pid}), {st.restarts} automatic restart(s)",
                              output="\n".join(units.journal_tail(st.name)))
        result = health.check(env.health_url, timeout=max(0.5, min(2.0, left)))
        failed_checks = 0 if result.ok else failed_checks + 1
        if failed_checks >= 2:
            raise DeployError(f"watch: after {elapsed:.1f}s of {seconds:g}s, {env.health_url} gave "
                              f"{result.describe()} twice in a row", output="\n".join(units.journal_tail(st.name)))
        time.sleep(max(0.0, min(1.0, left - 0.05)))


def write_revision(env, repo, commit):
    """REVISION in the work tree (commit, env, branch, time), kept out of git status."""
    repo.exclude("/REVISION")
    data = {"commit": commit, "env": env.name, "branch": env.branch, "time": now_iso()}
    write_atomic(env.path / "REVISION", json.dumps(data, indent=2) + "\n", mode=0o644)
