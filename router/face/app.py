"""The ASGI application: the route table, request ids, errors in the caller's dialect, draining,
and the small endpoints. Model requests go through the one pipeline (router/face/pipeline.py),
the admin API through router/face/admin.py.

A raw ASGI app rather than a framework: Cascade has a handful of endpoints, streams through its
own SSE framing, and its per-request overhead is a product feature (see docs/benchmarks.md).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import trio

from router.config.keys import KeyConfig
from router.dialects import BY_CLIENT_PATH, DIALECTS, anthropic
from router.dialects.base import Dialect
from router.errors import RequestError
from router.face import admin, conversations
from router.face.answers import respond
from router.face.gateway import Gateway
from router.face.pipeline import Pipeline, read_in_time
from router.telemetry.feed import Feed
from router.telemetry.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from router.web.asgi import ClientGone, Message, Receive, Scope, Send, header, lifespan

log = logging.getLogger("cascade.request")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}\Z")
# A draining gateway's answer to new work: the client retries elsewhere, on a new connection
_DRAINING = [(b"retry-after", b"1"), (b"connection", b"close")]

Handler = Callable[["App", Gateway, Scope, Receive, Send, str], Awaitable[None]]


class App:
    """The ASGI callable. `gateway` is read once per request."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        # Set by the server: re-reads the config and swaps the gateway (/admin/reload).
        self.reload: Callable[[], Awaitable[dict[str, Any]]] | None = None
        self.shutting_down = False
        self._stream_cutoff = math.inf
        self._streams: set[trio.CancelScope] = set()
        self._in_flight = 0  # model requests being served
        self._drained = trio.Event()  # set once shutting down with none in flight
        self.feed = Feed()  # recent cascades, recorded only while someone watches
        # Set by a worker's server: tells the other workers of a key made or revoked here
        self.share_key: Callable[[str, dict[str, Any] | None], Awaitable[bool]] | None = None
        self.pipeline = Pipeline(self.feed, self._tracked_stream)

    def begin_shutdown(self, grace: float) -> None:
        """Streams still running `grace` seconds from now end with an in-band error.

        The server gives connections a little longer than `grace`, so that error gets written.
        """
        self.shutting_down = True
        self._stream_cutoff = trio.current_time() + grace
        for scope in self._streams:
            scope.deadline = self._stream_cutoff
        if self._in_flight == 0:
            self._drained.set()

    async def wait_drained(self) -> None:
        """Returns once shutdown has begun and no model request is in flight. Until then the
        server keeps accepting: /readyz answers 503 and new model requests 503 `shutting_down`,
        so a load balancer learns why instead of meeting a refused connection."""
        await self._drained.wait()

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
        path = scope["path"]
        face = BY_CLIENT_PATH.get(path)
        try:
            if face is not None:
                await self._model_request(face, scope, receive, send, request_id)
            else:
                await self._endpoint(path, scope, receive, send, request_id)
        except ClientGone:
            return  # nobody is left to answer
        except RequestError as exc:
            if face is not None:
                self._refused(face, request_id, exc)
            body = _error_shape(face, path).error_body(
                exc.status, exc.message, exc.type, exc.code, exc.param, request_id=request_id
            )
            await respond(send, exc.status, body, request_id, extra=exc.headers)
        except Exception:  # a bug: logged whole, answered in the endpoint's shape, never a crash
            log.exception("request %s failed inside Cascade", request_id)
            body = _error_shape(face, path).error_body(
                500,
                "Cascade failed to handle this request (logged under its request id)",
                "server_error",
                "internal_error",
                request_id=request_id,
            )
            try:
                await respond(send, 500, body, request_id)
            except Exception:
                pass  # the answer had already begun: the server ends the connection

    def _refused(self, face: Dialect, request_id: str, exc: RequestError) -> None:
        """A model request refused before its cascade: counted, and logged at INFO with its
        reason (the message names fields and models, never content or a key)."""
        gateway = self.gateway
        gateway.metrics.count_refused(face.name, exc.status)
        if gateway.config.server.log_format == "json":
            fields = {"request_id": request_id, "route": None, "dialect": face.name,
                      "status": exc.status, "code": exc.code, "param": exc.param,
                      "reason": exc.message}  # fmt: skip
            log.info("request %s status=%s", request_id, exc.status, extra={"fields": fields})
        else:
            log.info(
                "request %s refused status=%s dialect=%s: %s",
                request_id,
                exc.status,
                face.name,
                exc.message,
            )

    async def _model_request(
        self, face: Dialect, scope: Scope, receive: Receive, send: Send, request_id: str
    ) -> None:
        """POST to a face's endpoint (/v1/chat/completions, /v1/messages): the pipeline."""
        gateway = self.gateway
        key: KeyConfig | None = None
        if gateway.keys.enabled:
            key = gateway.gate.authenticate(
                header(scope, b"authorization"), header(scope, b"x-api-key")
            )
        if scope["method"] != "POST":
            raise RequestError("use POST", status=405)
        if self.shutting_down:
            raise RequestError(
                "the gateway is shutting down: retry the request (on another replica)",
                status=503,
                type="server_error",
                code="shutting_down",
                headers=_DRAINING,
            )
        self._in_flight += 1
        try:
            await self.pipeline.serve(face, gateway, scope, receive, send, request_id, key)
        finally:
            self._in_flight -= 1
            if self.shutting_down and self._in_flight == 0:
                self._drained.set()

    async def _endpoint(
        self, path: str, scope: Scope, receive: Receive, send: Send, request_id: str
    ) -> None:
        """Everything but the model endpoints, from the route table (HEAD is GET without a body:
        health checkers use it)."""
        gateway = self.gateway
        if path.startswith("/admin/"):
            admin.check_admin(gateway.config, scope)
        elif path == "/metrics" and gateway.config.server.metrics_token_env is not None:
            admin.check_metrics(gateway.config, scope)
        elif gateway.keys.enabled and path.startswith("/v1/"):
            gateway.gate.authenticate(header(scope, b"authorization"), header(scope, b"x-api-key"))
        method = scope["method"]
        methods = _route(path)
        if methods is None:
            raise RequestError(f"no such endpoint: {method} {path}", status=404, code="not_found")
        handler = methods.get("GET" if method == "HEAD" else method)
        if handler is None:
            raise RequestError(f"use {' or '.join(methods)}", status=405)
        if method == "HEAD":
            send = _without_body(send)
        await handler(self, gateway, scope, receive, send, request_id)

    # --- the small endpoints ------------------------------------------------------------------

    async def count_tokens(
        self, gateway: Gateway, scope: Scope, receive: Receive, send: Send, request_id: str
    ) -> None:
        """POST /v1/messages/count_tokens: an estimate (characters / 4), never a provider call."""
        body = await read_in_time(gateway.config.server, scope, receive)
        tokens = anthropic.count_tokens(body)
        await respond(send, 200, json.dumps({"input_tokens": tokens}).encode(), request_id)

    async def input_tokens(
        self, gateway: Gateway, scope: Scope, receive: Receive, send: Send, request_id: str
    ) -> None:
        """POST /v1/responses/input_tokens: an estimate (characters / 4), never a provider call."""
        body = await read_in_time(gateway.config.server, scope, receive)
        tokens = max(1, len(body) // 4)
        answer = {"object": "response.input_tokens", "input_tokens": tokens}
        await respond(send, 200, json.dumps(answer).encode(), request_id)

    async def stored_response(
        self, gateway: Gateway, scope: Scope, receive: Receive, send: Send, request_id: str
    ) -> None:
        """GET and DELETE /v1/responses/{id}; GET /v1/responses/{id}/input_items."""
        rest = scope["path"][len("/v1/responses/") :]
        response_id, _, tail = rest.partition("/")
        key = None
        if gateway.keys.enabled:
            key = gateway.gate.authenticate(
                header(scope, b"authorization"), header(scope, b"x-api-key")
            )
        stored = await conversations.find(gateway.responses, response_id, key)
        if stored is None or tail not in ("", "input_items"):
            raise RequestError(
                f"No response found with id '{response_id}'.", status=404, code="not_found"
            )
        if scope["method"] == "DELETE":
            await gateway.responses.remove(response_id)
            answer: dict[str, Any] = {"id": response_id, "object": "response", "deleted": True}
        elif tail == "input_items":
            items = [{"id": f"item_{i}", **item} if "id" not in item else item
                     for i, item in enumerate(stored.input_items)]  # fmt: skip
            answer = {
                "object": "list",
                "data": items[::-1],  # newest first, as OpenAI lists them by default
                "first_id": items[-1]["id"] if items else None,
                "last_id": items[0]["id"] if items else None,
                "has_more": False,
            }
        else:
            answer = stored.response
        await respond(send, 200, json.dumps(answer).encode(), request_id)

    async def healthz(
        self, gateway: Gateway, scope: Scope, receive: Receive, send: Send, request_id: str
    ) -> None:
        await respond(send, 200, b'{"status":"ok"}', request_id)

    async def readyz(
        self, gateway: Gateway, scope: Scope, receive: Receive, send: Send, request_id: str
    ) -> None:
        ready = not self.shutting_down
        answer: dict[str, object] = {"status": "ready" if ready else "not ready"}
        if gateway.shared is not None:  # an outage shows here, not in the status: keep serving
            answer["state"] = gateway.shared.status()
        if gateway.metrics.supervisor:  # a worker: its supervisor's figures (a dead one shows)
            answer["workers"] = dict(gateway.metrics.supervisor)
        await respond(send, 200 if ready else 503, json.dumps(answer).encode(), request_id)

    async def models(
        self, gateway: Gateway, scope: Scope, receive: Receive, send: Send, request_id: str
    ) -> None:
        data = [_model(name) for name in gateway.config.model_names()]
        await respond(send, 200, json.dumps({"object": "list", "data": data}).encode(), request_id)

    async def model(
        self, gateway: Gateway, scope: Scope, receive: Receive, send: Send, request_id: str
    ) -> None:
        """GET /v1/models/{id} (the SDKs' models.retrieve): any model a route or provider serves."""
        name = scope["path"][len("/v1/models/") :]
        if gateway.config.resolve(name) is None:
            raise RequestError(
                f"the model {name!r} does not exist on this gateway",
                status=404,
                param="model",
                code="model_not_found",
            )
        await respond(send, 200, json.dumps(_model(name)).encode(), request_id)

    async def metrics(
        self, gateway: Gateway, scope: Scope, receive: Receive, send: Send, request_id: str
    ) -> None:
        await admin.refresh_budget_gauges(gateway)  # with Redis: the deployment's, at scrape
        body = gateway.metrics.render()
        await respond(send, 200, body, request_id, METRICS_CONTENT_TYPE.encode())


# The route table: path -> method -> handler; then the paths with a name in them, by prefix and
# suffix. The model endpoints are the faces' own paths (router/dialects: BY_CLIENT_PATH).
ROUTES: dict[str, dict[str, Handler]] = {
    "/healthz": {"GET": App.healthz},
    "/readyz": {"GET": App.readyz},
    "/metrics": {"GET": App.metrics},
    "/v1/models": {"GET": App.models},
    "/v1/messages/count_tokens": {"POST": App.count_tokens},
    "/v1/responses/input_tokens": {"POST": App.input_tokens},
    "/admin/ui": {"GET": admin.ui},
    "/admin/status": {"GET": admin.status},
    "/admin/providers": {"GET": admin.providers},
    "/admin/reload": {"POST": admin.reload},
    "/admin/keys": {"GET": admin.keys, "POST": admin.create_key},
    "/admin/usage": {"GET": admin.usage},
}
NAMED: tuple[tuple[str, str, dict[str, Handler]], ...] = (
    ("/v1/models/", "", {"GET": App.model}),
    ("/v1/responses/", "/input_items", {"GET": App.stored_response}),
    ("/v1/responses/", "", {"GET": App.stored_response, "DELETE": App.stored_response}),
    ("/admin/keys/", "/revoke", {"POST": admin.revoke_key}),
    ("/admin/providers/", "/block", {"POST": admin.manual_block}),
    ("/admin/providers/", "/unblock", {"POST": admin.manual_block}),
)


def _route(path: str) -> dict[str, Handler] | None:
    found = ROUTES.get(path)
    if found is not None:
        return found
    for prefix, suffix, methods in NAMED:
        if path.startswith(prefix) and path.endswith(suffix) and len(path) > len(prefix + suffix):
            return methods
    return None


def _model(name: str) -> dict[str, object]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "cascade"}


def _without_body(send: Send) -> Send:
    async def send_head(message: Message) -> None:
        if message["type"] == "http.response.body":
            message = {**message, "body": b""}
        await send(message)

    return send_head


def _error_shape(dialect: Dialect | None, path: str) -> Dialect:
    """The dialect whose error shape a path answers in: its own on a model endpoint, else
    Anthropic's on its paths and OpenAI's everywhere else."""
    return dialect or DIALECTS["anthropic" if path.startswith("/v1/messages") else "openai"]


def _request_id(scope: Scope) -> str:
    given = header(scope, b"x-request-id")
    if given is not None:
        text = given.decode("latin-1")
        if _REQUEST_ID.match(text):
            return text
    return os.urandom(16).hex()  # as random as uuid4().hex, at a fifth of the cost
