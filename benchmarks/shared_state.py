"""What the Redis state backend costs, measured side by side in one run (issue 12).

    python benchmarks/shared_state.py                 # ~3 minutes; prints a Markdown table
    python benchmarks/shared_state.py --duration 3    # quicker, noisier

Starts a canned upstream, a redis-server on a free port (nothing saved), then in interleaved
rounds (the VM's speed drifts; the median of per-round ratios is steadier):
  local     one worker, state.backend local, limits rpm/tpm set (today's path)
  redis     one worker, state.backend redis, the same limits: every request spends leases, and
            a lease round trip to Redis happens once per 10% of the limit
then 1 and 2 workers with each backend at c=64 for the scaling ratio. Cascade's CPU per request is the
process family's user+system time over the requests served; redis-server's CPU is reported
apart. All traffic stays on 127.0.0.1; every measurement is bounded by --duration.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import Bench, cpu_seconds, family, free_port, process

# Limits high enough never to refuse in a measurement, so both configs serve the same requests:
# with 10% leases, one lease round trip to Redis per 6,000 requests (rpm) and per ~30,000
# requests (tpm, ~20 tokens each). The hot path is the same for any limit: spend a local balance.
LIMITS = {"limits": {"rpm": 60_000, "tpm": 6_000_000}}


@contextmanager
def redis_server(cpus: str | None) -> Iterator[tuple[str, int]]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (.ci/system-deps installs it)")
    port = free_port()
    cmd = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    with process(cmd, port, cpus) as proc:
        yield f"redis://127.0.0.1:{port}/0", proc.pid


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=6.0, help="seconds per measurement")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--load-generator", choices=("auto", "wrk", "loadtest"), default="auto")
    args = p.parse_args()
    args.smoke, args.litellm = False, None
    bench = Bench(args)
    rows: dict[str, list[dict[str, Any]]] = {}
    with bench.upstream() as up, redis_server(bench.client_cpus) as (url, redis_pid):
        state = {"state": {"backend": "redis", "url": url, "prefix": "bench:"}}
        configs: dict[str, dict[str, Any]] = {
            "local": {"provider": LIMITS},
            "redis": {"provider": LIMITS, **state},
        }
        for n in range(args.rounds):
            for name, extra in configs.items():
                with bench.cascade({"up": up}, ["up/bench"], extra=extra) as proc:
                    bench.warm(proc.port)  # type: ignore[attr-defined]
                    for c in (16, 64):
                        proxy = family(proc.pid)
                        before, redis_before = cpu_seconds(proxy), cpu_seconds([redis_pid])
                        r = bench.load.run(proc.port, c)  # type: ignore[attr-defined]
                        served = r["rps"] * bench.load.duration
                        r["cpu_us"] = (cpu_seconds(proxy) - before) / served * 1e6
                        r["redis_cpu_us"] = (cpu_seconds([redis_pid]) - redis_before) / served * 1e6
                        rows.setdefault(f"{name}/c{c}", []).append(r)
                        print(
                            f"round {n + 1} {name:<6} c={c:<3} {r['rps']:8.1f} req/s"
                            f"  {r['cpu_us']:7.1f} us CPU/request (redis {r['redis_cpu_us']:5.1f})"
                            f"  p99 {r['p99_ms']:.2f} ms  errors {r['errors']}",
                            flush=True,
                        )
        for _ in range(2):  # workers: 1 and 2, with each backend, interleaved
            for name in ("local", "redis"):
                for workers in (1, 2):
                    with bench.cascade(
                        {"up": up}, ["up/bench"], workers=workers, extra=configs[name]
                    ) as proc:
                        bench.warm(proc.port)  # type: ignore[attr-defined]
                        r = bench.load.run(proc.port, 64)  # type: ignore[attr-defined]
                        rows.setdefault(f"{name}-{workers}w", []).append(r)
                        print(f"{name} {workers} worker(s) c=64 {r['rps']:8.1f} req/s", flush=True)
    print()
    print("| config | c | req/s (median) | Cascade CPU µs/request | redis-server CPU µs/request |")
    print("|---|---|---|---|---|")
    for key, runs in rows.items():
        if "/" not in key:
            continue
        name, c = key.split("/")
        print(
            f"| {name} | {c[1:]} | {statistics.median(r['rps'] for r in runs):.0f} |"
            f" {statistics.median(r['cpu_us'] for r in runs):.0f} |"
            f" {statistics.median(r['redis_cpu_us'] for r in runs):.1f} |"
        )
    for c in (16, 64):
        ratios = [
            b["cpu_us"] / a["cpu_us"]
            for a, b in zip(rows[f"local/c{c}"], rows[f"redis/c{c}"], strict=True)
        ]
        print(f"redis / local CPU per request at c={c}: {statistics.median(ratios):.3f} (median)")
    for name in ("local", "redis"):
        one = statistics.median(r["rps"] for r in rows[f"{name}-1w"])
        two = statistics.median(r["rps"] for r in rows[f"{name}-2w"])
        print(f"2 workers / 1 worker, {name} state, c=64: {two / one:.2f}x ({two:.0f} / {one:.0f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
