"""The learning-rate grid's rule (benchmarks/lr_grid.py), on records made up for the purpose, and its progress on the
committed records (nothing trained)."""

from __future__ import annotations

import argparse
import math

import pytest

from benchmarks import lr_grid, quality


def _args(**overrides) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    quality.add_run_arguments(parser)
    args = parser.parse_args([])
    args.rates = list(lr_grid.GRID)
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


class _FakeStudy:
    """Study.run with a held-out loss per rate from `curve`: every run is 'recorded' (or none, `recorded=False`)."""

    def __init__(self, curve, recorded=True):
        self.curve, self.recorded, self.asked = curve, recorded, []

    def run(self, name, seed, argv):
        rate = float(argv[argv.index("--learning_rate") + 1])
        self.asked.append((name, rate))
        return {"heldout_loss": self.curve(rate)} if self.recorded else None


def test_rate_labels_names_and_argv():
    rates = (5e-4, 1e-3, 2e-3, 4e-3, 8e-3, 2.5e-4, 1.25e-4, 1.6e-2)
    labels = ["5e-4", "1e-3", "2e-3", "4e-3", "8e-3", "2.5e-4", "1.25e-4", "1.6e-2"]
    assert [lr_grid.rate_label(r) for r in rates] == labels
    assert [float(label) for label in labels] == list(rates)
    args = _args()
    assert lr_grid.run_name("lora", 5e-4, args.learning_rate) == "lora"  # the study's own run is the grid's point
    assert lr_grid.run_name("lora", 2e-3, args.learning_rate) == "lora_lr2e-3"
    study, grid = quality.run_argv(0, quality.ARMS["eva"], args), lr_grid.run_argv("eva", 2e-3, 0, args)
    changed = [i for i, (a, b) in enumerate(zip(study, grid)) if a != b]
    assert len(study) == len(grid) and [study[i - 1] for i in changed] == ["--learning_rate"]
    assert grid[changed[0]] == "0.002"


@pytest.mark.parametrize(
    "curve, chosen, extended",
    [
        (lambda r: (math.log2(r / 1e-3)) ** 2, "1e-3", []),  # interior best: no extension
        (lambda r: -r, None, [8e-3, 1.6e-2, 3.2e-2]),  # always better higher: extends up to the limit, no choice
        (lambda r: (math.log2(r / 8e-3)) ** 2, "8e-3", [8e-3, 1.6e-2]),  # best past the edge, found, then interior
        (lambda r: (math.log2(r / 2.5e-4)) ** 2, "2.5e-4", [2.5e-4, 1.25e-4]),
        (lambda r: float("nan") if r > 3e-3 else -r, "2e-3", []),  # a diverged run counts as the worst
    ],
    ids=["interior", "always_up", "extend_up", "extend_down", "diverged"],
)
def test_the_grid_extends_past_an_edge_that_holds_the_best(curve, chosen, extended):
    study = _FakeStudy(curve)
    tuned = lr_grid.tune_arm(study, "lora", 0, _args())
    asked = [rate for _, rate in study.asked]
    assert asked[:4] == list(lr_grid.GRID) and asked[4:] == pytest.approx(extended)
    assert tuned["chosen"] == chosen
    assert not tuned["to_go"]


def test_nothing_is_chosen_while_the_grid_is_incomplete():
    tuned = lr_grid.tune_arm(_FakeStudy(lambda r: r, recorded=False), "lora", 0, _args())
    assert tuned["chosen"] is None and tuned["to_go"] == ["5e-4", "1e-3", "2e-3", "4e-3"]


def test_progress_on_the_committed_records_trains_nothing(capsys):
    result = lr_grid.main(["--no_train"])
    lora = result["arms"]["lora"]
    assert lora["points"]["5e-4"] == pytest.approx(0.7882, abs=5e-5)  # the study's own lora_seed0 counts
    assert "runs recorded" in capsys.readouterr().out
