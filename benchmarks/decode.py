"""Decode and prefill speed of the default model per --quant, as memory bandwidth, side by side
with llama-server on the same GGUF in the same run.

For each quantisation the engine is loaded in-process (as benchmarks/engine.py does) and runs a
~512-token prompt of stdlib source (prefill tokens/s) and 64 greedy tokens after it (decode
tokens/s). Decoding one token reads every weight matrix once, so achieved GB/s = decode tok/s x
the bytes of the packed weights (QuantizedLinear.nbytes, nn.Linear weight bytes); the share is of
this machine's bandwidth, measured as the best of 3 clones of a 1 GiB tensor (read + write).
llama-server gets the same prompt text with `cache_prompt: false`, `n_predict: 64`,
`ignore_eos`; its own timings (prompt_per_second, predicted_per_second) are reported, its bytes
per token being the GGUF's weight tensors. Warm-up runs are excluded; medians of --repeats.
The peer is measured before codelm's rows and again after them, and its row holds the median
of both sets (each set's prefill and decode medians too): a shared machine whose speed moves
during a run moves both systems' numbers, not only the ratio's one side.

`--isa avx2` measures, on a CPU with more, what an AVX2-only CPU gets: codelm's processes run
with torch, oneDNN and MKL held to AVX2 and codelm's kernels and dispatcher limited to it
(quant.dispatch.limit_to_avx2); the peer is llama-server built for AVX2 alone (`make
bench-peers-avx2`). fbgemm keeps its own choice, so `dense_fp16` may be faster than there.

    .venv/bin/python benchmarks/decode.py [--model default] [--quant auto int4 int8 fp32]
        [--prompt-tokens 512] [--decode-tokens 64] [--repeats 3] [--isa native|avx2]
        [--no-peers] [--json PATH]
"""

from __future__ import annotations

import argparse
import gc
import sys
import sysconfig
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers  # noqa: E402
from common import (  # noqa: E402
    environment,
    in_fresh_process,
    median,
    peak_rss_mb,
    print_kernels,
    print_table,
    rss_mb,
    temporary_home,
    write_json,
)

GIB = 1 << 30
# What torch, oneDNN and MKL read when a process loads them (--isa avx2).
AVX2_ENVIRONMENT = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
}


def memory_bandwidth(nbytes: int = GIB, repeats: int = 3) -> dict[str, float]:
    """GB/s (bytes read + bytes written) of copying a 1 GiB tensor, best of `repeats`:
    `clone` allocates its output each time (page faults included), `copy` reuses it."""
    import torch

    src = torch.ones(nbytes // 4, dtype=torch.float32)
    best_clone = best_copy = float("inf")
    dst = torch.empty_like(src)
    dst.fill_(0)
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best_copy = min(best_copy, time.perf_counter() - t0)
    del dst
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = src.clone()
        best_clone = min(best_clone, time.perf_counter() - t0)
        del out
    del src
    gc.collect()
    return {"copy": 2 * nbytes / best_copy / 1e9, "clone": 2 * nbytes / best_clone / 1e9}


def source_tokens(tokenizer, n_tokens: int) -> list[int]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = "".join((stdlib / name).read_text() for name in ("argparse.py", "textwrap.py"))
    ids = tokenizer.encode(text)
    assert len(ids) >= n_tokens, "the sample files are shorter than the prompt asked for"
    return ids[:n_tokens]


def gguf_weight_bytes(path: Path) -> int:
    """The same for llama.cpp: every tensor of the file but the embedding table, which counts
    only when it doubles as the output matrix (tied embeddings)."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(path).tensors}
    if "output.weight" in tensors:
        tensors.pop("token_embd.weight", None)
    return sum(tensors.values())


def measure_codelm(
    model: str,
    quant: str,
    n_prompt: int,
    n_decode: int,
    repeats: int,
    *,
    device: str = "auto",
    prompt_ids=source_tokens,
    cuda_graphs: bool = True,
    isa: str = "native",
) -> dict:
    """Load `model` with `quant` and time prefill of `prompt_ids(tokenizer, n_prompt)` and
    n_decode greedy tokens after it, as the daemon runs a request. Run it in a fresh process
    (common.in_fresh_process): `peak_rss_load_MB` is the process's peak RSS when the load
    ends, `rss_before_load_MB` what Python and torch held before it. `cuda_graphs`: the
    engine setting of that name; `isa` "avx2": codelm's kernels and dispatcher as on an
    AVX2-only CPU (the process started with AVX2_ENVIRONMENT for torch's)."""
    import torch

    if isa == "avx2":
        from codelm.quant.dispatch import limit_to_avx2

        limit_to_avx2()

    from codelm.daemon.engine import EngineConfig, load_engine
    from codelm.daemon.engine.generate import StopRules, generate
    from codelm.daemon.engine.loader import weight_bytes

    rss_before = rss_mb()
    t0 = time.perf_counter()
    config = EngineConfig(model=model, quant=quant, device=device, cuda_graphs=cuda_graphs)
    engine = load_engine(config)
    load_s = time.perf_counter() - t0
    peak_rss = peak_rss_mb()
    tok = engine.tokenizer
    ids = prompt_ids(tok, n_prompt)
    generate(engine.model, tok, engine.new_kv(), ids[:64], StopRules(max_tokens=2))  # warm-up
    prefill, decode = [], []
    for _ in range(repeats):
        with engine.threads():  # as the daemon runs a request: the cores free right now
            rules = StopRules(max_tokens=n_decode)
            result = generate(engine.model, tok, engine.new_kv(), ids, rules)
        assert len(result.token_ids) == n_decode, "no stop rules: every token is kept"
        prefill.append(n_prompt / (result.prefill_ms / 1000))
        decode.append(result.decode_tokens_per_s)
    nbytes, held = weight_bytes(engine.model)
    row = {
        "system": "codelm",
        "quant": engine.info["quant"],
        "load_s": load_s,
        "rss_before_load_MB": rss_before,
        "peak_rss_load_MB": peak_rss,
        "prompt_tokens": n_prompt,
        "prefill_tok_s": median(prefill),
        "decode_tok_s": median(decode),
        "weights_MB": nbytes / 1e6,
        "held_MB": held / 1e6,
        "kernels": engine.info["kernels"] or "nn.Linear",
        "decode_step": engine.info["decode_step"],
        "threads": torch.get_num_threads(),
        "device": engine.info["device"],
    }
    if engine.device.type == "cuda":
        row["peak_gpu_MB"] = torch.cuda.max_memory_allocated() / 1e6
    del engine
    gc.collect()
    return row


def measure_peer(
    model_path: Path, text: str, n_decode: int, repeats: int, binary: Path = peers.BINARY
) -> dict:
    with peers.LlamaServer(model_path, binary=binary) as server:
        peak_rss_load = server.peak_rss_mb()
        server.complete(text[:400], n_predict=4, cache_prompt=False, stream=False)  # warm-up
        prefill, decode, n_prompt = [], [], []
        for _ in range(repeats):
            r = server.complete(
                text, n_predict=n_decode, cache_prompt=False, stream=False, ignore_eos=True
            )
            prefill.append(float(r.timings["prompt_per_second"]))
            decode.append(float(r.timings["predicted_per_second"]))
            n_prompt.append(r.prefilled)
        return {
            "system": "llama-server",
            "quant": "gguf as is",
            "load_s": server.start_s,
            "peak_rss_load_MB": peak_rss_load,
            "prompt_tokens": int(median(n_prompt)),
            "prefill_tok_s": median(prefill),
            "decode_tok_s": median(decode),
            "prefill_samples": prefill,
            "decode_samples": decode,
            "weights_MB": gguf_weight_bytes(model_path) / 1e6,
            "held_MB": gguf_weight_bytes(model_path) / 1e6,
            "kernels": "ggml",
            "threads": 2,
        }


def bracketed(before: dict, after: dict) -> dict:
    """One peer row from its measurements before and after codelm's rows: medians over both
    sets of samples, each set's medians kept (`*_before`, `*_after`) to show the drift."""
    row = dict(after)
    for key in ("prefill", "decode"):
        samples = before[f"{key}_samples"] + after[f"{key}_samples"]
        row[f"{key}_samples"] = samples
        row[f"{key}_tok_s"] = median(samples)
        row[f"{key}_tok_s_before"] = before[f"{key}_tok_s"]
        row[f"{key}_tok_s_after"] = after[f"{key}_tok_s"]
    row["load_s"] = median([before["load_s"], after["load_s"]])
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--quant", nargs="+", default=["auto", "int4", "int8", "fp32"])
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--isa",
        choices=["native", "avx2"],
        default="native",
        help="avx2: run both systems as on an AVX2-only CPU (see above)",
    )
    parser.add_argument("--no-peers", action="store_true", help="codelm only")
    parser.add_argument(
        "--user-cache",
        action="store_true",
        help="use the user's kernel-ranking and weight caches (default: a temporary "
        "CODELM_HOME, so kernels are calibrated afresh by this code and nothing is kept)",
    )
    parser.add_argument("--json", default=None, help="where to write the results JSON")
    args = parser.parse_args(argv)

    from codelm.daemon.catalog import resolve_model_path

    model_path = resolve_model_path(args.model).resolve()
    if args.user_cache:
        return _run(args, model_path)
    with temporary_home("codelm-decode-"):
        return _run(args, model_path)


def add_peer_ratios(rows: list[dict]) -> None:
    """prefill_x / decode_x on each codelm row: its tokens/s over llama-server's, measured in
    the same run (no ratios without a peer row)."""
    peer = next((r for r in rows if r["system"] == "llama-server"), None)
    if peer is None:
        return
    for row in rows:
        if row is not peer:
            row["prefill_x"] = row["prefill_tok_s"] / peer["prefill_tok_s"]
            row["decode_x"] = row["decode_tok_s"] / peer["decode_tok_s"]


def _peer(args: argparse.Namespace, model_path: Path):
    """A call that measures llama-server on this run's prompt (measure_peer), or why there is
    none (a note for its row)."""
    binary = peers.AVX2_BINARY if args.isa == "avx2" else peers.BINARY
    if args.no_peers:
        return "skipped (--no-peers)"
    if not peers.available(binary):
        return peers.AVX2_NOT_BUILT if args.isa == "avx2" else peers.NOT_BUILT
    if model_path.suffix != ".gguf":
        return "skipped: llama-server needs a .gguf model"
    from codelm.daemon.engine.models import architecture
    from codelm.daemon.engine.tokenizer import tokenizer_from_gguf
    from codelm.daemon.engine.weights import read_gguf

    meta = read_gguf(model_path, lambda arch: architecture(arch).GGUF_NAMES).meta
    tokenizer = tokenizer_from_gguf(meta)
    text = tokenizer.decode(source_tokens(tokenizer, args.prompt_tokens))
    return lambda: measure_peer(model_path, text, args.decode_tokens, args.repeats, binary)


def _run(args: argparse.Namespace, model_path: Path) -> int:
    measured = memory_bandwidth()
    bandwidth = measured["copy"]
    print(
        f"model: {model_path.name}; memory bandwidth, 1 GiB, read + write, best of 3: "
        f"copy into a reused tensor {measured['copy']:.1f} GB/s (the reference below), "
        f"clone {measured['clone']:.1f} GB/s"
        + ("; both systems as on an AVX2-only CPU (--isa avx2)" if args.isa == "avx2" else ""),
        flush=True,
    )
    rows = []
    avx2 = args.isa == "avx2"
    peer = _peer(args, model_path)
    before = peer() if callable(peer) else None
    for quant in args.quant:
        with environment(AVX2_ENVIRONMENT if avx2 else {}):
            rows.append(
                in_fresh_process(
                    measure_codelm,
                    str(model_path),
                    quant,
                    args.prompt_tokens,
                    args.decode_tokens,
                    args.repeats,
                    isa=args.isa,
                )
            )
        print(f"  {quant}: done", flush=True)
    peer_note = "" if callable(peer) else peer
    if before is not None:
        rows.append(bracketed(before, peer()))
    for row in rows:
        row["GB_s"] = row["decode_tok_s"] * row["weights_MB"] / 1e3
        row["bw_share"] = row["GB_s"] / bandwidth
    add_peer_ratios(rows)
    if peer_note:
        rows.append({"system": "llama-server", "quant": peer_note})
    columns = [
        "system",
        "quant",
        "load_s",
        "prompt_tokens",
        "prefill_tok_s",
        "decode_tok_s",
        "prefill_x",
        "decode_x",
        "weights_MB",
        "GB_s",
        "bw_share",
        "held_MB",
        "peak_rss_load_MB",
        "threads",
    ]
    print_table(rows, columns)
    print(
        "prefill_x / decode_x: tokens/s over llama-server's in this run (targets: "
        "cold prefill >= 3, decode >= 1); "
        "weights_MB: weight bytes one decode step reads; GB_s = decode_tok_s x weights_MB; "
        "held_MB: what the weights occupy (prefill copies included); "
        "peak_rss_load_MB: the process's peak resident memory when loading ends (codelm: each "
        "quant in a fresh process, Python and torch included; file pages of the model read "
        "count too)"
    )
    if before is not None:
        drift = rows[-1]
        print(
            "llama-server before / after codelm's rows: prefill "
            f"{drift['prefill_tok_s_before']:.1f} / {drift['prefill_tok_s_after']:.1f}, decode "
            f"{drift['decode_tok_s_before']:.1f} / {drift['decode_tok_s_after']:.1f} tokens/s "
            "(its row: the median of both)"
        )
    print_kernels(rows)
    payload = {
        "model": str(model_path),
        "memory_bandwidth_GB_s": measured,
        "settings": vars(args),
        "kernel_cache": "user" if args.user_cache else "fresh (temporary CODELM_HOME)",
        "peer": peer_note or peers.version(peers.AVX2_BINARY if avx2 else peers.BINARY),
        "rows": rows,
    }
    out = write_json("decode", payload, args.json)
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
