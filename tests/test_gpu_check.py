"""benchmarks/gpu_check.py --tiny: every row's code path runs (on the CPU here), none fails."""

import json
import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_row_of_the_gpu_check_runs_on_the_tiny_config(tmp_path):
    main = runpy.run_path(str(ROOT / "benchmarks" / "gpu_check.py"))["main"]
    rows = main(tiny=True, out=tmp_path / "gpu_check.json")
    names = [row["name"] for row in rows]
    assert len(rows) == 8 + 4 + 1  # finetuning rows, decoding rows, greedy parity
    assert any("QLoRA" in n for n in names) and any("DoRA" in n for n in names) and any("compiled" in n for n in names)
    for row in rows:
        assert not row["verdict"].startswith(("failed", "out of memory", "skipped")), row
        assert row["values"], row
    assert rows[-1]["verdict"] == "met"  # greedy tokens equal transformers'
    written = json.loads((tmp_path / "gpu_check.json").read_text())
    assert len(written["rows"]) == len(rows) and "matmul peak TFLOP/s" in written
