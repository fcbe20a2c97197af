"""Helpers the tests share: tiny models built from configs (a few layers, hidden size 64), a character tokenizer,
in-memory datasets and CPU training arguments. Imported as `from tests.testing_utils import ...`."""

from __future__ import annotations

import string

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    TrainingArguments,
)

VOCAB = ["<pad>", "<eos>", "<unk>"] + list(string.ascii_letters + string.digits + string.punctuation + " \n")


def tiny_llama(num_layers: int = 2, seed: int = 0, intermediate_size: int = 96) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=64,
        intermediate_size=intermediate_size,  # differs from hidden: q/k/v/o and MLP adapters have different shapes
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
    )
    return LlamaForCausalLM(config)


def tiny_qwen3_moe(seed: int = 0):
    """A mixture-of-experts model: 4 experts per layer (their weights are parameters, not nn.Linear) and a router."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    config = Qwen3MoeConfig(
        vocab_size=len(VOCAB),
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
    )
    return Qwen3MoeForCausalLM(config)


def tiny_bert_classifier(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


def char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(VOCAB)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def addition_lm_dataset(rows: int = 64, length: int = 16) -> Dataset:
    """Token sequences with learnable structure (repeated digit patterns), as input_ids/labels."""
    g = torch.Generator().manual_seed(1)
    starts = torch.randint(3, 40, (rows, 1), generator=g)
    steps = torch.randint(1, 4, (rows, 1), generator=g)
    ids = (starts + steps * torch.arange(length)) % (len(VOCAB) - 3) + 3
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def classification_dataset(rows: int = 64, length: int = 12) -> Dataset:
    """Label 1 iff the first token is in the upper half of the vocabulary."""
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, len(VOCAB), (rows, length), generator=g)
    labels = (ids[:, 0] >= (len(VOCAB) + 3) // 2).long()
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})


def cpu_args(output_dir, **overrides) -> TrainingArguments:
    kwargs = dict(
        max_steps=10,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        lr_scheduler_type="linear",
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    return TrainingArguments(str(output_dir), **kwargs)


def lora_parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)


def expected_lora_count(ranks: dict[str, int], model: torch.nn.Module) -> int:
    """sum of r_i * (in_i + out_i) over the adapted modules, read from their base layers."""
    total = 0
    for name, rank in ranks.items():
        module = model.base_model.model.get_submodule(name)
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module  # dropped: plain Linear
        total += rank * (base.in_features + base.out_features)
    return total


def sums_dataset() -> Dataset:
    """81 prompt/completion rows 'a+b=' -> 'a+b' (TRL's prompt-completion format) for SFTTrainer tests."""
    pairs = [(a, b) for a in range(9) for b in range(9)]
    return Dataset.from_dict({"prompt": [f"{a}+{b}=" for a, b in pairs], "completion": [str(a + b) for a, b in pairs]})


def sft_args(output_dir, trl_defaults: bool = False, **overrides):
    """An SFTConfig for tiny CPU runs. TRL's bf16 and gradient checkpointing defaults are turned off, unless
    `trl_defaults` keeps them (on a GPU)."""
    from trl import SFTConfig

    kwargs = dict(
        max_steps=6,
        per_device_train_batch_size=8,
        learning_rate=5e-3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        disable_tqdm=True,
        seed=0,
    )
    if trl_defaults:
        del kwargs["bf16"], kwargs["gradient_checkpointing"]
    kwargs.update(overrides)
    return SFTConfig(str(output_dir), **kwargs)
