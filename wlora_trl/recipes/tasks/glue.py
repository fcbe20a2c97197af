"""GLUE-style sequence classification and regression: the task registry, loading (local folder, a local JSON file
or folder, the hub), row checks, label typing and tokenisation.

Known tasks (`TASKS`) come from the local data folder in the hub layout of `nyu-mll/glue`
(`<data folder>/glue/<task>/{train,validation}.jsonl`) when one is found, else from the hub's `nyu-mll/glue` (one
log line says which), or, with `dataset_name`, from that hub dataset; BoolQ from `<data folder>/boolq/validation.jsonl`
(else the hub's `aps/super_glue` validation split), its one split cut into train and eval by position (every 5th row
is eval, see `boolq.train_eval_slices`). GLUE's test labels are not public, so the validation split is the held-out set.

Any other dataset is a custom task: `dataset_name` is a hub id, a local folder holding `<split>.jsonl` (or
`.json`) files, or one local JSON / JSON-lines file (then cut into train and eval by position as BoolQ is), with one
or two text columns and a label column. The label column decides the task type: integers or booleans are class ids
(0 .. C-1), strings are class names (sorted, then numbered), and any float makes it a regression (`num_labels = 1`;
in JSON `1.0` is a float and `1` an integer).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from . import boolq
from .common import DataFormatError, Row, hub_rows, local_or_hub_rows, read_jsonl, require_text
from .metrics import METRICS

GLUE_SOURCE = (
    "The GLUE files are those GLUE's download_glue_data.py writes, as JSON lines in the hub layout of nyu-mll/glue "
    "(fields sentence or sentence1/sentence2, label, idx). Online, without a local data folder, the hub copy "
    "nyu-mll/glue is read instead; --dataset_name nyu-mll/glue --dataset_config <task> reads it even where a local "
    "folder exists."
)


@dataclass(frozen=True)
class TaskSpec:
    """What defines a task: where its rows live, which columns are text and label, how it is scored."""

    name: str
    title: str
    text_columns: tuple[str, ...]
    label_column: str = "label"
    num_labels: int = 2  # 1: regression
    metric: str = "accuracy"  # a family of wlora_trl.recipes.tasks.metrics
    local: str | None = None  # folder under the data folder
    hub: tuple[str, str | None] | None = None  # (dataset, config)
    one_split: str | None = None  # the only split; cut into train/eval by position
    truncation: str = "longest_first"
    label_names: tuple[str, ...] = ()
    how_to_get_it: str = GLUE_SOURCE

    @property
    def regression(self) -> bool:
        return self.num_labels == 1


def _glue(name, title, columns, metric, labels) -> TaskSpec:
    return TaskSpec(
        name, title, columns, metric=metric, local=f"glue/{name}", hub=("nyu-mll/glue", name), label_names=labels
    )


TASKS = {
    "sst2": _glue("sst2", "SST-2", ("sentence",), "accuracy", ("negative", "positive")),
    "mrpc": _glue("mrpc", "MRPC", ("sentence1", "sentence2"), "f1", ("not_equivalent", "equivalent")),
    "cola": _glue("cola", "CoLA", ("sentence",), "matthews", ("unacceptable", "acceptable")),
    "rte": _glue("rte", "RTE", ("sentence1", "sentence2"), "accuracy", ("entailment", "not_entailment")),
    "boolq": TaskSpec(
        "boolq",
        "BoolQ",
        ("question", "passage"),
        local=boolq.LOCAL_NAME,
        hub=(boolq.HUB_ID, boolq.HUB_CONFIG),
        one_split="validation",
        truncation="only_second",
        label_names=("no", "yes"),
        how_to_get_it=boolq.HOW_TO_GET_IT,
    ),  # the question always survives truncation; only the passage is cut
}
DEFAULT_TASK = "sst2"


@dataclass(frozen=True)
class TextExample:
    texts: tuple[str, ...]
    label: int | float


@dataclass
class LoadedTask:
    spec: TaskSpec
    train: list[TextExample]
    eval: list[TextExample]
    source: str  # where the rows came from, for titles

    def majority_share(self) -> float | None:
        """The eval accuracy of always predicting the most common eval label (None for regression)."""
        if self.spec.regression or not self.eval:
            return None
        labels = [example.label for example in self.eval]
        return max(labels.count(label) for label in set(labels)) / len(labels)

    def class_share(self, label: int) -> float | None:
        """The eval accuracy of always predicting class `label`: its share of the eval rows (None for regression)."""
        if self.spec.regression or not self.eval:
            return None
        return sum(example.label == label for example in self.eval) / len(self.eval)


def parse_columns(text: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """'sentence1,sentence2' or ['sentence1', 'sentence2'] (`--text_columns sentence1 sentence2`, or a YAML list) ->
    ('sentence1', 'sentence2'); one or two names. A list's items may hold commas too."""
    if text is None:
        return None
    given = " ".join(text) if not isinstance(text, str) else text
    parts = [text] if isinstance(text, str) else list(text)
    columns = tuple(name.strip() for part in parts for name in part.split(",") if name.strip())
    if not 1 <= len(columns) <= 2:
        raise ValueError(
            f"--text_columns {given!r}: give one column or two, space- or comma-separated (e.g. sentence1 sentence2, "
            "or sentence1,sentence2)."
        )
    return columns


def resolve_spec(
    task: str | None,
    dataset_name: str | None,
    text_columns: str | Sequence[str] | None,
    label_column: str | None,
    metric: str | None,
) -> TaskSpec:
    """The task before its labels are read: a known task (its own columns unless overridden), or a custom one."""
    if metric is not None and metric not in METRICS:
        raise ValueError(f"--metric {metric!r}: choose one of {', '.join(METRICS)}.")
    columns = parse_columns(text_columns)
    if task is not None:
        if task not in TASKS:
            raise ValueError(
                f"--task {task!r} is not a known task ({', '.join(TASKS)}). For another dataset pass --dataset_name "
                "with --text_columns and --label_column instead."
            )
        spec = TASKS[task]
        overrides = {"text_columns": columns, "label_column": label_column, "metric": metric}
        return dataclasses.replace(spec, **{key: value for key, value in overrides.items() if value is not None})
    if dataset_name is None:
        return resolve_spec(DEFAULT_TASK, None, text_columns, label_column, metric)
    if columns is None:
        raise ValueError(
            f"--dataset_name {dataset_name}: say which columns hold the text with --text_columns a (one sentence) or "
            "--text_columns a b (a pair; a,b works too), and the label with --label_column (default: label)."
        )
    title = Path(dataset_name).stem if os.path.exists(dataset_name) else dataset_name
    # num_labels and the metric follow from the labels once they are read (`_type_labels`).
    return TaskSpec(
        "custom",
        title,
        columns,
        label_column or "label",
        num_labels=0,
        metric=metric or "",
        local=None,
        hub=None,
        how_to_get_it="",
    )


# --- rows ---------------------------------------------------------------------------------------------------------


def _read_local_file(path: Path) -> list[Row]:
    """Rows of a JSON-lines file, or of a .json file holding one list of objects (or JSON lines)."""
    if path.suffix == ".json":
        try:
            content = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            content = None  # not one JSON document: JSON lines under a .json name
        if isinstance(content, list):
            rows = []
            for number, fields in enumerate(content, start=1):
                if not isinstance(fields, dict):
                    raise DataFormatError(f"{path} item {number} is a JSON {type(fields).__name__}, not an object.")
                rows.append(Row(fields, str(path), number))
            if not rows:
                raise DataFormatError(f"{path} holds no rows.")
            return rows
    return read_jsonl(path)


def _local_split(folder: Path, split: str) -> list[Row]:
    for suffix in (".jsonl", ".json"):
        if (folder / f"{split}{suffix}").is_file():
            return _read_local_file(folder / f"{split}{suffix}")
    raise FileNotFoundError(
        f"{folder} has no {split}.jsonl or {split}.json: name the splits with --train_split / "
        "--eval_split, or pass one file as --dataset_name to cut it into train and eval."
    )


def _raw_splits(spec, dataset_name, dataset_config, train_split, eval_split, data_dir) -> tuple[list, list, str]:
    """(train rows, eval rows, source) before any check of their fields."""
    if dataset_name is None:  # a known task: the local data folder, else the hub's copy
        if spec.one_split:
            rows = local_or_hub_rows(spec.local, spec.one_split, data_dir, spec.hub, spec.how_to_get_it)
            where = f"{spec.hub[0]} {spec.one_split}" if rows[0].hub else f"{spec.local}/{spec.one_split}.jsonl"
            return (*boolq.train_eval_slices(rows), f"{where}, cut by position")
        train, held_out = (
            local_or_hub_rows(spec.local, split, data_dir, spec.hub, spec.how_to_get_it)
            for split in (train_split, eval_split)
        )
        return train, held_out, spec.hub[0] if train[0].hub else f"local {spec.local}"
    path = Path(dataset_name).expanduser()
    if path.is_file():
        train, held_out = boolq.train_eval_slices(_read_local_file(path))
        return train, held_out, f"{path.name}, cut by position"
    if path.is_dir():
        return _local_split(path, train_split), _local_split(path, eval_split), str(path)
    config = dataset_config if dataset_config is not None else (spec.hub[1] if spec.hub else None)
    if spec.one_split:
        train, held_out = boolq.train_eval_slices(hub_rows(dataset_name, config, spec.one_split))
        return train, held_out, f"{dataset_name} {spec.one_split}, cut by position"
    return hub_rows(dataset_name, config, train_split), hub_rows(dataset_name, config, eval_split), dataset_name


def _label_kind(value) -> str:
    if isinstance(value, bool) or isinstance(value, int):
        return "class"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "name"
    return type(value).__name__


def _raw_label(row: Row, column: str):
    if column not in row.fields:
        raise DataFormatError(f"{row.where()} has no {column!r} field (it has {sorted(row.fields)}).")
    return row.fields[column]


def _type_labels(spec: TaskSpec, train: list[Row], held_out: list[Row]) -> tuple[TaskSpec, dict | None]:
    """The spec with num_labels and metric settled, and a {class name: id} map for string labels (None otherwise)."""
    if spec.name != "custom":
        return spec, None
    kinds = {_label_kind(_raw_label(row, spec.label_column)) for row in train + held_out}
    names = None
    if kinds <= {"class", "float"} and "float" in kinds:
        spec = dataclasses.replace(spec, num_labels=1)
    elif kinds == {"class"}:
        values = [int(_raw_label(row, spec.label_column)) for row in train + held_out]
        if min(values) < 0:
            row = next(r for r in train + held_out if int(_raw_label(r, spec.label_column)) < 0)
            raise DataFormatError(
                f"{row.where()}: class ids must be >= 0, got {_raw_label(row, spec.label_column)!r} "
                "(a -1 is GLUE's hidden test label: evaluate on a split with labels)."
            )
        spec = dataclasses.replace(spec, num_labels=max(2, max(values) + 1))
    elif kinds == {"name"}:
        names = {name: i for i, name in enumerate(sorted({row.fields[spec.label_column] for row in train}))}
        spec = dataclasses.replace(spec, num_labels=len(names), label_names=tuple(names))
    else:
        raise DataFormatError(
            f"{train[0].source}: the {spec.label_column!r} column mixes {sorted(kinds)}; use integers (classes), "
            "strings (class names) or floats (regression), one kind for every row."
        )
    metric = spec.metric or ("pearson" if spec.regression else "accuracy")
    if spec.regression != (metric == "pearson"):
        raise ValueError(
            f"--metric {metric} does not fit a {'regression' if spec.regression else 'classification'} label column: "
            + ("use pearson." if spec.regression else "use accuracy, f1 or matthews.")
        )
    if metric == "f1" and spec.num_labels != 2:
        raise ValueError(f"--metric f1 is binary F1; {spec.label_column!r} has {spec.num_labels} classes.")
    return dataclasses.replace(spec, metric=metric), names


def _example(row: Row, spec: TaskSpec, names: dict | None) -> TextExample:
    texts = tuple(require_text(row, column).strip() for column in spec.text_columns)
    label = _raw_label(row, spec.label_column)
    if spec.regression:
        if isinstance(label, bool) or not isinstance(label, (int, float)):
            raise DataFormatError(f"{row.where()}: {spec.label_column!r} must be a number (regression), got {label!r}.")
        return TextExample(texts, float(label))
    if names is not None:
        if label not in names:
            raise DataFormatError(f"{row.where()}: class {label!r} never occurs in the training split.")
        return TextExample(texts, names[label])
    if isinstance(label, bool):
        label = int(label)
    if not isinstance(label, int) or not 0 <= label < spec.num_labels:
        classes = "0 or 1" if spec.num_labels == 2 else f"an integer from 0 to {spec.num_labels - 1}"
        meaning = ", ".join(f"{i} = {name}" for i, name in enumerate(spec.label_names))
        hint = " (-1 marks GLUE's hidden test labels: evaluate on validation)" if label == -1 else ""
        raise DataFormatError(
            f"{row.where()}: {spec.label_column!r} must be {classes}"
            + (f" ({meaning})" if meaning else "")
            + f", got {label!r}{hint}."
        )
    return TextExample(texts, label)


def load_task(
    task: str | None = None,
    *,
    dataset_name: str | None = None,
    dataset_config: str | None = None,
    text_columns: str | Sequence[str] | None = None,
    label_column: str | None = None,
    metric: str | None = None,
    train_split: str = "train",
    eval_split: str = "validation",
    data_dir: str | os.PathLike | None = None,
) -> LoadedTask:
    """The task's train and eval examples, every row checked (a bad one raises `DataFormatError` naming file, line
    and field), and its spec with the label type settled."""
    spec = resolve_spec(task, dataset_name, text_columns, label_column, metric)
    train_rows, eval_rows, source = _raw_splits(spec, dataset_name, dataset_config, train_split, eval_split, data_dir)
    spec, names = _type_labels(spec, train_rows, eval_rows)
    train = [_example(row, spec, names) for row in train_rows]
    held_out = [_example(row, spec, names) for row in eval_rows]
    return LoadedTask(spec, train, held_out, source)


def tokenized_dataset(examples: list[TextExample], tokenizer, max_length: int, spec: TaskSpec):
    """A `datasets.Dataset` of input_ids / attention_mask (/ token_type_ids) / labels (float for regression)."""
    from datasets import Dataset

    columns = [[example.texts[i] for example in examples] for i in range(len(spec.text_columns))]
    truncation = spec.truncation if len(columns) == 2 else True
    encoded = tokenizer(*columns, truncation=truncation, max_length=max_length)
    labels = [float(e.label) if spec.regression else int(e.label) for e in examples]
    return Dataset.from_dict({**encoded, "labels": labels})
