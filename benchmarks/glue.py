"""GLUE on an encoder: WeightLoRA, WeightLoRA+, random selection, AdaLoRA and EVA against LoRA, side by side.

    python benchmarks/glue.py                   # the whole study (about 7 h on 2 cores, fp32), resumable across sittings
    python benchmarks/glue.py --no_train        # the tables of what is recorded, and the runs still to go
    touch outputs/glue/STOP                     # end a sitting after the run in progress

Every run is the classification recipe (`wlora_trl.recipes.classify`, in a fresh process each, so its peak resident
memory is the run's own) on all-MiniLM-L6-v2, adapters on every linear layer of its 6 transformer layers (n = 36),
rank r = 8, alpha 2r, dropout 0.05, the head and BERT's pooler in `modules_to_save` (HEAD), AdamW with linear decay
after a 6% warm-up, fp32 on every machine (bf16 autocast only where a CPU has it natively would mix precisions across
sittings), the task's official metric on its full validation split. Per task the steps, batch and seeds are fixed
(TASK_PLANS); the arms differ only in how they spend the ranks:
  lora             plain LoRA on all n modules, n*r ranks (the baseline every difference is paired with)
  weightlora       WeightLoRA, K = n/2 adapters of rank r kept after T steps (the paper), n*r/2 ranks
  weightlora_plus  WeightLoRA+, K = n/2 at rank 2r: LoRA's n*r ranks
  random           K = n/2 random adapters kept after T steps (the paper's RLoRA)
  weightlora_keep  WeightLoRA with reinit=False (the warm-up's adapters kept, omega folded into B)
  adalora          stock PEFT AdaLoRA: init_r = r on every module, pruned to an average rank r/2: n*r/2 ranks
  eva              stock PEFT EVA: rank r/2 per module, redistributed by explained variance with rho = 2 (at most r
                   per module): n*r/2 ranks
How the budgets are matched: counted in ranks, the unit every method budgets in, the adaptive methods end with
WeightLoRA's k*n*r (k = 0.5) and may put at most r on a module, as WeightLoRA does; all keep LoRA's alpha/r
(`wlora_trl.recipes.peers` has the details). A rank costs in+out parameters, so equal ranks are not exactly equal
parameters: the tables report the saved adapter's parameters and the most each run trained at once.

Order of the study: (1) per task, one learning rate chosen on LoRA from --lr_grid on the first seed (the best score
on the validation split, which is also where every arm is scored, as the paper's grid search does; the same rate then
serves every arm, which if anything favours LoRA); LoRA's grid run at that rate is its first-seed run; (2) every arm,
seed-major (seed 0 of every task and arm, then seed 1, ...); the same seed gives every arm the same head
initialisation and the same data order; (3) on --sweep_task, ranks --sweep_ranks for lora, weightlora and
weightlora_plus on the first --sweep_seeds seeds (the paper's Table 2), rank 8 coming from (2).

Reported (benchmarks/results/glue.{json,md,png}; one record per run in benchmarks/results/glue_runs/<task>/, meant to
be committed): per task and arm the score's mean and std over seeds, the paired per-seed difference to LoRA with its
std, trainable parameters (saved adapter, head included) and the peak during training, minutes per run, peak
resident memory of the run's process (RSS), kept-set Jaccard across seeds; the overall table in the paper's layout (a
column per task, MRPC as accuracy/F1, and the average of GLUE scores, MRPC's being the mean of its pair) with the
paper's own differences to LoRA beside ours (DeBERTaV3-base there, MiniLM here: compare differences, not scores);
the rank sweep; which projections and layers each method spends its ranks on; and a plot of the paired differences.
The paper's differences: Table 2 at the same rank for WeightLoRA and WeightLoRA+ (all linear layers, K = n/2, as
here); Table 1 for AdaLoRA and EVA (self-attention only, at 1.5x LoRA's parameters there); Table 7's RLoRA at K = 10
of 36 for random selection, against Table 1's LoRA and, for "random minus weightlora", Table 1's WLoRA K = 10 (Table
7's own RTE entries for WLoRA are a typo, see the tables' file).

Cost and budget. Early measurements (bf16 autocast, 1 thread, a shared machine, 4 against 24 steps) fixed the arms'
relative costs: on RTE WeightLoRA took 0.85 of LoRA's training time (the switch drops half the adapters), AdaLoRA
1.1-1.15 (its regulariser and allocation every step), EVA the same as LoRA after its SVD initialisation (16-19 s on RTE
and SST-2). Fixed costs per run: 15-20 s to start Python and load the libraries and the model, tokenising (SST-2's 67k
rows 6-11 s, others 1-2 s), and the evaluation on the full validation split (4-9 s). Peak RSS is 1.5-4.6 GB per run
and grows with the steps and the sequence lengths (the allocator keeps what varying batch shapes asked for): compare
it between arms of a task, not across tasks.

The plan's cost, from the LoRA grid's records (fp32, 2 idle cores of this project's 2-core AMD EPYC,
OMP_NUM_THREADS=2, 2026-12-03): a run of SST-2 (300 x 32) takes 263-277 s, CoLA (600 x 32) 261-269 s, MRPC (150 x
32) 230-273 s, RTE (150 x 16) about 310 s. RTE is not compared (TASK_PLANS: all-MiniLM-L6-v2 stays at chance on it,
at 4x the steps too); its grid is reported (--grid_only_tasks). The study is 94 runs: the four tasks' 4-rate grids
(16), 7 arms x 3 seeds on SST-2, CoLA and MRPC less the grid's LoRA run at the chosen rate (60), and the sweep's 3
arms x 3 ranks x 2 seeds on SST-2 (18); at about 4.5 minutes a run, 7 hours (the grids 1.2 of them), over four or
five sittings of two hours (the GSM8K study took 4.2). `--no_train` shows what is left; `--seeds` / `--sweep_seeds`
shrink it. On a machine without native bf16 fp32 runs at the same speed (SST-2's 300 steps took 237 s on such an
EPYC on 2026-12-02).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
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

ARMS = {name: flags for name, flags in ARM_FLAGS.items() if name != "weightlora_plus_keep"}
SWEEP_ARMS = ("lora", "weightlora", "weightlora_plus")
RUNS_DIR = REPO / "benchmarks" / "results" / "glue_runs"


@dataclass(frozen=True)
class TaskPlan:
    steps: int
    batch_size: int
    seeds: int  # more where the dev set is small and the spread large (RTE 277 rows, MRPC 408)
    # Why the arms are not compared on the task (its LR grid still runs and is reported), when LoRA does not learn
    # it in the plan: differences between arms at chance would be noise.
    not_compared: str = ""


TASK_PLANS = {
    "sst2": TaskPlan(steps=300, batch_size=32, seeds=3),  # 0.14 epochs of 67k rows: MiniLM learns SST-2 fast
    # 2.2 epochs. CoLA is the slow learner: with the pooler frozen, LoRA ends at MCC 0.0 (the majority class, train
    # loss 0.61) at every rate from 2e-4 to 1e-2 in 300 steps (git history of glue_runs/cola/lr_grid); with the
    # pooler trained, 2e-3 gives 0.08 in 300 steps and 0.15 in 600.
    "cola": TaskPlan(steps=600, batch_size=32, seeds=3),
    "mrpc": TaskPlan(steps=150, batch_size=32, seeds=3),  # 1.3 epochs
    # 1.0 epoch; long pairs, the dearest step. LoRA's grid (5e-4 ... 5e-3) ends at chance: accuracy 0.51-0.54, train
    # loss 0.70 = ln 2 (glue_runs/rte/lr_grid). Four times the steps do not help either (2026-12-03, 600 x 16 at 1e-3,
    # length-grouped batches, evaluated every epoch: 0.549, 0.527, 0.524, 0.516, while the train loss fell to 0.53
    # and the validation loss rose from 0.69 to 0.83): MiniLM-L6 memorises RTE's 2.5k pairs through its [CLS] head
    # instead of learning the entailment, so the arms are not compared on RTE.
    "rte": TaskPlan(
        steps=150,
        batch_size=16,
        seeds=3,
        not_compared="LoRA stays at chance at every rate (accuracy 0.51-0.54, train loss ln 2) and at 4x the steps "
        "(0.52, while the validation loss rises): all-MiniLM-L6-v2 does not learn RTE here",
    ),
}
COMPARED_TASKS = [task for task, plan in TASK_PLANS.items() if not plan.not_compared]
GRID_ONLY_TASKS = [task for task, plan in TASK_PLANS.items() if plan.not_compared]
# The classification head every arm trains fully (modules_to_save), outside selection: BERT's pooler (dense + tanh
# on [CLS]) as well as the classifier, as the paper's DeBERTaV3 setup trains its pooler. all-MiniLM-L6-v2 was
# trained for mean pooling, so its pooler is untuned: kept frozen, CoLA does not learn at all (TASK_PLANS).
HEAD = ("classifier", "pooler")
TITLES = {"sst2": "SST-2", "cola": "CoLA", "rte": "RTE", "mrpc": "MRPC"}  # the paper's column order
PAPER_ORDER = ("sst2", "cola", "rte", "mrpc")
METRIC_LABELS = {"sst2": "Acc", "cola": "Mcc", "rte": "Acc", "mrpc": "Acc/F1"}

# The paper's GLUE figures for our four tasks (arXiv 2506.02724, DeBERTaV3-base; copied from its Tables 1, 2 and 7,
# as ../shared/paper/glue_tables.md holds them; MRPC as (accuracy, F1)). A test checks them against that file.
PAPER = {
    "table1": {  # self-attention only, n = 36 (Table 8's setup)
        "LoRA": {"sst2": 0.9450, "cola": 0.6913, "rte": 0.8448, "mrpc": (0.8897, 0.9220)},
        "AdaLoRA": {"sst2": 0.9392, "cola": 0.6222, "rte": 0.7834, "mrpc": (0.7059, 0.8225)},
        "EVA": {"sst2": 0.9396, "cola": 0.6252, "rte": 0.7841, "mrpc": (0.7191, 0.8333)},
        "WLoRA K=10": {"sst2": 0.9473, "cola": 0.6703, "rte": 0.7643, "mrpc": (0.8775, 0.9101)},
    },
    "table7": {"RLoRA K=10": {"sst2": 0.9300, "cola": 0.5368, "rte": 0.7316, "mrpc": (0.8529, 0.8950)}},
    "table2": {  # all linear layers, n = 72, WLoRA at K = n/2 (Table 9's setup)
        2: {
            "LoRA": {"sst2": 0.9413, "cola": 0.6600, "rte": 0.8068, "mrpc": (0.9003, 0.9193)},
            "WLoRA": {"sst2": 0.9518, "cola": 0.6728, "rte": 0.7823, "mrpc": (0.9004, 0.9276)},
            "WLoRA+": {"sst2": 0.9524, "cola": 0.6848, "rte": 0.8567, "mrpc": (0.8910, 0.9009)},
        },
        4: {
            "LoRA": {"sst2": 0.9562, "cola": 0.6809, "rte": 0.7816, "mrpc": (0.9207, 0.9471)},
            "WLoRA": {"sst2": 0.9614, "cola": 0.6824, "rte": 0.8637, "mrpc": (0.8901, 0.9099)},
            "WLoRA+": {"sst2": 0.9714, "cola": 0.6907, "rte": 0.8434, "mrpc": (0.8615, 0.8912)},
        },
        8: {
            "LoRA": {"sst2": 0.9641, "cola": 0.6965, "rte": 0.8537, "mrpc": (0.9064, 0.9127)},
            "WLoRA": {"sst2": 0.9653, "cola": 0.6898, "rte": 0.7955, "mrpc": (0.9061, 0.9315)},
            "WLoRA+": {"sst2": 0.9644, "cola": 0.6934, "rte": 0.8531, "mrpc": (0.9023, 0.9356)},
        },
    },
}


def paper_score(value) -> float:
    """A task's GLUE score from a paper cell: the value, or the mean of MRPC's (accuracy, F1)."""
    return sum(value) / 2 if isinstance(value, tuple) else value


def paper_differences(rank: int = 8) -> dict[str, dict[str, float]]:
    """{our arm: {task: the paper's score minus its LoRA's}}, and 'random_minus_weightlora' (module docstring)."""

    def minus(row: dict, base: dict) -> dict[str, float]:
        return {task: paper_score(row[task]) - paper_score(base[task]) for task in PAPER_ORDER}

    table1, table2 = PAPER["table1"], PAPER["table2"].get(rank)
    differences = {
        "adalora": minus(table1["AdaLoRA"], table1["LoRA"]),
        "eva": minus(table1["EVA"], table1["LoRA"]),
        "random": minus(PAPER["table7"]["RLoRA K=10"], table1["LoRA"]),
        "random_minus_weightlora": minus(PAPER["table7"]["RLoRA K=10"], table1["WLoRA K=10"]),
    }
    if table2:
        differences.update(
            weightlora=minus(table2["WLoRA"], table2["LoRA"]), weightlora_plus=minus(table2["WLoRA+"], table2["LoRA"])
        )
    return differences


# --- one run ------------------------------------------------------------------------------------------------------


def plan_of(args, task: str) -> TaskPlan:
    plan = TASK_PLANS[task]
    return TaskPlan(args.max_steps or plan.steps, args.batch_size or plan.batch_size, plan.seeds, plan.not_compared)


def seeds_of(args, task: str) -> list[int]:
    return list(args.seeds) if args.seeds is not None else list(range(TASK_PLANS[task].seeds))


def run_argv(args, task: str, learning_rate: float, r: int, flags: list[str], seed: int) -> list[str]:
    """The recipe flags of one run (the output folder comes on top): the task's plan, the rate, the rank, the arm."""
    plan = plan_of(args, task)
    argv = [
        "--task", task, "--max_steps", str(plan.steps), "--per_device_train_batch_size", str(plan.batch_size),
        "--per_device_eval_batch_size", str(args.eval_batch_size), "--learning_rate", str(learning_rate),
        "--max_length", str(args.max_length), "--lora_r", str(r), "--lora_alpha", str(2 * r),
        "--selection_steps", args.selection_steps, "--eval_before", "false", "--save_strategy", "no",
        "--report_to", "none", "--logging_steps", "50", "--disable_tqdm", "true",
        # fp32 whatever the CPU: the recipe's default (bf16 autocast where the CPU has native bf16) would make the
        # records of a study that spans sittings, and machines, differ in precision as well as in speed.
        "--bf16", "false",
        "--lora_modules_to_save", *HEAD,
    ]  # fmt: skip
    if args.train_samples:
        argv += ["--max_train_samples", str(args.train_samples)]
    if args.eval_samples:
        argv += ["--max_eval_samples", str(args.eval_samples)]
    return [*argv, "--seed", str(seed), "--data_seed", str(seed), *flags]


def train_run(name: str, seed: int, argv: list[str], output_dir: Path) -> dict:
    """One run of the recipe in a fresh process (its log in the output folder); the record's fields."""
    output_dir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    command = [sys.executable, "-m", "wlora_trl.recipes.classify", "--output_dir", str(output_dir), *argv]
    log = output_dir / "run.log"
    start = time.perf_counter()
    with open(log, "w") as stream:
        done = subprocess.run(command, cwd=REPO, env=env, stdout=stream, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"{tail}\n{name}, seed {seed} failed (exit {done.returncode}); its log: {log}")
    summary = json.loads((output_dir / "eval_results.json").read_text())
    ranks = summary["ranks"]
    return {
        "task": summary["task"],
        "metric": summary["metric"],
        "score": summary["after"]["eval_score"],
        "metrics": {key.removeprefix("eval_"): value for key, value in summary["after"].items()},
        "train_loss": summary["train_loss"],
        "kept": None if summary["method"] == "lora" else sorted(m for m, rank in ranks.items() if rank > 0),
        "ranks": ranks,
        "trainable_parameters": trainable_parameters(output_dir),
        "trained_parameters": summary["trainable_parameters"],
        "seconds": {
            "run": seconds,
            "train": summary["timings_s"]["train"],
            "adapters": summary["timings_s"]["adapters"],
        },
        "peak_rss_mib": summary["peak_rss_mib"],
        "bf16": summary["bf16"],
        "adapter_dir": str(output_dir),
    }


# --- the study ----------------------------------------------------------------------------------------------------


def grid_name(task: str, learning_rate: float) -> str:
    return f"{task}/lr_grid/lora_lr{learning_rate}"


def choose_learning_rates(study: Study, args) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """({task: chosen rate}, {task: {rate: LoRA's first-seed score}}); a task whose grid is incomplete (--no_train)
    has no rate yet."""
    chosen, grids = {}, {}
    for task in [*args.tasks, *args.grid_only_tasks]:
        if task in args.fixed_rates:
            chosen[task] = args.fixed_rates[task]
            continue
        seed = seeds_of(args, task)[0]
        scores = {}
        for learning_rate in args.lr_grid:
            argv = run_argv(args, task, learning_rate, args.r, ARMS["lora"], seed)
            record = study.run(grid_name(task, learning_rate), seed, argv)
            if record:
                scores[str(learning_rate)] = record["score"]
        grids[task] = scores
        if len(scores) == len(args.lr_grid):
            chosen[task] = max(args.lr_grid, key=lambda lr: scores[str(lr)])  # the first of equal scores
    return chosen, grids


def main_runs(study: Study, args, rates: dict[str, float]) -> dict[str, dict[str, list[dict]]]:
    """{task: {arm: records}}, trained seed-major."""
    runs = {task: {arm: [] for arm in args.arms} for task in args.tasks}
    all_seeds = sorted({seed for task in args.tasks for seed in seeds_of(args, task)})
    for seed in all_seeds:
        for task in args.tasks:
            if seed not in seeds_of(args, task):
                continue
            for arm in args.arms:
                if task not in rates:  # its LR grid is not complete yet (only with --no_train)
                    study.missing.append(f"{task}/{arm}_seed{seed}")
                    continue
                first = seed == seeds_of(args, task)[0]
                reuse_grid = arm == "lora" and first and task not in args.fixed_rates
                name = grid_name(task, rates[task]) if reuse_grid else f"{task}/{arm}"
                record = study.run(name, seed, run_argv(args, task, rates[task], args.r, ARMS[arm], seed))
                if record:
                    runs[task][arm].append(record)
    return runs


def sweep_runs(study: Study, args, rates: dict[str, float], runs: dict) -> dict[str, dict[str, list[dict]]]:
    """{str(rank): {arm: records}} on --sweep_task; rank r's records are the main runs' of the same seeds."""
    task = args.sweep_task
    if not args.sweep_ranks or task not in args.tasks:
        return {}
    seeds = seeds_of(args, task)[: args.sweep_seeds]
    sweep = {str(args.r): {arm: [r for r in runs[task].get(arm, []) if r["seed"] in seeds] for arm in SWEEP_ARMS}}
    for rank in args.sweep_ranks:
        sweep[str(rank)] = {arm: [] for arm in SWEEP_ARMS}
    for seed in seeds:
        for rank in args.sweep_ranks:
            for arm in SWEEP_ARMS:
                if task not in rates:
                    study.missing.append(f"{task}/{arm}_r{rank}_seed{seed}")
                    continue
                record = study.run(
                    f"{task}/{arm}_r{rank}", seed, run_argv(args, task, rates[task], rank, ARMS[arm], seed)
                )
                if record:
                    sweep[str(rank)][arm].append(record)
    return dict(sorted(sweep.items(), key=lambda item: int(item[0])))


# --- summaries ----------------------------------------------------------------------------------------------------


def summarise_arms(arm_runs: dict[str, list[dict]]) -> dict:
    """Per arm: score, each metric, paired difference to LoRA's same seed, parameters, time, memory, Jaccard."""
    lora = {r["seed"]: r["score"] for r in arm_runs.get("lora", [])}
    summary = {}
    for arm, records in arm_runs.items():
        if not records:
            continue
        paired = [r["score"] - lora[r["seed"]] for r in records if r["seed"] in lora]
        metric_names = [key for key in records[0]["metrics"] if key != "loss"]
        summary[arm] = {
            "score": spread([r["score"] for r in records]),
            "metrics": {key: spread([r["metrics"][key] for r in records]) for key in metric_names},
            "vs_lora_paired": spread(paired) if arm != "lora" and paired else None,
            "trainable_parameters": spread([r["trainable_parameters"] for r in records]),
            "peak_trained_parameters": spread([r["trained_parameters"]["peak"] for r in records]),
            "total_rank": spread([sum(r["ranks"].values()) for r in records]),
            "run_minutes": spread([r["seconds"]["run"] / 60 for r in records]),
            "train_minutes": spread([r["seconds"]["train"] / 60 for r in records]),
            "peak_rss_mib": spread([r["peak_rss_mib"] for r in records]),
            "kept_jaccard_across_seeds": jaccard([r["kept"] for r in records]) if arm != "lora" else None,
            "seeds": [r["seed"] for r in records],
        }
    return summary


def random_minus_weightlora(arm_runs: dict[str, list[dict]]) -> dict | None:
    """Optimised against random selection at the same K and rank, paired by seed."""
    weightlora = {r["seed"]: r["score"] for r in arm_runs.get("weightlora", [])}
    paired = [r["score"] - weightlora[r["seed"]] for r in arm_runs.get("random", []) if r["seed"] in weightlora]
    return spread(paired) if paired else None


def projection_of(module: str) -> tuple[int | None, str]:
    """(layer, projection) of a module name, BERT's three '*.dense' told apart by their parent."""
    from wlora_trl.state import parse_module_name

    layer, projection = parse_module_name(module)
    short = {
        "attention.self.query": "query",
        "attention.self.key": "key",
        "attention.self.value": "value",
        "attention.output.dense": "attn_out",
        "intermediate.dense": "intermediate",
        "output.dense": "output",
    }
    return layer, short.get(projection, projection)


def rank_shares(records: list[dict]) -> dict:
    """Where an arm spends its ranks: the share of its final rank per projection type and per layer, mean over
    seeds (WeightLoRA: the share of its kept adapters; LoRA would be uniform)."""
    by_projection: dict[str, list[float]] = {}
    by_layer: dict[str, list[float]] = {}
    for record in records:
        total = sum(record["ranks"].values())
        shares_p: dict[str, float] = {}
        shares_l: dict[str, float] = {}
        for module, rank in record["ranks"].items():
            layer, projection = projection_of(module)
            shares_p[projection] = shares_p.get(projection, 0) + rank / total
            shares_l[str(layer)] = shares_l.get(str(layer), 0) + rank / total
        for key, value in shares_p.items():
            by_projection.setdefault(key, []).append(value)
        for key, value in shares_l.items():
            by_layer.setdefault(key, []).append(value)
    return {
        "projection": {key: statistics.mean(values) for key, values in by_projection.items()},
        "layer": {key: statistics.mean(values) for key, values in sorted(by_layer.items())},
    }


def overall(summary: dict, tasks: list[str]) -> dict:
    """Per arm over the tasks it has runs on: mean score per task, the average, differences to LoRA, parameters."""
    arms = list(dict.fromkeys(arm for task in tasks for arm in summary.get(task, {})))
    table = {}
    for arm in arms:
        present = [task for task in tasks if arm in summary.get(task, {})]
        scores = {task: summary[task][arm]["score"]["mean"] for task in present}
        diffs = {
            task: summary[task][arm]["vs_lora_paired"]["mean"]
            for task in present
            if summary[task][arm]["vs_lora_paired"]
        }
        lora_params = [summary[t]["lora"]["trainable_parameters"]["mean"] for t in present if "lora" in summary[t]]
        params = statistics.mean(summary[t][arm]["trainable_parameters"]["mean"] for t in present)
        table[arm] = {
            "score": scores,
            "average": statistics.mean(scores.values()) if len(present) == len(tasks) else None,
            "vs_lora": diffs,
            "vs_lora_average": statistics.mean(diffs.values()) if len(diffs) == len(tasks) else None,
            "trainable_parameters": params,
            "share_of_lora_parameters": params / statistics.mean(lora_params) if lora_params else None,
        }
    return table


def summarise_sweep(sweep: dict) -> dict:
    """{rank: {arm: score, paired difference to LoRA at the same rank, parameters}}."""
    table = {}
    for rank, arm_runs in sweep.items():
        lora = {r["seed"]: r["score"] for r in arm_runs.get("lora", [])}
        table[rank] = {}
        for arm, records in arm_runs.items():
            if not records:
                continue
            paired = [r["score"] - lora[r["seed"]] for r in records if r["seed"] in lora]
            table[rank][arm] = {
                "score": spread([r["score"] for r in records]),
                "vs_lora_paired": spread(paired) if arm != "lora" and paired else None,
                "trainable_parameters": spread([r["trainable_parameters"] for r in records]),
            }
    return table


# --- rendering ----------------------------------------------------------------------------------------------------


def _pm(value: dict | None, signed: bool = False) -> str:
    if not value:
        return "-"
    return f"{value['mean']:+.4f} ± {value['std']:.4f}" if signed else f"{value['mean']:.4f} ± {value['std']:.4f}"


def _paper(value: float | None) -> str:
    return f"{value:+.4f}" if value is not None else "-"


def _task_cell(task: str, arm_summary: dict) -> str:
    metrics = arm_summary["metrics"]
    if task == "mrpc":
        return f"{metrics['accuracy']['mean']:.4f}/{metrics['f1']['mean']:.4f}"
    return f"{arm_summary['score']['mean']:.4f}"


def markdown(result: dict) -> str:
    """The study's tables: per task and arm, the overall table in the paper's layout with the paper's differences,
    random against optimised selection, the learning rates, the rank sweep, where the ranks go."""
    summary, settings, paper = result["summary"], result["settings"], result["paper_vs_lora"]
    tasks = [task for task in PAPER_ORDER if task in summary]
    lines = [
        "| task | arm | score (mean ± std) | minus LoRA, paired by seed | trainable params | peak trained | "
        "minutes per run | peak RSS (MiB) | kept-set Jaccard |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for task in tasks:
        for arm, s in summary[task].items():
            jac = s["kept_jaccard_across_seeds"]
            lines.append(
                f"| {TITLES[task]} ({len(s['seeds'])} seed{'s' if len(s['seeds']) > 1 else ''}) | {arm} | "
                f"{_pm(s['score'])} | "
                f"{_pm(s['vs_lora_paired'], True)} | "
                f"{s['trainable_parameters']['mean']:,.0f} | {s['peak_trained_parameters']['mean']:,.0f} | "
                f"{s['run_minutes']['mean']:.1f} | {s['peak_rss_mib']['mean']:.0f} | "
                + (f"{jac:.2f}" if jac is not None else "-")
                + " |"
            )

    header = " | ".join(f"{TITLES[t]} {METRIC_LABELS[t]}" for t in tasks)
    lines += ["", f"| method | params (share of LoRA's) | {header} | Avg |", "|---|---:|" + "---:|" * (len(tasks) + 1)]
    for arm, row in result["overall"].items():
        cells = " | ".join(_task_cell(t, summary[t][arm]) if arm in summary[t] else "-" for t in tasks)
        share = row["share_of_lora_parameters"]
        params = f"{row['trainable_parameters']:,.0f}" + (f" ({share:.0%})" if share is not None else "")
        average = f"{row['average']:.4f}" if row["average"] is not None else "-"
        lines.append(f"| {arm} | {params} | {cells} | {average} |")

    lines += [
        "",
        f"| minus LoRA: ours (paper) | {' | '.join(TITLES[t] for t in tasks)} | Avg |",
        "|---|" + "---:|" * (len(tasks) + 1),
    ]
    for arm, row in result["overall"].items():
        if arm == "lora":
            continue
        theirs = paper.get(arm, {})
        cells = [
            f"{_pm(summary[t][arm]['vs_lora_paired'], True)} ({_paper(theirs.get(t))})" if arm in summary[t] else "-"
            for t in tasks
        ]
        ours_avg = row["vs_lora_average"]
        paper_avg = statistics.mean(theirs[t] for t in tasks) if theirs else None
        lines.append(f"| {arm} | {' | '.join(cells)} | {_paper(ours_avg)} ({_paper(paper_avg)}) |")
    versus = result["random_minus_weightlora"]
    if any(versus.get(t) for t in tasks):
        theirs = paper["random_minus_weightlora"]
        cells = [f"{_pm(versus.get(t), True)} ({_paper(theirs[t])})" for t in tasks]
        paper_avg = statistics.mean(theirs[t] for t in tasks)
        lines.append(f"| random minus weightlora | {' | '.join(cells)} | - ({_paper(paper_avg)}) |")

    lines += ["", "| task | steps x batch | LoRA's score per learning rate (seed 0) | chosen |", "|---|---|---|---:|"]
    grid_only = [task for task in PAPER_ORDER if task in settings.get("grid_only_tasks", [])]
    for task in [*tasks, *grid_only]:
        plan = settings["plans"][task]
        grid = result["learning_rates"]["grid"].get(task, {})
        scores = ", ".join(f"{lr}: {score:.4f}" for lr, score in grid.items()) or "(fixed)"
        chosen = "not compared" if task in grid_only else result["learning_rates"]["chosen"].get(task, "-")
        lines.append(f"| {TITLES[task]} | {plan['steps']} x {plan['batch_size']} | {scores} | {chosen} |")
    for task in grid_only:
        lines += ["", f"{TITLES[task]} is not compared: {settings['plans'][task]['not_compared']}."]

    sweep = result["sweep"]
    if sweep:
        task = settings["sweep_task"]
        lines += [
            "",
            f"| rank | arm | {TITLES[task]} score | minus LoRA (same rank, paired) | paper (Table 2) | "
            "trainable params |",
            "|---:|---|---:|---:|---:|---:|",
        ]
        for rank, arms in sweep.items():
            theirs = paper_differences(int(rank))
            for arm, point in arms.items():
                theirs_arm = theirs.get(arm, {}).get(task) if arm != "lora" and int(rank) in PAPER["table2"] else None
                lines.append(
                    f"| {rank} | {arm} | {_pm(point['score'])} | {_pm(point['vs_lora_paired'], True)} | "
                    f"{_paper(theirs_arm)} | {point['trainable_parameters']['mean']:,.0f} |"
                )

    shares = result["rank_shares"]
    if shares:
        projections = list(
            dict.fromkeys(p for task in shares.values() for arm in task.values() for p in arm["projection"])
        )
        layers = list(
            dict.fromkeys(layer for task in shares.values() for arm in task.values() for layer in arm["layer"])
        )
        names = [*projections, *(f"layer {layer}" for layer in layers)]
        lines += ["", "| task | arm | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
        for task in tasks:
            for arm, share in shares.get(task, {}).items():
                cells = [f"{share['projection'].get(p, 0):.2f}" for p in projections]
                cells += [f"{share['layer'].get(layer, 0):.2f}" for layer in layers]
                lines.append(f"| {TITLES[task]} | {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, paper = result["summary"], result["paper_vs_lora"]
    tasks = [task for task in PAPER_ORDER if task in summary]
    panels = len(tasks) + (1 if result["sweep"] else 0)
    columns = min(panels, 3)
    rows = -(-panels // columns)
    fig, grid = plt.subplots(rows, columns, figsize=(5.0 * columns, 4.0 * rows), squeeze=False)
    axes = [ax for row in grid for ax in row]
    for ax in axes[panels:]:
        ax.set_visible(False)
    for ax, task in zip(axes, tasks):
        arms = [arm for arm, s in summary[task].items() if s["vs_lora_paired"]]
        means = [summary[task][arm]["vs_lora_paired"]["mean"] for arm in arms]
        errors = [summary[task][arm]["vs_lora_paired"]["std"] for arm in arms]
        ax.bar(arms, means, yerr=errors, capsize=3, color=["#55a868" if m > 0 else "#c44e52" for m in means])
        marks = [(i, paper[arm][task]) for i, arm in enumerate(arms) if arm in paper]
        if marks:
            ax.scatter(
                [i for i, _ in marks],
                [v for _, v in marks],
                marker="D",
                color="black",
                zorder=3,
                label="paper (DeBERTaV3)",
            )
            ax.legend(fontsize=7, loc="lower left")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_title(f"{TITLES[task]}: above 0 beats LoRA")
        ax.set_ylabel("score minus LoRA's (paired by seed)")
        ax.tick_params(axis="x", rotation=40, labelsize=8)
    if result["sweep"]:
        ax = axes[panels - 1]
        ranks = [int(rank) for rank in result["sweep"]]
        for arm, color in (("weightlora", "#4c72b0"), ("weightlora_plus", "#dd8452")):
            points = [result["sweep"][str(rank)].get(arm, {}).get("vs_lora_paired") for rank in ranks]
            xs = [rank for rank, point in zip(ranks, points) if point]
            ys = [point["mean"] for point in points if point]
            es = [point["std"] for point in points if point]
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=arm, color=color)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(rank) for rank in ranks])
        ax.set_xlabel("rank r")
        ax.set_title(f"rank sweep on {TITLES[result['settings']['sweep_task']]}")
        ax.set_ylabel("minus LoRA at the same rank")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)  # pyplot keeps every figure open until closed: a long-lived process (the tests) would pile them up


# --- the command --------------------------------------------------------------------------------------------------


def _rates(pairs: list[str]) -> dict[str, float]:
    rates = {}
    for pair in pairs:
        task, _, value = pair.partition("=")
        if task not in TASK_PLANS or not value:
            raise SystemExit(f"--learning_rates {pair!r}: write TASK=RATE with TASK one of {', '.join(TASK_PLANS)}.")
        rates[task] = float(value)
    return rates


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--tasks",
        nargs="+",
        default=None,
        choices=list(TASK_PLANS),
        help=f"the tasks the arms are compared on (default: {' '.join(COMPARED_TASKS)})",
    )
    parser.add_argument(
        "--grid_only_tasks",
        nargs="*",
        default=None,
        choices=list(TASK_PLANS),
        help="tasks whose LR grid runs and is reported but whose arms do not, since LoRA does not learn them in "
        f"their plan (default: {' '.join(GRID_ONLY_TASKS)} without --tasks, none with it)",
    )
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="the seeds of every task (default: each task's plan, TASK_PLANS)",
    )
    parser.add_argument("--max_steps", type=int, default=None, help="steps of every run (default: the task's plan)")
    parser.add_argument("--batch_size", type=int, default=None, help="batch of every run (default: the task's plan)")
    parser.add_argument("--eval_batch_size", type=int, default=64)
    parser.add_argument("--max_length", type=int, default=256, help="tokens per example (cuts a few RTE pairs)")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--selection_steps", default="0.005", help="T: 0.5%% of the steps, at least 5 (the paper)")
    parser.add_argument(
        "--lr_grid",
        type=float,
        nargs="+",
        default=[5e-4, 1e-3, 2e-3, 5e-3],
        help="LoRA's learning rates tried per task on the first seed; the best serves every arm",
    )
    parser.add_argument(
        "--learning_rates",
        nargs="*",
        default=[],
        metavar="TASK=RATE",
        help="fix a task's rate instead of searching the grid",
    )
    parser.add_argument(
        "--sweep_task", default="sst2", choices=list(TASK_PLANS), help="the largest dev set (872 rows): the least noise"
    )
    parser.add_argument("--sweep_ranks", type=int, nargs="*", default=[2, 4, 16], help="ranks besides --r")
    parser.add_argument("--sweep_seeds", type=int, default=2, help="the sweep runs on the task's first N seeds")
    parser.add_argument("--train_samples", type=int, default=None, help="first N train rows only (smoke tests)")
    parser.add_argument("--eval_samples", type=int, default=None, help="first N validation rows only (smoke tests)")
    add_study_arguments(parser, RUNS_DIR, "outputs/glue", REPO / "benchmarks" / "results" / "glue.json")
    args = finish_arguments(parser.parse_args(argv))
    if args.grid_only_tasks is None:
        args.grid_only_tasks = GRID_ONLY_TASKS if args.tasks is None else []
    if args.tasks is None:
        args.tasks = COMPARED_TASKS
    if set(args.tasks) & set(args.grid_only_tasks):
        parser.error("a task is in both --tasks and --grid_only_tasks: name it in one")
    if "lora" not in args.arms:
        parser.error("every comparison is paired with LoRA: keep lora in --arms")
    args.fixed_rates = _rates(args.learning_rates)
    return args


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    study = Study(args, train_run)
    rates, grids = choose_learning_rates(study, args)
    runs = main_runs(study, args, rates)
    sweep = sweep_runs(study, args, rates, runs)

    summary = {task: summarise_arms(arm_runs) for task, arm_runs in runs.items()}
    summary = {task: arms for task, arms in summary.items() if arms}
    tasks = [task for task in args.tasks if task in summary]
    settings = {k: v for k, v in vars(args).items() if k not in ("work_dir", "output", "runs_dir", "fixed_rates")}
    settings.update(
        seeds={task: seeds_of(args, task) for task in args.tasks},
        plans={
            task: vars(plan_of(args, task)) | {"seeds": len(seeds_of(args, task))}
            for task in [*args.tasks, *args.grid_only_tasks]
        },
    )
    result = {
        "settings": settings,
        "summary": summary,
        "overall": overall(summary, tasks),
        "random_minus_weightlora": {task: random_minus_weightlora(runs[task]) for task in tasks},
        "paper_vs_lora": paper_differences(args.r),
        "learning_rates": {"chosen": rates, "grid": grids},
        "sweep": summarise_sweep(sweep),
        "rank_shares": {
            task: {arm: rank_shares(runs[task][arm]) for arm in args.arms if arm != "lora" and runs[task][arm]}
            for task in tasks
        },
    }
    if args.no_train:
        # Progress of a study that spans sittings: the tables of what is recorded, nothing written.
        if tasks:
            print(markdown(result))
        print(study.progress())
        return result
    records = list(study.records.values())  # the LR grid's, the arms', the sweep's, each once
    result = {
        **result_header(args, ("work_dir", "output", "runs_dir", "fixed_rates")),
        **result,
        "settings": settings,
        "runs": [
            {
                k: r[k]
                for k in ("name", "seed", "score", "metrics", "kept", "trainable_parameters", "seconds", "peak_rss_mib")
            }
            for r in records
        ],
        "total_run_minutes": sum(r["seconds"]["run"] for r in records) / 60,
        "wall_minutes_this_sitting": study.sitting_minutes(),
    }
    output = Path(args.output)
    write_result(output, result, markdown(result), plot)
    print("\n" + markdown(result))
    print(f"wrote {output} and its .md and .png; {result['total_run_minutes']:.0f} min of runs in all")
    return result


if __name__ == "__main__":
    main()
