"""Near-duplicate documents: MinHash over character n-grams, LSH banding, an exact Jaccard check.

One rule, used by the data service (pretraining corpora) and by fine-tuning's leak removal:
two documents are near-duplicates when the Jaccard similarity of their sets of character
``NGRAM``-grams (whitespace removed) is at least the threshold (0.8 by default).

- :func:`shingles`: the sorted, unique 64-bit hashes of a text's character n-grams (numpy,
  vectorised: code points -> polynomial hash of each window -> a 64-bit mixer).
- :func:`band_keys`: the text's LSH keys: ``NUM_BANDS`` MinHash bands of ``BAND_ROWS`` values
  (hash functions ``(a x + b) mod 2**64``, top 32 bits), every band folded to one 64-bit key.
  Two documents become candidates when they share a key in the same band; with 20 bands of 5 a pair at Jaccard 0.8 is a candidate with
  probability 0.9997, at 0.5 with 0.47 (and the exact check then rejects it).
- :func:`candidate_pairs`: from the keys of a whole corpus, the pairs ``(i, j)``, ``i < j``,
  that share a bucket: each document is paired with the first and with the previous document
  of every bucket it is in, so a bucket of ``m`` documents gives fewer than ``2m`` pairs.
- :func:`jaccard`: the exact similarity of two shingle sets.
- :func:`near_duplicates`: the rule applied in document order: a document is removed when it
  is a near-duplicate of an earlier document that is kept, so the earliest copy stays and the
  answer depends only on the order of the documents.

The hash functions are fixed (constants below, no process-dependent seeds), so keys computed on
any machine agree.
"""
from __future__ import annotations

import numpy as np

NGRAM = 5
NUM_BANDS = 20
BAND_ROWS = 5
DEFAULT_THRESHOLD = 0.8

_U64 = np.uint64
_POLY = _U64(0x100000001B3)  # FNV-1a's 64-bit prime: multiplier of the n-gram polynomial


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A bijective 64-bit mixer (splitmix64's finaliser), elementwise on uint64 arrays."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> _U64(30))
        x = x * _U64(0xBF58476D1CE4E5B9)
        x = x ^ (x >> _U64(27))
        x = x * _U64(0x94D049BB133111EB)
        return x ^ (x >> _U64(31))


def _permutation_constants(count: int) -> tuple[np.ndarray, np.ndarray]:
    """Odd multipliers and offsets of the ``count`` hash functions h(x) = (a x + b) >> 32, from a fixed seed."""
    seeds = _splitmix64(np.arange(1, 2 * count + 1, dtype=np.uint64))
    return (seeds[:count] | _U64(1))[:, None], seeds[count:][:, None]


_A, _B = _permutation_constants(NUM_BANDS * BAND_ROWS)
_EMPTY = np.zeros(0, dtype=np.uint64)


def ngram_hashes(text: str, n: int = NGRAM) -> np.ndarray:
    """uint64 hashes of every character n-gram of ``text`` with all whitespace removed, in text order
    (repeats included; a text shorter than ``n`` characters is one n-gram)."""
    compact = "".join(text.split())
    if not compact:
        return _EMPTY
    points = np.frombuffer(compact.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    windows = max(1, len(points) - n + 1)
    h = np.zeros(windows, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(min(n, len(points))):
            h = h * _POLY + points[k:k + windows]
    return _splitmix64(h)


def shingles(text: str, n: int = NGRAM) -> np.ndarray:
    """The shingle set of ``text``: its sorted unique n-gram hashes."""
    return np.unique(ngram_hashes(text, n))


def band_keys(text: str) -> np.ndarray:
    """``NUM_BANDS`` uint64 LSH keys of ``text``; a text without n-grams gets all-zero keys (never a
    candidate: see :func:`candidate_pairs`)."""
    hashes = ngram_hashes(text)
    if hashes.size == 0:
        return np.zeros(NUM_BANDS, dtype=np.uint64)
    with np.errstate(over="ignore"):
        values = _A * hashes[None, :]
        values += _B
        # the top 32 bits of the minimum of a x + b: MinHash value of one hash function (a, b)
        rows = (values.min(axis=1) >> _U64(32)).reshape(NUM_BANDS, BAND_ROWS)
        key = np.zeros(NUM_BANDS, dtype=np.uint64)
        for r in range(BAND_ROWS):
            key = _splitmix64(key * _POLY + rows[:, r])
    key[key == 0] = 1  # 0 is reserved for "no n-grams"
    return key


def candidate_pairs(keys: np.ndarray) -> np.ndarray:
    """Pairs ``[m, 2]`` (int64, ``i < j``, sorted, unique) of rows of ``keys`` ``[n, NUM_BANDS]`` sharing
    a bucket in some band; each row meets the first and the previous row of each of its buckets."""
    n = len(keys)
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64)
    found = []
    index = np.arange(n, dtype=np.int64)
    for band in range(keys.shape[1]):
        column = keys[:, band]
        order = np.lexsort((index, column))  # by key, then by document
        sorted_keys = column[order]
        same = sorted_keys[1:] == sorted_keys[:-1]
        same &= sorted_keys[1:] != 0
        if not same.any():
            continue
        later = order[1:][same]
        previous = order[:-1][same]
        # the first document of each bucket: where a run of equal keys starts
        starts = np.concatenate(([True], sorted_keys[1:] != sorted_keys[:-1]))
        first_of_run = order[np.maximum.accumulate(np.where(starts, np.arange(n), 0))]
        first = first_of_run[1:][same]
        found.append(np.stack([previous, later], axis=1))
        found.append(np.stack([first, later], axis=1)[first != previous])
    if not found:
        return np.zeros((0, 2), dtype=np.int64)
    pairs = np.unique(np.concatenate(found), axis=0)
    return pairs


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard similarity of two sorted unique shingle arrays (0.0 if both are empty)."""
    if a.size == 0 and b.size == 0:
        return 0.0
    common = np.intersect1d(a, b, assume_unique=True).size
    return common / (a.size + b.size - common)


def near_duplicates(pairs: np.ndarray, similarity, threshold: float = DEFAULT_THRESHOLD) -> dict[int, tuple[int, float]]:
    """``{j: (i, J)}`` for every document ``j`` removed as a near-duplicate of the earlier kept document ``i``.

    ``pairs`` are candidate pairs ``i < j``; ``similarity(i, j)`` gives their exact Jaccard. Pairs are
    taken by ``j``, then ``i``: ``j`` is removed at its first partner that is kept and similar enough,
    so which copy stays (the earliest) never depends on how the pairs were found.
    """
    removed: dict[int, tuple[int, float]] = {}
    if len(pairs) == 0:
        return removed
    pairs = pairs[np.lexsort((pairs[:, 0], pairs[:, 1]))]
    for i, j in pairs.tolist():
        if j in removed or i in removed:
            continue
        score = similarity(i, j)
        if score >= threshold:
            removed[j] = (i, score)
    return removed


def near_duplicates_of(queries: list[str], references: list[str],
                       threshold: float = DEFAULT_THRESHOLD) -> dict[int, tuple[int, float]]:
    """``{q: (r, J)}`` for every query text that is a near-duplicate of a reference text: ``r`` is the
    first candidate reference (in reference order) with Jaccard ``J >= threshold``. Used to find
    training documents that nearly repeat an evaluation document."""
    texts = list(references) + list(queries)
    if not queries or not references:
        return {}
    keys = np.stack([band_keys(text) for text in texts])
    pairs = candidate_pairs(keys)
    n = len(references)
    pairs = pairs[(pairs[:, 0] < n) & (pairs[:, 1] >= n)]
    pairs = pairs[np.lexsort((pairs[:, 0], pairs[:, 1]))]
    sets: dict[int, np.ndarray] = {}

    def shingle_set(index):
        if index not in sets:
            sets[index] = shingles(texts[index])
        return sets[index]

    found: dict[int, tuple[int, float]] = {}
    for r, q in pairs.tolist():
        if q - n in found:
            continue
        score = jaccard(shingle_set(r), shingle_set(q))
        if score >= threshold:
            found[q - n] = (r, score)
    return found
