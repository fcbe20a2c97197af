"""The trainers under DeepSpeed ZeRO: 2 gloo processes of a CPU (tests/test_deepspeed_trainer.py), or one process per
GPU (the GPU kit's tests/gpu/test_cuda.py, NCCL; CUDA is used whenever it is there).

    accelerate launch --config_file wlora_trl/cli/accelerate_configs/zero3.yaml --num_processes 2 \
        --mixed_precision no tests/scripts/accelerate_deepspeed_worker.py OUT [--plus] [--sft] [--base DIR] [--moe]
        [--select_after] [--bf16] [--resume CHECKPOINT ...]
    deepspeed --num_gpus 2 tests/scripts/accelerate_deepspeed_worker.py OUT --zero_stage 3 [--offload]  (`deepspeed=`)
    python tests/scripts/accelerate_deepspeed_worker.py OUT --batch 4       (the one-process reference, no DeepSpeed)

DeepSpeed runs on a CPU as it is (its CPU accelerator, gloo); nothing is patched. T = 4 of 8 steps, a checkpoint every 2
steps (in OUT/run), a global batch of 4 rows (2 per process). `--base DIR` loads the base with `from_pretrained` once
the training arguments exist (the SFTTrainer from the path, as TRL does), so under zero3.yaml's `zero3_init_flag` it
arrives partitioned (`zero.Init`); otherwise each rank builds its base from another seed and only DeepSpeed's broadcast
of rank 0's makes them one model, the reference's. `--resume` takes several checkpoints and resumes each in turn, in one
launch. `--select_after` runs `select_adapters()` on a fresh trainer after the full run.

Each rank writes OUT/rank{r}.pt (or OUT/<name>/rank{r}.pt per resumed checkpoint and for the selection): what
DeepSpeed made of the model, the switch's outcome, losses, logits on a probe, the saved adapter, and what ZeRO still
holds for the dropped adapters.
"""

import argparse
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.scripts.accelerate_fsdp2_worker import MAX_STEPS, PROBE, StepCounter, T, base_model  # noqa: E402
from tests.testing_utils import addition_lm_dataset, char_tokenizer, cpu_args, sft_args, sums_dataset  # noqa: E402

USE_CPU = not torch.cuda.is_available()


def deepspeed_config(stage: int, offload: bool = False) -> dict:
    """What `deepspeed=` carries when the script is started by the `deepspeed` launcher (no accelerate config).
    `offload`: the optimizer (and under ZeRO-3 the parameters) offloaded to the CPU, with the Trainer's torch AdamW."""
    zero = {"stage": stage, "stage3_param_persistence_threshold": 0}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    config = {
        "zero_optimization": zero,
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
    }
    if offload:
        config["zero_force_ds_cpu_optimizer"] = False  # DeepSpeed wants its CPU Adam; the Trainer's AdamW is torch's
    return config


def make_trainer(cli, run_dir: str):
    from wlora_trl import WeightLoraConfig, WeightLoraSFTTrainer, WeightLoraTrainer

    # WeightLoRA with reinit=False: nothing random separates the ZeRO switch from the one-process module swap, so the
    # two runs must agree. WeightLoRA+ keeps the paper's re-initialisation (drawn from the seeded stream on each rank).
    # A tiny MoE's 12 units: with K = n/2 this data keeps attention only; K = 10 keeps experts blocks too.
    cfg = WeightLoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", selection_steps=T, plus=cli.plus, reinit=cli.plus,
        **({"k": 10} if cli.moe else {}),
    )  # fmt: skip
    saving = dict(
        save_strategy="steps", save_steps=2, per_device_train_batch_size=cli.batch, bf16=cli.bf16, use_cpu=USE_CPU
    )
    if cli.zero_stage is not None:  # started by the deepspeed launcher: the Trainer's own DeepSpeed integration
        saving["deepspeed"] = deepspeed_config(cli.zero_stage, offload=cli.offload)
    if cli.sft:
        args = sft_args(run_dir, max_steps=MAX_STEPS, **saving)
        return WeightLoraSFTTrainer(
            model=cli.base or base_model(), args=args, train_dataset=sums_dataset(),
            processing_class=char_tokenizer(), peft_config=cfg,
        )  # fmt: skip
    args = cpu_args(run_dir, max_steps=MAX_STEPS, **saving)
    if cli.moe:  # DeepSpeed broadcasts rank 0's weights, which the reference builds from the same seed
        from tests.testing_utils import tiny_qwen3_moe

        return WeightLoraTrainer(
            tiny_qwen3_moe(seed=int(os.environ.get("RANK", 0))), args, train_dataset=addition_lm_dataset(),
            peft_config=cfg,
        )  # fmt: skip
    if cli.base:  # loaded after the arguments exist, so under zero3_init_flag it is loaded partitioned
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(cli.base)
    else:
        model = base_model()
    return WeightLoraTrainer(model, args, train_dataset=addition_lm_dataset(), peft_config=cfg)


def zero_state_of_dropped(trainer) -> dict:
    """What ZeRO still holds for the dropped adapters (it cannot forget them): every copy must be exactly zero."""
    from deepspeed.utils import safe_get_full_optimizer_state

    from wlora_trl.engines.deepspeed import ZeroParameterAccess, _trainable, held_by_zero_optimizer
    from wlora_trl.surgery import adapter_parameters

    weight_lora, access = trainer.weight_lora, ZeroParameterAccess()
    nonzero, held, trainable, external = [], 0, 0, 0
    registered = {key for module in trainer.model.modules() for key in getattr(module, "_external_params", {})}
    for record in weight_lora.adapters:
        if record.kept:
            continue
        for param in adapter_parameters(weight_lora.base.get_submodule(record.module), weight_lora.adapter_name):
            held += held_by_zero_optimizer(param)
            trainable += param.requires_grad
            external += id(param) in registered  # ZeRO-3 would gather it before some module's forward
            with _trainable(param):
                copies = {"master": access.read(param)}  # the fp32 master where ZeRO holds one
                for key in ("exp_avg", "exp_avg_sq"):
                    copies[key] = safe_get_full_optimizer_state(param, key)
            copies["working"] = _working_copy(param)
            nonzero += [f"{record.module}:{name}" for name, value in copies.items() if bool(value.ne(0).any())]
    return {
        "dropped_held_by_zero": held,
        "dropped_trainable": trainable,
        "dropped_nonzero": nonzero,
        "dropped_external": external,
        "external_parameters": len(registered),
    }


def _working_copy(parameter) -> torch.Tensor:
    """The copy the forward uses (gathered under ZeRO-3), not the optimizer's master."""
    from wlora_trl.engines.deepspeed import is_partitioned

    if is_partitioned(parameter):
        import deepspeed

        with deepspeed.zero.GatheredParameters([parameter]):
            return parameter.detach().float().clone()
    return parameter.detach().float().clone()


def run(cli, out: Path, resume: str | None = None, select_only: bool = False) -> None:
    out.mkdir(parents=True, exist_ok=True)
    trainer = make_trainer(cli, str(out / "run"))
    steps = StepCounter()
    trainer.add_callback(steps)
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    record = {
        "deepspeed": trainer.is_deepspeed_enabled,
        "zero_stage": plugin.zero_stage if plugin is not None else None,
        "world_size": trainer.accelerator.num_processes,
        # Partitioned as loaded (zero.Init), before deepspeed.initialize ever ran.
        "partitioned_at_load": any(hasattr(p, "ds_id") for p in trainer.model.parameters()),
    }
    if select_only:
        record["report_kept"] = list(trainer.select_adapters(resume_from_checkpoint=resume).kept_modules)
    else:
        trainer.train(resume_from_checkpoint=resume)
    model, weight_lora = trainer.model, trainer.weight_lora
    record.update(
        engine=type(trainer.model_wrapped).__name__,
        partitioned_parameters=sum(hasattr(p, "ds_id") and p.data.numel() == 0 for p in model.parameters()),
        mask_mode=weight_lora.mask_mode,
        switched=weight_lora.switched,
        kept=[a.module for a in weight_lora.adapters if a.kept] if weight_lora.switched else None,
        omega=[a.omega for a in weight_lora.report(trainer.state.global_step).adapters],
        omega_steps=weight_lora.omega_steps,
        global_step=trainer.state.global_step,
        steps_run=steps.count,
        losses={h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h},
        trainable=sorted(name for name, p in model.named_parameters() if p.requires_grad),
        lora_dtypes=sorted({str(p.dtype) for name, p in model.named_parameters() if ".lora_" in name}),
    )
    if trainer.is_deepspeed_enabled and weight_lora.switched:
        record.update(zero_state_of_dropped(trainer))
    model.eval()
    with torch.no_grad():  # under ZeRO-3 a collective: every rank runs the probe
        probe = PROBE.to(trainer.args.device)
        output = model(input_ids=probe, labels=probe)
        record["logits"], record["loss_dtype"] = output.logits.float().cpu(), output.loss.dtype
    adapter_dir = out / "adapter"
    trainer.save_model(str(adapter_dir))
    trainer.accelerator.wait_for_everyone()
    record["adapter"] = load_file(adapter_dir / "adapter_model.safetensors")
    record["adapter_bytes"] = (adapter_dir / "adapter_model.safetensors").stat().st_size
    torch.save(record, out / f"rank{trainer.accelerator.process_index}.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--batch", type=int, default=2, help="rows per process")
    parser.add_argument("--plus", action="store_true", help="WeightLoRA+ (rank 2r after the switch, reinit=True)")
    parser.add_argument("--sft", action="store_true", help="WeightLoraSFTTrainer on prompt/completion rows")
    parser.add_argument("--base", default=None, help="a saved base model folder, loaded with from_pretrained")
    parser.add_argument("--bf16", action="store_true", help="bf16=True: DeepSpeed's bf16 (fp32 masters)")
    parser.add_argument("--select_after", action="store_true", help="then select_adapters() on a fresh trainer")
    parser.add_argument("--resume", nargs="*", default=(), help="checkpoints of an earlier run, resumed in turn")
    parser.add_argument("--zero_stage", type=int, default=None, help="deepspeed launcher: deepspeed= with this stage")
    parser.add_argument("--offload", action="store_true", help="with --zero_stage: offload to the CPU")
    parser.add_argument("--moe", action="store_true", help="a tiny Qwen3-MoE: experts blocks and routers are units")
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    cli = parser.parse_args()
    out = Path(cli.out)
    if cli.resume:
        for checkpoint in cli.resume:
            run(cli, out / f"resume-{Path(checkpoint).name}", resume=checkpoint)
        return
    run(cli, out)
    if cli.select_after:
        run(cli, out / "select", select_only=True)


if __name__ == "__main__":
    main()
