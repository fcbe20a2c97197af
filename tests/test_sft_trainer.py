"""WeightLoraSFTTrainer as a drop-in for trl.SFTTrainer, and omega under gradient accumulation."""

import torch

from tests.testing_utils import addition_lm_dataset, cpu_args, sft_args, sums_dataset, tiny_llama
from wlora_trl import WeightLoraConfig, WeightLoraSFTTrainer, WeightLoraTrainer
from wlora_trl.state import read_selection


def test_sft_trainer_is_a_drop_in(tmp_path, tokenizer):
    args = sft_args(tmp_path, max_steps=8)
    trainer = WeightLoraSFTTrainer(
        model=tiny_llama(),
        args=args,
        train_dataset=sums_dataset(),
        processing_class=tokenizer,
        peft_config=WeightLoraConfig(r=4, target_modules="all-linear", selection_steps=3),
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    selection = read_selection(tmp_path / "adapter")
    assert selection.switched and len(selection.kept_modules) == 7
    logged = [h for h in trainer.state.log_history if "weight_lora/kept_adapters" in h]
    assert len(logged) == 1 and "mean_token_accuracy" in logged[0]  # rode on a regular SFT log line
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]


def _omega_before_switch(tmp_path, batch, accumulation):
    cfg = WeightLoraConfig(r=4, target_modules="all-linear", selection_steps=4, k=5)
    args = cpu_args(tmp_path, max_steps=5, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation)
    trainer = WeightLoraTrainer(tiny_llama(), args, train_dataset=addition_lm_dataset(), peft_config=cfg)
    steps = []
    original_hook = trainer._omega_step_hook

    def counting_hook(*hook_args):
        steps.append(trainer.state.global_step)
        original_hook(*hook_args)

    trainer._omega_step_hook = counting_hook
    trainer.train()
    return torch.tensor([a.omega for a in trainer.weight_lora.adapters]), steps


def test_gradient_accumulation_steps_omega_once_per_optimizer_step(tmp_path):
    omega_full, steps_full = _omega_before_switch(tmp_path / "full", batch=4, accumulation=1)
    omega_accumulated, steps_accumulated = _omega_before_switch(tmp_path / "acc", batch=2, accumulation=2)
    assert steps_full == steps_accumulated == [0, 1, 2, 3]  # once per optimizer step of the warm-up, then never
    assert int(omega_full.ne(0).sum()) == 5
    torch.testing.assert_close(omega_accumulated, omega_full, rtol=1e-4, atol=1e-5)
