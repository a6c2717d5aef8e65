"""Claude on Google Vertex AI as a provider (issue 22), against fakes: an OAuth2 token endpoint
(google-auth obtains the token there, and refreshes it when it nears its expiry) and a Vertex
endpoint that checks the path (project, region, model, rawPredict / streamRawPredict), the
token and the body. RESOURCE_EXHAUSTED blocks the target and fails over."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import anthropic
import openai
import pytest
import trio
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from router.serving.server import Running
from router.web.asgi import lifespan, read_body
from router.web.server import serve_asgi
from tests.live import SDK_LEFTOVERS, anthropic_events, live_gateway, message

pytestmark = SDK_LEFTOVERS


class FakeGoogle:
    """The token endpoint (`/token`) and the Vertex endpoint, on one server."""

    def __init__(self, expires_in: int = 3600, exhausted: bool = False) -> None:
        self.expires_in = expires_in
        self.exhausted = exhausted
        self.issued: list[str] = []
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.calls: list[dict[str, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        body = await read_body(scope, receive, 1 << 20)
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        if scope["path"] == "/token":  # the JWT grant, its signature checked as Google does
            form = parse_qs(body.decode())
            assert form["grant_type"] == ["urn:ietf:params:oauth:grant-type:jwt-bearer"]
            head, claims, signature = form["assertion"][0].split(".")
            self.key.public_key().verify(
                _unb64(signature), f"{head}.{claims}".encode(), padding.PKCS1v15(),
                hashes.SHA256(),
            )  # fmt: skip
            assert json.loads(_unb64(claims))["aud"].endswith("/token")
            token = f"tok-{len(self.issued) + 1}"
            self.issued.append(token)
            await self._json(send, 200, {"access_token": token, "token_type": "Bearer",
                                         "expires_in": self.expires_in})  # fmt: skip
            return
        self.calls.append({"path": scope["path"], "body": json.loads(body),
                           "authorization": headers.get("authorization")})  # fmt: skip
        if self.exhausted:
            error = {"error": {"code": 429, "message": "Quota exceeded", "status":
                               "RESOURCE_EXHAUSTED"}}  # fmt: skip
            await self._json(send, 429, error)
            return
        if scope["path"].endswith(":rawPredict"):
            answer = message("answer from vertex", "claude-x")
            tools = json.loads(body).get("tools")
            if tools:  # a tool call, as Claude answers one
                answer["content"] = [
                    {
                        "type": "tool_use",
                        "id": "toolu_v1",
                        "name": tools[0]["name"],
                        "input": {"city": "Oslo"},
                    }
                ]
                answer["stop_reason"] = "tool_use"  # fmt: skip
            await self._json(send, 200, answer)
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})  # fmt: skip
        for event in anthropic_events(["from ", "vertex"], "claude-x"):
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    @staticmethod
    async def _json(send: Any, status: int, obj: Any) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json")]})  # fmt: skip
        await send({"type": "http.response.body", "body": json.dumps(obj).encode()})


def _unb64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


@asynccontextmanager
async def vertex_gateway(
    fake: FakeGoogle, tmp_path: Path, alternative: bool = False
) -> AsyncIterator[Running]:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            url = await nursery.start(serve_asgi, fake, "127.0.0.1", 0)
            adc = tmp_path / "sa.json"  # a service account's key file whose token_uri is ours
            pem = fake.key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ).decode()
            adc.write_text(json.dumps({"type": "service_account", "project_id": "p1",
                                       "private_key_id": "k1", "private_key": pem,
                                       "client_email": "cascade@p1.iam.gserviceaccount.com",
                                       "client_id": "1", "token_uri": url + "/token"}))  # fmt: skip
            provider = {"dialect": "anthropic", "base_url": url, "vertex": {
                "project": "p1", "region": "us-east5", "credentials_file": str(adc)}}  # fmt: skip
            async with live_gateway(
                {},
                extra_providers={"vertex": provider, "gpt": {"mock": {}}},
                routes=[{"match": "*", "targets": [
                    "vertex/claude-x", *(["gpt/gpt-x"] if alternative else [])]}],
            ) as gw:  # fmt: skip
                yield gw
            nursery.cancel_scope.cancel()


async def test_clients_of_both_dialects_served_by_vertex(tmp_path: Path) -> None:
    fake = FakeGoogle()
    async with vertex_gateway(fake, tmp_path) as gw:
        claude = anthropic.AsyncAnthropic(base_url=gw.url, api_key="x", max_retries=0)
        ask = [{"role": "user", "content": "hi"}]
        plain = await claude.messages.create(model="claude", max_tokens=50, messages=ask)
        async with claude.messages.stream(model="claude", max_tokens=50, messages=ask) as s:
            streamed = await s.get_final_message()
        await claude.close()
        sdk = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
        chat = await sdk.chat.completions.create(model="gpt", messages=ask)
        await sdk.close()
    assert plain.content[0].text == "answer from vertex"  # type: ignore[union-attr]
    assert streamed.content[0].text == "from vertex"  # type: ignore[union-attr]
    assert chat.choices[0].message.content == "answer from vertex"
    base = "/v1/projects/p1/locations/us-east5/publishers/anthropic/models/claude-x"
    assert [c["path"] for c in fake.calls] == [
        f"{base}:rawPredict", f"{base}:streamRawPredict", f"{base}:rawPredict"]  # fmt: skip
    assert all(c["authorization"] == "Bearer tok-1" for c in fake.calls)
    assert fake.issued == ["tok-1"]  # one token for all three calls
    sent = fake.calls[1]["body"]
    assert sent["anthropic_version"] == "vertex-2023-10-16" and "model" not in sent
    assert sent["stream"] is True


async def test_tools_through_vertex_for_both_dialects(tmp_path: Path) -> None:
    weather = {"name": "get_weather", "input_schema": {"type": "object",
               "properties": {"city": {"type": "string"}}}}  # fmt: skip
    fake = FakeGoogle()
    async with vertex_gateway(fake, tmp_path) as gw:
        claude = anthropic.AsyncAnthropic(base_url=gw.url, api_key="x", max_retries=0)
        called = await claude.messages.create(
            model="claude", max_tokens=50, tools=[weather],  # type: ignore[list-item]
            messages=[{"role": "user", "content": "weather?"}],
        )  # fmt: skip
        await claude.close()
        sdk = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
        tool = {"type": "function", "function": {"name": "get_weather",
                "parameters": weather["input_schema"]}}  # fmt: skip
        chat = await sdk.chat.completions.create(
            model="gpt",
            messages=[{"role": "user", "content": "weather?"}],
            tools=[tool],  # type: ignore[list-item]
        )
        await sdk.close()
    assert called.stop_reason == "tool_use" and called.content[0].type == "tool_use"
    [call] = chat.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(call.function.arguments) == {"city": "Oslo"}  # type: ignore[union-attr]
    assert fake.calls[1]["body"]["tools"][0]["name"] == "get_weather"  # translated for Vertex


async def test_a_token_near_its_expiry_is_refreshed(tmp_path: Path) -> None:
    """A token that expires within google-auth's refresh window (minutes) is replaced before
    the next call uses it."""
    fake = FakeGoogle(expires_in=60)
    async with vertex_gateway(fake, tmp_path) as gw:
        claude = anthropic.AsyncAnthropic(base_url=gw.url, api_key="x", max_retries=0)
        for _ in range(2):
            await claude.messages.create(
                model="claude", max_tokens=50, messages=[{"role": "user", "content": "hi"}]
            )
        await claude.close()
    assert fake.issued == ["tok-1", "tok-2"]
    assert [c["authorization"] for c in fake.calls] == ["Bearer tok-1", "Bearer tok-2"]


async def test_resource_exhausted_blocks_vertex_and_fails_over(tmp_path: Path) -> None:
    fake = FakeGoogle(exhausted=True)
    async with vertex_gateway(fake, tmp_path, alternative=True) as gw:
        claude = anthropic.AsyncAnthropic(base_url=gw.url, api_key="x", max_retries=0)
        texts = [
            (await claude.messages.create(
                model="claude", max_tokens=50, messages=[{"role": "user", "content": "hi"}]
            )).content[0].text  # type: ignore[union-attr]
            for _ in range(2)
        ]  # fmt: skip
        await claude.close()
    assert all(t.startswith("[gpt]") for t in texts)
    assert len(fake.calls) == 1  # blocked after its 429: skipped the second time


@pytest.mark.parametrize("field", ["project", "region"])
def test_a_vertex_provider_names_what_is_missing(field: str) -> None:
    from router.config import Config, ConfigError

    vertex = {"project": "p1", "region": "us-east5"}
    del vertex[field]
    with pytest.raises(ConfigError) as info:
        Config.from_mapping({"providers": {"v": {"dialect": "anthropic", "vertex": vertex}},
                             "routes": [{"match": "x", "targets": ["v/claude"]}]})  # fmt: skip
    assert any(f"vertex.{field}: is required" in p for p in info.value.problems)
