"""What every script shares: argument parsing, the error boundary, output, confirmation."""

import argparse
import os
import signal
import sys
from typing import Any

from . import alerts, oplog, redaction, unitenv
from . import config as configmod
from .commandline import command_line, python_word, script_command  # noqa: F401 (the scripts call cli.script_command)
from .errors import EXIT_FAILED, EXIT_HUMAN, EXIT_USAGE, DeployError, describe_failure, usage_error
from .output import Output


class Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line and exit 2."""

    def error(self, message):
        raise usage_error(f"{self.prog}: {message} (see --help)")


def parser(prog, description, examples):
    p = Parser(prog=prog, description=description,
               epilog="examples:\n" + "\n".join(f"  {line}" for line in examples),
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE",
                   help="config file (default: $DEPLOY_CONFIG, else your own ~/.config/safe-deploy/config.toml "
                        "($XDG_CONFIG_HOME/safe-deploy/...) when it exists, else config.toml beside the scripts)")
    return p


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP (a dropped SSH session), handled like Ctrl-C: the operation stops
    where it is and puts the env back as it was."""


def raise_interrupted(signum, frame):
    raise Interrupted(f"interrupted by {signal.Signals(signum).name}")


NICE_VARIABLE = "SAFE_DEPLOY_NICE"
DEFAULT_NICE = 10


def yield_cpu():
    """The tool's own work (Python, git, copies, builds) runs at a lower CPU priority than the app:
    on a small host a deploy must not slow the requests being served. The app's processes are
    started by systemd, not by this process, so they keep their own priority. SAFE_DEPLOY_NICE=0
    turns it off."""
    try:
        os.nice(max(0, min(19, int(os.environ.get(NICE_VARIABLE, DEFAULT_NICE)))))
    except (ValueError, OSError):
        pass


def run(main, nice=False, alert=None):
    """Call main(); turn a DeployError into one line on stderr (its output under it) and its exit code.
    Then, with [alerts] set: every exit 4 is a needs-human event, and an exit 1 of an operation named by
    alert (deploy, rollback, adopt, verify) an ALERT-failed one, carrying the error lines printed and the
    command the error names."""
    if nice:
        yield_cpu()
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, raise_interrupted)
    try:
        code = main()
    except DeployError as exc:
        code = report_error(exc)
    except KeyboardInterrupt as exc:
        err(f"error: {describe_failure(exc)}; nothing more was done" + (f" {full_output(RUN['env'])}"
                                                                       if oplog.active() else ""))
        code = 1
    except Exception as exc:
        # a bug: it keeps its traceback (Python prints it), after what the undo that ran for it did
        if getattr(exc, "undone", None):
            err(f"error: {exc.undone}")
        oplog.line(f"error: a bug: {type(exc).__name__}: {exc}")
        oplog.close_all(1)
        raise
    else:
        if code and oplog.active() and not RUN["named_log"]:
            err(full_output(RUN["env"]))        # failed without an exception (a deploy that rolled back)
    if RUN["looking"]:
        alert = None            # a --list, a --dry-run, a plan: nothing was attempted, so nothing failed
    send_alert(code, alert)
    oplog.close_all(code or 0)
    sys.exit(code or 0)


def report_error(exc: DeployError) -> int:
    """The error boundary's lines for a DeployError (its message, where the full output is, its output); its
    exit code."""
    where = full_output(RUN["env"])
    if exc.code == EXIT_HUMAN:      # its message ends with the command to run: the log's path follows it
        err(f"error: {exc}")
        if where:
            err(where)
    else:
        err(f"error: {exc}" + (f" {where}" if where else ""))
    if exc.output:
        err(exc.output)
    RUN["command"] = exc.command
    return exc.code


def log_operation(envs, op):
    """Keep this run's whole output (its lines and its commands' output) in a log per env (safedeploy.oplog);
    cli.run closes them with the exit code."""
    oplog.open_logs(envs, op)


def full_output(env=None):
    """`(full output: PATH)` for env's log of this run (the only one when env is None), or ""."""
    log = oplog.current(env) or oplog.current()
    if log is None:
        return ""
    RUN["named_log"] = True
    return f"(full output: {log.path})"


RUN: dict[str, Any] = {"config": None, "env": None, "errors": [], "command": None,   # what the alert needs
                       "looking": False, "named_log": False}


def only_looking():
    """This run only looks (a --list, a --dry-run): an exit 1 from it is never an operation that failed."""
    RUN["looking"] = True


def send_alert(code, alert):
    config = RUN["config"]
    if config is None or config.alerts is None or not (code == EXIT_HUMAN or (code == EXIT_FAILED and alert)):
        return
    message = " ".join(RUN["errors"][-3:]) or f"exit {code}"
    log = oplog.current(RUN["env"]) or oplog.current()
    event = alerts.event("needs-human" if code == EXIT_HUMAN else f"{alert}-failed", RUN["env"], message,
                         RUN["command"], log=log.path if log else None)
    for problem in alerts.send(config.alerts, event):
        emit(f"warning: {problem}", sys.stderr)


# -- output ---------------------------------------------------------------
def use_colour(stream):
    return stream.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


def paint(text, colour, stream=None):
    codes = {"green": "32", "red": "31", "yellow": "33", "bold": "1", "dim": "2"}
    if use_colour(stream or sys.stdout):
        return f"\033[{codes[colour]}m{text}\033[0m"
    return text


def mark(ok, stream=None):
    return paint("PASS", "green", stream) if ok else paint("FAIL", "red", stream)


def countdown(label):
    """A show(seconds_left) for waits: a line rewritten in place on a terminal, nothing otherwise."""
    if not sys.stderr.isatty():
        return None

    def show(left):
        print(f"\r{label}: {left:4.0f}s left ", end="", file=sys.stderr, flush=True)
        if left <= 1:
            print("\r" + " " * (len(label) + 14) + "\r", end="", file=sys.stderr, flush=True)
    return show


def say(text=""):
    emit(redaction.redact(text), sys.stdout)


def err(text):
    text = redaction.redact(text)           # never a secret on a terminal, in a cron mail or an alert
    if text.startswith("error"):             # the alert's message: errors, not the app's output that follows them
        RUN["errors"].append(text.removeprefix("error: "))
    emit(paint(text, "red", sys.stderr) if text.startswith("error") else text, sys.stderr)


def output() -> Output:
    """The Output the scripts give the package's runs (safedeploy.output): these say, err and countdown, so
    the package's lines are redacted, counted for the alert and kept in the operation's log like the scripts'.
    (backup.py's long flows take it too: its mark and full_output.)"""
    return Output(say=say, err=err, countdown=countdown, mark=mark, full_output=full_output)


def emit(text, stream):
    """Print a line. A reader that went away (`deploy.py prod | head -3`) never stops or fails an operation:
    what follows goes nowhere, and the exit code is the operation's. The operation's log gets it too."""
    oplog.line(text)
    try:
        print(text, file=stream, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)


# -- confirmation -----------------------------------------------------------
def confirm_env(env, yes, action):
    """For an env that guards promotion, the operator types its name; no terminal: --yes."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise usage_error(f"{action} on {env} needs confirmation and there is no terminal to ask: add --yes")
    try:
        answer = input(f"{action} on {paint(env, 'bold')}: type the env's name to go on: ").strip()
    except EOFError:
        answer = ""
    if answer != env:
        raise DeployError(f"not confirmed (typed {answer!r}, expected {env!r}); nothing was changed", EXIT_USAGE)


# -- commands an operator pastes: safedeploy/commandline (python_word, script_command, command_line) --


def load_config(args):
    RUN["config"] = configmod.load(args.config)
    RUN["env"] = getattr(args, "env", None)
    redaction.register_environment(os.environ)
    for env in RUN["config"].envs.values():         # what each unit's environment holds is never shown
        unitenv.register_quietly(env)
    return RUN["config"]


def user_name():
    return unitenv.user()
