"""The Responses face's conversations: a request with `previous_response_id` continues the stored
conversation (its input and output items before the new input), and a response with `store`
(the default) is kept for the next one, and for `GET /v1/responses/{id}`.

Stored responses belong to the client key that made them: another key (or none, when keys are
on) finds nothing there, as if the id did not exist.
"""

from __future__ import annotations

from router.config.keys import KeyConfig
from router.dialects.base import ClientRequest
from router.dialects.responses import ResponsesRequest
from router.errors import RequestError
from router.state.responses import ResponseStore, Stored


def owner(key: KeyConfig | None) -> str | None:
    return key.name if key is not None else None


def find(store: ResponseStore, response_id: str, key: KeyConfig | None) -> Stored | None:
    stored = store.get(response_id)
    return stored if stored is not None and stored.owner == owner(key) else None


def continued(store: ResponseStore, request: ClientRequest, key: KeyConfig | None) -> ClientRequest:
    """A Responses request with its stored conversation before its own input (400
    `previous_response_not_found` for an id that is unknown, expired or another key's)."""
    if not isinstance(request, ResponsesRequest) or request.previous_response_id is None:
        return request
    stored = find(store, request.previous_response_id, key)
    if stored is None:
        raise RequestError(
            f"Previous response with id '{request.previous_response_id}' not found.",
            param="previous_response_id",
            code="previous_response_not_found",
        )
    return request.continuing(stored.history)


def remember(store: ResponseStore, request: ClientRequest, key: KeyConfig | None) -> None:
    """Keep a Responses request's answer, when it asked to be stored and was answered whole."""
    if not isinstance(request, ResponsesRequest) or not request.store:
        return
    final = request.conversation.final
    if final is not None and final["status"] in ("completed", "incomplete"):
        store.put(final, request.conversation.items, owner(key))
