"""Times in the log: integer microseconds since the Unix epoch, UTC.

`recorded_at` is stored as an integer so that it hashes exactly and decodes fast; these helpers
convert it to and from ISO-8601 for people. A time written without a zone is taken as UTC.
"""

from __future__ import annotations

import datetime as dt
import re
import time

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def now_us() -> int:
    """The current wall-clock time in microseconds since the epoch."""
    return time.time_ns() // 1000


def to_iso(us: int) -> str:
    """`1700000000123456` -> `'2023-11-14T22:13:20.123456Z'`."""
    global _last
    second, micro = divmod(us, 1_000_000)
    last = _last  # one tuple, read and replaced whole: safe from any thread
    if last[0] != second:  # times come in runs within one second: format that once
        last = _last = (
            second,
            (_EPOCH + dt.timedelta(seconds=second)).isoformat(timespec="seconds")[:19],
        )
    return f"{last[1]}.{micro:06d}Z"


_last: tuple[int | None, str] = (None, "")


def to_datetime(us: int) -> dt.datetime:
    return _EPOCH + dt.timedelta(microseconds=us)


def parse_iso(text: str, name: str | None = None, *, lower: bool = False) -> int:
    """Parse an ISO-8601 time (zone optional, UTC if absent) into microseconds. Digits past
    the microsecond are cut off, which suits an upper bound or a moment; for a `lower` bound
    a time between two microseconds is taken up to the next (an event recorded at .933573
    is before .933573001).

    Raises ValueError with a message naming the text when it is not a time (or is out of
    range), after `name: ` where given: the option or field the text came from (`--at`).
    """
    where = f"{name}: " if name else ""
    raw = text.strip()
    try:
        value = dt.datetime.fromisoformat(raw.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"{where}{text!r} is not an ISO-8601 time (e.g. 2026-11-26T10:42:00Z)"
        ) from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    try:
        value.astimezone(dt.UTC)
    except OverflowError:
        raise ValueError(f"{where}{text!r} is out of range (years 1 to 9999, UTC)") from None
    delta = value - _EPOCH
    micros = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    fraction = _FRACTION.search(raw)
    if lower and fraction is not None and fraction.group(1)[6:].strip("0"):
        micros += 1
    return micros


# the seconds' fraction: the first digits after a . or , (2026-11-29T20:04:15.4271725Z, and
# the basic form 20261129T200415.4271725Z: ISO-8601 writes a fraction nowhere before it)
_FRACTION = re.compile(r"[.,](\d+)")
