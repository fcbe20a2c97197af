"""`WeightLoraTrainer` under accelerate's FSDP2 (the packaged fsdp2.yaml, one process): warm-up, mask-mode switch,
checkpoints, save. Launched by test_cuda.py:

    accelerate launch --config_file wlora_trl/cli/accelerate_configs/fsdp2.yaml --num_processes 1 \
        --mixed_precision no tests/gpu/fsdp2_worker.py OUT [--resume CHECKPOINT]

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
    cli = parser.parse_args()
    cfg = WeightLoraConfig(r=4, lora_alpha=8, target_modules="all-linear", k=0.5, selection_steps=T)
    args = cpu_args(
        os.path.join(cli.out, "run"), max_steps=MAX_STEPS, use_cpu=False, save_strategy="steps", save_steps=2
    )
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
        record["logits"] = model(input_ids=PROBE.to(trainer.args.device)).logits.float().cpu()
    trainer.save_model(os.path.join(cli.out, "adapter"))
    if trainer.is_world_process_zero():
        torch.save(record, os.path.join(cli.out, "record.pt"))


if __name__ == "__main__":
    main()
