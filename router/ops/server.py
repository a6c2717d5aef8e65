"""Serving: mocks (if the config has any), then one actor per provider, then hypercorn — one nursery.

Shutdown runs the other way: hypercorn stops accepting and lets requests finish within the grace
period, then the actors are closed (they finish their attempts), then the mocks stop.
"""

from __future__ import annotations

import gc
import logging
import os
import resource
import signal
import socket
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from pathlib import Path

import attrs
import httpx
import hypercorn.config
import hypercorn.trio
import hypercorn.trio.run
import hypercorn.trio.tcp_server
import trio
from hypercorn.config import Sockets
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app

from actors.provider import ProviderActor
from router.cascade.dispatcher import Dispatcher
from router.config import Config
from router.face.app import App, Gateway
from router.ops.metrics import Metrics
from router.ops.reload import MockServers, Reloader
from router.ops.workers import WorkerLink

log = logging.getLogger("cascade.server")

_WRITE_MARGIN = 1.0  # seconds after the grace period to write streams' closing errors


@attrs.frozen
class Running:
    """What `serve` hands to whoever started it."""

    url: str
    app: App

    @property
    def actors(self) -> Mapping[str, ProviderActor]:
        """The provider actors serving now (a reload may have changed them)."""
        return self.app.gateway.actors


def hypercorn_config(
    host: str, port: int, grace: float, keep_alive: float = 75.0
) -> hypercorn.config.Config:
    hc = hypercorn.config.Config()
    hc.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    hc.graceful_timeout = grace + _WRITE_MARGIN  # the app ends streams at `grace`
    hc.accesslog = None
    hc.errorlog = logging.getLogger("cascade.hypercorn")
    # Also bounds the wait for a request's headers: hypercorn's idle timer runs until they are in.
    hc.keep_alive_timeout = keep_alive
    hc.backlog = 4096  # bursts of new connections must queue, not be reset (capped by somaxconn)
    return hc


class _TCPServer(hypercorn.trio.tcp_server.TCPServer):
    """hypercorn's connection handler, closing a connection as soon as its client has closed.

    hypercorn 0.18 notices the client's EOF but then waits out the keep-alive timer (75 s by
    default) before it closes its side: every one-shot client held an fd that long, and 1,014
    of them exhausted a 1,024-fd limit in 11 s. Here the EOF ends the idle timer at once.
    """

    _client_closed = False

    async def _read_data(self) -> None:
        await super()._read_data()
        self._client_closed = True
        await self.idle_task.stop()  # idle now: nothing keeps the connection open any more

    async def _idle_timeout(self) -> None:
        if not self._client_closed:
            await super()._idle_timeout()
            return
        with trio.CancelScope(shield=True):  # a request ended after the client's EOF
            await self._initiate_server_close()


# hypercorn's trio worker builds one TCPServer per connection from this module-level name.
hypercorn.trio.run.TCPServer = _TCPServer  # type: ignore[misc]


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


async def serve_asgi(
    app: object,
    host: str,
    port: int,
    *,
    grace: float = 5.0,
    keep_alive: float = 75.0,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    sock: socket.socket | None = None,
    tls: tuple[str, str] | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve an ASGI app with hypercorn's trio worker; reports the bound URL (port 0 is fine).

    `sock`, when given, is a bound socket to listen on (a worker's SO_REUSEPORT socket); `tls`
    is (certfile, keyfile) to serve HTTPS.
    """
    hc = hypercorn_config(host, port, grace, keep_alive)
    if tls is not None:
        hc.certfile, hc.keyfile = tls
    if sock is None:
        serve = partial(hypercorn.trio.serve, app, hc)  # type: ignore[arg-type]
    else:
        sock.listen(hc.backlog)
        sockets = Sockets(secure_sockets=[], insecure_sockets=[sock], quic_sockets=[])
        wrapped = wrap_app(app, hc.wsgi_max_body_size, None)  # type: ignore[arg-type]
        serve = partial(worker_serve, wrapped, hc, sockets=sockets)
    if shutdown_trigger is not None:
        serve = partial(serve, shutdown_trigger=shutdown_trigger)
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(serve)
        task_status.started(binds[0])


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
    metrics = Metrics()
    async with trio.open_nursery() as mock_nursery:
        mocks = MockServers(mock_nursery)
        config = await mocks.resolve(config)
        actors: dict[str, ProviderActor] = {}
        async with trio.open_nursery() as actor_nursery:
            for name, provider in config.providers.items():
                transport = (http_transports or {}).get(name)
                actors[name] = ProviderActor(
                    provider, metrics.provider(name), http_transport=transport
                )
                await actor_nursery.start(actors[name].run)
            app = App(Gateway(config, actors, Dispatcher(config, actors, metrics), metrics))
            reloader = app.reloader = Reloader(
                app, source, mocks, actor_nursery, metrics, http_transports, link
            )

            async def trigger() -> None:
                if shutdown_trigger is None:
                    await trio.sleep_forever()
                else:
                    await shutdown_trigger()
                app.begin_shutdown(config.server.grace)
                log.info("shutting down: no new connections; %gs grace", config.server.grace)

            server = config.server
            control = trio.CancelScope()  # SIGHUP watcher and worker link: until hypercorn is done

            async def watch_sighup(task_status: trio.TaskStatus[None]) -> None:
                with control:
                    await reloader.reload_on_sighup(task_status=task_status)

            async def serve_link(link: WorkerLink, task_status: trio.TaskStatus[None]) -> None:
                with control:
                    await link.run(reloader.apply, task_status=task_status)

            if reload_on_sighup:
                await actor_nursery.start(watch_sighup)
            if link is not None:
                await actor_nursery.start(serve_link, link)
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
                task_status.started(Running(url, app))
            control.cancel()
            # hypercorn has finished its graceful shutdown: no request uses the actors any more.
            for actor in app.gateway.actors.values():
                actor.close()
        mock_nursery.cancel_scope.cancel()


async def wait_for_signal(*which: signal.Signals) -> None:
    """Returns at the first of `which` (default: SIGTERM or SIGINT)."""
    with trio.open_signal_receiver(*(which or (signal.SIGTERM, signal.SIGINT))) as signals:
        async for signum in signals:
            log.info("received %s", signal.Signals(signum).name)
            return
