"""One translator per (client dialect, provider dialect) pair: how a client of one dialect is
served by a provider of another. Each says how the request's body is written for the provider,
and how the provider's answer and stream are written back for the client (translate.py holds the
translations themselves). A pair of the same dialect needs none: its bodies are the client's
bytes, its answers and streams are relayed as they come.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs

from router.dialects import responses
from router.dialects.anthropic import MessagesRequest
from router.dialects.base import ClientRequest, Dialect, StreamWriter
from router.dialects.openai import ChatRequest
from router.dialects.translate import (
    AnthropicToOpenAIStream,
    Crossing,
    OpenAIToAnthropicStream,
    anthropic_answer_to_openai,
    anthropic_to_openai,
    openai_answer_to_anthropic,
    openai_to_anthropic,
)
from router.errors import Untranslatable


@attrs.frozen
class Translator:
    """A client of one dialect, a provider of another."""

    # (the client's request, the provider's model, what the translation depends on of the
    # provider and model) -> the provider's body; Untranslatable for what cannot be said in the
    # provider's dialect (its targets are skipped), RequestError for a malformed request
    request: Callable[[ClientRequest, str, Crossing], bytes]
    # (the client's request, the provider's whole answer) -> the answer in the client's dialect
    answer: Callable[[ClientRequest, bytes], bytes]
    stream: Callable[
        [ClientRequest], StreamWriter
    ]  # writes the client's stream from the provider's


def _chat(request: ClientRequest) -> ChatRequest:
    assert isinstance(request, ChatRequest)
    return request


def _responses(request: ClientRequest) -> responses.ResponsesRequest:
    assert isinstance(request, responses.ResponsesRequest)
    return request


def _messages(request: ClientRequest) -> MessagesRequest:
    assert isinstance(request, MessagesRequest)
    return request


TRANSLATORS: dict[tuple[str, str], Translator] = {
    ("openai", "anthropic"): Translator(
        request=lambda r, model, crossing: openai_to_anthropic(_chat(r).obj, model, crossing),
        answer=lambda r, body: anthropic_answer_to_openai(body),
        stream=lambda r: AnthropicToOpenAIStream(_chat(r).include_usage),
    ),
    ("anthropic", "openai"): Translator(
        request=lambda r, model, crossing: anthropic_to_openai(
            _messages(r).obj, model, r.stream, crossing
        ),
        answer=lambda r, body: openai_answer_to_anthropic(body),
        stream=lambda r: OpenAIToAnthropicStream(),
    ),
    # The Responses face: chat completions for OpenAI providers, and through chat completions
    # for Anthropic ones (router/dialects/responses.py)
    ("responses", "openai"): Translator(
        request=lambda r, model, crossing: responses.chat_body(_responses(r), model, crossing),
        answer=lambda r, body: responses.from_chat_answer(_responses(r), body),
        stream=lambda r: responses.ChatToResponsesStream(_responses(r)),
    ),
    ("responses", "anthropic"): Translator(
        request=lambda r, model, crossing: openai_to_anthropic(
            responses.to_chat(_responses(r), crossing), model, crossing
        ),
        answer=lambda r, body: responses.from_chat_answer(
            _responses(r), anthropic_answer_to_openai(body)
        ),
        stream=lambda r: responses.ViaChat(AnthropicToOpenAIStream(True), _responses(r)),
    ),
}


def translator(client: Dialect, provider: Dialect) -> Translator:
    """The translator from `client`'s dialect to `provider`'s (they differ). A pair with none
    (a Responses-only provider, for a chat or messages client) makes the target ineligible."""
    found = TRANSLATORS.get((client.name, provider.name))
    if found is None:
        raise Untranslatable(
            f"a {provider.name}-dialect provider cannot serve {client.name} clients",
            param="model",
        )
    return found
