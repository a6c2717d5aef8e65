"""HTTPS upstreams: the pool verifies certificates (system store, or a provider's ca_file)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import httpx
import trio

from router.web.server import serve_asgi
from tests.helpers import chat, tls_files
from tests.live import FakeUpstream, answers, live_gateway


async def test_https_upstream_is_verified(tmp_path: Path) -> None:
    certfile, keyfile, ca_file = tls_files(tmp_path, "127.0.0.1", "localhost")
    upstream = FakeUpstream(answers)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            url = await nursery.start(
                partial(serve_asgi, upstream, "127.0.0.1", 0, tls=(str(certfile), str(keyfile)))
            )
            assert url.startswith("https://")
            providers = {
                # The same server, once without and once with the CA that signed its certificate.
                "untrusting": {"base_url": url + "/v1", "max_retries": 0},
                "trusting": {"base_url": url + "/v1", "ca_file": str(ca_file)},
            }
            async with (
                live_gateway(
                    {},
                    routes=[{"match": "gpt", "targets": ["untrusting/m", "trusting/m"]}],
                    extra_providers=providers,
                ) as gw,
                httpx.AsyncClient(base_url=gw.url) as client,
            ):
                r = await client.post("/v1/chat/completions", json=chat())
            nursery.cancel_scope.cancel()
    assert r.status_code == 200 and r.headers["x-cascade-provider"] == "trusting"
    assert r.headers["x-cascade-attempts"] == "2"
    assert len(upstream.exchanges) == 1  # the unverified connection never sent the request
