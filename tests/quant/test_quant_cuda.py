"""CUDA kernels against the reference; skipped without a GPU (the bitsandbytes hint is not)."""

from __future__ import annotations

import sys

import pytest
import torch
from quant_helpers import bf16_bound, int4_bf16_bound, weight

from codelm.quant import (
    DispatchConfig,
    Dispatcher,
    QuantizedLinear,
    dequantize,
    matmul,
    quantize_int4,
    quantize_int8,
)
from codelm.quant import cuda as quant_cuda

no_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_bitsandbytes_missing_error_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        quant_cuda.import_bitsandbytes()


def test_tinygemm_inner_k_tiles_divides_k():
    assert quant_cuda._inner_k_tiles(4096) == 8
    assert quant_cuda._inner_k_tiles(576) == 4
    assert quant_cuda._inner_k_tiles(96) == 2


@pytest.mark.cuda
@no_cuda
@pytest.mark.parametrize("phase_rows", [1, 33])
@pytest.mark.parametrize("group_size", [32, 128])
def test_int4_cuda_kernel_matches_reference_when_decode_and_prefill_shape(
    gen, group_size, phase_rows
):
    qw, _ = quantize_int4(weight(gen, 256, 512), group_size)
    qw = qw.to("cuda")
    if reason := quant_cuda._tinygemm_unavailable(qw):
        pytest.skip(reason)
    x = torch.randn(phase_rows, 512, generator=gen).cuda()
    y = quant_cuda.TinyGemmInt4(qw)(x).float()
    assert ((y - matmul(x, qw)).abs() <= int4_bf16_bound(x, qw)).all()


@pytest.mark.cuda
@no_cuda
@pytest.mark.parametrize(
    ("kernel", "group_size"),
    [
        ("int8pack_cuda", None),
        ("dequant_bf16", None),
        ("dequant_bf16", 32),
        ("int8_triton", None),
        ("int8_triton", 32),
    ],
)
def test_int8_cuda_kernel_matches_reference(gen, kernel, group_size):
    qw = quantize_int8(weight(gen, 256, 512), group_size)[0].to("cuda")
    spec = quant_cuda.CUDA_KERNELS[kernel]
    if spec.unavailable and (reason := spec.unavailable(qw)):
        pytest.skip(reason)
    x = torch.randn(4, 512, generator=gen).cuda()
    y = spec.build(qw)(x).float()
    assert ((y - matmul(x, qw)).abs() <= bf16_bound(x, dequantize(qw))).all()


@pytest.mark.parametrize("group_size", [None, 32])
def test_int8_dequant_bf16_arithmetic_on_the_cpu(gen, group_size):
    # The kernel is plain torch: its numbers (GGUF Q8_0's groups included) are checked here,
    # its CUDA run above.
    qw = quantize_int8(weight(gen, 64, 256), group_size)[0]
    x = torch.randn(3, 256, generator=gen)
    y = quant_cuda.DequantBf16Cuda(qw)(x).float()
    # Scales rounded to bf16 move each weight by <= 2^-9 of itself: within twice bf16_bound.
    assert ((y - matmul(x, qw)).abs() <= 2 * bf16_bound(x, dequantize(qw))).all()


def test_int8_keeps_groups_of_32_on_cuda():
    # int8_triton and dequant_bf16 take GGUF Q8_0 / Q5_0 groups: no requantising per channel.
    dispatcher = Dispatcher(DispatchConfig(calibrate=False))
    assert dispatcher.int8_group_size(torch.device("cuda"), 896) == 32
    assert dispatcher.int8_group_size(torch.device("cuda"), 200) is None


@pytest.mark.cuda
@no_cuda
def test_int4_cuda_dequant_kernel_matches_reference(gen):
    qw = quantize_int4(weight(gen, 128, 256))[0].to("cuda")
    x = torch.randn(4, 256, generator=gen).cuda()
    y = quant_cuda.DequantBf16Cuda(qw)(x).float()
    # Dequantising in bf16 rounds each weight once more (2^-8 relative of |w| + |zero|).
    assert ((y - matmul(x, qw)).abs() <= 2 * int4_bf16_bound(x, qw)).all()


@pytest.mark.cuda
@no_cuda
@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_quantized_linear_on_cuda_keeps_device_and_dtype(gen, scheme):
    w = weight(gen, 128, 256).cuda()
    layer = QuantizedLinear.from_float(w, scheme=scheme, dispatcher=Dispatcher(DispatchConfig()))
    x = torch.randn(3, 256, generator=gen).cuda()
    y = layer(x)
    assert y.device.type == "cuda" and y.dtype == torch.float32 and y.shape == (3, 128)
