"""Smoke run of the speed benchmark on a tiny model: it runs, and its JSON holds what the README table needs."""

import json
import subprocess
import sys
from pathlib import Path

SPEED = Path(__file__).resolve().parent.parent / "benchmarks" / "speed.py"


def test_speed_benchmark_smoke(tmp_path):
    out = tmp_path / "speed.json"
    subprocess.run([sys.executable, str(SPEED), "--model", "tiny", "--rounds", "2", "--seq", "16", "--output", str(out)],
                   check=True, capture_output=True)
    result = json.loads(out.read_text())
    variants = {"lora", "warmup", "switched", "lora_same", "plus_switched"}
    assert set(result["median_step_seconds"]) == variants == set(result["peak_memory_bytes"])
    assert all(len(times) == 2 and min(times) > 0 for times in result["step_seconds"].values())
    trainable = result["trainable_parameters"]
    # after the switch: exactly LoRA on the kept modules, half of the adapters of the tiny model
    assert trainable["switched"] == trainable["lora_same"] < trainable["lora"]
    assert trainable["warmup"] == trainable["lora"] + 14  # plus omega, one entry per adapter
    assert 0 < result["switch_seconds"]["switched"] < 1
    assert set(result["ratios"]) == {"warmup", "switched", "plus_switched"}
