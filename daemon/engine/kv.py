"""KV cache tensors for one sequence: grown in blocks, trimmed back for prefix reuse."""

from __future__ import annotations

import torch

_BLOCK = 256  # capacity grows in whole blocks so a growing prompt reallocates rarely


class KVCache:
    """Keys and values of all layers for positions [0, length).

    `k` and `v` are [n_layers, n_kv_heads, capacity, head_dim]; the model writes positions
    [length, length + T) in place during a forward and the caller advances `length`. `dtype`
    is what the model computes in, `cache_dtype` what the keys and values are stored in
    (`dtype` unless given: float16 halves a float32 model's cache).
    """

    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        max_len: int,
        cache_dtype: torch.dtype | None = None,
    ) -> None:
        self.shape = (n_layers, n_kv_heads, 0, head_dim)
        self.dtype = dtype
        self.cache_dtype = cache_dtype or dtype
        self.device = torch.device(device)
        self.max_len = max_len
        self.length = 0
        self.k = torch.empty(self.shape, dtype=self.cache_dtype, device=self.device)
        self.v = torch.empty(self.shape, dtype=self.cache_dtype, device=self.device)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        return self.k.nelement() * self.k.element_size() * 2

    def reserve(self, n_tokens: int) -> None:
        """Make room for positions up to `n_tokens` (keeps [0, length))."""
        if n_tokens > self.max_len:
            raise ValueError(f"{n_tokens} tokens exceed the context length {self.max_len}")
        if n_tokens <= self.capacity:
            return
        capacity = min(self.max_len, -(-n_tokens // _BLOCK) * _BLOCK)
        n_layers, n_heads, _, head_dim = self.shape
        shape = (n_layers, n_heads, capacity, head_dim)
        for name in ("k", "v"):
            old = getattr(self, name)
            # Zeroed: a CUDA graph's decode step attends over the whole capacity under a mask
            # (layers.attend_at), and a masked row of NaN bits would still poison the sum.
            new = torch.zeros(shape, dtype=self.cache_dtype, device=self.device)
            new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)

    def trim_to(self, n_tokens: int) -> None:
        """Forget positions >= n_tokens (the tensors are kept for reuse)."""
        assert 0 <= n_tokens <= self.length
        self.length = n_tokens

    def shrink(self) -> None:
        """Release capacity beyond `length` rounded up to a block (for caches kept idle)."""
        capacity = -(-self.length // _BLOCK) * _BLOCK
        if capacity < self.capacity:
            self.k = self.k[:, :, :capacity].clone()
            self.v = self.v[:, :, :capacity].clone()
