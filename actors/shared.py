"""What an actor shares with the other replicas of a deployment, and what it hears from them.

The actor stays the only writer of its in-process view. What it learns (a block, a circuit that
opened or closed) it hands to its `SharedLink`, which never blocks; what other replicas learned
arrives in its inbox as the messages below. rpm/tpm capacity is leased in batches (`Lease`), so
no request waits on a round trip to the backend. Times that cross processes are wall-clock
seconds (`time.time()`); the actor turns them into its own monotonic clock on arrival.

The backend itself (Redis) lives in `router/state/`: this module is only the contract.
"""

from __future__ import annotations

import math
from typing import Literal, Protocol

import attrs

LimitKind = Literal["rpm", "tpm"]


# --- what travels between replicas (published by one actor, delivered to its peers) ---------


@attrs.frozen
class BlockLearned:
    """A block set on `provider`: `kind` is rate_limited, latency or manual; `key` the model it
    covers ("*": every model); `until` wall-clock; `strikes` the rate-limit backoff count."""

    provider: str
    kind: str
    key: str
    until: float
    strikes: int = 0
    reason: str = ""
    at: float = 0.0  # when it was published (wall clock), for the propagation lag


@attrs.frozen
class BlockLifted:
    """An operator lifted a manual block (`key` None: every manual block of the provider)."""

    provider: str
    kind: str
    key: str | None
    at: float = 0.0


@attrs.frozen
class CircuitChanged:
    """A circuit opened (until `until`, wall clock) or closed (its probe succeeded)."""

    provider: str
    model: str
    open: bool
    until: float = 0.0
    at: float = 0.0


SharedEvent = BlockLearned | BlockLifted | CircuitChanged


# --- the backend's answers to one actor ------------------------------------------------------


@attrs.frozen
class ProbeAnswer:
    """Whether this replica may send the half-open probe for `model` (one in the deployment)."""

    model: str
    granted: bool


@attrs.frozen
class LeaseAnswer:
    """`amount` of `kind` capacity granted; with 0, `retry_in` says when the shared window
    frees room (seconds), if known."""

    kind: LimitKind
    amount: float
    retry_in: float | None = None


@attrs.frozen
class BackendState:
    """The shared backend went up (the actor's view was just resynchronised) or down."""

    up: bool


SharedMessage = SharedEvent | ProbeAnswer | LeaseAnswer | BackendState


class SharedLink(Protocol):
    """An actor's way out to the shared backend. Every method returns at once: a message that
    cannot be queued is dropped (the backend resynchronises from snapshots when it can)."""

    @property
    def fail_open(self) -> bool:
        """Whether rpm/tpm limits fall back to this replica's own count while the backend is
        down (True), or refuse (False)."""
        ...

    def lease_size(self, limit: float) -> float:
        """How much capacity of a `limit` per minute one lease asks for."""
        ...

    def publish(self, event: SharedEvent) -> None: ...

    def want_probe(self, provider: str, model: str, hold: float) -> None:
        """Ask for the deployment's one probe of `model`, held at most `hold` seconds."""
        ...

    def want_lease(self, provider: str, kind: LimitKind, limit: float, amount: float) -> bool:
        """Ask for `amount` more capacity; False when the ask could not even be queued."""
        ...


class Lease:
    """Capacity of one limit (rpm or tpm) leased from the shared backend and spent locally.

    `take` spends from the balance and never waits; when the balance falls to half a lease or
    below, `wanted` asks for the next one, so a steady flow never sees an empty balance. Each
    replica holds at most 1.5 leases (or one request larger than that), which bounds how far
    the deployment can go over the limit in any minute: see docs/scaling.md.
    """

    def __init__(self, size: float) -> None:
        self.size = max(1.0, size)
        self.balance = 0.0
        self.pending = False
        self.exhausted_until = -math.inf  # the shared window is full until then: do not ask

    def take(self, amount: float) -> bool:
        """Spend `amount` (a request: 1; tokens: the estimate, at most the whole limit)."""
        if self.balance >= amount:
            self.balance -= amount
            return True
        return False

    def wanted(self, amount: float, now: float) -> float | None:
        """How much to ask for now (None: nothing): `amount` is what the next request needs."""
        if self.pending or now < self.exhausted_until:
            return None
        if self.balance >= amount and self.balance * 2 > self.size:
            return None
        self.pending = True
        return max(self.size, amount - self.balance)

    def granted(self, amount: float, retry_in: float | None, now: float) -> None:
        self.pending = False
        self.balance += amount
        if amount <= 0:
            self.exhausted_until = now + (retry_in if retry_in is not None else 1.0)

    def refund(self, amount: float) -> None:
        """Give back tokens an estimate took beyond what was used (or take the excess)."""
        self.balance += amount

    def reset(self) -> None:
        """The backend went away or came back: what was held or asked for is void."""
        self.balance = 0.0
        self.pending = False
        self.exhausted_until = -math.inf
