"""`cascade loadtest`: its maths, its pacing (virtual time), its report, and a real run."""

from __future__ import annotations

import io
import math

import httpx
import pytest
import trio
import trio.testing

from router.cli import main
from router.tools.loadtest import (
    LoadSpec,
    Sample,
    api_root,
    format_summary,
    percentile,
    run_load,
    summarize,
)
from tests.helpers import Upstream, ok, stall, status
from tests.live import FakeUpstream, answers, live_gateway

URL = "http://target.test/v1"


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 50, 5),
        ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 90, 9),
        ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 99, 10),
        ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 100, 10),
        ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 0, 1),
        ([7], 99, 7),
        (list(range(1, 1001)), 99, 990),
        (list(range(1, 1001)), 99.9, 999),
    ],
)
def test_percentile_is_nearest_rank(values: list[float], q: float, expected: float) -> None:
    assert percentile(values, q) == expected


def test_percentile_of_nothing_is_nan() -> None:
    assert math.isnan(percentile([], 50))


@pytest.mark.parametrize(
    ("given", "root"),
    [
        ("http://h:8080", "http://h:8080/v1"),
        ("http://h:8080/", "http://h:8080/v1"),
        ("http://h:8080/v1", "http://h:8080/v1"),
        ("http://h:8080/v1/chat/completions", "http://h:8080/v1"),
    ],
)
def test_api_root(given: str, root: str) -> None:
    assert api_root(given) == root


@pytest.mark.parametrize("given", ["localhost:8080", "127.0.0.1:8080/v1", "ftp://h/v1", "http://"])
def test_api_root_needs_an_http_url(given: str) -> None:
    with pytest.raises(ValueError, match="expected an http"):
        api_root(given)


def test_the_report_never_compares_samples(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building the report was quadratic (each sample looked up in the list of successes):
    40k samples took 53 s. It must not compare samples with each other at all."""

    def no_comparisons(self: object, other: object) -> bool:
        raise AssertionError("samples compared")

    samples = [Sample(0.01 * (i % 7), None, 200 if i % 3 else 500, "p") for i in range(3000)]
    monkeypatch.setattr(Sample, "__eq__", no_comparisons)
    report = summarize(LoadSpec(URL), samples, wall=1.0, cpu=0.1)
    assert (report["ok"], report["errors"]) == (2000, {"500": 1000})


def test_a_run_where_every_request_failed_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    # Port 1 on loopback: nothing listens, every connection is refused at once.
    assert main(["loadtest", "http://127.0.0.1:1", "-n", "3", "-c", "1", "-q"]) == 1
    assert "0 ok" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="expected an http"):
        main(["loadtest", "127.0.0.1:1", "-n", "1"])


async def test_open_loop_starts_requests_on_schedule(
    autojump_clock: trio.testing.MockClock,
) -> None:
    upstream = Upstream(ok(delay=0.25))
    start = trio.current_time()
    report = await run_load(
        LoadSpec(URL, rate=10, duration=1.0), http_transport=upstream.transport()
    )
    assert [round(t - start, 9) for t in upstream.times] == [round(i / 10, 9) for i in range(10)]
    assert report["requests"] == report["ok"] == 10
    assert report["latency_ms"]["p50"] == report["latency_ms"]["max"] == 250.0


async def test_closed_loop_keeps_concurrency_clients_busy(
    autojump_clock: trio.testing.MockClock,
) -> None:
    upstream = Upstream(ok(delay=1.0))
    start = trio.current_time()
    report = await run_load(
        LoadSpec(URL, concurrency=2, requests=6, duration=None), http_transport=upstream.transport()
    )
    assert trio.current_time() - start == 3.0
    assert sorted(round(t - start, 9) for t in upstream.times) == [0, 0, 1, 1, 2, 2]
    assert report["rps"] == 2.0


async def test_report_schema_errors_and_providers(autojump_clock: trio.testing.MockClock) -> None:
    async def served_by_p(request: httpx.Request) -> httpx.Response:
        body = b'data: {"choices": []}\n\ndata: [DONE]\n\n'
        return httpx.Response(200, content=body, headers={"x-cascade-provider": "p"})

    upstream = Upstream(served_by_p, status(502), served_by_p, status(429))
    report = await run_load(
        LoadSpec(URL, concurrency=1, requests=4, duration=None, stream=True),
        http_transport=upstream.transport(),
    )
    assert set(report) == {
        "target", "mode", "concurrency", "rate", "stream", "duration_s", "requests", "ok", "dropped",
        "rps", "latency_ms", "ttft_ms", "errors", "providers", "client_cpu", "client_saturated",
    }  # fmt: skip
    assert (report["mode"], report["concurrency"], report["rate"]) == ("closed", 1, None)
    assert report["errors"] == {"429": 1, "502": 1}
    assert report["providers"] == {"p": 2}
    assert set(report["latency_ms"]) == {"p50", "p90", "p99", "max", "mean"}
    assert report["ttft_ms"] is not None
    assert isinstance(report["client_cpu"], float)
    assert "errors     429: 1, 502: 1" in format_summary(report)


async def test_saturated_client_is_reported(autojump_clock: trio.testing.MockClock) -> None:
    cpu = iter([0.0, 0.95])
    report = await run_load(
        LoadSpec(URL, concurrency=1, duration=1.0),
        http_transport=Upstream(ok(delay=0.5)).transport(),
        cpu_clock=lambda: next(cpu),
    )
    assert report["client_cpu"] == 0.95 and report["client_saturated"] is True
    assert "WARNING" in format_summary(report)


async def test_open_loop_drops_beyond_max_in_flight(autojump_clock: trio.testing.MockClock) -> None:
    spec = LoadSpec(URL, rate=10, duration=1.0, max_in_flight=3, timeout=2.0)
    report = await run_load(spec, http_transport=Upstream(stall()).transport())
    assert report["dropped"] == 7
    assert report["errors"] == {"timeout": 3}


async def test_loadtest_against_the_real_gateway() -> None:
    with trio.fail_after(20):
        async with live_gateway({"a": FakeUpstream(answers)}) as gw:
            progress = io.StringIO()
            report = await run_load(
                LoadSpec(gw.url + "/v1", model="gpt", concurrency=4, requests=40, duration=None),
                progress=progress,
            )
    assert report["ok"] == 40 and report["providers"] == {"a": 40}


async def test_a_stream_without_done_counts_as_an_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from tests.helpers import chunk, stream

    complete = stream([chunk("a"), chunk("b")])
    truncated = stream([chunk("a"), b'data: {"error": {"message": "cut"}}\n\n'], done=False)
    upstream = Upstream(complete, truncated)
    report = await run_load(
        LoadSpec(URL, concurrency=1, requests=2, duration=None, stream=True),
        http_transport=upstream.transport(),
    )
    assert report["ok"] == 1
    assert report["errors"] == {"stream_incomplete": 1}
