"""The ASGI application: endpoints, request ids, body limits, and the client side of a cascade.

A raw ASGI app rather than a framework: Cascade has a handful of endpoints, streams through its
own SSE framing, and its per-request overhead is a product feature (see docs/benchmarks.md).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import math
import os
import re
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING

import trio
import trio.lowlevel

from actors.messages import (
    Failed,
    Reply,
    Response,
    StreamEnd,
    StreamEvents,
    StreamStart,
)
from router.cascade.dispatcher import CascadeError, ChatJob, Winner
from router.config import Config, ConfigError
from router.dialects import openai
from router.errors import RequestError
from router.face.asgi import ClientGone, Message, Receive, Scope, Send, header, lifespan, read_body
from router.ops.gateway import Gateway
from router.ops.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from router.units import parse_duration

if TYPE_CHECKING:
    from router.ops.reload import Reloader

log = logging.getLogger("cascade.request")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_JSON = b"application/json"


class App:
    """The ASGI callable. `gateway` is read once per request."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.reloader: Reloader | None = None  # set by the server: /admin/reload
        self.shutting_down = False
        self._stream_cutoff = math.inf
        self._streams: set[trio.CancelScope] = set()

    def begin_shutdown(self, grace: float) -> None:
        """Streams still running `grace` seconds from now end with an in-band error.

        The server gives connections a little longer than `grace`, so that error gets written.
        """
        self.shutting_down = True
        self._stream_cutoff = trio.current_time() + grace
        for scope in self._streams:
            scope.deadline = self._stream_cutoff

    @contextmanager
    def _tracked_stream(self) -> Iterator[trio.CancelScope]:
        with trio.CancelScope(deadline=self._stream_cutoff) as scope:
            self._streams.add(scope)
            try:
                yield scope
            finally:
                self._streams.discard(scope)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        request_id = _request_id(scope)
        gateway = self.gateway
        path = scope["path"]
        method = scope["method"]
        try:
            if path.startswith("/admin/"):
                _check_admin(gateway.config, scope)
            if path == "/v1/chat/completions":
                if method != "POST":
                    raise RequestError("use POST", status=405, type="invalid_request_error")
                await self._chat(gateway, scope, receive, send, request_id)
            elif path == "/admin/reload":
                if method != "POST":
                    raise RequestError("use POST", status=405, type="invalid_request_error")
                await self._reload(send, request_id)
            elif method != "GET" or path not in _GET_ROUTES:
                raise RequestError(
                    f"no such endpoint: {method} {path}", status=404, code="not_found"
                )
            else:
                await _GET_ROUTES[path](self, gateway, send, request_id)
        except ClientGone:
            return  # nobody is left to answer
        except RequestError as exc:
            body = openai.error_body(exc.message, exc.type, exc.code, exc.param)
            await _respond(send, exc.status, body, request_id)

    # --- chat completions ---------------------------------------------------------------------

    async def _chat(
        self, gateway: Gateway, scope: Scope, receive: Receive, send: Send, request_id: str
    ) -> None:
        started = trio.current_time()
        server = gateway.config.server
        # A client that sends one byte and waits must not hold a request (and its fd) forever.
        body = None
        with trio.move_on_after(server.body_timeout):
            body = await read_body(scope, receive, server.max_body)
        if body is None:
            raise RequestError(
                f"the request body did not arrive within {server.body_timeout:g} s",
                status=408,
                code="request_timeout",
            )
        chat = openai.parse_chat_request(body)
        resolved = gateway.config.resolve(chat.model)
        if resolved is None:
            raise RequestError(
                f"the model {chat.model!r} does not exist on this gateway",
                status=404,
                param="model",
                code="model_not_found",
            )
        route_name, route = resolved
        deadline = route.deadline or gateway.config.server.deadline
        asked = header(scope, b"x-cascade-deadline")
        if asked is not None:
            try:
                deadline = min(deadline, parse_duration(asked.decode()))
            except (ValueError, UnicodeDecodeError):
                raise RequestError(
                    'x-cascade-deadline must be a duration like "30s"', param="x-cascade-deadline"
                ) from None
        job = ChatJob(
            route_name=route_name,
            route=route,
            body_for=chat.body_for,
            path="/chat/completions",
            stream=chat.stream,
            estimated_tokens=chat.estimated_tokens,
            request_id=request_id,
            deadline=started + deadline,
            check_start=openai.check_start if chat.stream else None,
        )
        tracked = _TrackedSend(send)
        served_by = "-"
        attempts = 0
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(tracked.watch_disconnect, receive, nursery.cancel_scope)
                try:
                    async with gateway.dispatcher.dispatch(job) as winner:
                        served_by = str(winner.target)
                        attempts = winner.attempt_count
                        if chat.stream:
                            await _stream(tracked, winner, request_id, self._tracked_stream)
                        else:
                            await _answer(tracked, winner, request_id)
                except CascadeError as exc:
                    attempts = exc.calls
                    await _cascade_error(tracked, exc, request_id)
                # The answer is complete, so the server now reports http.disconnect (the ASGI
                # spec's answer to any receive() after a response; hypercorn queues it during the
                # last send) and the watcher returns on it by itself. Cancelling it instead would
                # unwind a Cancelled through its frames: ~4% of a request's CPU.
        finally:
            elapsed = trio.current_time() - started
            status = tracked.status if tracked.finished else 499  # 499: the client left first
            gateway.metrics.observe_request(route_name, status, elapsed)
            log.info(
                "request %s model=%s route=%s status=%s served_by=%s attempts=%d ms=%.1f",
                request_id,
                chat.model,
                route_name,
                status,
                served_by,
                attempts,
                elapsed * 1000,
            )

    # --- operations endpoints -------------------------------------------------------------------

    async def _healthz(self, gateway: Gateway, send: Send, request_id: str) -> None:
        await _respond(send, 200, b'{"status":"ok"}', request_id)

    async def _readyz(self, gateway: Gateway, send: Send, request_id: str) -> None:
        ready = not self.shutting_down
        body = b'{"status":"ready"}' if ready else b'{"status":"not ready"}'
        await _respond(send, 200 if ready else 503, body, request_id)

    async def _models(self, gateway: Gateway, send: Send, request_id: str) -> None:
        data = [
            {"id": name, "object": "model", "created": 0, "owned_by": "cascade"}
            for name in gateway.config.model_names()
        ]
        await _respond(send, 200, json.dumps({"object": "list", "data": data}).encode(), request_id)

    async def _metrics(self, gateway: Gateway, send: Send, request_id: str) -> None:
        await _respond(
            send, 200, gateway.metrics.render(), request_id, METRICS_CONTENT_TYPE.encode()
        )

    async def _reload(self, send: Send, request_id: str) -> None:
        if self.reloader is None or self.shutting_down:
            raise RequestError("reload is not available now", status=503, code="unavailable")
        try:
            summary = await self.reloader.reload()
        except ConfigError as exc:
            body = openai.error_body(
                "the new config is invalid; still serving the previous one",
                "invalid_config",
                "invalid_config",
                problems=exc.problems,
            )
            await _respond(send, 400, body, request_id)
            return
        await _respond(send, 200, json.dumps(summary).encode(), request_id)

    async def _providers(self, gateway: Gateway, send: Send, request_id: str) -> None:
        snapshots = [await actor.ask_snapshot() for actor in gateway.actors.values()]
        body = json.dumps({"providers": [s.to_json() for s in snapshots]}).encode()
        await _respond(send, 200, body, request_id)


_GET_ROUTES: dict[str, Callable[[App, Gateway, Send, str], Awaitable[None]]] = {
    "/healthz": App._healthz,
    "/readyz": App._readyz,
    "/v1/models": App._models,
    "/metrics": App._metrics,
    "/admin/providers": App._providers,
}


# --- helpers -----------------------------------------------------------------------------------


def _check_admin(config: Config, scope: Scope) -> None:
    """/admin/* needs `Authorization: Bearer <token>` when server.admin_token_env is set, and
    answers only loopback clients when it is not (an operator on the machine itself)."""
    env = config.server.admin_token_env
    if env is None:
        client = scope.get("client")
        if client is None or not _is_loopback(client[0]):
            raise RequestError(
                "the admin API answers only loopback clients unless server.admin_token_env is set",
                status=403,
                type="permission_error",
            )
        return
    token = os.environ.get(env)
    scheme, _, given = (header(scope, b"authorization") or b"").partition(b" ")
    if (
        not token
        or scheme.lower() != b"bearer"  # the scheme is case-insensitive (RFC 9110 11.1)
        or not hmac.compare_digest(given.strip(), token.encode())
    ):
        raise RequestError(
            "the admin API needs the admin token", status=401, type="authentication_error"
        )


def _is_loopback(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # a unix socket path or a name: not an address we can vouch for
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def _request_id(scope: Scope) -> str:
    given = header(scope, b"x-request-id")
    if given is not None:
        text = given.decode("latin-1")
        if _REQUEST_ID.match(text):
            return text
    return os.urandom(16).hex()  # as random as uuid4().hex, at a fifth of the cost


class _TrackedSend:
    """Wraps ASGI `send` to know the status sent and whether the response is complete."""

    __slots__ = ("finished", "send", "status")

    def __init__(self, send: Send) -> None:
        self.send = send
        self.status = 0
        self.finished = False

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        elif not message.get("more_body"):
            self.finished = True
        await self.send(message)

    async def watch_disconnect(self, receive: Receive, scope: trio.CancelScope) -> None:
        """Cancel the request when the client goes away, even while nothing is being written.

        The server also reports a disconnect once a response is complete; that one is ignored.
        """
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if not self.finished:
                    scope.cancel()
                return


def _base_headers(request_id: str, content_type: bytes = _JSON) -> list[tuple[bytes, bytes]]:
    return [(b"content-type", content_type), (b"x-request-id", request_id.encode())]


def _served_headers(winner: Winner) -> list[tuple[bytes, bytes]]:
    return [
        (b"x-cascade-provider", winner.target.provider.encode()),
        (b"x-cascade-model", winner.target.model.encode()),
        (b"x-cascade-attempts", str(winner.attempt_count).encode()),
    ]


async def _respond(
    send: Send,
    status: int,
    body: bytes,
    request_id: str,
    content_type: bytes = _JSON,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    headers = _base_headers(request_id, content_type)
    headers.append((b"content-length", str(len(body)).encode()))
    if extra:
        headers.extend(extra)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _answer(send: Send, winner: Winner, request_id: str) -> None:
    reply = winner.reply
    assert isinstance(reply, Response)
    content_type = reply.headers.get("content-type", "application/json").encode()
    extra = _served_headers(winner)
    encoding = reply.headers.get("content-encoding")
    if encoding:  # asked for identity, but an upstream may compress anyway: say so
        extra.append((b"content-encoding", encoding.encode()))
    await _respond(send, reply.status, reply.body, request_id, content_type, extra)


async def _stream(
    send: Send,
    winner: Winner,
    request_id: str,
    tracked: Callable[[], AbstractContextManager[trio.CancelScope]],
) -> None:
    """Relay a committed stream; it ends with [DONE] or, on any failure, an in-band error."""
    start = winner.reply
    assert isinstance(start, StreamStart)
    headers = _base_headers(request_id, b"text/event-stream")
    headers += [(b"cache-control", b"no-cache"), *_served_headers(winner)]
    await send({"type": "http.response.start", "status": start.status, "headers": headers})
    sse = openai.StreamFilter()
    good, _ = sse.check(start.events)
    tail = [openai.frame(good)]
    upstream_done = False
    if sse.done:
        ending = openai.DONE_FRAME
    else:
        await send({"type": "http.response.body", "body": tail.pop(), "more_body": True})
        with tracked() as cutoff:
            ending, upstream_done = await _relay(send, sse, winner.replies, tail)
        if cutoff.cancelled_caught:
            ending = openai.stream_error_frame("the gateway is shutting down", "shutting_down")
            upstream_done = True  # nothing more to wait for: the attempt is cancelled
    await send(
        {"type": "http.response.body", "body": b"".join([*tail, ending]), "more_body": False}
    )
    if not upstream_done:
        # The client has its [DONE]. Let the upstream finish its body, so the attempt ends as the
        # success it was (the actor learns its latency, closes a probing circuit) instead of as a
        # cancellation. Upstreams close right after [DONE]; the bound covers those that do not.
        with trio.move_on_after(_UPSTREAM_END_GRACE):
            while not isinstance(await winner.replies.receive(), StreamEnd | Failed):
                pass


_UPSTREAM_END_GRACE = 2.0


async def _relay(
    send: Send,
    sse: openai.StreamFilter,
    replies: trio.MemoryReceiveChannel[Reply],
    tail: list[bytes],
) -> tuple[bytes, bool]:
    """Forward events until the stream ends.

    Returns the closing frame ([DONE] or an in-band error) and whether the upstream attempt has
    ended too (it has not when its [DONE] arrived before the end of its body). Events already
    queued when one arrives go out in the same write (coalescing); the events that belong with the
    ending are left in `tail`, to be written together with it.
    """
    while True:
        batch = [await replies.receive()]
        await _gather_burst(replies, batch)
        upstream_done = isinstance(batch[-1], StreamEnd | Failed)
        out: list[bytes] = []
        for reply in batch:
            if isinstance(reply, StreamEvents):
                good, error = sse.check(reply.events)
                out.append(openai.frame(good))
                if error is not None:
                    tail.extend(out)
                    message = str(error.get("message", "upstream error"))
                    return openai.stream_error_frame(
                        message, "upstream_stream_error"
                    ), upstream_done
                if sse.done:
                    tail.extend(out)
                    return openai.DONE_FRAME, upstream_done
            elif isinstance(reply, StreamEnd):
                tail.extend(out)
                return openai.DONE_FRAME, True  # finalise even when upstream sent no [DONE]
            elif isinstance(reply, Failed):
                tail.extend(out)
                failure = reply.failure
                message = f"the upstream stream failed after it began: {failure.message}"
                return openai.stream_error_frame(message, failure.error_type), True
        await send({"type": "http.response.body", "body": b"".join(out), "more_body": True})


_BURST_ROUNDS = 4


async def _gather_burst(replies: trio.MemoryReceiveChannel[Reply], batch: list[Reply]) -> None:
    """Coalescing: add the replies that arrive while the scheduler runs a few rounds.

    A burst of upstream events lands in several socket reads; one scheduling round each lets the
    actor read the rest, so the burst leaves in one write instead of one write per event. It stops
    at the first round that brings nothing, so a lone event waits only one round (microseconds).
    """
    for _ in range(_BURST_ROUNDS):
        await trio.lowlevel.checkpoint()
        before = len(batch)
        while True:
            try:
                batch.append(replies.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                break
        if len(batch) == before or isinstance(batch[-1], StreamEnd | Failed):
            return


async def _cascade_error(send: Send, exc: CascadeError, request_id: str) -> None:
    extra = [(b"x-cascade-attempts", str(exc.calls).encode())]
    if exc.retry_after is None:
        # Cascade has retried what could be retried: the SDKs' own retries (two by default, on
        # 408/409/429/5xx) would only run the whole cascade again. Every target rate limited,
        # with a known end, is the exception: waiting Retry-After and trying again is right.
        extra.append((b"x-should-retry", b"false"))
    if exc.upstream is not None:
        upstream = exc.upstream
        content_type = upstream.headers.get("content-type", "application/json").encode()
        await _respond(send, upstream.status, upstream.body, request_id, content_type, extra)
        return
    if exc.retry_after is not None:
        extra.append((b"retry-after", str(max(1, math.ceil(exc.retry_after))).encode()))
    body = openai.error_body(
        exc.message,
        exc.error_type,
        exc.error_type,
        attempts=[a.to_json() for a in exc.attempts],
    )
    await _respond(send, exc.status, body, request_id, extra=extra)
