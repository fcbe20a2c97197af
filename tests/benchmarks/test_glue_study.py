"""The study drivers' machinery without training: the shared engine (`benchmarks/study.py`: records, resume, changed
settings, STOP, --no_train), the GLUE driver's plan, learning-rate choice, paired statistics and rendering on fake
records, its copy of the paper's numbers, and the GSM8K driver rendering its committed study unchanged with the
peer arms added but not yet run, each sweep in value order."""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks import glue, quality  # noqa: E402
from benchmarks.study import Study, add_study_arguments, finish_arguments, jaccard  # noqa: E402

MODULES = [
    f"bert.encoder.layer.{layer}.{projection}"
    for layer in range(6)
    for projection in ("attention.self.query", "attention.self.key", "attention.self.value",
                       "attention.output.dense", "intermediate.dense", "output.dense")
]  # fmt: skip


def study_args(tmp_path: Path, *extra: str):
    import argparse

    parser = argparse.ArgumentParser()
    add_study_arguments(parser, tmp_path / "runs", str(tmp_path / "work"), tmp_path / "out.json")
    return finish_arguments(parser.parse_args(list(extra)))


# --- the engine ---------------------------------------------------------------------------------------------------


def test_engine_records_resumes_retrains_on_changed_settings_and_stops(tmp_path):
    trained = []

    def train(name, seed, argv, output_dir):
        trained.append((name, seed))
        return {"score": 0.5 + seed, "output": str(output_dir)}

    study = Study(study_args(tmp_path), train)
    record = study.run("task/arm", 1, ["--x", "1"])
    path = tmp_path / "runs" / "task" / "arm_seed1.json"
    assert json.loads(path.read_text()) == record and trained == [("task/arm", 1)]
    assert list(record)[:3] == ["name", "seed", "argv"] and list(record)[-2:] == ["date", "machine"]
    assert record["score"] == 1.5 and record["output"] == str(tmp_path / "work" / "task" / "arm_seed1")

    again = Study(study_args(tmp_path), train)  # a later sitting: the committed record is used
    assert again.run("task/arm", 1, ["--x", "1"]) == record and len(trained) == 1
    assert again.progress() == "1 runs recorded; 0 to go: "

    peek = Study(study_args(tmp_path, "--no_train"), train)
    assert peek.run("task/arm", 1, ["--x", "2"]) is None  # changed settings are not this run's record
    assert peek.run("task/other", 0, ["--x", "1"]) is None and len(trained) == 1
    assert peek.progress() == "0 runs recorded; 2 to go: task/arm_seed1, task/other_seed0"

    assert again.run("task/arm", 1, ["--x", "2"])["argv"] == ["--x", "2"] and len(trained) == 2  # trained again

    (tmp_path / "work").mkdir(exist_ok=True)
    (tmp_path / "work" / "STOP").touch()
    with pytest.raises(SystemExit) as stop:
        again.run("task/next", 0, ["--x", "1"])
    assert stop.value.code == 0 and len(trained) == 2 and not (tmp_path / "runs" / "task" / "next_seed0.json").exists()


def test_jaccard_of_kept_sets():
    assert jaccard([["a", "b"], ["b", "c"], ["a", "b"]]) == pytest.approx((1 / 3 + 1 + 1 / 3) / 3)
    assert jaccard([["a"]]) is None and jaccard([["a"], None]) is None


# --- the GLUE driver on fake records ------------------------------------------------------------------------------


def fake_score(name: str, seed: int) -> float:
    return int(hashlib.sha256(f"{name}/{seed}".encode()).hexdigest()[:6], 16) / 16**6


def fake_train(calls: list):
    """A stand-in for a recipe run: a score fixed by (name, seed), WeightLoRA-like kept sets for the other arms."""

    def train(name, seed, argv, output_dir):
        calls.append((name, seed))
        method, r = argv[argv.index("--method") + 1], int(argv[argv.index("--lora_r") + 1])
        kept = sorted(MODULES, key=lambda m: fake_score(m + name, seed))[:18]
        rank = 2 * r if "--plus" in argv else r
        ranks = {m: r if method == "lora" else (rank if m in kept else 0) for m in MODULES}
        score = fake_score(name, seed)
        return {
            "task": argv[argv.index("--task") + 1], "metric": "accuracy", "score": score,
            "metrics": {"loss": 0.6, "accuracy": score, "f1": score, "score": score}, "train_loss": 0.5,
            "kept": None if method == "lora" else sorted(kept), "ranks": ranks,
            "trainable_parameters": 100 * sum(ranks.values()), "trained_parameters": {"start": 9, "peak": 9, "end": 5},
            "seconds": {"run": 30.0, "train": 20.0, "adapters": 0.1}, "peak_rss_mib": 900.0, "bf16": True,
            "adapter_dir": str(output_dir),
        }  # fmt: skip

    return train


GLUE_FLAGS = [
    "--tasks", "rte", "mrpc", "--arms", "lora", "weightlora", "random", "adalora", "--seeds", "0", "1",
    "--lr_grid", "0.0005", "0.001", "--sweep_task", "rte", "--sweep_ranks", "2", "--sweep_seeds", "1",
]  # fmt: skip


def run_glue(monkeypatch, tmp_path, calls, *extra):
    monkeypatch.setattr(glue, "train_run", fake_train(calls))
    flags = [*GLUE_FLAGS, "--runs_dir", str(tmp_path / "runs"), "--work_dir", str(tmp_path / "work"),
             "--output", str(tmp_path / "glue.json"), *extra]  # fmt: skip
    return glue.main(flags)


def test_glue_plan_learning_rate_choice_and_paired_statistics(tmp_path, monkeypatch, capsys):
    calls: list = []
    run_glue(monkeypatch, tmp_path, calls, "--no_train")
    # 2 tasks x 2 rates, 2 seeds x 2 tasks x 4 arms, the sweep's 3 arms at rank 2 on seed 0
    assert "0 runs recorded; 23 to go: rte/lr_grid/lora_lr0.0005_seed0" in capsys.readouterr().out and not calls

    result = run_glue(monkeypatch, tmp_path, calls)
    # LoRA's first-seed run at the chosen rate is its grid run: trained once
    assert len(calls) == len(set(calls)) == 21
    records = sorted(p.relative_to(tmp_path / "runs").as_posix() for p in (tmp_path / "runs").rglob("*.json"))
    assert "rte/lora_seed1.json" in records and "rte/lora_seed0.json" not in records
    assert "rte/lora_r2_seed0.json" in records and "mrpc/lr_grid/lora_lr0.001_seed0.json" in records

    for task in ("rte", "mrpc"):
        grid = {lr: fake_score(f"{task}/lr_grid/lora_lr{lr}", 0) for lr in (0.0005, 0.001)}
        chosen = max(grid, key=grid.get)
        assert result["learning_rates"]["chosen"][task] == chosen
        assert result["learning_rates"]["grid"][task] == {str(lr): score for lr, score in grid.items()}
        lora = [fake_score(f"{task}/lr_grid/lora_lr{chosen}", 0), fake_score(f"{task}/lora", 1)]
        weightlora = [fake_score(f"{task}/weightlora", seed) for seed in (0, 1)]
        summary = result["summary"][task]
        assert summary["lora"]["score"]["values"] == pytest.approx(lora)
        assert summary["weightlora"]["vs_lora_paired"]["values"] == pytest.approx(
            [w - lo for w, lo in zip(weightlora, lora)]
        )
        assert summary["lora"]["vs_lora_paired"] is None and summary["lora"]["kept_jaccard_across_seeds"] is None
        assert 0 <= summary["adalora"]["kept_jaccard_across_seeds"] <= 1
        random = [fake_score(f"{task}/random", seed) for seed in (0, 1)]
        assert result["random_minus_weightlora"][task]["values"] == pytest.approx(
            [r - w for r, w in zip(random, weightlora)]
        )
        # WeightLoRA keeps 18 of 36 adapters: half of LoRA's parameters, and the shares of its ranks sum to 1
        assert result["overall"]["weightlora"]["share_of_lora_parameters"] == pytest.approx(0.5)
        assert sum(result["rank_shares"][task]["weightlora"]["projection"].values()) == pytest.approx(1)

    assert result["settings"]["tasks"] == ["rte", "mrpc"] and result["settings"]["seeds"] == {
        "rte": [0, 1],
        "mrpc": [0, 1],
    }
    assert result["settings"]["arms"] == ["lora", "weightlora", "random", "adalora"]
    assert set(result["sweep"]) == {"2", "8"} and result["sweep"]["8"]["lora"]["score"]["values"] == [
        result["summary"]["rte"]["lora"]["score"]["values"][0]
    ]  # rank 8 of the sweep is the main runs' first seed
    assert result["total_run_minutes"] == pytest.approx(21 * 30 / 60)

    table = (tmp_path / "glue.md").read_text()
    assert table == glue.markdown(json.loads((tmp_path / "glue.json").read_text()))
    paper = glue.paper_differences()
    assert f"({paper['weightlora']['rte']:+.4f})" in table and f"({paper['adalora']['mrpc']:+.4f})" in table
    assert "| method | params (share of LoRA's) | RTE Acc | MRPC Acc/F1 | Avg |" in table
    assert (tmp_path / "glue.png").read_bytes()[:4] == b"\x89PNG"

    again: list = []  # a second sitting finds every run recorded: nothing trains, the tables are the same
    run_glue(monkeypatch, tmp_path, again)
    assert again == [] and (tmp_path / "glue.md").read_text() == table


def test_fixed_learning_rates_skip_the_grid(tmp_path, monkeypatch):
    calls: list = []
    result = run_glue(monkeypatch, tmp_path, calls, "--learning_rates", "rte=0.003", "mrpc=0.0001", "--sweep_ranks")
    assert result["learning_rates"]["chosen"] == {"rte": 0.003, "mrpc": 0.0001} and len(calls) == 16
    assert all("lr_grid" not in name for name, _ in calls)
    with pytest.raises(SystemExit, match="TASK=RATE"):
        glue.parse_args(["--learning_rates", "qnli=1e-3"])


def test_a_task_lora_does_not_learn_runs_its_grid_only_and_says_why(tmp_path, monkeypatch):
    """By default RTE (TASK_PLANS: not_compared) gets its LR grid and no arms; the tables say why."""
    assert "rte" in glue.GRID_ONLY_TASKS and "rte" not in glue.COMPARED_TASKS
    args = glue.parse_args([])
    assert args.tasks == glue.COMPARED_TASKS and args.grid_only_tasks == glue.GRID_ONLY_TASKS
    assert glue.parse_args(["--tasks", "rte"]).grid_only_tasks == []  # named, a task is compared
    with pytest.raises(SystemExit):
        glue.parse_args(["--tasks", "rte", "--grid_only_tasks", "rte"])

    calls: list = []
    monkeypatch.setattr(glue, "train_run", fake_train(calls))
    flags = ["--tasks", "mrpc", "--grid_only_tasks", "rte", "--arms", "lora", "weightlora", "--seeds", "0",
             "--lr_grid", "0.0005", "0.001", "--sweep_ranks", "--runs_dir", str(tmp_path / "runs"),
             "--work_dir", str(tmp_path / "work"), "--output", str(tmp_path / "glue.json")]  # fmt: skip
    result = glue.main(flags)
    assert sorted(name for name, _ in calls if name.startswith("rte/")) == [
        "rte/lr_grid/lora_lr0.0005",
        "rte/lr_grid/lora_lr0.001",
    ]  # the grid, no arm
    assert (
        len(calls) == 5 and "rte" not in result["summary"] and set(result["learning_rates"]["grid"]) == {"rte", "mrpc"}
    )
    table = (tmp_path / "glue.md").read_text()
    score = fake_score("rte/lr_grid/lora_lr0.001", 0)
    assert (
        f"| RTE | 150 x 16 | 0.0005: {fake_score('rte/lr_grid/lora_lr0.0005', 0):.4f}, 0.001: {score:.4f} | not compared |"
        in table
    )
    assert f"RTE is not compared: {glue.TASK_PLANS['rte'].not_compared}." in table
    assert "| method | params (share of LoRA's) | MRPC Acc/F1 | Avg |" in table


def test_a_failed_run_stops_the_study_with_its_log(tmp_path, monkeypatch):
    monkeypatch.setattr(glue.sys, "executable", "false")  # any command that exits non-zero
    with pytest.raises(SystemExit, match="rte/lora, seed 0 failed"):
        glue.train_run("rte/lora", 0, ["--task", "rte"], tmp_path / "run")


def test_the_papers_numbers_are_the_papers():
    tables = REPO.parent / "shared" / "paper" / "glue_tables.md"
    if not tables.exists():
        pytest.skip("the paper's tables are not beside the repository")
    text = tables.read_text()

    def row(section: str, start: str) -> list[str]:
        block = text.split(section, 1)[1]
        line = next(line for line in block.splitlines() if line.startswith(start))
        return line.split("\t")

    def cells(values: dict) -> list[str]:
        mrpc = "{:.4f}/{:.4f}".format(*values["mrpc"])
        return [f"{values['sst2']:.4f}", f"{values['cola']:.4f}", f"{values['rte']:.4f}", mrpc]

    columns = {"sst2": 3, "cola": 4, "rte": 7, "mrpc": 8}  # in Table 1's rows (method, params, MNLI, SST-2, ...)
    for name, start in (("LoRA", "LoRA (Hu"), ("AdaLoRA", "AdaLoRA"), ("EVA", "EVA"), ("WLoRA K=10", "WLoRA _{K=10}")):
        found = row("## Table 1", start)
        assert [found[columns[t]] for t in ("sst2", "cola", "rte", "mrpc")] == cells(glue.PAPER["table1"][name])
    rlora = row("## Table 7", "\tRLoRA\t0.8209")  # K = 10
    assert [rlora[i] for i in (3, 4, 7, 8)] == cells(glue.PAPER["table7"]["RLoRA K=10"])
    block = text.split("## Table 2", 1)[1].split("## Table 7", 1)[0]
    for rank, methods in glue.PAPER["table2"].items():
        rows = block.split(f"$r = {rank}$", 1)[1].splitlines()[:3]
        for line, (method, values) in zip(rows, methods.items()):
            fields = re.split(r"\t", line)
            assert fields[1] == method
            assert [fields[i] for i in (4, 5, 8, 9)] == cells(values)


def test_the_committed_glue_study_renders_as_committed():
    committed = REPO / "benchmarks" / "results" / "glue.json"
    if not committed.exists():
        pytest.skip("the GLUE study has not been run yet")
    result = json.loads(committed.read_text())
    assert committed.with_suffix(".md").read_text() == glue.markdown(result)
    assert {"tasks", "arms", "seeds"} <= set(result["settings"])


# --- the GSM8K study's sweeps -------------------------------------------------------------------------------------


def test_sweep_points_are_ordered_by_their_value_within_each_group():
    assert quality.sweep_order(["K = 0.25", "K = 0.75", "K = 0.5"]) == ["K = 0.25", "K = 0.5", "K = 0.75"]
    assert quality.sweep_order(["omega_lr = 10", "omega_lr = 1000", "omega_lr = 100", "omega_lr = 1e-1"]) == [
        "omega_lr = 1e-1", "omega_lr = 10", "omega_lr = 100", "omega_lr = 1000",
    ]  # fmt: skip
    # The T sweep's two arms stay in their order, each sorted by T.
    labels = ["weightlora, T = 5", "weightlora, T = 15", "weightlora_keep, T = 5", "weightlora_keep, T = 3"]
    assert quality.sweep_order(labels) == [
        "weightlora, T = 5", "weightlora, T = 15", "weightlora_keep, T = 3", "weightlora_keep, T = 5",
    ]  # fmt: skip
    assert quality.sweep_order(["b", "a = x", "a = 2"]) == ["b", "a = 2", "a = x"]  # no number: kept, after numbers


def test_the_quality_plot_and_tables_show_each_sweep_in_value_order(tmp_path, monkeypatch):
    """The committed study's sweeps were recorded in run order (K = 0.25, 0.75, 0.5; omega_lr = 10, 1000, 100); the
    plot's panels and the tables sort them."""
    import matplotlib.figure

    study = json.loads((REPO / "benchmarks" / "results" / "quality.json").read_text())
    panels = {}

    def keep_labels(figure, path, **kwargs):
        for ax in figure.axes[1:]:
            knob = ax.get_title().split()[2]  # "sweep of {knob} (seed 0)"
            panels[knob] = [label.get_text() for label in ax.get_xticklabels()]

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep_labels)
    quality.plot(study, tmp_path / "quality.png")
    tables = quality.markdown(study)
    for knob, points in study["sweeps"].items():
        ordered = quality.sweep_order(points)
        assert panels[knob] == ordered, knob
        rows = [line.split(" | ")[0].lstrip("| ") for line in tables.split(f"| {knob} |", 1)[1].splitlines()[2:]]
        assert rows[: len(ordered)] == ordered, knob
    assert panels["k"] == ["K = 0.25", "K = 0.5", "K = 0.75"]
    assert panels["omega_lr"] == ["omega_lr = 10", "omega_lr = 100", "omega_lr = 1000"]


# --- end to end on the real model ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_glue_study_smoke_on_minilm(tmp_path):
    """The driver for real with a tiny budget: each run a fresh recipe process on MiniLM and local RTE, records
    committed-style, a second sitting trains nothing and renders the same tables. One rate and no rank sweep: each
    run costs a process start (~10 s of imports), and the grid's choice and the sweep are checked on fake records
    above."""
    import os
    import subprocess

    from wlora_trl._offline.data import resolve_data_dir

    if resolve_data_dir() is None:
        pytest.skip("no local data folder (shared/data or WLORA_TRL_DATA_DIR)")
    out, runs = tmp_path / "glue.json", tmp_path / "runs"
    flags = [
        "--tasks", "rte", "--arms", "lora", "weightlora", "adalora", "--seeds", "0", "--max_steps", "6",
        "--batch_size", "4", "--train_samples", "32", "--eval_samples", "32", "--max_length", "128",
        "--selection_steps", "3", "--lr_grid", "0.0005", "--sweep_task", "rte", "--sweep_ranks",
        "--runs_dir", str(runs), "--work_dir", str(tmp_path / "work"), "--output", str(out),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    script = str(REPO / "benchmarks" / "glue.py")
    done = subprocess.run([sys.executable, script, *flags], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = sorted(p.relative_to(runs).as_posix() for p in runs.rglob("*.json"))
    # LoRA's grid run at the chosen rate is its first seed's run
    assert records == ["rte/adalora_seed0.json", "rte/lr_grid/lora_lr0.0005_seed0.json", "rte/weightlora_seed0.json"]
    result = json.loads(out.read_text())
    weightlora = json.loads((runs / "rte" / "weightlora_seed0.json").read_text())
    assert len(weightlora["kept"]) == 18 and weightlora["trainable_parameters"] < result["summary"]["rte"]["lora"][
        "trainable_parameters"]["mean"]  # fmt: skip
    assert weightlora["peak_rss_mib"] > 100 and weightlora["seconds"]["run"] > weightlora["seconds"]["train"] > 0
    adalora = json.loads((runs / "rte" / "adalora_seed0.json").read_text())
    assert sum(adalora["ranks"].values()) == 36 * 4
    assert result["settings"]["tasks"] == ["rte"] and not result["sweep"]
    table = out.with_suffix(".md").read_text()
    assert "| RTE (1 seed) | weightlora |" in table and out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"

    again = subprocess.run([sys.executable, script, *flags], capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0 and "===" not in again.stdout, again.stderr[-2000:]
    assert out.with_suffix(".md").read_text() == table
