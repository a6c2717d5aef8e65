"""Parsing of the human units used in config files: durations (`250ms`, `30s`) and sizes (`10MiB`)."""

from __future__ import annotations

import re

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)")
_DURATION = re.compile(r"^(?:\d+(?:\.\d+)?\s*(?:ms|s|m|h|d)\s*)+\Z")
_NUMBER = re.compile(r"^\d+(?:\.\d+)?\Z")
_DURATION_FACTORS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB)?\s*\Z")
_SIZE_FACTORS = {
    None: 1,
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
}


def parse_duration(value: object) -> float:
    """Seconds from `250ms`, `30s`, `5m`, `48h`, `1d`, a combination such as `1h30m` or `1m30s`
    (the form Go and OpenAI's reset headers use), or a bare non-negative number of seconds (also
    as text: `"10"`, as an `x-cascade-deadline` header gives it).

    Raises ValueError on anything else (including booleans, negative and non-finite numbers).
    """
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int | float):
        if not 0 <= value < float("inf"):
            raise ValueError(value)
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        if _NUMBER.match(text):
            return float(text)
        if _DURATION.match(text):
            return sum(
                float(n) * _DURATION_FACTORS[unit] for n, unit in _DURATION_PART.findall(text)
            )
    raise ValueError(value)


def parse_size(value: object) -> int:
    """Bytes from `10MiB`, `512KB`, `100B` or a bare non-negative integer."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int):
        if value < 0:
            raise ValueError(value)
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            return int(float(m.group(1)) * _SIZE_FACTORS[m.group(2)])
    raise ValueError(value)
