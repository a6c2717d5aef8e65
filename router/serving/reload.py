"""Live reconfiguration: re-read the config, and change only what changed.

The whole new config is parsed and validated first; a broken one changes nothing (the caller
answers 400 with every problem). Then: providers whose config is unchanged keep their actor and
all its state; changed ones are reconfigured in place by their actor (blocks, windows and counters
survive); new ones get a new actor; removed ones are closed once their running attempts end.
Finally the app's `Gateway` is replaced in one assignment: requests already running finish on the
snapshot they started with, new ones see the new config. `server.host`, `port` and `workers`
cannot change in a running process; a reload reports them as needing a restart.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import trio

from router.config import Config, ConfigError
from router.serving.assembly import Assembly

if TYPE_CHECKING:
    from router.face.app import App
    from router.serving.control import WorkerLink

log = logging.getLogger("cascade.reload")

_RESTART_ONLY = ("host", "port", "workers")


class Reloader:
    """Re-reads the config source and swaps the app's gateway for one built from it."""

    def __init__(
        self,
        app: App,
        source: Path | None,
        assembly: Assembly,
        link: WorkerLink | None = None,
    ) -> None:
        self.app = app
        self.source = source  # None: the built-in demo
        self.assembly = assembly
        self.link = link  # a worker's: reloads are the supervisor's, for every worker
        self._lock = trio.Lock()

    def read(self) -> Config:
        """Parse and validate the config source; raises ConfigError listing every problem."""
        return Config.load(self.source, shown_as="the config file")  # no path in answers

    async def reload(self) -> dict[str, Any]:
        """Apply the config source now; returns what changed. ConfigError: nothing changed.

        In a worker, the supervisor validates the source once and applies it to every worker.
        """
        try:
            if self.link is not None:
                return await self.link.reload()  # counted "ok" by `apply`, in every worker
            new = self.read()
        except ConfigError:
            self.assembly.metrics.reloads.labels("invalid").inc()
            raise
        return await self.apply(new)

    async def apply(self, new: Config) -> dict[str, Any]:
        """Adopt `new` (already validated); returns what changed."""
        async with self._lock:
            old = self.app.gateway
            server = old.config.server
            restart = [
                f"server.{f}" for f in _RESTART_ONLY if getattr(new.server, f) != getattr(server, f)
            ]
            kept_server = {f: getattr(server, f) for f in _RESTART_ONLY}
            new = attrs.evolve(new, server=attrs.evolve(new.server, **kept_server))
            gateway, changes = await self.assembly.build(new, old)
            # One assignment: running requests keep the Gateway they read when they started.
            self.app.gateway = gateway
            changes["removed"] = self.assembly.retire(old, gateway)
            summary = {"status": "reloaded", "providers": changes, "routes": len(new.routes)}
            if restart:
                summary["restart_required"] = restart
            log.info("config reloaded: %s", summary)
            self.assembly.metrics.reloads.labels("ok").inc()
            return summary

    async def reload_on_sighup(
        self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Reload at every SIGHUP, logging (not raising) a broken config."""
        with trio.open_signal_receiver(signal.SIGHUP) as signals:
            task_status.started()
            async for _ in signals:
                try:
                    await self.reload()
                except ConfigError as exc:
                    log.error("reload refused, still serving the previous config:\n%s", exc)
                except Exception:  # a bug must not end the watcher, nor the server with it
                    log.exception("reload failed, still serving the previous config")
