"""Fixtures for the quant tests; shared weights and error bounds live in quant_helpers.py."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
