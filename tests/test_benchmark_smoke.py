"""The benchmark script runs end to end (a short smoke run; no number is asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_benchmark_smoke_run(tmp_path: Path) -> None:
    out = tmp_path / "bench.md"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "run.py"),
            "--smoke",
            "--load-generator",
            "loadtest",
            "--out",
            str(out),
            "--plot",
            str(tmp_path / "bench.png"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    text = out.read_text()
    for heading in (
        "## Fast upstream, non-stream",
        "## 50 ms upstream",
        "## Streaming",
        "## Failover mix",
        "## Targets",
    ):
        assert heading in text
    assert "Cascade, 1 worker" in text


def test_stream_cost_split_by_length() -> None:
    """benchmarks/streams.py --lengths: a stream's CPU split into per request and per event."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import streams
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    fixed, each = streams.split_cost({20: 500 + 20 * 15, 100: 500 + 100 * 15, 400: 500 + 400 * 15})
    assert (round(fixed, 6), round(each, 6)) == (500.0, 15.0)
    sweep = {
        "20": {"bare relay": 800.0, "Cascade, OpenAI": 1600.0},
        "100": {"bare relay": 2000.0, "Cascade, OpenAI": 2500.0},
    }
    lines = streams.length_lines(sweep)
    assert lines[0].startswith("| server | 20 events")  # lengths in order, as numbers
    assert "1,600 (0.50x) | 2,500 (0.80x) | 1,375 µs | 11.2 µs" in lines[3]
    assert "fitted: once per stream" in lines[0]


def _stream_row(per_core: float) -> dict[str, float]:
    return {"events_per_core_s": per_core, "content_events_per_s": per_core, "gap_p50_ms": 0.0,
            "gap_p99_ms": 8.0, "errors": 0}  # fmt: skip


def test_the_page_leads_with_the_ratios_and_rerenders_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The headline gives the interleaved medians, the streams against their ceiling and the
    added latency; a page re-rendered from its stored results (whose numeric keys come back as
    integers) lists the same targets as the page first written."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # run.py imports streams.py
    import run

    point = {"rps": 100.0, "p50_ms": 1.0, "p99_ms": 2.0, "errors": 0}
    results = {
        "meta": {
            "cpu": "cpu",
            "os": "os",
            "python": "3.11",
            "versions": "v",
            "commit": "abc",
            "tool": "wrk",
            "duration": 8,
            "proxy_cpus": "0",
            "client_cpus": "1",
            "elapsed": 1,
        },
        "slow/direct": {1: {**point, "p50_ms": 50.5}},  # (levels are numbers, as in a run)
        "slow/bare-hypercorn": {1: {**point, "p50_ms": 51.5}},
        "slow/cascade-1w": {1: {**point, "p50_ms": 52.0}},
        "interleaved": [
            {
                "bare": {16: 2000.0, 64: 1800.0},
                "cascade": {16: 1200.0, 64: 1350.0},
                "litellm": {16: 60.0, 64: 90.0},
            }
            for _ in range(3)
        ],
        "stream_ceiling": {
            "bare relay": [_stream_row(20000.0)],
            "Cascade, OpenAI": [_stream_row(12000.0)],
            "Cascade, OpenAI to Anthropic": [_stream_row(11000.0)],
            "Cascade, Anthropic to OpenAI": [_stream_row(10000.0)],
        },
        "stream_lengths": {
            "20": {"bare relay": 900.0, "Cascade, OpenAI": 1500.0},
            "100": {"bare relay": 2000.0, "Cascade, OpenAI": 2500.0},
        },
    }
    page = tmp_path / "bench.md"
    page.write_text(run.report(results) + run.raw_results(results))
    first = page.read_text()
    headline = first[first.index("## Headline") : first.index("## Streaming against")]
    assert "| Cascade / bare hypercorn-trio, non-streamed, c=16 / c=64" in headline
    assert "| 0.60x / 0.75x |" in headline and "| 20.0x / 15.0x |" in headline
    assert "20-event streams, same dialect | 0.60x |" in headline
    assert "Anthropic clients, OpenAI provider | 0.50x |" in headline
    assert "same dialect, 100-event streams | 0.80x |" in headline
    assert "+1.50 ms (the stack alone: +1.00 ms)" in headline
    assert "Responses" not in headline  # not measured in this run: not shown
    again = run.report(run.load_results(page))
    assert again == first[: len(again)]
    assert "(the same, 20-event answers)" not in again  # 20 events is the row above it
    assert "(the same, 100-event answers) | 0.80x | yes |" in again


@pytest.mark.parametrize("hop", [False, True], ids=["ceiling", "with-the-hop"])
def test_the_bare_relays_pass_the_upstreams_stream_on_whole(
    hop: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """benchmarks/bare_relay.py, with and without the actor hop, answers what the upstream
    answers, byte for byte: a relay that lost or held back events would measure as faster."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import http.client

    import bare_relay
    from run import PYTHON, free_port, process

    from router.cascade.dispatcher import REPLY_BUFFER

    assert bare_relay.REPLY_BUFFER == REPLY_BUFFER  # the hop as Cascade's

    def post(port: int) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        body = b'{"model": "bench", "stream": true, "messages": []}'
        conn.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
        response = conn.getresponse()
        answer = response.status, response.read()
        conn.close()
        return answer

    up, relay = free_port(), free_port()
    upstream = [PYTHON, str(ROOT / "benchmarks" / "fast_upstream.py"), "--port", str(up)]
    cmd = [PYTHON, str(ROOT / "benchmarks" / "bare_relay.py"), "--port", str(relay)]
    cmd += ["--upstream", f"http://127.0.0.1:{up}", *(["--hop"] if hop else [])]
    with process([*upstream, "--chunks", "5", "--interval", "2ms"], up, None):
        direct = post(up)
        with process(cmd, relay, None):
            relayed = [post(relay) for _ in range(3)]
    assert direct[0] == 200 and direct[1].count(b"data: ") == 7  # 5 events, the end, [DONE]
    assert relayed == [direct] * 3
