"""Trains a tiny model through the switch and saves what the one-process torchrun test compares. Launched by
test_cuda.py, under `torchrun --nproc_per_node 1` (NCCL on a GPU, gloo on the CPU) and as a plain process:

    python -m torch.distributed.run --nproc_per_node 1 nccl_worker.py OUT --device cuda
    python nccl_worker.py OUT --device cuda
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from tests.scripts.ddp_worker import SequentialTrainer  # noqa: E402
from tests.testing_utils import addition_lm_dataset, cpu_args, tiny_llama  # noqa: E402
from wlora_trl import WeightLoraConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--device", default="cuda")
    cli = parser.parse_args()

    cfg = WeightLoraConfig(r=4, lora_alpha=8, target_modules="all-linear", k=5, selection_steps=4)
    args = cpu_args(cli.out, max_steps=8, per_device_train_batch_size=4, use_cpu=cli.device == "cpu")
    trainer = SequentialTrainer(tiny_llama(), args, train_dataset=addition_lm_dataset(), peft_config=cfg)
    record = {"ddp_forced": False}
    if "LOCAL_RANK" in os.environ and not trainer.accelerator.multi_device and cli.device == "cuda":
        # accelerate wraps a CUDA run in DDP only with more than one process (`Accelerator.multi_device` needs
        # num_processes > 1; on the CPU, gloo runs are wrapped at any size). Force the wrapper, so this one-process
        # run takes the re-wrap path on NCCL that a multi-GPU run takes.
        from accelerate import Accelerator
        from accelerate.utils import DistributedType

        Accelerator.multi_device = property(lambda self: self.distributed_type == DistributedType.MULTI_GPU)
        record["ddp_forced"] = True
    switch = trainer._switch

    def record_then_switch():
        record["omega"] = trainer.weight_lora.omega.detach().cpu().clone()
        before = trainer.model_wrapped
        record["wrapper_before_switch"] = type(before).__name__
        switch()
        record["wrapper_after_switch"] = type(trainer.model_wrapped).__name__
        record["wrapper_after_switch_is_new"] = trainer.model_wrapped is not before

    trainer._switch = record_then_switch
    trainer.train()
    dist = torch.distributed
    record["backend"] = dist.get_backend() if dist.is_available() and dist.is_initialized() else None
    record["kept"] = [a.module for a in trainer.weight_lora.adapters if a.kept]
    record["adapters"] = {n: p.detach().cpu().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    record["device"] = str(next(trainer.model.parameters()).device)
    os.makedirs(cli.out, exist_ok=True)
    torch.save(record, os.path.join(cli.out, f"rank{int(os.environ.get('RANK', 0))}.pt"))


if __name__ == "__main__":
    main()
