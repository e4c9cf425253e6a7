"""Llama family: SmolLM2, aiXcoder-7B, DeepSeek-Coder, CodeLlama (RMSNorm, RoPE, SwiGLU, GQA).

Qwen2 reuses this block with q/k/v biases (ModelArgs.qkv_bias).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from ..gguf_file import gguf_sizes
from ..layers import (
    Decoder,
    PreNormBlock,
    RMSNorm,
    RopeScaling,
    SelfAttention,
    gate_up_silu,
    meta_embedding,
    meta_linear,
)
from ..weights import hf_sizes


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelArgs:
    arch: str = "llama"
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
    tie_embeddings: bool = False
    qkv_bias: bool = False

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> ModelArgs:
        return cls(
            arch=config.get("model_type", "llama"),
            **hf_sizes(config),
            norm_eps=config.get("rms_norm_eps", 1e-5),
            tie_embeddings=config.get("tie_word_embeddings", False),
            qkv_bias=config.get("attention_bias", False) or config.get("model_type") == "qwen2",
        )

    @classmethod
    def from_gguf(cls, meta: dict[str, Any], has_output: bool) -> ModelArgs:
        arch = meta["general.architecture"]

        def key(name: str, default: Any = None) -> Any:
            return meta.get(f"{arch}.{name}", default)

        scaling = None
        if key("rope.scaling.type") not in (None, "none"):
            scaling = {"type": key("rope.scaling.type"), "factor": key("rope.scaling.factor", 1.0)}
        return cls(
            arch=arch,
            **gguf_sizes(meta, arch),
            norm_eps=key("attention.layer_norm_rms_epsilon", 1e-5),
            rope_base=key("rope.freq_base", 10000.0),
            rope_scaling=RopeScaling.from_hf(scaling),
            max_len=key("context_length", 4096),
            tie_embeddings=not has_output,
            qkv_bias=arch == "qwen2",
        )

    def replace(self, **changes: Any) -> ModelArgs:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return ModelArgs(**{**values, **changes})


# Linear layers that run as one matmul: their parts' weights are concatenated at load.
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}

# GGUF tensor name -> our (HF) name; {i} is the block index.
GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}

# GGUF stores q/k rows permuted for interleaved RoPE; these need un-permuting (weights.py).
GGUF_PERMUTED_ARCHS = ("llama", "mistral")


class Attention(SelfAttention):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = args.n_heads, args.n_kv_heads
        q_dim, kv_dim = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
        self.qkv_proj = meta_linear(args.dim, q_dim + 2 * kv_dim, args.qkv_bias)
        self.o_proj = meta_linear(q_dim, args.dim, False)

    def projections(self) -> tuple[nn.Module, nn.Module]:
        return self.qkv_proj, self.o_proj


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.ffn_dim = args.ffn_dim
        self.gate_up_proj = meta_linear(args.dim, 2 * args.ffn_dim, False)
        self.down_proj = meta_linear(args.ffn_dim, args.dim, False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gate_up_silu(self.gate_up_proj, x, self.ffn_dim))


class Block(PreNormBlock):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args)

    def parts(self) -> tuple[nn.Module, SelfAttention, nn.Module, nn.Module]:
        return self.input_layernorm, self.self_attn, self.post_attention_layernorm, self.mlp


class Inner(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.embed_tokens = meta_embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)


class Model(Decoder):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__(args)
        self.model = Inner(args)

    def parts(self) -> tuple[nn.Embedding, nn.ModuleList, nn.Module]:
        return self.model.embed_tokens, self.model.layers, self.model.norm
