"""Trains a tiny model through the switch and saves what must agree across ranks. Launched by test_distributed.py.

    python ddp_worker.py OUT --batch 4 --accumulation 1                                  # one process
    accelerate launch --multi_gpu --num_processes 2 ddp_worker.py OUT --batch 1 --accumulation 2   # DDP (gloo)

Both see the same global batches: the sampler is sequential, and accelerate deals per-process batches round-robin.
"""

import argparse
import os
import sys

import torch
from torch.utils.data import SequentialSampler

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from tests.conftest import addition_lm_dataset, cpu_args, tiny_llama  # noqa: E402
from wlora_trl import WeightLoraConfig, WeightLoraTrainer  # noqa: E402


class SequentialTrainer(WeightLoraTrainer):
    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--accumulation", type=int, default=1)
    cli = parser.parse_args()

    cfg = WeightLoraConfig(r=4, lora_alpha=8, target_modules="all-linear", k=5, selection_steps=4)
    args = cpu_args(
        cli.out, max_steps=8, per_device_train_batch_size=cli.batch, gradient_accumulation_steps=cli.accumulation
    )
    trainer = SequentialTrainer(tiny_llama(), args, train_dataset=addition_lm_dataset(), peft_config=cfg)
    record = {}
    switch = trainer._switch

    def record_then_switch():
        record["omega"] = trainer.weight_lora.omega.detach().clone()
        switch()
        record["wrapper_after_switch"] = type(trainer.model_wrapped).__name__
        record["find_unused_after_switch"] = getattr(trainer.model_wrapped, "find_unused_parameters", None)

    trainer._switch = record_then_switch
    trainer.train()
    record["kept"] = [a.module for a in trainer.weight_lora.adapters if a.kept]
    record["adapters"] = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    record["losses"] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    record["world_size"] = args.world_size
    rank = int(os.environ.get("RANK", 0))
    torch.save(record, os.path.join(cli.out, f"rank{rank}.pt"))


if __name__ == "__main__":
    main()
