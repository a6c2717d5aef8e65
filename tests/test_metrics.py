"""What /metrics says after a scripted failover: every series operators look for first, with
its type and labels, label values from the config only."""

from __future__ import annotations

import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import Upstream, asgi_client, chat, config, gateway, ok, status


async def test_metrics_after_a_429_on_the_primary_and_an_alternative_serving(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a = Upstream(status(429, headers={"retry-after": "30"}))
    b = Upstream(ok("from b"))
    routes = [{"match": "gpt", "targets": ["a/m"], "alternatives": ["b/m-alt"]}]
    async with gateway(config(["a", "b"], routes), {"a": a, "b": b}) as gw:
        async with asgi_client(gw) as client:
            r = await client.post("/v1/chat/completions", json=chat())
            assert r.headers["x-cascade-provider"] == "b"
            direct = await client.post("/v1/chat/completions", json=chat("a/invented-by-a-client"))
            assert direct.status_code == 429  # (blocks are per model: this one was called)
            text = (await client.get("/metrics")).text
    families = {f.name: f for f in text_string_to_metric_families(text)}

    def samples(name: str) -> dict[tuple[tuple[str, str], ...], float]:
        return {tuple(sorted(s.labels.items())): s.value for s in families[name].samples
                if s.name == name + "_total" or s.name == name}  # fmt: skip

    assert families["cascade_rate_limits"].type == "counter"
    assert samples("cascade_rate_limits") == {
        (("model", "m"), ("provider", "a")): 1.0,
        (("model", "*"), ("provider", "a")): 1.0,  # a direct address: never the client's model
    }
    assert families["cascade_alternatives_used"].type == "counter"
    assert samples("cascade_alternatives_used") == {
        (("alternative_provider", "b"), ("model", "m-alt"), ("primary_provider", "a")): 1.0
    }
    blocks = families["cascade_block_seconds"]
    assert blocks.type == "histogram"
    sums = {
        tuple(sorted(s.labels.items())): s.value for s in blocks.samples if s.name.endswith("_sum")
    }
    assert sums == {(("provider", "a"), ("reason", "rate_limited")): 60.0}  # two 30 s blocks
    overhead = families["cascade_gateway_overhead_seconds"]
    assert overhead.type == "histogram"
    counts = [s.value for s in overhead.samples if s.name.endswith("_count")]
    assert counts == [1.0]  # the one answered request; refusals and errors are not answers
    requests = samples("cascade_requests")
    assert requests == {
        (("dialect", "openai"), ("route", "gpt"), ("status", "200")): 1.0,
        (
            ("dialect", "openai"),
            ("route", "a/*"),
            ("status", "429"),
        ): 1.0,  # never the client's model
    }
    assert "invented-by-a-client" not in text
