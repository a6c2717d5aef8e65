"""Streaming against its ceiling: events per second per core and the p99 gap between events, for
bare hypercorn-trio relaying the upstream's stream through Cascade's own upstream pool (the
ceiling, benchmarks/bare_relay.py), for the same relay with only the hop DESIGN §2 puts between
a request and its upstream call (`bare_relay.py --hop`: what the actor contract alone costs),
and for Cascade same-dialect, cross-dialect both ways, and the Responses face (`/v1/responses`,
streamed from a chat completions provider).

    python benchmarks/streams.py [--duration 8] [--rounds 3] [--concurrency 64] [--chunks 20]
        [--interval 1ms] [--lengths 20,100,400]

Each server is pinned to core 0, the canned upstream (benchmarks/fast_upstream.py) and the load
generator (benchmarks/stream_load.py) to core 1; the rounds run the servers in turn, so drift in
the machine's speed lands on all of them. Per core = events relayed per CPU-second the server
used; answers carry `--chunks` content events (what the upstream sent: a client of the other
dialect gets a few more framing events, which are not counted), paced one every `--interval` so
the gap between the events a client receives shows what the relay adds. Loopback only; every
run is bounded by --duration.

`--lengths` measures instead the two bare relays and Cascade same-dialect at several answer lengths
and splits each one's CPU per stream into a part per request and a part per event (a least-
squares line through the lengths): what a stream costs Cascade above the ceiling once, and
what it costs for every event after that.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from run import HERE, PYTHON, ROOT, cpu_seconds, family, free_port, pinned, process

HOP = "bare relay, with the actor hop"
SERVERS = (
    "bare relay",
    HOP,
    "Cascade, OpenAI",
    "Cascade, OpenAI to Anthropic",
    "Cascade, Anthropic to OpenAI",
    "Cascade, Responses to OpenAI",
)


def cascade_config(tmp: Path, name: str, port: int, upstream: int, dialect: str) -> list[str]:
    root = f"http://127.0.0.1:{upstream}"
    provider = {
        "base_url": root if dialect == "anthropic" else root + "/v1",
        "dialect": dialect,
        "max_connections": 512,
        "max_in_flight": 4096,
        "circuit": {"failures": 1000000},
    }
    config = {
        "server": {"port": port, "log_level": "warning"},
        "providers": {"up": provider},
        "routes": [{"match": "bench", "targets": ["up/bench"]}],
    }
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(config))
    return [PYTHON, "-m", "router", "serve", "--config", str(path)]


def server(name: str, tmp: Path, port: int, upstream: int) -> tuple[list[str], str]:
    """The command that serves `name` on `port`, and the path its clients post to."""
    if name in ("bare relay", HOP):
        cmd = [PYTHON, str(HERE / "bare_relay.py"), "--port", str(port)]
        cmd += ["--upstream", f"http://127.0.0.1:{upstream}"]
        return [*cmd, "--hop"] if name == HOP else cmd, "/v1/chat/completions"
    if name == "Cascade, OpenAI":
        return cascade_config(tmp, "same", port, upstream, "openai"), "/v1/chat/completions"
    if name == "Cascade, OpenAI to Anthropic":
        return cascade_config(tmp, "oa", port, upstream, "anthropic"), "/v1/chat/completions"
    if name == "Cascade, Responses to OpenAI":
        return cascade_config(tmp, "ro", port, upstream, "openai"), "/v1/responses"
    return cascade_config(tmp, "ao", port, upstream, "openai"), "/v1/messages"


def measure(cmd: list[str], path: str, args: argparse.Namespace) -> dict[str, Any]:
    port = int(cmd[cmd.index("--port") + 1]) if "--port" in cmd else args.port
    with process(cmd, port, args.server_cpus) as proc:
        load = [PYTHON, str(HERE / "stream_load.py"), "--port", str(port), "--path", path]
        load += ["-c", str(args.concurrency)]
        subprocess.run(
            pinned([*load, "-d", "1"], args.client_cpus), check=True, capture_output=True
        )
        before = cpu_seconds(family(proc.pid))
        out = subprocess.run(
            pinned([*load, "-d", str(args.duration)], args.client_cpus),
            check=True,
            capture_output=True,
            text=True,
            cwd=ROOT,
        ).stdout
        used = cpu_seconds(family(proc.pid)) - before
    result: dict[str, Any] = json.loads(out)
    result["cpu_s"] = round(used, 2)
    content = result["streams_per_s"] * result["seconds"] * args.chunks
    result["content_events_per_s"] = round(content / result["seconds"], 1)
    result["events_per_core_s"] = round(content / used, 1) if used else None
    return result


def compare(
    rounds: int = 3,
    duration: float = 8.0,
    concurrency: int = 64,
    chunks: int = 20,
    interval: str = "1ms",
    servers: tuple[str, ...] = SERVERS,
) -> dict[str, list[dict[str, Any]]]:
    """Every server's measurements, round by round (servers in turn within a round)."""
    args = argparse.Namespace(
        duration=duration, concurrency=concurrency, chunks=chunks, interval=interval, port=0
    )
    two = (os.cpu_count() or 1) >= 2
    args.server_cpus, args.client_cpus = ("0", "1") if two else (None, None)
    tmp = Path(tempfile.mkdtemp(prefix="cascade-streams-"))
    upstream = free_port()
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
    fast = [PYTHON, str(HERE / "fast_upstream.py"), "--port", str(upstream)]
    fast += ["--chunks", str(chunks), "--interval", interval]
    with process(fast, upstream, args.client_cpus):
        for _ in range(rounds):
            for name in servers:
                args.port = free_port()
                cmd, path = server(name, tmp, args.port, upstream)
                if "--config" in cmd:  # Cascade's port is in its config
                    config = json.loads(Path(cmd[-1]).read_text())
                    config["server"]["port"] = args.port
                    Path(cmd[-1]).write_text(json.dumps(config))
                results[name].append(measure(cmd, path, args))
    return results


def ratios(results: dict[str, list[dict[str, Any]]]) -> dict[str, float]:
    """Each server's events per core over the ceiling's (medians of the rounds)."""

    def per_core(name: str) -> float:
        return statistics.median(r["events_per_core_s"] for r in results[name])

    ceiling = per_core("bare relay")
    return {name: per_core(name) / ceiling for name in SERVERS if name in results}


def table_lines(results: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The medians as a Markdown table, each server against the ceiling."""
    ceiling = statistics.median(r["events_per_core_s"] for r in results["bare relay"])
    lines = [
        "| server | content events/s | per core | vs the ceiling | p50 gap | p99 gap"
        " | first event, p50 / p99 | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in (n for n in SERVERS if n in results):  # (a stored run may have fewer)
        rows = results[name]
        per_core = statistics.median(r["events_per_core_s"] for r in rows)
        lines.append(
            f"| {name} | {statistics.median(r['content_events_per_s'] for r in rows):,.0f}"
            f" | {per_core:,.0f} | {per_core / ceiling:.2f}x"
            f" | {statistics.median(r['gap_p50_ms'] for r in rows):.3f} ms"
            f" | {statistics.median(r['gap_p99_ms'] for r in rows):.3f} ms"
            f" | {_first_event(rows)} | {sum(r['errors'] for r in rows)} |"
        )
    return lines


def _first_event(rows: list[dict[str, Any]]) -> str:
    """The medians of the time to a stream's first event (runs stored before it: a dash)."""
    if any("first_p50_ms" not in r for r in rows):
        return "—"
    p50 = statistics.median(r["first_p50_ms"] for r in rows)
    return f"{p50:.1f} / {statistics.median(r['first_p99_ms'] for r in rows):.1f} ms"


LENGTH_SERVERS = ("bare relay", HOP, "Cascade, OpenAI")


def by_length(
    lengths: tuple[int, ...] = (20, 100, 400),
    rounds: int = 2,
    duration: float = 6.0,
    concurrency: int = 64,
    interval: str = "1ms",
) -> dict[str, dict[str, float]]:
    """For each answer length, each of LENGTH_SERVERS' CPU microseconds per stream (median of
    the rounds), keyed by the length as a string (the results go to JSON)."""
    per_stream: dict[str, dict[str, float]] = {}
    for n in lengths:
        results = compare(rounds, duration, concurrency, n, interval, LENGTH_SERVERS)
        per_stream[str(n)] = {
            name: 1e6 * n / statistics.median(r["events_per_core_s"] for r in results[name])
            for name in LENGTH_SERVERS
        }
    return per_stream


def split_cost(points: dict[int, float]) -> tuple[float, float]:
    """(per request, per event) microseconds: the least-squares line through (length, cost)."""
    xs, ys = list(points), list(points.values())
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )
    return my - slope * mx, slope


def length_lines(per_stream: dict[str, dict[str, float]]) -> list[str]:
    """The sweep as a Markdown table: CPU per stream by length, the ratio to the ceiling, and
    each server's cost split into per request and per event."""
    lengths = sorted(per_stream, key=int)
    lines = [
        "| server | " + " | ".join(f"{n} events: µs per stream" for n in lengths)
        + " | fitted: once per stream | fitted: per event |",
        "|---|" + "---|" * (len(lengths) + 2),
    ]  # fmt: skip
    for name in (n for n in LENGTH_SERVERS if n in per_stream[lengths[0]]):  # (older runs: fewer)
        cells = []
        for n in lengths:
            cost = per_stream[n][name]
            ratio = per_stream[n][LENGTH_SERVERS[0]] / cost
            cells.append(f"{cost:,.0f} ({ratio:.2f}x)")
        fixed, each = split_cost({int(n): per_stream[n][name] for n in lengths})
        lines.append(f"| {name} | {' | '.join(cells)} | {fixed:,.0f} µs | {each:.1f} µs |")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--chunks", type=int, default=20, help="content events per answer")
    p.add_argument("--interval", default="1ms", help="between an answer's events")
    p.add_argument("--lengths", help="instead: answer lengths to sweep, e.g. 20,100,400")
    args = p.parse_args()
    if args.lengths:
        lengths = tuple(int(n) for n in args.lengths.split(","))
        sweep = by_length(lengths, args.rounds, args.duration, args.concurrency, args.interval)
        print(f"{args.concurrency} concurrent streams, events {args.interval} apart; CPU per"
              f" stream (the ceiling's over the server's), medians of {args.rounds} rounds:")  # fmt: skip
        print("\n".join(length_lines(sweep)))
        return 0
    results = compare(args.rounds, args.duration, args.concurrency, args.chunks, args.interval)
    print(f"{args.concurrency} concurrent streams of {args.chunks} events {args.interval} apart,"
          f" {args.rounds} rounds of {args.duration:g} s; medians:")  # fmt: skip
    print("\n".join(table_lines(results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
