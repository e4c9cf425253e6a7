"""Every CPU kernel against reference.matmul, at a decode (1 row) and a prefill (33 rows) shape."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from quant_helpers import (
    bf16_bound,
    fp32_bound,
    int4_bf16_bound,
    int4_blocks_bound,
    int8_blocks_bound,
    requantized_blocks_bound,
    weight,
)

from codelm.quant import dequantize, matmul, quantize_int4, quantize_int8
from codelm.quant.cpu import CPU_KERNELS, Int8PackBf16

# (kernel, scheme, bound): bf16 kernels round x and y to bf16 (int4pack also its scales and
# zeros); dense_fp16 rounds each weight to fp16; fp32 ones differ only in summation order;
# dynamic_int8, the native kernels and int8_tiles also quantise x per call (per row / per block
# of 32).
CASES = [
    ("int4pack_bf16", "int4", "int4_bf16"),
    ("dequant_fp32", "int4", "fp32"),
    ("dense_fp32", "int4", "fp32"),
    ("dense_bf16", "int4", "bf16"),
    ("dense_fp16", "int4", "fp16"),
    ("int8pack_bf16", "int8", "bf16"),
    ("dequant_fp32", "int8", "fp32"),
    ("dense_fp32", "int8", "fp32"),
    ("dense_bf16", "int8", "bf16"),
    ("dense_fp16", "int8", "fp16"),
    ("dynamic_int8", "int8", "int8_activations"),
    ("int8_native", "int8", "int8_blocks"),
    ("int4_native", "int4", "int4_blocks"),
    ("int8_tiles", "int8", "int8_blocks"),
    ("int8_tiles", "int4", "int4_blocks"),
    ("int4_as_int8_tiles", "int4", "requantized_blocks"),
]
SHAPES = {"decode": 1, "prefill": 33}


def _quantize(w: torch.Tensor, scheme: str, group_size: int = 32):
    return quantize_int4(w, group_size)[0] if scheme == "int4" else quantize_int8(w)[0]


def _bound(kind: str, x: torch.Tensor, qw) -> torch.Tensor:
    w = dequantize(qw)
    if kind == "int4_bf16":
        return int4_bf16_bound(x, qw)
    if kind == "fp32":
        return fp32_bound(x, w)
    if kind == "bf16":
        return bf16_bound(x, w)
    if kind == "fp16":  # each weight rounded to fp16 (<= 2^-11 relative), then fp32 sums
        return 2.0**-11 * (x.abs() @ w.abs().t()) + fp32_bound(x, w)
    if kind == "int8_blocks":
        return int8_blocks_bound(x, w)
    if kind == "int4_blocks":
        return int4_blocks_bound(x, qw)
    if kind == "requantized_blocks":
        return requantized_blocks_bound(x, qw)
    # One activation step per element (range / 127 with reduce_range), summed over |w|.
    step = (x.max(dim=-1, keepdim=True).values - x.min(dim=-1, keepdim=True).values) / 127
    return step * w.abs().sum(dim=1) + bf16_bound(x, w)


@pytest.mark.parametrize("phase", SHAPES)
@pytest.mark.parametrize(("kernel", "scheme", "bound"), CASES)
def test_cpu_kernel_matches_reference_when_decode_and_prefill_shape(
    gen, kernel, scheme, bound, phase
):
    qw = _quantize(weight(gen, 96, 256), scheme)
    reason = CPU_KERNELS[kernel].unavailable
    if reason and reason(qw):
        pytest.skip(f"{kernel}: {reason(qw)}")
    x = torch.randn(SHAPES[phase], 256, generator=gen)
    y = CPU_KERNELS[kernel].build(qw)(x).float()
    assert y.shape == (SHAPES[phase], 96)
    assert ((y - matmul(x, qw)).abs() <= _bound(bound, x, qw)).all()


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_cpu_kernel_matches_reference_when_decode_shape(gen, group_size):
    qw = _quantize(weight(gen, 64, 512), "int4", group_size)
    x = torch.randn(1, 512, generator=gen)
    y = CPU_KERNELS["int4pack_bf16"].build(qw)(x).float()
    assert ((y - matmul(x, qw)).abs() <= int4_bf16_bound(x, qw)).all()


def test_int4_cpu_kernel_pads_rows_when_n_not_multiple_of_16(gen):
    qw = _quantize(weight(gen, 40, 64), "int4")
    x = torch.randn(3, 64, generator=gen)
    y = CPU_KERNELS["int4pack_bf16"].build(qw)(x).float()
    assert y.shape == (3, 40)
    assert ((y - matmul(x, qw)).abs() <= int4_bf16_bound(x, qw)).all()


def test_dequant_fp32_kernel_covers_every_tile_when_many_tiles(gen):
    # K=4096 -> 128-row tiles; N=300 leaves a ragged last tile.
    qw = _quantize(weight(gen, 300, 4096), "int4")
    x = torch.randn(2, 4096, generator=gen)
    kernel = CPU_KERNELS["dequant_fp32"].build(qw)
    assert len(kernel.tiles) == 3
    assert ((kernel(x) - matmul(x, qw)).abs() <= fp32_bound(x, dequantize(qw))).all()


def test_int8_pack_kernel_rejects_group_wise_weight_naming_shape(gen):
    grouped, _ = quantize_int8(weight(gen, 16, 64), group_size=32)
    with pytest.raises(ValueError, match=r"group_size 32 for shape \(16, 64\)"):
        Int8PackBf16(grouped)


def test_int8_pack_kernel_takes_weights_at_any_offset_when_many_rows(gen):
    # As read back from the weight cache: int8 data starting 24 bytes past a 64-byte boundary.
    qw, _ = quantize_int8(weight(gen, 960, 576))
    buffer = torch.empty(qw.data.numel() + 64, dtype=torch.int8)
    start = (-buffer.data_ptr()) % 64 + 24
    shifted = buffer[start : start + qw.data.numel()].view(qw.data.shape)
    shifted.copy_(qw.data)
    assert shifted.data_ptr() % 64 == 24
    moved = dataclasses.replace(qw, data=shifted)
    x = torch.randn(20, 576, generator=gen)
    y = Int8PackBf16(moved)(x)
    assert (((y.float() - matmul(x, qw)).abs()) <= bf16_bound(x, dequantize(qw))).all()


def test_int8_pack_kernel_is_not_offered_where_k_is_no_multiple_of_16(gen):
    # torch's AVX-512 path crashes the process on such K given 4+ rows; the dispatcher must
    # never time it there (test_devices loads a model with K=200 through real calibration).
    unavailable = CPU_KERNELS["int8pack_bf16"].unavailable
    assert unavailable(quantize_int8(weight(gen, 64, 200))[0]) == "K=200 is not a multiple of 16"
    assert unavailable(quantize_int8(weight(gen, 64, 208))[0]) is None


@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_prefill_copies_built_in_parts_equal_whole_ones(gen, scheme, monkeypatch):
    # A head's prefill copies are made a part of rows at a time, so load never holds all of
    # it in float32 (or in temporaries) beside the copy: the parts make the same numbers.
    from codelm.quant import cpu

    qw = _quantize(weight(gen, 100, 64), scheme)  # 100 rows: 7 tiles of 16, the last padded
    specs = [CPU_KERNELS[n] for n in ("dense_bf16", "dense_fp16", "int8_tiles")]
    names = [spec.name for spec in specs if not (spec.unavailable and spec.unavailable(qw))]
    x = torch.randn(5, 64, generator=gen)
    whole = {name: CPU_KERNELS[name].build(qw) for name in names}
    monkeypatch.setattr(cpu, "_PACK_BYTES", 4 * 64 * 7)  # 7 rows of float32, 1 tile of int8
    split = {name: CPU_KERNELS[name].build(qw) for name in names}
    assert torch.equal(split["dense_bf16"].weight, dequantize(qw).to(torch.bfloat16))
    if "dense_fp16" in names:
        assert len(split["dense_fp16"].parts) == 15 and len(whole["dense_fp16"].parts) == 1
    for name in names:
        assert torch.equal(split[name](x), whole[name](x)), name
