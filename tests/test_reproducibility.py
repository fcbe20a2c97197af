"""The seed decides the run: `args.seed`, not whatever the script drew from the random generator before."""

from __future__ import annotations

import torch

from tests.testing_utils import addition_lm_dataset, cpu_args, tiny_llama
from wlora_trl import WeightLoraConfig, WeightLoraTrainer


def _run(tmp_path, name, draws_before: int):
    model = tiny_llama(seed=0)  # the same base weights for both runs
    torch.rand(draws_before)  # the script's own use of the generator between loading the model and training
    config = WeightLoraConfig(r=4, lora_alpha=8, target_modules="all-linear", selection_steps=3)
    trainer = WeightLoraTrainer(
        model, cpu_args(tmp_path / name, max_steps=6), train_dataset=addition_lm_dataset(), peft_config=config
    )
    initial_a = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_A" in n}
    trainer.train()
    kept = [a.module for a in trainer.weight_lora.adapters if a.kept]
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return initial_a, kept, losses


def test_weight_lora_trainer_with_peft_config_is_decided_by_args_seed(tmp_path):
    # Before the fix the adapters were built before the Trainer seeded: their initialisation, hence the selection
    # and every loss, depended on the generator's state when the script built the trainer.
    first_a, first_kept, first_losses = _run(tmp_path, "first", draws_before=1)
    second_a, second_kept, second_losses = _run(tmp_path, "second", draws_before=1000)
    assert first_a.keys() == second_a.keys()
    assert all(torch.equal(first_a[n], second_a[n]) for n in first_a)
    assert first_kept == second_kept
    assert first_losses == second_losses and len(first_losses) == 6
