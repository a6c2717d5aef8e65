"""The messages between the dispatcher and a provider actor. All frozen; replies travel back on a
channel that the request carries.

    dispatcher ── Attempt ──▶ actor            (reply: Refused | Response | StreamStart …)
    dispatcher ── SnapshotRequest ──▶ actor    (reply: Snapshot)
    dispatcher ── Reconfigure ──▶ actor        (no reply)
    admin API ── ManualBlock / ManualUnblock ──▶ actor   (no reply)
    shared backend ── BlockLearned / CircuitChanged / LeaseAnswer … ──▶ actor (actors/shared.py)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import attrs
import trio

from actors.outcome import Failure
from actors.settings import ProviderConfig
from actors.shared import SharedMessage
from actors.sse import SSEEvent
from actors.wire import UpstreamWire, Usage


@attrs.frozen
class UpstreamRequest:
    """What to send: the path under the provider's base URL and the exact body bytes."""

    path: str
    body: bytes
    model: str  # the upstream model name (already written into `body`)
    stream: bool
    estimated_tokens: int = 0
    request_id: str = ""
    headers: tuple[tuple[bytes, bytes], ...] = ()  # from the client, for this call only
    # The dialect's verdict on a stream's first events (an in-band error, garbage): a Failure
    # makes the attempt a failed one, which the actor counts against the provider.
    check_start: Callable[[tuple[SSEEvent, ...]], Failure | None] | None = None


# --- replies -------------------------------------------------------------------------------


@attrs.frozen
class Refused:
    """Admission said no; no upstream call was made. `until`: when the block ends, if known."""

    reason: str  # rate_limited | latency | circuit_open | circuit_probe | busy | rpm | tpm | retry_budget
    until: float | None = None


@attrs.frozen
class Response:
    """A complete answer: any non-streamed answer, or a streamed request's non-2xx answer."""

    status: int
    headers: Mapping[str, str]
    body: bytes
    ttfb: float
    # A 2xx answer's usage, when it was parsed (the actor reads only the total: `Response.body`
    # has the rest, for the upstream dialect's `wire.usage`)
    usage: Usage | None = None


@attrs.frozen
class StreamStart:
    """A 2xx stream produced its first events (the first byte)."""

    status: int
    headers: Mapping[str, str]
    events: tuple[SSEEvent, ...]
    ttfb: float


@attrs.frozen
class StreamEvents:
    events: tuple[SSEEvent, ...]


@attrs.frozen
class StreamEnd:
    """The upstream finished the body cleanly (whether or not it sent a [DONE] sentinel)."""

    usage: Usage | None = None  # what the stream's usage events said, if any


@attrs.frozen
class Failed:
    """The attempt failed (before or during the stream); the actor has already updated its state.

    `response` is the upstream's answer when it was an HTTP error (its body may go to the client).
    """

    failure: Failure
    response: Response | None = None
    usage: Usage | None = None  # a stream that failed after it began: the usage it had reported


Reply = Refused | Response | StreamStart | StreamEvents | StreamEnd | Failed


# --- requests ------------------------------------------------------------------------------


class Demand:
    """When the task that relays a stream wants more of it (DESIGN §2: the actor reads the
    upstream, the request's task relays what it hands on).

    The relaying task calls `want()` each time it has written what it took and is about to wait
    for more. The actor marks each message it hands on (`sent()`), and before it reads the
    upstream again it may wait until the relaying task has asked since (`wait()`), as a relay
    with one task reads only after its write: what the upstream sends meanwhile is then taken
    in one read, one hop and one write. Waiting is the actor's choice (actors/provider.py,
    `_Call.pump`); an attempt without a Demand is read as fast as its events come.
    """

    __slots__ = ("_parked", "asked")

    def __init__(self) -> None:
        self.asked = False  # the relaying task has asked for more since the last message
        self._parked: trio.lowlevel.Task | None = None

    def want(self) -> None:
        self.asked = True
        task = self._parked
        if task is not None:
            self._parked = None
            trio.lowlevel.reschedule(task)

    def sent(self) -> None:
        self.asked = False

    async def wait(self) -> None:
        """Until the relaying task asks for more (at once if it has); a cancellation point."""
        if self.asked:
            await trio.lowlevel.checkpoint()
            return
        self._parked = trio.lowlevel.current_task()

        def abort(_: object) -> trio.lowlevel.Abort:
            self._parked = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)


@attrs.frozen(eq=False)
class Attempt:
    """Run one upstream call inside `cancel_scope` (made and owned by the dispatcher).

    The dispatcher cancels the scope when the client leaves, a hedge loses or the deadline hits;
    the actor's attempt task is inside it, so the upstream call ends at once, wherever it is.
    """

    request: UpstreamRequest
    reply: trio.MemorySendChannel[Reply]
    cancel_scope: trio.CancelScope
    is_retry: bool = False
    demand: Demand | None = None  # a stream's relaying task says when it wants more


@attrs.frozen
class Block:
    key: str
    reason: str  # rate_limited | latency | manual
    until: float
    note: str = ""  # for a manual block: the operator's reason


@attrs.frozen
class CircuitView:
    key: str
    state: str
    until: float | None


@attrs.frozen
class Snapshot:
    """An immutable picture of one actor's state at `now` (trio time)."""

    name: str
    now: float
    in_flight: int
    phases: tuple[tuple[str, int], ...]  # in-flight calls by phase (connect, headers, …)
    max_in_flight: int
    blocks: tuple[Block, ...]
    circuits: tuple[CircuitView, ...]
    requests_last_minute: int
    tokens_last_minute: int
    ttfb_p50: float | None
    ttfb_p95: float | None
    attempts: int
    failures: int
    # with a shared backend: {"up", "events_received", "last_lag_ms"}
    shared: Mapping[str, object] | None = None

    def to_json(self) -> dict[str, object]:
        def rel(t: float | None) -> float | None:
            return None if t is None else round(max(0.0, t - self.now), 3)

        return {
            "name": self.name,
            "in_flight": self.in_flight,
            "in_flight_phases": dict(self.phases),
            "max_in_flight": self.max_in_flight,
            "blocks": [
                {"key": b.key, "reason": b.reason, "seconds_left": rel(b.until)}
                | ({"note": b.note} if b.note else {})
                for b in self.blocks
            ],
            "circuits": [
                {"key": c.key, "state": c.state, "seconds_left": rel(c.until)}
                for c in self.circuits
            ],
            "requests_last_minute": self.requests_last_minute,
            "tokens_last_minute": self.tokens_last_minute,
            "ttfb_p50_ms": None if self.ttfb_p50 is None else round(self.ttfb_p50 * 1000, 1),
            "ttfb_p95_ms": None if self.ttfb_p95 is None else round(self.ttfb_p95 * 1000, 1),
            "attempts": self.attempts,
            "failures": self.failures,
        } | ({"shared": dict(self.shared)} if self.shared is not None else {})


@attrs.frozen(eq=False)
class SnapshotRequest:
    reply: trio.MemorySendChannel[Snapshot]


@attrs.frozen
class Reconfigure:
    """Adopt a new config in place, keeping blocks, windows and counters."""

    config: ProviderConfig
    wire: UpstreamWire


@attrs.frozen
class ManualBlock:
    """An operator takes a model (None: the whole provider) out until `until` (trio time)."""

    model: str | None
    until: float
    reason: str


@attrs.frozen
class ManualUnblock:
    """An operator puts a model (None: every manual block of the provider) back."""

    model: str | None


Message = Attempt | SnapshotRequest | Reconfigure | ManualBlock | ManualUnblock | SharedMessage
