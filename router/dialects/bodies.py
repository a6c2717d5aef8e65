"""The body each target of one request is sent: built once per upstream dialect, then only the
`model` value swapped, whichever target (and however many attempts) it is for.

A target of the client's dialect gets the client's own bytes with `model` replaced. A target of
another dialect gets the translation, made once for the request and what it depends on of the
provider and model (`Crossing`): the first time such a target is asked for, or up front by
`check`. What a dialect cannot say makes its targets ineligible (`call_for` raises
Untranslatable for them, and the dispatcher skips them); a malformed request is a 400 at `check`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

from actors.settings import ProviderConfig
from router.config import Target
from router.dialects.base import ClientRequest, Dialect, UpstreamCall, upstream_call
from router.dialects.jsonbody import swap
from router.dialects.pairs import translator
from router.dialects.translate import Crossing
from router.errors import Untranslatable

_Built = tuple[UpstreamCall, str, tuple[int, int]]  # a call, its body's text, the model's span

_MODEL_FIRST = '{"model": '  # how every translation begins: the model value's place is known


class UpstreamBodies:
    """`call_for(target)`: the call to make on `target`, for the dispatcher (dialect-free)."""

    __slots__ = ("_built", "_client", "_dialects", "_forwarded", "_providers", "_request")

    def __init__(
        self,
        request: ClientRequest,
        client: Dialect,
        dialects: Mapping[str, Dialect],
        providers: Mapping[str, ProviderConfig],
        forwarded: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        self._request = request
        self._client = client
        self._dialects = dialects  # provider name -> its dialect
        self._providers = providers
        self._forwarded = forwarded  # client headers for providers of the client's dialect
        # (dialect, crossing) -> the translation, or why there is none
        self._built: dict[tuple[str, Crossing], _Built | Untranslatable] = {}

    def call_for(self, target: Target) -> UpstreamCall:
        """The call for `target`; Untranslatable when its dialect cannot say this request."""
        upstream = self._dialects[target.provider]
        provider = self._providers[target.provider]
        if upstream is self._client:
            call = self._request.call_for(upstream, target.model)
            if self._forwarded:
                return UpstreamCall(call.path, call.body, self._forwarded, call.check_start)
            return call
        call, text, span = self._translated(upstream, provider, target.model)
        return UpstreamCall(call.path, swap(text, span, target.model), (), call.check_start)

    def check(self, targets: Iterable[Target]) -> None:
        """Translate now for every dialect among `targets` that is not the client's: a malformed
        request is a 400 (RequestError) before any call. What a dialect merely cannot say is
        remembered: its targets are skipped when their turn comes."""
        for target in targets:
            upstream = self._dialects[target.provider]
            if upstream is not self._client:
                try:
                    self._translated(upstream, self._providers[target.provider], target.model)
                except Untranslatable:
                    pass

    def _translated(self, upstream: Dialect, provider: ProviderConfig, model: str) -> _Built:
        crossing = Crossing(
            provider.default_max_tokens, provider.drop_params, provider.is_reasoning(model)
        )
        key = (upstream.name, crossing)
        built = self._built.get(key)
        if built is None:
            try:
                body = translator(self._client, upstream).request(self._request, model, crossing)
            except Untranslatable as exc:
                self._built[key] = exc
                raise
            call = upstream_call(upstream, body, self._request.stream)
            text = body.decode()
            assert text.startswith(_MODEL_FIRST), "a translation starts with its model"
            start = len(_MODEL_FIRST)
            built = self._built[key] = (call, text, (start, start + len(json.dumps(model))))
        elif isinstance(built, Untranslatable):
            raise built
        return built
