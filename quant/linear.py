"""QuantizedLinear: a weight-only quantised nn.Linear whose kernels dispatch.py picks once."""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from codelm.quant import native
from codelm.quant.cpu import five_bit_table
from codelm.quant.dispatch import DispatchConfig, Dispatcher, KernelPlan
from codelm.quant.formats import INT4_GROUP, QuantizedWeight, select_rows
from codelm.quant.reference import dequantize, quantize_int4, quantize_int8

SCHEMES = ("int4", "int8")


class QuantizedLinear(nn.Module):
    """y = x @ w.T + bias for x [..., K] of any float dtype; y has x's dtype and device.

    Built on its device: the packed weights are not parameters or buffers, so `.to()` does
    not move them; quantise on the target device (or `qweight.to(device)`) instead.
    """

    def __init__(
        self,
        plan: KernelPlan,
        shape: tuple[int, int],
        scheme: str,
        bias: torch.Tensor | None,
        name: str = "linear",
    ) -> None:
        super().__init__()
        self.plan = plan
        self.out_features, self.in_features = shape
        self.scheme = scheme
        self.name = name
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"{name}: bias shape {tuple(bias.shape)} != ({self.out_features},)")
        # One copy per activation dtype seen, made at construction: bias is tiny.
        self._bias = (
            {}
            if bias is None
            else {dt: bias.detach().to(dt) for dt in (torch.float32, torch.bfloat16, torch.float16)}
        )

    @classmethod
    def from_float(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        scheme: str = "int4",
        group_size: int = INT4_GROUP,
        dispatcher: Dispatcher | None = None,
        name: str = "linear",
    ) -> QuantizedLinear:
        """Quantise weight [N, K] (int4 asymmetric in groups of group_size, or int8 per channel)."""
        if scheme == "int4":
            qweight, _ = quantize_int4(weight, group_size, name=name)
        elif scheme == "int8":
            qweight, _ = quantize_int8(weight, name=name)
        else:
            raise ValueError(f"{name}: unknown scheme {scheme!r}; expected one of {SCHEMES}")
        return cls.from_format(qweight, bias, dispatcher=dispatcher, name=name)

    @classmethod
    def from_format(
        cls,
        qweight: QuantizedWeight,
        bias: torch.Tensor | None = None,
        *,
        dispatcher: Dispatcher | None = None,
        name: str = "linear",
        prefill_rows: int | None = None,
    ) -> QuantizedLinear:
        """Wrap an already quantised weight (e.g. from repack_gguf or concat_formats);
        `prefill_rows`: see Dispatcher.plan."""
        # Without a dispatcher: a fixed, calibration-free choice (tests, one-off tools).
        dispatcher = dispatcher or Dispatcher(DispatchConfig(calibrate=False))
        plan = dispatcher.plan(qweight, name=name, prefill_rows=prefill_rows)
        return cls(plan, qweight.shape, qweight.scheme, bias, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., K] -> [..., N]
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"{self.name}: input shape {tuple(x.shape)} does not end in K={self.in_features}"
            )
        x2 = x.reshape(-1, self.in_features)
        kernel = self.plan.decode if x2.shape[0] <= self.plan.decode_max_rows else self.plan.prefill
        y = kernel(x2).to(x.dtype)  # a new tensor: kernels keep no output buffers
        if self._bias:
            y.add_(self._bias.get(x.dtype, self._bias[torch.float32]).to(x.device, x.dtype))
        return y.reshape(*x.shape[:-1], self.out_features)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor | None:
        """silu(gate) * up [..., N / 2] of this layer's output, where it is a fused gate / up
        projection (gate rows first), computed inside the prefill kernel where it has such an
        epilogue (Int8Tiles) and x takes it (float32 prompt rows, no bias). None otherwise: the
        caller applies the activation to forward(x)."""
        fused = getattr(self.plan.prefill, "silu_and_mul", None)
        x2 = x.reshape(-1, x.shape[-1])
        if (
            fused is None
            or self._bias
            or x.dtype != torch.float32
            or x.shape[-1] != self.in_features
            or x2.shape[0] <= self.plan.decode_max_rows
        ):
            return None
        y = fused(x2)
        return None if y is None else y.reshape(*x.shape[:-1], self.out_features // 2)

    def native_decode(self) -> native.Linear | None:
        """This layer's decode kernel and bias as kernels_x86.c's fused decode step takes
        them, or None when the decode kernel is not one of codelm's native ones."""
        describe = getattr(self.plan.decode, "descriptor", None)
        return describe(self._bias.get(torch.float32)) if describe else None

    @property
    def nbytes(self) -> int:
        return self.plan.nbytes

    def extra_repr(self) -> str:
        return (
            f"{self.name}: in={self.in_features}, out={self.out_features}, {self.scheme}, "
            f"decode={self.plan.decode.name}, prefill={self.plan.prefill.name}, "
            f"bias={bool(self._bias)}"
        )


class QuantizedEmbedding(nn.Module):
    """An embedding table kept quantised: a lookup dequantises only the rows it takes
    (quant/reference.py), so int8 holds ~1.06 bytes a value where bf16 holds 2. `compact`:
    where its int8 values fit in 5 bits (a GGUF Q5_0 table), hold it as int5_native holds
    weights, 0.69 bytes a value (cpu.five_bit_table; the same numbers). Returns float32
    [..., K] for token ids [...]."""

    def __init__(self, qweight: QuantizedWeight, *, compact: bool = False) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.scheme, self.group_size = qweight.scheme, qweight.group_size
        self.five_bits = five_bit_table(qweight) if compact else None
        self.qweight = qweight if self.five_bits is None else None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        if self.five_bits is not None:
            rows = self.five_bits.rows(flat)
        else:
            rows = dequantize(select_rows(self.qweight, flat))
        return rows.reshape(*ids.shape, self.embedding_dim)

    @property
    def nbytes(self) -> int:
        return self.five_bits.nbytes if self.five_bits is not None else self.qweight.nbytes

    def extra_repr(self) -> str:
        held = " in 5 bits" if self.five_bits is not None else ""
        size = f"{self.num_embeddings}, {self.embedding_dim}"
        return f"{size}, {self.scheme} g{self.group_size}{held}"


def quantize_model(
    model: nn.Module,
    *,
    scheme: str = "int4",
    group_size: int = 32,
    dispatcher: Dispatcher | None = None,
    skip: tuple[str, ...] = (),
) -> nn.Module:
    """Replace every nn.Linear in model (in place) by a QuantizedLinear; returns model.

    Linear layers whose qualified name is in `skip` are left alone (e.g. ("lm_head",)).
    """
    dispatcher = dispatcher or Dispatcher(DispatchConfig(calibrate=False))
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if not isinstance(child, nn.Linear) or full in skip:
                continue
            layer = QuantizedLinear.from_float(
                child.weight,
                child.bias,
                scheme=scheme,
                group_size=group_size,
                dispatcher=dispatcher,
                name=full,
            )
            setattr(parent, child_name, layer)
    return model


def kernel_summary(model: nn.Module) -> str:
    """The kernels model's quantised layers run, e.g. "decode int8_native x97; prefill
    dense_fp16 x97" ("" without quantised layers): what `codelm-daemon status` shows."""
    counts: dict[str, Counter[str]] = {"decode": Counter(), "prefill": Counter()}
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            counts["decode"][module.plan.decode.name] += 1
            counts["prefill"][module.plan.prefill.name] += 1
    return "; ".join(
        f"{phase} " + ", ".join(f"{name} x{n}" for name, n in sorted(by_name.items()))
        for phase, by_name in counts.items()
        if by_name
    )
