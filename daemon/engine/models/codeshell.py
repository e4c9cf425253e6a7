"""CodeShell (WisdomShell): a GPT-2 block (LayerNorm with bias, fused c_attn, GELU MLP) with
grouped-query attention and RoPE. CodeShell-7B: 42 layers, hidden 4096, 32 heads, 8 kv groups,
vocab 70144, 8k context.

There is no transformers class: config field and weight names follow the released checkpoint
(`n_embd`, `n_layer`, `num_query_groups`; `transformer.h.{i}.attn.c_attn`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ...errors import ModelLoadError
from ..gguf_file import gguf_sizes
from ..layers import (
    Decoder,
    GeluMLP,
    LayerNorm,
    PreNormBlock,
    RopeScaling,
    SelfAttention,
    gelu_approximate,
    meta_embedding,
    meta_linear,
)

# CodeShell's rotary embedding has a fixed base (modeling_codeshell.py; llama.cpp writes 10000).
ROPE_BASE = 10000.0


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelArgs:
    arch: str = "codeshell"
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    head_dim: int
    norm_eps: float = 1e-5
    rope_base: float = ROPE_BASE
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_len: int = 8192
    activation: str = "gelu_pytorch_tanh"
    tie_embeddings: bool = True

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> ModelArgs:
        if config.get("position_embedding_type", "learned_absolute") != "rope":
            raise ModelLoadError(
                "only CodeShell checkpoints with position_embedding_type 'rope' are supported "
                f"(this one has {config.get('position_embedding_type')!r})"
            )
        dim, n_heads = config["n_embd"], config["n_head"]
        gqa = config.get("group_query_attention", False)
        act = config.get("activation_function", "gelu_pytorch_tanh")
        gelu_approximate(act)
        return cls(
            vocab_size=config["vocab_size"],
            dim=dim,
            n_layers=config["n_layer"],
            n_heads=n_heads,
            n_kv_heads=config.get("num_query_groups", 1) if gqa else n_heads,
            ffn_dim=config.get("n_inner") or 4 * dim,
            head_dim=dim // n_heads,
            norm_eps=config.get("layer_norm_epsilon", 1e-5),
            rope_scaling=_rope_scaling(config.get("rope_scaling")),
            max_len=config.get("n_positions", 8192),
            activation=act,
            # The config has no tie_word_embeddings: transformers' default (tied) applies.
            tie_embeddings=config.get("tie_word_embeddings", True),
        )

    @classmethod
    def from_gguf(cls, meta: dict[str, Any], has_output: bool) -> ModelArgs:
        def key(name: str, default: Any = None) -> Any:
            return meta.get(f"codeshell.{name}", default)

        return cls(
            **gguf_sizes(meta, "codeshell"),
            norm_eps=key("attention.layer_norm_epsilon", 1e-5),
            rope_base=key("rope.freq_base", ROPE_BASE),
            max_len=key("context_length", 8192),
            tie_embeddings=not has_output,
        )


def _rope_scaling(scaling: dict | None) -> RopeScaling:
    # CodeShell's dynamic NTK only changes positions beyond n_positions, which we never run.
    if not scaling or scaling.get("type") == "dynamic":
        return RopeScaling()
    return RopeScaling.from_hf(scaling)


# c_attn is already fused in the checkpoint ([q | k | v] rows): nothing to concatenate.
FUSED: dict[str, tuple[str, ...]] = {}

# GGUF tensor name (llama.cpp's CODESHELL tensors) -> our (HF) name; {i} is the block index.
# llama.cpp runs CodeShell with NeoX-style RoPE, so the q/k rows of attn_qkv are unpermuted.
GGUF_NAMES = {
    "token_embd.weight": "transformer.wte.weight",
    "output_norm.weight": "transformer.ln_f.weight",
    "output_norm.bias": "transformer.ln_f.bias",
    "output.weight": "lm_head.weight",
    **{
        f"blk.{{i}}.{gguf}.{kind}": f"transformer.h.{{i}}.{ours}.{kind}"
        for gguf, ours in (
            ("attn_norm", "ln_1"),
            ("attn_qkv", "attn.c_attn"),
            ("attn_output", "attn.c_proj"),
            ("ffn_norm", "ln_2"),
            ("ffn_up", "mlp.c_fc"),
            ("ffn_down", "mlp.c_proj"),
        )
        for kind in ("weight", "bias")
    },
}


class Attention(SelfAttention):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = args.n_heads, args.n_kv_heads
        q_dim, kv_dim = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
        self.c_attn = meta_linear(args.dim, q_dim + 2 * kv_dim, True)
        self.c_proj = meta_linear(q_dim, args.dim, True)

    def projections(self) -> tuple[nn.Module, nn.Module]:
        return self.c_attn, self.c_proj


class Block(PreNormBlock):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(args.dim, args.norm_eps)
        self.attn = Attention(args)
        self.ln_2 = LayerNorm(args.dim, args.norm_eps)
        self.mlp = GeluMLP(args.dim, args.ffn_dim, True, args.activation)

    def parts(self) -> tuple[nn.Module, SelfAttention, nn.Module, nn.Module]:
        return self.ln_1, self.attn, self.ln_2, self.mlp


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.wte = meta_embedding(args.vocab_size, args.dim)
        self.h = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.ln_f = LayerNorm(args.dim, args.norm_eps)


class Model(Decoder):
    # The loader ties lm_head to this tensor. Released CodeShell checkpoints hold only
    # lm_head.weight (their tie runs the other way); the loader fills the embedding from it.
    EMBEDDING = "transformer.wte.weight"

    def __init__(self, args: ModelArgs) -> None:
        super().__init__(args)
        self.transformer = Transformer(args)

    def parts(self) -> tuple[nn.Embedding, nn.ModuleList, nn.Module]:
        return self.transformer.wte, self.transformer.h, self.transformer.ln_f
