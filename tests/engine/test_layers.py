"""Attention over the KV cache: the one-query path for long contexts against SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from codelm.daemon.engine.layers import _SDPA_DECODE_MAX_KEYS, attend


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
