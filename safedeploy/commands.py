"""The env's pre_restart commands: argv lists run in the work tree, no shell, a timeout each."""

import os
import subprocess
from dataclasses import dataclass

from .errors import DeployError


@dataclass
class CommandFailure:
    argv: list
    why: str
    output: str


def run_all(argvs, cwd, timeout):
    """Run each argv in cwd; raise DeployError naming the first that fails, with its output."""
    for argv in argvs:
        failure = run_one(argv, cwd, timeout)
        if failure:
            tail = "\n".join(failure.output.splitlines()[-15:])
            error = DeployError(f"pre_restart command `{' '.join(argv)}` {failure.why}")
            error.output = tail
            raise error


BUILD_NICE = 10     # a build runs while the app serves: it yields the CPU to the app's workers


def run_one(argv, cwd, timeout, nice=0):
    try:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, errors="replace",
                              preexec_fn=(lambda: os.nice(nice)) if nice else None)
    except FileNotFoundError:
        return CommandFailure(argv, f"could not start: {argv[0]} not found (relative to {cwd})", "")
    except PermissionError:
        return CommandFailure(argv, f"could not start: {argv[0]} is not executable", "")
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return CommandFailure(argv, f"timed out after {timeout:g}s (command_timeout)", out)
    if proc.returncode != 0:
        return CommandFailure(argv, f"failed with exit {proc.returncode}", proc.stdout + proc.stderr)
    return None
