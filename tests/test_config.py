"""WeightLoraConfig validation and the resolution of K and T."""

import dataclasses
import warnings

import pytest
from peft import LoraConfig

from wlora_trl import WeightLoraConfig
from wlora_trl.config import MIN_SELECTION_STEPS, WEIGHT_LORA_FIELDS


def test_is_a_lora_config_with_paper_defaults():
    cfg = WeightLoraConfig(r=8, target_modules="all-linear")
    assert isinstance(cfg, LoraConfig) and cfg.peft_type.value == "LORA"
    assert (cfg.k, cfg.selection_steps, cfg.plus, cfg.reinit, cfg.selection) == (0.5, 0.005, False, True, "stoiht")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(k=0), "k=0"),
        (dict(k=-3), "k=-3"),
        (dict(k=1.5), "k=1.5"),
        (dict(k=True), "k=True"),
        (dict(k="half"), "k='half'"),
        (dict(selection_steps=0), "selection_steps=0"),
        (dict(selection_steps=1.0), "selection_steps=1.0"),
        (dict(selection_steps=1), "selection_steps >= 2"),
        (dict(omega_lr=0.0), "omega_lr"),
        (dict(omega_lr=float("nan")), "omega_lr"),
        (dict(selection="greedy"), "selection='greedy'"),
        (dict(plus=True, k=0.25), "plus=True keeps exactly half"),
        (dict(use_dora=True), "use_dora"),
        (dict(init_lora_weights="pissa"), "init_lora_weights='pissa'"),
        (dict(lora_bias=True), "lora_bias"),
    ],
)
def test_bad_fields_are_refused_with_what_to_change(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("+", r"\+")):
        WeightLoraConfig(r=8, target_modules="all-linear", **kwargs)


def test_random_selection_accepts_one_step():
    WeightLoraConfig(selection="random", selection_steps=1)


def test_resolve_k():
    assert WeightLoraConfig(k=0.5).resolve_k(30) == 15
    assert WeightLoraConfig(k=0.5).resolve_k(7) == 3  # rounded down
    assert WeightLoraConfig(k=4).resolve_k(30) == 4
    assert WeightLoraConfig(plus=True).resolve_k(30) == 15
    assert WeightLoraConfig(plus=True, k=15).resolve_k(30) == 15
    with pytest.raises(ValueError, match="keeps 0 of the 30"):
        WeightLoraConfig(k=0.01).resolve_k(30)
    with pytest.raises(ValueError, match="has only 30"):
        WeightLoraConfig(k=31).resolve_k(30)
    with pytest.raises(ValueError, match="plus=True keeps K = n/2 = 15"):
        WeightLoraConfig(plus=True, k=10).resolve_k(30)


def test_resolve_selection_steps():
    assert WeightLoraConfig(selection_steps=0.005).resolve_selection_steps(10_000) == 50
    assert WeightLoraConfig(selection_steps=0.005).resolve_selection_steps(100) == MIN_SELECTION_STEPS
    assert WeightLoraConfig(selection_steps=7).resolve_selection_steps(100) == 7
    with pytest.raises(ValueError, match="max_steps=7"):
        WeightLoraConfig(selection_steps=7).resolve_selection_steps(7)
    with pytest.raises(ValueError, match="T=5"):
        WeightLoraConfig(selection_steps=0.005).resolve_selection_steps(4)


@pytest.mark.parametrize("field", ["reinit", "plus", "use_rslora", "fan_in_fan_out"])
@pytest.mark.parametrize("value", ["no", "false", "False", "yes", 0, 1, None])
def test_non_bool_values_for_boolean_fields_are_refused(field, value):
    # reinit="no" used to be truthy, so it meant reinit=True; plus="no" turned WeightLoRA+ on.
    with pytest.raises(TypeError, match=f"{field}={value!r} is a {type(value).__name__}; pass a bool"):
        WeightLoraConfig(r=8, target_modules="all-linear", **{field: value})


def test_the_refusal_spells_the_bool_the_string_meant():
    with pytest.raises(TypeError, match="reinit=False"):
        WeightLoraConfig(reinit="no")
    with pytest.raises(TypeError, match="plus=True"):
        WeightLoraConfig(plus="yes")


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(r=8.0), TypeError, "r=8.0"),
        (dict(r="8"), TypeError, "r='8'"),
        (dict(r=0), ValueError, "r=0"),
        (dict(lora_alpha="16"), TypeError, "lora_alpha='16'"),
        (dict(lora_alpha=0), ValueError, "lora_alpha=0"),
        (dict(lora_dropout="0.1"), TypeError, "lora_dropout='0.1'"),
        (dict(lora_dropout=1.0), ValueError, r"lora_dropout=1.0: pass a float in \[0, 1\)"),
        (dict(bias="lora"), ValueError, "bias='lora'"),
    ],
)
def test_lora_fields_of_the_wrong_type_or_range_are_refused(kwargs, error, message):
    with pytest.raises(error, match=message):
        WeightLoraConfig(**kwargs)


def test_an_epoch_based_run_shorter_than_t_says_what_the_epochs_come_to():
    run = "num_train_epochs=1 comes to 4 optimizer steps"
    with pytest.raises(ValueError, match=f"the run's {run}") as refusal:
        WeightLoraConfig(selection_steps=7).resolve_selection_steps(4, run=run)
    assert "max_steps" not in str(refusal.value).split("Train for")[0]


def test_from_pretrained_after_save_pretrained_is_the_same_weight_lora_config(tmp_path):
    # Before: PEFT's loader returned a plain LoraConfig, k / selection_steps / omega_lr / reinit gone, with PEFT's
    # warning that the file came from a newer PEFT.
    config = WeightLoraConfig(r=4, target_modules="all-linear", k=3, selection_steps=7, omega_lr=10.0, reinit=False)
    config.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = WeightLoraConfig.from_pretrained(tmp_path)
    assert type(back) is WeightLoraConfig and back == config
    assert (back.k, back.selection_steps, back.omega_lr, back.plus, back.reinit) == (3, 7, 10.0, False, False)


def test_from_pretrained_of_a_stock_lora_config_names_the_defaults_it_uses(tmp_path):
    LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]).save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=r"stock LoRA config .* no selection.json is beside it.*defaults k=0.5, "
                      r"selection_steps=0.005, omega_lr=100.0, plus=False, reinit=True, selection='stoiht'"):  # fmt: skip
        back = WeightLoraConfig.from_pretrained(tmp_path)
    assert type(back) is WeightLoraConfig and back.r == 4 and set(back.target_modules) == {"q_proj", "v_proj"}


@pytest.mark.parametrize(
    "extra",
    [dict(), dict(plus=True, reinit=False), dict(rank_pattern={"mlp.*": 8}, alpha_pattern={"mlp.*": 16}, k=10)],
    ids=["WeightLoRA", "WeightLoRA+", "rank_pattern"],
)
def test_from_pretrained_of_a_trainer_save_is_the_run_from_selection_json(tmp_path, extra):
    # A trainer's save holds a stock adapter_config.json (the export loads without wlora_trl): the run's WeightLoRA
    # fields come from selection.json beside it, and the LoRA fields describe the run's n adapters, not the K kept.
    from peft import get_peft_model

    from tests.testing_utils import addition_lm_dataset, cpu_args, tiny_llama
    from wlora_trl import WeightLoraModel, WeightLoraTrainer
    from wlora_trl.state import read_selection

    run = WeightLoraConfig(r=4, lora_alpha=8, target_modules="all-linear", selection_steps=3, omega_lr=50.0, **extra)
    trainer = WeightLoraTrainer(
        tiny_llama(), cpu_args(tmp_path / "run", max_steps=6), train_dataset=addition_lm_dataset(), peft_config=run
    )
    trainer.save_model(str(tmp_path / "warmup"))  # step 0: every adapter still there
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    k = 10 if "k" in extra else 7
    for folder in ("warmup", "adapter"):
        if "rank_pattern" in extra and folder == "adapter":
            with pytest.warns(UserWarning, match="rank_pattern / alpha_pattern name the kept adapters only"):
                config = WeightLoraConfig.from_pretrained(tmp_path / folder)
        else:
            config = WeightLoraConfig.from_pretrained(tmp_path / folder)
        assert type(config) is WeightLoraConfig
        assert (config.k, config.selection_steps, config.omega_lr) == (k, 3, 50.0)
        assert (config.plus, config.reinit, config.selection) == (run.plus, run.reinit, "stoiht")
        assert len(config.target_modules) == 14
        if "rank_pattern" in extra:  # 10 of 14 kept: some of the 6 MLP adapters (rank 8), some attention ones (4)
            kept = [a for a in read_selection(tmp_path / folder).adapters if a.kept]
            assert all(config.rank_pattern.get(a.module, config.r) == a.rank for a in kept)
        else:
            assert (config.r, config.lora_alpha) == (4, 8)  # WeightLoRA+'s doubled 8 and 16 halved back
        weight_lora = WeightLoraModel(get_peft_model(tiny_llama(), config))  # the run's n adapters and K again
        assert (weight_lora.num_adapters, weight_lora.k) == (14, k)


def test_weight_lora_fields_are_what_the_config_adds_to_lora_config():
    """WEIGHT_LORA_FIELDS (what a stock adapter_config.json must not hold, and what from_pretrained reads back from
    selection.json) is the dataclass difference, so a new field cannot be forgotten by either."""
    added = {f.name for f in dataclasses.fields(WeightLoraConfig)} - {f.name for f in dataclasses.fields(LoraConfig)}
    assert set(WEIGHT_LORA_FIELDS) == added and len(WEIGHT_LORA_FIELDS) == len(added)
