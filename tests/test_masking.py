"""The whole-word masking rule (lfzh_ds.masking): exact proportions, whole words, seed behaviour."""
import numpy as np
import pytest

from lfzh_ds.constants import (
    CLS_ID,
    FIRST_REAL_TOKEN_ID,
    IGNORE_INDEX,
    MASK_ID,
    PAD_ID,
    SEP_ID,
    SPECIAL_IDS,
    UNK_ID,
    VOCAB_SIZE,
)
from lfzh_ds.masking import apply_mask, mask_rng, whole_word_mask, whole_word_spans


def make_sequence(word_lengths, pad=0, seed=0):
    """[CLS] words... [SEP] [PAD]*pad with distinct real token ids, and the word-start flags."""
    rng = np.random.default_rng(seed)
    n = int(sum(word_lengths))
    body = rng.integers(FIRST_REAL_TOKEN_ID, VOCAB_SIZE, size=n)
    starts = np.zeros(n, dtype=np.uint8)
    starts[np.concatenate(([0], np.cumsum(word_lengths)[:-1])).astype(int)] = 1
    ids = np.concatenate(([CLS_ID], body, [SEP_ID], [PAD_ID] * pad)).astype(np.uint16)
    ws = np.concatenate(([1], starts, [1], [1] * pad)).astype(np.uint8)
    return ids, ws


def words_of(word_lengths):
    """Position sets of the words of make_sequence (position 0 is [CLS])."""
    ends = np.cumsum(word_lengths) + 1
    return [set(range(e - n, e)) for n, e in zip(word_lengths, ends)]


def test_single_token_words_give_exact_80_10_10_of_exactly_mask_prob():
    ids, ws = make_sequence([1] * 1000, pad=20)
    positions, replacement = whole_word_mask(ids, ws, mask_rng(0), mask_prob=0.15, max_predictions=10_000)
    assert len(positions) == 150  # round(0.15 * 1000 maskable tokens), not counting [CLS]/[SEP]/[PAD]
    assert (replacement == MASK_ID).sum() == 120
    unchanged = (replacement == ids[positions]).sum()
    randomised = 150 - 120 - unchanged
    # 15 random draws from 21,024 ids may hit the original id by chance, nothing more
    assert 15 <= unchanged <= 16 and randomised == 150 - 120 - unchanged
    assert np.all(np.diff(positions) > 0)


@pytest.mark.parametrize("maskable, prob, expected", [(1000, 0.10, 100), (4094, 0.10, 400), (35, 0.15, 5), (3, 0.10, 1),
                                                     # exact halves round up (Python's round() would give 4, 10, 2)
                                                     (30, 0.15, 5), (70, 0.15, 11), (25, 0.10, 3)])
def test_target_is_round_half_up_of_prob_times_maskable_capped_by_max_predictions(maskable, prob, expected):
    ids, ws = make_sequence([1] * maskable)
    positions, _ = whole_word_mask(ids, ws, mask_rng(1), mask_prob=prob, max_predictions=400)
    assert len(positions) == expected


def test_whole_words_are_never_split_and_specials_never_chosen():
    rng = np.random.default_rng(7)
    for trial in range(30):
        lengths = list(rng.integers(1, 7, size=300))
        ids, ws = make_sequence(lengths, pad=13, seed=trial)
        positions, replacement = whole_word_mask(ids, ws, mask_rng(trial), mask_prob=0.2, max_predictions=400)
        chosen = set(positions.tolist())
        for word in words_of(lengths):
            assert not chosen & word or word <= chosen, "a word was split"
        assert not np.isin(ids[positions], SPECIAL_IDS).any()
        target = min(400, int(np.floor(0.2 * sum(lengths) + 0.5)))
        assert len(positions) <= target
        # single-token words exist in abundance, so the target is met exactly
        assert len(positions) == target


def test_random_replacements_are_never_special_or_unused_tokens():
    ids, ws = make_sequence([1] * 2000)
    ids[1:-1] = 5000  # every original token is the same, so any other non-[MASK] id is a random draw
    drawn = []
    for seed in range(40):
        positions, replacement = whole_word_mask(ids, ws, mask_rng(seed), mask_prob=0.5, max_predictions=2000)
        assert len(positions) == 1000 and (replacement == MASK_ID).sum() == 800
        drawn.append(replacement[(replacement != MASK_ID) & (replacement != 5000)])
    drawn = np.concatenate(drawn)
    assert 3990 <= drawn.size <= 4000  # 100 random draws per sequence (a draw may hit 5000 itself)
    assert drawn.min() >= FIRST_REAL_TOKEN_ID and drawn.max() < VOCAB_SIZE
    assert len(np.unique(drawn)) > 3000  # spread over the vocabulary, not a constant


def test_apply_mask_labels_are_the_original_ids_at_the_chosen_positions():
    ids, ws = make_sequence([2, 1, 3, 1, 1, 2] * 50, pad=5)
    positions, replacement = whole_word_mask(ids, ws, mask_rng(3), mask_prob=0.15, max_predictions=400)
    masked, labels = apply_mask(ids, positions, replacement)
    assert labels.dtype == np.int64 and masked.dtype == np.int64
    assert np.array_equal(labels[positions], ids[positions].astype(np.int64))
    others = np.setdiff1d(np.arange(len(ids)), positions)
    assert np.all(labels[others] == IGNORE_INDEX)
    assert np.array_equal(masked[others], ids[others].astype(np.int64))
    assert np.array_equal(masked[positions], replacement)


def test_max_word_len_3_masks_longer_words_as_single_tokens_like_the_seed():
    lengths = [5] * 200 + [3] * 100
    ids, ws = make_sequence(lengths)
    split_somewhere = False
    for seed in range(10):
        positions, _ = whole_word_mask(ids, ws, mask_rng(seed), mask_prob=0.15, max_predictions=400, max_word_len=3)
        chosen = set(positions.tolist())
        for n, word in zip(lengths, words_of(lengths)):
            if n <= 3:
                assert not chosen & word or word <= chosen  # short words stay whole
            elif chosen & word and not word <= chosen:
                split_somewhere = True
    assert split_somewhere, "words of 5 tokens should be masked token by token with max_word_len=3"
    # without the option, a 5-token word is one unit
    starts, lengths_out = whole_word_spans(ids, ws)
    assert sorted(set(lengths_out.tolist())) == [3, 5]
    starts, lengths_out = whole_word_spans(ids, ws, max_word_len=3)
    assert sorted(set(lengths_out.tolist())) == [1, 3]
    assert lengths_out.sum() == sum(lengths)


def test_words_too_long_for_the_remaining_budget_are_skipped_not_cut():
    ids, ws = make_sequence([4] * 50 + [1] * 2)  # 202 tokens, target round(0.1 * 202) = 20
    for seed in range(20):
        positions, _ = whole_word_mask(ids, ws, mask_rng(seed), mask_prob=0.1, max_predictions=400)
        assert len(positions) <= 20
        chosen = set(positions.tolist())
        for word in words_of([4] * 50 + [1] * 2):
            assert not chosen & word or word <= chosen


def test_a_word_is_cut_at_special_tokens_and_a_sequence_of_specials_masks_nothing():
    ids = np.array([CLS_ID, 500, 501, SEP_ID, 502, 503, SEP_ID], dtype=np.uint16)
    ws = np.array([1, 1, 0, 1, 0, 0, 1], dtype=np.uint8)  # 502 claims to continue a word across [SEP]
    starts, lengths = whole_word_spans(ids, ws)
    assert starts.tolist() == [1, 4] and lengths.tolist() == [2, 2]
    only_specials = np.array([CLS_ID, SEP_ID, PAD_ID, PAD_ID], dtype=np.uint16)
    positions, replacement = whole_word_mask(only_specials, np.ones(4, np.uint8), mask_rng(0), mask_prob=0.15,
                                             max_predictions=10)
    assert positions.size == 0 and replacement.size == 0


def test_masks_are_a_function_of_the_seed_keys_only():
    ids, ws = make_sequence([1, 2, 3] * 100)
    a = whole_word_mask(ids, ws, mask_rng(5, 1, 42), mask_prob=0.15, max_predictions=400)
    b = whole_word_mask(ids, ws, mask_rng(5, 1, 42), mask_prob=0.15, max_predictions=400)
    c = whole_word_mask(ids, ws, mask_rng(5, 2, 42), mask_prob=0.15, max_predictions=400)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize("k, n_mask, n_random", [(15, 12, 2), (25, 20, 3), (5, 4, 1)])
def test_the_random_share_is_round_half_up_of_a_tenth_and_the_rest_keep_their_id(k, n_mask, n_random):
    """k predictions: round_half_up(0.8 k) [MASK], round_half_up(0.1 k) random ids, the rest unchanged
    (hand-computed: 15 -> 12/2/1, 25 -> 20/3/2, 5 -> 4/1/0)."""
    ids, ws = make_sequence([1] * (10 * k))
    ids[1:-1] = 5000  # every original id is the same, so a non-[MASK] id other than 5000 is a random draw
    random_draws = 0
    seeds = range(30)
    for seed in seeds:
        positions, replacement = whole_word_mask(ids, ws, mask_rng(seed), mask_prob=0.1, max_predictions=10_000)
        assert len(positions) == k
        assert (replacement == MASK_ID).sum() == n_mask
        random_draws += int(((replacement != MASK_ID) & (replacement != 5000)).sum())
    # a random draw hits 5000 itself with probability 1/21,024: allow one such hit in all the draws
    assert n_random * len(seeds) - 1 <= random_draws <= n_random * len(seeds)


def test_unk_and_mask_tokens_inside_the_text_are_never_chosen_nor_counted():
    """[UNK] (unknown characters) and a literal [MASK] in a document are special ids: never predicted, and the
    target is a fraction of the other tokens only."""
    ids, ws = make_sequence([1] * 300, pad=7)
    ids[1:-8:3] = UNK_ID
    ids[2:-8:3] = MASK_ID
    real = int((~np.isin(ids, SPECIAL_IDS)).sum())
    assert real == 100
    starts, lengths = whole_word_spans(ids, ws)
    assert not np.isin(ids[starts], (UNK_ID, MASK_ID)).any() and lengths.sum() == real
    for seed in range(10):
        positions, _ = whole_word_mask(ids, ws, mask_rng(seed), mask_prob=0.5, max_predictions=400)
        assert len(positions) == 50  # round(0.5 * 100 real tokens), not of the 300 text positions
        assert not np.isin(ids[positions], SPECIAL_IDS).any()
