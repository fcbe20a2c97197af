"""Each method at its own learning rate: the GSM8K study's learning-rate grid, resumable from the repository.

    python benchmarks/lr_grid.py                   # the grid on seed 0 for every tuned arm (about 20 min a run here)
    python benchmarks/lr_grid.py --no_train        # the rates recorded so far, each arm's choice, the runs to go
    python benchmarks/lr_grid.py --arms lora eva   # some arms only

The GSM8K study (`benchmarks/quality.py`) trains every arm at one learning rate, 5e-4, tuned for none of them; LoRA's
held-out loss moves by more across rates than any two methods differ at that one. This driver gives every arm its
own rate, by a rule fixed before the runs:

- The grid: 5e-4, 1e-3, 2e-3 and 4e-3 (a factor of 2 apart), every run otherwise the study's own (`quality.study_argv`:
  the same data, steps, batch, rank, T and held-out answers), on the study's first seed.
- The choice: the rate with the lowest held-out loss on that seed. While the best rate is the grid's highest (or
  lowest), the grid extends by a factor of 2 beyond it (a run that ends with a non-finite loss counts as the worst),
  so no choice sits on an edge.
- Arms that are a setting of another inherit their parent's rate rather than a grid of their own: `random`,
  `weightlora_keep` (from `weightlora`) and `weightlora_plus_keep` (from `weightlora_plus`).
- Then every arm's seeds are trained at its chosen rate (the study's next step), and the plain answers rewritten.

A run is one record under benchmarks/results/quality_runs/, as the study's: the study's own runs at its rate count as
this grid's points (`lora_seed0` is LoRA at 5e-4), the others are named `<arm>_lr<rate>` (`lora_lr2e-3_seed0`).
Results: benchmarks/results/quality_lr.{json,md,png} (held-out loss against the rate, per arm).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks import quality  # noqa: E402  (after the path line: run as a script, the repo is not on sys.path)
from benchmarks.study import Study, add_study_arguments, finish_arguments, result_header, write_result  # noqa: E402

GRID = (5e-4, 1e-3, 2e-3, 4e-3)
TUNED_ARMS = ("lora", "weightlora", "weightlora_plus", "eva")
# Arms that are a setting of another take its rate (the rule above).
INHERITS = {"random": "weightlora", "weightlora_keep": "weightlora", "weightlora_plus_keep": "weightlora_plus"}
MAX_EXTENSIONS = 3  # per direction: 2^3 beyond the grid's edge at most


def rate_label(rate: float) -> str:
    """5e-4 -> '5e-4', 0.001 -> '1e-3', 2.5e-4 -> '2.5e-4': short, exact to 3 digits, read back by float()."""
    mantissa, exponent = f"{rate:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def run_name(arm: str, rate: float, study_rate: float) -> str:
    """The record's name: the study's own run at the study's rate, else `<arm>_lr<rate>`."""
    return arm if math.isclose(rate, study_rate) else f"{arm}_lr{rate_label(rate)}"


def run_argv(arm: str, rate: float, seed: int, args) -> list[str]:
    """The study's argv for the arm and seed, with the learning rate replaced (the one flag that differs)."""
    argv = quality.run_argv(seed, quality.ARMS[arm], args)
    position = argv.index("--learning_rate") + 1
    return [*argv[:position], str(rate), *argv[position + 1 :]]


def finite_loss(record: dict) -> float:
    loss = record["heldout_loss"]
    return loss if math.isfinite(loss) else float("inf")


def choose(points: dict[float, dict]) -> tuple[float | None, str | None]:
    """The rate with the lowest held-out loss among the recorded `points` ({rate: record}) and, when it is the highest
    or lowest rate tried, the direction the grid must extend in ('up' / 'down'), else None."""
    if not points:
        return None, None
    best = min(points, key=lambda rate: (finite_loss(points[rate]), rate))
    if best == max(points):
        return best, "up"
    if best == min(points):
        return best, "down"
    return best, None


def tune_arm(study: Study, arm: str, seed: int, args) -> dict:
    """The arm's grid on `seed`, extended while its best rate is on an edge; {"points": {rate: loss}, "chosen": rate,
    "edge": direction or None (an edge left: a grid not finished in this sitting, or the extension limit)}."""
    rates = sorted(args.rates)
    points: dict[float, dict] = {}
    for rate in rates:
        record = study.run(run_name(arm, rate, args.learning_rate), seed, run_argv(arm, rate, seed, args))
        if record:
            points[rate] = record
    extensions = {"up": 0, "down": 0}
    while len(points) == len(rates):  # every rate recorded: extend past an edge
        best, edge = choose(points)
        if edge is None or extensions[edge] == MAX_EXTENSIONS:
            break
        extensions[edge] += 1
        rate = max(rates) * 2 if edge == "up" else min(rates) / 2
        rates.append(rate)
        rates.sort()
        record = study.run(run_name(arm, rate, args.learning_rate), seed, run_argv(arm, rate, seed, args))
        if record:
            points[rate] = record
    best, edge = choose(points)
    complete = len(points) == len(rates)
    return {
        "points": {rate_label(rate): points[rate]["heldout_loss"] for rate in sorted(points)},
        "runs": {rate_label(rate): run_name(arm, rate, args.learning_rate) for rate in sorted(points)},
        "chosen": rate_label(best) if best is not None and complete and edge is None else None,
        "best_so_far": rate_label(best) if best is not None else None,
        "to_go": [rate_label(rate) for rate in rates if rate not in points],
    }


def markdown(result: dict) -> str:
    grid = result["arms"]
    labels = sorted({label for arm in grid.values() for label in arm["points"]}, key=float)
    lines = [
        f"| arm | {' | '.join(labels)} | chosen rate |",
        "|---|" + "---:|" * len(labels) + "---|",
    ]
    for arm, tuned in grid.items():
        best = tuned["best_so_far"]
        cells = [
            (f"**{tuned['points'][label]:.4f}**" if label == best else f"{tuned['points'][label]:.4f}")
            if label in tuned["points"]
            else "-"
            for label in labels
        ]
        chosen = tuned["chosen"] or f"not yet (best so far {best}; to go: {', '.join(tuned['to_go']) or 'extend'})"
        lines.append(f"| {arm} | {' | '.join(cells)} | {chosen} |")
    inherited = ", ".join(f"{arm} takes {parent}'s" for arm, parent in INHERITS.items())
    lines += ["", f"Held-out loss on seed {result['settings']['seeds'][0]} (lower is better); {inherited}."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for arm, tuned in result["arms"].items():
        rates = sorted(tuned["points"], key=float)
        ax.plot([float(r) for r in rates], [tuned["points"][r] for r in rates], marker="o", label=arm)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("learning rate")
    ax.set_ylabel(f"held-out loss (seed {result['settings']['seeds'][0]})")
    ax.set_title("GSM8K, SmolLM2-135M-Instruct: each method against its learning rate")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", nargs="+", default=list(TUNED_ARMS), choices=list(TUNED_ARMS))
    parser.add_argument("--rates", type=float, nargs="+", default=list(GRID), help="the grid before any extension")
    quality.add_run_arguments(parser)
    add_study_arguments(
        parser, quality.RUNS_DIR, "outputs/quality", REPO / "benchmarks" / "results" / "quality_lr.json"
    )
    args = finish_arguments(parser.parse_args(argv))
    args.seeds = args.seeds[:1]  # the grid is on the first seed; the chosen rates' seeds are the study's next sitting
    study = Study(args, quality.train_run)
    result = {
        **result_header(args),
        "rule": "lowest held-out loss on the first seed; the grid extends by 2x past an edge that holds the best",
        "arms": {arm: tune_arm(study, arm, args.seeds[0], args) for arm in args.arms},
        "inherits": INHERITS,
        "wall_minutes_this_sitting": study.sitting_minutes(),
    }
    print("\n" + markdown(result))
    if args.no_train:
        print(study.progress())
        return result
    write_result(Path(args.output), result, markdown(result), plot)
    print(f"wrote {args.output} and its .md and .png")
    return result


if __name__ == "__main__":
    main()
