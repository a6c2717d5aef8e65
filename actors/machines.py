"""A provider's admission state, as plain classes that take `now` and never block or read a clock.

Rate-limit blocks, latency triggers, circuit breakers, rpm/tpm windows and the retry budget. The
provider actor is their only user; keeping them I/O-free lets the tests drive hours of state in
microseconds. Every per-key map is bounded: a flood of distinct model names cannot grow memory.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Iterator
from typing import Generic, TypeVar

import attrs

from actors.settings import CircuitPolicy, LatencyTrigger, RateLimitPolicy, RetryBudget

V = TypeVar("V")


class BoundedMap(Generic[V]):
    """A dict with a hard size limit. When full, `stale` entries are dropped first, then the oldest.

    Insertion order is age: `touch` moves a key to the young end.
    """

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._items: dict[str, V] = {}

    def get(self, key: str) -> V | None:
        return self._items.get(key)

    def put(self, key: str, value: V, stale: Iterator[str] | None = None) -> None:
        self._items.pop(key, None)
        if len(self._items) >= self.max_size and stale is not None:
            for old in list(stale):
                self._items.pop(old, None)
        while len(self._items) >= self.max_size:
            del self._items[next(iter(self._items))]
        self._items[key] = value

    def pop(self, key: str) -> None:
        self._items.pop(key, None)

    def items(self) -> list[tuple[str, V]]:
        return list(self._items.items())

    def __len__(self) -> int:
        return len(self._items)


@attrs.define
class _Block:
    until: float
    strikes: int


class RateLimits:
    """Blocks set by rate-limit answers. Retry-After (capped) wins; else 60 s, 120 s, 240 s…"""

    def __init__(self, policy: RateLimitPolicy) -> None:
        self.policy = policy
        self._blocks: BoundedMap[_Block] = BoundedMap(policy.max_tracked)

    def key(self, model: str) -> str:
        return "*" if self.policy.scope == "provider" else model

    def blocked_until(self, model: str, now: float) -> float | None:
        block = self._blocks.get(self.key(model))
        return block.until if block is not None and block.until > now else None

    def block(self, model: str, now: float, retry_after: float | None) -> float:
        """Record a rate-limit answer; returns the time the block ends."""
        key = self.key(model)
        previous = self._blocks.get(key)
        strikes = (previous.strikes if previous else 0) + 1
        if retry_after is not None:
            wait = min(retry_after, self.policy.max_retry_after)
        else:
            wait = min(self.policy.block_base * 2 ** (strikes - 1), self.policy.block_max)
        until = max(now + wait, previous.until if previous else 0.0)
        self._blocks.put(key, _Block(until, strikes), self._expired(now))
        return until

    def success(self, model: str) -> None:
        """A success ends the exponential sequence: the next block starts again at the base."""
        self._blocks.pop(self.key(model))

    def strikes(self, key: str) -> int:
        block = self._blocks.get(key)
        return block.strikes if block is not None else 0

    def merge(self, key: str, until: float, strikes: int, now: float) -> bool:
        """Adopt a block another replica learned; the later end and the higher strike count win.
        Returns whether anything changed."""
        previous = self._blocks.get(key)
        if previous is not None:
            if previous.until >= until and previous.strikes >= strikes:
                return False
            until, strikes = max(until, previous.until), max(strikes, previous.strikes)
        self._blocks.put(key, _Block(until, strikes), self._expired(now))
        return True

    def _expired(self, now: float) -> Iterator[str]:
        return (k for k, b in self._blocks.items() if b.until <= now)

    def active(self, now: float) -> list[tuple[str, float]]:
        return [(k, b.until) for k, b in self._blocks.items() if b.until > now]


class ManualBlocks:
    """Blocks an operator set by hand (admin API): a model, or the whole provider ("*"), until a
    time, with the operator's reason. Unblocking removes them; nothing else does before `until`."""

    def __init__(self, max_size: int = 1024) -> None:
        self._blocks: BoundedMap[tuple[float, str]] = BoundedMap(max_size)

    def block(self, model: str | None, until: float, reason: str, now: float) -> None:
        stale = (k for k, (u, _) in self._blocks.items() if u <= now)
        self._blocks.put(model or "*", (until, reason), stale)

    def unblock(self, model: str | None) -> bool:
        """Remove the block on `model` (None: every manual block); True if there was one."""
        if model is None:
            had = len(self._blocks) > 0
            for key, _ in self._blocks.items():
                self._blocks.pop(key)
            return had
        had = self._blocks.get(model) is not None
        self._blocks.pop(model)
        return had

    def blocked_until(self, model: str, now: float) -> float | None:
        if not len(self._blocks):  # the common case: no manual block at all
            return None
        until = None
        for key in ("*", model):
            found = self._blocks.get(key)
            if found is not None and found[0] > now:
                until = max(until or 0.0, found[0])
        return until

    def active(self, now: float) -> list[tuple[str, float, str]]:
        return [(k, u, r) for k, (u, r) in self._blocks.items() if u > now]


class LatencyTriggers:
    """`min_triggers` slow answers within `window` block the target for `block`."""

    def __init__(self, trigger: LatencyTrigger, max_size: int) -> None:
        self.trigger = trigger
        self._breaches: BoundedMap[deque[float]] = BoundedMap(max_size)
        self._blocked: BoundedMap[float] = BoundedMap(max_size)

    def blocked_until(self, model: str, now: float) -> float | None:
        until = self._blocked.get(model)
        return until if until is not None and until > now else None

    def observe(self, model: str, now: float, ttfb: float, total: float) -> float | None:
        """Record one answer's latency; returns the block end when this answer trips the trigger."""
        measured = ttfb if self.trigger.measure == "ttfb" else total
        if measured < self.trigger.threshold:
            return None
        breaches = self._breaches.get(model)
        if breaches is None:
            breaches = deque()
            self._breaches.put(model, breaches)
        breaches.append(now)
        while breaches and breaches[0] <= now - self.trigger.window:
            breaches.popleft()
        if len(breaches) < self.trigger.min_triggers:
            return None
        breaches.clear()
        until = now + self.trigger.block
        self._blocked.put(model, until, (k for k, u in self._blocked.items() if u <= now))
        return until

    def merge(self, model: str, until: float, now: float) -> bool:
        """Adopt a latency block another replica set (the later end wins)."""
        if (self._blocked.get(model) or -math.inf) >= until:
            return False
        self._blocked.put(model, until, (k for k, u in self._blocked.items() if u <= now))
        return True

    def active(self, now: float) -> list[tuple[str, float]]:
        return [(k, u) for k, u in self._blocked.items() if u > now]


class CircuitState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@attrs.define
class _Circuit:
    state: CircuitState = CircuitState.CLOSED
    failures: deque[float] = attrs.field(factory=deque)
    until: float = 0.0
    probing: bool = False
    granted: bool = False  # shared: this replica holds the deployment's one probe
    asked: float = -math.inf  # shared: when this replica last asked for the probe


class Circuits:
    """Closed → (failures within window) → open → (open_for passes) → half-open: one probe.

    The probe's success closes the circuit; its failure opens it again for another `open_for`.
    With `shared` set (a shared backend is up) a half-open circuit also needs the deployment's
    probe grant before its one probe goes: every replica's circuit opens together, and only one
    of them probes.
    """

    def __init__(self, policy: CircuitPolicy, max_size: int) -> None:
        self.policy = policy
        self.shared = False
        self._circuits: BoundedMap[_Circuit] = BoundedMap(max_size)

    def admit(self, model: str, now: float) -> tuple[bool, float | None]:
        """(True, None) to admit; (False, until) while open; (False, None) while a probe runs.

        A half-open circuit admits exactly one probe at a time; a second caller is refused until
        the probe has answered (until = None: no known end).
        """
        c = self._circuits.get(model)
        if c is None or c.state is CircuitState.CLOSED:
            return True, None
        if c.state is CircuitState.OPEN:
            if now < c.until:
                return False, c.until
            c.state = CircuitState.HALF_OPEN
        if c.probing or (self.shared and not c.granted):
            return False, None
        c.probing = True
        return True, None

    def ask_probe(self, model: str, now: float, hold: float) -> bool:
        """Shared: whether to ask the backend for the probe of `model` now (a half-open circuit,
        no grant, and no question asked within `hold`: the holder may have died)."""
        c = self._circuits.get(model)
        if c is None or c.state is CircuitState.CLOSED or c.granted or c.probing:
            return False
        if (c.state is CircuitState.OPEN and now < c.until) or now < c.asked + hold:
            return False
        c.asked = now
        return True

    def grant(self, model: str, granted: bool) -> None:
        c = self._circuits.get(model)
        if c is not None and c.state is not CircuitState.CLOSED:
            c.granted = granted

    def until(self, model: str) -> float:
        c = self._circuits.get(model)
        return c.until if c is not None else 0.0

    def merge_open(self, model: str, until: float) -> bool:
        """Another replica's circuit opened (or its probe failed): open here until `until`."""
        c = self._circuits.get(model)
        if c is None:
            c = _Circuit()
            self._circuits.put(
                model, c, (k for k, v in self._circuits.items() if v.state is CircuitState.CLOSED)
            )
        elif c.state is CircuitState.OPEN and c.until >= until:
            return False
        c.state, c.until, c.granted, c.asked = CircuitState.OPEN, until, False, -math.inf
        c.failures.clear()
        return True

    def success(self, model: str) -> bool:
        """The upstream answered: the circuit closes. True when it was open or half-open."""
        c = self._circuits.get(model)
        self._circuits.pop(model)
        return c is not None and c.state is not CircuitState.CLOSED

    def failure(self, model: str, now: float) -> bool:
        """Record a transient failure; returns True when this failure opens the circuit."""
        c = self._circuits.get(model)
        if c is None:
            c = _Circuit()
            self._circuits.put(
                model, c, (k for k, v in self._circuits.items() if v.state is CircuitState.CLOSED)
            )
        if c.state is CircuitState.HALF_OPEN:  # the probe failed
            c.state, c.until, c.probing = CircuitState.OPEN, now + self.policy.open_for, False
            c.granted, c.asked = False, -math.inf
            return True
        c.failures.append(now)
        while c.failures and c.failures[0] <= now - self.policy.window:
            c.failures.popleft()
        if len(c.failures) >= self.policy.failures:
            c.state, c.until = CircuitState.OPEN, now + self.policy.open_for
            c.failures.clear()
            return True
        return False

    def probe_abandoned(self, model: str) -> None:
        """The probe was cancelled before it told us anything: let the next request probe."""
        c = self._circuits.get(model)
        if c is not None:
            c.probing = False

    def states(self, now: float) -> list[tuple[str, str, float | None]]:
        out: list[tuple[str, str, float | None]] = []
        for k, c in self._circuits.items():
            if c.state is CircuitState.OPEN and now >= c.until:
                out.append((k, CircuitState.HALF_OPEN.value, None))
            elif c.state is not CircuitState.CLOSED:
                out.append((k, c.state.value, c.until if c.state is CircuitState.OPEN else None))
        return out


class SlidingWindow:
    """Amounts recorded at times within the last `window` seconds (rpm: 1 per request; tpm: tokens)."""

    def __init__(self, window: float = 60.0) -> None:
        self.window = window
        self._entries: deque[list[float]] = deque()  # [time, amount], amount corrected later
        self.total = 0.0

    def expire(self, now: float) -> None:
        while self._entries and self._entries[0][0] <= now - self.window:
            self.total -= self._entries.popleft()[1]

    def room(self, now: float, amount: float, limit: float) -> float | None:
        """None when `amount` fits under `limit` now; else the time enough room frees up."""
        self.expire(now)
        if self.total + amount <= limit or not self._entries:
            return None  # an empty window admits even an oversized request: it can never fit
        need = self.total + amount - limit
        for t, a in self._entries:
            need -= a
            if need <= 0:
                return t + self.window
        return self._entries[-1][0] + self.window

    def __len__(self) -> int:
        return len(self._entries)

    def oldest(self) -> float | None:
        """When the oldest entry still counted was recorded."""
        return self._entries[0][0] if self._entries else None

    def add(self, now: float, amount: float) -> list[float]:
        """Record `amount` at `now` (entries that left the window go first: memory stays bounded
        by the window, whether or not anyone asks for `room`)."""
        self.expire(now)
        entry = [now, amount]
        self._entries.append(entry)
        self.total += amount
        return entry

    def correct(self, entry: list[float], amount: float) -> None:
        """Replace an estimate with the real amount (the usage the upstream reported).

        Entries leave from the left in time order, and all entries of one time leave together,
        so `entry` is still counted exactly when it is not older than the oldest one: O(1).
        """
        if self._entries and entry[0] >= self._entries[0][0]:
            self.total += amount - entry[1]
            entry[1] = amount


class RetryBudgetState:
    """Retries may be at most `ratio` times first attempts within `window`, plus `min_retries`."""

    def __init__(self, budget: RetryBudget) -> None:
        self.budget = budget
        self._firsts = SlidingWindow(budget.window)
        self._retries = SlidingWindow(budget.window)

    def allows_retry(self, now: float) -> bool:
        self._firsts.expire(now)
        self._retries.expire(now)
        allowed = max(self.budget.min_retries, self.budget.ratio * self._firsts.total)
        return self._retries.total < allowed

    def record(self, now: float, is_retry: bool) -> None:
        (self._retries if is_retry else self._firsts).add(now, 1)


class LatencySamples:
    """The last `size` first-byte times, for the p95 that `hedge: {after: p95}` uses."""

    def __init__(self, size: int = 256) -> None:
        self._samples: deque[float] = deque(maxlen=size)

    def add(self, value: float) -> None:
        self._samples.append(value)

    def quantile(self, q: float) -> float | None:
        if not self._samples:
            return None
        ordered = sorted(self._samples)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
