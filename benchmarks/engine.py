"""Engine speed on this machine: load time, prefill tokens/s (512 and 2048-token prompts) and
decode tokens/s, per quantisation.

    .venv/bin/python benchmarks/engine.py [--model default] [--quant fp32 bf16] [--json PATH]
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import median, print_table, write_json  # noqa: E402


def _source_tokens(tokenizer, n_tokens: int) -> list[int]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = "".join((stdlib / name).read_text() for name in ("argparse.py", "textwrap.py"))
    ids = tokenizer.encode(text)
    assert len(ids) >= n_tokens, "the sample files are shorter than the prompt asked for"
    return ids[:n_tokens]


def measure(model: str, quant: str, decode_tokens: int, repeats: int) -> dict:
    import torch

    from codelm.daemon.engine import EngineConfig, load_engine
    from codelm.daemon.engine.generate import StopRules, generate

    t0 = time.perf_counter()
    engine = load_engine(EngineConfig(model=model, quant=quant))
    row = {"quant": engine.info["quant"], "load_s": time.perf_counter() - t0}
    tok = engine.tokenizer
    for n in (512, 2048):
        ids = _source_tokens(tok, n)
        generate(engine.model, tok, engine.new_kv(), ids[:64], StopRules(max_tokens=1))  # warm-up
        times = []
        for _ in range(repeats):
            result = generate(engine.model, tok, engine.new_kv(), ids, StopRules(max_tokens=1))
            times.append(result.prefill_ms)
        row[f"prefill{n}_tok_s"] = n / (median(times) / 1000)
    ids = _source_tokens(tok, 256)
    rates = []
    for _ in range(repeats):
        result = generate(
            engine.model, tok, engine.new_kv(), ids, StopRules(max_tokens=decode_tokens)
        )
        rates.append(result.decode_tokens_per_s)
    row["decode_tok_s"] = median(rates)
    row["threads"] = torch.get_num_threads()
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--quant", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="where to write the results JSON")
    args = parser.parse_args(argv)
    rows = [measure(args.model, q, args.decode_tokens, args.repeats) for q in args.quant]
    print(f"model: {args.model}")
    columns = [
        "quant",
        "load_s",
        "prefill512_tok_s",
        "prefill2048_tok_s",
        "decode_tok_s",
        "threads",
    ]
    print_table(rows, columns)
    out = write_json("engine", {"model": args.model, "rows": rows}, args.json)
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
