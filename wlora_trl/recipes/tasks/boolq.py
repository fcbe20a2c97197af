"""BoolQ (yes/no questions about a Wikipedia passage) as binary sequence classification.

Rows have the layout of SuperGLUE `boolq` as lm-evaluation-harness reads it: `question`, `passage`, `idx`,
`label` (1 = yes/true, 0 = no/false). They come from `<data folder>/boolq/validation.jsonl`, the only split the
local data folder carries, when a local data folder is found, else from the hub's `aps/super_glue` (config `boolq`,
the same split, one log line says which); with `dataset_name` from that hub dataset.

Because there is one local split, the examples train and evaluate on two disjoint slices of it, chosen by
position so they never depend on a random seed: rows 0, 5, 10, ... (every 5th row, 654 of 3270) are the eval
slice, all other rows (2616) the train slice. Numbers from it are a miniature of the paper's NLU setting, not
comparable to the official BoolQ validation accuracy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .common import DataFormatError, Row, hub_rows, local_or_hub_rows, require_text

LOCAL_NAME = "boolq"
HUB_ID = "aps/super_glue"
HUB_CONFIG = "boolq"
EVAL_EVERY = 5  # every 5th row is held out
HOW_TO_GET_IT = (
    "BoolQ's validation split is SuperGLUE's BoolQ val.jsonl with label true/false written as 1/0 (fields question, "
    "passage, idx, label). Online, without a local data folder, the hub copy aps/super_glue (config boolq) is read "
    "instead; --dataset_name aps/super_glue --dataset_config boolq reads it even where a local folder exists."
)


@dataclass(frozen=True)
class BoolQExample:
    question: str
    passage: str
    label: int  # 1 = yes, 0 = no


def _example(row: Row) -> BoolQExample:
    question = require_text(row, "question")
    passage = require_text(row, "passage")
    label = row.fields.get("label")
    # bool is accepted (some copies store true/false); anything else is a broken row, not a third class.
    if isinstance(label, bool):
        label = int(label)
    if label not in (0, 1) or isinstance(label, float):
        raise DataFormatError(f"{row.where()}: 'label' must be 0 (no) or 1 (yes), got {label!r}.")
    return BoolQExample(question.strip(), passage.strip(), label)


def load_boolq(
    split: str = "validation",
    *,
    data_dir: str | os.PathLike | None = None,
    dataset_name: str | None = None,
    dataset_config: str | None = HUB_CONFIG,
) -> list[BoolQExample]:
    """Every row of one split, checked (a bad row raises `DataFormatError` naming file, line and field): from the
    local data folder, else the hub's aps/super_glue, or from the hub dataset `dataset_name`."""
    if dataset_name is None:
        rows = local_or_hub_rows(LOCAL_NAME, split, data_dir, (HUB_ID, HUB_CONFIG), HOW_TO_GET_IT)
    else:
        rows = hub_rows(dataset_name, dataset_config, split)
    return [_example(row) for row in rows]


def train_eval_slices(examples: list[BoolQExample]) -> tuple[list[BoolQExample], list[BoolQExample]]:
    """(train, eval): every `EVAL_EVERY`-th example (positions 0, 5, 10, ...) is eval, the rest train."""
    train = [example for position, example in enumerate(examples) if position % EVAL_EVERY]
    held_out = [example for position, example in enumerate(examples) if not position % EVAL_EVERY]
    return train, held_out


def tokenized_dataset(examples: list[BoolQExample], tokenizer, max_length: int):
    """A `datasets.Dataset` of input_ids / attention_mask (/ token_type_ids) / labels.

    The pair is (question, passage) and only the passage is truncated, so the question always survives.
    """
    from datasets import Dataset

    encoded = tokenizer(
        [example.question for example in examples],
        [example.passage for example in examples],
        truncation="only_second",
        max_length=max_length,
    )
    return Dataset.from_dict({**encoded, "labels": [example.label for example in examples]})
