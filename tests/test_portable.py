"""The two-stage route: WeightLoRA's warm-up and switch only (stage 1), then stock TRL on a stock LoraConfig built from
the selection (stage 2), which must put its adapters on exactly the kept modules with the expected ranks."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from trl import ModelConfig, SFTTrainer, TrlParser, get_peft_config

from tests.testing_utils import char_tokenizer, sft_args, sums_dataset, tiny_llama
from wlora_trl import WeightLoraConfig, WeightLoraSFTTrainer, lora_config_from_selection
from wlora_trl.artifacts.portable import TARGETS_FILE, write_lora_targets
from wlora_trl.state import read_selection


def _stage1(tmp_path, **config):
    config.setdefault("k", None if config.get("plus") else 5)  # WeightLoRA+ keeps n/2 = 7 by definition
    cfg = WeightLoraConfig(
        r=4,
        lora_alpha=8,
        target_modules="all-linear",
        selection_steps=3,
        **{key: value for key, value in config.items() if value is not None},
    )
    trainer = WeightLoraSFTTrainer(
        model=tiny_llama(), args=sft_args(tmp_path / "stage1", max_steps=40), train_dataset=sums_dataset(),
        processing_class=char_tokenizer(), peft_config=cfg,
    )  # fmt: skip
    report = trainer.select_adapters()
    trainer.save_model(str(tmp_path / "selected"))
    return trainer, report


def _lora_ranks(model) -> dict[str, int]:
    """{module name relative to the base model: rank} of every LoRA layer in a PeftModel."""
    return {
        name.removeprefix("base_model.model."): module.r["default"]
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and "default" in module.r
    }


@pytest.mark.parametrize("plus", [False, True], ids=["WeightLoRA", "WeightLoRA+"])
def test_stage1_stops_at_the_switch_and_stock_trl_trains_the_kept_modules(tmp_path, plus):
    trainer, report = _stage1(tmp_path, plus=plus)
    # Stage 1 took exactly T optimizer steps, switched, and kept K of the 14 adapters.
    assert trainer.state.global_step == 3 and trainer.weight_lora.switched
    k = 7 if plus else 5
    assert report.switched and report.k == k and len(report.kept_modules) == k and report.n == 14
    assert report.omega_steps["taken"] >= 1  # omega moved: the selection is StoIHT's, not the index order
    rank, alpha = (8, 16) if plus else (4, 8)

    config = lora_config_from_selection(tmp_path / "selected")
    assert isinstance(config, LoraConfig) and type(config) is LoraConfig  # stock: no WeightLoRA fields
    assert sorted(config.target_modules) == sorted(report.kept_modules)
    assert (config.r, config.lora_alpha) == (rank, alpha) and not config.rank_pattern

    # Stage 2: stock TRL on a fresh base.
    stage2 = SFTTrainer(
        model=tiny_llama(seed=1), args=sft_args(tmp_path / "stage2", max_steps=3), train_dataset=sums_dataset(),
        processing_class=char_tokenizer(), peft_config=config,
    )  # fmt: skip
    assert _lora_ranks(stage2.model) == {name: rank for name in report.kept_modules}
    before = {n: p.detach().clone() for n, p in stage2.model.named_parameters() if "lora_B" in n}
    stage2.train()
    after = dict(stage2.model.named_parameters())
    assert all(not torch.equal(before[n], after[n]) for n in before)  # every kept adapter trained
    stage2.save_model(str(tmp_path / "stage2_adapter"))
    with safe_open(str(tmp_path / "stage2_adapter" / "adapter_model.safetensors"), "pt") as f:
        shapes = {key: f.get_slice(key).get_shape() for key in f.keys()}
    saved = {key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for key in shapes}
    assert saved == set(report.kept_modules)
    assert all(shape[0] == rank for key, shape in shapes.items() if ".lora_A." in key)
    reloaded = PeftModel.from_pretrained(tiny_llama(seed=1), tmp_path / "stage2_adapter")
    assert _lora_ranks(reloaded) == {name: rank for name in report.kept_modules}


def test_the_targets_yaml_is_a_trl_config_that_builds_the_same_lora_config(tmp_path):
    _, report = _stage1(tmp_path, lora_dropout=0.1, use_rslora=True, task_type="CAUSAL_LM")
    path = tmp_path / "selected" / TARGETS_FILE  # save_model wrote it, after select_adapters
    assert path.is_file() and write_lora_targets(tmp_path / "selected") == str(path)
    (model_args,) = TrlParser((ModelConfig,)).parse_args_and_config(args=["--config", str(path)])
    peft_config = get_peft_config(model_args)
    ours = lora_config_from_selection(tmp_path / "selected")
    assert peft_config.target_modules == ours.target_modules == set(report.kept_modules)
    for field in ("r", "lora_alpha", "lora_dropout", "use_rslora", "task_type"):
        assert getattr(peft_config, field) == getattr(ours, field), field  # not TRL's defaults (dropout 0.05, ...)
    assert (ours.r, ours.lora_alpha, ours.lora_dropout, ours.use_rslora) == (4, 8, 0.1, True)
    assert f"lora_target: {','.join(report.kept_modules)}" in path.read_text()  # LLaMA-Factory's form
    card = (tmp_path / "selected" / "README.md").read_text()
    assert "**selection only**" in card and "lora_config_from_selection" in card


def test_select_refuses_a_checkpoint_from_after_the_switch(tmp_path):
    """Resuming such a checkpoint would train on to max_steps; its selection is already made."""
    trainer = WeightLoraSFTTrainer(
        model=tiny_llama(), args=sft_args(tmp_path / "run", max_steps=6, save_strategy="steps", save_steps=5),
        train_dataset=sums_dataset(), processing_class=char_tokenizer(),
        peft_config=WeightLoraConfig(r=4, target_modules="all-linear", selection_steps=3, k=5),
    )  # fmt: skip
    trainer.train()
    fresh = WeightLoraSFTTrainer(
        model=tiny_llama(), args=sft_args(tmp_path / "run", max_steps=6), train_dataset=sums_dataset(),
        processing_class=char_tokenizer(),
        peft_config=WeightLoraConfig(r=4, target_modules="all-linear", selection_steps=3, k=5),
    )  # fmt: skip
    with pytest.raises(ValueError, match="saved after the switch"):
        fresh.select_adapters(resume_from_checkpoint=True)  # the latest: checkpoint-5, after T = 3
    assert fresh.state.global_step == 0 and not fresh.weight_lora.switched


def test_rank_override_rescales_alpha_and_bad_sources_are_refused(tmp_path):
    trainer, report = _stage1(tmp_path)
    assert (lora_config_from_selection(tmp_path / "selected", r=16).lora_alpha) == 32  # alpha / r kept
    assert lora_config_from_selection(report, lora_alpha=8).target_modules == set(report.kept_modules)
    with pytest.raises(ValueError, match="pass lora_alpha="):
        lora_config_from_selection(report)  # a bare report knows no alpha
    with pytest.raises(RuntimeError, match="already happened"):
        trainer.select_adapters()
    with pytest.raises(TypeError, match="target_modules comes from the selection"):
        lora_config_from_selection(tmp_path / "selected", target_modules=["q_proj"])
    first_kept = next(i for i, a in enumerate(report.adapters) if a.kept)
    adapters = tuple(dataclasses.replace(a, rank=8) if i == first_kept else a for i, a in enumerate(report.adapters))
    mixed = dataclasses.replace(report, adapters=adapters)
    with pytest.raises(ValueError, match="pass r="):
        lora_config_from_selection(mixed, lora_alpha=8)
    assert lora_config_from_selection(mixed, r=4, lora_alpha=8).r == 4  # r= settles mixed ranks

    # A save from inside the warm-up has no selection yet.
    early = WeightLoraSFTTrainer(
        model=tiny_llama(), args=sft_args(tmp_path / "early", max_steps=40), train_dataset=sums_dataset(),
        processing_class=char_tokenizer(),
        peft_config=WeightLoraConfig(r=4, target_modules="all-linear", selection_steps=3, k=5),
    )  # fmt: skip
    early.save_model(str(tmp_path / "warmup"))  # at step 0, inside the warm-up
    assert not read_selection(tmp_path / "warmup").switched
    with pytest.raises(ValueError, match="before the switch"):
        lora_config_from_selection(tmp_path / "warmup")
    config = json.loads((tmp_path / "selected" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(report.kept_modules)  # the stage-1 folder is already stock
