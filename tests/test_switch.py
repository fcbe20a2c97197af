"""The switch at step T through the trainers: structure, parameter counts, optimizer, LR schedule."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import Trainer

from tests.testing_utils import (
    addition_lm_dataset,
    classification_dataset,
    cpu_args,
    expected_lora_count,
    lora_parameter_count,
    tiny_bert_classifier,
    tiny_llama,
)
from wlora_trl import WeightLoraConfig, WeightLoraModel, WeightLoraTrainer
from wlora_trl.selection import top_k_mask
from wlora_trl.surgery import innermost_optimizer

R = 4
T = 3


def _train(tmp_path, plus=False, reinit=True, k=0.5, **args):
    cfg = WeightLoraConfig(
        r=R, lora_alpha=8, target_modules="all-linear", k=k, selection_steps=T, plus=plus, reinit=reinit
    )
    trainer = WeightLoraTrainer(
        tiny_llama(), cpu_args(tmp_path, **args), train_dataset=addition_lm_dataset(), peft_config=cfg
    )
    names = trainer.weight_lora.module_names
    before = lora_parameter_count(trainer.model)
    trainer.train()
    return trainer, names, before


def _lora_layers(model):
    return {name: m for name, m in model.base_model.model.named_modules() if isinstance(m, LoraLayer)}


@pytest.mark.parametrize("plus", [False, True], ids=["WeightLoRA", "WeightLoRA+"])
def test_parameter_counts_and_structure_after_the_switch(tmp_path, plus):
    trainer, names, before = _train(tmp_path, plus=plus)
    model, weight_lora = trainer.model, trainer.weight_lora
    n = len(names)
    assert n == 14 and weight_lora.k == 7 and weight_lora.switched
    assert before == expected_lora_count({name: R for name in names}, model)  # LoRA's budget before the switch
    kept = [a.module for a in weight_lora.adapters if a.kept]
    dropped = [a.module for a in weight_lora.adapters if not a.kept]
    assert len(kept) == 7 and len(dropped) == 7

    rank = 2 * R if plus else R
    assert sorted(_lora_layers(model)) == sorted(kept)
    assert lora_parameter_count(model) == expected_lora_count({name: rank for name in kept}, model)
    for name in dropped:  # back to the plain base layer: no LoRA submodules, no parameters beyond the weight
        module = model.base_model.model.get_submodule(name)
        assert type(module) is torch.nn.Linear
        assert not any("lora" in sub for sub, _ in module.named_modules())
    for name in kept:
        layer = model.base_model.model.get_submodule(name)
        assert layer.r["default"] == rank and layer.scaling["default"] == 8 / R  # alpha/r kept for WeightLoRA+
    assert not hasattr(model, "selection_omega") and weight_lora.omega is None
    config = model.peft_config["default"]
    assert type(config) is LoraConfig and set(config.target_modules) == set(kept) and config.r == rank


def test_plus_matches_lora_total_rank_and_budget_when_shapes_agree(tmp_path):
    # Only q/k/v/o (all 64x64 here, k/v 64x32): compare with LoRA's budget on the same n modules.
    cfg = WeightLoraConfig(r=R, target_modules=["q_proj", "o_proj"], plus=True, selection_steps=T)
    trainer = WeightLoraTrainer(tiny_llama(), cpu_args(tmp_path), train_dataset=addition_lm_dataset(), peft_config=cfg)
    lora_budget = lora_parameter_count(trainer.model)
    trainer.train()
    assert sum(a.rank for a in trainer.weight_lora.adapters) == R * trainer.weight_lora.num_adapters
    assert lora_parameter_count(trainer.model) == lora_budget


def test_optimizer_holds_exactly_the_remaining_trainable_parameters(tmp_path):
    trainer, _, _ = _train(tmp_path)
    optimizer = innermost_optimizer(trainer.optimizer)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable = {id(p) for p in trainer.model.parameters() if p.requires_grad}
    assert in_optimizer == trainable
    assert {id(p) for p in optimizer.state} == trainable  # no state left for dropped adapters; new ones stepped
    assert len(optimizer.param_groups) == 2  # the Trainer's decay / no-decay layout is unchanged


def test_learning_rate_is_continuous_across_the_switch(tmp_path):
    args = dict(max_steps=8, warmup_steps=4, lr_scheduler_type="cosine")
    trainer, _, _ = _train(tmp_path / "w", **args)
    lora = Trainer(
        get_peft_model(tiny_llama(), LoraConfig(r=R, target_modules="all-linear")),
        cpu_args(tmp_path / "l", **args),
        train_dataset=addition_lm_dataset(),
    )
    lora.train()
    lrs = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    reference = [h["learning_rate"] for h in lora.state.log_history if "learning_rate" in h]
    assert len(lrs) == 8 and lrs == reference
    switch_logs = [h for h in trainer.state.log_history if "weight_lora/kept_adapters" in h]
    assert switch_logs == [pytest.approx(switch_logs[0])] and switch_logs[0]["step"] == T + 1
    assert switch_logs[0]["weight_lora/kept_adapters"] == 7 and switch_logs[0]["weight_lora/total_adapters"] == 14


def test_omega_is_thresholded_during_warmup_and_not_in_the_optimizer(tmp_path):
    cfg = WeightLoraConfig(r=R, target_modules="all-linear", k=5, selection_steps=6)
    trainer = WeightLoraTrainer(tiny_llama(), cpu_args(tmp_path), train_dataset=addition_lm_dataset(), peft_config=cfg)
    seen = []
    original = trainer._switch

    def record_then_switch():
        seen.append(trainer.weight_lora.omega.detach().clone())
        original()

    trainer._switch = record_then_switch
    trainer.train()
    (omega,) = seen
    assert int(omega.ne(0).sum()) == 5 and not torch.equal(omega[omega.ne(0)], torch.ones(5))
    kept = [i for i, a in enumerate(trainer.weight_lora.adapters) if a.kept]
    assert kept == omega.ne(0).nonzero().flatten().tolist()


def test_reinit_false_keeps_the_function_through_the_switch(tmp_path):
    for plus in (False, True):
        cfg = WeightLoraConfig(r=R, target_modules="all-linear", selection_steps=3, reinit=False, plus=plus)
        trainer = WeightLoraTrainer(
            tiny_llama(), cpu_args(tmp_path, max_steps=5), train_dataset=addition_lm_dataset(), peft_config=cfg
        )
        trainer.train()  # the trainer path through a reinit=False switch
        assert trainer.weight_lora.switched and len(_lora_layers(trainer.model)) == trainer.weight_lora.k
        weight_lora = WeightLoraModel(get_peft_model(tiny_llama(), cfg))
        # Re-run the switch on a model in the warm-up state: compare logits right before and after it.
        model = weight_lora.model
        torch.manual_seed(3)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(std=0.05)
        with torch.no_grad():
            # A thresholded omega: K nonzero entries of both signs, the rest exactly zero.
            omega = torch.linspace(-1.5, 1.2, weight_lora.num_adapters)
            weight_lora.set_omega(omega * top_k_mask(omega, weight_lora.k))
            ids = torch.arange(3, 19).reshape(2, 8)
            before = model(input_ids=ids).logits
            weight_lora.switch()
            after = model(input_ids=ids).logits
        torch.testing.assert_close(after, before, rtol=0, atol=1e-5)


def test_classifier_head_trains_and_keeps_its_optimizer_state(tmp_path):
    cfg = WeightLoraConfig(
        r=R, target_modules=["query", "value", "dense"], modules_to_save=["classifier"], k=0.25, selection_steps=T
    )
    trainer = WeightLoraTrainer(
        tiny_bert_classifier(),
        cpu_args(tmp_path, max_steps=6),
        train_dataset=classification_dataset(),
        peft_config=cfg,
    )
    weight_lora = trainer.weight_lora
    assert not any("classifier" in name for name in weight_lora.module_names)  # not subject to selection
    head = trainer.model.base_model.model.classifier.modules_to_save["default"]
    head_before = head.weight.detach().clone()
    states = {}
    original = trainer._switch

    def capture_then_switch():
        opt = innermost_optimizer(trainer.optimizer)
        states["before"] = opt.state[head.weight]["exp_avg"].clone()
        original()
        states["after"] = opt.state[head.weight]["exp_avg"].clone()

    trainer._switch = capture_then_switch
    trainer.train()
    assert torch.equal(states["before"], states["after"])  # the switch left the head's Adam state alone
    assert not torch.equal(head.weight, head_before)
    assert weight_lora.k == weight_lora.num_adapters // 4 and len(_lora_layers(trainer.model)) == weight_lora.k


def test_random_selection_keeps_k_adapters_without_omega(tmp_path):
    cfg = WeightLoraConfig(r=R, target_modules="all-linear", selection="random", selection_steps=2)
    trainer = WeightLoraTrainer(tiny_llama(), cpu_args(tmp_path), train_dataset=addition_lm_dataset(), peft_config=cfg)
    assert trainer.weight_lora.omega is None
    trainer.train()
    assert len(_lora_layers(trainer.model)) == 7
    assert trainer.weight_lora.report().method == "random"


def test_custom_training_loop_without_a_trainer():
    """The documented loop: omega_step after backward, switch(optimizer) after step T."""
    model = get_peft_model(tiny_llama(), WeightLoraConfig(r=R, target_modules="all-linear", selection_steps=4))
    weight_lora = WeightLoraModel(model, max_steps=10)
    assert all(p is not weight_lora.omega for p in weight_lora.trainable_parameters())
    optimizer = torch.optim.AdamW(weight_lora.trainable_parameters(), lr=1e-2)
    data = addition_lm_dataset(rows=40)
    stepped = []
    for step in range(1, 11):
        ids = torch.tensor(data[(step - 1) * 4 : step * 4]["input_ids"])
        model(input_ids=ids, labels=ids).loss.backward()
        stepped.append(weight_lora.omega_step())
        optimizer.step()
        optimizer.zero_grad()
        if step == weight_lora.selection_steps:
            weight_lora.switch(optimizer)
    assert stepped[:4] == [False, True, True, True] and stepped[4:] == [False] * 6  # step 1: B = 0
    assert weight_lora.omega_steps == {
        "taken": 3,
        "skipped_no_gradient": 1,
        "skipped_nonfinite": 0,
        "skipped_by_grad_scaler": 0,
    }
    assert weight_lora.report().omega_steps == weight_lora.omega_steps
    assert len(_lora_layers(model)) == 7
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {
        id(p) for p in model.parameters() if p.requires_grad
    }


@pytest.mark.parametrize("warmup_steps, no_gradient", [(0, 1), (2, 2)])
def test_a_learning_rate_warmup_from_zero_costs_omega_one_more_step(tmp_path, warmup_steps, no_gradient):
    """Every B starts at zero, so step 1 gives omega no gradient; transformers' warm-up starts at lr = 0, so B is still
    zero at step 2 and that step gives none either (the method page says so: T counts optimizer steps, not omega's)."""
    cfg = WeightLoraConfig(r=R, target_modules="all-linear", selection_steps=5)
    args = cpu_args(tmp_path, max_steps=8, warmup_steps=warmup_steps)
    trainer = WeightLoraTrainer(tiny_llama(), args, train_dataset=addition_lm_dataset(), peft_config=cfg)
    trainer.train()
    assert trainer.weight_lora.omega_steps["skipped_no_gradient"] == no_gradient
    assert trainer.weight_lora.omega_steps["taken"] == 5 - no_gradient


def test_the_switch_seeds_only_the_cpu_generator(monkeypatch):
    """PEFT initialises new adapters on the CPU; reseeding the GPUs' generators (what torch.manual_seed does) would
    make dropout after the switch replay its masks from step 1. The CUDA side is checked on a GPU in tests/gpu."""
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: reseeded.append(seed))

    def switched_a(seed):
        model = get_peft_model(tiny_llama(), WeightLoraConfig(r=R, target_modules="all-linear", k=3, selection_steps=2))
        weight_lora = WeightLoraModel(model)
        torch.manual_seed(123)  # the training stream
        state = torch.get_rng_state()
        reseeded.clear()
        weight_lora.switch(seed=seed)
        assert reseeded == []  # no GPU generator was reseeded
        assert torch.equal(torch.get_rng_state(), state)  # training randomness continues untouched
        return [p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n]

    first, again, other = switched_a(0), switched_a(0), switched_a(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # the re-initialisation depends on the seed only
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_model_init_gives_every_fresh_model_its_own_selection(tmp_path):
    """model_init (hyperparameter search) with peft_config used to crash ('NoneType' object has no attribute
    '__dict__'); each model it makes must be wrapped and go through its own warm-up and switch."""
    cfg = WeightLoraConfig(r=R, target_modules="all-linear", selection_steps=T)
    trainer = WeightLoraTrainer(
        args=cpu_args(tmp_path, max_steps=6),
        model_init=lambda: tiny_llama(),
        train_dataset=addition_lm_dataset(),
        peft_config=cfg,
    )
    first = trainer.weight_lora
    assert not first.switched
    trainer.train()
    second = trainer.weight_lora
    assert second is not first and second.switched and second.model is trainer.model  # train() re-ran model_init
    assert len(_lora_layers(trainer.model)) == second.k == 7
    trainer.train()
    assert trainer.weight_lora is not second and trainer.weight_lora.switched
    assert cfg.target_modules == "all-linear"  # the user's config was not edited by the wrapping


def test_the_switch_is_one_readable_line_at_the_default_log_level(tmp_path, capsys):
    trainer, names, _ = _train(tmp_path)
    lines = [line for line in capsys.readouterr().out.splitlines() if "WeightLoRA switch" in line]
    assert lines == [
        f"WeightLoRA switch at step {T + 1}: kept 7 of 14 adapters (rank {R}); per projection: "
        + ", ".join(
            f"{p} {sum(a.kept for a in trainer.weight_lora.adapters if a.module.endswith(p))}/2"
            for p in ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        )
    ]


def test_custom_loop_mistakes_fail_at_the_first_step_with_what_to_pass():
    """A fraction T without max_steps used to never switch, silently; omega inside a hand-built optimizer was Adam-
    updated unnoticed. Both fail at the first step now, before anything is trained."""
    model = get_peft_model(tiny_llama(), WeightLoraConfig(r=R, target_modules="all-linear", selection_steps=0.1))
    weight_lora = WeightLoraModel(model)
    ids = torch.arange(3, 19).reshape(2, 8)
    model(input_ids=ids, labels=ids).loss.backward()
    with pytest.raises(ValueError, match=r"selection_steps=0.1 is a fraction .*WeightLoraModel\(model, max_steps=N\)"):
        weight_lora.omega_step()

    model = get_peft_model(tiny_llama(), WeightLoraConfig(r=R, target_modules="all-linear", selection_steps=3))
    weight_lora = WeightLoraModel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)  # the mistake: omega is in there
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model(input_ids=ids, labels=ids).loss.backward()
    with pytest.raises(ValueError, match=r"holds WeightLoRA's omega.*weight_lora.trainable_parameters\(\)"):
        optimizer.step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)  # nothing moved
    torch.optim.AdamW(weight_lora.trainable_parameters(), lr=1e-2).step()  # the right optimizer steps


def test_the_mixin_makes_any_trainer_a_weight_lora_trainer(tmp_path):
    """WeightLoraMixin is cooperative: placed before any Trainer subclass that gets a WeightLoRA PeftModel, it sets
    up the selection after the trainer's own __init__ and the run goes through the switch."""
    from wlora_trl import WeightLoraMixin

    class MyTrainer(WeightLoraMixin, Trainer):
        pass

    model = get_peft_model(tiny_llama(), WeightLoraConfig(r=R, target_modules="all-linear", selection_steps=T))
    trainer = MyTrainer(model=model, args=cpu_args(tmp_path, max_steps=6), train_dataset=addition_lm_dataset())
    trainer.train()
    assert trainer.weight_lora.switched and len(_lora_layers(trainer.model)) == trainer.weight_lora.k
    # transformers.Trainer takes no peft_config: what works instead is said, not "pass peft_config=" (found by a user).
    with pytest.raises(
        ValueError, match="Trainer takes no peft_config to build them from: pass a model already wrapped"
    ):
        MyTrainer(model=tiny_llama(), args=cpu_args(tmp_path), train_dataset=addition_lm_dataset())
    config = WeightLoraConfig(r=R, target_modules="all-linear", selection_steps=T)
    with pytest.raises(TypeError, match="Trainer takes no peft_config .* subclass wlora_trl.WeightLoraTrainer"):
        MyTrainer(model=tiny_llama(), args=cpu_args(tmp_path), train_dataset=addition_lm_dataset(), peft_config=config)
