"""The provider actor: one task per provider that alone owns its admission state and connections.

The actor loop only decides (admission, snapshots, reconfiguration) and never blocks. Each admitted
attempt runs as a child task of the actor, inside the cancel scope the dispatcher made for it; its
end is settled back into the actor's state by synchronous code, so state is never touched
concurrently and never by anyone outside the actor.
"""

from __future__ import annotations

import collections
import logging
import math
import time
from collections.abc import Callable

import attrs
import httpx
import trio

from actors import bedrock, vertex
from actors.admission import PARKED, Admission, Learned, Outcome
from actors.http1 import header_problem
from actors.machines import LatencySamples
from actors.messages import (
    Attempt,
    CircuitView,
    Failed,
    ManualBlock,
    ManualUnblock,
    Message,
    Reconfigure,
    Refused,
    Reply,
    Response,
    Snapshot,
    SnapshotRequest,
    StreamEnd,
    StreamEvents,
    StreamStart,
    UpstreamRequest,
)
from actors.outcome import INCOMPLETE_STREAM, Failure, Kind
from actors.retry_after import parse_retry_after
from actors.settings import ProviderConfig
from actors.shared import (
    BackendState,
    BlockLearned,
    BlockLifted,
    CircuitChanged,
    LeaseAnswer,
    ProbeAnswer,
    SharedLink,
)
from actors.sse import EventDecoder, SSEDecoder, SSEEvent
from actors.telemetry import ProviderMetrics
from actors.transport import (
    ConnectFailed,
    ConnectionLost,
    ConnectTimeout,
    Transport,
    UpstreamResponse,
    proxy_for,
)
from actors.wire import StreamTally, UpstreamWire

log = logging.getLogger("cascade.provider")

MAX_BODY = 64 * 1024 * 1024  # a non-streamed answer larger than this is a protocol failure
MAX_ERROR_BODY = 64 * 1024  # an error answer is cut to this
INBOX_SIZE = 64
_WARN_RETRY_AFTER = 24 * 3600.0


class _DispatcherGone(Exception):
    """The dispatcher closed the attempt's reply channel: nobody waits for the rest."""


class _Call:
    """One upstream call of an actor, in its steps: exchange (connect, headers), then a whole body
    or a stream's start and pump. `phase` names the step it is in, for the cancellation metric.

    The attempt's cancel scope is made and cancelled by the dispatcher; its deadline is the
    actor's timer: the first-byte limit until the first byte, then the idle limit from each
    chunk, never past the total limit. When the scope ends the call, a deadline that has passed
    means the timer fired; otherwise the dispatcher cancelled.
    """

    __slots__ = (
        "actor",
        "attempt",
        "phase",
        "start",
        "tally",
        "timeouts",
        "timer",
        "total_deadline",
        "ttfb",
    )

    def __init__(self, actor: ProviderActor, attempt: Attempt) -> None:
        self.actor = actor
        self.attempt = attempt
        self.phase = "connect"
        self.timeouts = actor.config.timeouts
        self.timer = attempt.cancel_scope
        self.start = 0.0
        self.total_deadline = math.inf
        self.ttfb = math.inf
        self.tally: StreamTally | None = None  # a stream's, once it has one

    def set_phase(self, name: str) -> None:
        self.phase = name

    def elapsed(self) -> float:
        return trio.current_time() - self.start

    def idle_deadline(self) -> float:
        return min(trio.current_time() + self.timeouts.idle, self.total_deadline)

    async def run(self) -> tuple[Outcome, Reply] | None:
        """What was learned and the last reply to send; None when the dispatcher cancelled."""
        request = self.attempt.request
        actor = self.actor
        self.start = trio.current_time()
        self.total_deadline = self.start + self.timeouts.total
        self.timer.deadline = min(self.start + self.timeouts.first_byte, self.total_deadline)
        with self.timer:
            try:
                path, body, headers = await actor._call_parts(request)
                async with actor._transport.post(
                    path,
                    body,
                    headers,
                    self.set_phase,
                ) as response:
                    self.phase = "first_byte"
                    if not 200 <= response.status < 300:
                        return await self.error_answer(response)
                    if not request.stream:
                        return await self.whole_body(response)
                    decoder = actor._decoder()
                    tally = self.tally = actor.wire.stream_tally()  # fed every event, first too
                    started = await self.stream_start(response, decoder, tally)
                    if started is not None:
                        return started
                    return await self.pump(response, decoder, tally)
            except ConnectTimeout as exc:
                failure = Failure(Kind.TRANSIENT, "connect_timeout", str(exc), timeout=True)
            except ConnectFailed as exc:
                failure = Failure(Kind.TRANSIENT, "connect_error", str(exc))
            except ConnectionLost as exc:
                cut = self.phase == "streaming"
                failure = Failure(
                    Kind.TRANSIENT, "stream_cut" if cut else "connection_lost", str(exc)
                )
            return Outcome(failure, self.ttfb, self.elapsed()), Failed(failure)
        if trio.current_time() < self.timer.deadline:
            return None  # cancelled by the dispatcher: nobody waits for an answer
        return self.timed_out()

    async def error_answer(self, response: UpstreamResponse) -> tuple[Outcome, Reply]:
        body = await response.read_all(MAX_ERROR_BODY)
        ttfb = self.ttfb = self.elapsed()
        headers = response.headers
        answer = Response(response.status, dict(headers), body, ttfb)
        retry_after = parse_retry_after(headers, self.actor._wall_clock())
        failure = Failure.from_status(response.status, body, retry_after)
        return Outcome(failure, ttfb, ttfb), Failed(failure, answer)

    async def whole_body(self, response: UpstreamResponse) -> tuple[Outcome, Reply]:
        parts = [await response.read_chunk()]
        ttfb = self.ttfb = self.elapsed()
        self.phase = "streaming"
        size = len(parts[0])
        while parts[-1]:
            self.timer.deadline = self.idle_deadline()
            parts.append(await response.read_chunk())
            size += len(parts[-1])
            if size > MAX_BODY:
                failure = Failure(Kind.PROTOCOL, "body_too_large", "upstream answer too large")
                return Outcome(failure, ttfb, self.elapsed()), Failed(failure)
        body = b"".join(parts)
        # The total only (one search): who needs the input/output split parses the body itself.
        answer = Response(response.status, dict(response.headers), body, ttfb)
        return Outcome(None, ttfb, self.elapsed(), self.actor.wire.tokens(body)), answer

    async def stream_start(
        self, response: UpstreamResponse, decoder: EventDecoder, tally: StreamTally
    ) -> tuple[Outcome, Reply] | None:
        """Read to the first complete event (the first byte) and hand it over; a verdict when
        the stream cannot start (empty, an in-band error, garbage, or already ended before its
        answer was complete: still before commit, so the cascade can fail over), else None."""
        request = self.attempt.request
        events: list[SSEEvent] = []
        while not events:
            chunk = await response.read_chunk()
            events = decoder.feed(chunk) if chunk else decoder.finish()
            if not chunk:
                break
        if not events:
            failure = Failure(Kind.PROTOCOL, "empty_stream", "upstream stream had no events")
            return Outcome(failure, self.elapsed(), self.elapsed()), Failed(failure)
        ttfb = self.ttfb = self.elapsed()
        bad_start = request.check_start(tuple(events)) if request.check_start else None
        if bad_start is not None:
            return Outcome(bad_start, ttfb, ttfb), Failed(bad_start)
        self.phase = "streaming"
        tally.feed(events)  # Anthropic's message_start carries the input tokens
        if not tally.complete and (not chunk or response.at_end()):
            return Outcome(INCOMPLETE_STREAM, ttfb, ttfb), Failed(INCOMPLETE_STREAM)
        self.timer.deadline = math.inf  # waiting on the client is not upstream idleness
        if self.attempt.demand is not None:
            self.attempt.demand.sent()
        start = StreamStart(response.status, dict(response.headers), tuple(events), ttfb)
        try:  # the first reply always fits the buffer: no scheduling round (the pump's wait
            self.attempt.reply.send_nowait(start)  # for the relaying task's Demand is one)
        except trio.WouldBlock:
            await self.send(start)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise _DispatcherGone() from None
        return None

    async def pump(
        self, response: UpstreamResponse, decoder: EventDecoder, tally: StreamTally
    ) -> tuple[Outcome, Reply]:
        """Relay the stream's events until its end: a success if the answer was complete.

        With a `Demand` (the dispatcher's attempts), the actor reads the upstream again only
        once the relaying task has written what it was handed and asked for more, when that
        can gain something: after the stream's start (the head and first events are being
        written, and the cascade's winner is being chosen), and after a read that found several
        events (the upstream is ahead of the gateway). A relay with one task reads only after
        its write; a busy gateway then takes what has piled up meanwhile in one read, one hop
        and one write, not an event or two at a time. A read that finds one event (a paced
        stream on a gateway that keeps up), or the body's end, reads again at once: waiting
        would cost a scheduling round and gain nothing."""
        reply = self.attempt.reply
        demand = self.attempt.demand
        timer = self.timer
        wait = not response.at_end()  # the start is being written
        while True:
            if wait and demand is not None and not demand.asked:
                if timer.deadline != math.inf:  # (as the start left it)
                    timer.deadline = math.inf  # waiting on the client is not upstream idleness
                await demand.wait()
            timer.deadline = self.idle_deadline()
            chunk = await response.read_chunk()
            events = decoder.feed(chunk) if chunk else decoder.finish()
            wait = len(events) > 1 and not response.at_end()  # (the end needs no company)
            if events:
                tally.feed(events)
                message = StreamEvents(tuple(events))
                if demand is not None:
                    demand.sent()
                try:
                    reply.send_nowait(message)
                except trio.WouldBlock:
                    timer.deadline = math.inf  # a slow client is not upstream idleness
                    await self.send(message)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    raise _DispatcherGone() from None
            if not chunk:
                seen = tally.usage
                tokens = seen.total if seen is not None else None
                if not tally.complete:
                    outcome = Outcome(INCOMPLETE_STREAM, self.ttfb, self.elapsed(), tokens)
                    return outcome, Failed(INCOMPLETE_STREAM)
                return Outcome(None, self.ttfb, self.elapsed(), tokens), StreamEnd(seen)

    async def send(self, message: Reply) -> None:
        try:
            await self.attempt.reply.send(message)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise _DispatcherGone() from None

    def timed_out(self) -> tuple[Outcome, Reply]:
        """The timer fired: which limit it was."""
        if trio.current_time() >= self.total_deadline:
            failure = Failure(
                Kind.SLOW, "total_timeout", "upstream exceeded the total timeout", timeout=True
            )
        elif self.phase == "streaming":
            failure = Failure(Kind.SLOW, "idle_timeout", "upstream stream went idle", timeout=True)
        else:
            failure = Failure(
                Kind.SLOW, "first_byte_timeout", "no first byte in time", timeout=True
            )
        elapsed = self.elapsed()
        return Outcome(failure, min(self.ttfb, elapsed), elapsed), Failed(failure)


class ProviderActor:
    """Start with `await nursery.start(actor.run)`; talk to it through `actor.inbox`."""

    def __init__(
        self,
        config: ProviderConfig,
        metrics: ProviderMetrics,
        *,
        wire: UpstreamWire,
        http_transport: httpx.AsyncBaseTransport | None = None,
        wall_clock: Callable[[], float] = time.time,
        shared: SharedLink | None = None,
    ) -> None:
        self.name = config.name
        self._metrics = metrics
        self._wall_clock = wall_clock
        self.inbox, self._inbox_receive = trio.open_memory_channel[Message](INBOX_SIZE)
        self._http_transport = http_transport
        self.in_flight = 0
        self._attempts = 0
        self._failures = 0
        self._ttfbs = LatencySamples()
        self._nursery: trio.Nursery | None = None
        self._calls: set[_Call] = set()  # the running attempts (their phases, for snapshots)
        # The shared backend (None: this process alone): what other replicas learned arrives as
        # messages; rpm/tpm capacity comes in leases while the backend is up.
        self._shared = shared
        self._peer_events = 0
        self._peer_lag: float | None = None
        self._peer_last: float | None = None  # wall clock of the last event from a peer
        self.admission = Admission(config.name, config, shared)
        self.config: ProviderConfig = config
        self.wire = wire
        self._signer: bedrock.Signer | None = None  # Bedrock's, made at the first call
        self._tokens: vertex.TokenSource | None = None  # Vertex AI's, made at the first call
        self._apply(config, wire, first=True)

    # --- configuration ---------------------------------------------------------------------

    def _apply(self, config: ProviderConfig, wire: UpstreamWire, *, first: bool = False) -> None:
        """Adopt `config`. State that the new config still describes is kept."""
        old: ProviderConfig | None = None if first else self.config
        self.config = config
        self.wire = wire
        self._signer = None  # Bedrock's region or profile may have changed
        self._tokens = None  # Vertex's credentials file too
        if not first:
            self.admission.apply(config)
        if old is None or _connection_settings(old) != _connection_settings(config):
            self._connect(config)
        self._headers = self._encoded_headers(config, wire)

    def _connect(self, config: ProviderConfig) -> None:
        """A new transport for `config`; the old one closes once its calls are done."""
        previous = getattr(self, "_transport", None)
        proxy = proxy_for(config.base_url, config.proxy)
        if proxy is not None:  # host and port only: a proxy URL may carry credentials
            log.info(
                "provider %s: calls go through the proxy %s",
                self.name,
                proxy.netloc.decode().rpartition("@")[2],
            )
        self._transport = Transport(
            config.base_url,
            connect_timeout=config.timeouts.connect,
            max_connections=config.max_connections,
            http_transport=self._http_transport,
            ca_file=config.ca_file,
            proxy=proxy,
        )
        if previous is not None and self._nursery is not None:
            self._nursery.start_soon(previous.aclose)

    def _encoded_headers(
        self, config: ProviderConfig, wire: UpstreamWire
    ) -> list[tuple[bytes, bytes]]:
        """Every call's headers, encoded once; each attempt adds only `accept` and
        `x-request-id`."""
        # identity: bodies are relayed as read (SSE must flow event by event, undecoded)
        headers = {
            "content-type": "application/json",
            "accept-encoding": "identity",
            **wire.fixed_headers,
            **config.headers,
        }
        # Surrounding whitespace is a copy-paste or key-file artefact (a trailing CR/LF), never
        # part of a key; a control character inside one could split the request's headers.
        api_key = (config.api_key() or "").strip()
        auth = wire.auth_headers(api_key) if api_key else {}
        if any(header_problem(name, value) is not None for name, value in auth.items()):
            log.error(
                "provider %s: environment variable %s cannot be sent in a header (control or"
                " non-Latin-1 characters); calls go out without a key",
                self.name,
                config.api_key_env,
            )
        elif api_key:
            headers.update(auth)
        elif config.api_key_env:
            log.warning(
                "provider %s: environment variable %s is not set; calls go out without a key",
                self.name,
                config.api_key_env,
            )
        return [
            (k.encode("latin-1"), v.encode("latin-1"))
            for k, v in headers.items()
            if k.lower() not in ("accept", "x-request-id")
        ]

    # --- the loop --------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the inbox until it is closed, then wait for the attempts still running."""
        try:
            async with self._inbox_receive, trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                inbox = self._inbox_receive
                async for message in inbox:
                    self._handle(message)
                    # What queued meanwhile, in the same scheduling round: `receive` takes a
                    # round even when it need not wait, and one message per round capped a busy
                    # provider's new attempts at one per pass of trio's run loop. It ends: while
                    # this task runs no other sends, so it is at most the inbox's capacity.
                    while True:
                        try:
                            queued = inbox.receive_nowait()
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                        self._handle(queued)
        finally:
            await self._transport.aclose()

    async def ask_snapshot(self) -> Snapshot:
        """The actor's state, answered by the actor's own task (for callers outside it)."""
        send, receive = trio.open_memory_channel[Snapshot](1)
        async with receive:
            await self.inbox.send(SnapshotRequest(send))
            return await receive.receive()

    def close(self) -> None:
        """Stop taking messages; `run` returns once the running attempts have finished."""
        self.inbox.close()

    def _handle(self, message: Message) -> None:
        if isinstance(message, Attempt):
            self._start_attempt(message)
        elif isinstance(message, SnapshotRequest):
            try:
                message.reply.send_nowait(self.snapshot(trio.current_time()))
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        elif isinstance(message, Reconfigure):
            self._apply(message.config, message.wire)
        elif isinstance(message, ManualBlock):
            now = trio.current_time()
            self.admission.manual.block(message.model, message.until, message.reason, now)
            self._publish_block("manual", message.model or "*", message.until, now, message.reason)
            self._metrics.blocked("manual", message.until - now)
            log.warning(
                "provider %s: %s blocked by hand for %.0f s (%s)",
                self.name,
                message.model or "every model",
                message.until - now,
                message.reason,
            )
        elif isinstance(message, ManualUnblock):
            if self._shared is not None:
                self._shared.publish(
                    BlockLifted(self.name, "manual", message.model, self._wall_clock())
                )
            if self.admission.manual.unblock(message.model):
                log.warning(
                    "provider %s: %s unblocked by hand", self.name, message.model or "every model"
                )
        else:
            self._shared_message(message)

    # --- the shared backend ----------------------------------------------------------------------

    def _publish_block(
        self, kind: str, key: str, until: float, now: float, reason: str = "", strikes: int = 0
    ) -> None:
        if self._shared is not None:
            wall = self._wall_clock()
            self._shared.publish(
                BlockLearned(self.name, kind, key, wall + (until - now), strikes, reason, wall)
            )

    def _publish_circuit(self, model: str, opened: bool, until: float, now: float) -> None:
        if self._shared is not None:
            wall = self._wall_clock()
            self._shared.publish(
                CircuitChanged(self.name, model, opened, wall + (until - now), wall)
            )

    def _shared_message(self, message: Message) -> None:
        """What the backend says: another replica's learning, or an answer to this actor."""
        if not isinstance(
            message,
            BlockLearned | BlockLifted | CircuitChanged | ProbeAnswer | LeaseAnswer | BackendState,
        ):
            log.warning("provider %s: unexpected message %r", self.name, type(message).__name__)
            return
        wall = self._wall_clock()
        if isinstance(message, BlockLearned | BlockLifted | CircuitChanged):
            self._peer_events += 1
            self._peer_lag = max(0.0, wall - message.at) if message.at else None
            self._peer_last = wall
        if self.admission.merge(message, trio.current_time(), wall):
            self._unpark()

    def _unpark(self) -> None:
        """Admit (or refuse) the attempts waiting for a lease, in their order."""
        for attempt in self.admission.unpark():
            self._start_attempt(attempt)

    # --- admission ---------------------------------------------------------------------------

    def _start_attempt(self, attempt: Attempt) -> None:
        now = trio.current_time()
        refusal = self.admission.decide(attempt, self.in_flight, now)
        if refusal is PARKED:
            if self.admission.park(attempt):
                return
            refusal = Refused("busy")
        if refusal is not None:
            self._metrics.refused(refusal.reason)
            try:
                attempt.reply.send_nowait(refusal)
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the dispatcher has gone; nothing was started
            return
        self.in_flight += 1
        self._metrics.in_flight(1)
        tpm_entry = self.admission.started(attempt, now)
        assert self._nursery is not None
        self._nursery.start_soon(self._attempt, attempt, tpm_entry)

    # --- one attempt -------------------------------------------------------------------------

    async def _attempt(self, attempt: Attempt, tpm_entry: list[float]) -> None:
        call = _Call(self, attempt)
        self._calls.add(call)
        terminal: Reply | None = None
        try:
            try:
                result = await call.run()
            except _DispatcherGone:
                result = None  # it closed the reply channel before it cancelled: a cancellation
            except Exception as exc:  # a bug or an unmapped library error: one attempt fails
                log.exception("provider %s: attempt failed unexpectedly", self.name)
                failure = Failure(Kind.PROTOCOL, "internal_error", type(exc).__name__)
                result = Outcome(failure, math.inf, math.inf), Failed(failure)
            if result is None:
                return  # the dispatcher cancelled it; counted below
            outcome, last = result
            # State first, then the reply: the dispatcher's next step sees the new block.
            until = self._settle(attempt.request, outcome, tpm_entry)
            if until is not None and isinstance(last, Failed):
                last = attrs.evolve(last, failure=attrs.evolve(last.failure, until=until))
            if isinstance(last, Failed) and call.tally is not None and call.tally.usage:
                last = attrs.evolve(last, usage=call.tally.usage)  # what it said before failing
                if outcome.tokens is None:  # the bill: what it had reported before failing
                    self._metrics.tokens(call.tally.usage.total, "failed")
            terminal = last
            try:  # the first reply always fits the buffer: skip send()'s scheduling round
                attempt.reply.send_nowait(terminal)
            except trio.WouldBlock:  # a stream's end behind events a slow client has not read
                await attempt.reply.send(terminal)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the dispatcher stopped listening: its cancel_all closes the channel
        finally:
            self._calls.discard(call)
            self.in_flight -= 1
            self._metrics.in_flight(-1)
            if terminal is None:  # cancelled before the attempt ended
                self._metrics.cancelled(call.phase)
                if call.tally is not None and call.tally.usage:  # what it had reported
                    self._metrics.tokens(call.tally.usage.total, "cancelled")
                self.admission.circuits.probe_abandoned(attempt.request.model)

    async def _call_parts(
        self, request: UpstreamRequest
    ) -> tuple[str, bytes, list[tuple[bytes, bytes]]]:
        """The path, body and headers of a call: as the dialect wrote them, or as Bedrock
        takes them (its body, the model in the path, signed)."""
        config = self.config
        path = config.path_for(request.path, request.model, request.stream)
        headers = self._upstream_headers(request)
        if config.vertex is not None:
            if self._tokens is None:
                self._tokens = vertex.TokenSource(config.vertex)
            headers += await self._tokens.headers()
            return path, vertex.body(request.body, config.vertex.anthropic_version), headers
        if config.bedrock is None:
            return path, request.body, headers
        body = bedrock.body(request.body, config.bedrock.anthropic_version)
        if self._signer is None:
            self._signer = bedrock.Signer(config.bedrock)
        headers += await self._signer.headers(self._transport.url(path), body)
        return path, body, headers

    def _decoder(self) -> EventDecoder:
        """A stream's decoder: server-sent events, or Bedrock's binary event stream."""
        return SSEDecoder() if self.config.bedrock is None else bedrock.EventStreamDecoder()

    def _upstream_headers(self, request: UpstreamRequest) -> list[tuple[bytes, bytes]]:
        headers = self._headers.copy()
        headers.append((b"accept", b"text/event-stream" if request.stream else b"application/json"))
        if request.request_id:
            headers.append((b"x-request-id", request.request_id.encode("latin-1")))
        if request.headers:
            headers.extend(request.headers)
        return headers

    # --- learning from an attempt ---------------------------------------------------------------

    def _settle(
        self, request: UpstreamRequest, outcome: Outcome, tpm_entry: list[float]
    ) -> float | None:
        """Update state from a finished attempt; returns the end of the block it caused, if any."""
        now = trio.current_time()
        model, failure = request.model, outcome.failure
        self._attempts += 1
        if outcome.tokens is not None:
            self._metrics.tokens(outcome.tokens, "served" if outcome.failure is None else "failed")
        if failure is None:
            self._metrics.attempt("ok")
            self._ttfbs.add(outcome.ttfb)
            self._metrics.first_byte(outcome.ttfb)
        else:
            self._failures += 1
            self._metrics.attempt(failure.kind.value)
        learned = self.admission.settle(request, outcome, tpm_entry, now)
        if learned.circuit_closed:
            self._publish_circuit(model, False, now, now)
        if learned.rate_limited_until is not None and failure is not None:
            self._rate_limited(model, failure, learned, now)
        if learned.circuit_opened:
            self._publish_circuit(model, True, self.admission.circuits.until(model), now)
            self._metrics.blocked("circuit_open", self.config.circuit.open_for)
            log.warning("provider %s: circuit for %s opened", self.name, model)
        if learned.latency_until is not None:
            self._publish_block("latency", model, learned.latency_until, now)
            self._metrics.blocked("latency", learned.latency_until - now)
            log.warning("provider %s: latency trigger blocked %s", self.name, model)
        return learned.rate_limited_until

    def _rate_limited(self, model: str, failure: Failure, learned: Learned, now: float) -> None:
        until = learned.rate_limited_until
        assert until is not None
        retry_after = failure.retry_after
        if retry_after is not None and retry_after > _WARN_RETRY_AFTER:
            log.warning(
                "provider %s: Retry-After of %.0f s (capped at %.0f s)",
                self.name,
                retry_after,
                self.config.rate_limit.max_retry_after,
            )
        self._publish_block("rate_limited", learned.rate_key, until, now, strikes=learned.strikes)
        self._metrics.blocked("rate_limited", until - now)
        log.warning(
            "provider %s: %s rate limited (%s); blocked for %.1f s (%s)",
            self.name,
            learned.rate_key,
            failure.error_type,
            until - now,
            "Retry-After" if retry_after is not None else "backoff",
        )

    # --- snapshot ------------------------------------------------------------------------------

    def snapshot(self, now: float) -> Snapshot:
        admission = self.admission
        requests, tokens = admission.last_minute(now)
        return Snapshot(
            name=self.name,
            now=now,
            in_flight=self.in_flight,
            phases=tuple(sorted(collections.Counter(c.phase for c in self._calls).items())),
            max_in_flight=self.config.max_in_flight,
            blocks=tuple(admission.blocks(now)),
            circuits=tuple(CircuitView(*c) for c in admission.circuits.states(now)),
            requests_last_minute=requests,
            tokens_last_minute=tokens,
            ttfb_p50=self._ttfbs.quantile(0.5),
            ttfb_p95=self._ttfbs.quantile(0.95),
            attempts=self._attempts,
            failures=self._failures,
            shared=None
            if self._shared is None
            else {
                "up": admission.shared_up,
                "events_received": self._peer_events,
                "last_lag_ms": None if self._peer_lag is None else round(self._peer_lag * 1e3, 2),
                "last_event_at": self._peer_last,
            },
        )


def _connection_settings(c: ProviderConfig) -> tuple[object, ...]:
    """What a new transport is needed for when it changes."""
    return (c.base_url, c.timeouts.connect, c.max_connections, c.ca_file, c.proxy)
