"""Cross-file completion: does a snippet of the file that defines a name help to write it?

Tasks come from the packages of this Python's standard library (asyncio, email, http, ...):
in a module, a line whose code uses a name (a function or class, 5+ characters, not private)
defined in exactly one sibling module is cut before that name; the engine is asked for a
single-line suggestion there (trigger "invoked", 48 tokens at most), in process. `exact_pct`:
the stripped suggestion equals the stripped rest of the line; `name_pct`: it starts with the
name (what only the other file could tell).

Rows per model and context: `none` (the document alone), `opened` (what codelm-lsp sends
for a file only opened: the sibling's outline) and `edited` (the lines around the
definition: what it sends once the user edited there), each snippet made by lsp/context.py.
Two sets of lines: `unseen`, where the module names the name nowhere else (only another
file can tell it), and `named`, where it does (the context should not hurt).

    .venv/bin/python benchmarks/crossfile.py [--model default] [--limit 40] [--json PATH]
"""

from __future__ import annotations

import argparse
import io
import random
import re
import sys
import sysconfig
import time
import tokenize
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import median, print_table, write_json  # noqa: E402

STDLIB = Path(sysconfig.get_paths()["stdlib"])
PACKAGES = [
    "asyncio",
    "json",
    "concurrent/futures",
    "email",
    "http",
    "logging",
    "importlib/metadata",
    "unittest",
]
MAX_TOKENS = 48
CONTEXTS = ("none", "opened", "edited")
_DEFINITION = re.compile(r"^\s*(?:async\s+)?(?:def|class)\s+([A-Za-z]\w{4,})", re.M)
_NAME = re.compile(r"[A-Za-z_]\w*")
_SKIPPED_LINES = ("#", "def ", "class ", "import ", "from ", "async def ")


@dataclass(frozen=True, slots=True)
class Task:
    path: Path  # the module
    line: int
    column: int  # where the name starts
    name: str
    owner: Path  # the sibling module that defines it
    owner_line: int
    unseen: bool  # the module names it nowhere else

    def text_and_expected(self) -> tuple[str, str]:
        lines = self.path.read_text().split("\n")
        expected = lines[self.line][self.column :].strip()
        lines[self.line] = lines[self.line][: self.column]
        return "\n".join(lines), expected


def make_tasks() -> list[Task]:
    """One task per line whose code (not a string or comment) uses a name of a sibling module
    (the first such name), in a fixed shuffled order."""
    tasks = []
    for package in PACKAGES:
        modules = {p: p.read_text() for p in sorted((STDLIB / package).glob("*.py"))}
        defined = {
            p: {m.group(1): text.count("\n", 0, m.start()) for m in _DEFINITION.finditer(text)}
            for p, text in modules.items()
        }
        for path, text in modules.items():
            lines = text.split("\n")
            used: set[int] = set()
            for token in _code_names(text):
                (number, column), name = token.start, token.string
                line = lines[number - 1]
                if number in used or line.lstrip().startswith(_SKIPPED_LINES):
                    continue
                if column == len(line) - len(line.lstrip()) or name in defined[path]:
                    continue
                owners = [p for p in defined if p != path and name in defined[p]]
                if len(owners) != 1:
                    continue
                used.add(number)
                unseen = len(re.findall(rf"\b{name}\b", text)) == 1
                owner = owners[0]
                tasks.append(
                    Task(path, number - 1, column, name, owner, defined[owner][name], unseen)
                )
    random.Random(0).shuffle(tasks)
    return tasks


def _code_names(text: str) -> list[tokenize.TokenInfo]:
    """The NAME tokens of a module: code, never a word of a string or a comment."""
    tokens = tokenize.generate_tokens(io.StringIO(text).readline)
    return [t for t in tokens if t.type == tokenize.NAME]


def _context(task: Task, mode: str):
    from codelm.daemon.protocol import Snippet
    from codelm.lsp.context import snippet_text

    if mode == "none":
        return ()
    edit_line = task.owner_line if mode == "edited" else None
    text = snippet_text(task.owner.read_text(), edit_line)
    return (Snippet(str(task.owner.relative_to(STDLIB)), text),)


def run(model: str, tasks: list[Task], log=print) -> tuple[list[dict], list[dict]]:
    from codelm.daemon.engine import EngineConfig, load_engine
    from codelm.daemon.protocol import CompleteRequest

    engine = load_engine(EngineConfig(model=model, cache_reuse_min_tokens=0))
    records = []
    for n, task in enumerate(tasks):
        text, expected = task.text_and_expected()
        name = str(task.path.relative_to(STDLIB))
        for mode in CONTEXTS:
            request = CompleteRequest(
                uri=f"file:///{mode}/{name}",
                path=name,
                text=text,
                line=task.line,
                character=task.column,
                trigger="invoked",
                single_line=True,
                max_tokens=MAX_TOKENS,
                context=_context(task, mode),
            )
            t0 = time.perf_counter()
            response = engine.complete(request)
            ms = (time.perf_counter() - t0) * 1000
            engine.close_document(request.uri)  # every request starts cold, alike
            got = response.items[0].text.strip()
            records.append(
                {
                    "task": f"{name}:{task.line + 1}:{task.name}",
                    "set": "unseen" if task.unseen else "named",
                    "context": mode,
                    "exact": got == expected,
                    "name": re.match(rf"{task.name}\b", got) is not None,
                    "got": got,
                    "expected": expected,
                    "ms": ms,
                    "prefilled": response.timings.prefilled_tokens,
                }
            )
        log(f"{model}: {n + 1}/{len(tasks)}")
    rows = []
    for subset in ("unseen", "named"):
        for mode in CONTEXTS:
            picked = [r for r in records if r["set"] == subset and r["context"] == mode]
            if picked:
                rows.append(
                    {
                        "model": model,
                        "set": subset,
                        "context": mode,
                        "lines": len(picked),
                        "exact_pct": 100 * sum(r["exact"] for r in picked) / len(picked),
                        "name_pct": 100 * sum(r["name"] for r in picked) / len(picked),
                        "prompt_tokens": median([r["prefilled"] for r in picked]),
                        "p50_ms": median([r["ms"] for r in picked]),
                    }
                )
    return rows, records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["default"])
    parser.add_argument("--limit", type=int, default=40, help="lines of each set")
    parser.add_argument("--json", default=None, help="where to write the results JSON")
    args = parser.parse_args(argv)
    every = make_tasks()
    unseen = [t for t in every if t.unseen][: args.limit]
    named = [t for t in every if not t.unseen][: args.limit]
    print(f"{len(unseen)} unseen + {len(named)} named lines", file=sys.stderr)
    rows, details = [], {}
    for model in args.model:
        model_rows, records = run(model, unseen + named, lambda m: print(m, file=sys.stderr))
        rows += model_rows
        details[model] = records
    columns = ["model", "set", "context", "lines", "exact_pct", "name_pct", "prompt_tokens"]
    columns.append("p50_ms")
    print_table(rows, columns)
    out = write_json("crossfile", {"rows": rows, "records": details}, args.json)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
