"""Make a short Chinese BERT / roberta_zh checkpoint long (LongformerZh).

    python launch/convert.py --from SHORT_DIR --to LONG_DIR [--max-pos 4096] [--attention-window 512]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python launch/convert.py` runs this file as a script: this checkout's code first
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lfzh_ds.constants import DEFAULT_ATTENTION_WINDOW, DEFAULT_MAX_POSITIONS
from lfzh_ds.convert import convert_bert_to_longformer


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="short_dir", required=True, help="HF-format BERT directory (config.json + weights)")
    p.add_argument("--to", dest="long_dir", required=True, help="output directory for the long model and tokenizer")
    p.add_argument("--max-pos", type=int, default=DEFAULT_MAX_POSITIONS, help="positions of the long model")
    p.add_argument("--attention-window", type=int, default=DEFAULT_ATTENTION_WINDOW, help="full local window (even)")
    p.add_argument("--attention-backend", default="block_sparse", choices=["sliding_chunks", "block_sparse"],
                   help="block_sparse (default): the block kernel in token mode, exactly Longformer's window and "
                        "several times faster; sliding_chunks: transformers' Longformer code")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    result = convert_bert_to_longformer(
        args.short_dir, args.long_dir, max_pos=args.max_pos, attention_window=args.attention_window,
        attention_backend=args.attention_backend,
    )
    print(result.summary(args.short_dir, args.long_dir))


if __name__ == "__main__":
    from launch.cli import run_main

    sys.exit(run_main(main, "convert.py"))
