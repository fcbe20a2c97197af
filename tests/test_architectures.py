"""The architecture matrix: each model family trains through the switch with WeightLoRA, and its saved adapter, loaded
by stock PEFT in a process that never imports wlora_trl, reproduces the trained model's logits (fp32, <= 1e-5).

Families: Llama, the mixture-of-experts models Qwen3-MoE, Mixtral and gpt-oss (all-linear: experts blocks and
routers are selectable units; gpt-oss needs target_parameters, which all-linear does not reach there), GPT-2 (Conv1D
layers), GPT-NeoX (fused QKV), Gemma, BERT with a classifier head (modules_to_save), T5 (encoder-decoder). A new family
is one entry in ARCHITECTURES.
"""

from __future__ import annotations

import json
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
    GptOssConfig,
    MixtralConfig,
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

MOE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
MOE_FAMILIES = ("qwen3_moe", "mixtral", "gpt_oss")

ARCHITECTURES = {  # name: (model factory, Auto class, data, extra WeightLoraConfig fields)
    "llama": (tiny_llama, "AutoModelForCausalLM", addition_lm_dataset, {}),
    "qwen3_moe": (tiny_qwen3_moe, "AutoModelForCausalLM", addition_lm_dataset, {}),
    "mixtral": (
        lambda: AutoModelForCausalLM.from_config(
            MixtralConfig(vocab_size=V, **MOE, head_dim=16, num_local_experts=4, num_experts_per_tok=2)
        ),
        "AutoModelForCausalLM",
        addition_lm_dataset,
        {},
    ),
    # PEFT 0.21's all-linear does not reach gpt-oss's experts (nor its router): they are named here, one unit per block.
    "gpt_oss": (
        lambda: AutoModelForCausalLM.from_config(
            GptOssConfig(
                vocab_size=V,
                **MOE,
                head_dim=16,
                num_local_experts=4,
                num_experts_per_tok=2,
                layer_types=["full_attention", "sliding_attention"],
                sliding_window=8,
            )
        ),
        "AutoModelForCausalLM",
        addition_lm_dataset,
        {"target_parameters": ["experts.gate_up_proj", "experts.down_proj"]},
    ),
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
            target_modules="all-linear",
            selection_steps=3,
            init_lora_weights="gaussian",
            **extra,
        )
        trainer = WeightLoraTrainer(
            base, cpu_args(root / name / "run", max_steps=6), train_dataset=data(), peft_config=cfg
        )
        trainer.train()
        trainer.save_model(str(root / name / "adapter"))
        with trainer.model.disable_adapter():
            base_logits = _logits(trainer.model, auto)
        results[name] = {"trainer": trainer, "logits": _logits(trainer.model, auto), "base_logits": base_logits}
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
    exported = set(result["config"]["target_modules"] or []) | {
        name.rsplit(".", 1)[0] for name in result["config"].get("target_parameters") or []
    }
    assert exported == kept
    assert (result["reloaded"] - result["logits"]).abs().max().item() <= 1e-5
    # The adapter's own effect on the logits is far above the tolerance: the comparison is not trivially met.
    assert (result["logits"] - result["base_logits"]).abs().max().item() > 1e-2


@pytest.mark.parametrize("name", MOE_FAMILIES)
def test_mixture_of_experts_blocks_are_selected_and_kept_ones_reload(matrix, name):
    """With all-linear (gpt-oss: plus target_parameters) every layer's experts block is one selectable unit (gate_up
    and down together) and the router, where PEFT adapts it, one of its own; a kept block is exported with exact
    target_parameters (and reloads: the matrix test), a dropped one is the plain experts module again."""
    weight_lora = matrix[name]["trainer"].weight_lora
    records = weight_lora.adapters
    blocks = [a for a in records if a.kind == "experts"]
    assert [a.module for a in blocks] == [f"model.layers.{i}.mlp.experts" for i in range(2)]
    assert all(set(a.parameters) == {"gate_up_proj", "down_proj"} and a.num_experts == 4 for a in blocks)
    assert any(a.kept for a in blocks)  # so the stock reload in the matrix test covers a trained experts adapter
    routers = [a.module for a in records if a.kind == "parameter"]
    assert routers == ([] if name == "gpt_oss" else [f"model.layers.{i}.mlp.gate" for i in range(2)])
    config = matrix[name]["config"]
    kept_targets = [t for a in records if a.kept and a.kind != "linear" for t in a.target_parameters]
    assert sorted(config.get("target_parameters") or []) == sorted(kept_targets)
    base = weight_lora.base
    for block in blocks:
        experts = base.get_submodule(block.module)
        if block.kept:
            assert experts.lora_A["default"].weight.shape[0] == block.rank * 4
        else:
            assert not hasattr(experts, "lora_A") and not any("lora_" in n for n, _ in experts.named_parameters())
