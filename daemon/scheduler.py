"""The scheduler: one worker thread owns the engine; requests queue fairly, newer supersede older.

Asyncio code awaits `Scheduler.complete` / iterates `Scheduler.stream`; torch never runs on
the event loop. Each request carries a CancelToken that is set when a newer request for the
same document arrives or when the awaiting task is cancelled (the client went away).

A warm-up (`max_tokens` 0) is background work: it runs after every completion that waits,
a completion that arrives stops it (what it prefilled stays cached), and one for a document
whose completion is under way is refused at once.

A refresh is the scheduler's own background work: once no request has come for
REFRESH_AFTER_S and a document where a completion ran holds approximate K/V (a run moved
after an edit), the engine computes them again (Engine.refresh). Any request that arrives
stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import gc
import itertools
import logging
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from .catalog import resolve_model_path
from .engine import EngineConfig, is_server_url, load_engine
from .engine.cancel import CancelToken
from .errors import (
    Cancelled,
    CodelmError,
    DaemonUnavailable,
    ModelLoadError,
    ModelLoading,
    Overloaded,
)
from .protocol import (
    CompleteRequest,
    CompleteResponse,
    OpenAICompletionRequest,
    PromptResponse,
)
from .runtime import trim_heap

logger = logging.getLogger(__name__)

FOREGROUND = ("complete", "openai")  # what a user waits for; "warm" is background work
# Idle time before approximate K/V are computed again: longer than the gap between the keys
# of someone typing, so it runs while they read, not between their keys.
REFRESH_AFTER_S = 0.5
LATENCY_WINDOW = 1000  # completed requests kept for the percentiles
Loader = Callable[..., Any]  # (EngineConfig, progress) -> Engine


class EngineState(str, enum.Enum):
    LOADING = "loading"
    READY = "ready"
    ERROR = "error"
    UNLOADED = "unloaded"  # idle unload; the next request loads it again
    STOPPED = "stopped"


@dataclass(eq=False, slots=True)
class _Job:
    key: str
    kind: str
    run: Callable[[Any, CancelToken], Any]  # (engine, token) -> result, on the worker thread
    loop: asyncio.AbstractEventLoop | None  # None: the scheduler's own job, nobody awaits it
    future: asyncio.Future[Any] | None
    token: CancelToken = field(default_factory=CancelToken)
    submitted: float = field(default_factory=time.monotonic)
    started: float = 0.0


@dataclass(slots=True)
class _Stats:
    requests: int = 0
    completed: int = 0
    cancelled: int = 0
    superseded: int = 0
    errors: int = 0
    refused: int = 0
    warmed: int = 0  # warm-ups that ran to the end
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    # The latest failed request's error and when (epoch s): with an inference server as the
    # model, the state stays "ready" while each request fails, and this says why.
    last_error: dict[str, Any] | None = None

    def ended(self, job: _Job, outcome: str) -> None:
        """Count a job taken from the queue before it ran: "superseded" or "cancelled". Only
        requests a user waits for count (FOREGROUND), as `requests` counts them."""
        if job.kind in FOREGROUND:
            setattr(self, outcome, getattr(self, outcome) + 1)

    def to_json(self) -> dict[str, Any]:
        ordered = sorted(self.latencies_ms)
        body = {
            "requests": self.requests,
            "completed": self.completed,
            "cancelled": self.cancelled,
            "superseded": self.superseded,
            "errors": self.errors,
            "refused": self.refused,
            "warmed": self.warmed,
            "latency_ms": {f"p{q}": _percentile(ordered, q) for q in (50, 90, 99)},
        }
        if self.last_error is not None:
            body["last_error"] = dict(self.last_error)
        return body


def _percentile(ordered: list[float], q: int) -> float | None:
    if not ordered:
        return None
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return round(ordered[rank], 3)


class Scheduler:
    """Owns the engine worker thread. Public methods are called from the event loop."""

    def __init__(
        self,
        config: EngineConfig,
        *,
        loader: Loader = load_engine,
        idle_unload_s: float = 0.0,
        max_pending: int = 256,
    ) -> None:
        self.config = config
        self._loader = loader
        # An inference server as the model holds nothing here to give back: never unloaded.
        self._idle_unload_s = 0.0 if is_server_url(config.model) else idle_unload_s
        self._max_pending = max_pending
        self._cond = threading.Condition()
        self._pending: OrderedDict[str, _Job] = OrderedDict()
        self._current: _Job | None = None
        self._engine: Any = None
        self._state = EngineState.UNLOADED
        self._progress = 0.0
        self._message = "not started"
        self._load_requested = False
        self._failed_stamp: tuple[str, int, int] | None = None  # the model file a load failed on
        self._stopping = False
        self._info: dict[str, Any] = {}
        self._cache_stats: dict[str, Any] = {}
        self._stats = _Stats()
        self._ids = itertools.count(1)
        self._last_active = time.monotonic()
        self._thread = threading.Thread(target=self._worker, name="codelm-engine", daemon=True)

    # -- lifecycle (event loop side) --

    def start(self) -> None:
        """Start the worker thread and load the model in it; returns at once."""
        with self._cond:
            self._request_load_locked()
        self._thread.start()

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Cancel everything, stop the worker and drop the engine."""
        with self._cond:
            self._stopping = True
            if self._current is not None:
                self._current.token.cancel("shutdown")
            for job in self._pending.values():
                job.token.cancel("shutdown")
                _resolve_threadsafe(job, exc=DaemonUnavailable("the daemon is shutting down"))
            self._pending.clear()
            self._cond.notify_all()
        if self._thread.is_alive():
            # A load cannot be interrupted (e.g. inside `import torch`); the thread is a daemon
            # thread, so waiting long for it only delays the exit.
            if self._state is EngineState.LOADING:
                timeout_s = min(timeout_s, 0.5)
            await asyncio.to_thread(self._thread.join, timeout_s)
        if self._thread.is_alive():
            logger.info("the engine thread is still busy after %.1f s; exiting anyway", timeout_s)
        with self._cond:
            self._state = EngineState.STOPPED
            self._engine = None

    # -- state (event loop side; plain reads of values the worker replaces whole) --

    @property
    def state(self) -> EngineState:
        return self._state

    def health(self) -> dict[str, Any]:
        body: dict[str, Any] = {"state": self._state.value, "model": self.config.model}
        if self._state is EngineState.LOADING:
            body["progress"] = round(self._progress, 3)
            body["message"] = self._message
        elif self._state is EngineState.ERROR:
            body["message"] = self._message
        return body

    def wake(self) -> dict[str, Any]:
        """Load the model where it is not loaded and a client waits for it: after an idle
        unload, or after a failed load when the model's file has changed since (fixed, or
        fetched again) or the model is an inference server (which may have started since).
        The health after."""
        with self._cond:
            unloaded = self._state is EngineState.UNLOADED
            changed = self._state is EngineState.ERROR and (
                is_server_url(self.config.model)
                or _model_stamp(self.config.model) != self._failed_stamp
            )
            if unloaded or changed:
                logger.info(
                    "loading the model again: %s", "asked" if unloaded else "it may load now"
                )
                self._request_load_locked()
                self._cond.notify_all()
        return self.health()

    def status(self) -> dict[str, Any]:
        """Engine info, cache and request statistics (for `status --json`)."""
        with self._cond:
            pending = len(self._pending)
            in_flight = self._current is not None and self._current.kind != "refresh"
        return {
            **self.health(),
            "engine": dict(self._info),
            "cache": dict(self._cache_stats),
            "requests": self._stats.to_json(),
            "queue": {"pending": pending, "in_flight": in_flight},
        }

    def check_ready(self) -> None:
        """Raise ModelLoading / ModelLoadError / DaemonUnavailable unless requests can run."""
        state = self._state
        if state is EngineState.READY:
            return
        if self._stopping or state is EngineState.STOPPED:
            raise DaemonUnavailable("the daemon is shutting down")
        if state is EngineState.ERROR:
            message = self._message
            if is_server_url(self.config.model):
                # The inference server may be back: the next request finds out.
                with self._cond:
                    self._request_load_locked()
                    self._cond.notify_all()
            raise ModelLoadError(message)
        if state is EngineState.UNLOADED:
            with self._cond:
                self._request_load_locked()
                self._cond.notify_all()
        raise ModelLoading(
            f"the model is loading ({self._progress:.0%}: {self._message}); retry in a moment"
        )

    # -- requests (event loop side) --

    async def complete(
        self,
        request: CompleteRequest | OpenAICompletionRequest,
        on_text: Callable[[str], None] | None = None,
    ) -> CompleteResponse:
        """Run one completion; `on_text` gets each new text piece on the event loop.

        Raises Cancelled when superseded or shut down, ModelLoading while the model loads.
        """
        loop = asyncio.get_running_loop()
        relay = None
        if on_text is not None:

            def relay(piece: str) -> None:
                loop.call_soon_threadsafe(on_text, piece)

        job = self._submit(_key_of(request), _kind_of(request), _completion(request, relay))
        return await self._wait(job)

    async def stream(
        self, request: CompleteRequest | OpenAICompletionRequest
    ) -> AsyncIterator[str | CompleteResponse]:
        """Yield text pieces as they are decoded, then the final CompleteResponse."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | None] = asyncio.Queue()

        def relay(piece: str) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, piece)

        job = self._submit(_key_of(request), _kind_of(request), _completion(request, relay))
        # Pieces and the result both travel through call_soon_threadsafe, so they stay ordered.
        job.future.add_done_callback(lambda _: queue.put_nowait(None))
        try:
            while (piece := await queue.get()) is not None:
                yield piece
            yield job.future.result()
        finally:
            self._abandon(job, "client went away")

    async def prompt(self, request: CompleteRequest) -> PromptResponse:
        """The prompt a completion at this point would run, with this daemon's model and the
        document's window anchor (left as it was)."""
        key = f"prompt:{next(self._ids)}"
        job = self._submit(key, "prompt", lambda e, _: e.show_prompt(request))
        return await self._wait(job)

    async def close_document(self, uri: str) -> bool:
        """Cancel the document's request, queued or running, and drop its cached KV; False
        when nothing was cached (or no model loaded)."""
        with self._cond:
            pending = self._pending.pop(uri, None)
            if pending is not None:
                self._stats.ended(pending, "cancelled")
            if self._current is not None and self._current.key == uri:
                self._current.token.cancel("document closed")
        if pending is not None:
            pending.token.cancel("document closed")
            _resolve(pending.future, exc=Cancelled("the document was closed"))
        if self._state is not EngineState.READY:
            return False
        job = self._submit(f"close:{next(self._ids)}", "close", lambda e, _: e.close_document(uri))
        return bool(await self._wait(job))

    def _submit(self, key: str, kind: str, run: Callable[[Any, CancelToken], Any]) -> _Job:
        loop = asyncio.get_running_loop()
        job = _Job(key=key, kind=kind, run=run, loop=loop, future=loop.create_future())
        with self._cond:
            # Checked under the lock: the worker cannot unload between the check and the
            # queueing, and does not unload while a job waits (_maybe_unload_locked).
            self.check_ready()
            current, waiting = self._current, self._pending.get(key)
            if kind == "warm" and (_in_front(current, key) or _in_front(waiting, key)):
                job.future.set_exception(Cancelled("a completion for the document is under way"))
                return job
            if current is not None and current.key == key:
                current.token.cancel("superseded")
            elif current is not None and current.kind == "warm" and kind in FOREGROUND:
                current.token.cancel("preempted by a completion")
            elif current is not None and current.kind == "refresh":
                current.token.cancel(f"preempted by a {kind} request")
            if waiting is not None:
                # The newer request takes the older one's place (FIFO by first arrival).
                waiting.token.cancel("superseded")
                self._stats.ended(waiting, "superseded")
                _resolve(
                    waiting.future, exc=Cancelled("superseded by a newer request for the document")
                )
            elif len(self._pending) >= self._max_pending:
                self._stats.refused += 1
                raise Overloaded(
                    f"{len(self._pending)} requests are already waiting; retry in a moment"
                )
            self._pending[key] = job
            if kind in FOREGROUND:
                self._stats.requests += 1
            self._cond.notify_all()
        return job

    async def _wait(self, job: _Job) -> Any:
        try:
            return await job.future
        finally:
            self._abandon(job, "client went away")

    def _abandon(self, job: _Job, reason: str) -> None:
        """Called in a finally: a job whose awaiter left is removed from the queue or cancelled."""
        if job.future.done() and not job.future.cancelled():
            return
        job.token.cancel(reason)
        job.future.cancel()  # nobody will read the result (or the Cancelled error) any more
        with self._cond:
            if self._pending.get(job.key) is job:
                del self._pending[job.key]
                self._stats.ended(job, "cancelled")

    # -- worker thread --

    def _request_load_locked(self) -> None:
        if self._state is not EngineState.LOADING:
            self._state = EngineState.LOADING
            self._progress = 0.0
            self._message = "waiting for the engine thread"
            self._load_requested = True

    def _worker(self) -> None:
        while True:
            with self._cond:
                job = self._next_job_locked()
                if job is None:
                    break
            if job == "load":
                self._load()
                continue
            self._run(job)

    def _next_job_locked(self) -> _Job | str | None:
        while True:
            if self._stopping:
                return None
            if self._load_requested:
                self._load_requested = False
                return "load"
            if self._pending:
                jobs = self._pending.values()
                job = next((j for j in jobs if j.kind != "warm"), None) or next(iter(jobs))
                del self._pending[job.key]
                job.started = time.monotonic()
                self._current = job
                return job
            refresh_in = self._refresh_in_locked()
            if refresh_in == 0:
                job = _Job("refresh", "refresh", lambda e, token: e.refresh(token), None, None)
                job.started = time.monotonic()
                self._current = job
                return job
            waits = (refresh_in, self._unload_in_locked())
            if not self._cond.wait(min((w for w in waits if w is not None), default=None)):
                self._maybe_unload_locked()

    def _refresh_in_locked(self) -> float | None:
        """Seconds until a refresh is due (0: now), None when there is nothing to refresh."""
        if self._state is not EngineState.READY or not self._engine.refresh_due():
            return None
        return max(0.0, self._last_active + REFRESH_AFTER_S - time.monotonic())

    def _unload_in_locked(self) -> float | None:
        if self._idle_unload_s <= 0 or self._state is not EngineState.READY:
            return None
        return max(0.01, self._last_active + self._idle_unload_s - time.monotonic())

    def _maybe_unload_locked(self) -> None:
        if self._state is not EngineState.READY or self._idle_unload_s <= 0 or self._pending:
            return  # a job queued as the idle time ran out runs first, on the loaded model
        if time.monotonic() - self._last_active < self._idle_unload_s:
            return
        logger.info("unloading the model after %.0f s without requests", self._idle_unload_s)
        self._engine = None
        self._cache_stats = {}
        gc.collect()
        _give_back_freed_memory()
        # Only now: `status` reads the state without the lock, and "unloaded" promises the
        # memory is back (a slow machine showed it while the heap was still being trimmed).
        self._state = EngineState.UNLOADED
        self._message = "unloaded while idle; the next request loads it again"

    def _load(self) -> None:
        started = time.monotonic()
        logger.info("loading model %s (device %s, quant %s)", *self._describe_config())
        try:
            engine = self._loader(self.config, self._on_progress)
        except Exception as exc:  # worker boundary: any load failure becomes the error state
            self._load_failed(exc)
            engine = None
        if engine is None:
            # What the failed load had built (its traceback held it until here): a load
            # stopped for want of memory must not keep the gigabytes it had taken.
            gc.collect()
            _give_back_freed_memory()
            return
        info = dict(getattr(engine, "info", {}) or {})
        with self._cond:
            self._engine = engine
            self._info = info
            self._state = EngineState.READY
            self._progress = 1.0
            self._message = "ready"
            self._last_active = time.monotonic()
        self._refresh_cache_stats()
        logger.info("model ready in %.1f s: %s", time.monotonic() - started, info)

    def _load_failed(self, exc: Exception) -> None:
        known = isinstance(exc, CodelmError)
        message = exc.message if known else f"{type(exc).__name__}: {exc}"
        if self._stopping:  # stopped while torch was imported: it fails as Python exits
            logger.info("model load abandoned: the daemon is stopping (%s)", message)
        elif known:
            logger.error("model load failed: %s", message)
        else:
            logger.exception("model load failed")
        stamp = _model_stamp(self.config.model)
        with self._cond:
            self._state = EngineState.STOPPED if self._stopping else EngineState.ERROR
            self._message = message
            self._failed_stamp = stamp

    def _describe_config(self) -> tuple[str, str, str]:
        return self.config.model, self.config.device, self.config.quant

    def _on_progress(self, fraction: float, message: str) -> None:
        if self._stopping:
            raise Cancelled("the daemon is shutting down")
        self._progress = max(0.0, min(1.0, float(fraction)))
        self._message = message

    def _run(self, job: _Job) -> None:
        result: Any = None
        error: BaseException | None = None
        try:
            if job.token.is_cancelled:
                raise Cancelled(f"the request was {job.token.reason or 'cancelled'}")
            result = job.run(self._engine, job.token)
        except CodelmError as exc:
            error = exc
        except Exception as exc:  # worker boundary: log, answer a generic error, keep serving
            logger.exception("%s request failed", job.kind)
            error = CodelmError(f"internal error in the engine ({type(exc).__name__}); see the log")
        finished = time.monotonic()
        if isinstance(result, CompleteResponse):
            queue_ms = (job.started - job.submitted) * 1000
            result = dataclasses.replace(
                result, timings=dataclasses.replace(result.timings, queue_ms=queue_ms)
            )
        self._record(job, error, (finished - job.submitted) * 1000)
        with self._cond:
            self._current = None
            if job.kind != "refresh":  # idle time counts from the last request
                self._last_active = finished
        evictions = self._cache_stats.get("evictions", 0)
        self._refresh_cache_stats()
        if job.future is not None:
            _resolve_threadsafe(job, result=result, exc=error)
        if (job.kind == "close" and result) or self._cache_stats.get("evictions", 0) > evictions:
            # A document's K/V went: glibc keeps the freed pages of blocks under its mmap
            # threshold (32 MB once the model has loaded) resident; 30 closed files had left
            # 1.2 GB that no tensor used.
            trim_heap()

    def _record(self, job: _Job, error: BaseException | None, latency_ms: float) -> None:
        if job.kind == "warm":
            self._stats.warmed += error is None
        if job.kind not in FOREGROUND:
            return
        if error is None:
            self._stats.completed += 1
            self._stats.latencies_ms.append(latency_ms)
        elif isinstance(error, Cancelled):
            if job.token.reason == "superseded":
                self._stats.superseded += 1
            else:
                self._stats.cancelled += 1
        else:
            self._stats.errors += 1
            message = error.message if isinstance(error, CodelmError) else str(error)
            self._stats.last_error = {"message": message, "at": round(time.time(), 3)}

    def _refresh_cache_stats(self) -> None:
        engine = self._engine
        if engine is None:
            return
        try:
            self._cache_stats = dict(engine.cache_stats())
        except Exception:  # stats must never take the worker down
            logger.exception("engine.cache_stats() failed")


def _model_stamp(name: str) -> tuple[str, int, int] | None:
    """The model's file (or folder) as path, size and mtime; None where there is none."""
    try:
        path = resolve_model_path(name)
        stat = path.stat()
    except (CodelmError, OSError):
        return None
    return str(path), stat.st_size, stat.st_mtime_ns


def _give_back_freed_memory() -> None:
    """Return what a dropped model freed to the system: torch keeps freed GPU memory cached
    for its next tensors (nvidia-smi would still show the model's), and glibc freed heap
    pages (the default model's idle unload had left 900 of its 1458 MB resident; 270 after
    malloc_trim)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    trim_heap()


def _key_of(request: CompleteRequest | OpenAICompletionRequest) -> str:
    if isinstance(request, CompleteRequest):
        return request.uri
    # OpenAI requests carry no document: each is its own queue entry, never superseded.
    return f"openai:{id(request)}:{time.monotonic_ns()}"


def _kind_of(request: CompleteRequest | OpenAICompletionRequest) -> str:
    if isinstance(request, CompleteRequest):
        return "warm" if request.is_warmup else "complete"
    return "openai"


def _in_front(job: _Job | None, key: str) -> bool:
    """Whether `job` is a completion of the document `key`: what a warm-up of that document
    must not delay or replace."""
    return job is not None and job.kind in FOREGROUND and job.key == key


def _completion(
    request: CompleteRequest | OpenAICompletionRequest,
    on_text: Callable[[str], None] | None,
) -> Callable[[Any, CancelToken], CompleteResponse]:
    if isinstance(request, CompleteRequest):
        return lambda engine, token: engine.complete(request, token, on_text)
    return lambda engine, token: engine.complete_openai(request, token, on_text)


def _resolve(
    future: asyncio.Future[Any], result: Any = None, exc: BaseException | None = None
) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


def _resolve_threadsafe(job: _Job, result: Any = None, exc: BaseException | None = None) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
        job.loop.call_soon_threadsafe(_resolve, job.future, result, exc)
