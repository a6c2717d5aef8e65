"""Claude on AWS Bedrock, as an Anthropic-dialect provider's upstream: the body Bedrock wants
(the Messages body without `model` and `stream`, with its `anthropic_version`), SigV4 signing,
and the binary event stream of a streamed answer decoded into the Anthropic events it carries
(the model's path, `InvokeModel` or `InvokeModelWithResponseStream`, is
`ProviderConfig.path_for`'s).

botocore does the cryptography and the framing (its SigV4 signer, its credential chain: the
standard AWS environment variables, shared config and credentials files, a role's environment;
its event-stream parser): hand-written versions of those are how gateways get them subtly wrong.
Credentials are resolved in a worker thread (the chain may read files or call a metadata
endpoint), never on the trio thread. botocore is imported when a Bedrock provider is first used
(it takes ~70 ms to load): a gateway without one never loads it.
"""

from __future__ import annotations

import base64
import json
from typing import TYPE_CHECKING, Any

import trio

from actors.sse import SSEEvent

if TYPE_CHECKING:
    from actors.settings import Bedrock

SERVICE = "bedrock"


def body(anthropic: bytes, version: str) -> bytes:
    """A Messages body as Bedrock takes it: the model is in the path, streaming in the action."""
    obj = json.loads(anthropic)
    obj.pop("model", None)
    obj.pop("stream", None)
    return json.dumps({"anthropic_version": version, **obj}).encode()


class Signer:
    """SigV4 for one provider's calls, with its credentials from botocore's chain."""

    def __init__(self, settings: Bedrock) -> None:
        from botocore.session import Session

        self.region = settings.region
        self._session = Session(profile=settings.profile) if settings.profile else Session()
        self._credentials: Any = None

    async def _frozen(self) -> Any:
        """Current credentials; resolved (or refreshed) in a thread when they must be."""
        credentials = self._credentials
        if credentials is None:
            credentials = self._credentials = await trio.to_thread.run_sync(
                self._session.get_credentials
            )
            if credentials is None:
                raise RuntimeError("no AWS credentials found (environment, config files, role)")
        if getattr(credentials, "refresh_needed", lambda: False)():
            return await trio.to_thread.run_sync(credentials.get_frozen_credentials)
        return credentials.get_frozen_credentials()

    async def headers(self, url: str, payload: bytes) -> list[tuple[bytes, bytes]]:
        """The headers that sign a POST of `payload` to `url` (Authorization, X-Amz-Date, and
        X-Amz-Security-Token for temporary credentials)."""
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest

        request = AWSRequest(
            "POST", url, data=payload, headers={"content-type": "application/json"}
        )
        SigV4Auth(await self._frozen(), SERVICE, self.region).add_auth(request)
        return [
            (name.lower().encode(), value.encode())
            for name, value in request.headers.items()
            if name.lower() in ("authorization", "x-amz-date", "x-amz-security-token")
        ]


class EventStreamDecoder:
    """Bedrock's `application/vnd.amazon.eventstream` answer, fed bytes as they arrive, as the
    Anthropic events its `chunk` messages carry (base64 JSON); an exception message (throttling,
    a model error mid-stream) becomes an Anthropic `error` event. The SSEDecoder's interface."""

    __slots__ = ("_buffer", "_malformed")

    def __init__(self) -> None:
        from botocore.eventstream import EventStreamBuffer, ParserError

        self._buffer = EventStreamBuffer()
        self._malformed = (ParserError, ValueError)

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        self._buffer.add_data(chunk)
        events: list[SSEEvent] = []
        try:
            for message in self._buffer:
                event = _event(message.headers, message.payload)
                if event is not None:
                    events.append(event)
        except self._malformed as exc:
            events.append(_error("protocol_error", f"a malformed event-stream frame ({exc})"))
        return events

    def finish(self) -> list[SSEEvent]:
        return []


def _event(headers: dict[str, Any], payload: bytes) -> SSEEvent | None:
    kind = headers.get(":message-type")
    if kind == "exception" or kind == "error":
        name = str(headers.get(":exception-type") or headers.get(":error-code") or "error")
        try:
            message = json.loads(payload).get("message", "")
        except (ValueError, AttributeError):
            message = payload.decode(errors="replace")
        return _error(name, message or name)
    if headers.get(":event-type") != "chunk":
        return None
    data = base64.b64decode(json.loads(payload)["bytes"])
    name = json.loads(data).get("type")
    return SSEEvent(data, name.encode() if isinstance(name, str) else None)


def _error(kind: str, message: str) -> SSEEvent:
    error = {"type": "error", "error": {"type": kind, "message": message}}
    return SSEEvent(json.dumps(error).encode(), b"error")
