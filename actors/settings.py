"""A provider actor's settings: what `ProviderActor` is configured with, as frozen data.

The router's config parses YAML into these (router/config.py); the actors read them and import
nothing from the router.
"""

from __future__ import annotations

import fnmatch
import functools
import os
from collections.abc import Mapping
from typing import Literal
from urllib.parse import quote

import attrs


@attrs.frozen
class Timeouts:
    connect: float = 5.0
    first_byte: float = 30.0
    idle: float = 30.0
    total: float = 300.0


@attrs.frozen
class Limits:
    """Proactive admission limits; None means unlimited."""

    rpm: int | None = None
    tpm: int | None = None


@attrs.frozen
class RateLimitPolicy:
    """How a provider's rate-limit signals block targets."""

    scope: Literal["provider", "model"] = "model"
    max_retry_after: float = 48 * 3600.0
    block_base: float = 60.0
    block_max: float = 3600.0
    max_tracked: int = 1024


@attrs.frozen
class LatencyTrigger:
    """Block a target for `block` after `min_triggers` slow answers within `window`."""

    threshold: float
    measure: Literal["ttfb", "total"] = "ttfb"
    min_triggers: int = 3
    window: float = 60.0
    block: float = 60.0


@attrs.frozen
class CircuitPolicy:
    """Open after `failures` transient failures within `window`; probe again after `open_for`."""

    failures: int = 5
    window: float = 30.0
    open_for: float = 30.0


@attrs.frozen
class RetryBudget:
    """Retries may be at most `ratio` of first attempts over `window` (plus `min_retries`)."""

    ratio: float = 0.2
    window: float = 10.0
    min_retries: int = 3


@attrs.frozen
class Azure:
    """An Azure OpenAI resource: each model is a deployment, called at
    `{base_url}/openai/deployments/{deployment}/chat/completions?api-version=...`."""

    api_version: str
    deployments: Mapping[str, str] = attrs.field(factory=dict)  # model -> deployment name
    auth: Literal["api-key", "bearer"] = "api-key"  # the key as `api-key`, or an Entra token

    def path(self, path: str, model: str) -> str:
        deployment = quote(self.deployments.get(model, model), safe="")
        return f"/openai/deployments/{deployment}{path}?api-version={quote(self.api_version)}"


@attrs.frozen
class Bedrock:
    """Claude on AWS Bedrock (an Anthropic-dialect provider): each model a Bedrock model id,
    calls signed with SigV4 from the standard AWS credential chain (actors/bedrock.py)."""

    region: str
    profile: str | None = None  # a profile of the shared AWS config files (default: the chain's)
    anthropic_version: str = "bedrock-2023-05-31"


@attrs.frozen
class Vertex:
    """Claude on Google Vertex AI (an Anthropic-dialect provider): each model a Vertex model
    name, calls authorised with an OAuth2 token from google-auth (actors/vertex.py)."""

    project: str
    region: str
    credentials_file: str | None = None  # a service-account or ADC file (default: ADC)
    anthropic_version: str = "vertex-2023-10-16"


REASONING_MODELS = ("o1*", "o3*", "o4*", "gpt-5*")


@functools.lru_cache(maxsize=1024)
def _matches(globs: tuple[str, ...], name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, glob) for glob in globs)


@attrs.frozen
class ProviderConfig:
    """One provider: where it is, how it is called, and its actor's admission policies."""

    name: str
    base_url: str
    dialect: Literal["openai", "anthropic", "responses"] = "openai"
    api_key_env: str | None = None
    timeouts: Timeouts = Timeouts()
    max_retries: int = 2
    max_in_flight: int = 256
    max_connections: int = 100
    limits: Limits = Limits()
    rate_limit: RateLimitPolicy = RateLimitPolicy()
    latency: LatencyTrigger | None = None
    circuit: CircuitPolicy = CircuitPolicy()
    retry_budget: RetryBudget = RetryBudget()
    headers: Mapping[str, str] = attrs.field(factory=dict)
    ca_file: str | None = None  # PEM bundle to verify the upstream's TLS certificate
    proxy: str | None = None  # an http:// proxy URL, "none", or None: from HTTP(S)_PROXY
    anthropic_version: str = "2023-06-01"  # the anthropic-version header (dialect: anthropic)
    default_max_tokens: int = 4096  # (anthropic) for translated requests that name no max_tokens
    # Crossing dialects: drop the top-level fields this provider cannot take (LiteLLM's
    # drop_params) instead of skipping it for the request.
    drop_params: bool = False
    # (openai) models that take max_completion_tokens, not max_tokens, and no sampling knobs
    reasoning_models: tuple[str, ...] = REASONING_MODELS
    azure: Azure | None = None  # an Azure OpenAI resource (dialect openai)
    # How the provider continues an answer from a prefix (a stream resumed after its first
    # provider failed, docs/failure-semantics.md): "trailing" (it continues a trailing
    # assistant message: Anthropic), "prefix" (the last assistant message marked
    # `"prefix": true`: Mistral, DeepSeek), "continue_final_message" (vLLM), "none" (it cannot:
    # not a target to resume on). None: the dialect's default ("trailing" for anthropic).
    prefill: Literal["trailing", "prefix", "continue_final_message", "none"] | None = None
    bedrock: Bedrock | None = None  # Claude on AWS Bedrock (dialect anthropic)
    vertex: Vertex | None = None  # Claude on Google Vertex AI (dialect anthropic)

    def path_for(self, path: str, model: str, stream: bool = False) -> str:
        """Where a call for `model` goes, under base_url: the dialect's path, an Azure
        deployment's, or Bedrock's InvokeModel (WithResponseStream) for the model."""
        if self.azure is not None:
            return self.azure.path(path, model)
        if self.bedrock is not None:
            action = "invoke-with-response-stream" if stream else "invoke"
            return f"/model/{quote(model, safe='')}/{action}"
        if self.vertex is not None:
            v = self.vertex
            action = "streamRawPredict" if stream else "rawPredict"
            return (
                f"/v1/projects/{quote(v.project, safe='')}/locations/{quote(v.region, safe='')}"
                f"/publishers/anthropic/models/{quote(model, safe='')}:{action}"
            )
        return path

    @property
    def continues(self) -> str:
        """How it continues an answer from a prefix ("none": it does not)."""
        if self.prefill is not None:
            return self.prefill
        return "trailing" if self.dialect == "anthropic" else "none"

    def is_reasoning(self, model: str) -> bool:
        return _matches(self.reasoning_models, model)

    def api_key(self) -> str | None:
        """The key from the environment; read at use so it never sits in a config object or log."""
        return os.environ.get(self.api_key_env) if self.api_key_env else None
