"""Build a model from a checkpoint: resolve the name, read weights, fill the meta-device model.

Linear layers are built one at a time from their checkpoint tensors (fp32/bf16 now, quantised
through quant/), so the model is never held twice in memory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..catalog import resolve_model_path
from ..errors import ModelLoadError
from . import EngineConfig
from .models import HF_ARCHITECTURES, architecture
from .tokenizer import Tokenizer, tokenizer_from_folder, tokenizer_from_gguf
from .weights import TensorSource, WeightSet, read_gguf, read_hf_folder, unpermute_order

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class LoadedModel:
    model: nn.Module
    tokenizer: Tokenizer
    args: Any
    device: torch.device
    dtype: torch.dtype
    info: dict[str, Any]


def load_model(config: EngineConfig, device: torch.device, progress=None) -> LoadedModel:
    path = resolve_model_path(config.model)
    report = progress or (lambda fraction, message: None)
    report(0.0, f"reading {path.name}")
    if path.is_dir():
        weights = read_hf_folder(path)
        arch_name = weights.meta.get("model_type") or _hf_arch(weights.meta)
        module = architecture(arch_name)
        args = module.ModelArgs.from_hf_config(weights.meta)
        tokenizer = tokenizer_from_folder(path, weights.meta)
    else:
        weights = _read_gguf_file(path)
        module = architecture(weights.meta["general.architecture"])
        has_output = "lm_head.weight" in weights.tensors
        args = module.ModelArgs.from_gguf(weights.meta, has_output)
        tokenizer = tokenizer_from_gguf(weights.meta)
        if weights.meta["general.architecture"] in getattr(module, "GGUF_PERMUTED_ARCHS", ()):
            _unpermute_qk(weights, args)
    dtype = _dtype(config.quant, device)
    report(0.2, "building the model")
    model = module.Model(args)
    fill_model(
        model, weights, module.FUSED, dtype, device, lambda f: report(0.2 + 0.8 * f, "weights")
    )
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    info = {
        "model": config.model,
        "path": str(path),
        "arch": args.arch,
        "device": str(device),
        "quant": str(dtype).removeprefix("torch."),
        "quant_reason": "weights dequantised to float (quant/ kernels not used)",
        "n_params": n_params,
        "n_ctx": args.max_len,
    }
    report(1.0, "ready")
    return LoadedModel(model, tokenizer, args, device, dtype, info)


def _hf_arch(config: dict) -> str:
    for name in config.get("architectures") or []:
        if name in HF_ARCHITECTURES:
            return HF_ARCHITECTURES[name]
    raise ModelLoadError(
        f"config.json names no supported architecture: {config.get('architectures')}"
    )


def _read_gguf_file(path: Path) -> WeightSet:
    return read_gguf(path, lambda arch: architecture(arch).GGUF_NAMES)


def _unpermute_qk(weights: WeightSet, args: Any) -> None:
    for i in range(args.n_layers):
        for part, heads in (("q_proj", args.n_heads), ("k_proj", args.n_kv_heads)):
            for kind in ("weight", "bias"):
                name = f"model.layers.{i}.self_attn.{part}.{kind}"
                if name in weights.tensors:
                    source = weights.tensors[name]
                    weights.tensors[name] = source.permute_rows(
                        unpermute_order(source.shape[0], heads)
                    )


def _dtype(quant: str, device: torch.device) -> torch.dtype:
    if quant in ("auto", "fp32"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if quant == "bf16":
        return torch.bfloat16
    raise ModelLoadError(f"--quant {quant} is not available yet; use fp32 or bf16")


def fill_model(
    model: nn.Module,
    weights: WeightSet,
    fused: dict[str, tuple[str, ...]],
    dtype: torch.dtype,
    device: torch.device,
    progress,
) -> None:
    """Replace every meta tensor of `model` with the checkpoint's, converted one at a time.

    `fused` maps a fused linear (qkv_proj) to the checkpoint linears concatenated into it.
    """
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    tied = model.args.tie_embeddings
    for done, (name, module) in enumerate(linears):
        if name == "lm_head" and tied:
            sources = [weights.tensors["model.embed_tokens.weight"]]
        else:
            sources = [weights.take(f"{p}.weight") for p in _parts(name, fused)]
        bias = (
            [weights.take(f"{p}.bias") for p in _parts(name, fused)]
            if module.bias is not None
            else []
        )
        _set_parent(model, name, _float_linear(sources, bias, dtype, device))
        progress(done / len(linears))
    for name, param in list(model.named_parameters()):
        if param.is_meta or name.endswith("norm.weight"):
            source = weights.take(name)
            _check_shape(name, source, tuple(param.shape))
            value = source.to_float().to(
                dtype=dtype if param.is_meta else torch.float32, device=device
            )
            _set_parent(model, name, nn.Parameter(value, requires_grad=False))
    if model.args.tie_embeddings and isinstance(model.lm_head, nn.Linear):
        model.lm_head.weight = model.model.embed_tokens.weight  # one copy, as in the checkpoint
    model.to(device)
    if weights.tensors:
        logger.debug("unused checkpoint tensors: %s", sorted(weights.tensors)[:20])


def _parts(name: str, fused: dict[str, tuple[str, ...]]) -> list[str]:
    parent, _, leaf = name.rpartition(".")
    return [f"{parent}.{p}" for p in fused[leaf]] if leaf in fused else [name]


def _float_linear(
    sources: list[TensorSource], bias: list[TensorSource], dtype, device
) -> nn.Linear:
    weight = torch.cat([s.to_float() for s in sources]).to(dtype=dtype, device=device)
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bool(bias), device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias:
        value = torch.cat([b.to_float() for b in bias]).to(dtype=dtype, device=device)
        linear.bias = nn.Parameter(value, requires_grad=False)
    return linear


def _set_parent(model: nn.Module, name: str, value: nn.Module | nn.Parameter) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, value)


def _check_shape(name: str, source: TensorSource, expected: tuple[int, ...]) -> None:
    if tuple(source.shape) != expected:
        raise ModelLoadError(
            f"tensor {name} has shape {source.shape}, the config implies {expected}"
        )
