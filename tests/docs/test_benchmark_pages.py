"""Every number the documentation states about a measurement is rendered from, or checked against, the results the
benchmarks committed (benchmarks/results/, eval/results/): the tables are what the benchmarks' own renderers make of
the JSON, and each sentence with a number is rebuilt here from the JSON and looked for on its page.

When a rerun commits new JSON, the failing assertion names the sentence to update. Checked pages: benchmarks.md,
gpu-kit.md, evaluation.md, distributed.md's FSDP2 cost, the README's headline tables and plain answers, and the config's
help where it cites the GLUE study.
"""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.docs.pages import REPO, page, prose

RESULTS = REPO / "benchmarks" / "results"
MIB = 2**20


def load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # a dataclass (benchmarks/glue.py's TaskPlan) looks its module up while it is built
    spec.loader.exec_module(module)
    return module


def result(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def assert_states(page_name: str, *fragments: str) -> None:
    """Each fragment (a sentence part rebuilt from the JSON) is on the page, wherever its lines wrap."""
    text = prose(page(page_name))
    missing = [fragment for fragment in fragments if prose(fragment) not in text]
    where = "README.md" if page_name == "README" else f"docs/source/{page_name}.md"
    assert not missing, f"{where} does not state what the committed results say:\n  " + "\n  ".join(missing)


def signed(values) -> str:
    return " / ".join(f"{v:+.4f}" for v in values)


def spread(values) -> str:
    return f"{values['mean']:+.4f} ± {values['std']:.4f}"


def span(values, digits: int) -> str:
    return f"{min(values):.{digits}f}-{max(values):.{digits}f}"


def sci(value: float) -> str:
    return f"{value:.0e}".replace("e-0", "e-")  # 0.0005 -> "5e-4", as the pages write learning rates


@pytest.fixture(scope="module")
def parameter_counts() -> dict[str, int]:
    """Parameters of the benchmarks' model shapes (benchmarks/speed.py's configs), counted on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    configs = load_module(REPO / "benchmarks" / "speed.py", "speed_benchmark").CONFIGS
    counts = {}
    for name in ("llama3-8b-shapes", "smollm2-135m-shapes"):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(LlamaConfig(**configs[name]))
        counts[name] = sum(p.numel() for p in model.parameters())
    return counts


# --- the GSM8K quality study ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quality():
    module = load_module(REPO / "benchmarks" / "quality.py", "quality_benchmark")
    return module, result("quality.json")


def assert_benchmarks_page_shows_the_study(module, study: dict, name: str) -> None:
    """A study's tables are its renderer's output from the committed JSON, as committed in `<name>.md` and shown on
    the benchmarks page with its plot."""
    tables = module.markdown(study)
    assert (RESULTS / f"{name}.md").read_text() == tables
    assert tables in page("benchmarks")
    assert f"](../../benchmarks/results/{name}.png)" in page("benchmarks")


def test_benchmarks_page_shows_the_committed_quality_tables(quality):
    assert_benchmarks_page_shows_the_study(*quality, "quality")


def test_readme_headline_table_is_the_studys_arms_table(quality):
    module, study = quality
    arms = module.markdown(study).split("\n\n")[0]
    assert arms.startswith("| arm |") and arms in page("README")
    settings = study["settings"]
    seeds = len(settings["seeds"])
    assert_states(
        "README",
        f"{settings['max_steps']} steps, {seeds} seeds, held-out loss on {settings['heldout_samples']} test answers",
    )


def quality_answers(study: dict) -> dict[str, str]:
    """The plain answers' numbers, as the pages word them."""
    summary, sweeps, runs = study["summary"], study["sweeps"], study["runs"]
    params = {name: arm["trainable_parameters"]["mean"] for name, arm in summary.items()}
    loss = {name: [run["heldout_loss"] for run in arm_runs] for name, arm_runs in runs.items()}
    paired = {name: arm["vs_lora_paired"] for name, arm in summary.items() if arm["vs_lora_paired"]}

    def minus(a: str, b: str) -> list[float]:
        return [x - y for x, y in zip(loss[a], loss[b])]

    weightlora, plus, plus_keep = paired["weightlora"], paired["weightlora_plus"], paired["weightlora_plus_keep"]
    assert all(v > 0 for v in weightlora["values"])  # "on every seed"
    assert sum(v < 0 for v in plus["values"]) == 2  # "better on two seeds of three"
    assert all(v < 0 for v in plus_keep["values"])  # "on every seed"
    below_lora_on_every_seed = [n for n, p in paired.items() if all(v < 0 for v in p["values"])]
    assert below_lora_on_every_seed == ["weightlora_plus_keep", "eva"]  # "the only WeightLoRA arm", and EVA
    adalora, eva = paired["adalora"], paired["eva"]
    best_weightlora = {seed: min(loss[n][seed] for n in paired if n.startswith("weightlora")) for seed in range(3)}
    assert all(eva_loss < best_weightlora[seed] for seed, eva_loss in enumerate(loss["eva"]))  # "below every"
    assert min(adalora["values"]) > max(max(p["values"]) for n, p in paired.items() if n != "adalora")  # "behind"
    minutes = {name: arm["run_minutes"]["mean"] for name, arm in summary.items()}
    n = 2 * len(runs["weightlora"][0]["kept"])  # K = n/2
    assert all(len(run["kept"]) == n for run in runs["eva"])  # "every one of the n"
    eva_ranks = {
        rank
        for seed in study["settings"]["seeds"]
        for rank in json.loads((RESULTS / "quality_runs" / f"eva_seed{seed}.json").read_text())["peer"][
            "final_ranks"
        ].values()
    }
    versus_random = minus("weightlora", "random")
    assert all(v < 0 for v in versus_random)
    keep_wl, keep_plus = minus("weightlora_keep", "weightlora"), minus("weightlora_plus_keep", "weightlora_plus")
    assert all(v < 0 for v in keep_wl + keep_plus)  # reinit=False helps "on every seed"
    t_sweep, k_sweep, omega = sweeps["T"], sweeps["k"], sweeps["omega_lr"]
    assert sorted(t_sweep["weightlora, T = 15"]["kept"]) == sorted(t_sweep["weightlora, T = 5"]["kept"])
    default_kept = set(omega["omega_lr = 100"]["kept"])

    def jaccard(label: str) -> float:
        kept = set(omega[label]["kept"])
        return len(kept & default_kept) / len(kept | default_kept)

    assert jaccard("omega_lr = 10") == jaccard("omega_lr = 1000") == 1.0  # "the same ... adapters"
    kept = Counter(module.rsplit(".", 1)[1] for module in runs["weightlora"][0]["kept"])
    layers = 1 + max(int(module.split(".")[2]) for module in runs["weightlora"][0]["kept"])
    assert [name for name, _ in kept.most_common(3)] == ["up_proj", "gate_proj", "v_proj"]  # "mostly v, gate, up"
    assert min(kept, key=kept.get) == "k_proj"  # "few k projections"
    relative = [
        -statistics.mean(keep_wl) / summary["weightlora"]["heldout_loss"]["mean"],
        -statistics.mean(keep_plus) / summary["weightlora_plus"]["heldout_loss"]["mean"],
    ]
    t_cost = {t: t_sweep[f"weightlora, T = {t}"]["heldout_loss"] - t_sweep[f"weightlora_keep, T = {t}"]["heldout_loss"]
              for t in (5, 15)}  # fmt: skip
    return {
        "fewer parameters": f"half the adapters ({params['weightlora'] / params['lora']:.0%} of LoRA's trainable "
        f"parameters) it ends {spread(weightlora)} above LoRA's held-out loss, on every seed",
        "per seed": f"on every seed ({signed(weightlora['values'])})",
        "k sweep": f"narrows the gap to {k_sweep['K = 0.75']['vs_lora']:+.4f} and a quarter widens it to "
        f"{k_sweep['K = 0.25']['vs_lora']:+.4f} (seed 0)",
        "plus": f"With re-initialisation it ends {spread(plus)} against LoRA (per seed {signed(plus['values'])}: better "
        "on two seeds, even on the third)",
        "plus, short": f"With re-initialisation it ends {spread(plus)} against LoRA (better on two seeds of three)",
        "plus keep": f"WeightLoRA+ is below LoRA on every seed: {spread(plus_keep)} ({signed(plus_keep['values'])}), "
        "the only WeightLoRA arm that beats LoRA on all three",
        "plus keep, short": f"it is below LoRA on every seed: {spread(plus_keep)}",
        "peers": f"EVA, with {params['eva'] / params['lora']:.0%} of LoRA's trainable parameters, ends {spread(eva)} "
        f"against LoRA ({signed(eva['values'])}), below every WeightLoRA arm on every seed",
        "peers, adalora": f"AdaLoRA, with {params['adalora'] / params['lora']:.0%}, ends {spread(adalora)}, behind "
        "every arm on every seed",
        "peers, gain": f"{statistics.mean(eva['values']) / statistics.mean(plus_keep['values']):.0f} times "
        f"WeightLoRA+'s best gain (`reinit=False`, {statistics.mean(plus_keep['values']):+.4f}), at fewer parameters "
        f"than WeightLoRA's {params['weightlora'] / params['lora']:.0%}",
        "peers, modules": f"EVA leaves every one of the {n} with a rank ({min(eva_ranks)} to {max(eva_ranks)}), "
        f"AdaLoRA {span([len(run['kept']) for run in runs['adalora']], 0)} of them",
        "peers, time": f"A run took {minutes['eva']:.0f} minutes with EVA and {minutes['adalora']:.0f} with AdaLoRA, "
        f"against {minutes['lora']:.0f} with LoRA and {minutes['weightlora']:.0f} with WeightLoRA",
        "plus budget": f"Both train {params['weightlora_plus'] / params['lora']:.0%} of LoRA's parameters",
        "plus extra": f"the extra {params['weightlora_plus'] / params['lora'] - 1:.0%}",
        "random": f"StoIHT's kept set ends {-statistics.mean(versus_random):.4f} below random selection's loss on "
        f"every seed ({signed(versus_random)}, WeightLoRA minus random)",
        "random, short": f"StoIHT's kept set ends {-statistics.mean(versus_random):.4f} below random selection's "
        "loss on every seed",
        "jaccard": f"kept-set Jaccard {summary['weightlora']['kept_jaccard_across_seeds']:.2f} across seeds against "
        f"{summary['random']['kept_jaccard_across_seeds']:.2f} for the random sets",
        "projections": f"(seed 0: up {kept['up_proj']}, gate {kept['gate_proj']}, v {kept['v_proj']}, "
        f"k {kept['k_proj']} of {layers} each",
        "reinit": f"lowers the loss by {-statistics.mean(keep_wl):.4f} for WeightLoRA ({signed(keep_wl)}) and "
        f"{-statistics.mean(keep_plus):.4f} for WeightLoRA+ ({signed(keep_plus)})",
        "T cost": f"{t_cost[15]:.4f} at T = 15 against {t_cost[5]:.4f} at T = 5 (seed 0)",
        "T sweep": f"(T = 15: {t_sweep['weightlora, T = 15']['vs_lora']:+.4f} with re-initialisation, "
        f"{t_sweep['weightlora_keep, T = 15']['vs_lora']:+.4f} without, against "
        f"{t_sweep['weightlora, T = 5']['vs_lora']:+.4f} and {t_sweep['weightlora_keep, T = 5']['vs_lora']:+.4f} at "
        f"T = 5): T = 15 keeps exactly the same {len(t_sweep['weightlora, T = 5']['kept'])} adapters as T = 5",
        "omega_lr": f"10, 100 and 1000 end at {omega['omega_lr = 10']['vs_lora']:+.4f}, "
        f"{omega['omega_lr = 100']['vs_lora']:+.4f} and {omega['omega_lr = 1000']['vs_lora']:+.4f} against LoRA "
        f"(seed 0); their kept sets have Jaccard {jaccard('omega_lr = 10'):.2f} (10) and "
        f"{jaccard('omega_lr = 1000'):.2f} (1000) with the default's: the same {len(default_kept)} adapters",
        "defaults": f"the difference is small ({min(relative):.1%}-{max(relative):.1%} of the loss)".replace(
            "%-", "-", 1
        ),
    }


def test_benchmarks_page_states_the_quality_studys_numbers(quality):
    module, study = quality
    answers = quality_answers(study)
    settings = study["settings"]
    steps, t = settings["max_steps"], int(settings["selection_steps"])
    records = [json.loads(path.read_text()) for path in (RESULTS / "quality_runs").glob("*.json")]
    # The study's runs: the arms' and the sweeps' (all of them rendered: nothing is left to go), at the study's rate;
    # the learning-rate grid's other rates (benchmarks/lr_grid.py) share the folder.
    rate = settings["learning_rate"]
    records = [r for r in records if float(r["argv"][r["argv"].index("--learning_rate") + 1]) == rate]
    count = len(records)
    first = study["runs"]["weightlora"][0]
    setup = [
        f"{steps} optimizer steps of batch {settings['batch_size']} (max {settings['max_length']} tokens) over the "
        f"first {settings['train_samples']} train rows",
        f"AdamW at {sci(settings['learning_rate'])} with linear decay, r = {settings['r']}, alpha = 16, all "
        f"n = {2 * len(first['kept'])} projections",
        f"seeds {settings['seeds'][0]}-{settings['seeds'][-1]}",
        f"T = {t} steps, {t / steps:.1%} of the run: the paper's 0.5% would be {0.005 * steps:g} steps",
        f"the answers of the first {settings['heldout_samples']} GSM8K test questions",
        f"on a {study['machine']['cpus']}-core CPU",
        f"{count} runs of {study['total_run_minutes'] / count:.0f} minutes on average, "
        f"{study['total_run_minutes'] / 60:.1f} h in all, {study['date'][:10]}",
        f"against LoRA's seed-0 loss ({study['runs']['lora'][0]['heldout_loss']:.4f})",
    ]
    argv = json.loads((RESULTS / "quality_runs" / "weightlora_seed0.json").read_text())["argv"]
    assert argv[argv.index("--lora_alpha") + 1] == "16"
    short = {"plus, short", "plus keep, short", "random, short"}
    assert_states("benchmarks", *setup, *(v for k, v in answers.items() if k not in short))


README_QUALITY_ANSWERS = (
    "fewer parameters", "plus, short", "plus keep, short", "random, short", "jaccard", "peers", "peers, adalora",
    "peers, time",
)  # fmt: skip


def test_readme_plain_answers_are_the_studys(quality):
    _, study = quality
    answers = quality_answers(study)
    assert_states(
        "README",
        *(answers[k] for k in README_QUALITY_ANSWERS),
    )


# --- the GLUE study ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def glue():
    module = load_module(REPO / "benchmarks" / "glue.py", "glue_benchmark")
    return module, result("glue.json")


def test_benchmarks_page_shows_the_committed_glue_tables(glue):
    _, study = glue
    assert_benchmarks_page_shows_the_study(*glue, "glue")
    assert set(study["settings"]) >= {"tasks", "arms", "seeds"}
    for run in study["runs"]:  # every run the tables count is a committed record, with the score it recorded
        record = json.loads((RESULTS / "glue_runs" / f"{run['name']}_seed{run['seed']}.json").read_text())
        assert record["score"] == run["score"]


def test_readme_shows_the_glue_studys_overall_tables(glue):
    module, study = glue
    blocks = module.markdown(study).split("\n\n")
    overall, differences = blocks[1], blocks[2]
    assert overall.startswith("| method |") and differences.startswith("| minus LoRA: ours (paper) |")
    assert overall in page("README") and differences in page("README")


GLUE_TITLES = {"sst2": "SST-2", "cola": "CoLA", "mrpc": "MRPC"}


def glue_answers(study: dict) -> dict[str, str]:
    """The GLUE study's plain answers, as the README and the benchmarks page word them. The signs the words rest on
    ("better on MRPC", "below LoRA on every task") are asserted first, so a rerun that changes them fails here."""
    summary, overall, versus = study["summary"], study["overall"], study["random_minus_weightlora"]
    tasks = [task for task in GLUE_TITLES if task in summary]
    assert tasks == list(GLUE_TITLES) and all(len(summary[t]["lora"]["seeds"]) == 3 for t in tasks)

    def paired(arm: str, task: str) -> dict:
        return summary[task][arm]["vs_lora_paired"]

    def per_task(arm: str) -> str:
        return ", ".join(f"{GLUE_TITLES[t]} {spread(paired(arm, t))}" for t in tasks)

    def share(arm: str) -> str:
        return f"{overall[arm]['share_of_lora_parameters']:.0%}"

    def minutes(arm: str) -> str:
        return span([summary[t][arm]["run_minutes"]["mean"] for t in tasks], 1)

    def rss(arm: str) -> list[float]:
        return [1 - summary[t][arm]["peak_rss_mib"]["mean"] / summary[t]["lora"]["peak_rss_mib"]["mean"] for t in tasks]

    paper = study["paper_vs_lora"]
    # WeightLoRA: below LoRA on every seed of SST-2 and CoLA, above it on every seed of MRPC; WeightLoRA+ the same
    # but for one CoLA seed of three below LoRA (two above, the mean below).
    assert all(v < 0 for t in ("sst2", "cola") for v in paired("weightlora", t)["values"])
    assert all(v > 0 for v in paired("weightlora", "mrpc")["values"] + paired("weightlora_plus", "mrpc")["values"])
    assert all(v < 0 for v in paired("weightlora_plus", "sst2")["values"])
    assert (
        sum(v > 0 for v in paired("weightlora_plus", "cola")["values"])
        == 2
        > 0
        > paired("weightlora_plus", "cola")["mean"]
    )
    # The peers: below LoRA on every task, and below WeightLoRA on every task.
    for arm in ("adalora", "eva"):
        assert all(paired(arm, t)["mean"] < 0 for t in tasks)
        assert all(paired(arm, t)["mean"] < paired("weightlora", t)["mean"] for t in tasks)
    cola_adalora = summary["cola"]["adalora"]["score"]
    # Random against optimised selection: behind on average on every task, on every seed on MRPC only (ahead on two
    # seeds of three on SST-2 and CoLA).
    assert all(versus[t]["mean"] < 0 for t in tasks) and all(v < 0 for v in versus["mrpc"]["values"])
    assert all(sum(v > 0 for v in versus[t]["values"]) == 2 for t in ("sst2", "cola"))
    shares = {t: study["rank_shares"][t]["weightlora"] for t in tasks}
    deep = {t: sum(shares[t]["layer"][layer] for layer in ("3", "4", "5")) for t in tasks}
    query_key = {t: shares[t]["projection"]["query"] + shares[t]["projection"]["key"] for t in tasks}
    value_ffn = {t: sum(shares[t]["projection"][p] for p in ("value", "intermediate", "output")) for t in tasks}
    assert query_key["cola"] == query_key["mrpc"] == 0
    for task in tasks:  # "faster": WeightLoRA's runs are the shortest of the three on every task
        assert summary[task]["weightlora"]["run_minutes"]["mean"] < min(
            summary[task][arm]["run_minutes"]["mean"] for arm in ("lora", "adalora", "eva")
        )
    above_lora = [arm for arm, row in overall.items() if (row["vs_lora_average"] or 0) > 0]
    assert above_lora == ["weightlora_plus"]  # "the one arm above LoRA on average"
    selected = [
        summary[t][arm]["kept_jaccard_across_seeds"] for t in tasks for arm in ("weightlora", "weightlora_plus")
    ]
    random_jaccard = {round(summary[t]["random"]["kept_jaccard_across_seeds"], 2) for t in tasks}
    assert len(random_jaccard) == 1  # the random sets depend on the seed only
    return {
        "jaccard": f"kept-set Jaccard {min(selected):.2f}-{max(selected):.2f} across seeds against "
        f"{random_jaccard.pop():.2f} for the random sets",
        "fewer parameters": f"With {share('weightlora')} of LoRA's trainable parameters it ends "
        f"{per_task('weightlora')} against LoRA (the paper, at the same rank on DeBERTaV3-base: "
        + ", ".join(f"{GLUE_TITLES[t]} {paper['weightlora'][t]:+.4f}" for t in tasks)
        + ")",
        "plus": f"At {share('weightlora_plus')} of LoRA's parameters it ends {per_task('weightlora_plus')}",
        "peers": f"AdaLoRA ends {per_task('adalora')} against LoRA and EVA {per_task('eva')}",
        "peers average": f"averaged over the three tasks, WeightLoRA is {overall['weightlora']['vs_lora_average']:+.4f} "
        f"from LoRA, AdaLoRA {overall['adalora']['vs_lora_average']:+.4f} and EVA "
        f"{overall['eva']['vs_lora_average']:+.4f}",
        "peers budget": f"their saved adapters hold {share('adalora')} and {share('eva')} of LoRA's parameters against "
        f"WeightLoRA's {share('weightlora')}",
        "cola adalora": f"AdaLoRA's CoLA MCC of {cola_adalora['mean']:.3f}",
        "wall time": f"A run took {minutes('weightlora')} minutes with WeightLoRA, {minutes('lora')} with LoRA, "
        f"{minutes('adalora')} with AdaLoRA and {minutes('eva')} with EVA",
        "memory": f"WeightLoRA's process peaked {min(rss('weightlora')) * 100:.0f}-{max(rss('weightlora')):.0%} below "
        f"LoRA's resident memory, AdaLoRA's and EVA's within "
        f"{math.ceil(max(abs(v) for v in rss('adalora') + rss('eva')) * 1000) / 1000:.1%} of it",  # rounded up
        "random": "random minus WeightLoRA is "
        + ", ".join(f"{GLUE_TITLES[t]} {spread(versus[t])}" for t in tasks)
        + " (the paper: "
        + ", ".join(f"{GLUE_TITLES[t]} {paper['random_minus_weightlora'][t]:+.4f}" for t in tasks)
        + ")",
        "projections": "WeightLoRA's kept adapters are "
        + ", ".join(f"{value_ffn[t]:.0%}" for t in tasks)
        + " value and feed-forward projections (SST-2, CoLA, MRPC), "
        + f"no query or key projection on CoLA and MRPC, {query_key['sst2']:.0%} on SST-2",
        "layers": "the three deeper layers hold " + ", ".join(f"{deep[t]:.0%}" for t in tasks) + " of them",
    }


def test_benchmarks_page_states_the_glue_studys_numbers(glue):
    _, study = glue
    runs, settings = study["runs"], study["settings"]
    plans = settings["plans"]
    setup = [
        ", ".join(f"{GLUE_TITLES[t]} {plans[t]['steps']} steps of {plans[t]['batch_size']}" for t in GLUE_TITLES),
        f"{len(runs)} runs of {study['total_run_minutes'] / len(runs):.1f} minutes on average, "
        f"{study['total_run_minutes'] / 60:.1f} h in all, on a {study['machine']['cpus']}-core CPU, "
        f"{study['date'][:10]}",
    ]
    assert_states("benchmarks", *setup, *glue_answers(study).values())


def test_benchmarks_page_states_the_rank_sweep(glue):
    """The rank sweep's plain answer: both selection arms below LoRA at ranks 2-8 and within their spread of it at
    16, worded from the sweep's paired differences, beside the paper's Table 2."""
    module, study = glue
    sweep, task = study["sweep"], study["settings"]["sweep_task"]
    assert list(sweep) == ["2", "4", "8", "16"] and study["settings"]["sweep_seeds"] == 2
    arms = ("weightlora", "weightlora_plus")
    for arm in arms:
        for rank, point in sweep.items():
            paired = point[arm]["vs_lora_paired"]
            assert len(paired["values"]) == 2
            if rank == "16":  # "level with it at 16"
                assert 0 < paired["mean"] < paired["std"]
            else:  # "below LoRA at ranks 2 to 8"
                assert paired["mean"] < 0
    ours = {arm: ", ".join(spread(sweep[rank][arm]["vs_lora_paired"]) for rank in sweep) for arm in arms}
    plus16 = sweep["16"]["weightlora_plus"]["vs_lora_paired"]
    paper = {
        arm: ", ".join(f"{module.paper_differences(int(rank))[arm][task]:+.4f}" for rank in ("2", "4", "8"))
        for arm in arms
    }
    assert_states(
        "benchmarks",
        f"WeightLoRA minus LoRA at the same rank is {ours['weightlora']} at ranks 2, 4, 8, 16, WeightLoRA+ "
        f"{ours['weightlora_plus']} (the paper's Table 2: WeightLoRA {paper['weightlora']} and WeightLoRA+ "
        f"{paper['weightlora_plus']} at ranks 2, 4, 8)",
        f"WeightLoRA+'s two seeds disagree ({', '.join(f'{v:+.3f}' for v in plus16['values'])}): its "
        f"{plus16['mean']:+.3f} is inside its spread, level with LoRA",
    )


def test_readme_glue_answers_are_the_studys(glue):
    _, study = glue
    answers = glue_answers(study)
    assert_states("README", *(answers[k] for k in ("fewer parameters", "plus", "peers average", "wall time", "random")))


def test_the_configs_help_says_what_the_glue_study_found(glue):
    """`reinit` and `selection`'s help word the GLUE study's findings by their signs: reinit=False against
    re-initialising (paired by seed, mean over seeds) on one side on some tasks, the other on others, and never by
    0.005; random selection behind WeightLoRA on average on every task, on every seed on MRPC only."""
    from wlora_trl import WeightLoraConfig

    _, study = glue
    fields = WeightLoraConfig.__dataclass_fields__
    scores = {}
    for run in study["runs"]:
        task, arm = run["name"].split("/", 1)
        scores.setdefault(task, {}).setdefault(arm, {})[run["seed"]] = run["score"]
    keep_minus_reinit = {
        task: statistics.mean(arms["weightlora_keep"][seed] - arms["weightlora"][seed] for seed in arms["weightlora"])
        for task, arms in scores.items()
        if task in GLUE_TITLES
    }
    signs = {value > 0 for value in keep_minus_reinit.values()}
    assert signs == {True, False} and max(abs(value) for value in keep_minus_reinit.values()) < 0.005
    finding = "GLUE study on an encoder it made no consistent difference (either sign, by seed and by task)"
    assert finding in prose(fields["reinit"].metadata["help"]) and finding in prose(WeightLoraConfig.__doc__)
    versus = [v for task, v in study["random_minus_weightlora"].items() if task in GLUE_TITLES]
    assert all(v["mean"] < 0 for v in versus)  # "ahead on average on every task"
    assert [all(x < 0 for x in v["values"]) for v in versus] == [False, False, True]  # "on every seed on MRPC only"
    finding = "in the GLUE study on an encoder it was ahead on average on every task, on every seed on MRPC only"
    assert finding in prose(fields["selection"].metadata["help"]) and finding in prose(WeightLoraConfig.__doc__)


def test_the_method_help_says_what_both_studies_found_for_the_peers(quality, glue):
    """`--method`'s help words the peers' results by their signs in both studies: EVA below every WeightLoRA arm
    on every GSM8K seed and behind WeightLoRA on every GLUE task; AdaLoRA behind WeightLoRA in both."""
    from wlora_trl.recipes.common import WeightLoraArguments

    gsm8k, glue_study = quality[1], glue[1]
    quality_answers(gsm8k)  # asserts EVA below every WeightLoRA arm and AdaLoRA behind every arm, on every seed
    for task in GLUE_TITLES:
        scores = {arm: glue_study["summary"][task][arm]["score"]["mean"] for arm in ("weightlora", "adalora", "eva")}
        assert scores["weightlora"] > max(scores["eva"], scores["adalora"]), task
    help_text = prose(WeightLoraArguments.__dataclass_fields__["method"].metadata["help"])
    assert (
        prose(
            "EVA beat every WeightLoRA arm on every seed of the SmolLM2 / GSM8K study and trailed WeightLoRA on every "
            "GLUE task on an encoder; AdaLoRA trailed WeightLoRA in both, at the same learning rate"
        )
        in help_text
    )


# --- speed and memory on the CPU -----------------------------------------------------------------------------------


def test_benchmarks_page_shows_the_committed_cpu_speed_run():
    speed_module = load_module(REPO / "benchmarks" / "speed.py", "speed_benchmark")
    run = result("speed_smollm2-135m-instruct_cpu_float32.json")
    median, trainable, peak = run["median_step_seconds"], run["trainable_parameters"], run["peak_memory_bytes"]
    ratios, switch = run["ratios"], run["switch_seconds"]
    rows = [f"| {v} | {median[v]:.3f} | {trainable[v]:,} | {peak[v] / MIB:.0f} |" for v in speed_module.VARIANTS]
    targets = {v: f"<= {limit}" for v, (_, limit) in speed_module.TARGETS.items()}
    assert all(run["checks"].values())
    checks = [
        f"| WeightLoRA warm-up / LoRA | {targets['warmup']} | {ratios['warmup']:.3f} |",
        f"| WeightLoRA after the switch / LoRA on the same modules | {targets['switched']} | {ratios['switched']:.3f} |",
        f"| WeightLoRA+ after the switch / LoRA | {targets['plus_switched']} | {ratios['plus_switched']:.3f} |",
        f"| peak memory after the switch < LoRA's | yes | {peak['switched'] / MIB:.0f} vs {peak['lora'] / MIB:.0f} MiB |",
        f"| switch wall time | < 1 s | {switch['switched'] * 1000:.0f} ms (WeightLoRA+: "
        f"{switch['plus_switched'] * 1000:.0f} ms; mask mode: {switch['masked_switched'] * 1000:.0f} ms) |",
        f"| mask mode after the switch / module swap (reported, no target) | - | {ratios['masked_switched']:.3f} |",
    ]
    settings = run["settings"]
    dropped_weights = (trainable["lora"] - trainable["switched"]) * 4 / MIB  # fp32 adapters
    prose_numbers = [
        f"`{run['command']}`",
        f"all 7 projections of its {settings['adapters'] // 7} layers, n = {settings['adapters']} adapters, "
        f"r = {settings['r']}, batch {settings['batch']} x {settings['seq']} "
        f"tokens, fp32, {run['machine']['cpus']}-core CPU, {run['date'][:10]}",
        f"the switched ones keep the same {settings['adapters'] // 2} modules",
        f"({ratios['warmup']:.3f} now, {ratios['warmup_hooks']:.3f} with v0.1's hooks",
        f"cost no compute ({ratios['masked_switched']:.3f}) and their fp32 weights: {dropped_weights:.1f} MiB by count "
        f"(the measured peak is {(peak['masked_switched'] - peak['switched']) / MIB:.0f} MiB above the module swap's",
        f"carries {trainable['switched'] / trainable['lora']:.0%} of LoRA's parameters",
    ]
    assert_states("benchmarks", *rows, *checks, *prose_numbers)


# --- mask mode under FSDP2 -----------------------------------------------------------------------------------------


def test_pages_show_the_committed_fsdp2_cost_run(parameter_counts):
    sys.path.insert(0, str(REPO))
    from benchmarks.fsdp2_cost import render

    run = result("fsdp2_cost_smollm2-135m-instruct_cpu_x2.json")
    glibc = result("fsdp2_cost_smollm2-135m-instruct_cpu_x2_glibc-default-malloc.json")
    assert run["settings"]["malloc"] == "steady" and run["machine"]["world_size"] == 2
    assert glibc["settings"]["malloc"] == "default" and glibc["machine"]["world_size"] == 2
    assert render(run) in page("benchmarks")
    sizes, masked = run["sizes"], run["ratios_to_lora_same"]["masked"]
    extra_per_rank = (
        sizes["masked"]["lora_parameter_bytes_per_rank"] - sizes["lora_same"]["lora_parameter_bytes_per_rank"]
    )
    extra_per_round = (
        sizes["masked"]["lora_bytes_per_all_gather_round"] - sizes["lora_same"]["lora_bytes_per_all_gather_round"]
    )
    assert run["settings"]["dtype"] == "float32"
    base_bytes = parameter_counts["smollm2-135m-shapes"] * 4
    # Llama-3-8B: the LoRA and the adapters dropped by the GPU speed run's switch, against the base's parameters.
    llama_run = result("speed_llama3-8b-shapes_cuda-h200_bfloat16.json")
    llama, adapters = llama_run["trainable_parameters"], llama_run["settings"]["adapters"]
    llama_base = parameter_counts["llama3-8b-shapes"]
    llama_dropped = llama["lora"] - llama["switched"]
    assert_states(
        "benchmarks",
        f"`{run['command']}`",
        f"r = {run['settings']['lora_r']} on all {run['adapters']['n']} projections, K = {run['adapters']['kept']}, "
        f"{run['machine']['world_size']} {run['machine']['backend']} ranks, {run['settings']['batch']} x "
        f"{run['settings']['seq']} tokens per rank",
        f"they keep their sharded weights ({extra_per_rank / MIB:.1f} MiB per rank here)",
        f"({extra_per_round / MIB:.1f} MiB more per round, {extra_per_round / base_bytes:.2%} of the "
        f"{base_bytes / MIB:.0f} MiB a round moves for this fp32 model; for Llama-3-8B at r = 16 about "
        f"{llama_dropped / llama_base:.2%} of the elements",
        f"Time: {masked:.3f} of LoRA on the kept modules.",
        f"the same run gave {glibc['ratios_to_lora_same']['masked']:.3f}",
    )
    lora = sizes["lora"]["trainable_parameters"]
    dropped = lora - sizes["masked"]["trainable_parameters"]
    assert_states(
        "distributed",
        f"the LoRA weights are {llama['lora'] / llama_base:.2%} of the base model's parameters "
        f"({llama['lora'] / 1e6:.0f}M of {llama_base / 1e9:.1f}B); the {adapters - adapters // 2} adapters the GPU speed run's switch "
        f"dropped there ({llama_dropped / 1e6:.0f}M parameters",
        f"add {llama_dropped / llama_base:.2%} to the all-gathered elements",
        f"where LoRA is {lora / parameter_counts['smollm2-135m-shapes']:.1%} of the parameters, the dropped "
        f"{dropped / lora:.0%} of it is {extra_per_round / base_bytes:.2%} of what a round gathers",
        f"at r = 16 on all {adapters} projections",
        f"a step takes {masked:.3f} of stock LoRA's on the kept modules",
    )


# --- llama.cpp round trip ------------------------------------------------------------------------------------------


def test_benchmarks_page_shows_the_committed_llamacpp_round_trip():
    run = result("llamacpp_roundtrip.json")
    prompts = run["prompts"]
    assert all(r["adapter_changes_greedy_tokens"] for rows in prompts.values() for r in rows)
    assert max(r["adapter_delta_max_abs_diff"] for r in prompts["f32"]) < 0.05  # applied as PEFT does

    def row(base: str, label: str, digits: int, llamacpp_effect: bool) -> str:
        rows = prompts[base]
        same = sum(r["identical_with_adapter"] for r in rows), sum(r["identical_without_adapter"] for r in rows)
        effect = span([r["adapter_effect_on_logits"] for r in rows], 1)
        if llamacpp_effect:
            effect += f" (llama.cpp: {span([r['adapter_effect_on_logits_llamacpp'] for r in rows], 1)})"
        diff = span([r["logits_max_abs_diff_with_adapter"] for r in rows], digits)
        return f"| {label} | {same[0]} of {len(rows)} / {same[1]} of {len(rows)} | {diff} | {effect} |"

    q4 = prompts["q4_1"]
    divergences = [
        r[key] for r in q4 for key in ("first_divergence_with_adapter", "first_divergence_without_adapter") if r[key]
    ]
    budget = max(r["generated"] for rows in prompts.values() for r in rows)  # tokens per prompt, unless EOS first
    adapter, conversion = run["adapter"], run["conversion"]
    assert conversion["adapter_modules"] < 210 and not conversion["rank_pattern"]
    assert_states(
        "benchmarks",
        row("f32", "that GGUF dequantized to f32 (the weights transformers runs)", 3, False),
        row("q4_1", "the Q4_1 GGUF as shipped", 2, True),
        f"{run['machine']['cpus']}-core CPU, llama-cpp-python {run['versions']['llama_cpp_python']}",
        f"({adapter['trained_steps']} steps, {adapter['kept']} projections kept, r = {conversion['r']})",
        f"{len(prompts['f32'])} GSM8K test prompts are decoded greedily for {budget} tokens",
        "moves the logits by up to "
        f"{max(max(r['logits_max_abs_diff_with_adapter'], r['logits_max_abs_diff_without_adapter']) for r in q4):.1f}",
        f"(first divergence at tokens {min(divergences)} to {max(divergences)})",
    )


# --- the GPU kit's last run ----------------------------------------------------------------------------------------


def test_gpu_kit_page_shows_the_committed_cuda_runs():
    """Each committed CUDA run's table is on the page exactly as the kit renders it, and its reading's numbers are the
    run's (the v0.1 / scaling-gate comparisons: the committed gpu_gate_study runs)."""
    kit = load_module(REPO / "benchmarks" / "gpu" / "run.py", "gpu_kit_run")
    runs = sorted(RESULTS.glob("gpu_kit_cuda-*.json"))
    assert runs, "no GPU run committed"
    for path in runs:
        summary = json.loads(path.read_text())
        assert summary["gpu"]["name"] and summary["versions"]["torch"] and summary["command"] and summary["date"]
        assert kit.render_table(summary) in page("gpu-kit"), (
            f"the GPU kit page's table is not the one {path.name} renders"
        )

    summary = result("gpu_kit_cuda-h200.json")
    big, small = summary["speed"]["llama3-8b-shapes"], summary["speed"]["smollm2-135m-shapes"]
    memory = summary["memory"]["methods"]
    study = RESULTS / "gpu_gate_study"
    second = {s: json.loads((study / f"speed_{s}_cuda-h200_bfloat16_weight-gate_run2.json").read_text())["ratios"]
              for s in ("llama3-8b-shapes", "smollm2-135m-shapes")}  # fmt: skip
    scaling = {s: json.loads((study / f"speed_{s}_cuda-h200_bfloat16_scaling-gate.json").read_text())
               for s in ("llama3-8b-shapes", "smollm2-135m-shapes")}  # fmt: skip
    peak = big["peak_memory_bytes"]
    dropped = big["settings"]["adapters"] - big["settings"]["adapters"] // 2
    step_ms = {v: big["median_step_seconds"][v] * 1000 for v in ("lora", "lora_same")}
    warmup_extra = big["ratios"]["warmup"] - 1
    from wlora_trl.config import WeightLoraConfig

    share = WeightLoraConfig.__dataclass_fields__["selection_steps"].default  # T's default fraction of the steps

    def gates(key: str, shapes: str) -> str:
        return span([summary["speed"][shapes]["ratios"][key], second[shapes][key]], 2)

    scaling_peak = scaling["llama3-8b-shapes"]["peak_memory_bytes"]
    assert_states(
        "gpu-kit",
        f"about {sum(step['seconds'] for step in summary['steps'].values()) / 60:.0f} minutes",
        f"({peak['lora'] / MIB:.0f} MiB at Llama-3-8B shapes, {memory['lora']['warmup']['peak'] / MIB:.0f} MiB in the "
        "Trainer runs)",
        f"WeightLoRA peaks {1 - peak['switched'] / peak['lora']:.0%} (8B shapes) and "
        f"{1 - memory['weightlora']['after_switch']['peak'] / memory['lora']['after_switch']['peak']:.0%} (Trainer) "
        "below LoRA",
        f"({big['ratios']['switched']:.3f} and {small['ratios']['switched']:.3f})",
        f"({big['ratios']['plus_switched']:.2f} and {small['ratios']['plus_switched']:.2f}: half the adapter calls",
        f"The switch takes {small['switch_seconds']['switched'] * 1000:.0f} ms (SmolLM2 shapes) and "
        f"{big['switch_seconds']['switched'] * 1000:.0f} ms (8B shapes)",
        f"{big['ratios']['warmup']:.2f} (8B shapes) and {small['ratios']['warmup']:.2f} (SmolLM2 shapes).",
        f"from {step_ms['lora']:.0f} to {step_ms['lora_same']:.0f} ms, about "
        f"{(step_ms['lora'] - step_ms['lora_same']) / dropped:.1f} ms per adapter and step",
        f"T ≈ {share:.1%} of the steps, so {warmup_extra:.0%} on it is {warmup_extra * share:.2%} of a run",
        f"v0.1's hook gate measured {gates('warmup_hooks', 'llama3-8b-shapes')} (8B) and "
        f"{gates('warmup_hooks', 'smollm2-135m-shapes')} (SmolLM2) against {gates('warmup', 'llama3-8b-shapes')} and "
        f"{gates('warmup', 'smollm2-135m-shapes')} for the weight gate over two kit runs",
        f"measured {scaling['llama3-8b-shapes']['ratios']['warmup']:.2f} and "
        f"{scaling['smollm2-135m-shapes']['ratios']['warmup']:.2f} but kept",
        f"warm-up peak {scaling_peak['warmup'] / MIB:.0f} against LoRA's {scaling_peak['lora'] / MIB:.0f} MiB",
    )


# --- lm-eval on the offline SmolLM2 --------------------------------------------------------------------------------


def wall_clock_minutes(runs: list[dict]) -> float:
    """From the first run's start to the last one's end (each records when it finished and how long it ran)."""
    from datetime import datetime, timedelta

    ends = [datetime.fromisoformat(run["date"]) for run in runs]
    starts = [end - timedelta(seconds=run["wall_seconds"]) for end, run in zip(ends, runs)]
    return (max(ends) - min(starts)).total_seconds() / 60


def test_evaluation_page_shows_the_committed_lm_eval_runs():
    from wlora_trl.evaluation.table import format_text

    folder = REPO / "eval" / "results" / "smollm2-135m-instruct-cpu"
    runs = {path.stem: json.loads(path.read_text()) for path in folder.glob("*.json")}
    labels = {
        "arc_challenge": ("ARC-Challenge (test)", "acc / acc_norm", ["acc", "acc_norm"]),
        "boolq": ("BoolQ (validation)", "acc", ["acc"]),
        "hellaswag": ("HellaSwag (validation)", "acc / acc_norm", ["acc", "acc_norm"]),
        "gsm8k": (
            "GSM8K (test, 5-shot)",
            "exact_match (strict / flexible)",
            ["exact_match (strict-match)", "exact_match (flexible-extract)"],
        ),
    }
    assert set(runs) == set(labels)

    def stderr(value: float) -> str:
        return "0" if value == 0 else f"{value:.3f}"

    rows = []
    for task, (label, metric_label, metrics) in labels.items():
        run = runs[task]
        scores = [run["results"]["base"][task][m] for m in metrics]
        n = run["n_samples"][task]
        rows.append(
            f"| {label} | {metric_label} | first {n['effective']} of {n['original']} | "
            + " / ".join(f"{s['value']:.4f}" for s in scores)
            + " | "
            + " / ".join(stderr(s["stderr"]) for s in scores)
            + f" | {run['wall_seconds'] / 60:.1f} min |"
        )
        assert run["settings"]["num_fewshot"] is None and not run["settings"]["apply_chat_template"]
        assert run["settings"]["dtype"] == "float32"
    dates = {run["date"][:10] for run in runs.values()}
    versions = {run["environment"]["versions"]["lm_eval"] for run in runs.values()}
    assert len(dates) == len(versions) == 1
    arc = runs["arc_challenge"]
    assert_states(
        "evaluation",
        *rows,
        f"lm-eval {versions.pop()} default shots, no chat template, {dates.pop()}",
        f"{wall_clock_minutes(list(runs.values())):.0f} minutes in all",
    )
    assert format_text(arc["table"], ["base"]) in page("evaluation")


# --- DPO after the switch ------------------------------------------------------------------------------------------


def test_trainers_page_shows_the_committed_dpo_reinit_run():
    module = load_module(REPO / "benchmarks" / "dpo_reinit.py", "dpo_reinit_benchmark")
    committed = result("dpo_reinit_tiny.json")
    text = page("trainers")
    assert module.markdown_table(committed) in text
    seeds, t = len(committed["seeds"]), committed["T"]
    assert f"T = {t}, {seeds} seeds" in prose(text)
    # The claim the page makes of the committed runs: with reinit=True step T+1 restarts at ln 2, on every seed.
    assert all(abs(run["loss_at_T+1"] - committed["ln2"]) < 1e-6 for run in committed["runs"][f"reinit_T{t}_plus5"])


def test_the_quickstart_shows_the_flagship_run_as_measured():
    """The flagship's expected output and wall times (docs/source/quickstart.md) are `benchmarks/flagship.py`'s
    table of its committed JSON, and the switch line is the one that run printed."""
    flagship = load_module(REPO / "benchmarks" / "flagship.py", "flagship")
    measured = result("flagship.json")
    table = flagship.render(measured)
    assert (RESULTS / "flagship.md").read_text() == table
    assert table in page("quickstart"), "docs/source/quickstart.md: paste benchmarks/results/flagship.md"
    switch = measured["runs"]["accelerate_launch"]["switch_line"]
    assert switch and f"`{switch}`" in page("quickstart")
    # Both launchers train the same run: the recipe gives a CPU process the machine's cores under accelerate launch.
    runs = measured["runs"]
    assert runs["accelerate_launch"]["after"]["heldout_loss"] == pytest.approx(runs["python"]["after"]["heldout_loss"])
    assert (
        "uses 2 threads instead" in runs["accelerate_launch"]["threads_line"] and runs["python"]["threads_line"] is None
    )
    ratio = measured["train_time_ratio_accelerate_over_python"]
    assert f"trained {ratio:.2f}x longer than the `python` one" in prose(page("quickstart"))


# --- mixture-of-experts: zeroing single experts against dropping blocks ---------------------------------------------


def test_trainers_page_shows_the_committed_experts_zeroing_run():
    """The evidence trainers.md gives for leaving per-expert omega out: the committed table, and its claims (zeroed
    experts keep the file's size and the step's time; dropped blocks shrink both)."""
    module = load_module(REPO / "benchmarks" / "experts_zeroing.py", "experts_zeroing_benchmark")
    committed = result("experts_zeroing_cpu.json")
    assert module.markdown_table(committed) in page("trainers")
    assert (RESULTS / "experts_zeroing_cpu.md").read_text() == module.markdown(committed)
    states = committed["states"]
    zeroed, dropped = states["zeroed"], states["dropped"]
    assert zeroed["saved"]["bytes"] == states["all"]["saved"]["bytes"]
    assert zeroed["saved"]["nonzero_elements"] < 0.6 * zeroed["saved"]["elements"]  # half the experts really zeroed
    share = dropped["saved"]["bytes"] / states["all"]["saved"]["bytes"]
    assert_states(
        "trainers",
        f"left the step at {zeroed['step_ratio']:.2f} of the full adapter's time (within noise) and the saved file byte "
        f"for byte as large; dropping the blocks took the step to {dropped['step_ratio']:.2f} and the file to "
        f"{share:.0%}.",
    )
    assert abs(zeroed["step_ratio"] - 1) < 0.1 and dropped["step_ratio"] < 0.9
