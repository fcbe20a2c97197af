"""Smoke runs of the benchmarks with tiny budgets: they run, and their JSON holds what the documentation's tables need
(tests/docs/test_benchmark_pages.py checks the committed results against the pages)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # benchmark smoke runs, the quality one on the real SmolLM2

SPEED = Path(__file__).resolve().parents[2] / "benchmarks" / "speed.py"


def test_speed_benchmark_smoke(tmp_path):
    out = tmp_path / "speed.json"
    subprocess.run(
        [sys.executable, str(SPEED), "--model", "tiny", "--rounds", "2", "--seq", "16", "--output", str(out),
         "--memory_variants", "lora", "switched"],  # the memory check's two: a child process each on a CPU
        check=True,
        capture_output=True,
    )  # fmt: skip
    result = json.loads(out.read_text())
    variants = {"lora", "warmup", "warmup_hooks", "switched", "lora_same", "plus_switched", "masked_switched"}
    assert set(result["median_step_seconds"]) == variants
    assert set(result["peak_memory_bytes"]) == {"lora", "switched"} and min(result["peak_memory_bytes"].values()) > 0
    assert all(len(times) == 2 and min(times) > 0 for times in result["step_seconds"].values())
    trainable = result["trainable_parameters"]
    # after the switch: exactly LoRA on the kept modules, half of the adapters of the tiny model
    assert trainable["switched"] == trainable["lora_same"] < trainable["lora"]
    assert trainable["warmup"] == trainable["warmup_hooks"] == trainable["lora"] + 14  # plus omega, one per adapter
    assert 0 < result["switch_seconds"]["switched"] < 1
    assert set(result["ratios"]) == {"warmup", "warmup_hooks", "switched", "plus_switched", "masked_switched"}
    # mask mode trains the same kept adapters; its dropped ones are frozen, so they are not counted as trainable
    assert trainable["masked_switched"] == trainable["switched"]
    assert result["settings"]["adapters"] == 14


FSDP2_COST = SPEED.parent / "fsdp2_cost.py"


def test_fsdp2_cost_benchmark_smoke(tmp_path):
    """2 gloo ranks, tiny model: the arms run sharded, and the sizes say what mask mode keeps and what it drops."""
    out = tmp_path / "fsdp2.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(FSDP2_COST)]
    flags = ["--model", "tiny", "--rounds", "2", "--seq", "16", "--output", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*command, *flags], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["machine"]["world_size"] == 2 and result["machine"]["backend"] == "gloo"
    assert result["adapters"] == {"n": 14, "kept": 7}
    assert all(len(times) == 2 and min(times) > 0 for times in result["step_seconds"].values())
    assert result["ratios_to_lora_same"]["lora_same"] == 1.0
    masked, same, lora = (result["sizes"][arm] for arm in ("masked", "lora_same", "lora"))
    # Mask mode trains and holds optimizer state for the kept adapters only, as LoRA on the kept modules does...
    assert masked["trainable_parameters"] == same["trainable_parameters"] < lora["trainable_parameters"]
    assert masked["optimizer_state_bytes_per_rank"] == same["optimizer_state_bytes_per_rank"] > 0
    # ...but keeps every adapter's sharded weights, and gathers them all.
    assert masked["lora_parameter_bytes_per_rank"] == lora["lora_parameter_bytes_per_rank"]
    assert masked["lora_bytes_per_all_gather_round"] == lora["lora_bytes_per_all_gather_round"]
    assert same["lora_parameter_bytes_per_rank"] < masked["lora_parameter_bytes_per_rank"]
    assert "| masked |" in done.stdout  # the table the benchmarks page shows


DEEPSPEED_COST = SPEED.parent / "deepspeed_cost.py"


def test_deepspeed_cost_benchmark_smoke(tmp_path):
    """2 gloo ranks under ZeRO-3, tiny model: the arms run, and the sizes and collectives say what ZeRO keeps of the
    dropped adapters (everything but their gradients) in both persistence settings."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "deepspeed.json"
    with socket.socket() as probe:  # the launcher's default port may be another run's right now
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", port]
    command.append(str(DEEPSPEED_COST))
    flags = ["--model", "tiny", "--rounds", "1", "--seq", "16", "--output", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*command, *flags], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["machine"]["world_size"] == 2 and result["machine"]["backend"] == "gloo"
    assert result["adapters"] == {"n": 14, "kept": 7}
    for setting, block in result["zero3"].items():
        assert all(len(times) == 1 and min(times) > 0 for times in block["step_seconds"].values())
        masked, same, lora = (block["sizes"][arm] for arm in ("masked", "lora_same", "lora"))
        comm = {arm: block["communication_bytes_per_step"][arm] for arm in ("masked", "lora_same", "lora")}
        # Mask mode trains the kept adapters only: their gradients alone are reduced...
        assert masked["trainable_parameters"] == same["trainable_parameters"] < lora["trainable_parameters"]
        assert comm["masked"]["reduce_scatter_tensor"] == comm["lora_same"]["reduce_scatter_tensor"]
        assert comm["masked"]["reduce_scatter_tensor"] < comm["lora"]["reduce_scatter_tensor"]
        # ...but ZeRO cannot forget the dropped ones: working copies, fp32 masters and Adam moments stay, as for LoRA.
        for key in ("lora_working_bytes_per_rank", "master_bytes_per_rank", "optimizer_state_bytes_per_rank"):
            assert masked[key] == lora[key] > same[key], (setting, key)
        assert masked["parameters_in_optimizer"] == lora["parameters_in_optimizer"] == 28
    # DeepSpeed's default persistence keeps LoRA weights whole on every rank and all-gathers every one of them after
    # each step, the dropped ones too; partitioned (threshold 0), a dropped adapter is never gathered.
    default, partitioned = result["zero3"]["default"], result["zero3"]["partitioned"]
    assert default["sizes"]["masked"]["lora_persistent_bytes_per_rank"] > 0
    assert partitioned["sizes"]["masked"]["lora_persistent_bytes_per_rank"] == 0
    gathered = {
        arm: default["communication_bytes_per_step"][arm]["all_gather_into_tensor"] for arm in ("masked", "lora")
    }
    assert gathered["masked"] == gathered["lora"]
    gathered = {
        arm: partitioned["communication_bytes_per_step"][arm]["all_gather_into_tensor"]
        for arm in ("masked", "lora_same")
    }
    assert gathered["masked"] == gathered["lora_same"]
    assert "| default (persistence 1e5) | masked |" in done.stdout  # the table


def test_the_committed_deepspeed_cost_table_is_its_json():
    sys.path.insert(0, str(SPEED.parents[1]))
    from benchmarks.deepspeed_cost import render

    committed = SPEED.parent / "results" / "deepspeed_cost_smollm2-135m-instruct_cpu_x2.json"
    result = json.loads(committed.read_text())
    assert result["settings"]["malloc"] == "steady" and result["machine"]["world_size"] == 2
    table = committed.with_suffix(".md").read_text()
    assert render(result) in table
    for setting in ("default", "partitioned"):
        assert f"{result['zero3'][setting]['ratios_to_lora_same']['masked']:.3f}" in (DEEPSPEED_COST.read_text())


QUALITY = SPEED.parent / "quality.py"


def test_quality_benchmark_smoke(tmp_path):
    """The quality study end to end on the real SmolLM2 and GSM8K with a tiny budget: LoRA and WeightLoRA over two
    seeds (each run is a process of its own: its start costs more than its 3 steps; the other arms and the sweeps
    render from the committed study in tests/benchmarks/test_glue_study.py). Checks the committed-record resume (a
    second sitting trains nothing), the paired differences and the tables the benchmarks page shows."""
    from wlora_trl._offline.data import resolve_data_dir

    if resolve_data_dir() is None:
        pytest.skip("no local data folder (shared/data or WLORA_TRL_DATA_DIR)")
    out, runs = tmp_path / "quality.json", tmp_path / "runs"
    flags = [
        "--seeds", "0", "1", "--arms", "lora", "weightlora", "--max_steps", "3",
        "--selection_steps", "2", "--batch_size", "1", "--max_length", "128", "--train_samples", "8",
        "--heldout_samples", "2", "--sweeps", "--runs_dir", str(runs), "--work_dir", str(tmp_path / "work"),
        "--output", str(out),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(QUALITY), *flags], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    records = sorted(p.name for p in runs.iterdir())
    assert records == sorted(f"{arm}_seed{seed}.json" for arm in ("lora", "weightlora") for seed in (0, 1))
    result = json.loads(out.read_text())
    summary = result["summary"]
    for name in ("lora", "weightlora"):
        losses = summary[name]["heldout_loss"]["values"]
        assert len(losses) == 2 and all(0 < loss < 10 for loss in losses)
    lora, weightlora = summary["lora"]["heldout_loss"]["values"], summary["weightlora"]["heldout_loss"]["values"]
    assert summary["weightlora"]["vs_lora_paired"]["values"] == pytest.approx(
        [w - lo for w, lo in zip(weightlora, lora)]
    )
    # SmolLM2: 210 adapters of rank 8; WeightLoRA keeps 105 of them, so it trains fewer parameters than LoRA.
    assert 0 < summary["weightlora"]["trainable_parameters"]["mean"] < summary["lora"]["trainable_parameters"]["mean"]
    assert 0 <= summary["weightlora"]["kept_jaccard_across_seeds"] <= 1
    table = out.with_suffix(".md").read_text()
    loss = summary["weightlora"]["heldout_loss"]
    assert f"| weightlora | {loss['mean']:.4f} ± {loss['std']:.4f} |" in table
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"

    # A second sitting finds every run recorded: nothing trains, and the tables come out the same.
    before = {p.name: p.stat().st_mtime_ns for p in runs.iterdir()}
    again = subprocess.run([sys.executable, str(QUALITY), *flags], capture_output=True, text=True, env=env)
    assert again.returncode == 0 and "===" not in again.stdout, again.stderr[-2000:]
    assert {p.name: p.stat().st_mtime_ns for p in runs.iterdir()} == before
    assert out.with_suffix(".md").read_text() == table

    # The STOP file ends a sitting before the next run trains: a new seed is not started, nothing is recorded.
    (tmp_path / "work" / "STOP").touch()
    stopped = subprocess.run(
        [sys.executable, str(QUALITY), *flags, "--seeds", "0", "1", "2"], capture_output=True, text=True, env=env
    )
    assert stopped.returncode == 0 and "stopping before lora, seed 2" in stopped.stdout, stopped.stderr[-2000:]
    assert {p.name: p.stat().st_mtime_ns for p in runs.iterdir()} == before

    # --no_train: the progress of a study that spans sittings, from the records alone.
    progress = subprocess.run(
        [sys.executable, str(QUALITY), *flags, "--seeds", "0", "1", "2", "--no_train"], capture_output=True, text=True,
        env=env,
    )  # fmt: skip
    assert progress.returncode == 0, progress.stderr[-2000:]
    assert "4 runs recorded; 2 to go: lora_seed2, weightlora_seed2" in progress.stdout
    assert f"| weightlora | {loss['mean']:.4f} ± {loss['std']:.4f} |" in progress.stdout


def test_the_committed_quality_study_is_complete():
    """The committed records are the whole study on its default settings, the peers included: `--no_train` trains
    nothing, finds nothing to go and prints the committed tables. That the docs show its tables and numbers:
    tests/docs/test_benchmark_pages.py."""
    results = QUALITY.parent / "results"
    result = json.loads((results / "quality.json").read_text())
    assert result["settings"]["max_steps"] == 300 and result["settings"]["seeds"] == [0, 1, 2]
    assert {"lora", "weightlora", "weightlora_plus", "random", "adalora", "eva"} <= set(result["summary"])
    assert all(len(arm["heldout_loss"]["values"]) == 3 for arm in result["summary"].values())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    progress = subprocess.run([sys.executable, str(QUALITY), "--no_train"], capture_output=True, text=True, env=env)
    assert progress.returncode == 0, progress.stderr[-2000:]
    # The study's records, not the learning-rate grid's other rates beside them (benchmarks/lr_grid.py).
    rate = result["settings"]["learning_rate"]
    argvs = [json.loads(path.read_text())["argv"] for path in (results / "quality_runs").glob("*.json")]
    records = sum(float(argv[argv.index("--learning_rate") + 1]) == rate for argv in argvs)
    assert f"{records} runs recorded; 0 to go" in progress.stdout
    committed_tables = (results / "quality.md").read_text()
    assert committed_tables.strip() in progress.stdout
