"""Helpers shared by the engine tests."""

from __future__ import annotations

from pathlib import Path

import torch


def new_kv(args, cache_dtype: torch.dtype = torch.float32):
    """A float32 model's KV cache for the ModelArgs `args` on the CPU, keys and values stored
    as `cache_dtype` (the engine's own is Engine.new_kv)."""
    from codelm.daemon.engine.kv import KVCache

    return KVCache(
        args.n_layers,
        args.n_kv_heads,
        args.head_dim,
        dtype=torch.float32,
        max_len=args.max_len,
        cache_dtype=cache_dtype,
    )


def randomise_norms(ref: torch.nn.Module) -> None:
    """Norm weights (and biases) of a freshly built reference model off their ones / zeros,
    which would hide a weight or bias that never got loaded."""
    with torch.no_grad():
        for name, param in ref.named_parameters():
            if "norm" in name or ".ln_" in name:
                param.copy_(1 + 0.2 * torch.randn_like(param))


def write_word_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer.json over t0..t{vocab_size - 1}: a folder model needs one."""
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(vocab_size)}
    Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(str(folder / "tokenizer.json"))
