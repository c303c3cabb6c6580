"""Fill-in-the-blank evaluation: does a masked LM put the missing character of a word in its top 1 / top 5?

A blank is a sentence with one ``[MASK]`` and the character that belongs there. Blanks come from a JSON-lines
file (``{"text": "...[MASK]...", "answer": "金"}`` per line) or are made from a corpus: one character of a
multi-character jieba word (a word of Chinese characters the vocab knows), one blank per sentence, chosen by a
seed, so the same corpus and seed always give the same blanks. The score sits next to a frequency guess on the
same blanks (the five most frequent characters, whatever the context), which a model that reads context beats.
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

from .constants import MASK_TOKEN
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


def read_corpus_texts(paths, field: str = "content") -> list[str]:
    """The documents of ``paths``: JSON lines (their ``field``) or plain text, one document per line."""
    texts = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                if not line.startswith("{"):
                    texts.append(line)
                    continue
                try:
                    texts.append(str(json.loads(line)[field]))
                except (json.JSONDecodeError, KeyError):
                    raise ValueError(f"{path}:{number}: not a JSON object with a {field!r} field (--field)") from None
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
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                text, answer = record["text"], record["answer"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{path}:{number}: expected a JSON object with \"text\" and \"answer\"") from None
            if not isinstance(text, str) or text.count(MASK_TOKEN) != 1:
                raise ValueError(f"{path}:{number}: \"text\" must hold exactly one {MASK_TOKEN}")
            if not isinstance(answer, str) or len(answer) != 1:
                raise ValueError(f"{path}:{number}: \"answer\" must be one character, got {answer!r}")
            blanks.append(Blank(text, answer))
    if not blanks:
        raise ValueError(f"{path} holds no blanks")
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
            raise ValueError("a blank lost its [MASK] to truncation: shorten the texts")
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
            raise ValueError(f"--corpus {' '.join(map(str, corpus))}: no sentence to make a blank from")
        if save_blanks:
            write_blanks(save_blanks, blanks)
    if frequencies_from:
        return blanks, frequency_guess_from_shards(frequencies_from)
    return blanks, frequency_guess([b.text.replace(MASK_TOKEN, b.answer) for b in blanks])
