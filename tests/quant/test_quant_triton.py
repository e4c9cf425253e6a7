"""The Triton int8 kernel (quant/triton_kernels.py) against the reference on the CPU, through
Triton's interpreter (tests/conftest.py chooses it where there is no GPU): the same source a
GPU compiles, which tests/quant/test_quant_cuda.py runs there."""

from __future__ import annotations

import os

import pytest
import torch
from quant_helpers import bf16_bound, weight

from codelm.quant import dequantize, matmul, quantize_int8
from codelm.quant.cuda import TritonInt8

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="compiled for the GPU: test_quant_cuda.py"
)


# N = 40 and K = 288: neither a multiple of the kernel's blocks (16 features, 256 inputs).
@pytest.mark.parametrize("group_size", [None, 32], ids=["per-channel", "g32"])
@pytest.mark.parametrize("rows", [1, 3])
def test_int8_triton_matches_reference(gen, group_size, rows):
    qw = quantize_int8(weight(gen, 40, 288), group_size)[0]
    x = torch.randn(rows, 288, generator=gen)
    kernel = TritonInt8(qw)
    y = kernel(x)
    assert y.dtype == torch.float32 and y.shape == (rows, 40)
    torch.testing.assert_close(y, matmul(x, qw), atol=1e-4, rtol=1e-5)
    # bf16 activations, as the CUDA engine runs: bf16 in and out, fp32 inside.
    y = kernel(x.bfloat16())
    assert y.dtype == torch.bfloat16
    bound = bf16_bound(x, dequantize(qw))
    assert ((y.float() - matmul(x, qw)).abs() <= bound).all()
