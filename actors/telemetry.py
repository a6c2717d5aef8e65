"""What a provider actor reports about itself, as a narrow interface it is handed.

The router implements it on Prometheus (router/ops/metrics.py); the actors know nothing of
metric names or libraries. Every method is called from the actor's own task and must not block.
"""

from __future__ import annotations

from typing import Protocol


class ProviderMetrics(Protocol):
    def attempt(self, outcome: str) -> None:
        """An upstream call ended: "ok" or the failure kind."""

    def refused(self, reason: str) -> None:
        """Admission refused an attempt (no upstream call)."""

    def cancelled(self, phase: str) -> None:
        """The dispatcher cancelled an attempt in this phase."""

    def blocked(self, reason: str, seconds: float) -> None:
        """A target was blocked for `seconds` (rate_limited, latency, manual) or its circuit
        opened (circuit_open)."""

    def first_byte(self, seconds: float) -> None:
        """Time to the first byte of a successful attempt."""

    def in_flight(self, delta: int) -> None:
        """Upstream calls in flight went up or down by `delta`."""

    def tokens(self, total: int, outcome: str = "served") -> None:
        """An attempt's total tokens, as the upstream reported them (the bill): `served` (a
        successful attempt), `failed` or `cancelled` (what it had reported before its end)."""


class NoMetrics:
    """A ProviderMetrics that records nothing (for an actor used on its own)."""

    def attempt(self, outcome: str) -> None:
        pass

    def refused(self, reason: str) -> None:
        pass

    def cancelled(self, phase: str) -> None:
        pass

    def blocked(self, reason: str, seconds: float) -> None:
        pass

    def first_byte(self, seconds: float) -> None:
        pass

    def in_flight(self, delta: int) -> None:
        pass

    def tokens(self, total: int, outcome: str = "served") -> None:
        pass
