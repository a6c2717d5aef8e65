"""Live reconfiguration: re-read the config, and change only what changed.

The whole new config is parsed and validated first; a broken one changes nothing (the caller
answers 400 with every problem). Then: providers whose config is unchanged keep their actor and
all its state; changed ones are reconfigured in place by their actor (blocks, windows and counters
survive); new ones get a new actor; removed ones are closed once their running attempts end.
Finally the app's `Gateway` is replaced in one assignment: requests already running finish on the
snapshot they started with, new ones see the new config. `server.host`, `port` and `workers`
cannot change in a running process; a reload reports them as needing a restart.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import httpx
import trio

from actors.messages import Reconfigure
from actors.provider import ProviderActor
from router.cascade.dispatcher import Dispatcher
from router.config import Config, MockSettings, ProviderConfig, demo_config_text
from router.face.app import App, Gateway
from router.ops.metrics import Metrics
from router.tools.mock import MockUpstream

if TYPE_CHECKING:
    from router.ops.workers import WorkerLink

log = logging.getLogger("cascade.reload")

_RESTART_ONLY = ("host", "port", "workers")


class MockServers:
    """The in-process mock upstreams of `mock:` providers, started and stopped as configs change."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        # name -> (settings, url, scope, the longest an attempt on it may last)
        self._running: dict[str, tuple[MockSettings, str, trio.CancelScope, float]] = {}

    async def resolve(self, config: Config) -> Config:
        """`config` with every mock provider's base_url pointing at its running mock server.

        A server no longer wanted stops once no attempt can still be using it: attempts never
        outlive their provider's `timeouts.total`.
        """
        from router.ops.server import serve_asgi

        providers = dict(config.providers)
        wanted = config.mocks
        for name in [n for n in self._running if wanted.get(n) != self._running[n][0]]:
            _, _, scope, longest = self._running.pop(name)
            scope.deadline = trio.current_time() + longest
        for name, settings in wanted.items():
            if name not in self._running:
                scope = trio.CancelScope()

                async def run(
                    name: str = name,
                    settings: MockSettings = settings,
                    scope: trio.CancelScope = scope,
                    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
                ) -> None:
                    with scope:
                        await serve_asgi(
                            MockUpstream(settings, name), "127.0.0.1", 0, task_status=task_status
                        )

                url = await self._nursery.start(run)
                self._running[name] = (settings, url, scope, config.providers[name].timeouts.total)
                log.info("mock provider %s listening on %s", name, url)
            providers[name] = attrs.evolve(providers[name], base_url=self._running[name][1] + "/v1")
        return attrs.evolve(config, providers=providers)


class Reloader:
    def __init__(
        self,
        app: App,
        source: Path | None,
        mocks: MockServers,
        actor_nursery: trio.Nursery,
        metrics: Metrics,
        http_transports: Mapping[str, httpx.AsyncBaseTransport] | None = None,
        link: WorkerLink | None = None,
    ) -> None:
        self.link = link  # a worker's: reloads are the supervisor's, for every worker
        self.app = app
        self.source = source  # None: the built-in demo
        self.mocks = mocks
        self.actor_nursery = actor_nursery
        self.metrics = metrics
        self.http_transports = http_transports or {}
        self._lock = trio.Lock()

    async def start_actor(self, config: ProviderConfig) -> ProviderActor:
        transport = self.http_transports.get(config.name)
        actor = ProviderActor(config, self.metrics.provider(config.name), http_transport=transport)
        await self.actor_nursery.start(actor.run)
        return actor

    def read(self) -> Config:
        """Parse and validate the config source; raises ConfigError listing every problem."""
        if self.source is None:
            return Config.from_yaml(demo_config_text(), source="configs/demo.yaml (built in)")
        return Config.from_file(self.source, shown_as="the config file")  # no path in answers

    async def reload(self) -> dict[str, Any]:
        """Apply the config source now; returns what changed. ConfigError: nothing changed.

        In a worker, the supervisor validates the source once and applies it to every worker.
        """
        if self.link is not None:
            return await self.link.reload()
        return await self.apply(self.read())

    async def apply(self, new: Config) -> dict[str, Any]:
        """Adopt `new` (already validated); returns what changed."""
        async with self._lock:
            old = self.app.gateway
            server = old.config.server
            restart = [
                f"server.{f}" for f in _RESTART_ONLY if getattr(new.server, f) != getattr(server, f)
            ]
            kept_server = {f: getattr(server, f) for f in _RESTART_ONLY}
            new = attrs.evolve(new, server=attrs.evolve(new.server, **kept_server))
            new = await self.mocks.resolve(new)
            actors: dict[str, ProviderActor] = {}
            changes: dict[str, list[str]] = {
                "kept": [],
                "reconfigured": [],
                "added": [],
                "removed": [],
            }
            for name, provider in new.providers.items():
                actor = old.actors.get(name)
                if actor is None:
                    actors[name] = await self.start_actor(provider)
                    changes["added"].append(name)
                elif old.config.providers[name] != provider:
                    await actor.inbox.send(Reconfigure(provider))
                    actors[name] = actor
                    changes["reconfigured"].append(name)
                else:
                    actors[name] = actor
                    changes["kept"].append(name)
            # One assignment: running requests keep the Gateway they read when they started.
            self.app.gateway = Gateway(
                new, actors, Dispatcher(new, actors, self.metrics), self.metrics
            )
            for name, actor in old.actors.items():
                if name not in actors:
                    actor.close()  # it finishes the attempts it is running, then stops
                    changes["removed"].append(name)
            summary = {"status": "reloaded", "providers": changes, "routes": len(new.routes)}
            if restart:
                summary["restart_required"] = restart
            log.info("config reloaded: %s", summary)
            return summary

    async def reload_on_sighup(
        self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Reload at every SIGHUP, logging (not raising) a broken config."""
        from router.config import ConfigError

        with trio.open_signal_receiver(signal.SIGHUP) as signals:
            task_status.started()
            async for _ in signals:
                try:
                    await self.reload()
                except ConfigError as exc:
                    log.error("reload refused, still serving the previous config:\n%s", exc)
