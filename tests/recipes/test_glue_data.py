"""The GLUE-style tasks of the classification recipe: the official metrics against hand-computed values, and the
loading of known tasks (the real local GLUE files) and custom datasets (files written here), with located errors."""

from __future__ import annotations

import json
import math

import pytest

from wlora_trl._offline.data import resolve_data_dir
from wlora_trl.recipes.tasks import DataFormatError, glue
from wlora_trl.recipes.tasks.metrics import (
    average_ranks,
    binary_f1,
    compute,
    matthews_correlation,
    pearson,
    spearman,
)

needs_data = pytest.mark.skipif(resolve_data_dir() is None, reason="no local data folder (shared/data)")


def write_jsonl(path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


# --- metrics, against numbers worked out by hand ------------------------------------------------------------------

PREDICTIONS = [1, 1, 1, 0, 0, 1, 0, 1]
LABELS = [1, 0, 1, 0, 1, 1, 0, 0]  # TP 3, FP 2, FN 1, TN 2


def test_binary_f1_and_accuracy_by_hand():
    # precision 3/5, recall 3/4: F1 = 2 * 3 / (5 + 4) = 2/3; accuracy 5/8
    scores = compute("f1", PREDICTIONS, LABELS)
    assert scores["f1"] == pytest.approx(2 / 3) and scores["accuracy"] == pytest.approx(5 / 8)
    assert scores["score"] == pytest.approx((2 / 3 + 5 / 8) / 2)  # GLUE averages MRPC's pair
    assert binary_f1([0, 0], [1, 1]) == 0.0  # no true positive: 0, as scikit-learn does


def test_matthews_correlation_by_hand():
    # (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (6 - 2) / sqrt(5 * 4 * 4 * 3) = 4 / sqrt(240)
    assert matthews_correlation(PREDICTIONS, LABELS) == pytest.approx(4 / math.sqrt(240))
    assert matthews_correlation([1, 1, 1], [0, 1, 1]) == 0.0  # a constant prediction: undefined, reported as 0
    assert matthews_correlation([0, 1, 2, 2], [0, 1, 2, 2]) == pytest.approx(1.0)  # the multi-class form
    assert compute("matthews", LABELS, LABELS)["score"] == pytest.approx(1.0)


def test_pearson_and_spearman_by_hand():
    x, y = [1.0, 2.0, 3.0, 4.0], [2.0, 1.0, 4.0, 3.0]
    # centred x = (-1.5, -0.5, 0.5, 1.5), y = (-0.5, -1.5, 1.5, 0.5): sum xy = 4 * 0.75 = 3, sum x^2 = sum y^2 = 5
    assert pearson(x, y) == pytest.approx(0.6)
    assert average_ranks([10, 20, 20, 30]).tolist() == [1.0, 2.5, 2.5, 4.0]  # ties share their mean rank
    # ranks of (1, 5, 5, 9) are (1, 2.5, 2.5, 4) against (1, 2, 3, 4): centred sums 4.5 / sqrt(4.5 * 5)
    assert spearman([1, 5, 5, 9], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    scores = compute("pearson", x, y)
    assert scores["score"] == pytest.approx((scores["pearson"] + scores["spearman"]) / 2)
    assert pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) == 0.0  # constant predictions carry no correlation


def test_unknown_metric_is_refused():
    with pytest.raises(ValueError, match="choose one of accuracy, f1, matthews, pearson"):
        compute("auc", [1], [1])


# --- known tasks, on the real local files -------------------------------------------------------------------------


@needs_data
@pytest.mark.parametrize(
    "task, train, held_out, columns, metric",
    [
        ("rte", 2490, 277, ("sentence1", "sentence2"), "accuracy"),
        ("mrpc", 3668, 408, ("sentence1", "sentence2"), "f1"),
        ("cola", 8551, 1043, ("sentence",), "matthews"),
        ("boolq", 2616, 654, ("question", "passage"), "accuracy"),  # one local split, every 5th row held out
    ],
)
def test_known_tasks_load_from_the_local_folder(task, train, held_out, columns, metric):
    loaded = glue.load_task(task)
    assert (len(loaded.train), len(loaded.eval)) == (train, held_out)
    assert loaded.spec.text_columns == columns and loaded.spec.metric == metric and loaded.spec.num_labels == 2
    assert all(len(example.texts) == len(columns) and example.label in (0, 1) for example in loaded.eval)
    assert 0.5 <= loaded.majority_share() < 0.8


@needs_data
def test_the_default_task_is_sst2():
    assert glue.load_task().spec.name == "sst2"


def test_a_bad_label_in_a_known_task_names_the_line(tmp_path):
    good = {"sentence1": "a", "sentence2": "b", "label": 0, "idx": 0}
    write_jsonl(tmp_path / "glue" / "rte" / "train.jsonl", [good, {**good, "label": 2}])
    write_jsonl(tmp_path / "glue" / "rte" / "validation.jsonl", [good])
    with pytest.raises(DataFormatError, match=r"train\.jsonl line 2: 'label' must be 0 or 1 \(0 = entailment"):
        glue.load_task("rte", data_dir=tmp_path)
    write_jsonl(tmp_path / "glue" / "rte" / "validation.jsonl", [{**good, "label": -1}])
    write_jsonl(tmp_path / "glue" / "rte" / "train.jsonl", [good])
    with pytest.raises(DataFormatError, match="hidden test labels: evaluate on validation"):
        glue.load_task("rte", data_dir=tmp_path)


def test_unknown_task_and_missing_columns_are_refused():
    with pytest.raises(ValueError, match="--task 'qnli' is not a known task"):
        glue.load_task("qnli")
    with pytest.raises(ValueError, match="--text_columns"):
        glue.load_task(dataset_name="some/hub-dataset")
    with pytest.raises(ValueError, match="give one column or two"):
        glue.parse_columns("a,b,c")


# --- custom datasets ----------------------------------------------------------------------------------------------


def test_a_float_label_column_is_a_regression(tmp_path):
    rows = [{"text": f"row {i}", "score": i / 4} for i in range(10)]
    rows[3]["score"] = 2  # an int among floats: still a regression value
    write_jsonl(tmp_path / "data.jsonl", rows)
    loaded = glue.load_task(dataset_name=str(tmp_path / "data.jsonl"), text_columns="text", label_column="score")
    assert loaded.spec.regression and loaded.spec.metric == "pearson" and loaded.majority_share() is None
    # one file is cut by position: rows 0 and 5 are eval
    assert [e.texts for e in loaded.eval] == [("row 0",), ("row 5",)] and len(loaded.train) == 8
    assert loaded.train[2].label == 2.0 and isinstance(loaded.train[2].label, float)
    with pytest.raises(ValueError, match="--metric accuracy does not fit a regression"):
        glue.load_task(dataset_name=str(tmp_path / "data.jsonl"), text_columns="text", label_column="score",
                       metric="accuracy")  # fmt: skip


def test_a_folder_of_splits_with_string_labels(tmp_path):
    train = [{"a": "x", "b": "y", "label": name} for name in ("pos", "neg", "neutral", "pos")]
    write_jsonl(tmp_path / "train.jsonl", train)
    (tmp_path / "validation.json").write_text(json.dumps([{"a": "x", "b": "y", "label": "neg"}]))  # a JSON list
    loaded = glue.load_task(dataset_name=str(tmp_path), text_columns="a,b")
    assert loaded.spec.num_labels == 3 and loaded.spec.label_names == ("neg", "neutral", "pos")
    assert [e.label for e in loaded.train] == [2, 0, 1, 2] and loaded.eval[0].label == 0
    (tmp_path / "validation.json").write_text(json.dumps([{"a": "x", "b": "y", "label": "unseen"}]))
    with pytest.raises(DataFormatError, match="validation.json row 1: class 'unseen' never occurs"):
        glue.load_task(dataset_name=str(tmp_path), text_columns="a,b")


def test_mixed_label_kinds_and_missing_fields_are_located(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"t": "a", "label": 1}, {"t": "b", "label": "one"}])
    write_jsonl(tmp_path / "validation.jsonl", [{"t": "a", "label": 1}])
    with pytest.raises(DataFormatError, match="mixes"):
        glue.load_task(dataset_name=str(tmp_path), text_columns="t")
    write_jsonl(tmp_path / "train.jsonl", [{"t": "a", "label": 1}, {"t": "", "label": 0}])
    with pytest.raises(DataFormatError, match=r"train\.jsonl line 2: 't' must be a non-empty string"):
        glue.load_task(dataset_name=str(tmp_path), text_columns="t")
    write_jsonl(tmp_path / "train.jsonl", [{"t": "a", "label": 1}, {"t": "b"}])
    with pytest.raises(DataFormatError, match=r"train\.jsonl line 2 has no 'label' field"):
        glue.load_task(dataset_name=str(tmp_path), text_columns="t")
