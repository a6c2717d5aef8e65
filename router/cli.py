"""The `cascade` command: serve, check, mock, loadtest."""

from __future__ import annotations

import argparse
import errno
import logging
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import attrs
import trio

from router.config import Config, ConfigError, MockSettings
from router.telemetry.logs import setup_logging
from router.units import parse_duration


def cmd_serve(args: argparse.Namespace) -> int:
    from router.serving.server import run, wait_for_signal

    try:
        config = Config.load(Path(args.config) if args.config else None)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    server = config.server
    pairs = (("host", args.host), ("port", args.port), ("workers", args.workers))
    overrides = {k: v for k, v in pairs if v is not None}
    if overrides:
        config = attrs.evolve(config, server=attrs.evolve(server, **overrides))
    setup_logging(config.server.log_level, config.server.log_format)
    if args.config is None:
        logging.getLogger("cascade").info(
            "no --config given: serving the built-in demo (local mock providers, no API keys)"
        )
    source = Path(args.config) if args.config else None
    try:
        if config.server.workers > 1:
            from router.serving.workers import run_workers

            return run_workers(config, config.server.workers, source)
        run(config, shutdown_trigger=wait_for_signal, source=source, reload_on_sighup=True)
    except (OSError, BaseExceptionGroup) as exc:
        if (reason := _bind_failure(exc)) is None:
            raise
        host, port = config.server.host, config.server.port
        print(
            f"cascade: cannot listen on {host}:{port}: {reason}."
            " Choose another port with --port N (or server.port in the config).",
            file=sys.stderr,
        )
        return 1
    return 0


def _bind_failure(exc: BaseException) -> str | None:
    """Why listening failed, when `exc` (or one inside an exception group) says so."""
    if isinstance(exc, OSError) and exc.errno in (errno.EADDRINUSE, errno.EACCES):
        return "the port is already in use" if exc.errno == errno.EADDRINUSE else "not allowed"
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if (reason := _bind_failure(inner)) is not None:
                return reason
    return None


def cmd_check(args: argparse.Namespace) -> int:
    try:
        Config.from_file(args.file)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem)
        return 1
    print("ok")
    return 0


def cmd_mock(args: argparse.Namespace) -> int:
    from router.serving.server import wait_for_signal
    from router.tools.mock import MockUpstream
    from router.web.server import serve_asgi

    settings = MockSettings(
        latency=args.latency,
        chunks=args.chunks,
        chunk_interval=args.chunk_interval,
        error_rate=args.error_rate,
        rate_429=args.rate_429,
        retry_after=None if args.no_retry_after else args.retry_after,
        stall_rate=args.stall_rate,
        cut_rate=args.cut_rate,
        seed=args.seed,
    )
    setup_logging("info")
    app = MockUpstream(settings, args.name)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            url = await nursery.start(
                partial(serve_asgi, app, args.host, args.port, shutdown_trigger=wait_for_signal)
            )
            logging.getLogger("cascade.mock").info("mock upstream on %s/v1 (%s)", url, settings)

    trio.run(main)
    return 0


def cmd_loadtest(args: argparse.Namespace) -> int:
    from router.tools.loadtest import LoadSpec, api_root, main

    if args.rate is not None and args.rate <= 0:
        raise SystemExit("cascade loadtest: --rate must be positive")
    try:
        url = api_root(args.url)
    except ValueError as exc:
        raise SystemExit(f"cascade loadtest: {exc}") from None
    spec = LoadSpec(
        url=url,
        model=args.model,
        concurrency=args.concurrency,
        rate=args.rate,
        duration=None
        if args.requests is not None and args.duration is None
        else (args.duration or 10.0),
        requests=args.requests,
        stream=args.stream,
        prompt=args.prompt,
        timeout=args.timeout,
    )
    return main(spec, as_json=args.json, quiet=args.quiet)


def cmd_status(args: argparse.Namespace) -> int:
    from router.tools.status import run

    try:
        url, token_env = _gateway(args)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    try:
        return run(url, token_env, args.once, args.interval)
    except KeyboardInterrupt:
        return 0


def cmd_usage(args: argparse.Namespace) -> int:
    from router.tools.status import usage

    try:
        url, token_env = _gateway(args)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    return usage(url, token_env, args.since, args.by, args.json, args.replica)


def _gateway(args: argparse.Namespace) -> tuple[str, str | None]:
    """The gateway's URL and its admin token's variable: --url and --token-env when given, else
    from --config (server.host, server.port, server.admin_token_env), else the default port."""
    url, token_env = args.url, args.token_env
    if args.config is not None:
        server = Config.from_file(args.config).server
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(server.host, server.host)
        url = url or f"http://{f'[{host}]' if ':' in host else host}:{server.port}"
        token_env = token_env or server.admin_token_env
    return url or "http://127.0.0.1:8080", token_env


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a duration like "30s", got {text!r}') from None


def _rate(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a rate from 0 to 1, got {text}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cascade", description="Cascade, an LLM API gateway.")
    p.add_argument("--version", action="version", version=f"cascade {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the gateway (the built-in demo config without --config)")
    s.add_argument("--config", "-c", help="YAML config file (default: the built-in demo)")
    s.add_argument("--host", help="override server.host")
    s.add_argument("--port", type=int, help="override server.port")
    s.add_argument("--workers", type=int, help="override server.workers")
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser("check", help="validate a config file: prints every problem, or ok")
    c.add_argument("file")
    c.set_defaults(func=cmd_check)

    m = sub.add_parser("mock", help="run a mock OpenAI-compatible upstream with injected faults")
    m.add_argument("--host", default="127.0.0.1")
    m.add_argument("--port", type=int, default=9000)
    m.add_argument("--name", default="mock", help="shown in the answers")
    m.add_argument("--latency", type=_duration, default=0.0, help="delay before answering")
    m.add_argument("--chunks", type=int, default=8, help="content events per streamed answer")
    m.add_argument("--chunk-interval", type=_duration, default=0.0)
    m.add_argument("--error-rate", type=_rate, default=0.0, help="share of 500 answers")
    m.add_argument("--rate-429", type=_rate, default=0.0, help="share of 429 answers")
    m.add_argument("--retry-after", type=_duration, default=1.0, help="Retry-After on 429s")
    m.add_argument("--no-retry-after", action="store_true", help="send 429s without Retry-After")
    m.add_argument("--stall-rate", type=_rate, default=0.0, help="share of requests never answered")
    m.add_argument("--cut-rate", type=_rate, default=0.0, help="share of answers cut mid-body")
    m.add_argument("--seed", type=int, help="seed for reproducible fault sequences")
    m.set_defaults(func=cmd_mock)

    st = sub.add_parser("status", help="the gateway's providers, routes and cascades, live")
    st.add_argument("--url", help="the gateway (default: --config's, else 127.0.0.1:8080)")
    st.add_argument("--config", "-c", help="find the gateway (and its token) from its config")
    st.add_argument("--token-env", help="environment variable holding the admin token")
    st.add_argument("--once", action="store_true", help="print once and exit")
    st.add_argument("--interval", type=_duration, default=1.0, help="refresh period")
    st.set_defaults(func=cmd_status)

    us = sub.add_parser("usage", help="what client keys spent (auth.usage_db or Redis state)")
    us.add_argument("--url", help="the gateway (default: --config's, else 127.0.0.1:8080)")
    us.add_argument("--config", "-c", help="find the gateway (and its token) from its config")
    us.add_argument("--token-env", help="environment variable holding the admin token")
    us.add_argument("--since", type=_duration, default=86400.0, help="period: 24h, 7d, 30d…")
    us.add_argument("--by", choices=("key", "route", "provider", "model"), default="key")
    us.add_argument("--json", action="store_true", help="every row (key, route, provider, model)")
    us.add_argument("--replica", action="store_true", help="this replica's usage store only")
    us.set_defaults(func=cmd_usage)

    lt = sub.add_parser("loadtest", help="load-test any OpenAI-compatible endpoint")
    lt.add_argument("url", help="http://host:port (or its /v1 root)")
    lt.add_argument("--model", default="gpt-4o-mini")
    mode = lt.add_mutually_exclusive_group()
    mode.add_argument("--concurrency", "-c", type=int, default=16, help="closed loop: clients")
    mode.add_argument("--rate", "-r", type=float, help="open loop: requests per second")
    lt.add_argument("--duration", "-d", type=_duration, help="how long (default 10s)")
    lt.add_argument("--requests", "-n", type=int, help="stop after this many requests")
    lt.add_argument(
        "--stream", action="store_true", help="stream answers; reports time to first token"
    )
    lt.add_argument("--prompt", default="Say hello.")
    lt.add_argument("--timeout", type=_duration, default=60.0, help="per request")
    lt.add_argument("--json", action="store_true", help="print the report as JSON")
    lt.add_argument("--quiet", "-q", action="store_true", help="no progress line")
    lt.set_defaults(func=cmd_loadtest)
    return p


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cascade-router")
    except PackageNotFoundError:  # run from a source tree that was not installed
        from router import __version__

        return __version__


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.func(args))
