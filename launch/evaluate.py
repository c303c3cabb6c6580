"""Evaluate a Longformer_ZH masked LM, or draw a run's curves.

    python launch/evaluate.py bpc --model MODEL_DIR --data SHARDS_DIR        # validation BPC, on a CPU too
    python launch/evaluate.py fill-mask --model MODEL_DIR --text "今天[MASK]气很好"
    python launch/evaluate.py cloze --model MODEL_DIR --corpus docs.jsonl --num-blanks 300   # top-1/top-5 blanks
    python launch/evaluate.py by-position --model MODEL_DIR --corpus docs.jsonl             # blanks near and far
    python launch/evaluate.py fill-mask --model MODEL_DIR --corpus docs.jsonl --long-document 2000
    python launch/evaluate.py curves --run RUN_DIR                           # RUN_DIR/curves.png

``--model`` takes a ``from_pretrained`` folder, a run folder of launch/pretrain.py (its latest checkpoint) or one
checkpoint folder (RUN_DIR/checkpoints/step_N).
"""
from __future__ import annotations

import argparse
import json
import sys

from launch.cli import run_main
from lfzh_ds.errors import ConfigError


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
    by_position = sub.add_parser(
        "by-position", help="top-1/top-5 blanks by token position in long inputs of consecutive documents",
        description="Fill-in-the-blank accuracy by position band. The documents, in order, are packed as the data "
                    "service packs them ([CLS] doc [SEP] doc [SEP] ..., cut every SEQ_LEN - 2 tokens, [SEP] last; a "
                    "shorter last input is left out). One Chinese character in every BLANK_EVERY tokens is blanked "
                    "(2.5% of the tokens at the default 40; never two neighbours), all blanks of an input masked "
                    "at once and scored in one forward of the whole input (no global attention). Besides the "
                    "bands, the JSON always has first_500 (0-499), past_2500 (2500 to the last position) and "
                    "ratio_far_to_near, the top-5 of the second over the first.")
    by_position.add_argument("--model", required=True)
    by_position.add_argument("--corpus", nargs="+", required=True, help="held-out documents, read in order: JSON "
                                                                        "lines (see --field) or plain text, one "
                                                                        "document per line")
    by_position.add_argument("--field", default="content", help="the text field of JSON-lines documents "
                                                                "(default content)")
    by_position.add_argument("--seq-len", type=int, default=None,
                             help="tokens per input (default: the model's positions, at most 4096)")
    by_position.add_argument("--bands", default=None,
                             help="inclusive token-position ranges, ascending, e.g. 0-511,512-4095 (default "
                                  "0-499,500-2047,2048-2499,2500-4095, fitted to --seq-len: the last runs to its end)")
    by_position.add_argument("--num-blanks", type=int, default=1000,
                             help="blanks in all (default 1000: about 10 inputs of 4,096 tokens, 120 blanks in the "
                                  "first 500 positions); fewer if the documents run out")
    by_position.add_argument("--blank-every", type=int, default=40, metavar="TOKENS",
                             help="one blank per stretch of this many tokens (default 40: 2.5%% masked)")
    by_position.add_argument("--seed", type=int, default=0, help="which character of each stretch is blanked")
    by_position.add_argument("--batch-size", type=int, default=2, help="inputs per forward (default 2)")
    by_position.add_argument("--json", action="store_true", help="print one JSON object")
    fill = sub.add_parser("fill-mask", help="top candidates for every [MASK] in a text, or for one blank far into a "
                                            "long document read whole")
    fill.add_argument("--model", required=True)
    text = fill.add_mutually_exclusive_group(required=True)
    text.add_argument("--text")
    text.add_argument("--corpus", nargs="+", help="documents (JSON lines, see --field, or plain text, one per line): "
                                                  "blank one character past --long-document characters of the first "
                                                  "document longer than that, and read the whole document")
    fill.add_argument("--field", default="content", help="with --corpus: the text field of JSON-lines documents")
    fill.add_argument("--long-document", type=int, default=None, metavar="CHARS",
                      help="with --corpus (default 2000): the blank's character is at or past 0-based character CHARS, "
                           "of a word that occurs before CHARS/2 too where there is one; a model with fewer "
                           "positions than the document's tokens is refused, the document never cut")
    fill.add_argument("--top-k", type=int, default=5)
    fill.add_argument("--json", action="store_true", help="print one JSON object")
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


def run_by_position(args) -> None:
    from lfzh_ds.cloze import read_corpus_texts, score_by_position
    from lfzh_ds.loading import load_model
    from lfzh_ds.tokenization import load_tokenizer

    result = score_by_position(load_model(args.model, task="masked_lm"), load_tokenizer(),
                               read_corpus_texts(args.corpus, args.field), seq_len=args.seq_len, bands=args.bands,
                               num_blanks=args.num_blanks, blank_every=args.blank_every, seed=args.seed,
                               batch_size=args.batch_size)
    if args.json:
        print(json.dumps({"model": str(args.model), **result}))
        return
    print(f"{result['blanks']:,} blanks by position in {result['inputs']} inputs of {result['seq_len']:,} tokens of "
          f"consecutive documents, each input read whole in one forward with all its blanks masked at once "
          f"({100 * result['masked_share']:.1f}% of the tokens), for {args.model}")
    print("  positions     blanks  top-1  top-5")

    def line(label, band):
        scores = "      -      -" if band["top1"] is None else f"  {band['top1']:.3f}  {band['top5']:.3f}"
        return f"  {label:<12} {band['blanks']:>6}{scores}"

    for band in result["bands"]:
        print(line(band["band"], band))
    far, ratio = result["past_2500"], result["ratio_far_to_near"]
    shown = {band["band"] for band in result["bands"]}
    for label, band in (("first 500", result["first_500"]), ("past 2,500", far)):
        if band is not None and band["band"] not in shown:  # the default bands already hold them
            print(line(label, band))
    if far is None:
        print(f"  top-5 past position 2,500 / in the first 500: none, the inputs end at {result['seq_len'] - 1}")
    else:
        print("  top-5 past position 2,500 / in the first 500: "
              + ("none (a band without blanks or top-5 0 in the first 500)" if ratio is None else f"{ratio:.2f}"))


def run_fill_mask(args) -> None:
    from lfzh_ds.fill_mask import fill_mask
    from lfzh_ds.loading import load_model
    from lfzh_ds.tokenization import load_tokenizer

    if args.text is not None and args.long_document is not None:
        raise ConfigError("--long-document goes with --corpus, not --text")
    model, tokenizer = load_model(args.model, task="masked_lm"), load_tokenizer()
    if args.corpus:
        run_fill_long_document(args, model, tokenizer)
        return
    slots = fill_mask(model, tokenizer, args.text, top_k=args.top_k)
    if args.json:
        print(json.dumps({"model": str(args.model), "text": args.text,
                          "slots": [[{"token": c["token"], "score": c["score"]} for c in slot] for slot in slots]},
                         ensure_ascii=False))
        return
    print(args.text)
    for i, candidates in enumerate(slots, 1):
        shown = "  ".join(f"{c['token']} {c['score']:.3f}" for c in candidates)
        print(f"[MASK] {i}: {shown}")


def run_fill_long_document(args, model, tokenizer) -> None:
    from lfzh_ds.cloze import fill_long_document, read_corpus_texts

    min_chars = 2000 if args.long_document is None else args.long_document
    result = fill_long_document(model, tokenizer, read_corpus_texts(args.corpus, args.field), min_chars, args.top_k)
    if args.json:
        print(json.dumps({"model": str(args.model), **result}, ensure_ascii=False))
        return
    earlier = ("" if result["word_earlier_at"] is None else
               f", which occurs before at character {result['word_earlier_at']:,}: ...{result['earlier_context']}...")
    print(f"document {result['document']} of --corpus (0-based): {result['document_chars']:,} characters, "
          f"{result['tokens']:,} tokens, read whole (the model takes {result['model_positions']:,})")
    print(f"blank at character {result['blank_char']:,} (token {result['blank_token']:,}), the first of the word "
          f"{result['word']}{earlier}")
    print(f"  ...{result['context']}...")
    rank = "" if result["answer_rank"] is None else f"  (rank {result['answer_rank']})"
    print(f"answer {result['answer']}; model: "
          + "  ".join(f"{t} {p:.3f}" for t, p in zip(result["top"], result["scores"])) + rank)


def run_curves(args) -> None:
    from lfzh_ds.training.curves import OBJECTIVE_CURVES, plot_curves

    # the curves of the objective whose validation number the run's lines hold (pretraining's without any)
    print(f"wrote {plot_curves(args.run, args.out, curves=OBJECTIVE_CURVES)}")


COMMANDS = {"bpc": run_bpc, "fill-mask": run_fill_mask, "curves": run_curves, "cloze": run_cloze,
            "by-position": run_by_position}


def main(argv=None) -> int:
    """Exit status 2 with one line for a user's mistake, also when called from Python (the tests do)."""
    args = build_parser().parse_args(argv)
    return run_main(lambda: COMMANDS[args.command](args), "evaluate.py")


if __name__ == "__main__":
    sys.exit(main())
