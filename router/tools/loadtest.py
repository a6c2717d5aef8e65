"""`cascade loadtest`: a trio load generator for any OpenAI-compatible chat endpoint.

Closed loop (`--concurrency N`: N clients, each sends its next request when the last one ends) or
open loop (`--rate R`: requests start on a fixed schedule whatever the server does; latency counts
from the scheduled start, so a server that falls behind cannot hide its queue). It uses the same
lean HTTP/1.1 pool as the gateway's upstream calls, and it reports its own CPU use, because a load
generator that is itself saturated measures itself, not the server.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import attrs
import httpx
import trio

from actors.transport import ConnectTimeout, Transport, TransportError

SATURATED = 0.9  # share of one core above which the generator is probably the bottleneck


@attrs.frozen
class LoadSpec:
    url: str  # the API root, e.g. http://127.0.0.1:8080/v1
    model: str = "gpt-4o-mini"
    concurrency: int = 16
    rate: float | None = None  # requests per second: open loop
    duration: float | None = 10.0
    requests: int | None = None
    stream: bool = False
    prompt: str = "Say hello."
    timeout: float = 60.0
    max_in_flight: int = 1024  # open loop: scheduled requests beyond this are dropped, counted

    def body(self) -> bytes:
        payload: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": self.prompt}],
        }
        if self.stream:
            payload["stream"] = True
        return json.dumps(payload).encode()


@attrs.frozen
class Sample:
    latency: float  # seconds, from the (scheduled) start to the last byte
    ttft: float | None  # seconds to the first body byte of a stream
    status: int | None  # None: no HTTP answer (see `error`)
    provider: str | None
    error: str | None = None

    @property
    def succeeded(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending sequence (q in 0..100); NaN when empty."""
    if not ordered:
        return math.nan
    rank = math.ceil(
        round(q * len(ordered) / 100, 9)
    )  # round: 99.9% of 1000 is 999, not 999.0000001
    return ordered[min(len(ordered), max(1, rank)) - 1]


def _stats_ms(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)
    return {
        "p50": round(percentile(ordered, 50) * 1000, 3),
        "p90": round(percentile(ordered, 90) * 1000, 3),
        "p99": round(percentile(ordered, 99) * 1000, 3),
        "max": round(ordered[-1] * 1000, 3),
        "mean": round(sum(ordered) / len(ordered) * 1000, 3),
    }


def summarize(
    spec: LoadSpec, samples: list[Sample], wall: float, cpu: float, dropped: int = 0
) -> dict[str, Any]:
    """The report (the `--json` schema)."""
    ok: list[Sample] = []
    errors: Counter[str] = Counter()
    for s in samples:  # one pass: a membership test per sample made this quadratic
        if s.succeeded:
            ok.append(s)
        else:
            errors[str(s.status) if s.status is not None else (s.error or "error")] += 1
    client_cpu = cpu / wall if wall > 0 else 0.0
    return {
        "target": spec.url,
        "mode": "open" if spec.rate else "closed",
        "concurrency": None if spec.rate else spec.concurrency,
        "rate": spec.rate,
        "stream": spec.stream,
        "duration_s": round(wall, 3),
        "requests": len(samples),
        "ok": len(ok),
        "dropped": dropped,
        "rps": round(len(samples) / wall, 2) if wall > 0 else 0.0,
        "latency_ms": _stats_ms([s.latency for s in ok]),
        "ttft_ms": _stats_ms([s.ttft for s in ok if s.ttft is not None]) if spec.stream else None,
        "errors": dict(sorted(errors.items())),
        "providers": dict(Counter(s.provider or "-" for s in ok).most_common()),
        "client_cpu": round(client_cpu, 3),
        "client_saturated": client_cpu >= SATURATED,
    }


def format_summary(report: dict[str, Any]) -> str:
    lines = [
        f"target     {report['target']}  ({report['mode']} loop"
        + (
            f", {report['concurrency']} clients"
            if report["concurrency"]
            else f", {report['rate']} req/s"
        )
        + (", streaming" if report["stream"] else "")
        + ")",
        f"requests   {report['requests']} in {report['duration_s']:.1f} s = {report['rps']:.1f} req/s"
        + f"  ({report['ok']} ok"
        + (f", {report['dropped']} dropped" if report["dropped"] else "")
        + ")",
    ]
    for name, key in (("latency", "latency_ms"), ("ttft", "ttft_ms")):
        s = report[key]
        if s:
            lines.append(
                f"{name:<10} p50 {s['p50']:.1f} ms  p90 {s['p90']:.1f} ms  p99 {s['p99']:.1f} ms  max {s['max']:.1f} ms"
            )
    if report["errors"]:
        lines.append("errors     " + ", ".join(f"{k}: {v}" for k, v in report["errors"].items()))
    if report["providers"]:
        lines.append("served by  " + ", ".join(f"{k}: {v}" for k, v in report["providers"].items()))
    lines.append(f"client cpu {report['client_cpu'] * 100:.0f}% of one core")
    if report["client_saturated"]:
        lines.append(
            "WARNING    the load generator was CPU-bound: these numbers measure it, not the server."
            " Run several loadtests side by side, or use a native tool (wrk)."
        )
    return "\n".join(lines)


class _Run:
    def __init__(self, spec: LoadSpec, transport: Transport) -> None:
        self.spec = spec
        self.transport = transport
        self.body = spec.body()
        self.headers = [(b"content-type", b"application/json"), (b"accept-encoding", b"identity")]
        self.samples: list[Sample] = []
        self.started = 0
        self.dropped = 0
        self.in_flight = 0
        self.errors = 0

    def more(self, deadline: float) -> bool:
        if self.spec.requests is not None and self.started >= self.spec.requests:
            return False
        return trio.current_time() < deadline

    async def one(self, scheduled: float) -> None:
        self.in_flight += 1
        status = provider = error = None
        ttft = None
        try:
            with trio.fail_after(self.spec.timeout):
                async with self.transport.post(
                    "/chat/completions", self.body, self.headers, _ignore
                ) as r:
                    status, provider = r.status, r.headers.get("x-cascade-provider")
                    tail = await r.read_chunk()
                    if tail and self.spec.stream:
                        ttft = trio.current_time() - scheduled
                    while chunk := await r.read_chunk():
                        tail = tail[-64:] + chunk
            if self.spec.stream and status == 200 and b"data: [DONE]" not in tail[-64:]:
                # It started but ended without [DONE]: cut, or failed in-band. The status line
                # said 200; the answer is not complete.
                status, error = None, "stream_incomplete"
        except trio.TooSlowError:
            error = "timeout"
        except ConnectTimeout:
            error = "connect_timeout"
        except TransportError as exc:
            error = type(exc).__name__.lower()
        finally:
            self.in_flight -= 1
        latency = trio.current_time() - scheduled
        sample = Sample(latency, ttft, status, provider, None if status else error)
        self.samples.append(sample)
        self.errors += not sample.succeeded

    async def closed(self, deadline: float) -> None:
        async def client() -> None:
            while self.more(deadline):
                self.started += 1
                await self.one(trio.current_time())

        async with trio.open_nursery() as nursery:
            for _ in range(self.spec.concurrency):
                nursery.start_soon(client)

    async def open(self, deadline: float) -> None:
        assert self.spec.rate
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            while True:
                at = start + self.started / self.spec.rate
                if at >= deadline or not self.more(deadline):
                    break
                await trio.sleep_until(at)
                self.started += 1
                if self.in_flight >= self.spec.max_in_flight:
                    self.dropped += 1
                else:
                    nursery.start_soon(self.one, at)


def _ignore(phase: str) -> None:
    pass


async def run_load(
    spec: LoadSpec,
    *,
    http_transport: httpx.AsyncBaseTransport | None = None,
    progress: TextIO | None = None,
    cpu_clock: Callable[[], float] = time.process_time,
) -> dict[str, Any]:
    """Run the load described by `spec` and return the report (see `summarize`)."""
    connections = spec.max_in_flight if spec.rate else spec.concurrency
    transport = Transport(
        spec.url.rstrip("/"),
        connect_timeout=10.0,
        max_connections=connections,
        http_transport=http_transport,
    )
    run = _Run(spec, transport)
    deadline = trio.current_time() + (spec.duration if spec.duration is not None else math.inf)
    t0, c0 = trio.current_time(), cpu_clock()
    async with trio.open_nursery() as nursery:
        if progress is not None:
            nursery.start_soon(_progress, run, t0, progress)
        await (run.open(deadline) if spec.rate else run.closed(deadline))
        nursery.cancel_scope.cancel()
    wall, cpu = trio.current_time() - t0, cpu_clock() - c0
    await transport.aclose()
    if progress is not None:
        progress.write("\n")
    return summarize(spec, run.samples, wall, cpu, run.dropped)


async def _progress(run: _Run, t0: float, out: TextIO) -> None:
    while True:
        await trio.sleep(1)
        elapsed = trio.current_time() - t0
        done = len(run.samples)
        recent = sorted(s.latency for s in run.samples[-2000:])
        errors = run.errors
        p50 = percentile(recent, 50) * 1000 if recent else math.nan
        out.write(
            f"\r{elapsed:6.1f} s  {done:7d} done  {done / elapsed:8.1f} req/s  p50 {p50:7.1f} ms"
            f"  in flight {run.in_flight:4d}  errors {errors}   "
        )
        out.flush()


def api_root(url: str) -> str:
    """Accept http://host:port, http://host:port/v1 or the full /chat/completions URL.

    ValueError for anything that is not an http(s) URL with a host (`localhost:8080` would
    otherwise be read as a scheme and fail every request)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("http", "https") or not rest.split("/")[0]:
        raise ValueError(f"expected an http:// or https:// URL, got {url!r}")
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        url = url[: -len("/chat/completions")]
    if not url.endswith("/v1"):
        url += "/v1"
    return url


def main(spec: LoadSpec, *, as_json: bool, quiet: bool) -> int:
    report = trio.run(lambda: run_load(spec, progress=None if (quiet or as_json) else sys.stderr))
    print(json.dumps(report, indent=2) if as_json else format_summary(report))
    return 0 if report["ok"] else 1  # no request answered successfully is a failed run
