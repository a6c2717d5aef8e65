"""The budget path's health (issue 21): a reservation that failed against Redis sends the next
second's reservations to the replica's own books at once (no timeout paid per request), and
/readyz's state says so. Virtual time."""

from __future__ import annotations

import trio
import trio.testing

from router.config import StateConfig
from router.state.redis import RedisState
from router.telemetry.metrics import Metrics


async def test_a_failed_reservation_skips_redis_for_a_second_and_readyz_says_so(
    autojump_clock: trio.testing.MockClock,
) -> None:
    state = RedisState(StateConfig(backend="redis"), Metrics())
    state.up = True
    state.budgets.client = object()  # type: ignore[assignment]  # connected, as far as it knows
    assert state.budgets.up and "budgets" not in state.status()
    state.budgets.failed()
    assert not state.budgets.up
    assert state.status()["budgets"].startswith("failing")  # type: ignore[union-attr]
    await trio.sleep(0.99)
    assert not state.budgets.up
    await trio.sleep(0.02)  # a second later: Redis is tried again
    assert state.budgets.up and "budgets" not in state.status()
