"""A provider's admission: its blocks, circuits, limits and leases, and the rules over them.

Plain and I/O-free: it never awaits, sends on a channel or logs. The actor loop asks it whether
an attempt may start (`decide`), parks an attempt whose rpm/tpm lease is on its way (`park`,
`unpark`), records a start (`started`), learns from a finished attempt (`settle`, which returns
what it learned for the actor to publish, count and log) and from other replicas (`merge`).
The shared backend is reached only through `SharedLink`'s non-blocking asks.
"""

from __future__ import annotations

import collections

import attrs

from actors.machines import (
    Circuits,
    LatencyTriggers,
    ManualBlocks,
    RateLimits,
    RetryBudgetState,
    SlidingWindow,
)
from actors.messages import Attempt, Block, Refused, UpstreamRequest
from actors.outcome import Failure, Kind
from actors.settings import ProviderConfig
from actors.shared import (
    BackendState,
    BlockLearned,
    BlockLifted,
    CircuitChanged,
    Lease,
    LeaseAnswer,
    LimitKind,
    ProbeAnswer,
    SharedLink,
)

PARKED = Refused("lease")  # `decide`'s answer while the lease an attempt needs is on its way

PeerMessage = BlockLearned | BlockLifted | CircuitChanged | ProbeAnswer | LeaseAnswer | BackendState


@attrs.frozen
class Learned:
    """What one finished attempt changed, for the actor to publish, count and log."""

    rate_limited_until: float | None = None  # a rate-limit block set (its key and strikes too)
    rate_key: str = ""
    strikes: int = 0
    circuit_opened: bool = False
    circuit_closed: bool = False  # a probe's success closed it
    latency_until: float | None = None  # a latency-trigger block set


_OK = Learned()


@attrs.define
class Outcome:
    """What one finished attempt saw: its failure (None: success), its times and its tokens."""

    failure: Failure | None
    ttfb: float
    total: float
    tokens: int | None = None


class Admission:
    """Decide, park, settle: one provider's admission state (see the module docstring)."""

    def __init__(self, name: str, config: ProviderConfig, shared: SharedLink | None) -> None:
        self.name = name
        self.shared = shared
        self.shared_up = False
        self.manual = ManualBlocks()  # an operator's, kept across reconfiguration
        self.rpm = SlidingWindow(60.0)
        self.tpm = SlidingWindow(60.0)
        self.rpm_lease: Lease | None = None
        self.tpm_lease: Lease | None = None
        self.parked: collections.deque[Attempt] = collections.deque()  # waiting for a lease
        self.config = config
        self.apply(config, first=True)

    def apply(self, config: ProviderConfig, *, first: bool = False) -> None:
        """Adopt `config`, keeping the state it still describes (blocks, windows, counters)."""
        old = self.config

        def changed(field: str) -> bool:
            return first or getattr(old, field) != getattr(config, field)

        self.config = config
        if changed("rate_limit"):
            self.rate_limits = RateLimits(config.rate_limit)
        if changed("latency"):
            self.latency = None
            if config.latency:
                self.latency = LatencyTriggers(config.latency, config.rate_limit.max_tracked)
        if changed("circuit"):
            self.circuits = Circuits(config.circuit, config.rate_limit.max_tracked)
            self.circuits.shared = self.shared_up
        if self.shared is not None and changed("limits"):
            limits, shared = config.limits, self.shared
            self.rpm_lease = Lease(shared.lease_size(limits.rpm)) if limits.rpm else None
            self.tpm_lease = Lease(shared.lease_size(limits.tpm)) if limits.tpm else None
        if changed("retry_budget"):
            self.budget = RetryBudgetState(config.retry_budget)

    # --- deciding ------------------------------------------------------------------------------

    def decide(self, attempt: Attempt, in_flight: int, now: float) -> Refused | None:
        """None: it may start now; PARKED: when its lease arrives; else the refusal."""
        model = attempt.request.model
        refusal = self._blocked(model, now)
        if refusal is not None:
            return refusal
        if in_flight >= self.config.max_in_flight:
            return Refused("busy")
        if attempt.is_retry and not self.budget.allows_retry(now):
            return Refused("retry_budget")
        tokens = attempt.request.estimated_tokens
        refusal = self._local_limits(tokens, now)
        if refusal is not None:
            return refusal
        limits = self.config.limits
        leased = self.shared is not None and (limits.rpm is not None or limits.tpm is not None)
        spent = min(tokens, limits.tpm or tokens)
        if leased and (refusal := self._shared_limits(spent, now)):
            return refusal  # or PARKED
        refusal = self._circuit(model, now)
        if refusal is not None and leased:  # give back what _shared_limits took
            self._refund_leases(1, spent)
        return refusal

    def _circuit(self, model: str, now: float) -> Refused | None:
        """The circuit's word; an open one, with a shared backend, asks for the deployment's
        one probe."""
        admitted, until = self.circuits.admit(model, now)
        if admitted:
            return None
        if self.shared is not None and self.shared_up:
            hold = self.config.timeouts.total + 1.0
            if self.circuits.ask_probe(model, now, hold):
                self.shared.want_probe(self.name, model, hold)
        return Refused("circuit_open" if until is not None else "circuit_probe", until)

    def _blocked(self, model: str, now: float) -> Refused | None:
        if (until := self.manual.blocked_until(model, now)) is not None:
            return Refused("manual", until)
        if (until := self.rate_limits.blocked_until(model, now)) is not None:
            return Refused("rate_limited", until)
        if self.latency and (until := self.latency.blocked_until(model, now)) is not None:
            return Refused("latency", until)
        return None

    def _local_limits(self, tokens: int, now: float) -> Refused | None:
        limits = self.config.limits
        if limits.rpm is not None and (until := self.rpm.room(now, 1, limits.rpm)) is not None:
            return Refused("rpm", until)
        if limits.tpm is not None and (until := self.tpm.room(now, tokens, limits.tpm)) is not None:
            return Refused("tpm", until)
        return None

    def _shared_limits(self, tokens: float, now: float) -> Refused | None:
        """rpm/tpm against the deployment: spend this replica's leases. An empty balance parks
        the attempt (PARKED) until the lease asked for arrives (one round trip to the backend,
        only when the prefetch fell behind); a full shared window refuses."""
        shared = self.shared
        assert shared is not None
        if not self.shared_up:  # the backend is down: this replica's own count, or refuse
            return None if shared.fail_open else Refused("limits_unavailable")
        short = self._spend_leases(tokens, now)
        waiting = self._parked_need() if short is PARKED else (0.0, 0.0)
        if not self.want_leases(now, waiting[0] + 1, waiting[1] + tokens) and short is PARKED:
            return None if shared.fail_open else Refused("limits_unavailable")
        return short

    def _spend_leases(self, tokens: float, now: float) -> Refused | None:
        """Take one request and `tokens` from the leases; else why not (PARKED: wait for the
        lease asked for; a refusal: the deployment's window is full until then)."""
        needs = ((self.rpm_lease, "rpm", 1.0), (self.tpm_lease, "tpm", tokens))
        for lease, kind, need in needs:
            if lease is not None and (self.parked or lease.balance < need):
                return (
                    Refused(kind, lease.exhausted_until) if lease.exhausted_until > now else PARKED
                )
        for lease, _, need in needs:
            if lease is not None:
                lease.take(need)
        return None

    def _parked_need(self) -> tuple[float, float]:
        tokens = sum(a.request.estimated_tokens for a in self.parked)
        return float(len(self.parked)), float(tokens)

    def want_leases(self, now: float, requests: float, tokens: float) -> bool:
        """Ask for the next lease of each limit whose balance runs low (answers come later):
        enough for `requests` and `tokens` (what is waiting). False if the ask was dropped."""
        shared, limits = self.shared, self.config.limits
        assert shared is not None
        asked = True
        checks: tuple[tuple[Lease | None, LimitKind, float | None, float], ...] = (
            (self.rpm_lease, "rpm", limits.rpm, requests),
            (self.tpm_lease, "tpm", limits.tpm, tokens),
        )
        for lease, kind, limit, need in checks:
            if lease is not None and limit is not None:
                amount = lease.wanted(need, now)
                if amount is not None and not shared.want_lease(self.name, kind, limit, amount):
                    lease.pending = False  # not even queued: no answer will come
                    asked = False
        return asked

    def _refund_leases(self, requests: float, tokens: float) -> None:
        if self.shared_up:
            if self.rpm_lease is not None:
                self.rpm_lease.refund(requests)
            if self.tpm_lease is not None:
                self.tpm_lease.refund(tokens)

    # --- parking and starting ---------------------------------------------------------------------

    def park(self, attempt: Attempt) -> bool:
        """Keep `attempt` until its lease arrives; False when too many wait already."""
        if len(self.parked) >= self.config.max_in_flight:
            return False
        self.parked.append(attempt)
        return True

    def unpark(self) -> list[Attempt]:
        """The waiting attempts the dispatcher still wants, in order, to be decided again."""
        parked, self.parked = self.parked, collections.deque()
        return [a for a in parked if not a.cancel_scope.cancel_called]

    def started(self, attempt: Attempt, now: float) -> list[float]:
        """Count an admitted attempt; returns its tpm entry (corrected when its tokens are known)."""
        self.budget.record(now, attempt.is_retry)
        self.rpm.add(now, 1)
        return self.tpm.add(now, attempt.request.estimated_tokens)

    # --- learning -------------------------------------------------------------------------------

    def settle(
        self, request: UpstreamRequest, outcome: Outcome, tpm_entry: list[float], now: float
    ) -> Learned:
        """Update the state from a finished attempt; returns what changed."""
        model, failure = request.model, outcome.failure
        if outcome.tokens is not None:
            if self.tpm_lease is not None:  # the estimate was spent: settle the difference
                self._refund_leases(0, tpm_entry[1] - outcome.tokens)
            self.tpm.correct(tpm_entry, outcome.tokens)
        kind = failure.kind if failure is not None else None
        if kind is None:
            self.rate_limits.success(model)
            closed = self.circuits.success(model)  # a probe's success closes the circuit
            return (
                _OK
                if not closed and self.latency is None
                else self._learned(model, outcome, now, closed=closed)
            )
        if kind is Kind.RATE_LIMITED:
            assert failure is not None
            until = self.rate_limits.block(model, now, failure.retry_after)
            key = self.rate_limits.key(model)
            return Learned(until, key, self.rate_limits.strikes(key))
        closed = kind in (Kind.CLIENT_ERROR, Kind.CONTEXT_OVERFLOW) and self.circuits.success(model)
        opened = kind in (Kind.TRANSIENT, Kind.SLOW, Kind.PROTOCOL) and self.circuits.failure(
            model, now
        )
        if kind is Kind.SLOW:
            return self._learned(model, outcome, now, opened=opened)
        return Learned(circuit_opened=opened, circuit_closed=closed) if opened or closed else _OK

    def _learned(
        self,
        model: str,
        outcome: Outcome,
        now: float,
        *,
        opened: bool = False,
        closed: bool = False,
    ) -> Learned:
        """With the latency trigger's verdict on a success or a slow failure."""
        until = None
        if self.latency is not None:
            until = self.latency.observe(model, now, outcome.ttfb, outcome.total)
        return Learned(circuit_opened=opened, circuit_closed=closed, latency_until=until)

    def merge(self, message: PeerMessage, now: float, wall: float) -> bool:
        """What the shared backend says: another replica's learning, or an answer to this
        actor. True when parked attempts should be decided again."""
        if isinstance(message, BlockLearned):
            self._merge_block(message, now + (message.until - wall), now)
        elif isinstance(message, BlockLifted):
            self.manual.unblock(message.key)
        elif isinstance(message, CircuitChanged):
            if message.open:
                self.circuits.merge_open(message.model, now + (message.until - wall))
            else:
                self.circuits.success(message.model)
        elif isinstance(message, ProbeAnswer):
            self.circuits.grant(message.model, message.granted)
        elif isinstance(message, LeaseAnswer):
            lease = self.rpm_lease if message.kind == "rpm" else self.tpm_lease
            if lease is None or not self.shared_up:
                return False
            lease.granted(message.amount, message.retry_in, now)
            return True
        else:
            self._backend_state(message.up, now)
            return True  # down: each replica's own count (or a refusal); up: a fresh lease
        return False

    def _merge_block(self, message: BlockLearned, until: float, now: float) -> None:
        if message.kind == "rate_limited":
            self.rate_limits.merge(message.key, until, message.strikes, now)
        elif message.kind == "latency" and self.latency is not None:
            self.latency.merge(message.key, until, now)
        elif message.kind == "manual":
            model = None if message.key == "*" else message.key
            self.manual.block(model, until, message.reason, now)

    def _backend_state(self, up: bool, now: float) -> None:
        self.shared_up = up
        self.circuits.shared = up
        for lease in (self.rpm_lease, self.tpm_lease):
            if lease is not None:
                lease.reset()
        if up:
            self.want_leases(now, 1, 1)

    # --- views ----------------------------------------------------------------------------------

    def blocks(self, now: float) -> list[Block]:
        found = [Block(k, "manual", u, note) for k, u, note in self.manual.active(now)]
        found += [Block(k, "rate_limited", u) for k, u in self.rate_limits.active(now)]
        if self.latency is not None:
            found += [Block(k, "latency", u) for k, u in self.latency.active(now)]
        return found

    def last_minute(self, now: float) -> tuple[int, int]:
        """(requests, tokens) admitted in the last minute."""
        self.rpm.expire(now)
        self.tpm.expire(now)
        return int(self.rpm.total), int(self.tpm.total)
