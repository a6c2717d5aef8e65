"""Upstream calls through a forward proxy: a provider's `proxy`, or HTTP(S)_PROXY / NO_PROXY.

The proxy is a small real one on 127.0.0.1:0: absolute-form requests for http:// origins and
CONNECT tunnels for https:// ones, each recorded, so the tests see what reached it.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from actors.transport import proxy_for
from router.config import Config, ConfigError
from router.web.server import serve_asgi
from tests.helpers import chat, tls_files
from tests.live import FakeUpstream, answers, live_gateway


class Proxy:
    def __init__(self) -> None:
        self.seen: list[tuple[bytes, bytes | None]] = []  # (request line, proxy-authorization)
        self.port = 0

    async def handle(self, client: trio.SocketStream) -> None:
        async with client:
            head = b""
            while b"\r\n\r\n" not in head:
                data = await client.receive_some(65536)
                if not data:
                    return
                head += data
            head, _, rest = head.partition(b"\r\n\r\n")
            line, *fields = head.split(b"\r\n")
            auth = next(
                (v.strip() for k, _, v in (f.partition(b":") for f in fields)
                 if k.lower() == b"proxy-authorization"),
                None,
            )  # fmt: skip
            self.seen.append((line, auth))
            method, target, _ = line.split(b" ")
            if method == b"CONNECT":
                host, _, port = target.rpartition(b":")
                upstream = await trio.open_tcp_stream(host.decode(), int(port))
                await client.send_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:  # absolute form: forward the request (head rewritten to origin form) as it is
                url = httpx.URL(target.decode())
                upstream = await trio.open_tcp_stream(url.host, url.port or 80)
                kept = [f for f in fields if not f.lower().startswith(b"proxy-authorization")]
                origin_line = b"%s %s HTTP/1.1" % (method, url.raw_path)
                await upstream.send_all(b"\r\n".join([origin_line, *kept]) + b"\r\n\r\n" + rest)
            async with upstream, trio.open_nursery() as nursery:
                nursery.start_soon(_pipe, client, upstream, nursery.cancel_scope)
                await _pipe(upstream, client, nursery.cancel_scope)


async def _pipe(src: trio.SocketStream, dst: trio.SocketStream, done: trio.CancelScope) -> None:
    try:
        while data := await src.receive_some(65536):
            await dst.send_all(data)
    except trio.BrokenResourceError:
        pass
    done.cancel()


@asynccontextmanager
async def proxy_server() -> AsyncIterator[Proxy]:
    proxy = Proxy()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, proxy.handle, 0, host="127.0.0.1"))
        proxy.port = listeners[0].socket.getsockname()[1]
        yield proxy
        nursery.cancel_scope.cancel()


async def ask(gw: Any) -> httpx.Response:
    async with httpx.AsyncClient(base_url=gw.url) as client:
        return await client.post("/v1/chat/completions", json=chat())


async def test_a_provider_proxy_carries_plain_http_in_absolute_form() -> None:
    upstream = FakeUpstream(answers)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery, proxy_server() as proxy:
            url = await nursery.start(serve_asgi, upstream, "127.0.0.1", 0)
            provider = {
                "base_url": url + "/v1",
                "proxy": f"http://u%40x:p%3Ass@127.0.0.1:{proxy.port}",
            }
            async with live_gateway({}, extra_providers={"p": provider},
                                    routes=[{"match": "gpt", "targets": ["p/m"]}]) as gw:  # fmt: skip
                r = await ask(gw)
            nursery.cancel_scope.cancel()
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "answer from m"
    [(line, auth)] = proxy.seen
    assert line == f"POST {url}/v1/chat/completions HTTP/1.1".encode()
    assert auth == b"Basic " + base64.b64encode(b"u@x:p:ss")  # percent-decoded credentials
    assert "proxy-authorization" not in upstream.exchanges[0].headers  # for the proxy only


async def test_https_goes_through_a_connect_tunnel_from_https_proxy_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    certfile, keyfile, ca_file = tls_files(tmp_path, "127.0.0.1")
    upstream = FakeUpstream(answers)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery, proxy_server() as proxy:
            url = await nursery.start(
                partial(serve_asgi, upstream, "127.0.0.1", 0, tls=(str(certfile), str(keyfile)))
            )
            monkeypatch.setenv("HTTPS_PROXY", f"127.0.0.1:{proxy.port}")  # no scheme: http://
            monkeypatch.delenv("NO_PROXY", raising=False)
            monkeypatch.delenv("no_proxy", raising=False)
            provider = {"base_url": url + "/v1", "ca_file": str(ca_file)}
            async with live_gateway({}, extra_providers={"p": provider},
                                    routes=[{"match": "gpt", "targets": ["p/m"]}]) as gw:  # fmt: skip
                r = await ask(gw)
                r2 = await ask(gw)  # the tunnelled connection is kept alive and reused
            nursery.cancel_scope.cancel()
    assert r.status_code == r2.status_code == 200
    port = url.rsplit(":", 1)[1]
    assert proxy.seen == [(f"CONNECT 127.0.0.1:{port} HTTP/1.1".encode(), None)]
    assert len(upstream.exchanges) == 2


def test_proxy_choice_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        for variant in (name, name.lower()):
            monkeypatch.delenv(variant, raising=False)
    assert proxy_for("https://api.openai.com/v1", None) is None
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.corp:3128")
    monkeypatch.setenv("HTTP_PROXY", "http://plain.corp:8080")
    assert proxy_for("https://api.openai.com/v1", None) == httpx.URL("http://proxy.corp:3128")
    assert proxy_for("http://10.1.2.3:8000/v1", None) == httpx.URL("http://plain.corp:8080")
    monkeypatch.setenv("NO_PROXY", "internal.corp,.example.com")
    assert proxy_for("https://llm.internal.corp/v1", None) is None
    assert proxy_for("https://api.example.com/v1", None) is None
    assert proxy_for("https://api.openai.com/v1", None) is not None
    assert proxy_for("https://api.openai.com/v1", "none") is None  # the provider opts out
    assert proxy_for("https://x/v1", "http://own:1") == httpx.URL("http://own:1")


def test_proxy_config_is_validated_without_showing_it() -> None:
    def problems(**provider: Any) -> list[str]:
        raw = {"providers": {"p": provider}, "routes": [{"match": "m", "targets": ["p/m"]}]}
        with pytest.raises(ConfigError) as info:
            Config.from_mapping(raw)
        return info.value.problems

    assert problems(base_url="https://a/v1", proxy="socks5://u:secret@h:1") == [
        'providers.p.proxy: expected "none" or an http:// proxy URL (http://host:port)'
    ]
    assert problems(mock={}, proxy="http://h:1") == [
        "providers.p.proxy: a mock provider is on this machine: it takes no proxy"
    ]
    mock = Config.from_mapping(
        {"providers": {"p": {"mock": {}}}, "routes": [{"match": "m", "targets": ["p/m"]}]}
    )
    assert mock.providers["p"].proxy == "none"  # a mock on loopback never goes through one
