"""Claude on AWS Bedrock as a provider (issue 22), against a fake that checks what Bedrock checks:
the model in the path, the body Bedrock takes, and a SigV4 signature verified by recomputing it
with botocore from the same credentials. Streams come back in Bedrock's binary event stream
(a frame split across reads, an exception frame mid-stream) and reach Anthropic clients as SSE
and OpenAI clients as chunks; a ThrottlingException blocks the target and fails over."""

from __future__ import annotations

import base64
import binascii
import json
import struct
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from typing import Any

import anthropic
import openai
import pytest
import trio
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from router.serving.server import Running
from router.web.asgi import lifespan, read_body
from router.web.server import serve_asgi
from tests.live import SDK_LEFTOVERS, anthropic_events, live_gateway, message

pytestmark = SDK_LEFTOVERS

KEY, SECRET, TOKEN = "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "session-token-1"
MODEL = "anthropic.claude-sonnet-4-5-v1:0"


def frame(headers: dict[str, str], payload: bytes) -> bytes:
    """One AWS event-stream message: prelude (lengths, CRC), string headers, payload, CRC."""
    encoded = b"".join(
        bytes([len(k)]) + k.encode() + b"\x07" + struct.pack(">H", len(v)) + v.encode()
        for k, v in headers.items()
    )
    total = 12 + len(encoded) + len(payload) + 4
    prelude = struct.pack(">II", total, len(encoded))
    message = prelude + struct.pack(">I", binascii.crc32(prelude)) + encoded + payload
    return message + struct.pack(">I", binascii.crc32(message))


def chunk(event: dict[str, Any]) -> bytes:
    payload = json.dumps({"bytes": base64.b64encode(json.dumps(event).encode()).decode()})
    headers = {
        ":event-type": "chunk",
        ":message-type": "event",
        ":content-type": "application/json",
    }
    return frame(headers, payload.encode())


class FakeBedrock:
    """Checks the signature and the body; answers like Bedrock's runtime."""

    def __init__(self, mode: str = "ok") -> None:
        self.mode = mode  # ok | exception (mid-stream) | throttled
        self.seen: list[dict[str, Any]] = []
        self.relayed = trio.Event()  # the client has received content (mode exception)
        self.disconnected = trio.Event()  # the gateway closed the call (mode stall)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        body = await read_body(scope, receive, 1 << 20)
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        path = scope["raw_path"].decode()
        self.seen.append({"path": path, "body": json.loads(body), "headers": headers,
                          "signature_ok": verify(path, headers, body)})  # fmt: skip
        if self.mode == "throttled":
            answer = json.dumps({"message": "Too many requests, please wait"}).encode()
            await send({"type": "http.response.start", "status": 429, "headers": [
                (b"content-type", b"application/json"),
                (b"x-amzn-errortype", b"ThrottlingException:http://internal.amazon.com/")]})  # fmt: skip
            await send({"type": "http.response.body", "body": answer})
            return
        if path.endswith("/invoke"):
            answer = json.dumps(message("answer from bedrock", MODEL)).encode()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json")]})  # fmt: skip
            await send({"type": "http.response.body", "body": answer})
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/vnd.amazon.eventstream")]})  # fmt: skip
        events = [json.loads(e.split(b"data: ", 1)[1])
                  for e in anthropic_events(["from ", "bedrock"], MODEL)]  # fmt: skip
        frames = [chunk(e) for e in events]
        if self.mode == "exception":  # a model error after the first content
            error = frame({":message-type": "exception", ":exception-type":
                           "modelStreamErrorException", ":content-type": "application/json"},
                          b'{"message": "the model stopped"}')  # fmt: skip
            frames = [*frames[:4], error]
        data = b"".join(frames)
        half = len(frames[0]) // 2  # the first message split across two reads
        parts = [data[:half], data[half:]]
        if self.mode == "exception":  # the error once the client has the first content
            parts = [data[:half], data[half : -len(frames[-1])], frames[-1]]
        if self.mode == "stall":  # the first content, then nothing until the caller leaves
            await send({"type": "http.response.body", "body": b"".join(frames[:4]),
                        "more_body": True})  # fmt: skip
            while (await receive())["type"] != "http.disconnect":
                pass
            self.disconnected.set()
            return
        for i, part in enumerate(parts):
            if i == 2:
                await self.relayed.wait()
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b""})


def verify(path: str, headers: dict[str, str], body: bytes) -> bool:
    """Recompute the request's SigV4 signature with botocore, from the same credentials."""
    authorization = headers.get("authorization", "")
    if not authorization.startswith("AWS4-HMAC-SHA256 "):
        return False
    fields = dict(p.strip().split("=", 1) for p in authorization[17:].split(","))
    signed = fields["SignedHeaders"].split(";")
    region = fields["Credential"].split("/")[2]
    url = f"http://{headers['host']}{path}"
    request = AWSRequest("POST", url, data=body,
                         headers={h: headers[h] for h in signed if h != "host"})  # fmt: skip
    request.context["timestamp"] = headers["x-amz-date"]
    signer = SigV4Auth(Credentials(KEY, SECRET, TOKEN), "bedrock", region)
    canonical = signer.canonical_request(request)
    expected = signer.signature(signer.string_to_sign(request, canonical), request)
    return bool(fields["Signature"] == expected and fields["Credential"].startswith(KEY + "/"))


@asynccontextmanager
async def bedrock_gateway(
    fake: FakeBedrock, monkeypatch: pytest.MonkeyPatch, alternative: bool = False
) -> AsyncIterator[Running]:
    for name, value in (("AWS_ACCESS_KEY_ID", KEY), ("AWS_SECRET_ACCESS_KEY", SECRET),
                        ("AWS_SESSION_TOKEN", TOKEN)):  # fmt: skip
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")  # the environment's, nothing else
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            url = await nursery.start(serve_asgi, fake, "127.0.0.1", 0)
            provider = {"dialect": "anthropic", "base_url": url,
                        "bedrock": {"region": "us-west-2"}}  # fmt: skip
            targets = [f"bedrock/{MODEL}", *(["gpt/gpt-x"] if alternative else [])]
            async with live_gateway(
                {},
                extra_providers={"bedrock": provider, "gpt": {"mock": {}}},
                routes=[{"match": "*", "targets": targets}],
            ) as gw:
                yield gw
            nursery.cancel_scope.cancel()


async def test_an_anthropic_client_served_by_bedrock_plain_and_streamed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = FakeBedrock()
    async with bedrock_gateway(fake, monkeypatch) as gw:
        sdk = anthropic.AsyncAnthropic(base_url=gw.url, api_key="x", max_retries=0)
        ask = [{"role": "user", "content": "hi"}]
        plain = await sdk.messages.create(model="claude", max_tokens=50, messages=ask)
        async with sdk.messages.stream(model="claude", max_tokens=50, messages=ask) as stream:
            streamed = await stream.get_final_message()
        await sdk.close()
    assert plain.content[0].text == "answer from bedrock"  # type: ignore[union-attr]
    assert streamed.content[0].text == "from bedrock"  # type: ignore[union-attr]
    first, second = fake.seen
    quoted = "anthropic.claude-sonnet-4-5-v1%3A0"
    assert first["path"] == f"/model/{quoted}/invoke"
    assert second["path"] == f"/model/{quoted}/invoke-with-response-stream"
    assert first["signature_ok"] and second["signature_ok"]
    assert second["headers"]["x-amz-security-token"] == TOKEN
    sent = first["body"]
    assert sent["anthropic_version"] == "bedrock-2023-05-31"
    assert "model" not in sent and "stream" not in sent and sent["max_tokens"] == 50


async def test_an_openai_client_served_by_bedrock_streamed(monkeypatch: pytest.MonkeyPatch) -> None:
    async with bedrock_gateway(FakeBedrock(), monkeypatch) as gw:
        sdk = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
        text = ""
        stream = await sdk.chat.completions.create(
            model="gpt", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        async with stream:
            async for piece in stream:
                text += (piece.choices[0].delta.content or "") if piece.choices else ""
        await sdk.close()
    assert text == "from bedrock"


async def test_an_exception_frame_mid_stream_ends_the_stream_with_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = FakeBedrock("exception")
    text = ""
    async with bedrock_gateway(fake, monkeypatch) as gw:
        sdk = anthropic.AsyncAnthropic(base_url=gw.url, api_key="x", max_retries=0)
        with pytest.raises(anthropic.APIStatusError) as caught:
            async with sdk.messages.stream(
                model="claude", max_tokens=50, messages=[{"role": "user", "content": "hi"}]
            ) as stream:
                async for event in stream:
                    if event.type == "text":
                        text += event.text
                        fake.relayed.set()  # now the model fails, after the commit point
        await sdk.close()
    assert text == "from "  # what was relayed before the failure
    assert "the model stopped" in str(caught.value)


async def test_throttling_blocks_bedrock_and_fails_over(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeBedrock("throttled")
    async with bedrock_gateway(fake, monkeypatch, alternative=True) as gw:
        sdk = anthropic.AsyncAnthropic(base_url=gw.url, api_key="x", max_retries=0)
        answers = [
            await sdk.messages.create(
                model="claude", max_tokens=50, messages=[{"role": "user", "content": "hi"}]
            )
            for _ in range(2)
        ]
        await sdk.close()
    assert [a.content[0].text for a in answers] == [  # type: ignore[union-attr]
        "[gpt] word0 word1 word2 word3 word4 word5 word6 word7"
    ] * 2
    assert len(fake.seen) == 1  # blocked after its ThrottlingException: skipped the second time


async def test_a_client_that_leaves_closes_the_bedrock_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Cancellation is the same for every provider: the client gone mid-stream, the signed
    upstream call is closed at once."""
    fake = FakeBedrock("stall")
    async with bedrock_gateway(fake, monkeypatch) as gw:
        sdk = anthropic.AsyncAnthropic(base_url=gw.url, api_key="x", max_retries=0)
        async with sdk.messages.stream(
            model="claude", max_tokens=50, messages=[{"role": "user", "content": "hi"}]
        ) as stream:
            async with aclosing(stream.__aiter__()) as events:
                async for event in events:
                    if event.type == "text":
                        break  # the client leaves after the first text
        await sdk.close()
        with trio.fail_after(5):
            await fake.disconnected.wait()
