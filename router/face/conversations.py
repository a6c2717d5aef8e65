"""The Responses face's conversations: a request with `previous_response_id` continues the stored
conversation (its input and output items before the new input), and a response with `store`
(the default) is kept for the next one, and for `GET /v1/responses/{id}`: stored before the
client sees the response end (the last event, or the answer's body), so a continuation sent the
moment it arrives finds it, on any replica when the store is Redis.

Stored responses belong to the client key that made them: another key (or none, when keys are
on) finds nothing there, as if the id did not exist.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from router.config.keys import KeyConfig
from router.dialects.base import ClientRequest
from router.dialects.responses import ResponsesRequest
from router.errors import RequestError
from router.state.responses import Responses, Stored


def owner(key: KeyConfig | None) -> str | None:
    return key.name if key is not None else None


async def find(store: Responses, response_id: str, key: KeyConfig | None) -> Stored | None:
    stored = await store.load(response_id)
    return stored if stored is not None and stored.owner == owner(key) else None


async def continued(
    store: Responses, request: ClientRequest, key: KeyConfig | None
) -> ClientRequest:
    """A Responses request with its stored conversation before its own input (400
    `previous_response_not_found` for an id that is unknown, expired or another key's)."""
    if not isinstance(request, ResponsesRequest) or request.previous_response_id is None:
        return request
    stored = await find(store, request.previous_response_id, key)
    if stored is None:
        raise RequestError(
            f"Previous response with id '{request.previous_response_id}' not found.",
            param="previous_response_id",
            code="previous_response_not_found",
        )
    return request.continuing(stored.history)


def remembering(
    store: Responses, request: ClientRequest, key: KeyConfig | None
) -> Callable[[], Awaitable[None]] | None:
    """What to run once a Responses request's answer is whole, before its end is sent: keep it
    (None: nothing to keep, the request did not ask to be stored)."""
    if not isinstance(request, ResponsesRequest) or not request.store:
        return None

    async def remember() -> None:
        final = request.conversation.final
        if final is not None and final["status"] in ("completed", "incomplete"):
            await store.save(final, request.conversation.items, owner(key))

    return remember
