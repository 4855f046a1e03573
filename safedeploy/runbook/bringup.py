"""The bring-up the deploy, the rollback and the conversion share, and the context every run carries.

bring_up_steps(): restart (or hand over between the two slots), health, watch, revision, as Steps. The run's
context (a Run subclass) says: env, expect (the commit the new process must name, releases), watch_seconds,
revision (the commit REVISION records, in place), quick_stop (a failed release being replaced: its stop is
bounded). Run holds what the runner and the bring-up keep on any run, and out, the Output the run's lines go
to (made by the script; safedeploy.output). The probe (start_probe/stop_probe) measures what the switch costs
users from just before it until health and the watch are done; stop_probe is safe to call again."""

from dataclasses import dataclass
from typing import Any, Protocol

from .. import restart, unitfiles, units
from ..output import PLAIN, Output
from ..probe import Probe
from ..runner import AFTER, Step

QUICK_STOP = 5.0        # seconds a failed release may take to stop when it is rolled back, then it is killed


# -- the bring-up: deploy, rollback and conversion ---------------------------------------------------
def bring_up_steps():
    """restart (or hand over), health, watch, revision. The ctx says: env, expect (the commit the new
    process must name, releases), watch_seconds, revision (the commit REVISION records, in place),
    quick_stop (a failed release being replaced: its stop is bounded)."""
    return [
        Step("restart", AFTER, restart_step, restart_detail),
        Step("health", AFTER, lambda c: setattr(c, "health", restart.wait_until_healthy(c.env, c.expect, c.started)),
             lambda c: f"wait up to {c.env.health_timeout:g}s for {c.env.health_url} to answer 2xx/3xx from the unit's "
                       "own process" + (f" naming {c.expect[:12]} at /_deploy/status" if c.expect else "")),
        Step("watch", AFTER, lambda c: setattr(c, "watched", restart.watch(
                c.env, c.watch_seconds, c.out.countdown(f"watching {c.env.name}"))),
             lambda c: f"watch for {c.watch_seconds:g}s: health and the unit (same process, no restart); a failure "
                       "rolls back",
             when=lambda c: c.watch_seconds),
        Step("revision", AFTER, lambda c: restart.write_revision(c.env, c.repo, c.revision),
             lambda c: f"write {c.env.path / 'REVISION'} ({c.revision[:12]})",
             when=lambda c: c.revision is not None),
    ]


class BringingUp(Protocol):
    """What the bring-up reads and writes on a run's context (DeployRun, RollbackRun, ConversionRun)."""
    quick_stop: float | None
    started: dict | None
    probe: Probe | None

    @property
    def env(self) -> Any: ...


def restart_step(c: BringingUp) -> None:
    """The restart (or handover), measured: the probe starts just before it (when a stop before it has not
    started it already), and the restart counters it leaves are what the health step counts from."""
    start_probe(c)
    c.started = units.restart(c.env.unit, c.quick_stop)


def start_probe(run: BringingUp) -> None:
    """From here until health is confirmed (and through the watch), the operation measures what the switch
    costs users (safedeploy.probe); stop_probe ends it on every path out."""
    if run.probe is None:
        run.probe = Probe(run.env.health_url).start()


def stop_probe(run: BringingUp) -> dict | None:
    """The probe's tally ({"requests", "refused", "errors", "slowest_s"}), or None when it never started.
    Safe to call again: the same tally."""
    return run.probe.stop() if run.probe is not None else None


def restart_detail(c):
    """The restart as the dry run and the plans say it: after a stop-first stop or a restore's, the socket
    is held (units.hold), and the restart starts the app and gives the socket back to it (units.restart_held)."""
    plan = getattr(c, "plan", None)
    held = ((plan is not None and plan.migration_mode == "stop-first") or
            (getattr(c, "restore_db", False) and units.restart_method(c.env.unit) != "plain"
             and units.state(unitfiles.socket_name(c.env.unit)).is_active))
    if held and getattr(plan, "retry_after", None) is not None:       # the 503 listener goes first
        return f"give {unitfiles.socket_name(c.env.unit)} back to the app and start {c.env.unit}"
    if held:
        return (f"start {c.env.unit} (it answers the requests that waited), then give "
                f"{unitfiles.socket_name(c.env.unit)} back to the app")
    return units.describe_restart(c.env.unit)


@dataclass(kw_only=True)
class Run:
    """What the runner and the bring-up keep on any run: the step clock and journal (set by the runner),
    the health answer, the seconds watched, how long a process being replaced may take to stop, the
    restart counters the tool's own start left (health counts restarts from them), and the probe."""
    quick_stop: float | None = None
    started: dict | None = None
    probe: Probe | None = None
    health: object = None
    watched: float = 0.0
    clock: object = None
    journal: object = None
    out: Output = PLAIN             # where the run's own lines go: the script's cli.output()



def current_unit_file(env):
    return units.state(env.unit).fragment_path or None

