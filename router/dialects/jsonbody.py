"""What every JSON dialect needs at its boundary: a strict parse of the client's body that keeps
each top-level value's position (for the byte-exact model swap), and the common field checks.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any

import orjson

from router.errors import RequestError

_WS = re.compile(r"[ \t\n\r]*")


def _skip_ws(text: str, i: int) -> int:
    """The first offset at or after `i` that is not JSON whitespace."""
    m = _WS.match(text, i)
    assert m is not None  # the pattern matches the empty string
    return m.end()


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


# Python's JSON reader takes NaN and Infinity; JSON, and every provider, does not.
_DECODER = json.JSONDecoder(parse_constant=_no_constant)
MAX_MODEL_NAME = 256
MAX_OUTPUT_TOKENS = 1_000_000  # above any model's output limit; bounds the tpm estimate
_scanstring = json.decoder.scanstring  # type: ignore[attr-defined]


_EVENT_DECODER = json.JSONDecoder()


def content_counter(*keys: str) -> re.Pattern[bytes]:
    """A pattern for the string values of these keys in an event's JSON (escapes included)."""
    names = "|".join(re.escape(k) for k in keys)
    return re.compile(rb'"(?:' + names.encode() + rb')"\s*:\s*"((?:[^"\\]|\\.)*)"')


def count_content(pattern: re.Pattern[bytes], events: Sequence[Any]) -> int:
    return sum(len(m) for event in events for m in pattern.findall(event.data))


def dumps(obj: Any) -> bytes:
    """An event's JSON for the client: orjson (compact, UTF-8), or `json` for what orjson will
    not write (an integer over 64 bits read by `json` from an upstream's event)."""
    try:
        return orjson.dumps(obj)
    except TypeError:
        return json.dumps(obj).encode()


def event_object(data: bytes) -> dict[str, Any] | None:
    """A stream event's data as a JSON object; None when it is not one (malformed, or another
    JSON value). Streams parse every event: orjson first (a small event in about half the
    time); what it refuses goes to the standard library's parser, which decides, so what is
    accepted is what `json` accepts (NaN, lone surrogates). One difference: an integer over 64
    bits is read as a float (no provider's event field holds one)."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return _event_object(data)
    return obj if isinstance(obj, dict) else None


def _event_object(data: bytes) -> dict[str, Any] | None:
    """`json.loads` without its per-call layers (encoding detection, the wrapper calls)."""
    try:
        text = data.decode()
        obj, end = _EVENT_DECODER.raw_decode(text, _skip_ws(text, 0))
    except (UnicodeDecodeError, ValueError):  # JSONDecodeError is a ValueError
        return None
    if not isinstance(obj, dict) or (end != len(text) and _skip_ws(text, end) != len(text)):
        return None
    return obj


def _top_level(text: str) -> tuple[dict[str, Any], dict[str, tuple[int, int]]]:
    """Parse a JSON object, also returning each top-level value's (start, end) offsets."""
    ws = _skip_ws
    i = ws(text, 0)
    if text[i : i + 1] != "{":
        raise ValueError("the body must be a JSON object")
    i = ws(text, i + 1)
    obj: dict[str, Any] = {}
    spans: dict[str, tuple[int, int]] = {}
    if text[i : i + 1] == "}":
        i += 1
    else:
        while True:
            if text[i : i + 1] != '"':
                raise ValueError(f"expected a key at offset {i}")
            key, i = _scanstring(text, i + 1)
            i = ws(text, i)
            if text[i : i + 1] != ":":
                raise ValueError(f"expected ':' at offset {i}")
            start = ws(text, i + 1)
            value, end = _DECODER.raw_decode(text, start)
            obj[key] = value
            spans[key] = (start, end)  # a repeated key: the last one wins, as in json.loads
            i = ws(text, end)
            sep = text[i : i + 1]
            i = ws(text, i + 1)
            if sep == "}":
                break
            if sep != ",":
                raise ValueError(f"expected ',' or '}}' at offset {i}")
    if ws(text, i) != len(text):
        raise ValueError("extra data after the JSON object")
    return obj, spans


def parse_object(body: bytes) -> tuple[str, dict[str, Any], dict[str, tuple[int, int]]]:
    """(text, object, top-level spans) of a JSON object body; RequestError when it is not one."""
    try:
        text = body.decode("utf-8")
        obj, spans = _top_level(text)
    except UnicodeDecodeError:
        raise RequestError("the body is not UTF-8 text") from None
    except ValueError as exc:
        raise RequestError(f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise RequestError("the body is not valid JSON: nested too deeply") from None
    return text, obj, spans


def swap(text: str, span: tuple[int, int], value: str) -> bytes:
    """`text` with the JSON value at `span` replaced by the string `value`."""
    start, end = span
    return (text[:start] + json.dumps(value) + text[end:]).encode()


def required_model(obj: dict[str, Any]) -> str:
    model = obj.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError("'model' is required and must be a non-empty string", param="model")
    check_model_name(model)
    return model


def check_model_name(model: str) -> None:
    """A model name goes into upstream bodies, logs and headers: printable text only (no control
    characters, no lone surrogates), of a sane length. Anything else is a 400, never sent on."""
    if len(model) > MAX_MODEL_NAME or not model.isprintable():
        raise RequestError(
            f"'model' must be printable text of at most {MAX_MODEL_NAME} characters",
            param="model",
        )


def optional(obj: dict[str, Any], key: str, kinds: tuple[type, ...], what: str) -> None:
    value = obj.get(key)
    if value is not None and (
        isinstance(value, bool) != (bool in kinds) or not isinstance(value, kinds)
    ):
        raise RequestError(f"'{key}' must be {what}", param=key)


def bounded_int(obj: dict[str, Any], key: str, top: int) -> None:
    """An optional integer from 1 to `top`."""
    optional(obj, key, (int,), "an integer")
    if obj.get(key) is not None and not 1 <= obj[key] <= top:
        raise RequestError(f"'{key}' must be from 1 to {top}", param=key)


def finite_number(obj: dict[str, Any], key: str) -> None:
    optional(obj, key, (int, float), "a number")
    if obj.get(key) is not None and not math.isfinite(obj[key]):
        raise RequestError(f"'{key}' must be a finite number", param=key)


# --- checked reads of a request's nested values (translation reads deeper than a parse checks) --


def want_object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise RequestError(f"'{where}' must be an object", param=where)
    return value


def want_list(value: Any, where: str) -> list[Any]:
    """A list; an absent (None) one is empty."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise RequestError(f"'{where}' must be a list", param=where)
    return value


def want_string(value: Any, where: str, default: str = "") -> str:
    """A string; an absent (None) one is `default`."""
    if value is None:
        return default
    if not isinstance(value, str):
        raise RequestError(f"'{where}' must be a string", param=where)
    return value


def string_list(obj: dict[str, Any], key: str) -> None:
    """An optional list of strings."""
    value = obj.get(key)
    if value is not None and (
        not isinstance(value, list) or not all(isinstance(v, str) for v in value)
    ):
        raise RequestError(f"'{key}' must be a list of strings", param=key)
