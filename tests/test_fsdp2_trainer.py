"""The trainers under `accelerate launch` with the packaged fsdp2.yaml: 2 gloo processes on a CPU.

accelerate enables FSDP on accelerators only; the worker flips that one decision for CPU processes (see
tests/scripts/accelerate_fsdp2_worker.py), so what runs here is accelerate's own FSDP2 preparation (`fully_shard`
per decoder layer, CPU-RAM-efficient loading from rank 0, sharded DCP checkpoints, its mixed precision policy) under
the Transformers and TRL Trainers, with the switch in mask mode.

Checked: the sharded Trainer matches the one-process module swap with the same global batch (reinit=False: nothing
random separates them; only the summation order differs, observed < 4e-7), although each rank builds its base from
another seed (only accelerate's rank-0 loading makes them one model: without it the run differs by 1e-2);
checkpoints before and after T resume the same run bit for bit and with the optimizer holding the kept adapters
only; every saved adapter reloads with stock PEFT to the sharded model's logits; select_adapters stops at T with the
full run's selection; bf16 mixed precision keeps the fp32 run's selection and, with the loss left in fp32, its losses to 5e-3; stock `trl.SFTTrainer` under FSDP2 on
`lora_config_from_selection` trains exactly the selected modules (the two-stage route's stage 2).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from tests.testing_utils import tiny_llama
from wlora_trl import lora_config_from_selection

pytestmark = pytest.mark.slow  # multi-process runs

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "scripts" / "accelerate_fsdp2_worker.py"
FSDP2_YAML = ROOT / "wlora_trl" / "cli" / "accelerate_configs" / "fsdp2.yaml"
PROBE = torch.arange(3, 35).reshape(2, 16)
T, MAX_STEPS = 4, 8


def _launch(out: Path, *flags: str, sharded: bool = True, precision: str = "no", launch=()) -> dict:
    """Run the worker (2 processes under accelerate's FSDP2, or one plain process) and load its records."""
    out.mkdir(parents=True, exist_ok=True)
    if sharded:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP2_YAML)]
        launcher += ["--num_processes", "2", "--mixed_precision", precision, *launch]
    else:
        launcher = [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [*launcher, str(WORKER), str(out), *flags]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {path.stem: torch.load(path) for path in sorted(out.glob("rank*.pt"))}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each run once per module, by name."""
    done = {}

    def run(name, *flags, **kwargs):
        if name not in done:
            out = tmp_path_factory.mktemp(name)
            done[name] = (_launch(out, *flags, **kwargs), out)
        return done[name]

    return run


def test_the_fsdp2_trainer_shards_the_model_and_matches_one_process(runs):
    (sharded, _), (single, _) = runs("fsdp2"), runs("one", "--batch", "4", sharded=False)
    rank0, rank1, one = sharded["rank0"], sharded["rank1"], single["rank0"]
    # accelerate really sharded it, and the trainer took the mask-mode switch.
    assert rank0["fsdp"] and rank0["fsdp_module"] and rank0["world_size"] == 2 and rank0["mask_mode"]
    assert rank0["sharded_parameters"] > 0 and not one["fsdp"] and not one["mask_mode"]
    assert rank0["rank0_loading"]  # the ranks built different bases (seed = rank): rank 0's reached both
    assert rank0["switched"] and rank0["global_step"] == MAX_STEPS
    # The ranks agree exactly on the selection and on what they save.
    assert rank0["kept"] == rank1["kept"] and len(rank0["kept"]) == 7
    assert torch.equal(rank0["logits"], rank1["logits"])
    # Same selection, losses and trained adapter as one process with the whole global batch.
    assert rank0["kept"] == one["kept"]
    torch.testing.assert_close(torch.tensor(rank0["omega"]), torch.tensor(one["omega"]), rtol=0, atol=1e-6)
    assert rank0["losses"].keys() == one["losses"].keys() == set(range(1, MAX_STEPS + 1))
    for step, loss in one["losses"].items():
        assert rank0["losses"][step] == pytest.approx(loss, abs=1e-5), step
    # After the switch only the kept adapters train: 7 x (A, B), exactly the module swap's parameters.
    assert rank0["trainable"] == one["trainable"] and len(rank0["trainable"]) == 14
    assert rank0["optimizer_parameters"] == rank0["optimizer_states"] == one["optimizer_parameters"] == 14
    assert rank0["adapter"].keys() == one["adapter"].keys() and len(rank0["adapter"]) == 14
    for key, tensor in one["adapter"].items():
        torch.testing.assert_close(rank0["adapter"][key], tensor, rtol=0, atol=1e-5)
    torch.testing.assert_close(rank0["logits"], one["logits"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("checkpoint_step", [2, 6], ids=["before T", "after T"])
def test_fsdp2_checkpoints_on_either_side_of_the_switch_resume_the_same_run(runs, checkpoint_step):
    (full, full_dir) = runs("fsdp2")
    checkpoint = full_dir / "run" / f"checkpoint-{checkpoint_step}"
    assert (checkpoint / "pytorch_model_fsdp_0").is_dir()  # the Trainer's sharded DCP files
    resumed = runs(f"resume{checkpoint_step}", "--resume", str(checkpoint))[0]["rank0"]
    uninterrupted = full["rank0"]
    assert resumed["steps_run"] == MAX_STEPS - checkpoint_step  # it resumed, it did not start over
    assert resumed["kept"] == uninterrupted["kept"]
    assert resumed["optimizer_parameters"] == resumed["optimizer_states"] == 14  # the replayed switch edited it
    for step in range(checkpoint_step + 1, MAX_STEPS + 1):
        assert resumed["losses"][step] == uninterrupted["losses"][step], step
    for key, tensor in uninterrupted["adapter"].items():
        assert torch.equal(resumed["adapter"][key], tensor), key
    assert torch.equal(resumed["logits"], uninterrupted["logits"])


@pytest.mark.parametrize(
    "name, flags, rank",
    [("fsdp2", (), 4), ("fsdp2_plus_sft", ("--plus", "--sft"), 8)],
    ids=["WeightLoRA, Trainer", "WeightLoRA+, SFTTrainer"],
)
def test_the_fsdp2_saved_adapter_reloads_with_stock_peft_to_the_sharded_logits(runs, name, flags, rank):
    records, out = runs(name, *flags)
    record = records["rank0"]
    assert record["fsdp_module"] and record["switched"]
    reloaded = PeftModel.from_pretrained(tiny_llama(), out / "adapter").eval()
    assert reloaded.peft_config["default"].r == rank
    assert sorted(reloaded.peft_config["default"].target_modules) == sorted(record["kept"])
    with torch.no_grad():
        logits = reloaded(input_ids=PROBE).logits
    torch.testing.assert_close(logits, record["logits"], rtol=0, atol=1e-5)
    base = tiny_llama()
    with torch.no_grad():
        assert (base(input_ids=PROBE).logits - logits).abs().max() > 1e-3  # the adapter is not a no-op


def test_select_adapters_under_fsdp2_stops_at_t_with_the_full_runs_selection(runs):
    full = runs("fsdp2_plus_sft", "--plus", "--sft")[0]["rank0"]
    records, out = runs("fsdp2_select", "--plus", "--sft", "--select_only")
    selected = records["rank0"]
    assert selected["fsdp_module"] and selected["switched"] and selected["global_step"] == T
    assert selected["steps_run"] == T
    assert selected["report_kept"] == selected["kept"] == full["kept"]
    config = lora_config_from_selection(out / "adapter")
    assert sorted(config.target_modules) == sorted(full["kept"]) and config.r == 8


def test_bf16_mixed_precision_under_fsdp2_keeps_the_fp32_selection(runs):
    fp32 = runs("fsdp2_plus_sft", "--plus", "--sft")[0]["rank0"]
    records, _ = runs("fsdp2_bf16", "--plus", "--sft", "--bf16", precision="bf16")
    bf16 = records["rank0"]
    assert bf16["fsdp_module"] and bf16["param_dtype"] == torch.bfloat16  # accelerate's MixedPrecisionPolicy
    assert bf16["kept"] == fp32["kept"]
    # The loss leaves the model in fp32: accelerate's policy would round it to bf16 (off by up to 0.017 here).
    assert bf16["loss_dtype"] == torch.float32
    for step, loss in fp32["losses"].items():
        assert bf16["losses"][step] == pytest.approx(loss, abs=0.005), step


def test_stock_trl_under_fsdp2_trains_exactly_the_selected_modules(runs):
    """The two-stage route's stage 2 as the README runs it: stock `trl.SFTTrainer` under FSDP2 (full state dict, as
    TRL's own fsdp2 config saves) on `lora_config_from_selection` of a selection made under FSDP2."""
    selected, selection_dir = runs("fsdp2_select", "--plus", "--sft", "--select_only")
    kept = selected["rank0"]["kept"]
    records, out = runs(
        "fsdp2_stage2", "--stage2", str(selection_dir / "adapter"), launch=("--fsdp_state_dict_type", "FULL_STATE_DICT")
    )
    stage2 = records["rank0"]
    assert stage2["fsdp_module"] and stage2["global_step"] == MAX_STEPS
    assert {name.split(".lora_")[0].removeprefix("base_model.model.") for name in stage2["trainable"]} == set(kept)
    assert len(stage2["trainable"]) == 2 * len(kept)
    reloaded = PeftModel.from_pretrained(tiny_llama(), out / "adapter").eval()
    assert reloaded.peft_config["default"].r == 8 and sorted(reloaded.peft_config["default"].target_modules) == sorted(
        kept
    )
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=PROBE).logits, stage2["logits"], rtol=0, atol=1e-5)
