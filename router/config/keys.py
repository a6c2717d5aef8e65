"""The client-key and budget settings of a config (`auth:`, `prices:`): what `router/keys/`
enforces, as plain frozen values. Keys themselves are never here: a key names the environment
variable holding it, or gives its SHA-256."""

from __future__ import annotations

import datetime as dt
import fnmatch
import hashlib
from typing import Literal

import attrs

from actors.wire import Usage

Period = Literal["day", "month", "total"]
Unit = Literal["tokens", "cost"]


@attrs.frozen
class Price:
    """USD per million tokens."""

    input: float = 0.0
    output: float = 0.0
    cache_read: float | None = None  # default: the input price
    cache_write: float | None = None  # default: the input price

    def cost(self, usage: Usage) -> float:
        read = self.input if self.cache_read is None else self.cache_read
        write = self.input if self.cache_write is None else self.cache_write
        plain = usage.input - usage.cache_read - usage.cache_write
        return (
            plain * self.input
            + usage.cache_read * read
            + usage.cache_write * write
            + usage.output * self.output
        ) / 1e6


@attrs.frozen
class Budget:
    unit: Unit
    limit: float
    period: Period


def period_id(period: Period, when: dt.datetime) -> str:
    if period == "day":
        return f"{when.year:04d}-{when.month:02d}-{when.day:02d}"
    if period == "month":
        return f"{when.year:04d}-{when.month:02d}"
    return "total"


def period_end(period: Period, when: dt.datetime) -> dt.datetime | None:
    """When the period that holds `when` ends (UTC); None for `total`."""
    if period == "day":
        return dt.datetime(when.year, when.month, when.day, tzinfo=dt.UTC) + dt.timedelta(days=1)
    if period == "month":
        year, month = (when.year + 1, 1) if when.month == 12 else (when.year, when.month + 1)
        return dt.datetime(year, month, 1, tzinfo=dt.UTC)
    return None


def digest(key: str) -> bytes:
    return hashlib.sha256(key.strip().encode()).digest()


@attrs.frozen
class KeyConfig:
    """One `auth.keys[]` entry as configured (the secret itself is not here)."""

    name: str
    key_env: str | None = None
    sha256: str | None = None  # hex
    models: tuple[str, ...] = ("*",)  # globs over the model names clients ask for
    rpm: int | None = None
    tpm: int | None = None
    budgets: tuple[Budget, ...] = ()

    def allows(self, model: str) -> bool:
        return any(fnmatch.fnmatchcase(model, glob) for glob in self.models)


@attrs.frozen
class AuthConfig:
    keys: tuple[KeyConfig, ...] = ()
    # A request's reservation counts this many output tokens when it does not say max_tokens.
    default_max_tokens: int = 4096
    usage_db: str | None = None  # SQLite file: spend and usage records survive restarts

    @property
    def enabled(self) -> bool:
        return bool(self.keys)
