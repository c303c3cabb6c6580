"""Fill-in-the-blank evaluation: does a masked LM put the missing character of a word in its top 1 / top 5?

A blank is a sentence with one ``[MASK]`` and the character that belongs there. Blanks come from a JSON-lines
file (``{"text": "...[MASK]...", "answer": "金"}`` per line) or are made from a corpus: one character of a
multi-character jieba word (a word of Chinese characters the vocab knows), one blank per sentence, chosen by a
seed, so the same corpus and seed always give the same blanks. The score sits next to a frequency guess on the
same blanks (the five most frequent characters, whatever the context), which a model that reads context beats.

Two checks that far positions were trained (``launch/evaluate.py by-position`` and ``fill-mask --corpus``):

- by position: long inputs packed from consecutive documents as the data service packs them (``[CLS] doc [SEP] doc
  [SEP] ...``, cut every ``seq_len - 2`` tokens, ``[SEP]`` last), one blank per stretch of ``blank_every`` tokens
  (a seeded Chinese character in each, never next to the previous blank), all blanks of an input masked at once and
  scored in one forward of the whole input; top-1/top-5 per band of token positions, and the top-5 past position
  2,500 over the top-5 in the first 500 (near 1 when far positions were trained as well as near ones);
- one long document: the first document longer than ``min_chars`` characters, read whole, with one character blanked
  past character ``min_chars``, preferably of a word that also occurs before character ``min_chars // 2``, so
  reading the whole document helps.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import jieba
import numpy as np
import torch

from .constants import CLS_ID, MASK_ID, MASK_TOKEN, SEP_ID
from .errors import ConfigError, InputError, MissingFileError
from .shards import ShardDataset
from .tokenization import _vocab_chars, load_tokenizer, normalize_text
from .training.evaluation import token_counts

SENTENCE_END = re.compile(r"(?<=[。！？!?；;])")
MIN_SENTENCE_CHARS, MAX_SENTENCE_CHARS = 12, 120


@dataclass
class Blank:
    text: str  # with exactly one [MASK]
    answer: str  # one character


def is_chinese_character(ch: str) -> bool:
    return "\u4e00" <= ch <= "\u9fff"


def numbered_lines(path, flag: str):
    """``(number, line)`` of the UTF-8 text file ``path`` that the user gave as ``flag``; a missing file or one that
    is not UTF-8 text is a one-line error naming it."""
    if not Path(path).is_file():
        raise MissingFileError(f"{flag} {path}: no such file")
    with open(path, encoding="utf-8") as f:
        try:
            yield from enumerate(f, 1)
        except UnicodeDecodeError as err:
            raise InputError(f"{flag} {path}: not UTF-8 text ({err})") from None


def read_corpus_texts(paths, field: str = "content") -> list[str]:
    """The documents of ``paths``: JSON lines (their ``field``) or plain text, one document per line."""
    texts = []
    for path in paths:
        for number, line in numbered_lines(path, "--corpus"):
            line = line.strip()
            if not line:
                continue
            if not line.startswith("{"):
                texts.append(line)
                continue
            try:
                texts.append(str(json.loads(line)[field]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise InputError(f"{path}:{number}: not a JSON object with a {field!r} field (--field)") from None
    return texts


def make_blanks(texts, num_blanks: int, seed: int = 0) -> list[Blank]:
    """Up to ``num_blanks`` blanks from ``texts`` (documents), deterministic from ``seed``: sentences of 12-120
    characters in a seeded order, in each a seeded multi-character word of Chinese characters the vocab knows,
    and in it a seeded character."""
    jieba.setLogLevel(60)
    known = _vocab_chars()
    sentences = []
    for text in texts:
        for sentence in SENTENCE_END.split(normalize_text(text).replace("\\n", "\n")):
            sentence = sentence.strip()
            if MIN_SENTENCE_CHARS <= len(sentence) <= MAX_SENTENCE_CHARS and "\n" not in sentence:
                sentences.append(sentence)
    rng = np.random.default_rng(seed)
    blanks = []
    for index in rng.permutation(len(sentences)):
        sentence = sentences[index]
        words, starts, position = [], [], 0
        for word in jieba.lcut(sentence, HMM=False):
            if len(word) >= 2 and all(is_chinese_character(c) and c in known for c in word):
                words.append(word)
                starts.append(position)
            position += len(word)
        if not words:
            continue
        choice = int(rng.integers(len(words)))
        offset = starts[choice] + int(rng.integers(len(words[choice])))
        blanks.append(Blank(sentence[:offset] + MASK_TOKEN + sentence[offset + 1:], sentence[offset]))
        if len(blanks) == num_blanks:
            break
    return blanks


def read_blanks(path) -> list[Blank]:
    """Blanks from a JSON-lines file of ``{"text": ..., "answer": ...}``; a bad line is an error naming it."""
    blanks = []
    for number, line in numbered_lines(path, "--blanks"):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            text, answer = record["text"], record["answer"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise InputError(f"{path}:{number}: expected a JSON object with \"text\" and \"answer\"") from None
        if not isinstance(text, str) or text.count(MASK_TOKEN) != 1:
            raise InputError(f"{path}:{number}: \"text\" must hold exactly one {MASK_TOKEN}")
        if not isinstance(answer, str) or len(answer) != 1:
            raise InputError(f"{path}:{number}: \"answer\" must be one character, got {answer!r}")
        blanks.append(Blank(text, answer))
    if not blanks:
        raise InputError(f"{path} holds no blanks")
    return blanks


def write_blanks(path, blanks: list[Blank]) -> None:
    Path(path).write_text("".join(json.dumps({"text": b.text, "answer": b.answer}, ensure_ascii=False) + "\n"
                                  for b in blanks), encoding="utf-8")


def frequency_guess(texts, top_k: int = 5) -> list[str]:
    """The ``top_k`` most frequent Chinese characters of ``texts``: the guess of a model without context."""
    counts = Counter(ch for text in texts for ch in text if is_chinese_character(ch))
    return [ch for ch, _ in counts.most_common(top_k)]


def frequency_guess_from_shards(data_dir, top_k: int = 5) -> list[str]:
    """The ``top_k`` most frequent Chinese characters of a shards folder's training split."""
    counts = token_counts(ShardDataset(data_dir, "train", verify=False))
    ranked = load_tokenizer().convert_ids_to_tokens(np.argsort(-counts, kind="stable").tolist())
    return [t for t in ranked if len(t) == 1 and is_chinese_character(t)][:top_k]


@torch.no_grad()
def score_cloze(model, tokenizer, blanks: list[Blank], guess: list[str], top_k: int = 5,
                batch_size: int = 32, num_examples: int = 5) -> dict:
    """Top-1 and top-``top_k`` accuracy of ``model`` on ``blanks``, beside the frequency ``guess`` (a fixed
    ranked list of characters) on the same blanks; ``examples`` shows the first ``num_examples`` answers."""
    model.eval()
    device = next(model.parameters()).device
    max_len = model.config.max_position_embeddings
    hits1 = hits_k = guess1 = guess_k = 0
    examples = []
    for start in range(0, len(blanks), batch_size):
        chunk = blanks[start:start + batch_size]
        encoded = tokenizer([normalize_text(b.text) for b in chunk], return_tensors="pt", padding=True,
                            truncation=True, max_length=max_len)
        ids = encoded["input_ids"]
        hidden = model.bert(ids.to(device), attention_mask=encoded["attention_mask"].to(device),
                            token_type_ids=torch.zeros_like(ids).to(device)).last_hidden_state
        where = (ids == tokenizer.mask_token_id).nonzero()
        if len(where) != len(chunk):
            raise InputError("a blank lost its [MASK] to truncation: shorten the texts")
        logits = model.cls(hidden[where[:, 0].to(device), where[:, 1].to(device)]).float()
        ranked = logits.topk(top_k, dim=-1).indices.cpu().tolist()
        for blank, ids_ranked in zip(chunk, ranked):
            tokens = tokenizer.convert_ids_to_tokens(ids_ranked)
            hits1 += tokens[0] == blank.answer
            hits_k += blank.answer in tokens
            guess1 += guess[:1] == [blank.answer]
            guess_k += blank.answer in guess[:top_k]
            if len(examples) < num_examples:
                examples.append({"text": blank.text, "answer": blank.answer, "top": tokens})
    n = len(blanks)
    return {"blanks": n, "top1": hits1 / n, f"top{top_k}": hits_k / n, "frequency_guess": guess[:top_k],
            "frequency_top1": guess1 / n, f"frequency_top{top_k}": guess_k / n, "examples": examples}


def blanks_and_guess(blanks_file=None, corpus=None, field: str = "content", num_blanks: int = 300, seed: int = 0,
                     save_blanks=None, frequencies_from=None) -> tuple[list[Blank], list[str]]:
    """``launch/evaluate.py cloze``: the blanks (read from ``blanks_file`` or made from ``corpus`` files, then saved
    to ``save_blanks`` if given) and the frequency guess to score beside the model (a shards folder's training
    split when ``frequencies_from`` is given, else the blanks' own texts)."""
    if blanks_file:
        blanks = read_blanks(blanks_file)
    else:
        blanks = make_blanks(read_corpus_texts(corpus, field), num_blanks, seed)
        if not blanks:
            raise InputError(f"--corpus {' '.join(map(str, corpus))}: no sentence to make a blank from")
        if save_blanks:
            write_blanks(save_blanks, blanks)
    if frequencies_from:
        return blanks, frequency_guess_from_shards(frequencies_from)
    return blanks, frequency_guess([b.text.replace(MASK_TOKEN, b.answer) for b in blanks])


# ---------------------------------------------------------------------------------------------- by position

MAX_DEFAULT_SEQ_LEN = 4096
# The claim to check is "top-5 past position 2,500 about as good as in the first 500": the first and last default
# bands are those two, so the ratio reads off the table; ``first_500`` and ``past_2500`` are reported whatever the
# bands.
DEFAULT_BANDS = "0-499,500-2047,2048-2499,2500-4095"
NEAR_END, FAR_START = 499, 2500
# One blank per 40 tokens masks 2.5% of each input (pretraining masks 10-30%): each blank keeps its context nearly
# whole, and an input of 4,096 tokens still gives about 100 blanks for one forward.
DEFAULT_BLANK_EVERY = 40


@dataclass(frozen=True)
class PositionBand:
    start: int
    end: int  # inclusive

    @property
    def name(self) -> str:
        return f"{self.start}-{self.end}"


def parse_bands(spec: str | None, seq_len: int) -> list[PositionBand]:
    """``START-END,...`` (inclusive token positions, ascending, not overlapping; gaps allowed) as bands. ``None``:
    the default bands fitted to ``seq_len`` (cut, a band past the input dropped, the last one running to the input's
    end); a band the user gives past the input is an error."""
    text = DEFAULT_BANDS if spec is None else spec
    bands = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", part)
        if not match:
            raise ConfigError(f"--bands {text}: {part.strip()!r} is not START-END (inclusive token positions, e.g. "
                              f"{DEFAULT_BANDS})")
        band = PositionBand(int(match[1]), int(match[2]))
        if band.start > band.end:
            raise ConfigError(f"--bands {text}: {band.name} ends before it starts")
        if bands and band.start <= bands[-1].end:
            raise ConfigError(f"--bands {text}: {band.name} overlaps or comes before {bands[-1].name}; give ascending, "
                              "non-overlapping bands")
        if band.end >= seq_len:
            if spec is not None:
                raise ConfigError(f"--bands {text}: {band.name} goes past position {seq_len - 1}, the last of "
                                  f"--seq-len {seq_len}")
            if band.start >= seq_len:
                break
            band = PositionBand(band.start, seq_len - 1)
        bands.append(band)
    if spec is None and bands[-1].end < seq_len - 1:  # inputs past 4,096 (--seq-len): the last band runs to their end
        bands[-1] = PositionBand(bands[-1].start, seq_len - 1)
    return bands


def by_position_seq_len(model, seq_len: int | None) -> int:
    """``--seq-len``, checked against the model's positions; ``None``: the model's, at most 4,096."""
    positions = model.config.max_position_embeddings
    if seq_len is None:
        return min(positions, MAX_DEFAULT_SEQ_LEN)
    if seq_len > positions:
        raise ConfigError(f"--seq-len {seq_len}: the model has {positions} positions; give at most {positions} or "
                          "lengthen the model (launch/convert.py --max-pos)")
    if seq_len < 3:
        raise ConfigError(f"--seq-len {seq_len}: an input needs [CLS], at least one token and [SEP]")
    return seq_len


def packed_windows(texts, tokenizer, seq_len: int):
    """The inputs of ``seq_len`` ids the data service would pack from ``texts`` in order (``pack_documents``: the
    documents joined by ``[SEP]``, cut every ``seq_len - 2`` tokens, each piece wrapped as ``[CLS] piece [SEP]``),
    full ones only: a shorter last input would have no far positions. Tokenizes lazily, as many documents as the
    inputs asked for need."""
    body = seq_len - 2
    stream: list[int] = []
    for index, text in enumerate(texts):
        if index:
            stream.append(SEP_ID)
        stream.extend(tokenizer(normalize_text(text), add_special_tokens=False)["input_ids"])
        while len(stream) >= body:
            yield np.array([CLS_ID, *stream[:body], SEP_ID], dtype=np.int64)
            del stream[:body]


def chinese_character_ids(tokenizer) -> np.ndarray:
    """A boolean per vocab id: is the token one Chinese character (what a blank may hide)."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return np.array([len(t) == 1 and is_chinese_character(t) for t in tokens])


@dataclass
class BlankedInput:
    ids: np.ndarray  # the input as read, [CLS] ... [SEP]
    positions: np.ndarray  # the blanks' token positions, ascending

    @property
    def answers(self) -> np.ndarray:
        return self.ids[self.positions]

    def masked_ids(self) -> np.ndarray:
        masked = self.ids.copy()
        masked[self.positions] = MASK_ID
        return masked


def choose_blank_positions(ids: np.ndarray, blankable: np.ndarray, blank_every: int, rng) -> list[int]:
    """One position per stretch of ``blank_every`` tokens between ``[CLS]`` and the last ``[SEP]`` (so blanks spread
    evenly over positions), a seeded one among the stretch's Chinese characters, never right after the previous
    blank (two neighbouring blanks would hide each other's context); a stretch without one gets none."""
    chosen: list[int] = []
    for start in range(1, len(ids) - 1, blank_every):
        stretch = np.arange(start, min(start + blank_every, len(ids) - 1))
        stretch = stretch[blankable[ids[stretch]]]
        if chosen:
            stretch = stretch[stretch > chosen[-1] + 1]
        if len(stretch):
            chosen.append(int(stretch[rng.integers(len(stretch))]))
    return chosen


def position_band_blanks(texts, tokenizer, seq_len: int, num_blanks: int, blank_every: int = DEFAULT_BLANK_EVERY,
                         seed: int = 0) -> list[BlankedInput]:
    """The inputs to score and their blanks: consecutive inputs of ``texts`` (``packed_windows``) until
    ``num_blanks`` blanks are chosen (``choose_blank_positions``; the last input keeps a seeded subset, not its first
    ones, so no band is favoured), fewer only when the documents run out. Deterministic from ``seed``."""
    if num_blanks < 1:
        raise ConfigError(f"--num-blanks {num_blanks}: score at least 1 blank")
    if blank_every < 2:
        raise ConfigError(f"--blank-every {blank_every}: at least 2, so blanks never neighbour")
    blankable = chinese_character_ids(tokenizer)
    rng = np.random.default_rng(seed)
    inputs, total = [], 0
    for ids in packed_windows(texts, tokenizer, seq_len):
        positions = choose_blank_positions(ids, blankable, blank_every, rng)
        if total + len(positions) > num_blanks:
            positions = sorted(rng.choice(positions, num_blanks - total, replace=False).tolist())
        if positions:
            inputs.append(BlankedInput(ids, np.array(positions, dtype=np.int64)))
            total += len(positions)
        if total == num_blanks:
            break
    if not inputs:
        raise InputError(f"--corpus: the documents make no input of --seq-len {seq_len} tokens with a Chinese "
                         "character to blank; give more (or longer) documents")
    return inputs


@dataclass
class PositionScores:
    """One entry per blank, in input order."""
    positions: np.ndarray
    answers: np.ndarray
    top1: np.ndarray  # bool: the answer is the model's first candidate
    top_k: np.ndarray  # bool: the answer is among its ``top_k``


@torch.no_grad()
def score_position_blanks(model, inputs: list[BlankedInput], batch_size: int = 2, top_k: int = 5) -> PositionScores:
    """Every blank of ``inputs`` scored with all blanks of its input masked at once and the whole input read in one
    forward: no padding (the inputs are equally long), no global attention (the masked LM marks none)."""
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: at least 1")
    model.eval()
    device = next(model.parameters()).device
    positions, answers, top1, hits = [], [], [], []
    for start in range(0, len(inputs), batch_size):
        batch = inputs[start:start + batch_size]
        ids = torch.from_numpy(np.stack([x.masked_ids() for x in batch])).to(device)
        hidden = model.bert(ids, attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids)).last_hidden_state
        rows = torch.from_numpy(np.concatenate([np.full(len(x.positions), i) for i, x in enumerate(batch)])).to(device)
        cols = torch.from_numpy(np.concatenate([x.positions for x in batch])).to(device)
        ranked = model.cls(hidden[rows, cols]).float().topk(top_k, dim=-1).indices.cpu().numpy()
        answer = np.concatenate([x.answers for x in batch])
        positions.append(cols.cpu().numpy())
        answers.append(answer)
        top1.append(ranked[:, 0] == answer)
        hits.append((ranked == answer[:, None]).any(axis=1))
    return PositionScores(*(np.concatenate(parts) for parts in (positions, answers, top1, hits)))


def band_score(scores: PositionScores, band: PositionBand) -> dict:
    """Blanks, top-1 and top-5 of the blanks whose position lies in ``band`` (``None`` scores for no blanks)."""
    inside = (scores.positions >= band.start) & (scores.positions <= band.end)
    n = int(inside.sum())
    return {"band": band.name, "start": band.start, "end": band.end, "blanks": n,
            "top1": float(scores.top1[inside].mean()) if n else None,
            "top5": float(scores.top_k[inside].mean()) if n else None}


def score_by_position(model, tokenizer, texts, seq_len: int | None = None, bands: str | None = None,
                      num_blanks: int = 1000, blank_every: int = DEFAULT_BLANK_EVERY, seed: int = 0,
                      batch_size: int = 2) -> dict:
    """``launch/evaluate.py by-position``: top-1/top-5 per band of token positions on long inputs of ``texts``
    (``position_band_blanks``, ``score_position_blanks``), plus the bands ``first_500`` (0-499) and ``past_2500``
    (2,500 to the last position; ``None`` when the inputs are no longer than 2,500) and ``ratio_far_to_near``, the
    top-5 of the second over the first (``None`` when either has no blanks or the first scores 0)."""
    seq_len = by_position_seq_len(model, seq_len)
    parsed = parse_bands(bands, seq_len)  # before the corpus is read: a typo fails at once
    inputs = position_band_blanks(texts, tokenizer, seq_len, num_blanks, blank_every, seed)
    scores = score_position_blanks(model, inputs, batch_size)
    near = band_score(scores, PositionBand(0, min(NEAR_END, seq_len - 1)))
    far = band_score(scores, PositionBand(FAR_START, seq_len - 1)) if seq_len > FAR_START else None
    ratio = (far["top5"] / near["top5"] if far and far["blanks"] and near["blanks"] and near["top5"] else None)
    return {"seq_len": seq_len, "inputs": len(inputs), "blank_every": blank_every,
            "masked_share": len(scores.positions) / (len(inputs) * seq_len), "blanks": len(scores.positions),
            "top1": float(scores.top1.mean()), "top5": float(scores.top_k.mean()),
            "bands": [band_score(scores, band) for band in parsed], "first_500": near, "past_2500": far,
            "ratio_far_to_near": ratio}


# ---------------------------------------------------------------------------------------------- one long document

@dataclass
class LongDocumentBlank:
    document: int  # index among the corpus documents, in --corpus order
    text: str  # the document, normalised as the tokenizer needs
    position: int  # character index of the blank, >= min_chars
    word: str  # the jieba word whose first character is blanked
    earlier: int | None  # where the word occurs first before the blank, if it does


def long_document_blank(texts, min_chars: int = 2000) -> LongDocumentBlank:
    """The first document longer than ``min_chars`` characters with a word to blank at or past character
    ``min_chars`` (0-based): a word of 2+ Chinese characters the vocab knows, its first character blanked. Of those,
    the first that also occurs before character ``min_chars // 2`` (the answer is there to read, far back), else the
    first that occurs anywhere before, else the first. Deterministic: no seed."""
    jieba.setLogLevel(60)
    known = _vocab_chars()
    longest = 0
    for index, raw in enumerate(texts):
        text = normalize_text(raw)
        longest = max(longest, len(text))
        if len(text) <= min_chars:
            continue
        candidates, position = [], 0
        for word in jieba.lcut(text, HMM=False):
            if (position >= min_chars and len(word) >= 2
                    and all(is_chinese_character(c) and c in known for c in word)):
                first = text.find(word)
                candidates.append((position, word, first if first < position else None))
            position += len(word)
        if not candidates:
            continue
        far_back = [c for c in candidates if c[2] is not None and c[2] < min_chars // 2]
        earlier = [c for c in candidates if c[2] is not None]
        position, word, first = (far_back or earlier or candidates)[0]
        return LongDocumentBlank(index, text, position, word, first)
    raise InputError(f"--corpus: no document longer than {min_chars:,} characters with a Chinese word past character "
                     f"{min_chars:,} (the longest has {longest:,}); give longer documents or a smaller --long-document")


def fill_long_document(model, tokenizer, texts, min_chars: int = 2000, top_k: int = 5, context_chars: int = 30) -> dict:
    """``launch/evaluate.py fill-mask --corpus``: the model's ``top_k`` for the blank of ``long_document_blank``,
    the whole document read in one input. A model with fewer positions than the document's tokens is refused rather
    than the document cut (cutting would drop the far context this is meant to show)."""
    from .fill_mask import fill_mask

    blank = long_document_blank(texts, min_chars)
    text = blank.text[:blank.position] + MASK_TOKEN + blank.text[blank.position + 1:]
    ids = tokenizer(text)["input_ids"]
    positions = model.config.max_position_embeddings
    if len(ids) > positions:
        raise ConfigError(f"document {blank.document} ({len(blank.text):,} characters) is {len(ids):,} tokens with "
                          f"[CLS] and [SEP]; the model has {positions:,} positions and would not read it whole: give a "
                          "longer model (launch/convert.py --max-pos) or a smaller --long-document")
    candidates = fill_mask(model, tokenizer, text, top_k=top_k)[0]
    top = [c["token"] for c in candidates]
    answer = blank.text[blank.position]
    return {"document": blank.document, "document_chars": len(blank.text), "tokens": len(ids),
            "model_positions": positions, "blank_char": blank.position, "blank_token": ids.index(MASK_ID),
            "word": blank.word, "word_earlier_at": blank.earlier, "answer": answer,
            "context": (blank.text[max(0, blank.position - context_chars):blank.position] + MASK_TOKEN
                        + blank.text[blank.position + 1:blank.position + 1 + context_chars]),
            "earlier_context": (None if blank.earlier is None else
                                blank.text[max(0, blank.earlier - 10):blank.earlier + len(blank.word) + 10]),
            "top": top, "scores": [c["score"] for c in candidates],
            "answer_rank": top.index(answer) + 1 if answer in top else None}
