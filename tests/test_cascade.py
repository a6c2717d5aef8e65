"""The dispatcher's cascade through the ASGI app: ordering, retries, failover and the deadline.

Real actors, dispatcher and app; only the upstream providers are scripted. All times are exact
virtual times under trio's autojump clock.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing

from tests.helpers import (
    Upstream,
    asgi_client,
    chat,
    chunk,
    config,
    connect_error,
    gateway,
    ok,
    sse_data,
    stall,
    status,
    stream,
)

NO_JITTER = {"backoff": {"base": "1s", "max": "60s", "jitter": "none"}}


def route(*targets: str, **extra: Any) -> list[dict[str, Any]]:
    return [{"match": "gpt", "targets": list(targets), **extra}]


async def post(gw: Any, body: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
    async with asgi_client(gw) as client:
        return await client.post("/v1/chat/completions", json=body, headers=headers)


async def test_first_target_answers(autojump_clock: trio.testing.MockClock) -> None:
    a, b = Upstream(ok("from a")), Upstream(ok("from b"))
    async with gateway(config(["a", "b"], route("a/m1", "b/m2")), {"a": a, "b": b}) as gw:
        r = await post(gw, chat())
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] == "from a"
    assert r.json()["model"] == "m1"  # the model that actually answered
    assert (r.headers["x-cascade-provider"], r.headers["x-cascade-attempts"]) == ("a", "1")
    assert len(b.calls) == 0


async def test_429_fails_over_at_once_and_blocks_the_target(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a = Upstream(status(429, headers={"retry-after": "30"}), ok("a again"))
    b = Upstream(ok("from b"))
    async with gateway(config(["a", "b"], route("a/m", "b/m")), {"a": a, "b": b}) as gw:
        r = await post(gw, chat())
        assert r.headers["x-cascade-provider"] == "b"
        assert b.times == [0.0]  # no sleep before failing over
        await trio.sleep(29)
        r = await post(gw, chat())
        assert r.headers["x-cascade-provider"] == "b"  # a is still blocked: skipped, no call
        assert a.times == [0.0]
        await trio.sleep_until(30.0)
        r = await post(gw, chat())
        assert r.headers["x-cascade-provider"] == "a"  # recovered in its normal order
    assert a.times == [0.0, 30.0]


async def test_all_targets_rate_limited_answers_429_with_earliest_unblock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a = Upstream(status(429, headers={"retry-after": "20"}))
    b = Upstream(status(429, headers={"retry-after": "5"}))
    async with gateway(config(["a", "b"], route("a/m", "b/m")), {"a": a, "b": b}) as gw:
        first = await post(gw, chat())
        await trio.sleep(1)
        second = await post(gw, chat())
    assert first.status_code == 429 and first.headers["retry-after"] == "5"
    assert second.status_code == 429 and second.headers["retry-after"] == "4"
    error = second.json()["error"]
    assert error["type"] == "retry_exhausted"
    assert [(x["provider"], x["error_type"]) for x in error["attempts"]] == [
        ("a", "refused:rate_limited"),
        ("b", "refused:rate_limited"),
    ]
    assert len(a.calls) == len(b.calls) == 1  # the second request made zero upstream calls
    assert (first.headers["x-cascade-attempts"], second.headers["x-cascade-attempts"]) == ("2", "0")


async def test_exponential_blocks_without_retry_after(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a = Upstream(status(429))
    b = Upstream(ok())
    async with gateway(config(["a", "b"], route("a/m", "b/m")), {"a": a, "b": b}) as gw:
        for _ in range(3):
            await post(gw, chat())
            snapshot = gw.actors["a"].snapshot(trio.current_time())
            await trio.sleep_until(snapshot.blocks[0].until)
    assert a.times == [0.0, 60.0, 180.0]  # blocked 60 s, then 120 s


async def test_same_model_retries_with_exact_backoff_then_fails_over(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a, b = Upstream(status(503)), Upstream(ok())
    cfg = config(["a", "b"], route("a/m", "b/m"), retry={"strategy": "same_model", **NO_JITTER})
    async with gateway(cfg, {"a": a, "b": b}) as gw:
        r = await post(gw, chat())
    assert r.headers["x-cascade-provider"] == "b"
    assert r.headers["x-cascade-attempts"] == "4"
    assert a.times == [0.0, 1.0, 3.0]  # max_retries 2: backoff 1 s then 2 s
    assert b.times == [3.0]


async def test_different_provider_strategy_fails_over_first_and_retries_later(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a = Upstream(status(500), ok("a recovered"))
    b = Upstream(connect_error())
    cfg = config(
        ["a", "b"], route("a/m", "b/m"), retry={"strategy": "different_provider", **NO_JITTER}
    )
    async with gateway(cfg, {"a": a, "b": b}) as gw:
        r = await post(gw, chat())
    assert r.json()["choices"][0]["message"]["content"] == "a recovered"
    assert b.times == [0.0]
    assert a.times == [0.0, 1.0]  # back to a after its backoff, counted from its own failure


async def test_same_provider_strategy_prefers_the_providers_other_model(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a, b = Upstream(status(502), ok("a m2")), Upstream(ok("b"))
    cfg = config(
        {"a": {"max_retries": 0}, "b": {}},
        route("a/m1", "b/m1", "a/m2"),
        retry={"strategy": "same_provider", **NO_JITTER},
    )
    async with gateway(cfg, {"a": a, "b": b}) as gw:
        r = await post(gw, chat())
    assert r.json()["choices"][0]["message"]["content"] == "a m2"
    assert [c.model for c in a.calls] == ["m1", "m2"]


async def test_retry_waits_at_least_the_upstream_retry_after(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a = Upstream(status(503, headers={"retry-after": "7"}), ok())
    cfg = config(["a"], route("a/m"), retry={"strategy": "same_model", **NO_JITTER})
    async with gateway(cfg, {"a": a}) as gw:
        r = await post(gw, chat())
    assert r.status_code == 200
    assert a.times == [0.0, 7.0]  # backoff said 1 s; Retry-After is the floor


async def test_status_rules_with_ranges(autojump_clock: trio.testing.MockClock) -> None:
    a, b = Upstream(status(504)), Upstream(ok())
    cfg = config(
        ["a", "b"],
        route("a/m", "b/m"),
        retry={"on_status": [{"codes": ["500-504"], "strategy": "failover"}], **NO_JITTER},
    )
    async with gateway(cfg, {"a": a, "b": b}) as gw:
        r = await post(gw, chat())
    assert r.headers["x-cascade-provider"] == "b" and a.times == [0.0] and b.times == [0.0]


async def test_max_attempts_caps_the_whole_cascade(autojump_clock: trio.testing.MockClock) -> None:
    ups = {n: Upstream(status(500)) for n in "abc"}
    cfg = config(list(ups), route("a/m", "b/m", "c/m"), retry={"max_attempts": 2, **NO_JITTER})
    async with gateway(cfg, ups) as gw:
        r = await post(gw, chat())
    assert r.status_code == 502
    assert [x["provider"] for x in r.json()["error"]["attempts"]] == ["a", "b"]
    assert r.headers["x-cascade-attempts"] == "2"
    assert len(ups["c"].calls) == 0


async def test_client_errors_are_returned_as_they_are(
    autojump_clock: trio.testing.MockClock,
) -> None:
    body = {"error": {"message": "bad temperature", "type": "invalid_request_error", "code": "x"}}
    a, b = Upstream(status(422, body)), Upstream(ok())
    async with gateway(config(["a", "b"], route("a/m", "b/m")), {"a": a, "b": b}) as gw:
        r = await post(gw, chat())
    assert (r.status_code, r.json()) == (422, body)
    assert len(b.calls) == 0


async def test_auth_failure_stops_the_cascade_and_never_echoes_the_key(
    autojump_clock: trio.testing.MockClock,
) -> None:
    body = {
        "error": {
            "message": "Incorrect API key provided: sk-abc***xyz",
            "type": "authentication_error",
        }
    }
    a, b = Upstream(status(401, body)), Upstream(ok())
    async with gateway(config(["a", "b"], route("a/m", "b/m")), {"a": a, "b": b}) as gw:
        r = await post(gw, chat())
    assert r.status_code == 502
    assert r.json()["error"]["type"] == "upstream_auth_error"
    assert "sk-" not in r.text
    assert len(b.calls) == 0


async def test_context_overflow_goes_to_a_larger_model(
    autojump_clock: trio.testing.MockClock,
) -> None:
    overflow = {"error": {"message": "too long", "code": "context_length_exceeded"}}
    a, big = Upstream(status(400, overflow)), Upstream(ok("big"))
    cfg = config(["a", "big"], route("a/small", "a/small2", on_context_overflow=["big/large"]))
    async with gateway(cfg, {"a": a, "big": big}) as gw:
        r = await post(gw, chat())
    assert r.json()["choices"][0]["message"]["content"] == "big"
    assert [c.model for c in a.calls] == ["small"]  # no retry on the same-size models


async def test_context_overflow_without_a_larger_target_returns_the_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    overflow = {"error": {"message": "too long", "code": "context_length_exceeded"}}
    a = Upstream(status(400, overflow))
    async with gateway(config(["a"], route("a/m")), {"a": a}) as gw:
        r = await post(gw, chat())
    assert (r.status_code, r.json()) == (400, overflow)


async def test_deadline_cuts_an_attempt_in_flight(autojump_clock: trio.testing.MockClock) -> None:
    a = Upstream(stall())
    cfg = config(
        {"a": {"timeouts": {"first_byte": "100s"}}}, route("a/m"), server={"deadline": "5s"}
    )
    async with gateway(cfg, {"a": a}) as gw:
        r = await post(gw, chat())
        await trio.lowlevel.checkpoint()
        assert gw.actors["a"].in_flight == 0
    assert r.status_code == 504
    assert trio.current_time() == 5.0
    assert a.cancelled == 1
    assert r.json()["error"]["attempts"][0]["error_type"] == "deadline"


async def test_deadline_header_shortens_and_cuts_a_backoff(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a = Upstream(status(503))
    cfg = config(["a"], route("a/m"), retry={"strategy": "same_model", **NO_JITTER})
    async with gateway(cfg, {"a": a}) as gw:
        r = await post(gw, chat(), headers={"x-cascade-deadline": "2500ms"})
    # Retries at 0, 1, then the 2 s backoff would end at 3 s > 2.5 s: stop at once, 504.
    assert a.times == [0.0, 1.0]
    assert r.status_code == 504
    assert trio.current_time() == 1.0


async def test_first_byte_timeout_fails_over_and_counts_504_when_last(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a, b = Upstream(stall()), Upstream(stall())
    cfg = config(
        {"a": {"timeouts": {"first_byte": "2s"}}, "b": {"timeouts": {"first_byte": "3s"}}},
        route("a/m", "b/m"),
    )
    async with gateway(cfg, {"a": a, "b": b}) as gw:
        r = await post(gw, chat())
    assert r.status_code == 504
    assert b.times == [2.0]
    assert [x["error_type"] for x in r.json()["error"]["attempts"]] == ["first_byte_timeout"] * 2


async def test_exhaustion_lists_every_attempt(autojump_clock: trio.testing.MockClock) -> None:
    a, b = Upstream(status(500)), Upstream(connect_error())
    cfg = config({"a": {"max_retries": 0}, "b": {"max_retries": 0}}, route("a/m", "b/n"))
    async with gateway(cfg, {"a": a, "b": b}) as gw:
        r = await post(gw, chat())
    assert r.status_code == 502
    error = r.json()["error"]
    assert error["type"] == "retry_exhausted"
    assert [
        (x["provider"], x["model"], x["status"], x["error_type"]) for x in error["attempts"]
    ] == [
        ("a", "m", 500, "http_500"),
        ("b", "n", None, "connect_error"),
    ]
    assert all("elapsed_ms" in x for x in error["attempts"])


# --- streams -------------------------------------------------------------------------------------


async def test_stream_fails_over_before_the_first_byte(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a = Upstream(stream([chunk("never")], cut_after=0))
    b = Upstream(stream([chunk("hello "), chunk("world", finish="stop")]))
    async with gateway(config(["a", "b"], route("a/m", "b/m")), {"a": a, "b": b}) as gw:
        r = await post(gw, chat(stream=True))
    assert r.status_code == 200 and r.headers["x-cascade-provider"] == "b"
    data = sse_data(r.text)
    assert [json.loads(d)["choices"][0]["delta"]["content"] for d in data[:-1]] == [
        "hello ",
        "world",
    ]
    assert data[-1] == "[DONE]"


async def test_stream_that_opens_with_an_error_event_fails_over(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a = Upstream(stream([b'data: {"error": {"message": "overloaded"}}\n\n']))
    b = Upstream(stream([chunk("ok")]))
    async with gateway(config(["a", "b"], route("a/m", "b/m")), {"a": a, "b": b}) as gw:
        r = await post(gw, chat(stream=True))
    assert r.headers["x-cascade-provider"] == "b"


async def test_stream_failure_after_commit_ends_with_in_band_error_and_no_done(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a = Upstream(stream([chunk("partial "), chunk("never")], cut_after=1))
    b = Upstream(stream([chunk("b")]))
    async with gateway(config(["a", "b"], route("a/m", "b/m")), {"a": a, "b": b}) as gw:
        r = await post(gw, chat(stream=True))
    data = sse_data(r.text)
    assert json.loads(data[0])["choices"][0]["delta"]["content"] == "partial "
    assert json.loads(data[-1])["error"]["code"] == "stream_cut"
    assert "[DONE]" not in data
    assert len(b.calls) == 0  # committed: no failover after the first byte


async def test_stream_stall_after_commit_ends_with_in_band_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a = Upstream(stream([chunk("x"), chunk("y")], stall_after=1))
    cfg = config({"a": {"timeouts": {"idle": "4s"}}}, route("a/m"))
    async with gateway(cfg, {"a": a}) as gw:
        r = await post(gw, chat(stream=True))
    assert json.loads(sse_data(r.text)[-1])["error"]["code"] == "idle_timeout"
    assert trio.current_time() == 4.0


async def test_stream_without_done_is_finalised_promptly(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a = Upstream(stream([chunk("a", finish="stop")], done=False))
    async with gateway(config(["a"], route("a/m")), {"a": a}) as gw:
        r = await post(gw, chat(stream=True))
    assert sse_data(r.text)[-1] == "[DONE]"
    assert trio.current_time() == 0.0


async def test_malformed_upstream_events_never_reach_the_client(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a = Upstream(
        stream([chunk("a"), b"data: {not json\n\n", b"data: [1,2]\n\n", chunk("b", finish="stop")])
    )
    async with gateway(config(["a"], route("a/m")), {"a": a}) as gw:
        r = await post(gw, chat(stream=True))
    data = sse_data(r.text)
    assert len(data) == 3 and data[-1] == "[DONE]"
    assert all(json.loads(d)["object"] == "chat.completion.chunk" for d in data[:-1])


async def test_retry_after_as_http_date_is_honoured(autojump_clock: trio.testing.MockClock) -> None:
    from email.utils import formatdate

    # The gateway helper's actors read wall-clock time 1_000_000.0.
    a = Upstream(status(429, headers={"retry-after": formatdate(1_000_045, usegmt=True)}), ok("a"))
    b = Upstream(ok("b"))
    async with gateway(config(["a", "b"], route("a/m", "b/m")), {"a": a, "b": b}) as gw:
        await post(gw, chat())
        await trio.sleep(44.9)
        assert (await post(gw, chat())).headers["x-cascade-provider"] == "b"
        await trio.sleep_until(45.0)
        assert (await post(gw, chat())).headers["x-cascade-provider"] == "a"
    assert a.times == [0.0, 45.0]


async def test_retry_budget_stops_a_retry_storm(autojump_clock: trio.testing.MockClock) -> None:
    a, b = Upstream(status(503)), Upstream(ok())
    cfg = config(
        {"a": {"max_retries": 5, "retry_budget": {"ratio": 0, "min_retries": 1}}, "b": {}},
        route("a/m", "b/m"),
        retry={"strategy": "same_model", "max_attempts": 10, **NO_JITTER},
    )
    async with gateway(cfg, {"a": a, "b": b}) as gw:
        r = await post(gw, chat())
    assert a.times == [0.0, 1.0]  # the second retry (due at 3 s) is refused by the budget
    assert b.times == [3.0]
    assert r.headers["x-cascade-provider"] == "b"


async def test_connect_timeout_is_transient_and_answers_504_when_last(
    autojump_clock: trio.testing.MockClock,
) -> None:
    import httpx

    async def times_out(request: httpx.Request) -> httpx.Response:
        await trio.sleep(5)
        raise httpx.ConnectTimeout("connect timed out", request=request)

    a = Upstream(times_out)
    cfg = config(
        {"a": {"max_retries": 1}}, route("a/m"), retry={"strategy": "same_model", **NO_JITTER}
    )
    async with gateway(cfg, {"a": a}) as gw:
        r = await post(gw, chat())
    assert a.times == [0.0, 6.0]  # retried after the 1 s backoff
    assert r.status_code == 504
    assert [x["error_type"] for x in r.json()["error"]["attempts"]] == ["connect_timeout"] * 2


async def test_an_upstream_that_compresses_anyway_is_relayed_with_its_encoding(
    autojump_clock: trio.testing.MockClock,
) -> None:
    import gzip

    import httpx

    async def gzipped(request: httpx.Request) -> httpx.Response:
        assert request.headers["accept-encoding"] == "identity"
        body = gzip.compress(json.dumps({"choices": [], "model": "m"}).encode())
        return httpx.Response(
            200,
            content=body,
            headers={"content-encoding": "gzip", "content-type": "application/json"},
        )

    async with gateway(config(["a"], route("a/m")), {"a": Upstream(gzipped)}) as gw:
        r = await post(gw, chat())
    assert r.headers["content-encoding"] == "gzip"
    assert r.json() == {"choices": [], "model": "m"}  # the client decodes it


@pytest.mark.parametrize(
    "pieces",
    [
        [chunk("a", finish="stop"), b"data: [DONE]\n\n", b": closing\n\n"],
        # the end in a read of several events: the actor waits to be asked for more
        [chunk("a"), chunk("", finish="stop") + b"data: [DONE]\n\n", b": closing\n\n"],
    ],
)
async def test_a_stream_that_sent_done_is_settled_as_a_success(
    autojump_clock: trio.testing.MockClock, pieces: list[bytes]
) -> None:
    # [DONE] arrives before the upstream closes the body: the client is answered at once, and the
    # attempt still ends as a success (not a cancellation), so the actor learns from it.
    a = Upstream(stream(pieces, interval=0.5, done=False))
    async with gateway(config(["a"], route("a/m")), {"a": a}) as gw:
        r = await post(gw, chat(stream=True))
        snapshot = gw.actors["a"].snapshot(trio.current_time())
    assert sse_data(r.text)[-1] == "[DONE]"
    registry = gw.metrics.registry
    assert (
        registry.get_sample_value(
            "cascade_upstream_attempts_total", {"provider": "a", "outcome": "ok"}
        )
        == 1
    )
    assert (
        registry.get_sample_value(
            "cascade_upstream_cancelled_total", {"provider": "a", "phase": "streaming"}
        )
        is None
    )
    assert snapshot.ttfb_p50 == 0.0


async def test_a_stream_opening_with_an_error_counts_against_the_provider(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a = Upstream(stream([b'data: {"error": {"message": "overloaded"}}\n\n']))
    b = Upstream(stream([chunk("b")]))
    cfg = config(
        {"a": {"circuit": {"failures": 1, "open_for": "30s"}}, "b": {}}, route("a/m", "b/m")
    )
    async with gateway(cfg, {"a": a, "b": b}) as gw:
        first = await post(gw, chat(stream=True))
        second = await post(gw, chat(stream=True))
    assert first.headers["x-cascade-provider"] == second.headers["x-cascade-provider"] == "b"
    assert len(a.calls) == 1  # the circuit opened on the bad stream: a was skipped the second time
    attempts = gw.metrics.registry.get_sample_value(
        "cascade_upstream_attempts_total", {"provider": "a", "outcome": "protocol"}
    )
    assert attempts == 1


async def test_every_target_rate_limited_past_the_deadline_is_429_not_504(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Both answer 429 with a Retry-After longer than the deadline: the client is told when to
    come back (429 + Retry-After = the earliest unblock), not that time ran out (issue 9.6)."""
    a = Upstream(status(429, headers={"retry-after": "300"}))
    b = Upstream(status(429, headers={"retry-after": "200"}))
    retry = {"on_status": [{"codes": [429], "strategy": "same_model"}]}  # a wait it cannot afford
    cfg = config(["a", "b"], route("a/m", "b/m"), server={"deadline": "120s"}, retry=retry)
    async with gateway(cfg, {"a": a, "b": b}) as gw:
        for _ in range(2):  # the second request meets both blocks as refusals
            r = await post(gw, chat())
            assert r.status_code == 429, r.text
            assert r.json()["error"]["type"] == "retry_exhausted"
            assert r.headers["retry-after"] == "200"
    assert len(a.calls) == len(b.calls) == 1


async def test_deadline_header_takes_a_bare_number_of_seconds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a = Upstream(ok("late", delay=30))
    async with gateway(config(["a"], route("a/m")), {"a": a}) as gw:
        r = await post(gw, chat(), headers={"x-cascade-deadline": "10"})
        bad = await post(gw, chat(), headers={"x-cascade-deadline": "soon"})
    assert r.status_code == 504 and trio.current_time() == 10.0
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "x-cascade-deadline"


async def test_the_log_says_what_the_cascade_did(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A 429 block is logged at WARNING with its length and source; a target skipped because it
    is blocked is logged at INFO; the last failure says nothing follows (issue 10.7)."""
    caplog.set_level(logging.INFO)
    a = Upstream(status(429, headers={"retry-after": "30"}))
    b = Upstream(status(503))
    cfg = config({"a": {}, "b": {"max_retries": 0}}, route("a/m", "b/m"))
    async with gateway(cfg, {"a": a, "b": b}) as gw:
        first = await post(gw, chat(), headers={"x-request-id": "first"})
        second = await post(gw, chat(), headers={"x-request-id": "second"})
    assert first.status_code == second.status_code == 502
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name.startswith("cascade")]
    assert (
        "WARNING",
        "provider a: m rate limited (http_429); blocked for 30.0 s (Retry-After)",
    ) in lines
    assert ("INFO", "request first: a/m failed (http_429), failing over") in lines
    assert ("INFO", "request first: b/m failed (http_503), no attempt left") in lines
    assert ("INFO", "request second: a/m skipped (rate_limited for 30.0 s)") in lines
