"""Helpers shared by the engine tests."""

from __future__ import annotations

import torch


def randomise_norms(ref: torch.nn.Module) -> None:
    """Norm weights (and biases) of a freshly built reference model off their ones / zeros,
    which would hide a weight or bias that never got loaded."""
    with torch.no_grad():
        for name, param in ref.named_parameters():
            if "norm" in name or ".ln_" in name:
                param.copy_(1 + 0.2 * torch.randn_like(param))
