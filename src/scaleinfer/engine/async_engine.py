"""AsyncEngine: drives an LLMEngine in a background thread for asyncio callers (the HTTP server).

    caller (asyncio)  --add/abort commands-->  engine thread: step() in a loop
                      <--RequestOutput via per-request asyncio.Queue--

The engine thread owns the LLMEngine; other threads only enqueue commands. If the loop dies, every
stream ends with EngineDeadError and new requests are refused.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable

from scaleinfer.config import EngineConfig
from scaleinfer.engine.engine import LLMEngine
from scaleinfer.errors import EngineDeadError
from scaleinfer.request import RequestOutput
from scaleinfer.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_Command = Callable[[LLMEngine], object]


class AsyncEngine:
    def __init__(self, config: EngineConfig | None = None, engine: LLMEngine | None = None):
        self.engine = engine if engine is not None else LLMEngine(config or EngineConfig())
        self.tokenizer = self.engine.tokenizer
        self._commands: queue.Queue[tuple[_Command, concurrent.futures.Future]] = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = threading.Event()
        self._dead: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="scaleinfer-engine", daemon=True)
        self._thread.start()

    # ---- caller side ---------------------------------------------------------------------------
    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str | None = None, encoder_input=None,
                       keep_encoder_output: bool = False) -> AsyncIterator[RequestOutput]:
        """Stream cumulative RequestOutputs; leaving the iterator early (or cancellation) aborts.
        `encoder_input`, `keep_encoder_output`: an encoder-decoder model's (LLMEngine.add_request)."""
        request_id = request_id or await self._call(lambda e: e.new_request_id())
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), stream)
        finished = False
        try:
            await self._call(lambda e: e.add_request(request_id, prompt, params, encoder_input=encoder_input,
                                                     keep_encoder_output=keep_encoder_output))
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished and not self._stop.is_set():
                self._submit(lambda e: e.abort_request(request_id))

    async def abort(self, request_id: str) -> None:
        await self._call(lambda e: e.abort_request(request_id))

    async def call(self, fn: _Command):
        """Run fn(engine) on the engine thread (for stats and introspection)."""
        return await self._call(fn)

    def call_soon(self, fn: _Command) -> None:
        """Queue fn(engine) on the engine thread without waiting for it (from a cancelled task, say)."""
        self._submit(fn)

    async def _call(self, fn: _Command):
        return await asyncio.wrap_future(self._submit(fn))

    def _submit(self, fn: _Command) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if self._dead is not None:
            fut.set_exception(EngineDeadError(f"the engine stopped: {self._dead}"))
        elif self._stop.is_set():
            fut.set_exception(EngineDeadError("the engine is shutting down"))
        else:
            self._commands.put((fn, fut))
        return fut

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._commands.put((lambda e: None, concurrent.futures.Future()))
        self._thread.join(timeout)

    @property
    def is_dead(self) -> bool:
        return self._dead is not None

    # ---- engine thread -------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                block = not self.engine.has_unfinished_requests()
                self._run_commands(block)
                if self.engine.has_unfinished_requests():
                    for out in self.engine.step():
                        self._deliver(out.request_id, out)
        except BaseException as exc:  # noqa: BLE001 - report any death to every waiter
            logger.exception("engine loop died")
            self._dead = exc
            dead = EngineDeadError(f"the engine stopped: {exc}")
            for request_id in list(self._streams):
                self._deliver(request_id, dead)
            while not self._commands.empty():
                _, fut = self._commands.get_nowait()
                if fut.set_running_or_notify_cancel():
                    fut.set_exception(dead)

    def _run_commands(self, block: bool) -> None:
        try:
            fn, fut = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            # A caller that stopped waiting (its task was cancelled: a client went away) cancelled fut;
            # the command still runs (an add is followed by its abort), only its result is dropped.
            wanted = fut.set_running_or_notify_cancel()
            try:
                result = fn(self.engine)
            except Exception as exc:  # noqa: BLE001 - handed back to the caller
                if wanted:
                    fut.set_exception(exc)
            else:
                if wanted:
                    fut.set_result(result)
            try:
                fn, fut = self._commands.get_nowait()
            except queue.Empty:
                return

    def _deliver(self, request_id: str, item) -> None:
        target = self._streams.get(request_id)
        if target is not None:
            loop, stream = target
            try:
                loop.call_soon_threadsafe(stream.put_nowait, item)
            except RuntimeError:  # the caller's loop is closed
                pass
