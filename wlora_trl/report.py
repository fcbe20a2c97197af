"""`selection.json`: the record of what WeightLoRA selected, next to every saved adapter and checkpoint.

It is the run's transparency report (n, K, T, every adapter's module, final omega, kept or not, rank after the
switch) and also the state a checkpoint needs to resume: omega's fp32 values survive the JSON round trip exactly.
"""

from __future__ import annotations

import json
import os

SELECTION_FILE = "selection.json"


def write_selection(directory: str | os.PathLike, report: dict) -> str:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, SELECTION_FILE)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    return path


def read_selection(directory: str | os.PathLike) -> dict:
    path = os.path.join(directory, SELECTION_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} is missing: this checkpoint was not written by a WeightLoRA trainer, so its selection state "
            "(omega, kept adapters) is unknown. Resume from a checkpoint of the same WeightLoRA run."
        )
    with open(path) as f:
        return json.load(f)
