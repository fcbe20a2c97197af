"""`WeightLoraTrainer` under accelerate's FSDP2 (the packaged fsdp2.yaml, one process): warm-up, mask-mode switch,
checkpoints, save. Launched by test_cuda.py:

    accelerate launch --config_file wlora_trl/cli/accelerate_configs/fsdp2.yaml --num_processes 1 \
        --mixed_precision no tests/gpu/fsdp2_worker.py OUT [--resume CHECKPOINT]
    (and with --mixed_precision bf16 ... --bf16: accelerate's bf16 FSDP2 policy, as the packaged config has it)

Writes OUT/record.pt (what the test checks) and, at the end, the adapter to OUT/adapter.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from tests.testing_utils import addition_lm_dataset, cpu_args, tiny_llama  # noqa: E402
from wlora_trl import WeightLoraConfig, WeightLoraTrainer  # noqa: E402
from wlora_trl.masking import is_sharded  # noqa: E402

T, MAX_STEPS = 4, 8
PROBE = torch.arange(3, 35).reshape(2, 16)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--resume", default=None)
    parser.add_argument("--bf16", action="store_true", help="bf16=True (launch with --mixed_precision bf16)")
    cli = parser.parse_args()
    cfg = WeightLoraConfig(r=4, lora_alpha=8, target_modules="all-linear", k=0.5, selection_steps=T)
    # use_cpu only without CUDA: the worker then also runs on a CPU under tests/scripts/fsdp_on_cpu (a check of
    # the kit's own logic before it spends GPU time).
    args = cpu_args(
        os.path.join(cli.out, "run"), max_steps=MAX_STEPS, use_cpu=not torch.cuda.is_available(),
        save_strategy="steps", save_steps=2, bf16=cli.bf16,
    )  # fmt: skip
    trainer = WeightLoraTrainer(tiny_llama(), args, train_dataset=addition_lm_dataset(), peft_config=cfg)
    record = {"fsdp": trainer.is_fsdp_enabled, "mask_mode": trainer.weight_lora.mask_mode}
    trainer.train(resume_from_checkpoint=cli.resume)
    from torch.distributed.fsdp import FSDPModule

    model = trainer.model
    record.update(
        fsdp_module=isinstance(model, FSDPModule),
        sharded_parameters=sum(is_sharded(p) for p in model.parameters()),
        switched=trainer.weight_lora.switched,
        kept=[a.module for a in trainer.weight_lora.adapters if a.kept],
        losses={h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h},
        omega_steps=trainer.weight_lora.omega_steps,
        trainable=[name for name, p in model.named_parameters() if p.requires_grad],
    )
    model.eval()
    with torch.no_grad():
        probe = PROBE.to(trainer.args.device)
        output = model(input_ids=probe, labels=probe)
        record["logits"], record["loss_dtype"] = output.logits.float().cpu(), output.loss.dtype
    trainer.save_model(os.path.join(cli.out, "adapter"))
    if trainer.is_world_process_zero():
        torch.save(record, os.path.join(cli.out, "record.pt"))


if __name__ == "__main__":
    main()
