"""The engine of the quality studies (`benchmarks/quality.py`: GSM8K SFT; `benchmarks/glue.py`: GLUE on an encoder):
resumable runs from committed per-run records, a STOP file, `--no_train` progress, and the statistics and result
header both studies report.

A study is a sequence of runs, each a name, a seed and the recipe flags (argv) it runs with. `Study.run` trains a run
only when no record of it with the same argv exists under the runs folder; the family's `train` function does the
training and returns the record's fields, and the engine writes the record (`<runs dir>/<name>_seed<seed>.json`,
meant to be committed) with the run's name, seed and argv first and its date and machine last. A changed argv trains
the run again; `--no_train` trains nothing and reports which runs are still to go; the STOP file, checked between
runs only, ends a sitting without wasting a half-trained run. The drivers call the runs in seed-major order, so a
sitting that stops early leaves complete, paired seeds behind.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


class Study:
    """Runs of one study, resumable from their records. `train(name, seed, argv, output_dir)` trains one run and
    returns its record fields (without name, seed, argv, date, machine)."""

    def __init__(self, args: argparse.Namespace, train: Callable[[str, int, list[str], Path], dict]) -> None:
        self.runs_dir = Path(args.runs_dir)
        self.work_dir = Path(args.work_dir)
        self.stop_file = Path(args.stop_file)
        self.no_train = args.no_train
        self.train = train
        self.done: set[str] = set()
        self.missing: list[str] = []
        self.records: dict[tuple[str, int], dict] = {}  # every record this sitting has seen, by (name, seed)
        self.started = time.perf_counter()

    def record_path(self, name: str, seed: int) -> Path:
        return self.runs_dir / f"{name}_seed{seed}.json"

    def run(self, name: str, seed: int, argv: list[str]) -> dict | None:
        """The run's record: the committed one if its argv matches, else a fresh training (with --no_train: None),
        noted in `done` / `missing` for the progress line."""
        record = self._record(name, seed, argv)
        (self.done.add if record else self.missing.append)(f"{name}_seed{seed}")
        if record:
            self.records[(name, seed)] = record
        return record

    def _record(self, name: str, seed: int, argv: list[str]) -> dict | None:
        record_path = self.record_path(name, seed)
        if record_path.exists():
            record = json.loads(record_path.read_text())
            if record["argv"] == argv:
                return record
            if self.no_train:
                return None
            print(f"{record_path.name}: settings changed since it was recorded; training again")
        if self.no_train:
            return None
        if self.stop_file.exists():
            # Checked only between runs, so stopping never wastes a half-trained run (nor its wall time record).
            print(f"{self.stop_file} exists: stopping before {name}, seed {seed}; rerun to continue")
            raise SystemExit(0)
        output_dir = self.work_dir / f"{name}_seed{seed}"
        print(f"\n=== {name}, seed {seed}", flush=True)
        fields = self.train(name, seed, argv, output_dir)
        record = {"name": name, "seed": seed, "argv": argv, **fields}
        record["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        record["machine"] = machine()
        record_path.parent.mkdir(parents=True, exist_ok=True)
        record_path.write_text(json.dumps(record, indent=1) + "\n")
        return record

    def progress(self) -> str:
        """'N runs recorded; M to go: a_seed0, ...' (each run counted once)."""
        to_go = list(dict.fromkeys(self.missing))
        return f"{len(self.done)} runs recorded; {len(to_go)} to go: {', '.join(to_go)}"

    def sitting_minutes(self) -> float:
        return (time.perf_counter() - self.started) / 60


# The recipe flags each arm stands for, one definition for both drivers (the GSM8K SFT recipe and the GLUE one take
# the same --method / --plus / --reinit flags); a driver picks its arms from these, in this order.
ARM_FLAGS = {
    "lora": ["--method", "lora"],
    "weightlora": ["--method", "weightlora"],
    "weightlora_plus": ["--method", "weightlora", "--plus", "true"],
    "random": ["--method", "random"],
    "weightlora_keep": ["--method", "weightlora", "--reinit", "false"],
    "weightlora_plus_keep": ["--method", "weightlora", "--plus", "true", "--reinit", "false"],
    "adalora": ["--method", "adalora"],
    "eva": ["--method", "eva"],
}


def add_study_arguments(parser: argparse.ArgumentParser, runs_dir: Path, work_dir: str, output: Path) -> None:
    """The flags every study has: --no_train, --runs_dir, --work_dir, --stop_file, --output."""
    parser.add_argument(
        "--no_train", action="store_true",
        help="train nothing: print the tables of the runs recorded so far and the runs still to go",
    )  # fmt: skip
    parser.add_argument("--runs_dir", default=str(runs_dir), help="where finished runs' records are kept (commit them)")
    parser.add_argument("--work_dir", default=work_dir, help="adapters (not committed)")
    parser.add_argument(
        "--stop_file", default=None,
        help="create this file to stop the study after the run in progress (records so far are kept); "
        "default: STOP in --work_dir",
    )  # fmt: skip
    parser.add_argument("--output", default=str(output))


def finish_arguments(args: argparse.Namespace) -> argparse.Namespace:
    args.stop_file = args.stop_file or str(Path(args.work_dir) / "STOP")
    return args


def result_header(args: argparse.Namespace, not_settings: tuple[str, ...] = ("work_dir", "output", "runs_dir")) -> dict:
    """command, date, machine, library versions and settings (the study's flags) of a result JSON."""
    import peft
    import torch
    import transformers
    import trl

    return {
        "command": " ".join(["python", *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": {m.__name__: m.__version__ for m in (torch, transformers, peft, trl)},
        "settings": {k: v for k, v in vars(args).items() if k not in not_settings},
    }


def write_result(output: Path, result: dict, markdown: str, plot: Callable[[dict, Path], None]) -> None:
    """The result JSON, its Markdown tables (.md) and its plot (.png) side by side."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    output.with_suffix(".md").write_text(markdown)
    plot(result, output.with_suffix(".png"))


# --- what the records are measured with -------------------------------------------------------------------------


def trainable_parameters(adapter_dir: Path) -> int:
    """Parameters in the saved adapter: what trains after the switch (the head of a classifier included)."""
    from safetensors import safe_open

    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())


def machine() -> dict:
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }


# --- statistics ---------------------------------------------------------------------------------------------------


def jaccard(sets: list[list[str] | None]) -> float | None:
    """Mean pairwise Jaccard similarity of kept sets (across seeds); None with fewer than two or an unknown one."""
    if len(sets) < 2 or any(s is None for s in sets):
        return None
    return statistics.mean(len(set(a) & set(b)) / len(set(a) | set(b)) for a, b in itertools.combinations(sets, 2))


def spread(values: list[float]) -> dict:
    return {
        "mean": statistics.mean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }
