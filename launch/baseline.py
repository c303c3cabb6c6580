"""The reference baseline: TF-IDF character n-grams + logistic regression on the same splits as fine-tuning.

    python launch/baseline.py --task ccf-sentiment --output-dir runs/ccf-tfidf
    python launch/baseline.py --task jsonl --train train.jsonl --dev dev.jsonl --test test.jsonl --output-dir runs/mine-tfidf

Writes predictions_{dev,test}.jsonl, metrics_{dev,test}.json and summary.json, as launch/finetune.py does
(lfzh_ds.classification.baseline.run_tfidf_baseline).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from launch.cli import run_main
from launch.finetune import add_task_arguments
from lfzh_ds.classification.baseline import (
    DEFAULT_C_GRID,
    DEFAULT_MAX_FEATURES,
    DEFAULT_NGRAM_RANGE,
    describe_baseline_run,
    run_tfidf_baseline,
)
from lfzh_ds.classification.tasks import load_task


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True, type=Path)
    add_task_arguments(parser)
    parser.add_argument("--C", dest="c_grid", type=float, nargs="+", default=list(DEFAULT_C_GRID),
                        help="inverse regularisation strengths to try; the best on dev is kept")
    parser.add_argument("--ngram-range", type=int, nargs=2, default=list(DEFAULT_NGRAM_RANGE), metavar=("MIN", "MAX"))
    parser.add_argument("--max-features", type=int, default=DEFAULT_MAX_FEATURES)
    args = parser.parse_args(argv)

    task = load_task(args)
    for line in task.summary_lines():
        print(line)
    summary = run_tfidf_baseline(task, args.output_dir, c_grid=args.c_grid, ngram_range=args.ngram_range,
                                 max_features=args.max_features)
    print(f"{describe_baseline_run(summary)}; files in {args.output_dir}")


if __name__ == "__main__":
    sys.exit(run_main(main, "baseline.py"))
