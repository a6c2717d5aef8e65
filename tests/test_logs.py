"""JSON logs: one line per request, field by field, and never a key or a message's content."""

from __future__ import annotations

import json
import logging

import pytest
import trio
import trio.testing

from router.telemetry.logs import JSONFormatter
from tests.helpers import Upstream, asgi_client, chat, config, gateway, ok, status

SECRET_KEY = "sk-proj-SECRETKEYVALUE0123456789"
SECRET_CONTENT = "my card number is 4111 1111 1111 1111"


async def test_json_request_lines_field_by_field_and_no_secret(
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.INFO)
    monkeypatch.setenv("CASCADE_TEST_KEY", SECRET_KEY)
    a = Upstream(status(429, headers={"retry-after": "30"}))
    b = Upstream(ok("from b", delay=0.25))
    cfg = config(
        {"a": {"api_key_env": "CASCADE_TEST_KEY"}, "b": {"api_key_env": "CASCADE_TEST_KEY"}},
        [{"match": "gpt", "targets": ["a/m"], "alternatives": ["b/m2"]}],
        server={"log_format": "json"},
    )
    body = {**chat(), "messages": [{"role": "user", "content": SECRET_CONTENT}]}
    async with gateway(cfg, {"a": a, "b": b}) as gw, asgi_client(gw) as client:
        r = await client.post("/v1/chat/completions", json=body, headers={"x-request-id": "req-1"})
        assert r.status_code == 200
    formatter = JSONFormatter()
    lines = [formatter.format(record) for record in caplog.records]
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    [request] = [e for e in entries if e.get("request_id") == "req-1"]
    assert request["logger"] == "cascade.request" and request["level"] == "INFO"
    assert (request["route"], request["dialect"], request["status"]) == ("gpt", "openai", 200)
    assert (request["provider"], request["model"], request["calls"]) == ("b", "m2", 2)
    assert request["attempts"] == [
        {"provider": "a", "model": "m", "outcome": "http_429", "status": 429, "ms": 0.0},
        {"provider": "b", "model": "m2", "outcome": "ok", "status": 200, "ms": 250.0},
    ]
    assert request["ms"] == 250.0
    everything = "\n".join(lines) + caplog.text
    assert SECRET_KEY not in everything and SECRET_CONTENT not in everything
    assert "4111" not in everything
