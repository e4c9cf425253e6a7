"""Choose a kernel per (device, CPU, scheme, shape): time the candidates once, cache the ranking.

Decode (few rows of x) and prefill (many rows) get separate choices, since one is bound by
memory and the other by compute. Rankings persist in a JSON file when a cache dir is given.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from codelm.quant import cuda, native
from codelm.quant.cpu import (
    CPU_KERNELS,
    NEVER_TILED,
    Int8Native,
    Int8Shortlist,
    Kernel,
    KernelSpec,
    native_unavailable,
)
from codelm.quant.formats import INT4_GROUP, QuantizedWeight, is_grouped_int8, select_rows
from codelm.quant.reference import requantize_int8_per_channel

logger = logging.getLogger(__name__)

CACHE_FILE = "quant_dispatch.json"
# 2: rankings from before dense copies became prefill-only are dropped; 3: crossover timings
_CACHE_VERSION = 3
_PHASES = ("decode", "prefill")
# Rows of x at which calibration also times every candidate, to find where the prefill
# kernel overtakes the decode one (KernelPlan.decode_max_rows): a short prefill after an
# edit (a few tokens) or a draft check is neither a decode step nor a 128-row chunk.
_CROSSOVER_ROWS = (2, 4, 8, 16)


def _runs_in(spec: KernelSpec, phase: str) -> bool:
    """Whether spec's kernel is a candidate in `phase`. Dense copies serve prefill only
    (docs/quant.md): decode is memory-bound and reads every weight per token. Over all
    SmolLM2 layers (cold caches, 1 thread) int4pack_bf16 took 5.6 ms per token, dense_bf16 29
    ms, dense_fp32 47 ms, while hot-cache calibration of one layer flatters the dense copies."""
    return not (phase == "decode" and spec.dense_bytes_per_weight)


@dataclass(frozen=True, kw_only=True, slots=True)
class CpuInfo:
    model_name: str
    flags: frozenset[str]

    @property
    def has_avx2(self) -> bool:
        return "avx2" in self.flags

    @property
    def has_avx512f(self) -> bool:
        return "avx512f" in self.flags

    @property
    def has_avx512_bf16(self) -> bool:
        return "avx512_bf16" in self.flags

    @property
    def has_amx(self) -> bool:
        return "amx_bf16" in self.flags or "amx_tile" in self.flags

    @property
    def has_bf16_hardware(self) -> bool:
        return self.has_avx512_bf16 or self.has_amx


@dataclass(frozen=True, kw_only=True, slots=True)
class DispatchConfig:
    """cache_dir: where the ranking JSON lives (None: memory only). dense_budget_bytes: memory
    all layers together may spend on prefill copies beside the format (dequantised, or int8
    tiles). allow_lossy: also try kernels that quantise activations (fbgemm dynamic int8).
    use_bitsandbytes: also try its CUDA int8 / nf4 kernels (pip install bitsandbytes).
    calibrate False: rank by a fixed heuristic."""

    cache_dir: Path | None = None
    calibrate: bool = True
    dense_budget_bytes: int = 0
    allow_lossy: bool = False
    use_bitsandbytes: bool = False
    decode_max_rows: int = 16  # where calibration has no crossover timings
    calibration_rows: tuple[int, int] = (1, 128)
    # The rows of a prompt's chunk (EngineConfig.prefill_chunk): where prefill kernels that
    # lay their weights out per call are compared (_in_five_bits).
    chunk_rows: int = 512
    # Decode takes a native kernel measured up to this factor slower than the fastest: a
    # llama-family model whose block linears all decode natively runs its decode step as one
    # native call (daemon/engine/fused_decode.py: 22 against 39 ms a token for
    # Qwen2.5-Coder-0.5B on a 2-core AVX2 CPU), which the per-layer timings cannot see.
    native_decode_slack: float = 1.25
    # A layer keeps its decode kernel for x of 2 to 16 rows while it is within this factor of
    # its prefill kernel there (`KernelPlan.decode_max_rows`): one-layer timing loops keep the
    # weights in cache, which flatters a dense copy's extra bytes.
    handover_slack: float = 1.25
    # Prefill kernels timed within this factor of the fastest are taken as tied, and the one
    # holding the fewest bytes beside the format wins: near timings swap between runs (one put
    # Qwen2.5-Coder's int4 head on a 272 MB bf16 copy, the next timed its 170 MB int8 tiles
    # 8% faster), and memory held is not noise.
    prefill_tie: float = 1.05


@dataclass(frozen=True, slots=True)
class KernelPlan:
    """The kernels one layer runs: `decode` for x with <= decode_max_rows rows, else `prefill`."""

    decode: Kernel
    prefill: Kernel
    decode_max_rows: int

    @property
    def nbytes(self) -> int:
        kernels = {id(k): k for k in (self.decode, self.prefill)}
        return sum(k.nbytes for k in kernels.values())


@dataclass
class _Ranking:
    times_ms: dict[str, dict[str, float]]  # phase -> kernel name -> ms


class Dispatcher:
    """Builds KernelPlans; holds the per-shape rankings and the dense-copy budget left."""

    def __init__(self, config: DispatchConfig | None = None) -> None:
        self.config = config or DispatchConfig()
        self.cpu = read_cpu_info()
        self._rankings: dict[str, _Ranking] = {}
        self._planned: set[tuple[str, str, str]] = set()  # (key, decode, prefill) logged
        self._disk: dict[str, dict[str, dict[str, float]]] | None = None
        self.dense_bytes_used = 0
        # What copies may hold at most from here on, when memory is short (limit_copies).
        self._copies_cap: int | None = None
        self._found_busy = False  # a calibration of this dispatcher's was thrown away as noise

    def plan(
        self, qw: QuantizedWeight, *, name: str = "linear", prefill_rows: int | None = None
    ) -> KernelPlan:
        """Pick and build the decode and prefill kernels for qw (on qw's device).
        `prefill_rows`: the most rows of x a call brings this layer beyond decode, where that
        is fewer than a prompt's chunk (a head checks drafts only); its prefill candidates are
        timed there instead of at DispatchConfig.calibration_rows[1]."""
        if is_grouped_int8(qw) and not self.int8_group_size(_device(qw), qw.shape[1]):
            # No kernel here takes int8 groups (GGUF Q8_0's blocks of 32): requantise per channel.
            qw, err = requantize_int8_per_channel(qw)
            logger.debug("%s: int8 group-wise -> per-channel, max abs err %.3g", name, err)
        specs = self._candidates(qw)
        if not specs:
            raise ValueError(f"{name}: no {qw.scheme} kernel for shape {qw.shape} on {_device(qw)}")
        rows = (self.config.calibration_rows[0], prefill_rows or self.config.calibration_rows[1])
        chunk = prefill_rows or self.config.chunk_rows
        key = self._key(qw, specs, rows, chunk)
        ranking = self._ranking(key, qw, specs, rows, chunk)
        left = self.copies_left()
        # int5_native is int8_native's weight in fewer bytes: it takes over from it or not at all.
        picks = {n: spec for n, spec in specs.items() if n != "int5_native"}
        decode = self._pick(ranking, picks, "decode", qw, left=left)
        # A dense copy already paid for by decode costs prefill nothing more.
        left -= _dense_bytes(specs[decode], qw)
        prefill = self._pick(ranking, picks, "prefill", qw, left=left, free=decode)
        chosen = _in_five_bits(decode, prefill, ranking.times_ms, self.config.prefill_tie)
        kernels = {n: specs[n].build(qw) for n in set(chosen.values())}
        for n, tiled_from in ranking.times_ms.get("tiled_from", {}).items():
            if n in kernels:
                kernels[n].tiled_from = int(tiled_from)
        # What the layer holds beside its decode kernel (loader.copies_bytes counts the same).
        self.dense_bytes_used += sum(
            kernel.nbytes for n, kernel in kernels.items() if n != chosen["decode"]
        )
        logger.debug(
            "%s %s: decode=%s prefill=%s", name, qw.shape, chosen["decode"], chosen["prefill"]
        )
        if (key, chosen["decode"], chosen["prefill"]) not in self._planned:
            # The ranking's first is not always the pick (the budget, ties, _in_five_bits).
            self._planned.add((key, chosen["decode"], chosen["prefill"]))
            logger.info(
                "quant plan for %s: decode %s, prefill %s", key, chosen["decode"], chosen["prefill"]
            )
        rows = _decode_max_rows(ranking.times_ms, chosen["decode"], chosen["prefill"], self.config)
        return KernelPlan(
            decode=kernels[chosen["decode"]],
            prefill=kernels[chosen["prefill"]],
            decode_max_rows=rows,
        )

    def copies_left(self) -> int:
        """Bytes more copies may take: the budget's rest, or less where limit_copies said so."""
        return min(self.config.dense_budget_bytes - self.dense_bytes_used, self._room())

    def _room(self) -> float:
        return math.inf if self._copies_cap is None else self._copies_cap - self.dense_bytes_used

    def limit_copies(self, room: int) -> None:
        """Copies built from now on may take at most `room` bytes: what the memory left holds
        beyond the weights still to come (a load near the memory's end). It also bounds
        what calibration builds for a moment (the default model's head as fp32: 545 MB)."""
        self._copies_cap = self.dense_bytes_used + max(0, room)

    def faster_scheme(self, device: torch.device, shape: tuple[int, int]) -> dict[str, float]:
        """Decode ms of an [N, K] layer as int4 (groups of 32) and as int8, fastest first.

        Each runs the kernel plan() would pick for that shape, on copies of a random weight
        that together far exceed the CPU's caches (`_STREAM_BYTES`), as a decode step reads a
        model's weights: a one-layer loop keeps them in cache and hides int8's extra bytes.
        The per-shape rankings are plan()'s, so the model's layers of this shape calibrate no
        second time, and the streamed time is kept with them ("streamed"). Empty when
        calibration is off (a heuristic order is no measurement).
        """
        from codelm.quant.reference import quantize_int4, quantize_int8

        if not self.config.calibrate:
            return {}
        n, k = shape
        generator = torch.Generator().manual_seed(0)
        w = (torch.randn(n, k, generator=generator) * k**-0.5).to(device)
        weights = {"int8": quantize_int8(w, self.int8_group_size(device, k))[0]}
        if k % INT4_GROUP == 0:
            weights["int4"] = quantize_int4(w)[0]
        times = {}
        for scheme, qw in weights.items():
            specs = self._candidates(qw)
            rows, chunk = self.config.calibration_rows, self.config.chunk_rows
            key = self._key(qw, specs, rows, chunk)
            ranking = self._ranking(key, qw, specs, rows, chunk)
            left = self.copies_left()
            name = self._pick(ranking, specs, "decode", qw, left=left)
            streamed = ranking.times_ms.setdefault("streamed", {})
            if name not in streamed:
                clock = CpuClock()
                start = clock.sample()
                streamed[name] = _streamed_decode_ms(specs[name], qw)
                if _busy(clock, start) is None:
                    self._save_disk(key, ranking.times_ms)
            times[scheme] = streamed[name]
        return dict(sorted(times.items(), key=lambda item: item[1]))

    def shortlist(self, exact: Kernel, name: str = "lm_head") -> Int8Shortlist | None:
        """An Int8Shortlist over an int8 head's decode kernel, for picks that read only the
        two largest logits (daemon/engine/layers.py, `top_two`), where it fits the memory
        left for copies and a row through it, timed in turn with `exact` on a peaked x (one
        of the head's own rows, as a model's last hidden state points at its next token), is
        faster beyond the tie: the memory is spent where it measured a gain. (After that the
        shortlist runs whichever of its path and `exact` times faster, call by call.) None
        elsewhere, and the log says why."""
        if not isinstance(exact, Int8Native) or not self.config.calibrate:
            return None
        left = self.copies_left()
        if (size := Int8Shortlist.bytes_for(exact)) > left:  # before packing one
            logger.info(
                "%s: no shortlist: its %.0f MB exceed the %.0f MB left for copies",
                name,
                size / 1e6,
                max(0, left) / 1e6,
            )
            return None
        shortlist = Int8Shortlist(exact)
        x = exact.data[:1].float() * exact.scales[:1].float().repeat_interleave(
            exact.group_size, dim=1
        )
        times = {"shortlist": math.inf, exact.name: math.inf}
        for _ in range(_PAIR_ROUNDS):
            for label, kernel in ((exact.name, exact), ("shortlist", shortlist.shortlisted)):
                times[label] = min(times[label], _timed_call(kernel, x))
        taken = times["shortlist"] * self.config.prefill_tie < times[exact.name]
        logger.info(
            "%s: a decode row %.2f ms through its shortlist (%.0f MB more), %.2f ms through %s: %s",
            name,
            times["shortlist"],
            shortlist.nbytes / 1e6,
            times[exact.name],
            exact.name,
            "shortlist taken" if taken else f"{exact.name} kept",
        )
        if not taken:
            return None
        self.dense_bytes_used += shortlist.nbytes
        shortlist.ms = {"shortlist": times["shortlist"], "exact": times[exact.name]}  # to start
        return shortlist

    def int8_group_size(self, device: torch.device, k: int) -> int | None:
        """The int8 group size for a weight of K inputs on `device`: 32 where the native
        kernel serves (it keeps GGUF Q8_0 exactly and quantises activations in blocks of 32:
        together as close to fp32 as per-channel int8 with bf16 activations, docs/quant.md)
        and on CUDA (int8_triton and dequant_bf16 take groups), None for one scale per output
        channel, which torch's CPU int8 kernels take."""
        if device.type == "cuda":
            return 32 if k % 32 == 0 else None
        return None if native_unavailable(device, k, 32, self.config.cache_dir) else 32

    def _candidates(self, qw: QuantizedWeight) -> dict[str, KernelSpec]:
        if _device(qw).type == "cuda":
            table = cuda.CUDA_KERNELS
        else:
            table = CPU_KERNELS
            native.library(self.config.cache_dir)  # built next to the rankings, once
        grouped_int8 = is_grouped_int8(qw)
        specs = {}
        for spec in table.values():
            if qw.scheme not in spec.schemes:
                continue
            if grouped_int8 and spec.per_channel_int8:
                continue
            if spec.opt_in and not getattr(self.config, spec.opt_in):
                continue
            dense = _dense_bytes(spec, qw)
            if dense > self.config.dense_budget_bytes or dense > self._room():
                continue  # never affordable, or no room now: not worth building to time it
            reason = spec.unavailable(qw) if spec.unavailable else None
            if reason:
                logger.debug("kernel %s skipped for %s: %s", spec.name, qw.shape, reason)
                continue
            specs[spec.name] = spec
        return specs

    def _key(
        self, qw: QuantizedWeight, specs: dict[str, KernelSpec], rows: tuple[int, int], chunk: int
    ) -> str:
        device = _device(qw)
        hw = torch.cuda.get_device_name(device) if device.type == "cuda" else self.cpu.model_name
        n, k = qw.shape
        group = "ch" if qw.group_size == k else qw.group_size
        built = [f"{s} {native.build_key()}" if s.endswith("_native") else s for s in specs]
        return (
            f"{hw}|torch {torch.__version__}|threads {torch.get_num_threads()}|{qw.scheme} "
            f"g{group}|{n}x{k}|rows {rows[1]}|chunk {chunk}|{','.join(sorted(built))}"
        )

    def _ranking(
        self,
        key: str,
        qw: QuantizedWeight,
        specs: dict[str, KernelSpec],
        rows: tuple[int, int],
        chunk: int,
    ) -> _Ranking:
        if key in self._rankings:
            return self._rankings[key]
        source = "heuristic"
        times = self._load_disk().get(key) if self.config.calibrate else None
        if times is not None:
            ranking, source = _Ranking(times), "disk cache"
        elif self.config.calibrate:
            ranking, source = self._calibrate_and_store(key, qw, specs, rows, chunk)
        else:
            ranking = _Ranking(_heuristic_times(qw, specs, self.cpu))
        self._rankings[key] = ranking
        logger.info("quant kernels for %s (%s): %s", key, source, _describe(ranking.times_ms))
        return ranking

    def _calibrate_and_store(
        self,
        key: str,
        qw: QuantizedWeight,
        specs: dict[str, KernelSpec],
        rows: tuple[int, int],
        chunk: int,
    ) -> tuple[_Ranking, str]:
        # Timings on a loaded machine are noise: the fixed order plans this process, and a
        # later quiet load calibrates. (Used, noise had put one layer's decode on
        # dequant_fp32, which runs the whole decode step module by module.)
        heuristic = _Ranking(_heuristic_times(qw, specs, self.cpu))
        clock = CpuClock()
        if self._found_busy:  # likely still: a short look first, not seconds of timings
            start = clock.sample()
            time.sleep(BUSY_PROBE_S)
            if (busy := _busy(clock, start)) is not None:
                return heuristic, f"heuristic: {busy}, not calibrated"
        # Likely winners first, so clearly slower candidates are dropped after one call.
        prior = heuristic.times_ms["prefill"]
        ordered = dict(sorted(specs.items(), key=lambda kv: prior.get(kv[0], math.inf)))
        start = clock.sample()
        ranking = _calibrate(qw, ordered, rows, self.config.prefill_tie, chunk)
        self._found_busy = (busy := _busy(clock, start)) is not None
        if busy is not None:
            return heuristic, f"heuristic: calibrated while {busy}, neither used nor cached"
        self._save_disk(key, ranking.times_ms)
        return ranking, "calibrated"

    def _pick(
        self,
        ranking: _Ranking,
        specs: dict[str, KernelSpec],
        phase: str,
        qw: QuantizedWeight,
        *,
        left: int,
        free: str | None = None,
    ) -> str:
        times = ranking.times_ms[phase]
        slack = self.config.native_decode_slack if phase == "decode" else 1.0
        order = sorted(
            (t / slack if n in _NATIVE else t, n)
            for n, t in times.items()
            # Dense copies never decode (_runs_in), whatever a ranking says.
            if n in specs and _runs_in(specs[n], phase)
        )
        held = {n: 0 if n == free else _held_bytes(specs[n], qw, phase) for _, n in order}
        affordable = [(t, n) for t, n in order if held[n] <= left]
        if not affordable:
            raise ValueError(
                f"no affordable {phase} kernel for {qw.scheme} {qw.shape} among {order}"
            )
        if phase == "decode":
            return affordable[0][1]
        tied = {n: t for t, n in affordable if t <= affordable[0][0] * self.config.prefill_tie}
        slack = self.config.handover_slack
        keep_up = [n for n in tied if _keeps_up_at_few_rows(ranking.times_ms, n, tied, slack)]
        return min((held[n], tied[n], n) for n in keep_up or tied)[2]

    def _load_disk(self) -> dict[str, dict[str, dict[str, float]]]:
        if self._disk is None:
            self._disk = _read_cache(self._cache_path()) if self.config.cache_dir else {}
        return self._disk

    def _save_disk(self, key: str, times: dict[str, dict[str, float]]) -> None:
        path = self._cache_path()
        if path is None:
            return
        entries = _read_cache(path)  # merge: another process may have added shapes meanwhile
        entries[key] = times
        self._load_disk()[key] = times
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"version": _CACHE_VERSION, "entries": entries}, indent=1))
            os.replace(tmp, path)
        except OSError as exc:  # a read-only or full cache dir: timed again at the next load
            logger.warning("could not keep the kernel timings in %s: %s", path, exc)

    def _cache_path(self) -> Path | None:
        return Path(self.config.cache_dir) / CACHE_FILE if self.config.cache_dir else None


def _calibrate(
    qw: QuantizedWeight,
    specs: dict[str, KernelSpec],
    rows: tuple[int, int],
    tie: float = 1.0,
    chunk: int = 512,
) -> _Ranking:
    """Times of each candidate per phase. A copy that prefills slower (beyond `tie`, as _pick
    reads it) than one holding no more bytes is never picked, whatever the budget, and never
    decodes: its crossover rows go untimed (the default model's head: ~1 s of a first load)."""
    device, k = _device(qw), qw.shape[1]
    held = {name: _dense_bytes(spec, qw) for name, spec in specs.items()}
    specs = _screened(qw, specs, rows, held)
    xs = {phase: torch.randn(m, k, device=device) for phase, m in zip(_PHASES, rows, strict=True)}
    xs |= {f"rows{m}": torch.randn(m, k, device=device) for m in _CROSSOVER_ROWS}
    times: dict[str, dict[str, float]] = {phase: {} for phase in xs}
    prefilled = times["prefill"]
    for name, spec in specs.items():
        # One candidate alive at a time: a head's dense fp32, bf16 and fp16 copies held
        # together were 1.1 GB of Qwen2.5-Coder's load peak. plan() builds the winners again.
        try:
            kernel = spec.build(qw)
            for phase, x in xs.items():
                if not _runs_in(spec, phase):
                    continue
                copy = spec.dense_bytes_per_weight
                if phase.startswith("rows") and copy and _outclassed(name, prefilled, held, tie):
                    break
                best = min(times[phase].values(), default=math.inf)
                times[phase][name] = _time_ms(kernel, x, best_ms=best)
            if hasattr(kernel, "tiled_from"):
                _calibrate_tiled_from(name, kernel, xs, times)
        except (RuntimeError, NotImplementedError) as exc:
            # A kernel this torch build or device rejects is no candidate; the rest still are.
            logger.warning("kernel %s failed on %s %s: %s", name, qw.scheme, qw.shape, exc)
            for phase_times in times.values():
                phase_times.pop(name, None)
        kernel = None  # freed before the next candidate is built
    if all(n in times["decode"] for n in _SAME_NUMBERS):
        _time_pair(qw, {n: specs[n] for n in _SAME_NUMBERS}, times, chunk)
    return _Ranking(times)


# int8 weights in -16 .. 15 (GGUF Q5_0's) as int8_native holds them and as int5_native does, in
# two thirds of the bytes: the same products, so the same numbers.
_SAME_NUMBERS = ("int5_native", "int8_native")


def _time_pair(
    qw: QuantizedWeight,
    specs: dict[str, KernelSpec],
    times: dict[str, dict[str, float]],
    chunk_rows: int,
) -> None:
    """times["streamed"] and times["chunk"] of _SAME_NUMBERS, for _in_five_bits: one decode
    row through copies of the layer totalling _PAIR_STREAM_BYTES each, and `chunk_rows` rows
    through one, the two kernels in turn _PAIR_ROUNDS times, the best of each. Their
    difference is a few percent, less than a busy machine moves one kernel's time from one
    second to the next: taken in turn, both run beside the same neighbours."""
    copies = {name: _copies(spec, qw, _PAIR_STREAM_BYTES) for name, spec in specs.items()}
    x = torch.randn(1, qw.shape[1], device=_device(qw))
    chunk = torch.randn(chunk_rows, qw.shape[1], device=_device(qw))
    streamed = times.setdefault("streamed", {})
    chunks = times.setdefault("chunk", {})
    for _ in range(_PAIR_ROUNDS):
        for name, kernels in copies.items():
            streamed[name] = min(streamed.get(name, math.inf), _row_through(kernels, x))
            chunks[name] = min(chunks.get(name, math.inf), _timed_call(kernels[0], chunk))


def _in_five_bits(
    decode: str, prefill: str, times: dict[str, dict[str, float]], tie: float
) -> dict[str, str]:
    """The kernels per phase: int5_native for int8_native where it runs no slower beyond `tie`,
    holding a third fewer bytes. Both are timed as the phase runs them: decode as one row
    through copies of the layer streamed from memory, prefill at a whole chunk's rows. The
    one-layer decode loops of _calibrate read the weights from cache, where the unpacking
    shows and the bytes saved do not, and 128 rows overweigh the tiles int5_native lays out
    per call (Qwen2.5-Coder-0.5B's gate / up on 2 Zen 4 cores: decode 0.17 against 0.15 ms
    from cache, 0.19-0.21 against 0.21-0.28 streamed; prefill 4.5 against 4.0 ms at 128 rows,
    14.2 against 13.8 at 512). Where prefill lays its tiles out from the decode bytes too
    (int8_native), int5_native takes both phases or neither."""
    chosen = {"decode": decode, "prefill": prefill}
    streamed, chunk = times.get("streamed", {}), times.get("chunk", {})
    if decode != "int8_native" or not all(n in streamed and n in chunk for n in _SAME_NUMBERS):
        return chosen
    if streamed["int5_native"] > tie * streamed["int8_native"]:
        return chosen
    if prefill == "int8_native":
        if chunk["int5_native"] > tie * chunk["int8_native"]:
            return chosen
        chosen["prefill"] = "int5_native"
    chosen["decode"] = "int5_native"
    return chosen


def _calibrate_tiled_from(
    name: str, kernel: Kernel, xs: dict[str, torch.Tensor], times: dict[str, dict[str, float]]
) -> None:
    """Where a native kernel's calls should switch from weight rows to laying tiles out
    (cpu._RowMajorNative.tiled_from): the fewest crossover rows up to 8 at which tiles time no
    slower, else 16 (where tiles won on every shape measured). The layout is paid per call: a
    cache-sized layer gains from 3 rows of x, the default model's 136 MB head from 6-8. Its
    rows timings become those of the path chosen."""
    measured = [m for m in _CROSSOVER_ROWS if m <= 8]
    paths: dict[str, dict[int, float]] = {"tiled": {}, "rows": {}}
    for path, tiled_from in (("tiled", 1), ("rows", NEVER_TILED)):
        kernel.tiled_from = tiled_from
        for m in measured:
            paths[path][m] = _time_ms(kernel, xs[f"rows{m}"], best_ms=math.inf)
    wins = [m for m in measured if paths["tiled"][m] <= paths["rows"][m]]
    choice = wins[0] if wins else 16
    kernel.tiled_from = choice
    times.setdefault("tiled_from", {})[name] = float(choice)
    for m in measured:
        times[f"rows{m}"][name] = paths["tiled" if m >= choice else "rows"][m]


def _outclassed(name: str, times: dict[str, float], held: dict[str, int], factor: float) -> bool:
    """Whether another candidate holding no more bytes than `name` timed faster than it by more
    than `factor` in `times` (one phase's); False where `name` has no time there."""
    if name not in times:
        return False
    return any(
        other != name and held[other] <= held[name] and ms * factor < times[name]
        for other, ms in times.items()
    )


# A layer holding more than _SCREEN_BYTES (a head: Qwen2.5-Coder-0.5B's 145 MB) first times its
# candidates on a slice of its rows of about _SLICE_BYTES, and builds whole only those no
# candidate holding no more bytes beats there by _SCREEN_MARGIN, in decode or in prefill: the
# default model's head built dense fp32, bf16 and fp16 copies of 545, 272 and 272 MB to time
# them, ~3 s and ~0.35 GB of peak memory of a first load. The margin is wide of what the slice
# moves (from cache, where the whole streams from memory) and of native_decode_slack.
_SCREEN_BYTES = 64 << 20
_SLICE_BYTES = 16 << 20
_SCREEN_MARGIN = 1.5


def _screened(
    qw: QuantizedWeight,
    specs: dict[str, KernelSpec],
    rows: tuple[int, int],
    held: dict[str, int],
) -> dict[str, KernelSpec]:
    """specs less those _SCREEN_MARGIN slower on a slice of qw's rows, in every phase they
    run, than one holding no more bytes (see _SCREEN_BYTES): those _pick would never take."""
    n, k = qw.shape
    if qw.nbytes <= _SCREEN_BYTES or len(specs) < 2:
        return specs
    rows_kept = min(n, max(16, n * _SLICE_BYTES // qw.nbytes // 16 * 16))
    part = select_rows(qw, torch.arange(rows_kept))
    xs = {p: torch.randn(m, k, device=_device(qw)) for p, m in zip(_PHASES, rows, strict=True)}
    times: dict[str, dict[str, float]] = {phase: {} for phase in _PHASES}
    for name, spec in specs.items():
        try:
            kernel = spec.build(part)
            for phase, x in xs.items():
                if _runs_in(spec, phase):
                    best = min(times[phase].values(), default=math.inf)
                    times[phase][name] = _time_ms(kernel, x, best_ms=best)
        except (RuntimeError, NotImplementedError):
            for phase_times in times.values():  # _calibrate tries it whole, and says why not
                phase_times.pop(name, None)
        kernel = None

    def beaten(name: str) -> bool:  # in every phase it was timed in
        phases = [times[p] for p in _PHASES if name in times[p]]
        return bool(phases) and all(_outclassed(name, t, held, _SCREEN_MARGIN) for t in phases)

    dropped = [name for name in specs if beaten(name)]
    if dropped:
        logger.info(
            "%s %s: %s outclassed on %d of its rows, not timed whole",
            qw.scheme,
            tuple(qw.shape),
            ", ".join(dropped),
            part.shape[0],
        )
    return {name: spec for name, spec in specs.items() if name not in dropped}


_STREAM_BYTES = 256 << 20  # weights faster_scheme streams through: several times any LLC
# What calibration streams int5_native and int8_native through, each, per layer shape: twice the
# 32 MB an 8-core CCD or a laptop CPU holds (where a CPU holds more, both time from cache and
# int8 stays); 256 MB took 4 s more of the default model's first load.
_PAIR_STREAM_BYTES = 64 << 20
_PAIR_ROUNDS = 5
_MAX_COPIES = 256


def _streamed_decode_ms(spec: KernelSpec, qw: QuantizedWeight, repeats: int = 3) -> float:
    """ms of one decode row through one layer when its weights come from memory: one row
    through distinct copies of the layer totalling _STREAM_BYTES, best of `repeats`."""
    kernels = _copies(spec, qw, _STREAM_BYTES)
    x = torch.randn(1, qw.shape[1], device=_device(qw))
    return min(_row_through(kernels, x) for _ in range(repeats))


def _copies(spec: KernelSpec, qw: QuantizedWeight, total_bytes: int) -> list[Kernel]:
    """spec's kernel of qw and of clones of it, totalling `total_bytes`: 2 to _MAX_COPIES of
    them (a layer small enough to need more fits a cache many times over anyway)."""
    first = spec.build(qw)
    copies = min(_MAX_COPIES, max(2, math.ceil(total_bytes / max(1, first.nbytes))))
    return [first] + [spec.build(_clone(qw)) for _ in range(copies - 1)]


def _row_through(kernels: list[Kernel], x: torch.Tensor) -> float:
    """ms per kernel of one call each on x, in turn: one decode row streamed through them."""
    start = time.perf_counter()
    for kernel in kernels:
        kernel(x)
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    return (time.perf_counter() - start) * 1e3 / len(kernels)


def _clone(qw: QuantizedWeight) -> QuantizedWeight:
    return dataclasses.replace(
        qw,
        **{
            f.name: getattr(qw, f.name).clone()
            for f in dataclasses.fields(qw)
            if isinstance(getattr(qw, f.name), torch.Tensor)
        },
    )


def _keeps_up_at_few_rows(
    times: dict[str, dict[str, float]], name: str, tied: Iterable[str], slack: float
) -> bool:
    """Whether prefill kernel `name` is within `slack` of the fastest of `tied` at every
    crossover row count it was timed at. A prompt's few-row forwards (an edit, a draft check)
    run the prefill kernel as well as its chunks do, and a kernel that lays its weights out
    per call ties a held copy at a chunk's rows only: Qwen2.5-Coder's gate / up, int8_native
    against int8_tiles, 4.3 against 4.3 ms at 128 rows, 0.54 against 0.14 at 4; a 4-row
    forward of the model, 71 against 35 ms."""
    for m in _CROSSOVER_ROWS:
        at = times.get(f"rows{m}", {})
        fastest = min((at[n] for n in tied if n in at), default=math.inf)
        if name in at and at[name] > slack * fastest:
            return False
    return True


def _decode_max_rows(
    times: dict[str, dict[str, float]], decode: str, prefill: str, config: DispatchConfig
) -> int:
    """The most rows of x the decode kernel takes: up to the last calibrated row count where
    it is within config.handover_slack of the prefill kernel, else config.decode_max_rows."""
    if decode == prefill:
        return config.decode_max_rows
    rows = 1
    for m in _CROSSOVER_ROWS:
        at = times.get(f"rows{m}", {})
        if decode not in at or prefill not in at:
            return config.decode_max_rows
        if at[decode] > config.handover_slack * at[prefill]:
            break
        rows = m
    return rows


_LONG_CALL_MS = 100.0  # a head's prefill candidates: 80-340 ms a call on 2 cores


def _time_ms(kernel: Kernel, x: torch.Tensor, *, best_ms: float, budget_ms: float = 25.0) -> float:
    """Min over calls after one warm-up. Other processes preempt our threads for whole time
    slices, so one slow call proves little: only a slow min, or a hopeless and costly call
    (lm head candidates), ends the sampling early. A call of _LONG_CALL_MS or more outlasts
    any one time slice many times over: the min of the warm-up and one more call will do,
    and the warm-up alone where it took twice the best (a second call would not make it the
    best: for the default model's head, 4 calls of 210-330 ms fewer at first load)."""
    hopeless_ms = max(8 * best_ms, 50.0)
    first = _timed_call(kernel, x)
    if first > hopeless_ms:
        return first
    if first >= _LONG_CALL_MS:
        return first if first > 2 * best_ms else min(first, _timed_call(kernel, x))
    samples: list[float] = []
    while len(samples) < 50:
        samples.append(_timed_call(kernel, x))
        fastest = min(samples)
        if fastest > hopeless_ms:
            break
        if len(samples) >= 3 and (sum(samples) >= budget_ms or fastest > 8 * best_ms):
            break
    return min(samples)


def _timed_call(kernel: Kernel, x: torch.Tensor) -> float:
    is_cuda = x.device.type == "cuda"
    if is_cuda:
        torch.cuda.synchronize(x.device)
    start = time.perf_counter()
    kernel(x)
    if is_cuda:
        torch.cuda.synchronize(x.device)
    return (time.perf_counter() - start) * 1e3


# Other processes keeping more of our CPUs busy than this, on average while a shape was timed,
# make its timings noise: one `while True: pass` beside a 2-core calibration timed an int8
# decode of 9728x896 at 7.9 ms (0.14-0.21 alone), and the 1-minute load average stayed under
# 1.5x the CPUs.
BUSY_CPUS = 0.5
# After one calibration thrown away as noise, how long the next shape looks at the CPUs before
# it calibrates: beside a busy neighbour SmolLM2 shapes took 2-18 s each to time (the head).
BUSY_PROBE_S = 0.1


def _busy(clock: CpuClock, since: tuple[float, float, float] | None) -> str | None:
    """Why timings taken since the sample `since` are noise, or None: other processes kept
    more than BUSY_CPUS of our CPUs busy meanwhile, or, where /proc/stat cannot be read, the
    1-minute load average exceeds 1.5x the logical CPUs."""
    others = clock.others(since)
    if others is not None:
        return f"other processes kept {others:.1f} CPUs busy" if others > BUSY_CPUS else None
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not Unix: no load average to consult
        return None
    return f"the load average was {load:.1f}" if load > 1.5 * (os.cpu_count() or 1) else None


def _heuristic_times(
    qw: QuantizedWeight, specs: dict[str, KernelSpec], cpu: CpuInfo
) -> dict[str, dict[str, float]]:
    """Fixed preference orders, expressed as fake ranks so _pick treats them like timings."""
    if _device(qw).type == "cuda":
        orders = cuda.HEURISTIC_ORDER
    elif cpu.has_bf16_hardware:
        # Measured on an AVX512-BF16 EPYC: bf16 GEMMs beat fp32 for prefill, and int8_tiles
        # (with AVX-512 VNNI there) beats both, int4 weights fastest as int8 (docs/quant.md).
        # Decode: the native kernels, which its calibrations pick too, and which alone make
        # the one-call decode step (fused_decode).
        orders = {
            "decode": _NATIVE + _PACKED + ("dequant_fp32",),
            "prefill": ("int4_as_int8_tiles", "int8_tiles", "sub_scaled_tiles", "dense_bf16")
            + _PACKED
            + ("dense_fp16", "dense_fp32", "dequant_fp32")
            + _NATIVE,
        }
    else:
        # Without bf16 hardware, bf16 GEMMs are 3-10x slower than fp32 for prefill; fbgemm's
        # fp16 GEMM (fp32 arithmetic) beats fp32 at half the bytes (AVX2 EPYC, docs/quant.md).
        orders = {
            "decode": _NATIVE + _PACKED + ("dequant_fp32",),
            "prefill": ("sub_scaled_tiles", "int8_tiles")
            + ("dense_fp16", "dense_fp32", "dequant_fp32")
            + _NATIVE
            + _PACKED,
        }
    return {
        phase: {n: float(i) for i, n in enumerate(order) if n in specs}
        for phase, order in orders.items()
    }


_PACKED = ("int4pack_bf16", "int8pack_bf16")
_NATIVE = ("int4_native", "int8_native")


def _held_bytes(spec: KernelSpec, qw: QuantizedWeight, phase: str) -> int:
    """What a prefill kernel other than the layer's decode kernel holds beside it: a copy's
    bytes, or for a kernel of the weight's own format (another layout of the same numbers:
    int4pack_bf16 beside int4_native) about the weight's. Decode kernels hold the weight."""
    copy = _dense_bytes(spec, qw)
    return copy if copy or phase == "decode" else qw.nbytes


def _dense_bytes(spec: KernelSpec, qw: QuantizedWeight) -> int:
    if spec.copy_bytes is not None:
        return spec.copy_bytes(qw)
    n, k = qw.shape
    return int(spec.dense_bytes_per_weight * n * k)


def _describe(times: dict[str, dict[str, float]]) -> str:
    parts = []
    for phase, by_name in times.items():
        ranked = sorted(by_name.items(), key=lambda item: item[1])
        parts.append(f"{phase}: " + ", ".join(f"{n} {t:.3g}" for n, t in ranked))
    return "; ".join(parts)


def _read_cache(path: Path | None) -> dict[str, dict[str, dict[str, float]]]:
    if path is None or not path.exists():
        return {}
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        logger.warning("ignoring unreadable kernel cache %s: %s", path, exc)
        return {}
    if not isinstance(payload, dict) or payload.get("version") != _CACHE_VERSION:
        logger.info("ignoring kernel cache %s from another version", path)
        return {}
    return dict(payload.get("entries", {}))


def _device(qw: QuantizedWeight) -> torch.device:
    return qw.data.device


# Instructions past AVX2 that the kernels or the dispatcher's orders look for (AVX-512 and its
# VNNI / BF16, AVX-VNNI, AMX): hidden by limit_to_avx2.
_PAST_AVX2 = ("avx512", "avx_vnni", "amx")
_avx2_only = False


def limit_to_avx2() -> None:
    """Run codelm's CPU code in this process as on an AVX2-only CPU (no AVX-512, VNNI, bf16
    hardware or AMX): the native kernels are built for AVX2 alone and read_cpu_info hides the
    wider flags (the model name says so, keeping its rankings apart). torch's own kernels are
    not affected: start the process with ATEN_CPU_CAPABILITY=avx2 (and oneDNN's and MKL's
    limits) for those. So a bigger CPU measures what AVX2-only machines get (benchmarks/
    decode.py --isa avx2). Call before the first kernel is built."""
    global _avx2_only
    native.limit_to_avx2()
    _avx2_only = True


def read_cpu_info(path: str | Path = "/proc/cpuinfo") -> CpuInfo:
    """CPU model name and feature flags from /proc/cpuinfo (empty flags where it is absent),
    past AVX2's hidden after limit_to_avx2."""
    model, flags = "", ""
    try:
        text = Path(path).read_text()
    except OSError:
        text = ""  # not Linux: fall back to platform's name, no flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = value
    if not model:
        model = platform.processor() or platform.machine() or "unknown cpu"
    names = frozenset(flags.split())
    if _avx2_only:
        model += " (as AVX2 only)"
        names = frozenset(f for f in names if not f.startswith(_PAST_AVX2))
    return CpuInfo(model_name=model, flags=names)


def physical_cores(cpuinfo_path: str | Path = "/proc/cpuinfo") -> int:
    """Physical cores this process may use: affinity, SMT siblings and cgroup quota respected."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    cores = _cores_from_cpuinfo(cpuinfo_path, allowed)
    if cores == 0:
        cores = len(allowed) if allowed else os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    return max(1, min(cores, quota) if quota else cores)


class CpuClock:
    """How busy the CPUs this process may run on are, from /proc/stat: `sample()` gives (monotonic
    s, CPU-seconds all processes were busy on them, this process's CPU-seconds, its spinning
    threads included), or None where /proc/stat cannot be read (not Linux); `others(since)` the
    CPUs other processes kept busy on average since such a sample (a VM host's steal counts)."""

    def __init__(self, stat_path: str | Path = "/proc/stat") -> None:
        self.stat_path = Path(stat_path)
        cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        self.cpus = sorted(cpus) if cpus else None
        self.n_cpus = len(self.cpus) if self.cpus else os.cpu_count() or 1
        # The /proc/stat lines of those CPUs (None: all of them).
        self._cpu_lines = None if self.cpus is None else {f"cpu{i}" for i in self.cpus}
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def sample(self) -> tuple[float, float, float] | None:
        try:
            lines = self.stat_path.read_text().splitlines()
        except OSError:
            return None
        busy = 0
        for line in lines:
            name, _, rest = line.partition(" ")
            if not name.startswith("cpu") or name == "cpu":
                continue
            if self._cpu_lines is not None and name not in self._cpu_lines:
                continue
            # user nice system idle iowait irq softirq steal ...; idle and iowait are not busy.
            # (guest time is counted in user already, so only the first eight fields add up.)
            fields = [int(v) for v in rest.split()[:8]]
            busy += sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)
        own = os.times()
        return time.monotonic(), busy / self._tick, own.user + own.system

    def others(self, since: tuple[float, float, float] | None) -> float | None:
        now = self.sample()
        if since is None or now is None or now[0] <= since[0]:
            return None
        return self.between(since, now)

    @staticmethod
    def between(since: tuple[float, float, float], now: tuple[float, float, float]) -> float:
        """The CPUs other processes kept busy on average from one sample to a later one."""
        busy, ours = now[1] - since[1], now[2] - since[2]
        return max(0.0, (busy - ours) / (now[0] - since[0]))


def _cores_from_cpuinfo(path: str | Path, allowed: set[int] | None) -> int:
    try:
        text = Path(path).read_text()
    except OSError:
        return 0
    seen = set()
    for block in text.strip().split("\n\n"):
        fields = dict(
            (k.strip(), v.strip())
            for k, _, v in (line.partition(":") for line in block.splitlines())
        )
        if "processor" not in fields or "core id" not in fields:
            continue
        if allowed is not None and int(fields["processor"]) not in allowed:
            continue
        seen.add((fields.get("physical id", "0"), fields["core id"]))
    return len(seen)


def _cgroup_cpu_quota(path: str | Path = "/sys/fs/cgroup/cpu.max") -> int | None:
    try:
        quota, period = Path(path).read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, math.ceil(int(quota) / int(period)))
