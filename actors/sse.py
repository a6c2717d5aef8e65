"""An incremental, I/O-free decoder of server-sent events (the WHATWG event-stream format)."""

from __future__ import annotations

from typing import Protocol

import attrs


@attrs.frozen
class SSEEvent:
    data: bytes
    event: bytes | None = None


class EventDecoder(Protocol):
    """Turns an upstream body's bytes into events as they arrive (SSEDecoder; Bedrock's
    event-stream decoder, actors/bedrock.py)."""

    def feed(self, chunk: bytes) -> list[SSEEvent]: ...

    def finish(self) -> list[SSEEvent]: ...


_KEEP_WHOLE = 1 << 16  # an incomplete event kept whole for the next feed, up to this size


class SSEDecoder:
    """Feed it bytes as they arrive; it returns the events completed so far.

    Handles LF, CRLF and CR line ends split anywhere across chunks, multi-line `data:`, comments
    and unknown fields. Events with no `data` (keep-alive comments) are not returned.
    """

    __slots__ = ("_buffer", "_data", "_event")

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[bytes] = []
        self._event: bytes | None = None

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        buffer = self._buffer + chunk
        # (`find`, not `in`, on every read and event: CPython 3.11's `bytes.__contains__` first
        # tries its argument as an integer and builds and drops a TypeError before it searches.)
        if buffer.find(b"\r") >= 0:
            # A trailing CR may be half of a CRLF split across chunks: keep it for the next feed.
            keep_cr = buffer.endswith(b"\r")
            if keep_cr:
                buffer = buffer[:-1]
            buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            if keep_cr:
                buffer += b"\r"
        elif not self._data and self._event is None:
            return self._blocks(buffer)
        return self._lines(buffer)

    def _blocks(self, buffer: bytes) -> list[SSEEvent]:
        """The common case, between events and with LF line ends: each complete event is a
        block before a blank line, and most are one `data: ` line (or an `event: ` line and
        one `data: ` line), taken whole; any other block goes through the line parser."""
        blocks = buffer.split(b"\n\n")
        rest = blocks.pop()  # after the last blank line: an event not complete yet
        events: list[SSEEvent] = []
        for block in blocks:
            if block.startswith(b"data: ") and block.find(b"\n") < 0:
                events.append(SSEEvent(block[6:]))
                continue
            if block.startswith(b"event: "):
                nl = block.find(b"\n")
                if nl > 0 and block.startswith(b"data: ", nl + 1) and block.find(b"\n", nl + 1) < 0:
                    events.append(SSEEvent(block[nl + 7 :], block[7:nl]))
                    continue
            events += self._lines(block + b"\n\n")
        self._buffer = b""
        if len(rest) > _KEEP_WHOLE:  # a long event still coming: its complete lines are parsed
            events += self._lines(rest)
        else:
            self._buffer = rest
        return events

    def _lines(self, buffer: bytes) -> list[SSEEvent]:
        """The line parser (the WHATWG algorithm); what follows the last line end is kept for
        the next feed."""
        events: list[SSEEvent] = []
        start = 0
        while True:
            end = buffer.find(b"\n", start)
            if end < 0:
                break
            line = buffer[start:end]
            start = end + 1
            if not line:
                if self._data:
                    events.append(SSEEvent(b"\n".join(self._data), self._event))
                self._data = []
                self._event = None
                continue
            name, colon, value = line.partition(b":")
            if not colon or not name:
                if not colon and name == b"data":
                    self._data.append(b"")
                continue  # a comment (":...") or a field with no value
            if value.startswith(b" "):
                value = value[1:]
            if name == b"data":
                self._data.append(value)
            elif name == b"event":
                self._event = value
        self._buffer = buffer[start:]
        return events

    def finish(self) -> list[SSEEvent]:
        """Events left when the stream ends without a final blank line."""
        events = self.feed(b"\n\n") if self._buffer or self._data else []
        self._buffer = b""
        return events
