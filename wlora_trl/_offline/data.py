"""Where the local copies of the datasets live, for machines without Hugging Face hub access.

The data folder holds one sub-folder per dataset in the hub datasets' field layouts (`gsm8k/train.jsonl`,
`boolq/validation.jsonl`, ...). It is found, in order: the explicit argument (a `--data_dir` flag), the
`WLORA_TRL_DATA_DIR` environment variable, then a `shared/data` folder in or above the current directory. When none
is found, callers read the hub's copy of the dataset instead (`local_data_or_hub`).
"""

from __future__ import annotations

import os
from pathlib import Path

from .hub import hub_offline

DATA_DIR_ENV = "WLORA_TRL_DATA_DIR"


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The local data folder, or None when there is none (then callers use the hub)."""
    if data_dir is not None:
        path = Path(data_dir).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(
                f"--data_dir {path} does not exist. Point it at the folder holding gsm8k/, boolq/, ..."
            )
        return path
    if os.environ.get(DATA_DIR_ENV):
        path = Path(os.environ[DATA_DIR_ENV]).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"{DATA_DIR_ENV}={path} does not exist. Point it at the folder holding gsm8k/, ...")
        return path
    for folder in (Path.cwd(), *Path.cwd().parents):
        candidate = folder / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return None


def local_data_or_hub(data_dir: str | os.PathLike | None = None, holding: str = "") -> Path | None:
    """Where the data comes from: the local data folder when one is found (`resolve_data_dir`), else None, meaning
    the hub's copy of the dataset.

    The hub never stands in silently for a folder that was asked for: a `--data_dir` or `$WLORA_TRL_DATA_DIR` that
    does not exist raises `FileNotFoundError`, and so does finding no folder while the hub is offline
    (`HF_HUB_OFFLINE` or `HF_DATASETS_OFFLINE` set); `holding` ends that message with what the folder must hold.
    """
    root = resolve_data_dir(data_dir)
    if root is None and hub_offline(include_datasets=True):
        raise FileNotFoundError(
            "no local data folder was found and the hub is offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE): pass "
            f"--data_dir DIR (or set {DATA_DIR_ENV}){' ' + holding if holding else ''}"
        )
    return root


def data_file(dataset: str, split: str, data_dir: str | os.PathLike | None = None) -> Path:
    """`<data_dir>/<dataset>/<split>.jsonl`, with a message that says where to put it when it is missing."""
    root = resolve_data_dir(data_dir)
    if root is None:
        raise FileNotFoundError(
            f"No local data folder found for {dataset}/{split}.jsonl: pass --data_dir, set {DATA_DIR_ENV}, or run "
            "from a directory with shared/data above it. Online, use the hub dataset instead."
        )
    path = root / dataset / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: put the {dataset} {split} split there as JSON lines.")
    return path
