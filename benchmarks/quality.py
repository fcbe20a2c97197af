"""Does WeightLoRA pay off? SFT of SmolLM2-135M-Instruct on GSM8K, every arm side by side, resumable from the repo.

    python benchmarks/quality.py                          # the study the README reports (6.5 h on 2 CPU cores, bf16)
    python benchmarks/quality.py --sweeps                 # the arms only
    python benchmarks/quality.py --em_limit 250           # also GSM8K exact match through lm-eval (slow on a CPU)

Every run is the flagship recipe (`wlora_trl.recipes.sft`) with the same data (the first --train_samples GSM8K train
rows, shuffled per seed), steps, batch, learning rate and seed; only the adapter method differs:
  lora                  plain LoRA, rank r, on all n projections (the baseline)
  weightlora            WeightLoRA, K = n/2, rank r, kept adapters re-initialised at the switch (the paper)
  weightlora_plus       WeightLoRA+, K = n/2, rank 2r (LoRA's rank budget), re-initialised
  random                K = n/2 random adapters kept after T steps, rank r (the paper's RLoRA ablation)
  weightlora_keep       WeightLoRA with reinit=False: the warm-up's adapters are kept, omega folded into B
  weightlora_plus_keep  WeightLoRA+ with reinit=False
  adalora, eva          stock PEFT's adaptive-rank peers at WeightLoRA's budget (AdaLoRA init_r = r pruned to an
                        average rank r/2; EVA rank r/2 per module, rho = 2: k*n*r ranks in all, as WeightLoRA keeps;
                        `wlora_trl.recipes.peers` explains the matching); a run takes 1.7-1.9x LoRA's time
                        (AdaLoRA allocates ranks every step, EVA runs its SVD pass over the data first).
Sweeps on the first seed (the knobs the paper does not fix for causal LMs): K in {0.25, 0.5, 0.75}, T for both
`weightlora` and `weightlora_keep`, and omega_lr in {10, 100, 1000}.

Reported: held-out loss on the answers of the first --heldout_samples GSM8K test questions (a fixed set), per arm
mean and spread over seeds, the paired per-seed difference to LoRA (same seed, same data order) with its spread,
trainable parameters after the switch, wall time per run, and the kept-set Jaccard similarity across seeds.

The driver engine (records, resume, STOP file, --no_train) is `benchmarks/study.py`, shared with `benchmarks/glue.py`.
Resumable across machines: every finished run writes a small record (argv, metrics, kept set, times; no weights) to
benchmarks/results/quality_runs/<run>.json, meant to be committed; a run whose record is there with the same
settings is not trained again. A study that does not finish in one sitting continues later from the repository.
Results: benchmarks/results/quality.json, quality.md (the README's tables) and quality.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.study import (  # noqa: E402  (after the path line: run as a script, the repo is not on sys.path)
    ARM_FLAGS,
    Study,
    add_study_arguments,
    finish_arguments,
    jaccard,
    result_header,
    spread,
    trainable_parameters,
    write_result,
)

ARMS = dict(ARM_FLAGS)  # every arm, the peers last
RUNS_DIR = REPO / "benchmarks" / "results" / "quality_runs"


def study_argv(args) -> list[str]:
    """The recipe flags every run shares (the output folder and the arm's own flags come on top)."""
    return [
        "--max_steps", str(args.max_steps), "--per_device_train_batch_size", str(args.batch_size),
        "--learning_rate", str(args.learning_rate), "--max_length", str(args.max_length),
        "--max_train_samples", str(args.train_samples), "--lora_r", str(args.r), "--lora_alpha", str(2 * args.r),
        "--selection_steps", str(args.selection_steps), "--heldout_loss_samples", str(args.heldout_samples),
        "--per_device_eval_batch_size", "8", "--exact_match_samples", "0", "--eval_before", "false",
        "--save_strategy", "no", "--report_to", "none", "--logging_steps", "25", "--disable_tqdm", "true",
    ]  # fmt: skip


def train_run(name: str, seed: int, argv: list[str], output_dir: Path) -> dict:
    """One SFT run through the recipe; the record's fields (`study.Study` adds name, seed, argv, date, machine)."""
    from wlora_trl.recipes.sft import main as sft_main
    from wlora_trl.recipes.sft import make_parser
    from wlora_trl.state import SELECTION_FILE, read_selection

    script_args, training_args, model_args = make_parser().parse_args_and_config(
        args=["--output_dir", str(output_dir), *argv]
    )
    start = time.perf_counter()
    summary = sft_main(script_args, training_args, model_args)
    selection = read_selection(output_dir) if (output_dir / SELECTION_FILE).exists() else None
    peer = summary.get("peer")  # AdaLoRA / EVA: the modules they end with a rank > 0
    fields = {
        "heldout_loss": summary["after"]["heldout_loss"],
        "heldout_token_accuracy": summary["after"].get("heldout_token_accuracy"),
        "train_loss": summary["train_loss"],
        "kept": sorted(selection.kept_modules) if selection else (peer["kept_modules"] if peer else None),
        "omega_steps": selection.omega_steps if selection else None,
        "trainable_parameters": trainable_parameters(output_dir),
        "seconds": {"run": time.perf_counter() - start, "train": summary["timings_s"]["train"]},
        "bf16": bool(training_args.bf16),
        "adapter_dir": str(output_dir),
    }
    if peer:
        fields["peer"] = peer
    return fields


def run_argv(seed: int, flags: list[str], args) -> list[str]:
    return [*study_argv(args), "--seed", str(seed), "--data_seed", str(seed), *flags]


def exact_match(adapter_dirs: list[str], args) -> dict[str, float]:
    """GSM8K exact match of each adapter through `wlora-trl eval` (lm-eval's own prompt and metric), by folder."""
    from wlora_trl.cli import main as cli_main

    out = Path(args.work_dir) / "lm_eval"
    cli_main(
        ["eval", "--tasks", "gsm8k", "--limit", str(args.em_limit), "--batch_size", "8", "--output_dir", str(out),
         "--adapter", *adapter_dirs]
    )  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    return {
        str(Path(model["adapter"]).resolve()) if model["adapter"] else "base": results["results"][model["label"]][
            "gsm8k"
        ]["exact_match (strict-match)"]["value"]
        for model in results["models"]
    }


def summarise(runs: dict[str, list[dict]]) -> dict:
    """Per arm: held-out loss, its paired per-seed difference to LoRA, parameters, wall time, kept-set Jaccard."""
    lora = {r["seed"]: r["heldout_loss"] for r in runs.get("lora", [])}
    summary = {}
    for name, arm_runs in runs.items():
        paired = [r["heldout_loss"] - lora[r["seed"]] for r in arm_runs if r["seed"] in lora]
        summary[name] = {
            "heldout_loss": spread([r["heldout_loss"] for r in arm_runs]),
            "vs_lora_paired": spread(paired) if name != "lora" and paired else None,
            "trainable_parameters": spread([r["trainable_parameters"] for r in arm_runs]),
            "run_minutes": spread([r["seconds"]["run"] / 60 for r in arm_runs]),
            "kept_jaccard_across_seeds": jaccard([r["kept"] for r in arm_runs]) if name != "lora" else None,
        }
    return summary


def sweep_order(labels: Iterable[str]) -> list[str]:
    """A sweep's point labels in value order: "K = 0.25", "K = 0.5", "K = 0.75", not the order they were run in.
    Labels group by what precedes the value ("weightlora, T", "weightlora_keep, T": the T sweep's two arms), the
    groups in order of first appearance, each sorted by its value read as a number (a value that is none follows the
    numbers, in place)."""
    labels = list(labels)
    groups: dict[str, int] = {}
    keys = {}
    for position, label in enumerate(labels):
        group, _, value = label.rpartition("=")
        group_index = groups.setdefault(group.strip(), len(groups))
        try:
            keys[label] = (group_index, 0, float(value), position)
        except ValueError:
            keys[label] = (group_index, 1, position, 0.0)
    return sorted(labels, key=keys.__getitem__)


def markdown(result: dict) -> str:
    """The README's tables: the arms (mean ± std over seeds, paired difference to LoRA), then each sweep."""
    summary, settings = result["summary"], result["settings"]
    lines = [
        f"| arm | held-out loss ({settings['heldout_samples']} answers) | minus LoRA, paired by seed | trainable params "
        "| minutes per run | kept-set Jaccard |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, s in summary.items():
        loss, paired, jac = s["heldout_loss"], s["vs_lora_paired"], s["kept_jaccard_across_seeds"]
        lines.append(
            f"| {name} | {loss['mean']:.4f} ± {loss['std']:.4f} | "
            + (f"{paired['mean']:+.4f} ± {paired['std']:.4f}" if paired else "-")
            + f" | {s['trainable_parameters']['mean']:,.0f} | {s['run_minutes']['mean']:.1f} | "
            + (f"{jac:.2f}" if jac is not None else "-")
            + " |"
        )
    for knob, points in result["sweeps"].items():
        lines += ["", f"| {knob} | held-out loss (seed {settings['seeds'][0]}) | minus LoRA (same seed) | kept |",
                  "|---|---:|---:|---:|"]  # fmt: skip
        for label in sweep_order(points):
            point = points[label]
            kept = point["kept"]
            lines.append(
                f"| {label} | {point['heldout_loss']:.4f} | {point['vs_lora']:+.4f} | {len(kept) if kept else '-'} |"
            )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, sweeps = result["summary"], result["sweeps"]
    arms = [name for name in summary if name != "lora"]
    # The arms' panel is twice as wide: it holds every arm's label, the sweeps three or four.
    fig, axes = plt.subplots(
        1, 1 + len(sweeps), figsize=(5.2 * (2 + len(sweeps)), 4.4), squeeze=False,
        gridspec_kw={"width_ratios": [2] + [1] * len(sweeps)},
    )  # fmt: skip
    axes = list(axes[0])
    means = [summary[n]["vs_lora_paired"]["mean"] for n in arms]
    errors = [summary[n]["vs_lora_paired"]["std"] for n in arms]
    axes[0].bar(arms, means, yerr=errors, capsize=4, color=["#c44e52" if m > 0 else "#55a868" for m in means])
    axes[0].axhline(0, color="black", linewidth=0.8)
    axes[0].set_ylabel("held-out loss minus LoRA's\n(paired by seed)")
    axes[0].set_title("below 0: better than LoRA")
    axes[0].tick_params(axis="x", rotation=30)
    plt.setp(axes[0].get_xticklabels(), ha="right", rotation_mode="anchor")
    for ax, (knob, points) in zip(axes[1:], sweeps.items()):
        labels = sweep_order(points)  # by value, whatever order the runs were recorded in
        ax.bar(labels, [points[p]["vs_lora"] for p in labels], color="#4c72b0")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_title(f"sweep of {knob} (seed {result['settings']['seeds'][0]})")
        ax.set_ylabel("minus LoRA (same seed)")
        ax.tick_params(axis="x", rotation=30)
        plt.setp(ax.get_xticklabels(), ha="right", rotation_mode="anchor")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sweep_points(args) -> dict[str, dict[str, tuple[str, list[str]]]]:
    """{knob: {label: (run name, flags)}} of the sweeps on the first seed; the arms' own runs fill the defaults."""
    points: dict[str, dict[str, tuple[str, list[str]]]] = {}
    if "k" in args.sweeps:
        points["k"] = {f"K = {k}": (f"weightlora_k{k}", [*ARMS["weightlora"], "--k", k]) for k in ("0.25", "0.75")}
        points["k"]["K = 0.5"] = ("weightlora", ARMS["weightlora"])
    if "T" in args.sweeps:
        points["T"] = {}
        for arm in ("weightlora", "weightlora_keep"):
            points["T"][f"{arm}, T = {args.selection_steps}"] = (arm, ARMS[arm])
            for t in args.sweep_T:
                points["T"][f"{arm}, T = {t}"] = (f"{arm}_T{t}", [*ARMS[arm], "--selection_steps", t])
    if "omega_lr" in args.sweeps:
        points["omega_lr"] = {
            f"omega_lr = {lr}": (f"weightlora_omegalr{lr}", [*ARMS["weightlora"], "--omega_lr", lr])
            for lr in ("10", "1000")
        }
        points["omega_lr"]["omega_lr = 100"] = ("weightlora", ARMS["weightlora"])
    return points


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """What every run of the study shares (its recipe flags, `study_argv`), also for `benchmarks/lr_grid.py`."""
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max_steps", type=int, default=300)
    parser.add_argument(
        "--selection_steps", default="5",
        help="T: 5 steps = 1.7%% of 300 (the paper's 0.5%% would be 1.5 steps, below the floor of 5 that the first "
        "gradient-free step and noise require)",
    )  # fmt: skip
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--max_length", type=int, default=320)
    parser.add_argument("--learning_rate", type=float, default=5e-4)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument(
        "--train_samples", type=int, default=2000, help="the first N GSM8K train rows, shuffled per seed"
    )
    parser.add_argument("--heldout_samples", type=int, default=200, help="the first N GSM8K test answers")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    add_run_arguments(parser)
    parser.add_argument("--sweep_T", nargs="*", default=["15"], help="other T values of the T sweep")
    parser.add_argument("--sweeps", nargs="*", default=["k", "T", "omega_lr"], choices=["k", "T", "omega_lr"])
    parser.add_argument("--em_limit", type=int, default=0, help="also GSM8K exact match on N questions (lm-eval)")
    add_study_arguments(parser, RUNS_DIR, "outputs/quality", REPO / "benchmarks" / "results" / "quality.json")
    args = finish_arguments(parser.parse_args())
    if "lora" not in args.arms:
        parser.error("every comparison is paired with LoRA: keep lora in --arms")

    study = Study(args, train_run)
    # Seed-major order: a sitting that stops early still leaves complete, paired seeds behind.
    runs: dict[str, list[dict]] = {name: [] for name in args.arms}
    for seed in args.seeds:
        for name in args.arms:
            record = study.run(name, seed, run_argv(seed, ARMS[name], args))
            if record:
                runs[name].append(record)
    seed = args.seeds[0]
    lora_seed0 = next((r for r in runs["lora"] if r["seed"] == seed), None)
    sweeps = {}
    for knob, points in sweep_points(args).items():
        sweeps[knob] = {}
        for label in sweep_order(points):
            name, flags = points[label]
            record = study.run(name, seed, run_argv(seed, flags, args))
            if record is None or lora_seed0 is None:
                continue
            sweeps[knob][label] = {
                "run": name, "heldout_loss": record["heldout_loss"],
                "vs_lora": record["heldout_loss"] - lora_seed0["heldout_loss"], "kept": record["kept"],
            }  # fmt: skip
    runs = {name: arm_runs for name, arm_runs in runs.items() if arm_runs}

    summary = summarise(runs)
    if args.no_train:
        # Progress of a study that spans sittings: the tables of what is recorded, nothing written.
        partial = {"summary": summary, "sweeps": sweeps, "settings": {"heldout_samples": args.heldout_samples,
                                                                      "seeds": args.seeds}}  # fmt: skip
        print(markdown(partial))
        print(study.progress())
        return
    if args.em_limit:
        scores = exact_match([r["adapter_dir"] for name in runs for r in runs[name]], args)
        for name in runs:
            summary[name]["exact_match"] = spread([scores[str(Path(r["adapter_dir"]).resolve())] for r in runs[name]])

    result = {
        **result_header(args),
        "summary": summary,
        "sweeps": sweeps,
        "runs": {
            name: [
                {k: r[k] for k in ("seed", "heldout_loss", "kept", "trainable_parameters", "seconds")}
                for r in runs[name]
            ]
            for name in runs
        },  # fmt: skip
        "total_run_minutes": sum(r["seconds"]["run"] for rs in runs.values() for r in rs) / 60
        + sum(
            json.loads(study.record_path(p["run"], seed).read_text())["seconds"]["run"]
            for points in sweeps.values()
            for p in points.values()
            if p["run"] not in ARMS
        )
        / 60,  # fmt: skip
        "wall_minutes_this_sitting": study.sitting_minutes(),
    }
    output = Path(args.output)
    write_result(output, result, markdown(result), plot)
    print("\n" + markdown(result))
    print(f"wrote {output} and its .md and .png; {result['total_run_minutes']:.0f} min of runs in all")


if __name__ == "__main__":
    main()
