"""The trainers under accelerate's real FSDP2 path: 2 gloo processes of a CPU (tests/test_fsdp2_trainer.py), or
one process per GPU (the GPU kit's tests/gpu/test_cuda.py, NCCL; CUDA is used whenever it is there).

    accelerate launch --config_file wlora_trl/cli/accelerate_configs/fsdp2.yaml --num_processes 2 \
        --mixed_precision no tests/scripts/accelerate_fsdp2_worker.py OUT [--plus] [--sft] [--select_only]
        [--bf16] [--resume CHECKPOINT] [--stage2 SELECTION_DIR]
    python tests/scripts/accelerate_fsdp2_worker.py OUT --batch 4            (the one-process reference, no FSDP)

accelerate turns `distributed_type: FSDP` into FSDP only on accelerators; `enable_fsdp_on_cpu`
(tests/scripts/fsdp_on_cpu/sitecustomize.py) makes that one decision the other way, and nothing else: the Trainer
then builds its Accelerator from the launcher's FSDP environment, and accelerate's own `fsdp2_prepare_model` shards
the model per decoder layer with `fully_shard` (gloo), with the packaged fsdp2.yaml's settings (CPU-RAM-efficient
loading from rank 0, sharded DCP checkpoints).

T = 4 of 8 steps, a checkpoint every 2 steps, a global batch of 4 rows (2 per process). Each rank writes
OUT/rank{r}.pt: what FSDP made of the model, the switch's outcome, losses, logits on a probe, the saved adapter.
"""

import argparse
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.scripts.fsdp_on_cpu.sitecustomize import enable_fsdp_on_cpu  # noqa: E402
from tests.testing_utils import addition_lm_dataset, cpu_args, sft_args, sums_dataset, tiny_llama  # noqa: E402

T, MAX_STEPS = 4, 8
PROBE = torch.arange(3, 35).reshape(2, 16)
USE_CPU = not torch.cuda.is_available()


def base_model():
    """Each rank builds its base from another seed: only accelerate's rank-0 loading (`cpu_ram_efficient_loading` in
    fsdp2.yaml) makes them one model, rank 0's, which is the one-process reference's (seed 0)."""
    return tiny_llama(seed=int(os.environ.get("RANK", 0)))


class StepCounter(TrainerCallback):
    """Optimizer steps this process ran (a resumed run runs only the rest)."""

    count = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.count += 1


def make_trainer(cli):
    from wlora_trl import WeightLoraConfig, WeightLoraSFTTrainer, WeightLoraTrainer, lora_config_from_selection

    if cli.stage2:  # the two-stage route's stage 2: stock TRL, nothing of this package but the LoraConfig
        from trl import SFTTrainer

        from tests.testing_utils import char_tokenizer

        args = sft_args(
            os.path.join(cli.out, "run"), max_steps=MAX_STEPS, per_device_train_batch_size=cli.batch, use_cpu=USE_CPU
        )
        return SFTTrainer(
            model=base_model(), args=args, train_dataset=sums_dataset(), processing_class=char_tokenizer(),
            peft_config=lora_config_from_selection(cli.stage2),
        )  # fmt: skip

    # WeightLoRA with reinit=False: nothing random separates the sharded switch from the one-process module swap,
    # so the two runs must agree. WeightLoRA+ keeps the paper's re-initialisation (drawn shard by shard).
    cfg = WeightLoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", selection_steps=T, plus=cli.plus, reinit=cli.plus
    )
    run_dir = os.path.join(cli.out, "run")
    saving = dict(
        save_strategy="steps", save_steps=2, per_device_train_batch_size=cli.batch, bf16=cli.bf16, use_cpu=USE_CPU
    )
    if cli.sft:
        from tests.testing_utils import char_tokenizer

        args = sft_args(run_dir, max_steps=MAX_STEPS, **saving)
        return WeightLoraSFTTrainer(
            model=base_model(), args=args, train_dataset=sums_dataset(), processing_class=char_tokenizer(),
            peft_config=cfg,
        )  # fmt: skip
    args = cpu_args(run_dir, max_steps=MAX_STEPS, **saving)
    return WeightLoraTrainer(base_model(), args, train_dataset=addition_lm_dataset(), peft_config=cfg)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--batch", type=int, default=2, help="rows per process")
    parser.add_argument("--plus", action="store_true", help="WeightLoRA+ (rank 2r after the switch, reinit=True)")
    parser.add_argument("--sft", action="store_true", help="WeightLoraSFTTrainer on prompt/completion rows")
    parser.add_argument("--select_only", action="store_true", help="select_adapters(): stop at the switch")
    parser.add_argument("--bf16", action="store_true", help="bf16=True: accelerate's FSDP2 mixed precision policy")
    parser.add_argument("--stage2", default=None, help="a select_adapters folder: stock trl.SFTTrainer on its config")
    parser.add_argument("--resume", default=None, help="a checkpoint of an earlier run to resume")
    cli = parser.parse_args()
    enable_fsdp_on_cpu()
    from torch.distributed.fsdp import FSDPModule

    from wlora_trl.engines.access import is_sharded

    trainer = make_trainer(cli)
    steps = StepCounter()
    trainer.add_callback(steps)
    # The dtype the base weights compute in (FSDP2 all-gathers them in the mixed precision policy's param_dtype).
    compute_dtypes = set()
    base_layer = next(m for name, m in trainer.model.named_modules() if name.endswith(".base_layer"))
    base_layer.register_forward_pre_hook(lambda module, _: compute_dtypes.add(module.weight.dtype))
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    record = {
        "fsdp": trainer.is_fsdp_enabled,
        "world_size": trainer.accelerator.num_processes,
        "rank0_loading": getattr(plugin, "cpu_ram_efficient_loading", None),
    }
    if cli.select_only:
        record["report_kept"] = list(trainer.select_adapters(resume_from_checkpoint=cli.resume).kept_modules)
    else:
        trainer.train(resume_from_checkpoint=cli.resume)
    model = trainer.model
    record.update(
        fsdp_module=isinstance(model, FSDPModule),
        sharded_parameters=sum(is_sharded(p) for p in model.parameters()),
        global_step=trainer.state.global_step,
        steps_run=steps.count,
        param_dtype=compute_dtypes.pop() if len(compute_dtypes) == 1 else sorted(map(str, compute_dtypes)),
        losses={h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h},
        # What the optimizer holds: after the switch, the kept adapters only (the dropped ones left with their state).
        optimizer_parameters=sum(len(group["params"]) for group in trainer.optimizer.param_groups),
        optimizer_states=sum(1 for state in trainer.optimizer.state.values() if state),
        trainable=sorted(name for name, p in model.named_parameters() if p.requires_grad),
    )
    if hasattr(trainer, "weight_lora"):
        weight_lora = trainer.weight_lora
        record.update(
            mask_mode=weight_lora.mask_mode,
            switched=weight_lora.switched,
            kept=[a.module for a in weight_lora.adapters if a.kept],
            omega=[a.omega for a in weight_lora.report(trainer.state.global_step).adapters],
            omega_steps=weight_lora.omega_steps,
        )
    model.eval()
    with torch.no_grad():
        probe = PROBE.to(trainer.args.device)
        output = model(input_ids=probe, labels=probe)
        record["logits"], record["loss_dtype"] = output.logits.float().cpu(), output.loss.dtype
    adapter_dir = os.path.join(cli.out, "adapter")
    trainer.save_model(adapter_dir)
    trainer.accelerator.wait_for_everyone()
    record["adapter"] = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    torch.save(record, os.path.join(cli.out, f"rank{trainer.accelerator.process_index}.pt"))


if __name__ == "__main__":
    main()
