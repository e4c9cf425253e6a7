"""Scheduler behaviour against the fake engine: supersede, fairness, cancellation, loading."""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import threading
import weakref
from collections import Counter

import pytest
from fake_engine import make_loader

from codelm.daemon import scheduler as scheduler_module
from codelm.daemon.engine import EngineConfig
from codelm.daemon.errors import Cancelled, ModelLoadError, ModelLoading, Overloaded
from codelm.daemon.protocol import CompleteRequest, OpenAICompletionRequest
from codelm.daemon.scheduler import EngineState, Scheduler


def _request(
    uri: str = "file:///a.py", text: str = "def f(x):\n    return ", **kw
) -> CompleteRequest:
    return CompleteRequest(uri=uri, text=text, line=1, character=11, **kw)


async def _wait_until(predicate, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


async def _ready_scheduler(**loader_kw) -> tuple[Scheduler, object]:
    loader = make_loader(**loader_kw)
    scheduler = Scheduler(EngineConfig(model="fake.gguf"), loader=loader)
    scheduler.start()
    await _wait_until(lambda: scheduler.state is not EngineState.LOADING)
    assert scheduler.state is EngineState.READY
    return scheduler, loader


async def test_scheduler_completes_on_worker_thread_when_ready():
    scheduler, loader = await _ready_scheduler()
    try:
        response = await scheduler.complete(_request(max_tokens=3))
        assert response.items[0].text.count(" ") == 3
        assert response.timings.generated_tokens == 3
        assert response.timings.queue_ms >= 0
        assert loader.engine.thread_ids == {scheduler._thread.ident}
        assert threading.get_ident() not in loader.engine.thread_ids
        assert scheduler.status()["requests"]["completed"] == 1
    finally:
        await scheduler.stop()


async def test_scheduler_refuses_with_model_loading_while_loading():
    loader = make_loader(load_s=0.4)
    scheduler = Scheduler(EngineConfig(model="fake.gguf"), loader=loader)
    scheduler.start()
    try:
        with pytest.raises(ModelLoading):
            await scheduler.complete(_request())
        health = scheduler.health()
        assert health["state"] == "loading"
        assert 0.0 <= health["progress"] <= 1.0
        await _wait_until(lambda: scheduler.state is EngineState.READY)
        await scheduler.complete(_request(max_tokens=1))
    finally:
        await scheduler.stop()


async def test_scheduler_reports_load_error_and_refuses_requests():
    scheduler = Scheduler(EngineConfig(model="/nope/missing.gguf"), loader=make_loader())
    scheduler.start()
    try:
        await _wait_until(lambda: scheduler.state is not EngineState.LOADING)
        assert scheduler.health()["state"] == "error"
        assert "missing.gguf does not exist" in scheduler.health()["message"]
        with pytest.raises(ModelLoadError, match="does not exist"):
            await scheduler.complete(_request())
    finally:
        await scheduler.stop()


async def test_a_load_that_fails_as_the_daemon_stops_is_no_error(caplog):
    # `stop` while the load still imported torch logged "model load failed" at ERROR with a
    # 40-line traceback of torch's failing import.
    caplog.set_level(logging.INFO, logger="codelm")
    stopping = threading.Event()

    def loader(config, progress):
        stopping.wait(5)
        raise RuntimeError("operator prims::empty_permuted does not exist")

    scheduler = Scheduler(EngineConfig(model="fake.gguf"), loader=loader)
    scheduler.start()
    stop = asyncio.create_task(scheduler.stop())
    await _wait_until(lambda: scheduler._stopping)
    stopping.set()
    await stop
    assert scheduler.state is EngineState.STOPPED
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "model load abandoned: the daemon is stopping" in caplog.text


async def test_a_failed_load_gives_back_what_it_had_built(monkeypatch):
    """A load stopped for want of memory had built gigabytes of layers, which refer to one
    another as a model's do: they go at once, not at some later collection, and the freed
    memory goes back to the system."""
    built = []
    given_back = threading.Event()
    monkeypatch.setattr(scheduler_module, "trim_heap", given_back.set)

    class Layer:  # a cycle, as a module and its parent make
        def __init__(self) -> None:
            self.weights = bytearray(32 << 20)
            self.parent = self

    def loader(config, progress):
        layer = Layer()
        built.append(weakref.ref(layer))
        raise ModelLoadError("not enough memory to load the model")

    gc.disable()  # only an explicit collection frees a cycle now
    scheduler = Scheduler(EngineConfig(model="fake.gguf"), loader=loader)
    try:
        scheduler.start()
        await _wait_until(lambda: scheduler.state is EngineState.ERROR and given_back.is_set())
        assert built and built[0]() is None
    finally:
        gc.enable()
        await scheduler.stop()


async def test_scheduler_supersedes_in_flight_request_for_same_uri():
    scheduler, loader = await _ready_scheduler(step_s=0.01)
    try:
        first = asyncio.create_task(scheduler.complete(_request(max_tokens=500)))
        await _wait_until(loader.engine.running.is_set)
        second = await scheduler.complete(_request(max_tokens=2))
        with pytest.raises(Cancelled):
            await first
        assert second.timings.generated_tokens == 2
        assert ("file:///a.py", "cancelled:superseded") in loader.engine.calls
        assert scheduler.status()["requests"]["superseded"] == 1
    finally:
        await scheduler.stop()


async def test_closing_a_document_cancels_its_running_request():
    # The close had waited for the whole completion (and kept the one worker busy).
    scheduler, loader = await _ready_scheduler(step_s=0.01)
    try:
        running = asyncio.create_task(scheduler.complete(_request(max_tokens=500)))
        await _wait_until(loader.engine.running.is_set)
        await asyncio.wait_for(scheduler.close_document("file:///a.py"), 2.0)
        with pytest.raises(Cancelled):
            await running
        assert ("file:///a.py", "cancelled:document closed") in loader.engine.calls
    finally:
        await scheduler.stop()


async def test_scheduler_supersedes_pending_request_in_its_queue_slot():
    scheduler, loader = await _ready_scheduler(step_s=0.01)
    try:
        blocker = asyncio.create_task(
            scheduler.complete(_request("file:///block.py", max_tokens=30))
        )
        await _wait_until(loader.engine.running.is_set)
        old_a = asyncio.create_task(scheduler.complete(_request("file:///a.py", max_tokens=1)))
        b = asyncio.create_task(scheduler.complete(_request("file:///b.py", max_tokens=1)))
        await asyncio.sleep(0)
        new_a = asyncio.create_task(scheduler.complete(_request("file:///a.py", max_tokens=2)))
        await asyncio.gather(blocker, b, new_a)
        with pytest.raises(Cancelled):
            await old_a
        # The old request never ran; the newer one kept its place ahead of b.
        assert loader.engine.started == ["file:///block.py", "file:///a.py", "file:///b.py"]
    finally:
        await scheduler.stop()


async def test_a_completion_stops_a_warmup_and_goes_first():
    scheduler, loader = await _ready_scheduler(step_s=0.01)
    try:
        warming = asyncio.create_task(scheduler.complete(_request("file:///w.py", max_tokens=0)))
        await _wait_until(loader.engine.running.is_set)
        answer = await asyncio.wait_for(scheduler.complete(_request("file:///c.py")), 2.0)
        assert answer.items
        with pytest.raises(Cancelled):
            await warming
        assert ("file:///w.py", "cancelled:preempted by a completion") in loader.engine.calls
        # Queued behind a completion, a warm-up waits for every completion that arrives.
        blocker = asyncio.create_task(scheduler.complete(_request("file:///x.py", max_tokens=9)))
        await _wait_until(loader.engine.running.is_set)
        warm = asyncio.create_task(scheduler.complete(_request("file:///w.py", max_tokens=0)))
        await asyncio.sleep(0)
        late = asyncio.create_task(scheduler.complete(_request("file:///late.py", max_tokens=1)))
        warmed = await warm
        await asyncio.gather(blocker, late)
        assert warmed.items == [] and warmed.timings.generated_tokens == 0
        assert loader.engine.started[-3:] == ["file:///x.py", "file:///late.py", "file:///w.py"]
        counts = scheduler.status()["requests"]
        assert (counts["requests"], counts["completed"], counts["warmed"]) == (3, 3, 1)
    finally:
        await scheduler.stop()


async def test_a_warmup_never_replaces_a_completion_of_its_document():
    scheduler, loader = await _ready_scheduler(step_s=0.01)
    try:
        running = asyncio.create_task(scheduler.complete(_request(max_tokens=20)))
        await _wait_until(loader.engine.running.is_set)
        with pytest.raises(Cancelled, match="under way"):
            await scheduler.complete(_request(max_tokens=0))
        await running
        blocker = asyncio.create_task(scheduler.complete(_request("file:///x.py", max_tokens=20)))
        waiting = asyncio.create_task(scheduler.complete(_request(max_tokens=2)))
        await _wait_until(lambda: loader.engine.started[-1] == "file:///x.py")
        with pytest.raises(Cancelled, match="under way"):
            await scheduler.complete(_request(max_tokens=0))
        await asyncio.gather(blocker, waiting)
        assert loader.engine.started == ["file:///a.py", "file:///x.py", "file:///a.py"]
    finally:
        await scheduler.stop()


async def test_approximate_kv_is_refreshed_once_idle_and_any_request_stops_it(monkeypatch):
    monkeypatch.setattr(scheduler_module, "REFRESH_AFTER_S", 0.2)
    scheduler, loader = await _ready_scheduler(step_s=0.01)
    try:
        await scheduler.complete(_request(max_tokens=1))
        loader.engine.stale = 50
        # Requests closer together than REFRESH_AFTER_S (someone typing) leave it alone.
        for _ in range(3):
            await asyncio.sleep(0.05)
            await scheduler.complete(_request(max_tokens=1))
        assert "refresh" not in loader.engine.started
        await _wait_until(lambda: "refresh" in loader.engine.started)
        assert scheduler.status()["queue"]["in_flight"] is False  # no request is
        answer = await asyncio.wait_for(scheduler.complete(_request("file:///c.py")), 2.0)
        assert answer.items
        refreshes = [outcome for key, outcome in loader.engine.calls if key == "refresh"]
        assert refreshes[0].endswith(", preempted by a complete request")
        assert loader.engine.stale > 0
        # Idle again, it goes on where it stopped and ends.
        await _wait_until(lambda: loader.engine.stale == 0)
        await _wait_until(lambda: loader.engine.calls[-1][0] == "refresh")
        done = [
            int(outcome.split(",")[0]) for key, outcome in loader.engine.calls if key == "refresh"
        ]
        assert sum(done) == 50
        assert loader.engine.thread_ids == {scheduler._thread.ident}
        counts = scheduler.status()["requests"]
        assert (counts["requests"], counts["completed"]) == (5, 5)  # refreshes are not requests
    finally:
        await scheduler.stop()


async def test_scheduler_serves_different_uris_in_arrival_order():
    scheduler, loader = await _ready_scheduler(step_s=0.002)
    try:
        uris = [f"file:///f{i}.py" for i in range(8)]
        tasks = []
        for uri in uris:
            tasks.append(asyncio.create_task(scheduler.complete(_request(uri, max_tokens=2))))
            await asyncio.sleep(0)
        await asyncio.gather(*tasks)
        assert loader.engine.started == uris
    finally:
        await scheduler.stop()


async def test_scheduler_cancels_engine_work_when_awaiting_task_is_cancelled():
    scheduler, loader = await _ready_scheduler(step_s=0.01)
    try:
        task = asyncio.create_task(scheduler.complete(_request(max_tokens=1000)))
        await _wait_until(loader.engine.running.is_set)
        task.cancel()
        await _wait_until(lambda: loader.engine.calls, timeout_s=2.0)
        assert loader.engine.calls == [("file:///a.py", "cancelled:client went away")]
        await scheduler.complete(_request(max_tokens=1))
        assert scheduler.status()["requests"]["cancelled"] == 1
    finally:
        await scheduler.stop()


async def test_scheduler_drops_pending_request_when_awaiting_task_is_cancelled():
    scheduler, loader = await _ready_scheduler(step_s=0.01)
    try:
        blocker = asyncio.create_task(
            scheduler.complete(_request("file:///block.py", max_tokens=20))
        )
        await _wait_until(loader.engine.running.is_set)
        waiting = asyncio.create_task(scheduler.complete(_request("file:///w.py", max_tokens=1)))
        await asyncio.sleep(0.01)
        waiting.cancel()
        await blocker
        assert "file:///w.py" not in loader.engine.started
    finally:
        await scheduler.stop()


async def test_scheduler_stream_yields_pieces_then_response():
    scheduler, _ = await _ready_scheduler()
    try:
        events = [event async for event in scheduler.stream(_request(max_tokens=4))]
        *pieces, response = events
        assert len(pieces) == 4
        assert "".join(pieces) == response.items[0].text
    finally:
        await scheduler.stop()


async def test_scheduler_openai_requests_are_never_superseded():
    scheduler, _ = await _ready_scheduler(step_s=0.002)
    try:
        request = OpenAICompletionRequest(prompt="def f(", max_tokens=3)
        results = await asyncio.gather(*(scheduler.complete(request) for _ in range(3)))
        assert len({r.items[0].text for r in results}) == 1
    finally:
        await scheduler.stop()


async def test_scheduler_refuses_when_queue_is_full():
    loader = make_loader(step_s=0.01)
    scheduler = Scheduler(EngineConfig(model="fake.gguf"), loader=loader, max_pending=2)
    scheduler.start()
    await _wait_until(lambda: scheduler.state is EngineState.READY)
    try:
        busy = asyncio.create_task(scheduler.complete(_request("file:///0.py", max_tokens=50)))
        await _wait_until(loader.engine.running.is_set)
        queued = [
            asyncio.create_task(scheduler.complete(_request(f"file:///{i}.py", max_tokens=1)))
            for i in (1, 2)
        ]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded):
            await scheduler.complete(_request("file:///3.py", max_tokens=1))
        await asyncio.gather(busy, *queued)
    finally:
        await scheduler.stop()


async def test_scheduler_unloads_when_idle_and_reloads_on_demand():
    loader = make_loader()
    scheduler = Scheduler(EngineConfig(model="fake.gguf"), loader=loader, idle_unload_s=0.05)
    scheduler.start()
    try:
        await _wait_until(lambda: scheduler.state is EngineState.READY)
        await _wait_until(lambda: scheduler.state is EngineState.UNLOADED)
        with pytest.raises(ModelLoading):
            await scheduler.complete(_request(max_tokens=1))
        await _wait_until(lambda: scheduler.state is EngineState.READY)
        await scheduler.complete(_request(max_tokens=1))
    finally:
        await scheduler.stop()


async def test_idle_unload_leaves_a_request_queued_as_the_idle_time_ran_out():
    # The worker's timed wait can end with a request already queued (it arrived between the
    # timeout and the worker taking the lock back): that request runs on the loaded model.
    # Unloading first had run it with no engine: "internal error in the engine".
    loader = make_loader()
    scheduler = Scheduler(EngineConfig(model="fake.gguf"), loader=loader, idle_unload_s=30)
    scheduler.start()
    try:
        await _wait_until(lambda: scheduler.state is EngineState.READY)
        with scheduler._cond:  # the worker cannot take the job while this holds the lock
            pending = asyncio.ensure_future(scheduler.complete(_request(max_tokens=2)))
            await asyncio.sleep(0)  # complete() runs up to its await: the job is queued
            assert len(scheduler._pending) == 1
            scheduler._last_active -= 60  # the idle time has run out
            scheduler._maybe_unload_locked()  # what the worker does when its wait times out
            assert scheduler.state is EngineState.READY
        response = await pending
        assert response.timings.generated_tokens == 2
    finally:
        await scheduler.stop()


async def test_an_idle_unload_on_a_gpu_empties_torchs_cache(monkeypatch):
    # torch keeps freed GPU memory for its next tensors: without empty_cache the unloaded
    # model's memory stayed taken on the card. (Stand-ins: no GPU here.)
    import torch

    emptied: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    scheduler = Scheduler(EngineConfig(model="fake.gguf"), loader=make_loader(), idle_unload_s=0.05)
    scheduler.start()
    try:
        await _wait_until(lambda: emptied == [1])  # once the model is dropped
        assert scheduler.state is EngineState.UNLOADED
    finally:
        await scheduler.stop()


async def test_scheduler_close_document_and_prompt_run_on_engine():
    scheduler, _ = await _ready_scheduler()
    try:
        assert await scheduler.close_document("file:///a.py") is False
        await scheduler.complete(_request(max_tokens=1))
        assert scheduler.status()["cache"]["entries"] == 1
        assert await scheduler.close_document("file:///a.py") is True
    finally:
        await scheduler.stop()


async def test_scheduler_latency_percentiles_are_reported():
    scheduler, _ = await _ready_scheduler()
    try:
        for i in range(5):
            await scheduler.complete(_request(f"file:///{i}.py", max_tokens=1))
        latency = scheduler.status()["requests"]["latency_ms"]
        assert latency["p50"] is not None and latency["p50"] <= latency["p99"]
    finally:
        await scheduler.stop()


async def test_wake_loads_an_unloaded_model_and_retries_a_failed_one_whose_file_changed(
    tmp_path,
):
    # A client that connects after an idle unload, or after a failed load, asks with wake()
    # (POST /v1/load): nothing else loads the model before a completion request.
    model = tmp_path / "model.gguf"
    model.write_bytes(b"broken")
    good = make_loader()

    def loader(config, progress=None):
        if model.read_bytes() == b"broken":
            raise ModelLoadError(f"{model} is not a readable GGUF file")
        return good(config, progress)

    scheduler = Scheduler(EngineConfig(model=str(model)), loader=loader, idle_unload_s=0.05)
    scheduler.start()
    try:
        await _wait_until(lambda: scheduler.state is EngineState.ERROR)
        assert scheduler.wake()["state"] == "error"  # the same file: no new attempt
        model.write_bytes(b"fixed!")
        assert scheduler.wake()["state"] == "loading"
        await _wait_until(lambda: scheduler.state is EngineState.READY)
        await _wait_until(lambda: scheduler.state is EngineState.UNLOADED)
        assert scheduler.wake()["state"] == "loading"
        await _wait_until(lambda: scheduler.state is EngineState.READY)
        assert scheduler.wake()["state"] == "ready"
    finally:
        await scheduler.stop()


async def test_an_inference_server_that_was_down_is_asked_again_by_the_next_request():
    # A server down at a load: the request after it has come back works, without restarting
    # the daemon (only a client's /v1/load had tried again).
    fake = make_loader()
    up = threading.Event()

    def loader(config, progress=None):
        if not up.is_set():
            raise ModelLoadError("the inference server at http://127.0.0.1:9 could not be reached")
        return fake(config, progress)

    config = EngineConfig(model="http://127.0.0.1:9")
    scheduler = Scheduler(config, loader=loader, idle_unload_s=0.05)
    scheduler.start()
    try:
        await _wait_until(lambda: scheduler.state is EngineState.ERROR)
        up.set()
        with pytest.raises(ModelLoadError, match="could not be reached"):
            await scheduler.complete(_request())
        await _wait_until(lambda: scheduler.state is EngineState.READY)
        await asyncio.sleep(0.2)  # idle unload frees nothing of a server: it is off
        assert scheduler.state is EngineState.READY
        assert (await scheduler.complete(_request(max_tokens=2))).timings.generated_tokens == 2
    finally:
        await scheduler.stop()


async def test_random_concurrent_clients_each_get_their_own_answer_and_nothing_hangs():
    """Six clients at once make random requests on four documents (completions, streams,
    warm-ups, closes, OpenAI completions, prompts), some abandoning theirs part-way, with idle
    refreshes and idle unloads between them: every call ends, a completion answers its own
    request, the engine never runs two jobs at once, and the scheduler ends with nothing
    queued and every completion request counted once as completed, superseded, cancelled or
    failed."""
    from fake_engine import FakeEngine

    from codelm.daemon.engine.cancel import CancelToken

    rng = random.Random(5)
    loader = make_loader(step_s=0.001)
    scheduler = Scheduler(EngineConfig(model="fake.gguf"), loader=loader, idle_unload_s=0.8)
    scheduler.start()
    reference = FakeEngine(config=EngineConfig(model="fake.gguf"))
    running, overlaps, outcomes, engines = [0], [], Counter(), []

    def watched(method):
        def run(*args, **kwargs):
            running[0] += 1
            if running[0] > 1:
                overlaps.append(method.__name__)
            try:
                return method(*args, **kwargs)
            finally:
                running[0] -= 1

        return run

    def request(uri: str, **kw) -> CompleteRequest:
        n = rng.randint(0, 30)
        return _request(uri=uri, text="def f(x):\n    return " + "x" * n, **kw)

    async def one_call(uri: str) -> None:
        op = rng.choice(["complete"] * 4 + ["stream", "warm", "close", "openai", "prompt"])
        if op == "complete":
            req = request(uri, max_tokens=rng.randint(1, 12))
            response = await scheduler.complete(req)
            expected = reference.complete(req, CancelToken())
            assert response.items[0].text == expected.items[0].text
        elif op == "stream":
            req = request(uri, max_tokens=rng.randint(1, 12))
            pieces = [piece async for piece in scheduler.stream(req)]
            assert "".join(pieces[:-1]) == pieces[-1].items[0].text
        elif op == "warm":
            await scheduler.complete(request(uri, trigger="warmup"))
        elif op == "close":
            await scheduler.close_document(uri)
        elif op == "openai":
            await scheduler.complete(OpenAICompletionRequest(prompt="def ", max_tokens=3))
        else:
            await scheduler.prompt(request(uri))

    async def client() -> None:
        for _ in range(15):
            engine = loader.engine
            if engine is not None and engine not in engines:
                engines.append(engine)
                engine._generate, engine.refresh = (
                    watched(engine._generate),
                    watched(engine.refresh),
                )
            if engine is not None and rng.random() < 0.1:
                engine.stale = rng.randint(1, 50)  # approximate K/V to refresh when idle
            call = asyncio.ensure_future(one_call(f"file:///{rng.randint(1, 4)}.py"))
            done, _ = await asyncio.wait({call}, timeout=rng.choice([0.002, 0.02, 1.0]))
            if not done:
                call.cancel()  # the client went away
            try:
                await asyncio.wait_for(call, 5.0)
                outcomes["answered"] += 1
            except asyncio.CancelledError:
                outcomes["abandoned"] += 1
            except (Cancelled, ModelLoading, Overloaded) as exc:
                outcomes[type(exc).__name__] += 1
                await asyncio.sleep(0.01)  # (as a client waits before it asks again)

    try:
        for pause_s in (0.6, 1.0, 0.0):  # idle between rounds: a refresh, then an unload
            await asyncio.wait_for(asyncio.gather(*(client() for _ in range(6))), 60)
            if loader.engine is not None:
                loader.engine.stale = 200
            await asyncio.sleep(pause_s)
        await _wait_until(lambda: scheduler._current is None)
        assert not overlaps
        assert not scheduler._pending
        counts = scheduler.status()["requests"]
        ended = sum(counts[k] for k in ("completed", "superseded", "cancelled", "errors"))
        assert ended == counts["requests"], counts
        assert outcomes["answered"] > 50 and outcomes["abandoned"] > 5, outcomes
        assert len(engines) > 1  # unloaded while idle, loaded again
        assert any(call[0] == "refresh" for engine in engines for call in engine.calls)
    finally:
        await scheduler.stop()
