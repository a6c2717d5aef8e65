"""Resuming a stream whose provider failed after its first byte (a route's `resume`,
docs/failure-semantics.md "Resuming a stream").

`Resumer` is a request's: the pipeline wraps the client's writer with it (`writer`), and the
relay calls it when the stream breaks. It cancels the failed attempt, sends the request again
with the text relayed so far as the start of the assistant's turn to the route's other targets
that can continue a prefix (a cascade of its own, within the request's deadline, whose 4xx
answers are skipped), and gives the relay the continuation and the writer that splices it in.
"""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack

import attrs
import trio

from actors.wire import Usage
from router.cascade.dispatcher import CascadeError, ChatJob, Dispatch, Winner
from router.config import Target
from router.dialects import resume
from router.dialects.base import ClientRequest, Dialect, StreamWriter, UpstreamCall
from router.dialects.bodies import UpstreamBodies
from router.errors import Untranslatable
from router.face.answers import Delivery, Resumes
from router.face.gateway import Gateway

log = logging.getLogger("cascade.request")


class Resumer:
    """One streamed request's resumes. `stack` holds the continuations' cascades: they end
    (their attempts cancelled) with the request."""

    def __init__(
        self,
        gateway: Gateway,
        face: Dialect,
        request: ClientRequest,
        job: ChatJob,
        dispatch: Dispatch,
        delivery: Delivery,
        stack: AsyncExitStack,
    ) -> None:
        self.gateway = gateway
        self.face = face
        self.request = request
        self.job = job
        self.current = dispatch  # the cascade whose attempt streams now
        self.delivery = delivery
        self.record = delivery.resumes = Resumes()
        self.stack = stack
        self.first = ""  # the first attempt's upstream dialect: what the writer reads
        self.observed: resume.Observed | None = None
        self.failed: list[Target] = []  # targets whose stream broke: not tried again
        self.done = 0  # resumes made
        self.counted = 0  # characters of the transcript's text already carried over

    def writer(self, upstream: Dialect, base: StreamWriter) -> StreamWriter:
        """The client's writer, read by a transcript (when the upstream's streams can be)."""
        transcript = resume.transcript(upstream.name)
        if transcript is None:
            return base
        self.first, self.observed = upstream.name, resume.Observed(base, transcript)
        return self.observed

    async def __call__(self, kind: str) -> tuple[Winner, StreamWriter] | None:
        policy = self.job.route.resume
        winner = self.current.winner
        assert policy is not None and winner is not None
        if kind not in policy.on:
            return None
        why_not = self._why_not(winner.target, policy.max)
        if why_not is not None:
            self._note(winner.target, None, "not_resumable", why_not)
            return None
        self.current.run.cancel_all()  # the failed attempt ends now, wherever it is
        self.failed.append(winner.target)
        assert self.observed is not None
        text, lead = resume.split_prefill(self.observed.transcript.text)
        dispatch = self.gateway.dispatcher.dispatch(self._job(text))
        self.record.cascades.append(dispatch)
        try:
            continuation = await self.stack.enter_async_context(dispatch)
        except CascadeError as exc:
            self._note(winner.target, None, "failed", exc.message)
            return None
        self._carry_over(winner.target, continuation.target)
        self.current, self.done = dispatch, self.done + 1
        self._note(winner.target, continuation.target, "resumed", f"after {len(text)} chars")
        then = self.gateway.dialects[continuation.target.provider].name
        convert = resume.to_dialect(self.first, then)
        splice = self.observed.transcript.splice(lead)
        return continuation, resume.Continued(self.observed, convert, splice)

    def _why_not(self, failed: Target, most: int) -> str | None:
        if self.observed is None:
            dialect = self.gateway.dialects[failed.provider].name
            return f"a stream from a {dialect} provider is not resumed"
        if self.observed.transcript.why_not is not None:
            return self.observed.transcript.why_not
        if (self.request.obj.get("n") or 1) > 1:
            return "more than one choice"
        if self.done >= most:
            return f"resume.max ({most}) reached"
        if trio.current_time() >= self.job.deadline:
            return "the deadline has passed"
        return None

    def _job(self, text: str) -> ChatJob:
        """The continuation's cascade: the route's other targets, no hedge, the same deadline."""
        request = resume.prefilled(self.face, self.request, text) if text else self.request
        gateway, route = self.gateway, self.job.route
        bodies = UpstreamBodies(request, self.face, gateway.dialects, gateway.config.providers)

        def call_for(target: Target) -> UpstreamCall:
            provider = gateway.config.providers[target.provider]
            mode = provider.continues
            if mode == "none":
                raise Untranslatable(
                    f"{target.provider} cannot continue an answer (its prefill is 'none')"
                )
            # the request's own call first: what the target could not take then, it cannot now,
            # and the client headers it was sent (e.g. anthropic-beta) go with the continuation
            headers = self.job.call_for(target).headers
            call = attrs.evolve(bodies.call_for(target), headers=headers)
            if text and gateway.dialects[target.provider].name == "openai":
                call = attrs.evolve(call, body=resume.prefill_for(mode, call.body))
            return call

        def others(targets: tuple[Target, ...]) -> tuple[Target, ...]:
            return tuple(t for t in targets if t not in self.failed)

        return attrs.evolve(
            self.job,
            route=attrs.evolve(
                route,
                targets=others(route.targets),
                alternatives=others(route.alternatives),
                hedge=None,
            ),
            call_for=call_for,
            estimated_tokens=request.estimated_tokens,
            continuation=True,
        )

    def _carry_over(self, failed: Target, then: Target) -> None:
        """What the failed attempt used, for the key's charge and the operator's bill: its
        reported input (else the estimate) and the content it relayed / 4."""
        delivery = self.delivery
        assert self.observed is not None
        text = len(self.observed.transcript.text)  # every attempt's so far: this one's is new
        relayed, self.counted = (text - self.counted) // 4, text
        reported = delivery.usage.input if delivery.usage is not None else 0
        used = Usage(reported or self.request.estimated_input_tokens, relayed)
        earlier = self.record.earlier
        self.record.earlier = Usage(earlier.input + used.input, earlier.output + used.output)
        if delivery.count is not None:  # a keyed stream: billed like a cut one
            known_input = self.gateway.dialects[failed.provider].input_at_start
            unseen = used.output + (0 if known_input else used.input)
            self.gateway.metrics.bill(failed.provider, "failed", unseen)
            delivery.content, delivery.count = 0, self.gateway.dialects[then.provider].content_chars
        delivery.usage = None

    def _note(self, failed: Target, to: Target | None, outcome: str, detail: str) -> None:
        self.gateway.metrics.resumes.labels(self.job.route_name, outcome).inc()
        self.record.tried.append(
            {"from": str(failed), "to": str(to) if to is not None else None,
             "outcome": outcome, "detail": detail}
        )  # fmt: skip
        log.info("request %s: stream of %s broke; %s (%s)", self.job.request_id, failed,
                 "resumed on " + str(to) if to is not None else outcome.replace("_", " "), detail)  # fmt: skip
