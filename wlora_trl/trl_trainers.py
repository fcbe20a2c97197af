"""WeightLoRA with TRL's preference and RL trainers: `WeightLoraDPOTrainer` and `WeightLoraGRPOTrainer`.

Both are `WeightLoraMixin` on the TRL trainer, nothing more: the mixin finds the training arguments by the TRL
trainer's own signature (`DPOTrainer(model, ref_model, args, ...)`, `GRPOTrainer(model, reward_funcs, args, ...)`),
and selects within the trained adapter only. When a PeftModel comes without a reference model, TRL adds a frozen
copy of its adapter named "ref" as the reference policy; WeightLoRA leaves that copy alone (not counted in n, not
gated, not dropped at the switch, not saved), so `save_model` writes the trained adapter alone, as a stock PEFT
adapter. Imported on first use (`wlora_trl.WeightLoraDPOTrainer`), like the other trainers.
"""

from __future__ import annotations

from trl import DPOTrainer, GRPOTrainer

from .config import CITATION
from .trainer import _REFUSALS, WeightLoraMixin

_PAPER = {"title": "WeightLoRA: Keep Only Necessary Adapters", "id": "2506.02724", "citation": CITATION}


class WeightLoraDPOTrainer(WeightLoraMixin, DPOTrainer):
    __doc__ = (
        """`trl.DPOTrainer` with WeightLoRA: pass `peft_config=WeightLoraConfig(...)` where you passed a `LoraConfig`.

    Example:
        ```python
        from trl import DPOConfig
        from wlora_trl import WeightLoraConfig, WeightLoraDPOTrainer

        peft_config = WeightLoraConfig(r=8, lora_alpha=16, target_modules="all-linear", reinit=False)
        trainer = WeightLoraDPOTrainer(model, args=DPOConfig("out", max_steps=1000), train_dataset=pairs,
                                       processing_class=tokenizer, peft_config=peft_config)
        trainer.train()
        trainer.save_model("out")  # the trained adapter only, stock PEFT LoRA, + selection.json
        ```

    Model forms (each tested through the switch, the saved adapter reloaded by stock PEFT): a plain model with
    `peft_config=WeightLoraConfig(...)`, or a PeftModel made with `get_peft_model` from a `WeightLoraConfig` and
    no `peft_config`; either one with a reference model (`ref_model`, positionally or by keyword) or without.
    Without one the reference is the base model (adapters disabled) for `peft_config=`, and for a PeftModel the
    frozen copy of its adapter that TRL adds, `ref`, which WeightLoRA leaves alone.

    What the switch does to DPO: DPO's implicit reward is measured against the reference policy. With
    `reinit=True` (the default, the paper's method) the kept adapters restart at zero, so the step after the switch
    starts from the reference again whenever the reference is the model at step 0 (the base model, a copy of it,
    or TRL's copy of a fresh adapter): its loss is exactly ln 2 = 0.6931, reward margins 0, reward accuracy 0, and
    the warm-up's preference progress is gone (its T steps only chose the adapters). `reinit=False` keeps the
    kept adapters' weights (omega folded in; the model's function is unchanged at the switch), so training goes
    on from where the warm-up left it. Prefer `reinit=False` for DPO unless the run after the switch is long
    compared with the warm-up: the documentation's trainers page shows what `benchmarks/dpo_reinit.py` measured.
    (With a PeftModel whose adapter was trained before, the reference is that adapter, and `reinit=True` discards
    it too.)
"""
        + _REFUSALS
    )

    # What TRL's model tags and our model card say about the run.
    _tag_names = ["trl", "dpo", "weightlora"]
    _name = "WeightLoRA DPO"
    _paper = _PAPER


class WeightLoraGRPOTrainer(WeightLoraMixin, GRPOTrainer):
    __doc__ = (
        """`trl.GRPOTrainer` with WeightLoRA: pass `peft_config=WeightLoraConfig(...)` where you passed a `LoraConfig`.

    Example:
        ```python
        from trl import GRPOConfig
        from wlora_trl import WeightLoraConfig, WeightLoraGRPOTrainer

        peft_config = WeightLoraConfig(r=8, lora_alpha=16, target_modules="all-linear", reinit=False)
        trainer = WeightLoraGRPOTrainer(model, reward_funcs=my_reward, args=GRPOConfig("out", max_steps=500),
                                        train_dataset=prompts, processing_class=tokenizer, peft_config=peft_config)
        trainer.train()
        trainer.save_model("out")  # the trained adapter only, stock PEFT LoRA, + selection.json
        ```

    Model forms (each tested through the switch, the saved adapter reloaded by stock PEFT): a plain model with
    `peft_config=WeightLoraConfig(...)`, or a PeftModel made with `get_peft_model` from a `WeightLoraConfig` and
    no `peft_config`; either one with a reference model (`beta > 0`; TRL's default is `beta=0.0`, no reference)
    or without. The reference is the base model (adapters disabled) for `peft_config=`, and for a PeftModel the
    frozen copy of its adapter that TRL adds, `ref`, which WeightLoRA leaves alone.

    What the switch does to GRPO: with `reinit=True` (the default) the policy restarts at the model of step 0, so
    the completions of step T+1 are sampled from it again and, with `beta > 0`, the KL to the reference is 0 there.
    `reinit=False` keeps what the warm-up learned, which matters most when the run after the switch is short (see
    `WeightLoraDPOTrainer` for DPO; GRPO's trade-off was not measured).
"""
        + _REFUSALS
    )

    _tag_names = ["trl", "grpo", "weightlora"]
    _name = "WeightLoRA GRPO"
    _paper = _PAPER
