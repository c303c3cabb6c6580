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
from .engine import (ConfigError, ResolvedConfig, build_engine, enable_activation_checkpointing, init_distributed,
                     load_deepspeed_config,
                     rank_from_env, uses_activation_checkpointing, validate_with_deepspeed, world_size_from_env)
from .evaluation import BpcResult, all_reduce_result, collate, masked_lm_cross_entropy, validation_indices
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
    if not path.is_file():
        raise ConfigError(f"--model-config {path} does not exist; give a JSON file of LongformerZhConfig fields")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"--model-config {path} is not valid JSON: {err.msg} at line {err.lineno} column "
                          f"{err.colno}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--model-config {path} must hold a JSON object of LongformerZhConfig fields")
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
    from ..modeling import LongformerZhForMaskedLM

    if args.init_from:
        kwargs = {"attention_backend": args.attention_backend} if getattr(args, "attention_backend", None) else {}
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
    """A resumed run keeps its checkpoint's --seed and --masking (a flag that disagrees is refused) and says so
    when its learning-rate schedule now ends at another step (total_num_steps "auto" follows --max-steps)."""
    saved = resume.state
    where = ckpt.checkpoints_dir(run_dir) / resume.tag / ckpt.STATE_FILENAME
    for flag, name in (("--seed", "seed"), ("--masking", "masking")):
        kept = getattr(saved, name)
        given = getattr(args, name)
        if kept is None:  # a checkpoint from before masking was recorded
            continue
        if given is not None and given != kept:
            raise ConfigError(f"{flag} {given} differs from the {flag} {kept} of the run being resumed ({where}): "
                              f"a resumed run continues with its own {name}. Drop {flag} (or pass {kept}), or "
                              "start a new run in another --output-dir")
        setattr(args, name, kept)
    if saved.total_num_steps is not None and saved.total_num_steps != resolved.total_num_steps:
        say(f"note: the learning-rate schedule's total_num_steps changes from {saved.total_num_steps} (the "
            f"checkpoint's) to {resolved.total_num_steps} ({resolved.source} with --max-steps {args.max_steps}): "
            f"from step {saved.step + 1} on the learning rate follows the new schedule")


def check_validation_request(args: Namespace, manifest: dict) -> None:
    """Validation BPC needs at least one validation sequence; --eval-interval 0 trains without it."""
    if args.eval_interval <= 0:
        return
    if args.eval_sequences is not None and args.eval_sequences <= 0:
        raise ConfigError(f"--eval-sequences {args.eval_sequences}: validate on at least 1 sequence, or pass "
                          "--eval-interval 0 to train without validation")
    if not sum(int(entry["rows"]) for entry in manifest["splits"]["validation"]["shards"]):
        raise ConfigError(f"--data {args.data}: the validation split is empty (its manifest.json lists no "
                          "validation sequences; preprocessed with --val-fraction 0?). Pass --eval-interval 0 to "
                          "train without validation, or preprocess with a validation split")


# ---------------------------------------------------------------------------------------------- the run

def run(args: Namespace) -> RunSummary:
    world_size, rank = world_size_from_env(), rank_from_env()
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
    args.seed = DEFAULT_SEED if args.seed is None else args.seed
    args.masking = args.masking or DEFAULT_MASKING
    check_validation_request(args, manifest)
    universal = resume is not None and resume.state.world_size != world_size
    if universal:
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
    train_data = ShardDataset(args.data, "train", masking=args.masking, seed=args.seed, verify=False)
    val_data = ShardDataset(args.data, "validation", masking="static", seed=args.seed, verify=False)
    val_indices = validation_indices(val_data, args.eval_sequences)

    # 4. Model and engine (same initial weights on every process; DeepSpeed also broadcasts rank 0's).
    seed_everything(args.seed)
    model = build_model(args, model_config)
    model_config = model.config
    check_model_fits_data(model_config, seq_len, args.data)
    if uses_activation_checkpointing(resolved):
        enable_activation_checkpointing(model)
    num_parameters = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them
    engine = build_engine(model, resolved)
    say(f"model: {num_parameters:,} parameters, {model_config.num_hidden_layers} layers, "
        f"hidden {model_config.hidden_size}, attention {model_config.attention_backend}; precision "
        f"{resolved.precision}, ZeRO stage {resolved.zero_stage}")
    say(resolved.describe_batch(seq_len))

    # 5. Counters, RNG and data position: from the checkpoint, from --start-step, or fresh.
    state = ckpt.TrainingState(global_batch_size=resolved.global_batch_size, world_size=world_size, seed=args.seed,
                               zero_stage=resolved.zero_stage, masking=args.masking,
                               total_num_steps=resolved.total_num_steps)
    seed_everything(args.seed * 1000 + rank + 1)  # dropout differs across processes, reproducibly
    if resume is not None:
        tag = resume.universal_tag if universal else resume.tag
        load_path, client_state = engine.load_checkpoint(str(ckpt.checkpoints_dir(run_dir)), tag=tag)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load {ckpt.checkpoints_dir(run_dir) / tag}")
        saved, rng_states = ckpt.client_training_state(client_state, load_path)
        if universal:
            ckpt.restore_loss_scaler(engine, client_state)
        scheduler = engine.lr_scheduler
        if scheduler is not None and hasattr(scheduler, "last_batch_iteration"):
            # DeepSpeed's schedulers restore only their counter and the optimizer keeps the rate it saved, which is
            # the old schedule's when total_num_steps changed: set the rate of this schedule at this point.
            scheduler.step(scheduler.last_batch_iteration)
        if len(rng_states) == world_size:
            ckpt.restore_rng_state(rng_states[rank])
        else:
            seed_everything(args.seed * 1000 + rank + 1 + saved.step)
        if saved.global_batch_size != resolved.global_batch_size:
            say(f"note: the global batch changes from {saved.global_batch_size} to {resolved.global_batch_size} "
                "sequences; the data stream continues at the same sample")
        state = ckpt.TrainingState(**{**asdict(saved), "global_batch_size": resolved.global_batch_size,
                                      "world_size": world_size, "zero_stage": resolved.zero_stage,
                                      "masking": args.masking, "total_num_steps": resolved.total_num_steps})
        say(f"resumed from {load_path} at step {state.step} ({state.samples_consumed:,} samples consumed)")
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

    def validate() -> float:
        result = evaluate(engine, val_data, val_indices, args.eval_batch_size or resolved.micro_batch_size,
                          rank, world_size)
        metrics.log_val({"step": state.step, "val_loss": result.loss, "val_bpc": result.bpc,
                         "val_masked_tokens": result.masked_tokens, "val_sequences": result.sequences,
                         "wall_time": time.time()})
        say(f"validation at step {state.step}: BPC {result.bpc:.3f} (loss {result.loss:.4f}, "
            f"{result.masked_tokens:,} masked tokens in {result.sequences} sequences)")
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
    model_flops = ModelFlops(model_config)
    peak_tflops = getattr(args, "peak_tflops", None) or peak_tflops_of(
        torch.cuda.get_device_name() if torch.cuda.is_available() else None, resolved.precision)
    run_started = time.time() - state.elapsed_seconds
    nonfinite_run = 0
    engine.train()
    while state.step < args.max_steps:
        step = state.step + 1
        fault.at_step_start(step)
        lr = float(engine.get_lr()[0])  # the rate this step's update uses (the scheduler moves after it)
        loss_sum = torch.zeros((), dtype=torch.float64)
        tokens = positions_seen = flops = 0
        for j, positions in enumerate(sampler.micro_batches(state.samples_consumed)):
            torch.manual_seed(dropout_seed(args.seed, step, sampler.global_micro_batch_index(j)))
            batch = fetch(train_data, positions, engine.device)
            loss = fault.poison(engine(**batch).loss, step)
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
        state.step = step
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
            last_val = validate()
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
