"""The selection heatmap in the experiment trackers at the switch (TensorBoard and W&B take images).

The scalars (kept per projection type, omega step counts) ride on the Trainer's next log line, which every
integration records; images have no such path, so this goes to the integrations' writers directly, through the
Trainer's own callbacks. Nothing happens without matplotlib or without those integrations.
"""

from __future__ import annotations

import os
import tempfile

from ..state import SelectionReport

IMAGE_TAG = "weight_lora/selection"


def log_heatmap_to_trackers(callbacks, report: SelectionReport, step: int) -> list[str]:
    """Render the heatmap once and hand it to every TensorBoard / W&B callback that is live; returns their names."""
    writers = [cb for cb in callbacks if getattr(cb, "tb_writer", None) is not None]
    wandb_callbacks = [cb for cb in callbacks if getattr(cb, "_initialized", False) and getattr(cb, "_wandb", None)]
    if not writers and not wandb_callbacks:
        return []
    try:
        from matplotlib.image import imread

        from .plotting import plot_selection_heatmap
    except ImportError:
        return []
    logged = []
    with tempfile.TemporaryDirectory() as folder:
        path = plot_selection_heatmap(report, os.path.join(folder, "selection.png"))
        image = imread(path)[..., :3]  # RGB, floats in [0, 1]
        for callback in writers:
            callback.tb_writer.add_image(IMAGE_TAG, image, step, dataformats="HWC")
            callback.tb_writer.flush()
            logged.append(type(callback).__name__)
        for callback in wandb_callbacks:
            callback._wandb.log({IMAGE_TAG: callback._wandb.Image(path)}, commit=False)
            logged.append(type(callback).__name__)
    return logged
