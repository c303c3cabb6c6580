"""Near-duplicate detection and the Chinese quality filters, without Ray.

The oracle for near dedup is the rule itself computed by brute force: the exact Jaccard of every pair of
documents, taken in input order, keeping the earliest copy. MinHash LSH only chooses which pairs to check,
so on real news plus constructed near-copies it must remove exactly the documents brute force removes.
"""
import json

import numpy as np
import pytest

from data_service.clean import clean_document
from data_service.corpora import inews_documents, write_inews_corpus
from data_service.filters import (
    FILTERS,
    FilterOptions,
    boilerplate_share,
    failed_filter,
    repeated_line_share,
    repeated_ngram_share,
)
from lfzh_ds import near_duplicates as nd

FOOTER = ("免责声明：本文来源于网络，仅供读者参考，不代表本站观点。\n文章版权归原作者所有，如有侵权请联系我们删除。\n"
          "更多精彩内容请关注我们的微信公众号，每天为您推送本地新闻和生活资讯，欢迎转发分享给身边的朋友。")


def near_copies(lines: list[str]) -> list[str]:
    """Four news2016zh records to append to the JSON ``lines`` (real news): a copy of the first document of
    600-1500 characters with one sentence changed, a copy of the second with a paragraph appended, and two
    unrelated short documents (from the dev split) that end with the same 130-character boilerplate footer."""
    records = [json.loads(line) for line in lines]
    mid = [r for r in records if 600 <= len(r["content"]) <= 1500][:2]
    changed = dict(mid[0], content=mid[0]["content"].replace("。", "。据本报记者了解，事情并非如此。", 1))
    appended = dict(mid[1], content=mid[1]["content"] + "\n（本文首发于当地晨报，转载时略有删改，图片来自网络。）")
    dev = inews_documents("dev")
    sharers = [{"news_id": f"footer-{k}", "title": d["title"], "desc": "", "content": d["content"][:150] + "\n" + FOOTER}
               for k, d in enumerate(dev[:2])]
    return [json.dumps(r, ensure_ascii=False) for r in (changed, appended, *sharers)]


def _texts(lines):
    return [clean_document(r["title"] + "\n" + r["content"]) for r in map(json.loads, lines)]


def brute_force_near_duplicates(texts, threshold=nd.DEFAULT_THRESHOLD):
    """{j: i}: each document whose exact Jaccard with an earlier kept document i is at least ``threshold``."""
    sets = [nd.shingles(t) for t in texts]
    removed = {}
    for j in range(len(texts)):
        for i in range(j):
            if i not in removed and nd.jaccard(sets[i], sets[j]) >= threshold:
                removed[j] = i
                break
    return removed


@pytest.fixture(scope="module")
def news_lines(tmp_path_factory):
    full = write_inews_corpus(tmp_path_factory.mktemp("inews"), split="train")[0]
    return full.read_text(encoding="utf-8").splitlines()[:300]


def test_lsh_finds_exactly_the_near_duplicates_brute_force_finds(news_lines):
    lines = news_lines + near_copies(news_lines)
    texts = _texts(lines)
    keys = np.stack([nd.band_keys(t) for t in texts])
    sets = [nd.shingles(t) for t in texts]
    found = nd.near_duplicates(nd.candidate_pairs(keys), lambda i, j: nd.jaccard(sets[i], sets[j]))
    expected = brute_force_near_duplicates(texts)
    assert {j: i for j, (i, _) in found.items()} == expected
    originals = [i for i, line in enumerate(news_lines) if json.loads(line)["news_id"] in
                 {json.loads(c)["news_id"] for c in near_copies(news_lines)[:2]}]
    assert expected[300] == originals[0] and expected[301] == originals[1]  # sentence changed, paragraph appended
    assert 302 not in expected and 303 not in expected  # unrelated documents sharing a boilerplate footer are kept
    assert all(score >= nd.DEFAULT_THRESHOLD for _, score in found.values())


def test_the_rule_ignores_whitespace_and_keys_are_fixed_functions_of_the_text():
    text = clean_document(inews_documents("dev")[0]["content"])
    spaced = " ".join(text[:len(text) // 2]) + "\n\n" + text[len(text) // 2:]
    assert nd.jaccard(nd.shingles(text), nd.shingles(spaced)) == 1.0
    assert np.array_equal(nd.band_keys(text), nd.band_keys(spaced))
    assert nd.band_keys(text).dtype == np.uint64 and nd.band_keys(text).shape == (nd.NUM_BANDS,)
    # fixed hash functions, no per-process seed: pinned values (a change here changes every job's output)
    assert int(nd.band_keys("今天天气很好，我们一起去公园散步吧。")[0]) == 6901998458630805830
    assert nd.shingles("今天天气很好").tolist() == [7485038913172050802, 16047342461577336965]
    empty = np.stack([nd.band_keys(""), nd.band_keys(" \n"), nd.band_keys("短")])
    assert not empty[:2].any() and len(nd.candidate_pairs(empty)) == 0  # texts without n-grams are never candidates
    # a bucket of many copies gives fewer than two pairs per member and band, each i < j
    same = np.stack([nd.band_keys(text)] * 50)
    pairs = nd.candidate_pairs(same)
    assert len(pairs) == 49 + 48 and np.all(pairs[:, 0] < pairs[:, 1])
    assert set(nd.near_duplicates(pairs, lambda i, j: 1.0)) == set(range(1, 50))  # every later copy goes, the first stays


def test_near_duplicates_of_names_the_first_matching_reference():
    dev = [clean_document(d["title"] + "\n" + d["content"]) for d in inews_documents("dev")[:30]]
    dev = [t for t in dev if len(t) > 300][:5]
    queries = [dev[3] + "（完）", "一篇完全不同的短文，讲的是另一件事情，和参考文本没有任何关系。", dev[1].replace("，", ",", 2)]
    found = nd.near_duplicates_of(queries, dev)
    assert {q: r for q, (r, _) in found.items()} == {0: 3, 2: 1}
    assert nd.near_duplicates_of(queries, []) == {} and nd.near_duplicates_of([], dev) == {}


# ---------------------------------------------------------------- quality filters

NEWS = clean_document(inews_documents("dev")[5]["title"] + "\n" + inews_documents("dev")[5]["content"])


@pytest.mark.parametrize("reason, text", [
    ("low_cjk_share", "围观聚众赌博\npreid='hhyddmz90816'>/pre>buttonid='gzkadgx10481'>/button>/pre>" * 3),
    ("low_cjk_share", "今天的新闻\n" + "the quick brown fox jumps over the lazy dog " * 10),
    ("mostly_symbols", "当你被人看不起的时候\n" + "?" * 20),
    ("mostly_symbols", "行情\n" + "股票代码600637收盘价12.50涨幅3.2%\n" * 10),
    ("repeated_lines", "招聘\n" + "高薪招聘普工，包吃包住，月薪八千\n" * 4),
    ("repeated_ngrams", "好消息！好消息！" * 30),
    ("boilerplate", "标题\n版权所有©2018 某某网\n点击查看原文\n返回首页\n上一篇：无\n下一篇：无"),
])
def test_each_filter_rejects_what_it_is_for(reason, text):
    failed = failed_filter(text, FilterOptions())
    assert failed is not None and failed[0] == reason, failed
    # and with that filter off the document passes it (another filter may still catch it)
    off = {"low_cjk_share": "min_cjk_share", "mostly_symbols": "max_symbol_share",
           "repeated_lines": "max_repeated_line_share", "repeated_ngrams": "max_repeated_ngram_share",
           "boilerplate": "max_boilerplate_share"}[reason]
    again = failed_filter(text, FilterOptions(**{off: None}))
    assert again is None or again[0] != reason


def test_filters_keep_ordinary_text_written_twice_signed_or_with_a_footer():
    kept = [
        NEWS,
        NEWS.split("\n", 1)[0] + "\n" + NEWS.split("\n", 1)[0],  # a title written twice (1 in 12 inews documents)
        NEWS + "\n" + NEWS,  # a whole article scraped twice: the copy is noise, the article is not
        NEWS + "\n责任编辑：张三",
        NEWS + "\n" + FOOTER,
        "2018年第一季度，公司实现营业收入12.5亿元，同比增长23.4%；净利润1.2亿元，同比增长8.9%。",
        "三国演义第一回：宴桃园豪杰三结义，斩黄巾英雄首立功。话说天下大势，分久必合，合久必分。",
        "这个手机很好用，屏幕清晰，电池耐用，物流也很快，五星好评！",
    ]
    for text in kept:
        assert failed_filter(text, FilterOptions()) is None, text[:40]
    assert repeated_line_share(NEWS + "\n" + NEWS) == pytest.approx(0.5, abs=0.01)
    assert 0.5 <= repeated_ngram_share(NEWS + NEWS) < 0.6  # the article's own repeated phrases add a little
    assert boilerplate_share(NEWS) == 0.0


def test_on_real_news_each_filter_drops_a_fraction_of_a_percent():
    """The defaults were chosen on inews (README); on the dev split no filter drops more than 0.5% (the most is
    low_cjk_share: 3 of 999 pages of markup or mojibake)."""
    texts = [clean_document(d["title"] + "\n" + d["content"]) for d in inews_documents("dev")]
    dropped = {name: 0 for name in FILTERS}
    for text in texts:
        failed = failed_filter(text, FilterOptions())
        if failed:
            dropped[failed[0]] += 1
    assert all(n <= 0.005 * len(texts) for n in dropped.values()), dropped
    assert failed_filter("x", FilterOptions(None, None, None, None, None)) is None and FilterOptions(
        None, None, None, None, None).active() == ()
