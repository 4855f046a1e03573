"""One `status.py --alert` at a time per config.

Two timers, or a run that outlasts the timer's period (a slow webhook), would each read the last
state, decide, send and remember: the same alert sent two or three times. The part that reads the
remembered state, sends, and remembers runs under an flock of `status-alert.lock` in each state
folder of the config (sorted, so two runs never wait on each other crosswise). A second run waits
for it (ALERT_WAIT at most): then it reads what the first remembered and sends only what is still
news; past the wait, it sends nothing and says so (the run that holds the lock sends).
"""

import contextlib
import fcntl
import os
import time
from pathlib import Path

from .files import disk_error, flock_by, make_private_dir
from .state import open_lock_file

ALERT_WAIT = 20.0           # seconds: longer than one delivery (8 s webhook + 10 s command) takes
LOCK_NAME = "status-alert.lock"


def lock_paths(config) -> list:
    return sorted({Path(env.state_dir) / LOCK_NAME for env in config.envs.values()})


@contextlib.contextmanager
def one_at_a_time(config, wait: float = ALERT_WAIT):
    """Yields True while this run holds every state folder's alert lock, False when another run held one
    past the wait (nothing is held then)."""
    fds = []
    try:
        deadline = time.monotonic() + wait
        for path in lock_paths(config):
            try:
                make_private_dir(path.parent)
                fd = open_lock_file(path, os.O_RDWR | os.O_CREAT)
            except OSError as exc:
                raise disk_error(exc, path) from exc
            fds.append(fd)
            if not flock_by(fd, fcntl.LOCK_EX, deadline):
                yield False
                return
        yield True
    finally:
        for fd in fds:
            os.close(fd)            # closing drops the flock
