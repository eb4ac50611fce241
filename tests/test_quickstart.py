"""The README's main job, reduced (`--fast`): the whole offline journey end to end."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_fast_runs_end_to_end(tmp_path):
    spec = importlib.util.spec_from_file_location("quickstart", ROOT / "scripts" / "quickstart.py")
    quickstart = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quickstart)
    out = tmp_path / "quickstart"
    quickstart.main(out_dir=out, fast=True, accelerator="cpu")

    table = (out / "comparison.md").read_text()
    for row in ("| base model", "| LoRA", "| LLaMA-Adapter"):
        assert row in table
    for picture in ("loss_curves.png", "lora_update_heatmap.png"):
        assert (out / picture).stat().st_size > 10_000
    assert (out / "lora" / "lit_lora.safetensors").is_file() and (out / "merged" / "lit_model.safetensors").is_file()
