"""Whether the Hugging Face hub may be used: one reading of the offline switches, for every caller."""

from __future__ import annotations

import os

# The truthy spellings huggingface_hub and datasets accept.
OFFLINE_VALUES = {"1", "ON", "YES", "TRUE"}


def hub_offline(include_datasets: bool = False) -> bool:
    """HF_HUB_OFFLINE is set (or, with `include_datasets`, HF_DATASETS_OFFLINE, which only concerns data)."""
    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if include_datasets else ("HF_HUB_OFFLINE",)
    return any(os.environ.get(name, "").upper() in OFFLINE_VALUES for name in names)
