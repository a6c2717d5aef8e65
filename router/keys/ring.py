"""Client keys: who may call the model endpoints, which models each key may use, and each key's
rpm/tpm limits (docs/keys-and-budgets.md).

Keys are never held in plaintext: the config names an environment variable (read once, hashed)
or gives the key's SHA-256. A presented key is hashed and looked up by its digest, so no
comparison ever runs over key bytes: the answer's timing says nothing about how much of a key
matched (the admin token, compared as bytes, uses hmac.compare_digest). Key names, never keys,
label logs and metrics.
"""

from __future__ import annotations

import hmac
import logging
import math
import os
from collections.abc import Iterable

import attrs

from actors.machines import SlidingWindow
from router.config.keys import AuthConfig, KeyConfig, digest

log = logging.getLogger("cascade.keys")


@attrs.frozen
class Decision:
    """A limiter's verdict: `retry_after` is None when admitted; `headers` go on every answer."""

    retry_after: float | None
    reason: str | None
    headers: list[tuple[bytes, bytes]]


class KeyRing:
    """The keys of one config, by digest, with each key's rpm/tpm windows.

    Windows live in the ring and survive a reload for keys whose name is unchanged (`adopt`).
    Plain synchronous code on the trio thread: the check and the record happen with no
    checkpoint between them, so two requests cannot both take the last unit.
    """

    def __init__(
        self,
        auth: AuthConfig,
        admin_token_env: str | None = None,
        runtime: Iterable[KeyConfig] = (),
    ) -> None:
        self._by_digest: dict[bytes, KeyConfig] = {}
        self._windows: dict[str, tuple[SlidingWindow, SlidingWindow]] = {}
        self.runtime: dict[str, KeyConfig] = {}  # created through the admin API
        admin = os.environ.get(admin_token_env or "") or None
        self._admin_digest = admin_digest = digest(admin) if admin else None
        self.configured = auth.keys
        for key in auth.keys:
            if key.sha256 is not None:
                found = bytes.fromhex(key.sha256)
            else:
                value = os.environ.get(key.key_env or "", "").strip()
                if not value:
                    log.warning(
                        "auth key %s: environment variable %s is not set; the key is disabled",
                        key.name,
                        key.key_env,
                    )
                    continue
                found = digest(value)
            if admin_digest is not None and hmac.compare_digest(found, admin_digest):
                log.error("auth key %s is the admin token; the key is disabled", key.name)
                continue
            self._by_digest[found] = key
            self._windows[key.name] = (SlidingWindow(60.0), SlidingWindow(60.0))
        self.enabled = auth.enabled
        for key in runtime:
            self.add(key)

    def names(self) -> set[str]:
        return {k.name for k in self.configured} | set(self.runtime)

    def add(self, key: KeyConfig) -> None:
        """A key created at run time (its sha256 set): valid from now on."""
        assert key.sha256 is not None
        self._by_digest[bytes.fromhex(key.sha256)] = key
        self._windows.setdefault(key.name, (SlidingWindow(60.0), SlidingWindow(60.0)))
        self.runtime[key.name] = key
        self.enabled = True

    def revoke(self, name: str) -> bool:
        """Remove a run-time key; False if there is none of that name."""
        key = self.runtime.pop(name, None)
        if key is None:
            return False
        assert key.sha256 is not None
        self._by_digest.pop(bytes.fromhex(key.sha256), None)
        return True

    def adopt(self, previous: KeyRing) -> None:
        """Keep the rpm/tpm windows of keys that kept their name across a reload."""
        for name in self._windows:
            if name in previous._windows:
                self._windows[name] = previous._windows[name]

    def authenticate(self, presented: str | None) -> KeyConfig | None:
        if not presented:
            return None
        return self._by_digest.get(digest(presented))

    def admit(self, key: KeyConfig, tokens: int, now: float) -> Decision:
        """Count one request of about `tokens` tokens against `key`'s limits, or refuse it."""
        requests, used = self._windows[key.name]
        retry: float | None = None
        reason = None
        if key.rpm is not None and (until := requests.room(now, 1, key.rpm)) is not None:
            retry, reason = until - now, "rpm"
        elif key.tpm is not None and (until := used.room(now, tokens, key.tpm)) is not None:
            retry, reason = until - now, "tpm"
        else:
            requests.add(now, 1)
            used.add(now, tokens)
        return Decision(retry, reason, self._headers(key, requests, used, now))

    def _headers(
        self, key: KeyConfig, requests: SlidingWindow, used: SlidingWindow, now: float
    ) -> list[tuple[bytes, bytes]]:
        out: list[tuple[bytes, bytes]] = []
        for kind, limit, window in (("requests", key.rpm, requests), ("tokens", key.tpm, used)):
            if limit is None:
                continue
            remaining = max(0, math.floor(limit - window.total))
            reset = _time_to_free(window, now)
            out += [
                (b"x-ratelimit-limit-" + kind.encode(), str(limit).encode()),
                (b"x-ratelimit-remaining-" + kind.encode(), str(remaining).encode()),
                (b"x-ratelimit-reset-" + kind.encode(), _openai_duration(reset).encode()),
            ]
        return out


def _time_to_free(window: SlidingWindow, now: float) -> float:
    """Seconds until the oldest entry leaves the window (0 when it is empty)."""
    window.expire(now)
    oldest = window.oldest()
    return 0.0 if oldest is None else max(0.0, oldest + window.window - now)


def _openai_duration(seconds: float) -> str:
    """OpenAI's reset format: `1s`, `6m0s`, `250ms`."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    minutes, rest = divmod(round(seconds), 60)  # whole seconds first: 59.7 s is 1m0s, not 60s
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"


def presented_key(authorization: bytes | None, x_api_key: bytes | None) -> str | None:
    """The key a client sent: `x-api-key` (Anthropic's SDK) or `Authorization: Bearer` (OpenAI's;
    both faces accept both, as a client may use either SDK's convention)."""
    if x_api_key:
        return x_api_key.decode("latin-1")
    scheme, _, given = (authorization or b"").partition(b" ")
    if scheme.lower() == b"bearer" and given.strip():
        return given.strip().decode("latin-1")
    return None
