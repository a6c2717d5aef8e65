"""The benchmark script runs end to end (a short smoke run; no number is asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
