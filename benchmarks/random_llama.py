"""Decode and prefill speed of a llama with random weights per --quant, side by side with
transformers (+ bitsandbytes on CUDA) loading the same checkpoint on the same machine.

The 7B shape (hidden 4096, 32 layers, 32 heads / 8 KV heads, ffn 11008, vocab 49152) is the
GPU check: a random bf16 checkpoint is written as a Hugging Face folder (config.json,
model.safetensors, a word-level tokenizer.json), then codelm loads it per --quant and
transformers per --peers: `bf16`, `bnb-int8` (LLM.int8) and `bnb-nf4` (4-bit NF4, bf16
compute), the last two only on CUDA with bitsandbytes installed. Each system runs a prompt of
--prompt-tokens random ids (prefill tokens/s) and --decode-tokens greedy tokens after it
(decode tokens/s: tokens picked over the time from the end of prefill, as GenerationResult
counts them). transformers runs its own forward with its KV cache, token by token, without
`generate`'s extra work. `tiny` is the same benchmark at a size a CPU runs in seconds.
On CUDA, `--cuda-graphs on off` gives each quant a row with its decode step replayed as a
CUDA graph and one module by module (docs/engine.md).

    .venv/bin/python benchmarks/random_llama.py [--shape 7b|tiny] [--device auto|cpu|cuda]
        [--quant int4 int8 bf16] [--cuda-graphs on off] [--peers bf16 bnb-int8 bnb-nf4]
        [--repeats 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    in_fresh_process,
    median,
    peak_rss_mb,
    print_kernels,
    print_table,
    rss_mb,
    temporary_home,
    write_json,
)
from decode import measure_codelm  # noqa: E402

SHAPES = {
    "7b": {"hidden": 4096, "layers": 32, "heads": 32, "kv_heads": 8, "ffn": 11008},
    "tiny": {"hidden": 256, "layers": 4, "heads": 4, "kv_heads": 2, "ffn": 704},
}
VOCAB = 49152
PEER_QUANTS = ("bf16", "fp32", "bnb-int8", "bnb-nf4")


def write_checkpoint(folder: Path, shape: dict[str, int], device: str, seed: int = 0) -> int:
    """A random bf16 llama as a Hugging Face folder; returns its parameter count.

    Matrices are N(0, 1/K) so activations keep their scale through the layers; norms are 1.
    Values are drawn on `device` (fast on a GPU) and written from host memory.
    """
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models

    h, ffn, heads, kv_heads = shape["hidden"], shape["ffn"], shape["heads"], shape["kv_heads"]
    head_dim = h // heads
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": h,
        "intermediate_size": ffn,
        "num_hidden_layers": shape["layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": VOCAB,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    generator = torch.Generator(device=device).manual_seed(seed)

    def matrix(n: int, k: int, std: float | None = None) -> torch.Tensor:
        value = torch.randn(n, k, generator=generator, device=device)
        return value.mul_(std if std is not None else k**-0.5).to(torch.bfloat16).cpu()

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=torch.bfloat16)

    tensors = {"model.embed_tokens.weight": matrix(VOCAB, h, std=1.0)}
    for i in range(shape["layers"]):
        p = f"model.layers.{i}"
        tensors[f"{p}.self_attn.q_proj.weight"] = matrix(heads * head_dim, h)
        tensors[f"{p}.self_attn.k_proj.weight"] = matrix(kv_heads * head_dim, h)
        tensors[f"{p}.self_attn.v_proj.weight"] = matrix(kv_heads * head_dim, h)
        tensors[f"{p}.self_attn.o_proj.weight"] = matrix(h, heads * head_dim)
        tensors[f"{p}.mlp.gate_proj.weight"] = matrix(ffn, h)
        tensors[f"{p}.mlp.up_proj.weight"] = matrix(ffn, h)
        tensors[f"{p}.mlp.down_proj.weight"] = matrix(h, ffn)
        tensors[f"{p}.input_layernorm.weight"] = ones(h)
        tensors[f"{p}.post_attention_layernorm.weight"] = ones(h)
    tensors["model.norm.weight"] = ones(h)
    tensors["lm_head.weight"] = matrix(VOCAB, h)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    vocab = {f"t{i}": i for i in range(VOCAB)}
    Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(str(folder / "tokenizer.json"))
    n_params = sum(t.numel() for t in tensors.values())
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return n_params


def random_ids(tokenizer, n: int) -> list[int]:
    import torch

    generator = torch.Generator().manual_seed(1)
    return torch.randint(3, VOCAB, (n,), generator=generator).tolist()


def measure_transformers(
    folder: Path, quant: str, device: str, n_prompt: int, n_decode: int, repeats: int
) -> dict:
    """transformers' LlamaForCausalLM from the same folder: bf16/fp32 as is, or through
    bitsandbytes (`bnb-int8`, `bnb-nf4`). Prefill is one forward of the prompt; decode feeds
    back each greedy token with the model's KV cache."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict = {"dtype": torch.float32 if quant == "fp32" else torch.bfloat16}
    if quant.startswith("bnb-"):
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_8bit=True)
            if quant == "bnb-int8"
            else BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_compute_dtype=torch.bfloat16,
            )
        )
        kwargs["device_map"] = device
    rss_before = rss_mb()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    if not quant.startswith("bnb-"):
        model = model.to(device)
    model.eval()
    load_s = time.perf_counter() - t0
    peak_rss = peak_rss_mb()
    ids = torch.tensor([random_ids(None, n_prompt)], device=device)

    _greedy_run(model, ids, 2, device)  # warm-up
    prefill, decode = [], []
    for _ in range(repeats):
        prefill_s, decode_s = _greedy_run(model, ids, n_decode, device)
        prefill.append(n_prompt / prefill_s)
        decode.append(n_decode / decode_s)
    row = {
        "system": "transformers",
        "quant": quant,
        "device": device,
        "load_s": load_s,
        "rss_before_load_MB": rss_before,
        "peak_rss_load_MB": peak_rss,
        "prompt_tokens": n_prompt,
        "prefill_tok_s": median(prefill),
        "decode_tok_s": median(decode),
        "weights_MB": model.get_memory_footprint() / 1e6,
        "threads": torch.get_num_threads(),
    }
    if device == "cuda":
        row["peak_gpu_MB"] = torch.cuda.max_memory_allocated() / 1e6
    return row


def _greedy_run(model, ids, n_tokens: int, device: str) -> tuple[float, float]:
    """(prefill seconds, seconds for the n_tokens - 1 forwards after it) of greedy decoding."""
    import torch

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode():
        sync()
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        sync()
        t1 = time.perf_counter()
        past = out.past_key_values
        for _ in range(n_tokens - 1):
            out = model(token, past_key_values=past, use_cache=True)
            past = out.past_key_values
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        sync()
        return t1 - t0, time.perf_counter() - t1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--quant", nargs="+", default=["int4", "int8", "bf16"])
    parser.add_argument("--peers", nargs="*", default=None, choices=PEER_QUANTS)
    parser.add_argument(
        "--cuda-graphs",
        nargs="+",
        choices=("on", "off"),
        default=["on"],
        help="on CUDA, codelm rows with its decode step as a CUDA graph and/or module by module",
    )
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write the random checkpoint")
    parser.add_argument("--json", default=None, help="where to write the results JSON")
    args = parser.parse_args(argv)

    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.peers is None:
        # bitsandbytes' CPU path dequantises the whole weight per call (docs/quant.md).
        args.peers = ["bf16", "bnb-int8", "bnb-nf4"] if device == "cuda" else ["fp32"]
    with temporary_home("codelm-random-llama-", args.dir) as work:
        return _run(args, device, work)


def _run(args: argparse.Namespace, device: str, work: Path) -> int:
    folder = work / f"llama-{args.shape}"
    t0 = time.perf_counter()
    n_params = write_checkpoint(folder, SHAPES[args.shape], device)
    print(
        f"random llama {args.shape}: {n_params / 1e9:.2f}B parameters, bf16 checkpoint written "
        f"in {time.perf_counter() - t0:.0f} s; device {device}",
        flush=True,
    )
    rows = []
    # Each load in a fresh process: its peak RSS and GPU memory are its own.
    graphs = args.cuda_graphs if device == "cuda" else ["on"]
    for quant, graph in itertools.product(args.quant, graphs):
        row = in_fresh_process(
            measure_codelm,
            str(folder),
            quant,
            args.prompt_tokens,
            args.decode_tokens,
            args.repeats,
            device=device,
            prompt_ids=random_ids,
            cuda_graphs=graph == "on",
        )
        rows.append(row)
        print(f"  codelm {quant} ({row['decode_step']}): done", flush=True)
    for quant in args.peers:
        try:
            row = in_fresh_process(
                measure_transformers,
                folder,
                quant,
                device,
                args.prompt_tokens,
                args.decode_tokens,
                args.repeats,
            )
        except ImportError as exc:  # bitsandbytes or accelerate missing
            row = {"system": "transformers", "quant": f"{quant}: skipped ({exc})"}
        rows.append(row)
        print(f"  transformers {quant}: done", flush=True)
    columns = [
        "system",
        "quant",
        "device",
        "decode_step",
        "load_s",
        "prompt_tokens",
        "prefill_tok_s",
        "decode_tok_s",
        "weights_MB",
        "peak_rss_load_MB",
        "peak_gpu_MB",
        "threads",
    ]
    print_table(rows, columns)
    print("weights_MB: codelm, bytes one decode step reads; transformers, its memory footprint")
    print_kernels(rows)
    payload = {"shape": args.shape, "n_params": n_params, "settings": vars(args), "rows": rows}
    out = write_json(f"random_llama_{args.shape}", payload, args.json)
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
