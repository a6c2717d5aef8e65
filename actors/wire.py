"""What an upstream dialect tells a provider actor: how to authenticate and how to count tokens.

The actors stay dialect-free: the router's dialect for the provider (router/dialects/) hands the
actor an `UpstreamWire`, and the dispatcher hands each attempt its path and body.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import attrs

from actors.sse import SSEEvent


@attrs.frozen
class Usage:
    """An answer's token usage. `input` counts every input token, cached ones included;
    `cache_read` and `cache_write` say how many of them were read from or written to a cache."""

    input: int = 0
    output: int = 0
    cache_read: int = 0
    cache_write: int = 0

    @property
    def total(self) -> int:
        return self.input + self.output


class UpstreamWire(Protocol):
    @property
    def fixed_headers(self) -> Mapping[str, str]:
        """Headers every call carries (e.g. an API version)."""

    def auth_headers(self, api_key: str) -> Mapping[str, str]:
        """The headers that carry the provider's key."""

    def tokens(self, body: bytes) -> int | None:
        """A whole (non-streamed) answer's total tokens, if it says (one quick search)."""

    def usage(self, body: bytes) -> Usage | None:
        """A whole (non-streamed) answer's usage, if it says."""

    def stream_tally(self) -> StreamTally:
        """A tally of one streamed answer, fed its events as they pass."""


class StreamTally(Protocol):
    """What a stream's events say as they pass: its usage, which may come in parts (Anthropic:
    input at the start, cumulative output at the end), and whether the answer is complete by
    its dialect's own definition (OpenAI: a choice's finish_reason; Anthropic: message_stop).
    A stream whose body ends before it is complete is a failed attempt, not a success."""

    @property
    def usage(self) -> Usage | None:
        """The usage seen so far (None: no usage yet)."""

    @property
    def complete(self) -> bool:
        """The dialect's end of the answer has passed."""

    def feed(self, events: Sequence[SSEEvent]) -> None: ...
