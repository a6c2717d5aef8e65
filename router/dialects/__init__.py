"""Dialects: the API shapes Cascade speaks, to clients and to providers (router/dialects/base.py).

Only OpenAI chat completions so far; a dialect is a module here and an entry in DIALECTS.
"""

from __future__ import annotations

from actors.settings import ProviderConfig
from actors.wire import UpstreamWire
from router.dialects import openai
from router.dialects.base import Dialect

DIALECTS: dict[str, Dialect] = {openai.DIALECT.name: openai.DIALECT}
BY_CLIENT_PATH: dict[str, Dialect] = {d.client_path: d for d in DIALECTS.values()}


def upstream_wire(provider: ProviderConfig) -> UpstreamWire:
    """What the provider's actor needs to know of its dialect."""
    return DIALECTS[provider.dialect].wire(provider)
