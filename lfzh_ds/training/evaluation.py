"""Masked-token cross-entropy and bits per character (BPC) on a split with fixed masks.

BPC here is the upstream's number (Longformer_ZH's): the mean cross-entropy (in nats) over masked tokens divided
by ln 2. A Chinese token is one character, so it is bits per (masked) character. Validation uses the data service's static masks
(the first stored copy of every validation sequence), so numbers are comparable across runs and machines.
A uniform guess over the 21,128-token vocabulary scores log2(21128) = 14.37.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from ..constants import IGNORE_INDEX, VOCAB_SIZE
from ..errors import ConfigError, ShardError
from ..shards import ShardDataset


@dataclass
class BpcResult:
    cross_entropy_sum: float  # nats, summed over masked tokens
    masked_tokens: int
    sequences: int
    # per evaluated sequence: (cross-entropy sum in nats, masked tokens), for the bootstrap interval
    per_sequence: np.ndarray | None = None

    @property
    def loss(self) -> float:
        """Mean cross-entropy per masked token; NaN when no token was evaluated (not a perfect 0)."""
        return self.cross_entropy_sum / self.masked_tokens if self.masked_tokens else math.nan

    @property
    def bpc(self) -> float:
        return self.loss / math.log(2)

    def bpc_interval(self, confidence: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
        """Bootstrap interval of the BPC, resampling whole sequences (masked tokens of one sequence are not
        independent); (nan, nan) without per-sequence numbers."""
        return bootstrap_bpc_interval(self.per_sequence, confidence, resamples, seed)


def bootstrap_bpc_interval(per_sequence, confidence: float = 0.95, resamples: int = 2000,
                           seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap over sequences of sum(cross-entropy) / sum(masked tokens) / ln 2."""
    if per_sequence is None or len(per_sequence) == 0:
        return math.nan, math.nan
    data = np.asarray(per_sequence, dtype=np.float64)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(data), size=(resamples, len(data)))
    sums = data[:, 0][picks].sum(axis=1), data[:, 1][picks].sum(axis=1)
    values = sums[0] / np.maximum(sums[1], 1) / math.log(2)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def token_counts(dataset) -> np.ndarray:
    """How often each vocab id occurs among the real tokens of every sequence of ``dataset`` (special tokens and
    padding included in the count: they are never masked, so they never matter)."""
    counts = np.zeros(VOCAB_SIZE, dtype=np.int64)
    for row in range(dataset.num_rows):
        ids, _, num_tokens = dataset.sequence(row)
        counts += np.bincount(np.asarray(ids[:num_tokens], dtype=np.int64), minlength=VOCAB_SIZE)
    return counts


def frequency_baseline(train_dataset, eval_dataset, indices: list[int], counts=None) -> BpcResult:
    """What character frequencies alone score on ``eval_dataset``'s masked tokens at ``indices``: a unigram model
    of the training split's tokens (add-one smoothed over the vocab). A masked LM that has learned anything from
    context scores below it."""
    counts = (token_counts(train_dataset) if counts is None else np.asarray(counts)).astype(np.float64) + 1.0
    neg_log_p = -np.log(counts / counts.sum())
    per_sequence = []
    for i in indices:
        labels = eval_dataset[i]["labels"].numpy()
        labels = labels[labels != IGNORE_INDEX]
        per_sequence.append((float(neg_log_p[labels].sum()), len(labels)))
    data = np.asarray(per_sequence, dtype=np.float64).reshape(-1, 2)
    return BpcResult(cross_entropy_sum=float(data[:, 0].sum()), masked_tokens=int(data[:, 1].sum()),
                     sequences=len(indices), per_sequence=data)


def frequency_baseline_bpc(train_dataset, eval_dataset, indices: list[int]) -> float:
    return frequency_baseline(train_dataset, eval_dataset, indices).bpc


def collate(samples: list[dict]) -> dict:
    return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}


def validation_indices(dataset, max_sequences: int | None = None) -> list[int]:
    """The first static copy of every sequence (index i < rows), optionally the first ``max_sequences``."""
    rows = getattr(dataset, "num_rows", len(dataset))
    n = rows if max_sequences is None else min(rows, max_sequences)
    return list(range(n))


@torch.no_grad()
def masked_lm_cross_entropy(forward, dataset, indices: list[int], batch_size: int, device="cpu",
                            num_batches: int | None = None) -> BpcResult:
    """Sum of masked-token cross-entropy of ``forward(**batch)`` (a model or a DeepSpeed engine) over ``indices``.

    ``num_batches`` pads the work with uncounted forwards so that every process runs the same number
    (ZeRO-3 gathers parameters collectively in each forward).
    """
    batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    if num_batches is not None:
        if num_batches < len(batches):
            raise ValueError(f"num_batches={num_batches} is fewer than the {len(batches)} batches needed")
        batches += [[]] * (num_batches - len(batches))
    per_sequence = []
    for chunk in batches:
        batch = collate([dataset[i] for i in (chunk or [0])])
        batch = {k: v.to(device) for k, v in batch.items()}
        output = forward(**batch)
        if not chunk:  # a padding forward, not counted
            continue
        labelled = batch["labels"] != IGNORE_INDEX
        logits = output.logits.float()
        if logits.dim() == 3:  # a model that scores every position; ours scores only the labelled ones
            logits = logits[labelled]
        per_token = torch.nn.functional.cross_entropy(logits, batch["labels"][labelled], reduction="none")
        per_row = torch.zeros(labelled.shape[0], dtype=torch.float64, device=per_token.device)
        per_row.index_add_(0, labelled.nonzero()[:, 0], per_token.double())
        per_sequence += list(zip(per_row.cpu().tolist(), labelled.sum(dim=1).cpu().tolist()))
    data = np.asarray(per_sequence, dtype=np.float64).reshape(-1, 2)
    return BpcResult(cross_entropy_sum=float(data[:, 0].sum()), masked_tokens=int(data[:, 1].sum()),
                     sequences=len(indices), per_sequence=data)


def all_reduce_result(result: BpcResult, device="cpu") -> BpcResult:
    """Sum a per-process ``BpcResult`` over all processes (collective)."""
    if not (dist.is_available() and dist.is_initialized()):
        return result
    t = torch.tensor([result.cross_entropy_sum, result.masked_tokens, result.sequences], dtype=torch.float64,
                     device=device)
    dist.all_reduce(t)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result.per_sequence)
    parts = [p for p in gathered if p is not None and len(p)]
    return BpcResult(cross_entropy_sum=float(t[0]), masked_tokens=int(t[1]), sequences=int(t[2]),
                     per_sequence=np.concatenate(parts) if parts else None)


def evaluate_model_bpc(model, dataset, batch_size: int = 4, max_sequences: int | None = None) -> BpcResult:
    """BPC of a plain (non-DeepSpeed) model on ``dataset``, for ``launch/evaluate.py bpc``."""
    model.eval()
    device = next(model.parameters()).device
    return masked_lm_cross_entropy(model, dataset, validation_indices(dataset, max_sequences), batch_size, device)


def bpc_on_shards(model, data_dir, split: str = "validation", batch_size: int = 4,
                  max_sequences: int | None = None) -> dict:
    """``launch/evaluate.py bpc``: the model's BPC on a shards folder's split with the data service's fixed masks,
    its 95% bootstrap interval, and the character-frequency baseline of the same masks (NaN without a train split)."""
    if max_sequences is not None and max_sequences <= 0:
        raise ConfigError(f"--max-sequences {max_sequences}: evaluate at least 1 sequence (leave it out for all)")
    data = ShardDataset(data_dir, split=split, masking="static")
    if not data.num_rows:
        raise ShardError(f"--data {data_dir}: the {split} split is empty (its manifest.json lists no "
                         f"{split} sequences; preprocessed with --val-fraction 0?)")
    with torch.no_grad():
        result = evaluate_model_bpc(model, data, batch_size=batch_size, max_sequences=max_sequences)
    low, high = result.bpc_interval()
    train = ShardDataset(data_dir, split="train", verify=False)
    baseline = (frequency_baseline(train, data, validation_indices(data, max_sequences)).bpc
                if train.num_rows else math.nan)
    return {"bpc": result.bpc, "bpc_low": low, "bpc_high": high, "frequency_baseline_bpc": baseline,
            "loss": result.loss, "masked_tokens": result.masked_tokens, "sequences": result.sequences}
