"""How well a classifier did: the metrics (macro-F1 first, checked against scikit-learn in the tests) and the
files a run leaves, ``predictions_{split}.jsonl``, ``metrics_{split}.json`` and ``summary.json``, the same for
fine-tuning and the TF-IDF baseline."""
from __future__ import annotations

import json
from pathlib import Path

from ..atomic_files import write_json_atomic
from .tasks import Example


def classification_metrics(labels: list[int], predictions: list[int], label_names: list[str]) -> dict:
    """Macro-F1, accuracy, per-class precision/recall/F1/support and the confusion matrix
    (rows: true class, columns: predicted class). A class with no predictions has precision 0."""
    if len(labels) != len(predictions):
        raise ValueError(f"{len(labels)} labels but {len(predictions)} predictions")
    k = len(label_names)
    confusion = [[0] * k for _ in range(k)]
    for y, p in zip(labels, predictions):
        confusion[int(y)][int(p)] += 1
    per_class = {}
    f1s = []
    for c in range(k):
        tp = confusion[c][c]
        predicted = sum(confusion[r][c] for r in range(k))
        actual = sum(confusion[c])
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label_names[c]] = {"precision": precision, "recall": recall, "f1": f1, "support": actual}
        f1s.append(f1)
    n = len(labels)
    return {
        "num_examples": n,
        "macro_f1": sum(f1s) / k,
        "accuracy": sum(confusion[c][c] for c in range(k)) / n if n else 0.0,
        "per_class": per_class,
        "labels": list(label_names),
        "confusion_matrix": confusion,
    }


def write_predictions(path, examples: list[Example], predictions: list[int], label_names, probabilities=None) -> None:
    """One JSON object per line: id, label, prediction (indices), their names and, if given, class probabilities."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i, (e, p) in enumerate(zip(examples, predictions)):
            row = {"id": e.id, "label": e.label, "prediction": int(p), "label_name": label_names[e.label], "prediction_name": label_names[int(p)]}
            if probabilities is not None:
                row["probabilities"] = [round(float(x), 6) for x in probabilities[i]]
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_predictions(path) -> tuple[list[int], list[int]]:
    """(labels, predictions) from a file written by :func:`write_predictions`."""
    labels, predictions = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            labels.append(row["label"])
            predictions.append(row["prediction"])
    return labels, predictions


def write_metrics(path, metrics: dict) -> None:
    """``metrics`` as indented JSON, replacing ``path`` atomically (its folder is created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, metrics)
