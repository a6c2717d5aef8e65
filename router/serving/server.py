"""Serving the gateway: mocks (if the config has any), then one actor per provider, then hypercorn.

Shutdown runs the other way: hypercorn stops accepting and lets requests finish within the grace
period, then the actors are closed (they finish their attempts), then the mocks stop.
"""

from __future__ import annotations

import gc
import ipaddress
import logging
import os
import resource
import signal
import socket
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import httpx
import trio

from actors.provider import ProviderActor
from router.config import Config
from router.face import admin
from router.face.app import App
from router.keys.ledger import Ledger, UsageStore
from router.serving.assembly import Assembly, MockServers
from router.serving.control import WorkerLink
from router.serving.reload import Reloader
from router.telemetry.metrics import Metrics
from router.web.server import serve_asgi

if TYPE_CHECKING:
    from router.state.redis import RedisState

log = logging.getLogger("cascade.server")


@attrs.frozen
class Running:
    """What `serve` hands to whoever started it."""

    url: str
    app: App

    @property
    def actors(self) -> Mapping[str, ProviderActor]:
        """The provider actors serving now (a reload may have changed them)."""
        return self.app.gateway.actors


def _is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft limit on open files to the hard one (each connection, client or upstream,
    is an fd; the common soft default of 1,024 is a few seconds of one-shot clients)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, hard, exc)
            return soft, hard
    return hard, hard


def freeze_startup_objects() -> None:
    """Put everything alive now (modules, classes, functions, config) out of the cyclic GC's way.

    A full collection otherwise walks all of it: in-process a gen-2 pass took ~25 ms, long enough
    to show as a p99 spike under load. Called once by the serving processes before `trio.run`.
    """
    gc.collect()
    gc.freeze()


async def serve(
    config: Config,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    http_transports: Mapping[str, httpx.AsyncBaseTransport] | None = None,
    sock: socket.socket | None = None,
    source: Path | None = None,
    reload_on_sighup: bool = False,
    link: WorkerLink | None = None,
    task_status: trio.TaskStatus[Running] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the whole gateway until `shutdown_trigger` returns (or the caller cancels).

    `source` is the config file that `/admin/reload` and SIGHUP re-read (None: the built-in demo).
    `link` is a worker's control socket: reloads then go through the supervisor, to every worker.
    """
    _warn_if_open(config)
    if sock is None:  # a busy port fails here, before any mock provider or actor has started
        sock = listening_socket(config.server.host, config.server.port)
    metrics = Metrics()
    shared = _shared_state(config, metrics)
    store, ledger = _books(config, shared)
    async with trio.open_nursery() as background:
        if shared is not None:  # connects in the background: actors start on their own view
            await background.start(shared.run)
        if store is not None:  # writes settled charges; stops after the last request
            await background.start(store.run)
        async with trio.open_nursery() as actor_nursery:
            mocks = MockServers(background)
            assembly = Assembly(metrics, actor_nursery, mocks, http_transports, shared, ledger)
            gateway, _ = await assembly.build(config)
            app = App(gateway)
            if shared is not None:  # client keys made or revoked elsewhere apply here
                shared.keys.apply = partial(admin.apply_shared_key, app)
            reloader = Reloader(app, source, assembly, link)
            app.reload = reloader.reload
            control = trio.CancelScope()  # SIGHUP watcher and worker link: until hypercorn is done
            if reload_on_sighup:
                await actor_nursery.start(_in_scope, control, reloader.reload_on_sighup)
            if link is not None:
                link.status = metrics.supervisor  # one dict: /metrics and /readyz read it
                link.on_key = partial(admin.apply_shared_key, app)  # made on another worker
                app.share_key = link.share_key
                await actor_nursery.start(_in_scope, control, partial(link.run, reloader.apply))
            async with trio.open_nursery() as watchers:  # requests' disconnect watchers
                app.pipeline.watchers = watchers
                await _serve_http(app, sock, source, shutdown_trigger, task_status)
                app.pipeline.watchers = None
                watchers.cancel_scope.cancel()  # hypercorn is done: no request is left
            control.cancel()
            # hypercorn has finished its graceful shutdown: no request uses the actors any more.
            for actor in app.gateway.actors.values():
                actor.close()
        background.cancel_scope.cancel()


def _warn_if_open(config: Config) -> None:
    if not config.auth.enabled and not _is_loopback_host(config.server.host):
        log.warning(
            "listening on %s with no client keys (auth.keys): anyone who can reach the port"
            " spends your provider keys (docs/keys-and-budgets.md)",
            config.server.host,
        )


def _books(config: Config, shared: RedisState | None) -> tuple[UsageStore | None, Ledger]:
    """The usage store and the ledger: spend so far this day/month/ever, from the store; with
    Redis, budgets and usage are the deployment's."""
    store = UsageStore(Path(config.auth.usage_db)) if config.auth.usage_db else None
    if shared is None:
        return store, Ledger(store)
    ledger = Ledger(store, shared.budgets, shared.usage)
    books = store.books_id if store is not None else shared.origin
    shared.budgets.books = (books, ledger.shares)  # a Redis that lost its counters gets them
    shared.usage.books_id = books
    if store is not None:  # the deployment's usage: this store's hourly totals
        shared.usage.stored, store.written = store.hours, shared.usage.changed
    return store, ledger


def _shared_state(config: Config, metrics: Metrics) -> RedisState | None:
    if config.state.backend != "redis":
        metrics.state_up.labels("local").set(1)
        return None
    from router.state.redis import RedisState  # coredis takes ~0.5 s to import: only if used

    return RedisState(config.state, metrics)


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (port 0: any free one), for hypercorn to listen on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


async def _in_scope(
    scope: trio.CancelScope,
    run: Callable[..., Awaitable[None]],
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """`run(task_status=...)` inside `scope` (the control tasks end when the server has)."""
    with scope:
        await run(task_status=task_status)


async def _serve_http(
    app: App,
    sock: socket.socket,
    source: Path | None,
    shutdown_trigger: Callable[[], Awaitable[None]] | None,
    task_status: trio.TaskStatus[Running],
) -> None:
    """hypercorn until shutdown: on the trigger, requests in flight finish within the grace,
    new ones are told to go elsewhere, and then it stops accepting."""
    server = app.gateway.config.server

    async def trigger() -> None:
        if shutdown_trigger is None:
            await trio.sleep_forever()
        else:
            await shutdown_trigger()
        app.begin_shutdown(server.grace)
        log.info(
            "shutting down: requests in flight finish (%gs grace), new ones get 503", server.grace
        )
        # Keep the listener open while requests are in flight, so /readyz answers 503 instead
        # of refusing the connection; then hypercorn stops accepting.
        with trio.move_on_after(server.grace):
            await app.wait_drained()

    async with trio.open_nursery() as http:
        url = await http.start(
            partial(
                serve_asgi,
                app,
                server.host,
                server.port,
                grace=server.grace,
                keep_alive=server.keep_alive_timeout,
                shutdown_trigger=trigger,
                sock=sock,
            )
        )
        log.info("cascade listening on %s (pid %d)", url, os.getpid())
        if source is None and app.gateway.config.mocks:
            log.info(
                "the gateway is %s (the mock providers above are its upstreams); try:\n"
                "  curl -s %s/v1/chat/completions -H 'content-type: application/json'"
                ' -d \'{"model": "gpt-4o-mini", "messages": [{"role": "user",'
                ' "content": "Hello"}]}\'',
                url,
                url,
            )
        task_status.started(Running(url, app))


def run(config: Config, **serve_options: Any) -> None:
    """Run the gateway as this process's whole job (`cascade serve`, each worker): raise the fd
    limit, freeze what start-up made out of the GC's way, then `serve` until it returns."""
    raise_fd_limit()
    freeze_startup_objects()
    trio.run(partial(serve, config, **serve_options))


async def wait_for_signal(*which: signal.Signals) -> None:
    """Returns at the first of `which` (default: SIGTERM or SIGINT)."""
    with trio.open_signal_receiver(*(which or (signal.SIGTERM, signal.SIGINT))) as signals:
        async for signum in signals:
            log.info("received %s", signal.Signals(signum).name)
            return
