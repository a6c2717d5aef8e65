"""The live feed of recent cascades for the operator's view (`/admin/status`, `cascade status`).

It costs the request path nothing when nobody is watching: requests are recorded only within
`WATCH_WINDOW` seconds of the last time someone read the feed, into a bounded ring.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import trio

WATCH_WINDOW = 30.0
KEEP = 200


class Feed:
    def __init__(self) -> None:
        self._entries: deque[dict[str, Any]] = deque(maxlen=KEEP)
        self._watched_until = -1.0
        self._seq = 0
        self.serving: dict[str, str] = {}  # route -> the target that served its last request

    def watching(self) -> bool:
        return trio.current_time() < self._watched_until

    def record(self, entry: dict[str, Any]) -> None:
        """Called only when `watching()`: one finished request."""
        self._seq += 1
        self._entries.append({"seq": self._seq, **entry})
        if entry.get("served_by"):
            self.serving[entry["route"]] = entry["served_by"]

    def read(self, after: int) -> list[dict[str, Any]]:
        """Entries after sequence number `after`; reading starts (or extends) the watch."""
        self._watched_until = trio.current_time() + WATCH_WINDOW
        return [e for e in self._entries if e["seq"] > after]
