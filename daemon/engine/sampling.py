"""Pure logits -> token functions."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .tokenizer import Tokenizer


def greedy(logits: torch.Tensor) -> int:
    """The most likely next token of the last position. logits: [..., vocab]."""
    return int(logits[-1].argmax())


def greedy_with_prefix(logits: torch.Tensor, allowed: torch.Tensor | None) -> int:
    """Greedy over `allowed` token ids only (token healing), or over all when None."""
    if allowed is None:
        return greedy(logits)
    return int(allowed[logits[-1, allowed].argmax()])


class HealingPicker:
    """Greedy, but the first tokens must spell `heal`: the bytes of the prompt's last token,
    removed so the model can choose how the text at the cursor continues (token healing)."""

    def __init__(self, tokenizer: Tokenizer, heal: bytes) -> None:
        self.tokenizer = tokenizer
        self.remaining = heal

    def __call__(self, logits: torch.Tensor, step: int) -> int:
        if not self.remaining:
            return greedy(logits)
        token = greedy_with_prefix(logits, self.tokenizer.consistent_tokens(self.remaining))
        piece = self.tokenizer.pieces[token]
        self.remaining = self.remaining[len(piece) :] if self.remaining.startswith(piece) else b""
        return token
