"""The one error type for the user's mistakes and the world's refusals, and the exit codes.

A DeployError is one line (its message) and the exit code that goes with it, and it declares what
else the error boundary (cli.run) and the alerts need: `output`, lines of a command's or the app's
output shown under the message; `evidence`, a file kept as it was found (a database SQLite cannot
read); `command`, the exact command to run next (every exit 4 has one: it ends the message, and
the needs-human alert carries it).
"""

EXIT_OK = 0
EXIT_FAILED = 1        # failed; everything is back as it was
EXIT_USAGE = 2         # usage or configuration error
EXIT_LOCKED = 3        # another operation holds the env's lock
EXIT_HUMAN = 4         # failed and could not restore: a human is needed


class DeployError(Exception):
    """A refusal with a one-line message and the exit code that goes with it."""

    def __init__(self, message, code=EXIT_FAILED, output="", evidence=None, command=None):
        if command and not message.rstrip().endswith(command):
            message = f"{message.rstrip().rstrip('.')}; then run: {command}"
        super().__init__(message)
        self.code = code
        self.output = output or ""
        self.evidence = evidence
        self.command = command


def usage_error(message):
    return DeployError(message, EXIT_USAGE)


def after_undo(exc, message, code=EXIT_FAILED):
    """What to raise once the undo for exc has run: for the tool's own errors and interruptions, a
    DeployError with message (exit code), keeping exc's output; for anything else (a bug) exc itself,
    carrying message as `undone`, so that the error boundary says what was put back before the bug's
    traceback."""
    if isinstance(exc, (DeployError, KeyboardInterrupt)):
        return DeployError(message, code, output=getattr(exc, "output", ""))
    exc.undone = message
    return exc


def describe_failure(exc):
    """One line for what failed: the tool's message, an interruption, or a bug (its type and text)."""
    if isinstance(exc, DeployError):
        return str(exc)
    if isinstance(exc, KeyboardInterrupt):
        return str(exc) if str(exc).startswith("interrupted") else "interrupted by Ctrl-C"
    return f"an unexpected {type(exc).__name__}: {exc} (a bug; its traceback follows)"


class LockLost(DeployError):
    """A lock this process held was removed or replaced under it: another operation may be running."""

    def __init__(self, message: str, env: str):
        super().__init__(message, EXIT_HUMAN)
        self.env = env
