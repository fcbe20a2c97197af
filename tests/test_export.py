"""The exported adapter is stock PEFT LoRA: a process that never imports wlora_trl reproduces the logits."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.testing_utils import addition_lm_dataset, cpu_args, tiny_llama
from wlora_trl import WeightLoraConfig, WeightLoraTrainer
from wlora_trl.state import read_selection

STOCK_RELOAD = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModelForCausalLM
    from peft import PeftModel
    base_dir, adapter_dir, ids_file, out_file = sys.argv[1:]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.load(ids_file)).logits
    torch.save(logits, out_file)
    assert not any(name.startswith("wlora_trl") for name in sys.modules), "stock reload imported wlora_trl"
    """
)


def stock_reload_logits(base_dir, adapter_dir, tmp_path) -> torch.Tensor:
    """The logits of `tmp_path/ids.pt` from the adapter loaded by stock PEFT in a process without wlora_trl."""
    command = [sys.executable, "-c", STOCK_RELOAD, str(base_dir), str(adapter_dir), str(tmp_path / "ids.pt")]
    subprocess.run([*command, str(tmp_path / "logits.pt")], check=True)
    return torch.load(tmp_path / "logits.pt")


@pytest.mark.parametrize(
    "extra",
    [dict(), dict(plus=True), dict(rank_pattern={"q_proj": 2}, alpha_pattern={"q_proj": 4}, k=10)],
    ids=["WeightLoRA", "WeightLoRA+", "rank_pattern"],
)
def test_stock_peft_reload_reproduces_logits(tmp_path, extra):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_llama().save_pretrained(base_dir)
    from transformers import AutoModelForCausalLM

    cfg = WeightLoraConfig(r=4, lora_alpha=8, target_modules="all-linear", selection_steps=3, **extra)
    trainer = WeightLoraTrainer(
        AutoModelForCausalLM.from_pretrained(base_dir),
        cpu_args(tmp_path / "run", max_steps=6),
        train_dataset=addition_lm_dataset(),
        peft_config=cfg,
    )
    trainer.train()
    trainer.save_model(str(adapter_dir))

    ids = torch.arange(3, 35).reshape(2, 16)
    torch.save(ids, tmp_path / "ids.pt")
    model = trainer.model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    assert any(name.endswith("lora_B.default.weight") and p.abs().sum() > 0 for name, p in model.named_parameters())

    reloaded = stock_reload_logits(base_dir, adapter_dir, tmp_path)
    assert (reloaded - expected).abs().max().item() <= 1e-5

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    selection = read_selection(adapter_dir)
    kept = set(selection.kept_modules)
    assert config["peft_type"] == "LORA" and set(config["target_modules"]) == kept
    assert not {"k", "selection_steps", "omega_lr", "plus", "reinit", "selection"} & set(config)
    assert selection.n == 14 and selection.selection_steps == 3 and selection.switched
    assert selection.switch_step == 4 and selection.step == 6
    assert len(kept) == selection.k and all(a.rank == 0 for a in selection.adapters if not a.kept)
    if "rank_pattern" in extra:
        kept_q = [name for name in kept if name.endswith("q_proj")]
        assert {config["rank_pattern"][name] for name in kept_q} <= {2} and config["r"] == 4


def test_adapter_saved_during_the_warmup_reloads_to_the_model_being_trained(tmp_path):
    """save_model (or a checkpoint) before the switch: stock PEFT, without wlora_trl, must load the model as it is
    at that step: omega folded into lora_B (zero for thresholded adapters), a stock config."""
    from transformers import AutoModelForCausalLM, TrainerCallback

    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_llama().save_pretrained(base_dir)
    cfg = WeightLoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", k=5, selection_steps=5, init_lora_weights="gaussian"
    )
    trainer = WeightLoraTrainer(
        AutoModelForCausalLM.from_pretrained(base_dir),
        cpu_args(tmp_path / "run", max_steps=8),
        train_dataset=addition_lm_dataset(),
        peft_config=cfg,
    )
    ids = torch.arange(3, 35).reshape(2, 16)
    torch.save(ids, tmp_path / "ids.pt")
    seen = {}

    class SaveMidWarmup(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                trainer.save_model(str(adapter_dir))
                with torch.no_grad():
                    seen["logits"] = trainer.model.eval()(input_ids=ids).logits
                    seen["omega"] = trainer.weight_lora.omega.clone()
                trainer.model.train()

    trainer.add_callback(SaveMidWarmup())
    trainer.train()
    omega = seen["omega"]
    assert int(omega.eq(0).sum()) == 9 and (omega[omega.ne(0)] - 1).abs().max() > 0.05  # the fold matters

    assert (stock_reload_logits(base_dir, adapter_dir, tmp_path) - seen["logits"]).abs().max().item() <= 1e-5
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert not {"k", "selection_steps", "omega_lr", "plus", "reinit", "selection"} & set(config)
    assert len(config["target_modules"]) == 14 and read_selection(adapter_dir).switched is False
