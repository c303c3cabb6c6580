"""Chinese quality filters: per-document measures, each with a threshold that rejects a document.

| filter (reject reason) | measure of the cleaned text | rejected when |
| --- | --- | --- |
| ``low_cjk_share`` | CJK characters / characters other than whitespace | below ``min_cjk_share`` |
| ``mostly_symbols`` | digits, punctuation and symbols (Unicode N*, P*, S*) / characters other than whitespace | above ``max_symbol_share`` |
| ``repeated_lines`` | characters in lines that repeat an earlier line of the document / characters in lines (Gopher) | above ``max_repeated_line_share`` |
| ``repeated_ngrams`` | characters covered by repeats of an earlier character ``REPEAT_NGRAM``-gram / characters (Gopher's duplicate n-gram fraction on characters, Chinese has no spaces; first occurrences not counted, so a text written out twice scores 0.5) | above ``max_repeated_ngram_share`` |
| ``boilerplate`` | characters in short lines (at most ``BOILERPLATE_LINE_CHARS``) that match ``BOILERPLATE`` (copyright, 点击查看, navigation, share/follow prompts) / characters in lines | above ``max_boilerplate_share`` |

A threshold of ``None`` switches that filter off. The defaults were chosen on real text (the inews
news corpus, a classical novel, product reviews; README, "Quality filters") so that ordinary text
is kept: each filter removes only pages that are mostly that kind of noise. Every measure is a
plain function of the text, so a filter rejects the same documents on any worker.
"""
from __future__ import annotations

import dataclasses
import re
import unicodedata

import numpy as np

from lfzh_ds.near_duplicates import ngram_hashes

REPEAT_NGRAM = 10
BOILERPLATE_LINE_CHARS = 60
BOILERPLATE = re.compile(
    r"版权所有|版权归|copyright|©|all\s*rights\s*reserved|未经授权|转载请注明|禁止转载|免责声明"
    r"|点击(查看|进入|阅读|下载|关注|这里|此处|播放)|阅读原文|阅读全文|查看更多|展开全文|返回(首页|顶部|列表)"
    r"|上一篇|下一篇|上一页|下一页|首页\s*[>|›»]|网站地图|联系我们|关于我们|登录\s*/?\s*注册"
    r"|扫(描|一扫)?二维码|扫码(关注|下载)|关注(我们|微信|公众号)|微信公众号|分享到|责任编辑|编辑[:：]\s*\S{1,8}$",
    re.IGNORECASE)
_CJK = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ebef\U00030000-\U0003134f]")
_SPACE = re.compile(r"\s+")

LOW_CJK_SHARE = "low_cjk_share"
MOSTLY_SYMBOLS = "mostly_symbols"
REPEATED_LINES = "repeated_lines"
REPEATED_NGRAMS = "repeated_ngrams"
BOILERPLATE_LINES = "boilerplate"
FILTERS = (LOW_CJK_SHARE, MOSTLY_SYMBOLS, REPEATED_LINES, REPEATED_NGRAMS, BOILERPLATE_LINES)


@dataclasses.dataclass(frozen=True)
class FilterOptions:
    min_cjk_share: float | None = 0.2
    max_symbol_share: float | None = 0.6
    max_repeated_line_share: float | None = 0.5
    max_repeated_ngram_share: float | None = 0.75
    max_boilerplate_share: float | None = 0.5

    def active(self) -> tuple[str, ...]:
        """The filters switched on, in the order they run."""
        return tuple(name for name, (field, _) in _THRESHOLDS.items() if getattr(self, field) is not None)


def cjk_share(text: str) -> float:
    compact = _SPACE.sub("", text)
    return len(_CJK.findall(compact)) / len(compact) if compact else 0.0


def symbol_share(text: str) -> float:
    compact = _SPACE.sub("", text)
    if not compact:
        return 0.0
    return sum(1 for ch in compact if unicodedata.category(ch)[0] in "NPS") / len(compact)


def _lines(text: str) -> list[str]:
    return [line for line in (raw.strip() for raw in text.splitlines()) if line]


def repeated_line_share(text: str) -> float:
    lines = _lines(text)
    total = sum(map(len, lines))
    seen, repeated = set(), 0
    for line in lines:
        if line in seen:
            repeated += len(line)
        seen.add(line)
    return repeated / total if total else 0.0


def repeated_ngram_share(text: str, n: int = REPEAT_NGRAM) -> float:
    """Share of the characters (whitespace removed) covered by a repeat of an earlier character n-gram:
    about 0.5 for a text written out twice, 0.8 for five times."""
    hashes = ngram_hashes(text, n)
    length = len(_SPACE.sub("", text))
    if length <= n:
        return 0.0
    _, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    starts = np.flatnonzero(first[inverse] != np.arange(hashes.size))
    if starts.size == 0:
        return 0.0
    cover = np.zeros(length + 1, dtype=np.int64)  # +1 where a repeat starts, -1 where it ends
    np.add.at(cover, starts, 1)
    np.add.at(cover, starts + n, -1)
    return float(np.count_nonzero(np.cumsum(cover[:length]))) / length


def boilerplate_share(text: str) -> float:
    lines = _lines(text)
    total = sum(map(len, lines))
    matched = sum(len(line) for line in lines if len(line) <= BOILERPLATE_LINE_CHARS and BOILERPLATE.search(line))
    return matched / total if total else 0.0


# reject reason -> (threshold field, (measure, True if a value above the threshold rejects))
_THRESHOLDS = {
    LOW_CJK_SHARE: ("min_cjk_share", (cjk_share, False)),
    MOSTLY_SYMBOLS: ("max_symbol_share", (symbol_share, True)),
    REPEATED_LINES: ("max_repeated_line_share", (repeated_line_share, True)),
    REPEATED_NGRAMS: ("max_repeated_ngram_share", (repeated_ngram_share, True)),
    BOILERPLATE_LINES: ("max_boilerplate_share", (boilerplate_share, True)),
}


def measure(name: str, text: str) -> float:
    return _THRESHOLDS[name][1][0](text)


def failed_filter(text: str, options: FilterOptions, stages=None) -> tuple[str, str] | None:
    """``(reason, detail)`` of the first active filter that rejects ``text``, or None if all keep it;
    ``stages`` (a ``StageCounts``) counts the document into and out of each filter it meets."""
    for name, (field, (fn, above)) in _THRESHOLDS.items():
        threshold = getattr(options, field)
        if threshold is None:
            continue
        if stages is not None:
            stages.enter(name, len(text))
        value = fn(text)
        if (value > threshold) if above else (value < threshold):
            relation = "above" if above else "below"
            return name, f"{fn.__name__.replace('_', ' ')} {value:.2f}, {relation} --{field.replace('_', '-')} {threshold}"
        if stages is not None:
            stages.leave(name, len(text))
    return None
