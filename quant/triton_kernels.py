"""Triton kernels for CUDA, imported only where one is built (triton ships with CUDA torch).
With TRITON_INTERPRET=1 set before triton is imported they run on CPU tensors through Triton's
interpreter, which is how the tests check them without a GPU."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# One program: BLOCK_N output features of one row of x, over K in steps of BLOCK_K. Chosen,
# not measured (no GPU at hand when written): the dispatcher times this kernel against the
# others on the real device and shape before it serves a layer.
BLOCK_N = 16
BLOCK_K = 256


@triton.jit
def _int8_rows(
    x_ptr,
    w_ptr,
    s_ptr,
    out_ptr,
    n_out,
    k_in,
    n_groups,
    group_size,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(1)
    features = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    feature_ok = features < n_out
    w_rows = w_ptr + features.to(tl.int64)[:, None] * k_in
    s_rows = s_ptr + features.to(tl.int64)[:, None] * n_groups
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, k_in, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < k_in
        ok = feature_ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + row * k_in + cols, mask=col_ok, other=0.0).to(tl.float32)
        w = tl.load(w_rows + cols[None, :], mask=ok, other=0).to(tl.float32)
        s = tl.load(s_rows + (cols // group_size)[None, :], mask=ok, other=0.0)
        acc += tl.sum(w * s * x[None, :], axis=1)
    tl.store(out_ptr + row * n_out + features, acc.to(out_ptr.dtype.element_ty), mask=feature_ok)


def int8_rows(
    x: torch.Tensor, data: torch.Tensor, scales: torch.Tensor, group_size: int
) -> torch.Tensor:
    """x @ (data * scales per group of inputs).T, reading each int8 byte once (torch's CUDA
    path writes and reads a bf16 copy of the matrix). x [M, K] (any float dtype, contiguous)
    -> [M, N] in x's dtype; data int8 [N, K], scales float32 [N, K // group_size], both
    contiguous; per-channel scales are one group of K."""
    m, k = x.shape
    n = data.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, BLOCK_N), m)
    _int8_rows[grid](
        x, data, scales, out, n, k, scales.shape[1], group_size, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K
    )
    return out
