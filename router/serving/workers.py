"""`server.workers > 1`: one gateway process per worker, all accepting on one port, and a supervisor.

Each worker binds its own SO_REUSEPORT socket, so the kernel spreads new connections across them
(a shared listening socket tends to feed one busy worker). The parent first binds a socket of its
own without listening on it, which reserves the port — so `port: 0` works — and then supervises:

- SIGTERM or SIGINT is passed on once, as SIGTERM; it exits 0 when every worker did.
- A worker that dies otherwise (a crash, the OOM killer, `kill -9`) is replaced, after a back-off
  that doubles while replacements keep dying young (0.5 s up to 30 s); each death is logged and
  every worker is told the supervisor's figures (wanted, running, restarts) for its /readyz and
  its /metrics (`cascade_worker_restarts_total`, `cascade_workers`).
- Reloads are the supervisor's: SIGHUP to it, or `POST /admin/reload` to any worker (which asks
  the supervisor over its control socket). The supervisor reads and validates the config once; a
  broken one changes nothing anywhere (the asking worker answers 400 with every problem); a good
  one is sent to every worker, and the answer reports each worker's result.

Control messages are JSON lines over one socketpair per worker:

    worker ── {"type": "reload"} ──▶ supervisor
    supervisor ── {"type": "apply", "config": <text>} ──▶ every worker
    worker ── {"type": "applied", "summary": {...}} | {"type": "failed", "error": "..."} ──▶ supervisor
    supervisor ── {"type": "invalid", "problems": [...]} | {"type": "done", "result": {...}} ──▶ asker
    supervisor ── {"type": "status", "wanted": n, "running": k, "restarts": r} ──▶ every worker
    worker ── {"type": "key", "name": ..., "settings": {...} | null} ──▶ supervisor ──▶ the others
      (a client key made, or revoked with null, through one worker's admin API; its hash only)

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
from router.serving.control import SHOWN_AS, WorkerLink, encode
from router.telemetry.logs import setup_logging

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
    from router.serving.server import run, wait_for_signal

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

RESTART_FIRST = 0.5  # seconds before a dead worker is replaced; doubled for each quick death
RESTART_MAX = 30.0
STABLE_AFTER = 10.0  # a worker that lived this long died of something new: back to RESTART_FIRST


@attrs.define(eq=False)
class _Child:
    index: int
    process: multiprocessing.process.BaseProcess
    control: socket.socket
    started: float  # time.monotonic() when it was started
    buffer: bytes = b""
    alive: bool = True  # its control socket still answers

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
    """Keeps `workers` worker processes running: starts them, replaces any that dies (with a
    back-off, logged, counted), runs reloads for all of them, and stops them on SIGTERM."""

    def __init__(self, config: Config, source: Path | None, workers: int) -> None:
        self.config = config  # what a new worker starts with: the last config applied
        self.source = source
        self.wanted = workers
        self.children: dict[int, _Child] = {}
        self.restart_at: dict[int, float] = {}  # dead workers' replacement times (monotonic)
        self.delays = dict.fromkeys(range(workers), RESTART_FIRST)
        self.restarts = 0
        self.context = multiprocessing.get_context("spawn")
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
        log.info("received %s: stopping %d workers", signal.Signals(signum).name, self.wanted)
        for child in self.children.values():
            if child.process.pid is not None and child.process.is_alive():
                os.kill(child.process.pid, signal.SIGTERM)
        self._wake()  # the loop looks again: no worker is restarted from now on

    def _wake(self) -> None:
        try:
            self.wake_write.send(b"x")
        except OSError:
            pass  # already awake

    def start(self, index: int) -> _Child:
        mine, theirs = socket.socketpair()
        process = self.context.Process(
            target=_worker,
            args=(self.config, index, self.source, theirs),
            name=f"cascade-worker-{index}",
        )
        process.start()
        theirs.close()  # the worker holds its own copy
        child = self.children[index] = _Child(index, process, mine, time.monotonic())
        return child

    def status(self) -> dict[str, int]:
        running = sum(c.process.is_alive() for c in self.children.values())
        return {"wanted": self.wanted, "running": running, "restarts": self.restarts}

    def tell_status(self) -> None:
        """Every worker learns the supervisor's figures (its /readyz and /metrics show them)."""
        message = {"type": "status", **self.status()}
        for child in self.children.values():
            if child.alive:
                child.send(message)

    def _reap(self) -> list[_Child]:
        """The workers alive now. Dead ones: close their sockets and, unless stopping, schedule
        their replacement. (One look at each: a worker seen alive here is waited on by the
        caller, so its death wakes the loop; seen dead, it is handled here.)"""
        now = time.monotonic()
        died = False
        live = []
        for index, child in self.children.items():
            if child.process.is_alive():
                live.append(child)
                continue
            if index in self.restart_at or self.stopping:
                continue
            lived = now - child.started
            delay = RESTART_FIRST if lived >= STABLE_AFTER else self.delays[index]
            self.delays[index] = min(delay * 2, RESTART_MAX)
            self.restart_at[index] = now + delay
            child.alive = False
            child.control.close()
            died = True
            log.error(
                "worker %d (pid %s) died (exit code %s) after %.1fs: starting a new one in %.1fs",
                index,
                child.process.pid,
                child.process.exitcode,
                lived,
                delay,
            )
        if died:
            self.tell_status()
        return live

    def _replace_due(self) -> list[_Child]:
        now = time.monotonic()
        due = [index for index, at in self.restart_at.items() if at <= now]
        started = []
        for index in due:
            del self.restart_at[index]
            self.children[index].process.join()
            self.restarts += 1
            started.append(child := self.start(index))
            log.warning("worker %d replaced (new pid %d)", index, child.process.pid)
        if due:
            self.tell_status()
        return started

    def loop(self) -> None:
        """Until stopped and every worker has exited: replace dead workers, answer reload
        questions, run SIGHUP reloads."""
        pending: list[_Child] = []  # workers whose reload question waits for an answer
        while True:
            live = self._reap()
            if self.restart_at and not self.stopping:
                live += self._replace_due()
            if self.stopping and not live:
                return
            ready = multiprocessing.connection.wait(self._waited(live), self._timeout())
            if self.wake_read in ready:
                self.wake_read.recv(4096)
            pending += self._questions([c for c in live if c.alive and c.control in ready])
            if (pending or self.reload_wanted) and not self.stopping:
                self.reload_wanted = False
                self.reload(pending)
                pending = []

    def _waited(self, live: list[_Child]) -> list[Any]:
        """What the loop waits on: its wake-up, the live workers' sockets and their exits (a
        worker seen alive is waited on, so its death wakes the loop)."""
        controls = [c.control for c in live if c.alive]
        return [self.wake_read, *controls, *(c.process.sentinel for c in live)]

    def _timeout(self) -> float | None:
        """Until the next replacement is due (None: no replacement waits)."""
        if not self.restart_at or self.stopping:
            return None
        return max(0.0, min(self.restart_at.values()) - time.monotonic())

    def _questions(self, readable: list[_Child]) -> list[_Child]:
        """The workers among `readable` that asked for a reload."""
        asking = []
        for child in readable:
            for message in child.read_messages():
                if message["type"] == "reload":
                    asking.append(child)
                elif message["type"] == "key":
                    self._relay(child, message)
                else:
                    log.warning("worker %d: unexpected %s", child.index, message["type"])
        return asking

    def _relay(self, sender: _Child, message: dict[str, Any]) -> None:
        """A client key made or revoked on one worker: to every other (they apply it at once)."""
        for child in self.children.values():
            if child is not sender and child.alive:
                child.send(message)

    def _validated(self) -> tuple[str, Config]:
        """The config source's text and its Config, as a worker would start with it."""
        text = config_text(self.source, shown_as=SHOWN_AS)
        new = Config.from_yaml(text, source=SHOWN_AS)
        kept = {f: getattr(self.config.server, f) for f in ("host", "port", "workers")}
        return text, attrs.evolve(new, server=attrs.evolve(new.server, **kept))

    def reload(self, askers: list[_Child]) -> None:
        """Validate the config once; apply it to every worker or to none. A worker waiting to
        be replaced starts on the new config."""
        try:
            text, self.config = self._validated()
        except ConfigError as exc:
            log.error("reload refused, still serving the previous config:\n%s", exc)
            self._answer(askers, {"type": "invalid", "problems": exc.problems})
            return
        except Exception:  # a bug must not end the supervisor's loop
            log.exception("reload failed, still serving the previous config")
            problems = ["the reload failed: see the log"]
            self._answer(askers, {"type": "invalid", "problems": problems})
            return
        live = [c for c in self.children.values() if c.alive]
        for child in live:
            child.send({"type": "apply", "config": text})
        workers = self._report(self._confirmations(live, askers))
        ok = all(w["status"] in ("reloaded", "restarting") for w in workers)
        log.info(
            "config reloaded on %d of %d workers",
            sum(w["status"] == "reloaded" for w in workers),
            len(workers),
        )
        result = {"status": "reloaded" if ok else "partial", "workers": workers}
        self._answer(askers, {"type": "done", "result": result})

    def _report(self, results: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
        """Each worker's line in a reload's answer."""
        workers: list[dict[str, Any]] = []
        for index in sorted(self.children):
            outcome = results.get(index)
            if index in self.restart_at:
                workers.append({"worker": index, "status": "restarting"})  # on the new config
            elif outcome is not None and outcome["type"] == "applied":
                workers.append({"worker": index, "status": "reloaded", **outcome["summary"]})
            else:
                error = outcome["error"] if outcome else "no confirmation"
                workers.append({"worker": index, "status": "failed", "error": error})
        return workers

    @staticmethod
    def _answer(askers: list[_Child], message: dict[str, Any]) -> None:
        for child in askers:
            child.send(message)

    def _confirmations(self, live: list[_Child], askers: list[_Child]) -> dict[int, dict[str, Any]]:
        """Each live worker's answer to an apply, within APPLY_TIMEOUT."""
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
                    elif message["type"] == "key":
                        self._relay(child, message)
                    else:
                        results[child.index] = message
                        waiting.pop(child.control, None)
                if not child.alive:
                    waiting.pop(child.control, None)
        return results


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
    supervisor = Supervisor(config, source, workers)
    signal.signal(signal.SIGTERM, supervisor.on_stop)
    signal.signal(signal.SIGINT, supervisor.on_stop)
    signal.signal(signal.SIGHUP, supervisor.on_sighup)
    for index in range(workers):
        supervisor.start(index)
    supervisor.tell_status()
    log.info("started %d workers on port %d", workers, port)
    supervisor.loop()
    children = list(supervisor.children.values())
    for child in children:
        child.process.join()
        child.control.close()
    reserved.close()
    failed = [c.process.name for c in children if c.process.exitcode != 0]
    if failed:
        log.error("workers failed: %s", ", ".join(failed))
    return 1 if failed else 0
