"""Multi-line infill on HumanEval, run against the problems' tests: does a suggestion on a
blank line write the block and stop where it should?

Each problem's prompt + canonical solution is the document. A task masks a whole block of the
solution: the function's body (`body`), or the body of one of its compound statements
(`block`: what follows a line ending in `:`, as deep as it goes). The masked lines become one
line of the first one's indentation, the cursor after it: where a user who pressed Enter
after the opener would be. The engine is asked there as the language server asks on a blank
line (multi-line, `--trigger automatic`, `--max-tokens` as the server's `maxTokens` default),
in process with nothing cached, and the suggestion is inserted at the cursor and run against
the problem's tests (`check(entry_point)`, in a subprocess with a timeout):

- `shown_pass_pct`: the text the language server shows for the answer (lsp/postprocess.py,
  multi-line), inserted as the editor would (its range replaces what it retypes);
- `raw_pass_pct`: the engine's text inserted as it came, for a client that shows it as is;
- `stop_ok_pct`: the shown text has as many non-blank lines as the masked block: the
  suggestion stopped where the block ends (over / under: more / fewer lines);
- `generated` / `unshown`: the median tokens decoded, and those after the end of what was
  shown (decoding the user never sees, on the key they wait for).

    .venv/bin/python benchmarks/blocks.py [--model default] [--quant auto] [--limit 40]
        [--kind body block] [--max-tokens 64 ...] [--max-time-ms 0 1000 ...]
        [--trigger automatic|invoked] [--block-end on off] [--no-peers] [--json PATH]

`--block-end off` measures the engine without its stop before a line that leaves the
cursor's block (docs/engine.md, "Where a multi-line suggestion stops"): then it decodes up
to EOS or `--max-tokens`, and the language server cuts. `--max-time-ms` sets the requests'
`max_time_ms` (0: none): decoding stops at the first token after that many milliseconds and
the server shows the lines finished by then (the language server's `maxTimeMs`).

Each GGUF model also gets a llama-server row in the same run (`make bench-peers`;
`--no-peers` skips it): for every task the exact prompt codelm ran (see infill.py), greedy,
the first `--max-tokens` at most, scored raw and through the same post-processing.
"""

from __future__ import annotations

import argparse
import itertools
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers  # noqa: E402
from common import median, percentile, print_table, stderr, write_json  # noqa: E402
from infill import load_problems  # noqa: E402

MAX_TOKENS = 64  # the language server's maxTokens default
TEST_TIMEOUT_S = 10.0
KINDS = ("body", "block")


@dataclass(frozen=True, kw_only=True, slots=True)
class Task:
    task_id: str
    kind: str  # body | block
    prefix: str  # the document up to the cursor: the lines above, then the indentation
    suffix: str  # from the cursor: the line break that ends the cursor's line, the rest
    expected: str  # the masked lines, less the first one's indentation
    test: str  # the program that checks the completed document (HumanEval's check)

    @property
    def text(self) -> str:
        return self.prefix + self.suffix

    @property
    def cursor(self) -> tuple[int, int]:
        """(line, character) of the cursor, 0-based."""
        return self.prefix.count("\n"), len(self.prefix) - self.prefix.rfind("\n") - 1

    def program(self, insertion: str, replace_after: int = 0) -> str:
        """The document with `insertion` at the cursor (replacing the next `replace_after`
        characters), then the tests."""
        return self.prefix + insertion + self.suffix[replace_after:] + "\n\n" + self.test


def make_tasks(problems: list[dict], kinds: tuple[str, ...] = KINDS) -> list[Task]:
    """Per problem: its whole body, then the body of each compound statement in it."""
    tasks = []
    for problem in problems:
        prompt, solution = problem["prompt"], problem["canonical_solution"]
        lines = (prompt + solution).split("\n")
        first = prompt.count("\n")  # the solution starts on this line
        last = _last_content(lines, first, len(lines))
        test = f"{problem['test']}\n\ncheck({problem['entry_point']})\n"
        spans = []
        if "body" in kinds and last > first:
            spans.append(("body", first, last))
        if "block" in kinds:
            for i in range(first, last):
                end = _block_end(lines, i)
                if end is not None:
                    spans.append(("block", i + 1, end))
        for kind, start, end in spans:
            start = next(j for j in range(start, end) if lines[j].strip())
            indent = _indent(lines[start])
            prefix = "\n".join(lines[:start] + [indent])
            expected = "\n".join(lines[start:end])[len(indent) :]
            suffix = "\n" + "\n".join(lines[end:]) if end < len(lines) else ""
            tasks.append(
                Task(
                    task_id=problem["task_id"],
                    kind=kind,
                    prefix=prefix,
                    suffix=suffix,
                    expected=expected,
                    test=test,
                )
            )
    return tasks


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def _last_content(lines: list[str], start: int, end: int) -> int:
    """One past the last non-blank line of lines[start:end]."""
    for j in range(end, start, -1):
        if lines[j - 1].strip():
            return j
    return start


def _block_end(lines: list[str], i: int) -> int | None:
    """One past the last non-blank line of the block that line `i` opens (a line ending in
    `:` followed by deeper lines), or None where it opens none."""
    code = lines[i].split("#", 1)[0].rstrip()
    if not code.endswith(":"):
        return None
    depth = len(_indent(lines[i]))
    j = i + 1
    while j < len(lines) and (not lines[j].strip() or len(_indent(lines[j])) > depth):
        j += 1
    end = _last_content(lines, i + 1, j)
    return end if end > i + 1 else None


def passes(program: str, timeout_s: float = TEST_TIMEOUT_S) -> bool:
    """Whether `program` runs to its end (the tests pass) within `timeout_s`."""
    with tempfile.TemporaryDirectory(prefix="codelm-blocks-") as folder:
        try:
            done = subprocess.run(
                [sys.executable, "-I", "-c", program],
                cwd=folder,
                capture_output=True,
                timeout=timeout_s,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            return False
    return done.returncode == 0


def _request(task: Task, trigger: str, max_tokens: int, max_time_ms: int | None = None):
    from codelm.daemon.protocol import CompleteRequest

    line, character = task.cursor
    return CompleteRequest(
        uri=f"file:///humaneval/{task.task_id.replace('/', '_')}.py",
        text=task.text,
        line=line,
        character=character,
        language="python",
        trigger=trigger,
        single_line=False,
        max_tokens=max_tokens,
        max_time_ms=max_time_ms,
    )


def shown(task: Task, response) -> tuple[str, int]:
    """What the language server shows for the daemon's `response` at the task's cursor: the
    text and how many characters after the cursor it replaces (("", 0) for nothing)."""
    from codelm.lsp.completion import suggestions_from_response
    from codelm.lsp.postprocess import Context, postprocess

    context = Context(
        prefix=task.prefix, suffix=task.suffix, is_single_line=False, language="python"
    )
    for suggestion in suggestions_from_response(response, task.text, len(task.prefix)):
        if (shaped := postprocess(suggestion, context)) is not None:
            return shaped.text, shaped.replace_after
    return "", 0


def _response_for_peer(task: Task, text: str, stopped_at_limit: bool):
    """llama-server's text as a daemon answer at the task's cursor (for `shown`)."""
    from codelm.daemon.protocol import CompleteResponse, CompletionItem, Position, Range, Timings

    line, character = task.cursor
    here = Position(line=line, character=character)
    return CompleteResponse(
        items=[CompletionItem(text=text, range=Range(start=here, end=here))],
        timings=Timings(),
        stop_reason="max_tokens" if stopped_at_limit else "eos",
    )


def _lines(text: str) -> int:
    return sum(1 for line in text.split("\n") if line.strip())


def scored(task: Task, raw: str, shown_text: str, replace_after: int) -> dict:
    """A task's record: both insertions run against the tests, and where the shown one
    stopped against the masked block."""
    expected, got = _lines(task.expected), _lines(shown_text)
    return {
        "task": task.task_id,
        "kind": task.kind,
        "expected": task.expected,
        "raw": raw,
        "shown": shown_text,
        "raw_pass": passes(task.program(raw)),
        "shown_pass": passes(task.program(shown_text, replace_after)),
        "lines": got,
        "expected_lines": expected,
    }


def _no_block_end():
    """The engine without its block-end stop (daemon/stops.py), patched in."""
    from codelm.daemon.engine import engine as engine_module

    return mock.patch.object(engine_module, "block_line", lambda text, cursor: None)


def run(
    model: str,
    quant: str,
    tasks: list[Task],
    trigger: str,
    variants: list[tuple[int, bool, int]],
    log=print,
):
    """For each (max_tokens, block_end, max_time_ms) of `variants`, on one engine: codelm's
    row, its records and, per task, the prompt llama-server gets."""
    from codelm.daemon.engine import EngineConfig, load_engine

    t0 = time.perf_counter()
    engine = load_engine(EngineConfig(model=model, quant=quant))
    load_s = time.perf_counter() - t0
    results = []
    for max_tokens, block_end, max_time_ms in variants:
        with nullcontext() if block_end else _no_block_end():
            records, peer_prompts = _run_tasks(
                engine, tasks, trigger, (max_tokens, max_time_ms or None),
                f"{model} {quant} {max_tokens} {max_time_ms or '-'} ms", log,
            )  # fmt: skip
        row = {"system": f"codelm {engine.info['quant']}", "model": model, "trigger": trigger}
        row |= {"max_tokens": max_tokens, "block_end": "on" if block_end else "off"}
        row |= {"max_time_ms": max_time_ms or "-"}
        results.append(
            (row | _scores(records) | {"load_s": round(load_s, 1)}, records, peer_prompts)
        )
    return results


def _run_tasks(engine, tasks: list[Task], trigger: str, limits: tuple, what: str, log):
    """`limits`: (max_tokens, max_time_ms or None)."""
    records, peer_prompts = [], []
    engine.complete(_request(tasks[0], trigger, 4))  # first-call costs stay out
    for task in tasks:
        request = _request(task, trigger, *limits)
        # Each task cold: what an earlier request left in the file's cache (K/V the decode
        # kernels computed, its suggestion as a draft) would make rows depend on their order.
        engine.close_document(request.uri)
        peer_prompts.append(peers.prompt_for_peer(engine.tokenizer, engine.prompt(request))[0])
        t1 = time.perf_counter()
        response = engine.complete(request)
        ms = (time.perf_counter() - t1) * 1000
        item = response.items[0]
        text, replace_after = shown(task, response)
        generated = response.timings.generated_tokens
        # the decoded tokens after the end of the shown text (the healed ones it retypes
        # are part of both)
        shown_tokens = len(engine.tokenizer.encode(text)) if text else 0
        records.append(
            scored(task, _after_cursor(task, item), text, replace_after)
            | {"ms": round(ms, 1), "stop": response.stop_reason, "generated": generated}
            | {"unshown": max(0, generated - shown_tokens)}
        )
        _progress(log, what, records, len(tasks))
    return records, peer_prompts


def _after_cursor(task: Task, item) -> str:
    """The item's text less what it retypes before the cursor (token healing)."""
    line, character = task.cursor
    start = item.range.start
    typed = character - start.character if start.line == line else 0
    return item.text[typed:]


def run_peer(model: str, tasks: list[Task], prompts: list[str], max_tokens: int, log=print):
    """llama-server on the same GGUF with the prompts codelm ran; None without a GGUF."""
    server = peers.server_for(model, log)
    if server is None:
        return None
    records = []
    with server:
        for task, prompt in zip(tasks, prompts, strict=True):
            result = server.complete(prompt, n_predict=max_tokens, stream=False)
            generated = int(result.timings.get("predicted_n", 0))
            response = _response_for_peer(task, result.text, generated >= max_tokens)
            text, replace_after = shown(task, response)
            records.append(
                scored(task, result.text, text, replace_after)
                | {"ms": round(result.total_ms, 1), "generated": generated}
            )
            _progress(log, f"{model} llama-server", records, len(tasks))
    row = {"system": "llama-server", "model": model, "trigger": "same prompts"}
    row |= {"max_tokens": max_tokens}
    return row | _scores(records), records


def _scores(records: list[dict]) -> dict:
    n = max(1, len(records))

    def pct(predicate) -> float:
        return round(100 * sum(1 for r in records if predicate(r)) / n, 1)

    times = [r["ms"] for r in records]
    return {
        "tasks": len(records),
        "shown_pass_pct": pct(lambda r: r["shown_pass"]),
        "raw_pass_pct": pct(lambda r: r["raw_pass"]),
        "stop_ok_pct": pct(lambda r: r["lines"] == r["expected_lines"]),
        "over_pct": pct(lambda r: r["lines"] > r["expected_lines"]),
        "under_pct": pct(lambda r: r["lines"] < r["expected_lines"]),
        "generated": median([r["generated"] for r in records]),
        "unshown": median([r.get("unshown", 0) for r in records])
        if "unshown" in records[0]
        else "",
        "p50_ms": median(times),
        "p90_ms": percentile(times, 90),
    }


def _progress(log, what: str, records: list[dict], total: int) -> None:
    if len(records) % 20 == 0:
        passed = sum(r["shown_pass"] for r in records)
        log(f"  {what}: {len(records)}/{total}, {passed} pass")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["default"])
    parser.add_argument("--quant", nargs="+", default=["auto"])
    parser.add_argument("--limit", type=int, default=40, help="first N HumanEval problems")
    parser.add_argument("--kind", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--max-tokens", nargs="+", type=int, default=[MAX_TOKENS])
    parser.add_argument(
        "--max-time-ms",
        nargs="+",
        type=int,
        default=[0],
        help="the requests' max_time_ms (0: no time limit)",
    )
    parser.add_argument("--trigger", choices=["invoked", "automatic"], default="automatic")
    parser.add_argument(
        "--block-end",
        nargs="+",
        choices=["on", "off"],
        default=["on"],
        help="the engine stops before a line that leaves the block (off: max tokens or EOS)",
    )
    parser.add_argument(
        "--no-peers", action="store_true", help="no llama-server row (one per GGUF model)"
    )
    parser.add_argument("--json", default=None, help="where to write the results JSON")
    args = parser.parse_args(argv)
    tasks = make_tasks(load_problems()[: args.limit], tuple(args.kind))
    print(f"{args.limit} HumanEval problems, {len(tasks)} blocks", file=sys.stderr)
    rows, details = [], {}
    peer_note = "" if args.no_peers or peers.available() else peers.NOT_BUILT
    for model in args.model:
        prompts: list[str] = []
        block_end = [b == "on" for b in args.block_end]
        variants = list(itertools.product(args.max_tokens, block_end, args.max_time_ms))
        for quant in args.quant:
            results = run(model, quant, tasks, args.trigger, variants, stderr)
            prompts = results[0][2]  # (the same for every variant)
            for row, records, _ in results:
                rows.append(row)
                key = f"{model}/{quant}/{row['max_tokens']}/block-end-{row['block_end']}"
                key += f"/time-{row['max_time_ms']}"
                details[key] = records
        if not (args.no_peers or peer_note):
            peer = run_peer(model, tasks, prompts, args.max_tokens[0], stderr)
            if peer is not None:
                rows.append(peer[0])
                details[f"{model}/llama-server"] = peer[1]
    if peer_note:
        print(f"llama-server rows: {peer_note}", file=sys.stderr)
    columns = ["system", "model", "trigger", "max_tokens", "max_time_ms", "block_end", "tasks"]
    columns += ["shown_pass_pct", "raw_pass_pct"]
    columns += ["stop_ok_pct", "over_pct", "under_pct", "generated", "unshown", "p50_ms", "p90_ms"]
    print_table(rows, columns)
    payload = {"limit": args.limit, "rows": rows, "tasks": details}
    out = write_json("blocks", payload, args.json)
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
