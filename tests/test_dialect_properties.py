"""Property tests of the request boundary: any input either parses or is a clean 400, and the
model swap changes the model value's bytes and nothing else."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from router.dialects.anthropic import parse_messages_request
from router.dialects.jsonbody import event_object
from router.dialects.openai import parse_chat_request
from router.errors import RequestError

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
whitespace = st.sampled_from(["", " ", "\n", "\t", "  \r\n "])


def body_of(fields: list[tuple[str, Any]], at: int, model: str, ws: list[str]) -> bytes:
    """A JSON object of `fields` with `model` inserted at position `at`, spaced with `ws`."""
    named = [*fields[:at], ("model", model), *fields[at:]]
    parts = [f"{ws[0]}{json.dumps(k)}{ws[1]}:{ws[2]}{json.dumps(v)}{ws[3]}" for k, v in named]
    return ("{" + ",".join(parts) + "}").encode()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_parse_or_are_a_clean_400(body: bytes) -> None:
    try:
        parse_chat_request(body)
    except RequestError as exc:
        assert exc.status == 400 and exc.message


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_any_json_parses_or_is_a_clean_400(value: Any) -> None:
    try:
        parse_chat_request(json.dumps(value).encode())
    except RequestError as exc:
        assert exc.status == 400


@settings(max_examples=300, deadline=None)
@given(
    extra=st.dictionaries(
        st.text(max_size=10).filter(lambda k: k != "model"), json_values, max_size=5
    ),
    position=st.integers(min_value=0, max_value=6),
    model=st.text(min_size=1, max_size=20),
    new_model=st.text(min_size=1, max_size=20),
    ws=st.lists(whitespace, min_size=4, max_size=4),
)
def test_model_swap_changes_only_the_model(
    extra: dict[str, Any], position: int, model: str, new_model: str, ws: list[str]
) -> None:
    fields = [(k, v) for k, v in extra.items() if k not in ("messages", "stream", "stream_options")]
    at = min(position, len(fields))
    fields.append(("messages", [{"role": "user", "content": "hi"}]))

    def body_with(value: str) -> bytes:
        return body_of(fields, at, value, ws)

    try:
        request = parse_chat_request(body_with(model))
    except RequestError:
        return  # e.g. a random field that must be an integer is not: refused, fine
    assert request.model == model
    assert request.body_for(new_model) == body_with(new_model)  # every other byte is the client's


@settings(max_examples=200, deadline=None)
@given(
    extra=st.dictionaries(
        st.text(max_size=10).filter(lambda k: k not in ("model", "messages", "max_tokens")),
        json_values,
        max_size=5,
    ),
    position=st.integers(min_value=0, max_value=6),
    model=st.text(min_size=1, max_size=20),
    new_model=st.text(min_size=1, max_size=20),
    ws=st.lists(whitespace, min_size=4, max_size=4),
)
def test_anthropic_model_swap_changes_only_the_model(
    extra: dict[str, Any], position: int, model: str, new_model: str, ws: list[str]
) -> None:
    """The same for the Anthropic dialect: an attempt on an Anthropic provider sends the client's
    bytes (cache_control markers, signed thinking blocks, unknown fields) with only `model` new."""
    fields = list(extra.items())
    at = min(position, len(fields))
    thinking = {"type": "thinking", "thinking": "t", "signature": "EqoBCkgIAR"}
    fields += [
        ("max_tokens", 64),
        (
            "messages",
            [{"role": "assistant", "content": [thinking]}, {"role": "user", "content": "hi"}],
        ),
    ]

    def body_with(value: str) -> bytes:
        return body_of(fields, at, value, ws)

    try:
        request = parse_messages_request(body_with(model))
    except RequestError:
        return  # a random field that must be a boolean or a number is not: refused, fine
    assert request.model == model
    assert request.body_for(new_model) == body_with(new_model)


def _int_as_orjson_reads_it(text: str) -> int | float:
    """The one documented difference (jsonbody.event_object): orjson reads an integer beyond
    64 bits as a float."""
    value = int(text)
    return value if -(2**63) <= value < 2**64 else float(value)


def _loads_object(data: bytes) -> Any:
    try:
        value = json.loads(data.decode(), parse_int=_int_as_orjson_reads_it)
    except (UnicodeDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


@given(
    st.one_of(
        json_values.map(lambda v: json.dumps(v).encode()),
        st.tuples(
            json_values, whitespace, whitespace, st.sampled_from(["", "x", "}", "{}", "1"])
        ).map(lambda t: (t[1] + json.dumps(t[0]) + t[2] + t[3]).encode()),
        st.binary(max_size=24),
    )
)
@example(b'{"": -9223372036854775809}')  # found by hypothesis in CI: one past int64
@example(b'{"n": 18446744073709551616}')  # one past uint64
@settings(max_examples=400)
def test_a_stream_event_is_an_object_exactly_when_json_loads_says_so(data: bytes) -> None:
    """The streams' fast event parse agrees with json.loads on UTF-8 text: trailing bytes after
    the value, other JSON values and bytes that are not UTF-8 are all "not an object"."""
    assert event_object(data) == _loads_object(data)
