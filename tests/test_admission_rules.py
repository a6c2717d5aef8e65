"""The actor's admission state machines, driven with explicit times (no clock, no trio)."""

from __future__ import annotations

from actors.machines import (
    BoundedMap,
    Circuits,
    LatencySamples,
    LatencyTriggers,
    RateLimits,
    RetryBudgetState,
    SlidingWindow,
)
from actors.settings import CircuitPolicy, LatencyTrigger, RateLimitPolicy, RetryBudget


def test_retry_after_blocks_until_then_recovers() -> None:
    limits = RateLimits(RateLimitPolicy())
    assert limits.block("gpt", now=100.0, retry_after=7.0) == 107.0
    assert limits.blocked_until("gpt", 106.9) == 107.0
    assert limits.blocked_until("gpt", 107.0) is None
    assert limits.blocked_until("other-model", 100.0) is None


def test_exponential_blocks_without_retry_after_reset_by_success() -> None:
    limits = RateLimits(RateLimitPolicy(block_base=60, block_max=200))
    assert limits.block("m", 0.0, None) == 60.0
    assert limits.block("m", 60.0, None) == 60.0 + 120.0
    assert limits.block("m", 180.0, None) == 180.0 + 200.0  # capped at block_max
    limits.success("m")
    assert limits.block("m", 1000.0, None) == 1060.0


def test_retry_after_is_capped() -> None:
    limits = RateLimits(RateLimitPolicy(max_retry_after=3600))
    assert limits.block("m", 0.0, 10 * 86400.0) == 3600.0


def test_provider_scope_blocks_every_model() -> None:
    limits = RateLimits(RateLimitPolicy(scope="provider"))
    limits.block("a", 0.0, 5.0)
    assert limits.blocked_until("b", 1.0) == 5.0


def test_block_map_is_bounded_under_a_flood_of_models() -> None:
    limits = RateLimits(RateLimitPolicy(max_tracked=100))
    for i in range(10_000):
        limits.block(f"model-{i}", float(i), 1.0)
    assert len(limits._blocks) == 100
    # The live blocks (the most recent ones) survived; expired ones were purged first.
    assert limits.blocked_until("model-9999", 9999.5) == 10000.0


def test_bounded_map_prefers_dropping_stale_entries() -> None:
    m: BoundedMap[int] = BoundedMap(3)
    m.put("a", 1)
    m.put("b", 2)
    m.put("c", 3)
    m.put("d", 4, stale=iter(["b"]))
    assert [k for k, _ in m.items()] == ["a", "c", "d"]
    m.put("e", 5)
    assert [k for k, _ in m.items()] == ["c", "d", "e"]


def test_latency_trigger_needs_min_triggers_within_window() -> None:
    t = LatencyTriggers(LatencyTrigger(threshold=2.0, min_triggers=3, window=60.0, block=30.0), 10)
    assert t.observe("m", 0.0, ttfb=2.5, total=3.0) is None
    assert t.observe("m", 10.0, ttfb=1.0, total=3.0) is None  # fast: not a breach
    assert t.observe("m", 20.0, ttfb=2.0, total=3.0) is None
    assert t.observe("m", 61.0, ttfb=3.0, total=3.0) is None  # the first breach left the window
    assert t.observe("m", 70.0, ttfb=3.0, total=3.0) == 100.0
    assert t.blocked_until("m", 99.0) == 100.0
    assert t.blocked_until("m", 100.0) is None


def test_latency_trigger_can_measure_total() -> None:
    t = LatencyTriggers(
        LatencyTrigger(threshold=2.0, measure="total", min_triggers=1, block=5.0), 10
    )
    assert t.observe("m", 0.0, ttfb=0.1, total=2.5) == 5.0


def test_circuit_opens_probes_and_closes() -> None:
    c = Circuits(CircuitPolicy(failures=3, window=10.0, open_for=30.0), 10)
    assert not c.failure("m", 0.0)
    assert not c.failure("m", 1.0)
    assert c.failure("m", 2.0)  # third failure in the window opens it
    assert c.admit("m", 10.0) == (False, 32.0)
    assert c.admit("m", 32.0) == (True, None)  # half-open: one probe
    assert c.admit("m", 32.5) == (False, None)  # a second caller waits for the probe
    assert c.failure("m", 33.0)  # the probe failed: open again
    assert c.admit("m", 40.0) == (False, 63.0)
    assert c.admit("m", 63.0) == (True, None)
    c.success("m")
    assert c.admit("m", 63.1) == (True, None)
    assert c.states(63.1) == []


def test_circuit_failures_outside_window_do_not_count() -> None:
    c = Circuits(CircuitPolicy(failures=2, window=10.0, open_for=30.0), 10)
    assert not c.failure("m", 0.0)
    assert not c.failure("m", 10.0)
    assert c.failure("m", 11.0)


def test_abandoned_probe_lets_the_next_request_probe() -> None:
    c = Circuits(CircuitPolicy(failures=1, window=10.0, open_for=5.0), 10)
    c.failure("m", 0.0)
    assert c.admit("m", 5.0) == (True, None)
    c.probe_abandoned("m")
    assert c.admit("m", 5.1) == (True, None)


def test_sliding_window_room_and_correction() -> None:
    w = SlidingWindow(60.0)
    assert w.room(0.0, 1, limit=2) is None
    w.add(0.0, 1)
    e = w.add(10.0, 1)
    assert w.room(20.0, 1, limit=2) == 60.0  # the first entry leaves the window at 60
    w.correct(e, 0)
    assert w.room(20.0, 1, limit=2) is None
    assert w.room(70.0, 2, limit=2) is None


def test_sliding_window_admits_one_oversized_request_when_empty() -> None:
    assert SlidingWindow(60.0).room(0.0, 5000, limit=1000) is None


def test_retry_budget() -> None:
    b = RetryBudgetState(RetryBudget(ratio=0.5, window=10.0, min_retries=1))
    for t in range(4):
        b.record(float(t), is_retry=False)
    assert b.allows_retry(4.0)
    b.record(4.0, is_retry=True)
    assert b.allows_retry(4.0)
    b.record(4.0, is_retry=True)
    assert not b.allows_retry(4.0)  # 2 retries = 0.5 x 4 first attempts
    assert b.allows_retry(20.0)  # the window moved on: min_retries applies


def test_latency_quantile() -> None:
    s = LatencySamples(size=100)
    assert s.quantile(0.95) is None
    for i in range(100):
        s.add(float(i))
    assert s.quantile(0.95) == 95.0
    assert s.quantile(0.5) == 50.0


def test_correcting_an_expired_entry_changes_nothing() -> None:
    w = SlidingWindow(60.0)
    old = w.add(0.0, 10)
    w.add(30.0, 5)
    w.expire(61.0)  # the first entry has left the window
    w.correct(old, 1000)
    assert w.total == 5
    fresh = w.add(61.0, 7)
    w.correct(fresh, 2)
    assert w.total == 7


def test_windows_stay_bounded_by_their_span_without_limits_or_readers() -> None:
    """Ten requests a second for an hour: every window holds only its last span (issue 9.3)."""
    window = SlidingWindow(60.0)
    budget = RetryBudgetState(RetryBudget(window=10.0))
    for i in range(36_000):
        now = i / 10
        window.add(now, 1)
        budget.record(now, is_retry=False)  # never asked `allows_retry`, as with no retries
    assert len(window) == 600 and window.total == 600
    assert len(budget._firsts) == 100
