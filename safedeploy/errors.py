"""The one error type for the user's mistakes and the world's refusals."""

EXIT_OK = 0
EXIT_FAILED = 1        # failed; everything is back as it was
EXIT_USAGE = 2         # usage or configuration error
EXIT_LOCKED = 3        # another operation holds the env's lock
EXIT_HUMAN = 4         # failed and could not restore: a human is needed


class DeployError(Exception):
    """A refusal with a one-line message and the exit code that goes with it."""

    def __init__(self, message, code=EXIT_FAILED):
        super().__init__(message)
        self.code = code


def usage_error(message):
    return DeployError(message, EXIT_USAGE)
