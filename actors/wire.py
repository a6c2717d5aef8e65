"""What an upstream dialect tells a provider actor: how to authenticate and how to count tokens.

The actors stay dialect-free: the router's dialect for the provider (router/dialects/) hands the
actor an `UpstreamWire`, and the dispatcher hands each attempt its path and body.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from actors.sse import SSEEvent


class UpstreamWire(Protocol):
    @property
    def fixed_headers(self) -> Mapping[str, str]:
        """Headers every call carries (e.g. an API version)."""

    def auth_headers(self, api_key: str) -> Mapping[str, str]:
        """The headers that carry the provider's key."""

    def tokens(self, body: bytes) -> int | None:
        """Total tokens from a whole (non-streamed) answer's usage, if it says."""

    def stream_tokens(self, events: Sequence[SSEEvent], so_far: int | None) -> int | None:
        """Total tokens once this batch of stream events is counted, given the total so far
        (None: no usage seen yet). Usage may come in parts (Anthropic: input tokens at the
        start, output tokens at the end)."""
