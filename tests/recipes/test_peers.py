"""AdaLoRA and EVA as the recipes run them (`wlora_trl.recipes.peers`): budgets matched to WeightLoRA's, EVA's
data-driven initialisation of A, AdaLoRA's allocation under the stock Trainer and TRL's SFTTrainer, and the refusals."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
from peft import get_peft_model
from transformers import Trainer

from tests.testing_utils import (
    char_tokenizer,
    classification_dataset,
    cpu_args,
    sft_args,
    sums_dataset,
    tiny_bert_classifier,
    tiny_llama,
)
from wlora_trl.recipes import common, peers


def peer_args(method: str, **overrides) -> SimpleNamespace:
    """The flags as the recipes' parser gives them (strings where the flag keeps the text)."""
    values = dict(method=method, k="0.5", selection_steps="5", omega_lr=100.0, plus=False, reinit=True,
                  adalora_init_r=None, adalora_target_r=None, adalora_tinit=peers.ADALORA_TINIT,
                  adalora_tfinal=peers.ADALORA_TFINAL, adalora_delta_t=1, eva_r=None, eva_rho=None)  # fmt: skip
    values.update(overrides)
    return SimpleNamespace(**values)


LORA = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "key", "value", "dense"])


def test_adalora_is_matched_to_weightloras_budget():
    config = common.build_peft_config(peer_args("adalora"), max_steps=200, task_type="SEQ_CLS", **LORA)
    assert type(config).__name__ == "AdaLoraConfig"
    assert (config.init_r, config.target_r, config.total_step) == (8, 4, 200)  # starts at LoRA's r, ends at k*r
    assert (config.tinit, config.tfinal, config.deltaT) == (20, 60, 1)  # 10% and 30% of the steps
    assert config.lora_alpha == 16  # alpha / init_r = LoRA's alpha / r
    explicit = common.build_peft_config(
        peer_args("adalora", adalora_init_r=12, adalora_tinit="5", k="0.25"), max_steps=200, **LORA
    )
    assert (explicit.init_r, explicit.target_r, explicit.tinit) == (12, 2, 5)
    assert explicit.lora_alpha == 24  # 16 * 12 / 8: alpha / init_r stays LoRA's 2


def test_eva_is_matched_to_weightloras_budget():
    config = common.build_peft_config(peer_args("eva"), task_type="SEQ_CLS", **LORA)
    assert config.init_lora_weights == "eva" and config.r == 4 and config.eva_config.rho == 2.0
    assert config.lora_alpha == 8 and not config.eva_config.use_label_mask  # alpha/r = 2 as LoRA's; one label a row
    causal = common.build_peft_config(peer_args("eva", k="0.25"), task_type="CAUSAL_LM", **LORA)
    assert (causal.r, causal.eva_config.rho, causal.eva_config.use_label_mask) == (2, 4.0, True)


@pytest.mark.parametrize(
    "method, overrides, max_steps, message",
    [
        ("adalora", dict(k="3"), 100, "pass k as a fraction"),
        ("eva", dict(k="0.05"), 100, "rounds to 0 ranks"),
        ("adalora", {}, -1, "pass --max_steps"),
        ("adalora", dict(adalora_tinit="0.5", adalora_tfinal="0.5"), 100, "no budgeting phase"),
        ("adalora", dict(adalora_tinit="1.5"), 100, r"must be in \[0, 1\)"),
        ("eva", dict(eva_rho=0.5), 100, "rho >= 1"),
        ("eva", dict(plus=True), 100, "--plus is WeightLoRA"),
    ],
)
def test_peer_flags_that_cannot_work_are_refused(method, overrides, max_steps, message):
    with pytest.raises(ValueError, match=message):
        common.build_peft_config(peer_args(method, **overrides), max_steps=max_steps, **LORA)


def test_eva_initialises_A_from_the_training_data_and_keeps_the_trainers_data_order(tmp_path, capsys):
    config = common.build_peft_config(
        peer_args("eva"), task_type="SEQ_CLS", **{**LORA, "target_modules": ["query", "value"]}
    )
    model = get_peft_model(tiny_bert_classifier(seed=0), config)
    trainer = Trainer(model=model, args=cpu_args(tmp_path, data_seed=3), train_dataset=classification_dataset())
    before = {name: p.detach().clone() for name, p in model.named_parameters() if "lora_A" in name}
    order = list(trainer.get_train_dataloader().batch_sampler)
    rng_state = torch.get_rng_state()

    run = peers.prepare(trainer, "eva")

    printed = capsys.readouterr().out  # the silent pass before training says what it does and when it is done
    assert "EVA: initialising the adapters" in printed and re.search(r"EVA: initialised in \d+ s", printed)
    assert torch.equal(torch.get_rng_state(), rng_state)  # EVA's shuffle has its own generator
    assert list(trainer.get_train_dataloader().batch_sampler) == order  # so training sees the same order
    after = {name: p for name, p in model.named_parameters() if "lora_A" in name}
    assert sum(p.shape[0] for p in after.values()) == 4 * 4  # 4 modules x k*r = 4: the budget, redistributed
    for name, a in after.items():
        assert a.shape[0] != before[name].shape[0] or not torch.allclose(a, before[name])
        gram = a @ a.T  # SVD components: orthonormal rows, unlike kaiming-uniform A
        assert torch.allclose(gram, torch.eye(a.shape[0]), atol=1e-4)
    assert all(torch.count_nonzero(p) == 0 for name, p in model.named_parameters() if "lora_B" in name)
    assert run.summary(model)["total_rank"] == 16


def test_adalora_and_eva_through_trls_sft_trainer(tmp_path):
    """The GSM8K recipe's path: TRL builds the PeftModel from the peer's config; the callback and EVA's label mask
    (prompt tokens are -100) work on a causal LM."""
    from trl import SFTTrainer

    lora = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    for method in ("adalora", "eva"):
        config = common.build_peft_config(peer_args(method), max_steps=10, **lora)
        tokenizer = char_tokenizer()
        trainer = SFTTrainer(model=tiny_llama(), args=sft_args(tmp_path / method, max_steps=10),
                             train_dataset=sums_dataset(), processing_class=tokenizer, peft_config=config)  # fmt: skip
        run = peers.prepare(trainer, method)
        trainer.train()
        summary = run.summary(trainer.model)
        assert summary["total_rank"] == 14 * 2  # 14 projections x k*r = 2
        if method == "adalora":
            assert summary["budget_history"][0] == [0, 14 * 4] and summary["budget_history"][-1][1] == 28
