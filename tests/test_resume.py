"""Streams that survive their provider (issue 23): a stream cut, stalled or ended by an error
event after its first words is continued on the route's next target that can continue a prefix,
of the same or the other dialect, and the client's official SDK (streaming helpers included)
sees one answer: the first attempt's words then the continuation's, no repeat, one id, one end.
Real sockets on 127.0.0.1; the upstreams are fakes that check the prefill they are sent."""

from __future__ import annotations

import json
from functools import partial
from typing import Any

import anthropic
import httpx
import openai
import pytest
import trio
import trio.testing

from router.cli import main
from tests.helpers import eventually, sse_data
from tests.live import SDK_LEFTOVERS, Cut, Exchange, FakeUpstream, live_gateway, sse
from tests.test_cancellation import client_leaves

pytestmark = SDK_LEFTOVERS

ANSWER = "The quick brown fox jumps over the lazy dog."
FIRST = ["The ", "quick ", "brown "]  # what the first provider says before it breaks
HOWS = ["cut", "stall", "error_event"]


def _event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\n".encode() + sse(data)


def _chunk(delta: dict[str, Any], finish: str | None = None, id_: str = "chatcmpl-first") -> bytes:
    return sse({"id": id_, "object": "chat.completion.chunk", "created": 1, "model": "m",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})  # fmt: skip


async def _break(exchange: Exchange, how: str, dialect: str) -> None:
    # The break comes after the gateway has relayed the words (its stream is committed): once
    # every task waits. Written at once, words and error would arrive in one read, an error
    # before the first byte, which fails over instead (test_cascade covers that).
    await trio.testing.wait_all_tasks_blocked()
    if how == "cut":
        raise Cut
    if how == "stall":
        await trio.sleep_forever()
    if dialect == "openai":
        error = {"error": {"message": "overloaded", "type": "server_error", "code": None}}
        await exchange.body_part(sse(error), more=False)
    else:
        error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
        await exchange.body_part(_event("error", error), more=False)


def breaking(how: str, words: list[str] = FIRST) -> Any:
    """A provider of the dialect asked (by the path) that says `words` and then breaks. The
    words go in one write: no gap between them for a loaded machine to stretch past the idle
    timeout of the stall tests."""

    async def handler(exchange: Exchange) -> None:
        await exchange.start(200, "text/event-stream")
        if exchange.path.endswith("/messages"):
            start = {"id": "msg_first", "type": "message", "role": "assistant", "model": "m",
                     "content": [], "stop_reason": None, "stop_sequence": None,
                     "usage": {"input_tokens": 3, "output_tokens": 1}}  # fmt: skip
            block = {"type": "content_block_start", "index": 0,
                     "content_block": {"type": "text", "text": ""}}  # fmt: skip
            said = _event("message_start", {"type": "message_start", "message": start})
            said += _event("content_block_start", block)
            for word in words:
                delta = {"type": "content_block_delta", "index": 0,
                         "delta": {"type": "text_delta", "text": word}}  # fmt: skip
                said += _event("content_block_delta", delta)
            await exchange.body_part(said)
            await _break(exchange, how, "anthropic")
        else:
            said = _chunk({"role": "assistant", "content": ""})
            said += b"".join(_chunk({"content": word}) for word in words)
            await exchange.body_part(said)
            await _break(exchange, how, "openai")

    return handler


def prefill_of(exchange: Exchange) -> str:
    """The assistant text a continuation request ends with (its prefill)."""
    last = exchange.json["messages"][-1]
    assert last["role"] == "assistant", last
    content = last["content"]
    return content if isinstance(content, str) else "".join(b["text"] for b in content)


async def continues(exchange: Exchange) -> None:
    """A provider that continues ANSWER from the prefill it is sent, in the dialect asked."""
    prefill = prefill_of(exchange)
    assert ANSWER.startswith(prefill) and not prefill.endswith(" "), prefill
    rest = ANSWER[len(prefill) :]
    words = [rest[:1] + w for w in rest[1:].split(" ")]  # " fox", " jumps"…
    await exchange.start(200, "text/event-stream")
    if exchange.path.endswith("/messages"):
        start = {"id": "msg_second", "type": "message", "role": "assistant", "model": "m2",
                 "content": [], "stop_reason": None, "stop_sequence": None,
                 "usage": {"input_tokens": 20, "output_tokens": 1}}  # fmt: skip
        await exchange.body_part(_event("message_start", {"type": "message_start",
                                                          "message": start}))  # fmt: skip
        block = {"type": "content_block_start", "index": 0,
                 "content_block": {"type": "text", "text": ""}}  # fmt: skip
        await exchange.body_part(_event("content_block_start", block))
        for word in words:
            delta = {"type": "content_block_delta", "index": 0,
                     "delta": {"type": "text_delta", "text": word}}  # fmt: skip
            await exchange.body_part(_event("content_block_delta", delta))
        await exchange.body_part(_event("content_block_stop", {"type": "content_block_stop",
                                                               "index": 0}))  # fmt: skip
        end = {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
               "usage": {"output_tokens": 7}}  # fmt: skip
        await exchange.body_part(_event("message_delta", end))
        await exchange.body_part(_event("message_stop", {"type": "message_stop"}), more=False)
    else:
        await exchange.body_part(_chunk({"role": "assistant", "content": ""}, id_="chatcmpl-2"))
        for word in words:
            await exchange.body_part(_chunk({"content": word}, id_="chatcmpl-2"))
        await exchange.body_part(_chunk({}, "stop", id_="chatcmpl-2"))
        usage = {"id": "chatcmpl-2", "object": "chat.completion.chunk", "created": 2,
                 "model": "m2", "choices": [],
                 "usage": {"prompt_tokens": 20, "completion_tokens": 7, "total_tokens": 27}}  # fmt: skip
        await exchange.body_part(sse(usage) + b"data: [DONE]\n\n", more=False)


async def streamed_text(gw: Any, content: str) -> str:
    """The text the official SDK streams back for one user message to model `gpt`."""
    sdk = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
    with trio.fail_after(10):
        stream = await sdk.chat.completions.create(
            model="gpt", messages=[{"role": "user", "content": content}], stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        await sdk.close()
    return text


def route(**resume: Any) -> list[dict[str, Any]]:
    return [{"match": "gpt", "targets": ["first/m"], "alternatives": ["second/m2"],
             "resume": resume or True}]  # fmt: skip


def providers(first: str, second: str, **second_settings: Any) -> dict[str, dict[str, Any]]:
    return {
        "first": {"dialect": first, "timeouts": {"idle": "300ms"}},
        "second": {"dialect": second, **({"prefill": "trailing"} if second == "openai" else {}),
                   **second_settings},
    }  # fmt: skip


PAIRS = [("openai", "openai"), ("openai", "anthropic"), ("anthropic", "anthropic"),
         ("anthropic", "openai")]  # fmt: skip


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize(("first", "second"), PAIRS, ids=["-".join(p) for p in PAIRS])
async def test_an_openai_client_gets_one_answer_across_the_break(
    first: str, second: str, how: str
) -> None:
    one, two = FakeUpstream(breaking(how)), FakeUpstream(continues)
    async with live_gateway({"first": one, "second": two}, route(),
                            providers(first, second)) as gw:  # fmt: skip
        sdk = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
        with trio.fail_after(10):
            chunks = [c async for c in await sdk.chat.completions.create(
                model="gpt", messages=[{"role": "user", "content": "say it"}], stream=True,
                stream_options={"include_usage": True})]  # fmt: skip
            await sdk.close()
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ANSWER
    assert len({c.id for c in chunks}) == 1  # one stream, one id
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert [f for f in finishes if f] == ["stop"]
    roles = [c.choices[0].delta.role for c in chunks if c.choices and c.choices[0].delta.role]
    assert roles == ["assistant"]  # the continuation does not open the message again
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 7 + len("".join(FIRST)) // 4
    assert prefill_of(two.exchanges[0]) == "The quick brown"
    assert len(one.exchanges) == 1 and len(two.exchanges) == 1


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize(("first", "second"), PAIRS, ids=["-".join(p) for p in PAIRS])
async def test_an_anthropic_client_gets_one_message_across_the_break(
    first: str, second: str, how: str
) -> None:
    one, two = FakeUpstream(breaking(how)), FakeUpstream(continues)
    async with live_gateway({"first": one, "second": two}, route(),
                            providers(first, second)) as gw:  # fmt: skip
        sdk = anthropic.AsyncAnthropic(base_url=gw.url, api_key="x", max_retries=0)
        events: list[Any] = []
        with trio.fail_after(10):
            async with sdk.messages.stream(
                model="gpt", max_tokens=100, messages=[{"role": "user", "content": "say it"}]
            ) as stream:
                async for event in stream:
                    events.append(event)
                final = await stream.get_final_message()
            await sdk.close()
    assert [b.type for b in final.content] == ["text"]
    assert final.content[0].text == ANSWER
    assert final.stop_reason == "end_turn"
    kinds = [e.type for e in events]
    assert kinds.count("message_start") == 1 and kinds.count("message_stop") == 1
    assert kinds.count("content_block_start") == 1 and kinds.count("content_block_stop") == 1
    assert {e.index for e in events if e.type == "content_block_delta"} == {0}
    assert final.usage.output_tokens == 7 + len("".join(FIRST)) // 4


@pytest.mark.parametrize(("first", "second"), [("openai", "anthropic"), ("anthropic", "openai")])
async def test_a_responses_client_gets_one_response_across_the_break(
    first: str, second: str
) -> None:
    one, two = FakeUpstream(breaking("cut")), FakeUpstream(continues)
    async with live_gateway({"first": one, "second": two}, route(),
                            providers(first, second)) as gw:  # fmt: skip
        sdk = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
        with trio.fail_after(10):
            async with sdk.responses.stream(model="gpt", input="say it") as stream:
                deltas = [e.delta async for e in stream if e.type == "response.output_text.delta"]
                final = await stream.get_final_response()
            await sdk.close()
    assert "".join(deltas) == ANSWER
    assert final.output_text == ANSWER and final.status == "completed"


async def test_a_target_that_rejects_the_prefill_is_skipped_to_the_next() -> None:
    """S14: the first alternative answers 400 to the prefilled request; the next continues."""

    async def rejects(exchange: Exchange) -> None:
        error = {"type": "error", "error": {"type": "invalid_request_error",
                                            "message": "assistant prefill is not supported"}}  # fmt: skip
        await exchange.json_answer(400, error)

    one, picky, good = FakeUpstream(breaking("cut")), FakeUpstream(rejects), FakeUpstream(continues)
    routes = [{"match": "gpt", "targets": ["first/m"], "alternatives": ["picky/m", "good/m"],
               "resume": True}]  # fmt: skip
    settings = {"first": {"dialect": "anthropic"}, "picky": {"dialect": "anthropic"},
                "good": {"dialect": "anthropic"}}  # fmt: skip
    async with live_gateway({"first": one, "picky": picky, "good": good}, routes, settings) as gw:
        sdk = anthropic.AsyncAnthropic(base_url=gw.url, api_key="x", max_retries=0)
        with trio.fail_after(10):
            async with sdk.messages.stream(
                model="gpt", max_tokens=100, messages=[{"role": "user", "content": "say it"}]
            ) as stream:
                final = await stream.get_final_message()
            await sdk.close()
        metrics = await _metrics(gw)
    assert final.content[0].text == ANSWER
    assert len(picky.exchanges) == 1 and len(good.exchanges) == 1
    assert 'cascade_stream_resumes_total{outcome="resumed",route="gpt"} 1.0' in metrics


async def test_a_provider_that_cannot_continue_a_prefix_is_never_asked() -> None:
    """An OpenAI-dialect provider without `prefill` is not a target to resume on."""
    one, plain, good = (
        FakeUpstream(breaking("cut")),
        FakeUpstream(continues),
        FakeUpstream(continues),
    )
    routes = [{"match": "gpt", "targets": ["first/m"], "alternatives": ["plain/m", "good/m"],
               "resume": True}]  # fmt: skip
    settings = {"first": {}, "plain": {}, "good": {"prefill": "prefix"}}
    async with live_gateway({"first": one, "plain": plain, "good": good}, routes, settings) as gw:
        text = await streamed_text(gw, "say it")
    assert text == ANSWER
    assert plain.exchanges == []
    assert good.exchanges[0].json["messages"][-1] == {
        "role": "assistant",
        "content": "The quick brown",
        "prefix": True,
    }


async def _metrics(gw: Any) -> str:
    async with httpx.AsyncClient(base_url=gw.url) as client:
        return (await client.get("/metrics")).text


async def _raw_stream(gw: Any, body: dict[str, Any]) -> tuple[httpx.Response, list[str]]:
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        r = await client.post("/v1/chat/completions", json=body)
    return r, sse_data(r.text)


@pytest.mark.parametrize("resume", [None, {"on": ["stall"]}], ids=["off", "not-for-cuts"])
async def test_without_the_option_a_broken_stream_ends_as_before(
    resume: dict[str, Any] | None,
) -> None:
    one, two = FakeUpstream(breaking("cut")), FakeUpstream(continues)
    routes = [{"match": "gpt", "targets": ["first/m"], "alternatives": ["second/m2"],
               **({"resume": resume} if resume else {})}]  # fmt: skip
    async with live_gateway({"first": one, "second": two}, routes,
                            providers("openai", "anthropic")) as gw:  # fmt: skip
        body = {"model": "gpt", "stream": True, "messages": [{"role": "user", "content": "x"}]}
        r, data = await _raw_stream(gw, body)
    assert r.status_code == 200
    assert data[-1] != "[DONE]" and json.loads(data[-1])["error"]["code"] == "stream_cut"
    assert "".join(json.loads(d)["choices"][0]["delta"].get("content", "") for d in data[:-1]) == (
        "".join(FIRST)
    )
    assert two.exchanges == []


async def tool_then_cut(exchange: Exchange) -> None:
    """A tool call's first arguments, then the connection drops."""
    await exchange.start(200, "text/event-stream")
    call = {"index": 0, "id": "call_1", "type": "function",
            "function": {"name": "read", "arguments": '{"pa'}}  # fmt: skip
    await exchange.body_part(_chunk({"role": "assistant", "tool_calls": [call]}))
    raise Cut


@pytest.mark.parametrize(
    ("first", "extra"),
    [(tool_then_cut, {}), (breaking("cut"), {"n": 2})],
    ids=["a-tool-call-cut-midway", "two-choices"],
)
async def test_an_answer_that_cannot_be_continued_ends_cleanly(
    first: Any, extra: dict[str, Any]
) -> None:
    """A tool call's arguments cannot be prefilled, nor two choices continued as one: the
    stream ends with its error event, and nothing is asked of the next target."""
    one, two = FakeUpstream(first), FakeUpstream(continues)
    async with live_gateway({"first": one, "second": two}, route(),
                            providers("openai", "openai")) as gw:  # fmt: skip
        body = {"model": "gpt", "stream": True, "messages": [{"role": "user", "content": "x"}],
                **extra}  # fmt: skip
        _, data = await _raw_stream(gw, body)
        metrics = await _metrics(gw)
    assert json.loads(data[-1])["error"]["code"] == "stream_cut"
    assert two.exchanges == []
    assert 'cascade_stream_resumes_total{outcome="not_resumable",route="gpt"} 1.0' in metrics


async def test_a_stream_from_a_responses_provider_is_not_resumed() -> None:
    """The Responses API has no assistant prefix: its streams end as they would."""

    async def native_then_cut(exchange: Exchange) -> None:
        await exchange.start(200, "text/event-stream")
        created = {"type": "response.created", "sequence_number": 0,
                   "response": {"id": "resp_1", "object": "response", "status": "in_progress",
                                "output": [], "model": "m"}}  # fmt: skip
        await exchange.body_part(_event("response.created", created))
        raise Cut

    one, two = FakeUpstream(native_then_cut), FakeUpstream(continues)
    settings = {"first": {"dialect": "responses"}, "second": {"dialect": "anthropic"}}
    async with live_gateway({"first": one, "second": two}, route(), settings) as gw:
        async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
            body = {"model": "gpt", "input": "x", "stream": True}
            r = await client.post("/v1/responses", json=body)
        metrics = await _metrics(gw)
    assert r.status_code == 200 and "response.completed" not in r.text
    assert two.exchanges == []
    assert 'cascade_stream_resumes_total{outcome="not_resumable",route="gpt"} 1.0' in metrics


async def test_when_no_target_can_continue_the_stream_ends_as_before() -> None:
    async def fails(exchange: Exchange) -> None:
        await exchange.json_answer(500, {"error": {"message": "down", "type": "server_error"}})

    one, two = FakeUpstream(breaking("error_event")), FakeUpstream(fails)
    async with live_gateway({"first": one, "second": two}, route(),
                            providers("anthropic", "anthropic", max_retries=0)) as gw:  # fmt: skip
        async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
            body = {"model": "gpt", "max_tokens": 50, "stream": True,
                    "messages": [{"role": "user", "content": "x"}]}  # fmt: skip
            r = await client.post("/v1/messages", json=body)
        metrics = await _metrics(gw)
    last = json.loads(sse_data(r.text)[-1])
    assert last["type"] == "error" and "overloaded" in last["error"]["message"].lower()
    assert '"message_stop"' not in r.text
    assert 'cascade_stream_resumes_total{outcome="failed",route="gpt"} 1.0' in metrics
    assert len(two.exchanges) == 1


async def test_a_resumed_keyed_stream_is_charged_for_both_attempts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first attempt: its reported input (3) and the text it relayed / 4 (16 chars: 4); the
    continuation: its usage (20 + 7). 34 in all, within the reservation."""
    monkeypatch.setenv("RESUME_KEY", "sk-resume-0123456789abcdef0123456789")
    one, two = FakeUpstream(breaking("cut")), FakeUpstream(continues)
    auth = {"keys": [{"name": "team", "key_env": "RESUME_KEY",
                      "budgets": [{"tokens": 100_000, "period": "day"}]}]}  # fmt: skip
    async with live_gateway({"first": one, "second": two}, route(),
                            providers("anthropic", "anthropic"), auth=auth) as gw:  # fmt: skip
        headers = {"x-api-key": "sk-resume-0123456789abcdef0123456789"}
        async with httpx.AsyncClient(base_url=gw.url, headers=headers, timeout=10) as client:
            body = {"model": "gpt", "max_tokens": 100, "stream": True,
                    "messages": [{"role": "user", "content": "say it"}]}  # fmt: skip
            r = await client.post("/v1/messages", json=body)
            assert '"message_stop"' in r.text
            await eventually(lambda: gw.app.gateway.ledger.in_flight == 0)  # settled
            [key] = (await client.get("/admin/keys")).json()["keys"]
    assert key["spent_today"]["tokens"] == 3 + 4 + 20 + 7
    assert key["reserved"]["tokens"] == 0


async def test_the_failed_attempt_and_an_abandoned_continuation_are_cancelled() -> None:
    """The stalled first attempt's connection is closed when the stream resumes; a client that
    leaves during the continuation takes the continuation's upstream call with it."""
    release = trio.Event()

    async def stalls(exchange: Exchange) -> None:
        await exchange.start(200, "text/event-stream")
        await exchange.body_part(_chunk({"role": "assistant", "content": "The "}))
        await exchange.wait_disconnect()

    async def continues_slowly(exchange: Exchange) -> None:
        await exchange.start(200, "text/event-stream")
        await exchange.body_part(_chunk({"content": "quick"}))
        release.set()
        await exchange.wait_disconnect()

    one, two = FakeUpstream(stalls), FakeUpstream(continues_slowly)
    async with live_gateway({"first": one, "second": two}, route(),
                            providers("openai", "openai")) as gw:  # fmt: skip
        body = {"model": "gpt", "stream": True, "messages": [{"role": "user", "content": "x"}]}
        with trio.fail_after(10):
            await client_leaves(gw, body, release.wait)  # once the continuation has begun
            await one.exchanges[0].closed.wait()  # cancelled at the resume
            await two.exchanges[0].closed.wait()  # cancelled when the client left
    assert release.is_set()


@pytest.mark.parametrize("second", ["openai", "anthropic"])
async def test_cascades_mock_continues_a_prefill_so_a_demo_can_resume(second: str) -> None:
    """`cascade mock` (and `mock:` providers) continue a trailing assistant message from the
    word after its last: a route of mocks whose first always cuts still answers whole."""
    routes = [{"match": "gpt", "targets": ["cuts/m"], "alternatives": ["whole/m"],
               "resume": True}]  # fmt: skip
    extra = {
        "cuts": {"mock": {"cut_rate": 1.0, "chunks": 6}},
        "whole": {"dialect": second, "mock": {"chunks": 6},
                  **({"prefill": "trailing"} if second == "openai" else {})},
    }  # fmt: skip
    async with live_gateway({}, routes, extra_providers=extra) as gw:
        text = await streamed_text(gw, "hi")
    words = text.split(" ")
    assert words[0] == "[cuts]" and len(words) > 3
    assert words[1:] == [f"word{i}" for i in range(len(words) - 1)]  # none lost, none twice


async def test_a_failed_resume_after_an_error_event_ends_the_stream_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The first provider sends an error event once the client has its first words, and keeps
    its connection open; nobody can continue: the stream ends with the error event, the
    attempt is cancelled, nothing crashes."""
    committed = trio.Event()

    async def error_then_wait(exchange: Exchange) -> None:
        await exchange.start(200, "text/event-stream")
        await exchange.body_part(_chunk({"role": "assistant", "content": "The "}))
        await committed.wait()
        error = {"error": {"message": "overloaded", "type": "server_error", "code": None}}
        await exchange.body_part(sse(error))
        await exchange.wait_disconnect()

    async def fails(exchange: Exchange) -> None:
        await exchange.json_answer(500, {"error": {"message": "down", "type": "server_error"}})

    one, two = FakeUpstream(error_then_wait), FakeUpstream(fails)
    async with live_gateway({"first": one, "second": two}, route(),
                            providers("openai", "openai", max_retries=0)) as gw:  # fmt: skip
        body = {"model": "gpt", "stream": True, "messages": [{"role": "user", "content": "x"}]}
        lines = []
        with trio.fail_after(5):
            async with (
                httpx.AsyncClient(base_url=gw.url) as client,
                client.stream("POST", "/v1/chat/completions", json=body) as r,
            ):
                async for line in r.aiter_lines():  # read to the end: the stream ends
                    lines.append(line)
                    committed.set()
            await one.exchanges[0].closed.wait()
    data = [line[6:] for line in lines if line.startswith("data: ")]
    assert r.status_code == 200 and json.loads(data[-1])["error"]["message"] == "overloaded"
    assert len(two.exchanges) == 1
    assert "failed inside Cascade" not in caplog.text


async def test_cascade_status_shows_a_resumed_stream(capsys: pytest.CaptureFixture[str]) -> None:
    one, two = FakeUpstream(breaking("cut")), FakeUpstream(continues)
    async with live_gateway({"first": one, "second": two}, route(),
                            providers("openai", "anthropic")) as gw:  # fmt: skip
        once = partial(main, ["status", "--url", gw.url, "--once"])
        with trio.fail_after(20):
            assert await trio.to_thread.run_sync(once) == 0  # starts the watch
            body = {"model": "gpt", "stream": True, "messages": [{"role": "user", "content": "x"}]}
            await _raw_stream(gw, body)
            async with httpx.AsyncClient(base_url=gw.url) as client:
                [entry] = (await client.get("/admin/status", params={"after": 0})).json()["recent"]
            assert await trio.to_thread.run_sync(once) == 0
    assert entry["resumes"] == [{"from": "first/m", "to": "second/m2", "outcome": "resumed",
                                 "detail": "after 15 chars"}]  # fmt: skip
    assert entry["served_by"] == "second/m2"
    out = capsys.readouterr().out
    assert "served by second/m2  (stream resumed: first/m -> second/m2 resumed)" in out


async def test_two_breaks_two_resumes_one_message_and_the_clients_headers_go_along(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """resume.max 2: the first provider breaks, the second continues a word and breaks too, the
    third finishes. One message, every word once; the client's anthropic-beta header reaches
    each continuation; the key is charged each attempt's relayed text once."""
    monkeypatch.setenv("RESUME2_KEY", "sk-resume2-0123456789abcdef0123456789")

    async def one_word_then_cut(exchange: Exchange) -> None:
        prefill = prefill_of(exchange)
        word = ANSWER[len(prefill) :].split(" ")[1]  # the next word
        await exchange.start(200, "text/event-stream")
        start = {"id": "msg_mid", "type": "message", "role": "assistant", "model": "m",
                 "content": [], "stop_reason": None, "stop_sequence": None,
                 "usage": {"input_tokens": 5, "output_tokens": 1}}  # fmt: skip
        block = {"type": "content_block_start", "index": 0,
                 "content_block": {"type": "text", "text": ""}}  # fmt: skip
        delta = {"type": "content_block_delta", "index": 0,
                 "delta": {"type": "text_delta", "text": " " + word}}  # fmt: skip
        await exchange.body_part(_event("message_start", {"type": "message_start",
                                                          "message": start})
                                 + _event("content_block_start", block)
                                 + _event("content_block_delta", delta))  # fmt: skip
        raise Cut

    one, two, three = (FakeUpstream(breaking("cut")), FakeUpstream(one_word_then_cut),
                       FakeUpstream(continues))  # fmt: skip
    routes = [{"match": "gpt", "targets": ["first/m"], "alternatives": ["second/m", "third/m"],
               "resume": {"max": 2}}]  # fmt: skip
    settings = {name: {"dialect": "anthropic"} for name in ("first", "second", "third")}
    auth = {"keys": [{"name": "team", "key_env": "RESUME2_KEY",
                      "budgets": [{"tokens": 100_000, "period": "day"}]}]}  # fmt: skip
    async with live_gateway({"first": one, "second": two, "third": three}, routes, settings,
                            auth=auth) as gw:  # fmt: skip
        sdk = anthropic.AsyncAnthropic(base_url=gw.url, api_key="sk-resume2-0123456789abcdef0123456789",
                                       max_retries=0,
                                       default_headers={"anthropic-beta": "tools-2024-04-04"})  # fmt: skip
        with trio.fail_after(10):
            async with sdk.messages.stream(
                model="gpt", max_tokens=100, messages=[{"role": "user", "content": "say it"}]
            ) as stream:
                kinds = [e.type async for e in stream]
                final = await stream.get_final_message()
            await sdk.close()
            await eventually(lambda: gw.app.gateway.ledger.in_flight == 0)
            async with httpx.AsyncClient(base_url=gw.url) as client:
                [key] = (await client.get("/admin/keys")).json()["keys"]
    assert final.content[0].text == ANSWER
    assert kinds.count("message_start") == 1 and kinds.count("content_block_start") == 1
    assert prefill_of(two.exchanges[0]) == "The quick brown"
    assert prefill_of(three.exchanges[0]) == "The quick brown fox"
    assert [x.headers.get("anthropic-beta") for x in (two.exchanges + three.exchanges)] == [
        "tools-2024-04-04",
        "tools-2024-04-04",
    ]
    # first: input 3 + "The quick brown " / 4; second: input 5 + "fox" / 4 (its lead space is
    # the first's); third: its usage, 20 + 7
    assert key["spent_today"]["tokens"] == (3 + 16 // 4) + (5 + 3 // 4) + (20 + 7)


async def test_a_hedged_route_resumes_too() -> None:
    """The first cascade hedges (its attempts in a nursery of their own); the continuation
    does not, and the stream still reads as one."""
    one, two = FakeUpstream(breaking("cut")), FakeUpstream(continues)
    routes = [{"match": "gpt", "targets": ["first/m"], "alternatives": ["second/m2"],
               "hedge": {"after": "5s"}, "resume": True}]  # fmt: skip
    async with live_gateway({"first": one, "second": two}, routes,
                            providers("openai", "anthropic")) as gw:  # fmt: skip
        body = {"model": "gpt", "stream": True, "messages": [{"role": "user", "content": "x"}]}
        _, data = await _raw_stream(gw, body)
    assert data[-1] == "[DONE]"
    text = "".join(json.loads(d)["choices"][0]["delta"].get("content") or ""
                   for d in data[:-1] if json.loads(d)["choices"])  # fmt: skip
    assert text == ANSWER
    assert len(one.exchanges) == 1 and len(two.exchanges) == 1
