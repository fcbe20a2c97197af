"""A save folder is composed in one place (`wlora_trl.artifacts.saving`) from the state in memory: nothing a save writes is
read back from the folder to write the rest."""

from __future__ import annotations

import pytest

from tests.testing_utils import addition_lm_dataset, cpu_args, tiny_llama
from wlora_trl import WeightLoraConfig, WeightLoraTrainer, state
from wlora_trl.artifacts import export, portable

FILES = {"adapter_model.safetensors", "adapter_config.json", "selection.json", "selection_heatmap.png", "README.md"}


@pytest.mark.parametrize("stage1", [False, True], ids=["after_training", "select_adapters"])
def test_a_save_reads_nothing_back_from_the_folder(tmp_path, monkeypatch, stage1):
    config = WeightLoraConfig(r=4, lora_alpha=8, target_modules="all-linear", selection_steps=3)
    trainer = WeightLoraTrainer(
        tiny_llama(), cpu_args(tmp_path / "run", max_steps=6), train_dataset=addition_lm_dataset(), peft_config=config
    )
    trainer.select_adapters() if stage1 else trainer.train()

    def no_reading_back(*args, **kwargs):
        raise AssertionError(f"the save read back what it had just written: {args}")

    # state.read_selection is what pad_adapter imports when it runs; portable holds its own reference; export's
    # load_file is how the adapter weights were read back and rewritten (warm-up folding, padding) before one
    # builder wrote them once.
    readers = (
        (state, "read_selection"),
        (portable, "read_selection"),
        (portable, "_stage1_config"),
        (export, "load_file"),
    )
    for module, name in readers:
        monkeypatch.setattr(module, name, no_reading_back)
    trainer.save_model(str(tmp_path / "out"), padded=True)
    written = {path.name for path in (tmp_path / "out").iterdir()}
    assert FILES <= written
    assert ("lora_targets.yaml" in written) == stage1
    card = (tmp_path / "out" / "README.md").read_text()
    assert "selection_heatmap.png" in card  # the card links the heatmap written beside it
