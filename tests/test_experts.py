"""Mixture-of-experts models: each layer's experts block (PEFT's nested `ParamWrapper`s on gate_up_proj and down_proj)
is one selectable unit, and a router adapted by PEFT's all-linear (`gate.weight`) one of its own (`wlora_trl.units`).

Checked here on a tiny Qwen3-MoE (4 experts, 2 layers): the gate on a block is exactly the ungated block with B scaled
by omega (value and gradient); a dropped block is the plain experts module again; reinit=False and WeightLoRA+ keep
the function through the switch, in module-swap and in mask mode, and the export reloads with stock PEFT; the record
(selection.json, heatmap grid, card, portable config) carries the blocks; resume before and after T; the warning for
3-D expert parameters all-linear does not reach (Qwen2-MoE). The matrix in test_architectures trains Qwen3-MoE,
Mixtral and gpt-oss through the switch and reloads them in a fresh process.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.lora.layer import ParamWrapper

from tests.testing_utils import VOCAB, addition_lm_dataset, cpu_args, tiny_qwen3_moe
from wlora_trl import WeightLoraConfig, WeightLoraModel, WeightLoraTrainer
from wlora_trl.artifacts.card import model_card
from wlora_trl.artifacts.portable import lora_config_from_selection
from wlora_trl.state import read_selection, selection_grid, write_selection

IDS = torch.arange(3, 35).reshape(2, 16)
BLOCK = "model.layers.0.mlp.experts"


def _moe(**cfg) -> PeftModel:
    fields = dict(r=2, lora_alpha=4, target_modules="all-linear", selection_steps=3, init_lora_weights="gaussian")
    return get_peft_model(tiny_qwen3_moe(seed=0), WeightLoraConfig(**{**fields, **cfg}))


@torch.no_grad()
def _randomise_b(model: PeftModel, seed: int = 1) -> None:
    """Nonzero B everywhere (PEFT starts it at zero), so every adapter changes the function."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _train(weight_lora: WeightLoraModel, steps: int, optimizer=None) -> torch.optim.Optimizer:
    optimizer = optimizer or torch.optim.AdamW(weight_lora.trainable_parameters(), lr=1e-2)
    for _ in range(steps):
        weight_lora.model(input_ids=IDS, labels=IDS).loss.backward()
        weight_lora.omega_step()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


def _threshold_to(weight_lora: WeightLoraModel, kept: list[int]) -> None:
    """omega as StoIHT leaves it when `kept` are its K largest: zero elsewhere (so dropping them changes nothing)."""
    omega = weight_lora.omega
    omega[[i for i in range(weight_lora.num_adapters) if i not in kept]] = 0
    weight_lora.set_omega(omega)


def test_units_are_the_linear_adapters_the_experts_blocks_and_the_routers():
    weight_lora = WeightLoraModel(_moe(), max_steps=10)
    kinds = {unit.name: unit.kind for unit in weight_lora.units}
    assert kinds[BLOCK] == "experts" and kinds["model.layers.0.mlp.gate"] == "parameter"
    assert sum(kind == "experts" for kind in kinds.values()) == 2 and weight_lora.num_adapters == 12
    (block,) = [unit for unit in weight_lora.units if unit.name == BLOCK]
    assert list(block.shapes) == ["gate_up_proj", "down_proj"]  # innermost wrapper first
    # PEFT's all-linear gives the fused gate_up_proj rank 2r (gate and up, r each): the block keeps that multiple.
    assert block.layer_ranks == [2, 4] and block.warmup_rank == 2


def test_a_gated_block_computes_and_differentiates_as_the_ungated_block_with_b_scaled_by_omega():
    """omega_i on an experts block scales both of its wrappers' B: output and gradients (A, B, omega) are those of the
    ungated model whose B is omega_i * B. Checked for the whole model's loss, so routing and both wrappers count."""
    gated = _moe()
    _randomise_b(gated)
    ungated = copy.deepcopy(gated)
    weight_lora = WeightLoraModel(gated, max_steps=10)
    index, value = weight_lora.module_names.index(BLOCK), 0.37
    omega = torch.ones(weight_lora.num_adapters)
    omega[index] = value
    weight_lora.set_omega(omega)
    block_b = {n: p for n, p in ungated.named_parameters() if f"{BLOCK}." in n and "lora_B" in n}
    assert len(block_b) == 2  # gate_up_proj's and down_proj's
    with torch.no_grad():
        for param in block_b.values():
            param.mul_(value)

    gated_loss = gated(input_ids=IDS, labels=IDS).loss
    ungated_loss = ungated(input_ids=IDS, labels=IDS).loss
    torch.testing.assert_close(gated_loss, ungated_loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(_logits(gated), _logits(ungated), rtol=0, atol=1e-6)
    gated_loss.backward()
    ungated_loss.backward()
    ungated_params = dict(ungated.named_parameters())
    expected_omega_grad = torch.zeros(())
    for name, param in gated.named_parameters():
        if "lora_" not in name:
            continue
        reference = ungated_params[name].grad
        if name in block_b:  # d/dB of (omega B) = omega * d/d(omega B); d/domega = <B, d/d(omega B)>
            torch.testing.assert_close(param.grad, value * reference, rtol=1e-5, atol=1e-8, msg=name)
            expected_omega_grad = expected_omega_grad + (param.detach() * reference).sum()
        else:
            torch.testing.assert_close(param.grad, reference, rtol=1e-5, atol=1e-8, msg=name)
    omega_grad = weight_lora.take_omega_grad()
    torch.testing.assert_close(omega_grad[index], expected_omega_grad, rtol=1e-5, atol=1e-7)
    assert omega_grad.abs().min() > 0  # every unit, routers included, gets a gradient through its gate


def test_a_dropped_block_and_router_are_the_plain_modules_again():
    model = _moe()
    weight_lora = WeightLoraModel(model, max_steps=10)
    base_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n and "omega" not in n)
    linear = [i for i, unit in enumerate(weight_lora.units) if unit.kind == "linear"]
    optimizer = _train(weight_lora, 3)
    weight_lora.switch(optimizer, kept=linear[:4])
    mlp = weight_lora.base.model.layers[0].mlp
    assert type(mlp.experts).__name__ == "Qwen3MoeExperts" and type(mlp.gate).__name__ == "Qwen3MoeTopKRouter"
    for module in (mlp.experts, mlp.gate):  # no LoRA parameters, no parametrization (PEFT's per-forward fold)
        assert not any("lora_" in n for n, _ in module.named_parameters()) and not hasattr(module, "parametrizations")
    assert not any(isinstance(m, ParamWrapper) for m in model.modules())
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n) == base_params
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in model.parameters() if p.requires_grad}
    assert weight_lora.adapter_config().target_parameters is None


@pytest.mark.parametrize("mask_mode", [False, True], ids=["module_swap", "mask_mode"])
@pytest.mark.parametrize("plus", [False, True], ids=["WeightLoRA", "WeightLoRA+"])
def test_reinit_false_keeps_the_function_and_the_export_reloads_with_stock_peft(tmp_path, mask_mode, plus):
    """reinit=False folds omega into both wrappers' B; WeightLoRA+ grows every kept block to 2r per expert (the
    (E, r, in) / (out, r, E) layouts): neither changes the function. The export reloads to the trained logits, during
    the warm-up (omega folded; mask mode's 2r allocation cut to each expert's first r) and after the switch."""
    model = _moe(reinit=False, plus=plus)
    weight_lora = WeightLoraModel(model, max_steps=10, mask_mode=mask_mode)
    experts = [i for i, unit in enumerate(weight_lora.units) if unit.kind == "experts"]
    optimizer = _train(weight_lora, 3)
    kept = sorted({*experts, *range(weight_lora.k)})[: weight_lora.k]
    _threshold_to(weight_lora, kept)
    weight_lora.save_adapter(tmp_path / "warmup")
    before = _logits(model)
    weight_lora.switch(optimizer, kept=kept)
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=1e-5)
    block = weight_lora.base.get_submodule(BLOCK)
    rank = 4 if plus else 2
    assert (block.r["default"], block.base_layer.r["default"]) == (rank, 2 * rank)  # down_proj, gate_up_proj
    assert block.lora_A["default"].weight.shape[0] == rank * 4
    _train(weight_lora, 2, optimizer)
    weight_lora.save_adapter(tmp_path / "after")
    after = _logits(model)
    for folder, expected in (("warmup", before), ("after", after)):
        reloaded = PeftModel.from_pretrained(tiny_qwen3_moe(seed=0), tmp_path / folder).eval()
        torch.testing.assert_close(_logits(reloaded), expected, rtol=0, atol=1e-5, msg=folder)
    with model.disable_adapter():
        assert (after - _logits(model)).abs().max() > 1e-2  # the adapters' own effect is far above the tolerance


def test_the_record_heatmap_card_and_portable_config_carry_the_blocks(tmp_path):
    model = _moe()
    weight_lora = WeightLoraModel(model, max_steps=10)
    experts = [i for i, unit in enumerate(weight_lora.units) if unit.kind == "experts"]
    optimizer = _train(weight_lora, 3)
    weight_lora.switch(optimizer, kept=sorted({*experts, 0, 1, 2, 3})[: weight_lora.k])
    weight_lora.save_adapter(tmp_path)
    report = read_selection(tmp_path)
    assert report.adapters == weight_lora.report().adapters  # the JSON round trip
    write_selection(tmp_path / "again", report)
    assert read_selection(tmp_path / "again") == report
    (record,) = [a for a in report.adapters if a.module == BLOCK]
    assert record.kind == "experts" and record.num_experts == 4 and record.kept and record.rank == 2
    assert record.parameters == {
        "gate_up_proj": {"in_features": 64, "out_features": 64, "rank_factor": 2},
        "down_proj": {"in_features": 32, "out_features": 64, "rank_factor": 1},
    }
    assert record.numel() == sum(p.numel() for n, p in model.named_parameters() if f"{BLOCK}." in n and "lora_" in n)
    grid = selection_grid(report)
    assert grid["labels"] == ["q_proj", "k_proj", "v_proj", "o_proj", "experts", "gate"]
    card = model_card(report, "tiny-qwen3-moe")
    assert "experts blocks kept | 2 of 2" in card and "MoE LoRA" in card
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert f"| trainable parameters | {trainable:,} " in card
    config = lora_config_from_selection(tmp_path)
    assert set(config.target_parameters) == {
        f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in record.parameters
    }
    stage2 = get_peft_model(tiny_qwen3_moe(seed=0), config)
    assert sum(p.numel() for n, p in stage2.named_parameters() if "lora_" in n) == trainable
    with pytest.raises(ValueError, match="experts or routers"):
        from wlora_trl.artifacts.export import pad_adapter

        pad_adapter(tmp_path, tmp_path / "padded")


def test_qwen2_moe_experts_that_all_linear_misses_are_named_with_the_target_parameters_to_use():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen2MoeConfig(
        vocab_size=len(VOCAB), hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
        shared_expert_intermediate_size=48,
    )  # fmt: skip
    fields = dict(r=2, target_modules="all-linear", selection_steps=3)
    model = get_peft_model(Qwen2MoeForCausalLM(config), WeightLoraConfig(**fields))
    with pytest.warns(UserWarning, match=r"4 3-D \(expert\) parameters have no adapter.*target_parameters="
                      r"\['experts.down_proj', 'experts.gate_up_proj'\]") as caught:  # fmt: skip
        WeightLoraModel(model, max_steps=10)
    assert sum("3-D (expert)" in str(w.message) for w in caught) == 1  # once, not per layer
    targets = ["experts.down_proj", "experts.gate_up_proj"]
    model = get_peft_model(Qwen2MoeForCausalLM(config), WeightLoraConfig(**fields, target_parameters=targets))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        weight_lora = WeightLoraModel(model, max_steps=10)
    assert [u.name for u in weight_lora.units if u.kind == "experts"] == [
        f"model.layers.{i}.mlp.experts" for i in (0, 1)
    ]


T, MAX_STEPS = 3, 6


def _trainer(output_dir):
    cfg = WeightLoraConfig(r=2, lora_alpha=4, target_modules="all-linear", selection_steps=T, plus=True)
    args = cpu_args(output_dir, max_steps=MAX_STEPS, save_strategy="steps", save_steps=1)
    return WeightLoraTrainer(tiny_qwen3_moe(seed=0), args, train_dataset=addition_lm_dataset(), peft_config=cfg)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("moe_full")
    trainer = _trainer(output_dir)
    trainer.train()
    return output_dir, trainer


@pytest.mark.parametrize("checkpoint_step", [T - 1, T + 1], ids=["before_T", "after_T"])
def test_resume_matches_the_uninterrupted_run(tmp_path, uninterrupted, checkpoint_step):
    output_dir, full = uninterrupted
    resumed = _trainer(tmp_path)
    resumed.train(resume_from_checkpoint=str(output_dir / f"checkpoint-{checkpoint_step}"))
    assert [a.kept for a in resumed.weight_lora.adapters] == [a.kept for a in full.weight_lora.adapters]
    for (name, p), (_, q) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)
