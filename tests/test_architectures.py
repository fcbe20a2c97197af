"""The architecture matrix: each model family trains through the switch with WeightLoRA, and its saved adapter, loaded
by stock PEFT in a process that never imports wlora_trl, reproduces the trained model's logits (fp32, <= 1e-5).

Families: Llama, Qwen3-MoE (attention adapters; the experts are refused, see test_refusals), GPT-2 (Conv1D layers),
GPT-NeoX (fused QKV), Gemma, BERT with a classifier head (modules_to_save), T5 (encoder-decoder). A new family is
one entry in ARCHITECTURES.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    T5Config,
)

from tests.testing_utils import (
    VOCAB,
    addition_lm_dataset,
    classification_dataset,
    cpu_args,
    tiny_bert_classifier,
    tiny_llama,
    tiny_qwen3_moe,
)
from wlora_trl import WeightLoraConfig, WeightLoraTrainer

V = len(VOCAB)
IDS = torch.arange(3, 35).reshape(2, 16)

ARCHITECTURES = {  # name: (model factory, Auto class, data, extra WeightLoraConfig fields)
    "llama": (tiny_llama, "AutoModelForCausalLM", addition_lm_dataset, {}),
    "qwen3_moe": (tiny_qwen3_moe, "AutoModelForCausalLM", addition_lm_dataset, {}),
    "gpt2": (
        lambda: AutoModelForCausalLM.from_config(
            GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64)
        ),
        "AutoModelForCausalLM",
        addition_lm_dataset,
        {},
    ),
    "gpt_neox": (
        lambda: AutoModelForCausalLM.from_config(
            GPTNeoXConfig(
                vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4
            )
        ),
        "AutoModelForCausalLM",
        addition_lm_dataset,
        {},
    ),
    "gemma": (
        lambda: AutoModelForCausalLM.from_config(
            GemmaConfig(
                vocab_size=V,
                hidden_size=64,
                intermediate_size=96,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=16,
            )
        ),
        "AutoModelForCausalLM",
        addition_lm_dataset,
        {},
    ),
    "bert_classifier": (
        tiny_bert_classifier,
        "AutoModelForSequenceClassification",
        classification_dataset,
        {"modules_to_save": ["classifier"]},
    ),
    "t5": (
        lambda: AutoModelForSeq2SeqLM.from_config(
            T5Config(
                vocab_size=V,
                d_model=64,
                d_ff=96,
                num_layers=2,
                num_heads=4,
                d_kv=16,
                decoder_start_token_id=0,
                pad_token_id=0,
            )
        ),
        "AutoModelForSeq2SeqLM",
        addition_lm_dataset,
        {},
    ),
}

STOCK_RELOAD = textwrap.dedent(
    """
    import json, sys, torch, transformers
    from peft import PeftModel
    for run in json.load(open(sys.argv[1])):
        auto = getattr(transformers, run["auto"])
        model = PeftModel.from_pretrained(auto.from_pretrained(run["base"]), run["adapter"]).eval()
        ids = torch.load(run["ids"])
        extra = {"decoder_input_ids": ids} if run["auto"] == "AutoModelForSeq2SeqLM" else {}
        with torch.no_grad():
            torch.save(model(input_ids=ids, **extra).logits, run["logits"])
    assert not any(name.startswith("wlora_trl") for name in sys.modules), "stock reload imported wlora_trl"
    """
)


def _logits(model, auto: str) -> torch.Tensor:
    extra = {"decoder_input_ids": IDS} if auto == "AutoModelForSeq2SeqLM" else {}
    with torch.no_grad():
        return model.eval()(input_ids=IDS, **extra).logits


def _target_modules(name: str, factory) -> str | list[str]:
    """all-linear, except for the mixture-of-experts model: there the refusal names the modules to use instead,
    and the matrix uses exactly those (so the message is checked to be one a user can act on)."""
    if name != "qwen3_moe":
        return "all-linear"
    with pytest.raises(ValueError) as refusal:
        WeightLoraTrainer(
            factory(),
            cpu_args("unused", max_steps=6),
            train_dataset=addition_lm_dataset(),
            peft_config=WeightLoraConfig(r=4, target_modules="all-linear", selection_steps=3),
        )
    return json.loads(re.search(r"Use target_modules=(\[.*?\])", str(refusal.value)).group(1).replace("'", '"'))


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    root = tmp_path_factory.mktemp("architectures")
    torch.save(IDS, root / "ids.pt")
    runs, results = [], {}
    for name, (factory, auto, data, extra) in ARCHITECTURES.items():
        torch.manual_seed(0)
        factory().save_pretrained(root / name / "base")
        base = getattr(__import__("transformers"), auto).from_pretrained(root / name / "base")
        cfg = WeightLoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=_target_modules(name, factory),
            selection_steps=3,
            init_lora_weights="gaussian",
            **extra,
        )
        trainer = WeightLoraTrainer(
            base, cpu_args(root / name / "run", max_steps=6), train_dataset=data(), peft_config=cfg
        )
        trainer.train()
        trainer.save_model(str(root / name / "adapter"))
        results[name] = {"trainer": trainer, "logits": _logits(trainer.model, auto)}
        runs.append(
            {
                "auto": auto,
                "base": str(root / name / "base"),
                "adapter": str(root / name / "adapter"),
                "ids": str(root / "ids.pt"),
                "logits": str(root / name / "reloaded.pt"),
            }
        )
    (root / "runs.json").write_text(json.dumps(runs))
    subprocess.run([sys.executable, "-c", STOCK_RELOAD, str(root / "runs.json")], check=True)
    for name in ARCHITECTURES:
        results[name]["reloaded"] = torch.load(root / name / "reloaded.pt")
        results[name]["config"] = json.loads((root / name / "adapter" / "adapter_config.json").read_text())
    return results


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_trains_through_the_switch_and_reloads_with_stock_peft(matrix, name):
    result = matrix[name]
    weight_lora = result["trainer"].weight_lora
    assert weight_lora.switched and weight_lora.omega_steps["taken"] >= 1
    kept = {a.module for a in weight_lora.adapters if a.kept}
    assert len(kept) == weight_lora.k < weight_lora.num_adapters
    assert set(result["config"]["target_modules"]) == kept
    assert (result["reloaded"] - result["logits"]).abs().max().item() <= 1e-5
