"""Training with DeepSpeed: one loop for pretraining and fine-tuning, one checkpoint manager, and their parts.

- ``ds_config``: reads and checks a DeepSpeed JSON config for this machine (before any compute).
- ``distributed``: rank and world size, starting torch.distributed, CPU threads, a lost peer, rank-0 printing,
  the evaluation batches every process runs the same number of.
- ``engine``: builds the DeepSpeed engine (parameter groups, activation checkpointing).
- ``trainer``: the one training loop (``train``) and what an objective supplies to it (``Objective``: its
  micro-batches, loss, evaluation, console line, curves, and the settings a resume keeps).
- ``checkpoint``: ``CheckpointManager``: saving (keep-N), and every step of resuming (data position, RNG states,
  counters, loss scale, schedule, universal conversion, the metrics' tail), and the one comparison of the settings
  an objective declares a resume must keep (``keep_settings``).
- ``schedule``: the learning-rate schedule of a restored run (DeepSpeed's scheduler, or knots replacing it).
- ``sampler``: the deterministic distributed sampler whose position is one integer (samples consumed).
- ``metrics``: the record of a run: ``metrics.jsonl`` and TensorBoard (DeepSpeed's monitor) written, read back.
- ``curves``: the curves PNG, drawn as an objective's ``CurveSpec`` says.
- ``flops``: model FLOPs of a step and devices' peaks, for TFLOP/s and MFU.
- ``evaluation``: masked-token cross-entropy and bits per character (BPC) on a split with fixed masks.
- ``pretraining``: masked-LM pretraining: its settings (``PretrainSettings``, validated in one place), its steps
  (preflight, data, model, restore, loop) and its objective (``MaskedLM``).
Fine-tuning's set-up and objective live in ``lfzh_ds.finetuning``.
"""
