"""Weight-only quantised formats: the canonical, device-independent layouts every kernel packs from.

Conventions (docs/quant.md): int8 is symmetric, w = data * scale; int4 is asymmetric,
w = (q - 8) * scale + zero, as torch's int4 "tinygemm" kernels dequantise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeAlias

import torch

# Layout tags: stored with any serialised weight so a reader can refuse a layout it does not know.
LAYOUT_INT8_NK = "int8_nk"
# byte j of row n holds k=2j in the high nibble and k=2j+1 in the low nibble: the input of
# torch's CUDA _convert_weight_to_int4pack (torch >= 2.5) and torchao's pack_uint4.
LAYOUT_INT4_NK_HI_FIRST = "u4x2_nk_hi_first"

INT4_GROUP_SIZES = (32, 64, 128, 256)
# The int4 group where none is asked for: GGUF Q4_0 / Q4_1's blocks, which the native kernels
# and every group size above take.
INT4_GROUP = 32


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class Int8Weight:
    """Symmetric int8: w[n, k] = data[n, k] * scales[n, k // group_size].

    data int8 [N, K]; scales float32 [N, K // group_size]. group_size == K is per output
    channel (scales [N, 1]); GGUF Q8_0 repacks to group_size 32.
    """

    data: torch.Tensor
    scales: torch.Tensor
    group_size: int
    layout: str = LAYOUT_INT8_NK

    def __post_init__(self) -> None:
        if self.layout != LAYOUT_INT8_NK:
            raise ValueError(f"Int8Weight: unknown layout {self.layout!r}")
        if self.data.dtype != torch.int8 or self.data.dim() != 2:
            raise ValueError(
                f"Int8Weight: data must be int8 [N, K], got {self.data.dtype} "
                f"{tuple(self.data.shape)}"
            )
        n, k = self.data.shape
        _check_groups("Int8Weight", k, self.group_size)
        _check_param("Int8Weight", "scales", self.scales, (n, k // self.group_size))

    @property
    def scheme(self) -> str:
        return "int8"

    @property
    def shape(self) -> tuple[int, int]:
        return (self.data.shape[0], self.data.shape[1])

    @property
    def is_per_channel(self) -> bool:
        return self.group_size == self.data.shape[1]

    @property
    def nbytes(self) -> int:
        return _nbytes(self.data, self.scales)

    def to(self, device: torch.device | str) -> Int8Weight:
        return dataclasses.replace(self, data=self.data.to(device), scales=self.scales.to(device))


# GGUF K-quants as they are: an int8 scale per SUB_GROUP inputs (Q6_K's; 1 for Q4_K, Q5_K).
SUB_GROUP = 16


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class SubScaledInt8Weight(Int8Weight):
    """An Int8Weight requantised from a source whose own values are small integers with an
    int8 scale per 16 inputs and a float one per group (GGUF Q6_K: 6 bits, groups of 256) and
    maybe a zero per 32 (Q5_K: 5 bits unsigned, groups of 32), holding those too:
    w[n, k] = sub_data[n, k] * sub_scales[n, k // 16] * super_scales[n, k // super_group]
    (+ zeros[n, k // 32]), exactly as the source has them. data / scales are the same weights
    rounded to int8 blocks, which every int8 kernel takes; a kernel that knows the rest
    (cpu.SubScaledTiles) multiplies the source's values as they are.

    sub_data int8 [N, K] in -32 .. 31; sub_scales int8 [N, K / 16]; super_scales float32
    [N, K / super_group] (super_group a multiple of 32); zeros float32 [N, K / 32] or None.
    """

    sub_data: torch.Tensor
    sub_scales: torch.Tensor
    super_scales: torch.Tensor
    zeros: torch.Tensor | None = None

    def __post_init__(self) -> None:
        Int8Weight.__post_init__(self)
        n, k = self.shape
        width = self.super_scales.shape[-1] if self.super_scales.dim() == 2 else 0
        if not width or k % width or (k // width) % 32:
            raise ValueError(
                f"SubScaledInt8Weight: super_scales [N, {width}] do not take K={k} in groups "
                "of a multiple of 32"
            )
        fields = [
            ("sub_data", torch.int8, k),
            ("sub_scales", torch.int8, k // SUB_GROUP),
            ("super_scales", torch.float32, width),
        ]
        if self.zeros is not None:
            fields.append(("zeros", torch.float32, k // 32))
        for field, dtype, columns in fields:
            t = getattr(self, field)
            if t.dtype != dtype or tuple(t.shape) != (n, columns):
                raise ValueError(
                    f"SubScaledInt8Weight: {field} must be {dtype} {[n, columns]}, "
                    f"got {t.dtype} {tuple(t.shape)}"
                )

    @property
    def super_group(self) -> int:
        return self.shape[1] // self.super_scales.shape[1]

    @property
    def nbytes(self) -> int:
        return _nbytes(*(getattr(self, f) for f in _fields(self)))

    def to(self, device: torch.device | str) -> Int8Weight:
        """On the CPU, all of it; elsewhere the int8 blocks alone (no kernel there takes the
        sub-scales, and they would double the weight's memory)."""
        if torch.device(device).type != "cpu":
            return self.plain().to(device)
        return dataclasses.replace(self, **{f: getattr(self, f).to(device) for f in _fields(self)})

    def exact(self) -> torch.Tensor:
        """The source's values as float32 [N, K] (sub_scaled_values)."""
        return sub_scaled_values(self.sub_data, self.sub_scales, self.super_scales, self.zeros)

    def plain(self) -> Int8Weight:
        """The int8 blocks alone."""
        return Int8Weight(data=self.data, scales=self.scales, group_size=self.group_size)


def sub_scaled_values(
    sub_data: torch.Tensor,
    sub_scales: torch.Tensor,
    super_scales: torch.Tensor,
    zeros: torch.Tensor | None = None,
) -> torch.Tensor:
    """SubScaledInt8Weight's values from its parts (rows of them), as float32 [N, K]: q * sc
    (exact), times the group's scale, plus the zero (one rounding, as ggml's `d q - m`)."""
    n, k = sub_data.shape
    w = sub_data.float().view(n, k // SUB_GROUP, SUB_GROUP)
    w = (w * sub_scales.float()[..., None]).view(n, super_scales.shape[1], -1)
    w = (w * super_scales[..., None]).view(n, k // 32, 32)
    if zeros is not None:
        w = w + zeros[..., None]
    return w.reshape(n, k)


def is_grouped_int8(qw: QuantizedWeight) -> bool:
    """int8 scaled per group of inputs (GGUF Q8_0's 32), not once per output channel."""
    return isinstance(qw, Int8Weight) and not qw.is_per_channel


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class Int4Weight:
    """Asymmetric group-wise int4: w[n, k] = (q[n, k] - 8) * scales[n, g] + zeros[n, g],
    g = k // group_size.

    data uint8 [N, K // 2], two q values (0..15) per byte, layout LAYOUT_INT4_NK_HI_FIRST;
    scales and zeros float32 [N, K // group_size].
    """

    data: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group_size: int
    layout: str = LAYOUT_INT4_NK_HI_FIRST

    def __post_init__(self) -> None:
        if self.layout != LAYOUT_INT4_NK_HI_FIRST:
            raise ValueError(f"Int4Weight: unknown layout {self.layout!r}")
        if self.data.dtype != torch.uint8 or self.data.dim() != 2:
            raise ValueError(
                f"Int4Weight: data must be uint8 [N, K // 2], got {self.data.dtype} "
                f"{tuple(self.data.shape)}"
            )
        if self.group_size not in INT4_GROUP_SIZES:
            raise ValueError(
                f"Int4Weight: group_size must be one of {INT4_GROUP_SIZES}, got {self.group_size}"
            )
        n, k = self.shape
        _check_groups("Int4Weight", k, self.group_size)
        groups = (n, k // self.group_size)
        _check_param("Int4Weight", "scales", self.scales, groups)
        _check_param("Int4Weight", "zeros", self.zeros, groups)

    @property
    def scheme(self) -> str:
        return "int4"

    @property
    def shape(self) -> tuple[int, int]:
        return (self.data.shape[0], self.data.shape[1] * 2)

    @property
    def nbytes(self) -> int:
        return _nbytes(self.data, self.scales, self.zeros)

    def to(self, device: torch.device | str) -> Int4Weight:
        return dataclasses.replace(
            self,
            data=self.data.to(device),
            scales=self.scales.to(device),
            zeros=self.zeros.to(device),
        )


QuantizedWeight: TypeAlias = Int8Weight | Int4Weight


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q: integer [N, K] with values 0..15 -> uint8 [N, K // 2] in LAYOUT_INT4_NK_HI_FIRST."""
    if q.dim() != 2 or q.shape[1] % 2:
        raise ValueError(f"pack_int4: q must be [N, K] with K even, got {tuple(q.shape)}")
    q = q.to(torch.uint8)
    return (q[:, 0::2] << 4) | q[:, 1::2]


def unpack_int4(data: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K // 2] in LAYOUT_INT4_NK_HI_FIRST -> uint8 [N, K] with values 0..15."""
    n = data.shape[0]
    return torch.stack([data >> 4, data & 0x0F], dim=-1).reshape(n, -1)


def concat_formats(qweights: Sequence[QuantizedWeight]) -> QuantizedWeight:
    """Concatenate same-scheme weights along N (output rows), e.g. q/k/v or gate/up fusion."""
    if not qweights:
        raise ValueError("concat_formats: need at least one weight")
    if len({type(qw) for qw in qweights}) > 1:  # sub-scaled beside plain int8: int8 for all
        qweights = [qw.plain() if isinstance(qw, SubScaledInt8Weight) else qw for qw in qweights]
    elif isinstance(qweights[0], SubScaledInt8Weight):
        qweights = _alike(qweights)
    first = qweights[0]
    for i, qw in enumerate(qweights[1:], start=1):
        if type(qw) is not type(first) or qw.group_size != first.group_size:
            raise ValueError(
                f"concat_formats: weight {i} is {qw.scheme} group {qw.group_size}, "
                f"weight 0 is {first.scheme} group {first.group_size}"
            )
        if qw.shape[1] != first.shape[1]:
            raise ValueError(
                f"concat_formats: weight {i} has shape {qw.shape}, expected K={first.shape[1]} "
                f"like weight 0 {first.shape}"
            )
    return _map_tensors(qweights, lambda ts: torch.cat(ts, dim=0))


def _alike(parts: Sequence[SubScaledInt8Weight]) -> list[SubScaledInt8Weight]:
    """Sub-scaled weights with the same fields (a Q5_K q / k beside a Q6_K v): the finest
    group's float scales for all, repeated where coarser, and zeros (0 where none): the same
    values."""
    group = min(qw.super_group for qw in parts)
    zeros = any(qw.zeros is not None for qw in parts)
    out = []
    for qw in parts:
        n, k = qw.shape
        out.append(
            dataclasses.replace(
                qw,
                super_scales=qw.super_scales.repeat_interleave(qw.super_group // group, dim=1),
                zeros=qw.zeros if qw.zeros is not None or not zeros else torch.zeros(n, k // 32),
            )
        )
    return out


def stack_rows(parts: Iterable[QuantizedWeight], n_rows: int) -> QuantizedWeight:
    """Consecutive row blocks of one weight, in order, written into one weight of n_rows as
    they come: unlike concat_formats, the parts are never all held beside the result."""
    out, row = None, 0
    for part in parts:
        if out is None:
            if part.shape[0] == n_rows:
                return part
            out = _map_tensors([part], lambda ts: ts[0].new_empty((n_rows, *ts[0].shape[1:])))
        for field in _fields(out):
            getattr(out, field)[row : row + part.shape[0]].copy_(getattr(part, field))
        row += part.shape[0]
    if out is None or row != n_rows:
        raise ValueError(f"stack_rows: the parts hold {row} rows, not {n_rows}")
    return out


def select_rows(qw: QuantizedWeight, index: torch.Tensor) -> QuantizedWeight:
    """Rows (output channels) of qw in `index` order, e.g. to undo GGUF's q/k RoPE permutation."""
    return _map_tensors([qw], lambda ts: ts[0].index_select(0, index.to(ts[0].device)))


def to_tensors(
    qw: QuantizedWeight, prefix: str = ""
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """qw as named tensors plus string metadata (scheme, layout, group size): safetensors-ready."""
    fields = _fields(qw)
    tensors = {prefix + f: getattr(qw, f).contiguous() for f in fields}
    meta = {prefix + "scheme": qw.scheme, prefix + "layout": qw.layout}
    meta[prefix + "group_size"] = str(qw.group_size)
    return tensors, meta


def from_tensors(
    tensors: dict[str, torch.Tensor], meta: dict[str, str], prefix: str = ""
) -> QuantizedWeight:
    """Inverse of to_tensors; an unknown scheme or layout raises ValueError."""
    scheme, layout = meta.get(prefix + "scheme"), meta.get(prefix + "layout", "")
    common = {"data": tensors[prefix + "data"], "scales": tensors[prefix + "scales"]}
    group_size = int(meta[prefix + "group_size"])
    if scheme == "int8" and prefix + "sub_data" in tensors:
        sub = {f: tensors[prefix + f] for f in _SUB_FIELDS if prefix + f in tensors}
        return SubScaledInt8Weight(**common, **sub, group_size=group_size, layout=layout)
    if scheme == "int8":
        return Int8Weight(**common, group_size=group_size, layout=layout)
    if scheme == "int4":
        zeros = tensors[prefix + "zeros"]
        return Int4Weight(**common, zeros=zeros, group_size=group_size, layout=layout)
    raise ValueError(f"{prefix}: unknown quantisation scheme {scheme!r}")


def _map_tensors(qweights: Sequence[QuantizedWeight], fn) -> QuantizedWeight:
    first = qweights[0]
    new = {f: fn([getattr(qw, f) for qw in qweights]).contiguous() for f in _fields(first)}
    return dataclasses.replace(first, **new)


_SUB_FIELDS = ("sub_data", "sub_scales", "super_scales", "zeros")


def _fields(qw: QuantizedWeight) -> tuple[str, ...]:
    """The tensors of qw, each [N, ...]: what concatenating or selecting rows acts on."""
    if isinstance(qw, SubScaledInt8Weight):
        return ("data", "scales", *(f for f in _SUB_FIELDS if getattr(qw, f) is not None))
    return ("data", "scales") if isinstance(qw, Int8Weight) else ("data", "scales", "zeros")


def _check_groups(cls: str, k: int, group_size: int) -> None:
    if group_size <= 0 or k % group_size:
        raise ValueError(f"{cls}: group_size {group_size} must divide K={k}")


def _check_param(cls: str, field: str, t: torch.Tensor, shape: tuple[int, int]) -> None:
    if t.dtype != torch.float32 or tuple(t.shape) != shape:
        raise ValueError(
            f"{cls}: {field} must be float32 {list(shape)}, got {t.dtype} {tuple(t.shape)}"
        )


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
