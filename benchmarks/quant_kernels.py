"""Weight-only quant kernels on a model's linear shapes, decode (M=1) and prefill (M=128).

    .venv/bin/python benchmarks/quant_kernels.py [--model smollm2-135m|qwen2.5-coder-0.5b]
        [--rows 1 128] [--schemes int4 int8] [--kernels NAME ...] [--min-time 0.2] [--json PATH]

Prints one row per (scheme, shape, rows, kernel) with median and min ms over repeats
(warm-up excluded), the max error against reference.matmul relative to max |y|, and the
linear-layer time per token for the whole model (all blocks + head) summed from those rows.
Per-shape loops keep a layer's weight hot in cache, so `--chain` (default) also times decode
the way the model runs it: every layer once per token, in order, caches cold. Writes JSON
to benchmarks/results/quant_kernels.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import print_table, write_json  # noqa: E402

from codelm.quant import physical_cores, quantize_int4, quantize_int8
from codelm.quant.cpu import CPU_KERNELS
from codelm.quant.reference import matmul

RESULTS = Path(__file__).resolve().parent / "results" / "quant_kernels.json"


def _shapes(n_layers: int, dim: int, q_dim: int, kv_dim: int, ffn: int, vocab: int):
    """(name, N, K, uses per token) of a llama-style model with fused qkv and gate/up."""
    return [
        ("qkv", q_dim + 2 * kv_dim, dim, n_layers),
        ("o_proj", dim, q_dim, n_layers),
        ("gate_up", 2 * ffn, dim, n_layers),
        ("down", dim, ffn, n_layers),
        ("lm_head", vocab, dim, 1),
    ]


MODELS = {
    # 30 layers, hidden 576, 9 q heads / 3 kv heads of 64, ffn 1536.
    "smollm2-135m": _shapes(30, 576, 576, 192, 1536, 49152),
    # 24 layers, hidden 896, 14 q heads / 2 kv heads of 64, ffn 4864.
    "qwen2.5-coder-0.5b": _shapes(24, 896, 896, 128, 4864, 151936),
}


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    rows: list[dict[str, Any]] = []
    shapes = MODELS[args.model]
    for scheme in args.schemes:
        for name, n, k, uses in shapes:
            w = torch.randn(n, k, generator=gen) * 0.05
            qw = quantize_int4(w, 32)[0] if scheme == "int4" else quantize_int8(w)[0]
            rows += _bench_shape(qw, scheme, name, uses, args, gen)
    totals = _model_totals(rows, len(shapes))
    chain = [
        _bench_chain(s, k, shapes, args, gen) for s in args.schemes for k in _chain_kernels(s, args)
    ]
    print_table(rows, ["scheme", "shape", "rows", "kernel", "median_ms", "min_ms", "rel_err"])
    print()
    print_table(totals, ["scheme", "kernel", "rows", "model_ms", "tokens_per_s"])
    if chain:
        print("\ndecode, all layers in sequence (caches cold):")
        print_table(chain, ["scheme", "kernel", "median_ms", "min_ms", "tokens_per_s"])
    payload = {"model": args.model, "results": rows, "model_totals": totals, "decode_chain": chain}
    out = write_json("quant_kernels", {**payload, "physical_cores": physical_cores()}, args.json)
    print(f"\nwrote {out}")
    return 0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=list(MODELS), default="smollm2-135m")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 128])
    parser.add_argument("--schemes", nargs="+", default=["int4", "int8"], choices=["int4", "int8"])
    parser.add_argument("--kernels", nargs="+", default=list(CPU_KERNELS))
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds per measurement")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--json", default=str(RESULTS))
    parser.add_argument("--no-chain", dest="chain", action="store_false")
    return parser.parse_args(argv)


def _bench_shape(qw, scheme, name, uses, args, gen) -> list[dict[str, Any]]:
    n, k = qw.shape
    xs = {m: torch.randn(m, k, generator=gen) for m in args.rows}
    refs = {m: matmul(x, qw) for m, x in xs.items()}
    rows = []
    for kernel_name in args.kernels:
        spec = CPU_KERNELS[kernel_name]
        if scheme not in spec.schemes:
            continue
        kernel = spec.build(qw)
        for m, x in xs.items():
            times = _time(kernel, x, args.min_time)
            err = (kernel(x).float() - refs[m]).abs().max() / refs[m].abs().max()
            rows.append(
                {
                    "scheme": scheme,
                    "shape": f"{name} {n}x{k}",
                    "uses": uses,
                    "rows": m,
                    "kernel": kernel_name + (" (lossy)" if spec.opt_in == "allow_lossy" else ""),
                    "median_ms": statistics.median(times),
                    "min_ms": min(times),
                    "rel_err": float(err),
                }
            )
        del kernel
    return rows


def _chain_kernels(scheme: str, args: argparse.Namespace) -> list[str]:
    if not args.chain:
        return []
    # dequant_fp32 re-dequantises the whole model per token (~0.2 s): not a decode candidate.
    names = [n for n in args.kernels if scheme in CPU_KERNELS[n].schemes]
    return [n for n in names if n != "dequant_fp32"]


def _bench_chain(scheme: str, kernel_name: str, shapes, args, gen) -> dict[str, Any]:
    """One token through every linear layer of the model, as decode runs it."""
    layers = []
    for _, n, k, uses in shapes:
        for _ in range(uses):
            w = torch.randn(n, k, generator=gen) * 0.05
            qw = quantize_int4(w, 32)[0] if scheme == "int4" else quantize_int8(w)[0]
            layers.append((CPU_KERNELS[kernel_name].build(qw), torch.randn(1, k, generator=gen)))

    def token() -> None:
        for kernel, x in layers:
            kernel(x)

    times = _time(token, None, args.min_time)
    return {
        "scheme": scheme,
        "kernel": kernel_name,
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "tokens_per_s": 1e3 / statistics.median(times),
    }


def _time(kernel, x: torch.Tensor | None, min_time: float) -> list[float]:
    call = kernel if x is None else (lambda: kernel(x))
    for _ in range(2):  # warm-up: first calls allocate and fault pages in
        call()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 5 or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 200:
            break
    return times


def _model_totals(rows: list[dict[str, Any]], n_shapes: int) -> list[dict[str, Any]]:
    """Per-token linear time of the whole model for each (scheme, kernel, rows) with all shapes."""
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["scheme"], row["kernel"], row["rows"]), []).append(row)
    totals = []
    for (scheme, kernel, m), members in groups.items():
        if len(members) != n_shapes:
            continue
        model_ms = sum(r["median_ms"] * r["uses"] for r in members)
        totals.append(
            {
                "scheme": scheme,
                "kernel": kernel,
                "rows": m,
                "model_ms": model_ms,
                "tokens_per_s": 1e3 * m / model_ms,
            }
        )
    return totals


if __name__ == "__main__":
    raise SystemExit(main())
