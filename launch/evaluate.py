"""Evaluate a Longformer_ZH masked LM, or draw a run's curves.

    python launch/evaluate.py bpc --model MODEL_DIR --data SHARDS_DIR        # validation BPC, on a CPU too
    python launch/evaluate.py fill-mask --model MODEL_DIR --text "今天[MASK]气很好"
    python launch/evaluate.py cloze --model MODEL_DIR --corpus docs.jsonl --num-blanks 300   # top-1/top-5 blanks
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

from launch.cli import run_main  # noqa: E402


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
    cloze = sub.add_parser("cloze", help="top-1/top-5 accuracy on fill-in-the-blank sentences, beside a "
                                         "frequency guess on the same blanks")
    cloze.add_argument("--model", required=True)
    source = cloze.add_mutually_exclusive_group(required=True)
    source.add_argument("--blanks", help='JSON lines of {"text": "...[MASK]...", "answer": "X"}')
    source.add_argument("--corpus", nargs="+", help="documents to make blanks from: JSON lines (see --field) or "
                                                    "plain text, one document per line")
    cloze.add_argument("--field", default="content", help="the text field of JSON-lines documents (default content)")
    cloze.add_argument("--num-blanks", type=int, default=300)
    cloze.add_argument("--seed", type=int, default=0, help="which sentences, words and characters become blanks")
    cloze.add_argument("--frequencies-from", help="a shards folder: the frequency guess is its training split's "
                                                  "five most frequent characters (default: the blanks' own texts)")
    cloze.add_argument("--save-blanks", help="write the blanks made from --corpus as JSON lines")
    cloze.add_argument("--examples", type=int, default=5, help="show the model's answers for this many blanks")
    cloze.add_argument("--json", action="store_true", help="print one JSON object")
    fill = sub.add_parser("fill-mask", help="top candidates for every [MASK] in a text")
    fill.add_argument("--model", required=True)
    fill.add_argument("--text", required=True)
    fill.add_argument("--top-k", type=int, default=5)
    curves = sub.add_parser("curves", help="loss, validation BPC and learning rate against steps, as a PNG")
    curves.add_argument("--run", required=True, help="the --output-dir of launch/pretrain.py")
    curves.add_argument("--out", default=None, help="default: RUN_DIR/curves.png")
    return p


# Each command imports what it needs when it runs: `curves` needs no torch, and --help none of the library.
def run_bpc(args) -> None:
    from lfzh_ds.loading import load_model
    from lfzh_ds.training.evaluation import bpc_on_shards

    model = load_model(args.model, task="masked_lm")
    result = bpc_on_shards(model, args.data, args.split, args.batch_size, args.max_sequences)
    if args.json:
        print(json.dumps({"model": str(args.model), "data": str(args.data), "split": args.split, **result}))
        return
    print(f"{args.split} BPC {result['bpc']:.4f} (95% interval {result['bpc_low']:.4f}-{result['bpc_high']:.4f}, "
          f"bootstrap over sequences; character frequencies alone: {result['frequency_baseline_bpc']:.4f}) from "
          f"cross-entropy {result['loss']:.4f} nats over {result['masked_tokens']:,} masked tokens in "
          f"{result['sequences']} sequences, for {args.model}")


def run_cloze(args) -> None:
    from lfzh_ds.cloze import blanks_and_guess, score_cloze
    from lfzh_ds.loading import load_model
    from lfzh_ds.tokenization import load_tokenizer

    blanks, guess = blanks_and_guess(args.blanks, args.corpus, args.field, args.num_blanks, args.seed,
                                     args.save_blanks, args.frequencies_from)
    result = score_cloze(load_model(args.model, task="masked_lm"), load_tokenizer(), blanks, guess,
                         num_examples=args.examples)
    if args.json:
        print(json.dumps({"model": str(args.model), **result}, ensure_ascii=False))
        return
    print(f"cloze on {result['blanks']} blanks: top-1 {result['top1']:.3f}, top-5 {result['top5']:.3f} for "
          f"{args.model}; the frequency guess {''.join(result['frequency_guess'])} scores top-1 "
          f"{result['frequency_top1']:.3f}, top-5 {result['frequency_top5']:.3f}")
    for example in result["examples"]:
        right = "  (in its top 5)" if example["answer"] in example["top"] else ""
        print(f"  {example['text']}  answer {example['answer']}  model: {' '.join(example['top'])}{right}")


def run_fill_mask(args) -> None:
    from lfzh_ds.fill_mask import fill_mask
    from lfzh_ds.loading import load_model
    from lfzh_ds.tokenization import load_tokenizer

    slots = fill_mask(load_model(args.model, task="masked_lm"), load_tokenizer(), args.text, top_k=args.top_k)
    print(args.text)
    for i, candidates in enumerate(slots, 1):
        shown = "  ".join(f"{c['token']} {c['score']:.3f}" for c in candidates)
        print(f"[MASK] {i}: {shown}")


def run_curves(args) -> None:
    from lfzh_ds.training.metrics import plot_curves

    print(f"wrote {plot_curves(args.run, args.out)}")


COMMANDS = {"bpc": run_bpc, "fill-mask": run_fill_mask, "curves": run_curves, "cloze": run_cloze}


def main(argv=None) -> int:
    """Exit status 2 with one line for a user's mistake, also when called from Python (the tests do)."""
    args = build_parser().parse_args(argv)
    return run_main(lambda: COMMANDS[args.command](args), "evaluate.py")


if __name__ == "__main__":
    sys.exit(main())
