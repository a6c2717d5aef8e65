"""The Retry-After parsing table: every header form, garbage, negatives, past dates."""

from __future__ import annotations

from email.utils import formatdate

import pytest

from actors.retry_after import parse_retry_after

NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after": "7"}, 7.0),
        ({"retry-after": "  12  "}, 12.0),
        ({"retry-after": "0"}, 0.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"retry-after": formatdate(NOW + 30, usegmt=True)}, 30.0),
        ({"retry-after": formatdate(NOW - 300, usegmt=True)}, 0.0),  # a past date means now
        ({"retry-after-ms": "250"}, 0.25),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),  # the precise header wins
        ({"retry-after": "soon"}, None),
        ({"retry-after": "-5"}, None),
        ({"retry-after": ""}, None),
        ({"retry-after": "nan"}, None),
        ({"retry-after-ms": "-1", "retry-after": "3"}, 3.0),  # garbage is skipped, not fatal
        ({"x-ratelimit-reset-requests": "1m30s"}, 90.0),
        ({"x-ratelimit-reset-tokens": "250ms"}, 0.25),
        ({"x-ratelimit-reset-tokens": "6m0s"}, 360.0),
        ({"x-ratelimit-reset-requests": "2s", "x-ratelimit-reset-tokens": "40s"}, 40.0),
        (
            {
                "x-ratelimit-reset-requests": "2s",
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-tokens": "40s",
                "x-ratelimit-remaining-tokens": "900",
            },
            2.0,  # the limit at zero is the one that refused us
        ),
        ({"x-ratelimit-reset-requests": "bogus"}, None),
        ({"anthropic-ratelimit-requests-reset": "2023-11-14T22:13:40Z"}, 20.0),
        ({"anthropic-ratelimit-tokens-reset": "2023-11-14T22:12:00+00:00"}, 0.0),
        ({"anthropic-ratelimit-tokens-reset": "tomorrow"}, None),
        ({}, None),
    ],
)
def test_parse_retry_after(headers: dict[str, str], expected: float | None) -> None:
    value = parse_retry_after(headers, NOW)
    assert value == (pytest.approx(expected) if expected is not None else None)
