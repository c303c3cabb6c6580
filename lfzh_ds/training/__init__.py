"""Training with DeepSpeed: one loop for pretraining and fine-tuning, one checkpoint manager, and their parts.

- ``ds_config``: reads and checks a DeepSpeed JSON config for this machine (before any compute).
- ``distributed``: rank and world size, starting torch.distributed, CPU threads, a lost peer, rank-0 printing,
  the evaluation batches every process runs the same number of.
- ``engine``: builds the DeepSpeed engine (parameter groups, activation checkpointing).
- ``trainer``: the one training loop (``train``) and what an objective supplies to it (``Objective``).
- ``checkpoint``: ``CheckpointManager``: saving (keep-N), and every step of resuming (data position, RNG states,
  counters, loss scale, schedule, universal conversion, the metrics' tail); exporting a run's weights.
- ``sampler``: the deterministic distributed sampler whose position is one integer (samples consumed).
- ``metrics``: ``metrics.jsonl``, TensorBoard (DeepSpeed's monitor), console lines and the curves PNG.
- ``evaluation``: masked-token cross-entropy and bits per character (BPC) on a split with fixed masks.
- ``pretraining``: masked-LM pretraining: its set-up, top to bottom, and its objective (``MaskedLM``).
Fine-tuning's set-up and objective live in ``lfzh_ds.finetuning``.
"""
