"""How every data stage's cost grows with the number of documents, through the real ``llmflow run``.

Usage (from the repository root, project venv active)::

    python bench/scale.py --docs 10000 100000 1000000 --runners threads processes dask \\
        --layout files --out bench/scale.md [--work /tmp/llmflow-scale] [--max-workers 2]

For each size the corpus is generated once (bench/scale_corpus.py: Gutenberg and NLTK paragraphs,
1-3 KB per document, 2% exact and 2% near copies, 5% with a contact line) in the chosen layout
(``files``: 5,000 documents per JSONL file; ``big``: one file). For each runner, a fresh workdir
gets a config (``runner``, ``max_workers``, the corpus as the crawl's seed) and each stage runs
as its own ``llmflow run --stages <stage>`` command, measured with its whole process tree
(bench/process_tree.py: CPU time by rusage after reaping every descendant, Prefect's API server
and ProcessPool/Dask workers included; memory by sampling /proc every 0.25 s).

Each invocation pays a fixed cost (interpreter and imports, Prefect's API server, MLflow) that
no document causes. ``--baseline-docs`` (100) runs the same stages on a corpus that small first;
its CPU time is subtracted, so *net CPU-s per 1,000 documents* is the marginal cost the
linearity goal is about. Its corpus has one file per worker, so it starts every worker (a
one-file baseline started one, and the processes runner's second worker's imports counted as
marginal cost). ``--docs`` may be given no sizes, to re-run
the baseline alone. Every measurement accumulates in ``--results`` (JSON, one row per
size x runner x layout x stage, a re-run replacing its rows), and ``--out`` is rendered from
all of them, so sizes run on different days share one table.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from process_tree import MeasuredProcess, load_average, machine_facts  # noqa: E402
from scale_corpus import ensure_corpus  # noqa: E402

STAGES = ("crawl", "normalize", "quality", "dedup", "quality_model", "toxicity", "pii")
# Stages whose units are one shard each: their memory should not grow with the documents.
PER_SHARD = ("crawl", "normalize", "quality", "quality_model", "toxicity", "pii")
CURATION = ("normalize", "quality", "dedup", "quality_model", "toxicity", "pii")
LINEAR_TOLERANCE = 0.15
WALL_GOAL_S = 45 * 60  # normalize -> pii at 1M documents on 2 cores
DEDUP_GOAL_BYTES = 300
MB = 2**20
FULL = [
    "python bench/scale.py --docs 10000 100000 1000000 --runners threads processes dask"
    " --layout files",
    "python bench/scale.py --docs 100000 1000000 --runners threads --layout big",
]


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(BENCH), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        )
        dirty = subprocess.run(
            ["git", "-C", str(BENCH), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def llmflow_command() -> list[str]:
    beside = Path(sys.executable).parent / "llmflow"
    found = str(beside) if beside.exists() else shutil.which("llmflow")
    if found is None:
        sys.exit("no llmflow command: run from the project venv (make setup)")
    return [found]


def stage_manifest(workdir: Path, stage: str) -> dict[str, Any]:
    from llmflow.flows.config import DataLayout, PipelineConfig

    layout = DataLayout.of(PipelineConfig(workdir=str(workdir)))
    path = Path(layout.stage_dir(stage)) / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else {}


def run_stages(
    docs: int, runner: str, layout: str, args: argparse.Namespace, baseline: bool = False
) -> list[dict[str, Any]]:
    """One corpus through the stages on one runner, each stage its own measured command."""
    corpus_dir = args.work / "corpus" / str(docs)
    # The baseline is split into one file per worker, so it starts the same worker processes
    # (and pays their imports) that a measured size does: else the processes runner's second
    # worker counts as marginal cost.
    per_file = -(-docs // args.max_workers) if baseline and layout == "files" else 5_000
    corpus = ensure_corpus(corpus_dir, docs, layout, args.seed, per_file)
    workdir = args.work / f"run-{layout}-{runner}-{docs}"
    shutil.rmtree(workdir, ignore_errors=True)  # fresh: no unit may be skipped as done
    (workdir / "logs").mkdir(parents=True)
    config = {
        "workdir": str(workdir),
        "runner": runner,
        "max_workers": args.max_workers,
        "crawl": {"seeds": [str(corpus_dir / layout)]},
    }
    config_path = workdir / "bench-config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    rows = []
    for stage in args.stages:
        command = [*llmflow_command(), "run", "-c", str(config_path), "--stages", stage]
        load_before = load_average()
        measured = MeasuredProcess(
            command, log=workdir / "logs" / f"bench-{stage}.log", cwd=workdir
        )
        try:
            tree = measured.wait(args.stage_timeout)
        except subprocess.TimeoutExpired:
            measured.kill_tree()
            tree = measured.wait()
        manifest = stage_manifest(workdir, stage)
        counts = manifest.get("counts", {})
        row = {
            "docs": docs,
            "runner": runner,
            "layout": layout,
            "stage": stage,
            "baseline": baseline,
            "returncode": tree.returncode,
            "docs_in": counts.get("docs_in", 0),
            "kept": counts.get("kept", 0),
            "units": len(manifest.get("shards", [])),
            "rejected_by_reason": counts.get("rejected_by_reason", {}),
            "stats": manifest.get("stats", {}),  # what the stage found (pii spans, clusters...)
            "wall_s": round(tree.wall_s, 2),
            "cpu_s": round(tree.cpu_s, 2),
            "sampled_cpu_s": round(tree.sampled_cpu_s, 2),
            "peak_tree_mb": round(tree.peak_tree_rss / MB, 1),
            "peak_process_mb": round(tree.peak_process_rss / MB, 1),
            "max_processes": tree.max_processes,
            "load_before": load_before,
            "load_after": load_average(),
            "corpus_bytes": corpus["bytes"],
            "commit": args.commit,
            "max_workers": args.max_workers,
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        }
        rows.append(row)
        print(
            f"{docs:>9,} {runner:9} {layout:5} {stage:9} in {row['docs_in']:>9,}"
            f" kept {row['kept']:>9,} wall {row['wall_s']:8.1f} s CPU {row['cpu_s']:8.1f} s"
            f" tree {row['peak_tree_mb']:7.0f} MB rc {tree.returncode}",
            flush=True,
        )
        if tree.returncode != 0:
            print(f"  failed: see {workdir / 'logs' / f'bench-{stage}.log'}", flush=True)
            break
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return rows


# ---------------------------------------------------------------------------------------------
# Results: accumulated in JSON, rendered as Markdown


def _key(row: dict[str, Any]) -> tuple[Any, ...]:
    return (row["docs"], row["runner"], row["layout"], row["stage"], row["baseline"])


def merge(
    path: Path,
    rows: list[dict[str, Any]],
    meta: dict[str, Any],
    key: Callable[[dict[str, Any]], tuple[Any, ...]] = _key,
) -> dict[str, Any]:
    """Add ``rows`` to the results file (replacing rows of the same key) and ``meta`` to its
    runs; written after every corpus and runner, so a long run that dies keeps what it measured."""
    results: dict[str, Any] = {"rows": [], "runs": []}
    if path.exists():
        results = json.loads(path.read_text())
    fresh = {key(r) for r in rows}
    results["rows"] = [r for r in results["rows"] if key(r) not in fresh] + rows
    # this invocation's record, replaced as it goes on
    results["runs"] = [m for m in results["runs"] if m["id"] != meta["id"]] + [meta]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    return results


Groups = dict[tuple[str, str, str], dict[str, Any]]


def _fixed(rows: list[dict[str, Any]]) -> Groups:
    return {(r["runner"], r["layout"], r["stage"]): r for r in rows if r["baseline"]}


def net_per_1k(row: dict[str, Any], fixed: Groups) -> float | None:
    """CPU-s per 1,000 documents above the fixed cost of an invocation (the baseline's)."""
    base = fixed.get((row["runner"], row["layout"], row["stage"]))
    if base is None or row["docs_in"] <= base["docs_in"]:
        return None
    return (row["cpu_s"] - base["cpu_s"]) / (row["docs_in"] - base["docs_in"]) * 1000


def md_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def md_head(columns: list[str], text_columns: int) -> list[str]:
    """A table's header and rule: the first ``text_columns`` left-aligned, numbers right."""
    rule = ["---"] * text_columns + ["---:"] * (len(columns) - text_columns)
    return [md_row(columns), md_row(rule)]


def _num(value: float | None, digits: int = 2, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}{unit}"


def _groups(rows: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    seen: dict[tuple[str, str, str], None] = {}
    for r in rows:
        seen[(r["runner"], r["layout"], r["stage"])] = None
    order = {s: i for i, s in enumerate(STAGES)}
    return sorted(seen, key=lambda g: (g[0], g[1], order.get(g[2], 99)))


def _by_size(measured: list[dict[str, Any]]) -> dict[tuple[Any, ...], dict[str, Any]]:
    return {(r["runner"], r["layout"], r["stage"], r["docs"]): r for r in measured}


def _linearity(measured: list[dict[str, Any]], fixed: Groups, sizes: list[int]) -> list[str]:
    by = _by_size(measured)
    out = [
        "",
        f"## CPU-s per 1,000 documents, net (goal: within ±{LINEAR_TOLERANCE:.0%} from the"
        " smallest size to the largest)",
        "",
        *md_head(
            ["runner", "layout", "stage", *(f"{n:,}" for n in sizes), "deviation", "within"], 3
        ),
    ]
    for group in _groups(measured):
        values = [net_per_1k(by[(*group, n)], fixed) if (*group, n) in by else None for n in sizes]
        known = [v for v in values if v is not None]
        dev, verdict = None, "n/a"
        if len(known) >= 2 and known[0] > 0:
            dev = max(abs(v / known[0] - 1) for v in known) * 100
            verdict = "yes" if dev <= LINEAR_TOLERANCE * 100 else "**no**"
        cells = [*group, *(_num(v, 3) for v in values), _num(dev, 0, "%"), verdict]
        out.append(md_row(cells))
    return out


def _memory(measured: list[dict[str, Any]], fixed: Groups, sizes: list[int]) -> list[str]:
    by = _by_size(measured)
    out = [
        "",
        "## Peak memory of the tree, MB (goal: flat in documents for the per-shard stages;"
        f" dedup ≤ {DEDUP_GOAL_BYTES} B per document above the baseline)",
        "",
        *md_head(
            ["runner", "layout", "stage", *(f"{n:,}" for n in sizes)]
            + ["largest / smallest", "B per doc above baseline (largest size)"],
            3,
        ),
    ]
    for group in _groups(measured):
        rows = [by.get((*group, n)) for n in sizes]
        known = [r for r in rows if r is not None]
        ratio = None
        if len(known) >= 2 and known[0]["peak_tree_mb"]:
            ratio = known[-1]["peak_tree_mb"] / known[0]["peak_tree_mb"]
        base, per_doc = fixed.get(group), None
        if base is not None and known and known[-1]["docs_in"]:
            grown = known[-1]["peak_tree_mb"] - base["peak_tree_mb"]
            per_doc = grown * MB / known[-1]["docs_in"]
        stage = f"{group[2]} ({'per shard' if group[2] in PER_SHARD else 'whole input'})"
        peaks = [_num(None if r is None else r["peak_tree_mb"], 0) for r in rows]
        out.append(
            md_row([group[0], group[1], stage, *peaks, _num(ratio, 2, "x"), _num(per_doc, 0)])
        )
    return out


def _curation_wall(measured: list[dict[str, Any]], fixed: Groups, sizes: list[int]) -> list[str]:
    by = _by_size(measured)
    out = [
        "",
        f"## normalize → pii wall time (goal at 1,000,000 documents: ≤ {WALL_GOAL_S // 60} min"
        " on 2 cores)",
        "",
        "Sum of the five stages' commands (fixed costs included). *Projected*: the wall time above"
        " the baseline's, scaled linearly to 1M documents, plus the baseline's.",
        "",
        *md_head(["runner", "layout", "documents", "wall s", "projected at 1M, min"], 2),
    ]
    for runner, layout in sorted({(r["runner"], r["layout"]) for r in measured}):
        base = [fixed.get((runner, layout, s)) for s in CURATION]
        base_wall = sum(b["wall_s"] for b in base if b is not None)
        for n in sizes:
            stages = [by.get((runner, layout, s, n)) for s in CURATION]
            if any(s is None for s in stages):
                continue
            wall = sum(s["wall_s"] for s in stages if s is not None)
            projected = ((wall - base_wall) / n * 1_000_000 + base_wall) / 60
            out.append(md_row([runner, layout, f"{n:,}", f"{wall:,.0f}", _num(projected, 0)]))
    return out


def md_preamble(
    title: str, script: str, full: list[str], results: dict[str, Any], note: str | None
) -> list[str]:
    """Title, the note (smoke figures...), the commands of the full measurement, the machine
    and every command that made the rows."""
    out = [f"# {title}", ""] + ([f"**{note}**", ""] if note else [])
    machine = results["runs"][-1]["machine"]
    out += [
        f"Produced by `bench/{script}.py` (its docstring says how it measures). The full"
        " measurement of issue 16's goals (results accumulate, so the commands may run apart):",
        "",
        "```",
        *full,
        "```",
        "",
        "Machine: " + "; ".join(f"{k} {v}" for k, v in machine.items()) + ". It is shared:"
        " wall time counts waiting for a core while others work, so the load average (1, 5,"
        " 15 min) of each command is given; CPU seconds are the figures to compare.",
        "",
        *md_head(["started", "command", "commit", "load before", "load after"], 5),
    ]
    for run in results["runs"]:
        cells = [run["started"], f"`{run['command']}`", run["commit"], run["load_before"]]
        out.append(md_row([*cells, run["load_after"]]))
    return out


def render(results: dict[str, Any], note: str | None) -> str:
    rows = [r for r in results["rows"] if r["returncode"] == 0]
    measured = [r for r in rows if not r["baseline"]]
    fixed = _fixed(rows)
    sizes = sorted({r["docs"] for r in measured})
    title = "Growth: every data stage from 10k to 1M documents"
    out = md_preamble(title, "scale", FULL, results, note)
    out += [
        "",
        "CPU seconds: user + system of the whole process tree of the stage's `llmflow run`"
        " (Prefect's API server, ProcessPool and Dask workers included), by rusage after every"
        " descendant is reaped. Peak memory: *tree* = the largest sum of RSS over the tree's"
        " processes at one 0.25 s sample; *largest process* = the highest VmHWM of any one"
        " process. *Net* CPU-s per 1,000 documents = (CPU s − the same stage's CPU s on the"
        f" {', '.join(sorted({str(r['docs']) for r in rows if r['baseline']})) or '(none)'}"
        "-document baseline) / (documents in − the baseline's) × 1,000: the marginal cost, without"
        " the fixed cost of an invocation.",
        "",
    ]
    out += _linearity(measured, fixed, sizes) + _memory(measured, fixed, sizes)
    out += _curation_wall(measured, fixed, sizes)
    out += [
        "",
        "## Every measurement",
        "",
        *md_head(
            ["docs", "runner", "layout", "stage", "load before → after", "docs in", "kept"]
            + ["units", "wall s", "CPU s", "cores", "CPU-s / 1k docs", "net CPU-s / 1k"]
            + ["peak tree MB", "largest process MB", "processes"],
            5,
        ),
    ]
    order = {s: i for i, s in enumerate(STAGES)}
    for r in sorted(
        rows, key=lambda r: (r["runner"], r["layout"], r["docs"], order.get(r["stage"], 99))
    ):
        per_1k = r["cpu_s"] / r["docs_in"] * 1000 if r["docs_in"] else None
        label = f"{r['docs']:,}" + (" (baseline)" if r["baseline"] else "")
        load = f"{r['load_before'].split()[0]} → {r['load_after'].split()[0]}"
        net = None if r["baseline"] else net_per_1k(r, fixed)
        cells = [label, r["runner"], r["layout"], r["stage"], load, f"{r['docs_in']:,}"]
        cells += [f"{r['kept']:,}", str(r["units"]), f"{r['wall_s']:,.1f}", f"{r['cpu_s']:,.1f}"]
        cells += [f"{r['cpu_s'] / r['wall_s']:.2f}", _num(per_1k, 3), _num(net, 3)]
        cells += [f"{r['peak_tree_mb']:,.0f}", f"{r['peak_process_mb']:,.0f}"]
        out.append(md_row([*cells, str(r["max_processes"])]))
    failed = [r for r in results["rows"] if r["returncode"] != 0]
    if failed:
        out += [
            "",
            "Failed commands (left out above): "
            + ", ".join(
                f"{r['stage']} at {r['docs']:,} on {r['runner']}/{r['layout']}"
                f" (rc {r['returncode']})"
                for r in failed
            ),
        ]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, nargs="*", default=[10_000])
    parser.add_argument(
        "--runners", nargs="+", default=["threads"], choices=["threads", "processes", "dask"]
    )
    parser.add_argument("--layout", choices=["files", "big"], default="files")
    parser.add_argument(
        "--stages",
        type=lambda s: s.split(","),
        default=list(STAGES),
        help="comma-separated, in order",
    )
    parser.add_argument("--max-workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument(
        "--baseline-docs", type=int, default=100, help="fixed-cost run size; 0: none"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--work", type=Path, default=Path("/tmp/llmflow-scale"), help="corpora and workdirs"
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=None,
        help="JSON of every measurement (default: WORK/scale-results.json)",
    )
    parser.add_argument("--out", type=Path, default=BENCH / "scale.md")
    parser.add_argument("--note", default=None, help="a line printed in bold at the top of --out")
    parser.add_argument(
        "--stage-timeout",
        type=float,
        default=None,
        help="seconds; a stage running longer is killed",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the workdirs (default: removed after each run)"
    )
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the measured tree is killed
    unknown = [s for s in args.stages if s not in STAGES]
    if unknown:
        parser.error(f"--stages: unknown {unknown}; known: {','.join(STAGES)}")
    args.commit = git_commit()
    results_path = args.results or args.work / "scale-results.json"
    meta = {
        "id": f"{time.time():.0f}-{os.getpid()}",
        "load_after": "",
        "command": "python bench/scale.py "
        + shlex.join(argv if argv is not None else sys.argv[1:]),
        "commit": args.commit,
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_before": load_average(),
        "machine": machine_facts(),
    }
    merge(results_path, [], meta)
    for runner in args.runners:
        sizes = ([(args.baseline_docs, True)] if args.baseline_docs else []) + [
            (n, False) for n in args.docs
        ]
        for docs, baseline in sizes:
            rows = run_stages(docs, runner, args.layout, args, baseline)
            meta["load_after"] = load_average()
            results = merge(results_path, rows, meta)
            args.out.write_text(render(results, args.note))
    print(f"wrote {args.out} (all results: {results_path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
