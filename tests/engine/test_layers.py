"""Shared layers against torch: attention (native and the one-query path) against SDPA, the
native SwiGLU, RMSNorm and RoPE against torch's ops (bf16 rows keep torch's own)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from codelm.daemon.engine.layers import (
    _SDPA_DECODE_MAX_KEYS,
    RMSNorm,
    RopeScaling,
    Rotary,
    _attend_one_query,
    _native_attention,
    attend,
    qkv_heads,
    silu_and_mul,
)
from codelm.quant import native

_LIB = native.library()
needs_native = pytest.mark.skipif(isinstance(_LIB, str), reason=f"no native kernel: {_LIB}")


# fp32 summed in another order, over scores of std ~4 (q and k of std 2): peaked softmaxes.
CLOSE = {"rtol": 1e-4, "atol": 5e-5}


def grouped_heads(gen, n_heads, n_kv, head_dim, n_new, capacity, scale=2.0):
    """Caches holding NaN past what attention may read, and q, k, v (of std `scale`) as
    qkv_heads makes them: strided slices of a transposed fused projection."""
    k_cache = torch.full((n_kv, capacity, head_dim), float("nan"))
    v_cache = torch.full((n_kv, capacity, head_dim), float("nan"))
    qkv = torch.randn(1, n_new, (n_heads + 2 * n_kv) * head_dim, generator=gen) * scale
    heads = qkv.view(1, n_new, n_heads + 2 * n_kv, head_dim).transpose(1, 2)
    q, k, v = heads[:, :n_heads], heads[:, n_heads : n_heads + n_kv], heads[:, n_heads + n_kv :]
    return q, k, v, k_cache, v_cache


def expected_attention(q, k_cache, v_cache, start):
    """SDPA with an explicit mask: query i (position start + i) sees keys [0, start + i]."""
    end = start + q.shape[2]
    keys, values = k_cache[:, :end].unsqueeze(0), v_cache[:, :end].unsqueeze(0)
    rows = torch.arange(start, end).unsqueeze(1)
    mask = torch.arange(end).unsqueeze(0) <= rows
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)


@pytest.mark.parametrize(
    ("n_heads", "n_kv", "head_dim"),
    [(14, 2, 64), (9, 3, 64), (4, 4, 128), (6, 2, 40)],  # 40: no native kernel, torch's SDPA
)
@pytest.mark.parametrize(
    ("start", "n_new"), [(0, 1), (300, 1), (0, 13), (0, 200), (57, 3), (131, 70)]
)
def test_attend_matches_sdpa_when_causal_with_cached_prefix(n_heads, n_kv, head_dim, start, n_new):
    gen = torch.Generator().manual_seed(start * 1000 + n_new)
    q, k, v, k_cache, v_cache = grouped_heads(gen, n_heads, n_kv, head_dim, n_new, 512)
    k_cache[:, :start] = torch.randn(n_kv, start, head_dim, generator=gen)
    v_cache[:, :start] = torch.randn(n_kv, start, head_dim, generator=gen)
    out = attend(q, k_cache, v_cache, start, k, v)
    assert torch.equal(k_cache[:, start : start + n_new], k[0])  # the new keys were written
    assert torch.equal(v_cache[:, start : start + n_new], v[0])
    assert out.shape == (1, n_heads, n_new, head_dim)
    torch.testing.assert_close(out, expected_attention(q, k_cache, v_cache, start), **CLOSE)


@pytest.mark.parametrize(("n_heads", "n_kv", "head_dim"), [(14, 2, 64), (6, 2, 40)])
@pytest.mark.parametrize("n_queries", [1, 5])
def test_attend_for_the_last_queries_only_gives_their_rows_of_the_full_result(
    n_heads, n_kv, head_dim, n_queries
):
    """What the last block of a prompt runs (Decoder.forward): every new key and value is
    written, queries are asked for the last positions only."""
    gen = torch.Generator().manual_seed(n_queries)
    start, n_new = 31, 70
    q, k, v, k_cache, v_cache = grouped_heads(gen, n_heads, n_kv, head_dim, n_new, 128)
    k_cache[:, :start] = torch.randn(n_kv, start, head_dim, generator=gen)
    v_cache[:, :start] = torch.randn(n_kv, start, head_dim, generator=gen)
    full = attend(q, k_cache.clone(), v_cache.clone(), start, k, v)
    tail = attend(q[:, :, -n_queries:], k_cache, v_cache, start, k, v)
    assert torch.equal(k_cache[:, start : start + n_new], k[0])
    assert torch.equal(v_cache[:, start : start + n_new], v[0])
    assert tail.shape == (1, n_heads, n_queries, head_dim)
    torch.testing.assert_close(tail, full[:, :, -n_queries:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("n_heads", "n_kv", "head_dim"), [(14, 2, 64), (6, 2, 40)])
@pytest.mark.parametrize(("start", "n_new"), [(0, 13), (300, 1), (131, 70)])
def test_attend_over_a_float16_cache_matches_float32_holding_the_same_values(
    n_heads, n_kv, head_dim, start, n_new
):
    """KVCache.cache_dtype float16: keys and values are stored rounded, read as float32 (the
    native kernel widens them; torch's path converts), the arithmetic stays float32."""
    gen = torch.Generator().manual_seed(start + n_new)
    q, k, v, k32, v32 = grouped_heads(gen, n_heads, n_kv, head_dim, n_new, 512)
    k32[:, :start] = torch.randn(n_kv, start, head_dim, generator=gen)
    v32[:, :start] = torch.randn(n_kv, start, head_dim, generator=gen)
    k16, v16 = k32.half(), v32.half()
    k, v = k.half().float(), v.half().float()  # what the float16 cache will hold
    k32, v32 = k16.float(), v16.float()
    out16 = attend(q, k16, v16, start, k, v)
    out32 = attend(q, k32, v32, start, k, v)
    assert k16.dtype == torch.float16 and torch.equal(k16[:, start : start + n_new].float(), k[0])
    assert out16.dtype == torch.float32 and out16.shape == (1, n_heads, n_new, head_dim)
    torch.testing.assert_close(out16, out32, rtol=1e-5, atol=1e-6)


def test_rotary_shift_of_float16_keys_rotates_in_float32():
    rotary = Rotary(64, 10000.0, 256, RopeScaling())
    keys = torch.randn(2, 3, 40, 64)
    shifted = rotary.shift(keys.half(), 37)
    assert shifted.dtype == torch.float16
    torch.testing.assert_close(shifted.float(), rotary.shift(keys, 37), rtol=2e-3, atol=2e-3)


@needs_native
@pytest.mark.parametrize(("head_dim", "served"), [(64, True), (128, True), (40, False)])
def test_native_attention_serves_head_dims_of_multiples_of_16(head_dim, served):
    gen = torch.Generator().manual_seed(head_dim)
    q, k, v, k_cache, v_cache = grouped_heads(gen, 14, 2, head_dim, 40, 64)
    k_cache[:, :40], v_cache[:, :40] = k[0], v[0]
    out = _native_attention(q, k_cache, v_cache, 0)
    assert (out is not None) == served
    if served:
        torch.testing.assert_close(out, expected_attention(q, k_cache, v_cache, 0), **CLOSE)


@pytest.mark.parametrize("n_keys", [_SDPA_DECODE_MAX_KEYS // 2, _SDPA_DECODE_MAX_KEYS * 2 + 3])
def test_attend_one_query_matches_sdpa_when_grouped_heads(n_keys):
    """The decode path without the native kernel (torch only)."""
    gen = torch.Generator().manual_seed(7)
    q, _, _, k_cache, v_cache = grouped_heads(gen, 14, 2, 64, 1, 1024, scale=1.0)
    k_cache[:, :n_keys] = torch.randn(2, n_keys, 64, generator=gen)
    v_cache[:, :n_keys] = torch.randn(2, n_keys, 64, generator=gen)
    keys, values = k_cache[:, :n_keys].unsqueeze(0), v_cache[:, :n_keys].unsqueeze(0)
    out = _attend_one_query(q, keys, values)
    expected = F.scaled_dot_product_attention(q, keys, values, enable_gqa=True)
    assert out.shape == (1, 14, 1, 64)
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_torch(dtype):
    gen = torch.Generator().manual_seed(5)
    norm = RMSNorm(900, eps=1e-6)  # 900: the native loop's scalar tail
    norm.weight.data = torch.randn(900, generator=gen).to(dtype)
    x = (torch.randn(1, 7, 900, generator=gen) * 3).to(dtype)
    x[0, 1] = 0.0  # eps keeps a zero row finite
    expected = F.rms_norm(x.float(), (900,), norm.weight.float(), 1e-6).to(dtype)
    out = norm(x)
    assert out.shape == x.shape and out.dtype == dtype
    torch.testing.assert_close(
        out, expected, rtol=1e-6 if dtype == torch.float32 else 1e-2, atol=1e-6
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qkv_heads_rotates_q_and_k_as_hf_rotate_half(dtype):
    gen = torch.Generator().manual_seed(6)
    n_heads, n_kv, head_dim, n_tokens = 14, 2, 64, 9
    rotary = Rotary(head_dim, 10000.0, 64, RopeScaling())
    cos, sin = rotary(torch.arange(3, 3 + n_tokens), dtype)
    qkv = torch.randn(1, n_tokens, (n_heads + 2 * n_kv) * head_dim, generator=gen).to(dtype)
    heads = qkv.clone().view(1, n_tokens, n_heads + 2 * n_kv, head_dim).transpose(1, 2)

    def rotate_half(x):
        return torch.cat([-x[..., head_dim // 2 :], x[..., : head_dim // 2]], dim=-1)

    full_cos = torch.cat([rotary.inv_freq, rotary.inv_freq]) * torch.arange(3, 12)[:, None]
    expected = heads * full_cos.cos() + rotate_half(heads) * full_cos.sin()
    q, k, v = qkv_heads(qkv, n_heads, n_kv, cos, sin)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(q, expected[:, :n_heads].to(dtype), **tol)
    torch.testing.assert_close(k, expected[:, n_heads : n_heads + n_kv].to(dtype), **tol)
    assert torch.equal(v, heads[:, n_heads + n_kv :])  # v is not rotated
