"""`server.workers > 1`: one gateway process per worker, all accepting on one port, and a supervisor.

Each worker binds its own SO_REUSEPORT socket, so the kernel spreads new connections across them
(a shared listening socket tends to feed one busy worker). The parent first binds a socket of its
own without listening on it, which reserves the port — so `port: 0` works — and then supervises:

- SIGTERM or SIGINT is passed on once, as SIGTERM; it exits 0 when every worker did.
- Reloads are the supervisor's: SIGHUP to it, or `POST /admin/reload` to any worker (which asks
  the supervisor over its control socket). The supervisor reads and validates the config once; a
  broken one changes nothing anywhere (the asking worker answers 400 with every problem); a good
  one is sent to every worker, and the answer reports each worker's result.

Control messages are JSON lines over one socketpair per worker:

    worker ── {"type": "reload"} ──▶ supervisor
    supervisor ── {"type": "apply", "config": <text>} ──▶ every worker
    worker ── {"type": "applied", "summary": {...}} | {"type": "failed", "error": "..."} ──▶ supervisor
    supervisor ── {"type": "invalid", "problems": [...]} | {"type": "done", "result": {...}} ──▶ asker

Each worker has its own provider actors, so rate-limit blocks, circuits and limits are per worker
(a 429 seen by one worker does not block the others; rpm/tpm limits apply per worker).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import time
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

import attrs

from router.config import Config, ConfigError, config_text
from router.ops.control import SHOWN_AS, WorkerLink, encode
from router.ops.logs import setup_logging

log = logging.getLogger("cascade.workers")

APPLY_TIMEOUT = 30.0  # seconds a worker may take to confirm a reload


def _reuseport_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def _worker(config: Config, index: int, source: Path | None, control: socket.socket) -> None:
    from router.ops.server import run, wait_for_signal

    setup_logging(config.server.log_level, config.server.log_format)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent turns Ctrl-C into one SIGTERM
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # reloads come from the supervisor
    sock = _reuseport_socket(config.server.host, config.server.port)
    log.info("worker %d (pid %d) starting", index, os.getpid())
    run(
        config,
        shutdown_trigger=partial(wait_for_signal, signal.SIGTERM),
        sock=sock,
        source=source,
        link=WorkerLink(control),
    )


# --- the supervisor ---------------------------------------------------------------------------


@attrs.define(eq=False)
class _Child:
    index: int
    process: multiprocessing.process.BaseProcess
    control: socket.socket
    buffer: bytes = b""
    alive: bool = True

    def send(self, message: dict[str, Any]) -> None:
        try:
            self.control.sendall(encode(message))
        except OSError:
            self.alive = False

    def read_messages(self) -> list[dict[str, Any]]:
        """What has arrived; an empty read (the worker has gone) marks it dead."""
        try:
            data = self.control.recv(65536)
        except OSError:
            data = b""
        if not data:
            self.alive = False
            return []
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        return [json.loads(line) for line in lines if line]


class Supervisor:
    def __init__(self, source: Path | None, children: list[_Child]) -> None:
        self.source = source
        self.children = children
        self.wake_read, self.wake_write = socket.socketpair()
        self.wake_write.setblocking(False)
        self.reload_wanted = False
        self.stopping = False

    def on_sighup(self, signum: int, frame: FrameType | None) -> None:
        self.reload_wanted = True
        self._wake()

    def on_stop(self, signum: int, frame: FrameType | None) -> None:
        if self.stopping:
            return
        self.stopping = True
        log.info(
            "received %s: stopping %d workers", signal.Signals(signum).name, len(self.children)
        )
        for child in self.children:
            if child.process.pid is not None and child.process.is_alive():
                os.kill(child.process.pid, signal.SIGTERM)

    def _wake(self) -> None:
        try:
            self.wake_write.send(b"x")
        except OSError:
            pass  # already awake

    def loop(self) -> None:
        """Until every worker has exited: answer reload questions, run SIGHUP reloads."""
        pending: list[_Child] = []  # workers whose reload question waits for an answer
        while any(c.process.is_alive() for c in self.children):
            sentinels = [c.process.sentinel for c in self.children if c.process.is_alive()]
            controls = [c.control for c in self.children if c.alive]
            ready = multiprocessing.connection.wait([self.wake_read, *controls, *sentinels])
            if self.wake_read in ready:
                self.wake_read.recv(4096)
            for child in self.children:
                if child.alive and child.control in ready:
                    for message in child.read_messages():
                        if message["type"] == "reload":
                            pending.append(child)
                        else:
                            log.warning("worker %d: unexpected %s", child.index, message["type"])
            if (pending or self.reload_wanted) and not self.stopping:
                self.reload_wanted = False
                self.reload(pending)
                pending = []

    def reload(self, askers: list[_Child]) -> None:
        """Validate the config once; apply it to every worker or to none."""
        try:
            text = config_text(self.source, shown_as=SHOWN_AS)
            Config.from_yaml(text, source=SHOWN_AS)
        except ConfigError as exc:
            log.error("reload refused, still serving the previous config:\n%s", exc)
            for child in askers:
                child.send({"type": "invalid", "problems": exc.problems})
            return
        live = [c for c in self.children if c.alive]
        for child in live:
            child.send({"type": "apply", "config": text})
        results: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + APPLY_TIMEOUT
        waiting = {c.control: c for c in live if c.alive}
        while waiting and (left := deadline - time.monotonic()) > 0:
            for control in multiprocessing.connection.wait(list(waiting), timeout=left):
                child = waiting[control]  # type: ignore[index]
                for message in child.read_messages():
                    if message["type"] == "reload":
                        if child not in askers:
                            askers.append(child)  # answered by this same reload
                    else:
                        results[child.index] = message
                        waiting.pop(child.control, None)
                if not child.alive:
                    waiting.pop(child.control, None)
        workers = []
        for child in self.children:
            outcome = results.get(child.index)
            if outcome is not None and outcome["type"] == "applied":
                workers.append({"worker": child.index, "status": "reloaded", **outcome["summary"]})
            else:
                error = outcome["error"] if outcome else "no confirmation"
                workers.append({"worker": child.index, "status": "failed", "error": error})
        ok = all(w["status"] == "reloaded" for w in workers)
        result = {"status": "reloaded" if ok else "partial", "workers": workers}
        log.info(
            "config reloaded on %d of %d workers",
            sum(w["status"] == "reloaded" for w in workers),
            len(workers),
        )
        for child in askers:
            child.send({"type": "done", "result": result})


def run_workers(config: Config, workers: int, source: Path | None) -> int:
    """Start `workers` gateway processes and supervise them; returns the exit status."""
    if config.state.backend == "local":
        log.warning(
            "%d workers with state.backend: local: each worker keeps its own blocks, circuits and"
            " rpm/tpm counts (a limit of N is N per worker); state.backend: redis shares them"
            " (docs/scaling.md)",
            workers,
        )
    reserved = _reuseport_socket(config.server.host, config.server.port)
    port = reserved.getsockname()[1]
    config = attrs.evolve(config, server=attrs.evolve(config.server, port=port))
    context = multiprocessing.get_context("spawn")
    children: list[_Child] = []
    ends: list[socket.socket] = []
    for i in range(workers):
        mine, theirs = socket.socketpair()
        ends.append(theirs)
        process = context.Process(
            target=_worker, args=(config, i, source, theirs), name=f"cascade-worker-{i}"
        )
        children.append(_Child(i, process, mine))
    supervisor = Supervisor(source, children)
    signal.signal(signal.SIGTERM, supervisor.on_stop)
    signal.signal(signal.SIGINT, supervisor.on_stop)
    signal.signal(signal.SIGHUP, supervisor.on_sighup)
    for child in children:
        child.process.start()
    for end in ends:
        end.close()  # the workers hold their own copies
    log.info("started %d workers on port %d", workers, port)
    supervisor.loop()
    for child in children:
        child.process.join()
        child.control.close()
    reserved.close()
    failed = [c.process.name for c in children if c.process.exitcode != 0]
    if failed:
        log.error("workers failed: %s", ", ".join(failed))
    return 1 if failed else 0
