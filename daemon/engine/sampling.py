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


class Greedy:
    """Picks the most likely token. `known(token)`: the pick when the logits' argmax is known to
    be `token` (a prediction kept from an earlier forward), or None when logits are needed."""

    def __call__(self, logits: torch.Tensor, step: int) -> int:
        return greedy(logits)

    def known(self, token: int, step: int) -> int | None:
        return token

    def top_two(self, step: int) -> bool:
        """Whether the pick at `step` reads no more than the two largest logits (and which
        tokens hold them): the model may then bound the others (layers.Model.forward)."""
        return True


class HealingPicker:
    """Greedy, but the first tokens must spell `heal`: the bytes of the prompt's last token,
    removed so the model can choose how the text at the cursor continues (token healing).

    Healed indentation is spelt in one token, or in one that leaves a single character for
    the next (`11 spaces` + ` if`, as tokenizers split it). A shorter run of spaces the model
    prefers (7, where it expected the line 4 columns less deep) would leave the rest to be
    spelt a space at a time, which it never saw: it went on writing spaces to max_tokens."""

    def __init__(self, tokenizer: Tokenizer, heal: bytes) -> None:
        self.tokenizer = tokenizer
        self.remaining = heal
        self._allowed: tuple[bytes, torch.Tensor] | None = None  # (remaining, ids)

    def __call__(self, logits: torch.Tensor, step: int) -> int:
        if not self.remaining:
            return greedy(logits)
        token = greedy_with_prefix(logits, self.allowed())
        self._spelled(token)
        return token

    def known(self, token: int, step: int) -> int | None:
        # The argmax over the allowed tokens is the overall argmax when that one is allowed.
        if self.remaining and not bool((self.allowed() == token).any()):
            return None
        self._spelled(token)
        return token

    def allowed(self) -> torch.Tensor:
        """The ids that may come next while `remaining` is still to be spelt."""
        if self._allowed is None or self._allowed[0] != self.remaining:
            ids = self.tokenizer.consistent_tokens(self.remaining)
            if not self.remaining.strip():  # whitespace: in one token, or all but one char
                least = len(self.remaining) - 1
                enough = torch.tensor(
                    [len(self.tokenizer.pieces[i]) >= least for i in ids.tolist()],
                    dtype=torch.bool,
                )
                if enough.any():
                    ids = ids[enough]
            self._allowed = (self.remaining, ids)
        return self._allowed[1]

    def top_two(self, step: int) -> bool:
        return not self.remaining  # the argmax over the tokens that fit reads them all

    def _spelled(self, token: int) -> None:
        piece = self.tokenizer.pieces[token]
        self.remaining = self.remaining[len(piece) :] if self.remaining.startswith(piece) else b""


class Banning:
    """Another picker with one token ruled out at one step: a retry after a suggestion that only
    repeated the document's next line (Engine.complete)."""

    def __init__(self, pick: Greedy | HealingPicker, step: int, token: int) -> None:
        self.pick, self.step, self.token = pick, step, token

    def __call__(self, logits: torch.Tensor, step: int) -> int:
        if step == self.step:
            logits = logits.clone()
            logits[..., self.token] = float("-inf")
        return self.pick(logits, step)

    def known(self, token: int, step: int) -> int | None:
        return None if step == self.step else self.pick.known(token, step)

    def top_two(self, step: int) -> bool:
        return self.pick.top_two(step)  # with one token ruled out: the runner-up at most


Picker = Greedy | HealingPicker | Banning
