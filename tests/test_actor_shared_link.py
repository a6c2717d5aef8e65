"""The actor's side of shared state, in virtual time: leases, merging what peers learned, the
deployment's one probe, and what the actor does while the backend is down (issue 12).

The backend is played by `Backend`, a recording `SharedLink`: the test answers its asks by
sending the backend's messages to the actor's inbox, exactly as router/state/redis.py does."""

from __future__ import annotations

from typing import Any

import attrs
import trio
import trio.testing

from actors.machines import Circuits, RateLimits
from actors.messages import Attempt, Refused, Reply, Response
from actors.provider import ProviderActor
from actors.settings import CircuitPolicy, RateLimitPolicy
from actors.shared import (
    BackendState,
    BlockLearned,
    BlockLifted,
    CircuitChanged,
    Lease,
    LeaseAnswer,
    ProbeAnswer,
    SharedEvent,
)
from router.dialects.openai import WIRE
from router.telemetry.metrics import Metrics
from tests.helpers import Upstream, ok, status
from tests.test_actor import TERMINAL, attempt, provider, request


@attrs.define
class Backend:
    """Records what the actor publishes and asks for."""

    fail_open: bool = True
    lease_fraction: float = 0.1
    accept: bool = True
    published: list[SharedEvent] = attrs.field(factory=list)
    probes: list[tuple[str, str, float]] = attrs.field(factory=list)
    leases: list[tuple[str, str, float, float]] = attrs.field(factory=list)

    def lease_size(self, limit: float) -> float:
        return max(1.0, limit * self.lease_fraction)

    def publish(self, event: SharedEvent) -> None:
        self.published.append(event)

    def want_probe(self, provider: str, model: str, hold: float) -> None:
        self.probes.append((provider, model, hold))

    def want_lease(self, provider: str, kind: Any, limit: float, amount: float) -> bool:
        self.leases.append((provider, kind, limit, amount))
        return self.accept


async def start(
    nursery: trio.Nursery, upstream: Upstream, backend: Backend, **settings: object
) -> ProviderActor:
    actor = ProviderActor(
        provider(**settings).providers["p"],
        Metrics().provider("p"),
        wire=WIRE,
        http_transport=upstream.transport(),
        wall_clock=trio.current_time,  # wall and trio time agree: cross-process times are exact
        shared=backend,
    )
    await nursery.start(actor.run)
    return actor


async def send_attempt(actor: ProviderActor) -> trio.MemoryReceiveChannel[Reply]:
    send, receive = trio.open_memory_channel[Reply](16)
    await actor.inbox.send(Attempt(request(), send, trio.CancelScope()))
    return receive


async def outcome(receive: trio.MemoryReceiveChannel[Reply]) -> Reply:
    async with receive:
        while not isinstance(reply := await receive.receive(), TERMINAL):
            pass
    return reply


def pending(receive: trio.MemoryReceiveChannel[Reply]) -> bool:
    try:
        receive.receive_nowait()
    except trio.WouldBlock:
        return True
    return False


# --- the state classes ----------------------------------------------------------------------


def test_a_lease_is_asked_for_at_half_and_never_twice_at_once() -> None:
    lease = Lease(10)
    assert lease.wanted(1, now=0) == 10  # empty: ask for a whole lease
    assert lease.wanted(1, now=0) is None  # already asked
    lease.granted(10, None, now=0)
    assert [lease.take(1) for _ in range(5)] == [True] * 5
    assert lease.wanted(1, now=0) == 10  # 5 left: half a lease, ask for the next now
    lease.granted(10, None, now=0)
    assert lease.balance == 15  # the most one replica ever holds: 1.5 leases
    assert lease.wanted(30, now=0) == 15  # what is waiting needs more than a lease
    lease.granted(0, 12.5, now=100)
    assert lease.wanted(1, now=112) is None  # the shared window is full until 112.5
    assert lease.wanted(30, now=112.5) == 15
    assert not lease.take(16) and lease.take(15) and lease.balance == 0


def test_a_merged_block_keeps_the_later_end_and_the_higher_strikes() -> None:
    limits = RateLimits(RateLimitPolicy())
    until = limits.block("m", now=0, retry_after=None)  # 60 s, strike 1
    assert until == 60
    assert not limits.merge("m", 30, 1, now=1)  # learned already
    assert limits.merge("m", 90, 3, now=1)
    assert limits.blocked_until("m", now=1) == 90 and limits.strikes("m") == 3
    assert limits.block("m", now=100, retry_after=None) == 100 + 480  # strike 4: 60 x 2^3


def test_a_shared_half_open_circuit_waits_for_the_deployments_probe() -> None:
    circuits = Circuits(CircuitPolicy(failures=1, window=60, open_for=10), 16)
    circuits.shared = True
    assert circuits.failure("m", now=0)
    assert not circuits.ask_probe("m", now=5, hold=30)  # still open
    assert circuits.admit("m", now=10) == (False, None)  # half-open, no grant
    assert circuits.ask_probe("m", now=10, hold=30)
    assert not circuits.ask_probe("m", now=20, hold=30)  # asked; the answer is on its way
    circuits.grant("m", False)  # another replica probes
    assert circuits.admit("m", now=21) == (False, None)
    assert circuits.ask_probe("m", now=40, hold=30)  # no news for `hold`: ask again
    circuits.grant("m", True)
    assert circuits.admit("m", now=41) == (True, None)  # the one probe
    assert circuits.admit("m", now=41) == (False, None)
    assert circuits.success("m")  # closes: to be published
    assert not circuits.success("m")  # already closed: nothing to publish


# --- the actor ----------------------------------------------------------------------------------


async def test_what_the_actor_learns_is_published_in_wall_clock_time(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    backend = Backend()
    upstream = Upstream(status(429, headers={"retry-after": "30"}), status(500), status(500), ok())
    actor = await start(
        nursery, upstream, backend, max_retries=0, circuit={"failures": 2, "open_for": "10s"}
    )
    await trio.sleep(100)
    await attempt(actor, request())
    assert backend.published == [BlockLearned("p", "rate_limited", "m", 130.0, 1, "", 100.0)]
    await trio.sleep(40)  # the block is over
    await attempt(actor, request())
    await attempt(actor, request())
    assert backend.published[1:] == [CircuitChanged("p", "m", True, 150.0, 140.0)]


async def test_a_block_from_a_peer_refuses_until_its_end(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    upstream = Upstream(ok())
    actor = await start(nursery, upstream, Backend())
    await actor.inbox.send(BlockLearned("p", "rate_limited", "m", 30.0, 1, "", 0.0))
    [refusal] = await attempt(actor, request())
    assert refusal == Refused("rate_limited", 30.0)
    await actor.inbox.send(BlockLearned("p", "manual", "*", 50.0, 0, "maintenance", 0.0))
    await trio.sleep(35)
    [refusal] = await attempt(actor, request())
    assert refusal == Refused("manual", 50.0)
    await actor.inbox.send(BlockLifted("p", "manual", None, 35.0))
    replies = await attempt(actor, request())
    assert isinstance(replies[-1], Response) and upstream.calls[0].time == 35
    snapshot = await actor.ask_snapshot()
    assert snapshot.shared == {
        "up": False,
        "events_received": 3,
        "last_lag_ms": 0.0,
        "last_event_at": 35.0,
    }


async def test_a_peers_circuit_opens_here_and_only_the_granted_replica_probes(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    backend = Backend()
    upstream = Upstream(ok())
    actor = await start(nursery, upstream, backend, circuit={"open_for": "10s"})
    await actor.inbox.send(BackendState(True))
    await actor.inbox.send(CircuitChanged("p", "m", True, 10.0, 0.0))
    [refusal] = await attempt(actor, request())
    assert refusal == Refused("circuit_open", 10.0)
    await trio.sleep(10)
    [refusal] = await attempt(actor, request())  # half-open: ask for the probe
    assert refusal == Refused("circuit_probe")
    assert backend.probes == [("p", "m", 301.0)]  # held at most the total timeout + 1 s
    await actor.inbox.send(ProbeAnswer("m", True))
    replies = await attempt(actor, request())  # the probe
    assert isinstance(replies[-1], Response) and len(upstream.calls) == 1
    assert backend.published == [CircuitChanged("p", "m", False, 10.0, 10.0)]  # closed for all


async def test_an_empty_lease_parks_attempts_until_the_grant(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    backend = Backend()
    upstream = Upstream(ok())
    actor = await start(nursery, upstream, backend, limits={"rpm": 20})
    await actor.inbox.send(BackendState(True))
    waiting = [await send_attempt(actor) for _ in range(3)]
    await trio.testing.wait_all_tasks_blocked()
    assert all(pending(r) for r in waiting) and upstream.calls == []
    assert backend.leases == [("p", "rpm", 20, 2.0)]  # the first ask, at BackendState(up)
    await actor.inbox.send(LeaseAnswer("rpm", 2.0))
    first = [await outcome(r) for r in waiting[:2]]
    assert all(isinstance(r, Response) for r in first)
    await trio.testing.wait_all_tasks_blocked()
    assert pending(waiting[2])
    assert backend.leases[1:] == [("p", "rpm", 20, 2.0)]  # asked again, for the one waiting
    await actor.inbox.send(LeaseAnswer("rpm", 0.0, retry_in=42.0))  # the window is full
    assert await outcome(waiting[2]) == Refused("rpm", 42.0)
    assert len(upstream.calls) == 2


async def test_while_the_backend_is_down_limits_fail_open_or_closed(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    for fail_open in (True, False):
        backend = Backend(fail_open=fail_open)
        upstream = Upstream(ok())
        actor = await start(nursery, upstream, backend, limits={"rpm": 20})
        await actor.inbox.send(BackendState(True))
        parked = await send_attempt(actor)
        await actor.inbox.send(BackendState(False))  # the grant never comes: Redis went away
        reply = await outcome(parked)
        if fail_open:  # this replica's own count
            assert isinstance(reply, Response)
        else:
            assert reply == Refused("limits_unavailable")
        actor.close()


async def test_a_lease_ask_that_cannot_be_queued_does_not_park(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    backend = Backend(accept=False)
    upstream = Upstream(ok())
    actor = await start(nursery, upstream, backend, limits={"rpm": 20})
    await actor.inbox.send(BackendState(True))
    replies = await attempt(actor, request())
    assert isinstance(replies[-1], Response)  # fail open, at once


async def test_a_latency_block_is_published_and_a_peers_one_honoured(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    backend = Backend()
    upstream = Upstream(ok(delay=2.0))
    actor = await start(
        nursery,
        upstream,
        backend,
        latency={"threshold": "1s", "min_triggers": 1, "window": "1m", "block": "30s"},
    )
    await attempt(actor, request())  # slow: trips the trigger here
    assert backend.published == [BlockLearned("p", "latency", "m", 32.0, 0, "", 2.0)]
    other = await start(nursery, Upstream(ok()), Backend(), latency={"threshold": "1s"})
    await other.inbox.send(backend.published[0])  # what Redis delivers to the other replica
    [refusal] = await attempt(other, request())
    assert refusal == Refused("latency", 32.0)
