"""Preprocess Chinese corpora into Arrow shards for pretraining (console script ``lfzh-preprocess``).

    python launch/preprocess.py --input 'corpus/*.jsonl.gz' --output data/news --seq-len 4096
    python launch/preprocess.py --input big.txt --format text --output data/big --ray-address auto
    python launch/preprocess.py --input corpus/ --format text --text-docs file --output data/books

See data_service/pipeline.py for what runs where; this file only parses arguments and reports.
"""
from __future__ import annotations

import argparse
import sys

from data_service.clean import CleanOptions
from data_service.config import PipelineConfig
from data_service.filters import FilterOptions
from data_service.readers import FORMATS, TEXT_DOCS
from lfzh_ds.constants import DEFAULT_SEQ_LEN
from lfzh_ds.errors import UserError
from lfzh_ds.near_duplicates import DEFAULT_THRESHOLD

_FILTER_FLAGS = (  # defaults: data_service.filters.FilterOptions (README: "Quality filters")
    ("min-cjk-share", "drop documents whose share of CJK characters (whitespace aside) is below this"),
    ("max-symbol-share", "drop documents whose share of digits, punctuation and symbols is above this"),
    ("max-repeated-line-share", "drop documents whose share of characters in repeated lines is above this"),
    ("max-repeated-ngram-share",
     "drop documents whose share of characters in repeats of an earlier character 10-gram is above this"),
    ("max-boilerplate-share",
     "drop documents whose share of characters in boilerplate lines (copyright, 点击查看, navigation) is above this"),
)


def _threshold(value: str):
    return None if value.lower() == "off" else float(value)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lfzh-preprocess", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True, metavar="PATH_OR_GLOB",
                   help="corpus files, folders (their files, recursively, sorted; hidden ones skipped) or pyarrow.fs "
                        "URIs (file://, s3://, ...; globs allowed; .gz/.bz2/.xz read transparently)")
    p.add_argument("--output", required=True, metavar="DIR",
                   help="folder (or file:// URI) for shards, manifest.json, rejects.json")
    p.add_argument("--format", default="auto", choices=FORMATS)
    p.add_argument("--field", default=None, help="JSON field holding the text (format jsonl; default 'text')")
    p.add_argument("--text-docs", default="lines", choices=TEXT_DOCS,
                   help="format text: one document per line, per blank-line separated block, or per file")
    p.add_argument("--ray-address", default=None, metavar="auto|HOST:PORT",
                   help="run on an existing Ray cluster (default: start a local Ray and stop it at the end)")
    p.add_argument("--num-workers", type=int, default=None, help="parallel tasks (default: all CPUs)")
    p.add_argument("--shared-storage", default="auto", choices=["auto", "on", "off"],
                   help="on: every Ray node sees the inputs and --output at the same paths (a shared filesystem, or "
                        "URIs), so workers read their byte ranges and write their results; off: this machine reads "
                        "the inputs and sends the data (default auto: on when every Ray node runs on this machine)")
    p.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN)
    p.add_argument("--mask-prob", type=float, default=0.10)
    p.add_argument("--max-predictions", type=int, default=400)
    p.add_argument("--dupe-factor", type=int, default=2, help="differently masked static copies per sequence")
    p.add_argument("--wwm-max-word-len", type=int, default=None,
                   help="group at most this many tokens into a masked word (3 reproduces the upstream)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of documents in the validation split")
    p.add_argument("--min-chars", type=int, default=10, help="drop documents shorter than this after cleaning")
    p.add_argument("--max-chars", type=int, default=1_000_000, help="drop documents longer than this")
    p.add_argument("--no-dedup", action="store_true", help="keep duplicate documents (exact and near: no dedup at all)")
    p.add_argument("--no-near-dedup", action="store_true",
                   help="keep near-duplicate documents (MinHash LSH over character 5-grams, checked by exact Jaccard)")
    p.add_argument("--near-dedup-threshold", type=float, default=DEFAULT_THRESHOLD, metavar="JACCARD",
                   help="a document whose character 5-gram Jaccard with an earlier kept one is at least this is dropped")
    for name, help_text in _FILTER_FLAGS:
        default = getattr(FilterOptions(), name.replace("-", "_"))
        p.add_argument(f"--{name}", type=_threshold, default=default, metavar="SHARE|off",
                       help=f"{help_text} (default {default}; off: no such filter)")
    p.add_argument("--no-filters", action="store_true", help="switch every quality filter off")
    p.add_argument("--no-clean", action="store_true", help="skip jionlp cleaning (normalisation still runs)")
    p.add_argument("--remove-parentheses", action="store_true", help="jionlp: delete bracketed text")
    p.add_argument("--remove-redundant-char", action="store_true", help="jionlp: collapse repeated characters")
    p.add_argument("--convert-full2half", action="store_true", help="jionlp: full-width to half-width characters")
    p.add_argument("--keep-phone-numbers", action="store_true", help="jionlp: do not remove phone numbers")
    p.add_argument("--rows-per-shard", type=int, default=1024)
    p.add_argument("--chunk-mb", type=float, default=4.0, help="input is processed in chunks of about this size")
    p.add_argument("--keep-work", action="store_true", help="keep OUTPUT/_work (chunk results) after success")
    p.add_argument("--overwrite", action="store_true", help="delete what OUTPUT holds and start again")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    return p.parse_args(argv)


def config_from_args(args) -> PipelineConfig:
    clean = CleanOptions(remove_parentheses=args.remove_parentheses, remove_redundant_char=args.remove_redundant_char,
                         convert_full2half=args.convert_full2half, remove_phone_number=not args.keep_phone_numbers,
                         enabled=not args.no_clean)
    thresholds = {name.replace("-", "_"): None if args.no_filters else getattr(args, name.replace("-", "_"))
                  for name, _ in _FILTER_FLAGS}
    return PipelineConfig(
        inputs=tuple(args.input), output=args.output, format=args.format, field=args.field, text_docs=args.text_docs,
        seq_len=args.seq_len, mask_prob=args.mask_prob, max_predictions=args.max_predictions,
        dupe_factor=args.dupe_factor, wwm_max_word_len=args.wwm_max_word_len, seed=args.seed,
        val_fraction=args.val_fraction, min_chars=args.min_chars, max_chars=args.max_chars, dedup=not args.no_dedup,
        near_dedup=not args.no_near_dedup, near_dedup_threshold=args.near_dedup_threshold,
        filters=FilterOptions(**thresholds), clean=clean, rows_per_shard=args.rows_per_shard,
        chunk_bytes=max(1, int(args.chunk_mb * (1 << 20))),
        ray_address=args.ray_address, num_workers=args.num_workers, keep_work=args.keep_work,
        shared_storage={"auto": None, "on": True, "off": False}[args.shared_storage],
        overwrite=args.overwrite, progress=not args.quiet)


def main(argv=None) -> int:
    args = parse_args(argv)
    # imported here, not above: they import Ray (about 0.7 s), which --help and argument errors do not need
    from data_service.pipeline import run, summary_table

    try:
        result = run(config_from_args(args))
    except UserError as err:  # a bad input, option, --ray-address or output folder; anything else is a bug: traceback
        print(f"lfzh-preprocess: error: {err}", file=sys.stderr)
        return 2
    print(summary_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
