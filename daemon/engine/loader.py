"""Build a model from a checkpoint: resolve the name, read weights, fill the meta-device model.

Linear layers are built one at a time from their checkpoint tensors (fp32/bf16 now, quantised
through quant/), so the model is never held twice in memory.
"""

from __future__ import annotations

import gc
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..catalog import resolve_model_path
from ..errors import CodelmError, ModelLoadError
from ..runtime import trim_heap
from . import QUANT_MODES, EngineConfig, copies_budget
from .fused_decode import attach as attach_fused_decode
from .layers import SelfAttention
from .models import HF_ARCHITECTURES, architecture
from .tokenizer import Tokenizer, tokenizer_from_folder, tokenizer_from_gguf
from .weights import TensorSource, WeightSet, read_gguf, read_hf_folder, unpermute_order

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class LoadedModel:
    model: nn.Module
    tokenizer: Tokenizer
    args: Any
    device: torch.device
    dtype: torch.dtype
    info: dict[str, Any]


def load_model(config: EngineConfig, device: torch.device, progress=None) -> LoadedModel:
    path = resolve_model_path(config.model)
    try:
        return _load_model(path, config, device, progress)
    except CodelmError:
        raise
    except Exception as exc:
        if _ran_out_of_memory(exc):
            where = "the GPU's memory" if device.type == "cuda" else "memory"
            instead = "`--device cpu`, " if device.type == "cuda" else ""
            said = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            raise ModelLoadError(
                f"{where} ran out while loading {path.name} ({said}); "
                f"close other programs that use it and `codelm-daemon restart`, or choose "
                f"{instead}a smaller model or quantisation (`codelm-daemon models list`, "
                "`--quant int4`)"
            ) from None  # (its traceback would hold on to the layers built)
        # A file that reads but does not describe a model we can build.
        logger.info("loading %s failed", path, exc_info=True)  # the traceback: log only
        raise ModelLoadError(
            f"{path} could not be loaded ({type(exc).__name__}: {exc}); a catalogue model may "
            "be damaged: `codelm-daemon models fetch NAME --force`; other models must be of a "
            "supported architecture, with their tokenizer (docs/models.md)"
        ) from exc


def _ran_out_of_memory(exc: Exception) -> bool:
    # torch raises OutOfMemoryError on CUDA, and a RuntimeError on the CPU.
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)
    )


def _load_model(path: Path, config: EngineConfig, device: torch.device, progress) -> LoadedModel:
    if device.type == "cpu":
        # A first build of the native kernels (~4.5 s) overlaps reading the model.
        from codelm.quant import native

        native.prepare(kernel_dir())
    report = progress or (lambda fraction, message: None)
    report(0.0, f"reading {path.name}")
    if path.is_dir():
        weights = read_hf_folder(path)
        arch_name = weights.meta.get("model_type") or _hf_arch(weights.meta)
        module = architecture(arch_name)
        args = module.ModelArgs.from_hf_config(weights.meta)
        tokenizer = tokenizer_from_folder(path, weights.meta)
    else:
        weights = _read_gguf_file(path)
        module = architecture(weights.meta["general.architecture"])
        has_output = "lm_head.weight" in weights.tensors
        args = module.ModelArgs.from_gguf(weights.meta, has_output)
        tokenizer = tokenizer_from_gguf(weights.meta)
    if args.n_layers > (held := weights.layers_held()):
        # (before the model is built: a corrupt count of millions took minutes and gigabytes)
        raise ModelLoadError(
            f"{path} states {args.n_layers} layers but holds the weights of {held}: it is "
            "corrupt or incomplete; fetch it again (for a catalogue model: `codelm-daemon "
            "models fetch NAME --force`)"
        )
    permuted = getattr(module, "GGUF_PERMUTED_ARCHS", ())
    if weights.kind == "gguf" and weights.meta["general.architecture"] in permuted:
        _unpermute_qk(weights, args)
    # Activations and KV: fp32 on CPUs (bf16 matmuls are slow without bf16 hardware; the
    # quantised kernels convert at their boundary), bf16 on CUDA.
    dtype = torch.bfloat16 if device.type == "cuda" or config.quant == "bf16" else torch.float32
    n_params = weights.n_params()  # before fill_model takes them
    try:
        copies = copies_budget(config.prefill_copies)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from None
    make_linear = LinearFactory(
        config.quant, dtype, device, path, config.prefill_chunk, copies_budget=copies
    )
    report(0.2, "building the model")
    model = module.Model(args)
    fill_model(
        model,
        weights,
        module.FUSED,
        make_linear,
        dtype,
        device,
        lambda f: report(0.2 + 0.8 * f, "weights"),
    )
    make_linear.finish()
    model.eval()
    decode_step = attach_fused_decode(model, device, dtype, config.cuda_graphs)
    model.head_shortlist = make_linear.shortlist(model.lm_head)
    if model.head_shortlist is not None:
        decode_step += ", head shortlist"
    from codelm.quant import kernel_summary

    info = {
        "model": config.model,
        "path": str(path),
        "arch": args.arch,
        "device": str(device),
        "quant": make_linear.summary(),
        "quant_reason": make_linear.reason,
        "kernels": kernel_summary(model),
        "decode_step": decode_step,
        "weight_cache": make_linear.cache_report(),
        # The linear layers' bytes (prefill copies and the head's shortlist included), and of
        # those the copies: what `prefill_copies = "none"` would not hold.
        "layers_MB": round(weight_bytes(model)[1] / 1e6, 1),
        "copies_MB": round(copies_bytes(model) / 1e6, 1),
        "n_params": n_params,
        "n_ctx": args.max_len,
    }
    del make_linear, weights  # the weight cache's and the checkpoint's references
    gc.collect()
    trim_heap()
    report(1.0, "ready")
    return LoadedModel(model, tokenizer, args, device, dtype, info)


def kernel_dir() -> Path:
    """Where the native kernels are built and their rankings kept: the cache dir's kernels/."""
    from ..config import resolve_paths

    return resolve_paths().cache_dir / "kernels"


def weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes one decode step reads, bytes the linear layers hold, prefill copies and the
    head's shortlist included).

    A decode step reads every linear layer's decode-kernel weight once (`plan.decode.nbytes`;
    `QuantizedLinear.nbytes` also counts a prefill copy when the plan keeps one, which decode
    does not read); embeddings are excluded (one row per token), norms are negligible.
    """
    from codelm.quant import QuantizedLinear

    read = held = 0
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            read += module.plan.decode.nbytes
            held += module.nbytes
        elif isinstance(module, nn.Linear):
            read += module.weight.nbytes
            held += module.weight.nbytes
    if (shortlist := getattr(model, "head_shortlist", None)) is not None:
        # Greedy steps read the head's top bits and bounds instead of its int8 rows (and a
        # few hundred of those: under 1 MB, not counted).
        read += shortlist.top.nbytes + shortlist.bound.nbytes - model.lm_head.plan.decode.nbytes
        held += shortlist.nbytes
    return read, held


def copies_bytes(model: nn.Module) -> int:
    """Bytes the linear layers hold beside what decode reads, to run prompts faster (prefill
    copies), and the head's shortlist: what `prefill_copies` budgets."""
    from codelm.quant import QuantizedLinear

    held = sum(
        m.nbytes - m.plan.decode.nbytes for m in model.modules() if isinstance(m, QuantizedLinear)
    )
    shortlist = getattr(model, "head_shortlist", None)
    return held + (0 if shortlist is None else shortlist.nbytes)


# Layers are built one at a time from transient float copies, and glibc keeps much of what
# they free in its heap, so resident memory grew with every layer (Qwen2.5-Coder's load
# peaked at 3.5 GB and ended at 2.7 GB resident without trimming). Weights built between
# trims of the heap: a 7B model's layers each, the default model's about once a block. A
# trim after every layer took 0.19 s of its 2.5 s warm load (SmolLM2's: 0.21 of 1.67) for
# the same peak.
_TRIM_AFTER_WEIGHTS = 16_000_000


def _hf_arch(config: dict) -> str:
    for name in config.get("architectures") or []:
        if name in HF_ARCHITECTURES:
            return HF_ARCHITECTURES[name]
    raise ModelLoadError(
        f"config.json names no supported architecture: {config.get('architectures')}"
    )


def _read_gguf_file(path: Path) -> WeightSet:
    return read_gguf(path, lambda arch: architecture(arch).GGUF_NAMES)


def _unpermute_qk(weights: WeightSet, args: Any) -> None:
    for i in range(args.n_layers):
        for part, heads in (("q_proj", args.n_heads), ("k_proj", args.n_kv_heads)):
            for kind in ("weight", "bias"):
                name = f"model.layers.{i}.self_attn.{part}.{kind}"
                if name in weights.tensors:
                    source = weights.tensors[name]
                    weights.tensors[name] = source.permute_rows(
                        unpermute_order(source.shape[0], heads)
                    )


# GGUF types run as int4; the rest keep 5 bits or more and become int8. Q5 is int8: int4
# requantised from Qwen2.5-Coder's Q5_0 lost 1.4-1.8 points of HumanEval infill against fp32
# and top-1 agreement 0.93 (int8: 72.3% against fp32's 71.8%, agreement 0.99), while with the
# fused native decode step int8 decodes at 0.93x int4's speed and above llama.cpp's
# (docs/quant.md, "auto and Q5").
_INT4_CLASS = {
    *("Q4_0", "Q4_1", "Q4_K", "Q3_K", "Q2_K"),
    *("IQ4_NL", "IQ4_XS", "IQ3_S", "IQ2_XS"),
}


_QKV_NOTE = "; attention q/k/v int8 where the checkpoint has them wider than 4 bits"
# The most rows the head takes at once beyond decode: a prompt's last position and a draft's
# check (draft + 1 rows, up to a request's max_tokens: 16 for a suggestion, 64 for multi-line
# ones). Its prefill kernel is timed there, not at a prompt chunk's 128 rows: at 16 rows the
# default model's head took 9.6 ms on its tiles copy against 19.6 laying tiles out per call,
# at 128 rows 60.6 against 65.0 (a tie that would drop the copy).
HEAD_PREFILL_ROWS = 32


def _int4_class(sources: list[TensorSource]) -> bool:
    """Whether every source already has 4 bits or fewer (nothing to keep by going wider)."""
    return all(s.ggml_type in _INT4_CLASS for s in sources)


class LinearFactory:
    """Builds each linear layer from its checkpoint tensors, in float or through quant/."""

    def __init__(
        self,
        mode: str,
        dtype: torch.dtype,
        device: torch.device,
        model_path: Path | None = None,
        prefill_chunk: int = 512,
        copies_budget: int | None = None,
    ) -> None:
        if mode not in QUANT_MODES:
            raise ModelLoadError(f"unknown quantisation {mode!r}; choose one of {QUANT_MODES}")
        self.mode, self.dtype, self.device = mode, dtype, device
        self.model_path = model_path
        self.prefill_chunk = prefill_chunk  # the rows a prompt's forward brings each layer
        # Bytes the copies beside the quantised weights may take; None: _dense_budget().
        self.copies_budget = copies_budget
        self.dispatcher = None
        self.float_scheme: str | None = None  # auto's choice for float weights, made once
        self.cache = None
        self.cache_hits = 0
        self.counts: dict[str, int] = {}
        self.head_weight = None  # lm_head's quantised weight: a tied embedding may share it
        self.reason = {
            "auto": "auto: a GGUF keeps its precision class (Q4 and below -> int4, Q5+ -> int8)",
            "int4": "asked for int4",
            "int8": "asked for int8",
            "bf16": "asked for bf16 (no quantisation)",
            "fp32": "asked for fp32 (no quantisation)",
        }[mode]

    def scheme_for(self, sources: list[TensorSource], attention_input: bool = False) -> str | None:
        if self.mode in ("fp32", "bf16"):
            return None
        if self.mode in ("int4", "int8"):
            scheme = self.mode
        elif (kind := sources[0].ggml_type) is not None:
            scheme = "int4" if kind in _INT4_CLASS else "int8"
        else:
            if self.float_scheme is None:
                self.float_scheme = self._faster_scheme(sources[0].shape)
            scheme = self.float_scheme
        if (
            scheme == "int4"
            and attention_input
            and self.device.type == "cpu"
            and not _int4_class(sources)
        ):
            # q/k/v stays int8: on Qwen2.5-Coder its k and v rows, 1.5% of the blocks' weights,
            # held 38% of int4's loss (docs/quant.md, "int4 keeps q/k/v int8"). Not on CUDA,
            # where int8 decoded on dequant_bf16 (an H200's calibration), which reads ~3x the
            # bytes int4's tinygemm does, for a seventh of a 7B block's weights.
            if _QKV_NOTE not in self.reason:
                self.reason += _QKV_NOTE
            return "int8"
        return scheme

    def _faster_scheme(self, shape: tuple[int, ...]) -> str:
        """auto for float weights (safetensors, F16 GGUF tensors): int4 on CUDA; on a CPU
        whichever of int4 and int8 decodes a layer of this shape faster here, as measured
        (memory-bound decode favours int4's bytes, VNNI/AMX can favour int8)."""
        if self.device.type != "cpu":
            scheme, why = "int4", f"int4 on {self.device.type}"
        else:
            times = self._dispatcher().faster_scheme(self.device, (shape[0], shape[-1]))
            scheme = next(iter(times), "int4")
            measured = ", ".join(f"{s} {ms:.3g} ms" for s, ms in times.items())
            why = (
                f"{scheme}, the faster here (decode of a {shape[0]}x{shape[-1]} layer: {measured})"
                if times
                else "int4 (calibration is off: not measured)"
            )
        self.reason += f"; float weights -> {why}"
        logger.info("quantisation: %s", self.reason)
        return scheme

    def shortlist(self, head: torch.nn.Module):
        """The head's quant.cpu.Int8Shortlist where the dispatcher takes one (an int8 head
        on native kernels, measured faster), else None."""
        plan = getattr(head, "plan", None)
        if plan is None or self.dispatcher is None:
            return None
        return self.dispatcher.shortlist(plan.decode, getattr(head, "name", "lm_head"))

    def limit_copies(self, spare: int) -> None:
        """Prefill copies built from now on take no more than `spare` bytes: the memory the
        rest of the weights and the reserve leave (_RoomCheck). Within their budget alone,
        copies could take the reserve of a load near the memory's end (the budget is an eighth
        of the memory at its start), and the KV cache would then go past it."""
        if self.dispatcher is not None:
            self.dispatcher.limit_copies(spare)

    def _dispatcher(self):
        if self.dispatcher is None:
            from codelm.quant import DispatchConfig, Dispatcher

            cache_dir = kernel_dir()
            # Prefill may run on copies beside the packed weights where that measures faster
            # (int8 tiles: ~1.5x bf16 with AVX-512 VNNI; bf16 with bf16 hardware: ~3x; fp16 on
            # AVX2: ~2.3x); decode always reads the packed weights.
            # On a GPU prefill is timed at a whole chunk's rows: tinygemm won int4's prefill at
            # 128 rows on an H200 and then ran 512-row chunks at 1590 tokens/s, where
            # dequantising a layer once per chunk for cuBLAS costs a quarter as much per row.
            chunk = self.prefill_chunk
            config = DispatchConfig(
                cache_dir=cache_dir,
                dense_budget_bytes=(
                    _dense_budget() if self.copies_budget is None else self.copies_budget
                ),
                calibration_rows=(1, chunk) if self.device.type == "cuda" else (1, 128),
                chunk_rows=chunk,
            )
            self.dispatcher = Dispatcher(config)
        return self.dispatcher

    def __call__(
        self,
        name: str,
        sources: list[TensorSource],
        bias: list[TensorSource],
        attention_input: bool = False,
    ):
        """The linear `name` from its checkpoint tensors; `attention_input` marks an
        attention's q/k/v projection."""
        from codelm.quant import INT4_GROUP, QuantizedLinear

        scheme = self.scheme_for(sources, attention_input)
        if scheme == "int4" and sources[0].shape[-1] % INT4_GROUP:
            # int4's groups must tile K; int8 with one scale per output channel takes any K.
            logger.info(
                "%s: K=%d is no multiple of %d: int8", name, sources[0].shape[-1], INT4_GROUP
            )
            scheme = "int8"
        if scheme is None:
            self._count(str(self.dtype).removeprefix("torch."))
            return _float_linear(sources, bias, self.dtype, self.device)
        dispatcher = self._dispatcher()
        # int8 in GGUF Q8_0's groups of 32 where kernels take them (the CPU's native ones, and
        # on CUDA), else per channel.
        int8_group = dispatcher.int8_group_size(self.device, sources[0].shape[-1])
        qweight = self._quantized(name, sources, scheme, int8_group, search=name != "lm_head")
        if name == "lm_head":
            self.head_weight = qweight
        self._count(qweight.scheme)  # mixed GGUF types make int8 where int4 was asked for
        bias_value = torch.cat([b.to_float() for b in bias]).to(self.device) if bias else None
        rows = HEAD_PREFILL_ROWS if name == "lm_head" else None
        return QuantizedLinear.from_format(
            qweight, bias_value, dispatcher=dispatcher, name=name, prefill_rows=rows
        )

    def embedding(self, name: str, source: TensorSource, tied: bool = False):
        """A quantised model's embedding table, int8 in groups of 32 (per row where the width
        is no multiple of 32): only looked up, a row per token, so no kernel needs it wider,
        and it holds about half of bf16's bytes; in 5 bits where its values fit (a GGUF Q5_0
        table: the default model's 153 MB as 94). `tied`: the head was built from the same
        tensor; where it came out as this table would, the table is the head's own weight."""
        from codelm.quant import QuantizedEmbedding

        k = source.shape[-1]
        group = 32 if k % 32 == 0 else None
        head = self.head_weight if tied else None
        if head is not None and (head.scheme, head.group_size) == ("int8", group or k):
            # The same bytes held once: the head's native decode kernel reads this data
            # tensor in place (SmolLM2's table: 32 MB).
            return QuantizedEmbedding(head)
        table = self._quantized(name, [source], "int8", group, search=False)
        return QuantizedEmbedding(table, compact=True)

    def _quantized(
        self,
        name: str,
        sources: list[TensorSource],
        scheme: str,
        int8_group: int | None,
        search: bool,
    ):
        """sources as one quantised weight on this device, from the weight cache where
        quantising them is real work."""
        from codelm.quant import concat_formats, is_grouped_int8, requantize_int8_per_channel

        asked = scheme if scheme == "int4" or int8_group is None else f"int8 g{int8_group}"
        costly = _is_costly(sources, scheme, int8_group)
        qweight = self._cached(name, asked) if costly else None
        self.cache_hits += qweight is not None
        if qweight is None:
            parts = [_quantize(s, scheme, int8_group, search, self.device) for s in sources]
            per_channel = int8_group is None and any(is_grouped_int8(p) for p in parts)
            if per_channel or len({p.group_size for p in parts}) > 1:
                # GGUF Q8_0 where the int8 kernels take per-channel scales only, and mixed
                # types (Q5_0 q, Q8_0 v): requantised here, once; the weight cache keeps it.
                parts = [requantize_int8_per_channel(p)[0] for p in parts]
            qweight = concat_formats(parts) if len(parts) > 1 else parts[0]
            if costly and self.cache is not None:  # the others are never read back
                self.cache.put(name, qweight, asked=asked)
        return qweight.to(self.device) if self.device.type != "cpu" else qweight

    def _cached(self, name: str, scheme: str):
        if self.cache is None and self.model_path is not None:
            from ..config import resolve_paths
            from .weight_cache import WeightCache

            cache_dir = resolve_paths().cache_dir
            self.cache = WeightCache.for_model(self.model_path, self.mode, cache_dir)
        return self.cache.get(name, asked=scheme) if self.cache is not None else None

    def _count(self, label: str) -> None:
        self.counts[label] = self.counts.get(label, 0) + 1

    def cache_report(self) -> str:
        if self.cache is None:
            return "not used (nothing needed quantising)"
        if self.cache.error:
            return f"not written ({self.cache.error}): {self.cache.file}"
        state = f"{self.cache_hits} layers loaded" if self.cache_hits else "written"
        return f"{state}: {self.cache.file}"

    def finish(self) -> None:
        """Write newly quantised weights to the on-disk cache."""
        if self.cache is not None:
            self.cache.save()

    def summary(self) -> str:
        return ", ".join(f"{k} x{v}" for k, v in sorted(self.counts.items()))


def available_memory_bytes(
    meminfo: str = "/proc/meminfo", cgroups: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup"
) -> int | None:
    """Memory available to allocate now without swapping: Linux's MemAvailable, which counts
    the page cache the kernel gives back on demand, else free memory; None where the system
    says neither. Free memory alone is small on a machine that has read many files (after a
    build, 2 GiB of 24 with 23 available), which shrank every budget taken from it. In a
    container (a dev container, CI) MemAvailable is the host's: the process's cgroup limit,
    where it sets one, bounds it (`_cgroup_headroom`)."""
    available = _meminfo_available(meminfo)
    headroom = _cgroup_headroom(cgroups, root)
    if available is None or headroom is None:
        return headroom if available is None else available
    return min(available, headroom)


def _meminfo_available(meminfo: str) -> int | None:
    try:
        with open(meminfo, "rb") as file:
            for line in file:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


# Per cgroup version: the limit and usage files, and the memory.stat keys of the page cache
# and of the shared memory within it (file pages the kernel reclaims rather than kill).
_CGROUP_FILES = {
    "v2": ("memory.max", "memory.current", "file", "shmem"),
    "v1": ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_cache", "total_shmem"),
}
_NO_LIMIT = 1 << 60  # cgroup v1 writes "no limit" as a number near 2**63


def _cgroup_headroom(cgroups: str, root: str) -> int | None:
    """What the memory cgroups of this process let it allocate still (each limit on the way
    up to the mount's root, less what that group uses other than page cache: a parent's
    counts its children's), or None where none limits it (or the system has none)."""
    try:
        lines = Path(cgroups).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, own = parts
        if hierarchy == "0" and not controllers:
            version, base = "v2", Path(root)
        elif "memory" in controllers.split(","):
            version, base = "v1", Path(root) / "memory"
        else:
            continue
        # A host process sees its cgroup at its path under the mount, below its parents (a
        # user slice, a build job's group); a container sees its own at the mount's root.
        folder = base / own.lstrip("/")
        found = [
            headroom
            for group in (folder, *folder.parents)
            if group.is_relative_to(base)
            and (headroom := _headroom_in(group, *_CGROUP_FILES[version])) is not None
        ]
        if found:
            return min(found)
    return None


def _headroom_in(folder: Path, limit: str, usage: str, cache: str, shmem: str) -> int | None:
    try:
        limit_text = (folder / limit).read_text().strip()
        used = int((folder / usage).read_text())
        stat = dict(
            row.split(" ", 1)
            for row in (folder / "memory.stat").read_text().split("\n")
            if " " in row
        )
        reclaimable = int(stat.get(cache, 0)) - int(stat.get(shmem, 0))
    except (OSError, ValueError):
        return None
    if not limit_text.isdigit() or int(limit_text) >= _NO_LIMIT:  # v2 writes "max"
        return None
    return max(0, int(limit_text) - used + max(0, reclaimable))


def _dense_budget() -> int:
    """Memory prefill copies (dense or int8 tiles) may use: an eighth of available memory, at
    most 1.5 GiB."""
    available = available_memory_bytes()
    return 0 if available is None else int(min(1.5 * (1 << 30), available // 8))


def _is_costly(sources: list[TensorSource], scheme: str, int8_group: int | None) -> bool:
    """True when quantising these sources means real work (worth caching on disk): anything
    but GGUF blocks our formats take as they are (quant.gguf_repack.EXACT_SCHEME), cheap at
    every load. Where int8 is per channel even those are requantised (Qwen2.5-Coder's Q8_0
    head, 136M weights: ~5 s)."""
    from codelm.quant.gguf_repack import EXACT_SCHEME

    if scheme == "int8" and int8_group != 32:
        return True  # requantised per channel
    exact = {kind.name for kind, exact_scheme in EXACT_SCHEME.items() if exact_scheme == scheme}
    return any(s.ggml_type not in exact for s in sources)


def _quantize(
    source: TensorSource,
    scheme: str,
    int8_group: int | None,
    search: bool,
    device: torch.device,
):
    """`search`: requantised int4 ranges are searched for the least squared error (clipping
    outliers), which measured better for the blocks' matrices; the head's argmax is not."""
    from codelm.quant import INT4_GROUP, quantize_rows, repack_gguf

    if source.raw is not None:
        return repack_gguf(
            source.raw,
            source.ggml_type,
            source.shape,
            name=source.name,
            scheme=scheme,
            int8_group_size=int8_group,
            search=search,
        ).to(device)

    def rows(r0: int, r1: int) -> torch.Tensor:  # quantised where it will run
        return source.tensor[r0:r1].to(device).float()

    group = INT4_GROUP if scheme == "int4" else int8_group
    return quantize_rows(rows, source.shape[0], scheme, group, name=source.name, search=search)[0]


def fill_model(
    model: nn.Module,
    weights: WeightSet,
    fused: dict[str, tuple[str, ...]],
    make_linear,
    dtype: torch.dtype,
    device: torch.device,
    progress,
) -> None:
    """Replace every meta tensor of `model` with the checkpoint's, converted one at a time.

    `fused` maps a fused linear (qkv_proj) to the checkpoint linears concatenated into it.
    """
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    # The head last: the blocks' layers, which every token runs in full, are first to the
    # dense-copy budget, and auto's int4/int8 measurement takes a block layer's shape.
    linears.sort(key=lambda item: item[0] == "lm_head")
    attention_inputs = {
        id(m.projections()[0]) for m in model.modules() if isinstance(m, SelfAttention)
    }
    tied = model.args.tie_embeddings
    embedding = getattr(model, "EMBEDDING", "model.embed_tokens.weight")
    if embedding not in weights.tensors and "lm_head.weight" in weights.tensors:
        # Tied the other way round (CodeShell): the checkpoint holds lm_head, not the embedding.
        weights.tensors[embedding] = weights.tensors.pop("lm_head.weight")
        tied = True
    room = _RoomCheck(weights, linears, fused, tied, embedding) if device.type == "cpu" else None
    untrimmed = 0  # weights built since the heap was last trimmed
    for done, (name, module) in enumerate(linears):
        if name == "lm_head" and tied:
            sources = [weights.tensors[embedding]]
        else:
            sources = [weights.take(f"{p}.weight") for p in _parts(name, fused)]
        bias = (
            [weights.take(f"{p}.bias") for p in _parts(name, fused)]
            if module.bias is not None
            else []
        )
        linear = make_linear(name, sources, bias, id(module) in attention_inputs)
        _set_parent(model, name, linear)
        elements = sum(math.prod(source.shape) for source in sources)
        untrimmed += elements
        if room is not None:
            room.built(elements, linear)
        if untrimmed >= _TRIM_AFTER_WEIGHTS:  # their temporaries, before the next layers'
            trim_heap()
            untrimmed = 0
            if room is not None and (spare := room.check()) is not None:
                make_linear.limit_copies(spare)
        progress(done / len(linears))
    for name, param in list(model.named_parameters()):
        if param.is_meta or name.endswith("norm.weight"):
            source = weights.take(name)
            _check_shape(name, source, tuple(param.shape))
            if name == embedding and make_linear.mode not in ("fp32", "bf16"):
                table = make_linear.embedding(name, source, tied)  # looked up, not multiplied
                _set_parent(model, name.removesuffix(".weight"), table)
                continue
            kind = dtype if param.is_meta else torch.float32  # norms stay fp32
            value = source.to(kind, device)
            _set_parent(model, name, nn.Parameter(value, requires_grad=False))
    if tied and isinstance(model.lm_head, nn.Linear):
        model.lm_head.weight = model.get_parameter(embedding)  # one copy, as in the checkpoint
    model.to(device)
    if weights.tensors:
        logger.debug("unused checkpoint tensors: %s", sorted(weights.tensors)[:20])


# Memory a load leaves free for the KV cache, activations and the rest of the system.
LOAD_RESERVE_BYTES = 256 << 20


class _RoomCheck:
    """Stops a CPU load whose weights would not fit in the memory available: past it lie swap
    (the machine, editor included, all but freezes) or the OOM killer (the daemon gone without
    a word). What the layers built so far hold, per weight, projects what the rest will."""

    def __init__(self, weights: WeightSet, linears: list, fused: dict, tied: bool, embedding: str):
        names = [f"{p}.weight" for n, _ in linears if n != "lm_head" for p in _parts(n, fused)]
        names += [embedding] if tied else ["lm_head.weight", embedding]  # (tied: the head's)
        self.total = sum(math.prod(weights.tensors[n].shape) for n in names if n in weights.tensors)
        self.done = 0
        self.held = 0

    def built(self, elements: int, linear: nn.Module) -> None:
        self.done += elements
        # What decode reads: prefill copies are paid from a budget, not per weight.
        plan = getattr(linear, "plan", None)
        self.held += plan.decode.nbytes if plan is not None else linear.weight.nbytes

    def check(self) -> int | None:
        """The bytes left beyond the rest of the weights and the reserve (None: unknown)."""
        available = available_memory_bytes()
        if available is None or self.done == 0 or self.done >= self.total:
            return None
        needed = self.held * (self.total - self.done) // self.done
        if needed + LOAD_RESERVE_BYTES > available:
            gib = 1 << 30
            raise ModelLoadError(
                f"not enough memory: {self.done / self.total:.0%} of the way through the "
                f"model's weights, the rest need about {needed / gib:.2f} GiB more, and "
                f"{available / gib:.2f} GiB is available, {LOAD_RESERVE_BYTES / gib:.2f} GiB of "
                "which must stay free for the cache. Close other programs and `codelm-daemon "
                "restart`, or choose a smaller model or quantisation (`codelm-daemon models "
                "list`, `--quant int4`)"
            )
        return available - needed - LOAD_RESERVE_BYTES


def _parts(name: str, fused: dict[str, tuple[str, ...]]) -> list[str]:
    parent, _, leaf = name.rpartition(".")
    return [f"{parent}.{p}" for p in fused[leaf]] if leaf in fused else [name]


def _float_linear(
    sources: list[TensorSource], bias: list[TensorSource], dtype, device
) -> nn.Linear:
    weight = torch.cat([s.to(dtype, device) for s in sources])
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bool(bias), device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias:
        value = torch.cat([b.to_float() for b in bias]).to(dtype=dtype, device=device)
        linear.bias = nn.Parameter(value, requires_grad=False)
    return linear


def _set_parent(model: nn.Module, name: str, value: nn.Module | nn.Parameter) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, value)


def _check_shape(name: str, source: TensorSource, expected: tuple[int, ...]) -> None:
    if tuple(source.shape) != expected:
        raise ModelLoadError(
            f"tensor {name} has shape {source.shape}, the config implies {expected}"
        )
