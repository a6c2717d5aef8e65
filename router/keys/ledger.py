"""Budgets per client key, and books that always balance (docs/keys-and-budgets.md).

Before the cascade a request reserves its worst case against its key (estimated input plus its
`max_tokens`, priced at the dearest target it may use); a request that does not fit is refused.
When the request ends, however it ends, `settle` turns the reservation into what is charged: the
answer's usage, nothing when no byte reached the client, or an estimate of what was streamed.
`settle` is synchronous and runs in the request's `finally`, so a cancellation (client gone,
shutdown) cannot skip it: with no request in flight, every key's reserved amount is zero.

Spend survives restarts: every settled charge is queued to `UsageStore`, whose one task writes
batches to SQLite off the request path; at start the ledger loads the current periods' spend.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

import attrs
import trio

from router.config.keys import Budget, Period, Unit, period_end, period_id
from router.state.budgets import Exceeded, Hold, SharedBudgets
from router.state.usage import HourRow, SharedUsage

log = logging.getLogger("cascade.budgets")


@attrs.frozen
class Charge:
    """One settled request, as recorded: what the key paid, for which route/provider/model."""

    at: float  # wall clock
    key: str
    route: str
    provider: str
    model: str
    input: int
    output: int
    cost: float
    outcome: str  # ok | refunded | partial


class Ledger:
    """Spent and reserved amounts per key. Plain synchronous code on the trio thread."""

    def __init__(
        self,
        store: UsageStore | None = None,
        shared: SharedBudgets | None = None,
        usage: SharedUsage | None = None,
    ) -> None:
        self.shared = shared
        self.usage = usage  # the deployment's hourly usage (Redis), this replica's share
        self._spent: dict[tuple[str, Unit, str], float] = {}
        self._reserved: dict[str, list[float]] = {}  # key -> [tokens, cost]
        self.in_flight = 0  # reservations not yet settled
        self.settled = 0
        self.store = store
        # Keys created through the admin API (settings with their sha256), kept across reloads
        self.runtime_keys: dict[str, dict[str, object]] = store.load_keys() if store else {}
        if store is not None:
            for (key, unit, period), amount in store.load_spend().items():
                self._spent[(key, unit, period)] = amount

    def shares(self, when: dt.datetime) -> list[tuple[str, Unit, str, float]]:
        """This process's books for the current periods (today, this month, in total): what it
        adds to a shared backend that lost its counters (state/budgets.py `reseed`)."""
        current = {period_id(p, when) for p in ("day", "month", "total")}
        return [(k, u, pid, v) for (k, u, pid), v in self._spent.items() if pid in current and v]

    def spent(self, key: str, unit: Unit, period: Period, when: dt.datetime) -> float:
        return self._spent.get((key, unit, period_id(period, when)), 0.0)

    def reserved(self, key: str) -> tuple[float, float]:
        tokens, cost = self._reserved.get(key, (0.0, 0.0))
        return tokens, cost

    async def reserve_shared(
        self, key: str, budgets: Iterable[Budget], tokens: float, cost: float, when: dt.datetime
    ) -> Hold | Exceeded:
        """Reserve in the shared backend (one round trip, shielded from cancellation so a hold
        taken there is always ours to settle); this replica's own books while it is down."""
        shared = self.shared
        budgets = tuple(budgets)
        if shared is None or not shared.up or not budgets:  # no budget: only this replica books
            return self.reserve(key, budgets, tokens, cost, when)
        hold_id = uuid.uuid4().hex
        try:
            with trio.CancelScope(shield=True), trio.fail_after(shared.timeout):
                result = await shared.reserve(hold_id, key, budgets, tokens, cost, when)
        except Exception as exc:  # Redis failed or is slow: release in case the script ran
            log.warning("budgets: shared reservation failed (%s); this replica's view", exc)
            shared.failed()
            shared.settle(hold_id, key, 0.0, 0.0, when)
            return self.reserve(key, budgets, tokens, cost, when)
        if isinstance(result, Hold):
            held = self._reserved.setdefault(key, [0.0, 0.0])
            held[0] += tokens
            held[1] += cost
            self.in_flight += 1
        return result

    def reserve(
        self, key: str, budgets: Iterable[Budget], tokens: float, cost: float, when: dt.datetime
    ) -> Hold | Exceeded:
        held = self._reserved.setdefault(key, [0.0, 0.0])
        for budget in budgets:
            need, already = (tokens, held[0]) if budget.unit == "tokens" else (cost, held[1])
            spent = self.spent(key, budget.unit, budget.period, when)
            if spent + already + need > budget.limit:
                return Exceeded(budget, period_end(budget.period, when), spent, already, need)
        held[0] += tokens
        held[1] += cost
        self.in_flight += 1
        return Hold(key, tokens, cost)

    def settle(self, hold: Hold, charge: Charge, when: dt.datetime) -> None:
        """Release `hold` and book `charge` (exactly once per hold)."""
        if hold.settled:
            return
        hold.settled = True
        held = self._reserved[hold.key]
        held[0] -= hold.tokens
        held[1] -= hold.cost
        if abs(held[0]) < 1e-9 and abs(held[1]) < 1e-9:  # float dust: exactly zero when idle
            held[0] = held[1] = 0.0
        self.in_flight -= 1
        self.settled += 1
        tokens = charge.input + charge.output
        day = period_id("day", when)
        spent, key = self._spent, hold.key
        for pid in (day, day[:7], "total"):
            spent[(key, "tokens", pid)] = spent.get((key, "tokens", pid), 0) + tokens
            spent[(key, "cost", pid)] = spent.get((key, "cost", pid), 0) + charge.cost
        if self.store is not None:
            self.store.record(charge)
        if self.usage is not None:
            row = (charge.key, charge.route, charge.provider, charge.model)
            self.usage.record(charge.at, row, charge.input, charge.output, charge.cost)
        if hold.shared_id is not None and self.shared is not None:
            self.shared.settle(hold.shared_id, hold.key, tokens, charge.cost, when)


class UsageStore:
    """Settled charges in SQLite: one writer task, batched, never on the request path."""

    QUEUE = 100_000
    BATCH = 1.0  # seconds: charges settled within it are written in one transaction

    def __init__(self, path: Path) -> None:
        self.path = path
        self._send, self._receive = trio.open_memory_channel[Charge](self.QUEUE)
        self._writer: sqlite3.Connection | None = None  # the writer task's own, kept open
        self.written: Callable[[set[int]], None] | None = None  # told the hours of each batch
        with self._connect() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS charges (at REAL, key TEXT, route TEXT,"
                " provider TEXT, model TEXT, input INTEGER, output INTEGER, cost REAL,"
                " outcome TEXT)"
            )
            db.execute("CREATE INDEX IF NOT EXISTS charges_key_at ON charges (key, at)")
            db.execute(
                "CREATE TABLE IF NOT EXISTS keys (name TEXT PRIMARY KEY, settings TEXT,"
                " created REAL, revoked REAL)"
            )
            db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT)")
            self._hourly(db)
            db.execute(
                "INSERT OR IGNORE INTO meta VALUES ('books', ?)", (uuid.uuid4().hex,)
            )  # whose books these are: the same across restarts (budgets' re-seeding in Redis)
            self.books_id = db.execute("SELECT value FROM meta WHERE name = 'books'").fetchone()[0]

    @staticmethod
    def _hourly(db: sqlite3.Connection) -> None:
        """Hourly totals, kept in the same transaction as the charges (a store written by an
        earlier version gets them from its charges once)."""
        exists = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'hourly'").fetchone()
        db.execute(
            "CREATE TABLE IF NOT EXISTS hourly (hour INTEGER, key TEXT, route TEXT,"
            " provider TEXT, model TEXT, requests INTEGER, input INTEGER, output INTEGER,"
            " cost REAL, PRIMARY KEY (hour, key, route, provider, model))"
        )
        if not exists:
            db.execute(
                "INSERT INTO hourly SELECT CAST(at / 3600 AS INTEGER), key, route, provider,"
                " model, COUNT(*), SUM(input), SUM(output), SUM(cost) FROM charges"
                " GROUP BY 1, 2, 3, 4, 5"
            )

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=5)
        db.execute("PRAGMA journal_mode=WAL")
        return db

    def load_spend(self) -> dict[tuple[str, Unit, str], float]:
        """Every key's spend per day, month and in total, from the recorded charges."""
        out: dict[tuple[str, Unit, str], float] = {}
        with self._connect() as db:
            rows = db.execute(
                "SELECT key, strftime('%Y-%m-%d', at, 'unixepoch'), SUM(input + output),"
                " SUM(cost) FROM charges GROUP BY 1, 2"
            ).fetchall()
        for key, day, tokens, cost in rows:
            for pid in (day, day[:7], "total"):
                out[(key, "tokens", pid)] = out.get((key, "tokens", pid), 0) + tokens
                out[(key, "cost", pid)] = out.get((key, "cost", pid), 0) + cost
        return out

    def load_keys(self) -> dict[str, dict[str, object]]:
        """The keys created through the admin API and not revoked: name -> settings (with
        the key's sha256; never the key)."""
        with self._connect() as db:
            rows = db.execute("SELECT name, settings FROM keys WHERE revoked IS NULL").fetchall()
        return {name: json.loads(settings) for name, settings in rows}

    def save_key(self, name: str, settings: dict[str, object]) -> None:
        with self._connect() as db:
            db.execute(
                "INSERT OR REPLACE INTO keys VALUES (?, ?, ?, NULL)",
                (name, json.dumps(settings), time.time()),
            )

    def revoke_key(self, name: str) -> None:
        with self._connect() as db:
            db.execute("UPDATE keys SET revoked = ? WHERE name = ?", (time.time(), name))

    def record(self, charge: Charge) -> None:
        try:
            self._send.send_nowait(charge)
        except trio.WouldBlock:
            # the disk cannot keep up: spend is still right in memory
            log.error("usage store: queue full, a charge was not written to %s", self.path)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write what is queued, in batches, until cancelled; then write what is left."""
        task_status.started()
        batch: list[Charge] = []  # received, not yet written: the finally writes it if cancelled
        try:
            while True:
                batch.append(await self._receive.receive())
                await trio.sleep(self.BATCH)  # what arrives meanwhile goes in one transaction
                batch += self._drain()
                writing, batch = batch, []
                await trio.to_thread.run_sync(self._write, writing)  # runs to its end
                if self.written is not None:
                    self.written({int(c.at // 3600) for c in writing})
        finally:
            batch += self._drain()
            if batch:
                self._write(batch)  # at shutdown: synchronously, nothing left to wait for
            if self._writer is not None:
                self._writer.close()

    def _drain(self) -> list[Charge]:
        out = []
        while True:
            try:
                out.append(self._receive.receive_nowait())
            except trio.WouldBlock:
                return out

    def _write(self, batch: list[Charge]) -> None:
        if self._writer is None:  # used by one thread at a time: the writer task's calls
            self._writer = sqlite3.connect(self.path, timeout=5, check_same_thread=False)
        with self._writer as db:
            db.executemany(
                "INSERT INTO charges VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [attrs.astuple(c) for c in batch],
            )
            db.executemany(
                "INSERT INTO hourly VALUES (?, ?, ?, ?, ?, 1, ?, ?, ?) ON CONFLICT DO UPDATE SET"
                " requests = requests + 1, input = input + excluded.input,"
                " output = output + excluded.output, cost = cost + excluded.cost",
                [(int(c.at // 3600), c.key, c.route, c.provider, c.model, c.input, c.output,
                  c.cost) for c in batch],
            )  # fmt: skip

    def usage(self, since: float, until: float) -> list[dict[str, object]]:
        """Spend per key, route, provider and model between two wall-clock times."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT key, route, provider, model, COUNT(*), SUM(input), SUM(output), SUM(cost)"
                " FROM charges WHERE at >= ? AND at < ? GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4",
                (since, until),
            ).fetchall()
        names = ("key", "route", "provider", "model", "requests", "input", "output", "cost")
        return [dict(zip(names, row, strict=True)) for row in rows]

    def hours(self, first: int, end: int) -> list[HourRow]:
        """Totals per hour (Unix time // 3600), key, route, provider and model for the hours
        [first, end): this store's share of the deployment's usage in Redis (state/usage.py)."""
        with self._connect() as db:
            return db.execute(
                "SELECT * FROM hourly WHERE hour >= ? AND hour < ?", (first, end)
            ).fetchall()
