"""Masked-LM pretraining, run once per process by the ``deepspeed`` launcher (see launch/pretrain.py).

``run`` reads top to bottom, one function a step: ``preflight`` checks everything that can be checked before any
compute (the settings, ``PretrainSettings``, validated in one place, and what a resumed run keeps from its checkpoint),
then the processes start, ``open_data`` opens the shards, ``build_model_and_engine`` builds the model and the DeepSpeed
engine, ``restore`` puts back a checkpoint (``checkpoint.CheckpointManager``) or a --start-step, and ``loop`` hands the
masked-LM objective (``MaskedLM``: the sampler's micro-batches, the validation BPC, its console line and curves) to
the one training loop (``trainer.train``), which ends with a last validation, a last checkpoint and the curves PNG.
"""
from __future__ import annotations

import difflib
import inspect
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from transformers import BertConfig, LongformerConfig, PretrainedConfig

from ..configuration import LongformerZhConfig
from ..constants import VOCAB_SIZE
from ..hf_layout import read_config_dict
from ..modeling import LongformerZhForMaskedLM
from ..run_folder import (
    ARGS_FILENAME,
    CURVES_FILENAME,
    DS_CONFIG_FILENAME,
    METRICS_FILENAME,
    MODEL_CONFIG_FILENAME,
    RUN_MODEL_CONFIG_FILENAME,
    resolve_checkpoint,
)
from ..shards import ShardDataset, ShardError, read_manifest
from . import checkpoint as ckpt
from .checkpoint import KeptSetting
from .curves import MASKED_LM_CURVES
from .distributed import init_distributed, rank_and_world, rank_batches, say
from .ds_config import ConfigError, ResolvedConfig, load_deepspeed_config, read_json_object, validate_with_deepspeed
from .engine import build_engine
from .evaluation import (
    BpcResult,
    all_reduce_result,
    collate,
    frequency_baseline,
    masked_lm_cross_entropy,
    token_counts,
    validation_indices,
)
from .flops import ModelFlops, peak_tflops_of
from .initialization import init_output_bias_to_unigram, init_word_embeddings_from_cooccurrence
from .metrics import read_metrics
from .sampler import ResumableDistributedSampler
from .schedule import ScheduleAfterRestore, schedule_change_note
from .trainer import FaultInjection, Objective, train

PRETRAINING_DEFAULT_BACKEND = "block_sparse"
DEFAULT_SEED, DEFAULT_MASKING = 42, "static"  # a resumed run takes its checkpoint's instead
DEFAULT_MASK_UNIT, DEFAULT_OUTPUT_VOCAB = "word", "all"
# The kept settings saved beside the counters of every checkpoint (``TrainingState.settings``); the seed is a counter.
SAVED_SETTINGS = ("masking", "mask_prob", "mask_unit", "output_vocab")


# ---------------------------------------------------------------------------------------------- settings

@dataclass(kw_only=True)
class PretrainSettings:
    """What a pretraining run is asked to do: launch/pretrain.py's flags, by the same names and in the same order
    (``args.json`` in the run folder is this, resolved). Every check between them is ``validate``.

    ``seed``, ``masking``, ``mask_unit``, ``output_vocab`` (and ``mask_prob``: None means the shards' rate) are None
    when not given: a resumed run takes its checkpoint's, a new one the defaults (``resolved``).
    """

    deepspeed_config: str
    data: str
    output_dir: str
    model_config: str | None = None
    init_from: str | None = None
    continue_from: str | None = None
    attention_backend: str | None = None
    max_steps: int
    start_step: int = 0
    resume: bool = False
    rewarm_steps: int = 0
    stretch_schedule: bool = False
    save_interval: int = 1000
    keep_checkpoints: int = 3
    eval_interval: int = 1000
    eval_sequences: int | None = None
    final_eval_sequences: int | str | None = None  # N or "all"; None: as eval_sequences
    eval_batch_size: int | None = None
    log_interval: int = 10
    seed: int | None = None
    masking: str | None = None
    mask_prob: float | None = None
    max_predictions: int | None = None
    mask_unit: str | None = None
    output_bias_init: str = "zero"
    embedding_init: str = "normal"
    output_vocab: str | None = None
    max_nonfinite_steps: int = 50
    peak_tflops: float | None = None
    local_rank: int = -1

    @classmethod
    def from_args(cls, args) -> "PretrainSettings":
        """From launch/pretrain.py's parsed arguments (an ``argparse.Namespace``), validated."""
        given = vars(args)
        settings = cls(**{f.name: given[f.name] for f in fields(cls) if f.name in given})
        settings.validate()
        return settings

    @property
    def pretrained(self) -> bool:
        return bool(self.init_from or self.continue_from)

    def validate(self) -> None:
        """Every check between the settings. Checks that need a value a resumed run may take from its checkpoint
        (the masking) wait until it is known: ``resolved`` runs them again."""
        if self.start_step and not self.init_from:
            raise ConfigError("--start-step continues the schedule of a model given with --init-from")
        if self.rewarm_steps and self.stretch_schedule:
            raise ConfigError("--rewarm-steps and --stretch-schedule are two different schedules after a resume: "
                              "pick one")
        if self.rewarm_steps < 0 or (self.mask_prob is not None and not 0 < self.mask_prob < 1):
            raise ConfigError("--rewarm-steps must be >= 0 and --mask-prob between 0 and 1")
        if self.start_step >= self.max_steps > 0 and self.start_step:
            raise ConfigError(f"--start-step {self.start_step} is not below --max-steps {self.max_steps}")
        if self.masking is not None:
            if self.mask_unit not in (None, "word") and self.masking != "dynamic":
                raise ConfigError(f"--mask-unit {self.mask_unit} chooses the masks at training time: it needs "
                                  "--masking dynamic (static masks were fixed by the data service)")
            if self.mask_prob is not None and self.masking != "dynamic":
                raise ConfigError(f"--mask-prob {self.mask_prob} chooses the masks at training time: it needs "
                                  "--masking dynamic (static masks were fixed by the data service's --mask-prob)")
        if self.eval_interval > 0:
            final = self.final_eval_sequences
            if isinstance(final, int) and final <= 0:
                raise ConfigError(f"--final-eval-sequences {final}: validate on at least 1 sequence (or all)")
            if self.eval_sequences is not None and self.eval_sequences <= 0:
                raise ConfigError(f"--eval-sequences {self.eval_sequences}: validate on at least 1 sequence, or pass "
                                  "--eval-interval 0 to train without validation")
        if self.output_bias_init == "unigram" and self.pretrained:
            raise ConfigError("--output-bias-init unigram is for a model trained from scratch (--model-config); "
                              "a pretrained model keeps its own output bias")
        if self.embedding_init == "cooccurrence" and self.pretrained:
            raise ConfigError("--embedding-init cooccurrence is for a model trained from scratch (--model-config); "
                              "a pretrained model keeps its own embeddings")

    def resolved(self, kept: dict | None = None) -> "PretrainSettings":
        """The settings to run with: ``kept`` (what a resumed run keeps from its checkpoint) over the given ones, the
        defaults for what is left unset; validated again."""
        settings = replace(self, **(kept or {}))
        settings = replace(settings, seed=DEFAULT_SEED if settings.seed is None else settings.seed,
                           masking=settings.masking or DEFAULT_MASKING,
                           output_vocab=settings.output_vocab or DEFAULT_OUTPUT_VOCAB,
                           mask_unit=settings.mask_unit or DEFAULT_MASK_UNIT)
        settings.validate()
        return settings

    def schedule_after_restore(self) -> ScheduleAfterRestore:
        return ScheduleAfterRestore(max_steps=self.max_steps, rewarm_steps=self.rewarm_steps,
                                    stretch_schedule=self.stretch_schedule)


@dataclass
class RunSummary:
    run_dir: str
    final_step: int
    first_val_bpc: float | None
    last_val_bpc: float | None
    last_checkpoint: str | None
    curves: str | None


# ---------------------------------------------------------------------------------------------- model

def read_model_config(settings: PretrainSettings):
    """The model's config, from --model-config or --init-from; the attention backend defaults to block_sparse."""
    backend = settings.attention_backend
    if settings.init_from:
        model_dir = Path(settings.init_from)
        if not (model_dir / MODEL_CONFIG_FILENAME).is_file():
            raise ConfigError(f"--init-from {model_dir}: no config.json there; give a from_pretrained folder "
                              "(launch/convert.py or launch/export.py writes one)")
        return None  # read by from_pretrained, with the backend override below
    path = Path(settings.model_config)
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


def build_model(settings: PretrainSettings, model_config):
    """--init-from continues a model with the attention it was trained for, on the block kernel: a converted,
    released, transformers-layout or sliding-chunks model runs block_sparse in token mode (exactly its
    Longformer window), a block-sparse model keeps its own window mode; --attention-backend overrides."""
    if settings.init_from:
        backend = settings.attention_backend
        if backend is None and read_config_dict(settings.init_from).get("attention_backend") != "block_sparse":
            backend = "block_sparse"
        kwargs = {"attention_backend": backend} if backend else {}
        return LongformerZhForMaskedLM.from_pretrained(settings.init_from, **kwargs)
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
    curves = MASKED_LM_CURVES

    @classmethod
    def kept_settings(cls, settings: PretrainSettings) -> list[KeptSetting]:
        """A resumed run keeps its checkpoint's seed, masking, mask unit, output vocab and mask rate (a flag left out
        takes the checkpoint's; the mask rate's None is the shards' rate)."""
        return [KeptSetting("seed", settings.seed, "--seed"), KeptSetting("masking", settings.masking, "--masking"),
                KeptSetting("mask_unit", settings.mask_unit, "--mask-unit"),
                KeptSetting("output_vocab", settings.output_vocab, "--output-vocab"),
                KeptSetting("mask_prob", settings.mask_prob, "--mask-prob", none_means="the shards' rate")]

    @classmethod
    def recorded_settings(cls, state: ckpt.TrainingState) -> dict:
        """The seed is a counter of every run; the others are saved beside the counters (``TrainingState.settings``,
        where older checkpoints have them as fields of their own)."""
        return {"seed": state.seed, **{name: state.settings.get(name) for name in SAVED_SETTINGS}}

    def __init__(self, settings: PretrainSettings, train_data, val_data, sampler: ResumableDistributedSampler,
                 model_config, engine, train_counts, baseline: dict, val_indices: dict, precision: str):
        self.settings, self.train_data, self.val_data, self.sampler = settings, train_data, val_data, sampler
        self.model_config = model_config
        self.device = engine.device
        # every training label is a token of the training shards, so a softmax over those alone is exact for them
        self.output_vocab = (torch.from_numpy(np.flatnonzero(train_counts)).to(engine.device)
                             if settings.output_vocab == "training" else None)
        self.flops = ModelFlops(model_config, None if self.output_vocab is None else self.output_vocab.numel())
        self.baseline, self.val_indices = baseline, val_indices
        self.peak_tflops = settings.peak_tflops or peak_tflops_of(
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
        return self.settings.eval_interval > 0 and (step % self.settings.eval_interval == 0 or last)

    def evaluate_at_start(self, engine, state):
        return self.evaluate(engine, state, final=False) if self.settings.eval_interval > 0 else None

    def evaluate(self, engine, state, final):
        rank, world_size = rank_and_world()
        result = evaluate(engine, self.val_data, self.val_indices[final],
                          self.settings.eval_batch_size or self.sampler.micro_batch_size, rank, world_size)
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


def continued_model_config(settings: PretrainSettings):
    """The model of the checkpoint named by --continue-from (a run folder or one of its step_N folders)."""
    try:
        ckpt_dir, tag = resolve_checkpoint(settings.continue_from)
    except FileNotFoundError as err:
        raise ConfigError(f"--continue-from: {err}") from None
    config_file = ckpt_dir / tag / MODEL_CONFIG_FILENAME
    if not config_file.is_file():
        raise ConfigError(f"--continue-from {settings.continue_from}: {config_file} is missing, so the checkpoint does "
                          "not say which model it holds")
    config = LongformerZhConfig.from_json_file(str(config_file))
    if settings.attention_backend:
        config.attention_backend = settings.attention_backend
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


def check_validation_request(settings: PretrainSettings, manifest: dict) -> None:
    """Validation BPC needs at least one validation sequence in the data (the numbers of sequences asked for are
    checked with the other flags, ``PretrainSettings.validate``); --eval-interval 0 trains without it."""
    if settings.eval_interval <= 0:
        return
    if not sum(int(entry["rows"]) for entry in manifest["splits"]["validation"]["shards"]):
        raise ConfigError(f"--data {settings.data}: the validation split is empty ({why_no_validation(manifest)}). Pass "
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


def format_step(record: dict, max_steps: int) -> str:
    """Pretraining's console line of a step."""
    return (f"step {record['step']}/{max_steps} | loss {record['loss']:.4f} | bpc {record['bpc']:.3f} | "
            f"lr {record['lr']:.3g} | loss scale {record['loss_scale']:g} | skipped {record['skipped_steps']} | "
            f"{record['tokens_per_second']:,.0f} tokens/s | padding eff. {record['padding_efficiency']:.1%} | "
            f"{record['tflops_per_second']:.3g} TFLOP/s" + (f" | MFU {record['mfu']:.1%}" if record.get("mfu") is not None
                                                           else "") + f" | samples {record['samples']:,}")


def resumed_settings(settings: PretrainSettings, checkpoints: ckpt.CheckpointManager, resolved: ResolvedConfig,
                     say=say) -> PretrainSettings:
    """The settings a run goes on with: on resume its checkpoint's seed, masking, mask unit, output vocab and mask
    rate (a flag that disagrees is refused, ``CheckpointManager.keep_settings``), saying so when the learning-rate
    schedule now ends at another step (total_num_steps "auto" follows --max-steps); the defaults for the rest."""
    kept = checkpoints.keep_settings(MaskedLM.kept_settings(settings), MaskedLM.recorded_settings, what="run")
    if checkpoints.resumed:
        note = schedule_change_note(checkpoints.point.state, resolved, settings.schedule_after_restore())
        if note:
            say(note)
    return settings.resolved(kept)


# ---------------------------------------------------------------------------------------------- the run's steps

@dataclass
class Preflight:
    """What ``preflight`` found: the settings to run with, the DeepSpeed config, the checkpoints, the model config
    (None with --init-from: read by from_pretrained), the shards' sequence length."""

    settings: PretrainSettings
    resolved: ResolvedConfig
    checkpoints: ckpt.CheckpointManager
    model_config: object
    seq_len: int


@dataclass
class Data:
    train: ShardDataset
    val: ShardDataset
    val_indices: dict  # {final: indices}: the validations during the run, and the last one
    train_counts: object  # token counts of the training shards (None where nothing needs them)
    baseline: dict  # {final: the character-frequency baseline's result} (None without validation, or off rank 0)


def preflight(settings: PretrainSettings, world_size: int, fault: FaultInjection) -> Preflight:
    """Everything that can be checked before any compute: the DeepSpeed config, the run folder (and what a resumed run
    keeps from its checkpoint), the model config, the data's manifest."""
    run_dir = Path(settings.output_dir)
    resolved: ResolvedConfig = load_deepspeed_config(settings.deepspeed_config, world_size,
                                                     max_steps=settings.max_steps, run_dir=run_dir)
    checkpoints = ckpt.CheckpointManager(run_dir, keep=settings.keep_checkpoints, resume=settings.resume,
                                         before_latest=fault.before_latest)
    if settings.continue_from:
        model_config, *continued = continued_model_config(settings)
        checkpoints.continue_from(*continued)
    else:
        model_config = read_model_config(settings)
    try:
        manifest = read_manifest(settings.data)
    except Exception as err:
        raise ConfigError(f"--data {settings.data}: {err}") from None
    seq_len = int(manifest["config"]["seq_len"])
    if model_config is not None:
        check_model_fits_data(model_config, seq_len, settings.data)
    if checkpoints.resumed and settings.start_step:
        raise ConfigError("--start-step is for a new run from --init-from; a resumed run continues at its checkpoint")
    settings = resumed_settings(settings, checkpoints, resolved)
    if checkpoints.resumed:
        keep_window_mode(model_config, checkpoints.dir / checkpoints.point.tag)
    check_validation_request(settings, manifest)
    checkpoints.load_universal_if_needed(resolved)
    for note in resolved.notes:
        say(note)
    return Preflight(settings, resolved, checkpoints, model_config, seq_len)


def open_data(settings: PretrainSettings, main: bool) -> Data:
    """Memory-mapped shards (checksums verified by rank 0 while the others wait), the validation sequences, and the
    one pass over the training shards that the baselines, the output-bias start and the training softmax need."""
    problem = [None]
    if main:
        try:
            ShardDataset(settings.data, "train", verify=True), ShardDataset(settings.data, "validation", verify=True)
        except ShardError as err:
            problem = [f"--data {settings.data}: {err}"]
    dist.broadcast_object_list(problem, src=0)  # every process stops with the same message
    if problem[0]:
        raise ConfigError(problem[0])
    masks_chosen_now = {"mask_prob": settings.mask_prob, "max_predictions": settings.max_predictions,
                        "mask_unit": settings.mask_unit} if settings.masking == "dynamic" else {}
    try:
        train_data = ShardDataset(settings.data, "train", masking=settings.masking, seed=settings.seed, verify=False,
                                  **masks_chosen_now)
    except ValueError as err:
        raise ConfigError(f"--data {settings.data}: {err}") from None
    val_data = ShardDataset(settings.data, "validation", masking="static", seed=settings.seed, verify=False)
    # the validations during the run on --eval-sequences, the last one on --final-eval-sequences (a cheap curve,
    # a precise final number)
    final_sequences = settings.final_eval_sequences
    val_indices = {False: validation_indices(val_data, settings.eval_sequences),
                   True: validation_indices(val_data, None if final_sequences == "all" else
                                            final_sequences or settings.eval_sequences)}
    needs_counts = ((main and settings.eval_interval > 0) or settings.output_bias_init == "unigram"
                    or settings.output_vocab == "training")
    train_counts = token_counts(train_data) if needs_counts else None
    # What character frequencies alone score on the same masks: the number a model must get below to have
    # learned anything from context.
    baseline = {final: frequency_baseline(train_data, val_data, indices, train_counts)
                if main and settings.eval_interval > 0 else None for final, indices in val_indices.items()}
    return Data(train_data, val_data, val_indices, train_counts, baseline)


def build_model_and_engine(pre: Preflight, data: Data):
    """The model (same initial weights on every process; DeepSpeed also broadcasts rank 0's) and its engine."""
    settings, resolved = pre.settings, pre.resolved
    ckpt.seed_everything(settings.seed)
    model = build_model(settings, pre.model_config)
    if settings.output_bias_init == "unigram":
        init_output_bias_to_unigram(model, data.train_counts)
    if settings.embedding_init == "cooccurrence" and not pre.checkpoints.resumed:  # a resumed run loads its own
        init_word_embeddings_from_cooccurrence(model, data.train)
    model_config = model.config
    check_model_fits_data(model_config, pre.seq_len, settings.data)
    num_parameters = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them
    engine = build_engine(model, resolved)
    say(f"model: {num_parameters:,} parameters, {model_config.num_hidden_layers} layers, "
        f"hidden {model_config.hidden_size}, attention {model_config.attention_backend}; precision "
        f"{resolved.precision}, ZeRO stage {resolved.zero_stage}")
    say(resolved.describe_batch(pre.seq_len))
    return engine, model_config


def restore(pre: Preflight, engine, world_size: int) -> ckpt.TrainingState:
    """Counters, RNG and data position: from the checkpoint, from --start-step, or fresh."""
    settings, resolved, checkpoints = pre.settings, pre.resolved, pre.checkpoints
    state = ckpt.TrainingState(global_batch_size=resolved.global_batch_size, world_size=world_size, seed=settings.seed,
                               zero_stage=resolved.zero_stage, total_num_steps=resolved.total_num_steps,
                               settings={name: getattr(settings, name) for name in SAVED_SETTINGS})
    state = checkpoints.restore(engine, state, resolved, settings.schedule_after_restore())
    if checkpoints.source is not None:
        source_dir, source_tag, saved = checkpoints.source
        say(f"continuing {source_dir / source_tag} (step {saved.step}, weights and optimizer state) on "
            f"{settings.data} with {pre.seq_len}-token sequences, from the start of its data")
    elif settings.start_step:
        state.step = settings.start_step
        engine.global_steps = settings.start_step
        engine.global_samples = settings.start_step * resolved.global_batch_size
        if engine.lr_scheduler is not None:
            engine.lr_scheduler.step(settings.start_step - 1)
        say(f"starting at step {settings.start_step} (--start-step): the learning-rate schedule continues from "
            "there; the data stream starts at its beginning")
    if state.step >= settings.max_steps:
        say(f"the run is already at step {state.step} >= --max-steps {settings.max_steps}: nothing to do")
    return state


def write_run_files(run_dir: Path, settings: PretrainSettings, resolved: ResolvedConfig, model_config) -> None:
    """The model, the DeepSpeed config and the settings of the run, beside its metrics (rank 0)."""
    (run_dir / RUN_MODEL_CONFIG_FILENAME).write_text(model_config.to_json_string())
    (run_dir / DS_CONFIG_FILENAME).write_text(json.dumps(resolved.config, indent=2) + "\n")
    (run_dir / ARGS_FILENAME).write_text(json.dumps(asdict(settings), indent=2, default=str) + "\n")


def loop(pre: Preflight, data: Data, engine, model_config, state: ckpt.TrainingState, fault: FaultInjection,
         rank: int, world_size: int) -> RunSummary:
    """The masked-LM objective on the one training loop, to --max-steps."""
    settings, resolved, checkpoints = pre.settings, pre.resolved, pre.checkpoints
    run_dir = checkpoints.run_dir
    sampler = ResumableDistributedSampler(len(data.train), resolved.global_batch_size, resolved.micro_batch_size,
                                          rank=rank, world_size=world_size, seed=settings.seed)
    objective = MaskedLM(settings, data.train, data.val, sampler, model_config, engine, data.train_counts,
                         data.baseline, data.val_indices, resolved.precision)
    if checkpoints.resumed and rank == 0:
        objective.first_val, objective.last_val = recorded_validation_bpc(run_dir / METRICS_FILENAME)
    state = train(engine, objective, checkpoints, state, max_steps=settings.max_steps,
                  global_batch_size=resolved.global_batch_size, save_interval=settings.save_interval,
                  log_interval=settings.log_interval, max_nonfinite_steps=settings.max_nonfinite_steps, fault=fault)
    curves = run_dir / CURVES_FILENAME
    return RunSummary(run_dir=str(run_dir), final_step=state.step, first_val_bpc=objective.first_val,
                      last_val_bpc=objective.last_val, last_checkpoint=checkpoints.last_tag,
                      curves=str(curves) if rank == 0 and curves.is_file() else None)


# ---------------------------------------------------------------------------------------------- the run

def run(settings: PretrainSettings) -> RunSummary:
    """Pretrain as ``settings`` say (every process of the run calls it)."""
    rank, world_size = rank_and_world()
    # torch 2.13 warns on every ZeRO all-gather that DeepSpeed still calls the old collective's name.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    fault = FaultInjection.from_env()

    pre = preflight(settings, world_size, fault)  # 1. before any compute
    init_distributed()  # 2. the processes
    validate_with_deepspeed(pre.resolved)
    pre.checkpoints.prepare(world_size)
    data = open_data(pre.settings, rank == 0)  # 3. the data
    engine, model_config = build_model_and_engine(pre, data)  # 4. the model and its engine
    state = restore(pre, engine, world_size)  # 5. counters, RNG, data position
    if rank == 0:
        write_run_files(pre.checkpoints.run_dir, pre.settings, pre.resolved, model_config)
    return loop(pre, data, engine, model_config, state, fault, rank, world_size)  # 6. the loop
