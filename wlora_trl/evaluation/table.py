"""The side-by-side comparison: one row per (task, metric), one column per model, a delta column per adapter."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


def task_metrics(task_results: dict) -> dict[str, dict[str, float | None]]:
    """lm-eval's `{"acc,none": .5, "acc_stderr,none": .1}` -> `{"acc": {"value": .5, "stderr": .1}}`.

    Metric keys are `<metric>,<filter>`; a filter other than "none" (gsm8k's strict-match / flexible-extract) stays in
    the label, since the two filters score the same generations differently.
    """
    metrics = {}
    for key, value in task_results.items():
        if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
            continue
        metric, filter_name = key.split(",", 1)
        label = metric if filter_name == "none" else f"{metric} ({filter_name})"
        stderr = task_results.get(f"{metric}_stderr,{filter_name}")
        metrics[label] = {"value": float(value), "stderr": float(stderr) if isinstance(stderr, (int, float)) else None}
    return metrics


def build_rows(results: dict[str, dict], labels: list[str], tasks: list[str], n_samples: dict) -> list[dict]:
    """Rows of the table. `results[label][task][metric] = {"value", "stderr"}`; labels[0] is the base model."""
    base, adapters = labels[0], labels[1:]
    rows = []
    for task in tasks:
        for metric in results[base].get(task, {}):
            row = {"task": task, "metric": metric, "n": n_samples.get(task, {}).get("effective")}
            for label in labels:
                row[label] = results[label].get(task, {}).get(metric, {}).get("value")
            for label in adapters:
                both = row[label] is not None and row[base] is not None
                row[f"delta {label}"] = row[label] - row[base] if both else None
            rows.append(row)
    return rows


def columns(labels: list[str]) -> list[str]:
    return ["task", "metric", "n", labels[0]] + [c for label in labels[1:] for c in (label, f"delta {label}")]


def _cell(column: str, value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:+.4f}" if column.startswith("delta ") else f"{value:.4f}"
    return str(value)


def format_text(rows: list[dict], labels: list[str]) -> str:
    """Plain-text table for the terminal."""
    cols = columns(labels)
    cells = [[_cell(c, row.get(c)) for c in cols] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines.append("  ".join("-" * w for w in widths))
    for r in cells:
        lines.append("  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))))
    return "\n".join(lines)


def format_markdown(rows: list[dict], labels: list[str]) -> str:
    cols = columns(labels)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" if i < 2 else "---:" for i in range(len(cols))) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(c, row.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def write_outputs(output_dir: str | os.PathLike, payload: dict, markdown: str) -> tuple[Path, Path]:
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "results.json", out / "results.md"
    json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    md_path.write_text(markdown + "\n")
    return json_path, md_path
