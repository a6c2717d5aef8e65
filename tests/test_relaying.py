"""The relaying task of a stream (router/face/answers.py): how many scheduling rounds it takes."""

from __future__ import annotations

from typing import Any

import trio

from actors.messages import Demand, Reply, StreamEnd, StreamEvents
from actors.sse import SSEEvent
from router.dialects.openai import Stream
from router.face.answers import Delivery, _relay
from tests.helpers import TaskSteps, chunk


def _events(text: str) -> StreamEvents:
    return StreamEvents((SSEEvent(chunk(text)[len(b"data: ") : -2]),))


async def test_replies_queued_while_a_write_is_out_go_on_with_the_writes_round_only() -> None:
    """Replies the actor queued while the relaying task was writing are taken at once: each
    write is the one scheduling round of its turn (the server's write yields once), not a
    round to receive as well. Two writes, the second event and the end arriving during them:
    two rounds."""
    send_reply, replies = trio.open_memory_channel[Reply](16)
    arriving: list[Reply] = [_events("b"), StreamEnd(None)]
    written: list[bytes] = []

    async def send(message: dict[str, Any]) -> None:  # as the server's write: one round
        written.append(message["body"])
        send_reply.send_nowait(arriving.pop(0))  # what the actor hands on meanwhile
        await trio.lowlevel.cancel_shielded_checkpoint()

    send_reply.send_nowait(_events("a"))
    counter = TaskSteps.of_this_task()
    trio.lowlevel.add_instrument(counter)
    try:
        stop = await _relay(send, Stream(), replies, Demand(), Delivery(), [])
    finally:
        trio.lowlevel.remove_instrument(counter)
    assert stop.complete and stop.upstream_done
    assert [b'"content": "a"' in w for w in written] == [True, False]
    assert b'"content": "b"' in written[1]
    assert counter.steps == len(written) == 2
