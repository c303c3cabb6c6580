"""Pretrain (or continue pretraining) a Longformer_ZH masked LM with DeepSpeed.

Run by the ``deepspeed`` launcher, one process per GPU (or per ``--num_gpus`` on a CPU machine)::

    deepspeed launch/pretrain.py --deepspeed_config ds_configs/zero2.json --data SHARDS_DIR \\
        --output-dir RUN_DIR --model-config CONFIG_JSON --max-steps 15000
    deepspeed launch/pretrain.py ... --output-dir RUN_DIR --resume            # continue RUN_DIR's latest checkpoint
    deepspeed launch/pretrain.py ... --init-from MODEL_DIR --start-step 3000  # continue a released model's schedule
    deepspeed launch/pretrain.py ... --data SHARDS_4096 --output-dir RUN2 --continue-from RUN_DIR   # a second phase

Exit status: 0 done, 2 bad arguments or config (nothing was computed), 3 the loss stayed non-finite, 4 another
process of the run (on this node or another) stopped: restart every node with --resume.
"""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", required=True,
                   help="DeepSpeed JSON config (see ds_configs/)")
    p.add_argument("--data", required=True, help="folder of shards + manifest.json written by launch/preprocess.py")
    p.add_argument("--output-dir", required=True, help="run folder: checkpoints/, metrics.jsonl, tensorboard/, curves.png")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--model-config", help="LongformerZhConfig JSON: train from scratch")
    model.add_argument("--init-from", help="from_pretrained folder (converted or released Longformer_ZH weights)")
    model.add_argument("--continue-from", metavar="RUN_OR_STEP_DIR",
                       help="a second phase of a run: its checkpoint's weights, optimizer state and step, on new "
                            "--data (for example longer sequences), written to a new --output-dir")
    p.add_argument("--attention-backend", choices=("block_sparse", "sliding_chunks"), default=None,
                   help="override the model config's backend (a --model-config without one gets block_sparse)")
    p.add_argument("--max-steps", type=int, required=True, help="stop after this optimizer step")
    p.add_argument("--start-step", type=int, default=0,
                   help="with --init-from: the step the model was trained to, so the LR schedule continues from it")
    p.add_argument("--resume", action="store_true", help="continue from --output-dir's latest checkpoint")
    p.add_argument("--rewarm-steps", type=int, default=0,
                   help="when a resumed or continued run's schedule ends later than its checkpoint's: climb back "
                        "to the peak learning rate over N steps, then decay to 0 at the new end (default 0: decay "
                        "on from the rate where the run was, with no jump)")
    p.add_argument("--stretch-schedule", action="store_true",
                   help="when a resumed run's schedule ends later: follow the config's schedule with the new end "
                        "from the first resumed step (the rate jumps up if the run had decayed)")
    p.add_argument("--save-interval", type=int, default=1000, help="checkpoint every K steps and at the end (default 1000)")
    p.add_argument("--keep-checkpoints", type=int, default=3, help="keep the last N checkpoints, 0 keeps all (default 3)")
    p.add_argument("--eval-interval", type=int, default=1000,
                   help="validation BPC at the start, every M steps and at the end; 0: never (default 1000)")
    p.add_argument("--eval-sequences", type=int, default=None,
                   help="validate on the first N >= 1 validation sequences (default: all)")
    p.add_argument("--final-eval-sequences", type=lambda v: v if v == "all" else int(v), default=None,
                   metavar="N|all", help="the validation at the end on N sequences, or all (default: as "
                                         "--eval-sequences): a cheap curve during the run, a precise final number")
    p.add_argument("--eval-batch-size", type=int, default=None, help="default: the micro-batch size")
    p.add_argument("--log-interval", type=int, default=10, help="console line every N steps (default 10)")
    p.add_argument("--seed", type=int, default=None,
                   help="model init, data order, dropout (default 42; with --resume: the checkpoint's)")
    p.add_argument("--masking", choices=("static", "dynamic"), default=None,
                   help="static (default): the data service's stored masks; dynamic: re-mask every epoch from the "
                        "seed (with --resume: the checkpoint's)")
    p.add_argument("--mask-prob", type=float, default=None,
                   help="with --masking dynamic: the share of tokens masked (whole words), chosen at training time "
                        "(default: the --mask-prob the shards were preprocessed with)")
    p.add_argument("--max-predictions", type=int, default=None,
                   help="with --masking dynamic: at most N masked tokens per sequence (default: the shards' setting, "
                        "or no cap with --mask-prob)")
    p.add_argument("--mask-unit", choices=("word", "character", "mixed"), default=None,
                   help="with --masking dynamic: mask whole words (the shards' rule, as the upstream), characters "
                        "on their own, so the model also learns to fill one character of a word from the others, or "
                        "each sequence one way or the other at random (mixed: half and half) (default word; with "
                        "--resume: the checkpoint's)")
    p.add_argument("--output-bias-init", choices=("zero", "unigram"), default="zero",
                   help="a model trained from scratch: its masked-LM output bias starts at 0 (BERT's) or at the "
                        "log character frequencies of the training shards, so it starts where a frequency table "
                        "ends (default zero)")
    p.add_argument("--embedding-init", choices=("normal", "cooccurrence"), default="normal",
                   help="a model trained from scratch: its word embeddings (tied to the masked-LM decoder) start "
                        "random (BERT's) or at vectors of how characters co-occur in the training shards, so "
                        "characters that keep company start close (default normal)")
    p.add_argument("--output-vocab", choices=("all", "training"), default=None,
                   help="the tokens the training softmax runs over: all 21,128, or those that occur in the "
                        "training shards (every training label; a head 2.3x cheaper on Chinese news); validation "
                        "always scores over all (default all; with --resume: the checkpoint's)")
    p.add_argument("--max-nonfinite-steps", type=int, default=50,
                   help="stop when the loss is NaN/inf for this many consecutive steps (default 50)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="one device's peak TFLOP/s at the run's precision, for the MFU in the log (default: a table of "
                        "common GPUs' fp16/bf16 peaks; none on CPU)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # lazily: --help and a mistake in the arguments answer without importing torch and DeepSpeed
    from lfzh_ds.errors import UserError
    from lfzh_ds.training import pretraining
    from lfzh_ds.training.distributed import (
        EXIT_BAD_INPUT,
        EXIT_DIVERGED,
        EXIT_LOST_PEER,
        lost_a_peer,
        lost_peer_message,
        rank_and_world,
    )
    from lfzh_ds.training.trainer import TrainingDiverged

    try:
        settings = pretraining.PretrainSettings.from_args(args)  # every check between the flags
        summary = pretraining.run(settings)
    except (UserError, TrainingDiverged) as err:
        # Every process stops with the same error; rank 0 says it (under the launcher, ``leave`` below then ends
        # every process the same way).
        if rank_and_world()[0] == 0:
            print(f"error: {err}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT if isinstance(err, UserError) else EXIT_DIVERGED
    except Exception as err:
        if not lost_a_peer(err):
            raise
        print(f"error: {lost_peer_message(err, args.output_dir)}", file=sys.stderr, flush=True)
        return EXIT_LOST_PEER
    if rank_and_world()[0] == 0:
        bpc = ""
        if summary.first_val_bpc is not None and summary.last_val_bpc is not None:
            bpc = f"; validation BPC {summary.first_val_bpc:.3f} -> {summary.last_val_bpc:.3f}"
        print(f"done: step {summary.final_step}; run folder {summary.run_dir}; last checkpoint "
              f"{summary.last_checkpoint}{bpc}", flush=True)
    return 0


if __name__ == "__main__":
    from launch.cli import exit_run

    exit_run(main())
