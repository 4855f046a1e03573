"""The runner: an operation is a list of named steps, and this is the one place that runs them.

Each Step has a name (the journal's, the deploy log's "steps", the fault switch's and the dry run's),
a phase, what it does (run) and how it describes itself with the real paths and commands (detail),
and whether it applies to this run at all (when). The dry run prints exactly the steps the real run
takes, from the same list (describe); the fault matrix kills the process as it enters each of them
(state.inject_fault, in the step clock).

The failure rule is the runner's: a step of phase BEFORE fails while nothing live has changed yet,
so the operation's before_failed() cleans up what it made and reports (exit 1); a step of phase
AFTER fails once something live has changed, so after_failed() puts it back (a deploy rolls back)
and reports, or says exactly what to run (exit 4). Any exception goes that way, a bug included
(the report is made, then the bug keeps its traceback). A shielded operation (a rollback) ignores
SIGINT, SIGTERM and SIGHUP while it runs: a half rollback helps nobody; a kill -9 leaves its
journal, and the next command finishes it.
"""

import signal
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

from .commandline import script_command
from .journals import OpJournal, journal_path
from .state import StepClock

BEFORE, AFTER = "before", "after"


@dataclass(frozen=True)
class Step:
    """One step of an operation: its phase, what it runs, and what the plan says of it."""
    name: str
    phase: str
    run: Callable                   # run(ctx)
    detail: Callable                # detail(ctx) -> str
    when: Callable | None = None    # when(ctx) -> bool, asked as the step comes up; None: always

    def applies(self, ctx):
        return self.when is None or bool(self.when(ctx))


@dataclass
class Operation:
    """An operation's steps, what undoes a failure before anything live changed and after, and its journal."""
    name: str                       # the journal's "op" and the fault switch's OP
    steps: list
    before_failed: Callable         # before_failed(ctx, step name, exc): raises (exit 1)
    after_failed: Callable          # after_failed(ctx, step name, exc): returns the result, or raises
    journal: Callable[[Any], OpJournal]     # journal(ctx): the operation's journal as it starts (journals.py)
    shielded: bool = False


SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextmanager
def signals_deferred():
    """A few lines that must not be cut in half (writing a record): SIGINT, SIGTERM and SIGHUP wait
    until they are done, then arrive as usual (as KeyboardInterrupt, past the block)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)


def planned(operation, ctx):
    """The steps this run takes, in order."""
    return [s for s in operation.steps if s.applies(ctx)]


def describe(operation, ctx):
    """The dry run: [{"name", "detail"}] of exactly the steps the real run takes."""
    return [{"name": s.name, "detail": s.detail(ctx)} for s in planned(operation, ctx)]


def execute(operation, ctx, env):
    """Run the operation's steps on ctx under a journal of env's; return None when every step ran, else
    what after_failed returned. ctx.clock is the step clock (its seconds: the log's "steps")."""
    journal = operation.journal(ctx)
    journal.start(journal_path(env.state_dir, env.name))
    config = getattr(ctx, "config", None)
    ctx.clock = StepClock(journal, operation.name,
                          look_with=lambda name: script_command(config, "status.py", name))
    ctx.journal = journal
    previous = ({s: signal.signal(s, signal.SIG_IGN) for s in SIGNALS}
                if operation.shielded else {})
    try:
        phase = BEFORE
        try:
            for step in operation.steps:
                if not step.applies(ctx):       # asked as it comes: a step may depend on what ran before it
                    continue
                phase = step.phase
                with ctx.clock.step(step.name):
                    step.run(ctx)
        except BaseException as exc:            # the rule: before a change, clean up; after, put back
            if phase == BEFORE:
                operation.before_failed(ctx, ctx.clock.current, exc)
                raise
            return operation.after_failed(ctx, ctx.clock.current, exc)
        return None
    finally:
        journal.finish()
        for s, handler in previous.items():
            signal.signal(s, handler)
