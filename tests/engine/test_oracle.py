"""Our llama implementation against transformers' LlamaForCausalLM (the oracle)."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch
from engine_helpers import new_kv

from codelm.daemon.engine.generate import StopRules, generate
from codelm.daemon.engine.loader import LinearFactory, fill_model
from codelm.daemon.engine.models import llama
from codelm.daemon.engine.weights import read_hf_folder

transformers = pytest.importorskip("transformers")

# fp32 throughout; differences come only from summation order.
LOGIT_ATOL = 1e-3


def _tiny_config(tie: bool, **extra) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=10000.0,
        tie_word_embeddings=tie,
        **extra,
    )


def _our_model(folder: Path) -> llama.Model:
    weights = read_hf_folder(folder)
    args = llama.ModelArgs.from_hf_config(weights.meta)
    model = llama.Model(args)
    cpu = torch.device("cpu")
    linears = LinearFactory("fp32", torch.float32, cpu)
    fill_model(model, weights, llama.FUSED, linears, torch.float32, cpu, lambda f: None)
    return model.eval()


def _tiny_pair(tmp_path: Path, tie: bool, **extra):
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(_tiny_config(tie, **extra)).eval()
    ref.save_pretrained(tmp_path)
    return ref, _our_model(tmp_path)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_tiny_llama_logits_match_transformers(tmp_path, tie):
    ref, ours = _tiny_pair(tmp_path, tie)
    tokens = torch.randint(0, 320, (40,))
    with torch.inference_mode():
        expected = ref(tokens[None]).logits[0]
        actual = ours(tokens, new_kv(ours.args), n_logits=None)
    torch.testing.assert_close(actual, expected, atol=LOGIT_ATOL, rtol=1e-4)


def test_tiny_llama_with_llama3_rope_scaling_matches_transformers(tmp_path):
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    ref, ours = _tiny_pair(tmp_path, False, rope_scaling=scaling)
    tokens = torch.randint(0, 320, (100,))
    with torch.inference_mode():
        expected = ref(tokens[None]).logits[0]
        actual = ours(tokens, new_kv(ours.args), n_logits=None)
    torch.testing.assert_close(actual, expected, atol=LOGIT_ATOL, rtol=1e-4)


def test_tiny_llama_decode_one_token_at_a_time_matches_full_forward(tmp_path):
    ref, ours = _tiny_pair(tmp_path, False)
    tokens = torch.randint(0, 320, (24,))
    kv = new_kv(ours.args)
    with torch.inference_mode():
        full = ours(tokens, new_kv(ours.args), n_logits=None)
        steps = torch.cat([ours(tokens[i : i + 1], kv) for i in range(len(tokens))])
    torch.testing.assert_close(steps, full, atol=1e-4, rtol=1e-4)


def _source_prompt(engine, n_tokens: int) -> list[int]:
    text = Path(sysconfig.get_paths()["stdlib"], "json", "decoder.py").read_text()
    return engine.tokenizer.encode(text)[:n_tokens]


def test_default_model_logits_match_transformers_gguf(default_engine, default_model_path):
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        default_model_path.parent, gguf_file=default_model_path.name, dtype=torch.float32
    ).eval()
    ids = _source_prompt(default_engine, 200)
    with torch.inference_mode():
        expected = ref(torch.tensor([ids])).logits[0]
        actual = default_engine.model(torch.tensor(ids), default_engine.new_kv(), n_logits=None)
    # Both dequantise the same Q4_1/Q8_0 blocks to fp32; only summation order differs.
    torch.testing.assert_close(actual, expected, atol=2e-3, rtol=1e-3)
    greedy = ref.generate(
        torch.tensor([ids]),
        max_new_tokens=32,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )[0, len(ids) :].tolist()
    rules = StopRules(max_tokens=32)
    ours = generate(
        default_engine.model, default_engine.tokenizer, default_engine.new_kv(), ids, rules
    )
    assert ours.token_ids == greedy


def test_chunked_prefill_equals_prefill_at_once(default_engine):
    ids = torch.tensor(_source_prompt(default_engine, 300))
    model = default_engine.model
    with torch.inference_mode():
        once = model(ids, default_engine.new_kv())
        kv = default_engine.new_kv()
        for start in range(0, len(ids), 64):
            chunked = model(ids[start : start + 64], kv)
    torch.testing.assert_close(chunked, once, atol=1e-4, rtol=1e-4)


def test_truncate_and_reprefill_equals_fresh_prefill(default_engine):
    ids = _source_prompt(default_engine, 300)
    edited = ids[:200] + ids[150:250]  # same first 200 tokens, then a different tail
    model = default_engine.model
    with torch.inference_mode():
        fresh = model(torch.tensor(edited), default_engine.new_kv())
        kv = default_engine.new_kv()
        model(torch.tensor(ids), kv)
        kv.trim_to(200)
        reused = model(torch.tensor(edited[200:]), kv)
    torch.testing.assert_close(reused, fresh, atol=1e-4, rtol=1e-4)
