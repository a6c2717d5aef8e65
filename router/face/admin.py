"""The admin API (`/admin/*`) and who may use it, and the token on `/metrics`.

Without `server.admin_token_env` the admin API answers loopback clients only (an operator on the
machine); with it, every client needs the token (Bearer, or Basic with the token as password:
what a browser sends for the status page). `server.metrics_token_env` puts a token on /metrics.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any, Protocol
from urllib.parse import parse_qs

import trio

from actors.messages import ManualBlock, ManualUnblock
from router.config import Config, ConfigError, parse_key
from router.config.keys import KeyConfig, Period, Unit
from router.dialects import DIALECTS
from router.dialects.jsonbody import check_model_name
from router.errors import RequestError
from router.face.answers import respond
from router.face.gateway import Gateway
from router.face.pipeline import read_in_time
from router.keys.ledger import Ledger
from router.state.budgets import RedisBudgets
from router.state.usage import HOUR
from router.telemetry.feed import Feed
from router.units import parse_duration
from router.web.asgi import Receive, Scope, Send, header

log = logging.getLogger("cascade.admin")


class AdminHost(Protocol):
    """What the admin endpoints use of the app."""

    feed: Feed
    gateway: Gateway
    shutting_down: bool
    # Tells the other workers of a key made or revoked here (a worker without Redis), if any
    share_key: Callable[[str, dict[str, Any] | None], Awaitable[bool]] | None
    reload: Callable[[], Awaitable[dict[str, Any]]] | None


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
# A browser asks for the admin token with its own dialog (any user name, the token as password)
_BASIC_CHALLENGE = [(b"www-authenticate", b'Basic realm="cascade admin", charset="UTF-8"')]


async def ui(
    app: AdminHost, gateway: Gateway, scope: Scope, receive: Receive, send: Send, request_id: str
) -> None:
    await respond(send, 200, STATUS_PAGE, request_id, b"text/html; charset=utf-8", _PAGE)


async def reload(
    app: AdminHost, gateway: Gateway, scope: Scope, receive: Receive, send: Send, request_id: str
) -> None:
    if app.reload is None or app.shutting_down:
        raise RequestError("reload is not available now", status=503, code="unavailable")
    try:
        summary = await app.reload()
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


async def manual_block(
    app: AdminHost, gateway: Gateway, scope: Scope, receive: Receive, send: Send, request_id: str
) -> None:
    """POST /admin/providers/{name}/block {"duration", "model"?, "reason"?} and /unblock
    {"model"?}: an operator takes a provider (or one of its models) out, or puts it back."""
    name, _, action = scope["path"][len("/admin/providers/") :].rpartition("/")
    actor = gateway.actors.get(name)
    if actor is None:
        raise RequestError(f"no provider {name!r}", status=404, code="not_found")
    body = await read_in_time(gateway.config.server, scope, receive, 64 * 1024)
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


async def status(
    app: AdminHost, gateway: Gateway, scope: Scope, receive: Receive, send: Send, request_id: str
) -> None:
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
            "serving": app.feed.serving.get(route.match),
        }
        for route in gateway.config.routes
    ]
    body = {"providers": snapshots, "routes": routes, "recent": app.feed.read(after)}
    await respond(send, 200, json.dumps(body).encode(), request_id)


async def create_key(
    app: AdminHost, gateway: Gateway, scope: Scope, receive: Receive, send: Send, request_id: str
) -> None:
    """POST /admin/keys {name, models, rpm, tpm, budgets}: a new client key, shown in this
    answer only; Cascade keeps its SHA-256 (in auth.usage_db, when set)."""
    body = await read_in_time(gateway.config.server, scope, receive)
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
    if gateway.shared is not None:  # every replica and worker, within a second
        await gateway.shared.keys.publish(key.name, settings)
    elif app.share_key is not None:  # the other workers of this machine
        await app.share_key(key.name, settings)
    answer = {
        "name": key.name,
        "key": secret,
        "note": "shown once: Cascade keeps only its SHA-256"
        + ("" if store is not None else " (in memory: set auth.usage_db to keep it)"),
    }
    await respond(send, 201, json.dumps(answer).encode(), request_id)


async def revoke_key(
    app: AdminHost, gateway: Gateway, scope: Scope, receive: Receive, send: Send, request_id: str
) -> None:
    """POST /admin/keys/{name}/revoke: a key created through the API stops working now."""
    name = scope["path"][len("/admin/keys/") : -len("/revoke")]
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
    if gateway.shared is not None:
        await gateway.shared.keys.publish(name, None)
    elif app.share_key is not None:
        await app.share_key(name, None)
    await respond(send, 200, json.dumps({"name": name, "revoked": True}).encode(), request_id)


async def keys(
    app: AdminHost, gateway: Gateway, scope: Scope, receive: Receive, send: Send, request_id: str
) -> None:
    """GET /admin/keys: every key's limits, spend this period and what is reserved now. With
    budgets in Redis, a budgeted key's figures are the deployment's (the shared counters, every
    replica's holds), with this replica's own share under `this_replica`."""
    now = dt.datetime.now(dt.UTC)
    configured = gateway.config.auth.keys
    keys = []
    for key in (*configured, *gateway.keys.runtime.values()):
        shown = {
            "name": key.name,
            "source": "config" if key in configured else "admin API",
            "models": list(key.models),
            "rpm": key.rpm,
            "tpm": key.tpm,
            **_figures(gateway.ledger, key, now),
        }
        shared = gateway.ledger.shared
        if key.budgets and isinstance(shared, RedisBudgets) and shared.up:
            try:
                deployment = await shared.figures(key.name, now)
            except Exception as exc:  # Redis failed: this replica's view, said so
                log.warning("admin: the deployment's budget figures are unavailable (%s)", exc)
            else:
                shown = {**shown, **_figures(gateway.ledger, key, now, deployment),
                         "this_replica": _figures(gateway.ledger, key, now)}  # fmt: skip
        keys.append(shown)
    await respond(send, 200, json.dumps({"keys": keys}).encode(), request_id)


def _figures(
    ledger: Ledger, key: KeyConfig, now: dt.datetime, shared: dict[str, float] | None = None
) -> dict[str, object]:
    """A key's budgets with their spend, today's spend and what is reserved: this replica's
    books, or the deployment's figures from Redis (`shared`)."""

    def spent(unit: Unit, period: Period) -> float:
        if shared is not None:
            return shared[f"{unit}:{period}"]
        return ledger.spent(key.name, unit, period, now)

    tokens, cost = (
        ledger.reserved(key.name)
        if shared is None
        else (shared["reserved:tokens"], shared["reserved:cost"])
    )
    return {
        "scope": "replica" if shared is None else "deployment",
        "budgets": [
            {
                "unit": b.unit,
                "limit": b.limit,
                "period": b.period,
                "spent": round(spent(b.unit, b.period), 6),
            }
            for b in key.budgets
        ],
        "spent_today": {"tokens": spent("tokens", "day"), "cost": round(spent("cost", "day"), 6)},
        "reserved": {"tokens": tokens, "cost": round(cost, 6)},
    }


async def usage(
    app: AdminHost, gateway: Gateway, scope: Scope, receive: Receive, send: Send, request_id: str
) -> None:
    """GET /admin/usage?since=T&until=T (Unix seconds; default: the last 24 h): spend per
    key, route, provider and model. With Redis, the deployment's (every replica's, over the
    whole hours covering the window) with this replica's share beside it; else, or with
    `scope=replica`, this replica's usage store, to the second."""
    store, shared = gateway.ledger.store, gateway.ledger.usage
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    try:
        until = float(query.get("until", [time.time()])[0])
        since = float(query.get("since", [until - 86400])[0])
    except ValueError:
        raise RequestError("'since' and 'until' are Unix times in seconds") from None
    wanted = query.get("scope", ["deployment"])[0]
    if wanted not in ("deployment", "replica"):
        raise RequestError("'scope' is 'deployment' or 'replica'", param="scope")
    body: dict[str, object] | None = None
    if wanted == "deployment" and shared is not None and shared.client is not None:
        try:
            rows = await shared.deployment(since, until)
        except Exception as exc:  # Redis failed: this replica's books, said so
            log.warning("admin: the deployment's usage is unavailable (%s)", exc)
        else:
            first, end = shared.window(since, until)
            body = {"scope": "deployment", "since": first * HOUR, "until": end * HOUR,
                    "usage": rows, "this_replica": await shared.this_replica(since, until)}  # fmt: skip
    if body is None:
        if store is None:
            raise RequestError("no usage store: set auth.usage_db", status=404, code="not_found")
        rows = await trio.to_thread.run_sync(store.usage, since, until)
        body = {"scope": "replica", "since": since, "until": until, "usage": rows}
    await respond(send, 200, json.dumps(body).encode(), request_id)


async def providers(
    app: AdminHost, gateway: Gateway, scope: Scope, receive: Receive, send: Send, request_id: str
) -> None:
    snapshots = [await actor.ask_snapshot() for actor in gateway.actors.values()]
    body = json.dumps({"providers": [s.to_json() for s in snapshots]}).encode()
    await respond(send, 200, body, request_id)


# --- who may call ------------------------------------------------------------------------------


def check_admin(config: Config, scope: Scope) -> None:
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


def check_metrics(config: Config, scope: Scope) -> None:
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


def _is_loopback(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # a unix socket path or a name: not an address we can vouch for
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


async def apply_shared_key(app: AdminHost, name: str, settings: dict[str, Any] | None) -> None:
    """A client key made (settings) or revoked (None) on another replica or worker, announced
    through the state backend: applied to this process's keys and books, idempotently (the
    announcing process hears its own change too). A key of the config file wins."""
    gateway = app.gateway
    ledger = gateway.ledger
    if name in {k.name for k in gateway.config.auth.keys}:
        return
    if settings is None:
        if gateway.keys.revoke(name):
            ledger.runtime_keys.pop(name, None)
            if ledger.store is not None:
                await trio.to_thread.run_sync(ledger.store.revoke_key, name)
            log.warning("client key %s revoked on another replica: revoked here", name)
        return
    if ledger.runtime_keys.get(name) == settings:
        return  # already here
    try:
        key = parse_key(settings, gateway.keys.names() - {name})
    except ConfigError as exc:
        log.error("client key %s from the state backend is invalid: %s", name, exc)
        return
    gateway.keys.revoke(name)  # a key of that name made earlier: replaced
    gateway.keys.add(key)
    ledger.runtime_keys[name] = settings
    if ledger.store is not None:
        await trio.to_thread.run_sync(ledger.store.save_key, name, settings)
    log.warning("client key %s made on another replica: valid here", name)


async def refresh_budget_gauges(gateway: Gateway) -> None:
    """With budgets in Redis, `cascade_key_budget_remaining` from the deployment's spend (one
    round trip per budgeted key, at each scrape), the same on every replica; without Redis (or
    while it fails) the gauge stays this replica's, set at each settlement."""
    shared = gateway.ledger.shared
    if not isinstance(shared, RedisBudgets) or not shared.up:
        return
    now = dt.datetime.now(dt.UTC)
    metrics = gateway.metrics
    for key in (*gateway.config.auth.keys, *gateway.keys.runtime.values()):
        if not key.budgets:
            continue
        try:
            figures = await shared.figures(key.name, now)
        except Exception as exc:
            log.warning("metrics: the deployment's budget figures are unavailable (%s)", exc)
            return
        for budget in key.budgets:
            left = budget.limit - figures[f"{budget.unit}:{budget.period}"]
            metrics.child(metrics.budget_left, key.name, budget.unit, budget.period).set(left)
