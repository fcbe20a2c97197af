"""The GPU validation kit (benchmarks/gpu) on the CPU: its dry run goes through every step and writes the JSON
fields the GPU kit page's tables are rendered from (tests/docs/test_benchmark_pages.py checks the committed runs
against docs/source/gpu-kit.md); its wheel pins are the versions this suite runs with."""

import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
KIT = REPO / "benchmarks" / "gpu"
sys.path.insert(0, str(KIT))

import run as kit  # noqa: E402

pytestmark = pytest.mark.slow  # the kit's whole dry run, in child processes


def test_carried_wheels_are_pinned_to_the_versions_tested_here():
    pins = {}
    for line in (KIT / "requirements.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.strip()] = version.strip()
    assert {"transformers", "peft", "trl", "datasets", "bitsandbytes"} <= set(pins)
    assert {name: metadata.version(name) for name in pins} == pins


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("kit")
    done = subprocess.run(
        [sys.executable, str(KIT / "run.py"), str(out), "--dry-run"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    return out, json.loads((out / "gpu_kit_cpu-dry-run.json").read_text())


def test_dry_run_goes_through_every_step(dry_run):
    out, summary = dry_run
    assert summary["dry_run"] is True and summary["gpu"] is None
    assert set(summary["steps"]) == {"tests", "memory", "speed:llama3-8b-shapes", "fsdp2"}  # one speed run: same code
    assert all(step["returncode"] == 0 for step in summary["steps"].values())
    outcomes = {t["name"]: t["outcome"] for t in summary["tests"]}
    # On the CPU the tests that need no CUDA run, with their GPU assertions; the CUDA-only ones are skipped.
    assert outcomes["test_bf16_with_fused_adamw_through_switch_save_and_reload"] == "passed"
    assert outcomes["test_quantized_base_through_switch_save_and_reload[nf4]"] == "passed"
    assert outcomes["test_one_process_torchrun_takes_the_ddp_rewrap_path"] == "passed"
    assert outcomes["test_switch_leaves_the_cuda_generator_alone"] == "skipped"
    assert sum(o == "passed" for o in outcomes.values()) >= 9 and "failed" not in outcomes.values()
    assert summary["checks"] and all(summary["checks"].values())
    names = {p.name for p in out.iterdir()}
    assert {"gpu_kit_cpu-dry-run.md", "memory_cpu-dry-run.json", "pytest_gpu.xml"} <= names
    # What comes back from the GPU machine: at most 8 files, no folders
    assert len(names) + 1 <= 8 and all(p.is_file() for p in out.iterdir())  # + run.sh's run.log


def test_dry_run_has_the_fields_the_gpu_kit_page_reads(dry_run):
    out, summary = dry_run
    assert set(summary["speed"]) == {name for name, (_, dry_flags) in kit.SPEED_RUNS.items() if dry_flags}
    for speed in summary["speed"].values():
        assert set(speed["ratios"]) == {"warmup", "warmup_hooks", "switched", "plus_switched", "masked_switched"}
        assert set(speed["peak_memory_bytes"]) >= {"lora", "switched"}
        assert speed["settings"]["adapters"] == 14 and speed["switch_seconds"]["switched"] > 0
    memory = summary["memory"]
    assert set(memory["methods"]) == {"lora", "weightlora", "weightlora_plus"}
    for method in memory["methods"].values():
        assert len(method["steps"]) == memory["settings"]["max_steps"]
        assert method["after_switch"]["trainable"] > 0
    wl, lora = memory["methods"]["weightlora"], memory["methods"]["lora"]
    assert wl["after_switch"]["trainable"] < wl["warmup"]["trainable"] == lora["warmup"]["trainable"] + wl["adapters"]
    fsdp2 = summary["fsdp2"]  # benchmarks/fsdp2_cost.py under fully_shard, one process
    assert fsdp2["machine"]["world_size"] == 1 and set(fsdp2["ratios_to_lora_same"]) == {"lora_same", "masked", "lora"}
    assert fsdp2["sizes"]["masked"]["trainable_parameters"] == fsdp2["sizes"]["lora_same"]["trainable_parameters"]
    table = (out / "gpu_kit_cpu-dry-run.md").read_text()
    assert table == kit.render_table(summary)
    assert "FSDP2 (`fully_shard`, 1 process, tiny" in table and "Mask mode (FSDP2's switch" in table
    assert "| llama3-8b-shapes | 14 | 16 | 2 x 16 |" in table and "smollm2-135m-shapes" not in table  # one speed run
    assert re.search(r"Tests \(`pytest -m gpu tests/gpu`\): \d+ passed, 0 failed", table)
