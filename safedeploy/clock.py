"""Copies dated in the future: a host clock that was ahead when a copy was made, or was set back since.

A backup's time is the clock's when it was made. Dated ahead of now (past a slack), its age cannot
be told: it is never counted as the newest copy (so it neither passes nor fails a freshness check, and
a copy made now is the newest), and it is said, with what to run: a backup now, when no copy dated in
the past is fresh. It stays a copy like any other (listed, restorable by name, pruned by its date).
"""

from datetime import datetime, timezone

from .state import human_age, parse_time

FUTURE_SLACK = 300.0        # seconds a clock may be off before a copy's date is taken for the future


def seconds_ahead(time_text: str, now: datetime | None = None) -> float:
    """How far ahead of now a time is (0 or less: not ahead); 0 for a time that cannot be read."""
    when = parse_time(time_text or "")
    if when is None:
        return 0.0
    return (when - (now or datetime.now(timezone.utc))).total_seconds()


def split(found: list, now: datetime | None = None) -> tuple:
    """(copies dated in the past, copies dated in the future), each in the order given."""
    present = [b for b in found if seconds_ahead(b.time, now) <= FUTURE_SLACK]
    future = [b for b in found if seconds_ahead(b.time, now) > FUTURE_SLACK]
    return present, future


def future_note(future: list) -> str:
    b = future[0]
    more = f" (and {len(future) - 1} more)" if len(future) > 1 else ""
    ahead = human_age(seconds_ahead(b.time)).removesuffix(" ago")
    return (f"the backup {b.path}{more} is dated {b.time}, {ahead} in the future: this host's clock was ahead when it "
            "was made, or was set back since; its age cannot be told, so it is not counted as the newest copy")
