"""Reading a dataset split as a list of rows, from the local data folder or from the hub, with located errors."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from ..._offline.data import DATA_DIR_ENV, data_file


class DataFormatError(ValueError):
    """A data row is not what the task expects; the message names the file (or hub split), the row and the field."""


@dataclass(frozen=True)
class Row:
    """One raw row and where it came from, for error messages: `source` is a file path or a hub split name,
    `number` the 1-based line (local file) or row index + 1 (hub)."""

    fields: dict
    source: str
    number: int

    def where(self) -> str:
        unit = "line" if self.source.endswith(".jsonl") else "row"
        return f"{self.source} {unit} {self.number}"


def read_jsonl(path: str | os.PathLike) -> list[Row]:
    """Every non-blank line of a JSON-lines file as a `Row`; a line that is not a JSON object raises
    `DataFormatError` naming the line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                fields = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataFormatError(f"{path} line {number} is not valid JSON ({err.msg}): {line[:120]!r}") from err
            if not isinstance(fields, dict):
                raise DataFormatError(f"{path} line {number} is a JSON {type(fields).__name__}, not an object.")
            rows.append(Row(fields, str(path), number))
    if not rows:
        raise DataFormatError(f"{path} holds no rows.")
    return rows


def local_rows(dataset: str, split: str, data_dir: str | os.PathLike | None, how_to_get_it: str) -> list[Row]:
    """Rows of `<data folder>/<dataset>/<split>.jsonl`. A missing folder or file raises `FileNotFoundError` whose
    message says where the file must go and `how_to_get_it` (the dataset's source, and the hub alternative)."""
    try:
        path = data_file(dataset, split, data_dir)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"{err}\nExpected layout: <data folder>/{dataset}/{split}.jsonl, one JSON object per line; the data "
            f"folder is --data_dir, else ${DATA_DIR_ENV}, else a shared/data folder in or above the current "
            f"directory. {how_to_get_it}"
        ) from err
    return read_jsonl(path)


def hub_rows(name: str, config: str | None, split: str) -> list[Row]:
    """Rows of a hub dataset split (needs network access or a populated `datasets` cache)."""
    from datasets import load_dataset

    dataset = load_dataset(name, config, split=split)
    source = f"{name}[{config}]/{split}" if config else f"{name}/{split}"
    return [Row(dict(fields), source, index + 1) for index, fields in enumerate(dataset)]


def require_text(row: Row, field: str) -> str:
    """`row.fields[field]` as a non-empty string, or a `DataFormatError` that says which row lacks it."""
    if field not in row.fields:
        raise DataFormatError(f"{row.where()} has no {field!r} field (it has {sorted(row.fields)}).")
    value = row.fields[field]
    if not isinstance(value, str) or not value.strip():
        raise DataFormatError(f"{row.where()}: {field!r} must be a non-empty string, got {value!r}.")
    return value
