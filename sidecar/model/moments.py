"""Moments and spans of time as people type them on a command line or in a form: `--since 29d`,
`--until 2025-02-01`, `--signals-retention 730d`."""

from __future__ import annotations

import datetime
import re
import time

from sidecar.model.errors import SourceError

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_UNITS_NS = {"ms": 10**6, "s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9, "d": 86400 * 10**9,
             "w": 7 * 86400 * 10**9}


def duration_ns(text: str) -> int | None:
    """`29d`, `6h`, `90m`, `30s`, `2w`, `500ms` as nanoseconds; None if it is not one."""
    match = _DURATION.fullmatch(text.strip())
    return int(float(match.group(1)) * _UNITS_NS[match.group(2)]) if match else None


def parse_moment(text: str, now_ns: int | None = None) -> int:
    """A --since/--until value as Unix nanoseconds: an RFC 3339 timestamp
    (2025-02-01T09:30:00Z, or with +02:00), a date (midnight UTC), or a duration before now
    (29d, 6h, 90m, 30s, 2w). SourceError says what is accepted."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    ago = duration_ns(text)
    if ago is not None:
        return now_ns - ago
    try:
        moment = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        moment = None
    if moment is not None and moment.tzinfo is None and len(text.strip()) == 10:
        moment = moment.replace(tzinfo=datetime.timezone.utc)  # a bare date
    if moment is None or moment.tzinfo is None:
        raise SourceError(
            f"invalid time {text!r}: expected an RFC 3339 timestamp with a time zone "
            "(2025-02-01T09:30:00Z), a date (2025-02-01, UTC), or a duration before now "
            "(29d, 6h, 90m, 30s)")
    epoch = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
    delta = moment - epoch
    return (delta.days * 86400 + delta.seconds) * 10**9 + delta.microseconds * 1000
