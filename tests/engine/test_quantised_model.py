"""The quantised default model against its fp32 self: top-1 agreement on a real source file."""

from __future__ import annotations

import ctypes
import math
import sysconfig
from pathlib import Path

import pytest
import torch
from gguf import GGUFReader

from codelm.daemon import catalog
from codelm.daemon.engine import EngineConfig, load_engine
from codelm.daemon.engine.generate import StopRules, generate
from codelm.quant import QuantizedEmbedding, dequantize, native, repack_reader_tensor
from codelm.quant.cpu import Int8Native, Int8Shortlist

# Teacher-forced next-token agreement over 256 positions of real code.
MIN_AGREEMENT = {"int8": 0.97, "int4": 0.90}


def _top1(engine, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        logits = engine.model(torch.tensor(ids), engine.new_kv(), n_logits=None)
    return logits.argmax(-1)


@pytest.fixture(scope="module")
def project_default() -> tuple[Path, list[int], torch.Tensor]:
    """Qwen2.5-Coder (the model users get, fetched by `make install`; Q5_0/Q8_0, so int8 is a
    real precision step): its path, 257 tokens of json/encoder.py and the fp32 top-1 there.
    Not SmolLM2: its GGUF is Q4_1, and int8 of int4 values measures the requantisation."""
    path = catalog.fetch("default", log=lambda message: None)
    engine = load_engine(EngineConfig(model=str(path), quant="fp32"))
    assert engine.info["kv_cache"] == "float32"  # the reference stays float32 throughout
    text = Path(sysconfig.get_paths()["stdlib"], "json", "encoder.py").read_text()
    ids = engine.tokenizer.encode(text)[:257]
    return path, ids, _top1(engine, ids)


@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_quantised_default_model_agrees_with_fp32(project_default, quant):
    path, ids, reference = project_default
    engine = load_engine(EngineConfig(model=str(path), quant=quant))
    assert engine.info["quant"].startswith(quant)
    # Quantised weights on the CPU come with a float16 KV cache where the kernels are built.
    native_built = isinstance(native.library(), ctypes.CDLL)
    assert engine.new_kv().k.dtype == (torch.float16 if native_built else torch.float32)
    agreement = (_top1(engine, ids) == reference).float().mean().item()
    assert agreement >= MIN_AGREEMENT[quant], f"{quant}: top-1 agreement {agreement:.3f}"


def test_auto_keeps_the_gguf_precision_class(default_model_path):
    engine = load_engine(EngineConfig(model=str(default_model_path), quant="auto"))
    # SmolLM2's GGUF: Q4_1 blocks -> int4, the Q8_0 embedding (tied head) -> int8.
    assert engine.info["quant"] == "int4 x120, int8 x1"
    # The table itself stays int8 (Q8_0's blocks as they are), looked up a row at a time.
    table = engine.model.parts()[0]
    assert isinstance(table, QuantizedEmbedding)
    assert (table.qweight.scheme, table.qweight.group_size) == ("int8", 32)
    # The head is tied to it and came out the same: one copy of the bytes, which the head's
    # native decode kernel reads in place.
    head = engine.model.lm_head.plan.decode
    if isinstance(head, Int8Native):
        assert table.qweight.data.data_ptr() == head.data.data_ptr()
    ids = torch.tensor([0, 17, 49151])
    tensors = GGUFReader(default_model_path).tensors
    expected = repack_reader_tensor(next(t for t in tensors if t.name == "token_embd.weight"))
    assert torch.equal(table(ids), dequantize(expected)[ids])
    # Which kernels run, as `codelm-daemon status` shows it: every layer in both phases.
    for phase in engine.info["kernels"].split("; "):
        name, counts = phase.split(" ", 1)
        assert name in ("decode", "prefill")
        assert sum(int(c.rsplit(" x", 1)[1]) for c in counts.split(", ")) == 121


def test_requantised_weights_come_from_the_disk_cache_on_the_second_load(
    default_model_path, tmp_path, monkeypatch
):
    monkeypatch.setenv("CODELM_HOME", str(tmp_path))
    first = load_engine(EngineConfig(model=str(default_model_path), quant="int8"))
    assert first.info["weight_cache"].startswith("written")
    file = Path(first.info["weight_cache"].split(": ", 1)[1])
    written = file.stat().st_mtime_ns
    second = load_engine(EngineConfig(model=str(default_model_path), quant="int8"))
    # Nothing new to keep: the file is read, not written again (it was rewritten at every load
    # while layers taken as they are went into it too, never to be read back).
    assert file.stat().st_mtime_ns == written
    # The 120 Q4_1 matrices were requantised to int8. The Q8_0 head is repacked as it is
    # where the native kernel takes blocks of 32, else requantised per channel and cached.
    grouped = isinstance(native.library(), ctypes.CDLL)
    cached = 120 if grouped else 121
    assert second.info["weight_cache"].startswith(f"{cached} layers loaded")
    ids = first.tokenizer.encode("def fib(n):\n    if n < 2:\n        return n\n")
    assert torch.equal(_top1(first, ids), _top1(second, ids))


def test_the_weight_cache_serves_a_layer_only_for_the_scheme_it_was_made_for(tmp_path):
    from codelm.daemon.engine.weight_cache import WeightCache
    from codelm.quant import quantize_int8

    weight, _ = quantize_int8(torch.randn(32, 64))
    file = tmp_path / "weights.safetensors"
    cache = WeightCache(file)
    # A mixed-type fused layer is int8 although int4 was asked for: cached under int4.
    cache.put("blk.qkv", weight, asked="int4")
    cache.save()
    reopened = WeightCache(file)
    assert torch.equal(reopened.get("blk.qkv", asked="int4").data, weight.data)
    # After `auto` changes its choice for this layer, the old result is not served.
    assert reopened.get("blk.qkv", asked="int8") is None
    assert reopened.get("blk.other", asked="int4") is None


def test_a_damaged_or_unwritable_weight_cache_only_costs_the_cache(tmp_path, caplog):
    # A cut-off file stopped every load of the model ("incomplete metadata ... a catalogue
    # model may be damaged"), as did a read-only or full cache dir: the cache is optional.
    from codelm.daemon.engine.weight_cache import WeightCache
    from codelm.quant import quantize_int8

    weight, _ = quantize_int8(torch.randn(32, 64))
    file = tmp_path / "weights.safetensors"
    cache = WeightCache(file)
    cache.put("blk.0", weight, asked="int8")
    cache.save()
    file.write_bytes(file.read_bytes()[:100])
    assert WeightCache(file).get("blk.0", asked="int8") is None
    assert "ignoring unreadable weight cache" in caplog.text

    blocked = tmp_path / "not-a-folder"
    blocked.write_bytes(b"")  # the cache's folder cannot be made
    unwritable = WeightCache(blocked / "weights" / "w.safetensors")
    unwritable.put("blk.0", weight, asked="int8")
    unwritable.save()
    assert "could not write the weight cache" in caplog.text
    assert "Not a directory" in unwritable.error  # status says "not written (...)", not written


def test_a_new_weight_cache_removes_the_one_it_supersedes(tmp_path):
    # An upgrade (torch, the cache format) or a changed model file gives a new key: the old
    # file of that model and quantisation is never read again, so writing the new one drops it.
    from codelm.daemon.engine.weight_cache import WeightCache
    from codelm.quant import quantize_int8

    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF")
    folder = tmp_path / "cache" / "weights"
    folder.mkdir(parents=True)
    old = folder / f"model.gguf-int8-{'a' * 24}.safetensors"
    kept = [
        folder / f"model.gguf-int4-{'b' * 24}.safetensors",  # another quantisation
        folder / f"other.gguf-int8-{'c' * 24}.safetensors",  # another model
        folder / "model.gguf-int8-notes.safetensors",  # not a name the cache makes
    ]
    for file in [old, *kept]:
        file.write_bytes(b"x")
    cache = WeightCache.for_model(model, "int8", tmp_path / "cache")
    assert cache.file.parent == folder and cache.file != old
    assert old.exists()  # nothing is removed before the new file is there
    cache.put("blk.0", quantize_int8(torch.randn(32, 64))[0], asked="int8")
    cache.save()
    assert cache.file.exists() and not old.exists()
    assert all(file.exists() for file in kept)
    # A load that finds its file (written by a version that kept old ones) tidies up too.
    old.write_bytes(b"x")
    assert WeightCache.for_model(model, "int8", tmp_path / "cache").get("blk.0", "int8") is not None
    assert not old.exists() and all(file.exists() for file in kept)


@pytest.fixture(scope="module")
def shortlisted(default_model_path):
    """SmolLM2 as `auto` loads it, its Q8_0 head (int8 in blocks of 32) with a shortlist
    (quant.cpu.Int8Shortlist) whether or not this machine timed one faster."""
    engine = load_engine(EngineConfig(model=str(default_model_path), quant="auto"))
    head = engine.model.lm_head.plan.decode
    if not isinstance(head, Int8Native):
        pytest.skip(f"the head decodes on {head.name}")
    shortlist = engine.model.head_shortlist or Int8Shortlist(head)
    shortlist.ms = {"exact": math.inf}  # always its own path, whatever is faster here
    return engine, shortlist


def test_the_head_shortlist_gives_the_heads_two_largest_logits_on_real_states(shortlisted):
    engine, shortlist = shortlisted
    states = []
    hook = engine.model.lm_head.register_forward_pre_hook(lambda m, args: states.append(args[0]))
    text = Path(sysconfig.get_paths()["stdlib"], "json", "decoder.py").read_text()
    with torch.inference_mode():
        engine.model(torch.tensor(engine.tokenizer.encode(text)[:256]), engine.new_kv(), None)
    hook.remove()
    for x in states[0].split(1):
        want, got = engine.model.lm_head(x)[0], shortlist.shortlisted(x)[0]
        assert torch.equal(got.topk(2).indices, want.topk(2).indices)
        assert torch.equal(got.topk(2).values, want.topk(2).values)


@pytest.mark.parametrize(
    ("text", "options"),
    [
        ("def fib(n):\n    if n < 2:\n        return n\n    return", {}),
        # The first picks must spell the healed bytes: those steps read every logit.
        ("import os\n\ndef ls(root):\n    return os.", {"heal": b"listdir(root)"}),
        ("class Point:\n    def __init__(self, x, y):\n        self.", {"ban": (2, None)}),
    ],
)
def test_greedy_picks_are_the_same_with_the_head_shortlist(shortlisted, text, options):
    engine, shortlist = shortlisted
    model, tokenizer = engine.model, engine.tokenizer
    ids = tokenizer.encode(text)
    asked = []

    def runs(shortlist_or_none, ban=None):
        model.head_shortlist = shortlist_or_none
        hook = model.register_forward_pre_hook(
            lambda m, args, kwargs: asked.append(kwargs.get("top_two")), with_kwargs=True
        )
        try:
            extra = {"heal": options["heal"]} if "heal" in options else {}
            rules = StopRules(max_tokens=24)
            kv = engine.new_kv()
            return generate(model, tokenizer, kv, ids, rules, ban=ban, **extra).token_ids
        finally:
            hook.remove()

    saved = model.head_shortlist
    try:
        plain = runs(None)
        ban = (options["ban"][0], plain[options["ban"][0]]) if "ban" in options else None
        if ban:
            plain = runs(None, ban)
        asked.clear()
        assert runs(shortlist, ban) == plain
    finally:
        model.head_shortlist = saved
    # Decode steps ask for the two largest only once no healed bytes are left to spell.
    assert asked[0] is None and len(asked) > 2  # the prompt, then decode steps
    assert asked[1:] == sorted(asked[1:]) and (False in asked) == ("heal" in options)
