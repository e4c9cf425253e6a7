"""Weights and error bounds shared by the quant tests (conftest.py holds the fixtures)."""

from __future__ import annotations

import numpy as np
import torch


def weight(gen: torch.Generator, n: int, k: int, scale: float = 0.05) -> torch.Tensor:
    """An LLM-like weight: normal with a few larger outliers."""
    w = torch.randn(n, k, generator=gen) * scale
    outliers = torch.rand(n, k, generator=gen) < 0.002
    return torch.where(outliers, w * 8, w)


def bf16_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Error bound for bf16 activations and bf16 output against the fp32 reference.

    Rounding x and y to bf16 (8-bit mantissa) each costs <= 2^-9 relative; 2^-7 * (|x| @ |w|.T)
    leaves a 2x margin for fp32 accumulation order.
    """
    return 2.0**-7 * (x.abs().float() @ w.abs().t()) + 1e-6


def int4_bf16_bound(x: torch.Tensor, qw) -> torch.Tensor:
    """bf16_bound plus the rounding of int4 scales and zeros to bf16, which the int4 kernels
    read in the activation dtype: each weight moves by <= 2^-9 * (|w| + 2 |zero|)."""
    from codelm.quant import dequantize

    w = dequantize(qw)
    zeros = qw.zeros.repeat_interleave(qw.group_size, dim=1)
    return 2.0**-7 * (x.abs().float() @ (w.abs() + 2 * zeros.abs()).t()) + 1e-6


def fp32_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Error bound for float32 GEMMs that only differ from the reference in summation order."""
    return 1e-5 * (x.abs().float() @ w.abs().t()) + 1e-6


def int8_blocks_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Error bound for the native int8 kernel: x rounded to int8 in blocks of 32 (half a step,
    block absmax / 127, per element), the weight scales to fp16 (<= 2^-11 relative), then
    fp32 sums."""
    blocks = x.abs().view(x.shape[0], -1, 32).amax(dim=-1) / 127
    half_step = blocks.repeat_interleave(32, dim=1) / 2
    xa = x.abs().float()
    return half_step @ w.abs().t() + 2.0**-11 * (xa @ w.abs().t()) + fp32_bound(x, w)


def requantized_blocks_bound(x: torch.Tensor, qw) -> torch.Tensor:
    """int8_blocks_bound where each weight was first rounded again to int8 in blocks of 32
    (Int4AsInt8Tiles): it moves by up to half a step, its block's absmax / 127."""
    from codelm.quant import dequantize

    w = dequantize(qw)
    steps = w.abs().view(w.shape[0], -1, 32).amax(dim=-1) / 127
    moved = steps.repeat_interleave(32, dim=1) / 2
    return int8_blocks_bound(x, w.abs() + moved) + x.abs().float() @ moved.t()


def int4_blocks_bound(x: torch.Tensor, qw) -> torch.Tensor:
    """int8_blocks_bound for the native int4 kernel: x's rounding meets (q - 8) * scale, at most
    |w| + |zero|; fp16 scales and zeros move each weight by <= 2^-11 * (|w| + 2 |zero|)."""
    from codelm.quant import dequantize

    w = dequantize(qw)
    zeros = qw.zeros.abs().repeat_interleave(qw.group_size, dim=1)
    blocks = x.abs().view(x.shape[0], -1, 32).amax(dim=-1) / 127
    half_step = blocks.repeat_interleave(32, dim=1) / 2
    xa = x.abs().float()
    rounding = half_step @ (w.abs() + zeros).t()
    return rounding + 2.0**-11 * (xa @ (w.abs() + 2 * zeros).t()) + fp32_bound(x, w)


def q6_k_blocks(n: int, k: int, seed: int = 1) -> np.ndarray:
    """Valid Q6_K data (gguf.quants cannot make it): per 256 values 192 bytes of low nibbles and
    high bit pairs (any bytes are valid), 16 int8 scales, an fp16 d."""
    rng = np.random.default_rng(seed)
    n_blocks = n * k // 256
    body = rng.integers(0, 256, (n_blocks, 192), dtype=np.uint8)
    scales = rng.integers(-128, 128, (n_blocks, 16)).astype(np.int8).view(np.uint8)
    d = rng.uniform(1e-4, 2e-3, (n_blocks, 1)).astype("<f2").view(np.uint8)
    return np.concatenate([body, scales, d], axis=1).reshape(n, -1)


def q5_k_blocks(n: int, k: int, seed: int = 1) -> np.ndarray:
    """Valid Q5_K data: 12 bytes of 6-bit scales and mins, 32 of fifth bits, 128 of nibbles."""
    return _d_dmin_blocks(n, k, 172, seed)


def q4_k_blocks(n: int, k: int, seed: int = 2) -> np.ndarray:
    """Valid Q4_K data: 12 bytes of packed 6-bit scales and mins, 128 bytes of nibbles."""
    return _d_dmin_blocks(n, k, 140, seed)


def _d_dmin_blocks(n: int, k: int, body_bytes: int, seed: int) -> np.ndarray:
    """Q4_K / Q5_K data (gguf.quants cannot make them): per 256 values fp16 d and dmin of a
    weight's size, then `body_bytes` random bytes (any are valid)."""
    rng = np.random.default_rng(seed)
    count = n * k // 256
    d = rng.uniform(1e-4, 2e-3, (count, 1)).astype("<f2").view(np.uint8)
    dmin = rng.uniform(1e-4, 4e-3, (count, 1)).astype("<f2").view(np.uint8)
    body = rng.integers(0, 256, (count, body_bytes), dtype=np.uint8)
    return np.concatenate([d, dmin, body], axis=1).reshape(n, -1)


SUB_SCALED_BLOCKS = {"Q6_K": q6_k_blocks, "Q5_K": q5_k_blocks, "Q4_K": q4_k_blocks}
