"""Layers shared by the architectures: RMSNorm, rotary embeddings, attention over a KVCache."""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import Cancelled, ModelLoadError

if TYPE_CHECKING:
    from .cancel import CancelToken
    from .kv import KVCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalised in fp32 like the reference implementations (F.rms_norm: bit-identical to
        # x * rsqrt(mean(x^2) + eps) * w there), returned in x's dtype. On the CPU, for float32,
        # one native pass (kernels_x86.c, codelm_rms_norm; another summation order): torch
        # takes five.
        lib = _native_for(x, self.weight)
        if lib is not None:
            x = x.contiguous()
            out = torch.empty_like(x)
            dim = x.shape[-1]
            lib.codelm_rms_norm(
                x.data_ptr(), x.numel() // dim, dim, self.weight.data_ptr(), self.eps,
                out.data_ptr(), torch.get_num_threads(),
            )  # fmt: skip
            return out
        out = F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps)
        return out.to(x.dtype)


@dataclass(frozen=True, kw_only=True, slots=True)
class RopeScaling:
    """HF `rope_scaling`: kind is none | linear | dynamic | llama3."""

    kind: str = "none"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    @classmethod
    def from_hf(cls, scaling: dict | None) -> RopeScaling:
        if not scaling:
            return cls()
        kind = scaling.get("rope_type", scaling.get("type", "none"))
        if kind == "default":
            return cls()
        if kind not in ("linear", "dynamic", "llama3"):
            raise ValueError(
                f"unsupported rope scaling {kind!r} (supported: linear, dynamic, llama3)"
            )
        return cls(
            kind=kind,
            factor=float(scaling.get("factor", 1.0)),
            low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
            high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
            original_max_position=int(scaling.get("original_max_position_embeddings", 8192)),
        )


def rope_inv_freq(head_dim: int, base: float, scaling: RopeScaling) -> torch.Tensor:
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    original = inv_freq
    if scaling.kind == "linear":
        inv_freq = inv_freq / scaling.factor
    elif scaling.kind == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
        low_wavelen = scaling.original_max_position / scaling.low_freq_factor
        high_wavelen = scaling.original_max_position / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (scaling.original_max_position / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, blended)
        inv_freq = torch.where(wavelen < high_wavelen, original, inv_freq)
    elif scaling.kind == "dynamic":
        # Dynamic NTK is applied for the whole context length at once (cache-stable positions).
        base = base * scaling.factor ** (head_dim / (head_dim - 2))
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    return inv_freq.float()


class Rotary(nn.Module):
    """Precomputed cos/sin tables for positions [0, max_len), HF "rotate half" layout.

    The sin table's first half is negated (`signed_sin`), so rotating is x * cos plus x with its
    halves swapped times that table (apply_rotary): HF's `rotate_half` negation, moved into
    the table.
    """

    def __init__(self, head_dim: int, base: float, max_len: int, scaling: RopeScaling) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, base, scaling)
        freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("cos", torch.cat([freqs, freqs], -1).cos(), persistent=False)
        self.register_buffer("sin", signed_sin(freqs), persistent=False)

    def shift(self, keys: torch.Tensor, delta: int) -> torch.Tensor:
        """Keys rotated at position p, re-rotated to p + delta (rotations compose): [..., Dh],
        computed in float32 whatever the cache stores."""
        angles = (delta * self.inv_freq.double()).float()
        cos = torch.cat([angles, angles]).cos()
        return apply_rotary(keys.float(), cos, signed_sin(angles)).to(keys.dtype)

    def forward(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [T] -> cos, signed sin: [T, head_dim]
        return self.cos[positions].to(dtype), self.sin[positions].to(dtype)


def signed_sin(angles: torch.Tensor) -> torch.Tensor:
    """[..., Dh/2] angles -> [-sin, sin] along the last dim."""
    sin = angles.sin()
    return torch.cat([-sin, sin], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, Dh] rotated by cos and the signed sin of Rotary (exactly HF's
    x * cos + rotate_half(x) * sin, with four ops instead of seven)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


def qkv_heads(
    qkv: torch.Tensor,
    n_heads: int,
    n_kv_heads: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fused q/k/v projection [1, T, (H + 2 Hkv) Dh] as q [1, H, T, Dh] and k, v
    [1, Hkv, T, Dh], q and k rotated: on the CPU, for float32, in place in one native pass
    (kernels_x86.c, codelm_rotate_heads); elsewhere in one op chain (a decode step is bound by
    op count). `rows`: q holds only the last `rows` positions (Block.forward's `rows`)."""
    n_tokens = qkv.shape[1]
    heads = qkv.view(1, n_tokens, n_heads + 2 * n_kv_heads, -1).transpose(1, 2)
    lib = _native_for(qkv, cos)
    if lib is not None and qkv.is_contiguous():
        cos, sin = cos.contiguous(), sin.contiguous()
        lib.codelm_rotate_heads(
            qkv.data_ptr(), n_tokens, qkv.shape[-1], n_heads + n_kv_heads, heads.shape[-1],
            cos.data_ptr(), sin.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        qk = heads[:, : n_heads + n_kv_heads]
    else:
        qk = apply_rotary(heads[:, : n_heads + n_kv_heads], cos, sin)
    q = qk[:, :n_heads] if rows is None else qk[:, :n_heads, n_tokens - rows :]
    return q, qk[:, n_heads:], heads[:, n_heads + n_kv_heads :]


def attend(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    start: int | torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
) -> torch.Tensor:
    """Write k/v at [start, start+T) of one layer's cache and attend causally over [0, start+T).

    q: [1, H, Tq, Dh], the last Tq <= T of the new positions; k, v: [1, Hkv, T, Dh];
    k_cache, v_cache: [Hkv, capacity, Dh], in q's dtype or (KVCache.cache_dtype) another.
    `start` as a tensor: one new position, held on the device (attend_at).
    """
    if isinstance(start, torch.Tensor):
        return attend_at(q, k_cache, v_cache, start, k, v)
    end = start + k.shape[2]
    n_queries = q.shape[2]
    k_cache[:, start:end] = k[0]
    v_cache[:, start:end] = v[0]
    out = _native_attention(q, k_cache, v_cache, end - n_queries)
    if out is not None:
        return out
    keys = k_cache[:, :end].to(q.dtype).unsqueeze(0)
    values = v_cache[:, :end].to(q.dtype).unsqueeze(0)
    if n_queries == 1:
        if q.device.type == "cpu" and end > _SDPA_DECODE_MAX_KEYS:
            return _attend_one_query(q, keys, values)
        mask = None
    elif n_queries == end:
        # A prompt from position 0: torch's own causal masking, which lets CUDA take its flash
        # kernel (an explicit mask rules it out).
        return F.scaled_dot_product_attention(q, keys, values, is_causal=True, enable_gqa=True)
    else:
        # Query i (absolute position end - n_queries + i) sees the keys up to its own.
        rows = torch.arange(end - n_queries, end, device=q.device).unsqueeze(1)
        mask = torch.arange(end, device=q.device).unsqueeze(0) <= rows
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)


def attend_at(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    position: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int | None = None,
) -> torch.Tensor:
    """attend for one new position given as a tensor ([1] int64 on the cache's device), with
    shapes that do not depend on it, so a captured CUDA graph replays it at any position
    (fused_decode.GraphedDecode): the row is written with index_copy_ and the query attends
    over the cache's whole capacity under a mask (keys (position - window, position] where a
    sliding `window` is given). The rows past the position must hold finite numbers (a masked
    score is -inf, and 0 times NaN is NaN): KVCache zeroes what it allocates."""
    k_cache.index_copy_(1, position, k[0].to(k_cache.dtype))
    v_cache.index_copy_(1, position, v[0].to(v_cache.dtype))
    keys = torch.arange(k_cache.shape[1], device=position.device)
    mask = keys <= position
    if window is not None:
        mask &= keys > position - window
    return F.scaled_dot_product_attention(
        q,
        k_cache.to(q.dtype).unsqueeze(0),
        v_cache.to(q.dtype).unsqueeze(0),
        attn_mask=mask.view(1, 1, 1, -1),
        enable_gqa=True,
    )


def _native_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start: int
) -> torch.Tensor | None:
    """attend's arithmetic in the native kernel (kernels_x86.c, codelm_attention), or None where
    it does not take the tensors (q not float32 on the CPU, a cache neither float32 nor
    float16, head_dim not a multiple of 16) or is not built. It skips the causal half torch's
    CPU flash attention computes and shares each K/V load across a GQA group: 4.2 against
    8.1 ms for a 512-token prompt of Qwen2.5-Coder-0.5B's shapes on 2 Zen 4 cores, 37 against
    88 ms at 1.7k tokens (docs/engine.md)."""
    lib = _native_for(q)
    if (
        lib is None
        or q.stride(-1) != 1
        or k_cache.device.type != "cpu"
        or k_cache.dtype not in (torch.float32, torch.float16)
        or v_cache.dtype != k_cache.dtype
        or not (k_cache.is_contiguous() and v_cache.is_contiguous())
    ):
        return None
    n_heads, n_new, head_dim = q.shape[1:]
    out = q.new_empty(n_new, n_heads * head_dim)
    rc = lib.codelm_attention(
        q.data_ptr(), q.stride(2), q.stride(1), k_cache.data_ptr(), v_cache.data_ptr(),
        k_cache.shape[1], n_heads, k_cache.shape[0], head_dim, start, n_new,
        k_cache.dtype == torch.float16, out.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        return None
    return out.view(1, n_new, n_heads, head_dim).transpose(1, 2)


def _native_for(*tensors: torch.Tensor) -> ctypes.CDLL | None:
    """The native kernels (kernels_x86.c) where all `tensors` are float32 on the CPU and they
    are built; None otherwise (the caller keeps torch's ops)."""
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return None
    from codelm.quant import native

    lib = native.library()
    return lib if isinstance(lib, ctypes.CDLL) else None


# Without the native kernel, a decode step over more keys than this skips SDPA on CPU: with GQA
# it copies K/V for every query head, a cost that grows with the context (Qwen2.5-Coder-0.5B
# shapes, 2-core AVX2: 73 against 114 us at 64 keys, 227 against 173 at 576, 486 against 258
# at 2048).
_SDPA_DECODE_MAX_KEYS = 256


def _attend_one_query(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(Dh)) v for one query position, the query heads of each KV head
    taken as rows of one matmul: q [1, H, 1, Dh]; keys, values [1, Hkv, L, Dh]."""
    n_heads, n_kv, head_dim = q.shape[1], keys.shape[1], q.shape[-1]
    grouped = q.reshape(1, n_kv, n_heads // n_kv, head_dim)
    scores = torch.matmul(grouped, keys.transpose(-1, -2)).mul_(head_dim**-0.5)
    return torch.matmul(scores.softmax(-1), values).reshape(1, n_heads, 1, head_dim)


# HF `hidden_act` -> F.gelu's `approximate`; "gelu_pytorch_tanh" is what the released models use.
GELU_APPROXIMATE = {"gelu": "none", "gelu_pytorch_tanh": "tanh", "gelu_new": "tanh"}


def silu_and_mul(gate_up: torch.Tensor, ffn_dim: int) -> torch.Tensor:
    """SwiGLU of a fused gate/up projection [..., 2 * ffn_dim]: silu(gate) * up, [..., ffn_dim].

    On the CPU, for float32 rows, one pass of the native kernel (kernels_x86.c, codelm_swiglu,
    the decode step's own): torch takes three (a contiguous gate, silu, mul), ~0.95 against
    0.45 ms for 256 x 4864 on 2 Zen 4 cores. Elsewhere torch, on a contiguous gate in place."""
    lib = _native_for(gate_up)
    if lib is None:
        gate, up = gate_up.split(ffn_dim, dim=-1)
        return F.silu(gate.contiguous(), inplace=True).mul_(up)
    gate_up = gate_up.contiguous()
    out = gate_up.new_empty(*gate_up.shape[:-1], ffn_dim)
    rows = gate_up.numel() // (2 * ffn_dim)
    lib.codelm_swiglu(gate_up.data_ptr(), rows, ffn_dim, out.data_ptr(), torch.get_num_threads())
    return out


def gate_up_silu(gate_up_proj: nn.Module, x: torch.Tensor, ffn_dim: int) -> torch.Tensor:
    """silu(gate) * up of a fused gate/up projection of x: inside the projection's kernel where
    it has that epilogue (QuantizedLinear.silu_and_mul: a prompt on int8_tiles), else
    silu_and_mul of its output."""
    fused = getattr(gate_up_proj, "silu_and_mul", None)
    out = fused(x) if fused is not None else None
    return silu_and_mul(gate_up_proj(x), ffn_dim) if out is None else out


def gelu_approximate(name: str) -> str:
    try:
        return GELU_APPROXIMATE[name]
    except KeyError:
        raise ModelLoadError(
            f"activation {name!r} is not supported; supported: {', '.join(GELU_APPROXIMATE)}"
        ) from None


def meta_linear(n_in: int, n_out: int, bias: bool) -> nn.Linear:
    # Placeholder replaced at load by an nn.Linear with real weights or a QuantizedLinear.
    return nn.Linear(n_in, n_out, bias=bias, device="meta")


def meta_embedding(n: int, dim: int) -> nn.Embedding:
    """Placeholder replaced at load, given its (meta) weight: nn.Embedding's own init draws
    normal_ even on the meta device, through a path that imports torch._dynamo (1.1 s)."""
    return nn.Embedding(n, dim, _weight=torch.empty(n, dim, device="meta"))


class LayerNorm(nn.Module):
    """LayerNorm with weight and bias, computed in fp32 (the checkpoint fills both)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, device="meta"))
        self.bias = nn.Parameter(torch.empty(dim, device="meta"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = self.weight.shape
        out = F.layer_norm(x.float(), shape, self.weight.float(), self.bias.float(), self.eps)
        return out.to(x.dtype)


class GeluMLP(nn.Module):
    """GPT-2 style feed-forward: c_proj(gelu(c_fc(x)))."""

    def __init__(self, dim: int, ffn_dim: int, bias: bool, activation: str) -> None:
        super().__init__()
        self.approximate = gelu_approximate(activation)
        self.c_fc = meta_linear(dim, ffn_dim, bias)
        self.c_proj = meta_linear(ffn_dim, dim, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate))


class SelfAttention(nn.Module):
    """What every architecture's attention shares: a fused q/k/v projection, RoPE, causal
    attention over the layer's cache and the output projection. A subclass builds the two
    projections (named as its checkpoint names them), sets n_heads / n_kv_heads and says in
    `projections` which modules they are."""

    n_heads: int
    n_kv_heads: int

    def projections(self) -> tuple[nn.Module, nn.Module]:
        raise NotImplementedError

    def attend(self, q, k_cache, v_cache, start: int | torch.Tensor, k, v) -> torch.Tensor:
        return attend(q, k_cache, v_cache, start, k, v)

    def forward(
        self, x, cos, sin, k_cache, v_cache, start: int | torch.Tensor, rows=None
    ) -> torch.Tensor:
        # x: [1, T, D]; the result holds the last `rows` positions (None: all T)
        qkv_proj, out_proj = self.projections()
        q, k, v = qkv_heads(qkv_proj(x), self.n_heads, self.n_kv_heads, cos, sin, rows)
        out = self.attend(q, k_cache, v_cache, start, k, v)
        return out_proj(out.transpose(1, 2).flatten(2))


class PreNormBlock(nn.Module):
    """x + attention(norm(x)), then x + mlp(norm(x)). A subclass builds the four modules
    (named as its checkpoint names them) and says in `parts` which they are."""

    def parts(self) -> tuple[nn.Module, SelfAttention, nn.Module, nn.Module]:
        """The norm before attention, the attention, the norm before the MLP, the MLP."""
        raise NotImplementedError

    def forward(
        self, x, cos, sin, k_cache, v_cache, start: int | torch.Tensor, rows=None
    ) -> torch.Tensor:
        """x [1, T, D] at positions [start, start + T); returns the last `rows` positions'
        outputs (None: all T), every position's keys and values written to the cache."""
        attn_norm, attn, mlp_norm, mlp = self.parts()
        h = attn(attn_norm(x), cos, sin, k_cache, v_cache, start, rows)
        x = x[:, x.shape[1] - h.shape[1] :] + h
        return x + mlp(mlp_norm(x))


class Decoder(nn.Module):
    """What every architecture shares around its blocks: the head, the rotary tables and the
    decoder loop. A subclass builds its body (named as its checkpoint names it) and says in
    `parts` which modules are the embedding, the blocks and the final norm."""

    def __init__(self, args: Any) -> None:
        super().__init__()
        self.args = args
        self.lm_head = meta_linear(args.dim, args.vocab_size, False)
        self.rotary = Rotary(args.head_dim, args.rope_base, args.max_len, args.rope_scaling)
        # One-token forwards in one call where fused_decode.attach can build one for the loaded
        # layers (not a module): native on the CPU, a replayed CUDA graph on a GPU.
        self.decode_step: Any = None
        # The head for a pick that reads only the two largest logits, where the loader built
        # one (quant.cpu.Int8Shortlist: an int8 head in fewer bytes); else lm_head.
        self.head_shortlist: Any = None

    def parts(self) -> tuple[nn.Embedding, nn.ModuleList, nn.Module]:
        raise NotImplementedError

    def forward(
        self,
        tokens: torch.Tensor,
        kv: KVCache,
        n_logits: int | None = 1,
        cancel: CancelToken | None = None,
        top_two: bool = False,
    ) -> torch.Tensor:
        """Runs `tokens` ([T] ids) at positions [kv.length, kv.length + T) and advances
        kv.length. Returns fp32 logits [n, vocab] of the last n = n_logits positions (None:
        all T). The ids may sit on the CPU whatever the device: they move to kv's.

        `top_two`: the caller reads only the two largest logits of one row (sampling.Picker's
        `top_two`). They and their tokens are exact; the others may hold an upper bound of
        theirs, below those two.

        `cancel`: checked before each block; once set, raises Cancelled with kv.length as it
        was (rows the earlier blocks wrote past it are dead, overwritten by the next run)."""
        embed, blocks, final_norm = self.parts()
        tokens = tokens.to(kv.device)
        start = kv.length
        n_tokens = tokens.shape[0]
        kv.reserve(start + n_tokens)
        x = embed(tokens).unsqueeze(0).to(kv.dtype)  # [1, T, D]
        positions = torch.arange(start, start + n_tokens, device=tokens.device)
        cos, sin = self.rotary(positions, x.dtype)
        if n_tokens == 1 and self.decode_step is not None and self.decode_step.accepts(kv):
            x = self.decode_step(x, kv, start, cos, sin)
        else:
            # The last block computes only the rows whose logits are asked for: the others'
            # keys and values are all that later tokens read.
            last_rows = n_logits if n_logits is not None and n_logits < n_tokens else None
            for i, block in enumerate(blocks):
                if cancel is not None and cancel.is_cancelled:
                    raise Cancelled(f"cancelled during a forward ({cancel.reason})")
                rows = last_rows if i == len(blocks) - 1 else None
                x = block(x, cos, sin, kv.k[i], kv.v[i], start, rows)
        kv.length = start + n_tokens
        x = final_norm(x[0] if n_logits is None else x[0, -n_logits:])
        if top_two and x.shape[0] == 1 and self.head_shortlist is not None:
            return self.head_shortlist(x)
        return self.lm_head(x).float()
