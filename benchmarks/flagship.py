"""The flagship run's expected output and wall times, as the README's first command runs it.

    python benchmarks/flagship.py                    # accelerate launch and python, the defaults (~12 min on 2 cores)
    python benchmarks/flagship.py --max_steps 8      # the launchers side by side on 8 steps (~3 min)

Runs `examples/sft_gsm8k.py` on its defaults under `accelerate launch` (the README's command) and under plain
`python`, one after the other, and writes benchmarks/results/flagship.json (or flagship_steps<N>.json): each
launcher's before/after metrics, the switch (kept per projection), the recipe's own timings, the recipe's line on the threads it
used, and the machine. The docs' "expected output" table is checked against the committed file by a test, so it
says what this command measured. Never run it beside another torch job: both would slow down several times.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
LAUNCHERS = {
    "accelerate_launch": [sys.executable, "-m", "accelerate.commands.launch"],
    "python": [sys.executable],
}


def run(launcher: str, output_dir: Path, extra: list[str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    command = [*LAUNCHERS[launcher], str(REPO / "examples" / "sft_gsm8k.py"), "--output_dir", str(output_dir), *extra]
    start = time.perf_counter()
    completed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if completed.returncode != 0:
        sys.exit(f"{launcher} failed:\n{completed.stderr[-3000:]}")
    summary = json.loads((output_dir / "eval_results.json").read_text())
    selection = json.loads((output_dir / "selection.json").read_text())
    switch = next(
        (line for line in completed.stdout.splitlines() if line.startswith("WeightLoRA switch at step")), None
    )
    threads = next(
        (line for line in completed.stderr.splitlines() if "OMP_NUM_THREADS=1; each CPU process" in line), None
    )
    return {
        "command": " ".join(
            ["accelerate launch" if launcher == "accelerate_launch" else "python", "examples/sft_gsm8k.py", *extra]
        ),  # fmt: skip
        "process_wall_s": round(wall, 1),
        "timings_s": {key: round(value, 1) for key, value in summary["timings_s"].items()},
        "before": summary.get("before"),
        "after": summary["after"],
        "switch_line": switch,
        "threads_line": threads,  # the recipe's line when it raised accelerate's one thread to the machine's cores
        "kept": sum(a["kept"] for a in selection["adapters"]),
        "n": selection["n"],
        "train_loss": summary["train_loss"],
    }


LABELS = {"accelerate_launch": "`accelerate launch`", "python": "`python`"}


def _metric(phase: dict | None, key: str) -> str:
    if phase is None or phase.get(key) is None:
        return "-"
    value = phase[key]
    if isinstance(value, dict):  # exact match and answer format: {"value", "count", "total"}
        return f"{value['count']}/{value['total']}"
    return f"{value:.1%}" if key == "heldout_token_accuracy" else f"{value:.4f}"


def render(result: dict) -> str:
    """The quickstart's "expected output" table: each launcher's before/after metrics and its wall times."""
    runs = result["runs"]
    machine = result["machine"]
    precision = "bf16 autocast" if machine["native_bf16"] else "fp32 (no native bf16)"
    header = " | ".join(f"{LABELS[name]} before | after" for name in runs)
    lines = [
        f"Measured by `python benchmarks/flagship.py` on {result['date']}: {machine['cpus']} cores of "
        f"{machine['processor']}, {precision}.",
        "",
        f"| metric | {header} |",
        "|---|" + "---:|---:|" * len(runs),
    ]
    rows = [
        ("held-out loss (answer tokens)", "heldout_loss"),
        ("held-out next-token accuracy", "heldout_token_accuracy"),
        ("exact match (greedy)", "exact_match"),
        ("answers ending in '#### N'", "answer_format"),
    ]
    for label, key in rows:
        cells = " | ".join(f"{_metric(run['before'], key)} | {_metric(run['after'], key)}" for run in runs.values())
        lines.append(f"| {label} | {cells} |")
    lines += ["", "| seconds | " + " | ".join(LABELS[name] for name in runs) + " |", "|---|" + "---:|" * len(runs)]
    for label, key in (("setup", "setup"), ("evaluation before", "eval_before"), ("training", "train"),
                       ("evaluation after", "eval_after")):  # fmt: skip
        lines.append(f"| {label} | " + " | ".join(f"{run['timings_s'][key]:.0f}" for run in runs.values()) + " |")
    lines.append("| the whole process | " + " | ".join(f"{run['process_wall_s']:.0f}" for run in runs.values()) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max_steps", type=int, help="a shorter run (default: the recipe's own)")
    parser.add_argument("--launchers", default=",".join(LAUNCHERS), help="comma-separated, from %(default)s")
    args = parser.parse_args()
    extra = ["--max_steps", str(args.max_steps)] if args.max_steps else []
    runs = {}
    with tempfile.TemporaryDirectory() as scratch:
        for launcher in args.launchers.split(","):
            print(f"running the flagship under {launcher} ...", flush=True)
            runs[launcher] = run(launcher, Path(scratch) / launcher, extra)
            print(json.dumps({k: runs[launcher][k] for k in ("process_wall_s", "timings_s")}), flush=True)
    import torch

    from wlora_trl.recipes.common import cpu_has_native_bf16

    result = {
        "date": datetime.date.today().isoformat(),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            # the recipe's precision default follows it: bf16 autocast with native bf16, fp32 without
            "native_bf16": torch.cuda.is_available() or cpu_has_native_bf16(),
        },
        "max_steps": args.max_steps,
        "runs": runs,
    }
    if {"accelerate_launch", "python"} <= runs.keys():
        result["train_time_ratio_accelerate_over_python"] = round(
            runs["accelerate_launch"]["timings_s"]["train"] / runs["python"]["timings_s"]["train"], 3
        )
    name = f"flagship_steps{args.max_steps}.json" if args.max_steps else "flagship.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / name).with_suffix(".md").write_text(render(result))
    print(render(result))
    print(f"wrote {RESULTS / name} and its .md")


if __name__ == "__main__":
    main()
