"""Reading a dataset split as a list of rows, from the local data folder or from the hub, with located errors."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

from ..._offline.data import DATA_DIR_ENV, data_file, local_data_or_hub

logger = logging.getLogger(__name__)
_ANNOUNCED: set[tuple[str, str]] = set()  # (dataset, where its rows come from), said once per process


class DataFormatError(ValueError):
    """A data row is not what the task expects; the message names the file (or hub split), the row and the field."""


@dataclass(frozen=True)
class Row:
    """One raw row and where it came from, for error messages: `source` is a file path or a hub split name,
    `number` the 1-based line (local file) or row index + 1 (hub), `hub` whether it came from the hub."""

    fields: dict
    source: str
    number: int
    hub: bool = False

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


def _where_it_goes(dataset: str, split: str, how_to_get_it: str) -> str:
    return (
        f"Expected layout: <data folder>/{dataset}/{split}.jsonl, one JSON object per line; the data folder is "
        f"--data_dir, else ${DATA_DIR_ENV}, else a shared/data folder in or above the current directory. "
        f"{how_to_get_it}"
    )


def local_rows(dataset: str, split: str, data_dir: str | os.PathLike | None, how_to_get_it: str) -> list[Row]:
    """Rows of `<data folder>/<dataset>/<split>.jsonl`. A missing folder or file raises `FileNotFoundError` whose
    message says where the file must go and `how_to_get_it` (the dataset's source, and the hub alternative)."""
    try:
        path = data_file(dataset, split, data_dir)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{err}\n{_where_it_goes(dataset, split, how_to_get_it)}") from err
    return read_jsonl(path)


def hub_rows(name: str, config: str | None, split: str) -> list[Row]:
    """Rows of a hub dataset split (needs network access or a populated `datasets` cache)."""
    from datasets import load_dataset

    dataset = load_dataset(name, config, split=split)
    source = f"{name}[{config}]/{split}" if config else f"{name}/{split}"
    return [Row(dict(fields), source, index + 1, hub=True) for index, fields in enumerate(dataset)]


def _announce(dataset: str, where: str) -> None:
    """One line per dataset and source (a recipe reads its splits one by one), on each machine's first process."""
    if (dataset, where) in _ANNOUNCED or os.environ.get("LOCAL_RANK", "0") != "0":
        return
    _ANNOUNCED.add((dataset, where))
    logger.info("%s: %s", dataset, where)


def local_or_hub_rows(
    dataset: str,
    split: str,
    data_dir: str | os.PathLike | None,
    hub: tuple[str, str | None],
    how_to_get_it: str,
) -> list[Row]:
    """Rows of `<data folder>/<dataset>/<split>.jsonl` when a local data folder is found, else of the hub's copy
    `hub` = (dataset id, config), with one log line saying which (`_offline.data.local_data_or_hub` decides, as for
    `wlora-trl eval`).

    Never a silent substitute: a `data_dir` (or `$WLORA_TRL_DATA_DIR`) that does not exist, a found folder without
    the file, and no folder while the hub is offline raise `FileNotFoundError`, a hub that cannot be read `OSError`,
    each saying where the file must go and `how_to_get_it`.
    """
    try:
        root = local_data_or_hub(data_dir)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{err}\n{_where_it_goes(dataset, split, how_to_get_it)}") from err
    if root is not None:
        _announce(dataset, f"read from the local data folder {root}")
        return local_rows(dataset, split, root, how_to_get_it)
    name, config = hub
    copy = f"{name} (config {config})" if config else name
    _announce(
        dataset,
        f"no local data folder found (--data_dir, ${DATA_DIR_ENV}, or shared/data in or above the working "
        f"directory), so it is read from the hub: {copy}",
    )
    try:
        return hub_rows(name, config, split)
    except Exception as err:  # the hub's errors vary (connection, missing dataset, cache); each says what failed
        raise OSError(
            f"no local data folder was found, and reading the {split} split of {copy} from the hub failed: "
            f"{type(err).__name__}: {err}\n{_where_it_goes(dataset, split, how_to_get_it)}"
        ) from err


def require_text(row: Row, field: str) -> str:
    """`row.fields[field]` as a non-empty string, or a `DataFormatError` that says which row lacks it."""
    if field not in row.fields:
        raise DataFormatError(f"{row.where()} has no {field!r} field (it has {sorted(row.fields)}).")
    value = row.fields[field]
    if not isinstance(value, str) or not value.strip():
        raise DataFormatError(f"{row.where()}: {field!r} must be a non-empty string, got {value!r}.")
    return value
