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
