"""A real `redis-server` for the shared-state tests: started on a free port on 127.0.0.1, nothing
saved to disk, stopped (or killed and restarted on the same port) by the test."""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import AsyncIterator

import pytest
import trio


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisServer:
    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.proc: trio.Process | None = None

    async def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed: run .ci/system-deps (apt-get redis-server)")
        self.proc = await trio.lowlevel.open_process(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
                "--loglevel",
                "warning",
            ],
            stdout=subprocess.DEVNULL,
        )
        with trio.fail_after(10):  # until it accepts connections (it starts in milliseconds)
            while True:
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", self.port)
                except OSError:
                    await trio.sleep(0.01)
                    continue
                await stream.aclose()
                return

    async def kill(self) -> None:
        """SIGKILL: no goodbye to the clients, as in a crash."""
        if self.proc is not None:
            self.proc.kill()
            await self.proc.wait()
            self.proc = None

    async def command(self, *args: str) -> bytes:
        """One command in RESP, the raw reply (for a test to look inside)."""
        stream = await trio.open_tcp_stream("127.0.0.1", self.port)
        async with stream:
            parts = [f"*{len(args)}\r\n".encode()]
            for a in args:
                parts.append(f"${len(a.encode())}\r\n".encode() + a.encode() + b"\r\n")
            await stream.send_all(b"".join(parts))
            return await stream.receive_some(65536)


@pytest.fixture
async def redis() -> AsyncIterator[RedisServer]:
    """A redis-server of the test's own, killed at its end (import it into a test module)."""
    server = RedisServer(free_port())
    await server.start()
    try:
        yield server
    finally:
        await server.kill()
