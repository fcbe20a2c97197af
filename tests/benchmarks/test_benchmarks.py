"""Smoke runs of the benchmarks with tiny budgets: they run, and their JSON holds what the README tables need."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # benchmark smoke runs, the quality one on the real SmolLM2

SPEED = Path(__file__).resolve().parents[2] / "benchmarks" / "speed.py"


def test_speed_benchmark_smoke(tmp_path):
    out = tmp_path / "speed.json"
    subprocess.run(
        [sys.executable, str(SPEED), "--model", "tiny", "--rounds", "2", "--seq", "16", "--output", str(out)],
        check=True,
        capture_output=True,
    )
    result = json.loads(out.read_text())
    variants = {"lora", "warmup", "warmup_hooks", "switched", "lora_same", "plus_switched"}
    assert set(result["median_step_seconds"]) == variants == set(result["peak_memory_bytes"])
    assert all(len(times) == 2 and min(times) > 0 for times in result["step_seconds"].values())
    trainable = result["trainable_parameters"]
    # after the switch: exactly LoRA on the kept modules, half of the adapters of the tiny model
    assert trainable["switched"] == trainable["lora_same"] < trainable["lora"]
    assert trainable["warmup"] == trainable["warmup_hooks"] == trainable["lora"] + 14  # plus omega, one per adapter
    assert 0 < result["switch_seconds"]["switched"] < 1
    assert set(result["ratios"]) == {"warmup", "warmup_hooks", "switched", "plus_switched"}
    assert result["settings"]["adapters"] == 14


QUALITY = SPEED.parent / "quality.py"


def test_quality_benchmark_smoke(tmp_path):
    """The quality benchmark end to end on the real SmolLM2 and GSM8K with a tiny budget: two methods over two
    seeds, a one-point K sweep, and lm-eval exact match on one question. Checks the JSON the README table reads."""
    from wlora_trl._offline.data import resolve_data_dir

    if resolve_data_dir() is None:
        pytest.skip("no local data folder (shared/data or WLORA_TRL_DATA_DIR)")
    out = tmp_path / "quality.json"
    flags = [
        "--seeds",
        "0",
        "1",
        "--methods",
        "lora",
        "weightlora",
        "--max_steps",
        "3",
        "--selection_steps",
        "2",
        "--batch_size",
        "1",
        "--max_length",
        "128",
        "--train_samples",
        "8",
        "--heldout_samples",
        "2",
        "--em_limit",
        "1",
        "--sweep",
        "--sweep_k",
        "0.25",
        "--sweep_T",
        "--work_dir",
        str(tmp_path / "work"),
        "--output",
        str(out),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(QUALITY), *flags], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    summary = result["summary"]
    for name in ("lora", "weightlora"):
        losses = summary[name]["heldout_loss"]["values"]
        assert len(losses) == 2 and all(0 < loss < 10 for loss in losses)
        assert [0 <= em <= 1 for em in summary[name]["exact_match"]["values"]] == [True, True]
    # SmolLM2: 210 adapters of rank 8; WeightLoRA keeps 105 of them, so it trains fewer parameters than LoRA.
    assert 0 < summary["weightlora"]["trainable_parameters"] < summary["lora"]["trainable_parameters"]
    assert summary["lora"]["kept_jaccard_across_seeds"] is None
    assert 0 <= summary["weightlora"]["kept_jaccard_across_seeds"] <= 1
    kept = [run["kept"] for run in result["runs"]["weightlora"]]
    assert [len(k) for k in kept] == [105, 105]
    assert len(result["sweeps"]["k"]["0.25"]["kept"]) == 52 and result["sweeps"]["k"]["0.5"]["kept"] == kept[0]
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    table = out.with_suffix(".md").read_text()
    loss = summary["weightlora"]["heldout_loss"]
    assert f"| weightlora | {loss['mean']:.4f} ± {loss['std']:.4f} |" in table
    assert "| 0.25 |" in table and "| 0.5 |" in table  # the K sweep's points
