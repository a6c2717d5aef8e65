"""Dialects: the API shapes Cascade speaks, to clients and to providers.

A dialect module owns, for its client side, request parsing and validation, answer and error
bodies and the SSE stream; for its upstream side, the request path, the auth headers and usage
extraction (the `Wire` a provider actor is handed). Only OpenAI chat completions so far.
"""

from __future__ import annotations

from actors.settings import ProviderConfig
from actors.wire import UpstreamWire
from router.dialects import openai


def upstream_wire(provider: ProviderConfig) -> UpstreamWire:
    """What the provider's actor needs to know of its dialect."""
    return openai.WIRE
