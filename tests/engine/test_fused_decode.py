"""The fused native decode step (fused_decode.py) against the module path it replaces."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_helpers import new_kv, randomise_norms

from codelm.daemon.engine import fused_decode, loader
from codelm.daemon.engine.loader import LinearFactory, fill_model
from codelm.daemon.engine.models import llama
from codelm.daemon.engine.weights import read_hf_folder
from codelm.quant import Dispatcher, Int8Weight, dispatch, native
from codelm.quant.linear import kernel_summary

transformers = pytest.importorskip("transformers")
_LIB = native.library()
needs_native = pytest.mark.skipif(isinstance(_LIB, str), reason=f"no native kernel: {_LIB}")
CPU = torch.device("cpu")


@pytest.fixture
def native_decode(monkeypatch):
    """Decode (and prefill) on the native kernels wherever they serve, whatever this machine's
    calibration of these tiny shapes says: the fused step needs them, these tests check its
    numbers, and a prefill kernel chosen by timing would change the state they start from."""
    pick = Dispatcher._pick

    def native_first(self, ranking, specs, phase, qw, **kwargs):
        native = [n for n in ("int8_native", "int4_native") if n in specs]
        return native[0] if native else pick(self, ranking, specs, phase, qw, **kwargs)

    monkeypatch.setattr(Dispatcher, "_pick", native_first)


def _in_five_bits(monkeypatch) -> None:
    """int8 weights rounded into -16 .. 15 (GGUF Q5_0's values), run by int5_native."""
    quantize = loader._quantize

    def five_bit(*args, **kwargs):
        qw = quantize(*args, **kwargs)
        if qw.scheme != "int8":
            return qw
        data = torch.clamp(torch.round(qw.data.float() / 8), -16, 15).to(torch.int8)
        return Int8Weight(data=data, scales=qw.scales * 8, group_size=qw.group_size)

    def five_wherever(decode, prefill, times, tie):
        return {"decode": "int5_native", "prefill": "int5_native"}

    monkeypatch.setattr(loader, "_quantize", five_bit)
    monkeypatch.setattr(dispatch, "_in_five_bits", five_wherever)


def _tiny(
    tmp_path: Path, arch: str, quant: str, heads: tuple[int, int, int] = (4, 2, 32)
) -> llama.Model:
    """A random 3-block model of `arch` saved by transformers and loaded as `quant`, with
    `heads` = (query heads, KV heads, head size)."""
    n_heads, n_kv_heads, head_dim = heads
    shapes = dict(
        vocab_size=320,
        hidden_size=n_heads * head_dim,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    if arch == "qwen2":  # q/k/v biases
        ref = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**shapes))
        for layer in ref.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    else:
        ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shapes))
    # Norm weights other than ones: they must be applied, and with ones the int8 rounding of
    # the bf16 embedding's ratios sits on exact ties that either path may break.
    randomise_norms(ref)
    ref.save_pretrained(tmp_path)
    weights = read_hf_folder(tmp_path)
    model = llama.Model(llama.ModelArgs.from_hf_config(weights.meta))
    linears = LinearFactory(quant, torch.float32, CPU)
    fill_model(model, weights, llama.FUSED, linears, torch.float32, CPU, lambda f: None)
    return model.eval()


@needs_native
@pytest.mark.parametrize(
    ("arch", "quant", "heads"),
    [
        ("llama", "int4", (4, 2, 32)),
        ("llama", "int8", (4, 2, 32)),
        ("qwen2", "int4", (4, 2, 32)),
        ("qwen2", "int8", (4, 2, 32)),
        # 7 query heads a KV head (the default model's grouping): the step's attention takes
        # them in passes of 4 and 3, and in two work items where there are 2+ threads.
        ("qwen2", "int8", (7, 1, 64)),
        ("llama", "int8", (8, 2, 40)),  # a head size that is not a multiple of 16
        ("qwen2", "int5", (7, 1, 64)),  # int8 in 5 bits (GGUF Q5_0's values)
    ],
)
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
def test_fused_decode_step_matches_module_path(
    tmp_path, monkeypatch, native_decode, arch, quant, heads, cache_dtype
):
    if quant == "int5":
        _in_five_bits(monkeypatch)
    model = _tiny(tmp_path, arch, "int8" if quant == "int5" else quant, heads)
    if quant == "int5":
        assert kernel_summary(model) == "decode int5_native x13; prefill int5_native x13"
    assert fused_decode.attach(model, CPU, torch.float32) == "fused native"
    fused = model.decode_step
    tokens = torch.randint(0, 320, (40,), generator=torch.Generator().manual_seed(1))
    kv_fused, kv_module = new_kv(model.args, cache_dtype), new_kv(model.args, cache_dtype)
    with torch.inference_mode():
        for kv in (kv_fused, kv_module):
            model(tokens[:30], kv)  # prefill: the module path for both
        for i in range(30, 40):  # each step attends over keys both paths wrote
            model.decode_step = fused
            got = model(tokens[i : i + 1], kv_fused)
            model.decode_step = None
            expected = model(tokens[i : i + 1], kv_module)
            # Same kernels and formulas, other summation orders: an activation rounded to the
            # other int8 step in a kernel moves a logit by ~1e-3 at these sizes, and a few
            # such steps over 3 blocks by up to 1e-2 (llama int8, head size 40: each path
            # ~2.2e-2 from the fp32 model's logits). A wrong formula moves them by far more.
            torch.testing.assert_close(got, expected, atol=2e-2, rtol=1e-3)
    assert kv_fused.length == kv_module.length == 40
    # Most rows agree to ~1e-7; one activation on the other int8 step moves a key or value by
    # up to ~6e-3 (measured on an AVX-512 machine, qwen2 int8).
    for fused_rows, module_rows in ((kv_fused.k, kv_module.k), (kv_fused.v, kv_module.v)):
        assert fused_rows.dtype == cache_dtype
        torch.testing.assert_close(
            fused_rows[:, :, :40].float(), module_rows[:, :, :40].float(), atol=1e-2, rtol=0
        )


def test_fused_decode_says_why_not_when_a_layer_is_float(tmp_path):
    model = _tiny(tmp_path, "llama", "fp32")
    how = fused_decode.attach(model, CPU, torch.float32)
    assert how == "module by module (block 0 qkv_proj decodes on Linear)"
    assert model.decode_step is None
    how = fused_decode.attach(model, CPU, torch.bfloat16)
    assert (
        how == "module by module (the fused step runs float32 on the CPU, this is torch.bfloat16)"
    )


def test_cuda_takes_a_graphed_step_unless_switched_off(tmp_path):
    """Building the step touches no GPU (capture waits for the first step): checked here; the
    step itself is checked on a GPU (test_devices.py) and, eagerly, on every architecture
    (test_architectures.py)."""
    model = _tiny(tmp_path, "llama", "fp32")
    assert fused_decode.attach(model, torch.device("cuda"), torch.bfloat16) == "CUDA graph"
    assert isinstance(model.decode_step, fused_decode.GraphedDecode)
    how = fused_decode.attach(model, torch.device("cuda"), torch.bfloat16, cuda_graphs=False)
    assert how == "module by module (cuda_graphs is off)" and model.decode_step is None


class _FakeCuda:
    """torch.cuda's stream and graph API as far as GraphedDecode uses it, on the CPU: capture
    runs the body eagerly (as the real capture records it), and a replay runs the captured
    step again from the graph's static tensors, so the bookkeeping around the graphs (inputs
    copied in, outputs copied out, one graph per cache layout, the least recently used
    dropped) is checked without a GPU."""

    def __init__(self, step: fused_decode.GraphedDecode, caches: list) -> None:
        self.step, self.caches = step, caches

    def install(self, monkeypatch) -> None:
        import contextlib

        fake = self

        class Stream:
            def __init__(self, *args, **kwargs) -> None:
                pass

            def wait_stream(self, other) -> None:
                pass

        class Graph:
            def pool(self):
                return ("pool", id(fake))

            def replay(self) -> None:
                key, graph = next((k, g) for k, g in fake.step._graphs.items() if g.graph is self)
                kv = next(kv for kv in fake.caches if kv.k.data_ptr() == key[0])
                out = fused_decode.decode_blocks(
                    fake.step._blocks, kv, graph.x, graph.cos, graph.sin, graph.position
                )
                graph.out.copy_(out)

        monkeypatch.setattr(torch.cuda, "Stream", Stream)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
        monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
        monkeypatch.setattr(
            torch.cuda, "graph", lambda graph, pool=None, **kwargs: contextlib.nullcontext()
        )


def test_graphed_step_bookkeeping_with_a_fake_cuda(tmp_path, monkeypatch):
    model = _tiny(tmp_path, "qwen2", "fp32")
    step = fused_decode.GraphedDecode(model, max_graphs=2)
    monkeypatch.setattr(step, "accepts", lambda kv: True)  # CPU caches stand in for CUDA ones
    caches = [new_kv(model.args) for _ in range(3)]
    _FakeCuda(step, caches).install(monkeypatch)
    tokens = torch.randint(0, 320, (24,), generator=torch.Generator().manual_seed(3))
    order = [0, 1, 0, 2, 1, 0, 0, 2]  # 2 evicts 1, then 1 evicts 0, 0 evicts 2...

    def run(decode_step) -> list[torch.Tensor]:
        model.decode_step = decode_step
        kvs = [new_kv(model.args) for _ in range(3)] if decode_step is None else caches
        logits = []
        with torch.inference_mode():
            for j, kv in enumerate(kvs):
                model(tokens[: 4 + j], kv)
            for j in order:
                at = kvs[j].length
                logits.append(model(tokens[at : at + 1], kvs[j]))
        return logits

    expected = run(None)
    got = run(step)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)
    # Captured at each cache's first step and again after its eviction: 0, 1, 2 (drops 1),
    # 1 (drops 0), 0 (drops 2), 2 (drops 1); replays for the rest.
    assert step.captures == 6 and step.failed is None
    assert len(step._graphs) == 2
