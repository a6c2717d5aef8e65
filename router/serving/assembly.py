"""Assembling a running gateway from a config: the one place actors are started, reconfigured and
stopped, and mock upstreams are started for `mock:` providers. Serving and reloading both use it.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import attrs
import httpx
import trio

from actors.messages import Reconfigure
from actors.provider import ProviderActor
from actors.settings import ProviderConfig
from router.cascade.dispatcher import Dispatcher
from router.config import Config, MockSettings, parse_key
from router.config.keys import KeyConfig
from router.dialects import upstream_wire
from router.face.gateway import Gateway
from router.keys.ledger import Ledger
from router.keys.ring import KeyRing
from router.state.responses import Responses, ResponseStore
from router.telemetry.metrics import Metrics
from router.tools.mock import MockUpstream
from router.web.server import serve_asgi

if TYPE_CHECKING:  # imported by `serve` only with `state.backend: redis` (coredis is slow to load)
    from router.state.redis import RedisState

log = logging.getLogger("cascade.gateway")


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
                log.info("mock provider %s (an upstream, not the gateway) on %s", name, url)
            # OpenAI's base URLs end in /v1; Anthropic's are the API root (requests go to /v1/…)
            root = self._running[name][1]
            base_url = root if providers[name].dialect == "anthropic" else root + "/v1"
            providers[name] = attrs.evolve(providers[name], base_url=base_url)
        return attrs.evolve(config, providers=providers)


Changes = dict[str, list[str]]


class Assembly:
    """Builds gateways: actors run in `actor_nursery`, mock upstreams in `mocks`' nursery."""

    def __init__(
        self,
        metrics: Metrics,
        actor_nursery: trio.Nursery,
        mocks: MockServers,
        http_transports: Mapping[str, httpx.AsyncBaseTransport] | None = None,
        shared: RedisState | None = None,
        ledger: Ledger | None = None,
        *,
        rng: random.Random | None = None,
        wall_clock: Callable[[], float] | None = None,
    ) -> None:
        self.metrics = metrics
        self.rng = rng  # the dispatcher's jitter (tests: a seeded one)
        self.wall_clock = wall_clock  # the actors' (tests: a fixed one)
        self.shared = shared
        self.ledger = ledger or Ledger()
        self.actor_nursery = actor_nursery
        self.mocks = mocks
        self.http_transports = http_transports or {}  # tests: a provider's scripted upstream

    async def build(
        self, config: Config, previous: Gateway | None = None
    ) -> tuple[Gateway, Changes]:
        """A gateway for `config`. With `previous`, its actors are kept (unchanged providers),
        reconfigured in place (changed ones: their blocks, windows and counters survive) or
        left to `retire` (removed ones); new providers get new actors."""
        if previous is not None and previous.config.state != config.state:
            log.warning("the state section changed: it takes effect when Cascade restarts")
        config = await self.mocks.resolve(config)
        actors: dict[str, ProviderActor] = {}
        changes: Changes = {"kept": [], "reconfigured": [], "added": [], "removed": []}
        for name, provider in config.providers.items():
            actor = previous.actors.get(name) if previous is not None else None
            if actor is None:
                actors[name] = await self._start_actor(provider)
                changes["added"].append(name)
            else:
                assert previous is not None
                actors[name] = actor
                if previous.config.providers[name] != provider:
                    await actor.inbox.send(Reconfigure(provider, upstream_wire(provider)))
                    changes["reconfigured"].append(name)
                else:
                    changes["kept"].append(name)
        dispatcher = Dispatcher(config, actors, self.metrics, self.rng)
        keys = KeyRing(config.auth, config.server.admin_token_env, self._runtime_keys(config))
        if previous is not None:
            keys.adopt(previous.keys)  # a key's rpm/tpm windows survive a reload
        state = config.state
        responses: Responses
        if previous is not None:
            responses = previous.responses
        elif self.shared is not None:
            responses = self.shared.responses
        else:
            responses = ResponseStore(
                state.responses_max, state.responses_max_bytes, state.responses_ttl
            )
        gateway = Gateway(
            config, actors, dispatcher, self.metrics, self.shared, keys, self.ledger, responses
        )
        return gateway, changes

    def _runtime_keys(self, config: Config) -> list[KeyConfig]:
        """The keys created through the admin API, unless the config now has that name."""
        configured = {k.name for k in config.auth.keys}
        keys = []
        for name, raw in self.ledger.runtime_keys.items():
            if name in configured:
                log.warning("key %s created through the admin API is shadowed by the config", name)
            else:
                keys.append(parse_key(raw, set()))
        return keys

    def retire(self, previous: Gateway, current: Gateway) -> list[str]:
        """Close the actors `current` no longer has: each finishes its running attempts."""
        removed = [name for name in previous.actors if name not in current.actors]
        for name in removed:
            previous.actors[name].close()
        return removed

    async def _start_actor(self, provider: ProviderConfig) -> ProviderActor:
        actor = ProviderActor(
            provider,
            self.metrics.provider(provider.name),
            wire=upstream_wire(provider),
            http_transport=self.http_transports.get(provider.name),
            shared=self.shared.link if self.shared is not None else None,
            **({"wall_clock": self.wall_clock} if self.wall_clock is not None else {}),
        )
        await self.actor_nursery.start(actor.run)
        if self.shared is not None:
            self.shared.register(actor)
        return actor
