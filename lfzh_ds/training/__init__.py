"""Pretraining with DeepSpeed: config loading, the resumable sampler, checkpoints, metrics and the loop.

- ``engine``: reads and checks a DeepSpeed JSON config for this machine, starts torch.distributed, builds the engine.
- ``sampler``: the deterministic distributed sampler whose position is one integer (samples consumed).
- ``checkpoint``: saving/resuming (data position, RNG states, counters), keep-N, universal conversion, export.
- ``metrics``: ``metrics.jsonl``, TensorBoard (DeepSpeed's monitor), console lines and the curves PNG.
- ``evaluation``: masked-token cross-entropy and bits per character (BPC) on a split with fixed masks.
- ``pretraining``: the training loop itself, top to bottom.
"""
