"""Pure logits -> token functions."""

from __future__ import annotations

import torch


def greedy(logits: torch.Tensor) -> int:
    """The most likely next token of the last position. logits: [..., vocab]."""
    return int(logits[-1].argmax())


def greedy_with_prefix(logits: torch.Tensor, allowed: torch.Tensor | None) -> int:
    """Greedy over `allowed` token ids only (token healing), or over all when None."""
    if allowed is None:
        return greedy(logits)
    return int(allowed[logits[-1, allowed].argmax()])
