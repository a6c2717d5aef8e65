"""A worker's control socket to its supervisor (router/serving/workers.py has the protocol)."""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from router.config import Config, ConfigError

log = logging.getLogger("cascade.workers")

SHOWN_AS = "the config file"  # how problems name the file: never its path


def encode(message: dict[str, Any]) -> bytes:
    """One control message: a JSON line."""
    return json.dumps(message).encode() + b"\n"


class WorkerLink:
    """A worker's end of its control socket: asks the supervisor for reloads and applies the
    configs it is sent. `apply` is the worker's own reload of an already validated config."""

    def __init__(self, sock: socket.socket) -> None:
        self._stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        self._send_lock = trio.Lock()
        self._ask_lock = trio.Lock()  # one reload question at a time from this worker
        self._answers, self._answers_in = trio.open_memory_channel[dict[str, Any]](1)
        # The supervisor's figures ({"wanted", "running", "restarts"}), updated in place as they
        # come: /readyz and /metrics read them.
        self.status: dict[str, int] = {}
        # Applies a client key made or revoked on another worker (set by the server)
        self.on_key: Callable[[str, dict[str, Any] | None], Awaitable[None]] | None = None

    async def send(self, message: dict[str, Any]) -> None:
        async with self._send_lock:
            await self._stream.send_all(encode(message))

    async def run(
        self,
        apply: Callable[[Config], Awaitable[dict[str, Any]]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve the control socket until the supervisor closes it."""
        buffer = b""
        task_status.started()
        async with self._answers:
            while data := await self._stream.receive_some():
                buffer += data
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    message = json.loads(line)
                    if message["type"] == "apply":
                        await self._apply(apply, message["config"])
                    elif message["type"] == "status":
                        self.status.update({k: v for k, v in message.items() if k != "type"})
                    elif message["type"] == "key":
                        if self.on_key is not None:
                            await self.on_key(message["name"], message["settings"])
                    else:  # the answer to this worker's own question
                        await self._answers.send(message)

    async def _apply(self, apply: Callable[[Config], Awaitable[dict[str, Any]]], text: str) -> None:
        try:
            summary = await apply(Config.from_yaml(text, source=SHOWN_AS))
        except Exception as exc:  # validated by the supervisor: only a bug lands here
            log.exception("applying the reloaded config failed")
            await self.send({"type": "failed", "error": type(exc).__name__})
            return
        await self.send({"type": "applied", "summary": summary})

    async def share_key(self, name: str, settings: dict[str, Any] | None) -> bool:
        """A client key made (settings) or revoked (None) here: to every other worker."""
        await self.send({"type": "key", "name": name, "settings": settings})
        return True

    async def reload(self) -> dict[str, Any]:
        """Ask the supervisor to reload every worker; ConfigError when the config is invalid."""
        async with self._ask_lock:
            await self.send({"type": "reload"})
            answer = await self._answers_in.receive()
        if answer["type"] == "invalid":
            raise ConfigError(answer["problems"])
        result: dict[str, Any] = answer["result"]
        return result
