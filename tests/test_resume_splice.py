"""The pieces of a resume, alone (router/dialects/resume.py): what a transcript keeps of the
events a client was sent, and how a continuation's events are spliced after them."""

from __future__ import annotations

import json
from typing import Any

from actors.sse import SSEEvent
from router.dialects.resume import (
    ChatTranscript,
    MessagesTranscript,
    prefill_for,
    split_prefill,
)

TRICKY = 'He said "hi"\nthen: caf\u00e9 \\ done '  # quotes, a newline, non-ASCII, a backslash


def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> SSEEvent:
    body = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 5, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}  # fmt: skip
    return SSEEvent(json.dumps(body, ensure_ascii=True).encode())


def anthropic(kind: str, named: bool = True, **data: Any) -> SSEEvent:
    return SSEEvent(json.dumps({"type": kind, **data}).encode(), kind.encode() if named else None)


def test_a_chat_transcript_keeps_the_text_exactly_and_the_first_chunks_head() -> None:
    t = ChatTranscript()
    halves = [TRICKY[:9], TRICKY[9:]]
    t.observe([chunk({"role": "assistant", "content": "", "refusal": None})])
    t.observe([chunk({"content": h, "reasoning_content": ""}) for h in halves])
    assert t.text == TRICKY
    assert t.why_not is None  # a null refusal and an empty reasoning_content are not content
    assert t.head == {"id": "chatcmpl-1", "created": 5, "model": "m"}


def test_what_makes_a_chat_answer_one_that_cannot_be_continued() -> None:
    call = {"index": 0, "id": "c", "type": "function", "function": {"name": "f", "arguments": ""}}
    cases = {
        "a tool call had begun": chunk({"tool_calls": [call]}),
        "the answer had reasoning or a refusal": chunk({"reasoning_content": "hmm"}),
        "the answer was complete": chunk({}, "stop"),
    }
    for why, event in cases.items():
        t = ChatTranscript()
        t.observe([chunk({"content": "Hi"}), event])
        assert t.why_not == why


def test_a_messages_transcript_with_and_without_event_names() -> None:
    for named in (True, False):
        t = MessagesTranscript()
        t.observe([
            anthropic("message_start", named, message={"id": "msg_1", "content": []}),
            anthropic("content_block_start", named, index=0,
                      content_block={"type": "text", "text": ""}),
            anthropic("content_block_delta", named, index=0,
                      delta={"type": "text_delta", "text": TRICKY}),
        ])  # fmt: skip
        assert (t.text, t.blocks, t.open, t.why_not) == (TRICKY, 1, True, None)
        t.observe([anthropic("content_block_delta", named, index=0,
                             delta={"type": "thinking_delta", "thinking": "x"})])  # fmt: skip
        assert t.why_not == "a thinking_delta had begun"


def test_a_messages_splice_continues_the_open_block_and_numbers_later_ones_after_it() -> None:
    t = MessagesTranscript()
    t.observe([anthropic("content_block_start", index=0, content_block={"type": "text", "text": ""}),
               anthropic("content_block_delta", index=0,
                         delta={"type": "text_delta", "text": "Hello "})])  # fmt: skip
    text, lead = split_prefill(t.text)
    assert (text, lead) == ("Hello", " ")
    splice = t.splice(lead)
    out = splice.adapt([
        anthropic("message_start", message={"id": "msg_2"}),
        anthropic("content_block_start", index=0, content_block={"type": "text", "text": ""}),
        anthropic("ping"),
        anthropic("content_block_delta", index=0, delta={"type": "text_delta", "text": " world"}),
        anthropic("content_block_stop", index=0),
        anthropic("content_block_start", index=1,
                  content_block={"type": "tool_use", "id": "t", "name": "f", "input": {}}),
        anthropic("content_block_stop", index=1),
        anthropic("message_delta", delta={"stop_reason": "tool_use"}, usage={"output_tokens": 9}),
        anthropic("message_stop"),
    ])  # fmt: skip
    seen = [(e.event, json.loads(e.data)) for e in out]
    assert [k for k, _ in seen] == [b"content_block_delta", b"content_block_stop",
                                    b"content_block_start", b"content_block_stop",
                                    b"message_delta", b"message_stop"]  # fmt: skip
    assert seen[0][1]["index"] == 0 and seen[0][1]["delta"]["text"] == "world"  # no second space
    assert [d.get("index") for _, d in seen[1:4]] == [0, 1, 1]
    assert seen[4][1]["usage"]["output_tokens"] == 9 + len("Hello ") // 4


def test_a_chat_splice_keeps_the_first_id_and_drops_the_second_opening() -> None:
    t = ChatTranscript()
    t.observe([chunk({"role": "assistant", "content": "Hello "})])
    splice = t.splice(split_prefill(t.text)[1])
    second = {"id": "chatcmpl-2", "created": 9, "model": "other"}
    out = splice.adapt([
        chunk({"role": "assistant", "content": ""}, **second),
        chunk({"content": " world"}, **second),
        chunk({}, "stop", **second),
        SSEEvent(json.dumps({**second, "choices": [], "usage": {
            "prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}).encode()),
        SSEEvent(b"[DONE]"),
    ])  # fmt: skip
    chunks = [json.loads(e.data) for e in out[:-1]]
    assert out[-1].data == b"[DONE]"
    assert {(c["id"], c["created"], c["model"]) for c in chunks} == {("chatcmpl-1", 5, "m")}
    assert chunks[0]["choices"][0]["delta"] == {"content": "world"}
    assert chunks[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


def test_the_openai_prefill_modes() -> None:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "q"},
                                                  {"role": "assistant", "content": "a"}]}).encode()  # fmt: skip
    assert prefill_for("trailing", body) == body
    assert json.loads(prefill_for("prefix", body))["messages"][-1]["prefix"] is True
    vllm = json.loads(prefill_for("continue_final_message", body))
    assert (vllm["continue_final_message"], vllm["add_generation_prompt"]) == (True, False)


def test_a_prefilled_messages_request_goes_without_thinking() -> None:
    """Anthropic refuses a prefilled assistant turn with thinking on: the continuation of an
    answer that had no thinking is asked without it."""
    from router.dialects.anthropic import DIALECT as MESSAGES
    from router.dialects.resume import prefilled

    body = {"model": "m", "max_tokens": 100, "stream": True,
            "thinking": {"type": "enabled", "budget_tokens": 1024},
            "messages": [{"role": "user", "content": "say it"}]}  # fmt: skip
    again = prefilled(MESSAGES, MESSAGES.parse(json.dumps(body).encode()), "The quick")
    assert "thinking" not in again.obj
    assert again.obj["messages"][-1] == {
        "role": "assistant",
        "content": [{"type": "text", "text": "The quick"}],
    }
