"""Evaluate a Longformer_ZH masked LM, or draw a run's curves.

    python launch/evaluate.py bpc --model MODEL_DIR --data SHARDS_DIR        # validation BPC, on a CPU too
    python launch/evaluate.py fill-mask --model MODEL_DIR --text "今天[MASK]气很好"
    python launch/evaluate.py curves --run RUN_DIR                           # RUN_DIR/curves.png

``--model`` takes a ``from_pretrained`` folder, a run folder of launch/pretrain.py (its latest checkpoint) or one
checkpoint folder (RUN_DIR/checkpoints/step_N).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python launch/evaluate.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    bpc = sub.add_parser("bpc", help="bits per masked character on a split with the data service's fixed masks")
    bpc.add_argument("--model", required=True)
    bpc.add_argument("--data", required=True, help="shards folder written by launch/preprocess.py")
    bpc.add_argument("--split", choices=("validation", "train"), default="validation")
    bpc.add_argument("--batch-size", type=int, default=4)
    bpc.add_argument("--max-sequences", type=int, default=None, help="only the first N >= 1 sequences")
    bpc.add_argument("--json", action="store_true", help="print one JSON object instead of a sentence")
    fill = sub.add_parser("fill-mask", help="top candidates for every [MASK] in a text")
    fill.add_argument("--model", required=True)
    fill.add_argument("--text", required=True)
    fill.add_argument("--top-k", type=int, default=5)
    curves = sub.add_parser("curves", help="loss, validation BPC and learning rate against steps, as a PNG")
    curves.add_argument("--run", required=True, help="the --output-dir of launch/pretrain.py")
    curves.add_argument("--out", default=None, help="default: RUN_DIR/curves.png")
    return p


def run_bpc(args) -> None:
    import torch

    from lfzh_ds.shards import ShardDataset
    from lfzh_ds.training.evaluation import evaluate_model_bpc, load_masked_lm

    if args.max_sequences is not None and args.max_sequences <= 0:
        raise ValueError(f"--max-sequences {args.max_sequences}: evaluate at least 1 sequence (leave it out for all)")
    model = load_masked_lm(args.model)
    data = ShardDataset(args.data, split=args.split, masking="static")
    if not data.num_rows:
        raise ValueError(f"--data {args.data}: the {args.split} split is empty (its manifest.json lists no "
                         f"{args.split} sequences; preprocessed with --val-fraction 0?)")
    with torch.no_grad():
        result = evaluate_model_bpc(model, data, batch_size=args.batch_size, max_sequences=args.max_sequences)
    if args.json:
        print(json.dumps({"model": str(args.model), "data": str(args.data), "split": args.split, "bpc": result.bpc,
                          "loss": result.loss, "masked_tokens": result.masked_tokens, "sequences": result.sequences}))
    else:
        print(f"{args.split} BPC {result.bpc:.4f} (cross-entropy {result.loss:.4f} nats over "
              f"{result.masked_tokens:,} masked tokens in {result.sequences} sequences) for {args.model}")


def run_fill_mask(args) -> None:
    from lfzh_ds.fill_mask import fill_mask
    from lfzh_ds.tokenization import load_tokenizer
    from lfzh_ds.training.evaluation import load_masked_lm

    model = load_masked_lm(args.model)
    slots = fill_mask(model, load_tokenizer(), args.text, top_k=args.top_k)
    print(args.text)
    for i, candidates in enumerate(slots, 1):
        shown = "  ".join(f"{c['token']} {c['score']:.3f}" for c in candidates)
        print(f"[MASK] {i}: {shown}")


def run_curves(args) -> None:
    from lfzh_ds.training.metrics import plot_curves

    print(f"wrote {plot_curves(args.run, args.out)}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from lfzh_ds.shards import ShardError

    try:
        {"bpc": run_bpc, "fill-mask": run_fill_mask, "curves": run_curves}[args.command](args)
    except (FileNotFoundError, ValueError, KeyError, ShardError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
