"""Pretraining with DeepSpeed: config loading, the resumable sampler, checkpoints, metrics and the loop.

- ``ds_config``: reads and checks a DeepSpeed JSON config for this machine (before any compute).
- ``distributed``: rank and world size, starting torch.distributed, CPU threads, a lost peer, rank-0 printing.
- ``engine``: builds the DeepSpeed engine (parameter groups, activation checkpointing).
- ``sampler``: the deterministic distributed sampler whose position is one integer (samples consumed).
- ``checkpoint``: saving/resuming (data position, RNG states, counters), keep-N, universal conversion, export.
- ``metrics``: ``metrics.jsonl``, TensorBoard (DeepSpeed's monitor), console lines and the curves PNG.
- ``evaluation``: masked-token cross-entropy and bits per character (BPC) on a split with fixed masks.
- ``pretraining``: the training loop itself, top to bottom.
"""
