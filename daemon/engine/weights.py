"""Read checkpoints: GGUF files (via `gguf`) and Hugging Face folders (config.json + safetensors).

Both become a `WeightSet`: our (HF) tensor names -> `TensorSource`, which keeps GGUF blocks raw so
quant/ can repack them without a detour through float.
"""

from __future__ import annotations

import json
import logging
import math
import re
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ModelLoadError
from .layers import RopeScaling

logger = logging.getLogger(__name__)

_FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass(slots=True)
class TensorSource:
    """One checkpoint tensor, not yet converted: `shape` is torch order ([N, K] for a matrix).

    GGUF tensors keep their raw block bytes (`raw`, [N, bytes per row]) and `ggml_type`;
    safetensors and float GGUF tensors carry `tensor`.
    """

    name: str
    shape: tuple[int, ...]
    ggml_type: str | None = None
    raw: np.ndarray | None = None
    tensor: torch.Tensor | None = None

    def to_float(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The tensor in fp32 on `device` (dequantised if it is a GGUF quant type). A float
        tensor moves first and converts there: a GPU converts, and quantises, in a fraction
        of the time a CPU takes."""
        if self.tensor is not None:
            return self.tensor.to(device).float()
        from codelm.quant import dequantize_gguf

        value = dequantize_gguf(self.raw, self.ggml_type, self.shape, name=self.name)
        return value.to(device)

    def to(
        self, dtype: torch.dtype, device: torch.device | str | None = None, rows: int = 4096
    ) -> torch.Tensor:
        """The tensor as `dtype` on `device`, never whole in float32 on the way: GGUF blocks
        are dequantised `rows` at a time into the result. (Qwen2.5-Coder's Q8_0 embedding,
        136M values, had put 1.4 GB of float32 temporaries on the load's peak.)"""
        if self.tensor is not None:
            return self.tensor.to(device=device, dtype=dtype)
        if len(self.shape) != 2:
            return self.to_float(device).to(dtype)
        from codelm.quant import dequantize_gguf

        n, k = self.shape
        out = torch.empty(n, k, dtype=dtype, device=device)
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            rows_shape = (r1 - r0, k)
            out[r0:r1] = dequantize_gguf(
                self.raw[r0:r1], self.ggml_type, rows_shape, name=self.name
            )
        return out

    def permute_rows(self, order: torch.Tensor) -> TensorSource:
        """Reorder the first dimension (output rows); quantised blocks move whole with their row."""
        index = order.numpy()
        if self.tensor is not None:
            return TensorSource(self.name, self.shape, tensor=self.tensor[order])
        return TensorSource(self.name, self.shape, self.ggml_type, raw=self.raw[index])


@dataclass(slots=True)
class WeightSet:
    tensors: dict[str, TensorSource]
    meta: dict[str, Any]  # GGUF metadata or the HF config.json
    kind: str  # "gguf" | "hf"
    path: Path

    def n_params(self) -> int:
        """Elements in the checkpoint's tensors not yet taken: the parameter count a model
        card gives (a quantised model holds its layers as packed buffers, not parameters)."""
        return sum(math.prod(t.shape) for t in self.tensors.values())

    def layers_held(self) -> int:
        """The blocks whose weights these are (`model.layers.N.`, `transformer.h.N.`)."""
        return _blocks_named(self.tensors, _LAYER_INDEX)

    def take(self, name: str) -> TensorSource:
        try:
            return self.tensors.pop(name)
        except KeyError:
            raise ModelLoadError(
                f"{self.path}: tensor {name!r} is missing; the file is incomplete or not a "
                "supported architecture"
            ) from None


def unpermute_order(n_rows: int, n_heads: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's q/k permutation (interleaved -> rotate-half RoPE)."""
    head_dim = n_rows // n_heads
    # convert_hf_to_gguf: HF row (h, j, r) -> GGUF row (h, r, j), j in [0, 2), r in [0, hd/2).
    rows = torch.arange(n_rows).view(n_heads, head_dim // 2, 2).transpose(1, 2)
    return rows.reshape(n_rows)


_LAYER_INDEX = re.compile(r"\.(\d+)\.")
_GGUF_BLOCK_INDEX = re.compile(r"^blk\.(\d+)\.")


def _blocks_named(names: Iterable[str], index: re.Pattern[str]) -> int:
    """1 + the highest block index `index` finds in `names` (0 where it finds none)."""
    found = (index.search(name) for name in names)
    return 1 + max((int(m[1]) for m in found if m), default=-1)


def read_gguf(path: Path, name_table: Callable[[str], dict[str, str]]) -> WeightSet:
    """Read a GGUF file; `name_table(arch)` gives that architecture's GGUF -> HF name table."""
    from .gguf_file import read_gguf_file

    try:
        meta, gguf_tensors = read_gguf_file(path)
        arch = meta["general.architecture"]
    except (
        ValueError,
        OSError,
        IndexError,
        KeyError,
        OverflowError,
        MemoryError,
        struct.error,
    ) as exc:
        # (OverflowError, MemoryError: a corrupt count or size field)
        raise ModelLoadError(
            f"{path} is not a readable GGUF file ({exc!r}); fetch it again (for a catalogue "
            "model: `codelm-daemon models fetch NAME --force`)"
        ) from exc
    # The blocks the file holds, not the count its metadata states (a corrupt one named
    # millions, and naming each one's tensors took minutes and gigabytes).
    held = _blocks_named((t.name for t in gguf_tensors), _GGUF_BLOCK_INDEX)
    names = _expand_names(name_table(arch), held)
    tensors = {}
    for t in gguf_tensors:
        ours = names.get(t.name)
        if ours is None:
            logger.debug("skipping GGUF tensor %s", t.name)
            continue
        if t.type_name in _FLOAT_TYPES:
            data = torch.from_numpy(np.array(t.data)).view(_FLOAT_TYPES[t.type_name])
            tensors[ours] = TensorSource(ours, t.shape, tensor=data.reshape(t.shape))
        else:
            tensors[ours] = TensorSource(ours, t.shape, t.type_name, raw=t.data)
    return WeightSet(tensors, meta, "gguf", path)


def _expand_names(table: dict[str, str], n_layers: int) -> dict[str, str]:
    names = {}
    for gguf_name, ours in table.items():
        if "{i}" in gguf_name:
            for i in range(n_layers):
                names[gguf_name.format(i=i)] = ours.format(i=i)
        else:
            names[gguf_name] = ours
    return names


def hf_sizes(config: dict[str, Any]) -> dict[str, Any]:
    """The sizes a transformers config.json states under its common keys (`hidden_size`,
    `num_hidden_layers`, ...; llama, mistral, qwen2, starcoder2), as the ModelArgs fields they
    fill, the rotary base and scaling and the context length with them."""
    n_heads, dim = config["num_attention_heads"], config["hidden_size"]
    # transformers 5 writes `rope_parameters` (theta inside); released checkpoints have
    # `rope_theta` and `rope_scaling`.
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    return {
        "vocab_size": config["vocab_size"],
        "dim": dim,
        "n_layers": config["num_hidden_layers"],
        "n_heads": n_heads,
        "n_kv_heads": config.get("num_key_value_heads") or n_heads,
        "ffn_dim": config["intermediate_size"],
        "head_dim": config.get("head_dim") or dim // n_heads,
        "rope_base": config.get("rope_theta") or rope.get("rope_theta", 10000.0),
        "rope_scaling": RopeScaling.from_hf(rope),
        "max_len": config.get("max_position_embeddings", 4096),
    }


def read_hf_folder(path: Path) -> WeightSet:
    from safetensors import safe_open

    config_path = path / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{config_path} is missing or not JSON ({exc})") from exc
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path} has no *.safetensors files (pytorch .bin is not supported)")
    tensors = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                tensor = f.get_tensor(name)
                tensors[name] = TensorSource(name, tuple(tensor.shape), tensor=tensor)
    return WeightSet(tensors, config, "hf", path)
