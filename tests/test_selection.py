"""The hard threshold, the StoIHT step and the omega gates on a real forward/backward."""

import torch
from peft import LoraConfig, get_peft_model

from wlora_trl import WeightLoraConfig, WeightLoraModel
from wlora_trl.selection import OMEGA_PARAMETER_NAME, stoiht_step, top_k_mask

from .conftest import tiny_llama


def test_top_k_keeps_largest_magnitude_not_largest_value():
    omega = torch.tensor([0.5, -3.0, 2.0, 0.1])
    assert top_k_mask(omega, 2).tolist() == [False, True, True, False]


def test_top_k_breaks_ties_by_lower_index():
    omega = torch.tensor([1.0, 2.0, 1.0, 2.0, 1.0])
    assert top_k_mask(omega, 3).tolist() == [True, True, False, True, False]


def test_stoiht_step_is_sgd_then_threshold():
    omega = torch.ones(4)
    assert stoiht_step(omega, torch.tensor([1.0, -2.0, 0.5, 3.0]), lr=0.1, k=2)
    torch.testing.assert_close(omega, torch.tensor([0.0, 1.2, 0.95, 0.0]))  # from [0.9, 1.2, 0.95, 0.7]


def test_stoiht_step_skips_zero_and_non_finite_gradients():
    omega = torch.ones(4)
    assert not stoiht_step(omega, torch.zeros(4), lr=0.1, k=2)  # step 1: B = 0
    assert not stoiht_step(omega, torch.tensor([1.0, float("nan"), 0.0, 0.0]), lr=0.1, k=2)
    assert not stoiht_step(omega, None, lr=0.1, k=2)
    assert omega.tolist() == [1.0, 1.0, 1.0, 1.0]


def _batch():
    ids = torch.arange(3, 19).reshape(2, 8)
    return {"input_ids": ids, "labels": ids}


def test_gates_at_one_leave_the_lora_model_unchanged_and_scale_the_adapter():
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian")
    lora = get_peft_model(tiny_llama(), LoraConfig(**cfg))
    torch.manual_seed(0)
    for name, p in lora.named_parameters():
        if "lora_B" in name:
            p.data.normal_()  # B != 0 so the adapters matter
    weighted = get_peft_model(tiny_llama(), WeightLoraConfig(**cfg, k=2, selection_steps=3))
    weighted.load_state_dict(lora.state_dict(), strict=False)
    weight_lora = WeightLoraModel(weighted)
    with torch.no_grad():
        reference = lora(**_batch()).logits
        torch.testing.assert_close(weighted(**_batch()).logits, reference, rtol=0, atol=0)
        weight_lora.omega.zero_()  # every adapter off: the base model
        with lora.disable_adapter():
            base = lora(**_batch()).logits
        torch.testing.assert_close(weighted(**_batch()).logits, base, rtol=0, atol=1e-6)
    assert not torch.allclose(reference, base)


def test_omega_gets_a_gradient_only_once_b_is_nonzero_and_is_never_saved(tmp_path):
    model = get_peft_model(tiny_llama(), WeightLoraConfig(r=4, target_modules="all-linear", k=3, selection_steps=3))
    weight_lora = WeightLoraModel(model)
    model(**_batch()).loss.backward()
    assert weight_lora.omega.grad is not None and not weight_lora.omega.grad.any()  # B = 0 at init
    assert not weight_lora.omega_step()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(std=0.1)
    model(**_batch()).loss.backward()
    grad = weight_lora.omega.grad.clone()
    assert grad.ne(0).all()
    assert weight_lora.omega_step()
    assert int(weight_lora.omega.ne(0).sum()) == 3
    assert weight_lora.omega.grad is None  # taken by the step, so no optimizer can apply it again
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved and not any(OMEGA_PARAMETER_NAME in key or "omega" in key for key in saved)
