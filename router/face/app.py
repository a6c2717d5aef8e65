"""The ASGI application: endpoints, request ids, body limits, and the client side of a cascade.

A raw ASGI app rather than a framework: Cascade has a handful of endpoints, streams through its
own SSE framing, and its per-request overhead is a product feature (see docs/benchmarks.md).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import os
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

import attrs
import trio
import trio.lowlevel

from actors.messages import ManualBlock, ManualUnblock, Response
from actors.settings import ProviderConfig
from actors.wire import Usage
from router.cascade.dispatcher import CascadeError, ChatJob, Dispatch, Winner
from router.config import Config, ConfigError, Route, ServerConfig, Target, parse_key
from router.config.keys import KeyConfig
from router.dialects import BY_CLIENT_PATH, DIALECTS, anthropic
from router.dialects.base import ClientRequest, Dialect, UpstreamCall
from router.dialects.jsonbody import check_model_name
from router.errors import RequestError
from router.face.answers import TrackedSend, answer, cascade_error, respond, stream
from router.face.gateway import Gateway
from router.keys.ledger import Charge
from router.keys.ring import presented_key
from router.state.budgets import Hold
from router.telemetry.feed import Feed
from router.telemetry.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from router.units import parse_duration
from router.web.asgi import ClientGone, Message, Receive, Scope, Send, header, lifespan, read_body

log = logging.getLogger("cascade.request")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_JSON = b"application/json"


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
        gateway = self.gateway
        key: KeyConfig | None = None
        path = scope["path"]
        method = scope["method"]
        dialect = BY_CLIENT_PATH.get(path)
        try:
            if path.startswith("/admin/"):
                _check_admin(gateway.config, scope)
            elif path == "/metrics" and gateway.config.server.metrics_token_env is not None:
                _check_metrics(gateway.config, scope)
            elif gateway.keys.enabled and path.startswith("/v1/"):  # every model endpoint
                key = _client_key(gateway, scope)
            if dialect is not None:
                if method != "POST":
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
                    await self._chat(dialect, gateway, scope, receive, send, request_id, key)
                finally:
                    self._in_flight -= 1
                    if self.shutting_down and self._in_flight == 0:
                        self._drained.set()
            elif path == "/v1/messages/count_tokens":
                if method != "POST":
                    raise RequestError("use POST", status=405)
                await self._count_tokens(gateway, scope, receive, send, request_id)
            elif path == "/admin/reload":
                if method != "POST":
                    raise RequestError("use POST", status=405)
                await self._reload(send, request_id)
            elif path == "/admin/keys" and method == "POST":
                await self._create_key(gateway, scope, receive, send, request_id)
            elif path.startswith("/admin/keys/") and path.endswith("/revoke"):
                if method != "POST":
                    raise RequestError("use POST", status=405)
                await self._revoke_key(
                    gateway, path[len("/admin/keys/") : -len("/revoke")], send, request_id
                )
            elif path.startswith("/admin/providers/") and path.endswith(("/block", "/unblock")):
                if method != "POST":
                    raise RequestError("use POST", status=405)
                await self._manual_block(gateway, scope, receive, send, request_id)
            elif method not in ("GET", "HEAD"):
                raise RequestError(
                    f"no such endpoint: {method} {path}", status=404, code="not_found"
                )
            else:
                if method == "HEAD":  # as GET, without the body (health checkers use HEAD)
                    send = _without_body(send)
                if path == "/admin/status":
                    await self._status(gateway, scope, send, request_id)
                elif path == "/admin/usage":
                    await self._usage(gateway, scope, send, request_id)
                elif path == "/admin/ui":
                    await respond(
                        send, 200, STATUS_PAGE, request_id, b"text/html; charset=utf-8", _PAGE
                    )
                elif path in _GET_ROUTES:
                    await _GET_ROUTES[path](self, gateway, send, request_id)
                elif path.startswith("/v1/models/") and len(path) > len("/v1/models/"):
                    await self._model(gateway, path[len("/v1/models/") :], send, request_id)
                else:
                    raise RequestError(
                        f"no such endpoint: {method} {path}", status=404, code="not_found"
                    )
        except ClientGone:
            return  # nobody is left to answer
        except RequestError as exc:
            body = _error_shape(dialect, path).error_body(
                exc.status, exc.message, exc.type, exc.code, exc.param, request_id=request_id
            )
            await respond(send, exc.status, body, request_id, extra=exc.headers)
        except Exception:  # a bug: logged whole, answered in the endpoint's shape, never a crash
            log.exception("request %s failed inside Cascade", request_id)
            body = _error_shape(dialect, path).error_body(
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

    # --- chat completions ---------------------------------------------------------------------

    async def _chat(
        self,
        dialect: Dialect,
        gateway: Gateway,
        scope: Scope,
        receive: Receive,
        send: Send,
        request_id: str,
        key: KeyConfig | None = None,
    ) -> None:
        started = trio.current_time()
        server = gateway.config.server
        body = await _read_in_time(server, scope, receive)
        request = dialect.parse(body)
        resolved = gateway.config.resolve(request.model)
        if resolved is None:
            raise RequestError(
                f"the model {request.model!r} does not exist on this gateway",
                status=404,
                param="model",
                code="model_not_found",
            )
        if key is not None:
            send = _key_limits(gateway, key, request.model, request.estimated_tokens, send)
            if key.budgets and request.stream:
                request = request.asking_usage()  # the exact usage, to settle the budget with
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
        providers = gateway.config.providers
        if gateway.dialects_of(route) != {dialect.name}:  # translation: is it all sayable?
            _check_translation(request, route, providers, dialect)
        forwarded = (
            tuple((k, v) for k, v in scope["headers"] if k in dialect.forwarded_headers)
            if dialect.forwarded_headers
            else ()
        )

        def call_for(target: Target) -> UpstreamCall:
            provider = providers[target.provider]
            upstream = DIALECTS[provider.dialect]
            call = request.call_for(upstream, target.model, provider)
            if forwarded and upstream is dialect:  # to providers of the client's dialect only
                return attrs.evolve(call, headers=forwarded)
            return call

        job = ChatJob(
            route_name=route_name,
            route=route,
            call_for=call_for,
            stream=request.stream,
            estimated_tokens=request.estimated_tokens,
            request_id=request_id,
            deadline=started + deadline,
        )
        tracked = TrackedSend(send)
        served_by = "-"
        overhead: float | None = None
        winner_of: Winner | None = None
        dispatch = gateway.dispatcher.dispatch(job)
        hold = None
        if key is not None and key.budgets:  # last thing before the try: its finally settles
            hold = await _reserve(gateway, key, request, route)
        before_cascade = trio.current_time() - started
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(tracked.watch_disconnect, receive, nursery.cancel_scope)
                try:
                    async with dispatch as winner:
                        winner_of = winner
                        served_by = str(winner.target)
                        upstream = DIALECTS[providers[winner.target.provider].dialect]
                        if request.stream:
                            writer = dialect.stream_writer(upstream, request)
                            written = await stream(
                                tracked, winner, request_id, writer, self._tracked_stream
                            )
                        else:
                            written = await answer(tracked, winner, request_id, dialect, upstream)
                        # Cascade's own time: before the cascade, and from the upstream's first
                        # byte to the client's (upstream waits and backoffs are not ours).
                        overhead = before_cascade + written - winner.replied_at
                except CascadeError as exc:
                    failed_on = exc.attempts[-1].provider if exc.attempts else None
                    upstream = DIALECTS[providers[failed_on].dialect] if failed_on else dialect
                    await cascade_error(tracked, exc, request_id, dialect, upstream)
                # The answer is complete, so the server now reports http.disconnect (the ASGI
                # spec's answer to any receive() after a response; hypercorn queues it during the
                # last send) and the watcher returns on it by itself. Cancelling it instead would
                # unwind a Cancelled through its frames: ~4% of a request's CPU.
        finally:
            if hold is not None:
                _settle(gateway, hold, request, route_name, winner_of, tracked, key)
            elapsed = trio.current_time() - started
            status = tracked.status if tracked.finished else 499  # 499: the client left first
            gateway.metrics.observe_request(route_name, dialect.name, status, elapsed, overhead)
            if self.feed.watching():
                self.feed.record(
                    {
                        "request_id": request_id,
                        "route": route_name,
                        "dialect": dialect.name,
                        "status": status,
                        "served_by": served_by if winner_of is not None else None,
                        "ms": round(elapsed * 1000, 1),
                        "attempts": [a.to_json() for a in dispatch.attempts],
                    }
                )
            if server.log_format == "json":
                _log_json(
                    request_id, route_name, dialect, status, elapsed, dispatch, winner_of, key
                )
            else:
                log.info(
                    "request %s%s model=%s route=%s status=%s served_by=%s attempts=%d ms=%.1f",
                    request_id,
                    "" if key is None else f" key={key.name}",
                    request.model,
                    route_name,
                    status,
                    served_by,
                    dispatch.calls,  # upstream calls made, whether answered, failed or left
                    elapsed * 1000,
                )

    async def _count_tokens(
        self, gateway: Gateway, scope: Scope, receive: Receive, send: Send, request_id: str
    ) -> None:
        """POST /v1/messages/count_tokens: an estimate (characters / 4), never a provider call."""
        body = await _read_in_time(gateway.config.server, scope, receive)
        tokens = anthropic.count_tokens(body)
        await respond(send, 200, json.dumps({"input_tokens": tokens}).encode(), request_id)

    # --- operations endpoints -------------------------------------------------------------------

    async def _healthz(self, gateway: Gateway, send: Send, request_id: str) -> None:
        await respond(send, 200, b'{"status":"ok"}', request_id)

    async def _readyz(self, gateway: Gateway, send: Send, request_id: str) -> None:
        ready = not self.shutting_down
        answer: dict[str, object] = {"status": "ready" if ready else "not ready"}
        if gateway.shared is not None:  # an outage shows here, not in the status: keep serving
            answer["state"] = gateway.shared.status()
        if gateway.metrics.supervisor:  # a worker: its supervisor's figures (a dead one shows)
            answer["workers"] = dict(gateway.metrics.supervisor)
        await respond(send, 200 if ready else 503, json.dumps(answer).encode(), request_id)

    async def _models(self, gateway: Gateway, send: Send, request_id: str) -> None:
        data = [_model(name) for name in gateway.config.model_names()]
        await respond(send, 200, json.dumps({"object": "list", "data": data}).encode(), request_id)

    async def _model(self, gateway: Gateway, name: str, send: Send, request_id: str) -> None:
        """GET /v1/models/{id} (the SDKs' models.retrieve): any model a route or provider serves."""
        if gateway.config.resolve(name) is None:
            raise RequestError(
                f"the model {name!r} does not exist on this gateway",
                status=404,
                param="model",
                code="model_not_found",
            )
        await respond(send, 200, json.dumps(_model(name)).encode(), request_id)

    async def _metrics(self, gateway: Gateway, send: Send, request_id: str) -> None:
        await respond(
            send, 200, gateway.metrics.render(), request_id, METRICS_CONTENT_TYPE.encode()
        )

    async def _reload(self, send: Send, request_id: str) -> None:
        if self.reload is None or self.shutting_down:
            raise RequestError("reload is not available now", status=503, code="unavailable")
        try:
            summary = await self.reload()
        except ConfigError as exc:
            body = DIALECTS["openai"].error_body(
                400,
                "the new config is invalid; still serving the previous one",
                "invalid_config",
                "invalid_config",
                problems=exc.problems,
            )
            await respond(send, 400, body, request_id)
            return
        await respond(send, 200, json.dumps(summary).encode(), request_id)

    async def _manual_block(
        self, gateway: Gateway, scope: Scope, receive: Receive, send: Send, request_id: str
    ) -> None:
        """POST /admin/providers/{name}/block {"duration", "model"?, "reason"?} and /unblock
        {"model"?}: an operator takes a provider (or one of its models) out, or puts it back."""
        name, _, action = scope["path"][len("/admin/providers/") :].rpartition("/")
        actor = gateway.actors.get(name)
        if actor is None:
            raise RequestError(f"no provider {name!r}", status=404, code="not_found")
        body = await _read_in_time(gateway.config.server, scope, receive, 64 * 1024)
        try:
            fields = json.loads(body) if body.strip() else {}
        except ValueError:
            fields = None
        if not isinstance(fields, dict):
            raise RequestError("the body must be a JSON object")
        model = fields.get("model")
        if model is not None and not isinstance(model, str):
            raise RequestError("'model' must be a string", param="model")
        if model is not None:
            check_model_name(model)
        if action == "unblock":
            await actor.inbox.send(ManualUnblock(model))
        else:
            try:
                duration = parse_duration(fields.get("duration"))
            except ValueError:
                raise RequestError(
                    "'duration' is required: a duration like \"10m\" or a number of seconds",
                    param="duration",
                ) from None
            reason = fields.get("reason", "blocked by an operator")
            if not isinstance(reason, str) or len(reason) > 200 or not reason.isprintable():
                raise RequestError("'reason' must be printable text of at most 200 characters")
            until = trio.current_time() + duration
            await actor.inbox.send(ManualBlock(model, until, reason))
        snapshot = await actor.ask_snapshot()  # answered after the message above: it shows it
        await respond(send, 200, json.dumps(snapshot.to_json()).encode(), request_id)

    async def _status(self, gateway: Gateway, scope: Scope, send: Send, request_id: str) -> None:
        """GET /admin/status?after=N: every provider actor's state, every route with its targets
        in order and the one that served last, and the cascades since N (the live feed)."""
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        try:
            after = int(query.get("after", ["0"])[0])
        except ValueError:
            raise RequestError("'after' must be an integer", param="after") from None
        snapshots = [(await actor.ask_snapshot()).to_json() for actor in gateway.actors.values()]
        for snapshot in snapshots:
            provider = gateway.config.providers[str(snapshot["name"])]
            snapshot["dialect"] = provider.dialect
            snapshot["rpm_limit"], snapshot["tpm_limit"] = provider.limits.rpm, provider.limits.tpm
        routes = [
            {
                "match": route.match,
                "targets": [str(t) for t in route.targets],
                "alternatives": [str(t) for t in route.alternatives],
                "serving": self.feed.serving.get(route.match),
            }
            for route in gateway.config.routes
        ]
        body = {"providers": snapshots, "routes": routes, "recent": self.feed.read(after)}
        await respond(send, 200, json.dumps(body).encode(), request_id)

    async def _create_key(
        self, gateway: Gateway, scope: Scope, receive: Receive, send: Send, request_id: str
    ) -> None:
        """POST /admin/keys {name, models, rpm, tpm, budgets}: a new client key, shown in this
        answer only; Cascade keeps its SHA-256 (in auth.usage_db, when set)."""
        body = await _read_in_time(gateway.config.server, scope, receive)
        try:
            raw = json.loads(body)
        except ValueError:
            raise RequestError("the body must be a JSON object") from None
        if not isinstance(raw, dict) or {"key", "key_env", "sha256"} & raw.keys():
            raise RequestError("give name, models, rpm, tpm, budgets: Cascade makes the key")
        secret = "sk-cascade-" + secrets.token_urlsafe(32)
        settings = {**raw, "sha256": hashlib.sha256(secret.encode()).hexdigest()}
        try:
            key = parse_key(settings, gateway.keys.names())
        except ConfigError as exc:
            raise RequestError("; ".join(exc.problems)) from None
        store = gateway.ledger.store
        if store is not None:
            await trio.to_thread.run_sync(store.save_key, key.name, settings)
        gateway.ledger.runtime_keys[key.name] = settings
        gateway.keys.add(key)
        log.warning("client key %s created through the admin API", key.name)
        answer = {
            "name": key.name,
            "key": secret,
            "note": "shown once: Cascade keeps only its SHA-256"
            + ("" if store is not None else " (in memory: set auth.usage_db to keep it)"),
        }
        await respond(send, 201, json.dumps(answer).encode(), request_id)

    async def _revoke_key(self, gateway: Gateway, name: str, send: Send, request_id: str) -> None:
        """POST /admin/keys/{name}/revoke: a key created through the API stops working now."""
        if name in {k.name for k in gateway.config.auth.keys}:
            raise RequestError(
                f"the key {name!r} is defined in the config file: remove it there and reload",
                status=409,
            )
        if not gateway.keys.revoke(name):
            raise RequestError(f"no key named {name!r}", status=404, code="not_found")
        gateway.ledger.runtime_keys.pop(name, None)
        store = gateway.ledger.store
        if store is not None:
            await trio.to_thread.run_sync(store.revoke_key, name)
        log.warning("client key %s revoked through the admin API", name)
        await respond(send, 200, json.dumps({"name": name, "revoked": True}).encode(), request_id)

    async def _keys(self, gateway: Gateway, send: Send, request_id: str) -> None:
        """GET /admin/keys: every key's limits, spend this period and what is reserved now."""
        now = dt.datetime.now(dt.UTC)
        ledger = gateway.ledger
        keys = []
        configured = gateway.config.auth.keys
        for key in (*configured, *gateway.keys.runtime.values()):
            tokens, cost = ledger.reserved(key.name)
            keys.append(
                {
                    "name": key.name,
                    "source": "config" if key in configured else "admin API",
                    "models": list(key.models),
                    "rpm": key.rpm,
                    "tpm": key.tpm,
                    "budgets": [
                        {
                            "unit": b.unit,
                            "limit": b.limit,
                            "period": b.period,
                            "spent": round(ledger.spent(key.name, b.unit, b.period, now), 6),
                        }
                        for b in key.budgets
                    ],
                    "spent_today": {
                        "tokens": ledger.spent(key.name, "tokens", "day", now),
                        "cost": round(ledger.spent(key.name, "cost", "day", now), 6),
                    },
                    "reserved": {"tokens": tokens, "cost": round(cost, 6)},
                }
            )
        await respond(send, 200, json.dumps({"keys": keys}).encode(), request_id)

    async def _usage(self, gateway: Gateway, scope: Scope, send: Send, request_id: str) -> None:
        """GET /admin/usage?since=T&until=T (Unix seconds; default: the last 24 h): spend per
        key, route, provider and model, from the usage store."""
        store = gateway.ledger.store
        if store is None:
            raise RequestError("no usage store: set auth.usage_db", status=404, code="not_found")
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        try:
            until = float(query.get("until", [time.time()])[0])
            since = float(query.get("since", [until - 86400])[0])
        except ValueError:
            raise RequestError("'since' and 'until' are Unix times in seconds") from None
        rows = await trio.to_thread.run_sync(store.usage, since, until)
        body = {"since": since, "until": until, "usage": rows}
        await respond(send, 200, json.dumps(body).encode(), request_id)

    async def _providers(self, gateway: Gateway, send: Send, request_id: str) -> None:
        snapshots = [await actor.ask_snapshot() for actor in gateway.actors.values()]
        body = json.dumps({"providers": [s.to_json() for s in snapshots]}).encode()
        await respond(send, 200, body, request_id)


_GET_ROUTES: dict[str, Callable[[App, Gateway, Send, str], Awaitable[None]]] = {
    "/healthz": App._healthz,
    "/readyz": App._readyz,
    "/v1/models": App._models,
    "/metrics": App._metrics,
    "/admin/providers": App._providers,
    "/admin/keys": App._keys,
}


# --- helpers -----------------------------------------------------------------------------------


async def _read_in_time(
    server: ServerConfig, scope: Scope, receive: Receive, limit: int | None = None
) -> bytes:
    """The request body, within `server.body_timeout` (408 after it: a client that sends one
    byte and waits must not hold a request, and its fd, forever) and `limit` (413)."""
    body = None
    with trio.move_on_after(server.body_timeout):
        body = await read_body(scope, receive, server.max_body if limit is None else limit)
    if body is None:
        raise RequestError(
            f"the request body did not arrive within {server.body_timeout:g} s",
            status=408,
            code="request_timeout",
        )
    return body


def _check_translation(
    request: ClientRequest,
    route: Route,
    providers: Mapping[str, ProviderConfig],
    client: Dialect,
) -> None:
    """Before anything is sent: what the request says must be sayable in the dialect of every
    provider it may go to (a RequestError, 400, names the field that is not)."""
    seen: set[str] = {client.name}
    for target in route.targets + route.alternatives + route.on_context_overflow:
        provider = providers[target.provider]
        if provider.dialect not in seen:
            seen.add(provider.dialect)
            request.call_for(DIALECTS[provider.dialect], target.model, provider)


def _log_json(
    request_id: str,
    route: str,
    dialect: Dialect,
    status: int,
    elapsed: float,
    dispatch: Dispatch,
    winner: Winner | None,
    key: KeyConfig | None = None,
) -> None:
    """The request's JSON log line: names, numbers and outcomes, never a key or content."""
    attempts: list[dict[str, object]] = [
        {"provider": a.provider, "model": a.model, "outcome": a.error_type,
         "status": a.status, "ms": a.elapsed_ms}
        for a in dispatch.attempts
    ]  # fmt: skip
    if winner is not None:
        ms = round((winner.replied_at - winner.started) * 1000, 1)
        target = winner.target
        attempts.append({"provider": target.provider, "model": target.model, "outcome": "ok",
                         "status": getattr(winner.reply, "status", None), "ms": ms})  # fmt: skip
    fields = {
        "request_id": request_id,
        "key": key.name if key is not None else None,
        "route": route,
        "dialect": dialect.name,
        "provider": winner.target.provider if winner else None,
        "model": winner.target.model if winner else None,
        "attempts": attempts,
        "calls": dispatch.calls,
        "status": status,
        "ms": round(elapsed * 1000, 1),
    }
    log.info("request %s status=%s", request_id, status, extra={"fields": fields})


def _model(name: str) -> dict[str, object]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "cascade"}


def _client_key(gateway: Gateway, scope: Scope) -> KeyConfig:
    """The client key a model endpoint was called with; 401 (before anything else) without one."""
    presented = presented_key(header(scope, b"authorization"), header(scope, b"x-api-key"))
    key = gateway.keys.authenticate(presented)
    if key is None:
        gateway.metrics.key_refusals.labels("-", "auth").inc()
        raise RequestError(
            "missing API key" if presented is None else "invalid API key",
            status=401,
            code="invalid_api_key",
        )
    return key


def _key_limits(gateway: Gateway, key: KeyConfig, model: str, tokens: int, send: Send) -> Send:
    """Refuse what `key` may not do (403: model; 429: rpm/tpm); else `send` with the key's
    x-ratelimit-* headers on the answer."""
    if not key.allows(model):
        gateway.metrics.key_refusals.labels(key.name, "model").inc()
        raise RequestError(
            f"this key may not use the model {model!r}",
            status=403,
            param="model",
            code="model_not_allowed",
            type="permission_error",
        )
    decision = gateway.keys.admit(key, tokens, trio.current_time())
    if decision.retry_after is not None:
        gateway.metrics.key_refusals.labels(key.name, decision.reason or "rpm").inc()
        wait = max(1, math.ceil(decision.retry_after))
        raise RequestError(
            f"this key's {decision.reason} limit is reached; retry in {wait} s",
            status=429,
            code="rate_limit_exceeded",
            type="rate_limit_error",
            headers=[(b"retry-after", str(wait).encode()), *decision.headers],
        )
    gateway.metrics.child(gateway.metrics.key_requests, key.name).inc()
    return _with_headers(send, decision.headers) if decision.headers else send


async def _reserve(gateway: Gateway, key: KeyConfig, request: ClientRequest, route: Route) -> Hold:
    """Reserve the request's worst case against `key`'s budgets, or refuse it (429)."""
    out = request.max_output_tokens or gateway.config.auth.default_max_tokens
    worst = request.estimated_input_tokens + out
    prices = gateway.config.prices
    targets = route.targets + route.alternatives + route.on_context_overflow
    cost = max(
        (prices[str(t)].cost(Usage(request.estimated_input_tokens, out)) for t in targets
         if str(t) in prices),
        default=0.0,
    )  # fmt: skip
    now = dt.datetime.now(dt.UTC)
    held = await gateway.ledger.reserve_shared(key.name, key.budgets, worst, cost, now)
    if isinstance(held, Hold):
        return held
    gateway.metrics.key_refusals.labels(key.name, "budget").inc()
    budget = held.budget
    limit = f"{budget.limit:g} tokens" if budget.unit == "tokens" else f"${budget.limit:g}"
    headers: list[tuple[bytes, bytes]] = []
    when = "it never resets"
    if held.reset is not None:
        headers.append(
            (b"retry-after", str(math.ceil((held.reset - now).total_seconds())).encode())
        )
        headers.append((b"x-budget-reset", held.reset.isoformat().encode()))
        when = f"it resets at {held.reset.isoformat()}"
    raise RequestError(
        f"this key's {budget.period} budget of {limit} is spent; {when}",
        status=429,
        code="budget_exceeded",
        type="budget_exceeded",
        headers=headers,
    )


def _settle(
    gateway: Gateway,
    hold: Hold,
    request: ClientRequest,
    route: str,
    winner: Winner | None,
    tracked: TrackedSend,
    key: KeyConfig | None,
) -> None:
    """Book what the request cost its key, however it ended (docs/keys-and-budgets.md)."""
    provider = model = "-"
    usage = Usage()
    outcome = "refunded"  # no answer, or none of it reached the client
    if winner is not None and tracked.status:
        provider, model = winner.target.provider, winner.target.model
        reply = winner.reply
        if isinstance(reply, Response):  # a whole answer, handed to the client
            outcome = "ok"
            config = gateway.config.providers[provider]
            wire = DIALECTS[config.dialect].wire(config)
            found = reply.usage or wire.usage(reply.body)
            usage = found or Usage(request.estimated_input_tokens, len(reply.body) // 4)
        elif winner.completed and winner.usage is not None:
            outcome, usage = "ok", winner.usage
        else:  # a stream cut short, or one whose upstream reported no usage: an estimate
            outcome = "ok" if winner.completed else "partial"
            usage = Usage(request.estimated_input_tokens, winner.relayed // 4)
    price = gateway.config.prices.get(f"{provider}/{model}")
    cost = price.cost(usage) if price is not None else 0.0
    charge = Charge(
        time.time(), hold.key, route, provider, model, usage.input, usage.output, cost, outcome
    )
    now = dt.datetime.now(dt.UTC)
    gateway.ledger.settle(hold, charge, now)
    if key is not None:  # this replica's view of what is left
        for budget in key.budgets:
            left = budget.limit - gateway.ledger.spent(key.name, budget.unit, budget.period, now)
            gateway.metrics.child(
                gateway.metrics.budget_left, key.name, budget.unit, budget.period
            ).set(left)
    if usage.total:
        metrics = gateway.metrics
        metrics.child(metrics.tokens, hold.key, provider, model, "input").inc(usage.input)
        metrics.child(metrics.tokens, hold.key, provider, model, "output").inc(usage.output)
        metrics.child(metrics.cost, hold.key, provider, model).inc(cost)


def _with_headers(send: Send, extra: list[tuple[bytes, bytes]]) -> Send:
    async def send_with(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message["headers"], *extra]}
        await send(message)

    return send_with


def _without_body(send: Send) -> Send:
    async def send_head(message: Message) -> None:
        if message["type"] == "http.response.body":
            message = {**message, "body": b""}
        await send(message)

    return send_head


# The status page: one file, no external assets, so it works offline (docs/operations.md).
STATUS_PAGE = resources.files("router.face").joinpath("status.html").read_bytes()
_PAGE = [
    (b"cache-control", b"no-store"),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline';"
        b" connect-src 'self'; img-src data:; frame-ancestors 'none'",
    ),
]
# A draining gateway's answer to new work: the client retries elsewhere, on a new connection
_DRAINING = [(b"retry-after", b"1"), (b"connection", b"close")]
# A browser asks for the admin token with its own dialog (any user name, the token as password)
_BASIC_CHALLENGE = [(b"www-authenticate", b'Basic realm="cascade admin", charset="UTF-8"')]


def _check_admin(config: Config, scope: Scope) -> None:
    """/admin/* needs the admin token when server.admin_token_env is set (`Authorization:
    Bearer <token>`, or Basic with the token as password: what a browser sends for the status
    page), and answers only loopback clients when it is not (an operator on the machine)."""
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
    if not _presents_token(scope, env):
        raise RequestError(
            "the admin API needs the admin token",
            status=401,
            type="authentication_error",
            headers=_BASIC_CHALLENGE,
        )


def _check_metrics(config: Config, scope: Scope) -> None:
    """/metrics needs server.metrics_token_env's token (or the admin token) when it is set."""
    server = config.server
    assert server.metrics_token_env is not None
    if _presents_token(scope, server.metrics_token_env) or (
        server.admin_token_env is not None and _presents_token(scope, server.admin_token_env)
    ):
        return
    raise RequestError(
        "/metrics needs the metrics token",
        status=401,
        type="authentication_error",
        headers=[(b"www-authenticate", b'Bearer realm="cascade metrics"')],
    )


def _presents_token(scope: Scope, env: str) -> bool:
    """The request carries the token held in the environment variable `env`: `Authorization:
    Bearer <token>`, or Basic with the token as the password. False when `env` is unset or empty
    (a missing secret never lets anyone in)."""
    token = os.environ.get(env)
    scheme, _, given = (header(scope, b"authorization") or b"").partition(b" ")
    scheme, given = scheme.lower(), given.strip()  # the scheme is case-insensitive (RFC 9110)
    if scheme == b"basic":
        try:
            given = base64.b64decode(given, validate=True).partition(b":")[2]
        except ValueError:
            given = b""
    return (
        bool(token)
        and scheme in (b"bearer", b"basic")
        and hmac.compare_digest(given, (token or "").encode())
    )


def _error_shape(dialect: Dialect | None, path: str) -> Dialect:
    """The dialect whose error shape a path answers in: its own on a model endpoint, else
    Anthropic's on its paths and OpenAI's everywhere else."""
    return dialect or DIALECTS["anthropic" if path.startswith("/v1/messages") else "openai"]


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
