"""The masked-LM pretraining loop, run once per process by the ``deepspeed`` launcher (see launch/pretrain.py).

Read it top to bottom: check everything that can be checked before any compute, start the processes, open the
data, build the model and the DeepSpeed engine, restore a checkpoint if asked, then loop over optimizer steps
(micro-batches, backward, step, metrics, validation, checkpoints) and finish with a last validation, a last
checkpoint and the curves PNG.
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import time
import warnings
from argparse import Namespace
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from . import checkpoint as ckpt
from .distributed import init_distributed, rank_and_world
from .ds_config import ConfigError, ResolvedConfig, load_deepspeed_config, read_json_object, validate_with_deepspeed
from .engine import build_engine
from .evaluation import (BpcResult, all_reduce_result, collate, frequency_baseline, masked_lm_cross_entropy,
                         token_counts, validation_indices)
from .initialization import init_output_bias_to_unigram, init_word_embeddings_from_cooccurrence
from .metrics import MetricsLogger, ModelFlops, Throughput, format_step, peak_tflops_of, plot_curves
from .sampler import ResumableDistributedSampler

PRETRAINING_DEFAULT_BACKEND = "block_sparse"
DEFAULT_SEED, DEFAULT_MASKING = 42, "static"  # a resumed run takes its checkpoint's instead


class TrainingDiverged(RuntimeError):
    """The loss stayed non-finite for too many consecutive steps."""


@dataclass
class RunSummary:
    run_dir: str
    final_step: int
    first_val_bpc: float | None
    last_val_bpc: float | None
    last_checkpoint: str | None
    curves: str | None


# ---------------------------------------------------------------------------------------------- fault injection

class FaultInjection:
    """Test hook, read from the ``LFZH_FAULT`` environment variable; nothing happens when it is unset.

    ``kill_at_step=N``: rank 0 SIGKILLs itself when step N starts (a crash in the middle of a run);
    ``kill_in_save=N``: rank 0 SIGKILLs itself after every file of step N's checkpoint is written but before
    ``latest`` moves (a crash during a save); ``nan_from_step=N``: the loss is multiplied by NaN from step N on;
    ``inf_grad_at_step=N`` (or ``N+M+...``): in those steps rank 0's gradients become infinite (the loss's gradient
    is multiplied by inf in the backward pass; the loss itself stays finite), an fp16 overflow.
    """

    def __init__(self, spec: str | None, rank: int):
        self.rank = rank
        self.kill_at_step = self.kill_in_save = self.nan_from_step = None
        self.inf_grad_at_step: set[int] = set()
        for item in filter(None, (spec or "").split(",")):
            name, _, value = item.partition("=")
            if name == "inf_grad_at_step":
                self.inf_grad_at_step = {int(v) for v in value.split("+")}
                continue
            if name not in ("kill_at_step", "kill_in_save", "nan_from_step"):
                raise ValueError(f"LFZH_FAULT: unknown fault {name!r}")
            setattr(self, name, int(value))

    def _kill(self):
        if self.rank == 0:
            os.kill(os.getpid(), signal.SIGKILL)

    def at_step_start(self, step: int) -> None:
        if self.kill_at_step == step:
            self._kill()

    def before_latest(self, step: int) -> None:
        if self.kill_in_save == step:
            self._kill()

    def poison(self, loss, step: int):
        if self.nan_from_step is not None and step >= self.nan_from_step:
            return loss * float("nan")
        if step in self.inf_grad_at_step and self.rank == 0:
            loss.register_hook(lambda grad: grad * float("inf"))
        return loss


# ---------------------------------------------------------------------------------------------- model

def read_model_config(args: Namespace):
    """The model's config, from --model-config or --init-from; the attention backend defaults to block_sparse."""
    from ..configuration import LongformerZhConfig

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
        return LongformerZhConfig(**data)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"--model-config {path}: {err}") from None


def check_model_config_keys(data: dict, path) -> None:
    """Refuse a key that is a misspelling of a model field (``num_hidden_layer``): the config would silently
    keep that field's default. Keys of any transformers config (``sep_token_id``, ``torch_dtype``) and other
    unknown keys (``directionality``, ``pooler_*`` of Google's Chinese BERT configs) are ignored, as
    transformers does."""
    import difflib
    import inspect

    from transformers import BertConfig, LongformerConfig, PretrainedConfig

    from ..configuration import LongformerZhConfig

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
    from .metrics import read_metrics

    if not Path(metrics_path).is_file():
        return None, None
    val = read_metrics(metrics_path)[1]
    return (val[0]["val_bpc"], val[-1]["val_bpc"]) if val else (None, None)


def build_model(args: Namespace, model_config):
    """--init-from continues a model with the attention it was trained for, on the block kernel: a converted,
    released, transformers-layout or sliding-chunks model runs block_sparse in token mode (exactly its
    Longformer window), a block-sparse model keeps its own window mode; --attention-backend overrides."""
    from ..convert import read_config_dict
    from ..modeling import LongformerZhForMaskedLM

    if args.init_from:
        backend = getattr(args, "attention_backend", None)
        if backend is None and read_config_dict(args.init_from).get("attention_backend") != "block_sparse":
            backend = "block_sparse"
        kwargs = {"attention_backend": backend} if backend else {}
        return LongformerZhForMaskedLM.from_pretrained(args.init_from, **kwargs)
    return LongformerZhForMaskedLM(model_config)


def check_model_fits_data(model_config, seq_len: int, data_dir) -> None:
    from ..constants import VOCAB_SIZE

    if seq_len > model_config.max_position_embeddings:
        raise ConfigError(f"the shards in {data_dir} hold sequences of {seq_len} tokens but the model has "
                          f"max_position_embeddings={model_config.max_position_embeddings}")
    if model_config.vocab_size != VOCAB_SIZE:
        raise ConfigError(f"the model's vocab_size is {model_config.vocab_size}; the shards use the "
                          f"{VOCAB_SIZE}-token Chinese BERT vocab")


# ---------------------------------------------------------------------------------------------- helpers

def loss_scale_of(engine) -> float:
    for name in ("cur_scale", "loss_scale"):
        value = getattr(engine.optimizer, name, None)
        if isinstance(value, (int, float)):
            return float(value)
    return 1.0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def dropout_seed(seed: int, step: int, micro_batch_index: int) -> int:
    """Dropout masks depend on (seed, step, which micro-batch of the global batch) only: a resumed run, on any
    number of processes, draws the same masks as the uninterrupted one."""
    return int(np.random.SeedSequence([seed, step, micro_batch_index]).generate_state(1, dtype=np.uint64)[0] >> 1)


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
    mine = indices[rank::world_size]
    num_batches = math.ceil(math.ceil(len(indices) / world_size) / batch_size)
    engine.eval()
    result = masked_lm_cross_entropy(engine, dataset, mine, batch_size, engine.device, num_batches=num_batches)
    engine.train()
    return all_reduce_result(result, engine.device)


def continue_checkpoint_settings(args: Namespace, resume, resolved: ResolvedConfig, run_dir, say) -> None:
    """A resumed run keeps its checkpoint's --seed, --masking, --mask-unit and --output-vocab (a flag that disagrees
    is refused) and says so when its learning-rate schedule now ends at another step (total_num_steps "auto"
    follows --max-steps)."""
    saved = resume.state
    where = ckpt.checkpoints_dir(run_dir) / resume.tag / ckpt.STATE_FILENAME
    for flag, name in (("--seed", "seed"), ("--masking", "masking"), ("--mask-unit", "mask_unit"),
                       ("--output-vocab", "output_vocab")):
        kept = getattr(saved, name)
        given = getattr(args, name, None)
        if kept is None:  # a checkpoint from before masking was recorded
            continue
        if given is not None and given != kept:
            raise ConfigError(f"{flag} {given} differs from the {flag} {kept} of the run being resumed ({where}): "
                              f"a resumed run continues with its own {name}. Drop {flag} (or pass {kept}), or "
                              "start a new run in another --output-dir")
        setattr(args, name, kept)
    given = getattr(args, "mask_prob", None)
    if given is not None and given != saved.mask_prob:
        kept = "the shards' rate" if saved.mask_prob is None else saved.mask_prob
        raise ConfigError(f"--mask-prob {given} differs from the run being resumed ({where}: {kept}): a resumed run "
                          "continues with its own masking. Drop --mask-prob, or start a new run in another --output-dir")
    args.mask_prob = saved.mask_prob
    if saved.total_num_steps is not None and saved.total_num_steps != resolved.total_num_steps:
        if getattr(args, "stretch_schedule", False):
            how = "the learning rate follows the new schedule (--stretch-schedule)"
        elif getattr(args, "rewarm_steps", 0):
            how = (f"the learning rate climbs back to its peak over {args.rewarm_steps} steps (--rewarm-steps), then "
                   f"decays to 0 at step {resolved.total_num_steps}")
        else:
            how = (f"the learning rate decays on from where it was to 0 at step {resolved.total_num_steps} "
                   "(--rewarm-steps N climbs back to the peak first)")
        say(f"note: the learning-rate schedule's total_num_steps changes from {saved.total_num_steps} (the "
            f"checkpoint's) to {resolved.total_num_steps} ({resolved.source} with --max-steps {args.max_steps}): "
            f"from step {saved.step + 1} on {how}")


def rate_at(knots: list, step: int) -> float:
    """The learning rate of optimizer step ``step`` on the piecewise-linear schedule through ``knots``."""
    return float(np.interp(step, [k[0] for k in knots], [k[1] for k in knots]))


def continued_schedule(last_rate: float, last_step: int, total_steps: int, rewarm_steps: int = 0,
                       peak: float | None = None) -> list:
    """Knots of the schedule of a run continued after ``last_step`` (which ran at ``last_rate``) towards a new end
    ``total_steps``: linear from that rate down to 0 after ``total_steps`` (continuing a finished run never makes
    the rate jump up), or with ``rewarm_steps`` first linearly back up to ``peak`` over that many steps."""
    knots = [[last_step, last_rate]]
    if rewarm_steps:
        knots.append([last_step + rewarm_steps, peak])
    knots.append([total_steps + 1, 0.0])
    return knots


def peak_learning_rate(resolved: ResolvedConfig) -> float:
    scheduler = resolved.config.get("scheduler", {}).get("params", {})
    return float(scheduler.get("warmup_max_lr", resolved.config.get("optimizer", {}).get("params", {}).get("lr", 0)))


def schedule_after_restore(engine, saved: ckpt.TrainingState, resolved: ResolvedConfig, args: Namespace):
    """The learning-rate knots of a run restored from ``saved`` (None: the config's schedule, via DeepSpeed's
    scheduler). Called right after ``engine.load_checkpoint``."""
    # a checkpoint from before the rate was recorded: the restored optimizer's rate, the old schedule's next one
    last_rate = float(engine.get_lr()[0]) if saved.learning_rate is None else saved.learning_rate
    changed = saved.total_num_steps is not None and saved.total_num_steps != resolved.total_num_steps
    if args.stretch_schedule or not (changed or args.rewarm_steps):
        scheduler = engine.lr_scheduler
        if scheduler is not None and hasattr(scheduler, "last_batch_iteration"):
            # DeepSpeed's schedulers restore only their counter and the optimizer keeps the rate it saved, which is
            # the old schedule's when total_num_steps changed: set the rate of this schedule at this point.
            scheduler.step(scheduler.last_batch_iteration)
        return None if args.stretch_schedule else saved.lr_knots
    return continued_schedule(last_rate, saved.step, resolved.total_num_steps or args.max_steps,
                              args.rewarm_steps, peak_learning_rate(resolved))


def continued_model_config(args: Namespace):
    """The model of the checkpoint named by --continue-from (a run folder or one of its step_N folders)."""
    from ..configuration import LongformerZhConfig

    try:
        ckpt_dir, tag = ckpt.resolve_checkpoint(args.continue_from)
    except FileNotFoundError as err:
        raise ConfigError(f"--continue-from: {err}") from None
    config_file = ckpt_dir / tag / ckpt.MODEL_CONFIG_FILENAME
    if not config_file.is_file():
        raise ConfigError(f"--continue-from {args.continue_from}: {config_file} is missing, so the checkpoint does "
                          "not say which model it holds")
    config = LongformerZhConfig.from_json_file(str(config_file))
    if getattr(args, "attention_backend", None):
        config.attention_backend = args.attention_backend
    return config, ckpt_dir, tag, ckpt.read_training_state(ckpt_dir / tag)


def keep_window_mode(model_config, tag_dir, say) -> None:
    """A resumed run keeps the attention its checkpoint was trained with, whatever its --model-config now says
    (a config naming no window mode meant the block layout before token mode existed)."""
    from ..configuration import LongformerZhConfig

    saved_file = tag_dir / ckpt.MODEL_CONFIG_FILENAME
    if model_config is None or not saved_file.is_file():
        return
    saved = LongformerZhConfig.from_json_file(str(saved_file))
    if saved.attention_backend == model_config.attention_backend == "block_sparse" and \
            saved.sparse_window_mode != model_config.sparse_window_mode:
        say(f"note: the checkpoint was trained with sparse_window_mode {saved.sparse_window_mode!r}: keeping it")
        model_config.sparse_window_mode = saved.sparse_window_mode


def set_learning_rate(engine, rate: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = rate


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

    def say(message: str) -> None:
        if main:
            print(message, flush=True)

    # torch 2.13 warns on every ZeRO all-gather that DeepSpeed still calls the old collective's name.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    run_dir = Path(args.output_dir)
    fault = FaultInjection(os.environ.get("LFZH_FAULT"), rank)

    # 1. Everything that can be checked before any compute.
    from ..shards import read_manifest

    args = Namespace(**vars(args))  # --seed and --masking may come from the checkpoint below

    resolved: ResolvedConfig = load_deepspeed_config(args.deepspeed_config, world_size, max_steps=args.max_steps,
                                                     run_dir=run_dir)
    continued = None  # (checkpoints folder, tag, its TrainingState) of --continue-from
    if args.continue_from:
        model_config, *continued = continued_model_config(args)
    else:
        model_config = read_model_config(args)
    try:
        manifest = read_manifest(args.data)
    except Exception as err:
        raise ConfigError(f"--data {args.data}: {err}") from None
    seq_len = int(manifest["config"]["seq_len"])
    if model_config is not None:
        check_model_fits_data(model_config, seq_len, args.data)
    resume = ckpt.find_resume_point(run_dir) if args.resume else None
    if args.resume and resume is None:
        say(f"--resume: no checkpoint in {ckpt.checkpoints_dir(run_dir)} yet, starting a new run")
    if not args.resume and ckpt.read_latest_tag(ckpt.checkpoints_dir(run_dir)):
        raise ConfigError(f"{run_dir} already holds checkpoints (latest: "
                          f"{ckpt.read_latest_tag(ckpt.checkpoints_dir(run_dir))}); pass --resume to continue that "
                          "run or choose another --output-dir")
    if resume is not None and args.start_step:
        raise ConfigError("--start-step is for a new run from --init-from; a resumed run continues at its checkpoint")
    if resume is not None:
        continue_checkpoint_settings(args, resume, resolved, run_dir, say)
        continued = None  # the run's own checkpoint now holds everything
        keep_window_mode(model_config, ckpt.checkpoints_dir(run_dir) / resume.tag, say)
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
    universal = resume is not None and resume.state.world_size != world_size
    continued_universal = continued is not None and continued[2].world_size != world_size
    if universal or continued_universal:
        resolved.config.setdefault("checkpoint", {})["load_universal"] = True
    for note in resolved.notes:
        say(note)

    # 2. Processes.
    init_distributed()
    import torch.distributed as dist

    validate_with_deepspeed(resolved)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume is not None:
            for tag in ckpt.remove_incomplete_checkpoints(ckpt.checkpoints_dir(run_dir)):
                say(f"removed {tag}: a checkpoint whose save was interrupted")
    if universal:
        say(f"resuming a {resume.state.world_size}-process checkpoint on {world_size} processes: converting "
            f"{resume.tag} to DeepSpeed's universal format")
        if main:
            ckpt.convert_to_universal(ckpt.checkpoints_dir(run_dir), resume.tag)
    if continued_universal:
        say(f"continuing a {continued[2].world_size}-process checkpoint on {world_size} processes: converting "
            f"{continued[0] / continued[1]} to DeepSpeed's universal format")
        if main:
            ckpt.convert_to_universal(continued[0], continued[1])
    dist.barrier()

    # 3. Data: memory-mapped shards (checksums verified by rank 0 while the others wait).
    from ..shards import ShardDataset, ShardError

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
                        "mask_unit": args.mask_unit} \
        if args.masking == "dynamic" else {}
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
    # What character frequencies alone score on the same masks: the number a model must get below to have
    # learned anything from context.
    # one pass over the training shards serves the baselines, the output-bias start and the training softmax's tokens
    embedding_init = getattr(args, "embedding_init", "normal")
    needs_counts = ((main and args.eval_interval > 0) or args.output_bias_init == "unigram"
                    or args.output_vocab == "training")
    train_counts = token_counts(train_data) if needs_counts else None
    baseline = {final: frequency_baseline(train_data, val_data, indices, train_counts)
                if main and args.eval_interval > 0 else None for final, indices in val_indices.items()}

    # 4. Model and engine (same initial weights on every process; DeepSpeed also broadcasts rank 0's).
    seed_everything(args.seed)
    model = build_model(args, model_config)
    if args.output_bias_init == "unigram":
        if args.init_from or args.continue_from:
            raise ConfigError("--output-bias-init unigram is for a model trained from scratch (--model-config); "
                              "a pretrained model keeps its own output bias")
        init_output_bias_to_unigram(model, train_counts)
    if embedding_init == "cooccurrence":
        if args.init_from or args.continue_from:
            raise ConfigError("--embedding-init cooccurrence is for a model trained from scratch (--model-config); "
                              "a pretrained model keeps its own embeddings")
        if resume is None:  # a resumed run loads its own weights
            init_word_embeddings_from_cooccurrence(model, train_data)
    model_config = model.config
    check_model_fits_data(model_config, seq_len, args.data)
    num_parameters = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them
    engine = build_engine(model, resolved)
    # every training label is a token of the training shards, so a softmax over those alone is exact for them
    output_vocab = (torch.from_numpy(np.flatnonzero(train_counts)).to(engine.device)
                    if args.output_vocab == "training" else None)
    say(f"model: {num_parameters:,} parameters, {model_config.num_hidden_layers} layers, "
        f"hidden {model_config.hidden_size}, attention {model_config.attention_backend}; precision "
        f"{resolved.precision}, ZeRO stage {resolved.zero_stage}")
    say(resolved.describe_batch(seq_len))

    # 5. Counters, RNG and data position: from the checkpoint, from --start-step, or fresh.
    state = ckpt.TrainingState(global_batch_size=resolved.global_batch_size, world_size=world_size, seed=args.seed,
                               zero_stage=resolved.zero_stage, masking=args.masking,
                               total_num_steps=resolved.total_num_steps, mask_prob=args.mask_prob,
                               mask_unit=args.mask_unit, output_vocab=args.output_vocab)
    seed_everything(args.seed * 1000 + rank + 1)  # dropout differs across processes, reproducibly
    if resume is not None:
        tag = resume.universal_tag if universal else resume.tag
        load_path, client_state = engine.load_checkpoint(str(ckpt.checkpoints_dir(run_dir)), tag=tag)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load {ckpt.checkpoints_dir(run_dir) / tag}")
        saved, rng_states = ckpt.client_training_state(client_state, load_path)
        if universal:
            ckpt.restore_loss_scaler(engine, client_state)
        lr_knots = schedule_after_restore(engine, saved, resolved, args)
        if len(rng_states) == world_size:
            ckpt.restore_rng_state(rng_states[rank])
        else:
            seed_everything(args.seed * 1000 + rank + 1 + saved.step)
        if saved.global_batch_size != resolved.global_batch_size:
            say(f"note: the global batch changes from {saved.global_batch_size} to {resolved.global_batch_size} "
                "sequences; the data stream continues at the same sample")
        state = ckpt.TrainingState(**{**asdict(saved), "global_batch_size": resolved.global_batch_size,
                                      "world_size": world_size, "zero_stage": resolved.zero_stage,
                                      "masking": args.masking, "total_num_steps": resolved.total_num_steps,
                                      "lr_knots": lr_knots, "output_vocab": args.output_vocab,
                                      "mask_unit": args.mask_unit})
        say(f"resumed from {load_path} at step {state.step} ({state.samples_consumed:,} samples consumed)")
    elif continued is not None:
        # A new phase of a run (ModernBERT's context extension, or new data): the weights, optimizer state and
        # schedule position of another run's checkpoint, a new data stream from its beginning.
        source_dir, source_tag, saved = continued
        tag = source_tag + ckpt.UNIVERSAL_SUFFIX if continued_universal else source_tag
        load_path, client_state = engine.load_checkpoint(str(source_dir), tag=tag)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load {source_dir / tag}")
        if continued_universal:
            ckpt.restore_loss_scaler(engine, client_state)
        state.lr_knots = schedule_after_restore(engine, saved, resolved, args)
        state.step, state.tokens_seen, state.elapsed_seconds = saved.step, saved.tokens_seen, saved.elapsed_seconds
        if state.lr_knots is not None:
            say(f"learning rate: {rate_at(state.lr_knots, state.step + 1):.3g} at step {state.step + 1}, linear "
                f"through {', '.join(f'{r:.3g} at step {s}' for s, r in state.lr_knots[1:])}")
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

    sampler = ResumableDistributedSampler(len(train_data), resolved.global_batch_size, resolved.micro_batch_size,
                                          rank=rank, world_size=world_size, seed=args.seed)
    metrics = MetricsLogger(run_dir, enabled=main, monitor=engine.monitor,
                            resume_step=state.step if resume is not None else None)
    if metrics.dropped:
        say(f"dropped {metrics.dropped} metrics lines past step {state.step} (written by the interrupted run)")
    if main:
        (run_dir / "model_config.json").write_text(model_config.to_json_string())
        (run_dir / "ds_config.json").write_text(json.dumps(resolved.config, indent=2) + "\n")
        (run_dir / "args.json").write_text(json.dumps(vars(args), indent=2, default=str) + "\n")

    first_val = last_val = None
    if resume is not None and main:
        first_val, last_val = recorded_validation_bpc(metrics.path)
    last_tag = resume.tag if resume is not None else None

    def validate(final: bool = False) -> float:
        result = evaluate(engine, val_data, val_indices[final], args.eval_batch_size or resolved.micro_batch_size,
                          rank, world_size)
        low, high = result.bpc_interval() if main else (math.nan, math.nan)
        record = {"step": state.step, "val_loss": result.loss, "val_bpc": result.bpc, "val_bpc_low": low,
                  "val_bpc_high": high, "val_masked_tokens": result.masked_tokens, "val_sequences": result.sequences,
                  "wall_time": time.time()}
        if baseline[final] is not None:
            record["frequency_baseline_bpc"] = baseline[final].bpc
        metrics.log_val(record)
        versus = f"; character frequencies alone {baseline[final].bpc:.3f}" if baseline[final] is not None else ""
        say(f"validation at step {state.step}: BPC {result.bpc:.3f} (95% interval {low:.3f}-{high:.3f}{versus}; "
            f"loss {result.loss:.4f}, {result.masked_tokens:,} masked tokens in {result.sequences} sequences)")
        return result.bpc

    def save() -> str:
        tag = ckpt.save_checkpoint(engine, run_dir, state, model_config, args.keep_checkpoints,
                                   before_latest=fault.before_latest)
        say(f"saved checkpoint {ckpt.checkpoints_dir(run_dir) / tag}")
        return tag

    if resume is None and args.eval_interval > 0 and state.step < args.max_steps:
        first_val = last_val = validate()

    # 6. The loop: one iteration per optimizer step.
    progress = None
    if main:
        from tqdm import tqdm
        progress = tqdm(total=args.max_steps, initial=state.step, desc="pretrain", unit="step", disable=None,
                        dynamic_ncols=True)
    throughput = Throughput()
    throughput.reset(state.tokens_seen)
    model_flops = ModelFlops(model_config, None if output_vocab is None else output_vocab.numel())
    peak_tflops = getattr(args, "peak_tflops", None) or peak_tflops_of(
        torch.cuda.get_device_name() if torch.cuda.is_available() else None, resolved.precision)
    run_started = time.time() - state.elapsed_seconds
    nonfinite_run = 0
    engine.train()
    while state.step < args.max_steps:
        step = state.step + 1
        fault.at_step_start(step)
        if state.lr_knots:
            set_learning_rate(engine, rate_at(state.lr_knots, step))
        lr = float(engine.get_lr()[0])  # the rate this step's update uses (the scheduler moves after it)
        loss_sum = torch.zeros((), dtype=torch.float64)
        tokens = positions_seen = flops = 0
        for j, positions in enumerate(sampler.micro_batches(state.samples_consumed)):
            torch.manual_seed(dropout_seed(args.seed, step, sampler.global_micro_batch_index(j)))
            batch = fetch(train_data, positions, engine.device)
            loss = fault.poison(engine(**batch, output_vocab=output_vocab).loss, step)
            engine.backward(loss)
            engine.step()
            loss_sum += loss.detach().double().cpu()
            tokens += int(batch["attention_mask"].sum())
            positions_seen += batch["attention_mask"].numel()
            flops += model_flops.of_batch(batch)
        totals = torch.tensor([float(loss_sum), float(tokens), float(positions_seen), float(flops)],
                              dtype=torch.float64, device=engine.device)
        dist.all_reduce(totals)
        step_loss = float(totals[0]) / (sampler.accumulation_steps * world_size)
        state.step, state.learning_rate = step, lr
        state.samples_consumed += resolved.global_batch_size
        state.tokens_seen += int(totals[1])
        state.skipped_steps = int(engine.skipped_steps)
        state.elapsed_seconds = time.time() - run_started
        record = {"step": step, "loss": step_loss, "bpc": step_loss / math.log(2), "lr": lr,
                  "loss_scale": loss_scale_of(engine), "skipped_steps": state.skipped_steps,
                  "tokens": state.tokens_seen, "samples": state.samples_consumed,
                  "tokens_per_second": throughput.update(state.tokens_seen), "wall_time": time.time(),
                  "elapsed_seconds": state.elapsed_seconds}
        record["padding_efficiency"] = float(totals[1] / totals[2])  # throughput: all processes, this step
        record["tflops_per_second"] = float(totals[3]) / throughput.seconds / 1e12
        record["mfu"] = record["tflops_per_second"] / (peak_tflops * world_size) if peak_tflops else None
        metrics.log_train(record)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{step_loss:.3f}", refresh=False)
        if main and args.log_interval > 0 and step % args.log_interval == 0:
            line = format_step(record, args.max_steps)
            progress.write(line) if progress is not None and not progress.disable else print(line, flush=True)

        nonfinite_run = 0 if math.isfinite(step_loss) else nonfinite_run + 1
        if nonfinite_run >= args.max_nonfinite_steps:
            if progress is not None:
                progress.close()
            where = (f"the last good checkpoint is {ckpt.checkpoints_dir(run_dir) / last_tag}" if last_tag
                     else "no checkpoint was saved before it")
            raise TrainingDiverged(
                f"the loss was not finite for {nonfinite_run} consecutive steps (steps {step - nonfinite_run + 1}-"
                f"{step}); stopping. {where[0].upper() + where[1:]}. Resume from it with --resume and a lower learning rate, or check the "
                "data.")
        last_step = step == args.max_steps
        if args.eval_interval > 0 and (step % args.eval_interval == 0 or last_step):
            last_val = validate(final=last_step)
            first_val = last_val if first_val is None else first_val
        if (args.save_interval > 0 and step % args.save_interval == 0) or last_step:
            if nonfinite_run:
                say(f"not saving a checkpoint at step {step}: the loss is not finite")
            else:
                last_tag = save()
        throughput.reset(state.tokens_seen)

    if progress is not None:
        progress.close()
    curves = None
    if main and metrics.path.is_file() and metrics.path.stat().st_size:
        curves = str(plot_curves(run_dir))
        say(f"curves: {curves}")
    dist.barrier()
    return RunSummary(run_dir=str(run_dir), final_step=state.step, first_val_bpc=first_val, last_val_bpc=last_val,
                      last_checkpoint=last_tag, curves=curves)
