"""Prometheus metrics. One `Metrics` per server (its own registry, so tests and reloads never clash).

Hot paths bind their label children once (`labels(...)` is a dict lookup plus a lock) and keep
them; see the provider actor.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from actors.telemetry import ProviderMetrics

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
_BLOCK_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 900, 1800, 3600, 7200, 86400)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self._request_children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.requests = Counter(
            "cascade_requests_total",
            "Client requests answered, by route, the client's dialect and status",
            ["route", "dialect", "status"],
            registry=r,
        )
        self.overhead = Histogram(
            "cascade_gateway_overhead_seconds",
            "Time spent in Cascade itself per answered request: before the cascade starts, and"
            " from the upstream's first byte to the client's",
            buckets=_OVERHEAD_BUCKETS,
            registry=r,
        )
        self.rate_limits = Counter(
            "cascade_rate_limits_total",
            "Rate-limit answers from upstreams (429, 529, rate-limit 401/403)",
            ["provider", "model"],
            registry=r,
        )
        self.alternatives = Counter(
            "cascade_alternatives_used_total",
            "Requests served by a route's alternative, with the primary they went around",
            ["primary_provider", "alternative_provider", "model"],
            registry=r,
        )
        self.block_seconds = Histogram(
            "cascade_block_seconds",
            "How long each block was set for, by provider and reason",
            ["provider", "reason"],
            buckets=_BLOCK_BUCKETS,
            registry=r,
        )
        self.reloads = Counter(
            "cascade_config_reloads_total", "Config reloads, by result", ["result"], registry=r
        )
        self.request_seconds = Histogram(
            "cascade_request_duration_seconds",
            "Client request latency (to the last byte)",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.attempts = Counter(
            "cascade_upstream_attempts_total",
            "Upstream attempts by outcome (ok or the failure kind)",
            ["provider", "outcome"],
            registry=r,
        )
        self.refusals = Counter(
            "cascade_admission_refusals_total",
            "Attempts refused by a provider actor without an upstream call",
            ["provider", "reason"],
            registry=r,
        )
        self.ttfb = Histogram(
            "cascade_upstream_ttfb_seconds",
            "Upstream time to first byte (first event for streams)",
            ["provider"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "cascade_upstream_in_flight", "Upstream calls in flight", ["provider"], registry=r
        )
        self.cancelled = Counter(
            "cascade_upstream_cancelled_total",
            "Upstream attempts cancelled, by the phase they were in",
            ["provider", "phase"],
            registry=r,
        )
        self.blocks = Counter(
            "cascade_target_blocks_total",
            "Targets blocked (rate limit, latency trigger, circuit opened)",
            ["provider", "reason"],
            registry=r,
        )
        self.resumes = Counter(
            "cascade_stream_resumes_total",
            "Streams whose provider failed after the first byte, on a route that resumes: resumed"
            " (continued on another target), failed (no target could continue), not_resumable"
            " (a tool call or thinking had begun, resume.max reached, the deadline passed)",
            ["route", "outcome"],
            registry=r,
        )
        self.hedges = Counter(
            "cascade_hedges_total", "Hedged attempts by outcome", ["route", "outcome"], registry=r
        )
        self.key_requests = Counter(
            "cascade_key_requests_total",
            "Requests admitted per client key (by the key's name, never the key)",
            ["key"],
            registry=r,
        )
        self.key_refusals = Counter(
            "cascade_key_refusals_total",
            "Requests refused for a client key: auth (no or a wrong key: key '-'), model, rpm, tpm",
            ["key", "reason"],
            registry=r,
        )
        # Per provider: a plain [int] the actor adds to (no lock on the request path), read
        # by the collector below at scrape time.
        self.upstream_tokens: dict[str, list[int]] = {}
        self.upstream_tokens_other: dict[tuple[str, str], int] = {}  # failed, cancelled
        r.register(_UpstreamTokens(self.upstream_tokens, self.upstream_tokens_other))
        # A worker's supervisor's figures (router/serving/workers.py), filled in by its control link
        self.supervisor: dict[str, int] = {}
        r.register(_Supervisor(self.supervisor))
        self.tokens = Counter(
            "cascade_key_tokens_total",
            "Tokens charged to client keys, by key name, provider, model and kind (input, output)",
            ["key", "provider", "model", "kind"],
            registry=r,
        )
        self.cost = Counter(
            "cascade_key_cost_usd_total",
            "Cost charged to client keys (USD, from the configured prices)",
            ["key", "provider", "model"],
            registry=r,
        )
        self.budget_left = Gauge(
            "cascade_key_budget_remaining",
            "What is left of each client key's budget this period (tokens, or USD for cost), as"
            " this process saw it at its last settlement",
            ["key", "unit", "period"],
            registry=r,
        )
        self.state_up = Gauge(
            "cascade_state_backend_up",
            "1 while the shared state backend is reachable (with backend local: always 1)",
            ["backend"],
            registry=r,
        )
        self.state_events = Counter(
            "cascade_state_events_total",
            "Shared-state events (blocks, circuits) published to or received from other replicas",
            ["direction"],
            registry=r,
        )
        self.failovers = Counter(
            "cascade_failovers_total",
            "Requests answered by a target other than their first",
            ["route"],
            registry=r,
        )

    def child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, remembered (its lookup takes a lock; settlement runs per
        request). Label values come from the config, so the memo is bounded."""
        found = self._children.get((id(metric), labels))
        if found is None:
            found = self._children[(id(metric), labels)] = metric.labels(*labels)
        return found

    def provider(self, name: str) -> ProviderMetrics:
        """The metrics one provider actor reports (actors/telemetry.py), labelled `name`."""
        return _ProviderMetrics(self, name)

    def observe_request(
        self, route: str, dialect: str, status: int, seconds: float, overhead: float | None
    ) -> None:
        """Count one answered request; label children are cached (a lookup costs ~3 us)."""
        key = (route, dialect, status)
        children = self._request_children.get(key)
        if children is None:
            children = self._request_children[key] = (
                self.requests.labels(route, dialect, str(status)),
                self.request_seconds.labels(route),
            )
        children[0].inc()
        children[1].observe(seconds)
        if overhead is not None:
            self.overhead.observe(overhead)

    def bill(self, provider: str, outcome: str, tokens: int) -> None:
        """Estimated tokens of an attempt that ended early (a keyed stream's relayed content),
        in cascade_upstream_tokens_total beside what upstreams reported."""
        key = (provider, outcome)
        self.upstream_tokens_other[key] = self.upstream_tokens_other.get(key, 0) + tokens

    def count_refused(self, dialect: str, status: int) -> None:
        """A model request refused before its cascade (bad input, unknown model, a key's
        limits): counted under route "-", with no latency."""
        self.requests.labels("-", dialect, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ProviderMetrics:
    """`ProviderMetrics` on this registry. The hot children (in flight, first byte, ok, tokens)
    are bound once; the rest are looked up when they happen, which is rarely."""

    __slots__ = ("_attempt_ok", "_in_flight", "_metrics", "_name", "_tokens", "_ttfb")

    def __init__(self, metrics: Metrics, name: str) -> None:
        self._metrics = metrics
        self._name = name
        self._in_flight = metrics.in_flight.labels(name)
        self._ttfb = metrics.ttfb.labels(name)
        self._attempt_ok = metrics.attempts.labels(name, "ok")
        self._tokens = metrics.upstream_tokens.setdefault(name, [0])

    def attempt(self, outcome: str) -> None:
        if outcome == "ok":
            self._attempt_ok.inc()
        else:
            self._metrics.attempts.labels(self._name, outcome).inc()

    def refused(self, reason: str) -> None:
        self._metrics.refusals.labels(self._name, reason).inc()

    def cancelled(self, phase: str) -> None:
        self._metrics.cancelled.labels(self._name, phase).inc()

    def blocked(self, reason: str, seconds: float) -> None:
        self._metrics.blocks.labels(self._name, reason).inc()
        self._metrics.block_seconds.labels(self._name, reason).observe(seconds)

    def first_byte(self, seconds: float) -> None:
        self._ttfb.observe(seconds)

    def in_flight(self, delta: int) -> None:
        self._in_flight.inc(delta)

    def tokens(self, total: int, outcome: str = "served") -> None:
        if outcome == "served":
            self._tokens[0] += total
        else:
            self._metrics.bill(self._name, outcome, total)


class _UpstreamTokens(Collector):
    """`cascade_upstream_tokens_total{provider,outcome}`, from the totals the actors keep."""

    def __init__(self, totals: dict[str, list[int]], others: dict[tuple[str, str], int]) -> None:
        self._totals = totals
        self._others = others

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "cascade_upstream_tokens",
            "Tokens providers reported using (input + output), whoever they were for: the"
            " operator's bill. outcome: served (successful attempts), failed and cancelled (what"
            " the upstream had reported before the attempt ended)",
            labels=["provider", "outcome"],
        )
        for name, total in sorted(self._totals.items()):
            family.add_metric([name, "served"], total[0])
        for (name, outcome), count in sorted(self._others.items()):
            family.add_metric([name, outcome], count)
        yield family


class _Supervisor(Collector):
    """`cascade_workers{state}` and `cascade_worker_restarts_total`, as the supervisor last told
    this worker; nothing for a gateway that runs as one process."""

    def __init__(self, figures: dict[str, int]) -> None:
        self._figures = figures

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        if not self._figures:
            return
        workers = GaugeMetricFamily(
            "cascade_workers",
            "Worker processes the supervisor wants and has running",
            labels=["state"],
        )
        for state in ("wanted", "running"):
            workers.add_metric([state], self._figures.get(state, 0))
        yield workers
        yield CounterMetricFamily(
            "cascade_worker_restarts",
            "Workers the supervisor replaced after they died",
            value=self._figures.get("restarts", 0),
        )
