"""AsyncEngine survives callers that stop waiting: a command whose future was cancelled (the awaiting
task was cancelled because its client disconnected) still runs, and the engine loop lives on.

Before the fix, the engine thread called set_result on the cancelled future, got InvalidStateError and
died: every later request was answered 503 (found by `scaleinfer bench soak` within a second)."""
from __future__ import annotations

import asyncio
import threading

from scaleinfer.engine.async_engine import AsyncEngine


class _IdleEngine:
    """The part of LLMEngine the AsyncEngine loop touches, with no requests ever."""

    tokenizer = None

    def __init__(self):
        self.calls: list[str] = []

    def has_unfinished_requests(self) -> bool:
        return False

    def step(self):
        return []


def test_a_cancelled_command_still_runs_and_the_engine_lives_on():
    engine = AsyncEngine(engine=_IdleEngine())  # type: ignore[arg-type]
    gate = threading.Event()
    try:
        async def main():
            blocker = asyncio.ensure_future(engine.call(lambda e: gate.wait(10)))  # holds the engine thread
            waiter = asyncio.ensure_future(engine.call(lambda e: e.calls.append("ran") or "result"))
            await asyncio.sleep(0.1)
            waiter.cancel()  # the caller goes away while its command is queued
            await asyncio.sleep(0.1)  # the loop passes the cancel on to the command's future
            assert waiter.cancelled()
            gate.set()
            await blocker
            return await asyncio.wait_for(engine.call(lambda e: list(e.calls)), 10)

        assert asyncio.run(main()) == ["ran"]
        assert not engine.is_dead
    finally:
        gate.set()
        engine.shutdown()


def test_a_failing_cancelled_command_does_not_kill_the_engine_either():
    engine = AsyncEngine(engine=_IdleEngine())  # type: ignore[arg-type]
    gate = threading.Event()

    def boom(e):
        raise ValueError("bad command")

    try:
        async def main():
            blocker = asyncio.ensure_future(engine.call(lambda e: gate.wait(10)))
            waiter = asyncio.ensure_future(engine.call(boom))
            await asyncio.sleep(0.1)
            waiter.cancel()
            await asyncio.sleep(0.1)
            gate.set()
            await blocker
            return await asyncio.wait_for(engine.call(lambda e: "alive"), 10)

        assert asyncio.run(main()) == "alive"
        assert not engine.is_dead
    finally:
        gate.set()
        engine.shutdown()
