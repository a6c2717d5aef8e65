"""Client keys over real sockets with the official SDKs (issue 13): no key, a wrong key or the
admin token get 401 in the dialect's shape before anything reaches a provider; a key's models
and rpm/tpm limits hold, with OpenAI's x-ratelimit-* headers on every answer."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
import trio

from router.config import Config, ConfigError
from router.keys.ring import _openai_duration
from router.serving.server import Running
from tests.helpers import chat
from tests.live import FakeUpstream, healthy, live_gateway

TEAM_A = "sk-team-a-0123456789abcdef0123456789"
TEAM_B = "sk-team-b-fedcba9876543210fedcba9876"
ADMIN = "admin-token-0123456789abcdef01234567"


class Deployment:
    """The running gateway, and SDK clients for it that are closed at the end."""

    def __init__(self, running: Running) -> None:
        self.url = running.url
        self.clients: list[openai.AsyncOpenAI | anthropic.AsyncAnthropic] = []

    def openai(self, key: str) -> openai.AsyncOpenAI:
        client = openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0)
        self.clients.append(client)
        return client

    def anthropic(self, key: str) -> anthropic.AsyncAnthropic:
        client = anthropic.AsyncAnthropic(base_url=self.url, api_key=key, max_retries=0)
        self.clients.append(client)
        return client


@asynccontextmanager
async def keyed(
    monkeypatch: pytest.MonkeyPatch, upstream: FakeUpstream, **key_a: object
) -> AsyncIterator[Deployment]:
    monkeypatch.setenv("TEAM_A_KEY", TEAM_A)
    monkeypatch.setenv("CASCADE_ADMIN", ADMIN)
    keys = [
        {"name": "team-a", "key_env": "TEAM_A_KEY", **key_a},
        {"name": "team-b", "sha256": hashlib.sha256(TEAM_B.encode()).hexdigest(),
         "models": ["claude-*"]},
    ]  # fmt: skip
    routes = [
        {"match": "gpt", "targets": ["up/m"]},
        {"match": "claude-*", "targets": ["up/m"]},
    ]
    async with live_gateway(
        {"up": upstream},
        routes,
        auth={"keys": keys},
        server={"admin_token_env": "CASCADE_ADMIN"},
    ) as running:
        deployment = Deployment(running)
        try:
            yield deployment
        finally:
            for client in deployment.clients:
                await client.close()


async def test_no_key_a_wrong_key_or_the_admin_token_is_a_401_in_each_dialect(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    upstream = FakeUpstream(healthy)
    async with keyed(monkeypatch, upstream) as gw:
        for api_key in ("sk-wrong", ADMIN):
            client = gw.openai(api_key)
            with pytest.raises(openai.AuthenticationError) as caught:
                await client.chat.completions.create(
                    model="gpt", messages=[{"role": "user", "content": "hi"}]
                )
            assert caught.value.body["code"] == "invalid_api_key"  # type: ignore[index]
            sdk = gw.anthropic(api_key)
            with pytest.raises(anthropic.AuthenticationError) as refused:
                await sdk.messages.create(
                    model="claude-x", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
                )
            assert refused.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
            assert api_key not in str(caught.value.body) + str(refused.value.body)
        async with httpx.AsyncClient(base_url=gw.url) as raw:
            r = await raw.post("/v1/chat/completions", json=chat())  # no key at all
            assert r.status_code == 401 and r.json()["error"]["message"] == "missing API key"
            assert (await raw.get("/v1/models")).status_code == 401
            r = await raw.get("/v1/models", headers={"authorization": f"Bearer {TEAM_A}"})
            assert r.status_code == 200
            assert (await raw.get("/healthz")).status_code == 200  # not a model endpoint
            metrics = (await raw.get("/metrics")).text
            assert 'cascade_key_refusals_total{key="-",reason="auth"} 6.0' in metrics
            listed = await raw.get("/admin/keys", headers={"authorization": f"Bearer {ADMIN}"})
            assert [k["name"] for k in listed.json()["keys"]] == ["team-a", "team-b"]
            keys = listed.text
            for secret in (TEAM_A, TEAM_B, ADMIN, hashlib.sha256(TEAM_B.encode()).hexdigest()):
                assert secret not in metrics and secret not in keys
    assert upstream.exchanges == []  # nothing reached the provider


async def test_a_key_uses_its_models_and_both_sdk_conventions(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    upstream = FakeUpstream(healthy)
    caplog.set_level(logging.INFO)
    async with keyed(monkeypatch, upstream) as gw:
        client = gw.openai(TEAM_A)
        answer = await client.chat.completions.create(
            model="gpt", messages=[{"role": "user", "content": "hi"}]
        )
        assert answer.choices[0].message.content
        sdk = gw.anthropic(TEAM_B)
        message = await sdk.messages.create(
            model="claude-x", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
        )
        assert message.content
        b = gw.openai(TEAM_B)
        with pytest.raises(openai.PermissionDeniedError) as caught:  # team-b: claude-* only
            await b.chat.completions.create(
                model="gpt", messages=[{"role": "user", "content": "hi"}]
            )
        assert caught.value.body["code"] == "model_not_allowed"  # type: ignore[index]
    assert len(upstream.exchanges) == 2
    logged = caplog.text
    assert "key=team-a" in logged and "key=team-b" in logged
    assert TEAM_A not in logged and TEAM_B not in logged
    assert all(TEAM_A not in str(e.headers) for e in upstream.exchanges)  # never forwarded


async def test_a_keys_rpm_limit_is_a_429_with_retry_after_and_the_headers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    upstream = FakeUpstream(healthy)
    async with keyed(monkeypatch, upstream, rpm=3, tpm=100_000) as gw:
        headers = {"authorization": f"Bearer {TEAM_A}"}
        async with httpx.AsyncClient(base_url=gw.url, headers=headers) as client:
            answers = [await client.post("/v1/chat/completions", json=chat()) for _ in range(4)]
        assert [r.status_code for r in answers] == [200, 200, 200, 429]
        first, last = answers[0].headers, answers[3].headers
        assert first["x-ratelimit-limit-requests"] == "3"
        assert first["x-ratelimit-remaining-requests"] == "2"
        assert first["x-ratelimit-reset-requests"].endswith("s")
        assert first["x-ratelimit-limit-tokens"] == "100000"
        assert int(first["x-ratelimit-remaining-tokens"]) < 100_000
        assert answers[2].headers["x-ratelimit-remaining-requests"] == "0"
        assert 1 <= int(last["retry-after"]) <= 60
        assert last["x-ratelimit-remaining-requests"] == "0"
        assert answers[3].json()["error"]["type"] == "rate_limit_error"
        client_sdk = gw.openai(TEAM_A)
        with pytest.raises(openai.RateLimitError):
            await client_sdk.chat.completions.create(
                model="gpt", messages=[{"role": "user", "content": "hi"}]
            )
    assert len(upstream.exchanges) == 3


def test_keys_are_never_written_in_the_config() -> None:
    with pytest.raises(ConfigError) as caught:
        Config.from_mapping(
            {
                "providers": {"m": {"mock": {}}},
                "routes": [],
                "auth": {"keys": [{"name": "a", "key": "sk-0123456789abcdef0123"}]},
            }
        )
    assert caught.value.problems == [
        "auth.keys[0].key: keys are never written in the file: use key_env or sha256",
        "auth.keys[0]: give exactly one of key_env (a variable) or sha256",
    ]
    assert "sk-0123" not in str(caught.value)


async def test_listening_beyond_loopback_without_keys_warns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    upstream = FakeUpstream(healthy)
    with trio.fail_after(10):
        async with live_gateway({"up": upstream}, server={"host": "0.0.0.0"}):
            pass
    assert "with no client keys" in caplog.text


async def test_keys_made_through_the_admin_api_work_until_revoked_and_survive_a_restart(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    db = tmp_path / "usage.sqlite3"
    upstream = FakeUpstream(healthy)
    ask = {"model": "gpt", "messages": [{"role": "user", "content": "hi"}]}
    async with live_gateway({"up": upstream}, auth={"usage_db": str(db)}) as gw:
        async with httpx.AsyncClient(base_url=gw.url) as admin:
            assert (await admin.post("/v1/chat/completions", json=ask)).status_code == 200
            made = await admin.post(
                "/admin/keys", json={"name": "ci", "models": ["gpt"], "rpm": 100}
            )
            assert made.status_code == 201, made.text
            secret = made.json()["key"]
            assert secret.startswith("sk-cascade-") and len(secret) > 40
            again = await admin.post("/admin/keys", json={"name": "ci"})
            assert again.status_code == 400 and "used by another key" in again.text
            bad = await admin.post("/admin/keys", json={"name": "x", "key": "sk-mine-123"})
            assert bad.status_code == 400 and "sk-mine-123" not in bad.text
            # From now on every model endpoint needs a key
            assert (await admin.post("/v1/chat/completions", json=ask)).status_code == 401
            r = await admin.post(
                "/v1/chat/completions", json=ask, headers={"authorization": f"Bearer {secret}"}
            )
            assert r.status_code == 200 and r.headers["x-ratelimit-limit-requests"] == "100"
            listed = (await admin.get("/admin/keys")).json()["keys"]
            assert [(k["name"], k["source"]) for k in listed] == [("ci", "admin API")]
            assert secret not in json.dumps(listed)
    async with live_gateway({"up": upstream}, auth={"usage_db": str(db)}) as gw:  # restarted
        async with httpx.AsyncClient(base_url=gw.url) as admin:
            headers = {"authorization": f"Bearer {secret}"}
            r = await admin.post("/v1/chat/completions", json=ask, headers=headers)
            assert r.status_code == 200
            assert (await admin.post("/admin/keys/ci/revoke")).status_code == 200
            r = await admin.post("/v1/chat/completions", json=ask, headers=headers)
            assert r.status_code == 401  # revoked: at once
            assert (await admin.post("/admin/keys/ci/revoke")).status_code == 404
    async with live_gateway({"up": upstream}, auth={"usage_db": str(db)}) as gw:
        async with httpx.AsyncClient(base_url=gw.url) as admin:  # revoked stays revoked
            r = await admin.post("/v1/chat/completions", json=ask, headers=headers)
            assert r.status_code == 200  # no keys left at all: open again, as configured
            assert (await admin.get("/admin/keys")).json()["keys"] == []


async def test_a_key_from_the_config_cannot_be_revoked_through_the_api(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with keyed(monkeypatch, FakeUpstream(healthy)) as gw:
        headers = {"authorization": f"Bearer {ADMIN}"}
        async with httpx.AsyncClient(base_url=gw.url, headers=headers) as admin:
            r = await admin.post("/admin/keys/team-a/revoke")
            assert r.status_code == 409
            created = await admin.post("/admin/keys", json={"name": "team-a"})
            assert created.status_code == 400  # the config's name is taken


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(0.25, "250ms"), (5.2, "5s"), (59.4, "59s"), (59.7, "1m0s"), (60.2, "1m0s"), (61, "1m1s")],
)
def test_reset_durations_have_one_format(seconds: float, shown: str) -> None:
    """x-ratelimit-reset-*: whole seconds before minutes, so 59.7 s is 1m0s, never 60s."""
    assert _openai_duration(seconds) == shown
