"""A decode step of all the blocks in one call: native C on the CPU (FusedDecode), a replayed
CUDA graph on a GPU (GraphedDecode). A one-token forward through the modules runs ~20 small ops
a block, which cost a third of the weights' read time on a 2-core CPU and bound the step in
kernel launches on a GPU (docs/engine.md)."""

from __future__ import annotations

import ctypes
import logging
from collections import OrderedDict
from dataclasses import dataclass

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

    def accepts(self, kv: KVCache) -> bool:
        return kv.dtype == torch.float32

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


@dataclass(slots=True)
class _Graph:
    """A captured step and the tensors it reads and writes at fixed addresses."""

    graph: torch.cuda.CUDAGraph
    x: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    position: torch.Tensor  # [1] int64: the row of the KV cache the step writes
    out: torch.Tensor


class GraphedDecode:
    """Runs the blocks of `model` for one token on CUDA by replaying a CUDA graph of them.

    A graph holds the addresses it was captured with, the KV cache's among them, so there is
    one per cache layout (its tensors' addresses, shape and dtype): captured at the first step
    on that layout, kept for the `max_graphs` layouts used last (a file's cache changes layout
    when it grows by a block of 256 positions). The position is a tensor the graph reads
    (layers.attend_at), so one graph serves every position of its cache. If capturing fails,
    the error is logged and every later step takes the module path."""

    def __init__(self, model: nn.Module, max_graphs: int = 8) -> None:
        self._blocks = list(model.parts()[1])
        self._max_graphs = max_graphs
        self._graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self._pool = None  # one memory pool for all graphs: they never run at once
        self._warmup_stream = None  # where each capture's eager warm-up runs (made on first use)
        self.captures = 0
        self.failed: str | None = None

    def accepts(self, kv: KVCache) -> bool:
        return kv.device.type == "cuda" and self.failed is None

    def __call__(
        self, x: torch.Tensor, kv: KVCache, start: int, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        """As FusedDecode: x [1, 1, dim] -> the last block's output; kv written at `start`.
        Runs in inference mode whatever the caller's: the graphs' tensors are made in it and
        written in place at every step."""
        key = (kv.k.data_ptr(), kv.v.data_ptr(), tuple(kv.k.shape), kv.k.dtype)
        with torch.inference_mode():
            step = self._graphs.get(key)
            if step is None:
                return self._capture(key, x, kv, start, cos, sin)
            self._graphs.move_to_end(key)
            step.x.copy_(x)
            step.cos.copy_(cos)
            step.sin.copy_(sin)
            step.position.fill_(start)
            step.graph.replay()
            return step.out.clone()  # the next replay of any graph may overwrite `out`

    def _capture(self, key, x, kv, start, cos, sin) -> torch.Tensor:
        """This step's output, run once eagerly (the warm-up a capture needs: lazy
        initialisation must not happen inside it), then the step captured for the next ones."""
        position = torch.full((1,), start, dtype=torch.long, device=x.device)
        inputs = (x.clone(), cos.clone(), sin.clone(), position)
        main = torch.cuda.current_stream(x.device)
        side = self._warmup_stream = self._warmup_stream or torch.cuda.Stream(x.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            out = decode_blocks(self._blocks, kv, *inputs)
        main.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                static_out = decode_blocks(self._blocks, kv, *inputs)
        except RuntimeError as exc:
            self.failed = str(exc)
            logger.warning("CUDA graph capture failed, decoding module by module: %s", exc)
            return out
        self._pool = self._pool or graph.pool()
        self._graphs[key] = _Graph(graph, *inputs, static_out)
        if len(self._graphs) > self._max_graphs:
            self._graphs.popitem(last=False)
        self.captures += 1
        logger.debug("captured a decode step for KV cache layout %s", key[2:])
        return out


def decode_blocks(
    blocks: list[nn.Module],
    kv: KVCache,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position: torch.Tensor,
) -> torch.Tensor:
    """The blocks for one token at a position held in a tensor (what GraphedDecode captures):
    shapes and launches do not depend on the position."""
    for i, block in enumerate(blocks):
        x = block(x, cos, sin, kv.k[i], kv.v[i], position)
    return x


def attach(
    model: nn.Module, device: torch.device, dtype: torch.dtype, cuda_graphs: bool = True
) -> str:
    """Give `model` a one-call decode step where it can run one; returns how a decode step
    runs ("fused native", "CUDA graph", or "module by module" and why) for the engine's info.
    `cuda_graphs`: False keeps CUDA on the module path (the `cuda_graphs` setting)."""
    if device.type == "cuda":
        if not cuda_graphs:
            model.decode_step = None
            return "module by module (cuda_graphs is off)"
        model.decode_step = GraphedDecode(model)
        logger.info("decode step replays a CUDA graph per KV cache layout")
        return "CUDA graph"
    blocks = _native_blocks(model, device, dtype)
    if isinstance(blocks, str):
        model.decode_step = None
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
    model.decode_step = FusedDecode(native.library(), blocks, shape)
    logger.info("decode step fused into one native call")
    return "fused native"


def _native_blocks(
    model: nn.Module, device: torch.device, dtype: torch.dtype
) -> list[native.Block] | str:
    """Each block's norm weights and native linears, or why the model has none to fuse."""
    if dtype != torch.float32:
        return f"the fused step runs float32 on the CPU, this is {dtype}"
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
