"""Soak: random client cancellations and a fault mix against a real `cascade serve`, on 127.0.0.1.

Two runs, each bounded in count and in time:

- cancel: N requests (half streamed) to healthy mock providers, each dropped by its client at a
  random moment (before the answer, at the first byte, mid-stream) or read to the end. A client
  leaving is never a provider's fault: the run fails if any attempt is counted as a protocol
  failure or any circuit opens.
- faults: D seconds of mixed traffic to mocks injecting 429s, 500s, stalls and cuts, again with
  random cancellations. The run fails on a 200 stream without [DONE] (a truncated answer shown
  as complete) and on a 5xx that is not Cascade's own structured error.

Before and after each run it reads, from the gateway process: upstream calls in flight (the
actors' own count), open fds, sockets, established connections to the mock upstreams, RSS.
After the run the in-flight count must be 0 and fds back near the start.

    python benchmarks/soak.py                       # 10,000 cancels + 60 s fault mix (~3 min)
    python benchmarks/soak.py --cancels 500 --fault-seconds 5   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import trio

ROOT = Path(__file__).resolve().parent.parent
CHAT = {"model": "gpt", "messages": [{"role": "user", "content": "hi"}]}


def config(port: int, faults: bool) -> dict[str, Any]:
    healthy = {"latency": "5ms", "chunks": 20, "chunk_interval": "2ms"}
    if faults:
        mocks = {
            "a": {**healthy, "rate_429": 0.2, "error_rate": 0.1, "stall_rate": 0.05},
            "b": {**healthy, "error_rate": 0.1, "cut_rate": 0.1, "seed": 2},
            "c": {**healthy, "cut_rate": 0.05, "seed": 3},
        }
    else:
        mocks = {"a": healthy, "b": healthy}
    providers = {
        name: {"mock": mock, "timeouts": {"first_byte": "1s", "idle": "1s"}}
        for name, mock in mocks.items()
    }
    return {
        "server": {"port": port, "deadline": "5s"},  # info: the log names the mocks
        "providers": providers,
        "routes": [{"match": "gpt", "targets": [f"{n}/gpt" for n in mocks]}],
        "retry": {"max_attempts": 4, "backoff": {"base": "10ms", "max": "100ms"}},
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def process_state(pid: int, mock_ports: set[int]) -> dict[str, int]:
    fds = os.listdir(f"/proc/{pid}/fd")
    sockets = 0
    for fd in fds:
        try:
            sockets += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except FileNotFoundError:
            pass  # closed since the listing
    rss_kb = int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())[1])  # type: ignore[index]
    upstream = 0
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote_port = int(fields[2].split(":")[1], 16)
        if fields[3] == "01" and remote_port in mock_ports:  # ESTABLISHED, to a mock
            upstream += 1
    return {"fds": len(fds), "sockets": sockets, "upstream_conns": upstream, "rss_kb": rss_kb}


async def admin(url: str) -> tuple[int, dict[str, float]]:
    """(upstream calls in flight, the metric samples the checks read)."""
    async with httpx.AsyncClient(base_url=url) as client:
        providers = (await client.get("/admin/providers")).json()["providers"]
        text = (await client.get("/metrics")).text
    samples: dict[str, float] = {}
    for line in text.splitlines():
        for name in ("cascade_upstream_attempts_total", "cascade_target_blocks_total"):
            if line.startswith(name + "{"):
                labels, value = line[len(name) :].rsplit(" ", 1)
                samples[name + labels] = samples.get(name + labels, 0) + float(value)
    return sum(p["in_flight"] for p in providers), samples


def metric(samples: dict[str, float], name: str, **labels: str) -> float:
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for k, v in samples.items() if k.startswith(name) and all(w in k for w in want))


async def one(client: httpx.AsyncClient, rng: random.Random, outcomes: Counter[str]) -> None:
    stream = rng.random() < 0.5
    cancel_at = rng.choice([None, rng.uniform(0, 0.01), rng.uniform(0, 0.05), rng.uniform(0, 0.2)])
    body = {**CHAT, "stream": stream}
    with trio.move_on_after(cancel_at if cancel_at is not None else 30) as scope:
        try:
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                data = b"".join([chunk async for chunk in r.aiter_raw()])
        except httpx.HTTPError as exc:
            outcomes[f"client_error:{type(exc).__name__}"] += 1
            return
    if scope.cancelled_caught:
        outcomes["cancelled_by_client"] += 1
        return
    status = r.status_code
    if status == 200 and stream and b"data: [DONE]" not in data:
        ended_in_band = b'"error"' in data  # failed after the commit point: said so in-band
        outcomes["stream_in_band_error" if ended_in_band else "TRUNCATED_200"] += 1
    elif status >= 500 and b"retry_exhausted" not in data and b"upstream" not in data:
        outcomes[f"UNSTRUCTURED_{status}"] += 1
    else:
        outcomes[str(status)] += 1


async def drive(
    url: str, count: int | None, seconds: float, concurrency: int, seed: int
) -> Counter[str]:
    outcomes: Counter[str] = Counter()
    rng = random.Random(seed)
    started = 0
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        with trio.move_on_after(seconds):
            async with trio.open_nursery() as nursery:

                async def worker() -> None:
                    nonlocal started
                    while count is None or started < count:
                        started += 1
                        await one(client, rng, outcomes)

                for _ in range(concurrency):
                    nursery.start_soon(worker)
    return outcomes


def start_gateway(path: Path, log: Path, port: int) -> tuple[subprocess.Popen[bytes], set[int]]:
    """Start `cascade serve`; returns it with its mock providers' ports once it listens."""
    with log.open("wb") as sink:  # a file, not a pipe: a full pipe would stall the gateway
        proc = subprocess.Popen(
            [sys.executable, "-m", "router", "serve", "--config", str(path)],
            cwd=ROOT,
            stderr=sink,
        )
    deadline = time.monotonic() + 30
    while "cascade listening on" not in (text := log.read_text()):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the gateway did not start:\n{text}")
        time.sleep(0.05)
    ports = {
        int(m)
        for m in re.findall(
            r"mock provider \S+ \(an upstream, not the gateway\) on http://127.0.0.1:(\d+)", text
        )
    }
    return proc, ports


async def measure(url: str, pid: int, mock_ports: set[int], faults: bool, count: int | None,
                  seconds: float, concurrency: int) -> dict[str, Any]:  # fmt: skip
    in_flight_before, _ = await admin(url)
    before = process_state(pid, mock_ports)
    t0 = trio.current_time()
    outcomes = await drive(url, count, seconds, concurrency, seed=7)
    elapsed = trio.current_time() - t0
    await trio.sleep(2)  # attempts still running end within the mocks' 1 s timeouts
    in_flight_after, samples = await admin(url)
    after = process_state(pid, mock_ports)
    return {
        "requests": sum(outcomes.values()),
        "seconds": round(elapsed, 1),
        "outcomes": dict(outcomes.most_common()),
        "in_flight": [in_flight_before, in_flight_after],
        "before": before,
        "after": after,
        "protocol_failures": metric(samples, "cascade_upstream_attempts_total", outcome="protocol"),
        "circuit_openings": metric(samples, "cascade_target_blocks_total", reason="circuit_open"),
    }


def soak_run(
    name: str, faults: bool, count: int | None, seconds: float, concurrency: int
) -> dict[str, Any]:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "soak.json"
        path.write_text(json.dumps(config(port, faults)))
        proc, mock_ports = start_gateway(path, Path(tmp) / "gateway.log", port)
        try:
            url = f"http://127.0.0.1:{port}"
            result = trio.run(
                measure, url, proc.pid, mock_ports, faults, count, seconds, concurrency
            )
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    result = {"run": name, **result}
    before, after, outcomes = result["before"], result["after"], result["outcomes"]
    problems = []
    if result["in_flight"][1]:
        problems.append(f"{result['in_flight'][1]} upstream calls still in flight")
    if after["fds"] > before["fds"] + 2 * concurrency:
        problems.append(f"fds grew {before['fds']} -> {after['fds']}")
    if not faults and (result["protocol_failures"] or result["circuit_openings"]):
        problems.append("client cancellations were counted against healthy providers")
    if any(k == "TRUNCATED_200" or k.startswith("UNSTRUCTURED") for k in outcomes):
        problems.append("a truncated or unstructured answer reached a client")
    result["problems"] = problems
    return result


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--cancels", type=int, default=10_000, help="requests in the cancel run")
    p.add_argument("--fault-seconds", type=float, default=60.0, help="length of the fault run")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    results = [
        soak_run("cancel", False, args.cancels, 600.0, args.concurrency),
        soak_run("faults", True, None, args.fault_seconds, args.concurrency),
    ]
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            b, a = r["before"], r["after"]
            print(f"{r['run']}: {r['requests']} requests in {r['seconds']} s")
            print(f"  outcomes        {r['outcomes']}")
            print(f"  in flight       {r['in_flight'][0]} -> {r['in_flight'][1]}")
            print(
                f"  fds             {b['fds']} -> {a['fds']}   sockets {b['sockets']} -> {a['sockets']}"
            )
            print(f"  upstream conns  {b['upstream_conns']} -> {a['upstream_conns']}")
            print(f"  RSS             {b['rss_kb'] / 1024:.1f} -> {a['rss_kb'] / 1024:.1f} MB")
            print(
                f"  protocol failures {r['protocol_failures']:.0f}, circuit openings {r['circuit_openings']:.0f}"
            )
            print("  " + ("; ".join(r["problems"]) if r["problems"] else "ok"))
    return 1 if any(r["problems"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
