"""Fine-tuning ``LongformerZhForSequenceClassification`` on a document classification task.

:func:`finetune` reads top to bottom: encode the splits, load the model, build the DeepSpeed engine (the same
config checks and CPU fallback as pretraining, :mod:`lfzh_ds.training.ds_config`), restore a checkpoint with
--resume, then hand the classification objective (:class:`Classification`: the epochs' micro-batches, weighted
cross-entropy, dev macro-F1 after every epoch, the best epoch kept as a ``from_pretrained`` directory) to the one
training loop of pretraining (:func:`lfzh_ds.training.trainer.train`: ``metrics.jsonl``, TensorBoard, the NaN
guard, keep-N checkpoints, curves). At the end the best checkpoint is loaded back and scored on dev and test;
predictions and metrics are written as files.

Runs as one process (``python launch/finetune.py``) or under the ``deepspeed`` launcher
(``deepspeed --num_gpus N launch/finetune.py``), where every process trains on its share of each
global batch and evaluates a share of each split; rank 0 writes the files.
"""
from __future__ import annotations

import copy
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import deepspeed
import torch

from .classification import (
    DEFAULT_HEAD_FRACTION,
    EncodedSplit,
    TaskData,
    classification_metrics,
    encode_examples,
    write_metrics,
    write_predictions,
)
from .constants import PAD_ID
from .errors import InputError
from .loading import load_model, quiet_transformers
from .run_folder import BEST_CHECKPOINT_DIRNAME, SUMMARY_FILENAME, predictions_filename, split_metrics_filename
from .tokenization import load_tokenizer
from .training.checkpoint import CheckpointManager, KeptSetting, TrainingState
from .training.curves import CLASSIFICATION_CURVES
from .training.distributed import (
    barrier,
    gather_objects,
    init_distributed,
    local_device,
    rank_and_world,
    rank_batches,
    say,
)
from .training.ds_config import ConfigError, load_deepspeed_config, read_config_file, validate_with_deepspeed
from .training.engine import build_engine
from .training.trainer import FaultInjection, Objective, train

BEST_CHECKPOINT_DIR = BEST_CHECKPOINT_DIRNAME


@dataclass
class FinetuneSettings:
    model_dir: str
    output_dir: str
    deepspeed_config: str
    max_len: int = 4096
    truncation: str = "head"
    head_fraction: float = DEFAULT_HEAD_FRACTION
    epochs: int = 3
    learning_rate: float = 2e-5
    batch_size: int = 16  # documents per optimizer step, all processes together
    micro_batch_size: int = 1  # documents per forward pass and process
    warmup_ratio: float = 0.1
    eval_batch_size: int = 8
    seed: int = 0
    log_every: int = 10
    class_weight: str = "balanced"  # "balanced": classes weigh inversely to their train frequency; "none"
    resume: bool = False  # continue OUTPUT_DIR's latest checkpoint
    save_interval: int = 0  # checkpoint every N optimizer steps; 0: at the end of every epoch
    keep_checkpoints: int = 1  # training checkpoints kept in OUTPUT_DIR/checkpoints (the best model is kept apart)
    max_nonfinite_steps: int = 50  # stop when the loss is NaN/inf for this many consecutive steps


# What a resumed fine-tuning must share with the run it continues (the rest, such as --log-every, may change), with
# the numbers of train and dev documents (``Classification.kept_settings``).
RESUMED_SETTINGS = ("model_dir", "deepspeed_config", "max_len", "truncation", "head_fraction", "epochs",
                    "learning_rate", "batch_size", "micro_batch_size", "warmup_ratio", "seed", "class_weight")


CLASS_WEIGHT_MODES = ("balanced", "none")


def class_weights(labels: list[int], num_classes: int, mode: str = "balanced") -> torch.Tensor | None:
    """Per-class loss weights: ``balanced`` is scikit-learn's ``class_weight="balanced"`` (the TF-IDF baseline's),
    ``n_samples / (n_classes * count_c)``, so a rare class is not given up for the frequent ones; ``none``: None."""
    if mode == "none":
        return None
    if mode != "balanced":
        raise ConfigError(f"class weight {mode!r}: expected one of {', '.join(CLASS_WEIGHT_MODES)}")
    counts = torch.bincount(torch.tensor(labels, dtype=torch.long), minlength=num_classes).double()
    if (counts == 0).any():
        missing = [c for c in range(num_classes) if counts[c] == 0]
        raise InputError(f"class weight balanced: class(es) {missing} have no training document")
    return (len(labels) / (num_classes * counts)).float()


# ---------------------------------------------------------------------------------- batches
def make_batch(encoded: EncodedSplit, indices: list[int], labels: list[int] | None, device) -> dict:
    """Right-padded tensors for the documents ``indices`` (the model pads further to its window multiple)."""
    width = max(len(encoded.input_ids[i]) for i in indices)
    input_ids = torch.full((len(indices), width), PAD_ID, dtype=torch.long)
    token_type_ids = torch.zeros((len(indices), width), dtype=torch.long)
    attention_mask = torch.zeros((len(indices), width), dtype=torch.long)
    for row, i in enumerate(indices):
        n = len(encoded.input_ids[i])
        input_ids[row, :n] = torch.tensor(encoded.input_ids[i])
        token_type_ids[row, :n] = torch.tensor(encoded.token_type_ids[i])
        attention_mask[row, :n] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
    if labels is not None:
        batch["labels"] = torch.tensor([labels[i] for i in indices], dtype=torch.long)
    return {k: v.to(device) for k, v in batch.items()}


# Optimizer steps are cut from pools of this many global batches, each sorted by length (HF's group_by_length
# "megabatch" is at most 50 batches): steps of similar documents, yet a different grouping every epoch.
LENGTH_POOL_STEPS = 50


def epoch_steps(lengths: list[int], global_batch: int, seed: int, epoch: int,
                pool_steps: int = LENGTH_POOL_STEPS) -> list[list[int]]:
    """The documents of every optimizer step of one epoch, in training order: a pure function of (lengths, seed,
    epoch), the same whatever the number of processes (so ``--resume`` finds the same steps).

    A seeded shuffle of the documents is cut into pools of ``pool_steps`` global batches; each pool is sorted by
    length (ties keep the shuffled order) and cut into steps of ``global_batch`` documents of similar length; the
    order of all the steps is then shuffled with the same seed, so long and short steps alternate at random. Every
    document is in one step per epoch, except that a pool whose size is not a multiple of ``global_batch`` ends with
    a step of its ``global_batch`` longest documents, filled up with the longest of the step before it (the only
    documents seen twice in an epoch; a last pool of less than one global batch joins the pool before it). A task
    with fewer documents than one global batch repeats them in its one step.
    """
    n = len(lengths)
    rng = random.Random(seed * 1000003 + epoch)
    order = list(range(n))
    rng.shuffle(order)
    if n < global_batch:
        while 0 < len(order) < global_batch:
            order += order[: global_batch - len(order)]
        return [order] if order else []
    pool = pool_steps * global_batch
    bounds = list(range(0, n, pool)) + [n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < global_batch:
        del bounds[-2]
    steps = []
    for a, b in zip(bounds, bounds[1:]):
        docs = sorted(order[a:b], key=lambda i: lengths[i])
        starts = list(range(0, len(docs) - global_batch + 1, global_batch))
        if len(docs) % global_batch:
            starts.append(len(docs) - global_batch)
        steps += [docs[s : s + global_batch] for s in starts]
    rng.shuffle(steps)
    return steps


def epoch_micro_batches(lengths: list[int], global_batch: int, micro_batch: int, rank: int, world: int, seed: int,
                        epoch: int, pool_steps: int = LENGTH_POOL_STEPS):
    """This process's micro-batches for one epoch, grouped by optimizer step (the steps of :func:`epoch_steps`).

    Inside a step the documents are sorted by length and dealt out round-robin, so processes get similar work and
    each micro-batch holds documents of similar length (the steps already do: little padding); the gradient of the
    step is the same whatever the order inside it.
    """
    for step in epoch_steps(lengths, global_batch, seed, epoch, pool_steps):
        mine = sorted(step, key=lambda i: lengths[i])[rank::world]
        yield [mine[j : j + micro_batch] for j in range(0, len(mine), micro_batch)]


def padding_efficiency(lengths: list[int], batches, multiple: int = 1) -> float:
    """Real tokens / padded tokens over ``batches`` (lists of document indices, empty ones skipped): a batch costs
    its size x its longest document, rounded up to a multiple of ``multiple`` (1: :func:`make_batch`'s right-padding;
    the model's ``config.padding_multiple()``: what the encoder computes on). 1.0 for no batch."""
    real = padded = 0
    for batch in batches:
        if not batch:
            continue
        width = max(lengths[i] for i in batch)
        real += sum(lengths[i] for i in batch)
        padded += len(batch) * -(-width // multiple) * multiple
    return real / padded if padded else 1.0


def training_padding(lengths: list[int], settings: FinetuneSettings, world: int, multiple: int) -> dict:
    """The padding efficiency of the whole run's training micro-batches (all epochs, all processes)."""
    batches = [mb for epoch in range(1, settings.epochs + 1) for rank in range(world)
               for step in epoch_micro_batches(lengths, settings.batch_size, settings.micro_batch_size, rank, world,
                                               settings.seed, epoch) for mb in step]
    return {"micro_batches": padding_efficiency(lengths, batches),
            "with_model_padding": padding_efficiency(lengths, batches, multiple), "padding_multiple": multiple,
            "one_document_per_micro_batch": padding_efficiency(lengths, [[i] for i in range(len(lengths))], multiple)}


def eval_shards(lengths: list[int], batch_size: int, rank: int, world: int) -> list[list[int]]:
    """This process's evaluation batches: documents sorted by length (less padding), dealt out round-robin, every
    process the same number of batches (``rank_batches``: an empty batch is an uncounted forward)."""
    return rank_batches(sorted(range(len(lengths)), key=lambda i: lengths[i]), batch_size, rank, world)


@torch.no_grad()
def predict(model, encoded: EncodedSplit, batch_size: int, device) -> tuple[list[int], list[list[float]]]:
    """Class predictions and probabilities for every document of a split, computed by all processes together."""
    rank, world = rank_and_world()
    was_training = model.training
    model.eval()
    mine = {}
    for indices in eval_shards(encoded.lengths(), batch_size, rank, world):
        logits = model(**make_batch(encoded, indices or [0], None, device)).logits.float()
        probabilities = torch.softmax(logits, dim=-1).cpu().tolist()
        for i, p in zip(indices, probabilities):
            mine[i] = p
    if was_training:
        model.train()
    merged = {}
    for part in gather_objects(mine):
        merged.update(part)
    probabilities = [merged[i] for i in range(len(encoded.input_ids))]
    predictions = [max(range(len(p)), key=p.__getitem__) for p in probabilities]
    return predictions, probabilities


# ---------------------------------------------------------------------------------- engine
def finetuning_overrides(file_config: dict, settings: FinetuneSettings, world_size: int, total_steps: int) -> tuple[dict, list[str]]:
    """The parts of a (pretraining) DeepSpeed config that fine-tuning sets itself: batch sizes,
    learning rate, and a linear warmup/decay schedule over the fine-tuning steps."""
    notes = []
    per_step = settings.micro_batch_size * world_size
    if settings.batch_size % per_step:
        raise ConfigError(
            f"--batch-size {settings.batch_size} must be a multiple of --micro-batch-size {settings.micro_batch_size} "
            f"x {world_size} processes = {per_step}"
        )
    optimizer = json.loads(json.dumps(file_config.get("optimizer") or {"type": "AdamW", "params": {}}))
    optimizer.setdefault("params", {})
    optimizer["params"]["lr"] = settings.learning_rate
    optimizer["params"].setdefault("weight_decay", 0.01)
    warmup = max(1, int(round(total_steps * settings.warmup_ratio)))  # DeepSpeed refuses 0
    scheduler = {
        "type": "WarmupDecayLR",
        "params": {
            "warmup_min_lr": 0.0,
            "warmup_max_lr": settings.learning_rate,
            "warmup_num_steps": warmup,
            "total_num_steps": total_steps,
            "warmup_type": "linear",
        },
    }
    if "scheduler" in file_config:
        notes.append(f"scheduler: linear warmup {warmup} steps then linear decay to 0 at step {total_steps} (replaces the config's)")
    overrides = {}
    if file_config.get("tensorboard", {}).get("enabled"):  # events under OUTPUT_DIR/tensorboard, named as ours
        overrides["tensorboard"] = {**file_config["tensorboard"], "output_path": "", "job_name": "finetune"}
    overrides |= {
        "train_batch_size": settings.batch_size,
        "train_micro_batch_size_per_gpu": settings.micro_batch_size,
        "gradient_accumulation_steps": settings.batch_size // per_step,
        "optimizer": optimizer,
        "scheduler": scheduler,
    }
    return overrides, notes


def finetuning_config(settings: FinetuneSettings, world_size: int, total_steps: int, run_dir: Path):
    """The DeepSpeed config file with fine-tuning's batch sizes and schedule, checked as pretraining's is."""
    file_config = read_config_file(settings.deepspeed_config)
    overrides, notes = finetuning_overrides(file_config, settings, world_size, total_steps)
    resolved = load_deepspeed_config(settings.deepspeed_config, world_size, max_steps=total_steps, run_dir=run_dir,
                                     overrides=overrides)
    resolved.notes[:0] = notes
    return resolved


def save_best_checkpoint(engine, out_dir: Path) -> None:
    """The engine's weights as a ``from_pretrained`` directory with the vocab (rank 0 writes; collective)."""
    # ZeRO-3 partitions the weights: every process takes part in gathering them (DeepSpeed's public context; a
    # no-op for the other stages).
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()),
                                           enabled=engine.zero_optimization_partition_weights()):
        if rank_and_world()[0] == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            state_dict = {k: v.detach().to("cpu", torch.float32).contiguous()
                          for k, v in engine.module.state_dict().items()}
            with quiet_transformers():
                engine.module.save_pretrained(out_dir, state_dict=state_dict)
            # The weights are written in fp32 whatever the training precision; say so in config.json
            # (save_pretrained records the in-memory dtype, e.g. bfloat16).
            config = copy.deepcopy(engine.module.config)
            config.dtype = "float32"
            config.save_pretrained(out_dir)
            load_tokenizer(config.max_position_embeddings).save_pretrained(out_dir)
    barrier()


# ---------------------------------------------------------------------------------- the objective
class Classification(Objective):
    """Fine-tuning's objective for the one training loop: each epoch's seeded order of the training documents (the
    data position is the step: epoch and step within it follow from it), weighted cross-entropy on the
    classifier's logits, dev macro-F1 after every epoch with the best epoch saved to ``best_dir``."""

    name = "finetune"
    curves = CLASSIFICATION_CURVES

    @classmethod
    def kept_settings(cls, settings: FinetuneSettings, task: TaskData) -> list[KeptSetting]:
        """A resumed fine-tuning continues with the settings of ``RESUMED_SETTINGS`` and the documents it started
        with (each given now: a difference is refused)."""
        documents = {split: len(getattr(task, split)) for split in ("train", "dev")}
        return [KeptSetting(name, getattr(settings, name)) for name in RESUMED_SETTINGS] + \
            [KeptSetting("documents", documents)]

    @classmethod
    def recorded_settings(cls, state: TrainingState) -> dict:
        """Fine-tuning's checkpoints carry their settings in the objective's state."""
        return (state.objective or {}).get("settings") or {}

    def __init__(self, settings: FinetuneSettings, task: TaskData, encoded: dict, labels: dict, engine, weights,
                 steps_per_epoch: int, best_dir: Path, kept_settings: dict):
        self.settings, self.task, self.encoded, self.labels = settings, task, encoded, labels
        self.model_config = engine.module.config
        self.device = engine.device
        self.weights, self.steps_per_epoch, self.best_dir = weights, steps_per_epoch, best_dir
        self.kept_settings = kept_settings
        self.lengths = encoded["train"].lengths()
        self._epoch: tuple[int, list] = (0, [])
        self.best: dict | None = None
        self.history: list[dict] = []

    def epoch_of(self, step: int) -> int:
        """The epoch (from 1) that optimizer step ``step`` (from 1) belongs to."""
        return (step - 1) // self.steps_per_epoch + 1

    def micro_batches(self, state):
        epoch = self.epoch_of(state.step + 1)
        if self._epoch[0] != epoch:
            rank, world = rank_and_world()
            s = self.settings
            self._epoch = (epoch, list(epoch_micro_batches(self.lengths, s.batch_size, s.micro_batch_size, rank,
                                                           world, s.seed, epoch)))
        micro_batches = self._epoch[1][state.step % self.steps_per_epoch]
        first = rank_and_world()[0] * len(micro_batches)
        for j, indices in enumerate(micro_batches):
            yield first + j, make_batch(self.encoded["train"], indices, self.labels["train"], self.device)

    def loss(self, engine, batch):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return torch.nn.functional.cross_entropy(engine(**inputs).logits.float(), batch["labels"], weight=self.weights)

    def extend_record(self, record, flops):
        record["epoch"] = self.epoch_of(record["step"])

    def console_line(self, record, max_steps):
        return (f"epoch {record['epoch']} step {record['step']}/{max_steps} loss {record['loss']:.4f} "
                f"lr {record['lr']:.2e} ({record['tokens_per_second']:,.0f} tokens/s)")

    def evaluates_at(self, step, last):
        return step % self.steps_per_epoch == 0

    def evaluate(self, engine, state, final):
        epoch = state.step // self.steps_per_epoch
        predictions, _ = predict(engine, self.encoded["dev"], self.settings.eval_batch_size, engine.device)
        metrics = classification_metrics(self.labels["dev"], predictions, self.task.label_names)
        improved = self.best is None or metrics["macro_f1"] > self.best["dev_macro_f1"]
        seconds = state.elapsed_seconds - (self.history[-1]["elapsed_seconds"] if self.history else 0.0)
        self.history.append({"epoch": epoch, "step": state.step, "train_seconds": seconds,
                             "elapsed_seconds": state.elapsed_seconds, "dev_macro_f1": metrics["macro_f1"],
                             "dev_accuracy": metrics["accuracy"],
                             "dev_f1_per_class": {n: m["f1"] for n, m in metrics["per_class"].items()},
                             "best": improved})
        per_class = ", ".join(f"{name} {m['f1']:.3f}" for name, m in metrics["per_class"].items())
        say(f"epoch {epoch}: dev macro-F1 {metrics['macro_f1']:.4f} accuracy {metrics['accuracy']:.4f} "
            f"(F1 per class: {per_class}; {seconds:.0f} s)" + (f"; new best, saved to {self.best_dir}" if improved
                                                                  else ""))
        if improved:
            self.best = {"epoch": epoch, "dev_macro_f1": metrics["macro_f1"]}
            save_best_checkpoint(engine, self.best_dir)
        return {"step": state.step, "epoch": epoch, "val_macro_f1": metrics["macro_f1"],
                "val_accuracy": metrics["accuracy"], "wall_time": time.time()}

    def state_dict(self):
        return {"settings": self.kept_settings, "best": self.best, "history": self.history}

    def load_state_dict(self, data):
        if data:
            self.best, self.history = data["best"], data["history"]


# ---------------------------------------------------------------------------------- the run
def finetune(task: TaskData, settings: FinetuneSettings) -> dict | None:
    """Fine-tune, keep the best dev checkpoint, score it on dev and test. Returns the summary on rank 0."""
    if not task.train or not task.dev:
        raise InputError(f"task {task.name}: fine-tuning needs train and dev documents (train {len(task.train)}, dev {len(task.dev)})")
    started = time.perf_counter()
    output_dir = Path(settings.output_dir)
    best_dir = output_dir / BEST_CHECKPOINT_DIR
    fault = FaultInjection.from_env()
    checkpoints = CheckpointManager(output_dir, keep=settings.keep_checkpoints, resume=settings.resume,
                                    before_latest=fault.before_latest)
    declared = Classification.kept_settings(settings, task)
    checkpoints.keep_settings(declared, Classification.recorded_settings, what="fine-tuning")
    kept = {setting.name: setting.value for setting in declared}  # saved in every checkpoint (objective's state)
    threads = init_distributed()  # on CPU this also splits the cores between the local processes
    rank, world = rank_and_world()
    checkpoints.prepare(world)
    torch.manual_seed(settings.seed)

    for line in task.summary_lines():
        say(line)
    tokenizer = load_tokenizer()
    encoded = {}
    for split in ("train", "dev", "test"):
        examples = getattr(task, split)
        if not examples:
            continue
        encoded[split] = encode_examples(examples, tokenizer, settings.max_len, settings.truncation, settings.head_fraction)
        e = encoded[split]
        say(f"  {split}: {e.num_truncated} of {len(examples)} documents ({100 * e.truncated_share:.1f}%) longer than "
            f"{settings.max_len} tokens, truncated ({settings.truncation})")
    labels = {split: [e.label for e in getattr(task, split)] for split in encoded}

    model, info = load_model(settings.model_dir, label_names=task.label_names, output_loading_info=True)
    if settings.max_len > model.config.max_position_embeddings:
        raise ConfigError(f"--max-len {settings.max_len} exceeds the model's {model.config.max_position_embeddings} positions ({settings.model_dir})")
    if info["missing_keys"]:
        say(f"model {settings.model_dir}: new (randomly initialised) weights: {', '.join(sorted(info['missing_keys']))}")

    steps_per_epoch = math.ceil(len(task.train) / settings.batch_size)
    total_steps = steps_per_epoch * settings.epochs
    resolved = finetuning_config(settings, world, total_steps, output_dir)
    checkpoints.load_universal_if_needed(resolved)
    validate_with_deepspeed(resolved)
    engine = build_engine(model, resolved)
    for note in resolved.notes:
        say(note)
    say(f"{world} process(es)" + (f" x {threads} CPU threads" if threads else "") + f", {resolved.precision}, "
        f"ZeRO stage {resolved.zero_stage}; {settings.epochs} epochs x "
        f"{steps_per_epoch} steps of {settings.batch_size} documents (micro-batch {settings.micro_batch_size}, "
        f"accumulation {resolved.gradient_accumulation_steps}), lr {settings.learning_rate}")
    padding = training_padding(encoded["train"].lengths(), settings, world, model.config.padding_multiple())
    say(f"padding efficiency of the training micro-batches (steps grouped by length): "
        f"{100 * padding['micro_batches']:.1f}% real tokens; {100 * padding['with_model_padding']:.1f}% with the "
        f"model's padding to multiples of {padding['padding_multiple']} (one document per micro-batch: "
        f"{100 * padding['one_document_per_micro_batch']:.1f}%)")

    weights = class_weights(labels["train"], len(task.label_names), settings.class_weight)
    if weights is not None:
        say("class weights (balanced): " + ", ".join(f"{name} {w:.3f}" for name, w in zip(task.label_names, weights.tolist())))
        weights = weights.to(engine.device)
    state = TrainingState(global_batch_size=settings.batch_size, world_size=world, seed=settings.seed,
                          zero_stage=resolved.zero_stage, total_num_steps=total_steps)
    state = checkpoints.restore(engine, state, resolved)
    objective = Classification(settings, task, encoded, labels, engine, weights, steps_per_epoch, best_dir,
                               kept)
    state = train(engine, objective, checkpoints, state, max_steps=total_steps, global_batch_size=settings.batch_size,
                  save_interval=settings.save_interval or steps_per_epoch, log_interval=settings.log_every,
                  max_nonfinite_steps=settings.max_nonfinite_steps, fault=fault)

    # Score the saved best checkpoint, so the numbers belong to the files a user gets.
    del engine
    best_model = load_model(best_dir, task="classification").to(local_device())
    results = {}
    for split in encoded:
        if split == "train":
            continue
        predictions, probabilities = predict(best_model, encoded[split], settings.eval_batch_size, local_device())
        metrics = classification_metrics(labels[split], predictions, task.label_names)
        metrics["truncated_share"] = encoded[split].truncated_share
        results[split] = metrics
        if rank == 0:
            write_predictions(output_dir / predictions_filename(split), getattr(task, split), predictions, task.label_names, probabilities)
            write_metrics(output_dir / split_metrics_filename(split), metrics)
        say(f"best checkpoint (epoch {objective.best['epoch']}) on {split}: macro-F1 {metrics['macro_f1']:.4f} "
            f"accuracy {metrics['accuracy']:.4f}")
    summary = {
        "task": task.name,
        "label_names": task.label_names,
        "data": task.report,
        "documents": {split: len(getattr(task, split)) for split in ("train", "dev", "test")},
        "truncated_share": {split: e.truncated_share for split, e in encoded.items()},
        "padding_efficiency": padding,
        "settings": asdict(settings),
        "deepspeed": {"precision": resolved.precision, "zero_stage": resolved.zero_stage, "processes": world, "notes": resolved.notes},
        "history": objective.history,
        "best_epoch": objective.best["epoch"],
        "metrics": {split: {"macro_f1": m["macro_f1"], "accuracy": m["accuracy"]} for split, m in results.items()},
        "train_seconds": state.elapsed_seconds,
        "total_seconds": time.perf_counter() - started,
    }
    if rank == 0:
        write_metrics(output_dir / SUMMARY_FILENAME, summary)
    barrier()
    return summary if rank == 0 else None
