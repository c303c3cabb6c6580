"""Masked-token cross-entropy and bits per character (BPC) on a split with fixed masks.

BPC here is the seed's number: the mean cross-entropy (in nats) over masked tokens divided by ln 2. A Chinese
token is one character, so it is bits per (masked) character. Validation uses the data service's static masks
(the first stored copy of every validation sequence), so numbers are comparable across runs and machines.
A uniform guess over the 21,128-token vocabulary scores log2(21128) = 14.37.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class BpcResult:
    cross_entropy_sum: float  # nats, summed over masked tokens
    masked_tokens: int
    sequences: int

    @property
    def loss(self) -> float:
        """Mean cross-entropy per masked token; NaN when no token was evaluated (not a perfect 0)."""
        return self.cross_entropy_sum / self.masked_tokens if self.masked_tokens else math.nan

    @property
    def bpc(self) -> float:
        return self.loss / math.log(2)


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
    total, tokens = 0.0, 0
    for chunk in batches:
        counted = bool(chunk)
        batch = collate([dataset[i] for i in (chunk or [0])])
        batch = {k: v.to(device) for k, v in batch.items()}
        n = int((batch["labels"] != -100).sum())
        loss = forward(**batch).loss
        if counted and n:
            total += float(loss.float()) * n
            tokens += n
    return BpcResult(cross_entropy_sum=total, masked_tokens=tokens, sequences=len(indices))


def all_reduce_result(result: BpcResult, device="cpu") -> BpcResult:
    """Sum a per-process ``BpcResult`` over all processes (collective)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return result
    t = torch.tensor([result.cross_entropy_sum, result.masked_tokens, result.sequences], dtype=torch.float64,
                     device=device)
    dist.all_reduce(t)
    return BpcResult(cross_entropy_sum=float(t[0]), masked_tokens=int(t[1]), sequences=int(t[2]))


def evaluate_model_bpc(model, dataset, batch_size: int = 4, max_sequences: int | None = None) -> BpcResult:
    """BPC of a plain (non-DeepSpeed) model on ``dataset``, for ``launch/evaluate.py bpc``."""
    model.eval()
    device = next(model.parameters()).device
    return masked_lm_cross_entropy(model, dataset, validation_indices(dataset, max_sequences), batch_size, device)


def load_masked_lm(path):
    """A ``LongformerZhForMaskedLM`` from a ``from_pretrained`` folder, a run folder or one checkpoint folder."""
    from pathlib import Path

    from .checkpoint import is_training_checkpoint, load_model_from_run

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; give a model folder (config.json + weights), a run folder "
                                "of launch/pretrain.py, or one of its checkpoints/step_N folders")
    if is_training_checkpoint(path):
        return load_model_from_run(path)
    from ..modeling import LongformerZhForMaskedLM

    return LongformerZhForMaskedLM.from_pretrained(path).eval()
