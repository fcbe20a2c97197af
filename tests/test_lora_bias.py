"""`bias="lora_only"` / `"all"`: the saved adapter is the trained model, biases included.

PEFT trains the bias of every adapted layer under `bias="lora_only"`. When the switch drops an adapter, its layer's
bias has trained through the warm-up: it is frozen with the adapter (it leaves the optimizer) and exported as
trained, since PEFT's own save writes only the biases of layers that still have an adapter. Checked on a tiny Qwen2
(q/k/v carry biases) in both switch strategies, against a stock PEFT reload in a process without wlora_trl.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from tests.testing_utils import VOCAB, addition_lm_dataset, cpu_args
from wlora_trl import WeightLoraConfig, WeightLoraTrainer
from wlora_trl.surgery import innermost_optimizer

IDS = torch.arange(3, 35).reshape(2, 16)

STOCK_RELOAD = textwrap.dedent(
    """
    import sys, torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base_dir, adapter_dir, ids_path, out = sys.argv[1:5]
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    ids = torch.load(ids_path)
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        model = PeftModel.from_pretrained(base, adapter_dir).eval()
        torch.save({"base": base_logits, "adapter": model(input_ids=ids).logits}, out)
    assert not any(name.startswith("wlora_trl") for name in sys.modules), "stock reload imported wlora_trl"
    """
)


class _MaskModeTrainer(WeightLoraTrainer):
    _force_mask_mode = True  # the FSDP2 path's switch and save, without FSDP


def _tiny_qwen2() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(VOCAB),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return Qwen2ForCausalLM(config)


def _base_biases(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if name.endswith(".bias")}


@pytest.mark.parametrize("trainer_cls", [WeightLoraTrainer, _MaskModeTrainer], ids=["module_swap", "mask_mode"])
@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_saved_adapter_carries_the_trained_biases(tmp_path, trainer_cls, bias):
    base = _tiny_qwen2()
    base.save_pretrained(tmp_path / "base")
    before = _base_biases(base)
    config = WeightLoraConfig(r=4, lora_alpha=8, target_modules="all-linear", selection_steps=3, bias=bias)
    # A high learning rate, so that biases move far beyond the reload tolerance within the warm-up.
    trainer = trainer_cls(
        base,
        cpu_args(tmp_path / "run", max_steps=6, learning_rate=2e-2),
        train_dataset=addition_lm_dataset(),
        peft_config=config,
    )
    trainer.train()
    weight_lora = trainer.weight_lora
    dropped = [a.module for a in weight_lora.adapters if not a.kept]
    dropped_with_bias = [m for m in dropped if m.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj")]
    assert dropped_with_bias, "the test needs a dropped adapter on a layer with a bias"

    # Dropped layers' biases trained in the warm-up, then froze with their adapter and left the optimizer.
    optimizer_params = {id(p) for g in innermost_optimizer(trainer.optimizer).param_groups for p in g["params"]}
    for module in dropped_with_bias:
        layer = weight_lora.base.get_submodule(module)
        layer_bias = getattr(layer, "base_layer", layer).bias
        moved = (layer_bias.detach() - before[f"{module}.bias"]).abs().max().item()
        assert moved > 1e-3
        if bias == "lora_only":
            assert not layer_bias.requires_grad and id(layer_bias) not in optimizer_params
        else:  # "all" trains every bias in the model, adapted or not
            assert layer_bias.requires_grad and id(layer_bias) in optimizer_params

    trainer.save_model(str(tmp_path / "adapter"))
    with torch.no_grad():
        trained = trainer.model.eval()(input_ids=IDS).logits
    torch.save(IDS, tmp_path / "ids.pt")
    subprocess.run(
        [sys.executable, "-c", STOCK_RELOAD, str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "ids.pt"),
         str(tmp_path / "reloaded.pt")],
        check=True,
    )  # fmt: skip
    reloaded = torch.load(tmp_path / "reloaded.pt")
    assert (reloaded["adapter"] - reloaded["base"]).abs().max().item() > 1e-2  # the adapter's own effect
    assert (reloaded["adapter"] - trained).abs().max().item() <= 1e-5


def test_a_dropped_layers_bias_stays_where_the_switch_left_it(tmp_path):
    """After the switch a dropped layer is a base layer again: its bias no longer trains (before the fix it kept
    moving with AdamW and the export lost it)."""
    config = WeightLoraConfig(r=4, lora_alpha=8, target_modules="all-linear", selection_steps=3, bias="lora_only")
    trainer = WeightLoraTrainer(
        _tiny_qwen2(),
        cpu_args(tmp_path / "run", max_steps=8, learning_rate=2e-2),
        train_dataset=addition_lm_dataset(),
        peft_config=config,
    )
    snapshots = {}

    from transformers import TrainerCallback

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if trainer.weight_lora.switched:
                snapshots[state.global_step] = _base_biases(trainer.weight_lora.base)

    trainer.add_callback(Snapshot())
    trainer.train()
    dropped = {a.module for a in trainer.weight_lora.adapters if not a.kept}
    first, last = snapshots[min(snapshots)], snapshots[max(snapshots)]
    dropped_keys = [k for k in first if k.rsplit(".", 1)[0] in dropped]
    kept_keys = [k for k in first if k.removesuffix(".bias").removesuffix(".base_layer") not in dropped]
    assert dropped_keys and kept_keys
    assert all(torch.equal(first[k], last[k]) for k in dropped_keys)
    assert any(not torch.equal(first[k], last[k]) for k in kept_keys)  # the kept layers' biases still train
