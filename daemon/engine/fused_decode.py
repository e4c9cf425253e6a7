"""A decode step of a llama-family model as one native call (kernels_x86.c, codelm_decode_step).

A one-token forward through the torch modules runs ~20 small ops per block between its four
matmuls; at Qwen2.5-Coder-0.5B's size on a 2-core CPU those ops cost about as long as a third of
the weights take to read. When every block linear decodes on a native kernel (int8_native /
int4_native), the whole stack of blocks runs in C instead: the same kernels, RMSNorm, RoPE and
attention written out, the KV cache written in place. Anything else (CUDA, bf16 activations,
another architecture, a layer on a torch kernel) keeps the module path.
"""

from __future__ import annotations

import ctypes
import logging

import torch
from torch import nn

from codelm.quant import QuantizedLinear, native

from .kv import KVCache
from .models import llama

logger = logging.getLogger(__name__)


class FusedDecode:
    """Runs the blocks of `model` for one token; built by `attach`, used by Decoder.forward."""

    def __init__(self, lib: ctypes.CDLL, blocks: list[native.Block], shape: native.Shape):
        self._step = lib.codelm_decode_step
        self._blocks = (native.Block * len(blocks))(*blocks)
        self._shape = shape

    def __call__(
        self, x: torch.Tensor, kv: KVCache, start: int, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        """x [1, 1, dim] float32, a new tensor (updated in place and returned) -> the last
        block's output; writes kv's k / v at `start` (the caller advances kv.length)."""
        # The C side trusts the layout: [n_layers, n_kv_heads, capacity, head_dim], row `start`.
        if not (kv.k.is_contiguous() and kv.v.is_contiguous() and start < kv.capacity):
            raise ValueError(f"fused decode step: KV cache not laid out for position {start}")
        rc = self._step(
            ctypes.byref(self._blocks[0]),
            ctypes.byref(self._shape),
            x.data_ptr(),
            kv.k.data_ptr(),
            kv.v.data_ptr(),
            kv.capacity,
            start,
            cos.data_ptr(),
            sin.data_ptr(),
            kv.k.dtype == torch.float16,
            torch.get_num_threads(),
        )
        if rc != 0:
            raise MemoryError("fused decode step: no memory for its scratch buffers")
        return x


def attach(model: nn.Module, device: torch.device, dtype: torch.dtype) -> str:
    """Give `model` a fused decode step where it can run one; returns how a decode step runs
    ("fused native", or "module by module" and why) for the engine's info."""
    blocks = _native_blocks(model, device, dtype)
    if isinstance(blocks, str):
        model.fused_decode = None
        logger.info("decode step runs module by module: %s", blocks)
        return f"module by module ({blocks})"
    args = model.args
    shape = native.Shape(
        args.n_layers,
        args.dim,
        args.n_heads,
        args.n_kv_heads,
        args.head_dim,
        args.ffn_dim,
        args.norm_eps,
    )
    model.fused_decode = FusedDecode(native.library(), blocks, shape)
    logger.info("decode step fused into one native call")
    return "fused native"


def _native_blocks(
    model: nn.Module, device: torch.device, dtype: torch.dtype
) -> list[native.Block] | str:
    """Each block's norm weights and native linears, or why the model has none to fuse."""
    if device.type != "cpu" or dtype != torch.float32:
        return f"the fused step runs float32 on the CPU, this is {dtype} on {device}"
    if not isinstance(model, llama.Model):
        return f"{model.args.arch} is not a llama-family model"
    lib = native.library()
    if isinstance(lib, str):
        return lib
    blocks = []
    for i, block in enumerate(model.model.layers):
        linears = []
        for name, layer in _linears(block):
            # A QuantizedLinear whose decode kernel is native describes itself; nothing else does.
            described = layer.native_decode() if isinstance(layer, QuantizedLinear) else None
            if described is None:
                kernel = layer.plan.decode.name if isinstance(layer, QuantizedLinear) else None
                return f"block {i} {name} decodes on {kernel or type(layer).__name__}"
            linears.append(described)
        norms = (block.input_layernorm.weight, block.post_attention_layernorm.weight)
        blocks.append(native.Block(norms[0].data_ptr(), norms[1].data_ptr(), *linears))
    return blocks


def _linears(block: llama.Block) -> list[tuple[str, nn.Module]]:
    attn, mlp = block.self_attn, block.mlp
    return [
        ("qkv_proj", attn.qkv_proj),
        ("o_proj", attn.o_proj),
        ("gate_up_proj", mlp.gate_up_proj),
        ("down_proj", mlp.down_proj),
    ]
