"""Dialects: the API shapes Cascade speaks, to clients and to providers (router/dialects/base.py).

OpenAI chat completions, Anthropic messages and OpenAI's Responses API, which clients and
providers speak; a Responses client is served by providers of every dialect (translated to chat
completions, and through them to messages), while a provider that speaks only the Responses API
serves Responses clients only. A dialect is a module here and an entry in DIALECTS, and its
client path is a model endpoint. Requests, answers and streams are translated
between them (translate.py) when a client's dialect and its provider's differ (docs/dialects.md).
"""

from __future__ import annotations

from actors.settings import ProviderConfig
from actors.wire import UpstreamWire
from router.dialects import anthropic, openai, responses
from router.dialects.base import Dialect

DIALECTS: dict[str, Dialect] = {
    d.name: d for d in (openai.DIALECT, anthropic.DIALECT, responses.DIALECT)
}
BY_CLIENT_PATH: dict[str, Dialect] = {d.client_path: d for d in DIALECTS.values()}


def upstream_wire(provider: ProviderConfig) -> UpstreamWire:
    """What the provider's actor needs to know of its dialect."""
    return DIALECTS[provider.dialect].wire(provider)
