"""Checkpoints taken before, exactly at, and after T resume to the same losses and the same selection."""

import pytest
import torch

from tests.testing_utils import addition_lm_dataset, cpu_args, tiny_llama
from wlora_trl import WeightLoraConfig, WeightLoraTrainer
from wlora_trl.state import read_selection

T = 4
MAX_STEPS = 8


def _trainer(output_dir, plus=False):
    k = 0.5 if plus else 5  # WeightLoRA+ keeps n/2 by definition
    cfg = WeightLoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear", k=k, selection_steps=T, plus=plus
    )
    args = cpu_args(output_dir, max_steps=MAX_STEPS, save_strategy="steps", save_steps=1, warmup_steps=2)
    return WeightLoraTrainer(tiny_llama(), args, train_dataset=addition_lm_dataset(), peft_config=cfg)


def _losses(trainer):
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def _kept(trainer):
    return [a.module for a in trainer.weight_lora.adapters if a.kept]


@pytest.fixture(scope="module", params=[False, True], ids=["WeightLoRA", "WeightLoRA+"])
def uninterrupted(request, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("full")
    trainer = _trainer(output_dir, plus=request.param)
    trainer.train()
    return request.param, output_dir, trainer


@pytest.mark.parametrize("checkpoint_step", [T - 2, T, T + 2], ids=["before_T", "at_T", "after_T"])
def test_resume_matches_the_uninterrupted_run(tmp_path, uninterrupted, checkpoint_step):
    plus, output_dir, full = uninterrupted
    checkpoint = output_dir / f"checkpoint-{checkpoint_step}"
    assert read_selection(checkpoint).switched == (checkpoint_step > T)

    resumed = _trainer(tmp_path, plus=plus)
    resumed.train(resume_from_checkpoint=str(checkpoint))

    full_losses = _losses(full)
    # The resumed history starts with the checkpoint's own entries; compare the steps trained after it.
    resumed_losses = {step: loss for step, loss in _losses(resumed).items() if step > checkpoint_step}
    steps = range(checkpoint_step + 1, MAX_STEPS + 1)
    assert sorted(resumed_losses) == list(steps)
    for step in steps:
        assert abs(resumed_losses[step] - full_losses[step]) <= 1e-6, (step, resumed_losses, full_losses)
    assert _kept(resumed) == _kept(full)
    for (name, p), (_, q) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)


def test_resume_in_the_warmup_continues_from_the_unfolded_weights(tmp_path):
    """A warm-up checkpoint's adapter file has omega folded into lora_B (so stock PEFT loads the model as it is);
    resuming must continue from the unfolded weights kept beside it, or the warm-up would continue from other
    weights. reinit=False carries the warm-up weights through the switch, so any difference shows to the end."""

    def trainer(output_dir):
        cfg = WeightLoraConfig(
            r=4,
            lora_alpha=8,
            target_modules="all-linear",
            k=5,
            selection_steps=6,
            reinit=False,
            init_lora_weights="gaussian",
        )
        args = cpu_args(output_dir, max_steps=9, save_strategy="steps", save_steps=3)
        return WeightLoraTrainer(tiny_llama(), args, train_dataset=addition_lm_dataset(), peft_config=cfg)

    full = trainer(tmp_path / "full")
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-3"
    assert (checkpoint / "weight_lora_warmup_adapter.safetensors").is_file()
    omega = torch.tensor([a.omega for a in read_selection(checkpoint).adapters])
    assert (omega - 1).abs().max() > 0.05  # omega has moved: folding changed the saved lora_B noticeably

    resumed = trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for step in range(4, 10):
        assert abs(_losses(resumed)[step] - _losses(full)[step]) <= 1e-6, step
    for (name, p), (_, q) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6, msg=name)
