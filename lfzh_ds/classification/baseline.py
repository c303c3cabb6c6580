"""The reference baseline: TF-IDF over character n-grams + logistic regression, on the same splits as
fine-tuning, writing the same files (``predictions_{split}.jsonl``, ``metrics_{split}.json``, ``summary.json``).

Not imported by the package's ``__init__`` (scikit-learn takes about a second to import, and fine-tuning's
processes do not need it): ``from lfzh_ds.classification.baseline import run_tfidf_baseline``.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from ..tokenization import normalize_text
from .metrics import classification_metrics, write_metrics, write_predictions
from .tasks import TaskData

DEFAULT_C_GRID = (1.0, 4.0, 16.0)
DEFAULT_NGRAM_RANGE = (1, 3)
DEFAULT_MAX_FEATURES = 300_000


def tfidf_baseline(
    task: TaskData,
    c_grid=DEFAULT_C_GRID,
    ngram_range=DEFAULT_NGRAM_RANGE,
    max_features: int = DEFAULT_MAX_FEATURES,
    class_weight: str | None = "balanced",
) -> dict:
    """TF-IDF over character n-grams + logistic regression, C chosen by dev macro-F1.

    The cheap, honest number every fine-tuned F1 is reported next to. It reads whole documents
    (no truncation). Returns the chosen C, the dev scores of every C, and per split the
    predictions, class probabilities and metrics of the chosen model.
    """
    t0 = time.perf_counter()
    vectorizer = TfidfVectorizer(
        analyzer="char", ngram_range=tuple(ngram_range), sublinear_tf=True, min_df=2, max_features=max_features, dtype=np.float32
    )

    def documents(examples):
        return [normalize_text(e.joined()) for e in examples]

    x_train = vectorizer.fit_transform(documents(task.train))
    features = {split: vectorizer.transform(documents(getattr(task, split))) for split in ("dev", "test") if getattr(task, split)}
    y_train = [e.label for e in task.train]
    vectorize_seconds = time.perf_counter() - t0

    best = None
    dev_scores = {}
    for c in c_grid:
        model = LogisticRegression(C=c, max_iter=2000, class_weight=class_weight).fit(x_train, y_train)
        predictions = model.predict(features["dev"]).tolist()
        score = classification_metrics([e.label for e in task.dev], predictions, task.label_names)["macro_f1"]
        dev_scores[c] = score
        if best is None or score > best[0]:
            best = (score, c, model)
    _, best_c, model = best
    result = {
        "C": best_c,
        "dev_macro_f1_by_C": dev_scores,
        "num_features": x_train.shape[1],
        "vectorize_seconds": vectorize_seconds,
        "total_seconds": None,
        "splits": {},
    }
    for split, x in features.items():
        examples = getattr(task, split)
        probabilities = model.predict_proba(x)
        predictions = model.classes_[probabilities.argmax(axis=1)].tolist()
        result["splits"][split] = {
            "predictions": predictions,
            "probabilities": probabilities.tolist(),
            "metrics": classification_metrics([e.label for e in examples], predictions, task.label_names),
        }
    result["total_seconds"] = time.perf_counter() - t0
    return result


def run_tfidf_baseline(
    task: TaskData,
    output_dir,
    c_grid=DEFAULT_C_GRID,
    ngram_range=DEFAULT_NGRAM_RANGE,
    max_features: int = DEFAULT_MAX_FEATURES,
) -> dict:
    """Fit :func:`tfidf_baseline` and write its run into ``output_dir`` as fine-tuning does: per split
    ``predictions_{split}.jsonl`` and ``metrics_{split}.json``, and ``summary.json``, which is returned.
    ``total_seconds`` counts fitting and writing, not loading the task (as in fine-tuning's summary)."""
    started = time.perf_counter()
    output_dir = Path(output_dir)
    result = tfidf_baseline(task, c_grid=c_grid, ngram_range=ngram_range, max_features=max_features)
    summary = {
        "task": task.name,
        "model": f"TF-IDF char {ngram_range[0]}-{ngram_range[1]}-grams + logistic regression",
        "data": task.report,
        "documents": {split: len(getattr(task, split)) for split in ("train", "dev", "test")},
        "C": result["C"],
        "dev_macro_f1_by_C": result["dev_macro_f1_by_C"],
        "num_features": result["num_features"],
        "metrics": {},
        "fit_seconds": result["total_seconds"],
        "total_seconds": None,
    }
    for split, out in result["splits"].items():
        examples = getattr(task, split)
        write_predictions(output_dir / f"predictions_{split}.jsonl", examples, out["predictions"], task.label_names, out["probabilities"])
        write_metrics(output_dir / f"metrics_{split}.json", out["metrics"])
        summary["metrics"][split] = {"macro_f1": out["metrics"]["macro_f1"], "accuracy": out["metrics"]["accuracy"]}
    summary["total_seconds"] = time.perf_counter() - started
    write_metrics(output_dir / "summary.json", summary)
    return summary


def describe_baseline_run(summary: dict) -> str:
    """One line for the console: the chosen C, the number of features, the scores per split and the time."""
    scores = ", ".join(f"{split} macro-F1 {m['macro_f1']:.4f} accuracy {m['accuracy']:.4f}" for split, m in summary["metrics"].items())
    return (f"TF-IDF baseline (C={summary['C']}, {summary['num_features']} features): {scores}; "
            f"{summary['total_seconds']:.0f} s")
