"""GSM8K (grade-school math word problems): loading, row checks, chat formatting and answer scoring.

Rows have the hub layout of `openai/gsm8k` (config `main`): `question`, and `answer` = worked solution ending in
`#### N`. They come from `<data folder>/gsm8k/{train,test}.jsonl` when a local data folder is found, else from the
hub's `openai/gsm8k` (one log line says which), or from the hub dataset `dataset_name` names. Every loaded row is
checked; a row without a question, or whose answer does not end in `#### <number>`, raises `DataFormatError` naming
the file and line.

Training examples are conversational prompt/completion pairs (the user turn is the question, the assistant turn
the full solution), so TRL renders them with the model's chat template and puts the loss on the answer only.
Solutions are kept verbatim, calculator annotations (`<<48/2=24>>`) included, as in the dataset.

Scoring follows the usual GSM8K convention: the prediction is the number after the last `####` in the generation,
or, when the model did not write one (an untuned model usually does not), the last number in the generation;
it is correct when it equals the reference number (commas and a leading `$` ignored).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from .common import DataFormatError, Row, hub_rows, local_or_hub_rows, require_text

HUB_ID = "openai/gsm8k"
HUB_CONFIG = "main"
LOCAL_NAME = "gsm8k"
HOW_TO_GET_IT = (
    "GSM8K's files are train.jsonl and test.jsonl of github.com/openai/grade-school-math "
    "(grade_school_math/data/). Online, without a local data folder, the hub copy openai/gsm8k is read instead; "
    "--dataset_name openai/gsm8k reads it even where a local folder exists."
)

# A number as GSM8K writes it: optional sign, digits with optional thousands commas, optional decimals.
_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?"
_FINAL = re.compile(r"####\s*(" + _NUMBER + r")")
_ANY_NUMBER = re.compile(_NUMBER)


@dataclass(frozen=True)
class GSM8KExample:
    question: str
    answer: str  # the full reference solution, ending in "#### N"
    final: str  # N, normalised (no commas, no "$")


def normalize_number(text: str) -> str:
    """'1,080' -> '1080', '$18' -> '18', '18.00' -> '18', '-3.50' -> '-3.5'."""
    text = text.replace(",", "").replace("$", "").rstrip(".")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text if text not in ("", "-") else "0"


def reference_answer(answer: str) -> str | None:
    """The normalised number after the last `####` of a reference solution, or None if there is none."""
    matches = _FINAL.findall(answer)
    return normalize_number(matches[-1]) if matches else None


def predicted_answer(generation: str) -> tuple[str | None, bool]:
    """(normalised predicted number or None, whether it came from a `#### N` line)."""
    final = _FINAL.findall(generation)
    if final:
        return normalize_number(final[-1]), True
    numbers = _ANY_NUMBER.findall(generation)
    return (normalize_number(numbers[-1]), False) if numbers else (None, False)


def is_correct(prediction: str | None, reference: str) -> bool:
    if prediction is None:
        return False
    try:
        return float(prediction) == float(reference)
    except ValueError:
        return False


def score_generations(examples: list[GSM8KExample], generations: list[str]) -> dict:
    """Exact match and answer format of `generations` (one per example, same order), with per-question records.

    Returns {"exact_match": {"value", "count", "total"}, "answer_format": {...} (share that wrote '#### N'),
    "generations": [{"question", "reference", "generation", "prediction", "formatted", "correct"}, ...]}.
    """
    if len(examples) != len(generations) or not examples:
        raise ValueError(f"need one generation per example, got {len(generations)} for {len(examples)} examples")
    records = []
    for example, generation in zip(examples, generations):
        prediction, formatted = predicted_answer(generation)
        records.append(
            {
                "question": example.question,
                "reference": example.final,
                "generation": generation,
                "prediction": prediction,
                "formatted": formatted,
                "correct": is_correct(prediction, example.final),
            }
        )
    total = len(records)
    correct = sum(record["correct"] for record in records)
    formatted = sum(record["formatted"] for record in records)
    return {
        "exact_match": {"value": correct / total, "count": correct, "total": total},
        "answer_format": {"value": formatted / total, "count": formatted, "total": total},
        "generations": records,
    }


def _example(row: Row) -> GSM8KExample:
    question = require_text(row, "question")
    answer = require_text(row, "answer")
    final = reference_answer(answer)
    if final is None:
        raise DataFormatError(
            f"{row.where()}: 'answer' must end with '#### <number>' (GSM8K's final-answer line), got "
            f"...{answer[-80:]!r}."
        )
    return GSM8KExample(question.strip(), answer.strip(), final)


def load_gsm8k(
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    dataset_name: str | None = None,
    dataset_config: str | None = HUB_CONFIG,
    limit: int | None = None,
) -> list[GSM8KExample]:
    """The checked examples of one split, in file order; the first `limit` of them when given.

    `dataset_name=None` reads the local data folder (see `wlora_trl._offline.data`), or the hub's openai/gsm8k when
    none is found; a hub id reads that dataset. Every row of the split is checked, not only the first `limit`, so a
    broken file is noticed whatever the slice.
    """
    if dataset_name is None:
        rows = local_or_hub_rows(LOCAL_NAME, split, data_dir, (HUB_ID, HUB_CONFIG), HOW_TO_GET_IT)
    else:
        rows = hub_rows(dataset_name, dataset_config, split)
    examples = [_example(row) for row in rows]
    return examples if limit is None else examples[:limit]


def prompt_messages(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


def to_prompt_completion(example: GSM8KExample) -> dict:
    """TRL's conversational prompt/completion format: the loss falls on the assistant turn only."""
    return {
        "prompt": prompt_messages(example.question),
        "completion": [{"role": "assistant", "content": example.answer}],
    }


def sft_dataset(examples: list[GSM8KExample]):
    """A `datasets.Dataset` of prompt/completion conversations for `SFTTrainer`."""
    from datasets import Dataset

    return Dataset.from_list([to_prompt_completion(example) for example in examples])
