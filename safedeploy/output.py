"""Where the package's lines go: an Output (say, warn, err, countdown) that a script makes and a run carries.

The package never prints through the scripts' module and never imports cli: what an operation says while it
runs (a build's progress, a warning, the report of a deploy's automatic rollback, the watch's countdown) goes
to the Output its run carries (runbook's Run, rehearsal's Run), made by the script that started it.

- say(text): a line on stdout.
- err(text): a line on stderr, as given ("error: ..." or "warning: ..." included by the caller).
- warn(text): err("warning: " + text).
- countdown(label): a show(seconds_left) for a wait, or None (not on a terminal).
- mark(ok): PASS or FAIL (painted on a terminal by the scripts' Output).
- full_output(env): "(full output: PATH)" naming env's log of this run, or "".

The scripts' Output is cli.output(): cli.say and cli.err, so every line is redacted, coloured on a terminal,
counted for the alert and written to the operation's log (cli.emit, safedeploy.oplog). PLAIN, the default
of a run nobody gave one, prints redacted lines to stdout and stderr and keeps no log: for a caller that is
not a script (a bench, a stand-in context that only describes steps)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

from . import redaction

Show = Callable[[float], None]


def plain_say(text: str = "") -> None:
    print(redaction.redact(text), flush=True)


def plain_err(text: str) -> None:
    print(redaction.redact(text), file=sys.stderr, flush=True)


def no_countdown(label: str) -> Show | None:
    return None


def plain_mark(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def no_log(env: str | None = None) -> str:
    return ""


@dataclass(frozen=True)
class Output:
    """Where an operation's lines go: the scripts' cli.output(), or PLAIN (redacted prints, no log)."""
    say: Callable[[str], None] = plain_say
    err: Callable[[str], None] = plain_err
    countdown: Callable[[str], Show | None] = no_countdown
    mark: Callable[[bool], str] = plain_mark
    full_output: Callable[[str | None], str] = no_log

    def warn(self, text: str) -> None:
        self.err(f"warning: {text}")


PLAIN = Output()
