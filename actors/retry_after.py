"""When may a rate-limited target be tried again? Parsed from the upstream's response headers.

Understands, in order of precedence: `retry-after-ms`; `retry-after` as integer seconds or an
HTTP-date; OpenAI's `x-ratelimit-reset-{requests,tokens}` (`1m30s`, `250ms`, `6m0s`); Anthropic's
`anthropic-ratelimit-*-reset` (RFC 3339). Garbage and negative values are ignored, a date in the
past means 0. Pure functions: the caller passes the wall-clock time and applies the cap.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from email.utils import parsedate_to_datetime

_GO_DURATION = re.compile(
    r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?!s))?(?:(\d+(?:\.\d+)?)s)?(?:(\d+(?:\.\d+)?)ms)?$"
)
_OPENAI_RESETS = ("requests", "tokens")
_ANTHROPIC_RESETS = ("requests", "tokens", "input-tokens", "output-tokens")


def _seconds(value: str) -> float | None:
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        return None
    if seconds != seconds or seconds < 0 or seconds == float("inf"):  # NaN, negative, inf
        return None
    return seconds


def _http_date(value: str, wall_now: float) -> float | None:
    try:
        when = parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - wall_now)


def _go_duration(value: str) -> float | None:
    """`1m30s`, `250ms`, `6m0s`, `1.5s`, `2h` (the format of OpenAI's reset headers)."""
    value = value.strip()
    m = _GO_DURATION.match(value)
    if not value or not m or not any(m.groups()):
        return _seconds(value)
    h, mins, s, ms = (float(g) if g else 0.0 for g in m.groups())
    return h * 3600 + mins * 60 + s + ms / 1000


def _rfc3339(value: str, wall_now: float) -> float | None:
    try:
        when = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - wall_now)


def parse_retry_after(headers: Mapping[str, str], wall_now: float) -> float | None:
    """Seconds to wait before trying again, or None when the headers say nothing usable.

    `headers` has lower-case names. `wall_now` is `time.time()` (HTTP dates are wall-clock).
    """
    if (ms := headers.get("retry-after-ms")) is not None and (v := _seconds(ms)) is not None:
        return v / 1000
    if (ra := headers.get("retry-after")) is not None:
        v = _seconds(ra)
        if v is None and not ra.strip().lstrip("-").replace(".", "").isdigit():
            v = _http_date(ra, wall_now)
        if v is not None:
            return v
    resets = _resets(headers, wall_now)
    if not resets:
        return None
    exhausted = [v for v, empty in resets if empty]
    # The limit that is at zero is the one that refused us; without that hint, wait for all.
    return max(exhausted) if exhausted else max(v for v, _ in resets)


def _resets(headers: Mapping[str, str], wall_now: float) -> list[tuple[float, bool]]:
    """Each rate-limit reset the headers give: (seconds, whether that limit is exhausted)."""
    resets: list[tuple[float, bool]] = []
    for kind in _OPENAI_RESETS:
        raw = headers.get(f"x-ratelimit-reset-{kind}")
        if raw is not None and (v := _go_duration(raw)) is not None:
            resets.append((v, headers.get(f"x-ratelimit-remaining-{kind}", "").strip() == "0"))
    for kind in _ANTHROPIC_RESETS:
        raw = headers.get(f"anthropic-ratelimit-{kind}-reset")
        if raw is not None and (v := _rfc3339(raw, wall_now)) is not None:
            remaining = headers.get(f"anthropic-ratelimit-{kind}-remaining", "").strip()
            resets.append((v, remaining == "0"))
    return resets
