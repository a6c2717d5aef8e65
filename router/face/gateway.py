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
from router.dialects import DIALECTS
from router.dialects.base import Dialect
from router.keys.gate import KeyGate
from router.keys.ledger import Ledger
from router.keys.ring import KeyRing
from router.state.responses import Responses, ResponseStore
from router.telemetry.metrics import Metrics

if TYPE_CHECKING:  # imported by `serve` only with `state.backend: redis` (coredis is slow to load)
    from router.state.redis import RedisState


@attrs.define
class Gateway:
    """Everything a request needs, swapped as a whole on reload (requests keep their snapshot).

    Each provider's dialect is resolved once, here, when the gateway is built from its config."""

    config: Config
    actors: Mapping[str, ProviderActor]
    dispatcher: Dispatcher
    metrics: Metrics
    shared: RedisState | None = None
    keys: KeyRing = attrs.field(factory=lambda: KeyRing(AuthConfig()))
    ledger: Ledger = attrs.field(factory=Ledger)  # one per process: it outlives reloads
    responses: Responses = attrs.field(factory=ResponseStore)  # outlives reloads too
    gate: KeyGate = attrs.field(init=False, repr=False)
    # provider name -> the dialect it speaks
    dialects: Mapping[str, Dialect] = attrs.field(init=False, repr=False)

    _crossing: dict[tuple[int, str], bool] = attrs.field(factory=dict, init=False, repr=False)

    def crosses(self, route: Route, face: Dialect) -> bool:
        """Whether a target `route` may use speaks another dialect than `face` (remembered for
        the configured routes; a direct address's route is made per request)."""
        known = self._crossing.get((id(route), face.name))
        if known is not None:
            return known
        found = any(self.dialects[t.provider] is not face for t in route.every_target)
        if not route.direct:
            self._crossing[(id(route), face.name)] = found
        return found

    def __attrs_post_init__(self) -> None:
        limits = self.shared.key_limits if self.shared is not None else None
        self.gate = KeyGate(self.config, self.keys, self.ledger, self.metrics, limits)
        self.dialects = {
            name: DIALECTS[provider.dialect] for name, provider in self.config.providers.items()
        }
