"""`selection.json`: the record of what WeightLoRA selected, next to every saved adapter and checkpoint.

It is the run's transparency report (n, K, T, every adapter's module, final omega, kept or not, rank after the
switch) and also the state a checkpoint needs to resume: omega's fp32 values survive the JSON round trip exactly.
`plot_selection_heatmap` draws it as a layers x projections heatmap (the paper's Figure 2) from the dict alone.
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


def kept_by_projection(report: dict) -> str:
    """'q_proj 14/30, k_proj 9/30, ...': the kept count per projection type, in model order."""
    grid = selection_grid(report)
    parts = []
    for column, label in enumerate(grid["labels"]):
        cells = [row[column] for row in grid["kept"] if row[column] is not None]
        parts.append(f"{label} {sum(cells)}/{len(cells)}")
    return ", ".join(parts)


def switch_summary(report: dict) -> str:
    """One line for the console: 'kept 105 of 210 adapters (rank 8); per projection: q_proj 10/30, ...'."""
    ranks = sorted({a["rank"] for a in report["adapters"] if a["kept"]})
    kept = sum(a["kept"] for a in report["adapters"])
    rank = ", ".join(map(str, ranks))
    return f"kept {kept} of {report['n']} adapters (rank {rank}); per projection: {kept_by_projection(report)}"


# --- the selection heatmap (the paper's Figure 2) ---------------------------------------------------------------

MATPLOTLIB_INSTALL = "pip install matplotlib  (or: pip install 'wlora-trl[examples]')"


def parse_module_name(name: str) -> tuple[int | None, str]:
    """(layer index, projection) of an adapted module's name, split at its first all-digit component.

    'model.layers.12.self_attn.q_proj' -> (12, 'self_attn.q_proj');
    'bert.encoder.layer.3.attention.self.query' -> (3, 'attention.self.query');
    a name without a numeric component (e.g. 'bert.pooler.dense') -> (None, the whole name).
    """
    parts = name.split(".")
    for position, part in enumerate(parts):
        if part.isdigit() and position + 1 < len(parts):
            return int(part), ".".join(parts[position + 1 :])
    return None, name


def _column_labels(projections: list[str]) -> list[str]:
    # 'q_proj' reads better than 'self_attn.q_proj', but BERT has three different '*.dense': keep the full
    # suffix whenever the last component alone would be ambiguous.
    short = [projection.rsplit(".", 1)[-1] for projection in projections]
    return short if len(set(short)) == len(short) else projections


def selection_grid(report: dict) -> dict:
    """The `selection.json` report laid out as a layers x projections grid (what the heatmap draws).

    Returns {"layers": row labels, "projections": column keys, "labels": column labels, "omega": rows of
    floats (None where a layer has no such module or omega is unknown), "kept": rows of True/False/None}.
    Modules without a layer index get one row each, labelled by their name, after the layers.
    """
    layer_ids: list[int] = []
    projections: list[str] = []
    cells: dict[tuple, dict] = {}
    extra_rows: list[str] = []
    for adapter in report["adapters"]:
        layer, projection = parse_module_name(adapter["module"])
        if layer is None:
            row, projection = adapter["module"], "(outside the layers)"
            extra_rows.append(row)
        else:
            row = layer
            if layer not in layer_ids:
                layer_ids.append(layer)
        if projection not in projections:
            projections.append(projection)
        cells[(row, projection)] = adapter
    rows = sorted(layer_ids) + extra_rows
    omega = [[cells[(r, p)]["omega"] if (r, p) in cells else None for p in projections] for r in rows]
    kept = [[cells[(r, p)]["kept"] if (r, p) in cells else None for p in projections] for r in rows]
    return {
        "layers": [str(r) for r in rows],
        "projections": projections,
        "labels": _column_labels(projections),
        "omega": omega,
        "kept": kept,
    }


def plot_selection_heatmap(report: dict | str | os.PathLike, path: str | os.PathLike, title: str | None = None) -> str:
    """Draw the selection of a `selection.json` report as a heatmap PNG and return its path.

    `report` is the report dict, a `selection.json` path, or the folder holding it (a saved adapter, a checkpoint).

    Rows are layers, columns projection types (in model order), the colour is each adapter's final omega (scaled
    to the range of the nonzero values, white = 0 = dropped, grey = no adapter there) and kept adapters are
    outlined. With random selection (no omega) the colour is simply kept (green) / dropped (white). Column labels carry the kept count per projection type. Works from any report dict
    (`WeightLoraModel.report()` or `read_selection(dir)`), with or without a trainer, and uses matplotlib's Agg
    canvas directly, so it never touches the pyplot state or backend of the caller.
    """
    try:
        from matplotlib import colormaps
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Rectangle
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(f"Plotting the selection heatmap needs matplotlib: {MATPLOTLIB_INSTALL}") from err
    import numpy as np

    if not isinstance(report, dict):
        location = os.fspath(report)
        if os.path.isdir(location):
            report = read_selection(location)
        else:
            with open(location) as f:
                report = json.load(f)
    grid = selection_grid(report)
    n_rows, n_cols = len(grid["layers"]), len(grid["projections"])
    has_omega = any(value is not None for row in grid["omega"] for value in row)
    missing = np.array([[value is None for value in row] for row in grid["kept"]])
    if has_omega:
        omega = np.array([[np.nan if v is None else v for v in row] for row in grid["omega"]], dtype=float)
        # StoIHT leaves the dropped adapters at exactly 0 and the kept ones near 1 (omega starts at 1 and moves by
        # omega_lr * gradient for T steps, often by only 1e-3). A symmetric scale around 0 would paint every kept
        # cell the same colour, so the scale spans the nonzero values and the zeros are drawn white.
        nonzero = omega[np.isfinite(omega) & (omega != 0)]
        vmin, vmax = (float(nonzero.min()), float(nonzero.max())) if nonzero.size else (0.0, 1.0)
        if vmax - vmin < 1e-12:
            vmin, vmax = vmin - 0.5, vmax + 0.5
        values = np.where(omega == 0, np.nan, omega)
        cmap, colorbar_label = "viridis", "final ω (white: ω = 0, dropped)"
    else:
        values = np.array([[np.nan if not k else 1.0 for k in row] for row in grid["kept"]], dtype=float)
        cmap, vmin, vmax, colorbar_label = "Greens", 0.0, 1.5, None  # no omega: green = kept, no colour scale

    figure = Figure(figsize=(1.9 + 0.85 * n_cols, 2.2 + 0.24 * n_rows), dpi=150)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    colours = colormaps[cmap].with_extremes(bad="white")
    image = axes.imshow(np.ma.masked_invalid(values), cmap=colours, vmin=vmin, vmax=vmax, aspect="auto")
    for r, c in zip(*np.nonzero(missing)):  # grey: this layer has no adapter on that module
        axes.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, facecolor="#d9d9d9", edgecolor="none"))
    for r, row in enumerate(grid["kept"]):
        for c, kept in enumerate(row):
            if kept:
                axes.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=1.2))
    kept_per_column = [sum(bool(row[c]) for row in grid["kept"]) for c in range(n_cols)]
    present_per_column = [sum(row[c] is not None for row in grid["kept"]) for c in range(n_cols)]
    axes.set_xticks(range(n_cols))
    long_labels = max(len(label) for label in grid["labels"]) > 10
    axes.set_xticklabels(
        [f"{label}\n{k}/{p}" for label, k, p in zip(grid["labels"], kept_per_column, present_per_column)],
        fontsize=8,
        rotation=35 if long_labels else 0,
        ha="left" if long_labels else "center",
    )
    axes.xaxis.tick_top()
    axes.set_yticks(range(n_rows))
    axes.set_yticklabels(grid["layers"], fontsize=7)
    axes.set_ylabel("layer")
    kept_total = sum(kept_per_column)
    if title is None:
        state = f"kept {kept_total} of {report['n']}" if report.get("switched") else "before the switch"
        steps = f", T = {report['selection_steps']}" if report.get("selection_steps") is not None else ""
        title = f"{report.get('method', 'WeightLoRA')}: {state} adapters{steps} (outlined = kept)"
    axes.set_title(title, fontsize=9, pad=26)
    if has_omega:
        colorbar = figure.colorbar(image, ax=axes, fraction=0.08, pad=0.03)
        colorbar.set_label(colorbar_label, fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    return str(path)
