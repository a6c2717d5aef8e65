"""Whether and when to try again: pure functions of a failure and the retry config.

The dispatcher's loop asks `decide` what a failure means for the cascade, and `backoff` how long
to wait before the same target again. Nothing here knows about tasks, channels or clocks.
"""

from __future__ import annotations

import enum
import random
from collections import deque
from collections.abc import Callable, Iterable

import attrs

from actors.outcome import Failure, Kind
from router.config import Backoff, RetryConfig, Strategy, Target


class Action(enum.Enum):
    RETURN = "return"  # give the client this failure now
    FAILOVER = "failover"  # this target is done for this request; go on
    RETRY = "retry"  # this target may be tried again later, per the strategy
    CONTEXT_OVERFLOW = "context_overflow"  # go to the route's larger-context targets, if any


@attrs.frozen
class Decision:
    action: Action
    strategy: Strategy = "different_provider"
    max_attempts: int | None = None  # a per-status rule's cap on the whole cascade


def decide(failure: Failure, retry: RetryConfig) -> Decision:
    """The failure table (docs/failure-semantics.md), with the config's per-status rules applied."""
    if failure.status is not None:
        for rule in retry.on_status:
            if failure.status in rule.codes:
                if rule.strategy == "return":
                    return Decision(Action.RETURN, max_attempts=rule.max_attempts)
                if rule.strategy == "failover":
                    return Decision(Action.FAILOVER, max_attempts=rule.max_attempts)
                return Decision(Action.RETRY, rule.strategy, rule.max_attempts)
    kind = failure.kind
    if kind is Kind.TRANSIENT:
        return Decision(Action.RETRY, retry.strategy)
    if kind is Kind.SLOW:
        if retry.on_timeout == "failover":
            return Decision(Action.FAILOVER)
        return Decision(Action.RETRY, retry.on_timeout)
    if kind in (Kind.RATE_LIMITED, Kind.PROTOCOL):
        return Decision(Action.FAILOVER)
    if kind is Kind.CONTEXT_OVERFLOW:
        return Decision(Action.CONTEXT_OVERFLOW)
    return Decision(Action.RETURN)  # AUTH, CLIENT_ERROR


def backoff_delay(
    backoff: Backoff, retry_number: int, previous: float, rng: random.Random
) -> float:
    """The wait before retry number `retry_number` (1 for the first retry).

    `previous` is the last delay (for decorrelated jitter; pass 0 before the first).
    """
    ceiling = min(backoff.max, backoff.base * 2 ** (retry_number - 1))
    if backoff.jitter == "none":
        return ceiling
    if backoff.jitter == "full":
        return rng.uniform(0, ceiling)
    if backoff.jitter == "equal":
        return ceiling / 2 + rng.uniform(0, ceiling / 2)
    # decorrelated (AWS architecture blog): grows from the previous delay, not the attempt number
    return min(backoff.max, rng.uniform(backoff.base, max(backoff.base, previous * 3)))


class Plan:
    """The ordered targets still open to one request, and how often each has been retried.

    Strategies say where a retryable failure sends the cascade:
    - same_model: the same target again (up to its provider's max_retries), then the plan order;
    - same_provider: the same target again, then the plan's other targets on that provider first;
    - different_provider: the next target on another provider at once; the failed target goes to
      the back of the plan and is retried only after the other providers.
    """

    def __init__(self, targets: Iterable[Target]) -> None:
        self._queue: deque[Target] = deque(dict.fromkeys(targets))
        self.retries: dict[Target, int] = {}

    def __bool__(self) -> bool:
        return bool(self._queue)

    def pop(self) -> Target:
        return self._queue.popleft()

    def pop_fresh(self) -> Target | None:
        """The first target not yet tried in this request (hedges go only to fresh targets)."""
        for target in self._queue:
            if target not in self.retries:
                self._queue.remove(target)
                return target
        return None

    def retry(self, target: Target, strategy: Strategy, max_retries: int) -> bool:
        """Put `target` back per `strategy` if it has retries left; False when it has none."""
        used = self.retries.get(target, 0)
        if used >= max_retries:
            if strategy == "same_provider":
                self._partition(lambda t: t.provider == target.provider)
            return False
        self.retries[target] = used + 1
        if strategy == "different_provider":
            self._partition(lambda t: t.provider != target.provider)
            self._queue.append(target)
        else:
            self._queue.appendleft(target)
        return True

    def mark_tried(self, target: Target) -> None:
        self.retries.setdefault(target, 0)

    def replace(self, targets: Iterable[Target]) -> None:
        """Continue with these targets only (context overflow: to larger-context models)."""
        self._queue = deque(t for t in dict.fromkeys(targets) if t not in self.retries)

    def _partition(self, first: Callable[[Target], bool]) -> None:
        """Stable: targets for which `first` holds move ahead of the others."""
        ahead = [t for t in self._queue if first(t)]
        self._queue = deque(ahead + [t for t in self._queue if not first(t)])
