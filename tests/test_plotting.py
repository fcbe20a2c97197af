"""The selection heatmap (plotting.plot_selection_heatmap) and its grid (state.selection_grid), from synthetic
selection reports."""

from __future__ import annotations

import random

import numpy as np
from PIL import Image

from wlora_trl.artifacts.plotting import plot_selection_heatmap
from wlora_trl.state import SelectionReport, parse_module_name, read_selection, selection_grid, write_selection

LLAMA_PROJECTIONS = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]
BERT_PROJECTIONS = [
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
]


def make_report(adapters: list[dict], **fields) -> SelectionReport:
    """A SelectionReport from adapter dicts, with run-level fields defaulted."""
    values = dict(
        method="WeightLoRA",
        adapter_name="default",
        n=len(adapters),
        k=sum(a["kept"] for a in adapters),
        selection_steps=5,
        switched=True,
        switch_step=6,
        step=30,
        omega_lr=0.1,
        reinit=True,
        adapters=adapters,
    )
    values.update(fields)
    return SelectionReport.from_dict(values)


def llama_report(num_layers: int = 30, k: int | None = None, seed: int = 0, switched: bool = True) -> SelectionReport:
    """A report shaped like WeightLoraModel.report() after StoIHT: K nonzero omegas, the rest exactly 0."""
    rng = random.Random(seed)
    names = [f"model.layers.{layer}.{p}" for layer in range(num_layers) for p in LLAMA_PROJECTIONS]
    n = len(names)
    k = n // 2 if k is None else k
    kept = set(rng.sample(range(n), k))
    adapters = [
        {
            "index": i,
            "module": name,
            "omega": (1.0 + rng.uniform(-0.4, 0.6)) if i in kept else 0.0,
            "kept": switched and i in kept,
            "rank": 16 if (i in kept or not switched) else 0,
        }
        for i, name in enumerate(names)
    ]
    return make_report(adapters, n=n, k=k, switched=switched, switch_step=6 if switched else None)


def test_parse_module_name():
    assert parse_module_name("model.layers.12.self_attn.q_proj") == (12, "self_attn.q_proj")
    assert parse_module_name("model.layers.0.mlp.down_proj") == (0, "mlp.down_proj")
    assert parse_module_name("bert.encoder.layer.3.attention.self.query") == (3, "attention.self.query")
    assert parse_module_name("bert.pooler.dense") == (None, "bert.pooler.dense")
    # A trailing number is not a layer with an empty projection.
    assert parse_module_name("heads.7") == (None, "heads.7")


def test_grid_layout_llama():
    report = llama_report(num_layers=4, k=10)
    grid = selection_grid(report)
    assert grid["layers"] == ["0", "1", "2", "3"]
    assert grid["projections"] == LLAMA_PROJECTIONS  # model order, not alphabetical
    assert grid["labels"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    # Every cell maps back to its adapter.
    for adapter in report.adapters:
        layer, projection = parse_module_name(adapter.module)
        column = grid["projections"].index(projection)
        assert grid["omega"][layer][column] == adapter.omega
        assert grid["kept"][layer][column] == adapter.kept
    assert sum(kept for row in grid["kept"] for kept in row) == 10


def test_grid_layout_bert_keeps_ambiguous_suffixes_and_extra_modules():
    names = [f"bert.encoder.layer.{layer}.{p}" for layer in range(2) for p in BERT_PROJECTIONS] + ["bert.pooler.dense"]
    adapters = [{"index": i, "module": m, "omega": None, "kept": i % 3 == 0, "rank": 8} for i, m in enumerate(names)]
    grid = selection_grid(make_report(adapters))
    # Three different "*.dense" modules: the short label would be ambiguous, so the full suffix is kept.
    assert grid["labels"][:6] == BERT_PROJECTIONS
    assert grid["layers"] == ["0", "1", "bert.pooler.dense"]
    pooler_row = grid["kept"][2]
    assert pooler_row[-1] is True and all(cell is None for cell in pooler_row[:-1])


def _png(path) -> np.ndarray:
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_heatmap_png_for_a_real_sized_report(tmp_path):
    report = llama_report()  # SmolLM2-135M: 30 layers x 7 projections
    path = plot_selection_heatmap(report, tmp_path / "heatmap.png")
    pixels = _png(path)
    height, width, _ = pixels.shape
    assert 600 <= width <= 3000 and 900 <= height <= 4000
    assert height > width  # 30 layer rows, 7 columns
    # Not blank: the diverging colour map gives many distinct colours for the kept cells.
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50


def test_heatmap_shows_the_selection(tmp_path):
    """Two reports that differ only in which adapters were kept draw different pictures."""
    first = plot_selection_heatmap(llama_report(num_layers=6, seed=1), tmp_path / "a.png")
    second = plot_selection_heatmap(llama_report(num_layers=6, seed=2), tmp_path / "b.png")
    a, b = _png(first), _png(second)
    assert a.shape == b.shape
    assert (a != b).any(axis=-1).mean() > 0.01


def test_heatmap_taller_with_more_layers(tmp_path):
    small = _png(plot_selection_heatmap(llama_report(num_layers=4), tmp_path / "small.png"))
    large = _png(plot_selection_heatmap(llama_report(num_layers=40), tmp_path / "large.png"))
    assert large.shape[0] > small.shape[0] + 500


def test_heatmap_from_selection_json_random_and_before_switch(tmp_path):
    """The trainer-independent path: a report read back from selection.json, without omega (random selection),
    and one saved before the switch (nothing kept yet)."""
    data = llama_report(num_layers=3).to_dict()
    for adapter in data["adapters"]:
        adapter["omega"] = None
    data["method"] = "random"
    write_selection(tmp_path, SelectionReport.from_dict(data))
    _png(plot_selection_heatmap(read_selection(tmp_path), tmp_path / "random.png"))

    before = llama_report(num_layers=3, switched=False)
    _png(plot_selection_heatmap(before, tmp_path / "before.png"))
    grid = selection_grid(before)
    assert not any(kept for row in grid["kept"] for kept in row)


def test_heatmap_does_not_touch_pyplot_state(tmp_path):
    import matplotlib

    backend = matplotlib.get_backend()
    plot_selection_heatmap(llama_report(num_layers=2), tmp_path / "x.png")
    assert matplotlib.get_backend() == backend
    import matplotlib.pyplot as plt

    assert plt.get_fignums() == []


def test_heatmap_single_layer(tmp_path):
    pixels = _png(plot_selection_heatmap(llama_report(num_layers=1, k=3), tmp_path / "one.png"))
    assert pixels.shape[1] > pixels.shape[0]  # one row of seven cells: wider than tall


def test_heatmap_takes_a_selection_json_path_or_its_folder(tmp_path):
    report = llama_report(num_layers=3)
    write_selection(tmp_path, report)
    from_report = _png(plot_selection_heatmap(report, tmp_path / "report.png"))
    from_file = _png(plot_selection_heatmap(tmp_path / "selection.json", tmp_path / "file.png"))
    from_folder = _png(plot_selection_heatmap(str(tmp_path), tmp_path / "folder.png"))
    assert np.array_equal(from_report, from_file) and np.array_equal(from_report, from_folder)
