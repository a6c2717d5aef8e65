"""The snapshot of a running gateway that every request reads once: config, actors, dispatcher,
metrics, keys and books. A reload builds a new one (router/serving/assembly.py) and swaps it in
one assignment, so requests already running keep the one they started with."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import attrs

from actors.provider import ProviderActor
from router.cascade.dispatcher import Dispatcher
from router.config import Config, Route
from router.config.keys import AuthConfig
from router.keys.ledger import Ledger
from router.keys.ring import KeyRing
from router.telemetry.metrics import Metrics

if TYPE_CHECKING:  # imported by `serve` only with `state.backend: redis` (coredis is slow to load)
    from router.state.redis import RedisState


@attrs.define
class Gateway:
    """Everything a request needs, swapped as a whole on reload (requests keep their snapshot)."""

    config: Config
    actors: Mapping[str, ProviderActor]
    dispatcher: Dispatcher
    metrics: Metrics
    shared: RedisState | None = None
    keys: KeyRing = attrs.field(factory=lambda: KeyRing(AuthConfig()))
    ledger: Ledger = attrs.field(factory=Ledger)  # one per process: it outlives reloads
    _dialects: dict[int, frozenset[str]] = attrs.field(factory=dict, init=False, repr=False)

    def dialects_of(self, route: Route) -> frozenset[str]:
        """The dialects of the providers a route may use (remembered for configured routes)."""
        known = self._dialects.get(id(route))
        if known is not None:
            return known
        targets = route.targets + route.alternatives + route.on_context_overflow
        found = frozenset(self.config.providers[t.provider].dialect for t in targets)
        if any(r is route for r in self.config.routes):  # not a direct address's route
            self._dialects[id(route)] = found
        return found
