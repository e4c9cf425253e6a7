"""The quantised default model against its fp32 self: top-1 agreement on a real source file."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch

from codelm.daemon.engine import EngineConfig, load_engine

# Teacher-forced next-token agreement over 256 positions of real code.
MIN_AGREEMENT = {"int8": 0.97, "int4": 0.90}


def _top1(engine, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        logits = engine.model(torch.tensor(ids), engine.new_kv(), n_logits=None)
    return logits.argmax(-1)


@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_quantised_default_model_agrees_with_fp32(default_engine, default_model_path, quant):
    text = Path(sysconfig.get_paths()["stdlib"], "json", "encoder.py").read_text()
    ids = default_engine.tokenizer.encode(text)[:257]
    engine = load_engine(EngineConfig(model=str(default_model_path), quant=quant))
    assert engine.info["quant"].startswith(quant)
    agreement = (_top1(engine, ids) == _top1(default_engine, ids)).float().mean().item()
    assert agreement >= MIN_AGREEMENT[quant], f"{quant}: top-1 agreement {agreement:.3f}"


def test_auto_keeps_the_gguf_precision_class(default_model_path):
    engine = load_engine(EngineConfig(model=str(default_model_path), quant="auto"))
    # SmolLM2's GGUF: Q4_1 blocks -> int4, the Q8_0 embedding (tied head) -> int8.
    assert engine.info["quant"] == "int4 x120, int8 x1"


def test_requantised_weights_come_from_the_disk_cache_on_the_second_load(
    default_model_path, tmp_path, monkeypatch
):
    monkeypatch.setenv("CODELM_HOME", str(tmp_path))
    first = load_engine(EngineConfig(model=str(default_model_path), quant="int8"))
    assert first.info["weight_cache"].startswith("written")
    second = load_engine(EngineConfig(model=str(default_model_path), quant="int8"))
    # The 120 Q4_1 matrices were requantised to int8; the Q8_0 head repacks exactly each time.
    assert second.info["weight_cache"].startswith("120 layers loaded")
    ids = first.tokenizer.encode("def fib(n):\n    if n < 2:\n        return n\n")
    assert torch.equal(_top1(first, ids), _top1(second, ids))
