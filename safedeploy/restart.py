"""Moving an env between releases, shared by deploy and rollback (safedeploy.releases builds and switches them): restart the unit,
wait for health, write REVISION."""

import json
import time

from . import decisions, health, processes, releases, units
from .errors import DeployError
from .files import write_atomic
from .state import now_iso


def restart_unit(env):
    """Restart the env's unit; {slot: NRestarts} once started (wait_until_healthy counts from there)."""
    return units.restart(env.unit)


def wait_until_healthy(env, expect_commit: str | None = None, since: dict[str, int] | None = None):
    """Poll the env's health URL until healthy; raise with the unit's state and journal if not.

    An answer counts only when it is the unit's own, the release's own process (decisions.answer_problem):
    the unit running; the port held by its main process (a stray server on the port answers while the unit
    crash-loops on EADDRINUSE); no automatic restart since the tool's own start (since: {slot: NRestarts}
    as units.restart left it; default: as found now), unless /proc shows the unit's process holding the
    port; its main process in the release `current` names (not the one being replaced, still stopping);
    and, with expect_commit, the release's /_deploy/status (when the app serves it) naming that commit."""
    since = units.restart_counts(env.unit) if since is None else since

    def still_starting():
        # a crash shows as auto-restart, or (the next start already under way) as a restart since the tool's
        # own start: stop waiting then, before systemd's start limit closes a socket unit's port
        st = units.serving_state(env.unit)
        return (st.active in ("active", "activating", "reloading") and st.sub != "auto-restart"
                and st.restarts <= since.get(st.name, 0))

    def own_answer(result):
        return decisions.answer_problem(answer_facts(env, units.serving_state(env.unit), since, expect_commit))

    result, waited = health.wait_healthy(env.health_url, env.health_timeout, still_starting, confirm=own_answer)
    if not result.ok:
        st = units.serving_state(env.unit)
        raise DeployError(f"{st.name} did not turn healthy within {waited:.1f}s: {env.health_url} gave "
                          f"{result.describe()}; the unit is {st.active} ({st.sub})",
                          output="\n".join(units.journal_tail(st.name)))
    return result


def answer_facts(env, st: units.UnitState, since: dict[str, int],
                 expect_commit: str | None = None) -> decisions.AnswerFacts:
    """The facts decisions.answer_problem judges, gathered from systemd and /proc (and /_deploy/status last,
    only when the rest found nothing wrong: it is one more request)."""
    problem, confirmed = processes.port_owner(st.name, env.port, st.main_pid)
    facts = decisions.AnswerFacts(unit=st.name, active=st.active, sub=st.sub,
                                  restarts_since_start=max(0, st.restarts - since.get(st.name, 0)),
                                  port_problem=problem, port_confirmed=confirmed,
                                  process_release=release_id(releases.serving(env, st.main_pid)),
                                  expected_release=release_id(releases.current(env)), expected_commit=expect_commit)
    if expect_commit and not decisions.answer_problem(facts):
        facts.served_commit = health.served_commit(env.base_url)
    return facts


def release_id(rel) -> str | None:
    return rel.id if rel is not None else None


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
        if (not st.is_active or st.restarts != first.restarts or st.main_pid != first.main_pid
                or st.name != first.name):
            raise DeployError(f"watch: after {elapsed:.1f}s of {seconds:g}s, {st.name} is {st.active} ({st.sub}), "
                              f"main pid {st.main_pid} (was {first.main_pid}), {st.restarts - first.restarts} automatic restart(s) "
                              "since the watch began",
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
