"""Trains a tiny model through the switch and saves what must agree across ranks. Launched by test_distributed.py.

    python ddp_worker.py OUT --batch 4 --accumulation 1                                  # one process
    accelerate launch --multi_gpu --num_processes 2 ddp_worker.py OUT --batch 1 --accumulation 2   # DDP (gloo)
    torchrun --nproc_per_node 2 ddp_worker.py OUT --batch 2 --scenarios torch_compile evaluate_first  # OUT/<name>/

Both see the same global batches: the sampler is sequential, and accelerate deals per-process batches round-robin.
"""

import argparse
import gc
import os
import sys
import weakref

import torch
from torch.utils.data import SequentialSampler
from transformers import TrainerCallback

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from tests.testing_utils import addition_lm_dataset, cpu_args, tiny_llama, tiny_qwen3_moe  # noqa: E402
from wlora_trl import WeightLoraConfig, WeightLoraTrainer  # noqa: E402

# Setups that once let the ranks train apart, crashed, or kept the old adapters alive under DDP. `--scenarios` runs
# several in one launch, one after the other (a process start costs more than a scenario's 8 steps).
SCENARIOS = {
    "evaluate_first": ["--evaluate-first"],  # the recipes evaluate the untrained model, then train
    "torch_compile": ["--compile"],  # the DDP wrapper sits inside an OptimizedModule
    "reentrant_checkpointing": ["--reentrant-checkpointing"],  # with ddp_find_unused_parameters=False
    "conditional_compute": ["--conditional-compute"],  # a kept adapter unused in some steps after the switch
    "mixture_of_experts": ["--moe"],  # Qwen3-MoE: experts blocks and routers are units (one omega per block)
}


class SequentialTrainer(WeightLoraTrainer):
    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument(
        "--evaluate-first", action="store_true", help="trainer.evaluate() before train(), as the recipes do"
    )
    parser.add_argument("--compile", action="store_true", help="torch_compile=True with the eager backend")
    parser.add_argument(
        "--reentrant-checkpointing",
        action="store_true",
        help="reentrant gradient checkpointing with ddp_find_unused_parameters=False",
    )
    parser.add_argument(
        "--conditional-compute",
        action="store_true",
        help="after the switch, every other step skips the last layer (its adapters get no gradient)",
    )
    parser.add_argument(
        "--unwrap-at",
        type=int,
        default=None,
        help="simulate a lost DDP wrapper: from this step on the ranks train without synchronising",
    )
    parser.add_argument("--moe", action="store_true", help="a tiny Qwen3-MoE: experts blocks and routers are units")
    parser.add_argument("--scenarios", nargs="+", choices=sorted(SCENARIOS), help="run these, each into OUT/<name>")
    cli = parser.parse_args()
    if not cli.scenarios:
        train_and_record(cli)
        return
    for name in cli.scenarios:
        scenario = parser.parse_args([os.path.join(cli.out, name), "--batch", str(cli.batch), *SCENARIOS[name]])
        os.makedirs(scenario.out, exist_ok=True)
        train_and_record(scenario)


def train_and_record(cli: argparse.Namespace) -> None:
    cfg = WeightLoraConfig(r=4, lora_alpha=8, target_modules="all-linear", k=5, selection_steps=4)
    extra = {}
    if cli.compile:
        extra.update(torch_compile=True, torch_compile_backend="eager")
    if cli.reentrant_checkpointing:
        extra.update(
            gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": True},
            ddp_find_unused_parameters=False,
        )
    args = cpu_args(
        cli.out,
        max_steps=8,
        per_device_train_batch_size=cli.batch,
        gradient_accumulation_steps=cli.accumulation,
        per_device_eval_batch_size=cli.batch,
        **extra,
    )
    trainer = SequentialTrainer(
        tiny_qwen3_moe() if cli.moe else tiny_llama(),
        args,
        train_dataset=addition_lm_dataset(),
        peft_config=cfg,
        eval_dataset=addition_lm_dataset(rows=8),
    )
    record = {}
    switch = trainer._switch

    def record_then_switch():
        record["omega"] = trainer.weight_lora.omega.detach().clone()
        record["wrapper_before_switch"] = type(trainer.model_wrapped).__name__
        old = [p for n, p in trainer.model.named_parameters() if "lora_" in n]
        refs = [weakref.ref(p) for p in old]
        del old
        switch()
        gc.collect()
        record["old_adapter_tensors_alive"] = sum(r() is not None for r in refs)
        wrapped = getattr(trainer.model_wrapped, "_orig_mod", trainer.model_wrapped)  # under torch.compile
        record["wrapper_after_switch"] = type(wrapped).__name__
        record["find_unused_after_switch"] = getattr(wrapped, "find_unused_parameters", None)

    trainer._switch = record_then_switch
    if cli.conditional_compute:
        config = trainer.model.base_model.model.config

        class SkipLastLayer(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                after_switch = state.global_step >= cfg.selection_steps
                config.num_hidden_layers = 1 if after_switch and state.global_step % 2 == 1 else 2

        trainer.add_callback(SkipLastLayer())
    if cli.unwrap_at is not None:

        class Unwrap(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if state.global_step == cli.unwrap_at:
                    trainer.model_wrapped = trainer.model

        trainer.add_callback(Unwrap())
    if cli.evaluate_first:
        record["eval_loss_before"] = trainer.evaluate()["eval_loss"]
    rank = int(os.environ.get("RANK", 0))
    try:
        trainer.train()
    except RuntimeError as error:  # the guard rails' refusals, recorded for the test
        record["error"] = str(error)
        torch.save(record, os.path.join(cli.out, f"rank{rank}.pt"))
        return
    record["kept"] = [a.module for a in trainer.weight_lora.adapters if a.kept]
    record["adapters"] = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    record["losses"] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    record["world_size"] = args.world_size
    torch.save(record, os.path.join(cli.out, f"rank{rank}.pt"))


if __name__ == "__main__":
    main()
