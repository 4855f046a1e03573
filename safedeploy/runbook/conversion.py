"""The conversion: an env that runs from its work tree, onto releases and socket units (CONVERSION).

convert_env(env, conversion, out) carries out a conversion plan (safedeploy.convert.plan): build the first
release (BEFORE: nothing live changes), then the one short switch-over (install the units, stop, move the
data into shared/, switch, restart, health); on any failure every move is put back (exit 1), or, when putting
back fails too, EXIT_HUMAN with the command to run. Its report goes to out."""

from dataclasses import dataclass, field

from .. import convert, releases, replica, unitfiles, units
from ..errors import EXIT_HUMAN, DeployError, after_undo, describe_failure
from ..journals import ConversionJournal
from ..output import Output
from ..runner import AFTER, BEFORE, Operation, Step, execute
from .bringup import Run, bring_up_steps, start_probe, stop_probe


# -- conversion: an env that runs from its work tree, onto releases and socket units ----------------
@dataclass
class ConversionRun(Run):
    """What a conversion carries from step to step."""
    env: object
    conversion: object
    saved: object = None
    modes: dict = field(default_factory=dict)
    first: object = None
    moves: object = field(default_factory=convert.Moves)
    held_by_socket: bool = False
    made_root: bool = False
    watch_seconds: float = 0
    revision: object = None
    repo: object = None

    @property
    def expect(self):
        return self.first.commit if self.first else None


def build_first(run):
    run.first = releases.build(run.env, run.conversion.repo, run.conversion.commit, run.out.say)
    run.journal.first = run.first.id
    run.journal.save()


def finish_conversion(run):
    units.release_holder(run.env.unit)
    replica.resume(run.env, swapped=False)     # the replicator restarts on the database's new path
    stop_probe(run)


def conversion_steps():
    restart, health = bring_up_steps()[:2]
    return [
        Step("build", BEFORE, build_first,
             lambda c: f"build {c.conversion.commit[:12]} (what runs) as the first release in "
                       f"{c.env.releases_root / 'releases'}", when=lambda c: c.conversion.converting),
        Step("units", AFTER, convert.install_units,
             lambda c: f"install the unit files (diff above) and enable {unitfiles.socket_name(c.env.unit)}, the app serving"),
        Step("stop", AFTER, lambda c: (start_probe(c), convert.stop_for_move(c)),
             lambda c: f"stop {c.env.unit}; the moment the port is free {unitfiles.socket_name(c.env.unit)} listens "
                       "(requests wait in its queue)"),
        Step("data", AFTER, lambda c: convert.move_data(c.conversion.pairs, c.moves),
             lambda c: f"rename the untracked data into {c.env.releases_root / 'shared'}",
             when=lambda c: c.conversion.converting),
        Step("switch", AFTER, lambda c: releases.switch(c.env, c.first),
             lambda c: f"point {c.env.current_link} at the first release", when=lambda c: c.conversion.converting),
        restart, health,
        Step("finish", AFTER, finish_conversion,
             lambda c: f"{unitfiles.socket_name(c.env.unit)} activates {c.env.unit} again"),
    ]


CONVERSION = conversion_steps()
CONVERSION_BEFORE = {s.name for s in CONVERSION if s.phase == BEFORE}


def conversion_failed_before(run, step, exc):
    convert.remove_layout(run.env, run.first)
    convert.discard(run)
    raise after_undo(exc, f"converting {run.env.name} failed at {step} ({describe_failure(exc)}); nothing live was "
                          f"changed: the built release is removed, {run.env.unit} runs as it ran") from None


def conversion_failed_after(run, step, exc):
    env, converting = run.env, run.conversion.converting
    why = describe_failure(exc)
    try:
        convert.put_back(env, run.conversion.files, run.saved, run.modes, run.first, run.moves)
        convert.discard(run)
    except DeployError as back_exc:
        raise DeployError(f"{'converting' if converting else 'installing the socket units for'} {env.name} failed "
                          f"({why}) and putting it back failed too ({back_exc}). The old unit files are in "
                          f"{run.saved}. Look with: systemctl --user status {env.unit}", EXIT_HUMAN,
                          command=f"systemctl --user restart {env.unit}") from None
    raise after_undo(exc, f"converting {env.name} failed at {step} ({why}); everything is put back: the old unit "
                          f"files, the data in {env.path}, and {env.unit} restarted from its work tree" if converting else
                     f"installing the socket units failed at {step} ({why}); the old unit files are back and "
                     f"{env.unit} was restarted as it was") from None


def conversion_operation():
    return Operation("convert", CONVERSION, conversion_failed_before, conversion_failed_after,
                     journal=lambda c: ConversionJournal(saved=str(c.saved), commit=c.conversion.commit,
                                                         converting=c.conversion.converting, made_root=c.made_root,
                                                         pairs=[[str(a), str(b)] for a, b in c.conversion.pairs]))


def convert_env(env, conversion, out: Output):
    """Carry out a conversion plan (convert.plan): build the first release, then the one short switch-over
    (what it says goes to out); on any failure every move is put back. Returns the first release (None:
    only the units changed)."""
    run = ConversionRun(env=env, conversion=conversion, repo=conversion.repo,
                        made_root=not env.releases_root.exists(), out=out)
    run.saved, run.modes = convert.save_unit_files(env, conversion.files)
    try:
        execute(conversion_operation(), run, env)
    finally:
        stop_probe(run)
    convert.report(env, conversion, run, out.say)
    return run.first

