"""Mask mode (`WeightLoraModel(..., mask_mode=True)`, the switch FSDP2 needs) in one process, without sharding.

Mask mode must be the same algorithm as the module-swapping switch: with `reinit=False` (no fresh random weights)
the two runs are compared step by step. What only mask mode has is checked directly: dropped adapters switched off
(zero, frozen, out of the optimizer, no compute), WeightLoRA+'s pre-allocated half held at zero until the switch,
and the export (`save_adapter`) reloading with stock PEFT. The sharded runs are in test_fsdp2.py.
"""

import pytest
import torch
from peft import PeftModel, get_peft_model

from tests.testing_utils import tiny_llama
from wlora_trl import WeightLoraConfig, WeightLoraModel
from wlora_trl.masking import lora_init_a

R, T, STEPS = 4, 3, 8


def _setup(mask_mode, plus=False, reinit=True, selection="stoiht", lr=1e-2):
    config = WeightLoraConfig(
        r=R, lora_alpha=8, target_modules="all-linear", selection_steps=T, plus=plus, reinit=reinit, selection=selection
    )
    model = get_peft_model(tiny_llama(seed=0), config)
    weight_lora = WeightLoraModel(model, max_steps=STEPS, mask_mode=mask_mode)
    optimizer = torch.optim.AdamW(weight_lora.trainable_parameters(), lr=lr)
    return model, weight_lora, optimizer


def _batches():
    generator = torch.Generator().manual_seed(1)
    return torch.randint(3, 90, (STEPS, 4, 12), generator=generator)


def _step(model, weight_lora, optimizer, batch):
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    weight_lora.omega_step()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def _train(mask_mode, on_switch=None, **kwargs):
    model, weight_lora, optimizer = _setup(mask_mode, **kwargs)
    losses = []
    for step, batch in enumerate(_batches(), start=1):
        losses.append(_step(model, weight_lora, optimizer, batch))
        if step == T:
            if on_switch is not None:
                on_switch(model, weight_lora, optimizer, "before")
            weight_lora.switch(optimizer)
            if on_switch is not None:
                on_switch(model, weight_lora, optimizer, "after")
    return model, weight_lora, optimizer, losses


PROBE = torch.arange(3, 35).reshape(2, 16)


def _logits(model):
    with torch.no_grad():
        return model(input_ids=PROBE).logits


@pytest.mark.parametrize("selection", ["stoiht", "random"])
def test_mask_mode_trains_exactly_like_the_module_swap(selection):
    # reinit=False: the kept adapters keep their warm-up weights (omega folded into B) in both modes, so nothing
    # random separates them; a dropped adapter that still computed, trained or kept optimizer state would.
    _, swap, _, swap_losses = _train(False, reinit=False, selection=selection)
    mask_model, mask, optimizer, mask_losses = _train(True, reinit=False, selection=selection)
    torch.testing.assert_close(mask_losses, swap_losses, rtol=0, atol=1e-6)
    assert [a.kept for a in mask.adapters] == [a.kept for a in swap.adapters]
    assert sum(a.kept for a in mask.adapters) == 7
    ours, theirs = mask.adapter_state_dict(), swap.adapter_state_dict()
    assert ours.keys() == theirs.keys() and len(ours) == 2 * 7
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-6)
    # The optimizer holds exactly the kept adapters' A and B.
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert len(held) == 2 * 7


def test_dropped_adapters_are_off_zero_frozen_and_stay_so():
    model, weight_lora, optimizer, _ = _train(True)
    base = model.base_model.model
    dropped = [a.module for a in weight_lora.adapters if not a.kept]
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for name in dropped:
        layer = base.get_submodule(name)
        assert layer.disable_adapters  # the layer computes its base layer only
        for param in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
            assert not param.requires_grad and param.grad is None and id(param) not in held
            assert torch.count_nonzero(param) == 0
    # PEFT's disable_adapter() context re-enables every layer on exit: the zeroed adapters then add nothing.
    before = _logits(model)
    with model.disable_adapter():
        pass
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=0)


def _switched_at_t(reseed_before_switch=None):
    """A mask-mode model trained for the warm-up and switched (reinit=True), nothing after."""
    model, weight_lora, optimizer = _setup(True)
    for batch in _batches()[:T]:
        _step(model, weight_lora, optimizer, batch)
    before = _logits(model)
    if reseed_before_switch is not None:
        torch.manual_seed(reseed_before_switch)
    weight_lora.switch(optimizer, seed=0)
    return model, weight_lora, before


def test_reinit_in_place_makes_the_model_its_base_and_draws_from_the_seeded_stream():
    model, weight_lora, before = _switched_at_t()
    with model.disable_adapter():
        base_logits = _logits(model)
    # Right after the switch every kept B is zero and every dropped adapter is off: the model is its base model.
    assert not torch.allclose(before, base_logits, atol=1e-3)
    torch.testing.assert_close(_logits(model), base_logits, rtol=0, atol=1e-6)
    # Kept A's are the seeded stream's draws, in adapter order, whatever the global RNG did before the switch.
    kept = [a.module for a in weight_lora.adapters if a.kept]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        in_features = {a.module: a.in_features for a in weight_lora.adapters}
        expected = [lora_init_a(R, in_features[name], True) for name in kept]
    _, again, _ = _switched_at_t(reseed_before_switch=1234)
    assert [a.module for a in again.adapters if a.kept] == kept
    for in_model in (model, again.model):
        for name, fresh in zip(kept, expected):
            weight = in_model.base_model.model.get_submodule(name).lora_A["default"].weight
            torch.testing.assert_close(weight, fresh, rtol=0, atol=0)


def test_plus_allocates_2r_holds_the_extra_half_at_zero_and_switches_without_changing_the_function():
    checks = {}

    def on_switch(model, weight_lora, optimizer, when):
        checks[when] = _logits(model)
        if when == "before":  # three warm-up steps of AdamW: the extra half never moved
            for name in weight_lora.module_names:
                layer = model.base_model.model.get_submodule(name)
                a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
                assert a.shape[0] == 2 * R and b.shape[1] == 2 * R
                assert torch.count_nonzero(a[R:]) == 0 and torch.count_nonzero(b[:, R:]) == 0
                assert torch.count_nonzero(b[:, :R]) > 0  # the real half trained
            assert {a.rank for a in weight_lora.report().adapters} == {R}  # what the warm-up computes

    model, weight_lora, _, _ = _train(True, plus=True, reinit=False, on_switch=on_switch)
    torch.testing.assert_close(checks["after"], checks["before"], rtol=0, atol=1e-5)  # reinit=False: same function
    kept = [a for a in weight_lora.adapters if a.kept]
    assert {a.rank for a in kept} == {2 * R}
    layer = model.base_model.model.get_submodule(kept[0].module)
    assert torch.count_nonzero(layer.lora_B["default"].weight[:, R:]) > 0  # the second half trains after the switch


@pytest.mark.parametrize("plus", [False, True], ids=["WeightLoRA", "WeightLoRA+"])
@pytest.mark.parametrize("switched", [False, True], ids=["warm-up", "switched"])
def test_save_adapter_reloads_with_stock_peft_to_the_same_logits(tmp_path, plus, switched):
    model, weight_lora, optimizer = _setup(True, plus=plus)
    for step, batch in enumerate(_batches()[: T + 2 if switched else T - 1], start=1):
        _step(model, weight_lora, optimizer, batch)
        if step == T:
            weight_lora.switch(optimizer)
    expected = _logits(model)
    weight_lora.save_adapter(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path)
    assert not isinstance(reloaded.peft_config["default"], WeightLoraConfig)  # a stock LoraConfig
    with reloaded.disable_adapter():
        adapter_effect = (expected - _logits(reloaded)).abs().max()
    assert adapter_effect > 1e-3  # a silently dropped adapter could not pass the check below
    torch.testing.assert_close(_logits(reloaded), expected, rtol=0, atol=1e-5)
    ranks = {layer.r["default"] for layer in reloaded.base_model.model.modules() if hasattr(layer, "lora_A")}
    assert ranks == ({2 * R} if plus and switched else {R})
    adapted = sum(1 for m in reloaded.base_model.model.modules() if hasattr(m, "lora_A"))
    assert adapted == (7 if switched else 14)


def test_omega_is_not_a_model_parameter_in_mask_mode():
    # So FSDP2 neither shards it nor needs it in ignored_params, and a state-dict load cannot replace it.
    model, weight_lora, _ = _setup(True)
    omega = weight_lora.omega_parameters()
    assert len(omega) == 14
    ids = {id(p) for p in omega}
    assert not any(id(p) in ids for p in model.parameters())
    assert not any("omega" in key for key in model.state_dict())
    # The gradient still reaches it: zero at step 1 (every B is zero), nonzero once B has moved.
    optimizer = torch.optim.AdamW(weight_lora.trainable_parameters(), lr=1e-2)
    model(input_ids=PROBE, labels=PROBE).loss.backward()
    assert torch.count_nonzero(weight_lora.take_omega_grad()) == 0
    optimizer.step()
    optimizer.zero_grad()
    model(input_ids=PROBE, labels=PROBE).loss.backward()
    assert torch.count_nonzero(weight_lora.take_omega_grad()) > 7
