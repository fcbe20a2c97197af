"""The trainers under DeepSpeed ZeRO-2 and ZeRO-3: 2 gloo processes on a CPU, nothing patched (DeepSpeed's own CPU
accelerator), through both entry points: the `deepspeed` launcher with `TrainingArguments(deepspeed=...)`, and
`accelerate launch` with the packaged zero2.yaml / zero3.yaml.

Checked: under ZeRO-3 (parameters really partitioned: persistence threshold 0), ZeRO-3 with the optimizer and the
parameters offloaded to the CPU, and ZeRO-2, the trainer selects the adapters one process selects with the same global
batch, with omega, per-step losses, the trained adapter and the logits within 1e-5 (observed <= 3e-6), although each
rank builds its base from another seed (DeepSpeed's broadcast makes them rank 0's); the dropped adapters' working
copies, fp32 masters and Adam moments, which ZeRO cannot forget, are exactly zero at the end; checkpoints (DeepSpeed's
files plus selection.json) before, at and after T resume the run bit for bit; the saved adapters (not the 40-byte empty
file of ZeRO-3 + PEFT) reload with stock PEFT, in a process that never imports wlora_trl, to the trained model's logits;
WeightLoRA+ with the SFTTrainer loading its base partitioned (zero3_init_flag), and select_adapters() after it, under
the packaged zero3.yaml; bf16 (a bf16 base loaded partitioned, fp32 masters) keeps the fp32 run's selection. Unsupported
DeepSpeed setups are refused at construction.
"""

import gc
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.testing_utils import addition_lm_dataset, char_tokenizer, cpu_args, sft_args, sums_dataset, tiny_llama
from wlora_trl import WeightLoraConfig, WeightLoraSFTTrainer, WeightLoraTrainer, lora_config_from_selection

pytest.importorskip("deepspeed", reason="the `deepspeed` extra: pip install 'wlora-trl[deepspeed]'")

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "scripts" / "accelerate_deepspeed_worker.py"
CONFIGS = ROOT / "wlora_trl" / "cli" / "accelerate_configs"
PROBE = torch.arange(3, 35).reshape(2, 16)
T, MAX_STEPS = 4, 8
ADAPTERS = 14  # tiny_llama: 2 layers x 7 projections; K = 7


def _launch(out: Path, *flags: str, launcher: str = "zero3.yaml", precision: str = "no") -> dict:
    """Run the worker: under `accelerate launch` with a packaged config, the `deepspeed` launcher (with
    `--zero_stage` in the flags) or one plain process; load each rank's record."""
    out.mkdir(parents=True, exist_ok=True)
    if launcher == "one":
        command = [sys.executable]
    elif launcher == "deepspeed":
        command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", _free_port()]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / launcher)]
        command += ["--num_processes", "2", "--mixed_precision", precision, "--main_process_port", _free_port()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([*command, str(WORKER), str(out), *flags], capture_output=True, text=True, env=env,
                            timeout=600, cwd=ROOT)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {path.stem: torch.load(path) for path in sorted(out.glob("rank*.pt"))}


def _free_port() -> str:
    """A port no other launch on this machine holds now (both launchers default to 29500)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory) -> dict[str, Path]:
    """The reference's base (seed 0) saved, in fp32 and in bf16, with the tokenizer the SFT runs load."""
    dirs = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        dirs[name] = tmp_path_factory.mktemp(f"base_{name}")
        tiny_llama().to(dtype).save_pretrained(dirs[name])
        char_tokenizer().save_pretrained(dirs[name])
    return dirs


@pytest.fixture(scope="module")
def runs(tmp_path_factory, base_dirs):
    """Each run once per module, by name: (records by rank, its folder)."""
    done = {}
    plans = {
        "one": (("--batch", "4"), {"launcher": "one"}),
        "zero3": (("--zero_stage", "3"), {"launcher": "deepspeed"}),
        "zero2": ((), {"launcher": "zero2.yaml"}),
        "zero3_offload": (("--zero_stage", "3", "--offload"), {"launcher": "deepspeed"}),
        "plus_sft": (("--plus", "--sft", "--base", str(base_dirs["fp32"]), "--select_after"), {}),
        "bf16": (("--plus", "--sft", "--bf16", "--base", str(base_dirs["bf16"])), {"precision": "bf16"}),
        "moe_one": (("--batch", "4", "--moe"), {"launcher": "one"}),
        "moe_zero3": (("--zero_stage", "3", "--moe"), {"launcher": "deepspeed"}),
    }

    def run(name):
        if name not in done:
            if name == "resumed":  # three checkpoints of the ZeRO-3 run, one after the other in one launch
                checkpoints = [str(run("zero3")[1] / "run" / f"checkpoint-{step}") for step in (2, 4, 6)]
                flags, kwargs = ("--zero_stage", "3", "--resume", *checkpoints), {"launcher": "deepspeed"}
            else:
                flags, kwargs = plans[name]
            out = tmp_path_factory.mktemp(name)
            done[name] = (_launch(out, *flags, **kwargs), out)
        return done[name]

    return run


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, stage", [("zero3", 3), ("zero2", 2), ("zero3_offload", 3)], ids=["ZeRO-3", "ZeRO-2", "ZeRO-3 offload"]
)
def test_zero_trainer_selects_and_trains_as_one_process(runs, name, stage):
    (records, _), (single, _) = runs(name), runs("one")
    rank0, rank1, one = records["rank0"], records["rank1"], single["rank0"]
    assert rank0["deepspeed"] and rank0["zero_stage"] == stage and rank0["engine"] == "DeepSpeedEngine"
    assert rank0["world_size"] == 2 and rank0["mask_mode"] and not one["deepspeed"] and not one["mask_mode"]
    if stage == 3:
        assert rank0["partitioned_parameters"] > 0  # the switch wrote partitioned parameters, not whole ones
        assert not rank0["partitioned_at_load"]  # built whole, partitioned by deepspeed.initialize
        # ZeRO-3 had made every lora_A an external parameter of its layer (PEFT's forward reads its dtype); the
        # switch took the dropped ones back, so they are never gathered again.
        assert rank0["external_parameters"] >= 7 and rank0["dropped_external"] == 0
    assert rank0["switched"] and rank0["global_step"] == MAX_STEPS and rank0["omega_steps"]["taken"] == 3
    # The ranks agree exactly on the selection and on what they compute.
    assert rank0["kept"] == rank1["kept"] and len(rank0["kept"]) == 7
    assert torch.equal(rank0["logits"], rank1["logits"])
    # Same selection, omega, losses, trained adapter and logits as one process with the whole global batch.
    assert rank0["kept"] == one["kept"]
    torch.testing.assert_close(torch.tensor(rank0["omega"]), torch.tensor(one["omega"]), rtol=0, atol=1e-5)
    assert rank0["losses"].keys() == one["losses"].keys() == set(range(1, MAX_STEPS + 1))
    for step, loss in one["losses"].items():
        assert rank0["losses"][step] == pytest.approx(loss, abs=1e-5), step
    assert rank0["trainable"] == one["trainable"] and len(rank0["trainable"]) == 14  # the kept A and B only
    assert rank0["adapter"].keys() == one["adapter"].keys() and len(rank0["adapter"]) == 14
    for key, tensor in one["adapter"].items():
        torch.testing.assert_close(rank0["adapter"][key], tensor, rtol=0, atol=1e-5)
    torch.testing.assert_close(rank0["logits"], one["logits"], rtol=0, atol=1e-5)
    # ZeRO still holds the dropped adapters (nothing leaves its optimizer), frozen, every copy exactly zero.
    assert rank0["dropped_held_by_zero"] == 14 and rank0["dropped_trainable"] == 0
    assert rank0["dropped_nonzero"] == []


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint_step", [2, 4, 6], ids=["before T", "at T", "after T"])
def test_zero3_checkpoints_on_either_side_of_the_switch_resume_the_same_run(runs, checkpoint_step):
    full, full_dir = runs("zero3")
    checkpoint = full_dir / "run" / f"checkpoint-{checkpoint_step}"
    assert (checkpoint / f"global_step{checkpoint_step}").is_dir() and (checkpoint / "selection.json").is_file()
    assert json.loads((checkpoint / "selection.json").read_text())["switched"] == (checkpoint_step > T)
    records, out = runs("resumed")
    resumed = torch.load(out / f"resume-checkpoint-{checkpoint_step}" / "rank0.pt")
    uninterrupted = full["rank0"]
    assert resumed["steps_run"] == MAX_STEPS - checkpoint_step  # it resumed, it did not start over
    assert resumed["kept"] == uninterrupted["kept"] and resumed["omega"] == uninterrupted["omega"]
    for step in range(checkpoint_step + 1, MAX_STEPS + 1):
        assert resumed["losses"][step] == uninterrupted["losses"][step], step
    for key, tensor in uninterrupted["adapter"].items():
        assert torch.equal(resumed["adapter"][key], tensor), key
    assert torch.equal(resumed["logits"], uninterrupted["logits"])
    assert resumed["dropped_nonzero"] == []


STOCK_RELOAD = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModelForCausalLM
    from peft import PeftModel
    base_dir, ids_file, *pairs = sys.argv[1:]
    for adapter_dir, out_file in zip(pairs[::2], pairs[1::2]):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
        with torch.no_grad():
            with_adapter = model(input_ids=torch.load(ids_file)).logits
            with model.disable_adapter():
                without = model(input_ids=torch.load(ids_file)).logits
        torch.save({"logits": with_adapter, "base": without, "r": model.peft_config["default"].r,
                    "targets": sorted(model.peft_config["default"].target_modules)}, out_file)
    assert not any(name.startswith("wlora_trl") for name in sys.modules), "stock reload imported wlora_trl"
    """
)


@pytest.mark.slow
def test_saved_adapters_are_not_empty_and_reload_with_stock_peft_to_the_trained_logits(runs, base_dirs, tmp_path):
    cases = {"zero3": 4, "zero2": 4, "plus_sft": 8}  # run: rank of the saved adapter (WeightLoRA+: 2r)
    torch.save(PROBE, tmp_path / "ids.pt")
    pairs = []
    for name in cases:
        adapter = runs(name)[1] / "adapter"
        # Not the 40-byte file of a ZeRO-3 gather that never happened: 7 kept adapters, their A and B, full shapes.
        assert (adapter / "adapter_model.safetensors").stat().st_size > 10_000
        assert len(runs(name)[0]["rank0"]["adapter"]) == 14
        pairs += [str(adapter), str(tmp_path / f"{name}.pt")]
    command = [sys.executable, "-c", STOCK_RELOAD, str(base_dirs["fp32"]), str(tmp_path / "ids.pt"), *pairs]
    subprocess.run(command, check=True, timeout=300)
    for name, rank in cases.items():
        record, reloaded = runs(name)[0]["rank0"], torch.load(tmp_path / f"{name}.pt")
        assert reloaded["r"] == rank and reloaded["targets"] == sorted(record["kept"])
        torch.testing.assert_close(reloaded["logits"], record["logits"], rtol=0, atol=1e-5, msg=name)
        # The adapter's own effect is far above that tolerance: a reload that lost it could not pass.
        assert (reloaded["logits"] - reloaded["base"]).abs().max() > 1e-3, name


@pytest.mark.slow
def test_weightlora_plus_and_select_adapters_under_the_packaged_zero3_with_partitioned_loading(runs):
    records, out = runs("plus_sft")
    full = records["rank0"]
    # zero3.yaml's zero3_init_flag: the SFTTrainer loaded the base already partitioned (zero.Init).
    assert full["partitioned_at_load"] and full["zero_stage"] == 3 and full["switched"]
    assert full["kept"] == records["rank1"]["kept"] and len(full["kept"]) == 7
    assert all(key.endswith(".weight") for key in full["adapter"])
    assert {tuple(t.shape)[0] for k, t in full["adapter"].items() if ".lora_A." in k} == {8}  # allocated at 2r
    assert full["dropped_nonzero"] == []
    selected = torch.load(out / "select" / "rank0.pt")
    assert selected["switched"] and selected["global_step"] == selected["steps_run"] == T
    assert selected["report_kept"] == selected["kept"] == full["kept"]
    config = lora_config_from_selection(out / "select" / "adapter")
    assert sorted(config.target_modules) == sorted(full["kept"]) and config.r == 8


@pytest.mark.slow
def test_bf16_under_zero3_keeps_the_fp32_selection(runs):
    fp32 = runs("plus_sft")[0]["rank0"]
    bf16 = runs("bf16")[0]["rank0"]
    assert bf16["partitioned_at_load"] and bf16["switched"]
    assert bf16["lora_dtypes"] == ["torch.bfloat16"]  # DeepSpeed's bf16: the working copies (fp32 masters)
    assert all(t.dtype == torch.float32 for t in bf16["adapter"].values())  # saved from the fp32 masters
    assert bf16["kept"] == fp32["kept"] and bf16["loss_dtype"] == torch.float32
    for step, loss in fp32["losses"].items():
        assert bf16["losses"][step] == pytest.approx(loss, abs=5e-3), step


@pytest.mark.slow
def test_a_mixture_of_experts_model_selects_its_experts_blocks_under_zero3_as_one_process(runs, tmp_path):
    """Tiny Qwen3-MoE with `all-linear`: its experts blocks (gate_up and down as one unit) and routers are units;
    under ZeRO-3 the 3-D experts' adapters, which PEFT reads through `.weight` and never calls, are gathered, train,
    drop and save as in one process, and the saved adapter reloads with stock PEFT. (ZeRO-2, which partitions no
    parameter, passed the same checks when this was written: left out of CI for its 18 s.)"""
    (records, out), (single, _) = runs("moe_zero3"), runs("moe_one")
    rank0, rank1, one = records["rank0"], records["rank1"], single["rank0"]
    assert rank0["deepspeed"] and rank0["switched"] and rank0["kept"] == rank1["kept"] == one["kept"]
    assert any(module.endswith("mlp.experts") for module in one["kept"])
    torch.testing.assert_close(torch.tensor(rank0["omega"]), torch.tensor(one["omega"]), rtol=0, atol=1e-5)
    for step, loss in one["losses"].items():
        assert rank0["losses"][step] == pytest.approx(loss, abs=1e-5), step
    assert rank0["adapter"].keys() == one["adapter"].keys()
    assert any(".mlp.experts." in key for key in one["adapter"])
    # Relative to each tensor's norm: Adam turns the reduction-order noise in the gradients of experts that few
    # tokens reach into steps of its own size (observed: 5e-6 of the norm, 1e-5 absolute, on an experts lora_A); a
    # wrongly reduced or lost gradient differs by O(1) of it. The logits agree to 3e-7.
    for key, tensor in one["adapter"].items():
        assert (rank0["adapter"][key] - tensor).norm() <= 1e-4 * tensor.norm(), key
    torch.testing.assert_close(rank0["logits"], one["logits"], rtol=0, atol=1e-5)
    assert rank0["dropped_nonzero"] == []
    from tests.testing_utils import tiny_qwen3_moe

    tiny_qwen3_moe(seed=0).save_pretrained(tmp_path / "base")  # rank 0's base, which DeepSpeed broadcast
    torch.save(PROBE, tmp_path / "ids.pt")
    command = [sys.executable, "-c", STOCK_RELOAD, str(tmp_path / "base"), str(tmp_path / "ids.pt")]
    subprocess.run([*command, str(out / "adapter"), str(tmp_path / "reloaded.pt")], check=True, timeout=300)
    reloaded = torch.load(tmp_path / "reloaded.pt")
    torch.testing.assert_close(reloaded["logits"], rank0["logits"], rtol=0, atol=1e-5)
    assert (reloaded["logits"] - reloaded["base"]).abs().max() > 1e-3


# --- refused before anything is built ---------------------------------------------------------------------------------

ZERO3 = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto"}


@pytest.mark.parametrize(
    "config, message",
    [
        (
            {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"}}},
            "offload_optimizer.device='nvme'",
        ),
        ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}, "offload_param.device='nvme'"),
        ({"zero_optimization": {"stage": 1}}, "runs ZeRO stage 2 or 3; this config has zero_optimization.stage=1"),
        ({**ZERO3, "fp16": {"enabled": True}}, "does not support fp16.*Use bf16"),
    ],
    ids=["offload_optimizer", "offload_param", "stage 1", "fp16"],
)
def test_unsupported_deepspeed_setups_are_refused_at_construction(tmp_path, config, message):
    args = cpu_args(tmp_path, deepspeed={"train_micro_batch_size_per_gpu": "auto", **config})
    with pytest.raises(ValueError, match=message):
        WeightLoraTrainer(tiny_llama(), args, train_dataset=addition_lm_dataset(), peft_config=WeightLoraConfig(r=4))
    del args
    gc.collect()  # TrainingArguments(deepspeed=) registers its config globally (weakly): gone for the next tests


def test_nvme_offload_from_an_accelerate_deepspeed_launch_is_refused(tmp_path, monkeypatch, tokenizer):
    """What `accelerate launch --config_file zero3.yaml` with offload_optimizer_device: nvme hands the process."""
    for key, value in {"USE_DEEPSPEED": "true", "DEEPSPEED_ZERO_STAGE": "3",
                       "DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "nvme"}.items():  # fmt: skip
        monkeypatch.setenv(f"ACCELERATE_{key}", value)
    args = sft_args(tmp_path)
    assert args.deepspeed_plugin is not None
    with pytest.raises(ValueError, match="offload to NVMe.*offload_optimizer.device='nvme'.*'cpu' or 'none'"):
        WeightLoraSFTTrainer(
            model=tiny_llama(), args=args, train_dataset=sums_dataset(), processing_class=tokenizer,
            peft_config=WeightLoraConfig(r=4),
        )  # fmt: skip
    del args
    gc.collect()


def test_the_library_internals_the_deepspeed_path_relies_on():
    """accelerate steps DeepSpeed's optimizer inside the backward (so omega's step follows training_step's backward),
    and the Trainer loads DeepSpeed's checkpoint and then calls `_load_optimizer_and_scheduler(checkpoint)` (where the
    selection is replayed), never `_load_from_checkpoint`."""
    import inspect

    from accelerate.utils.deepspeed import DeepSpeedEngineWrapper
    from transformers import Trainer

    backward = inspect.getsource(DeepSpeedEngineWrapper.backward)
    assert backward.index("self.engine.backward(") < backward.index("self.engine.step()")
    prepare = inspect.getsource(Trainer._prepare_for_training)
    deepspeed_branch = re.search(
        r"if self\.is_deepspeed_enabled:\s+deepspeed_load_checkpoint\(.*?\)\s+elif", prepare, re.S
    )
    assert deepspeed_branch and "_load_from_checkpoint" not in deepspeed_branch.group()
    assert deepspeed_branch.end() < prepare.index("self._load_optimizer_and_scheduler(resume_from_checkpoint)")
    assert "not self.is_deepspeed_enabled and not self.is_fsdp_enabled" in inspect.getsource(Trainer.train)
    assert list(inspect.signature(Trainer._load_optimizer_and_scheduler).parameters) == ["self", "checkpoint"]
