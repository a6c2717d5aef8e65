"""The pure retry policy: the failure table, per-status rules, jitter kinds, and plan strategies."""

from __future__ import annotations

import random

import pytest

from actors.outcome import Failure, Kind, classify_status
from router.cascade.policy import Action, Plan, backoff_delay, decide
from router.config import Backoff, RetryConfig, StatusRule, Target


@pytest.mark.parametrize(
    ("status", "body", "kind"),
    [
        (200, b"", None),
        (429, b"", Kind.RATE_LIMITED),
        (529, b"", Kind.RATE_LIMITED),
        (403, b'{"error":{"type":"rate_limit_error"}}', Kind.RATE_LIMITED),
        (401, b'{"error":{"type":"authentication_error"}}', Kind.AUTH),
        (500, b"", Kind.TRANSIENT),
        (503, b"", Kind.TRANSIENT),
        (400, b'{"error":{"code":"context_length_exceeded"}}', Kind.CONTEXT_OVERFLOW),
        (400, b'{"error":{"code":"content_policy_violation"}}', Kind.CLIENT_ERROR),
        (404, b"", Kind.CLIENT_ERROR),
        (422, b"", Kind.CLIENT_ERROR),
    ],
)
def test_classify_status(status: int, body: bytes, kind: Kind | None) -> None:
    assert classify_status(status, body) is kind


def test_decide_follows_the_failure_table() -> None:
    retry = RetryConfig()
    assert decide(Failure.from_status(429, b""), retry).action is Action.FAILOVER
    assert decide(Failure.from_status(503, b""), retry).action is Action.RETRY
    assert decide(Failure(Kind.TRANSIENT, "connect_error", ""), retry).action is Action.RETRY
    assert (
        decide(Failure(Kind.SLOW, "first_byte_timeout", "", timeout=True), retry).action
        is Action.FAILOVER
    )
    assert (
        decide(Failure.from_status(400, b"context_length_exceeded"), retry).action
        is Action.CONTEXT_OVERFLOW
    )
    assert decide(Failure.from_status(400, b""), retry).action is Action.RETURN
    assert decide(Failure.from_status(401, b""), retry).action is Action.RETURN


def test_status_rules_with_ranges_override_the_table() -> None:
    retry = RetryConfig(
        on_status=(
            StatusRule(frozenset(range(500, 505)), "same_model", max_attempts=2),
            StatusRule(frozenset({429}), "return"),
            StatusRule(frozenset({404}), "failover"),
        )
    )
    d = decide(Failure.from_status(502, b""), retry)
    assert (d.action, d.strategy, d.max_attempts) == (Action.RETRY, "same_model", 2)
    assert decide(Failure.from_status(505, b""), retry).strategy == "different_provider"
    assert decide(Failure.from_status(429, b""), retry).action is Action.RETURN
    assert decide(Failure.from_status(404, b""), retry).action is Action.FAILOVER


def test_timeouts_follow_on_timeout() -> None:
    d = decide(
        Failure(Kind.SLOW, "idle_timeout", "", timeout=True), RetryConfig(on_timeout="same_model")
    )
    assert (d.action, d.strategy) == (Action.RETRY, "same_model")


class FixedRng(random.Random):
    """uniform(a, b) returns the midpoint, so jitter maths can be checked exactly."""

    def uniform(self, a: float, b: float) -> float:
        return (a + b) / 2


@pytest.mark.parametrize(
    ("jitter", "delays"),
    [
        ("none", [1.0, 2.0, 4.0, 8.0, 10.0]),
        ("full", [0.5, 1.0, 2.0, 4.0, 5.0]),
        ("equal", [0.75, 1.5, 3.0, 6.0, 7.5]),
        ("decorrelated", [1.0, 2.0, 3.5, 5.75, 9.125]),
    ],
)
def test_backoff_jitter_kinds(jitter: str, delays: list[float]) -> None:
    backoff = Backoff(base=1.0, max=10.0, jitter=jitter)  # type: ignore[arg-type]
    got, previous = [], 0.0
    for n in range(1, 6):
        previous = backoff_delay(backoff, n, previous, FixedRng())
        got.append(previous)
    assert got == delays


def test_jitter_stays_within_bounds_with_a_real_rng() -> None:
    rng = random.Random(7)
    for jitter in ("full", "equal", "decorrelated"):
        previous = 0.0
        for n in range(1, 50):
            previous = backoff_delay(Backoff(base=0.1, max=5.0, jitter=jitter), n, previous, rng)  # type: ignore[arg-type]
            assert 0.0 <= previous <= 5.0


A1, A2, B1, C1 = Target("a", "1"), Target("a", "2"), Target("b", "1"), Target("c", "1")


def drain(plan: Plan) -> list[Target]:
    out = []
    while plan:
        out.append(plan.pop())
    return out


def test_plan_same_model_retries_in_place_then_goes_on() -> None:
    plan = Plan([A1, A2, B1])
    assert plan.pop() == A1
    assert plan.retry(A1, "same_model", max_retries=1)
    assert plan.pop() == A1
    assert not plan.retry(A1, "same_model", max_retries=1)
    assert drain(plan) == [A2, B1]


def test_plan_same_provider_prefers_the_providers_other_targets() -> None:
    plan = Plan([A1, B1, A2, C1])
    plan.pop()
    assert not plan.retry(A1, "same_provider", max_retries=0)
    assert drain(plan) == [A2, B1, C1]


def test_plan_different_provider_moves_on_and_retries_last() -> None:
    plan = Plan([A1, A2, B1, C1])
    plan.pop()
    assert plan.retry(A1, "different_provider", max_retries=2)
    assert drain(plan) == [B1, C1, A2, A1]


def test_plan_dedupes_and_hedges_only_to_fresh_targets() -> None:
    plan = Plan([A1, B1, A1, C1])
    plan.mark_tried(B1)
    assert plan.pop_fresh() == A1
    assert plan.pop_fresh() == C1
    assert plan.pop_fresh() is None
