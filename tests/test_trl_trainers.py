"""WeightLoRA with TRL's DPO and GRPO trainers.

Every model form trains through the switch: a plain model with `peft_config=`, or a PeftModel, each with and without
a reference model (DPO: `ref_model` positionally and by keyword; GRPO: `beta > 0`). TRL's own reference adapter
("ref", added to a PeftModel that comes without a reference) stays as it was and out of the selection, and the saved
adapter is the trained one only: stock PEFT, in a process that never imports wlora_trl, reloads it to the trained
policy's logits. Also: what the switch does to DPO (loss ln 2 right after it with reinit=True), the trainers' argument
order, and which adapters beside the trained one WeightLoraModel accepts.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
from trl import DPOConfig, GRPOConfig
from trl.trainer.utils import use_adapter

from tests.testing_utils import char_tokenizer, tiny_llama
from wlora_trl import WeightLoraConfig, WeightLoraDPOTrainer, WeightLoraGRPOTrainer, WeightLoraModel
from wlora_trl.config import WEIGHT_LORA_FIELDS

T, STEPS = 3, 5
N_ADAPTERS = 14  # 2 layers x 7 linear projections
IDS = torch.arange(3, 35).reshape(2, 16)
TOLERANCE = 1e-5
LN2 = math.log(2)

# name: (PeftModel?, reference model: None / "positional" / "keyword", WeightLoraConfig extras)
DPO_FORMS = {
    "dpo_peft_config": (False, None, {}),
    "dpo_peft_config_ref_positional": (False, "positional", {}),
    "dpo_peft_config_ref_keyword": (False, "keyword", {}),
    "dpo_peft_model": (True, None, {}),  # TRL adds its frozen "ref" copy of the adapter
    "dpo_peft_model_ref_positional": (True, "positional", {}),
    "dpo_peft_model_ref_keyword": (True, "keyword", {}),
    "dpo_peft_config_keep": (False, None, {"reinit": False}),
}
# name: (PeftModel?, beta); beta > 0 is GRPO with a reference (for a PeftModel: TRL's "ref" adapter)
GRPO_FORMS = {
    "grpo_peft_config": (False, 0.0),
    "grpo_peft_config_beta": (False, 0.1),
    "grpo_peft_model": (True, 0.0),
    "grpo_peft_model_beta": (True, 0.1),
}

STOCK_RELOAD = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    from peft import PeftModel
    for run in json.load(open(sys.argv[1])):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run["base"]), run["adapter"]).eval()
        with torch.no_grad():
            torch.save(model(input_ids=torch.load(run["ids"])).logits, run["logits"])
    assert not any(name.startswith("wlora_trl") for name in sys.modules), "stock reload imported wlora_trl"
    """
)


def preference_pairs() -> Dataset:
    """25 pairs 'a+b=': the sum is chosen, an 'x'-prefixed wrong digit rejected (easy to learn in a few steps)."""
    rows = [(f"{a}+{b}=", str(a + b), f"x{(a + b + 1) % 10}") for a in range(5) for b in range(5)]
    return Dataset.from_dict({key: [row[i] for row in rows] for i, key in enumerate(("prompt", "chosen", "rejected"))})


def prompts() -> Dataset:
    return Dataset.from_dict({"prompt": [f"{a}+{b}=" for a in range(5) for b in range(5)]})


def digit_reward(completions, **kwargs) -> list[float]:
    """A toy reward: the number of digits in the completion (tiny sampled completions vary in it)."""
    return [float(sum(char.isdigit() for char in completion)) for completion in completions]


def _config(**extra) -> WeightLoraConfig:
    return WeightLoraConfig(r=4, lora_alpha=8, target_modules="all-linear", selection_steps=T, **extra)


# TRL's bf16 and gradient-checkpointing defaults off (CPU); one log line per step, so step T+1 has its own numbers.
_CPU = dict(
    max_steps=STEPS,
    per_device_train_batch_size=4,
    learning_rate=1e-2,
    logging_steps=1,
    report_to=[],
    save_strategy="no",
    use_cpu=True,
    bf16=False,
    gradient_checkpointing=False,
    disable_tqdm=True,
    seed=0,
)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def _build_dpo(name: str, root, load_base):
    peft_model, reference, extra = DPO_FORMS[name]
    model, cfg = load_base(), _config(**extra)
    kwargs = dict(train_dataset=preference_pairs(), processing_class=char_tokenizer())
    if peft_model:
        model = get_peft_model(model, cfg)
    else:
        kwargs["peft_config"] = cfg
    args = DPOConfig(str(root / name / "run"), beta=0.1, **_CPU)
    if reference == "positional":
        return WeightLoraDPOTrainer(model, load_base(), args, **kwargs)
    if reference == "keyword":
        return WeightLoraDPOTrainer(model, ref_model=load_base(), args=args, **kwargs)
    return WeightLoraDPOTrainer(model, args=args, **kwargs)


def _build_grpo(name: str, root, load_base):
    peft_model, beta = GRPO_FORMS[name]
    args = GRPOConfig(str(root / name / "run"), beta=beta, num_generations=4, max_completion_length=4, **_CPU)
    kwargs = dict(train_dataset=prompts(), processing_class=char_tokenizer())
    if peft_model:  # everything by keyword
        return WeightLoraGRPOTrainer(
            model=get_peft_model(load_base(), _config()), reward_funcs=digit_reward, args=args, **kwargs
        )
    return WeightLoraGRPOTrainer(load_base(), digit_reward, args, peft_config=_config(), **kwargs)  # positional


def _train(name: str, root, load_base) -> dict:
    trainer = (_build_dpo if name.startswith("dpo") else _build_grpo)(name, root, load_base)
    model = trainer.weight_lora.model
    reference = {key: p.detach().clone() for key, p in model.named_parameters() if ".ref." in key}
    trainer.train()
    trainer.save_model(str(root / name / "adapter"))
    return {
        "trainer": trainer,
        "logits": _logits(model),
        "reference_before": reference,
        "reference_after": {key: p for key, p in model.named_parameters() if ".ref." in key},
        "log": {entry["step"]: entry for entry in trainer.state.log_history if "loss" in entry},
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("trl_trainers")
    tiny_llama().save_pretrained(root / "base")
    torch.save(IDS, root / "ids.pt")

    def load_base():
        return AutoModelForCausalLM.from_pretrained(root / "base")

    results = {name: _train(name, root, load_base) for name in [*DPO_FORMS, *GRPO_FORMS]}
    reloads = [
        {
            "base": str(root / "base"),
            "adapter": str(root / name / "adapter"),
            "ids": str(root / "ids.pt"),
            "logits": str(root / name / "reloaded.pt"),
        }
        for name in results
    ]
    (root / "reloads.json").write_text(json.dumps(reloads))
    subprocess.run([sys.executable, "-c", STOCK_RELOAD, str(root / "reloads.json")], check=True)
    base_logits = _logits(load_base())
    for name, result in results.items():
        result["reloaded"] = torch.load(root / name / "reloaded.pt")
        result["base_logits"] = base_logits
        result["adapter_dir"] = root / name / "adapter"
    return results


def _expects_ref_adapter(name: str) -> bool:
    """TRL adds its "ref" adapter to a PeftModel that comes without a reference model (GRPO: only with beta > 0)."""
    if name in DPO_FORMS:
        peft_model, reference, _ = DPO_FORMS[name]
        return peft_model and reference is None
    peft_model, beta = GRPO_FORMS[name]
    return peft_model and beta > 0


@pytest.mark.parametrize("name", [*DPO_FORMS, *GRPO_FORMS])
def test_trains_through_the_switch_and_the_saved_adapter_reloads_with_stock_peft(runs, name):
    result = runs[name]
    weight_lora = result["trainer"].weight_lora
    assert weight_lora.switched and weight_lora.omega_steps["taken"] >= 1
    assert weight_lora.num_adapters == N_ADAPTERS and weight_lora.k == N_ADAPTERS // 2
    kept = {a.module for a in weight_lora.adapters if a.kept}
    config = json.loads((result["adapter_dir"] / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == kept
    assert not set(WEIGHT_LORA_FIELDS) & set(config), "the saved config must be a stock LoraConfig"
    assert not (result["adapter_dir"] / "ref").exists(), "TRL's reference adapter must not be exported"
    own_effect = (result["reloaded"] - result["base_logits"]).abs().max().item()
    assert own_effect > 100 * TOLERANCE, f"the adapter barely changes the model ({own_effect:.2e})"
    assert (result["reloaded"] - result["logits"]).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("name", [*DPO_FORMS, *GRPO_FORMS])
def test_trl_reference_adapter_is_left_alone(runs, name):
    """Not counted in n (above), not gated, not dropped at the switch, never trained."""
    result = runs[name]
    weight_lora = result["trainer"].weight_lora
    model = weight_lora.model
    if not _expects_ref_adapter(name):
        assert "ref" not in model.peft_config and not result["reference_before"]
        return
    assert weight_lora.other_adapters == ("ref",)
    before, after = result["reference_before"], result["reference_after"]
    assert before and before.keys() == after.keys()  # every targeted module still holds its "ref" adapter
    assert {key.split(".lora_")[0] for key in after} == {f"base_model.model.{m}" for m in weight_lora.module_names}
    assert all(torch.equal(before[key], after[key]) and not after[key].requires_grad for key in after)
    assert model.active_adapters == ["default"]
    # Only the trained adapter's modules were dropped: the kept set has "default" adapters, the others none.
    kept = {a.module for a in weight_lora.adapters if a.kept}
    for module in weight_lora.module_names:
        layer = weight_lora.base.get_submodule(module)
        assert ("default" in layer.lora_A) == (module in kept) and "ref" in layer.lora_A


@pytest.mark.parametrize("name", [n for n, (_, _, extra) in DPO_FORMS.items() if extra.get("reinit", True)])
def test_dpo_restarts_from_the_reference_after_the_switch_with_reinit(runs, name):
    """Kept adapters restart at zero: the policy is the reference again, so DPO's loss is ln 2 and every reward 0 at
    step T+1, although the warm-up had moved away from it."""
    log = runs[name]["log"]
    assert abs(log[T]["loss"] - LN2) > 1e-3
    assert abs(log[T + 1]["loss"] - LN2) < 1e-6
    assert log[T + 1]["rewards/accuracies"] == 0 and log[T + 1]["rewards/margins"] == 0


def test_dpo_keeps_the_warm_up_progress_with_reinit_false(runs):
    log = runs["dpo_peft_config_keep"]["log"]
    assert log[T + 1]["loss"] < LN2 - 1e-2
    assert log[T + 1]["rewards/accuracies"] > 0.5 and log[T + 1]["rewards/margins"] > 1e-2


def test_grpo_policy_is_the_reference_again_after_the_switch_with_reinit(runs):
    log = runs["grpo_peft_model_beta"]["log"]
    assert log[T]["kl"] > 1e-6 and abs(log[T + 1]["kl"]) < 1e-7


# --- argument order: the mixin reads the arguments by the TRL trainer's own signature ---------------------------


def test_bad_arguments_are_found_behind_a_positional_reference_model(tmp_path):
    args = DPOConfig(str(tmp_path), **_CPU)
    args.load_best_model_at_end = True  # DPOConfig refuses it without evaluation; the trainer must too
    with pytest.raises(ValueError, match="load_best_model_at_end=True is not supported"):
        WeightLoraDPOTrainer(tiny_llama(), tiny_llama(), args, train_dataset=preference_pairs(), peft_config=_config())


def test_grpo_with_positional_arguments_refuses_a_plain_lora_config(tmp_path):
    args = GRPOConfig(str(tmp_path), num_generations=4, **_CPU)
    with pytest.raises(TypeError, match="needs wlora_trl.WeightLoraConfig"):
        WeightLoraGRPOTrainer(
            "this-model-is-never-loaded", digit_reward, args, peft_config=LoraConfig(r=4, target_modules="all-linear")
        )


# --- which adapters may sit beside the trained one ----------------------------------------------------------------


def test_a_frozen_lora_adapter_stays_and_keeps_its_function_through_the_switch():
    model = get_peft_model(tiny_llama(), _config())
    # init_lora_weights=False: random A and B, so the frozen adapter visibly changes the logits.
    model.add_adapter("frozen", LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    with use_adapter(model, "frozen"):
        frozen_before = _logits(model)
    weight_lora = WeightLoraModel(model, max_steps=10)
    assert weight_lora.num_adapters == N_ADAPTERS and len(weight_lora.omega_parameters()) == N_ADAPTERS
    # Keeps the even indices: layer 0's q_proj and v_proj, drops layer 1's, where the frozen adapter lives too.
    weight_lora.switch(kept=list(range(0, N_ADAPTERS, 2)))
    with use_adapter(model, "frozen"):
        frozen_after = _logits(model)
    assert (frozen_before - _logits(tiny_llama())).abs().max().item() > 1e-3
    assert torch.equal(frozen_before, frozen_after)
    assert model.active_adapters == ["default"]
    frozen = [p for name, p in model.named_parameters() if ".frozen." in name]
    assert len(frozen) == 8 and not any(p.requires_grad for p in frozen)  # A and B on 2 modules x 2 layers


def _two_adapters(second_config, make_trainable: bool = False, activate_both: bool = False):
    model = get_peft_model(tiny_llama(), _config())
    model.add_adapter("second", second_config)
    if make_trainable:
        for name, parameter in model.named_parameters():
            if ".second." in name:
                parameter.requires_grad_(True)
    if activate_both:
        model.base_model.set_adapter(["default", "second"])
    return model


@pytest.mark.parametrize(
    "setup, error, message",
    [
        (dict(activate_both=True), ValueError, "has 2 adapters .* 2 of them are active"),
        (dict(make_trainable=True), ValueError, "'second' trains too .* Freeze it"),
        (dict(), ValueError, "'second' has a WeightLoraConfig of its own"),
    ],
    ids=["two_active", "second_trains", "second_weightlora_config"],
)
def test_ambiguous_adapters_are_refused(setup, error, message):
    second = LoraConfig(r=2, target_modules=["q_proj"]) if setup else _config()
    with pytest.raises(error, match=message):
        WeightLoraModel(_two_adapters(second, **setup), max_steps=10)


def test_an_active_plain_lora_adapter_is_refused_naming_the_weightlora_one():
    model = get_peft_model(tiny_llama(), _config())
    model.add_adapter("plain", LoraConfig(r=2, target_modules=["q_proj"]))
    model.set_adapter("plain")  # PEFT trains the active adapter and freezes the others
    with pytest.raises(TypeError, match=r"was made from LoraConfig.*model.set_adapter\('default'\)"):
        WeightLoraModel(model, max_steps=10)


def test_mask_mode_refuses_a_reference_adapter():
    model = get_peft_model(tiny_llama(), _config())
    model.add_adapter("ref", model.peft_config["default"])  # as TRL's DPO and GRPO trainers do
    with pytest.raises(ValueError, match="mask mode .FSDP2. does not support"):
        WeightLoraModel(model, max_steps=10, mask_mode=True)
