from __future__ import annotations

import json
import logging
import os
from types import SimpleNamespace

import pytest
import torch
from quant_helpers import weight

from codelm.quant import (
    DispatchConfig,
    Dispatcher,
    native,
    physical_cores,
    quantize_int4,
    quantize_int8,
)
from codelm.quant import dispatch as dispatch_module
from codelm.quant.cpu import CPU_KERNELS, KernelSpec

CPUINFO = """processor\t: 0
model name\t: Test CPU 9000
physical id\t: 0
core id\t\t: 0
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512_bf16 amx_tile

processor\t: 1
model name\t: Test CPU 9000
physical id\t: 0
core id\t\t: 0
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512_bf16 amx_tile

processor\t: 2
model name\t: Test CPU 9000
physical id\t: 0
core id\t\t: 1

processor\t: 3
model name\t: Test CPU 9000
physical id\t: 0
core id\t\t: 1
"""


def _measured(monkeypatch, times: dict) -> None:
    """Calibrations time the candidates at `times`, on a quiet machine (timings taken beside
    busy neighbours are thrown away: the tests that mean that say so)."""
    monkeypatch.setattr(dispatch_module, "_busy", lambda *a: None)
    monkeypatch.setattr(dispatch_module, "_calibrate", lambda *a: dispatch_module._Ranking(times))


@pytest.fixture
def cpuinfo(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO)
    return path


def test_read_cpu_info_parses_model_and_flags(cpuinfo):
    info = dispatch_module.read_cpu_info(cpuinfo)
    assert info.model_name == "Test CPU 9000"
    assert info.has_avx2 and info.has_avx512f and info.has_avx512_bf16 and info.has_amx
    assert info.has_bf16_hardware


def test_limit_to_avx2_hides_wider_flags_and_builds_for_avx2(cpuinfo, monkeypatch):
    monkeypatch.setattr(native, "_loaded", None)
    monkeypatch.setattr(native, "_arch", native._ARCH)
    monkeypatch.setattr(dispatch_module, "_avx2_only", False)
    dispatch_module.limit_to_avx2()
    info = dispatch_module.read_cpu_info(cpuinfo)
    assert info.model_name == "Test CPU 9000 (as AVX2 only)"  # its own rankings
    assert info.has_avx2 and "fma" in info.flags
    assert not (info.has_avx512f or info.has_avx512_bf16 or info.has_amx)
    assert native._arch == ("-march=haswell",)
    monkeypatch.setattr(native, "_loaded", "built already")
    with pytest.raises(RuntimeError, match="already loaded"):
        dispatch_module.limit_to_avx2()


def test_physical_cores_counts_smt_siblings_once(cpuinfo, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(dispatch_module, "_cgroup_cpu_quota", lambda: None)
    assert physical_cores(cpuinfo) == 2


def test_physical_cores_respects_affinity_and_cgroup_quota(cpuinfo, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {2, 3}, raising=False)
    monkeypatch.setattr(dispatch_module, "_cgroup_cpu_quota", lambda: None)
    assert physical_cores(cpuinfo) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(dispatch_module, "_cgroup_cpu_quota", lambda: 1)
    assert physical_cores(cpuinfo) == 1


def test_physical_cores_is_positive_on_this_machine():
    assert 1 <= physical_cores() <= (os.cpu_count() or 1)


def test_dispatcher_calibrates_once_and_reuses_disk_cache(gen, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(dispatch_module, "_busy", lambda *a: None)
    qw, _ = quantize_int4(weight(gen, 64, 128))
    with caplog.at_level(logging.INFO, logger="codelm.quant.dispatch"):
        plan = Dispatcher(DispatchConfig(cache_dir=tmp_path)).plan(qw, name="q_proj")
    assert "(calibrated)" in caplog.text
    entries = json.loads((tmp_path / dispatch_module.CACHE_FILE).read_text())["entries"]
    ((key, times),) = entries.items()
    assert dispatch_module.read_cpu_info().model_name in key
    assert torch.__version__ in key and "int4 g32|64x128" in key
    crossover = {f"rows{m}" for m in dispatch_module._CROSSOVER_ROWS}
    assert set(times) - {"tiled_from"} == {"decode", "prefill"} | crossover
    assert "int4pack_bf16" in times["decode"]
    # Where the native kernel runs its calls through per-call tiles, measured (if it is built).
    assert set(times.get("tiled_from", {})) == {"int4_native"} & set(times["decode"])

    def no_calibration(*args, **kwargs):
        raise AssertionError("should have used the disk cache")

    monkeypatch.setattr(dispatch_module, "_calibrate", no_calibration)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="codelm.quant.dispatch"):
        again = Dispatcher(DispatchConfig(cache_dir=tmp_path)).plan(qw)
    assert "(disk cache)" in caplog.text
    assert (again.decode.name, again.prefill.name) == (plan.decode.name, plan.prefill.name)


def test_dispatcher_picks_fastest_recorded_kernel(gen, tmp_path, monkeypatch):
    qw, _ = quantize_int4(weight(gen, 64, 128))
    times = {
        "decode": {"int4pack_bf16": 5.0, "dequant_fp32": 1.0},
        "prefill": {"int4pack_bf16": 1.0, "dequant_fp32": 2.0},
    }
    _measured(monkeypatch, times)
    plan = Dispatcher(DispatchConfig(cache_dir=None, dense_budget_bytes=1 << 30)).plan(qw)
    assert (plan.decode.name, plan.prefill.name) == ("dequant_fp32", "int4pack_bf16")


@pytest.mark.parametrize(("budget", "expected"), [(0, "dequant_fp32"), (1 << 30, "int4pack_bf16")])
def test_a_second_layout_of_the_weight_for_prefill_is_paid_from_the_budget(
    gen, monkeypatch, budget, expected
):
    # int4pack_bf16 holds the weight in torch's own layout: beside another decode kernel that
    # is a second copy, as loader.copies_bytes counts it, and `prefill_copies` bounds it.
    qw, _ = quantize_int4(weight(gen, 64, 128))
    times = {
        "decode": {"int4pack_bf16": 5.0, "dequant_fp32": 1.0},
        "prefill": {"int4pack_bf16": 1.0, "dequant_fp32": 2.0},
    }
    _measured(monkeypatch, times)
    dispatcher = Dispatcher(DispatchConfig(dense_budget_bytes=budget))
    plan = dispatcher.plan(qw)
    assert (plan.decode.name, plan.prefill.name) == ("dequant_fp32", expected)
    assert dispatcher.dense_bytes_used == plan.nbytes - plan.decode.nbytes


@pytest.mark.parametrize(("room", "expected"), [(None, "dense_fp32"), (4000, "dequant_fp32")])
def test_copies_take_no_more_than_the_room_a_load_leaves(gen, monkeypatch, room, expected):
    """Near the memory's end the load says how much room is left beyond the weights to come
    (loader._RoomCheck): a copy larger than that is neither kept nor built to be timed (the
    default model's head as fp32 is 545 MB, for a moment, on a first load)."""
    qw, _ = quantize_int8(weight(gen, 32, 64))
    times = {
        "decode": {"int8pack_bf16": 1.0},
        "prefill": {"dense_fp32": 1.0, "dequant_fp32": 2.0, "int8pack_bf16": 9.0},
    }
    timed = []

    def calibrate(qw, specs, *args):
        timed.append(set(specs))
        return dispatch_module._Ranking(
            {p: {n: t for n, t in ts.items() if n in specs} for p, ts in times.items()}
        )

    monkeypatch.setattr(dispatch_module, "_busy", lambda *a: None)
    monkeypatch.setattr(dispatch_module, "_calibrate", calibrate)
    dispatcher = Dispatcher(DispatchConfig(dense_budget_bytes=1 << 30))
    if room is not None:
        dispatcher.limit_copies(room)  # a 32x64 fp32 copy is 8192 bytes
    plan = dispatcher.plan(qw)
    assert plan.prefill.name == expected
    assert ("dense_fp32" in timed[0]) == (room is None)
    held = plan.nbytes - plan.decode.nbytes
    assert dispatcher.dense_bytes_used == held
    assert held == 8192 if room is None else held <= room
    assert dispatcher.copies_left() == ((1 << 30) if room is None else room) - held


@pytest.mark.parametrize(("dequant_ms", "expected"), [(1.04, "dequant_fp32"), (1.2, "dense_fp32")])
def test_dispatcher_prefills_on_the_smaller_copy_when_timings_tie(
    gen, monkeypatch, dequant_ms, expected
):
    # Within 5% of the fastest is noise: the kernel holding no copy beside the format wins it.
    qw, _ = quantize_int8(weight(gen, 32, 64))
    times = {
        "decode": {"int8pack_bf16": 1.0},
        "prefill": {"dense_fp32": 1.0, "dequant_fp32": dequant_ms, "int8pack_bf16": 9.0},
    }
    _measured(monkeypatch, times)
    plan = Dispatcher(DispatchConfig(dense_budget_bytes=1 << 30)).plan(qw)
    assert plan.prefill.name == expected


@pytest.mark.parametrize(
    ("dequant_ms", "dequant_at_4_ms", "expected"),
    [
        (1.04, 1.2, "dequant_fp32"),
        (1.04, 3.0, "dense_fp32"),
        (0.98, 3.0, "dense_fp32"),  # the fastest at a chunk, by noise: not at few rows
        (1.2, 0.5, "dense_fp32"),  # no tie at a chunk: few rows do not enter into it
    ],
)
def test_a_tie_at_a_chunk_goes_to_the_smaller_copy_only_if_it_keeps_up_at_few_rows(
    gen, monkeypatch, dequant_ms, dequant_at_4_ms, expected
):
    # A few-row forward (an edit, a draft check) runs the prefill kernel too: one that lays
    # its weights out per call ties a held copy at a chunk's rows, not at 4.
    qw, _ = quantize_int8(weight(gen, 32, 64))
    times = {
        "decode": {"int8pack_bf16": 1.0},
        "prefill": {"dense_fp32": 1.0, "dequant_fp32": dequant_ms},
        "rows4": {"dense_fp32": 1.0, "dequant_fp32": dequant_at_4_ms, "int8pack_bf16": 0.1},
    }
    _measured(monkeypatch, times)
    plan = Dispatcher(DispatchConfig(dense_budget_bytes=1 << 30)).plan(qw)
    assert plan.prefill.name == expected


# Milliseconds at 2, 4, 8 and 16 rows of x: decode kernel, prefill kernel.
@pytest.mark.parametrize(
    ("decode_ms", "prefill_ms", "slack", "expected_rows"),
    [
        ((1.0, 1.2, 3.0, 9.0), (1.0, 1.0, 1.5, 2.5), 1.25, 4),  # within the 1.25x slack at 4
        ((1.0, 1.2, 3.0, 9.0), (1.0, 1.0, 1.5, 2.5), 1.1, 2),  # not within 1.1x at 4
        ((3.0, 5.0, 9.0, 17.0), (1.0, 1.0, 1.5, 2.5), 1.25, 1),  # the prefill kernel wins from 2
        ((1.0, 1.0, 1.0, 1.0), (1.0, 1.0, 1.5, 2.5), 1.25, 16),
    ],
)
def test_decode_max_rows_is_where_the_prefill_kernel_overtakes(
    gen, monkeypatch, decode_ms, prefill_ms, slack, expected_rows
):
    qw, _ = quantize_int8(weight(gen, 32, 64))
    times = {"decode": {"int8pack_bf16": 1.0}, "prefill": {"dense_fp32": 1.0}}
    for m, d, p in zip(dispatch_module._CROSSOVER_ROWS, decode_ms, prefill_ms, strict=True):
        times[f"rows{m}"] = {"int8pack_bf16": d, "dense_fp32": p}
    _measured(monkeypatch, times)
    config = DispatchConfig(dense_budget_bytes=1 << 30, handover_slack=slack)
    plan = Dispatcher(config).plan(qw)
    assert (plan.decode.name, plan.prefill.name) == ("int8pack_bf16", "dense_fp32")
    assert plan.decode_max_rows == expected_rows


def test_decode_max_rows_falls_back_to_the_config_without_crossover_timings(gen, monkeypatch):
    qw, _ = quantize_int8(weight(gen, 32, 64))
    times = {"decode": {"int8pack_bf16": 1.0}, "prefill": {"dense_fp32": 1.0}}
    _measured(monkeypatch, times)
    plan = Dispatcher(DispatchConfig(dense_budget_bytes=1 << 30, decode_max_rows=9)).plan(qw)
    assert plan.decode_max_rows == 9


def test_dispatcher_keeps_busy_machine_timings_out_of_the_disk_cache(gen, tmp_path, monkeypatch):
    monkeypatch.setattr(dispatch_module, "_busy", lambda *a: "the load average was 7.5")
    times = {"decode": {"int4pack_bf16": 1.0}, "prefill": {"int4pack_bf16": 1.0}}
    monkeypatch.setattr(dispatch_module, "_calibrate", lambda *a: dispatch_module._Ranking(times))
    dispatcher = Dispatcher(DispatchConfig(cache_dir=tmp_path))
    dispatcher.plan(quantize_int4(weight(gen, 32, 64))[0])
    assert not (tmp_path / dispatch_module.CACHE_FILE).exists()


def test_timings_are_noise_while_other_processes_keep_our_cpus_busy(tmp_path, monkeypatch):
    # /proc/stat's busy time on our CPUs less our own, over the span: a process spinning on one
    # of two CPUs is 1.0 CPU (a VM host's steal counts the same); 0.3 is background.
    stat = tmp_path / "stat"
    tick = os.sysconf("SC_CLK_TCK")
    now, ours = [100.0], [0.0]
    monkeypatch.setattr(dispatch_module.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(os, "times", lambda: SimpleNamespace(user=ours[0], system=0))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.1, 0.1))

    def write(busy: float) -> None:  # CPU-seconds busy on cpu0 and cpu1 together
        user = round(busy * tick)
        stat.write_text(f"cpu  1 2 3 4\ncpu0 {user} 0 0 1000000 0 0 0 0\ncpu1 0 0 0 1000000\n")

    clock = dispatch_module.CpuClock(stat)
    for others, expected in ((1.0, "other processes kept 1.0 CPUs busy"), (0.3, None)):
        write(0.0)
        ours[0] = 0.0
        start = clock.sample()
        now[0] += 2.0
        ours[0] = 2.0 * 1.5  # our two threads, 1.5 CPUs of the span
        write(2.0 * (1.5 + others))
        assert dispatch_module._busy(clock, start) == expected
    # Without /proc/stat (not Linux): the 1-minute load average against 1.5x the CPUs.
    blind = dispatch_module.CpuClock(tmp_path / "absent")
    assert dispatch_module._busy(blind, blind.sample()) is None
    monkeypatch.setattr(os, "getloadavg", lambda: (99.0, 1.0, 1.0))
    assert dispatch_module._busy(blind, blind.sample()) == "the load average was 99.0"


def test_a_calibration_beside_busy_neighbours_is_neither_used_nor_cached(
    gen, tmp_path, monkeypatch, caplog
):
    # Used, such noise had put one layer's decode on dequant_fp32 (0.275 against 7.96 ms
    # for int8_native, every call of which a neighbour preempted), and so the whole decode
    # step ran module by module for as long as the daemon ran.
    monkeypatch.setattr(dispatch_module.CpuClock, "others", lambda self, since: 1.2)
    noise = {"decode": {"dequant_fp32": 0.275}, "prefill": {"dequant_fp32": 1.26}}
    monkeypatch.setattr(dispatch_module, "_calibrate", lambda *a: dispatch_module._Ranking(noise))
    qw = quantize_int4(weight(gen, 32, 64))[0]
    dispatcher = Dispatcher(DispatchConfig(cache_dir=tmp_path))
    with caplog.at_level(logging.INFO, logger="codelm.quant.dispatch"):
        plan = dispatcher.plan(qw)
    fixed = dispatch_module._heuristic_times(qw, dispatcher._candidates(qw), dispatcher.cpu)
    assert plan.decode.name == min(fixed["decode"], key=fixed["decode"].get) != "dequant_fp32"
    assert "heuristic: calibrated while other processes kept 1.2 CPUs busy" in caplog.text
    assert not (tmp_path / dispatch_module.CACHE_FILE).exists()


@pytest.mark.parametrize("still_busy", [True, False])
def test_after_a_busy_calibration_the_next_shape_looks_before_it_times(
    gen, tmp_path, monkeypatch, caplog, still_busy
):
    # Each shape's timings beside a busy neighbour took seconds, to be thrown away.
    looks = iter([1.2, 1.2 if still_busy else 0.0, 0.0])
    monkeypatch.setattr(dispatch_module.CpuClock, "others", lambda self, since: next(looks))
    monkeypatch.setattr(dispatch_module, "BUSY_PROBE_S", 0.0)
    timed = []
    times = {"decode": {"int4pack_bf16": 1.0}, "prefill": {"int4pack_bf16": 1.0}}

    def calibrate(*args):
        timed.append(args[0])
        return dispatch_module._Ranking(times)

    monkeypatch.setattr(dispatch_module, "_calibrate", calibrate)
    dispatcher = Dispatcher(DispatchConfig(cache_dir=tmp_path))
    with caplog.at_level(logging.INFO, logger="codelm.quant.dispatch"):
        for n in (32, 64):  # two shapes
            dispatcher.plan(quantize_int4(weight(gen, n, 64))[0])
    assert len(timed) == (1 if still_busy else 2)
    assert ("kept 1.2 CPUs busy, not calibrated" in caplog.text) is still_busy
    assert (tmp_path / dispatch_module.CACHE_FILE).exists() is not still_busy


def test_dispatcher_ignores_corrupt_cache_with_a_warning(gen, tmp_path, monkeypatch, caplog):
    (tmp_path / dispatch_module.CACHE_FILE).write_text("{not json")
    qw, _ = quantize_int8(weight(gen, 32, 64))
    times = {"decode": {"int8pack_bf16": 1.0}, "prefill": {"int8pack_bf16": 1.0}}
    _measured(monkeypatch, times)
    with caplog.at_level(logging.WARNING, logger="codelm.quant.dispatch"):
        plan = Dispatcher(DispatchConfig(cache_dir=tmp_path)).plan(qw)
    assert "ignoring unreadable kernel cache" in caplog.text
    assert plan.decode.name == "int8pack_bf16"
    saved = json.loads((tmp_path / dispatch_module.CACHE_FILE).read_text())
    assert saved["version"] == dispatch_module._CACHE_VERSION


def test_dispatcher_never_decodes_with_a_dense_copy_even_if_a_ranking_says_so(gen, monkeypatch):
    qw, _ = quantize_int8(weight(gen, 32, 64))
    # A ranking from an older cache, in which the dense copy timed fastest for decode.
    times = {
        "decode": {"dense_fp32": 0.1, "int8pack_bf16": 1.0},
        "prefill": {"dense_fp32": 0.1, "int8pack_bf16": 1.0},
    }
    _measured(monkeypatch, times)
    plan = Dispatcher(DispatchConfig(dense_budget_bytes=1 << 30)).plan(qw)
    assert plan.decode.name == "int8pack_bf16"
    assert plan.prefill.name == "dense_fp32"


def test_dispatcher_offers_lossy_dynamic_int8_only_when_allowed(gen):
    qw, _ = quantize_int8(weight(gen, 32, 64))
    assert "dynamic_int8" not in Dispatcher(DispatchConfig())._candidates(qw)
    assert "dynamic_int8" in Dispatcher(DispatchConfig(allow_lossy=True))._candidates(qw)


def test_dispatcher_offers_dense_copies_only_with_a_budget(gen):
    qw, _ = quantize_int4(weight(gen, 32, 64))
    plan = Dispatcher(DispatchConfig(calibrate=False)).plan(qw)
    assert not plan.decode.name.startswith("dense") and not plan.prefill.name.startswith("dense")


def test_dispatcher_never_uses_dense_copies_for_decode(gen, monkeypatch):
    monkeypatch.setattr(dispatch_module, "_busy", lambda *a: None)
    qw, _ = quantize_int4(weight(gen, 64, 128))
    dispatcher = Dispatcher(DispatchConfig(dense_budget_bytes=1 << 30))
    plan = dispatcher.plan(qw)
    (ranking,) = dispatcher._rankings.values()
    assert not any(name.startswith("dense") for name in ranking.times_ms["decode"])
    assert "dense_bf16" in ranking.times_ms["prefill"]
    assert not plan.decode.name.startswith("dense")


def test_faster_scheme_streams_each_scheme_once_and_keeps_the_time(tmp_path, monkeypatch):
    monkeypatch.setattr(dispatch_module, "_busy", lambda *a: None)
    monkeypatch.setattr(dispatch_module, "_STREAM_BYTES", 4 << 20)  # small, for speed
    streamed = []
    stream = dispatch_module._streamed_decode_ms

    def counted(spec, qw, **kwargs):
        streamed.append((spec.name, qw.scheme))
        return stream(spec, qw, **kwargs)

    monkeypatch.setattr(dispatch_module, "_streamed_decode_ms", counted)
    cpu = torch.device("cpu")
    times = Dispatcher(DispatchConfig(cache_dir=tmp_path)).faster_scheme(cpu, (256, 512))
    assert set(times) == {"int4", "int8"} and all(ms > 0 for ms in times.values())
    assert list(times.values()) == sorted(times.values())  # fastest first
    assert sorted(scheme for _, scheme in streamed) == ["int4", "int8"]
    # A new dispatcher (the next load) reads the streamed times with the rankings.
    again = Dispatcher(DispatchConfig(cache_dir=tmp_path)).faster_scheme(cpu, (256, 512))
    assert again == times and len(streamed) == 2
    # K that int4's groups of 32 do not tile: int8 only. Calibration off: no measurement.
    assert set(Dispatcher().faster_scheme(cpu, (64, 200))) == {"int8"}
    assert Dispatcher(DispatchConfig(calibrate=False)).faster_scheme(cpu, (256, 512)) == {}


class _Clocked:
    """A kernel whose calls take `ms` each (a sleep), counting them."""

    def __init__(self, ms: float) -> None:
        self.ms, self.calls = ms, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        dispatch_module.time.sleep(self.ms / 1e3)
        return x


def test_timing_takes_a_long_call_at_most_twice_and_a_short_one_more_often():
    # A head's prefill candidates run 80-340 ms a call: the warm-up and one more are enough
    # there, where short calls are sampled until 25 ms have passed (at least three).
    x = torch.zeros(1, 4)
    long, short = _Clocked(120.0), _Clocked(2.0)
    assert dispatch_module._time_ms(long, x, best_ms=100.0) >= 120.0
    assert long.calls == 2
    assert dispatch_module._time_ms(short, x, best_ms=1.0) >= 2.0
    assert short.calls >= 1 + 3
    # A long call twice the best so far: one more would not make it the best.
    loser = _Clocked(120.0)
    assert dispatch_module._time_ms(loser, x, best_ms=50.0) >= 120.0
    assert loser.calls == 1


class _Modelled:
    """A kernel whose time for x of m rows is ms(m), as _modelled_time reports it: the
    calibration's choices then follow from the model, not from this machine's load."""

    def __init__(self, ms) -> None:
        self.ms = ms

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _modelled_time(kernel, x, *, best_ms, budget_ms=25.0):
    kernel(x)
    return kernel.ms(x.shape[0])


def test_calibration_skips_the_crossover_rows_of_an_outclassed_copy(gen, monkeypatch):
    # A prefill copy slower than one holding no more bytes is never picked (nor ever
    # decodes), so its timings at 2-16 rows would go unread; every other candidate gets them.
    monkeypatch.setattr(dispatch_module, "_time_ms", _modelled_time)
    qw, _ = quantize_int8(weight(gen, 32, 64))

    def spec(name: str, ms: float, bytes_per_weight: float) -> KernelSpec:
        return KernelSpec(name, ("int8",), lambda qw: _Modelled(lambda m: ms), bytes_per_weight)

    specs = {
        "small_fast_copy": spec("small_fast_copy", 1.0, 1.0),
        "big_slow_copy": spec("big_slow_copy", 4.0, 2.0),
        "smaller_slow_copy": spec("smaller_slow_copy", 4.0, 0.5),
        "no_copy": spec("no_copy", 4.0, 0.0),
    }
    times = dispatch_module._calibrate(qw, specs, (1, 8), tie=1.05).times_ms
    crossover = [f"rows{m}" for m in dispatch_module._CROSSOVER_ROWS]
    assert set(times["prefill"]) == set(specs)
    for phase in crossover:
        assert set(times[phase]) == set(specs) - {"big_slow_copy"}, phase


def test_a_big_layer_times_whole_only_candidates_a_slice_of_its_rows_cannot_rule_out(
    gen, monkeypatch
):
    # A head's dense copies were built whole (545 MB for fp32) only to lose. Above
    # _SCREEN_BYTES each candidate is first timed on a slice of rows; one slower beyond the
    # margin than another holding no more bytes, in every phase it runs, is never built whole.
    monkeypatch.setattr(dispatch_module, "_time_ms", _modelled_time)
    qw, _ = quantize_int8(weight(gen, 256, 64))
    monkeypatch.setattr(dispatch_module, "_SCREEN_BYTES", qw.nbytes - 1)
    monkeypatch.setattr(dispatch_module, "_SLICE_BYTES", qw.nbytes // 8)
    built: dict[str, list[int]] = {}

    def spec(name: str, bytes_per_weight: float, decode: float, prefill: float) -> KernelSpec:
        def build(w):
            built.setdefault(name, []).append(w.shape[0])
            return _Modelled(lambda m: decode if m == 1 else prefill)

        return KernelSpec(name, ("int8",), build, bytes_per_weight)

    specs = {
        "tiles": spec("tiles", 1.2, 1.0, 1.0),
        "slow_big_copy": spec("slow_big_copy", 4.0, 1.0, 2.0),  # beaten by tiles: dropped
        "fast_bigger_copy": spec("fast_bigger_copy", 2.0, 1.0, 0.5),
        "rows": spec("rows", 0.0, 1.0, 1.6),  # slower than tiles, but holds fewer bytes
        "slow_rows": spec("slow_rows", 0.0, 2.0, 3.0),  # beaten by rows in both phases
        "rows_fast_decode": spec("rows_fast_decode", 0.0, 0.5, 3.0),  # the best decode
    }
    times = dispatch_module._calibrate(qw, specs, (1, 8), tie=1.05).times_ms
    kept = {"tiles", "fast_bigger_copy", "rows", "rows_fast_decode"}
    assert set(times["prefill"]) == kept
    slice_rows = 256 // 8 // 16 * 16
    assert built["slow_big_copy"] == built["slow_rows"] == [slice_rows]
    assert all(built[name] == [slice_rows, 256] for name in kept)

    built.clear()  # a layer within _SCREEN_BYTES is timed whole at once
    monkeypatch.setattr(dispatch_module, "_SCREEN_BYTES", qw.nbytes)
    dispatch_module._calibrate(qw, specs, (1, 8), tie=1.05)
    assert all(rows == [256] for rows in built.values()) and set(built) == set(specs)


def test_a_layer_with_fewer_prefill_rows_is_calibrated_and_keyed_at_them(gen, monkeypatch):
    # A head only ever checks drafts: its prefill candidates are timed at the rows it takes,
    # and that ranking is kept apart from one timed at a prompt chunk's rows.
    qw, _ = quantize_int8(weight(gen, 32, 64))
    asked = []

    def calibrate(qw, specs, rows, tie, chunk):
        asked.append((*rows, chunk))
        return dispatch_module._Ranking(
            {"decode": {"dequant_fp32": 1.0}, "prefill": {"dequant_fp32": 1.0}}
        )

    monkeypatch.setattr(dispatch_module, "_calibrate", calibrate)
    monkeypatch.setattr(dispatch_module, "_busy", lambda *a: None)
    dispatcher = Dispatcher(DispatchConfig(calibration_rows=(1, 128)))
    dispatcher.plan(qw, name="lm_head", prefill_rows=16)
    dispatcher.plan(qw, name="o_proj")
    dispatcher.plan(qw, name="lm_head", prefill_rows=16)  # the ranking made for it above
    # The int5 / int8 chunk comparison runs at the rows it brings as well (_time_pair).
    assert asked == [(1, 16, 16), (1, 128, 512)]
    assert {key.split("|rows ")[1].split("|")[0] for key in dispatcher._rankings} == {"16", "128"}


class _TwoPaths(_Modelled):
    """A native-like kernel: a call of m rows takes `layout` ms plus 0.1 ms a row from
    tiled_from rows on, else 1 ms a row."""

    tiled_from = 4

    def __init__(self, layout: float) -> None:
        super().__init__(lambda m: layout + 0.1 * m if m >= self.tiled_from else 1.0 * m)


@pytest.mark.parametrize(("layout", "expected"), [(1.0, 2), (5.0, 8), (50.0, 16)])
def test_calibration_measures_where_a_native_kernel_should_lay_tiles_out(
    gen, monkeypatch, layout, expected
):
    # The per-call layout pays off from the fewest rows where it times no slower than the
    # weight-row path (a large weight's layout costs more); the plan's kernel gets that
    # switch, and its crossover timings are those of the path it will take.
    monkeypatch.setattr(dispatch_module, "_time_ms", _modelled_time)
    qw, _ = quantize_int8(weight(gen, 32, 64))
    kernel = _TwoPaths(layout)
    specs = {"int8_native": KernelSpec("int8_native", ("int8",), lambda qw: kernel)}
    times = dispatch_module._calibrate(qw, specs, (1, 8)).times_ms
    assert times["tiled_from"] == {"int8_native": float(expected)}
    assert kernel.tiled_from == expected
    for m in (2, 4, 8):
        path_ms = layout + 0.1 * m if m >= expected else 1.0 * m
        assert times[f"rows{m}"]["int8_native"] == pytest.approx(path_ms), m


def test_a_planned_native_kernel_takes_the_measured_switch(gen, monkeypatch):
    qw, _ = quantize_int8(weight(gen, 32, 64))
    if CPU_KERNELS["int8_native"].unavailable(qw):
        pytest.skip("no native kernels here")
    times = {
        "decode": {"int8_native": 1.0},
        "prefill": {"int8_native": 1.0},
        "tiled_from": {"int8_native": 8.0},
    }
    _measured(monkeypatch, times)
    plan = Dispatcher(DispatchConfig()).plan(qw)
    assert plan.decode.name == "int8_native" and plan.decode.tiled_from == 8


def _five_bit_int8(gen):
    qw, _ = quantize_int8(weight(gen, 32, 64), group_size=32)
    return type(qw)(data=torch.clamp(qw.data // 8, -16, 15), scales=qw.scales * 8, group_size=32)


# Decode streamed, prefill at a chunk: (int5_native, int8_native) ms.
@pytest.mark.parametrize(
    ("prefill", "streamed", "chunk", "expected"),
    [
        ("int8_tiles", (0.8, 1.0), (9.0, 1.0), ("int5_native", "int8_tiles")),
        ("int8_tiles", (1.04, 1.0), (9.0, 1.0), ("int5_native", "int8_tiles")),  # a tie
        ("int8_tiles", (1.2, 1.0), (1.0, 1.0), ("int8_native", "int8_tiles")),
        ("int8_native", (0.8, 1.0), (1.04, 1.0), ("int5_native", "int5_native")),
        ("int8_native", (0.8, 1.0), (1.2, 1.0), ("int8_native", "int8_native")),
    ],
)
def test_int5_takes_over_from_int8_where_as_fast_from_memory_and_at_a_chunk(
    gen, monkeypatch, prefill, streamed, chunk, expected
):
    # The same numbers in a third fewer bytes: int5_native replaces int8_native where a decode
    # row streamed from memory, and (where prefill runs from the same bytes) a prompt's chunk,
    # take it no longer beyond the 5% tie; never one phase on each (both held).
    qw = _five_bit_int8(gen)
    if CPU_KERNELS["int5_native"].unavailable(qw):
        pytest.skip("no native kernels here")
    names = ("int5_native", "int8_native")
    times = {
        # From cache, int5_native's unpacking shows: never picked on these numbers alone.
        "decode": {"int5_native": 2.0, "int8_native": 1.0},
        "prefill": {"int5_native": 2.0, "int8_native": 1.0, "int8_tiles": 1.0},
        "streamed": dict(zip(names, streamed, strict=True)),
        "chunk": dict(zip(names, chunk, strict=True)),
    }
    times["prefill"][prefill] = 0.5
    _measured(monkeypatch, times)
    plan = Dispatcher(DispatchConfig(dense_budget_bytes=1 << 30)).plan(qw)
    assert (plan.decode.name, plan.prefill.name) == expected


def test_calibration_streams_int5_and_int8_and_times_them_at_a_chunk(gen, monkeypatch):
    qw = _five_bit_int8(gen)
    if CPU_KERNELS["int5_native"].unavailable(qw):
        pytest.skip("no native kernels here")
    specs = {n: CPU_KERNELS[n] for n in ("int5_native", "int8_native", "dequant_fp32")}
    timed_rows = set()
    timed_call = dispatch_module._timed_call

    def spy(kernel, x, *args, **kwargs):
        timed_rows.add(x.shape[0])
        return timed_call(kernel, x, *args, **kwargs)

    monkeypatch.setattr(dispatch_module, "_timed_call", spy)
    times = dispatch_module._calibrate(qw, specs, (1, 8), chunk=24).times_ms
    assert 24 in timed_rows  # the engine's chunk (EngineConfig.prefill_chunk), not a constant
    pair = {"int5_native", "int8_native"}
    assert set(times["streamed"]) == set(times["chunk"]) == pair
    assert all(times[kind][n] > 0 for kind in ("streamed", "chunk") for n in pair)
    # Not where only one of them is a candidate (int8 that does not fit 5 bits).
    del specs["int5_native"]
    assert "streamed" not in dispatch_module._calibrate(qw, specs, (1, 8)).times_ms


def test_timings_that_cannot_be_written_are_kept_in_memory(gen, tmp_path, monkeypatch):
    # A read-only cache dir (here: a file where the folder should be) costs a new
    # calibration at the next load, not this one.
    times = {"decode": {"int4pack_bf16": 1.0}, "prefill": {"int4pack_bf16": 1.0}}
    _measured(monkeypatch, times)
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    plan = Dispatcher(DispatchConfig(cache_dir=blocked / "kernels")).plan(
        quantize_int4(weight(gen, 32, 64))[0]
    )
    assert plan.decode.name == "int4pack_bf16"
