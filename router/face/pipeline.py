"""One model request, whatever its face: parse (the client's dialect) → admit (the key gate:
auth, limits, reservation) → dispatch (the cascade, asking for each target's body) → deliver (in
the client's dialect, into a `Delivery`) → record (settle, metrics, feed, log), in one place.

A new face is a dialect module and an entry in the app's route table; nothing here changes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from contextlib import AbstractContextManager, AsyncExitStack
from functools import partial

import attrs
import trio

from actors.wire import Usage
from router.cascade.dispatcher import AttemptRecord, CascadeError, ChatJob, Dispatch, Winner
from router.config import Route, ServerConfig, Target
from router.config.keys import KeyConfig
from router.dialects.base import ClientRequest, Dialect
from router.dialects.bodies import UpstreamBodies
from router.dialects.pairs import translator
from router.errors import RequestError
from router.face import conversations
from router.face.answers import Delivery, Resumes, TrackedSend, answer, cascade_error, stream
from router.face.gateway import Gateway
from router.face.resuming import Resumer
from router.state.budgets import Hold
from router.telemetry.feed import Feed
from router.units import parse_duration
from router.web.asgi import Message, Receive, Scope, Send, header, read_body
from router.web.server import DISCONNECT

log = logging.getLogger("cascade.request")

StreamScope = Callable[[], AbstractContextManager[trio.CancelScope]]


class Parsed:
    """A request that parsed and has a route: what the rest of the pipeline works from."""

    __slots__ = ("deadline", "request", "route", "route_name", "started")

    def __init__(
        self,
        request: ClientRequest,
        route_name: str,
        route: Route,
        started: float,
        deadline: float,
    ) -> None:
        self.request = request
        self.route_name = route_name
        self.route = route
        self.started = started  # trio time the request arrived
        self.deadline = deadline  # trio time: the whole cascade's


class Pipeline:
    """The model endpoints' one path. `feed` records cascades for the status page; `streams`
    opens the cancel scope that ends a stream at shutdown's cutoff."""

    def __init__(self, feed: Feed, streams: StreamScope) -> None:
        self.feed = feed
        self.streams = streams
        # Where requests' disconnect watchers run: set by the server for as long as it serves
        # (None, e.g. an app driven in-process: a nursery per request).
        self.watchers: trio.Nursery | None = None

    async def serve(
        self,
        face: Dialect,
        gateway: Gateway,
        scope: Scope,
        receive: Receive,
        send: Send,
        request_id: str,
        key: KeyConfig | None,
    ) -> None:
        started = trio.current_time()
        server = gateway.config.server
        body = None
        # One cancel scope for the whole request: its deadline first bounds the body's arrival
        # (408 after it: a client that sends one byte and waits must not hold a request, and
        # its fd, forever); then the client's leaving cancels it (the disconnect watcher).
        with trio.CancelScope(deadline=started + server.body_timeout) as cancel:
            body = await read_body(scope, receive, server.max_body)
            cancel.deadline = math.inf
            parsed = parse(face, gateway, scope, body, started)
            if face.name == "responses":  # a continuation: the stored items first
                parsed.request = await conversations.continued(
                    gateway.responses, parsed.request, key
                )
            await self._admitted(face, gateway, scope, receive, send, request_id, key, parsed,
                                 cancel)  # fmt: skip
        if body is None:
            raise _body_timeout(server)

    async def _admitted(
        self,
        face: Dialect,
        gateway: Gateway,
        scope: Scope,
        receive: Receive,
        send: Send,
        request_id: str,
        key: KeyConfig | None,
        parsed: Parsed,
        cancel: trio.CancelScope,
    ) -> None:
        """Admit (the key gate), dispatch, deliver, and record however it ends."""
        started, request = parsed.started, parsed.request
        if key is not None:  # limits before anything else happens for this request
            extra = await gateway.gate.admit(key, request.model, request.estimated_tokens)
            send = with_headers(send, extra) if extra else send
            if request.stream:  # the exact usage, to settle with (every key's usage is booked)
                request = parsed.request = request.asking_usage()
        dispatch = gateway.dispatcher.dispatch(job_for(face, gateway, scope, parsed, request_id))
        tracked, delivery = TrackedSend(send), Delivery(metered=key is not None)
        delivery.on_whole = conversations.remembering(gateway.responses, request, key)
        hold = None
        if key is not None:  # the last step before the try: its finally settles
            hold = await gateway.gate.reserve(
                key,
                request.estimated_input_tokens,
                request.max_output_tokens,
                parsed.route.every_target,
            )
        before_cascade = trio.current_time() - started
        try:
            await self.deliver(face, gateway, request, dispatch, tracked, (scope, receive),
                               delivery, request_id, cancel)  # fmt: skip
        finally:
            if hold is not None and key is not None:
                settle(gateway, hold, key, parsed, tracked, delivery)
            self.record(face, gateway, parsed, key, request_id, started, before_cascade, dispatch,
                        tracked, delivery)  # fmt: skip

    async def deliver(
        self,
        face: Dialect,
        gateway: Gateway,
        request: ClientRequest,
        dispatch: Dispatch,
        tracked: TrackedSend,
        client: tuple[Scope, Receive],
        delivery: Delivery,
        request_id: str,
        cancel: trio.CancelScope,
    ) -> None:
        """Run the cascade and write what it gives, in the client's dialect; a client that goes
        away cancels it all (`cancel`, the request's scope), wherever it is.

        Cascade's own server says when the client's stream closes (the `cascade.disconnect`
        scope extension): no task watches. Under another server a disconnect watcher does, in
        the server's long-lived `watchers` nursery when there is one (a per-request nursery
        costs its opening and a wait for the watcher at its close); once the answer is complete
        the server reports http.disconnect (the ASGI spec's answer to any receive() after a
        response) and the watcher returns by itself."""
        args = (face, gateway, request, dispatch, tracked, delivery, request_id)
        scope, receive = client
        notice = scope.get("extensions", {}).get(DISCONNECT)
        if notice is not None:
            notice["notify"](partial(tracked.disconnected, cancel))
            await self._cascade(*args)
            return
        if self.watchers is None:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(tracked.watch_disconnect, receive, nursery.cancel_scope)
                await self._cascade(*args)
            return
        self.watchers.start_soon(tracked.watch_disconnect, receive, cancel)
        await self._cascade(*args)

    async def _cascade(
        self,
        face: Dialect,
        gateway: Gateway,
        request: ClientRequest,
        dispatch: Dispatch,
        tracked: TrackedSend,
        delivery: Delivery,
        request_id: str,
    ) -> None:
        try:
            async with dispatch as winner:
                upstream = gateway.dialects[winner.target.provider]
                if request.stream:
                    await self._stream(face, gateway, request, dispatch, winner, tracked,
                                       delivery, request_id)  # fmt: skip
                else:
                    await answer(tracked, winner, request_id, face, upstream, delivery, request)
        except CascadeError as exc:
            failed_on = exc.attempts[-1].provider if exc.attempts else None
            upstream = gateway.dialects[failed_on] if failed_on else face
            await cascade_error(tracked, exc, request_id, face, upstream)

    async def _stream(
        self,
        face: Dialect,
        gateway: Gateway,
        request: ClientRequest,
        dispatch: Dispatch,
        winner: Winner,
        tracked: TrackedSend,
        delivery: Delivery,
        request_id: str,
    ) -> None:
        """Relay the winner's stream in the client's dialect; on a route that resumes, a stream
        that breaks may go on from another target (router/face/resuming.py)."""
        upstream = gateway.dialects[winner.target.provider]
        if delivery.metered:
            delivery.count = upstream.content_chars
        writer = (
            face.stream_writer(request)
            if upstream is face
            else translator(face, upstream).stream(request)
        )
        job = dispatch.run.job
        if job.route.resume is None:
            await stream(tracked, winner, request_id, writer, self.streams, delivery)
            return
        async with AsyncExitStack() as continuations:  # their attempts end with the request
            resumer = Resumer(gateway, face, request, job, dispatch, delivery, continuations)
            writer = resumer.writer(upstream, writer)
            await stream(tracked, winner, request_id, writer, self.streams, delivery, resumer)

    def record(
        self,
        face: Dialect,
        gateway: Gateway,
        parsed: Parsed,
        key: KeyConfig | None,
        request_id: str,
        started: float,
        before_cascade: float,
        dispatch: Dispatch,
        tracked: TrackedSend,
        delivery: Delivery,
    ) -> None:
        """Metrics, the live feed and the log line, for every ending."""
        elapsed = trio.current_time() - started
        status = tracked.status if tracked.finished else 499  # 499: the client left first
        overhead = None
        winner = dispatch.winner
        if delivery.first_byte is not None and winner is not None:
            # Cascade's own time: before the cascade, and from the upstream's first byte to the
            # client's (upstream waits and backoffs are not ours).
            overhead = before_cascade + delivery.first_byte - winner.replied_at
        gateway.metrics.observe_request(parsed.route_name, face.name, status, elapsed, overhead)
        served_by = str(delivery.target) if delivery.target is not None else None
        resumes = delivery.resumes
        tried = resumes.tried if resumes is not None else []
        if self.feed.watching():
            entry: dict[str, object] = {
                "request_id": request_id,
                "route": parsed.route_name,
                "dialect": face.name,
                "status": status,
                "served_by": served_by,
                "ms": round(elapsed * 1000, 1),
                "attempts": [a.to_json() for a in dispatch.attempts],
            }
            if resumes is not None:
                _with_resumes(entry, resumes)
            self.feed.record(entry)
        calls = dispatch.calls + (resumes.calls if resumes is not None else 0)
        if gateway.config.server.log_format == "json":
            log_json(request_id, parsed.route_name, face, status, elapsed, dispatch, key,
                     resumes)  # fmt: skip
        else:
            log.info(
                "request %s%s model=%s route=%s status=%s served_by=%s attempts=%d ms=%.1f%s",
                request_id,
                "" if key is None else f" key={key.name}",
                parsed.request.model,
                parsed.route_name,
                status,
                served_by or "-",
                calls,  # upstream calls made, whether answered, failed or left
                elapsed * 1000,
                "".join(f" resume={t['outcome']}" for t in tried),
            )


def _with_resumes(entry: dict[str, object], resumes: Resumes) -> None:
    """A feed entry with the continuations' attempts and the resumes tried."""
    attempts = entry["attempts"]
    assert isinstance(attempts, list)
    attempts += [a.to_json() for d in resumes.cascades for a in d.attempts]
    entry["resumes"] = resumes.tried


def parse(face: Dialect, gateway: Gateway, scope: Scope, body: bytes, started: float) -> Parsed:
    """The request in the client's dialect, its route (404 for an unknown model) and the
    cascade's deadline (the route's or the server's, shortened by `x-cascade-deadline`)."""
    server = gateway.config.server
    request = face.parse(body)
    resolved = gateway.config.resolve(request.model)
    if resolved is None:
        raise RequestError(
            f"the model {request.model!r} does not exist on this gateway",
            status=404,
            param="model",
            code="model_not_found",
        )
    route_name, route = resolved
    deadline = route.deadline or server.deadline
    asked = header(scope, b"x-cascade-deadline")
    if asked is not None:
        try:
            deadline = min(deadline, parse_duration(asked.decode()))
        except (ValueError, UnicodeDecodeError):
            raise RequestError(
                'x-cascade-deadline must be a duration like "30s" or a number of seconds',
                param="x-cascade-deadline",
            ) from None
    return Parsed(request, route_name, route, started, started + deadline)


def job_for(
    face: Dialect, gateway: Gateway, scope: Scope, parsed: Parsed, request_id: str
) -> ChatJob:
    """What the dispatcher needs: the route, the deadline, and each target's body (built once
    per upstream dialect; a request a target's dialect cannot say is refused here, 400)."""
    forwarded = (
        tuple((k, v) for k, v in scope["headers"] if k in face.forwarded_headers)
        if face.forwarded_headers
        else ()
    )
    request = parsed.request
    bodies = UpstreamBodies(request, face, gateway.dialects, gateway.config.providers, forwarded)
    if gateway.crosses(parsed.route, face):  # translated: is all of it sayable there?
        bodies.check(parsed.route.every_target)
    return ChatJob(
        route_name=parsed.route_name,
        route=parsed.route,
        call_for=bodies.call_for,
        stream=request.stream,
        estimated_tokens=request.estimated_tokens,
        request_id=request_id,
        deadline=parsed.deadline,
    )


def settle(
    gateway: Gateway,
    hold: Hold,
    key: KeyConfig,
    parsed: Parsed,
    tracked: TrackedSend,
    delivery: Delivery,
) -> None:
    """Book what the request cost its key, however it ended (docs/keys-and-budgets.md): the
    usage the provider reported, else an estimate (the content relayed, characters / 4, with
    the input the provider reported before a cut); never more than the request reserved."""
    usage, outcome = Usage(), "refunded"  # no answer, or none of it reached the client
    target = delivery.target if tracked.status else None
    if target is not None:
        usage, outcome = _used(gateway, parsed.request, target, delivery)
    last = usage  # the attempt that streamed last; a resumed stream's earlier ones too:
    if delivery.resumes is not None and (earlier := delivery.resumes.earlier).total:
        usage = Usage(usage.input + earlier.input, usage.output + earlier.output)
    gateway.gate.settle(hold, key, parsed.route_name, target, _capped(usage, hold), outcome)
    if target is not None and outcome == "partial":  # the bill: what the actor could not see
        # (its actor billed what the upstream itself reported before the end: an input at start)
        known_input = gateway.dialects[target.provider].input_at_start
        billed = _capped(last, hold)
        unseen = billed.output + (0 if known_input else billed.input)
        gateway.metrics.bill(target.provider, "failed" if tracked.finished else "cancelled", unseen)


def _used(
    gateway: Gateway, request: ClientRequest, target: Target, delivery: Delivery
) -> tuple[Usage, str]:
    whole = delivery.answer
    if whole is not None:  # a whole answer, handed to the client
        wire = gateway.dialects[target.provider].wire(gateway.config.providers[target.provider])
        found = whole.usage or wire.usage(whole.body)
        return found or Usage(request.estimated_input_tokens, len(whole.body) // 4), "ok"
    reported = delivery.usage
    estimate = delivery.content // 4
    if delivery.completed and reported is not None and (reported.output or not estimate):
        return reported, "ok"
    # A stream cut short, or one whose upstream did not report its output: an estimate
    outcome = "ok" if delivery.completed else "partial"
    if reported is not None and reported.input:  # e.g. Anthropic's message_start, before a cut
        return attrs.evolve(reported, output=estimate), outcome
    return Usage(request.estimated_input_tokens, estimate), outcome


def _capped(usage: Usage, hold: Hold) -> Usage:
    """At most the reservation: the upstream cannot produce more than the request's max_tokens,
    and an estimate must not charge more than the worst case that was admitted."""
    if usage.total <= hold.tokens:
        return usage
    room = int(hold.tokens)
    if usage.input < room:
        return attrs.evolve(usage, output=room - usage.input)
    read = min(usage.cache_read, room)  # the cache parts stay within the input charged
    return Usage(room, 0, read, min(usage.cache_write, room - read))


async def read_in_time(
    server: ServerConfig, scope: Scope, receive: Receive, limit: int | None = None
) -> bytes:
    """The request body, within `server.body_timeout` (408 after it: a client that sends one
    byte and waits must not hold a request, and its fd, forever) and `limit` (413)."""
    body = None
    with trio.move_on_after(server.body_timeout):
        body = await read_body(scope, receive, server.max_body if limit is None else limit)
    if body is None:
        raise _body_timeout(server)
    return body


def _body_timeout(server: ServerConfig) -> RequestError:
    return RequestError(
        f"the request body did not arrive within {server.body_timeout:g} s",
        status=408,
        code="request_timeout",
    )


def log_json(
    request_id: str,
    route: str,
    face: Dialect,
    status: int,
    elapsed: float,
    dispatch: Dispatch,
    key: KeyConfig | None = None,
    resumes: Resumes | None = None,
) -> None:
    """The request's JSON log line: names, numbers and outcomes, never a key or content. A
    resumed stream's attempts are every cascade's, its broken streams' outcome `resumed`."""
    cascades = [dispatch, *(resumes.cascades if resumes is not None else ())]
    attempts: list[dict[str, object]] = []
    for i, cascade in enumerate(cascades):
        attempts += [_attempt(a) for a in cascade.attempts]
        if (winner := cascade.winner) is not None:
            ms = round((winner.replied_at - winner.started) * 1000, 1)
            attempts.append({"provider": winner.target.provider, "model": winner.target.model,
                             "outcome": "ok" if i == len(cascades) - 1 else "resumed",
                             "status": getattr(winner.reply, "status", None), "ms": ms})  # fmt: skip
    winner = next((c.winner for c in reversed(cascades) if c.winner is not None), None)
    fields = {
        "request_id": request_id,
        "key": key.name if key is not None else None,
        "route": route,
        "dialect": face.name,
        "provider": winner.target.provider if winner else None,
        "model": winner.target.model if winner else None,
        "attempts": attempts,
        "calls": sum(c.calls for c in cascades),
        "status": status,
        "ms": round(elapsed * 1000, 1),
    }
    if resumes is not None:
        fields["resumes"] = resumes.tried
    log.info("request %s status=%s", request_id, status, extra={"fields": fields})


def _attempt(a: AttemptRecord) -> dict[str, object]:
    return {"provider": a.provider, "model": a.model, "outcome": a.error_type,
            "status": a.status, "ms": a.elapsed_ms, **({"reason": a.reason} if a.reason else {})}  # fmt: skip


def with_headers(send: Send, extra: list[tuple[bytes, bytes]]) -> Send:
    async def send_with(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message["headers"], *extra]}
        await send(message)

    return send_with
