"""Plain-torch quantise / dequantise / matmul: the oracle every fast path is tested against.

All arithmetic is float32 on the weight's device; nothing here is tuned for speed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from codelm.quant.formats import (
    INT4_GROUP,
    Int4Weight,
    Int8Weight,
    QuantizedWeight,
    pack_int4,
    stack_rows,
    unpack_int4,
)


def quantize_int8(
    w: torch.Tensor, group_size: int | None = None, *, name: str = "weight"
) -> tuple[Int8Weight, float]:
    """Symmetric absmax int8 of w [N, K]; per output channel unless group_size is given.

    Returns the weight and the max abs reconstruction error (float32 units of w).
    """
    w = _as_matrix(w, name)
    qw = round_int8(w, group_size, name=name)
    return qw, _max_abs_err(qw, w)


def round_int8(
    w: torch.Tensor, group_size: int | None = None, *, name: str = "weight"
) -> Int8Weight:
    """quantize_int8's weight without its error (a pass of dequantising and comparing), for
    callers that keep none: Int4AsInt8Tiles rounding a model's int4 layers at each load."""
    w = _as_matrix(w, name)
    n, k = w.shape
    group = k if group_size is None else group_size
    if group <= 0 or k % group:
        raise ValueError(f"{name}: group_size {group} must divide K of shape {tuple(w.shape)}")
    groups = w.reshape(n, k // group, group)
    scales = groups.abs().amax(dim=-1) / 127.0
    # An all-zero group keeps scale 0 (dequantises to 0) but must not divide by it.
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = (groups / safe[..., None]).round_().clamp_(-127, 127).to(torch.int8)
    return Int8Weight(data=q.reshape(n, k), scales=scales.contiguous(), group_size=group)


def quantize_int4(
    w: torch.Tensor, group_size: int = INT4_GROUP, *, name: str = "weight", search: bool = False
) -> tuple[Int4Weight, float]:
    """Asymmetric min/max int4 of w [N, K] in groups of group_size along K.

    `search`: each group's range is instead the one of a few ranges narrowed around its
    middle (`RANGE_FACTORS`) whose rounding has the least squared error; outliers are then
    clipped. Returns the weight and the max abs reconstruction error (float32 units of w).
    """
    w = _as_matrix(w, name)
    n, k = w.shape
    if group_size <= 0 or k % group_size:
        raise ValueError(f"{name}: group_size {group_size} must divide K of shape {tuple(w.shape)}")
    groups = w.reshape(n, k // group_size, group_size)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    if search:
        lo, hi = _least_error_range(groups, lo, hi)
    scales = (hi - lo) / 15.0
    zeros = lo + 8.0 * scales
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    # Round against the stored (rounded) zero so q is optimal for the formula the kernels use.
    # In place after the first op: a large matrix (a 136M-value head) makes few temporaries.
    q = (groups - zeros[..., None]).div_(safe[..., None]).round_().add_(8.0)
    q = q.clamp_(0, 15).reshape(n, k)
    qw = Int4Weight(
        data=pack_int4(q),
        scales=scales.contiguous(),
        zeros=zeros.contiguous(),
        group_size=group_size,
    )
    return qw, _max_abs_err(qw, w)


def quantize_rows(
    rows: Callable[[int, int], torch.Tensor],
    n_rows: int,
    scheme: str,
    group_size: int | None,
    *,
    name: str = "weight",
    search: bool = False,
    step: int = 4096,
) -> tuple[QuantizedWeight, float]:
    """quantize_int8 (group_size None: per channel) or quantize_int4 of an [n_rows, K] matrix
    that `rows(r0, r1)` gives `step` rows at a time as float. Every format's scales belong to one
    row, so the result equals quantising the matrix whole, without it (and the quantiser's
    float32 buffer) in memory at once: Qwen2.5-Coder's Q5_0 embedding, 136M values, put 1.1 GB
    of float32 on the load's peak whole. Each part goes into the result as it is made, so the
    heap reuses one step's temporaries for the next (kept parts between them had fragmented
    it: 880 MB more resident for a 153 MB result)."""
    if scheme not in ("int4", "int8") or (scheme == "int4" and group_size is None):
        raise ValueError(f"{name}: unknown scheme {scheme!r}; expected 'int4' or 'int8'")
    errors = []

    def parts():
        for r0 in range(0, n_rows, step):
            w = rows(r0, min(n_rows, r0 + step))
            qw, err = (
                quantize_int8(w, group_size, name=name)
                if scheme == "int8"
                else quantize_int4(w, group_size, name=name, search=search)
            )
            errors.append(err)
            yield qw

    return stack_rows(parts(), n_rows), max(errors)


RANGE_FACTORS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)
_SEARCH_ROWS_BYTES = 64 << 20  # rows searched at a time, so a large matrix needs no big copies


def _least_error_range(
    groups: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, the (lo, hi) among [middle -/+ half * f for f in RANGE_FACTORS] whose int4
    rounding has the least squared error. groups [N, G, g]; lo, hi [N, G]."""
    best_lo, best_hi = lo.clone(), hi.clone()
    rows = max(1, _SEARCH_ROWS_BYTES // max(1, groups[0].numel() * 4))
    for r0 in range(0, groups.shape[0], rows):
        part = groups[r0 : r0 + rows]
        middle = (hi[r0 : r0 + rows] + lo[r0 : r0 + rows]) / 2
        half = (hi[r0 : r0 + rows] - lo[r0 : r0 + rows]) / 2
        best_err = torch.full_like(middle, float("inf"))
        for factor in RANGE_FACTORS:
            c_lo, c_hi = middle - half * factor, middle + half * factor
            scale = (c_hi - c_lo) / 15.0
            safe = torch.where(scale > 0, scale, torch.ones_like(scale))[..., None]
            q = torch.round((part - c_lo[..., None]) / safe).clamp_(0, 15)
            err = (q * scale[..., None] + c_lo[..., None] - part).square_().sum(dim=-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo[r0 : r0 + rows] = torch.where(better, c_lo, best_lo[r0 : r0 + rows])
            best_hi[r0 : r0 + rows] = torch.where(better, c_hi, best_hi[r0 : r0 + rows])
    return best_lo, best_hi


def dequantize(qw: QuantizedWeight) -> torch.Tensor:
    """The float32 [N, K] matrix that qw stands for."""
    n, k = qw.shape
    groups = k // qw.group_size
    # In place, one float32 [N, K] buffer: a dense copy of a large head is built from this.
    if isinstance(qw, Int8Weight):
        q = qw.data.to(torch.float32).reshape(n, groups, qw.group_size)
        return q.mul_(qw.scales[..., None]).reshape(n, k)
    q = unpack_int4(qw.data).to(torch.float32).reshape(n, groups, qw.group_size)
    # (q - 8) * scale is exact in float32 (4-bit times 24-bit), so only the add rounds.
    return q.sub_(8.0).mul_(qw.scales[..., None]).add_(qw.zeros[..., None]).reshape(n, k)


def matmul(x: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    """x [..., K] @ dequantize(qw).T in float32 -> float32 [..., N]."""
    k = qw.shape[1]
    if x.shape[-1] != k:
        raise ValueError(f"matmul: x has shape {tuple(x.shape)}, weight expects K={k}")
    return x.to(torch.float32) @ dequantize(qw).t()


def requantize_int8_per_channel(qw: Int8Weight) -> tuple[Int8Weight, float]:
    """Group-wise int8 (e.g. GGUF Q8_0) -> per-channel int8, as the int8 kernels take.

    The error returned is against qw's own dequantised values.
    """
    if qw.is_per_channel:
        return qw, 0.0
    return quantize_int8(dequantize(qw))


def _as_matrix(w: torch.Tensor, name: str) -> torch.Tensor:
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(
            f"{name}: expected a floating [N, K] weight, got {w.dtype} {tuple(w.shape)}"
        )
    return w.detach().to(torch.float32)


def _max_abs_err(qw: QuantizedWeight, w: torch.Tensor) -> float:
    if w.numel() == 0:
        return 0.0
    return float(dequantize(qw).sub_(w).abs_().max().item())
