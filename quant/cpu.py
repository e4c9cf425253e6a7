"""CPU kernels for QuantizedLinear: each packs a canonical format once and computes x @ w.T.

A kernel takes x [M, K] (float32 or bfloat16) and returns [M, N] in whatever dtype it computes
in; QuantizedLinear converts at the boundary. dispatch.py times these and picks per shape.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from codelm.quant import native
from codelm.quant.formats import (
    SUB_GROUP,
    Int4Weight,
    Int8Weight,
    QuantizedWeight,
    SubScaledInt8Weight,
    select_rows,
    unpack_int4,
)
from codelm.quant.reference import dequantize, round_int8

# ~2 MiB dequantised tiles stay in cache while the GEMM reads them (measured 2-3x on the head).
_TILE_BYTES = 2 << 20
# The most float32 a 2-byte dense copy is converted from at once: a part of a large matrix
# (Qwen2.5-Coder-0.5B's head is 545 MB in float32, 7B's 2.2 GB), whole for most others.
_PACK_BYTES = 64 << 20
# Weights Int4AsInt8Tiles requantises at a time: their float32 passes stay in cache (0.3 s for
# Qwen2.5-Coder-0.5B's head, 1.2 s in parts of _PACK_BYTES).
_REQUANTIZE_BYTES = 1 << 20


class Kernel(Protocol):
    """x [M, K] -> x @ w.T [M, N]; `nbytes` is the memory the kernel's packed weight holds."""

    name: str
    nbytes: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class Int4PackBf16:
    """torch._weight_int4pack_mm_for_cpu with bf16 activations (fp32 ones are 30x+ slower)."""

    name = "int4pack_bf16"

    def __init__(self, qw: Int4Weight) -> None:
        n, k = qw.shape
        self.n = n
        q, scales, zeros = unpack_int4(qw.data).to(torch.int32), qw.scales, qw.zeros
        pad = -n % 16  # the CPU packer wants N divisible by 16: pad with rows that dequantise to 0
        if pad:
            q = F.pad(q, (0, 0, 0, pad), value=8)
            scales, zeros = F.pad(scales, (0, 0, 0, pad)), F.pad(zeros, (0, 0, 0, pad))
        self.group_size = qw.group_size
        self.packed = torch._convert_weight_to_int4pack_for_cpu(q.contiguous(), 2)
        # [K / group, N, 2] in the activation dtype, as the kernel reads it.
        sz = torch.stack([scales.t(), zeros.t()], dim=-1)
        self.scales_and_zeros = sz.to(torch.bfloat16).contiguous()
        self.nbytes = _nbytes(self.packed, self.scales_and_zeros)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.bfloat16).contiguous()
        y = torch._weight_int4pack_mm_for_cpu(
            x, self.packed, self.group_size, self.scales_and_zeros
        )
        return y if y.shape[1] == self.n else y[:, : self.n]


class Int8PackBf16:
    """torch._weight_int8pack_mm with bf16 activations; per-channel weights only."""

    name = "int8pack_bf16"

    def __init__(self, qw: Int8Weight) -> None:
        _require_per_channel(qw, self.name)
        self.data = _aligned(qw.data)
        self.scales = qw.scales[:, 0].to(torch.bfloat16).contiguous()
        self.nbytes = _nbytes(self.data, self.scales)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), self.data, self.scales)


def _int8pack_unavailable(qw: QuantizedWeight) -> str | None:
    # Its AVX-512 path reads K in steps of 16 and, given 4 or more input rows, crashes the
    # process on any other K (measured on a Zen 4 with torch 2.13: K=200, 216, 584).
    if qw.shape[1] % 16:
        return f"K={qw.shape[1]} is not a multiple of 16"
    return None


class DequantFp32:
    """Dequantise ~2 MiB row tiles to float32 on every call, then fp32 GEMM: no dense copy kept."""

    name = "dequant_fp32"

    def __init__(self, qw: QuantizedWeight) -> None:
        n, k = qw.shape
        rows = max(16, _TILE_BYTES // (4 * k) // 16 * 16)
        self.n, self.k = n, k
        self.tiles = [_slice_rows(qw, r, min(r + rows, n)) for r in range(0, n, rows)]
        self.nbytes = qw.nbytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32)
        out = torch.empty(self.n, x.shape[0], dtype=torch.float32, device=x.device)
        for r0, r1, tile in self.tiles:
            # out^T row blocks are contiguous, so mm writes straight into them.
            torch.mm(_dequant_tile(tile), x.t(), out=out[r0:r1])
        return out.t()


class Dense:
    """A dequantised float32 / bfloat16 copy + F.linear: fast prefill, 4 or 2 bytes per weight."""

    def __init__(self, qw: QuantizedWeight, dtype: torch.dtype) -> None:
        self.name = "dense_fp32" if dtype == torch.float32 else "dense_bf16"
        self.dtype = dtype
        self.weight = _dequantize_by_rows(qw, dtype)
        self.nbytes = _nbytes(self.weight)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.dtype), self.weight)


class DenseFp16:
    """fbgemm's fp16-weight linear: a dequantised fp16 copy (2 bytes per weight), fp32 x and
    accumulation. Its AVX2 GEMM converts in registers (F16C), so on CPUs without bf16 hardware
    it is the fastest lossless prefill (1.3x `dense_fp32` at half the memory: docs/quant.md).
    fp16 keeps 11 significant bits of each weight, bf16 8."""

    name = "dense_fp16"

    def __init__(self, qw: QuantizedWeight) -> None:
        # fbgemm packs from float32: a large matrix (a head) is packed in parts of rows, so the
        # float32 it is packed from is a part's, not all of it.
        self.parts = [
            torch.ops.quantized.linear_prepack_fp16(part, None) for _, part in _float32_parts(qw)
        ]
        self.nbytes = 2 * qw.shape[0] * qw.shape[1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32).contiguous()
        ys = [torch.ops.quantized.linear_dynamic_fp16(x, part) for part in self.parts]
        return ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)


def _without_fbgemm(qw: QuantizedWeight) -> str | None:
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return "this torch build has no fbgemm (its fp16 GEMM is x86 only)"
    return None


class DynamicInt8:
    """fbgemm/onednn dynamic int8 linear: also quantises activations per call (lossy), opt-in."""

    name = "dynamic_int8"

    def __init__(self, qw: Int8Weight) -> None:
        _require_per_channel(qw, self.name)
        n = qw.shape[0]
        # Quantized-tensor constructors warn that they are deprecated; this op has no successor yet.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*deprecated.*", category=UserWarning)
            qweight = torch._make_per_channel_quantized_tensor(
                qw.data, qw.scales[:, 0].to(torch.float64), torch.zeros(n, dtype=torch.int64), 0
            )
            self.packed = torch.ops.quantized.linear_prepack(qweight, None)
        self.nbytes = qw.data.numel() + 8 * n

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # reduce_range as torch.ao's dynamic Linear does on x86 (avoids vpmaddubsw saturation).
        return torch.ops.quantized.linear_dynamic(
            x.to(torch.float32).contiguous(), self.packed, True
        )


# A tiled_from no call reaches: weight row by weight row, whatever the rows of x.
NEVER_TILED = 1 << 30


class _RowMajorNative:
    """What Int8Native and Int4Native share: their C entry points (self._fn and self._swiglu)
    take x and the weight's arguments (self._weight())."""

    name: str
    n: int
    k: int
    # Rows of x from which a call lays the weight out as tiles and runs the tile kernel (below:
    # weight row by weight row); calibration sets it where it measures the crossover.
    tiled_from: int = 4

    def _weight(self) -> tuple:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _call_native(self, x, self.n, *self._weight(), self.tiled_from)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor | None:
        """Int8Tiles.silu_and_mul's numbers from this format (codelm_q8_swiglu /
        codelm_q4_swiglu lay the tiles out per call); None where n is no multiple of 32."""
        if self.n % 32:
            return None
        return _call_native(self, x, self.n // 2, *self._weight(), fn=self._swiglu)


class Int8Native(_RowMajorNative):
    """codelm's own AVX2 kernel (kernels_x86.c): int8 weights, per channel or in groups of 32
    (GGUF Q8_0 as it is), times activations quantised per call in blocks of 32 (llama.cpp's
    Q8_0 x Q8_0 arithmetic): 1 byte per weight read, integer dot products."""

    name = "int8_native"
    format = native.FORMAT_Q8

    def __init__(self, qw: Int8Weight) -> None:
        lib = _native_library(self.name)
        self._fn, self._swiglu = lib.codelm_q8_linear, lib.codelm_q8_swiglu
        self.n, self.k = qw.shape
        self.group_size = qw.group_size
        self.data = qw.data.contiguous()
        # [N, K / group] in fp16: exact for GGUF Q8_0; elsewhere <= 2^-11 relative per weight,
        # under int8's own rounding (2^-8 of the group's largest).
        self.scales = qw.scales.to(torch.float16).contiguous()
        self.nbytes = _nbytes(self.data, self.scales)
        # Many rows of x go through the tile kernel, which takes w unsigned (see Int8Tiles).
        self.offset = _int8_offset(self.data)

    def _weight(self) -> tuple:
        return self.data.data_ptr(), self.scales.data_ptr(), self.group_size, self.n, self.offset

    def descriptor(self, bias: torch.Tensor | None) -> native.Linear:
        """This weight (and a float32 bias) for kernels_x86.c's fused decode step; the
        pointers stay valid while this kernel and the bias live."""
        return _descriptor(self, bias, self.data, self.scales)


class Int4Native(_RowMajorNative):
    """The int4 sibling of Int8Native (GGUF Q4_0 / Q4_1 x Q8_0 arithmetic): 0.625 bytes per
    weight with fp16 scales and zeros, the -8 offset and zero points applied per group from
    sums of x."""

    name = "int4_native"
    format = native.FORMAT_Q4

    def __init__(self, qw: Int4Weight) -> None:
        lib = _native_library(self.name)
        self._fn, self._swiglu = lib.codelm_q4_linear, lib.codelm_q4_swiglu
        self.n, self.k = n, k = qw.shape
        self.group_size = qw.group_size
        # Per block of 32: element j in the low nibble of byte j, element j + 16 in the high
        # one, so the kernel unpacks a block with one shift and two masks.
        q = unpack_int4(qw.data).view(n, k // 32, 2, 16)
        self.data = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, k // 2).contiguous()
        self.scales = qw.scales.to(torch.float16).contiguous()
        self.zeros = qw.zeros.to(torch.float16).contiguous()
        self.nbytes = _nbytes(self.data, self.scales, self.zeros)

    def _weight(self) -> tuple:
        pointers = (t.data_ptr() for t in (self.data, self.scales, self.zeros))
        return *pointers, self.group_size, self.n

    def descriptor(self, bias: torch.Tensor | None) -> native.Linear:
        """See Int8Native.descriptor."""
        return _descriptor(self, bias, self.data, self.scales, self.zeros)


class Int5Native(_RowMajorNative):
    """Int8Native for int8 weights that fit in 5 bits (GGUF Q5_0's), held in 5 bits: per block
    of 32, 16 bytes of low nibbles and 4 of fifth bits (codelm_pack_q5), 0.6875 bytes per
    weight with the fp16 scales against int8's 1.0625. The same products, so the same numbers;
    a decode step, bound by the bytes it reads, reads a third fewer of them."""

    name = "int5_native"
    format = native.FORMAT_Q5

    def __init__(self, qw: Int8Weight) -> None:
        lib = _native_library(self.name)
        n, k = qw.shape
        data = qw.data.contiguous()
        packed = torch.empty(n, k // 32 * 20, dtype=torch.uint8)
        if lib.codelm_pack_q5(data.data_ptr(), n, k, packed.data_ptr(), torch.get_num_threads()):
            raise ValueError(f"{self.name}: weights outside -16 .. 15")
        self._hold(packed, qw.scales.to(torch.float16).contiguous(), qw.group_size)

    @classmethod
    def packed(cls, data: torch.Tensor, scales: torch.Tensor, group_size: int) -> Int5Native:
        """The kernel over weights already in its bytes: data uint8 [N, K / 32 * 20] as
        codelm_pack_q5 packs them, scales fp16 [N, K / group_size]."""
        kernel = cls.__new__(cls)
        kernel._hold(data, scales, group_size)
        return kernel

    def _hold(self, data: torch.Tensor, scales: torch.Tensor, group_size: int) -> None:
        lib = _native_library(self.name)
        self._fn, self._swiglu = lib.codelm_q5_linear, lib.codelm_q5_swiglu
        self._rows = lib.codelm_q5_rows
        self.n, self.k = data.shape[0], data.shape[1] // 20 * 32
        self.group_size = group_size
        self.data, self.scales = data, scales
        self.nbytes = _nbytes(self.data, self.scales)

    def _weight(self) -> tuple:
        return self.data.data_ptr(), self.scales.data_ptr(), self.group_size, self.n

    def descriptor(self, bias: torch.Tensor | None) -> native.Linear:
        """See Int8Native.descriptor."""
        return _descriptor(self, bias, self.data, self.scales)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` (integers [count]) of the weight, dequantised: float32 [count, K], the
        reference's numbers (an embedding table's lookup)."""
        ids = ids.to(torch.int64).contiguous()
        out = torch.empty(ids.shape[0], self.k, dtype=torch.float32)
        weight = (self.data.data_ptr(), self.scales.data_ptr(), self.n, self.k, self.group_size)
        looked_up = (ids.data_ptr(), ids.shape[0], out.data_ptr(), torch.get_num_threads())
        if self._rows(*weight, *looked_up):
            raise IndexError(f"{self.name}: a row id outside 0 .. {self.n - 1}")
        return out


def five_bit_table(qw: QuantizedWeight) -> Int5Native | None:
    """qw as Int5Native where that holds it exactly (int8 on the CPU in groups of 32, every
    value in -16 .. 15 and every scale a float16: GGUF Q5_0's) and the native kernels are
    already loaded (this never decides where they are built), else None: an embedding table
    in 0.69 bytes a value."""
    if not (isinstance(qw, Int8Weight) and qw.data.device.type == "cpu" and native.loaded()):
        return None
    if qw.shape[1] % 32 or qw.group_size % 32 or _int8_offset(qw.data) != 16:
        return None
    if not torch.equal(qw.scales.to(torch.float16).to(qw.scales.dtype), qw.scales):
        return None
    return Int5Native(qw)


class Int8Shortlist:
    """An int8 head's logits for a pick that reads only the largest two (greedy, or greedy
    with one token ruled out), in two thirds of the bytes: every row's logit from the top 5
    bits of its weights (int5_native over round(q / 8), times 8), and the exact int8 logit
    (`exact`'s numbers) of each row whose bound on what the 3 low bits add reaches the top
    two (codelm_pack_shortlist, codelm_shortlist). The other rows hold that bound, below two
    exact logits, so the argmax and the runner-up are `exact`'s. Qwen2.5-Coder-0.5B's head:
    94 against 145 MB read a token, ~800 exact rows of 151936 (docs/quant.md, "The head's
    shortlist").

    A call runs `exact` instead (whose logits are all exact) where that has lately timed
    faster: on few cores the 5-bit kernel is bound by its unpacking more than by the bytes,
    and which is faster moves with how busy memory is (2 Zen 4 cores: 2.9 against 2.7 ms
    a row on a quiet host, 3.2 against 4.1 on a busy one). Each keeps a running time, and
    every EXPLORE-th call runs the one not in favour, to keep its time current."""

    name = "int8_shortlist"
    EXPLORE = 8
    _WEIGHT = 0.25  # of each new time in the running time

    def __init__(self, exact: Int8Native) -> None:
        self.exact = exact
        lib = self._lib = _native_library(self.name)
        n, k = exact.n, exact.k
        high = torch.empty(n, k // 32 * 20, dtype=torch.uint8)  # int5_native's bytes
        self.bound = torch.empty(n, dtype=torch.float32)
        weight = (exact.data.data_ptr(), exact.scales.data_ptr(), n, k, exact.group_size)
        outputs = (high.data_ptr(), self.bound.data_ptr(), torch.get_num_threads())
        if lib.codelm_pack_shortlist(*weight, _rounding(k), *outputs):
            raise ValueError(f"{self.name}: K={k} or group {exact.group_size} does not fit")
        # The 5-bit kernel over the weights' high bits, on exact's own fp16 scales.
        self.top = Int5Native.packed(high, exact.scales, exact.group_size)
        self.nbytes = self.bytes_for(exact)
        self.ms: dict[str, float] = {}  # running ms per path: "shortlist", "exact"
        self.calls = 0

    @staticmethod
    def bytes_for(exact: Int8Native) -> int:
        """What a shortlist over `exact` holds: 20 bytes a block of 32 weights and a float32
        bound a row."""
        return exact.n * (exact.k // 32 * 20 + 4)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [1, K] -> [1, N]: see the class."""
        self.calls += 1
        paths = sorted(("shortlist", "exact"), key=lambda p: self.ms.get(p, -1.0))
        path = paths[1] if self.calls % self.EXPLORE == 0 else paths[0]
        start = time.perf_counter()
        y = self.shortlisted(x) if path == "shortlist" else self.exact(x)
        ms = (time.perf_counter() - start) * 1e3
        before = self.ms.get(path, ms)
        self.ms[path] = before + self._WEIGHT * (ms - before)
        return y

    def shortlisted(self, x: torch.Tensor) -> torch.Tensor:
        """x [1, K] -> [1, N] through the shortlist itself (a call picks it or `exact`)."""
        x = x.to(torch.float32).contiguous()
        y = self.top(x)
        n, k = self.exact.n, self.exact.k
        listed = torch.empty(n, dtype=torch.int32)
        ptrs = (self.bound.data_ptr(), x.data_ptr(), k, n, listed.data_ptr())
        count = self._lib.codelm_shortlist(y.data_ptr(), 8.0, *ptrs)
        if count < 2:  # NaN or inf in x: no bound holds
            return self.exact(x)
        rows = listed[:count].long()
        data, scales = self.exact.data[rows], self.exact.scales[rows]
        weight = (data.data_ptr(), scales.data_ptr(), self.exact.group_size, count)
        y[0, rows] = _call_native(self.exact, x, count, *weight, self.exact.offset, NEVER_TILED)[0]
        return y


def _rounding(k: int) -> float:
    """Room in each shortlist bound for float rounding, per unit of the magnitudes the
    kernels sum: they add K / 32 block terms (and a few more) in float32, each rounded a few
    times; four times that many float32 roundings."""
    return 4 * (k // 32 + 16) * 2.0**-24


class Int8Tiles:
    """A prefill copy (kernels_x86.c, "Prefill: weights in tiles of 16 output channels"): int8
    weights (as w + 128) or int4 ones (as q) laid out in tiles of 16 output channels, so with
    AVX-512 VNNI one vpdpbusd adds 64 products into 16 outputs (256-bit code elsewhere); x is
    quantised in blocks of 32 as for Int8Native, so the numbers are its numbers summed in
    another order. 1.125 bytes per weight (1.25 for int4, with its zeros), paid from the dense
    budget like a dequantised copy, prefill only (docs/quant.md)."""

    name = "int8_tiles"

    @staticmethod
    def bytes_for(qw: QuantizedWeight, *, requantize: bool = False) -> int:
        """What the copy of qw holds: a byte per weight of whole tiles of 16 channels, and a
        float32 scale (and int4's zero) per channel and block of 32."""
        n, k = qw.shape
        padded = n + (-n % 16)
        per_block = 2 if isinstance(qw, Int4Weight) and not requantize else 1
        return padded * k + padded * (k // 32) * 4 * per_block

    def __init__(self, qw: QuantizedWeight, *, requantize: bool = False) -> None:
        """`requantize`: hold an int4 weight as int8 blocks of 32 (its dequantised values rounded
        again to absmax / 127: a 16th of int4's step), which VNNI multiplies with no zeros to
        add (Int4AsInt8Tiles)."""
        lib = _native_library(self.name)
        self._fn, self._swiglu = lib.codelm_tiles_linear, lib.codelm_tiles_swiglu
        self.n, self.k = n, k = qw.shape
        blocks = k // 32
        int4 = isinstance(qw, Int4Weight) and not requantize
        pad = -n % 16  # whole tiles: padded channels are zero and sliced off the output
        self.padded_n = n + pad
        tiles = self.padded_n // 16
        # int4 as q, int8 as w + 128, or as w + 16 where it fits in 5 bits (GGUF Q5_0): the
        # AVX2 code multiplies bytes up to 31 once, larger ones as two nibbles. Runs of tiles
        # (first, end, offset): a fused layer of both kinds (Qwen2.5-Coder's Q5_0 q / k with a
        # Q8_0 v) runs each at its own.
        if int4 or requantize:
            self.runs = [(0, tiles, 8 if int4 else 128)]
        else:
            self.runs = _offset_runs(qw.data, tiles)
        self.offset = self.runs[0][2]
        offsets = torch.tensor(
            [o for t0, t1, o in self.runs for _ in range(t0, t1)], dtype=torch.uint8
        )

        self.data = torch.empty(tiles, blocks, 8, 16, 4, dtype=torch.uint8)
        scales = []
        if int4 or requantize:
            # A part of tiles at a time: the unpacked or requantised temporaries stay a part's.
            step = max(1, (_REQUANTIZE_BYTES if requantize else _PACK_BYTES) // (16 * k))
            for t0 in range(0, tiles, step):
                t1 = min(t0 + step, tiles)
                if requantize:
                    index = torch.arange(t0 * 16, min(t1 * 16, n))
                    part = round_int8(dequantize(select_rows(qw, index)), 32)
                    rows = part.data
                    scales.append(part.scales)
                else:
                    rows = unpack_int4(qw.data[t0 * 16 : t1 * 16])  # q, stored as it is
                added = offsets[t0:t1] if requantize else torch.zeros_like(offsets[t0:t1])
                _tile_bytes(lib, rows, added, self.data[t0:t1])
        else:  # w + its tile's offset, mod 256
            _tile_bytes(lib, qw.data, offsets, self.data)
        per_block = torch.cat(scales) if requantize else _per_block(qw.scales, blocks)
        self.scales = _tiled(per_block.float(), tiles).contiguous()
        zeros = _tiled(_per_block(qw.zeros, blocks).float(), tiles) if int4 else None
        self.zeros = None if zeros is None else zeros.contiguous()
        self.nbytes = _nbytes(self.data, self.scales, *([] if self.zeros is None else [self.zeros]))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.empty(x.shape[0], self.padded_n, dtype=torch.float32)
        for t0, t1, offset in self.runs:
            n = (t1 - t0) * 16
            _call_native(self, x, n, *self._weight(t0, offset), n, self.padded_n, into=(y, t0 * 16))
        return y if self.padded_n == self.n else y[:, : self.n]

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor | None:
        """silu(gate) * up [m, n / 2] where this is a fused gate / up projection (gate rows
        first), computed in the GEMM's epilogue (codelm_tiles_swiglu: the n floats a row never
        reach memory); None where the halves are not whole pairs of tiles or of one offset."""
        if self.padded_n != self.n or self.n % 32 or len(self.runs) > 1:
            return None
        weight = self._weight(0, self.offset)
        return _call_native(self, x, self.n // 2, *weight, self.n, fn=self._swiglu)

    def _weight(self, tile: int, offset: int) -> tuple:
        """The C arguments of the tiles from `tile` on."""
        at = tile * (self.k // 32) * 16  # the tile's first scale
        zeros = None if self.zeros is None else self.zeros[at:].data_ptr()
        data = self.data[tile:].data_ptr()
        return data, offset, self.scales.view(-1)[at:].data_ptr(), zeros


class Int4AsInt8Tiles(Int8Tiles):
    """Int8Tiles of an int4 weight requantised to int8 blocks of 32: with VNNI its GEMM skips
    int4's zero term, a multiply-add per block and output (int4 downs 0.89x the time on Zen 4);
    without, int8's nibbles make it slower and calibration keeps int4 tiles. The requantised
    weights move by at most half of absmax / 127 of their block, as much as x's rounding."""

    name = "int4_as_int8_tiles"

    def __init__(self, qw: QuantizedWeight) -> None:
        super().__init__(qw, requantize=True)

    @staticmethod
    def bytes_for(qw: QuantizedWeight, *, requantize: bool = True) -> int:
        return Int8Tiles.bytes_for(qw, requantize=requantize)


class SubScaledTiles:
    """A prefill copy of a sub-scaled weight (GGUF Q6_K and Q5_K: SubScaledInt8Weight) in its
    own values: q as signed bytes in Int8Tiles' layout, and beside them the int8 scale of each
    16 inputs, the float scale (and Q5_K's zero) of each block of 32 (kernels_x86.c,
    sub_column_kernel). Without VNNI the tile kernel multiplies the requantised int8 as two
    nibbles; this takes one vpmaddubsw per 32 products (a Qwen2.5-Coder down projection: 1.48x
    as fast on one Zen 4 core in 256-bit code), and is exact where the int8 blocks round.
    ~1.375 bytes per weight (1.5 with zeros)."""

    name = "sub_scaled_tiles"

    @staticmethod
    def bytes_for(qw: QuantizedWeight) -> int:
        """q a byte per weight of whole tiles; per channel and block of 32 its two int8
        sub-scales twice, its int32 offset sum and float32 scale (and zero)."""
        n, k = qw.shape
        padded = n + (-n % 16)
        zeros = getattr(qw, "zeros", None) is not None
        return padded * k + padded * (k // 32) * (12 + 4 * zeros)

    def __init__(self, qw: SubScaledInt8Weight) -> None:
        lib = _native_library(self.name)
        self._fn = lib.codelm_sub_tiles_linear
        self.n, self.k = n, k = qw.shape
        blocks = k // 32
        self.padded_n = n + (-n % 16)
        tiles = self.padded_n // 16
        self.data = torch.empty(tiles, blocks, 8, 16, 4, dtype=torch.uint8)
        _tile_bytes(lib, qw.sub_data, torch.zeros(tiles, dtype=torch.uint8), self.data)
        # Per tile and block: the scales of its two 16s for each column of 8 channels, each
        # twice (vpmaddwd's pairs); -128 * sum(q * scale) per channel (x goes in as x + 128).
        self.sub = torch.empty(tiles, blocks, 2, 2, 8, 2, dtype=torch.int8)
        self.wo = torch.empty(tiles, blocks, 16, dtype=torch.int32)
        self.scales = torch.empty(tiles, blocks, 16, dtype=torch.float32)
        self.zeros = None if qw.zeros is None else torch.empty_like(self.scales)
        step = max(1, _REQUANTIZE_BYTES // (16 * k))
        for t0 in range(0, tiles, step):
            t1 = min(t0 + step, tiles)
            rows = slice(t0 * 16, min(t1 * 16, n))

            q = qw.sub_data[rows]
            sc = qw.sub_scales[rows]  # [rows, B * 2]
            halves = _pad_rows(sc, (t1 - t0) * 16).view(t1 - t0, 2, 8, blocks, 2)
            halves = halves.permute(0, 3, 4, 1, 2)
            self.sub[t0:t1] = halves[..., None].expand(-1, -1, -1, -1, -1, 2)
            sums = q.view(-1, blocks * 2, SUB_GROUP).to(torch.int32).sum(-1) * sc.to(torch.int32)
            self.wo[t0:t1] = _tiled(-128 * sums.view(-1, blocks, 2).sum(-1), t1 - t0)
            self.scales[t0:t1] = _tiled(_per_block(qw.super_scales[rows], blocks), t1 - t0)
            if self.zeros is not None:
                self.zeros[t0:t1] = _tiled(qw.zeros[rows], t1 - t0)
        parts = (self.data, self.sub, self.wo, self.scales)
        self.nbytes = _nbytes(*parts, *([] if self.zeros is None else [self.zeros]))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        pointers = [t.data_ptr() for t in (self.data, self.sub, self.wo, self.scales)]
        zeros = None if self.zeros is None else self.zeros.data_ptr()
        y = _call_native(self, x, self.padded_n, *pointers, zeros, self.padded_n)
        return y if self.padded_n == self.n else y[:, : self.n]


def _tile_bytes(lib, rows: torch.Tensor, offsets: torch.Tensor, out: torch.Tensor) -> None:
    """out [tiles, K / 32, 8, 16, 4] = int8 (or uint8) rows [<= 16 tiles, K] in the tile layout,
    tile t's bytes plus offsets[t] (uint8 [tiles], mod 256), rows past the last as zeros
    (codelm_tile_bytes)."""
    rows = rows.contiguous()
    offsets = offsets.to(torch.uint8).contiguous()
    n, k = rows.shape
    tiles = -(-n // 16)
    # Checked before the call: the C writes every tile the rows make and reads their offsets.
    if out.shape != (tiles, k // 32, 8, 16, 4) or not out.is_contiguous() or len(offsets) != tiles:
        raise ValueError(
            f"tile layout: {n}x{k} rows make {tiles} tiles, not {out.shape[0]} "
            f"with {len(offsets)} offsets"
        )
    threads = torch.get_num_threads()
    if lib.codelm_tile_bytes(rows.data_ptr(), n, k, offsets.data_ptr(), out.data_ptr(), threads):
        raise ValueError(f"tile layout of {n}x{k} rows failed (K must be a multiple of 32)")


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return F.pad(t, (0, 0, 0, rows - t.shape[0]))


def _tiled(per_block: torch.Tensor, tiles: int) -> torch.Tensor:
    """[<= 16 tiles rows, B] (padded with zeros) -> [tiles][B][16]: per tile and block, its 16
    channels' values together."""
    blocks = per_block.shape[1]
    return _pad_rows(per_block, tiles * 16).view(tiles, 16, blocks).transpose(1, 2)


_MAX_RUNS = 4  # more runs of offsets than this in one weight: all of it as w + 128


def _offset_runs(data: torch.Tensor, tiles: int) -> list[tuple[int, int, int]]:
    """Int8Tiles.runs of an int8 weight: _int8_offset's choice per tile of 16 rows, in runs."""
    # Per row, then per tile (padding rows are 0): amin and amax took 10 ms for the default
    # model's head, where aminmax over a dimension took 80.
    pad = (0, tiles * 16 - data.shape[0])
    low = F.pad(data.amin(dim=1), pad).view(tiles, 16).amin(dim=1)
    high = F.pad(data.amax(dim=1), pad).view(tiles, 16).amax(dim=1)
    offsets = _offsets(low, high).tolist()
    runs: list[tuple[int, int, int]] = []
    for t, offset in enumerate(offsets):
        if runs and runs[-1][2] == offset:
            runs[-1] = (runs[-1][0], t + 1, offset)
        else:
            runs.append((t, t + 1, offset))
    return runs if len(runs) <= _MAX_RUNS else [(0, tiles, max(offsets))]


def _int8_offset(data: torch.Tensor) -> int:
    """What int8 weights add to be unsigned bytes in the tile kernel (_offsets) for all of
    them."""
    # aminmax: one vectorised pass (0.05 ms for 8.7M int8 values; min() and max() took 9)
    return int(_offsets(*torch.aminmax(data)))


def _offsets(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Per range of int8 values (its least and greatest): 16 where all are in -16 .. 15 (GGUF
    Q5_0's), which the AVX2 code multiplies once, else 128."""
    return torch.where((low >= -16) & (high <= 15), 16, 128)


def _per_block(per_group: torch.Tensor, blocks: int) -> torch.Tensor:
    """[N, K / group] -> [N, K / 32]: each group's value for each of its blocks of 32."""
    return per_group.repeat_interleave(blocks // per_group.shape[1], dim=1)


def _native_library(kernel: str):
    lib = native.library()
    if isinstance(lib, str):
        raise RuntimeError(f"{kernel}: {lib}")
    return lib


def _call_native(
    kernel, x: torch.Tensor, n_out: int, *args, fn=None, into: tuple | None = None
) -> torch.Tensor:
    """kernels_x86.c's linear entry points: fn(x, m, k, *args, y, threads) (kernel._fn unless
    given) into a new float32 y [m, n_out], or `into` (y, column): y's columns from `column`
    on (args give its row stride); a non-zero return is the kernel's scratch allocation
    failing."""
    if x.dtype != torch.float32 or not x.is_contiguous():  # a decode step's x already is
        x = x.to(torch.float32).contiguous()
    m = x.shape[0]
    y, column = into or (torch.empty(m, n_out, dtype=torch.float32), 0)
    fn = fn or kernel._fn
    out = y.data_ptr() + column * y.element_size()
    rc = fn(x.data_ptr(), m, kernel.k, *args, out, torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"{kernel.name}: no memory for {m}x{kernel.k} scratch")
    return y


def _descriptor(
    kernel: Int8Native | Int4Native | Int5Native, bias: torch.Tensor | None, *weight: torch.Tensor
) -> native.Linear:
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        raise ValueError(f"{kernel.name}: the fused step takes a contiguous float32 bias")
    data, scales, *zeros = (t.data_ptr() for t in weight)
    return native.Linear(
        data,
        scales,
        zeros[0] if zeros else None,
        None if bias is None else bias.data_ptr(),
        kernel.group_size,
        kernel.n,
        kernel.k,
        kernel.format,
    )


def native_unavailable(
    device: torch.device, k: int, group: int, build_dir: Path | None = None
) -> str | None:
    """Why the native kernels cannot take a weight of K inputs in groups of `group` on
    `device`, or None; `build_dir` is where a first call builds them (native.library)."""
    if device.type != "cpu":
        return "a CPU kernel"
    if k % 32 or group % 32:
        return f"K={k} or group {group} is not a multiple of 32"
    lib = native.library(build_dir)
    return lib if isinstance(lib, str) else None


def _native_unavailable(qw: QuantizedWeight) -> str | None:
    return native_unavailable(qw.data.device, qw.shape[1], qw.group_size)


def _five_bit_unavailable(qw: QuantizedWeight) -> str | None:
    if not isinstance(qw, Int8Weight) or _int8_offset(qw.data) != 16:
        return "not int8 in -16 .. 15"
    return _native_unavailable(qw)


def _sub_scaled_unavailable(qw: QuantizedWeight) -> str | None:
    if not isinstance(qw, SubScaledInt8Weight):
        return "not sub-scaled"
    return _native_unavailable(qw)


@dataclass(frozen=True, slots=True)
class KernelSpec:
    """How to build one candidate, and what it costs beyond the int format (for the budget)."""

    name: str
    schemes: tuple[str, ...]
    build: Callable[[QuantizedWeight], Kernel]
    # > 0: a copy beside the format, paid from DispatchConfig.dense_budget_bytes.
    dense_bytes_per_weight: float = 0
    # The copy's exact bytes for a weight, where they are not dense_bytes_per_weight for each
    # (the tiles' scales and padding): what the budget is charged.
    copy_bytes: Callable[[QuantizedWeight], int] | None = None
    # A DispatchConfig flag that must be on, for kernels that change numerics beyond the
    # format (allow_lossy) or need an optional package (use_bitsandbytes).
    opt_in: str | None = None
    # Why this kernel cannot serve a weight (device capability, shape), or None.
    unavailable: Callable[[QuantizedWeight], str | None] | None = None
    # Takes int8 with one scale per output channel only (not GGUF Q8_0's groups of 32).
    per_channel_int8: bool = False


CPU_KERNELS: dict[str, KernelSpec] = {
    spec.name: spec
    for spec in (
        KernelSpec("int4pack_bf16", ("int4",), Int4PackBf16),
        KernelSpec(
            "int8pack_bf16",
            ("int8",),
            Int8PackBf16,
            unavailable=_int8pack_unavailable,
            per_channel_int8=True,
        ),
        KernelSpec("dequant_fp32", ("int4", "int8"), DequantFp32),
        KernelSpec("dense_fp32", ("int4", "int8"), lambda qw: Dense(qw, torch.float32), 4),
        KernelSpec("dense_bf16", ("int4", "int8"), lambda qw: Dense(qw, torch.bfloat16), 2),
        KernelSpec("dense_fp16", ("int4", "int8"), DenseFp16, 2, unavailable=_without_fbgemm),
        KernelSpec(
            "dynamic_int8", ("int8",), DynamicInt8, opt_in="allow_lossy", per_channel_int8=True
        ),
        KernelSpec("int8_native", ("int8",), Int8Native, unavailable=_native_unavailable),
        KernelSpec("int4_native", ("int4",), Int4Native, unavailable=_native_unavailable),
        KernelSpec("int5_native", ("int8",), Int5Native, unavailable=_five_bit_unavailable),
        KernelSpec(
            "int8_tiles",
            ("int4", "int8"),
            Int8Tiles,
            1.125,
            copy_bytes=Int8Tiles.bytes_for,
            unavailable=_native_unavailable,
        ),
        KernelSpec(
            "sub_scaled_tiles",
            ("int8",),
            SubScaledTiles,
            1.375,
            copy_bytes=SubScaledTiles.bytes_for,
            unavailable=_sub_scaled_unavailable,
        ),
        KernelSpec(
            "int4_as_int8_tiles",
            ("int4",),
            Int4AsInt8Tiles,
            1.125,
            copy_bytes=Int4AsInt8Tiles.bytes_for,
            unavailable=_native_unavailable,
        ),
    )
}


def _dequantize_by_rows(qw: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """dequantize(qw) in `dtype`, converted a part of rows at a time: no float32 [N, K] beside
    a bfloat16 copy at load."""
    if dtype == torch.float32:
        return dequantize(qw)  # the float32 buffer is the copy
    out = torch.empty(qw.shape, dtype=dtype, device=qw.data.device)
    for r0, part in _float32_parts(qw):
        out[r0 : r0 + part.shape[0]] = part
    return out


def _float32_parts(qw: QuantizedWeight):
    """(first row, dequantize(those rows)) for parts of up to _PACK_BYTES of float32, in
    order: the rows' numbers are dequantize(qw)'s."""
    n, k = qw.shape
    rows = max(1, _PACK_BYTES // (4 * k))
    for r0 in range(0, n, rows):
        yield r0, dequantize(select_rows(qw, torch.arange(r0, min(r0 + rows, n))))


def _slice_rows(
    qw: QuantizedWeight, r0: int, r1: int
) -> tuple[int, int, tuple[tuple[torch.Tensor, ...], int]]:
    tensors = (qw.data[r0:r1], qw.scales[r0:r1])
    if isinstance(qw, Int4Weight):
        tensors = (*tensors, qw.zeros[r0:r1])
    return r0, r1, (tuple(t.contiguous() for t in tensors), qw.group_size)


def _dequant_tile(tile: tuple[tuple[torch.Tensor, ...], int]) -> torch.Tensor:
    tensors, group = tile
    data, scales = tensors[0], tensors[1]
    rows = data.shape[0]
    if len(tensors) == 2:  # int8
        q = data.to(torch.float32).view(rows, scales.shape[1], -1)
        return q.mul_(scales[..., None]).view(rows, -1)
    q = unpack_int4(data).to(torch.float32).view(rows, scales.shape[1], group)
    return torch.addcmul(tensors[2][..., None], q.sub_(8.0), scales[..., None]).view(rows, -1)


def _require_per_channel(qw: Int8Weight, kernel: str) -> None:
    if not qw.is_per_channel:
        raise ValueError(
            f"{kernel}: needs per-channel int8, got group_size {qw.group_size} for shape "
            f"{qw.shape}; use reference.requantize_int8_per_channel first"
        )


# torch._weight_int8pack_mm reads its weight with aligned vector loads: given rows of more
# than one input, data that does not start on a 64-byte boundary crashes the process (weights
# read back from the safetensors weight cache start at any offset of the file).
_ALIGNMENT = 64


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """`t` contiguous and starting on a 64-byte boundary (copied only where it does not)."""
    t = t.contiguous()
    return t if t.data_ptr() % _ALIGNMENT == 0 else t.clone()


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
