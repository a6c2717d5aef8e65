"""The SSE decoder and the OpenAI dialect: validation, byte-exact model swap, stream filtering."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.sse import SSEDecoder, SSEEvent
from router.dialects.openai import StreamFilter, frame, parse_chat_request
from router.errors import RequestError


def feed_all(pieces: list[bytes]) -> list[SSEEvent]:
    decoder = SSEDecoder()
    events = []
    for piece in pieces:
        events += decoder.feed(piece)
    return events + decoder.finish()


def test_sse_events_split_anywhere() -> None:
    body = b'data: {"a":1}\n\ndata: {"b":2}\n\n: keep-alive\n\nevent: ping\ndata: x\ndata: y\n\n'
    expected = [SSEEvent(b'{"a":1}'), SSEEvent(b'{"b":2}'), SSEEvent(b"x\ny", b"ping")]
    for size in (1, 2, 3, 7, len(body)):
        pieces = [body[i : i + size] for i in range(0, len(body), size)]
        assert feed_all(pieces) == expected


def test_sse_crlf_split_across_chunks_and_missing_final_blank_line() -> None:
    assert feed_all([b"data: a\r", b"\n\r\n", b"data: b\r\ndata:c"]) == [
        SSEEvent(b"a"),
        SSEEvent(b"b\nc"),
    ]


def test_frame_round_trips_multiline_data() -> None:
    events = [SSEEvent(b"one"), SSEEvent(b"two\nlines")]
    assert feed_all([frame(events)]) == events


def test_model_swap_preserves_every_other_byte() -> None:
    body = b'{ "zeta": 1,\n  "model" :  "gpt-4o",  "messages":[{"role":"user","content":"h\\u00e9 \xe2\x82\xac"}],"x-unknown":{"k":[1,2]} }'
    request = parse_chat_request(body)
    swapped = request.body_for("other-model")
    assert swapped == body.replace(b'"gpt-4o"', b'"other-model"')
    assert json.loads(swapped)["model"] == "other-model"


def test_model_swap_uses_the_last_duplicate_key_like_json() -> None:
    request = parse_chat_request(b'{"model":"a","messages":[{"role":"user"}],"model":"b"}')
    assert request.model == "b"
    assert request.body_for("c") == b'{"model":"a","messages":[{"role":"user"}],"model":"c"}'


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"not json", None),
        (b"[1, 2]", None),
        (b'{"model": "m", "messages": []', None),
        (b'{"model": "m", "messages": [{"role":"user"}]} trailing', None),
        (b"\xff\xfe", None),
        (b'{"messages": [{"role": "user"}]}', "model"),
        (b'{"model": 5, "messages": [{"role": "user"}]}', "model"),
        (b'{"model": "m"}', "messages"),
        (b'{"model": "m", "messages": "hi"}', "messages"),
        (b'{"model": "m", "messages": [{"content": "no role"}]}', "messages[0]"),
        (b'{"model": "m", "messages": [{"role": "user"}], "stream": "yes"}', "stream"),
        (b'{"model": "m", "messages": [{"role": "user"}], "max_tokens": "10"}', "max_tokens"),
        (b'{"model": "m", "messages": [{"role": "user"}], "max_tokens": true}', "max_tokens"),
        (b'{"model": "m", "messages": [{"role": "user"}], "temperature": "hot"}', "temperature"),
        (b'{"model": "m", "messages": [{"role": "user"}], "temperature": NaN}', None),
        (b'{"model": "m", "messages": [{"role": "user"}], "temperature": 1e999}', "temperature"),
        (b'{"model": "m", "messages": [{"role": "user"}], "max_tokens": -1}', "max_tokens"),
        (b'{"model": "m", "messages": [{"role": "user"}], "max_tokens": 0}', "max_tokens"),
        (
            b'{"model": "m", "messages": [{"role": "user"}], "max_tokens": 1000000000000000}',
            "max_tokens",
        ),
        (b'{"model": "m", "messages": [{"role": "user"}], "max_tokens": -1e15}', "max_tokens"),
        (b'{"model": "m", "messages": [{"role": "user"}], "n": 0}', "n"),
        (b'{"model": "p/x\\r\\nx-evil: 1", "messages": [{"role": "user"}]}', "model"),
        (b'{"model": "p/\\ud800", "messages": [{"role": "user"}]}', "model"),
        (b'{"model": "' + b"m" * 300 + b'", "messages": [{"role": "user"}]}', "model"),
        (
            b'{"model": "m", "messages": [{"role": "user"}], "x": '
            + b"[" * 100_000
            + b"]" * 100_000
            + b"}",
            None,
        ),
        (
            b'{"model": "m", "messages": [{"role": "user"}], "stream_options": {"include_usage": true}}',
            "stream_options",
        ),
    ],
)
def test_bad_requests(body: bytes, param: str | None) -> None:
    with pytest.raises(RequestError) as info:
        parse_chat_request(body)
    assert info.value.status == 400
    assert info.value.param == param


def test_stream_options_are_read() -> None:
    request = parse_chat_request(
        b'{"model":"m","messages":[{"role":"user"}],"stream":true,"stream_options":{"include_usage":true},"temperature":0.5}'
    )
    assert (request.stream, request.include_usage) == (True, True)


def test_stream_filter_drops_garbage_and_stops_at_done_or_error() -> None:
    f = StreamFilter()
    good, error = f.check(
        (SSEEvent(b'{"a":1}'), SSEEvent(b"garbage{"), SSEEvent(b"[1]"), SSEEvent(b'{"b":2}'))
    )
    assert [e.data for e in good] == [b'{"a":1}', b'{"b":2}'] and error is None
    assert f.dropped == 2
    good, error = f.check(
        (
            SSEEvent(b'{"c":3}'),
            SSEEvent(b'{"error":{"message":"overloaded"}}'),
            SSEEvent(b'{"d":4}'),
        )
    )
    assert [e.data for e in good] == [b'{"c":3}'] and error == {"message": "overloaded"}
    good, error = StreamFilter().check(
        (SSEEvent(b'{"e":5}'), SSEEvent(b"[DONE]"), SSEEvent(b'{"f":6}'))
    )
    assert [e.data for e in good] == [b'{"e":5}']


def reference_events(body: bytes) -> list[SSEEvent]:
    """The WHATWG event-stream algorithm, line by line, on the whole body at once."""
    events, data, event = [], [], None
    lines = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    for line in lines[:-1]:  # what follows the last line end is not a line
        if not line:
            if data:
                events.append(SSEEvent(b"\n".join(data), event))
            data, event = [], None
            continue
        name, colon, value = line.partition(b":")
        value = value[1:] if value.startswith(b" ") else value
        if name == b"data":
            data.append(value)
        elif name == b"event" and colon:
            event = value
    return events


_LINES = st.sampled_from([
    b'data: {"a":1}', b"data:x", b"data: ", b"data", b"event: ping", b"event:e", b": comment",
    b"id: 7", b"retry: 10", b"", b"", b"", b"data: two words", b"data:  spaced",
])  # fmt: skip
_ENDS = st.sampled_from([b"\n", b"\n", b"\n", b"\r\n", b"\r"])


@given(st.lists(st.tuples(_LINES, _ENDS), max_size=40), st.lists(st.integers(1, 30), max_size=40))
@settings(max_examples=400, deadline=None)
def test_sse_decoding_matches_the_line_algorithm_however_it_is_split(
    lines: list[tuple[bytes, bytes]], cuts: list[int]
) -> None:
    """The decoder's fast path (whole `data:` blocks) and its line parser agree with the plain
    algorithm on any stream, cut anywhere."""
    body = b"".join(line + end for line, end in lines) + b"\n\n"
    pieces, at = [], 0
    for cut in cuts:
        pieces.append(body[at : at + cut])
        at += cut
    pieces.append(body[at:])
    assert feed_all(pieces) == reference_events(body)


def test_a_long_event_arriving_in_pieces_is_parsed_as_it_comes() -> None:
    """An incomplete event over 64 KiB is not kept whole to be split again at each read: its
    complete lines are parsed, and what is kept stays small."""
    big, tail = b"x" * 70_000, b"y" * 10_000
    body = b"data: " + big + b"\ndata: " + tail + b"\n\ndata: next\n\n"
    decoder, events = SSEDecoder(), []
    for i in range(0, len(body), 4096):
        events += decoder.feed(body[i : i + 4096])
        assert len(decoder._buffer) <= (1 << 16) + 4096
    assert events == [SSEEvent(big + b"\n" + tail), SSEEvent(b"next")]
    assert not decoder._buffer
