from __future__ import annotations

import pytest
import torch
from quant_helpers import bf16_bound, int4_bf16_bound, int8_blocks_bound, weight
from torch import nn

from codelm.quant import (
    DispatchConfig,
    Dispatcher,
    KernelPlan,
    QuantizedEmbedding,
    QuantizedLinear,
    concat_formats,
    dequantize,
    kernel_summary,
    matmul,
    quantize_int4,
    quantize_int8,
    quantize_model,
)
from codelm.quant.cpu import CPU_KERNELS


def _bound(x: torch.Tensor, qw) -> torch.Tensor:
    return int4_bf16_bound(x, qw) if qw.scheme == "int4" else bf16_bound(x, dequantize(qw))


@pytest.mark.parametrize("scheme", ["int4", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_linear_matches_reference_and_keeps_dtype(gen, scheme, dtype):
    w, bias = weight(gen, 64, 128), torch.randn(64, generator=gen)
    layer = QuantizedLinear.from_float(w, bias, scheme=scheme, group_size=32)
    qw = quantize_int4(w, 32)[0] if scheme == "int4" else quantize_int8(w)[0]
    x = torch.randn(2, 5, 128, generator=gen).to(dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (2, 5, 64)
    expected = matmul(x, qw) + bias
    # bf16 in: the answer itself is rounded to bf16 once more (2^-8 relative).
    slack = expected.abs() * 2.0**-8 if dtype == torch.bfloat16 else 0.0
    assert ((y.float() - expected).abs() <= _bound(x, qw) + slack).all()


@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_quantized_embedding_looks_up_the_dequantised_rows(gen, scheme):
    table = weight(gen, 50, 64)
    qw = quantize_int4(table, 32)[0] if scheme == "int4" else quantize_int8(table, 32)[0]
    embedding = QuantizedEmbedding(qw)
    ids = torch.tensor([[3, 7, 3], [49, 0, 12]])
    rows = embedding(ids)
    assert rows.shape == (2, 3, 64) and rows.dtype == torch.float32
    assert torch.equal(rows, dequantize(qw)[ids])
    assert embedding.nbytes == qw.nbytes < table.numel() * 2  # under a bf16 table


def test_quantized_linear_routes_rows_to_decode_or_prefill_kernel():
    calls: list[str] = []

    class Fake:
        nbytes = 0

        def __init__(self, name: str) -> None:
            self.name = name

        def __call__(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(self.name)
            return torch.zeros(x.shape[0], 8)

    plan = KernelPlan(decode=Fake("decode"), prefill=Fake("prefill"), decode_max_rows=4)
    layer = QuantizedLinear(plan, (8, 16), "int4", None)
    layer(torch.zeros(1, 16))
    layer(torch.zeros(2, 2, 16))
    layer(torch.zeros(5, 16))
    assert calls == ["decode", "decode", "prefill"]


def test_quantized_linear_fuses_swiglu_only_for_float32_prompt_rows_without_bias():
    calls: list[str] = []

    class Fused:
        name, nbytes = "fused", 0

        def __call__(self, x: torch.Tensor) -> torch.Tensor:
            return torch.zeros(x.shape[0], 8)

        def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
            calls.append("epilogue")
            return torch.ones(x.shape[0], 4)

    plan = KernelPlan(decode=Fused(), prefill=Fused(), decode_max_rows=4)
    layer = QuantizedLinear(plan, (8, 16), "int8", None)
    assert layer.silu_and_mul(torch.zeros(2, 3, 16)).shape == (2, 3, 4)  # 6 rows: prefill
    assert layer.silu_and_mul(torch.zeros(1, 4, 16)) is None  # decode rows
    assert layer.silu_and_mul(torch.zeros(1, 9, 16, dtype=torch.bfloat16)) is None
    with_bias = QuantizedLinear(plan, (8, 16), "int8", torch.zeros(8))
    assert with_bias.silu_and_mul(torch.zeros(1, 9, 16)) is None
    assert calls == ["epilogue"]


def test_quantized_linear_rejects_wrong_input_shape_naming_layer(gen):
    layer = QuantizedLinear.from_float(weight(gen, 32, 64), name="layers.3.mlp.down_proj")
    with pytest.raises(ValueError, match=r"layers.3.mlp.down_proj: input shape \(2, 63\)"):
        layer(torch.zeros(2, 63))


def test_quantized_linear_rejects_bias_of_wrong_shape(gen):
    with pytest.raises(ValueError, match=r"q_proj: bias shape \(31,\) != \(32,\)"):
        QuantizedLinear.from_float(weight(gen, 32, 64), torch.zeros(31), name="q_proj")


def test_quantized_linear_rejects_unknown_scheme(gen):
    with pytest.raises(ValueError, match="unknown scheme 'int3'"):
        QuantizedLinear.from_float(weight(gen, 32, 64), scheme="int3")


def test_quantized_linear_rejects_group_not_dividing_k_naming_layer(gen):
    with pytest.raises(
        ValueError, match=r"o_proj: group_size 128 must divide K of shape \(32, 96\)"
    ):
        QuantizedLinear.from_float(weight(gen, 32, 96), group_size=128, name="o_proj")


@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_quantized_linear_concat_equals_separate_layers(gen, scheme):
    quantize = quantize_int4 if scheme == "int4" else quantize_int8
    parts = [quantize(weight(gen, n, 128))[0] for n in (64, 32, 32)]  # q, k, v
    fused = QuantizedLinear.from_format(concat_formats(parts))
    x = torch.randn(3, 128, generator=gen)
    separate = torch.cat([QuantizedLinear.from_format(p)(x) for p in parts], dim=-1)
    assert torch.equal(fused(x), separate)


def test_quantized_linear_keeps_group_wise_int8_only_where_a_kernel_takes_it(gen):
    grouped, _ = quantize_int8(weight(gen, 32, 128), group_size=32)
    dispatcher = Dispatcher(DispatchConfig(calibrate=False))
    layer = QuantizedLinear.from_format(grouped, dispatcher=dispatcher)
    x = torch.randn(1, 128, generator=gen)
    w = dequantize(grouped)
    if dispatcher.int8_group_size(x.device, 128) == 32:
        # The native kernel takes GGUF Q8_0's groups as they are.
        assert layer.plan.decode.name == "int8_native"
        bound = int8_blocks_bound(x, w)
    else:
        # Requantising per channel adds at most half a per-channel step per weight.
        step = w.abs().amax(dim=1) / 127
        bound = bf16_bound(x, w) + (x.abs().sum() * step / 2)
    assert ((layer(x) - matmul(x, grouped)).abs() <= bound).all()


def test_kernel_summary_counts_each_phase_kernel(gen):
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 64))
    assert kernel_summary(model) == ""
    quantize_model(model, scheme="int8")
    decode, prefill = model[0].plan.decode.name, model[0].plan.prefill.name
    assert kernel_summary(model) == f"decode {decode} x2; prefill {prefill} x2"


def test_quantize_model_swaps_linears_except_skipped(gen):
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    quantize_model(model, scheme="int8", skip=("2",))
    assert isinstance(model[0], QuantizedLinear) and isinstance(model[2], nn.Linear)
    assert model(torch.randn(2, 64, generator=gen)).shape == (2, 16)


def test_dispatcher_gives_dense_copies_only_while_budget_lasts(gen):
    w = weight(gen, 32, 64)
    # The heuristic's prefill copy (int8 tiles, or dense bf16, fp16 or fp32 by CPU and torch
    # build): budget exactly one.
    probe = Dispatcher(DispatchConfig(calibrate=False, dense_budget_bytes=1 << 30))
    copy = QuantizedLinear.from_float(w, dispatcher=probe).plan.prefill.name
    budget = probe.dense_bytes_used
    assert budget == CPU_KERNELS[copy].dense_bytes_per_weight * 32 * 64 > 0
    dispatcher = Dispatcher(DispatchConfig(calibrate=False, dense_budget_bytes=budget))
    layers = [QuantizedLinear.from_float(w, dispatcher=dispatcher) for _ in range(2)]
    assert layers[0].plan.prefill.name == copy
    assert not CPU_KERNELS[layers[1].plan.prefill.name].dense_bytes_per_weight
    assert dispatcher.dense_bytes_used == budget
