"""`server.workers > 1`: one gateway process per worker, all accepting on one port.

Each worker binds its own SO_REUSEPORT socket, so the kernel spreads new connections across them
(a shared listening socket tends to feed one busy worker). The parent first binds a socket of its
own without listening on it, which reserves the port — so `port: 0` works — and then only
supervises: SIGTERM or SIGINT is passed on once, as SIGTERM, and it exits 0 when every worker did.

Each worker has its own provider actors, so rate-limit blocks, circuits and limits are per worker
(a 429 seen by one worker does not block the others; rpm/tpm limits apply per worker).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
from functools import partial
from pathlib import Path
from types import FrameType

import attrs
import trio

from router.config import Config

log = logging.getLogger("cascade.workers")


def _reuseport_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def _worker(config: Config, index: int, source: Path | None) -> None:
    from router.cli import setup_logging
    from router.server import freeze_startup_objects, raise_fd_limit, serve, wait_for_signal

    setup_logging(config.server.log_level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent turns Ctrl-C into one SIGTERM
    sock = _reuseport_socket(config.server.host, config.server.port)
    log.info("worker %d (pid %d) starting", index, os.getpid())
    raise_fd_limit()
    freeze_startup_objects()
    trio.run(
        partial(serve, config, shutdown_trigger=partial(wait_for_signal, signal.SIGTERM), sock=sock)
    )


def run_workers(config: Config, workers: int, source: Path | None) -> int:
    """Start `workers` gateway processes and supervise them; returns the exit status."""
    reserved = _reuseport_socket(config.server.host, config.server.port)
    port = reserved.getsockname()[1]
    config = attrs.evolve(config, server=attrs.evolve(config.server, port=port))
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(
            target=_worker,
            args=(config, i, source),
            name=f"cascade-worker-{i}",
        )
        for i in range(workers)
    ]
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if stopping:
            return
        stopping = True
        log.info("received %s: stopping %d workers", signal.Signals(signum).name, workers)
        for process in processes:
            if process.pid is not None and process.is_alive():
                os.kill(process.pid, signal.SIGTERM)

    def reload(signum: int, frame: FrameType | None) -> None:
        for process in processes:
            if process.pid is not None and process.is_alive():
                os.kill(process.pid, signal.SIGHUP)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, reload)  # every worker re-reads the config
    for process in processes:
        process.start()
    log.info("started %d workers on port %d", workers, port)
    for process in processes:
        process.join()
    reserved.close()
    failed = [p.name for p in processes if p.exitcode != 0]
    if failed:
        log.error("workers failed: %s", ", ".join(failed))
    return 1 if failed else 0
