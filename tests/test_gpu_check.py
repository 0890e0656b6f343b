"""The GPU check's CPU smoke test: its throughput step (``bench/train_throughput.py --json``, the
same code an H100 runs at gpt2-small) runs at the tiny size on the CPU, and the report
(``bench/gpu_throughput.py --mode report``) shows its table, both models in it;
``bench/gpu_check.sh`` parses; the report reads the planner's output."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


def _load(name: str) -> ModuleType:
    """A bench script as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def table_rows(text: str) -> list[list[str]]:
    """The markdown table's rows (header first, the |---| line left out), as cells."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines]


def test_throughput_step_and_report_run_on_cpu_at_tiny_size(tmp_path: Path) -> None:
    out = tmp_path / "throughput.json"
    command = [
        sys.executable,
        str(BENCH / "train_throughput.py"),
        "--device",
        "cpu",
        "--preset",
        "tiny",
        "--compile",
        "off",
        "--steps",
        "2",
        "--warmup-steps",
        "0",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--json",
        str(out),
    ]
    # one thread: on a busy machine two spinning threads make a tiny step take seconds
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    result = json.loads(out.read_text())
    assert {r["model"] for r in result["rows"]} == {"llmflow", "nanoGPT"}
    for row in result["rows"]:
        assert row["error"] is None and row["steps_measured"] == 2
        assert row["tokens_per_s"] > 0
        assert row["mfu"] is None and row["peak_memory_gib"] is None  # CPU: no peak, no CUDA

    md = tmp_path / "report.md"
    report = _load("gpu_throughput").main(
        ["--mode", "report", "--results", str(out), "--md", str(md)]
    )
    assert report == 0
    text = md.read_text()
    assert result["header"] in text and result["table"] in text
    columns = list(_load("train_throughput").TABLE_COLUMNS)
    rows = table_rows(text)
    assert rows[0] == columns
    (cells,) = [dict(zip(columns, row, strict=True)) for row in rows[1:] if row[0] == "off"]
    # both models measured, the ratio of their rates, and no MFU or CUDA memory on a CPU
    ours, reference = (cells[f"{m} tokens/s"] for m in ("llmflow", "nanoGPT"))
    assert float(ours.replace(",", "")) > 0 and float(reference.replace(",", "")) > 0
    assert cells["llmflow / nanoGPT"].endswith("x")
    assert cells["llmflow MFU"] == cells["nanoGPT MFU"] == "n/a"
    assert cells["peak memory llmflow / nanoGPT"] == "n/a"
    assert "## 2. Pretraining" in text and "| ddp | failed: no result |" in text


def test_gpu_check_script_parses() -> None:
    bash = shutil.which("bash")
    assert bash is not None
    proc = subprocess.run([bash, "-n", str(BENCH / "gpu_check.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_report_puts_the_planner_beside_the_measurements(tmp_path: Path) -> None:
    bench = _load("gpu_throughput")
    text_plan = bench.parse_planner(
        "batch 16 tokens/step\npredicted ~2 min at ~412,345 tokens/s, MFU 40%"
    )
    assert text_plan["tokens_per_s"] == pytest.approx(412345)
    assert text_plan["mfu"] == pytest.approx(0.40)
    json_plan = bench.parse_planner(
        json.dumps(
            {
                "predicted_tokens_per_second": 5e5,
                "predicted_mfu": 0.4,
                "memory_bytes": 2 * 1024**3,
                "micro_batch_size": 32,
                "reasons": ["0.40 MFU (assumed, with torch.compile)"],
                "text": "llmflow plan: ...",
            }
        )
    )
    assert json_plan["tokens_per_s"] == 5e5 and json_plan["mfu"] == 0.4
    assert json_plan["memory_gib"] == pytest.approx(2.0) and json_plan["mfu_assumed"]
    assert json_plan["text"] == "llmflow plan: ..."
    assert bench.parse_planner("nothing to see")["tokens_per_s"] is None

    leg = {
        "kind": "pretrain",
        "leg": "ddp",
        "status": "ok",
        "parallelism": "pretrain.parallelism=ddp",
        "preset": "tiny",
        "vocab_size": 512,
        "parameters": 918656,
        "dtype": "float32",
        "compile": False,
        "steps": 3,
        "batch_tokens": 128,
        "micro_batch": 2,
        "tokens_per_s": 100.0,
        "mfu": None,
        "peak_memory_gib": None,
        "final_loss": 6.1,
        "val_loss": 5.9,
        "wall_s": 6.0,
    }
    skipped = {"kind": "pretrain", "leg": "fsdp", "status": "skipped", "reason": "no fsdp yet"}
    files = []
    for name, data in (("ddp", leg), ("fsdp", skipped)):
        files.append(tmp_path / f"pretrain-{name}.json")
        files[-1].write_text(json.dumps(data))
    planner = tmp_path / "planner.txt"
    planner.write_text("predicted ~1 min at 250k tokens/s, MFU 38% (assumed)")
    md = tmp_path / "report.md"
    args = ["--mode", "report", "--results", *map(str, files), "--planner", str(planner)]
    assert bench.main([*args, "--md", str(md)]) == 0
    text = md.read_text()
    assert "| ddp | ok (pretrain.parallelism=ddp) |" in text
    assert "| fsdp | skipped: no fsdp yet |" in text
    assert "| predicted: `llmflow plan` | 250,000 | 38.0% (assumed) | n/a |" in text
    assert "| measured: pretrain ddp (micro batch 2) | 100 | n/a | n/a (CPU) |" in text

    planner.write_text("planner not available: this llmflow has no `llmflow plan` command")
    assert bench.main([*args, "--md", str(md)]) == 0
    assert "planner not available" in md.read_text()
