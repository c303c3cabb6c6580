"""The reference baseline: TF-IDF character n-grams + logistic regression on the same splits as fine-tuning.

    python launch/baseline.py --task ccf-sentiment --output-dir runs/ccf-tfidf
    python launch/baseline.py --task jsonl --train train.jsonl --dev dev.jsonl --test test.jsonl --output-dir runs/mine-tfidf

Writes predictions_{dev,test}.jsonl, metrics_{dev,test}.json and summary.json, as launch/finetune.py does.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python launch/baseline.py` runs this file as a script: this checkout's code first
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launch.finetune import add_task_arguments


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True, type=Path)
    add_task_arguments(parser)
    parser.add_argument("--C", dest="c_grid", type=float, nargs="+", default=[1.0, 4.0, 16.0],
                        help="inverse regularisation strengths to try; the best on dev is kept")
    parser.add_argument("--ngram-range", type=int, nargs=2, default=[1, 3], metavar=("MIN", "MAX"))
    parser.add_argument("--max-features", type=int, default=300_000)
    args = parser.parse_args(argv)

    from lfzh_ds.classification import tfidf_baseline, write_metrics, write_predictions
    from lfzh_ds.finetuning import load_task

    started = time.perf_counter()
    task = load_task(args)
    for line in task.summary_lines():
        print(line)
    result = tfidf_baseline(task, c_grid=args.c_grid, ngram_range=args.ngram_range, max_features=args.max_features)
    summary = {
        "task": task.name,
        "model": f"TF-IDF char {args.ngram_range[0]}-{args.ngram_range[1]}-grams + logistic regression",
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
        write_predictions(args.output_dir / f"predictions_{split}.jsonl", examples, out["predictions"], task.label_names, out["probabilities"])
        write_metrics(args.output_dir / f"metrics_{split}.json", out["metrics"])
        summary["metrics"][split] = {"macro_f1": out["metrics"]["macro_f1"], "accuracy": out["metrics"]["accuracy"]}
    summary["total_seconds"] = time.perf_counter() - started
    write_metrics(args.output_dir / "summary.json", summary)
    scores = ", ".join(f"{split} macro-F1 {m['macro_f1']:.4f} accuracy {m['accuracy']:.4f}" for split, m in summary["metrics"].items())
    print(f"TF-IDF baseline (C={result['C']}, {result['num_features']} features): {scores}; "
          f"{summary['total_seconds']:.0f} s; files in {args.output_dir}")


if __name__ == "__main__":
    from launch.cli import run_main

    sys.exit(run_main(main, "baseline.py"))
