"""Masked-LM pretraining, run once per process by the ``deepspeed`` launcher (see launch/pretrain.py).

``run`` reads top to bottom: check everything that can be checked before any compute, start the processes, open
the data, build the model and the DeepSpeed engine, restore a checkpoint if asked (``checkpoint.CheckpointManager``),
then hand the masked-LM objective (``MaskedLM``: the sampler's micro-batches, the validation BPC) to the one
training loop (``trainer.train``), which ends with a last validation, a last checkpoint and the curves PNG.
"""
from __future__ import annotations

import difflib
import inspect
import json
import math
import time
import warnings
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from transformers import BertConfig, LongformerConfig, PretrainedConfig

from ..configuration import LongformerZhConfig
from ..constants import VOCAB_SIZE
from ..hf_layout import read_config_dict
from ..modeling import LongformerZhForMaskedLM
from ..run_folder import MODEL_CONFIG_FILENAME, resolve_checkpoint
from ..shards import ShardDataset, ShardError, read_manifest
from . import checkpoint as ckpt
from .distributed import init_distributed, rank_and_world, rank_batches, say
from .ds_config import ConfigError, ResolvedConfig, load_deepspeed_config, read_json_object, validate_with_deepspeed
from .engine import build_engine
from .evaluation import (BpcResult, all_reduce_result, collate, frequency_baseline, masked_lm_cross_entropy,
                         token_counts, validation_indices)
from .initialization import init_output_bias_to_unigram, init_word_embeddings_from_cooccurrence
from .metrics import CURVES_FILENAME, ModelFlops, format_step, peak_tflops_of, read_metrics
from .sampler import ResumableDistributedSampler
from .schedule import ScheduleAfterRestore
from .trainer import FaultInjection, Objective, train

PRETRAINING_DEFAULT_BACKEND = "block_sparse"
DEFAULT_SEED, DEFAULT_MASKING = 42, "static"  # a resumed run takes its checkpoint's instead


@dataclass
class RunSummary:
    run_dir: str
    final_step: int
    first_val_bpc: float | None
    last_val_bpc: float | None
    last_checkpoint: str | None
    curves: str | None


# ---------------------------------------------------------------------------------------------- model

def read_model_config(args: Namespace):
    """The model's config, from --model-config or --init-from; the attention backend defaults to block_sparse."""
    backend = getattr(args, "attention_backend", None)
    if args.init_from:
        model_dir = Path(args.init_from)
        if not (model_dir / "config.json").is_file():
            raise ConfigError(f"--init-from {model_dir}: no config.json there; give a from_pretrained folder "
                              "(launch/convert.py or launch/export.py writes one)")
        return None  # read by from_pretrained, with the backend override below
    path = Path(args.model_config)
    data = read_json_object(path, f"--model-config {path}", "give a JSON file of LongformerZhConfig fields")
    check_model_config_keys(data, path)
    data.pop("model_type", None)
    data.setdefault("attention_backend", PRETRAINING_DEFAULT_BACKEND)
    if backend:
        data["attention_backend"] = backend
    try:
        return LongformerZhConfig.from_dict(data, config_source=f"--model-config {path}")
    except (ValueError, TypeError) as err:
        raise ConfigError(f"--model-config {path}: {err}") from None


def check_model_config_keys(data: dict, path) -> None:
    """Refuse a key that is a misspelling of a model field (``num_hidden_layer``): the config would silently
    keep that field's default. Keys of any transformers config (``sep_token_id``, ``torch_dtype``) and other
    unknown keys (``directionality``, ``pooler_*`` of Google's Chinese BERT configs) are ignored, as
    transformers does."""
    generic = set(inspect.signature(PretrainedConfig.__init__).parameters)
    fields = {  # what shapes the model: BERT's and this config's own arguments
        name
        for config in (BertConfig, LongformerZhConfig)
        for name in inspect.signature(config.__init__).parameters
        if name not in generic and name not in ("self", "kwargs") and not name.endswith("_token_id")
    }
    known = fields | generic | {
        key for config in (BertConfig, LongformerConfig, LongformerZhConfig) for key in config().to_dict()
    }
    for key in data:
        if key in known or key.endswith("_token_id") or key.startswith("pooler_"):
            continue
        close = difflib.get_close_matches(key, sorted(fields), n=1, cutoff=0.8)
        if close:
            raise ConfigError(f"--model-config {path}: unknown key \"{key}\" (did you mean \"{close[0]}\"?); "
                              f"it would be ignored and {close[0]} left at its default. Fix the spelling.")


def recorded_validation_bpc(metrics_path) -> tuple[float | None, float | None]:
    """(first, last) validation BPC already in a run's ``metrics.jsonl`` (None, None without one): a resumed run
    reports its whole run's change, not just the part since the resume."""
    if not Path(metrics_path).is_file():
        return None, None
    val = read_metrics(metrics_path)[1]
    return (val[0]["val_bpc"], val[-1]["val_bpc"]) if val else (None, None)


def build_model(args: Namespace, model_config):
    """--init-from continues a model with the attention it was trained for, on the block kernel: a converted,
    released, transformers-layout or sliding-chunks model runs block_sparse in token mode (exactly its
    Longformer window), a block-sparse model keeps its own window mode; --attention-backend overrides."""
    if args.init_from:
        backend = getattr(args, "attention_backend", None)
        if backend is None and read_config_dict(args.init_from).get("attention_backend") != "block_sparse":
            backend = "block_sparse"
        kwargs = {"attention_backend": backend} if backend else {}
        return LongformerZhForMaskedLM.from_pretrained(args.init_from, **kwargs)
    return LongformerZhForMaskedLM(model_config)


def check_model_fits_data(model_config, seq_len: int, data_dir) -> None:
    if seq_len > model_config.max_position_embeddings:
        raise ConfigError(f"the shards in {data_dir} hold sequences of {seq_len} tokens but the model has "
                          f"max_position_embeddings={model_config.max_position_embeddings}: lengthen it first "
                          f"(launch/convert.py --from MODEL_RUN_OR_STEP --to LONG --max-pos {seq_len}), then "
                          "--init-from LONG (with --start-step N to go on with the schedule)")
    if model_config.vocab_size != VOCAB_SIZE:
        raise ConfigError(f"the model's vocab_size is {model_config.vocab_size}; the shards use the "
                          f"{VOCAB_SIZE}-token Chinese BERT vocab")


# ---------------------------------------------------------------------------------------------- the objective

def fetch(dataset, positions, device) -> dict:
    samples = []
    for position in positions:
        if dataset.masking == "dynamic":
            dataset.set_epoch(position.epoch)
        samples.append(dataset[position.index])
    return {k: v.to(device) for k, v in collate(samples).items()}


def evaluate(engine, dataset, indices, batch_size: int, rank: int, world_size: int) -> BpcResult:
    """Validation BPC over ``indices``, split across processes; every process runs the same number of
    forwards (ZeRO-3 gathers parameters collectively)."""
    num_batches = len(rank_batches(indices, batch_size, rank, world_size))
    engine.eval()
    result = masked_lm_cross_entropy(engine, dataset, indices[rank::world_size], batch_size, engine.device,
                                     num_batches=num_batches)
    engine.train()
    return all_reduce_result(result, engine.device)


class MaskedLM(Objective):
    """Pretraining's objective: the resumable sampler's micro-batches of the shards, the masked-LM loss (optionally
    over the training shards' tokens only), validation BPC against the character-frequency baseline."""

    name = "pretrain"

    def __init__(self, args: Namespace, train_data, val_data, sampler: ResumableDistributedSampler, model_config,
                 engine, train_counts, baseline: dict, val_indices: dict, peak_tflops: float | None, precision: str):
        self.args, self.train_data, self.val_data, self.sampler = args, train_data, val_data, sampler
        self.model_config = model_config
        self.device = engine.device
        # every training label is a token of the training shards, so a softmax over those alone is exact for them
        self.output_vocab = (torch.from_numpy(np.flatnonzero(train_counts)).to(engine.device)
                             if args.output_vocab == "training" else None)
        self.flops = ModelFlops(model_config, None if self.output_vocab is None else self.output_vocab.numel())
        self.baseline, self.val_indices = baseline, val_indices
        self.peak_tflops = peak_tflops or peak_tflops_of(
            torch.cuda.get_device_name() if torch.cuda.is_available() else None, precision)
        self.first_val = self.last_val = None

    def micro_batches(self, state):
        for j, positions in enumerate(self.sampler.micro_batches(state.samples_consumed)):
            yield self.sampler.global_micro_batch_index(j), fetch(self.train_data, positions, self.device)

    def loss(self, engine, batch):
        return engine(**batch, output_vocab=self.output_vocab).loss

    def counts(self, batch):
        tokens, positions, _ = super().counts(batch)
        return tokens, positions, self.flops.of_batch(batch)

    def extend_record(self, record, flops):
        world_size = rank_and_world()[1]
        record["bpc"] = record["loss"] / math.log(2)
        record["tflops_per_second"] = flops / 1e12
        record["mfu"] = record["tflops_per_second"] / (self.peak_tflops * world_size) if self.peak_tflops else None

    def console_line(self, record, max_steps):
        return format_step(record, max_steps)

    def evaluates_at(self, step, last):
        return self.args.eval_interval > 0 and (step % self.args.eval_interval == 0 or last)

    def evaluate_at_start(self, engine, state):
        return self.evaluate(engine, state, final=False) if self.args.eval_interval > 0 else None

    def evaluate(self, engine, state, final):
        rank, world_size = rank_and_world()
        result = evaluate(engine, self.val_data, self.val_indices[final],
                          self.args.eval_batch_size or self.sampler.micro_batch_size, rank, world_size)
        low, high = result.bpc_interval() if rank == 0 else (math.nan, math.nan)
        record = {"step": state.step, "val_loss": result.loss, "val_bpc": result.bpc, "val_bpc_low": low,
                  "val_bpc_high": high, "val_masked_tokens": result.masked_tokens, "val_sequences": result.sequences,
                  "wall_time": time.time()}
        baseline = self.baseline[final]
        if baseline is not None:
            record["frequency_baseline_bpc"] = baseline.bpc
        versus = f"; character frequencies alone {baseline.bpc:.3f}" if baseline is not None else ""
        say(f"validation at step {state.step}: BPC {result.bpc:.3f} (95% interval {low:.3f}-{high:.3f}{versus}; "
            f"loss {result.loss:.4f}, {result.masked_tokens:,} masked tokens in {result.sequences} sequences)")
        self.last_val = result.bpc
        self.first_val = result.bpc if self.first_val is None else self.first_val
        return record


def continued_model_config(args: Namespace):
    """The model of the checkpoint named by --continue-from (a run folder or one of its step_N folders)."""
    try:
        ckpt_dir, tag = resolve_checkpoint(args.continue_from)
    except FileNotFoundError as err:
        raise ConfigError(f"--continue-from: {err}") from None
    config_file = ckpt_dir / tag / MODEL_CONFIG_FILENAME
    if not config_file.is_file():
        raise ConfigError(f"--continue-from {args.continue_from}: {config_file} is missing, so the checkpoint does "
                          "not say which model it holds")
    config = LongformerZhConfig.from_json_file(str(config_file))
    if getattr(args, "attention_backend", None):
        config.attention_backend = args.attention_backend
    return config, ckpt_dir, tag, ckpt.read_training_state(ckpt_dir / tag)


def keep_window_mode(model_config, tag_dir) -> None:
    """A resumed run keeps the attention its checkpoint was trained with, whatever its --model-config now says
    (a config naming no window mode meant the block layout before token mode existed)."""
    saved_file = tag_dir / MODEL_CONFIG_FILENAME
    if model_config is None or not saved_file.is_file():
        return
    saved = LongformerZhConfig.from_json_file(str(saved_file))
    if saved.attention_backend == model_config.attention_backend == "block_sparse" and \
            saved.sparse_window_mode != model_config.sparse_window_mode:
        say(f"note: the checkpoint was trained with sparse_window_mode {saved.sparse_window_mode!r}: keeping it")
        model_config.sparse_window_mode = saved.sparse_window_mode


def check_validation_request(args: Namespace, manifest: dict) -> None:
    """Validation BPC needs at least one validation sequence; --eval-interval 0 trains without it."""
    if args.eval_interval <= 0:
        return
    final = getattr(args, "final_eval_sequences", None)
    if isinstance(final, int) and final <= 0:
        raise ConfigError(f"--final-eval-sequences {final}: validate on at least 1 sequence (or all)")
    if args.eval_sequences is not None and args.eval_sequences <= 0:
        raise ConfigError(f"--eval-sequences {args.eval_sequences}: validate on at least 1 sequence, or pass "
                          "--eval-interval 0 to train without validation")
    if not sum(int(entry["rows"]) for entry in manifest["splits"]["validation"]["shards"]):
        raise ConfigError(f"--data {args.data}: the validation split is empty ({why_no_validation(manifest)}). Pass "
                          "--eval-interval 0 to train without validation, or preprocess with a validation split")


def why_no_validation(manifest: dict) -> str:
    """Why a manifest's validation split holds nothing: no fraction asked for, or too few documents for it."""
    fraction = manifest.get("config", {}).get("val_fraction")
    if not fraction:
        return "its manifest.json lists no validation sequences; preprocessed with --val-fraction 0?"
    documents = sum(int(manifest["splits"][split].get("documents", 0)) for split in ("train", "validation"))
    return (f"preprocessed with --val-fraction {fraction}, but none of its {documents:,} documents fell in it "
            f"(about {fraction * documents:.1f} expected): too few documents for the fraction; preprocess more text "
            "or a larger --val-fraction")




# ---------------------------------------------------------------------------------------------- the run

def run(args: Namespace) -> RunSummary:
    rank, world_size = rank_and_world()
    main = rank == 0
    # torch 2.13 warns on every ZeRO all-gather that DeepSpeed still calls the old collective's name.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    run_dir = Path(args.output_dir)
    fault = FaultInjection.from_env()

    # 1. Everything that can be checked before any compute.
    args = Namespace(**vars(args))  # --seed and --masking may come from the checkpoint below
    resolved: ResolvedConfig = load_deepspeed_config(args.deepspeed_config, world_size, max_steps=args.max_steps,
                                                     run_dir=run_dir)
    checkpoints = ckpt.CheckpointManager(run_dir, keep=args.keep_checkpoints, resume=args.resume,
                                         before_latest=fault.before_latest)
    if args.continue_from:
        model_config, *continued = continued_model_config(args)
        checkpoints.continue_from(*continued)
    else:
        model_config = read_model_config(args)
    try:
        manifest = read_manifest(args.data)
    except Exception as err:
        raise ConfigError(f"--data {args.data}: {err}") from None
    seq_len = int(manifest["config"]["seq_len"])
    if model_config is not None:
        check_model_fits_data(model_config, seq_len, args.data)
    if checkpoints.resumed and args.start_step:
        raise ConfigError("--start-step is for a new run from --init-from; a resumed run continues at its checkpoint")
    if checkpoints.resumed:
        ckpt.continue_checkpoint_settings(args, checkpoints.point, resolved, run_dir, say)
        keep_window_mode(model_config, checkpoints.dir / checkpoints.point.tag)
    args.seed = DEFAULT_SEED if args.seed is None else args.seed
    args.masking = args.masking or DEFAULT_MASKING
    args.output_vocab = getattr(args, "output_vocab", None) or "all"
    args.mask_unit = getattr(args, "mask_unit", None) or "word"
    if args.mask_unit != "word" and args.masking != "dynamic":
        raise ConfigError(f"--mask-unit {args.mask_unit} chooses the masks at training time: it needs --masking "
                          "dynamic (static masks were fixed by the data service)")
    if args.mask_prob is not None and args.masking != "dynamic":
        raise ConfigError(f"--mask-prob {args.mask_prob} chooses the masks at training time: it needs --masking "
                          "dynamic (static masks were fixed by the data service's --mask-prob)")
    check_validation_request(args, manifest)
    embedding_init = getattr(args, "embedding_init", "normal")
    pretrained = args.init_from or args.continue_from
    if args.output_bias_init == "unigram" and pretrained:
        raise ConfigError("--output-bias-init unigram is for a model trained from scratch (--model-config); "
                          "a pretrained model keeps its own output bias")
    if embedding_init == "cooccurrence" and pretrained:
        raise ConfigError("--embedding-init cooccurrence is for a model trained from scratch (--model-config); "
                          "a pretrained model keeps its own embeddings")
    checkpoints.load_universal_if_needed(resolved)
    for note in resolved.notes:
        say(note)

    # 2. Processes.
    init_distributed()
    validate_with_deepspeed(resolved)
    checkpoints.prepare(world_size)

    # 3. Data: memory-mapped shards (checksums verified by rank 0 while the others wait).
    problem = [None]
    if main:
        try:
            ShardDataset(args.data, "train", verify=True), ShardDataset(args.data, "validation", verify=True)
        except ShardError as err:
            problem = [f"--data {args.data}: {err}"]
    dist.broadcast_object_list(problem, src=0)  # every process stops with the same message
    if problem[0]:
        raise ConfigError(problem[0])
    masks_chosen_now = {"mask_prob": args.mask_prob, "max_predictions": args.max_predictions,
                        "mask_unit": args.mask_unit} if args.masking == "dynamic" else {}
    try:
        train_data = ShardDataset(args.data, "train", masking=args.masking, seed=args.seed, verify=False,
                                  **masks_chosen_now)
    except ValueError as err:
        raise ConfigError(f"--data {args.data}: {err}") from None
    val_data = ShardDataset(args.data, "validation", masking="static", seed=args.seed, verify=False)
    # the validations during the run on --eval-sequences, the last one on --final-eval-sequences (a cheap curve,
    # a precise final number)
    final_sequences = getattr(args, "final_eval_sequences", None)
    val_indices = {False: validation_indices(val_data, args.eval_sequences),
                   True: validation_indices(val_data, None if final_sequences == "all" else
                                            final_sequences or args.eval_sequences)}
    # one pass over the training shards serves the baselines, the output-bias start and the training softmax's tokens
    needs_counts = ((main and args.eval_interval > 0) or args.output_bias_init == "unigram"
                    or args.output_vocab == "training")
    train_counts = token_counts(train_data) if needs_counts else None
    # What character frequencies alone score on the same masks: the number a model must get below to have
    # learned anything from context.
    baseline = {final: frequency_baseline(train_data, val_data, indices, train_counts)
                if main and args.eval_interval > 0 else None for final, indices in val_indices.items()}

    # 4. Model and engine (same initial weights on every process; DeepSpeed also broadcasts rank 0's).
    ckpt.seed_everything(args.seed)
    model = build_model(args, model_config)
    if args.output_bias_init == "unigram":
        init_output_bias_to_unigram(model, train_counts)
    if embedding_init == "cooccurrence" and not checkpoints.resumed:  # a resumed run loads its own weights
        init_word_embeddings_from_cooccurrence(model, train_data)
    model_config = model.config
    check_model_fits_data(model_config, seq_len, args.data)
    num_parameters = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them
    engine = build_engine(model, resolved)
    say(f"model: {num_parameters:,} parameters, {model_config.num_hidden_layers} layers, "
        f"hidden {model_config.hidden_size}, attention {model_config.attention_backend}; precision "
        f"{resolved.precision}, ZeRO stage {resolved.zero_stage}")
    say(resolved.describe_batch(seq_len))

    # 5. Counters, RNG and data position: from the checkpoint, from --start-step, or fresh.
    state = ckpt.TrainingState(global_batch_size=resolved.global_batch_size, world_size=world_size, seed=args.seed,
                               zero_stage=resolved.zero_stage, masking=args.masking,
                               total_num_steps=resolved.total_num_steps, mask_prob=args.mask_prob,
                               mask_unit=args.mask_unit, output_vocab=args.output_vocab)
    state = checkpoints.restore(engine, state, resolved, ScheduleAfterRestore(
        max_steps=args.max_steps, rewarm_steps=args.rewarm_steps, stretch_schedule=args.stretch_schedule))
    if checkpoints.source is not None:
        source_dir, source_tag, saved = checkpoints.source
        say(f"continuing {source_dir / source_tag} (step {saved.step}, weights and optimizer state) on {args.data} "
            f"with {seq_len}-token sequences, from the start of its data")
    elif args.start_step:
        state.step = args.start_step
        engine.global_steps = args.start_step
        engine.global_samples = args.start_step * resolved.global_batch_size
        if engine.lr_scheduler is not None:
            engine.lr_scheduler.step(args.start_step - 1)
        say(f"starting at step {args.start_step} (--start-step): the learning-rate schedule continues from there; "
            "the data stream starts at its beginning")
    if state.step >= args.max_steps:
        say(f"the run is already at step {state.step} >= --max-steps {args.max_steps}: nothing to do")
    if main:
        (run_dir / "model_config.json").write_text(model_config.to_json_string())
        (run_dir / "ds_config.json").write_text(json.dumps(resolved.config, indent=2) + "\n")
        (run_dir / "args.json").write_text(json.dumps(vars(args), indent=2, default=str) + "\n")

    # 6. The loop.
    sampler = ResumableDistributedSampler(len(train_data), resolved.global_batch_size, resolved.micro_batch_size,
                                          rank=rank, world_size=world_size, seed=args.seed)
    objective = MaskedLM(args, train_data, val_data, sampler, model_config, engine, train_counts, baseline,
                         val_indices, getattr(args, "peak_tflops", None), resolved.precision)
    if checkpoints.resumed and main:
        objective.first_val, objective.last_val = recorded_validation_bpc(run_dir / "metrics.jsonl")
    state = train(engine, objective, checkpoints, state, max_steps=args.max_steps,
                  global_batch_size=resolved.global_batch_size, save_interval=args.save_interval,
                  log_interval=args.log_interval, max_nonfinite_steps=args.max_nonfinite_steps, fault=fault)
    curves = run_dir / CURVES_FILENAME
    return RunSummary(run_dir=str(run_dir), final_step=state.step, first_val_bpc=objective.first_val,
                      last_val_bpc=objective.last_val, last_checkpoint=checkpoints.last_tag,
                      curves=str(curves) if main and curves.is_file() else None)
