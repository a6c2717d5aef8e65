"""The key gate every model request passes: who is calling (401), what the key may do (403 for
the model, 429 for rpm/tpm), its worst case reserved against its budgets (429 when it does not
fit), and, when the request ends however it ends, what it cost settled (docs/keys-and-budgets.md).
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
from collections.abc import Iterable

import trio

from actors.wire import Usage
from router.config import Config, Target
from router.config.keys import KeyConfig
from router.errors import RequestError
from router.keys.ledger import Charge, Ledger
from router.keys.ring import KeyRing, presented_key
from router.state.budgets import Exceeded, Hold
from router.state.keylimits import SharedKeyLimits
from router.telemetry.metrics import Metrics

log = logging.getLogger("cascade.keys")

Headers = list[tuple[bytes, bytes]]
# A Retry-After longer than this is not worth waiting for in a client: it is told not to retry
MAX_CLIENT_WAIT = 60


class KeyGate:
    """Authenticate, admit, reserve and settle, over one gateway's keys, books and metrics."""

    __slots__ = ("config", "keys", "ledger", "metrics", "shared")

    def __init__(
        self,
        config: Config,
        keys: KeyRing,
        ledger: Ledger,
        metrics: Metrics,
        shared: SharedKeyLimits | None = None,
    ) -> None:
        self.config = config
        self.keys = keys
        self.ledger = ledger
        self.metrics = metrics
        self.shared = shared  # rpm/tpm across replicas (state.backend: redis)

    def authenticate(self, authorization: bytes | None, x_api_key: bytes | None) -> KeyConfig:
        """The key a model endpoint was called with; 401 (before anything else) without one."""
        presented = presented_key(authorization, x_api_key)
        key = self.keys.authenticate(presented)
        if key is None:
            self.metrics.key_refusals.labels("-", "auth").inc()
            raise RequestError(
                "missing API key" if presented is None else "invalid API key",
                status=401,
                code="invalid_api_key",
            )
        return key

    async def admit(self, key: KeyConfig, model: str, tokens: int) -> Headers:
        """Refuse what `key` may not do (403: the model; 429: rpm/tpm, this replica's windows
        and, with Redis, the deployment's leases); else the key's x-ratelimit-* headers (this
        replica's view), for the answer."""
        if not key.allows(model):
            self.metrics.key_refusals.labels(key.name, "model").inc()
            raise RequestError(
                f"this key may not use the model {model!r}",
                status=403,
                param="model",
                code="model_not_allowed",
                type="permission_error",
            )
        decision = self.keys.admit(key, tokens, trio.current_time())
        retry_after, reason = decision.retry_after, decision.reason
        if retry_after is None and self.shared is not None and self.shared.up:
            retry_after, reason = await self._shared(key, tokens)
        if retry_after is not None:
            self.metrics.key_refusals.labels(key.name, reason or "rpm").inc()
            wait = max(1, math.ceil(retry_after))
            headers = [(b"retry-after", str(wait).encode()), *decision.headers]
            if wait > MAX_CLIENT_WAIT:
                headers.append((b"x-should-retry", b"false"))
            raise RequestError(
                f"this key's {reason} limit is reached; retry in {wait} s",
                status=429,
                code="rate_limit_exceeded",
                type="rate_limit_error",
                headers=headers,
            )
        return decision.headers

    async def _shared(self, key: KeyConfig, tokens: int) -> tuple[float | None, str | None]:
        """The deployment's rpm, then tpm, from leases (a Redis failure: this replica's
        windows alone, which the request has already passed)."""
        shared = self.shared
        assert shared is not None
        try:
            for kind, limit, amount in (("rpm", key.rpm, 1), ("tpm", key.tpm, tokens)):
                if limit is not None:
                    retry = await shared.take(key.name, kind, limit, amount)
                    if retry is not None:
                        return retry, kind
        except Exception as exc:
            log.warning("client key %s: shared rpm/tpm unavailable (%s)", key.name, exc)
        return None, None

    async def reserve(
        self, key: KeyConfig, input_tokens: int, max_output: int | None, targets: Iterable[Target]
    ) -> Hold:
        """Reserve the request's worst case (its input, and its max_tokens or the default) at
        the dearest target it may use, or refuse it (429 `budget_exceeded`)."""
        out = max_output or self.config.auth.default_max_tokens
        prices = self.config.prices
        worst = Usage(input_tokens, out)
        cost = max((prices[str(t)].cost(worst) for t in targets if str(t) in prices), default=0.0)
        now = dt.datetime.now(dt.UTC)
        held = await self.ledger.reserve_shared(key.name, key.budgets, worst.total, cost, now)
        if isinstance(held, Hold):
            self.metrics.child(self.metrics.key_requests, key.name).inc()  # admitted
            return held
        self.metrics.key_refusals.labels(key.name, "budget").inc()
        raise _over_budget(held, now)

    def settle(
        self,
        hold: Hold,
        key: KeyConfig,
        route: str,
        served_by: Target | None,
        usage: Usage,
        outcome: str,
    ) -> None:
        """Book what the request cost: `usage` at `served_by`'s price (nothing served: a
        refund), and show what is left of the key's budgets."""
        provider, model = (served_by.provider, served_by.model) if served_by else ("-", "-")
        price = self.config.prices.get(f"{provider}/{model}")
        cost = min(price.cost(usage), hold.cost) if price is not None else 0.0  # <= reserved
        charge = Charge(
            time.time(), hold.key, route, provider, model, usage.input, usage.output, cost, outcome
        )
        now = dt.datetime.now(dt.UTC)
        ledger, metrics = self.ledger, self.metrics
        ledger.settle(hold, charge, now)
        for budget in key.budgets:  # this replica's view of what is left
            left = budget.limit - ledger.spent(key.name, budget.unit, budget.period, now)
            metrics.child(metrics.budget_left, key.name, budget.unit, budget.period).set(left)
        if usage.total:
            metrics.child(metrics.tokens, hold.key, provider, model, "input").inc(usage.input)
            metrics.child(metrics.tokens, hold.key, provider, model, "output").inc(usage.output)
            metrics.child(metrics.cost, hold.key, provider, model).inc(cost)


def _over_budget(held: Exceeded, now: dt.datetime) -> RequestError:
    """429 `budget_exceeded`: what did not fit (spent, reserved, this request's worst case), and
    when the period resets; never retried by the SDKs (x-should-retry: false): a budget frees
    at its reset, hours away, not in a client's retry loop."""
    budget = held.budget

    def amount(value: float) -> str:
        return f"{value:g} tokens" if budget.unit == "tokens" else f"${value:.6g}"

    headers: Headers = [(b"x-should-retry", b"false")]
    when = "it never resets"
    if held.reset is not None:
        wait = math.ceil((held.reset - now).total_seconds())
        headers.append((b"retry-after", str(wait).encode()))
        headers.append((b"x-budget-reset", held.reset.isoformat().encode()))
        when = f"it resets at {held.reset.isoformat()}"
    return RequestError(
        f"this key's {budget.period} budget of {amount(budget.limit)} cannot take this request:"
        f" {amount(held.spent)} spent, {amount(held.reserved)} reserved by requests in flight,"
        f" and this request needs up to {amount(held.need)}; {when}",
        status=429,
        code="budget_exceeded",
        type="budget_exceeded",
        headers=headers,
    )
