"""Quality of WeightLoRA against LoRA and random selection: SFT of SmolLM2-135M-Instruct on GSM8K, side by side.

    python benchmarks/quality.py --sweep                  # the CPU run the README reports (~100 min)
    python benchmarks/quality.py --max_steps 500 --seeds 0 1 2 --em_limit 250   # on a GPU

Every run is the flagship recipe (`wlora_trl.recipes.sft`) with identical data order (per seed), steps, batch and
learning rate; only the adapter method differs:
  lora             plain LoRA, rank r, on all n projections
  weightlora       WeightLoRA, K = n/2, rank r
  weightlora_plus  WeightLoRA+, K = n/2, rank 2r (LoRA's budget)
  random           K = n/2 random adapters kept after T steps, rank r (the paper's RLoRA ablation)
Reported per method (mean and spread over seeds): held-out loss on the answers of the first GSM8K test questions,
GSM8K exact match through lm-evaluation-harness (`wlora-trl eval`, 5-shot, --em_limit questions), trainable
parameters after training, and the Jaccard similarity of the kept sets across seeds (the paper's Figure 5).
With --sweep, K and T are swept on the first seed (the paper's Figure 4).

Results: benchmarks/results/quality.json, quality.md (the README's tables) and quality.png. Adapters go to
--work_dir (not committed); a run whose adapter and summary are already there with the same flags is reused, so an
interrupted benchmark picks up where it stopped.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

METHODS = {
    "lora": ["--method", "lora"],
    "weightlora": ["--method", "weightlora"],
    "weightlora_plus": ["--method", "weightlora", "--plus", "true"],
    "random": ["--method", "random"],
}


def train(name: str, method_flags: list[str], seed: int, args, extra: list[str] = ()) -> dict:
    """One SFT run through the recipe; returns its summary plus the kept modules."""
    from wlora_trl.recipes.sft import main as sft_main
    from wlora_trl.recipes.sft import make_parser
    from wlora_trl.state import SELECTION_FILE, read_selection

    output_dir = Path(args.work_dir) / f"{name}_seed{seed}"
    argv = [
        "--output_dir",
        str(output_dir),
        "--seed",
        str(seed),
        "--data_seed",
        str(seed),
        "--max_steps",
        str(args.max_steps),
        "--per_device_train_batch_size",
        str(args.batch_size),
        "--learning_rate",
        str(args.learning_rate),
        "--max_length",
        str(args.max_length),
        "--max_train_samples",
        str(args.train_samples),
        "--lora_r",
        str(args.r),
        "--lora_alpha",
        str(2 * args.r),
        "--selection_steps",
        str(args.selection_steps),
        "--heldout_loss_samples",
        str(args.heldout_samples),
        "--exact_match_samples",
        "0",
        "--eval_before",
        "false",
        "--save_strategy",
        "no",
        "--report_to",
        "none",
        "--logging_steps",
        "5",
        "--disable_tqdm",
        "true",
        *method_flags,
        *extra,
    ]
    record = output_dir / "quality_run.json"
    earlier = json.loads(record.read_text()) if record.exists() else None
    if earlier and earlier["argv"] == argv:
        return earlier["summary"]  # finished in an earlier, interrupted benchmark run
    script_args, training_args, model_args = make_parser().parse_args_and_config(args=argv)
    start = time.perf_counter()
    summary = sft_main(script_args, training_args, model_args)
    summary["seconds"] = time.perf_counter() - start
    summary["kept"] = (
        sorted(read_selection(output_dir).kept_modules) if (output_dir / SELECTION_FILE).exists() else None
    )
    summary["trainable_parameters"] = trainable_parameters(output_dir)
    summary["adapter_dir"] = str(output_dir)
    record.write_text(json.dumps({"argv": argv, "summary": summary}, indent=1, default=str))
    return summary


def trainable_parameters(adapter_dir: Path) -> int:
    """Parameters in the saved adapter: what trains after the switch."""
    import math

    from safetensors import safe_open

    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())


def exact_match(adapter_dirs: list[str], args) -> dict[str, float]:
    """GSM8K exact match of each adapter through `wlora-trl eval` (lm-eval's own prompt and metric).

    Keyed by resolved adapter path ("base" for the base model). An evaluation of the same adapters at the same limit
    already in --work_dir is reused (it is the slowest part on a CPU).
    """
    from wlora_trl.cli import main as cli_main

    out = Path(args.work_dir) / "lm_eval"
    wanted = {str(Path(d).resolve()) for d in adapter_dirs} | {"base"}
    if (out / "results.json").exists():
        earlier = json.loads((out / "results.json").read_text())
        scores = read_exact_match(earlier)
        if earlier["settings"]["limit"] == args.em_limit and set(scores) == wanted:
            return scores
    cli_main(
        [
            "eval",
            "--tasks",
            "gsm8k",
            "--limit",
            str(args.em_limit),
            "--batch_size",
            "8",
            "--output_dir",
            str(out),
            "--adapter",
            *adapter_dirs,
        ]
    )
    return read_exact_match(json.loads((out / "results.json").read_text()))


def read_exact_match(results: dict) -> dict[str, float]:
    """{resolved adapter folder (or "base"): strict-match exact match} from the results.json `wlora-trl eval` writes."""
    return {
        str(Path(model["adapter"]).resolve()) if model["adapter"] else "base": results["results"][model["label"]][
            "gsm8k"
        ]["exact_match (strict-match)"]["value"]
        for model in results["models"]
    }


def jaccard(sets: list[list[str]]) -> float | None:
    if not sets or any(s is None for s in sets) or len(sets) < 2:
        return None
    pairs = [len(set(a) & set(b)) / len(set(a) | set(b)) for a, b in itertools.combinations(sets, 2)]
    return statistics.mean(pairs)


def spread(values: list[float]) -> dict:
    return {
        "mean": statistics.mean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


def plot(summary: dict, sweeps: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 1 + len(sweeps)  # the methods' bars, then one panel per swept knob
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.6), squeeze=False)
    axes = list(axes[0])
    names = list(summary)
    axes[0].bar(
        names,
        [summary[n]["heldout_loss"]["mean"] for n in names],
        yerr=[summary[n]["heldout_loss"]["std"] for n in names],
        capsize=4,
        color="#4c72b0",
    )
    low = min(summary[n]["heldout_loss"]["mean"] - summary[n]["heldout_loss"]["std"] for n in names)
    high = max(summary[n]["heldout_loss"]["mean"] + summary[n]["heldout_loss"]["std"] for n in names)
    axes[0].set_ylim(low - 0.05 * (high - low + 1e-3), high + 0.05 * (high - low + 1e-3))
    axes[0].set_ylabel("held-out loss (GSM8K test answers)")
    axes[0].set_title("mean ± std over seeds")
    axes[0].tick_params(axis="x", rotation=20)
    for ax, (knob, points) in zip(axes[1:], sweeps.items()):
        xs = sorted(points, key=float)
        ax.plot([float(x) for x in xs], [points[x]["heldout_loss"] for x in xs], "o-")
        ax.set_xlabel(knob)
        ax.set_ylabel("held-out loss")
        ax.set_title(f"WeightLoRA, sweep of {knob} (seed 0)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(result: dict) -> str:
    """The README's tables: methods side by side (mean ± std over seeds), then the K and T sweeps."""
    summary, settings = result["summary"], result["settings"]
    methods = [name for name in summary if name in METHODS]
    lora_loss = summary["lora"]["heldout_loss"]["mean"] if "lora" in summary else None
    em_header = f"GSM8K exact match ({settings['em_limit']} q, 5-shot)" if settings["em_limit"] else None
    header = [
        "method",
        f"held-out loss ({settings['heldout_samples']} answers)",
        "vs LoRA",
        em_header,
        "trainable params (first seed)",
        "kept-set Jaccard across seeds",
    ]
    header = [h for h in header if h]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
    for name in methods:
        s = summary[name]
        loss = s["heldout_loss"]
        cells = [
            name,
            f"{loss['mean']:.4f} ± {loss['std']:.4f}",
            f"{loss['mean'] - lora_loss:+.4f}" if lora_loss is not None else "-",
        ]
        if em_header:
            cells.append(f"{s['exact_match']['mean']:.3f} ± {s['exact_match']['std']:.3f}")
        jac = s["kept_jaccard_across_seeds"]
        cells += [f"{s['trainable_parameters']:,}", f"{jac:.2f}" if jac is not None else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    for knob, points in result["sweeps"].items():
        lines += [
            "",
            f"| WeightLoRA, {knob} | held-out loss (seed {settings['seeds'][0]}) | kept |",
            "|---:|---:|---:|",
        ]
        for value in sorted(points, key=float):
            kept = points[value]["kept"]
            lines.append(f"| {value} | {points[value]['heldout_loss']:.4f} | {len(kept) if kept else '-'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--max_steps", type=int, default=50)
    parser.add_argument("--selection_steps", default="5", help="T (int steps or fraction of max_steps)")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--max_length", type=int, default=320)
    parser.add_argument("--learning_rate", type=float, default=5e-4)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument(
        "--train_samples",
        type=int,
        default=2000,
        help="train on the first N GSM8K train rows, shuffled per seed (the same rows for every method)",
    )
    parser.add_argument("--heldout_samples", type=int, default=48)
    parser.add_argument("--em_limit", type=int, default=8, help="GSM8K questions for exact match (0: skip)")
    parser.add_argument("--sweep", action="store_true", help="also sweep K and T on the first seed")
    parser.add_argument("--sweep_k", nargs="*", default=["0.25", "0.75"], help="K values of the sweep (besides 0.5)")
    parser.add_argument(
        "--sweep_T", nargs="*", default=["2", "10"], help="T values of the sweep (besides --selection_steps)"
    )
    parser.add_argument("--work_dir", default="outputs/quality")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "quality.json"))
    args = parser.parse_args()
    if args.sweep and "weightlora" not in args.methods:
        parser.error("--sweep varies WeightLoRA's K and T around its main run: keep weightlora in --methods.")

    started = time.perf_counter()
    runs = {name: [train(name, METHODS[name], seed, args) for seed in args.seeds] for name in args.methods}
    sweeps = {}
    if args.sweep:
        seed = args.seeds[0]
        if args.sweep_k:
            sweeps["k"] = {
                k: train(f"weightlora_k{k}", METHODS["weightlora"], seed, args, ["--k", k]) for k in args.sweep_k
            }
            sweeps["k"]["0.5"] = runs["weightlora"][0]
        if args.sweep_T:
            sweeps["T"] = {
                t: train(f"weightlora_T{t}", METHODS["weightlora"], seed, args, ["--selection_steps", t])
                for t in args.sweep_T
            }
            sweeps["T"][args.selection_steps] = runs["weightlora"][0]

    scores = {}
    if args.em_limit:
        dirs = [run["adapter_dir"] for name in args.methods for run in runs[name]]
        scores = exact_match(dirs, args)

    summary = {}
    for name in args.methods:
        summary[name] = {
            "heldout_loss": spread([run["after"]["heldout_loss"] for run in runs[name]]),
            "trainable_parameters": runs[name][0]["trainable_parameters"],
            "kept_jaccard_across_seeds": jaccard([run["kept"] for run in runs[name]]) if name != "lora" else None,
            "train_seconds": spread([run["timings_s"]["train"] for run in runs[name]]),
        }
        if scores:
            summary[name]["exact_match"] = spread(
                [scores[str(Path(run["adapter_dir"]).resolve())] for run in runs[name]]
            )
    if scores:
        summary["base_exact_match"] = scores.get("base")
    sweep_summary = {
        knob: {
            value: {"heldout_loss": run["after"]["heldout_loss"], "kept": run["kept"]} for value, run in points.items()
        }
        for knob, points in sweeps.items()
    }

    import peft
    import torch
    import transformers
    import trl

    result = {
        "command": " ".join(["python", *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "cpus": __import__("os").cpu_count(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        },
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "trl": trl.__version__,
        },
        "settings": vars(args),
        "summary": summary,
        "sweeps": sweep_summary,
        "runs": {
            name: [
                {k: run[k] for k in ("after", "kept", "trainable_parameters", "train_loss", "timings_s")}
                for run in runs[name]
            ]
            for name in args.methods
        },
        "wall_seconds": time.perf_counter() - started,
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    plot({k: v for k, v in summary.items() if k != "base_exact_match"}, sweep_summary, output.with_suffix(".png"))
    output.with_suffix(".md").write_text(markdown(result))

    print(f"\n{'method':<17}{'held-out loss':>22}{'exact match':>20}{'trainable':>12}{'kept Jaccard':>14}")
    for name in args.methods:
        s = summary[name]
        em = f"{s['exact_match']['mean']:.3f} ± {s['exact_match']['std']:.3f}" if "exact_match" in s else "-"
        jac = f"{s['kept_jaccard_across_seeds']:.2f}" if s["kept_jaccard_across_seeds"] is not None else "-"
        print(
            f"{name:<17}{s['heldout_loss']['mean']:>12.4f} ± {s['heldout_loss']['std']:.4f}{em:>20}"
            f"{s['trainable_parameters']:>12,}{jac:>14}"
        )
    print(f"\nwrote {output} and its .png and .md ({result['wall_seconds'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
