"""Starting points for a model pretrained from scratch, computed from its own training split.

A small model on a CPU budget spends its first hundreds of steps learning what simple corpus statistics already
know: which characters are frequent (the output bias) and which characters keep company (the embeddings). Both
starts below put that knowledge in the ordinary BERT parameters before step 1; the architecture, the loss and
everything saved stay those of BERT/Longformer_ZH, and no data beyond the training split is used.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sparse
import torch
from sklearn.utils.extmath import randomized_svd

from ..constants import VOCAB_SIZE

# The co-occurrence embeddings start at this many times BERT's initializer_range (std 0.02): measured on inews
# (benchmarks/pretraining_recipe.py), 5x reached a lower validation BPC than 1x at every step up to 300 (the
# softmax needs logits of a few units to express the statistics the vectors carry).
COOCCURRENCE_SCALE = 5.0


def init_output_bias_to_unigram(model, counts) -> None:
    """Start the masked-LM head's output bias at the log frequencies of the training tokens (add-one smoothed):
    the untrained model then predicts character frequencies (about 9.6 BPC on Chinese news) instead of a uniform
    guess (14.4), and training spends its first steps on context rather than on re-learning frequencies."""
    counts = torch.as_tensor(counts, dtype=torch.float64) + 1.0
    with torch.no_grad():
        model.cls.predictions.bias.copy_((counts / counts.sum()).log().to(model.cls.predictions.bias.dtype))


def cooccurrence_vectors(dataset, dim: int, window: int = 2, context_smoothing: float = 0.75):
    """(token ids, [len(ids), dim] vectors) whose dot products approximate the positive pointwise mutual
    information of two tokens occurring within ``window`` positions of each other in ``dataset``'s sequences
    (context counts raised to ``context_smoothing``, as in word2vec's negative sampling): the eigenvectors of
    the ``dim`` largest positive eigenvalues of the symmetric PPMI matrix, scaled by the eigenvalues' square
    roots (Levy and Goldberg's symmetric SVD). Deterministic: a fixed random state and scikit-learn's sign
    convention."""
    sequences = []
    for row in range(dataset.num_rows):
        ids, _, num_tokens = dataset.sequence(row)
        sequences.append(np.asarray(ids[:num_tokens], dtype=np.int64))
    ids = np.unique(np.concatenate(sequences))
    column_of = np.full(VOCAB_SIZE, -1, dtype=np.int64)
    column_of[ids] = np.arange(ids.size)
    first = np.concatenate([column_of[s[:-k]] for s in sequences for k in range(1, window + 1)])
    second = np.concatenate([column_of[s[k:]] for s in sequences for k in range(1, window + 1)])
    n = ids.size
    counts = sparse.coo_matrix((np.ones(first.size), (first, second)), shape=(n, n)).tocsr()
    counts = (counts + counts.T).tocoo()  # both directions: a character's company on either side
    totals = np.asarray(counts.sum(axis=1)).ravel()
    context = totals ** context_smoothing
    pmi = (np.log(counts.data / totals.sum()) - np.log(totals[counts.row] / totals.sum())
           - np.log(context[counts.col] / context.sum()))
    keep = pmi > 0
    ppmi = sparse.coo_matrix((pmi[keep], (counts.row[keep], counts.col[keep])), shape=(n, n)).tocsr()
    ppmi = (ppmi + ppmi.T) * 0.5  # the smoothing made it slightly asymmetric
    # Randomized SVD (a few sparse products: 15 CPU s on 10,521 sequences where ARPACK's eigsh took 23) of twice
    # the components asked for, keeping those of positive eigenvalues: a symmetric matrix's singular vectors are its
    # eigenvectors, and a negative eigenvalue (left and right vectors of opposite signs) comes from pairs like "A is
    # followed by B": folding it in with a plus sign would cancel exactly the A-B closeness it carries.
    u, values, vt = randomized_svd(ppmi, n_components=min(2 * dim, n - 1), n_iter=5, random_state=0)
    positive = np.flatnonzero((u * vt.T).sum(axis=0) > 0)[:dim]
    return ids, u[:, positive] * np.sqrt(values[positive])


def init_word_embeddings_from_cooccurrence(model, dataset, scale: float = COOCCURRENCE_SCALE,
                                           window: int = 2) -> None:
    """Start the word embeddings (tied to the masked-LM decoder) of the tokens that occur in ``dataset`` at their
    co-occurrence vectors, rescaled to ``scale`` times the config's ``initializer_range``; tokens that never occur
    keep their random start. Characters that keep company start close together, so the head's dot products
    already rank a masked character's likely neighbours, and training starts from there."""
    weight = model.base_model.embeddings.word_embeddings.weight
    ids, vectors = cooccurrence_vectors(dataset, weight.shape[1], window=window)
    start = np.zeros((ids.size, weight.shape[1]))
    start[:, :vectors.shape[1]] = vectors
    start *= scale * model.config.initializer_range / start.std()
    with torch.no_grad():
        weight[torch.from_numpy(ids)] = torch.from_numpy(start).to(weight.dtype)
