"""WeightLoRA on CUDA: every precision and memory saver users train with, through warm-up, switch, save and a stock
PEFT reload. Run by `benchmarks/gpu/run.py`; each test states what it would catch.

Models are tiny Llamas built from configs (random weights), so the kit needs nothing from the network.
"""

from __future__ import annotations

import gc
import math
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TrainerCallback, TrainingArguments

from tests.testing_utils import addition_lm_dataset, char_tokenizer, cpu_args, sft_args, sums_dataset, tiny_llama
from wlora_trl import WeightLoraConfig, WeightLoraModel, WeightLoraSFTTrainer, WeightLoraTrainer
from wlora_trl.state import read_selection
from wlora_trl.surgery import innermost_optimizer

pytestmark = pytest.mark.gpu

IDS = torch.arange(3, 35).reshape(2, 16)
WORKER = Path(__file__).parent / "nccl_worker.py"


def _args(path, device, **overrides) -> TrainingArguments:
    return cpu_args(path, **{"max_steps": 8, "use_cpu": device == "cpu", **overrides})


def _config(**overrides) -> WeightLoraConfig:
    kwargs = dict(r=4, lora_alpha=8, target_modules="all-linear", k=7, selection_steps=4)
    kwargs.update(overrides)
    return WeightLoraConfig(**kwargs)


class _Record(TrainerCallback):
    """omega, the loss scale and one adapter weight at the end of every step; omega just before the switch."""

    def __init__(self, trainer):
        self.trainer, self.steps, self.initial_scale = trainer, {}, None
        self.omega_at_switch = None
        switch = trainer._switch

        def record_then_switch():
            self.omega_at_switch = trainer.weight_lora.omega.detach().float().cpu().clone()
            switch()

        trainer._switch = record_then_switch
        trainer.add_callback(self)

    def on_train_begin(self, args, state, control, **kwargs):
        scaler = getattr(self.trainer.accelerator, "scaler", None)
        self.initial_scale = scaler.get_scale() if scaler is not None and scaler.is_enabled() else None

    def on_step_end(self, args, state, control, **kwargs):
        weight_lora, scaler = self.trainer.weight_lora, getattr(self.trainer.accelerator, "scaler", None)
        lora_b = next(p for n, p in self.trainer.model.named_parameters() if "lora_B" in n)
        self.steps[state.global_step] = {
            "omega": None if weight_lora.switched else weight_lora.omega.detach().cpu().clone(),
            "scale": scaler.get_scale() if scaler is not None and scaler.is_enabled() else None,
            "lora_b": lora_b.detach().float().cpu().clone(),
        }


def _logits(model, device):
    with torch.no_grad():
        return model.eval()(input_ids=IDS.to(device)).logits.float().cpu()


def _set_lora_weights(peft_model, seed=1, std=0.1):
    """Nonzero A and B (so omega has a gradient), drawn on the CPU: the same values whatever the device."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * std)


def _lora_modules(peft_model) -> set[str]:
    return {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}


def _lora_weights(peft_model) -> dict[str, torch.Tensor]:
    return {
        n.replace(".default", ""): p.detach().float().cpu() for n, p in peft_model.named_parameters() if "lora_" in n
    }


def _check_selection(trainer, record):
    weight_lora = trainer.weight_lora
    assert weight_lora.switched and record.omega_at_switch is not None
    omega = record.omega_at_switch
    assert omega.dtype == torch.float32 and bool(omega.ne(1).any())  # StoIHT steps were taken
    assert int(omega.ne(0).sum()) == weight_lora.k
    assert weight_lora.omega_steps["taken"] >= 2
    kept = {a.module for a in weight_lora.adapters if a.kept}
    assert _lora_modules(trainer.model) == kept and len(kept) == weight_lora.k
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == trainer.args.max_steps and all(torch.isfinite(torch.tensor(losses)))
    return kept


def _check_reload(trainer, kept, adapter_dir, fresh_base, device, atol):
    """The saved adapter on a fresh base: stock PEFT, the kept modules only, the trained logits.

    `atol` must be far below the adapter's own effect on the logits, which is asserted too, so a reload that
    silently dropped the adapter could not pass.
    """
    # Without the autocast wrapper accelerate puts on the forward for bf16/fp16 training: both sides in the same
    # precision, as a served adapter would run.
    trained = _logits(trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False), device)
    reloaded = PeftModel.from_pretrained(fresh_base, adapter_dir)
    assert _lora_modules(reloaded) == kept
    assert read_selection(adapter_dir).switched is True
    logits = _logits(reloaded, device)
    with reloaded.disable_adapter():
        without = _logits(reloaded, device)
    effect = (trained - without).abs().max().item()
    assert effect > 20 * atol, f"the adapter barely changes the logits ({effect:.2e}); the check would be vacuous"
    torch.testing.assert_close(logits, trained, rtol=0, atol=atol)
    return reloaded


# --- 1. bf16 weights, bf16 autocast and the fused AdamW that the Trainer uses on CUDA --------------------------


def test_bf16_with_fused_adamw_through_switch_save_and_reload(tmp_path, device):
    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16).to(device)
    args = _args(tmp_path / "run", device, bf16=True, optim="adamw_torch_fused")
    trainer = WeightLoraTrainer(model, args, train_dataset=addition_lm_dataset(), peft_config=_config())
    record = _Record(trainer)
    trainer.train()
    inner = innermost_optimizer(trainer.optimizer)
    assert inner.defaults.get("fused") is True  # the CUDA default optimizer, which handles found_inf itself
    kept = _check_selection(trainer, record)
    assert trainer.weight_lora.omega_steps["skipped_nonfinite"] == 0
    trainer.save_model(str(tmp_path / "adapter"))
    fresh = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16).to(device)
    _check_reload(trainer, kept, tmp_path / "adapter", fresh, device, atol=1e-3)


# --- 2. fp16 with the GradScaler: a forced overflow skips the optimizer step and omega's step --------------------


@pytest.mark.parametrize("optim", ["adamw_torch_fused", "adamw_torch"])
def test_fp16_grad_scaler_overflow_skips_omega_too(tmp_path, cuda, optim):
    """Step 3 gets an inf in one adapter gradient. The GradScaler must skip that optimizer step and halve its scale;
    omega must not move in that step either (fused AdamW is stepped with found_inf set; a plain one is not stepped,
    so omega's pre-hook never runs and the skip is counted at the next step)."""
    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir).to(cuda)  # fp32 master weights, fp16 autocast
    args = _args(tmp_path / "run", cuda, fp16=True, optim=optim, max_steps=10)
    trainer = WeightLoraTrainer(
        model, args, train_dataset=addition_lm_dataset(), peft_config=_config(selection_steps=6)
    )
    overflow_step = 3
    training_step = trainer.training_step

    def training_step_with_overflow(*a, **kw):
        loss = training_step(*a, **kw)
        if trainer.state.global_step + 1 == overflow_step:
            lora_b = next(p for n, p in trainer.model.named_parameters() if "lora_B" in n)
            lora_b.grad[0, 0] = float("inf")
        return loss

    trainer.training_step = training_step_with_overflow
    record = _Record(trainer)
    trainer.train()
    steps = record.steps
    before, at = steps[overflow_step - 1], steps[overflow_step]
    assert at["scale"] == before["scale"] / 2  # the scaler saw the overflow and backed off
    assert torch.equal(at["lora_b"], before["lora_b"])  # the optimizer step was skipped
    assert torch.equal(at["omega"], before["omega"])  # and omega's step with it
    assert not torch.equal(steps[overflow_step + 1]["omega"], at["omega"])  # the next step moves omega again
    scales = [record.initial_scale] + [steps[s]["scale"] for s in range(1, 7)]  # the warm-up: steps 1..T=6
    backoffs = sum(after < before for before, after in zip(scales, scales[1:]))
    assert trainer.weight_lora.omega_steps["skipped_by_grad_scaler"] == backoffs >= 1
    kept = _check_selection(trainer, record)
    trainer.save_model(str(tmp_path / "adapter"))
    fresh = AutoModelForCausalLM.from_pretrained(base_dir).to(cuda)
    _check_reload(trainer, kept, tmp_path / "adapter", fresh, cuda, atol=1e-4)


# --- 3. quantized bases: 8-bit (the paper's setting) and 4-bit NF4 (QLoRA) ---------------------------------------

QUANTIZATION = {
    "int8": lambda: BitsAndBytesConfig(load_in_8bit=True),
    "nf4": lambda: BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    ),
}


@pytest.mark.parametrize("kind", sorted(QUANTIZATION))
def test_quantized_base_through_switch_save_and_reload(tmp_path, device, kind):
    import bitsandbytes as bnb

    base_dir = tmp_path / "base"
    # bitsandbytes' CPU 4-bit inference kernel (the dry run) needs in_features divisible by its block size of 64.
    tiny_llama(intermediate_size=128).save_pretrained(base_dir)
    device_map = {"": 0 if device == "cuda" else "cpu"}

    def quantized():
        return AutoModelForCausalLM.from_pretrained(
            base_dir, quantization_config=QUANTIZATION[kind](), device_map=device_map
        )

    model = prepare_model_for_kbit_training(quantized())  # fp32 norms, input grads, gradient checkpointing
    peft_model = get_peft_model(model, _config())
    args = _args(tmp_path / "run", device, bf16=True)
    trainer = WeightLoraTrainer(peft_model, args, train_dataset=addition_lm_dataset())
    record = _Record(trainer)
    trainer.train()
    kept = _check_selection(trainer, record)
    quantized_type = bnb.nn.Linear8bitLt if kind == "int8" else bnb.nn.Linear4bit
    dropped = [a.module for a in trainer.weight_lora.adapters if not a.kept]
    assert all(type(trainer.model.base_model.model.get_submodule(name)) is quantized_type for name in dropped)
    trainer.save_model(str(tmp_path / "adapter"))
    trained_weights = _lora_weights(trainer.model)

    # Onto a fresh quantized base: the same quantized weights, so the trained logits.
    _check_reload(trainer, kept, tmp_path / "adapter", quantized(), device, atol=2e-3)
    # Onto a bf16 base (merging or serving without quantization): the same adapter, bit for bit.
    bf16_base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16).to(device)
    on_bf16 = PeftModel.from_pretrained(bf16_base, tmp_path / "adapter")
    assert _lora_modules(on_bf16) == kept
    reloaded = _lora_weights(on_bf16)
    assert reloaded.keys() == trained_weights.keys()
    for name, value in trained_weights.items():
        torch.testing.assert_close(reloaded[name], value, rtol=0, atol=0, msg=name)
    assert torch.isfinite(_logits(on_bf16, device)).all()


def test_two_stage_route_selects_on_a_4bit_base_and_stock_trl_trains_the_kept_modules(tmp_path, device):
    """Stage 1 as the README documents it for models past one GPU (`select_adapters` on an NF4 base), stage 2 with
    stock TRL on a bf16 base from `lora_config_from_selection`: its adapters are exactly the kept modules."""
    from trl import SFTTrainer

    from wlora_trl import lora_config_from_selection

    base_dir = tmp_path / "base"
    tiny_llama(intermediate_size=128).save_pretrained(base_dir)
    device_map = {"": 0 if device == "cuda" else "cpu"}
    quantized = AutoModelForCausalLM.from_pretrained(
        base_dir, quantization_config=QUANTIZATION["nf4"](), device_map=device_map
    )
    args = sft_args(tmp_path / "stage1", max_steps=200, bf16=True, use_cpu=device == "cpu")
    stage1 = WeightLoraSFTTrainer(
        model=prepare_model_for_kbit_training(quantized), args=args, train_dataset=sums_dataset(),
        processing_class=char_tokenizer(), peft_config=_config(selection_steps=0.005),
    )  # fmt: skip
    report = stage1.select_adapters()
    assert stage1.state.global_step == report.selection_steps == 5  # 0.5% of 200 steps, at least 5
    stage1.save_model(str(tmp_path / "selected"))

    config = lora_config_from_selection(tmp_path / "selected")
    bf16_base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16).to(device)
    stage2 = SFTTrainer(
        model=bf16_base, args=sft_args(tmp_path / "stage2", max_steps=3, bf16=True, use_cpu=device == "cpu"),
        train_dataset=sums_dataset(), processing_class=char_tokenizer(), peft_config=config,
    )  # fmt: skip
    stage2.train()
    assert _lora_modules(stage2.model) == set(report.kept_modules) and len(report.kept_modules) == 7


# --- 4. gradient checkpointing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_selection(tmp_path, device, use_reentrant):
    def omega_at_switch(path, checkpointing):
        args = _args(
            path,
            device,
            gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": use_reentrant} if checkpointing else None,
        )
        trainer = WeightLoraTrainer(
            tiny_llama().to(device), args, train_dataset=addition_lm_dataset(), peft_config=_config()
        )
        record = _Record(trainer)
        trainer.train()
        _check_selection(trainer, record)
        return record.omega_at_switch, _lora_weights(trainer.model)

    plain, plain_weights = omega_at_switch(tmp_path / "plain", False)
    checkpointed, checkpointed_weights = omega_at_switch(tmp_path / "ckpt", True)
    torch.testing.assert_close(checkpointed, plain, rtol=0, atol=1e-5)
    for name, value in plain_weights.items():
        torch.testing.assert_close(checkpointed_weights[name], value, rtol=0, atol=1e-5, msg=name)


# --- 5. one NCCL process through torchrun: the DDP re-wrap path ---------------------------------------------------


@pytest.mark.slow  # child processes under torchrun
def test_one_process_torchrun_takes_the_ddp_rewrap_path(tmp_path, device):
    """The switch re-wraps DDP on NCCL (gloo in the CPU dry run); the result must equal a plain single-process run.

    accelerate does not wrap a one-process CUDA run in DDP (it does on the CPU), so the worker forces the wrapper
    there (see nccl_worker.py) and records that it did."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", str(WORKER)]
    runs = {}
    for name, launcher in {"torchrun": command, "plain": [sys.executable, str(WORKER)]}.items():
        out = tmp_path / name
        done = subprocess.run(
            [*launcher, str(out), "--device", device], capture_output=True, text=True, env=env, timeout=120
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        runs[name] = torch.load(out / "rank0.pt")
    ddp, plain = runs["torchrun"], runs["plain"]
    assert ddp["backend"] == ("nccl" if device == "cuda" else "gloo") and plain["backend"] is None
    assert ddp["ddp_forced"] == (device == "cuda") and not plain["ddp_forced"]
    assert ddp["wrapper_before_switch"] == ddp["wrapper_after_switch"] == "DistributedDataParallel"
    assert ddp["wrapper_after_switch_is_new"] is True
    assert plain["wrapper_after_switch"] != "DistributedDataParallel"
    assert ddp["kept"] == plain["kept"]
    torch.testing.assert_close(ddp["omega"], plain["omega"], rtol=0, atol=1e-6)
    for name, value in plain["adapters"].items():
        torch.testing.assert_close(ddp["adapters"][name], value, rtol=0, atol=1e-5, msg=name)


@pytest.mark.slow  # child processes under accelerate launch
def test_trainer_under_accelerate_fsdp2_switches_in_mask_mode_saves_and_resumes(tmp_path, cuda):
    """The packaged fsdp2.yaml with one process: the Trainer shards the model (FSDP2), switches in mask mode, saves a
    stock adapter that reloads to the sharded model's logits, and resumes its sharded checkpoints from before and
    after T to the same losses."""
    from wlora_trl.cli.launch import packaged_accelerate_configs

    worker = Path(__file__).parents[1] / "scripts" / "accelerate_fsdp2_worker.py"  # the CPU suite's worker too
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(packaged_accelerate_configs()["fsdp2"]), "--num_processes", "1", "--mixed_precision", "no", str(worker),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(out, *flags):
        done = subprocess.run([*launch, str(out), *flags], capture_output=True, text=True, env=env, timeout=240)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return torch.load(out / "rank0.pt")

    full = run(tmp_path / "full")
    assert full["fsdp"] and full["mask_mode"] and full["fsdp_module"] and full["sharded_parameters"] > 0
    assert full["switched"] and len(full["kept"]) == 7
    assert full["omega_steps"]["taken"] == 3  # steps 2-4
    trainable = {name.split(".lora_")[0].removeprefix("base_model.model.") for name in full["trainable"]}
    assert trainable == set(full["kept"])  # dropped adapters frozen; nothing else trains
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "full" / "adapter").to(cuda).eval()
    probe = torch.arange(3, 35).reshape(2, 16).to(cuda)
    with torch.no_grad():
        logits = reloaded(input_ids=probe).logits.float().cpu()
        with reloaded.disable_adapter():
            base = reloaded(input_ids=probe).logits.float().cpu()
    assert (full["logits"] - base).abs().max() > 1e-2  # the adapter's own effect
    torch.testing.assert_close(logits, full["logits"], rtol=0, atol=1e-4)
    for step in (2, 6):  # before and after T = 4
        checkpoint = tmp_path / "full" / "run" / f"checkpoint-{step}"
        resumed = run(tmp_path / f"resumed-{step}", "--resume", str(checkpoint))
        assert resumed["kept"] == full["kept"]
        for later in range(step + 1, 9):
            assert resumed["losses"][later] == pytest.approx(full["losses"][later], abs=1e-4), (step, later)
    # The packaged config's own precision: accelerate's bf16 FSDP2 policy. The loss leaves the model in fp32 (the
    # trainers undo the policy's bf16 output cast), and the run selects and trains as the fp32 one does.
    launch[launch.index("--mixed_precision") + 1] = "bf16"
    bf16 = run(tmp_path / "bf16", "--bf16")
    assert bf16["fsdp_module"] and bf16["switched"] and bf16["loss_dtype"] == torch.float32
    assert len(bf16["kept"]) == 7 and all(math.isfinite(loss) for loss in bf16["losses"].values())
    for step, loss in full["losses"].items():
        assert bf16["losses"][step] == pytest.approx(loss, abs=0.05), step


@pytest.mark.slow  # child processes under accelerate launch
def test_trainer_under_deepspeed_zero3_switches_in_mask_mode_saves_and_resumes(tmp_path, device):
    """The packaged zero3.yaml with one process: the Trainer runs under a DeepSpeed ZeRO-3 engine, switches in mask
    mode (ZeRO keeps the dropped adapters, every copy zero), saves a stock adapter that reloads to the trained logits,
    resumes DeepSpeed's checkpoints from before and after T to the same losses, and under the config's own bf16 keeps
    the fp32 selection. On CUDA only: on a CPU this is the worker and code path of the CPU suite's 2-process
    tests (tests/test_deepspeed_trainer.py)."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed here (the `deepspeed` extra)")
    if device == "cpu":  # 45 s of the kit's dry run for nothing the CPU suite does not already run
        pytest.skip("on a CPU this worker and path are tests/test_deepspeed_trainer.py's, which the CPU suite runs")
    from wlora_trl.cli.launch import packaged_accelerate_configs

    worker = Path(__file__).parents[1] / "scripts" / "accelerate_deepspeed_worker.py"  # the CPU suite's worker too
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(packaged_accelerate_configs()["zero3"]), "--num_processes", "1", "--mixed_precision", "no", str(worker),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(out, *flags):
        done = subprocess.run([*launch, str(out), *flags], capture_output=True, text=True, env=env, timeout=240)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return out

    full_dir = run(tmp_path / "full", "--batch", "4")
    full = torch.load(full_dir / "rank0.pt")
    assert full["deepspeed"] and full["zero_stage"] == 3 and full["engine"] == "DeepSpeedEngine" and full["mask_mode"]
    assert full["switched"] and len(full["kept"]) == 7 and full["omega_steps"]["taken"] == 3  # steps 2-4
    trainable = {name.split(".lora_")[0].removeprefix("base_model.model.") for name in full["trainable"]}
    assert trainable == set(full["kept"])  # dropped adapters frozen; nothing else trains
    assert full["dropped_held_by_zero"] == 14 and full["dropped_nonzero"] == []  # held by ZeRO, exactly zero
    assert (full_dir / "adapter" / "adapter_model.safetensors").stat().st_size > 10_000  # not an empty ZeRO-3 save
    reloaded = PeftModel.from_pretrained(tiny_llama(), full_dir / "adapter").to(device).eval()
    probe = torch.arange(3, 35).reshape(2, 16).to(device)
    with torch.no_grad():
        logits = reloaded(input_ids=probe).logits.float().cpu()
        with reloaded.disable_adapter():
            base = reloaded(input_ids=probe).logits.float().cpu()
    assert (full["logits"] - base).abs().max() > 1e-2  # the adapter's own effect
    torch.testing.assert_close(logits, full["logits"], rtol=0, atol=1e-4)
    checkpoints = [str(full_dir / "run" / f"checkpoint-{step}") for step in (2, 6)]  # before and after T = 4
    resumed_dir = run(tmp_path / "resumed", "--batch", "4", "--resume", *checkpoints)
    for step in (2, 6):
        resumed = torch.load(resumed_dir / f"resume-checkpoint-{step}" / "rank0.pt")
        assert resumed["kept"] == full["kept"] and resumed["steps_run"] == 8 - step
        for later in range(step + 1, 9):
            assert resumed["losses"][later] == pytest.approx(full["losses"][later], abs=1e-4), (step, later)
    # The packaged config's own precision: DeepSpeed's bf16 (bf16 working copies, fp32 masters, the loss in fp32).
    launch[launch.index("--mixed_precision") + 1] = "bf16"
    bf16 = torch.load(run(tmp_path / "bf16", "--batch", "4", "--bf16") / "rank0.pt")
    assert bf16["switched"] and bf16["loss_dtype"] == torch.float32 and bf16["lora_dtypes"] == ["torch.bfloat16"]
    assert bf16["kept"] == full["kept"] and all(math.isfinite(loss) for loss in bf16["losses"].values())
    for step, loss in full["losses"].items():
        assert bf16["losses"][step] == pytest.approx(loss, abs=0.05), step


# --- 6. TRL's SFTTrainer on its defaults (bf16 and gradient checkpointing on) -------------------------------------


def test_sft_trainer_end_to_end(tmp_path, device):
    data = sums_dataset()
    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)
    # SFTConfig's own defaults: bf16=True, gradient_checkpointing=True.
    args = sft_args(tmp_path / "run", trl_defaults=True, max_steps=8, use_cpu=device == "cpu")
    assert args.bf16 and args.gradient_checkpointing
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16).to(device)
    trainer = WeightLoraSFTTrainer(
        model=model, args=args, train_dataset=data, processing_class=char_tokenizer(), peft_config=_config()
    )
    record = _Record(trainer)
    trainer.train()
    kept = _check_selection(trainer, record)
    trainer.save_model(str(tmp_path / "adapter"))
    fresh = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16).to(device)
    _check_reload(trainer, kept, tmp_path / "adapter", fresh, device, atol=1e-3)


# --- 7. memory: what the switch drops is really freed ------------------------------------------------------------


def test_switch_frees_dropped_adapters_and_their_optimizer_state(device):
    """After the switch no old adapter tensor or optimizer state survives, and on CUDA the allocated bytes fall by
    exactly what was freed: every old parameter with its two AdamW moments, minus the re-created kept adapters
    (their AdamW state is created lazily at the next step)."""
    model = get_peft_model(tiny_llama(num_layers=4).to(device), _config(r=8, k=0.25, selection_steps=2))
    weight_lora = WeightLoraModel(model, max_steps=10)
    optimizer = torch.optim.AdamW(weight_lora.trainable_parameters(), lr=1e-3)
    batch = {"input_ids": IDS.to(device), "labels": IDS.to(device)}
    for _ in range(weight_lora.selection_steps):
        model(**batch).loss.backward()
        weight_lora.omega_step()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    old = [p for n, p in model.named_parameters() if "lora_" in n]
    old_state = [t for p in old for t in optimizer.state[p].values() if torch.is_tensor(t) and t.numel() > 1]
    assert len(old_state) == 2 * len(old)
    refs = [weakref.ref(t) for t in old + old_state]
    old_bytes = sum(p.numel() * p.element_size() for p in old)
    del old, old_state
    gc.collect()
    allocated = torch.cuda.memory_allocated() if device == "cuda" else None

    weight_lora.switch(optimizer)
    gc.collect()
    assert sum(r() is not None for r in refs) == 0  # no old adapter, gradient or moment is reachable
    assert all(
        p in {q for n, q in model.named_parameters() if "lora_" in n}
        for group in optimizer.param_groups
        for p in group["params"]
    )
    new_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" in n)
    assert 0 < new_bytes < old_bytes / 2
    if device == "cuda":
        freed = allocated - torch.cuda.memory_allocated()
        expected = 3 * old_bytes - new_bytes  # parameters + 2 moments, minus the new adapters
        assert abs(freed - expected) <= 0.02 * expected + 64 * 1024, (freed, expected)
    model(**batch).loss.backward()  # and it still trains
    optimizer.step()


# --- 8. the distributed-correctness items that need a GPU ---------------------------------------------------------


@pytest.mark.parametrize("omega_on", ["cpu", "cuda"])
def test_omega_and_activations_on_different_devices(cuda, omega_on):
    """A model spread over devices (device_map, as TRL uses for quantized models): omega lives with the first
    adapter, and each layer's gate must be moved to that layer's device. Gradients must equal a one-device run."""
    from accelerate import dispatch_model

    other = "cuda" if omega_on == "cpu" else "cpu"
    index = {"cuda": 0, "cpu": "cpu"}
    device_map = {
        "model.embed_tokens": index[omega_on],
        "model.layers.0": index[omega_on],
        "model.layers.1": index[other],
        "model.norm": index[other],
        "model.rotary_emb": index[other],
        "lm_head": index[other],
    }
    # main_device="cpu": modules mapped to the CPU run there. (from_pretrained's device_map would treat them as
    # offloaded, their weights streamed to the GPU: one device again.)
    spread = dispatch_model(tiny_llama(), device_map, main_device="cpu")
    reference = tiny_llama()
    models = {}
    for name, base in {"spread": spread, "reference": reference}.items():
        peft_model = get_peft_model(base, _config(selection_steps=3))
        _set_lora_weights(peft_model)
        models[name] = (peft_model, WeightLoraModel(peft_model, max_steps=10))
    spread_model, spread_wl = models["spread"]
    devices = {p.device.type for n, p in spread_model.named_parameters() if "lora_" in n}
    assert devices == {"cpu", "cuda"} and spread_wl.omega.device.type == omega_on
    # each adapter's omega entry lives on its adapter's device: no copies in the forward
    for parameter, unit in zip(spread_wl.omega_parameters(), spread_wl.gates.units):
        assert parameter.device == unit.device(spread_wl.base, spread_wl.adapter_name)
    grads = {}
    for name, (peft_model, weight_lora) in models.items():
        ids = IDS.to(next(peft_model.parameters()).device)
        peft_model(input_ids=ids, labels=ids).loss.backward()
        grads[name] = weight_lora.take_omega_grad().cpu()
        assert weight_lora.omega_step(grads[name])  # the step moves it to omega's device itself
    assert grads["spread"].ne(0).all()  # adapters of both devices reached omega
    torch.testing.assert_close(spread_wl.omega.cpu(), models["reference"][1].omega, rtol=1e-4, atol=1e-7)
    # the step's result reached every per-device parameter
    for parameter, value in zip(spread_wl.omega_parameters(), spread_wl.omega.cpu()):
        assert parameter.item() == value.item()
    torch.testing.assert_close(grads["spread"], grads["reference"], rtol=1e-4, atol=1e-7)
    spread_wl.switch()
    for name in [a.module for a in spread_wl.adapters if a.kept]:
        layer = spread_model.base_model.model.get_submodule(name)
        assert layer.lora_A["default"].weight.device == layer.get_base_layer().weight.device
    ids = IDS.to(next(spread_model.parameters()).device)
    spread_model(input_ids=ids, labels=ids).loss.backward()  # plain LoRA across devices after the switch


def test_switch_leaves_the_cuda_generator_alone(cuda):
    """The switch seeds only the CPU generator that PEFT initialises with: dropout masks drawn on the GPU after the
    switch continue the training stream instead of replaying it from step 1, and the re-initialisation is still a
    function of the seed alone."""

    def switched(seed):
        model = get_peft_model(tiny_llama().to(cuda), _config(lora_dropout=0.1, selection_steps=2))
        weight_lora = WeightLoraModel(model)
        torch.cuda.manual_seed(1234)
        torch.rand(1000, device=cuda)  # advance the stream, as training would
        state = torch.cuda.get_rng_state()
        weight_lora.switch(seed=seed)
        assert torch.equal(torch.cuda.get_rng_state(), state)
        return [p.detach().cpu() for n, p in model.named_parameters() if "lora_A" in n]

    first, again = switched(0), switched(0)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_omega_gradient_in_half_precision_matches_fp32(device, dtype):
    """The gate's product happens in the adapter output's dtype; omega's gradient, handed back in fp32, must be
    that of the fp32 model to half precision (bf16: 8 bits, fp16: 11 bits), including under fp16's loss scale of
    2^16, and omega itself stays fp32."""
    if device == "cpu" and dtype == "float16":
        pytest.skip("fp16 autocast is a GPU setting")
    half = getattr(torch, dtype)
    model = get_peft_model(tiny_llama().to(device), _config())
    _set_lora_weights(model)
    weight_lora = WeightLoraModel(model)
    ids = IDS.to(device)
    model(input_ids=ids, labels=ids).loss.backward()
    reference = weight_lora.take_omega_grad()
    scale = 2.0**16 if dtype == "float16" else 1.0
    with torch.autocast(device_type=device, dtype=half):
        loss = model(input_ids=ids, labels=ids).loss
    (loss * scale).backward()
    grad = weight_lora.take_omega_grad() / scale
    assert grad.dtype == torch.float32 == weight_lora.omega.dtype and torch.isfinite(grad).all()
    large = reference.abs() >= 0.1 * reference.abs().max()  # entries near zero have no meaningful relative error
    relative = ((grad - reference).abs() / reference.abs())[large]
    assert relative.max().item() < (0.05 if dtype == "bfloat16" else 0.02), relative
    assert torch.equal(torch.sign(grad[large]), torch.sign(reference[large]))
