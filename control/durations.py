"""One parser for the durations people type: `600`, `90s`, `10m`, `2h`, `1d`, `1w`, `1h30m`.

Used by the admin API (override TTLs, `?since=`), the CLI (`--since`, `--ttl`) and the report.
Plain function, no dependency on any layer above it, so every layer can import it.
"""
from __future__ import annotations

import re
from datetime import datetime, timezone

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
EXAMPLES = "e.g. 600, 90s, 10m, 2h, 1d, 1h30m"


class DurationError(ValueError):
    """Not a duration; the message quotes the text and shows the accepted forms."""


def parse_duration(text: str | int | float) -> float:
    """Seconds of `text`: a number of seconds, or unit-suffixed parts (`1h30m`)."""
    if isinstance(text, bool):  # bool is an int: `true` in JSON is not a duration
        raise DurationError(f"{text!r} is not a duration ({EXAMPLES})")
    if isinstance(text, (int, float)):
        return float(text)
    s = str(text).strip()
    if _NUMBER.fullmatch(s):
        return float(s)
    parts = _PART.findall(s)
    if not parts or "".join(n + u for n, u in parts) != s:
        raise DurationError(f"{text!r} is not a duration ({EXAMPLES})")
    return sum(float(n) * UNITS[u] for n, u in parts)


def since_to_ts(since: str | None, now: float) -> float | None:
    """`since` as a unix time: a duration back from `now` (10m, 2h) or an ISO time; None for empty."""
    if not since:
        return None
    try:
        return now - parse_duration(since)
    except DurationError:
        pass
    try:
        dt = datetime.fromisoformat(since.replace("Z", "+00:00"))
    except ValueError:
        raise DurationError(f"{since!r} is neither a duration (10m, 2h) nor an ISO time") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()
