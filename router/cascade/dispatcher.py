"""The cascade: one request's walk over its route's targets, within one deadline.

`Dispatcher.dispatch` is an async context manager. Inside it the request has a winner: a complete
answer, or a stream whose first events are in hand (the commit point). Leaving it cancels every
attempt the request started, wherever it is, so a client that goes away takes its upstream calls
with it. The loop below is modelled on trio's happy eyeballs: attempts start one at a time; a hedge
starts another when the first is slow; the first success wins and the rest are cancelled.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Mapping

import attrs
import trio

from actors.machines import SlidingWindow
from actors.messages import (
    Attempt,
    Demand,
    Failed,
    Refused,
    Reply,
    Response,
    StreamStart,
    UpstreamRequest,
)
from actors.outcome import Failure, Kind
from actors.provider import ProviderActor
from router.cascade.policy import Action, Decision, Plan, backoff_delay, decide
from router.config import Config, Route, Target
from router.dialects.base import UpstreamCall
from router.errors import Untranslatable
from router.telemetry.metrics import Metrics

log = logging.getLogger("cascade.dispatch")

REPLY_BUFFER = 16
_RATE_LIMIT_REFUSALS = ("rate_limited", "rpm", "tpm")


@attrs.frozen
class AttemptRecord:
    """One line of the `attempts` list a client sees when the cascade fails."""

    provider: str
    model: str
    status: int | None
    error_type: str
    elapsed_ms: float
    reason: str | None = None  # why an ineligible target was skipped (no call was made)

    def to_json(self) -> dict[str, object]:
        out = attrs.asdict(self)
        if self.reason is None:
            del out["reason"]
        return out


class CascadeError(Exception):
    """The cascade ended without a success. `status` and `attempts` go to the client."""

    def __init__(
        self,
        status: int,
        error_type: str,
        message: str,
        attempts: list[AttemptRecord],
        *,
        retry_after: float | None = None,
        upstream: Response | None = None,
        calls: int = 0,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.param = param  # the field at fault, when the client's request is
        self.code = code or error_type
        self.status = status
        self.error_type = error_type
        self.message = message
        self.attempts = attempts
        self.retry_after = retry_after
        self.upstream = upstream  # the provider's own answer, returned as it is (4xx)
        self.calls = calls  # upstream calls made (refusals in `attempts` are not calls)


@attrs.frozen
class ChatJob:
    """What the dispatcher needs from a client request, dialect-free."""

    route_name: str
    route: Route
    # path and body for a target, in its dialect; Untranslatable: the target cannot take this
    # request (another dialect, a field it has no equivalent for) and is skipped
    call_for: Callable[[Target], UpstreamCall]
    stream: bool
    estimated_tokens: int
    request_id: str
    deadline: float  # trio time
    # A resumed stream's continuation (docs/failure-semantics.md): a target that refuses the
    # request (a 4xx: e.g. it rejects the prefill) is skipped to the next one, not returned
    continuation: bool = False


@attrs.define
class _Live:
    """An attempt this request started: cancelling `scope` ends its upstream call."""

    target: Target
    scope: trio.CancelScope
    replies: trio.MemoryReceiveChannel[Reply]
    demand: Demand  # the relaying task says when it wants more of a stream
    started: float
    hedge_token: list[float] | None  # set for a hedge: its share of the route's hedge budget


@attrs.define
class Winner:
    """The attempt that answered. For a stream, `replies` carries the rest of it; its relaying
    task calls `demand.want()` each time it waits for more (actors/messages.py)."""

    target: Target
    reply: Response | StreamStart
    replies: trio.MemoryReceiveChannel[Reply]
    demand: Demand
    attempt_count: int  # upstream calls made (refusals are not calls)
    replied_at: float  # trio time the winning reply (the answer, or a stream's first events) came
    started: float  # trio time the winning attempt started
    skipped: tuple[str, ...] = ()  # "provider/model" of the targets that could not take it


class Dispatcher:
    def __init__(
        self,
        config: Config,
        actors: Mapping[str, ProviderActor],
        metrics: Metrics,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.actors = actors
        self.metrics = metrics
        self.rng = rng or random.Random()
        self._hedge_budgets: dict[str, HedgeBudget] = {}

    def dispatch(self, job: ChatJob) -> Dispatch:
        """`async with dispatcher.dispatch(job) as winner:` (see the module docstring)."""
        return Dispatch(_Run(self, job))

    def hedge_budget(self, route_name: str) -> HedgeBudget:
        return self._hedge_budgets.setdefault(route_name, HedgeBudget())


class Dispatch:
    """The context manager `Dispatcher.dispatch` returns (a class: it runs once per request)."""

    __slots__ = ("run", "winner")

    def __init__(self, run: _Run) -> None:
        self.run = run
        self.winner: Winner | None = None  # once the cascade has one

    @property
    def calls(self) -> int:
        """Upstream calls made so far (refusals are not calls), however the request ends."""
        return self.run.attempt_count

    @property
    def attempts(self) -> list[AttemptRecord]:
        """The attempts that did not win (failures and refusals), in order."""
        return self.run.attempts

    async def __aenter__(self) -> Winner:
        try:
            self.winner = await self.run.first_byte()
            return self.winner
        except BaseException:
            self.run.cancel_all()
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        self.run.cancel_all()


class HedgeBudget:
    """Hedged requests of one route may be at most `share` of its requests (rolling minute), plus
    `minimum` hedges a minute so that a quiet route hedges at all (as a retry budget's floor)."""

    def __init__(self) -> None:
        self._requests = SlidingWindow(60.0)
        self._hedges = SlidingWindow(60.0)

    def count_request(self, now: float) -> None:
        self._requests.add(now, 1)

    def take(self, now: float, share: float, minimum: int) -> list[float] | None:
        """A hedge, if the budget has room: a token to `give_back` if it is not used."""
        self._requests.expire(now)
        self._hedges.expire(now)
        if self._hedges.total + 1 > max(minimum, share * self._requests.total):
            return None
        return self._hedges.add(now, 1)

    def give_back(self, token: list[float]) -> None:
        self._hedges.correct(token, 0)


class _Run:
    """The state of one request's cascade."""

    def __init__(self, dispatcher: Dispatcher, job: ChatJob) -> None:
        self.d = dispatcher
        self.job = job
        route = job.route
        self.plan = Plan(route.targets + route.alternatives)
        self.retry = dispatcher.config.retry
        self.max_attempts = self.retry.max_attempts
        self.attempts: list[AttemptRecord] = []
        self.failures: list[Failure | Refused] = []
        self.ineligible: list[Untranslatable] = []  # targets skipped: they cannot take it
        self.attempt_count = 0
        self.live: list[_Live] = []
        self.last_failure_at: dict[Target, float] = {}
        self.retry_after: dict[Target, float] = {}
        self.backoff_counts: dict[object, int] = {}
        self.last_delay = 0.0
        self.hedges = 0
        self.deadline_hit = False
        self.winner: _Live | None = None

    # --- the loop -----------------------------------------------------------------------------

    async def first_byte(self) -> Winner:
        job = self.job
        winner: Winner | None = None
        verdict: CascadeError | None = None
        with trio.CancelScope(deadline=job.deadline) as deadline_scope:
            if job.route.hedge is None:
                winner = await self._sequential()
            else:
                self.d.hedge_budget(job.route_name).count_request(trio.current_time())
                async with trio.open_nursery() as nursery:
                    try:
                        winner = await self._hedged(nursery)
                    except CascadeError as exc:  # raised outside the nursery, not in a group
                        verdict = exc
                    nursery.cancel_scope.cancel()
        if verdict is not None:
            raise verdict
        if deadline_scope.cancelled_caught:
            self.deadline_hit = True
            for live in self.live:
                self._record(live.target, None, "deadline", live.started)
            raise self._exhausted()
        assert winner is not None
        return winner

    async def _sequential(self) -> Winner:
        """One attempt at a time (no hedging): the common path, with no extra tasks."""
        while True:
            nxt = await self._next_target()
            if nxt is None:
                raise self._exhausted()
            live = await self._launch(*nxt)
            reply = await live.replies.receive()
            self.live.remove(live)
            winner = self._judge(live, reply)
            if winner is not None:
                return winner

    async def _hedged(self, nursery: trio.Nursery) -> Winner:
        """Like `_sequential`, but a timer may start a second attempt beside the first.

        Each attempt's first reply is forwarded by a small task into one channel, which the loop
        waits on with the hedge timer as its deadline.
        """
        results, outcomes = trio.open_memory_channel[tuple[_Live, Reply]](REPLY_BUFFER)
        hedge_at = math.inf
        while True:
            if not self.live:
                nxt = await self._next_target()
                if nxt is None:
                    raise self._exhausted()
                hedge_at = await self._start_watched(nursery, results, *nxt)
                continue
            if trio.current_time() >= hedge_at:
                try:  # an answer that arrived at the same instant beats the hedge timer
                    outcome = outcomes.receive_nowait()
                except trio.WouldBlock:
                    hedge_at = await self._hedge(nursery, results)
                    continue
            else:
                with trio.move_on_at(hedge_at) as timer:
                    outcome = await outcomes.receive()
                if timer.cancelled_caught:
                    continue
            live, reply = outcome
            self.live.remove(live)
            winner = self._judge(live, reply)
            if winner is not None:
                return winner
            if isinstance(reply, Refused) and live.hedge_token is not None:
                # A blocked target is not hedged to: give the hedge back and try the next one.
                self.d.hedge_budget(self.job.route_name).give_back(live.hedge_token)
                self.hedges -= 1
                hedge_at = trio.current_time()

    async def _start_watched(
        self,
        nursery: trio.Nursery,
        results: trio.MemorySendChannel[tuple[_Live, Reply]],
        target: Target,
        call: UpstreamCall,
        hedge_token: list[float] | None = None,
    ) -> float:
        """Launch an attempt whose first reply goes to `results`; returns when to hedge next."""
        live = await self._launch(target, call, hedge_token)
        nursery.start_soon(_first_reply, live, results)
        hedge = self.job.route.hedge
        assert hedge is not None
        if self.hedges >= hedge.max:
            return math.inf
        delay = hedge.after
        if delay is None:
            delay = await self._p95(self.d.actors[target.provider])
        return live.started + delay

    async def _hedge(
        self, nursery: trio.Nursery, results: trio.MemorySendChannel[tuple[_Live, Reply]]
    ) -> float:
        """Start a hedge on the next fresh target, if the route allows one now."""
        hedge = self.job.route.hedge
        assert hedge is not None
        if self.hedges >= hedge.max or self.attempt_count >= self.max_attempts:
            return math.inf
        budget = self.d.hedge_budget(self.job.route_name)
        token = budget.take(trio.current_time(), hedge.budget, hedge.min_hedges)
        target = self.plan.pop_fresh() if token is not None else None
        call = None
        while target is not None and (call := self._call(target)) is None:
            target = self.plan.pop_fresh()
        if target is None or call is None:
            if token is not None:
                budget.give_back(token)
            self.d.metrics.hedges.labels(self.job.route_name, "skipped").inc()
            return math.inf
        self.hedges += 1
        return await self._start_watched(nursery, results, target, call, token)

    async def _next_target(self) -> tuple[Target, UpstreamCall] | None:
        """The next target to try (sequentially) and its call, after its backoff; None when none
        is left."""
        while self.plan:
            if self.attempt_count >= self.max_attempts:
                return None
            target = self.plan.pop()
            call = self._call(target)
            if call is None:
                continue
            retries = self.plan.retries.get(target, 0)
            failed_at = self.last_failure_at.get(target)
            if retries and failed_at is not None:
                backoff_end = failed_at + self._backoff(target, retries)
                wake = max(backoff_end, failed_at + self.retry_after.get(target, 0.0))
                if wake > self.job.deadline:
                    # It cannot be tried in time; the others may. A backoff cut by the deadline
                    # makes the answer a 504; a Retry-After beyond it is a rate limit (429).
                    self.deadline_hit = self.deadline_hit or backoff_end > self.job.deadline
                    continue
                if wake > trio.current_time():
                    try:
                        await trio.sleep_until(wake)
                    except trio.Cancelled:
                        self.d.metrics.cancelled.labels(target.provider, "backoff").inc()
                        raise
            return target, call
        return None

    def _call(self, target: Target) -> UpstreamCall | None:
        """The call to make on `target`; None when the target cannot take this request (it is
        recorded as an ineligible attempt, with its reason, and the cascade goes on)."""
        try:
            return self.job.call_for(target)
        except Untranslatable as exc:
            self.plan.mark_tried(target)
            self.ineligible.append(exc)
            self.attempts.append(
                AttemptRecord(target.provider, target.model, None, "ineligible", 0.0, exc.message)
            )
            log.info("request %s: %s skipped (%s)", self.job.request_id, target, exc.message)
            return None

    def _backoff(self, target: Target, retry_number: int) -> float:
        scope = self.retry.backoff.scope
        key: object = (
            target if scope == "model" else target.provider if scope == "provider" else None
        )
        n = self.backoff_counts[key] = self.backoff_counts.get(key, 0) + 1
        self.last_delay = backoff_delay(self.retry.backoff, n, self.last_delay, self.d.rng)
        return self.last_delay

    async def _launch(
        self, target: Target, call: UpstreamCall, hedge_token: list[float] | None = None
    ) -> _Live:
        """Send one Attempt to the target's actor; its replies arrive on the returned `_Live`."""
        job = self.job
        is_retry = target in self.plan.retries
        self.plan.mark_tried(target)
        send, receive = trio.open_memory_channel[Reply](REPLY_BUFFER)
        demand = Demand()
        live = _Live(target, trio.CancelScope(), receive, demand, trio.current_time(), hedge_token)
        request = UpstreamRequest(
            path=call.path,
            body=call.body,
            model=target.model,
            stream=job.stream,
            estimated_tokens=job.estimated_tokens,
            request_id=job.request_id,
            headers=call.headers,
            check_start=call.check_start,
        )
        self.live.append(live)
        attempt = Attempt(request, send, live.scope, is_retry, demand)
        inbox = self.d.actors[target.provider].inbox
        try:
            try:  # no scheduling round unless the inbox is full: the reply wait yields anyway
                inbox.send_nowait(attempt)
            except trio.WouldBlock:
                await inbox.send(attempt)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            send.send_nowait(Refused("stopped"))
        return live

    async def _p95(self, actor: ProviderActor) -> float:
        hedge = self.job.route.hedge
        assert hedge is not None
        p95 = (await actor.ask_snapshot()).ttfb_p95
        return min(
            hedge.max_delay, max(hedge.min_delay, p95 if p95 is not None else hedge.max_delay)
        )

    # --- judging replies ----------------------------------------------------------------------

    def _judge(self, live: _Live, reply: Reply) -> Winner | None:
        """A reply to an attempt: the winner, or None (refused or failed: the cascade goes on);
        a failure that must go back to the client raises it."""
        if isinstance(reply, Refused):
            self._refused(live, reply)
            return None
        self.attempt_count += 1
        failure = reply.failure if isinstance(reply, Failed) else None
        if failure is None and isinstance(reply, Response | StreamStart):
            return self._win(live, reply)  # (`attempts` is only read when the cascade fails)
        assert failure is not None
        self._failed(live, failure)
        decision = decide(failure, self.retry)
        if decision.max_attempts is not None:
            self.max_attempts = min(self.max_attempts, decision.max_attempts)
        self._follow(live.target, failure, reply, decision)
        return None

    def _refused(self, live: _Live, reply: Refused) -> None:
        live.scope.cancel()
        self._record(live.target, None, f"refused:{reply.reason}", live.started)
        self.failures.append(reply)
        until = "" if reply.until is None else f" for {reply.until - trio.current_time():.1f} s"
        log.info(
            "request %s: %s skipped (%s%s)", self.job.request_id, live.target, reply.reason, until
        )

    def _failed(self, live: _Live, failure: Failure) -> None:
        """Record a failed attempt (and count a rate limit)."""
        target = live.target
        live.scope.cancel()
        self._record(target, failure.status, failure.error_type, live.started)
        self.failures.append(failure)
        if failure.kind is Kind.RATE_LIMITED:
            # Label values from the config only: a direct address's model is the client's.
            model = "*" if self.job.route.direct else target.model
            self.d.metrics.rate_limits.labels(target.provider, model).inc()
        self.last_failure_at[target] = trio.current_time()
        if failure.retry_after is not None:
            self.retry_after[target] = failure.retry_after

    def _follow(self, target: Target, failure: Failure, reply: Reply, decision: Decision) -> None:
        """Do what the policy decided for a failure: return it, go to the larger-context targets,
        retry the target, or fail over."""
        action = decision.action
        overflow = self.job.route.on_context_overflow
        if self.job.continuation and action in (Action.RETURN, Action.CONTEXT_OVERFLOW):
            # the client already has half an answer: nothing to return it, only other targets
            self._log_failure(target, failure, "refused the continuation, failing over")
            return
        if action is Action.RETURN or (action is Action.CONTEXT_OVERFLOW and not overflow):
            self._log_failure(target, failure, "returned to the client")
            raise self._returned(failure, reply)
        if action is Action.CONTEXT_OVERFLOW:
            self.plan.replace(overflow)
            self._log_failure(target, failure, "going to the larger-context targets")
            return
        retried = action is Action.RETRY and self.plan.retry(
            target, decision.strategy, self.d.config.providers[target.provider].max_retries
        )
        if not self.plan or self.attempt_count >= self.max_attempts:
            next_step = "no attempt left"  # what the log says is what happens next
        else:
            next_step = "will retry it" if retried else "failing over"
        self._log_failure(target, failure, next_step)

    def _log_failure(self, target: Target, failure: Failure, next_step: str) -> None:
        log.info(
            "request %s: %s failed (%s), %s",
            self.job.request_id,
            target,
            failure.error_type,
            next_step,
        )

    def _win(self, live: _Live, reply: Response | StreamStart) -> Winner:
        job = self.job
        route_name = job.route_name
        if self.hedges:
            outcome = "won" if live.hedge_token is not None else "lost"
            self.d.metrics.hedges.labels(route_name, outcome).inc()
        for other in self.live:
            other.scope.cancel()
        if live.target != (job.route.targets[0] if job.route.targets else None):
            self.d.metrics.failovers.labels(route_name).inc()
            if live.target in job.route.alternatives:
                primary = job.route.targets[0].provider if job.route.targets else "-"
                self.d.metrics.alternatives.labels(
                    primary, live.target.provider, live.target.model
                ).inc()
        # The winner leaves the live list: its scope is cancelled when the request is done.
        self.winner = live
        now = trio.current_time()
        skipped = _skipped(self.attempts) if self.ineligible else ()
        return Winner(
            live.target,
            reply,
            live.replies,
            live.demand,
            self.attempt_count,
            now,
            live.started,
            skipped,
        )

    def _record(self, target: Target, status: int | None, error_type: str, started: float) -> None:
        elapsed = (trio.current_time() - started) * 1000
        self.attempts.append(
            AttemptRecord(target.provider, target.model, status, error_type, round(elapsed, 1))
        )

    def _returned(self, failure: Failure, reply: Reply) -> CascadeError:
        upstream = reply.response if isinstance(reply, Failed) else None
        if failure.kind is Kind.AUTH:
            # Never hand the provider's auth error to the client: it may echo part of our key.
            return CascadeError(
                502,
                "upstream_auth_error",
                "a provider rejected Cascade's credentials; the operator must fix its API key",
                self.attempts,
                calls=self.attempt_count,
            )
        status = failure.status or 502
        return CascadeError(
            status,
            failure.error_type,
            failure.message,
            self.attempts,
            upstream=upstream,
            calls=self.attempt_count,
        )

    def _exhausted(self) -> CascadeError:
        if self.ineligible and not self.failures and not self.deadline_hit:
            return self._nobody_can()
        limited = [f for f in self.failures if _is_rate_limit(f)]
        if self.failures and len(limited) == len(self.failures) and not self.deadline_hit:
            untils = [u for u in (_until(f) for f in limited) if u is not None]
            retry_after = max(0.0, min(untils) - trio.current_time()) if untils else None
            return CascadeError(
                429,
                "retry_exhausted",
                "every target is rate limited",
                self.attempts,
                retry_after=retry_after,
                calls=self.attempt_count,
            )
        return self._failed_everywhere()

    def _nobody_can(self) -> CascadeError:
        """Every target was skipped as unable to take the request: the client's 400, naming
        the field and the targets (no call was made)."""
        reasons = "; ".join(
            f"{a.provider}/{a.model}: {a.reason}"
            for a in self.attempts
            if a.error_type == "ineligible"
        )
        first = self.ineligible[0]
        return CascadeError(
            400,
            "invalid_request_error",
            f"no target of this route can take this request ({reasons})",
            self.attempts,
            calls=0,
            param=first.param,
            code="no_eligible_target",
        )

    def _failed_everywhere(self) -> CascadeError:
        """Exhausted, not only by rate limits: 504 when the last failure was a timeout (or the
        deadline passed), else 502."""
        last = self.failures[-1] if self.failures else None
        timed_out = self.deadline_hit or (isinstance(last, Failure) and last.timeout)
        status = 504 if timed_out else 502
        message = (
            "the deadline passed before any target answered"
            if self.deadline_hit
            else ("every target failed" if self.failures else "no target could be tried")
        )
        return CascadeError(
            status, "retry_exhausted", message, self.attempts, calls=self.attempt_count
        )

    def cancel_all(self) -> None:
        for live in self.live:
            live.scope.cancel()
            live.replies.close()
        if self.winner is not None:
            self.winner.scope.cancel()
            self.winner.replies.close()


async def _first_reply(live: _Live, results: trio.MemorySendChannel[tuple[_Live, Reply]]) -> None:
    """Wait for an attempt's first reply and hand it to the loop."""
    try:
        reply = await live.replies.receive()
    except (trio.EndOfChannel, trio.ClosedResourceError):
        return
    await results.send((live, reply))


def _skipped(attempts: list[AttemptRecord]) -> tuple[str, ...]:
    return tuple(f"{a.provider}/{a.model}" for a in attempts if a.error_type == "ineligible")


def _is_rate_limit(f: Failure | Refused) -> bool:
    if isinstance(f, Refused):
        return f.reason in _RATE_LIMIT_REFUSALS
    return f.kind is Kind.RATE_LIMITED


def _until(f: Failure | Refused) -> float | None:
    return f.until
