"""`wlora-trl report DIR` and `wlora-trl export --padded SRC DST`: what a run selected, and a copy for every engine.

Both read only the run's folder (`selection.json`, the adapter files), so they work on runs done elsewhere. Both
refuse a folder whose selection.json contradicts itself or its adapter weights (`state.check_selection`,
`state.check_adapter_weights`), with one line naming the file.
"""

from __future__ import annotations

import os
from collections import defaultdict

from ..state import SelectionReport, kept_by_projection, parse_module_name, read_selection

SUMMARY_FILE = "selection_report.md"


def summary_markdown(report: SelectionReport) -> str:
    """Kept per layer and per projection, omega's range, and the parameters kept against LoRA on all n."""
    kept = [a for a in report.adapters if a.kept]
    if not report.switched:
        return (
            f"# {report.method}: saved during the warm-up, at step {report.step} of T = {report.selection_steps}\n\n"
            f"Nothing is dropped yet: all {report.n} adapters train, gated by omega; K = {report.k} will be kept at "
            f"the switch. Nonzero omega now: {sum(a.omega not in (None, 0.0) for a in report.adapters)}.\n"
        )
    lines = [
        f"# {report.method}: kept {len(kept)} of {report.n} adapters",
        "",
        f"T = {report.selection_steps} (switch at step {report.switch_step}), omega_lr = {report.omega_lr}, "
        f"reinit = {report.reinit}, saved at step {report.step}.",
        "",
        f"Kept per projection: {kept_by_projection(report)}.",
    ]
    omegas = [a.omega for a in report.adapters if a.omega is not None]
    if omegas:
        kept_omega = [abs(a.omega) for a in kept if a.omega is not None]
        lines.append(
            f"Final omega: kept |omega| from {min(kept_omega):.4g} to {max(kept_omega):.4g}; "
            f"{sum(o == 0 for o in omegas)} of {len(omegas)} exactly 0 (thresholded out)."
            if kept_omega
            else "Final omega: none kept."
        )
    if all(a.in_features is not None for a in report.adapters):
        trainable = sum(a.rank * (a.in_features + a.out_features) for a in kept)
        rank = max((a.rank for a in kept), default=0)
        lora_rank = rank // 2 if report.method == "WeightLoRA+" else rank
        lora = sum(lora_rank * (a.in_features + a.out_features) for a in report.adapters)
        share = f" ({100 * trainable / lora:.0f}%)" if lora else ""
        lines.append(f"Parameters: {trainable:,} kept{share} against {lora:,} for LoRA rank {lora_rank} on all n.")

    def row(module: str) -> str:  # a layer index, or the module's own name outside the layers (lm_head, pooler)
        layer = parse_module_name(module)[0]
        return str(layer) if layer is not None else module

    by_layer: dict[str, list[str]] = defaultdict(list)
    for adapter in kept:
        by_layer[row(adapter.module)].append(parse_module_name(adapter.module)[1].rsplit(".", 1)[-1])
    lines += ["", "| layer | kept adapters |", "|---:|---|"]
    layers = sorted({row(a.module) for a in report.adapters}, key=lambda x: (len(x), x))
    for layer in layers:
        lines.append(f"| {layer} | {', '.join(by_layer.get(layer, [])) or '-'} |")
    return "\n".join(lines) + "\n"


def report_command(directory: str, output_dir: str | None) -> int:
    from ..artifacts.plotting import (  # matplotlib is imported when plotting: optional
        HEATMAP_FILE,
        plot_selection_heatmap,
    )

    report = read_selection(directory, check_weights=True)
    output_dir = output_dir or directory
    os.makedirs(output_dir, exist_ok=True)
    text = summary_markdown(report)
    with open(os.path.join(output_dir, SUMMARY_FILE), "w") as f:
        f.write(text)
    print(text)
    try:
        heatmap = plot_selection_heatmap(report, os.path.join(output_dir, HEATMAP_FILE))
    except ImportError:
        print(f"wrote {os.path.join(output_dir, SUMMARY_FILE)}; the heatmap needs matplotlib: pip install matplotlib")
        return 0
    print(f"wrote {os.path.join(output_dir, SUMMARY_FILE)} and {heatmap}")
    return 0


def export_command(source: str, target: str, padded: bool) -> int:
    # Every check on the arguments comes before the export's imports (PEFT, torch: seconds), so a mistake is
    # answered at once.
    if not padded:
        raise ValueError("the saved adapter is already the minimal export; pass --padded for a copy "
                         "with every (layer, projection) filled in")  # fmt: skip
    if os.path.exists(target) and not os.path.isdir(target):
        raise ValueError(f"the target {target} is a file; give a folder to write the adapter into (created if needed)")
    report = read_selection(source, check_weights=True)
    if not report.switched:
        raise ValueError(f"{source} was saved before the switch: every adapter is still there, nothing to pad.")
    from ..artifacts.export import pad_adapter

    pad_adapter(source, target, report=report)
    print(f"wrote the padded adapter to {target}")
    return 0
