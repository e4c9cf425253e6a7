"""Shared layers against torch: the one-query attention path for long contexts against SDPA,
the native SwiGLU against F.silu."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from codelm.daemon.engine.layers import _SDPA_DECODE_MAX_KEYS, attend, silu_and_mul


@pytest.mark.parametrize("n_keys", [_SDPA_DECODE_MAX_KEYS // 2, _SDPA_DECODE_MAX_KEYS * 2 + 3])
def test_attend_one_query_matches_sdpa_when_grouped_heads(n_keys):
    gen = torch.Generator().manual_seed(7)
    n_heads, n_kv, head_dim, capacity = 14, 2, 64, 1024
    k_cache = torch.randn(n_kv, capacity, head_dim, generator=gen)
    v_cache = torch.randn(n_kv, capacity, head_dim, generator=gen)
    # q as qkv_heads makes it: a strided slice of a transposed fused projection.
    qkv = torch.randn(1, 1, (n_heads + 2 * n_kv) * head_dim, generator=gen)
    heads = qkv.view(1, 1, n_heads + 2 * n_kv, head_dim).transpose(1, 2)
    q, k, v = heads[:, :n_heads], heads[:, n_heads : n_heads + n_kv], heads[:, n_heads + n_kv :]
    start = n_keys - 1
    out = attend(q, k_cache, v_cache, start, k, v)
    keys, values = k_cache[:, :n_keys].unsqueeze(0), v_cache[:, :n_keys].unsqueeze(0)
    expected = F.scaled_dot_product_attention(q, keys, values, enable_gqa=True)
    assert torch.equal(k_cache[:, start], k[0, :, 0])  # the new key was written first
    assert out.shape == (1, n_heads, 1, head_dim)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ffn", [4864, 13])  # 13: the native loop's scalar tail
def test_silu_and_mul_matches_torch_when_fused_projection(dtype, ffn):
    gen = torch.Generator().manual_seed(3)
    gate_up = (torch.randn(1, 5, 2 * ffn, generator=gen) * 6).to(dtype)
    # Where exp overflows or underflows, and zero.
    gate_up[0, 0, :5] = torch.tensor([-100.0, -88.0, 0.0, 88.0, 100.0])
    gate, up = gate_up.float().split(ffn, dim=-1)
    expected = (F.silu(gate) * up).to(dtype)
    out = silu_and_mul(gate_up, ffn)
    assert out.shape == (1, 5, ffn) and out.dtype == dtype
    # float32: the native kernel's exp is within ~1 ulp of torch's; bf16 runs torch's own ops.
    torch.testing.assert_close(
        out, expected, rtol=2e-6 if dtype == torch.float32 else 1e-2, atol=1e-30
    )
