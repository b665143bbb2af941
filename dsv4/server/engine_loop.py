"""AsyncEngine: the LLMEngine stepped by one background thread, one async stream per request.

The event loop never calls into the engine. It posts commands (add, abort) to an inbox; the
engine thread drains the inbox between steps, steps while any request is unfinished, and
hands each request's cumulative outputs to that request's asyncio queue. So a step never
blocks the event loop, and adding or aborting never races a step.

Admission control: at most `max_num_seqs + max_queue` sequences (a request with n samples
counts n) may be accepted and unfinished; beyond that `add` raises QueueFullError (HTTP 429).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from dsv4.engine.llm_engine import LLMEngine
from dsv4.engine.request import RequestOutput
from dsv4.engine.sampling_params import SamplingParams

log = logging.getLogger("dsv4.server")


class QueueFullError(Exception):
    """The server holds as many requests as it may; retry after `retry_after_s` seconds."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineStoppedError(Exception):
    """The engine is shutting down (or failed); the request was not or will not be finished."""


@dataclass
class _Add:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    stream: RequestStream


@dataclass
class _Abort:
    request_id: str


class RequestStream:
    """The outputs of one accepted request, as an async iterator of cumulative RequestOutputs.

    Leaving the iteration early (a client disconnect, a cancelled task) aborts the request and
    frees its cache; `aclose()` does the same explicitly.
    """

    def __init__(self, owner: AsyncEngine, request_id: str, num_seqs: int) -> None:
        self.owner = owner
        self.request_id = request_id
        self.num_seqs = num_seqs
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.accepted: asyncio.Future[None] = self.loop.create_future()
        self.finished = False
        self.released = False  # its sequences were given back to the admission count

    # called from the engine thread
    def _put(self, item: RequestOutput | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def _resolve(self, error: BaseException | None) -> None:
        def settle() -> None:
            if self.accepted.done():
                return
            if error is None:
                self.accepted.set_result(None)
            else:
                self.accepted.set_exception(error)

        self.loop.call_soon_threadsafe(settle)

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        try:
            while True:
                item = await self.queue.get()
                # outputs are cumulative: when the consumer fell behind, only the latest matters
                while not isinstance(item, BaseException) and not item.finished:
                    try:
                        item = self.queue.get_nowait()
                    except asyncio.QueueEmpty:
                        break
                if isinstance(item, BaseException):
                    self.finished = True
                    raise item
                if item.finished:
                    self.finished = True
                yield item
                if item.finished:
                    return
        finally:
            if not self.finished:
                self.abort()

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            self.owner._post(_Abort(self.request_id))

    async def aclose(self) -> None:
        self.abort()


@dataclass
class EngineCounters:
    """Totals the engine thread keeps for /metrics."""

    num_steps: int = 0
    step_time_s: float = 0.0
    num_aborted: int = 0
    step_errors: int = 0
    last_step_duration_s: float = 0.0


class AsyncEngine:
    def __init__(
        self,
        engine: LLMEngine,
        max_queue: int = 256,
    ) -> None:
        self.engine = engine
        self.max_num_seqs = engine.scheduler.max_num_seqs
        self.capacity = self.max_num_seqs + max_queue
        self.max_seq_len = engine.scheduler.max_seq_len
        self.counters = EngineCounters()
        self._inbox: deque[_Add | _Abort] = deque()
        self._cond = threading.Condition()
        self._streams: dict[str, RequestStream] = {}  # engine thread only
        self._num_seqs = 0  # accepted and unfinished sequences (guarded by _cond)
        self._accepting = True
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="dsv4-engine", daemon=True)
            self._thread.start()

    @property
    def is_alive(self) -> bool:
        return (self._thread is not None and self._thread.is_alive() and not self._stopping
                and self.error is None)

    @property
    def num_unfinished_seqs(self) -> int:
        with self._cond:
            return self._num_seqs

    async def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop accepting; let in-flight requests finish for up to `timeout_s`; abort the rest;
        stop the thread."""
        with self._cond:
            self._accepting = False
        deadline = time.monotonic() + timeout_s
        while self.num_unfinished_seqs and time.monotonic() < deadline and self.is_alive:
            await asyncio.sleep(0.05)
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10.0)

    # -- requests ----------------------------------------------------------------------------

    async def add(
        self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams
    ) -> RequestStream:
        """Queue a request; return its stream once the engine has accepted it.

        Raises QueueFullError when the server is full, EngineStoppedError when it is shutting
        down, and the engine's ValueError when the request can never run.
        """
        stream = RequestStream(self, request_id, params.n)
        with self._cond:
            if not self._accepting or self._stopping or self.error is not None:
                raise EngineStoppedError("the server is shutting down; retry on another replica")
            if self._num_seqs + params.n > self.capacity:
                raise QueueFullError(
                    f"the server is full ({self._num_seqs} sequences accepted, at most "
                    f"{self.capacity}); retry later",
                    retry_after_s=self.retry_after_s(),
                )
            self._num_seqs += params.n
            self._inbox.append(_Add(request_id, list(prompt_ids), params, stream))
            self._cond.notify()
        try:
            await stream.accepted
        except asyncio.CancelledError:
            stream.abort()
            raise
        return stream

    def retry_after_s(self) -> int:
        """A rough wait before a slot frees: one average step per queued sequence per slot."""
        steps = self.counters.num_steps
        step_s = self.counters.step_time_s / steps if steps else 0.05
        waiting = max(self._num_seqs - self.max_num_seqs, 0)
        return max(1, int(step_s * (16 + waiting) + 0.999))

    def _post(self, cmd: _Add | _Abort) -> None:
        with self._cond:
            self._inbox.append(cmd)
            self._cond.notify()

    def stats(self) -> dict[str, float]:
        stats = dict(self.engine.stats())
        with self._cond:
            pending = sum(isinstance(c, _Add) for c in self._inbox)
            stats["num_seqs_accepted"] = self._num_seqs
        stats["num_steps"] = self.counters.num_steps
        stats["num_requests_waiting"] = stats.get("num_requests_waiting", 0) + pending
        return stats

    # -- the engine thread -------------------------------------------------------------------

    def _release(self, stream: RequestStream) -> None:
        if not stream.released:
            stream.released = True
            with self._cond:
                self._num_seqs -= stream.num_seqs

    def _handle(self, cmd: _Add | _Abort) -> None:
        if isinstance(cmd, _Add):
            try:
                self.engine.add_request(cmd.prompt_ids, cmd.params, cmd.request_id)
            except Exception as exc:  # the engine's ValueError: the request can never run
                self._release(cmd.stream)
                cmd.stream._resolve(exc)
                return
            self._streams[cmd.request_id] = cmd.stream
            cmd.stream._resolve(None)
        else:
            stream = self._streams.pop(cmd.request_id, None)
            if stream is not None:
                self.engine.abort(cmd.request_id)
                self.counters.num_aborted += 1
                self._release(stream)

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # a bug here must not leave requests waiting forever
            log.exception("the engine thread failed; the server can no longer generate")
            self.error = exc
            self._abort_all(EngineStoppedError(f"the engine failed: {exc!r}"))

    def _loop(self) -> None:
        engine = self.engine
        while True:
            with self._cond:
                while (
                    not self._inbox and not self._stopping and not engine.has_unfinished_requests()
                ):
                    self._cond.wait()
                commands = list(self._inbox)
                self._inbox.clear()
                stopping = self._stopping
            for cmd in commands:
                self._handle(cmd)
            if stopping:
                self._abort_all(EngineStoppedError("the server shut down before this finished"))
                return
            if not engine.has_unfinished_requests():
                continue
            start = time.perf_counter()
            try:
                outputs = engine.step()
            except Exception as exc:  # a bug, not a client's doing: fail what is running
                log.exception("engine step failed; aborting the running requests")
                self.counters.step_errors += 1
                self._abort_all(exc)
                continue
            elapsed = time.perf_counter() - start
            self.counters.num_steps += 1
            self.counters.step_time_s += elapsed
            self.counters.last_step_duration_s = elapsed
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is None:
                    continue
                stream._put(out)
                if out.finished:
                    del self._streams[out.request_id]
                    self._release(stream)

    def _abort_all(self, error: BaseException) -> None:
        for request_id, stream in list(self._streams.items()):
            try:
                self.engine.abort(request_id)
            except Exception:  # the engine may be what failed; the stream must end anyway
                log.exception("could not abort %s", request_id)
            stream._put(error)
            self._release(stream)
        self._streams.clear()
        with self._cond:
            for cmd in self._inbox:
                if isinstance(cmd, _Add):
                    self._release(cmd.stream)
                    cmd.stream._resolve(EngineStoppedError("the server is shutting down"))
            self._inbox.clear()
