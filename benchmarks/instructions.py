"""CPU instructions per request, counted by valgrind: a measure that does not drift with the VM.

    python benchmarks/instructions.py [--requests 500] [--warmup 100] [--state]

Throughput on a shared VM moves ±30% from hour to hour; the number of instructions a server
executes per request does not (callgrind counts them, whatever else the machine is doing). This
runs bare hypercorn-trio (benchmarks/bare_app.py) and Cascade (one worker, `log_level: warning`)
under `valgrind --tool=callgrind` against benchmarks/fast_upstream.py, sends `--warmup` and then
`--warmup + --requests` sequential keep-alive requests in two separate runs, and reports the
difference per request, so start-up and shutdown cancel out. Loopback only; each run is bounded.
It needs valgrind (`apt-get install valgrind`) and takes a minute or two.

`--keys` adds Cascade with a client key that has rpm/tpm limits and a budget (every request
authenticated, limited, reserved and settled, spend written to SQLite).

`--cross` adds Cascade serving OpenAI clients from an Anthropic-dialect provider (the request
and the answer translated).

`--responses` adds Cascade serving the Responses face (`POST /v1/responses`, a string input)
from the same chat completions provider: the request translated to chat, the answer back.

`--stream` adds Cascade answering streamed requests (20 content events each), on a plain route
and on a route with `resume: true` (each event's text kept, to continue from); with `--cross`,
also a streamed request translated from an Anthropic provider; the streaming ceiling
(benchmarks/bare_relay.py: hypercorn-trio relaying the upstream's bytes through the same pool);
and the same relay with only the actor contract's hop (`bare_relay.py --hop`).
By default the upstream writes a stream's events at once, so they arrive in one read; with
`--interval 20ms` each arrives alone (valgrind slows the server about fiftyfold, so the gap must
be wide), which is what a real model's stream does and what benchmarks/streams.py measures:
there, the per-read work (the actor's hop to the relay, a write per event) counts 20 times.

`--saturate N` counts streams the way a saturated server serves them: `N` streams at once
(benchmarks/stream_load.py) for `--seconds`, after a warm-up as long, the count zeroed and dumped
around the window (`callgrind_control`), divided by the streams completed in it. One stream at a
time, each read finds what the upstream has sent since the last; with many at once, a server
reads and writes less often per stream, and how much less is what this counts. Use it with
`--stream --interval 50ms` (1 ms apart at the server's native speed, as benchmarks/streams.py);
the window's streams start and end inside it, but how a run batches moves the result a few
percent, so compare a few runs. `--keep DIR` keeps each window's profile there, to read by
function with `callgrind_annotate`.

`--clouds` adds Cascade with an Azure OpenAI target (its deployment path, `api-key` header) and
with a Claude-on-Bedrock target (its body rewritten and SigV4-signed by botocore per request, from
fixed credentials in the environment), both against the same canned upstream.

`--state` adds Cascade with rpm/tpm limits set, once with `state.backend: local` and once with
`redis` (a redis-server on a free port; needs redis-server): what the shared backend costs per
request, leases and all.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PYTHON = sys.executable
BODY = b'{"model":"bench","messages":[{"role":"user","content":"hello"}]}'
CHAT = ("/v1/chat/completions", BODY)
STREAM = ("/v1/chat/completions", BODY[:-1] + b',"stream":true}')
RESPONSES = ("/v1/responses", b'{"model":"bench","input":"hello","store":false}')
sys.path.insert(0, str(HERE))

from run import free_port, process  # noqa: E402  (benchmarks/run.py: same helpers)


def send(
    port: int,
    count: int,
    seconds: float = 600,
    key: str | None = None,
    call: tuple[str, bytes] = CHAT,
) -> None:
    """`count` POSTs on one keep-alive connection, waiting (bounded) for the server to listen."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            conn.connect()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    for _ in range(count):
        headers = {"content-type": "application/json"}
        if key is not None:
            headers["authorization"] = f"Bearer {key}"
        conn.request("POST", call[0], call[1], headers)
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"status {response.status}")
    conn.close()


@contextlib.contextmanager
def callgrind(cmd: list[str], out: Path) -> Iterator[tuple[int, list[str]]]:
    """Run the server `cmd` under callgrind (its counts to `out`) for the block, then stop it
    (SIGTERM). Yields its pid and a list that holds valgrind's stderr once it has exited (kept
    in a file meanwhile: a pipe nobody reads could fill with the server's log and stall it)."""
    log = out.with_name(out.name + ".stderr")
    with log.open("w") as stderr:
        proc = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *cmd],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            cwd=ROOT,
        )
    err: list[str] = []
    try:
        yield proc.pid, err
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        err.append(log.read_text(errors="replace"))


def instructions(
    cmd: list[str],
    port: int,
    count: int,
    tmp: Path,
    key: str | None = None,
    call: tuple[str, bytes] = CHAT,
) -> int:
    """Total instructions the server executes from start to exit, having served `count`."""
    with callgrind(cmd, tmp / "callgrind.out") as (_, err):
        send(port, count, key=key, call=call)
    m = re.search(r"Collected : ([\d,]+)", err[0])
    if not m:
        raise RuntimeError(f"no instruction count from valgrind:\n{err[0][-2000:]}")
    return int(m.group(1).replace(",", ""))


def saturated(
    cmd: list[str],
    port: int,
    path: str,
    tmp: Path,
    streams: int,
    seconds: float,
    keep: Path | None = None,
) -> float:
    """Instructions per stream with `streams` at once, over a window of `seconds` (`--saturate`)."""
    out = tmp / "callgrind-saturated.out"
    load = [PYTHON, str(HERE / "stream_load.py"), "--port", str(port), "--path", path]
    load += ["-c", str(streams), "-d", str(seconds)]
    with callgrind(cmd, out) as (pid, _):
        send(port, 1, call=STREAM)  # (waits until the server listens)
        subprocess.run(load, check=True, capture_output=True, timeout=seconds * 4 + 120)
        subprocess.run(["callgrind_control", "-z", str(pid)], check=True, capture_output=True)
        done = subprocess.run(load, check=True, capture_output=True, timeout=seconds * 4 + 120)
        subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True)
    result = json.loads(done.stdout)
    if result["errors"]:
        raise RuntimeError(f"stream errors under load: {result}")
    dumps = sorted(tmp.glob("callgrind-saturated.out.[0-9]*"))  # .1: the dump of the window
    m = re.search(r"^(?:summary|totals): (\d+)", dumps[0].read_text(errors="replace"), re.M)
    if not m:
        raise RuntimeError(f"no instruction count in {dumps[0]}")
    if keep:  # for callgrind_annotate: where the window's instructions went, by function
        shutil.copy(dumps[0], keep)
    for dump in [out, out.with_name(out.name + ".stderr"), *dumps]:
        dump.unlink(missing_ok=True)
    return int(m.group(1)) / (result["streams_per_s"] * result["seconds"])


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--state", action="store_true", help="also: limits with local vs redis state")
    p.add_argument("--keys", action="store_true", help="also: a client key with limits, budget")
    p.add_argument("--only", action="append", help="only the servers whose name has this")
    p.add_argument("--cross", action="store_true", help="also: a cross-dialect route")
    p.add_argument("--responses", action="store_true", help="also: the Responses face")
    p.add_argument("--clouds", action="store_true", help="also: Azure and Bedrock targets")
    p.add_argument("--stream", action="store_true", help="also: streamed, with and without resume")
    p.add_argument("--interval", default="0", help="between a stream's events (e.g. 20ms)")
    p.add_argument("--saturate", type=int, help="streams only: this many at once (see above)")
    p.add_argument("--seconds", type=float, default=30.0, help="--saturate's window")
    p.add_argument("--keep", type=Path, help="--saturate: keep each window's profile in this dir")
    args = p.parse_args()
    if not shutil.which("valgrind"):
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="cascade-instr-"))
    upstream_port = free_port()
    upstream = [PYTHON, str(HERE / "fast_upstream.py"), "--port", str(upstream_port)]
    upstream += ["--interval", args.interval]
    results: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        stack.enter_context(process(upstream, upstream_port, None))
        port = free_port()
        up = {"base_url": f"http://127.0.0.1:{upstream_port}/v1"}

        def config(name: str, **extra: object) -> list[str]:
            path = tmp / f"{name}.json"
            route = {"match": "bench", "targets": ["up/bench"]} | extra.pop("route", {})  # type: ignore[operator]
            path.write_text(
                json.dumps(
                    {
                        "server": {"port": port, "log_level": "warning"},
                        "providers": {"up": up | extra.pop("provider", {})},  # type: ignore[operator]
                        "routes": [route],
                        **extra,
                    }
                )
            )
            return [PYTHON, "-m", "router", "serve", "--config", str(path)]

        servers = {
            "bare hypercorn-trio": [PYTHON, str(HERE / "bare_app.py"), "--port", str(port)],
            "Cascade, 1 worker": config("plain"),
        }
        if args.cross:  # OpenAI clients, an Anthropic-dialect provider: translated both ways
            root = {"base_url": f"http://127.0.0.1:{upstream_port}", "dialect": "anthropic"}
            servers["Cascade, OpenAI client to an Anthropic provider"] = config(
                "cross", provider=root
            )
        if args.clouds:  # the same canned upstream, called as Azure and as Bedrock are
            os.environ.update(AZ_KEY="az-bench", AWS_ACCESS_KEY_ID="AKIDBENCH",
                              AWS_SECRET_ACCESS_KEY="bench", AWS_CONFIG_FILE="/nonexistent",
                              AWS_SHARED_CREDENTIALS_FILE="/nonexistent")  # fmt: skip
            root = f"http://127.0.0.1:{upstream_port}"
            azure = {"base_url": root, "api_key_env": "AZ_KEY",
                     "azure": {"api_version": "2024-10-21"}}  # fmt: skip
            bedrock = {"base_url": root, "dialect": "anthropic",
                       "bedrock": {"region": "us-east-1"}}  # fmt: skip
            servers["Cascade, an Azure OpenAI target"] = config("azure", provider=azure)
            servers["Cascade, OpenAI client to a Bedrock target"] = config(
                "bedrock", provider=bedrock
            )
        if args.stream:  # the same, streamed (20 content events); and on a route that resumes
            servers["bare relay, streamed"] = [PYTHON, str(HERE / "bare_relay.py"), "--port",
                                               str(port), "--upstream", up["base_url"][:-3]]  # fmt: skip
            servers["bare relay with the actor hop, streamed"] = [
                *servers["bare relay, streamed"],
                "--hop",
            ]
            servers["Cascade, streamed"] = config("stream")
            servers["Cascade, streamed, route with resume"] = config(
                "resume", route={"resume": True}
            )
            if args.cross:  # the stream translated, event by event
                root = {"base_url": f"http://127.0.0.1:{upstream_port}", "dialect": "anthropic"}
                servers["Cascade, streamed, OpenAI client to an Anthropic provider"] = config(
                    "stream-cross", provider=root
                )
        if args.responses:  # same provider, same config: the face is the only difference
            servers["Cascade, /v1/responses"] = config("responses")
        if args.state:
            redis_port = free_port()
            redis = ["redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no"]
            stack.enter_context(process(redis, redis_port, None))
            limits = {"limits": {"rpm": 60_000, "tpm": 6_000_000}}
            url = f"redis://127.0.0.1:{redis_port}/0"
            servers["Cascade, limits, state local"] = config("local", provider=limits)
            servers["Cascade, limits, state redis"] = config(
                "redis", provider=limits, state={"backend": "redis", "url": url}
            )
        key = "sk-bench-client-key-0123456789abcdef"
        if args.keys:
            os.environ["BENCH_CLIENT_KEY"] = key
            auth = {
                "usage_db": str(tmp / "usage.sqlite3"),
                "keys": [
                    {
                        "name": "bench",
                        "key_env": "BENCH_CLIENT_KEY",
                        "rpm": 1_000_000,
                        "tpm": 1_000_000_000,
                        "budgets": [{"tokens": 10**12, "period": "day"}],
                    }
                ],
            }
            servers["Cascade, a key with limits and a budget"] = config("keys", auth=auth)
        for name, cmd in servers.items():
            if args.only and not any(part in name for part in args.only):
                continue
            sent = key if name.startswith("Cascade, a key") else None
            call = (
                RESPONSES
                if name.endswith("/v1/responses")
                else STREAM
                if "streamed" in name
                else CHAT
            )
            if args.saturate:
                if call is not STREAM:
                    continue
                keep = None
                if args.keep:
                    args.keep.mkdir(parents=True, exist_ok=True)
                    keep = args.keep / (re.sub(r"[^a-z0-9]+", "-", name.lower()) + ".callgrind")
                results[name] = saturated(
                    cmd, port, call[0], tmp, args.saturate, args.seconds, keep
                )
                print(f"{name}, {args.saturate} at once: {results[name] / 1e6:.3f} M "
                      "instructions per stream", flush=True)  # fmt: skip
                continue
            low = instructions(cmd, port, args.warmup, tmp, sent, call)
            high = instructions(cmd, port, args.warmup + args.requests, tmp, sent, call)
            results[name] = (high - low) / args.requests
            print(f"{name}: {results[name] / 1e6:.3f} M instructions per request", flush=True)
    pairs = (
        ("redis / local", "Cascade, limits, state redis", "Cascade, limits, state local"),
        ("a key / none", "Cascade, a key with limits and a budget", "Cascade, 1 worker"),
        ("bare / Cascade", "bare hypercorn-trio", "Cascade, 1 worker"),
        ("responses / chat", "Cascade, /v1/responses", "Cascade, 1 worker"),
        ("resume / streamed", "Cascade, streamed, route with resume", "Cascade, streamed"),
        ("streamed / bare relay", "Cascade, streamed", "bare relay, streamed"),
        (
            "hop relay / bare relay",
            "bare relay with the actor hop, streamed",
            "bare relay, streamed",
        ),
        ("streamed / hop relay", "Cascade, streamed", "bare relay with the actor hop, streamed"),
    )
    for label, a, b in pairs:
        if a in results and b in results:
            print(f"{label}: {results[a] / results[b]:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
