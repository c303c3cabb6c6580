"""Make a model long: a short Chinese BERT / roberta_zh checkpoint into a LongformerZh, or one of ours longer.

    python launch/convert.py --from SHORT_BERT_DIR --to LONG_DIR [--max-pos 4096] [--attention-window 512]
    python launch/convert.py --from MODEL_RUN_OR_STEP_DIR --to LONG_DIR --max-pos 4096 [--attention-window 4,16]

Either way the position rows are tiled to ``--max-pos`` (row i is old row i % old length). A short BERT gets
global projections copied from its local ones and one window for every layer (default 512); a LongformerZh model
(a model folder, a launch/pretrain.py run folder or one of its checkpoints/step_N folders, a fine-tuned
classifier) keeps its global projections, heads and per-layer windows (or takes new ones), so inputs within its old
length give the same logits. Then continue pretraining it on longer sequences:
``launch/pretrain.py --init-from LONG_DIR --start-step N`` (N: the step it was trained to).
"""
from __future__ import annotations

import argparse
import sys

from lfzh_ds.constants import DEFAULT_ATTENTION_WINDOW, DEFAULT_MAX_POSITIONS


def attention_window(value: str) -> int | list[int]:
    """``512`` (every layer) or ``4,16`` (one per layer)."""
    try:
        windows = [int(v) for v in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: give an even int, or one per layer separated by commas") from None
    return windows[0] if len(windows) == 1 else windows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="source", required=True,
                   help="a HF-format BERT directory (config.json + weights), or a LongformerZh model, run or step folder")
    p.add_argument("--to", dest="target", required=True, help="output directory for the long model and tokenizer")
    p.add_argument("--max-pos", type=int, default=DEFAULT_MAX_POSITIONS,
                   help=f"positions of the long model (default {DEFAULT_MAX_POSITIONS})")
    p.add_argument("--attention-window", type=attention_window, default=None,
                   help=f"full local window (even), or one per layer (4,16); default: a BERT gets "
                        f"{DEFAULT_ATTENTION_WINDOW}, a LongformerZh model keeps its own")
    p.add_argument("--attention-backend", default="block_sparse", choices=["sliding_chunks", "block_sparse"],
                   help="for a short BERT: block_sparse (default), the block kernel in token mode, exactly "
                        "Longformer's window and several times faster; sliding_chunks: transformers' Longformer code")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from lfzh_ds.convert import convert_bert_to_longformer, is_short_bert, lengthen_longformer

    if is_short_bert(args.source):
        result = convert_bert_to_longformer(
            args.source, args.target, max_pos=args.max_pos,
            attention_window=DEFAULT_ATTENTION_WINDOW if args.attention_window is None else args.attention_window,
            attention_backend=args.attention_backend)
    else:
        result = lengthen_longformer(args.source, args.target, max_pos=args.max_pos,
                                     attention_window=args.attention_window)
    print(result.summary(args.source, args.target))


if __name__ == "__main__":
    from launch.cli import run_main

    sys.exit(run_main(main, "convert.py"))
