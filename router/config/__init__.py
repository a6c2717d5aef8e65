"""Cascade's configuration: YAML in, frozen attrs classes out, every problem reported with its field path.

`Config.from_yaml` / `Config.from_mapping` validate the whole document before anything uses it and
raise one `ConfigError` listing every problem found, each as `path.to.field: what is wrong`.
API keys are never read from the file: a provider names the environment variable that holds it.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import attrs
import yaml

from actors.http1 import header_problem
from actors.settings import (
    Azure,
    Bedrock,
    CircuitPolicy,
    LatencyTrigger,
    Limits,
    ProviderConfig,
    RateLimitPolicy,
    RetryBudget,
    Timeouts,
    Vertex,
)
from actors.vertex import base_url as vertex_base_url
from router.config.keys import AuthConfig, Budget, KeyConfig, Period, Price
from router.units import parse_duration, parse_size

T = TypeVar("T")

Jitter = Literal["full", "equal", "decorrelated", "none"]
Strategy = Literal["same_model", "same_provider", "different_provider"]
STRATEGIES: tuple[Strategy, ...] = ("same_model", "same_provider", "different_provider")


class ConfigError(ValueError):
    """The config is invalid; `problems` lists every `field.path: message`."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid config:\n" + "\n".join(f"  {p}" for p in self.problems))


_MISSING: Any = object()


class _Fields:
    """Reads one mapping of the raw document, recording problems instead of raising.

    Every accessor returns a usable value (the default when the field is wrong) so that one pass
    over the document finds every problem, not just the first.
    """

    def __init__(self, raw: object, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        self._seen: set[str] = set()
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            problems.append(f"{path or '<root>'}: expected a mapping, got {_kind(raw)}")
            raw = {}
        self.raw: Mapping[str, Any] = raw

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str, message: str) -> None:
        self.problems.append(f"{self.at(key)}: {message}")

    def has(self, key: str) -> bool:
        return key in self.raw

    def get(self, key: str) -> Any:
        self._seen.add(key)
        value = self.raw.get(key, _MISSING)
        return _MISSING if value is None else value

    def _typed(self, key: str, default: T, convert: Callable[[Any], T], expected: str) -> T:
        value = self.get(key)
        if value is _MISSING:
            if default is _MISSING:
                self.error(key, "is required")
            return default
        try:
            return convert(value)
        except (ValueError, TypeError):
            self.error(key, f"expected {expected}, got {shown(value)}")
            return default

    def duration(self, key: str, default: float, *, positive: bool = False) -> float:
        def convert(v: Any) -> float:
            d = parse_duration(v)
            if positive and d <= 0:
                raise ValueError(v)
            return d

        kind = "a positive duration" if positive else "a duration"
        return self._typed(key, default, convert, f'{kind} like "30s"')

    def optional_duration(self, key: str) -> float | None:
        if self.get(key) is _MISSING:
            return None
        return self.duration(key, _MISSING, positive=True)

    def size(self, key: str, default: int) -> int:
        return self._typed(key, default, parse_size, 'a size like "10MiB"')

    def integer(
        self, key: str, default: int, *, minimum: int = 0, maximum: int | None = None
    ) -> int:
        def convert(v: Any) -> int:
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                raise ValueError(v)
            if maximum is not None and v > maximum:
                raise ValueError(v)
            return v

        bound = f"an integer >= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
        return self._typed(key, default, convert, bound)

    def optional_integer(self, key: str, *, minimum: int = 1) -> int | None:
        if self.get(key) is _MISSING:
            return None
        return self.integer(key, _MISSING, minimum=minimum)

    def number(self, key: str, default: float, *, minimum: float, maximum: float) -> float:
        def convert(v: Any) -> float:
            if isinstance(v, bool) or not isinstance(v, int | float) or not minimum <= v <= maximum:
                raise ValueError(v)
            return float(v)

        return self._typed(key, default, convert, f"a number from {minimum:g} to {maximum:g}")

    def string(self, key: str, default: str) -> str:
        def convert(v: Any) -> str:
            if not isinstance(v, str) or not v:
                raise ValueError(v)
            return v

        return self._typed(key, default, convert, "a non-empty string")

    def optional_string(self, key: str) -> str | None:
        if self.get(key) is _MISSING:
            return None
        return self.string(key, _MISSING)

    def choice(self, key: str, default: T, choices: tuple[T, ...]) -> T:
        def convert(v: Any) -> T:
            if v not in choices:
                raise ValueError(v)
            return v

        return self._typed(key, default, convert, "one of " + ", ".join(map(str, choices)))

    def boolean(self, key: str, default: bool) -> bool:
        def convert(v: Any) -> bool:
            if not isinstance(v, bool):
                raise ValueError(v)
            return v

        return self._typed(key, default, convert, "true or false")

    def strings(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        def convert(v: Any) -> tuple[str, ...]:
            if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
                raise TypeError
            return tuple(v)

        return self._typed(key, default, convert, "a list of non-empty strings")

    def sub(self, key: str) -> _Fields:
        value = self.get(key)
        return _Fields(None if value is _MISSING else value, self.at(key), self.problems)

    def items(self, key: str) -> list[tuple[str, Any]]:
        """The entries of a list field as (path, value) pairs."""
        value = self.get(key)
        if value is _MISSING:
            return []
        if not isinstance(value, list):
            self.error(key, f"expected a list, got {_kind(value)}")
            return []
        return [(f"{self.at(key)}[{i}]", v) for i, v in enumerate(value)]

    def done(self) -> None:
        for key in self.raw:
            if key not in self._seen:
                self.problems.append(f"{self.at(str(key))}: unknown field")


# Provider key prefixes (sk-, sk-ant-, xai-, gsk_, AIza…), or 32+ characters of key alphabet in a row
_SECRET_LIKE = re.compile(
    r"\b(?:sk|pk|rk|xai|gsk|ghp|key)[-_][A-Za-z0-9_\-]{8,}|\bAIza[A-Za-z0-9_\-]{20,}"
    r"|[A-Za-z0-9_+/=]{32,}"
)


def shown(value: object) -> str:
    """`value` as an error message may show it: never a string that looks like a secret (an API
    key pasted into the wrong field would otherwise be printed by `cascade check` and logs)."""
    if isinstance(value, str) and _SECRET_LIKE.search(value):
        return "<a value that looks like a key; not shown>"
    return repr(value)


def _kind(value: object) -> str:
    if value is None:
        return "nothing"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


# --------------------------------------------------------------------------------------------
# Provider


def _parse_timeouts(f: _Fields) -> Timeouts:
    d = Timeouts()
    t = Timeouts(
        connect=f.duration("connect", d.connect, positive=True),
        first_byte=f.duration("first_byte", d.first_byte, positive=True),
        idle=f.duration("idle", d.idle, positive=True),
        total=f.duration("total", d.total, positive=True),
    )
    f.done()
    return t


def _parse_limits(f: _Fields) -> Limits:
    limits = Limits(rpm=f.optional_integer("rpm"), tpm=f.optional_integer("tpm"))
    f.done()
    return limits


def _parse_rate_limit(f: _Fields) -> RateLimitPolicy:
    d = RateLimitPolicy()
    policy = RateLimitPolicy(
        scope=f.choice("scope", d.scope, ("provider", "model")),
        max_retry_after=f.duration("max_retry_after", d.max_retry_after, positive=True),
        block_base=f.duration("block_base", d.block_base, positive=True),
        block_max=f.duration("block_max", d.block_max, positive=True),
        max_tracked=f.integer("max_tracked", d.max_tracked, minimum=1),
    )
    if policy.block_max < policy.block_base:
        f.error("block_max", "must be at least block_base")
    f.done()
    return policy


def _parse_latency(f: _Fields) -> LatencyTrigger:
    trigger = LatencyTrigger(
        threshold=f.duration("threshold", _MISSING, positive=True),
        measure=f.choice("measure", "ttfb", ("ttfb", "total")),
        min_triggers=f.integer("min_triggers", 3, minimum=1),
        window=f.duration("window", 60.0, positive=True),
        block=f.duration("block", 60.0, positive=True),
    )
    f.done()
    return trigger


def _parse_circuit(f: _Fields) -> CircuitPolicy:
    d = CircuitPolicy()
    policy = CircuitPolicy(
        failures=f.integer("failures", d.failures, minimum=1),
        window=f.duration("window", d.window, positive=True),
        open_for=f.duration("open_for", d.open_for, positive=True),
    )
    f.done()
    return policy


def _parse_retry_budget(f: _Fields) -> RetryBudget:
    d = RetryBudget()
    budget = RetryBudget(
        ratio=f.number("ratio", d.ratio, minimum=0.0, maximum=10.0),
        window=f.duration("window", d.window, positive=True),
        min_retries=f.integer("min_retries", d.min_retries),
    )
    f.done()
    return budget


@attrs.frozen
class MockSettings:
    """Behaviour of Cascade's mock upstream (`cascade mock`, and `mock:` providers in a config)."""

    latency: float = 0.0
    chunks: int = 8
    chunk_interval: float = 0.0
    error_rate: float = 0.0
    rate_429: float = 0.0
    retry_after: float | None = 1.0
    stall_rate: float = 0.0
    cut_rate: float = 0.0
    seed: int | None = None

    @classmethod
    def from_fields(cls, f: _Fields) -> MockSettings:
        d = cls()
        rate = {"minimum": 0.0, "maximum": 1.0}
        retry_after: float | None = d.retry_after
        if f.has("retry_after") and f.raw["retry_after"] in (None, False, "none"):
            f.get("retry_after")
            retry_after = None
        else:
            retry_after = f.duration("retry_after", 1.0)
        settings = cls(
            latency=f.duration("latency", d.latency),
            chunks=f.integer("chunks", d.chunks, minimum=1),
            chunk_interval=f.duration("chunk_interval", d.chunk_interval),
            error_rate=f.number("error_rate", d.error_rate, **rate),
            rate_429=f.number("rate_429", d.rate_429, **rate),
            retry_after=retry_after,
            stall_rate=f.number("stall_rate", d.stall_rate, **rate),
            cut_rate=f.number("cut_rate", d.cut_rate, **rate),
            seed=f.optional_integer("seed", minimum=0),
        )
        f.done()
        return settings


_PREFILLS = ("trailing", "prefix", "continue_final_message", "none")


def _parse_prefill(f: _Fields, dialect: str) -> Any:
    """How the provider continues a prefix (None: its dialect's default)."""
    if not f.has("prefill"):
        return None
    prefill = f.choice("prefill", "none", _PREFILLS)
    if dialect == "responses" and prefill != "none":
        f.error("prefill", "a responses provider cannot continue a prefix: only 'none'")
    return prefill


def _parse_provider(name: str, f: _Fields) -> tuple[ProviderConfig, MockSettings | None]:
    """The provider's settings, and its mock's when it is a `mock:` provider."""
    d = ProviderConfig(name=name, base_url="")
    mock = MockSettings.from_fields(f.sub("mock")) if f.has("mock") else None
    latency = _parse_latency(f.sub("latency")) if f.has("latency") else None
    dialect = f.choice("dialect", d.dialect, ("openai", "anthropic", "responses"))
    bedrock = _parse_bedrock(f, dialect)
    vertex = _parse_vertex(f, dialect)
    _no_keys_in_the_file(f)
    provider = ProviderConfig(
        name=name,
        base_url=_base_url(f, name, mock, bedrock, vertex).rstrip("/"),
        dialect=dialect,
        anthropic_version=_anthropic_version(f, dialect, d.anthropic_version),
        default_max_tokens=f.integer("default_max_tokens", d.default_max_tokens, minimum=1),
        drop_params=f.boolean("drop_params", d.drop_params),
        reasoning_models=f.strings("reasoning_models", d.reasoning_models),
        prefill=_parse_prefill(f, dialect),
        api_key_env=f.optional_string("api_key_env"),
        timeouts=_parse_timeouts(f.sub("timeouts")),
        max_retries=f.integer("max_retries", d.max_retries, maximum=100),
        max_in_flight=f.integer("max_in_flight", d.max_in_flight, minimum=1),
        max_connections=f.integer("max_connections", d.max_connections, minimum=1),
        limits=_parse_limits(f.sub("limits")),
        rate_limit=_parse_rate_limit(f.sub("rate_limit")),
        latency=latency,
        circuit=_parse_circuit(f.sub("circuit")),
        retry_budget=_parse_retry_budget(f.sub("retry_budget")),
        headers=_provider_headers(f),
        azure=_parse_azure(f, dialect),
        bedrock=bedrock,
        vertex=vertex,
        ca_file=_ca_file(f),
        proxy=_proxy(f, mock),
    )
    f.done()
    return provider, mock


def _parse_bedrock(f: _Fields, dialect: str) -> Bedrock | None:
    """providers.X.bedrock: {region, profile, anthropic_version} (Claude on AWS Bedrock)."""
    if not f.has("bedrock"):
        return None
    if dialect != "anthropic":
        f.error(
            "bedrock", "is Claude on Bedrock: an Anthropic-dialect provider (dialect: anthropic)"
        )
    b = f.sub("bedrock")
    region = b.string("region", "")
    if not region:
        b.error("region", 'is required (e.g. "us-east-1")')
    d = Bedrock(region="")
    bedrock = Bedrock(
        region=region,
        profile=b.optional_string("profile"),
        anthropic_version=b.string("anthropic_version", d.anthropic_version),
    )
    b.done()
    return bedrock


def _parse_vertex(f: _Fields, dialect: str) -> Vertex | None:
    """providers.X.vertex: {project, region, credentials_file, anthropic_version}."""
    if not f.has("vertex"):
        return None
    if dialect != "anthropic":
        f.error(
            "vertex", "is Claude on Vertex AI: an Anthropic-dialect provider (dialect: anthropic)"
        )
    v = f.sub("vertex")
    project, region = v.string("project", ""), v.string("region", "")
    for field, value in (("project", project), ("region", region)):
        if not value:
            v.error(field, "is required")
    d = Vertex(project="", region="")
    vertex = Vertex(
        project=project,
        region=region,
        credentials_file=v.optional_string("credentials_file"),
        anthropic_version=v.string("anthropic_version", d.anthropic_version),
    )
    v.done()
    return vertex


def _parse_azure(f: _Fields, dialect: str) -> Azure | None:
    """providers.X.azure: {api_version, deployments: {model: deployment}, auth}."""
    if not f.has("azure"):
        return None
    if dialect != "openai":
        f.error("azure", "is for an OpenAI-dialect provider (Azure OpenAI); remove dialect")
    a = f.sub("azure")
    api_version = a.string("api_version", "")
    if not api_version:
        a.error("api_version", 'is required (e.g. "2024-10-21")')
    deployments: dict[str, str] = {}
    given = a.get("deployments")
    if given is not _MISSING and not isinstance(given, dict):
        a.error("deployments", "expected a mapping of model names to deployment names")
    for model, deployment in given.items() if isinstance(given, dict) else ():
        if not isinstance(deployment, str) or not deployment:
            a.error(f"deployments.{model}", "expected the deployment's name")
        else:
            deployments[str(model)] = deployment
    azure = Azure(api_version, deployments, a.choice("auth", "api-key", ("api-key", "bearer")))
    a.done()
    return azure


def _base_url(
    f: _Fields,
    name: str,
    mock: MockSettings | None,
    bedrock: Bedrock | None = None,
    vertex: Vertex | None = None,
) -> str:
    if mock is not None:
        if f.get("base_url") is not _MISSING:
            f.error("base_url", "a provider has either base_url or mock, not both")
        return "mock://" + name
    if bedrock is not None and not f.has("base_url"):  # the region's runtime endpoint
        return f"https://bedrock-runtime.{bedrock.region}.amazonaws.com"
    if vertex is not None and not f.has("base_url"):
        return vertex_base_url(vertex.region)
    base_url = f.string("base_url", "")
    if not f.has("base_url"):
        f.error("base_url", "is required (or mock: for a local mock provider)")
    elif base_url and not base_url.startswith(("http://", "https://")):
        f.error("base_url", f"expected an http:// or https:// URL, got {shown(base_url)}")
    return base_url


def _provider_headers(f: _Fields) -> dict[str, str]:
    """Headers every call to the provider carries: names and values that can be sent, and none
    that Cascade sets itself."""
    headers = f.get("headers")
    if headers is _MISSING:
        return {}
    if not isinstance(headers, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        f.error("headers", "expected a mapping of header names to strings")
        return {}
    for header, value in headers.items():
        if header.lower() in ("host", "content-length", "transfer-encoding", "connection"):
            f.error(f"headers.{header}", "is set by Cascade for each request")
        elif (problem := header_problem(header, value)) is not None:
            f.error(f"headers.{header}", problem)
    return dict(headers)


def _anthropic_version(f: _Fields, dialect: str, default: str) -> str:
    version = f.string("anthropic_version", default)
    if f.has("anthropic_version") and dialect != "anthropic":
        f.error("anthropic_version", "only a provider with dialect: anthropic sends it")
    elif header_problem("anthropic-version", version) is not None:
        f.error("anthropic_version", "not a valid header value")
    return version


def _ca_file(f: _Fields) -> str | None:
    ca_file = f.optional_string("ca_file")
    if ca_file is not None and not Path(ca_file).is_file():
        f.error("ca_file", f"no such file: {ca_file!r}")
    return ca_file


def _proxy(f: _Fields, mock: MockSettings | None) -> str | None:
    proxy = f.optional_string("proxy")
    if mock is not None:
        if proxy is not None:
            f.error("proxy", "a mock provider is on this machine: it takes no proxy")
        return "none"  # loopback: never through the environment's proxy
    if proxy is not None and proxy != "none":
        if not proxy.startswith("http://") or not proxy[len("http://") :].split("/")[0]:
            # the value is not shown: a proxy URL may hold a password
            f.error("proxy", 'expected "none" or an http:// proxy URL (http://host:port)')
    return proxy


def _no_keys_in_the_file(f: _Fields) -> None:
    for forbidden in ("api_key", "key"):
        if f.has(forbidden):
            f.get(forbidden)
            f.error(forbidden, "API keys are never written in the config; use api_key_env")


# --------------------------------------------------------------------------------------------
# Routes and retry policy


@attrs.frozen
class Target:
    """One place a request can go: a provider and the model name to ask it for."""

    provider: str
    model: str

    def __str__(self) -> str:
        return f"{self.provider}/{self.model}"

    @classmethod
    def parse(
        cls, path: str, raw: object, providers: Mapping[str, object], problems: list[str]
    ) -> Target | None:
        if not isinstance(raw, str) or "/" not in raw:
            problems.append(f'{path}: expected "provider/model", got {shown(raw)}')
            return None
        provider, _, model = raw.partition("/")
        if not model:
            problems.append(f'{path}: expected "provider/model", got {shown(raw)}')
            return None
        if provider not in providers:
            problems.append(f"{path}: unknown provider {provider!r}")
            return None
        return cls(provider, model)


@attrs.frozen
class Hedge:
    """Start a second attempt when the first has no first byte after `after` seconds.

    `after` is a fixed delay, or None for `p95`: the target's own observed first-byte p95, clamped
    to [`min_delay`, `max_delay`].
    """

    after: float | None = 1.5
    max: int = 1
    min_delay: float = 0.1
    max_delay: float = 10.0
    budget: float = 0.1
    min_hedges: int = 3  # per rolling minute, whatever `budget` allows: a quiet route hedges too

    @classmethod
    def from_fields(cls, f: _Fields) -> Hedge:
        d = cls()
        after: float | None
        if f.has("after") and f.raw["after"] == "p95":
            f.get("after")
            after = None
        else:
            after = f.duration("after", 1.5, positive=True)
        hedge = cls(
            after=after,
            max=f.integer("max", d.max, minimum=1, maximum=4),
            min_delay=f.duration("min_delay", d.min_delay),
            max_delay=f.duration("max_delay", d.max_delay, positive=True),
            budget=f.number("budget", d.budget, minimum=0.0, maximum=1.0),
            min_hedges=f.integer("min_hedges", d.min_hedges),
        )
        f.done()
        return hedge


RESUME_ON = ("cut", "stall", "error_event")


@attrs.frozen
class Resume:
    """Continue a stream whose provider failed after its first byte on the next target that can
    continue a prefix, within the request's deadline (docs/failure-semantics.md)."""

    on: tuple[str, ...] = RESUME_ON  # which failures: cut, stall, error_event
    max: int = 1  # resumes per request

    @classmethod
    def from_fields(cls, f: _Fields) -> Resume:
        d = cls()
        on = f.strings("on", d.on)
        for name in on:
            if name not in RESUME_ON:
                f.error("on", f"{name!r} is not one of {', '.join(RESUME_ON)}")
        resume = cls(on=on, max=f.integer("max", d.max, minimum=1, maximum=4))
        f.done()
        return resume


def _parse_resume(f: _Fields) -> Resume | None:
    """`resume: true` (the defaults), `false`, or `{on: [...], max: N}`."""
    if not f.has("resume"):
        return None
    if isinstance(f.raw["resume"], bool):
        return Resume() if f.boolean("resume", False) else None
    return Resume.from_fields(f.sub("resume"))


@attrs.frozen
class Route:
    match: str
    targets: tuple[Target, ...]
    alternatives: tuple[Target, ...] = ()
    on_context_overflow: tuple[Target, ...] = ()
    deadline: float | None = None
    hedge: Hedge | None = None
    resume: Resume | None = None  # continue a stream whose provider failed after it began
    direct: bool = (
        False  # a `provider/model` address, not a configured route (its model is the client's)
    )

    @property
    def every_target(self) -> tuple[Target, ...]:
        """Every target the route may use: its targets, alternatives and larger-context ones."""
        return self.targets + self.alternatives + self.on_context_overflow

    @property
    def is_glob(self) -> bool:
        return any(c in self.match for c in "*?[")

    def matches(self, model: str) -> bool:
        return fnmatch.fnmatchcase(model, self.match) if self.is_glob else model == self.match

    @classmethod
    def from_fields(cls, f: _Fields, providers: Mapping[str, object]) -> Route:
        def targets(key: str) -> tuple[Target, ...]:
            parsed = [Target.parse(p, v, providers, f.problems) for p, v in f.items(key)]
            return tuple(t for t in parsed if t is not None)

        route = cls(
            match=f.string("match", _MISSING),
            targets=targets("targets"),
            alternatives=targets("alternatives"),
            on_context_overflow=targets("on_context_overflow"),
            deadline=f.optional_duration("deadline"),
            hedge=Hedge.from_fields(f.sub("hedge")) if f.has("hedge") else None,
            resume=_parse_resume(f),
        )
        if not f.raw.get("targets"):
            f.error("targets", "needs at least one target")
        f.done()
        return route


@attrs.frozen
class Backoff:
    base: float = 0.1
    max: float = 5.0
    jitter: Jitter = "full"
    scope: Literal["model", "provider", "global"] = "model"

    @classmethod
    def from_fields(cls, f: _Fields) -> Backoff:
        d = cls()
        backoff = cls(
            base=f.duration("base", d.base),
            max=f.duration("max", d.max),
            jitter=f.choice("jitter", d.jitter, ("full", "equal", "decorrelated", "none")),
            scope=f.choice("scope", d.scope, ("model", "provider", "global")),
        )
        if backoff.max < backoff.base:
            f.error("max", "must be at least base")
        f.done()
        return backoff


def _parse_codes(path: str, raw: object, problems: list[str]) -> frozenset[int]:
    """Status codes from `[429, "500-504", "400,404"]`."""
    items = raw if isinstance(raw, list) else [raw]
    codes: set[int] = set()
    for i, item in enumerate(items):
        for raw_part in str(item).split(","):
            part = raw_part.strip()
            lo, sep, hi = part.partition("-")
            try:
                a = int(lo)
                b = int(hi) if sep else a
                if not (100 <= a <= b <= 599):
                    raise ValueError(part)
            except ValueError:
                problems.append(
                    f'{path}[{i}]: expected a status code or range like "500-504", got {shown(item)}'
                )
                continue
            codes.update(range(a, b + 1))
    return frozenset(codes)


@attrs.frozen
class StatusRule:
    """Overrides the retry strategy (and optionally the attempt cap) for some upstream statuses."""

    codes: frozenset[int]
    strategy: Strategy | Literal["failover", "return"]
    max_attempts: int | None = None

    @classmethod
    def from_fields(cls, f: _Fields) -> StatusRule:
        codes = _parse_codes(f.at("codes"), f.get("codes"), f.problems) if f.has("codes") else None
        if codes is None:
            f.error("codes", "is required")
        rule = cls(
            codes=codes or frozenset(),
            strategy=f.choice(
                "strategy", "different_provider", (*STRATEGIES, "failover", "return")
            ),
            max_attempts=f.optional_integer("max_attempts"),
        )
        f.done()
        return rule


@attrs.frozen
class RetryConfig:
    max_attempts: int = 4
    strategy: Strategy = "different_provider"
    backoff: Backoff = Backoff()
    on_status: tuple[StatusRule, ...] = ()
    on_timeout: Strategy | Literal["failover"] = "failover"

    @classmethod
    def from_fields(cls, f: _Fields) -> RetryConfig:
        d = cls()
        rules = tuple(
            StatusRule.from_fields(_Fields(v, p, f.problems)) for p, v in f.items("on_status")
        )
        retry = cls(
            max_attempts=f.integer("max_attempts", d.max_attempts, minimum=1, maximum=100),
            strategy=f.choice("strategy", d.strategy, STRATEGIES),
            backoff=Backoff.from_fields(f.sub("backoff")),
            on_status=rules,
            on_timeout=f.choice("on_timeout", d.on_timeout, (*STRATEGIES, "failover")),
        )
        f.done()
        return retry


# --------------------------------------------------------------------------------------------
# Server and the whole document


@attrs.frozen
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    deadline: float = 120.0
    max_body: int = 10 * 1024 * 1024
    body_timeout: float = 30.0  # to receive a whole request body; then 408
    keep_alive_timeout: float = 75.0  # idle client connections, and the wait for request headers
    grace: float = 30.0
    workers: int = 1
    admin_token_env: str | None = None
    metrics_token_env: str | None = None  # when set, /metrics needs this token (or the admin one)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"

    @classmethod
    def from_fields(cls, f: _Fields) -> ServerConfig:
        d = cls()
        server = cls(
            host=f.string("host", d.host),
            port=f.integer("port", d.port, maximum=65535),
            deadline=f.duration("deadline", d.deadline, positive=True),
            max_body=f.size("max_body", d.max_body),
            body_timeout=f.duration("body_timeout", d.body_timeout, positive=True),
            keep_alive_timeout=f.duration(
                "keep_alive_timeout", d.keep_alive_timeout, positive=True
            ),
            grace=f.duration("grace", d.grace),
            workers=f.integer("workers", d.workers, minimum=1, maximum=64),
            admin_token_env=f.optional_string("admin_token_env"),
            metrics_token_env=f.optional_string("metrics_token_env"),
            log_level=f.choice("log_level", d.log_level, ("debug", "info", "warning", "error")),
            log_format=f.choice("log_format", d.log_format, ("text", "json")),
        )
        f.done()
        return server


@attrs.frozen
class StateConfig:
    """Where provider state lives: this process (`local`) or Redis, shared by every worker and
    replica (docs/scaling.md)."""

    backend: Literal["local", "redis"] = "local"
    url: str = "redis://127.0.0.1:6379/0"
    password_env: str | None = None  # the environment variable holding Redis's password
    prefix: str = "cascade:"  # every key and channel starts with it: deployments can share Redis
    lease: float = 0.1  # one rpm/tpm lease: this fraction of the limit (at least 1)
    limits_when_down: Literal["open", "closed"] = "open"
    timeout: float = 1.0  # connect and command timeout: a slower Redis counts as down
    # Stored responses (the Responses API's store): at most this many, bytes, and seconds each
    responses_max: int = 10_000
    responses_max_bytes: int = 256 << 20
    responses_ttl: float = 24 * 3600.0

    @classmethod
    def from_fields(cls, f: _Fields) -> StateConfig:
        d = cls()
        state = cls(
            backend=f.choice("backend", d.backend, ("local", "redis")),
            url=f.string("url", d.url),
            password_env=f.optional_string("password_env"),
            prefix=f.string("prefix", d.prefix),
            lease=f.number("lease", d.lease, minimum=0.001, maximum=1.0),
            limits_when_down=f.choice("limits_when_down", d.limits_when_down, ("open", "closed")),
            timeout=f.duration("timeout", d.timeout, positive=True),
            responses_max=f.integer("responses_max", d.responses_max, minimum=1),
            responses_max_bytes=f.size("responses_max_bytes", d.responses_max_bytes),
            responses_ttl=f.duration("responses_ttl", d.responses_ttl, positive=True),
        )
        if f.has("url"):
            scheme, _, rest = state.url.partition("://")
            if scheme not in ("redis", "rediss") or not rest:
                f.error("url", "expected redis://host:port/db or rediss://host:port/db")
            elif ":" in rest.partition("@")[0] and "@" in rest:
                f.error("url", "has a password in it; put the password in password_env instead")
        f.done()
        return state


_KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")


def _parse_key(k: _Fields, names: set[str]) -> KeyConfig:
    name = _key_name(k, names)
    key_env, sha = _key_secret(k)
    key = KeyConfig(
        name=name,
        key_env=key_env,
        sha256=sha,
        models=_key_models(k),
        rpm=k.optional_integer("rpm"),
        tpm=k.optional_integer("tpm"),
        budgets=tuple(_parse_budget(k, path, raw) for path, raw in k.items("budgets")),
    )
    k.done()
    return key


def _key_name(k: _Fields, names: set[str]) -> str:
    name = k.string("name", "")
    if not k.has("name"):
        k.error("name", "required (it names the key in logs and metrics)")
    elif name and not _KEY_NAME.fullmatch(name):
        k.error("name", "letters, digits, '_', '.' and '-' (up to 64): it labels metrics")
    elif name in names:
        k.error("name", f"{name!r} is used by another key")
    names.add(name)
    return name


def _key_secret(k: _Fields) -> tuple[str | None, str | None]:
    """(key_env, sha256): exactly one of them; never the key itself."""
    key_env, sha = k.optional_string("key_env"), k.optional_string("sha256")
    if k.has("key"):
        k.get("key")  # known: not also an "unknown field"
        k.error("key", "keys are never written in the file: use key_env or sha256")
    if (key_env is None) == (sha is None):
        k.problems.append(f"{k.path}: give exactly one of key_env (a variable) or sha256")
    if sha is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", sha):
        k.error("sha256", "expected 64 hex digits (sha256sum of the key)")
        sha = None
    return key_env, sha.lower() if sha else None


def _key_models(k: _Fields) -> tuple[str, ...]:
    if not k.has("models"):
        return ("*",)
    raw = k.get("models")
    if not isinstance(raw, list) or not all(isinstance(m, str) and m for m in raw):
        k.error("models", "expected a list of model names or globs")
        return ("*",)
    return tuple(raw)


def _parse_budget(k: _Fields, path: str, raw: object) -> Budget:
    b = _Fields(raw, path, k.problems)
    periods: tuple[Period, ...] = ("day", "month", "total")
    period = b.choice("period", periods[1], periods)
    budget = Budget("tokens", 0, period)  # (only when the entry is wrong: the config fails)
    if b.has("tokens") == b.has("cost"):
        b.get("tokens"), b.get("cost")  # known fields, only not both (or neither)
        k.problems.append(f"{path}: give exactly one of tokens or cost (USD)")
    elif b.has("tokens"):
        budget = Budget("tokens", b.integer("tokens", 0, minimum=1), period)
    else:
        budget = Budget("cost", b.number("cost", 0.0, minimum=0.0, maximum=1e12), period)
    b.done()
    return budget


def parse_key(raw: object, taken: set[str], path: str = "key") -> KeyConfig:
    """One key's settings (as in auth.keys[]), or ConfigError naming each wrong field."""
    problems: list[str] = []
    key = _parse_key(_Fields(raw, path, problems), set(taken))
    if problems:
        raise ConfigError(problems)
    return key


def _parse_auth(f: _Fields) -> AuthConfig:
    names: set[str] = set()
    keys = [_parse_key(_Fields(raw, path, f.problems), names) for path, raw in f.items("keys")]
    auth = AuthConfig(
        tuple(keys),
        default_max_tokens=f.integer("default_max_tokens", 4096, minimum=1, maximum=10_000_000),
        usage_db=f.optional_string("usage_db"),
    )
    f.done()
    return auth


def _parse_prices(f: _Fields, providers: Mapping[str, object]) -> dict[str, Price]:
    """`prices: {"provider/model": {input, output, cache_read, cache_write}}`, USD per million."""
    prices: dict[str, Price] = {}
    for target in list(f.raw):
        provider, sep, model = str(target).partition("/")
        if not sep or not model or provider not in providers:
            f.problems.append(
                f"{f.at(str(target))}: expected provider/model of a configured provider"
            )
            f.get(target)
            continue
        p = f.sub(target)
        price = Price(
            input=p.number("input", 0.0, minimum=0.0, maximum=1e6),
            output=p.number("output", 0.0, minimum=0.0, maximum=1e6),
            cache_read=p.number("cache_read", -1.0, minimum=0.0, maximum=1e6)
            if p.has("cache_read")
            else None,
            cache_write=p.number("cache_write", -1.0, minimum=0.0, maximum=1e6)
            if p.has("cache_write")
            else None,
        )
        p.done()
        prices[str(target)] = price
    f.done()
    return prices


@attrs.frozen
class Config:
    server: ServerConfig
    providers: Mapping[str, ProviderConfig]
    routes: tuple[Route, ...]
    retry: RetryConfig = RetryConfig()
    state: StateConfig = StateConfig()
    auth: AuthConfig = attrs.field(factory=AuthConfig)
    prices: Mapping[str, Price] = attrs.field(factory=dict)  # by "provider/model"
    # Providers served by an in-process mock upstream (`mock:`), by name; the server starts
    # them and points the provider's base_url at them.
    mocks: Mapping[str, MockSettings] = attrs.field(factory=dict)

    @classmethod
    def from_mapping(cls, raw: object) -> Config:
        problems: list[str] = []
        if raw is None:
            raise ConfigError(["<root>: expected a mapping, got nothing"])
        root = _Fields(raw, "", problems)
        server = ServerConfig.from_fields(root.sub("server"))

        providers: dict[str, ProviderConfig] = {}
        mocks: dict[str, MockSettings] = {}
        raw_providers = root.sub("providers")
        if not raw_providers.raw:
            problems.append("providers: at least one provider is required")
        for name in raw_providers.raw:
            if not isinstance(name, str) or not name or "/" in name:
                problems.append(
                    f"providers.{name}: a provider name is a non-empty string without '/'"
                )
                continue
            providers[name], mock = _parse_provider(name, raw_providers.sub(name))
            if mock is not None:
                mocks[name] = mock
        raw_providers.done()

        routes = tuple(
            Route.from_fields(_Fields(v, p, problems), raw_providers.raw)
            for p, v in root.items("routes")
        )
        retry = RetryConfig.from_fields(root.sub("retry"))
        state = StateConfig.from_fields(root.sub("state"))
        auth = _parse_auth(root.sub("auth"))
        prices = _parse_prices(root.sub("prices"), raw_providers.raw)
        root.done()
        if problems:
            raise ConfigError(problems)
        return cls(
            server=server,
            providers=providers,
            routes=routes,
            retry=retry,
            state=state,
            auth=auth,
            prices=prices,
            mocks=mocks,
        )

    @classmethod
    def from_yaml(cls, text: str, *, source: str = "<config>") -> Config:
        try:
            raw = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader: no arbitrary objects
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
            raise ConfigError(
                [f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})"]
            ) from None
        return cls.from_mapping(raw)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], *, shown_as: str | None = None) -> Config:
        """`shown_as` names the file in problems instead of its path (for answers to clients)."""
        text = config_text(Path(path), shown_as=shown_as)
        return cls.from_yaml(text, source=str(path) if shown_as is None else shown_as)

    @classmethod
    def load(cls, source: Path | None, *, shown_as: str | None = None) -> Config:
        """The config file `source`, or the built-in demo when it is None (`cascade serve`
        without --config): the one place that fallback is made."""
        if source is None:
            return cls.from_yaml(demo_config_text(), source=DEMO_SOURCE)
        return cls.from_file(source, shown_as=shown_as)

    def resolve(self, model: str) -> tuple[str, Route] | None:
        """The route serving `model` and its name: the first matching route, else a direct
        `provider/model` address, named `provider/*`.

        The name labels metrics and hedge budgets, so it comes from the config only: a client
        inventing model names cannot add label values (a direct address's model is not in it).
        """
        for route in self.routes:
            if route.matches(model):
                return route.match, route
        provider, sep, upstream_model = model.partition("/")
        if sep and upstream_model and provider in self.providers:
            route = Route(match=model, targets=(Target(provider, upstream_model),), direct=True)
            return f"{provider}/*", route
        return None

    def model_names(self) -> list[str]:
        return [r.match for r in self.routes if not r.is_glob]


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML says keys are unique;
    PyYAML would silently keep the last, so a pasted override could win unnoticed)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, list | dict):
                continue  # unhashable: the base class reports it
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


DEMO_SOURCE = "configs/demo.yaml (built in)"


def config_text(source: Path | None, *, shown_as: str | None = None) -> str:
    """The text of the config file `source`, or of the built-in demo when it is None.

    ConfigError when the file cannot be read, naming it `shown_as` (default: its path)."""
    if source is None:
        return demo_config_text()
    name = str(source) if shown_as is None else shown_as
    try:
        data = source.read_bytes()
    except OSError as exc:
        raise ConfigError([f"{name}: cannot read ({exc.strerror})"]) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError(
            [f"{name}:{line}:{column}: not UTF-8 (byte 0x{data[exc.start]:02x}); save it as UTF-8"]
        ) from None


def demo_config_text() -> str:
    """The packaged demo config (configs/demo.yaml), served by `cascade serve` with no --config.

    A wheel carries it as the package data `router.configs`; an editable install (a source
    checkout) reads it from the tree, where setuptools' editable finder does not map it.
    """
    from importlib.resources import files

    try:
        return files("router.configs").joinpath("demo.yaml").read_text(encoding="utf-8")
    except ModuleNotFoundError:
        return (Path(__file__).parents[2] / "configs" / "demo.yaml").read_text(encoding="utf-8")
