"""StarCoder2: LayerNorm with bias, GELU MLP (c_fc/c_proj), biased q/k/v/o, GQA, RoPE, and
sliding-window attention where the config sets one.

CodeShell (models/codeshell.py) is built from the same LayerNorm and MLP.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..gguf_file import gguf_sizes
from ..layers import (
    Decoder,
    GeluMLP,
    LayerNorm,
    PreNormBlock,
    RopeScaling,
    SelfAttention,
    attend,
    attend_at,
    gelu_approximate,
    meta_embedding,
    meta_linear,
)
from ..weights import hf_sizes


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelArgs:
    arch: str = "starcoder2"
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    head_dim: int
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_len: int = 4096
    sliding_window: int | None = None  # a query sees only the last `sliding_window` positions
    use_bias: bool = True
    activation: str = "gelu_pytorch_tanh"
    tie_embeddings: bool = True

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> ModelArgs:
        act = config.get("hidden_act", "gelu_pytorch_tanh")
        gelu_approximate(act)
        return cls(
            **hf_sizes(config),
            norm_eps=config.get("norm_epsilon", 1e-5),
            sliding_window=config.get("sliding_window"),
            use_bias=config.get("use_bias", True),
            activation=act,
            tie_embeddings=config.get("tie_word_embeddings", True),
        )

    @classmethod
    def from_gguf(cls, meta: dict[str, Any], has_output: bool) -> ModelArgs:
        def key(name: str, default: Any = None) -> Any:
            return meta.get(f"starcoder2.{name}", default)

        return cls(
            **gguf_sizes(meta, "starcoder2"),
            norm_eps=key("attention.layer_norm_epsilon", 1e-5),
            rope_base=key("rope.freq_base", 10000.0),
            max_len=key("context_length", 4096),
            # llama.cpp's converter writes no window; it attends over the whole context too.
            sliding_window=key("attention.sliding_window"),
            tie_embeddings=not has_output,
        )


# Linear layers that run as one matmul: their parts' weights (and biases) are concatenated.
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj")}

# GGUF tensor name (llama.cpp's STARCODER2 tensors) -> our (HF) name; {i} is the block index.
# llama.cpp runs StarCoder2 with NeoX-style RoPE, so q/k rows are stored unpermuted.
GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output_norm.bias": "model.norm.bias",
    "output.weight": "lm_head.weight",
    **{
        f"blk.{{i}}.{gguf}.{kind}": f"model.layers.{{i}}.{ours}.{kind}"
        for gguf, ours in (
            ("attn_norm", "input_layernorm"),
            ("attn_q", "self_attn.q_proj"),
            ("attn_k", "self_attn.k_proj"),
            ("attn_v", "self_attn.v_proj"),
            ("attn_output", "self_attn.o_proj"),
            ("ffn_norm", "post_attention_layernorm"),
            ("ffn_up", "mlp.c_fc"),
            ("ffn_down", "mlp.c_proj"),
        )
        for kind in ("weight", "bias")
    },
}


def attend_window(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    start: int | torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int | None,
) -> torch.Tensor:
    """layers.attend where position p sees keys (p - window, p] only (HF's sliding window).

    Shapes as in layers.attend: q [1, H, Tq, Dh] (the last Tq <= T positions), k/v
    [1, Hkv, T, Dh], caches [Hkv, cap, Dh].
    """
    if isinstance(start, torch.Tensor):
        return attend_at(q, k_cache, v_cache, start, k, v, window)
    end = start + k.shape[2]
    if window is None or end <= window:
        return attend(q, k_cache, v_cache, start, k, v)
    k_cache[:, start:end] = k[0]
    v_cache[:, start:end] = v[0]
    q_start = end - q.shape[2]
    first = max(0, q_start + 1 - window)  # the oldest key the first query still sees
    keys = k_cache[:, first:end].to(q.dtype).unsqueeze(0)
    values = v_cache[:, first:end].to(q.dtype).unsqueeze(0)
    rows = torch.arange(q_start, end, device=q.device).unsqueeze(1)
    cols = torch.arange(first, end, device=q.device).unsqueeze(0)
    mask = (cols <= rows) & (cols > rows - window)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)


class Attention(SelfAttention):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = args.n_heads, args.n_kv_heads
        q_dim, kv_dim = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
        self.qkv_proj = meta_linear(args.dim, q_dim + 2 * kv_dim, args.use_bias)
        self.o_proj = meta_linear(q_dim, args.dim, args.use_bias)
        self.window = args.sliding_window

    def projections(self) -> tuple[nn.Module, nn.Module]:
        return self.qkv_proj, self.o_proj

    def attend(self, q, k_cache, v_cache, start: int | torch.Tensor, k, v) -> torch.Tensor:
        return attend_window(q, k_cache, v_cache, start, k, v, self.window)


class Block(PreNormBlock):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.input_layernorm = LayerNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = LayerNorm(args.dim, args.norm_eps)
        self.mlp = GeluMLP(args.dim, args.ffn_dim, args.use_bias, args.activation)

    def parts(self) -> tuple[nn.Module, SelfAttention, nn.Module, nn.Module]:
        return self.input_layernorm, self.self_attn, self.post_attention_layernorm, self.mlp


class Inner(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.embed_tokens = meta_embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = LayerNorm(args.dim, args.norm_eps)


class Model(Decoder):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__(args)
        self.model = Inner(args)

    def parts(self) -> tuple[nn.Embedding, nn.ModuleList, nn.Module]:
        return self.model.embed_tokens, self.model.layers, self.model.norm
