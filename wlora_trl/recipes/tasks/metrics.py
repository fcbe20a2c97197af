"""The official GLUE metrics, in numpy: accuracy, F1 (with accuracy, MRPC/QQP), Matthews correlation (CoLA), Pearson
and Spearman correlation (STS-B and any regression label).

Each task names one metric family (`METRICS`); `compute` returns every number of that family plus `score`, the one
number GLUE averages: the metric itself, or the mean of the pair for F1/accuracy and Pearson/Spearman (as the GLUE
leaderboard and the WeightLoRA paper's "Avg" column do: the paper's LoRA average 0.8655 is reproduced only so).

Degenerate inputs follow scikit-learn's conventions: Matthews correlation and F1 are 0 when undefined (a constant
prediction, no positive class), and so are the correlations of a constant prediction (scipy would give NaN, which
would poison a study's means).
"""

from __future__ import annotations

import numpy as np

METRICS = ("accuracy", "f1", "matthews", "pearson")


def accuracy(predictions, labels) -> float:
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    return float((predictions == labels).mean())


def binary_f1(predictions, labels, positive: int = 1) -> float:
    """F1 of the positive class (GLUE's MRPC/QQP F1: class 1, "equivalent"/"duplicate")."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    true_positive = int(((predictions == positive) & (labels == positive)).sum())
    predicted, actual = int((predictions == positive).sum()), int((labels == positive).sum())
    if true_positive == 0:
        return 0.0
    return 2 * true_positive / (predicted + actual)


def matthews_correlation(predictions, labels) -> float:
    """Matthews correlation coefficient, multi-class form (Gorodkin 2004; binary MCC for two classes)."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    classes = np.union1d(predictions, labels)
    predicted = np.array([(predictions == c).sum() for c in classes], dtype=np.float64)
    actual = np.array([(labels == c).sum() for c in classes], dtype=np.float64)
    correct, total = float((predictions == labels).sum()), float(len(labels))
    numerator = correct * total - float(predicted @ actual)
    denominator = np.sqrt((total**2 - float(predicted @ predicted)) * (total**2 - float(actual @ actual)))
    return float(numerator / denominator) if denominator > 0 else 0.0


def pearson(x, y) -> float:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    x, y = x - x.mean(), y - y.mean()
    denominator = np.sqrt((x @ x) * (y @ y))
    return float((x @ y) / denominator) if denominator > 0 else 0.0


def average_ranks(values) -> np.ndarray:
    """1-based ranks, ties sharing the mean of their ranks (scipy's rankdata 'average')."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(x, y) -> float:
    return pearson(average_ranks(x), average_ranks(y))


def compute(metric: str, predictions, labels) -> dict[str, float]:
    """Every number of `metric`'s family, plus `score`. `predictions` are class ids (classification) or floats
    (regression, metric 'pearson')."""
    if metric == "accuracy":
        value = accuracy(predictions, labels)
        return {"accuracy": value, "score": value}
    if metric == "f1":
        f1, acc = binary_f1(predictions, labels), accuracy(predictions, labels)
        return {"f1": f1, "accuracy": acc, "score": (f1 + acc) / 2}
    if metric == "matthews":
        value = matthews_correlation(predictions, labels)
        return {"matthews_correlation": value, "score": value}
    if metric == "pearson":
        r, rho = pearson(predictions, labels), spearman(predictions, labels)
        return {"pearson": r, "spearman": rho, "score": (r + rho) / 2}
    raise ValueError(f"Unknown metric {metric!r}: choose one of {', '.join(METRICS)}.")


def metric_keys(metric: str) -> tuple[str, ...]:
    """The keys `compute(metric, ...)` returns, in table order (`score` last)."""
    return {
        "accuracy": ("accuracy", "score"),
        "f1": ("f1", "accuracy", "score"),
        "matthews": ("matthews_correlation", "score"),
        "pearson": ("pearson", "spearman", "score"),
    }[metric]
