"""How robust each lesson's asserted figures are: every run's value, the bar, and the worst margin.

    python benchmarks/seeds.py [--seeds 0 1 2 3 4] [--threads 1 2 4] [--notebooks 03 04 ...] [--jobs N]

For each seed, trains the zoo from scratch into a cache of its own (``python -m mmlib.zoo``), then
executes every lesson notebook at that seed on one thread; at seed 0 it also executes them with
2 and 4 threads (the zoo trains on one thread whatever the machine, so those runs share seed 0's
zoo and differ only in how the lessons evaluate and train in place). Every ``assert`` of a notebook
is recorded instead of stopping it: ``assert a >= b`` gives the value `a`, the bar `b` and the margin
``a - b`` (``b - a`` for ``<``); an assert without a comparison records whether it held.

Prints one table, lesson by lesson: each asserted figure, its bar, its value in every run and the
worst margin over the runs (negative: some run fails). ``--json`` also saves the rows.
Zoo caches go under ``--cache`` (default: a temporary folder), one per seed, and are kept there.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Defined in the kernel before a notebook runs: each assert of the notebook becomes a call to it.
PRELUDE = """
def __check(text, holds, value=None, op=None, bar=None):
    import json, os
    try:
        value, bar = float(value), float(bar)
    except (TypeError, ValueError):  # a comparison of non-numbers records only whether it held
        value = bar = op = None
    with open(os.environ["MMLIB_FIGURES"], "a") as handle:
        handle.write(json.dumps({"text": text, "holds": bool(holds), "value": value, "op": op, "bar": bar}) + "\\n")
"""

OPS = {ast.GtE: ">=", ast.Gt: ">", ast.LtE: "<=", ast.Lt: "<", ast.Eq: "==", ast.NotEq: "!="}


class Asserts(ast.NodeTransformer):
    """Rewrite ``assert x`` as a record of x, and ``assert a >= b and c < d`` as one record per comparison."""

    def __init__(self, source: str) -> None:
        self.source = source

    def visit_Assert(self, node: ast.Assert):
        parts = node.test.values if isinstance(node.test, ast.BoolOp) and isinstance(node.test.op, ast.And) else [node.test]
        calls = []
        for part in parts:
            text = ast.get_source_segment(self.source, part) or ast.unparse(part)
            arguments = [ast.Constant(text), part]
            if isinstance(part, ast.Compare) and len(part.ops) == 1 and type(part.ops[0]) in OPS:
                arguments += [part.left, ast.Constant(OPS[type(part.ops[0])]), part.comparators[0]]
            calls.append(ast.Expr(ast.Call(ast.Name("__check", ast.Load()), arguments, [])))
        return calls


def rewrite(source: str) -> str:
    """A cell's source with its asserts recorded instead of raised (unchanged where it has none)."""
    if "assert" not in source:
        return source
    lines = [line for line in source.splitlines() if not line.lstrip().startswith(("!", "%"))]
    try:
        tree = ast.parse("\n".join(lines))
    except SyntaxError:
        return source
    tree = ast.fix_missing_locations(Asserts("\n".join(lines)).visit(tree))
    return ast.unparse(tree)


def run_notebook(path: Path, env: dict, figures: Path) -> float:
    """Execute notebook `path` with its asserts recorded into `figures`; returns the seconds it took."""
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.source = rewrite(cell.source)
    notebook.cells.insert(0, nbformat.v4.new_code_cell(PRELUDE))
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env, MMLIB_FIGURES=str(figures))
    start = time.perf_counter()
    try:
        NotebookClient(notebook, timeout=1800, kernel_name="python3", allow_errors=True,
                       resources={"metadata": {"path": str(path.parent)}}).execute()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        os.environ.pop("MMLIB_FIGURES", None)
    for cell in notebook.cells:  # an error that is not an assert is a failure too
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                with open(figures, "a") as handle:
                    handle.write(json.dumps({"text": f"error: {output['ename']}: {output['evalue'][:80]}", "holds": False,
                                             "value": None, "op": None, "bar": None}) + "\n")
    return time.perf_counter() - start


def margin(record: dict) -> float | None:
    if record["value"] is None:
        return 0.0 if record["holds"] else -1.0
    value, bar = record["value"], record["bar"]
    return {">=": value - bar, ">": value - bar, "<=": bar - value, "<": bar - value}.get(record["op"],
                                                                                          0.0 if record["holds"] else -1.0)


def print_table(records: dict, labels: list[str]) -> None:
    """One row per asserted figure: lesson, figure, bar, its value in each run (`labels`) and the worst margin."""
    print()
    print(f"{'lesson':<10}{'figure':<64}{'bar':>12}" + "".join(f"{label[:12]:>13}" for label in labels) + f"{'worst margin':>14}")
    for (notebook, _, text), by_run in records.items():
        any_record = next(iter(by_run.values()))
        bar = f"{any_record['op']} {any_record['bar']:.3f}" if any_record["value"] is not None else "holds"
        values = []
        for label in labels:
            record = by_run.get(label)
            values.append("-" if record is None else (f"{record['value']:.3f}" if record["value"] is not None
                                                       else ("yes" if record["holds"] else "NO")))
        margins = [margin(r) for r in by_run.values()]
        print(f"{notebook[:9]:<10}{text[:63]:<64}{bar:>12}" + "".join(f"{v:>13}" for v in values)
              + f"{min(margins):>+14.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4], help="thread counts run at the first seed")
    parser.add_argument("--notebooks", nargs="+", help="notebook name prefixes (default: all)")
    parser.add_argument("--jobs", type=int, default=None, help="zoo entries trained at once (default: cores)")
    parser.add_argument("--cache", help="folder for the per-seed zoo caches (kept)")
    parser.add_argument("--json", help="also write every record to this file")
    args = parser.parse_args()
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    if args.notebooks:
        notebooks = [n for n in notebooks if n.name.startswith(tuple(args.notebooks))]
    cache_root = Path(args.cache or tempfile.mkdtemp(prefix="seeds-"))
    runs = [(seed, 1) for seed in args.seeds] + [(args.seeds[0], t) for t in args.threads if t != 1]
    records: dict[tuple, dict] = {}  # (notebook, figure text) -> {run label: record}
    for seed, threads in runs:
        label = f"seed {seed}" + (f", {threads} threads" if threads != 1 else "")
        env = {"MMLIB_SEED": str(seed), "MMLIB_SCALE": "tiny", "MMLIB_PROGRESS": "0",
               "MMLIB_CACHE": str(cache_root / f"seed{seed}"), "OMP_NUM_THREADS": str(threads)}
        start = time.perf_counter()
        zoo = [sys.executable, "-m", "mmlib.zoo", "all"] + (["--jobs", str(args.jobs)] if args.jobs else [])
        subprocess.run(zoo, env={**os.environ, **env, "OMP_NUM_THREADS": "1"}, check=True, cwd=ROOT)
        print(f"{label}: zoo ready in {time.perf_counter() - start:.0f} s", flush=True)
        for notebook in notebooks:
            figures = Path(tempfile.mkstemp(suffix=".jsonl")[1])
            seconds = run_notebook(notebook, env, figures)
            lines = [json.loads(line) for line in figures.read_text().splitlines()]
            for i, record in enumerate(lines):
                records.setdefault((notebook.stem, i, record["text"]), {})[label] = record
            failed = sum(not r["holds"] for r in lines)
            print(f"{label}: {notebook.stem} {seconds:.0f} s, {len(lines)} checks, {failed} failed", flush=True)
    labels = [f"seed {s}" + (f", {t} threads" if t != 1 else "") for s, t in runs]
    print_table(records, labels)
    if args.json:
        Path(args.json).write_text(json.dumps([{"notebook": n, "figure": t, "runs": r} for (n, _, t), r in records.items()]))


if __name__ == "__main__":
    main()
