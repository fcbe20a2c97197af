"""The selection heatmap (the paper's Figure 2): layers x projection types, colour = final omega, kept outlined.

Apart from the state file on purpose: it is the only module that needs matplotlib (`pip install 'wlora-trl[examples]'`).
"""

from __future__ import annotations

import os

from ..state import SelectionReport, read_selection, selection_grid

HEATMAP_FILE = "selection_heatmap.png"  # the name the recipes save it under, next to selection.json
MATPLOTLIB_INSTALL = "pip install matplotlib  (or: pip install 'wlora-trl[examples]')"


def plot_selection_heatmap(
    report: SelectionReport | str | os.PathLike, path: str | os.PathLike, title: str | None = None
) -> str:
    """Draw a selection as a heatmap PNG and return its path.

    `report` is a `SelectionReport` (`WeightLoraModel.report()`), a `selection.json` path, or the folder holding it
    (a saved adapter, a checkpoint).

    Rows are layers, columns projection types (in model order), the colour is each adapter's final omega (scaled
    to the range of the nonzero values, white = 0 = dropped, grey = no adapter there) and kept adapters are
    outlined. With random selection (no omega) the colour is simply kept (green) / dropped (white). Column labels
    carry the kept count per projection type. Works with or without a trainer, and uses matplotlib's Agg canvas
    directly, so it never touches the pyplot state or backend of the caller.
    """
    try:
        from matplotlib import colormaps
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Rectangle
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(f"Plotting the selection heatmap needs matplotlib: {MATPLOTLIB_INSTALL}") from err
    import numpy as np

    if not isinstance(report, SelectionReport):
        report = read_selection(report)
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
        state = f"kept {kept_total} of {report.n}" if report.switched else "before the switch"
        steps = f", T = {report.selection_steps}" if report.selection_steps is not None else ""
        title = f"{report.method}: {state} adapters{steps} (outlined = kept)"
    axes.set_title(title, fontsize=9, pad=26)
    if has_omega:
        colorbar = figure.colorbar(image, ax=axes, fraction=0.08, pad=0.03)
        colorbar.set_label(colorbar_label, fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    return str(path)
