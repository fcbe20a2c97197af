"""The trainers in mask mode, as FSDP2 runs them, on a CPU without sharding (accelerate enables FSDP on GPUs only;
the sharded Trainer run is in the GPU kit, the sharded switch itself in test_fsdp2.py).

`_force_mask_mode` makes the trainer take the FSDP2 path's switch, save and resume without FSDP. With
`reinit=False` nothing random separates the two switches, so the mask-mode trainer must train, save and select
exactly as the module-swapping one; checkpoints on either side of T must resume the same run.
"""

import pytest
import torch
from safetensors.torch import load_file

from tests.testing_utils import addition_lm_dataset, cpu_args, tiny_llama
from wlora_trl import WeightLoraConfig, WeightLoraTrainer
from wlora_trl.state import read_selection

T, MAX_STEPS = 4, 8


class MaskModeTrainer(WeightLoraTrainer):
    _force_mask_mode = True


def _trainer(cls, output_dir, plus=False, reinit=True, **overrides):
    cfg = WeightLoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", k=0.5, selection_steps=T, plus=plus, reinit=reinit
    )
    args = cpu_args(output_dir, max_steps=MAX_STEPS, **overrides)
    return cls(tiny_llama(), args, train_dataset=addition_lm_dataset(), peft_config=cfg)


def _losses(trainer):
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def test_mask_mode_trainer_trains_and_saves_exactly_as_the_module_swap(tmp_path):
    swap = _trainer(WeightLoraTrainer, tmp_path / "swap", reinit=False)
    swap.train()
    swap.save_model()
    masked = _trainer(MaskModeTrainer, tmp_path / "mask", reinit=False)
    assert masked.weight_lora.mask_mode and not swap.weight_lora.mask_mode
    masked.train()
    masked.save_model()
    for step, loss in _losses(swap).items():
        assert _losses(masked)[step] == pytest.approx(loss, abs=1e-6), step
    ours = load_file(tmp_path / "mask" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "swap" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() and len(ours) == 2 * 7
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-6)
    assert read_selection(tmp_path / "mask").kept_modules == read_selection(tmp_path / "swap").kept_modules
    assert (tmp_path / "mask" / "README.md").is_file()  # the model card, as without mask mode


@pytest.fixture(scope="module", params=[False, True], ids=["WeightLoRA", "WeightLoRA+"])
def uninterrupted(request, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("full")
    trainer = _trainer(MaskModeTrainer, output_dir, plus=request.param, save_strategy="steps", save_steps=1)
    trainer.train()
    return request.param, output_dir, trainer


@pytest.mark.parametrize("checkpoint_step", [T - 2, T + 2], ids=["before_T", "after_T"])
def test_mask_mode_checkpoints_resume_the_same_run(tmp_path, uninterrupted, checkpoint_step):
    plus, output_dir, full = uninterrupted
    checkpoint = output_dir / f"checkpoint-{checkpoint_step}"
    resumed = _trainer(MaskModeTrainer, tmp_path, plus=plus)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    full_losses = _losses(full)
    after = {step: loss for step, loss in _losses(resumed).items() if step > checkpoint_step}
    assert sorted(after) == list(range(checkpoint_step + 1, MAX_STEPS + 1))
    for step, loss in after.items():
        assert loss == pytest.approx(full_losses[step], abs=1e-6), step
    for (name, p), (_, q) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)
