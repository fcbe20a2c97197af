"""The hard threshold, the StoIHT step and the omega gates on a real forward/backward."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer

from tests.testing_utils import tiny_llama
from wlora_trl import WeightLoraConfig, WeightLoraModel
from wlora_trl.selection import (
    OMEGA_PARAMETER_NAME,
    SKIPPED_NO_GRADIENT,
    SKIPPED_NONFINITE,
    SKIPPED_WITH_OPTIMIZER,
    STEP_TAKEN,
    OmegaGatedLinear,
    stoiht_step,
    top_k_mask,
)


def test_top_k_keeps_largest_magnitude_not_largest_value():
    omega = torch.tensor([0.5, -3.0, 2.0, 0.1])
    assert top_k_mask(omega, 2).tolist() == [False, True, True, False]


def test_top_k_breaks_ties_by_lower_index():
    omega = torch.tensor([1.0, 2.0, 1.0, 2.0, 1.0])
    assert top_k_mask(omega, 3).tolist() == [True, True, False, True, False]


def test_stoiht_step_is_sgd_then_threshold():
    omega = torch.ones(4)
    assert stoiht_step(omega, torch.tensor([1.0, -2.0, 0.5, 3.0]), lr=0.1, k=2).item() == STEP_TAKEN
    torch.testing.assert_close(omega, torch.tensor([0.0, 1.2, 0.95, 0.0]))  # from [0.9, 1.2, 0.95, 0.7]


def test_stoiht_step_skips_zero_and_non_finite_gradients():
    omega = torch.ones(4)
    assert stoiht_step(omega, torch.zeros(4), lr=0.1, k=2).item() == SKIPPED_NO_GRADIENT  # step 1: B = 0
    assert stoiht_step(omega, torch.tensor([1.0, float("nan"), 0.0, 0.0]), lr=0.1, k=2).item() == SKIPPED_NONFINITE
    assert stoiht_step(omega, torch.tensor([float("inf"), 0.0, 0.0, 0.0]), lr=0.1, k=2).item() == SKIPPED_NONFINITE
    assert stoiht_step(omega, None, lr=0.1, k=2).item() == SKIPPED_NO_GRADIENT
    found_inf = torch.tensor(1.0)  # a fused optimizer's flag: the optimizer step is skipped, omega's too
    step = stoiht_step(omega, torch.tensor([1.0, -2.0, 0.5, 3.0]), lr=0.1, k=2, skip=found_inf)
    assert step.item() == SKIPPED_WITH_OPTIMIZER
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
        weight_lora.set_omega(torch.zeros(weight_lora.num_adapters))  # every adapter off: the base model
        with lora.disable_adapter():
            base = lora(**_batch()).logits
        torch.testing.assert_close(weighted(**_batch()).logits, base, rtol=0, atol=1e-6)
    assert not torch.allclose(reference, base)


def test_omega_gets_a_gradient_only_once_b_is_nonzero_and_is_never_saved(tmp_path):
    model = get_peft_model(tiny_llama(), WeightLoraConfig(r=4, target_modules="all-linear", k=3, selection_steps=3))
    weight_lora = WeightLoraModel(model)
    model(**_batch()).loss.backward()
    grads = [p.grad for p in weight_lora.omega_parameters()]
    assert all(g is not None for g in grads) and not torch.stack(grads).any()  # B = 0 at init
    assert not weight_lora.omega_step()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(std=0.1)
    model(**_batch()).loss.backward()
    grad = torch.stack([p.grad for p in weight_lora.omega_parameters()])
    assert grad.ne(0).all()
    assert weight_lora.omega_step()
    assert int(weight_lora.omega.ne(0).sum()) == 3
    # taken by the step, so no optimizer can apply it again; and the parameters see the thresholded values
    assert all(p.grad is None for p in weight_lora.omega_parameters())
    assert torch.equal(torch.stack([p.detach() for p in weight_lora.omega_parameters()]), weight_lora.omega)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved and not any(OMEGA_PARAMETER_NAME in key or "omega" in key for key in saved)


class _AdapterOutputGate:
    """v0.1's gate, kept here as the reference: a forward hook scaling `lora_A`'s output by omega[index]."""

    def __init__(self, omega, index):
        self.omega, self.index = omega, index

    def __call__(self, module, inputs, output):
        return output * self.omega[self.index]


@pytest.mark.parametrize("checkpointing", [None, "reentrant", "non_reentrant"])
@pytest.mark.parametrize("pattern", [False, True], ids=["one_scaling", "rank_and_alpha_pattern"])
def test_gate_value_and_gradient_match_a_gate_on_the_adapter_output(checkpointing, pattern):
    """omega scales lora_A's weight; value and gradient must be those of `omega_i * scaling_i * B(A(x))`.

    Checked with different ranks and scalings per module and with both kinds of gradient checkpointing: reentrant
    checkpointing back-propagates through the shared gate nodes once per segment, which fails if any of them saved
    a tensor.
    """
    extra = dict(rank_pattern={"q_proj": 2}, alpha_pattern={"q_proj": 16, "down_proj": 2}) if pattern else {}
    cfg = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="gaussian", **extra)

    def build(weight_lora_config):
        model = get_peft_model(tiny_llama(), weight_lora_config)
        torch.manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(std=0.1)
        if checkpointing:
            model.base_model.model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"}
            )
            model.enable_input_require_grads()
            model.train()
        return model

    omega_values = torch.linspace(-0.5, 1.5, 14)
    model = build(WeightLoraConfig(**cfg, k=3, selection_steps=3))
    weight_lora = WeightLoraModel(model)
    layers = [m for _, m in model.base_model.model.named_modules() if isinstance(m, LoraLayer)]
    scalings = {layer.scaling["default"] for layer in layers}
    assert len(scalings) == (3 if pattern else 1)  # 8/4 = 2; with the patterns also q: 16/2 = 8, down: 2/4 = 0.5
    weight_lora.set_omega(omega_values)
    out = model(**_batch())
    out.loss.backward()

    reference = build(LoraConfig(**cfg))
    omega = torch.nn.Parameter(omega_values.clone())
    layers = [m for _, m in reference.base_model.model.named_modules() if isinstance(m, LoraLayer)]
    for index, layer in enumerate(layers):
        layer.lora_A["default"].register_forward_hook(_AdapterOutputGate(omega, index))
    expected = reference(**_batch())
    expected.loss.backward()

    torch.testing.assert_close(out.logits, expected.logits, rtol=1e-5, atol=1e-6)
    assert omega.grad.abs().min() > 0
    torch.testing.assert_close(weight_lora.take_omega_grad(), omega.grad, rtol=1e-4, atol=1e-8)


def test_gates_swap_lora_a_class_only_and_leave_no_trace_when_removed(tmp_path):
    cfg = WeightLoraConfig(r=4, lora_alpha=8, target_modules="all-linear", k=3)
    model = get_peft_model(tiny_llama(), cfg)
    lora_a = [m.lora_A["default"] for _, m in model.base_model.model.named_modules() if isinstance(m, LoraLayer)]
    keys = set(model.state_dict())
    weight_lora = WeightLoraModel(model)
    assert all(type(m) is OmegaGatedLinear and isinstance(m, torch.nn.Linear) for m in lora_a)
    # omega's n entries are the only new state (on the PeftModel, never in the adapter file); the gate is none
    assert set(model.state_dict()) == keys | {f"{OMEGA_PARAMETER_NAME}.{i}" for i in range(weight_lora.num_adapters)}
    weight_lora.gates.remove()
    assert all(type(m) is torch.nn.Linear and "omega_gate" not in m.__dict__ for m in lora_a)
    assert set(model.state_dict()) == keys and not hasattr(model, OMEGA_PARAMETER_NAME)


def test_omega_reaches_the_gates_after_the_parameters_storage_is_replaced():
    """`.to(device)`, DDP's broadcasts and checkpoint loads may give a parameter new storage; omega is read and
    written through its parameter objects, so the gates must still see every value the StoIHT step writes."""
    cfg = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="gaussian")
    model = get_peft_model(tiny_llama(), WeightLoraConfig(**cfg, k=3, selection_steps=3))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(std=0.1)
    weight_lora = WeightLoraModel(model)
    model._apply(lambda t: t.clone())  # what a device move does to every parameter's storage
    weight_lora.set_omega(torch.zeros(weight_lora.num_adapters))
    with torch.no_grad():
        off = model(**_batch()).logits
        with model.disable_adapter():
            base = model(**_batch()).logits
    torch.testing.assert_close(off, base, rtol=0, atol=1e-6)
    weight_lora.set_omega(torch.ones(weight_lora.num_adapters))
    model(**_batch()).loss.backward()
    assert weight_lora.omega_step()
    assert torch.equal(torch.stack([p.detach() for p in weight_lora.omega_parameters()]), weight_lora.omega)
    assert int(weight_lora.omega.ne(0).sum()) == 3
