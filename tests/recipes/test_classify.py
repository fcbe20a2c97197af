"""The classification recipe (`wlora_trl.recipes.classify`) on a tiny encoder for every --method and on a regression
label column: the method did what it claims (WeightLoRA's selection, AdaLoRA's allocation, EVA's ranks), the metric
in eval_results.json is the one recomputed here from the model's logits, and the saved adapter reloads with stock
PEFT, in a process that never imports wlora_trl, to the trained logits. The last test runs the recipe on the real
all-MiniLM-L6-v2 and real GLUE tasks (slow)."""

from __future__ import annotations

import json
import random
import string
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from scipy.stats import spearmanr

from tests.testing_utils import char_tokenizer, tiny_bert_classifier
from wlora_trl._offline.data import resolve_data_dir
from wlora_trl.recipes import classify
from wlora_trl.recipes.tasks import glue

N_ADAPTERS = 12  # the tiny BERT: 2 layers x (query, key, value, attention output, intermediate, output)
RANK = 8
METHODS = {
    "lora": ["--method", "lora"],
    "weightlora": ["--method", "weightlora"],
    "weightlora_plus": ["--method", "weightlora", "--plus", "true"],
    "random": ["--method", "random"],
    # AdaLoRA's singular values start at 0 and A, B at N(0, 0.02): at 1e-2 ten steps move the logits by ~3e-5 only,
    # too little for the reload check to prove anything; 0.1 moves them by ~2e-2. The pooler stays frozen (the user's
    # --lora_modules_to_save): trained at 0.1 its tanh saturates and hides the adapters' effect (1e-5).
    "adalora": ["--method", "adalora", "--learning_rate", "0.1", "--lora_modules_to_save", "classifier"],
    "eva": ["--method", "eva"],
}

STOCK_RELOAD = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import AutoModelForSequenceClassification
    from peft import PeftModel
    base_dir, jobs_file = sys.argv[1:]
    for job in json.load(open(jobs_file)):
        base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=job["num_labels"])
        model = PeftModel.from_pretrained(base, job["adapter"]).eval()
        inputs = torch.load(job["inputs"])
        with torch.no_grad():
            logits = model(**inputs).logits
            for module in model.modules():  # the adapters off, the trained head kept: the adapters' own effect
                if hasattr(module, "lora_A"):
                    module.enable_adapters(False)
            without = model(**inputs).logits
        torch.save({"logits": logits, "without_adapters": without}, job["output"])
    assert not any(name.startswith("wlora_trl") for name in sys.modules), "stock reload imported wlora_trl"
    """
)


def write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def pair_rows(count: int, seed: int) -> list[dict]:
    """Sentence pairs; label 1 iff the first sentence starts with a letter from a to m (learnable, not trivial)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(4, 12)))
        b = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(4, 12)))
        rows.append({"sentence1": a, "sentence2": b, "label": int(a[0] <= "m")})
    return rows


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    """A tiny BERT encoder (no head: the recipe adds one, as for MiniLM) and the character tokenizer, in a folder."""
    folder = tmp_path_factory.mktemp("tiny_encoder")
    tiny_bert_classifier(seed=0).bert.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def tiny_flags(encoder: Path, output_dir: Path, data: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(encoder), "--output_dir", str(output_dir), "--dataset_name", str(data),
        "--max_steps", "10", "--selection_steps", "3", "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "64", "--learning_rate", "1e-2", "--max_length", "32", "--logging_steps", "5",
        "--report_to", "none", "--disable_tqdm", "true", "--use_cpu", "true", "--bf16", "false", "--seed", "0", *extra,
    ]  # fmt: skip


def run_keeping_logits(flags: list[str]) -> tuple[dict, np.ndarray]:
    """The recipe's summary and the trained model's eval logits (captured at the 'after' evaluation)."""
    captured = {}
    evaluate = classify._evaluate

    def evaluate_and_keep(trainer, spec):
        metrics = evaluate(trainer, spec)
        captured["logits"] = trainer.predict(trainer.eval_dataset).predictions
        return metrics

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(classify, "_evaluate", evaluate_and_keep)
        summary = classify.main(*classify.make_parser().parse_args_and_config(flags))
    return summary, captured["logits"]


def eval_inputs(encoder: Path, data: Path, text_columns: str, label_column: str, path: Path) -> dict:
    """The eval split as one padded batch, exactly as the recipe tokenizes it (DataCollatorWithPadding)."""
    from transformers import AutoTokenizer, DataCollatorWithPadding

    task = glue.load_task(dataset_name=str(data), text_columns=text_columns, label_column=label_column)
    tokenizer = AutoTokenizer.from_pretrained(encoder)
    dataset = glue.tokenized_dataset(task.eval, tokenizer, 32, task.spec).remove_columns("labels")
    batch = DataCollatorWithPadding(tokenizer)([dataset[i] for i in range(len(dataset))])
    torch.save(dict(batch), path)
    return {"labels": np.array([e.label for e in task.eval]), "spec": task.spec}


@pytest.fixture(scope="module")
def trained(encoder, tmp_path_factory):
    """Every method on the same pair task (F1 + accuracy, MRPC's metric) and one regression run; then one stock-PEFT
    process reloads every adapter. {name: {"summary", "logits", "reloaded", "output_dir", "labels"}}."""
    root = tmp_path_factory.mktemp("classify")
    pairs = root / "pairs"
    write_jsonl(pairs / "train.jsonl", pair_rows(96, seed=1))
    write_jsonl(pairs / "validation.jsonl", pair_rows(40, seed=2))
    regression = root / "scores.jsonl"  # one file: every 5th row is eval
    rng = random.Random(3)
    texts = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(4, 12))) for _ in range(100)]
    write_jsonl(regression, [{"text": t, "score": sum(c in "aeiou" for c in t) / len(t) * 5} for t in texts])

    pair_eval = eval_inputs(encoder, pairs, "sentence1,sentence2", "label", root / "pair_inputs.pt")
    regression_eval = eval_inputs(encoder, regression, "text", "score", root / "regression_inputs.pt")
    runs, jobs = {}, []
    for name, method_flags in METHODS.items():
        out = root / name
        flags = tiny_flags(encoder, out, pairs, "--text_columns", "sentence1,sentence2", "--metric", "f1")
        summary, logits = run_keeping_logits([*flags, *method_flags])
        runs[name] = {"summary": summary, "logits": logits, "output_dir": out, "labels": pair_eval["labels"]}
        jobs.append({"adapter": str(out), "num_labels": 2, "inputs": str(root / "pair_inputs.pt")})
    out = root / "regression"
    flags = tiny_flags(encoder, out, regression, "--text_columns", "text", "--label_column", "score")
    summary, logits = run_keeping_logits([*flags, "--method", "weightlora"])
    runs["regression"] = {"summary": summary, "logits": logits, "output_dir": out, "labels": regression_eval["labels"]}
    jobs.append({"adapter": str(out), "num_labels": 1, "inputs": str(root / "regression_inputs.pt")})

    for job, name in zip(jobs, runs):
        job["output"] = str(root / f"{name}_reloaded.pt")
    (root / "jobs.json").write_text(json.dumps(jobs))
    subprocess.run([sys.executable, "-c", STOCK_RELOAD, str(encoder), str(root / "jobs.json")], check=True)
    for job, name in zip(jobs, runs):
        runs[name]["reloaded"] = torch.load(job["output"])
    return runs


@pytest.mark.parametrize("name", [*METHODS, "regression"])
def test_saved_adapter_reloads_with_stock_peft_to_the_trained_logits(trained, name):
    run = trained[name]
    reloaded = run["reloaded"]["logits"].numpy()
    assert reloaded.shape == run["logits"].shape
    error = np.abs(reloaded - run["logits"]).max()
    assert error < 1e-5
    effect = np.abs(reloaded - run["reloaded"]["without_adapters"].numpy()).max()
    assert effect > 1e3 * max(error, 1e-6)  # the adapters themselves changed the logits, and they reloaded


@pytest.mark.parametrize("name", list(METHODS))
def test_the_reported_f1_and_accuracy_are_those_of_the_logits(trained, name):
    run = trained[name]
    predictions, labels = run["logits"].argmax(-1), run["labels"]
    true_positive = int(((predictions == 1) & (labels == 1)).sum())
    f1 = 2 * true_positive / ((predictions == 1).sum() + (labels == 1).sum())
    accuracy = float((predictions == labels).mean())
    after = run["summary"]["after"]
    assert after["eval_f1"] == pytest.approx(f1) and after["eval_accuracy"] == pytest.approx(accuracy)
    assert after["eval_score"] == pytest.approx((f1 + accuracy) / 2) == run["summary"]["score"]["after"]
    shifted = run["logits"] - run["logits"].max(-1, keepdims=True)
    cross_entropy = -(shifted[np.arange(len(labels)), labels] - np.log(np.exp(shifted).sum(-1))).mean()
    assert after["eval_loss"] == pytest.approx(cross_entropy, abs=1e-5)
    results = json.loads((run["output_dir"] / "eval_results.json").read_text())
    assert results["metric"] == "f1" and results["before"]["eval_loss"] != after["eval_loss"]
    assert "| F1 (positive class) |" in (run["output_dir"] / "eval_results.md").read_text()


def test_the_summary_counts_the_classes_the_trained_model_predicts(trained):
    for name in METHODS:
        run = trained[name]
        predicted = np.unique(np.argmax(run["logits"], axis=-1))
        assert run["summary"]["after_predicted_classes"] == predicted.size, name
        assert run["summary"]["after_predicted_class"] == (int(predicted[0]) if predicted.size == 1 else None), name
    assert trained["regression"]["summary"]["after_predicted_classes"] is None


def test_a_model_that_predicts_one_class_for_every_row_is_called_out(encoder, tmp_path, capsys):
    """Every row the same text: the model cannot tell rows apart, so it predicts one class for all of them, and its
    accuracy is the majority's. The closing lines say so, and what to change, instead of showing it as learning."""
    data = tmp_path / "same_text.jsonl"  # one file: every 5th row is eval
    write_jsonl(data, [{"text": "abcdefg", "label": int(i % 3 == 0)} for i in range(60)])
    flags = tiny_flags(encoder, tmp_path / "out", data, "--text_columns", "text", "--label_column", "label")
    summary = classify.main(*classify.make_parser().parse_args_and_config([*flags, "--method", "lora"]))
    assert summary["after_predicted_classes"] == 1
    printed = " ".join(capsys.readouterr().out.split())
    assert f"for all {summary['eval_examples']} validation rows" in printed
    assert f"({100 * summary['after']['eval_accuracy']:.1f}%" in printed  # the accuracy the table shows
    assert "Train longer (--max_steps) or raise --learning_rate" in printed


def test_a_model_collapsed_onto_the_minority_class_is_stated_at_that_class_share(encoder, tmp_path, capsys):
    """The warning states the share of the class the model predicts, which is its accuracy: here the minority's
    (25%), not the majority's (75%; it used to say "the majority class's (75.0%)" beside a table of 25.0%). Every row
    has the same text and 9 in 10 training labels are 1, so the model predicts 1 for every row; 1 in 4 eval rows is."""
    data = tmp_path / "skewed"
    write_jsonl(data / "train.jsonl", [{"text": "abcdefg", "label": int(i % 10 != 0)} for i in range(80)])
    write_jsonl(data / "validation.jsonl", [{"text": "abcdefg", "label": int(i % 4 == 0)} for i in range(20)])
    flags = tiny_flags(encoder, tmp_path / "out", data, "--text_columns", "text", "--label_column", "label")
    summary = classify.main(*classify.make_parser().parse_args_and_config([*flags, "--method", "lora"]))
    assert (summary["after_predicted_classes"], summary["after_predicted_class"]) == (1, 1)
    assert summary["after"]["eval_accuracy"] == summary["after_predicted_class_share"] == 0.25
    assert summary["majority_accuracy"] == 0.75
    printed = " ".join(capsys.readouterr().out.split())
    assert "predicts one class (1) for all 20 validation rows, so its accuracy is that class's share (25.0%" in printed
    assert "the majority class's (75.0%)" not in printed
    results = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert (results["after_predicted_class"], results["after_predicted_class_share"]) == (1, 0.25)


def test_the_one_class_warning_names_the_class_and_its_share():
    summary = {"after_predicted_classes": 1, "after_predicted_class": 0, "after_predicted_class_share": 0.375,
               "majority_accuracy": 0.625, "eval_examples": 408, "label_names": ["not_equivalent", "equivalent"]}  # fmt: skip
    warning = " ".join(classify.one_class_warning(summary).split())
    assert "predicts one class ('not_equivalent') for all 408 validation rows" in warning
    assert "its accuracy is that class's share (37.5%; the majority class's is 62.5%)" in warning
    majority = {**summary, "after_predicted_class": 1, "after_predicted_class_share": 0.625}
    assert "its accuracy is the majority class's share (62.5%)" in classify.one_class_warning(majority)
    assert classify.one_class_warning({**summary, "after_predicted_classes": 2}) == ""


def test_a_float_label_column_trains_a_regression_and_reports_pearson_and_spearman(trained):
    run = trained["regression"]
    summary, predictions, labels = run["summary"], run["logits"].reshape(-1), run["labels"]
    assert summary["num_labels"] == 1 and summary["metric"] == "pearson" and run["logits"].shape == (20, 1)
    after = summary["after"]
    assert after["eval_pearson"] == pytest.approx(np.corrcoef(predictions, labels)[0, 1], abs=1e-6)
    assert after["eval_spearman"] == pytest.approx(spearmanr(predictions, labels).statistic, abs=1e-6)
    assert after["eval_loss"] == pytest.approx(float(((predictions - labels) ** 2).mean()), rel=1e-5)  # MSE
    assert summary["majority_accuracy"] is None and summary["kept_adapters"] == N_ADAPTERS // 2


def adapter_tensors(output_dir: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(output_dir / "adapter_model.safetensors"), "pt") as f:
        return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}


def test_every_method_adapts_the_encoder_layers_only_and_trains_the_head_and_the_pooler(trained, encoder):
    with safe_open(str(encoder / "model.safetensors"), "pt") as f:
        base_pooler = f.get_tensor("pooler.dense.weight")
    for name in METHODS:
        summary, tensors = trained[name]["summary"], adapter_tensors(trained[name]["output_dir"])
        assert len(summary["ranks"]) == N_ADAPTERS  # no pooler: only the linear layers inside the layers
        assert all(".layer." in module for module in summary["ranks"])
        head = {f"base_model.model.{m}.{p}" for m in ("classifier", "bert.pooler.dense") for p in ("weight", "bias")}
        if "--lora_modules_to_save" in METHODS[name]:  # the user's list replaces the default head
            assert {k for k in tensors if "pooler" in k} == set() and head - set(tensors) == {
                "base_model.model.bert.pooler.dense.weight",
                "base_model.model.bert.pooler.dense.bias",
            }
            continue
        assert head <= set(tensors), name
        with safe_open(str(trained[name]["output_dir"] / "adapter_model.safetensors"), "pt") as f:
            moved = (f.get_tensor("base_model.model.bert.pooler.dense.weight") - base_pooler).abs().max()
        assert moved > 1e-3, name  # the pooler trained (fully, as the head does), it is not the base's copy


def test_the_pooler_trains_with_the_head_unless_the_user_names_the_targets_or_the_model_has_none():
    model = tiny_bert_classifier()
    assert classify.default_head(model, targets_given=False) == ["classifier", "pooler"]
    assert classify.default_head(model, targets_given=True) == ["classifier"]  # all-linear may adapt the pooler
    model.bert.pooler = None  # BertModel(add_pooling_layer=False)
    assert classify.default_head(model, targets_given=False) == ["classifier"]


def test_lora_keeps_every_adapter_at_rank_r(trained):
    summary = trained["lora"]["summary"]
    assert set(summary["ranks"].values()) == {RANK}
    counts = summary["trainable_parameters"]
    assert counts["start"] == counts["peak"] == counts["end"]


@pytest.mark.parametrize("name, rank", [("weightlora", RANK), ("weightlora_plus", 2 * RANK), ("random", RANK)])
def test_weightlora_and_random_keep_half_of_the_adapters(trained, name, rank):
    summary = trained[name]["summary"]
    assert (summary["kept_adapters"], summary["total_adapters"]) == (N_ADAPTERS // 2, N_ADAPTERS)
    assert sorted(summary["ranks"].values()) == [0] * (N_ADAPTERS // 2) + [rank] * (N_ADAPTERS // 2)
    counts, lora = summary["trainable_parameters"], trained["lora"]["summary"]["trainable_parameters"]
    omegas = 0 if name == "random" else N_ADAPTERS  # random selection trains no omega
    assert counts["start"] == lora["start"] + omegas  # the warm-up: every adapter (and one omega each)
    if rank == RANK:
        assert counts["end"] < counts["start"]  # half the adapters (WeightLoRA+ doubles their rank instead)


def test_adalora_allocation_ran_every_step_down_to_weightloras_rank_budget(trained):
    peer = trained["adalora"]["summary"]["peer"]
    assert (peer["init_r"], peer["target_r"]) == (RANK, RANK // 2)  # k = 0.5 of LoRA's rank
    assert (peer["tinit"], peer["tfinal"]) == (1, 3)  # 10% and 30% of 10 steps
    history = peer["budget_history"]
    assert history[0] == [0, N_ADAPTERS * RANK] and history[-1][1] == N_ADAPTERS * RANK // 2
    assert [ranks for _, ranks in history] == sorted((ranks for _, ranks in history), reverse=True)
    assert len(history) > 2  # the cubic schedule shrank it over several steps, not in one jump
    assert peer["total_rank"] == sum(peer["final_ranks"].values()) == N_ADAPTERS * RANK // 2
    assert len(set(peer["final_ranks"].values())) > 1  # allocated by importance, not evenly
    # The saved adapter holds only the kept singular triplets (PEFT resizes it by the rank pattern it allocated).
    tensors = adapter_tensors(trained["adalora"]["output_dir"])
    assert sum(shape[0] for key, shape in tensors.items() if key.endswith("lora_E")) == N_ADAPTERS * RANK // 2


def test_eva_redistributes_weightloras_rank_budget(trained):
    summary = trained["eva"]["summary"]
    peer = summary["peer"]
    assert (peer["eva_r"], peer["rho"]) == (RANK // 2, 2.0)
    assert peer["total_rank"] == N_ADAPTERS * RANK // 2 and max(peer["final_ranks"].values()) <= RANK
    assert len(set(peer["final_ranks"].values())) > 1  # redistributed by explained variance
    config = json.loads((trained["eva"]["output_dir"] / "adapter_config.json").read_text())
    assert config["init_lora_weights"] == "eva" and config["lora_alpha"] == 8  # LoRA's alpha/r = 16/8 = 8/4
    for module, rank in peer["final_ranks"].items():
        if rank:
            assert config["rank_pattern"].get(module, config["r"]) == rank
        else:  # EVA removes a module it gives no rank
            assert module not in config["target_modules"]


# --- refused before anything loads --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "adalora", "--plus", "true"], "--plus is WeightLoRA+"),
        (["--method", "eva", "--reinit", "false"], "--reinit false is WeightLoRA's"),
        (["--method", "adalora", "--k", "18"], "pass k as a fraction"),
        (["--method", "adalora", "--max_steps", "4", "--adalora_tinit", "2", "--adalora_tfinal", "2"], "no budgeting"),
        (["--method", "adalora", "--k", "1.0"], "target_r < init_r"),
        (["--method", "lora", "--plus", "true"], "no meaning with --method lora"),
    ],
)
def test_bad_method_flags_are_refused_before_the_model_or_data_load(tmp_path, monkeypatch, extra, message):
    def refuse(*args, **kwargs):
        raise AssertionError("the data was loaded: the error should have come first")

    monkeypatch.setattr(glue, "load_task", refuse)
    flags = ["--output_dir", str(tmp_path), "--task", "rte", *extra]
    with pytest.raises(ValueError, match=message):
        classify.main(*classify.make_parser().parse_args_and_config(flags))


@pytest.mark.parametrize(
    "flags",
    [["--text_columns", "sentence1,sentence2"], ["--text_columns", "sentence1", "sentence2"]],
    ids=["comma-separated", "space-separated"],
)
def test_a_sentence_pair_can_be_named_either_way(flags):
    """`--text_columns a,b` and `--text_columns a b` both name a pair (the second once failed in HfArgumentParser with
    "Some specified arguments are not used: ['sentence2']")."""
    script_args, _, _ = classify.make_parser().parse_args_and_config(flags)
    assert glue.parse_columns(script_args.text_columns) == ("sentence1", "sentence2")


def test_three_text_columns_are_refused_however_they_are_spelled():
    for flags in (["--text_columns", "a", "b", "c"], ["--text_columns", "a,b", "c"]):
        script_args, _, _ = classify.make_parser().parse_args_and_config(flags)
        with pytest.raises(ValueError, match="give one column or two"):
            glue.parse_columns(script_args.text_columns)


def test_defaults_are_the_documented_ones():
    script_args, training_args, model_args = classify.make_parser().parse_args_and_config([])
    assert (model_args.lora_r, model_args.lora_alpha, model_args.lora_dropout) == (8, 16, 0.05)
    assert script_args.method == "weightlora" and script_args.task is None and script_args.k == "0.5"
    assert model_args.model_name_or_path == "all-minilm-l6-v2" and training_args.warmup_steps == 0.06


# --- on the real model and data -----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(resolve_data_dir() is None, reason="no local data folder (shared/data)")
@pytest.mark.parametrize(
    "task, method, metric_keys",
    [
        ("mrpc", "weightlora", {"eval_f1", "eval_accuracy"}),
        ("cola", "eva", {"eval_matthews_correlation"}),
        ("rte", "adalora", {"eval_accuracy"}),
    ],
)
def test_minilm_on_a_real_glue_task(tmp_path, monkeypatch, task, method, metric_keys):
    """all-MiniLM-L6-v2 from its package, the local GLUE task, a few steps: the 36 encoder projections are the
    adapters, the head is in the stock adapter, the task's official metric is reported before and after."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / task
    flags = [
        "--task", task, "--method", method, "--output_dir", str(out), "--max_steps", "6", "--selection_steps", "3",
        "--per_device_train_batch_size", "8", "--max_train_samples", "64", "--max_eval_samples", "64",
        "--max_length", "128", "--logging_steps", "2", "--report_to", "none", "--disable_tqdm", "true",
    ]  # fmt: skip
    summary = classify.main(*classify.make_parser().parse_args_and_config(flags))
    assert summary["task"] == task and summary["eval_examples"] == 64
    assert len(summary["ranks"]) == 36 and not any("pooler" in module for module in summary["ranks"])
    if method == "weightlora":
        assert (summary["kept_adapters"], summary["total_adapters"]) == (18, 36)
    else:
        assert summary["peer"]["total_rank"] == 36 * 4  # k * n * r: WeightLoRA's 18 adapters of rank 8
    for phase in ("before", "after"):
        assert metric_keys | {"eval_loss", "eval_score"} == set(summary[phase])
        assert all(-1 <= summary[phase][key] <= 1 for key in metric_keys)
    assert summary["peak_rss_mib"] > 100 and summary["timings_s"]["train"] > 0
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert {"base_model.model.classifier.weight", "base_model.model.bert.pooler.dense.weight"} <= set(f.keys())
    assert "| GLUE score |" in (out / "eval_results.md").read_text()
