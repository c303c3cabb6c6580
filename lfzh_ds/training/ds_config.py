"""Reading and checking a DeepSpeed JSON config for the machine at hand (no torch.distributed needed until step 5).

Everything here runs before any compute, so a bad config fails in a second with a message that names the
file and the key, instead of after the model is built or, worse, silently (DeepSpeed ignores unknown top-level
keys). The checks, in order:

1. the file exists and is JSON;
2. no removed feature (``sparse_attention`` and the rest of DeepSpeed's removed blocks) and no unknown top-level
   key (a typo such as ``train_batch_szie`` would otherwise be ignored); an optimizer or scheduler ``type``
   DeepSpeed knows, with only the ``params`` its constructor takes;
3. ``total_num_steps: "auto"`` becomes --max-steps, and a fixed one below --max-steps is refused;
   the batch sizes divide: ``train_batch_size = micro_batch x gradient_accumulation x processes``;
4. precision the accelerator cannot run (fp16 on the CPU accelerator) falls back, saying so in one line, unless
   ``LFZH_REHEARSE_FP16_ON_CPU=1`` asks to rehearse the GPU fp16 recipe on CPU; on the CPU accelerator, offloading
   to CPU is dropped and AdamW uses torch's implementation;
5. DeepSpeed's own validation of every block (after torch.distributed is up, so the world size is right).
"""
from __future__ import annotations

import copy
import difflib
import functools
import importlib
import inspect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.autotuning.constants import AUTOTUNING
from deepspeed.comm.constants import COMMS_LOGGER
from deepspeed.profiling.constants import FLOPS_PROFILER
from deepspeed.runtime import constants as c
from deepspeed.runtime import lr_schedules
from deepspeed.runtime.activation_checkpointing.config import ACT_CHKPT
from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS, EXPERT_PARALLEL, DeepSpeedConfig
from deepspeed.runtime.data_pipeline.constants import CURRICULUM_LEARNING, DATA_EFFICIENCY
from deepspeed.runtime.swap_tensor.constants import AIO
from deepspeed.runtime.zero.config import ZERO_OPTIMIZATION
from deepspeed.utils.config import TIMERS

from ..errors import ConfigError
from ..run_folder import TENSORBOARD_DIRNAME

# Top-level keys DeepSpeed reads under a literal name rather than a constant (deepspeed/runtime/config.py,
# deepspeed/monitor/config.py, deepspeed/runtime/tensor_parallel/config.py).
_LITERAL_TOP_LEVEL_KEYS = ("tensorboard", "wandb", "csv_monitor", "comet", "compile", "hybrid_engine", "pipeline",
                           "sequence_parallel_size", "tensor_parallel", "weight_quantization")


@functools.lru_cache(maxsize=None)
def deepspeed_top_level_keys() -> frozenset[str]:
    """The top-level keys the installed DeepSpeed reads, spelled by DeepSpeed's own constants."""
    names = ("TRAIN_BATCH_SIZE", "TRAIN_MICRO_BATCH_SIZE_PER_GPU", "GRADIENT_ACCUMULATION_STEPS",
             "MANAGED_GRADIENT_ACCUMULATION", "OPTIMIZER", "SCHEDULER", "ZERO_ALLOW_UNTESTED_OPTIMIZER",
             "ZERO_FORCE_DS_CPU_OPTIMIZER", "STEPS_PER_PRINT", "FP16", "BFLOAT16", "TORCH_AUTOCAST",
             "GRADIENT_CLIPPING", "COMMUNICATION_DATA_TYPE", "SEQ_PARALLEL_COMMUNICATION_DATA_TYPE",
             "PRESCALE_GRADIENTS", "GRADIENT_PREDIVIDE_FACTOR", "GRADIENT_ALLREDUCE_OP", "DISABLE_ALLGATHER",
             "DUMP_STATE", "DISABLE_PYTHON_GC", "VOCABULARY_SIZE", "WALL_CLOCK_BREAKDOWN", "MEMORY_BREAKDOWN",
             "CHECKPOINT", "DATA_TYPES", "DATALOADER_DROP_LAST", "USE_DATA_BEFORE_EXPERT_PARALLEL", "LOG_LEVEL")
    return frozenset({getattr(c, name) for name in names} | set(_LITERAL_TOP_LEVEL_KEYS) | {
        AUTOTUNING, COMMS_LOGGER, FLOPS_PROFILER, ACT_CHKPT, EXPERT_PARALLEL, CURRICULUM_LEARNING, DATA_EFFICIENCY,
        AIO, ZERO_OPTIMIZATION, TIMERS})


# Values our loader resolves itself (HF-style "auto"); DeepSpeed never sees them.
AUTO = "auto"


# Opt-in for tests: DeepSpeed's real fp16 path (fp16 weights, ZeRO's fp16 optimizer, dynamic loss scaling) on the CPU
# accelerator, which is slower than fp32 there. Only the accelerator's fp16 capability answer is overridden.
REHEARSE_FP16_ENV = "LFZH_REHEARSE_FP16_ON_CPU"


def did_you_mean(name: str, candidates, cutoff: float = 0.6) -> str:
    """`` (did you mean "X"?)`` for the candidate closest to a misspelt ``name``, or ``""`` if none is close."""
    close = difflib.get_close_matches(name, sorted(candidates), n=1, cutoff=cutoff)
    return f" (did you mean \"{close[0]}\"?)" if close else ""


@dataclass
class ResolvedConfig:
    """A DeepSpeed config dict made ready for this machine, plus what was changed and why."""

    source: str
    config: dict
    world_size: int
    notes: list[str] = field(default_factory=list)

    @property
    def micro_batch_size(self) -> int:
        return self.config["train_micro_batch_size_per_gpu"]

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.config["gradient_accumulation_steps"]

    @property
    def global_batch_size(self) -> int:
        return self.config["train_batch_size"]

    @property
    def precision(self) -> str:
        if self.config.get("fp16", {}).get("enabled"):
            return "fp16"
        if self.config.get("bf16", {}).get("enabled"):
            return "bf16"
        return "fp32"

    @property
    def total_num_steps(self) -> int | None:
        return self.config.get("scheduler", {}).get("params", {}).get("total_num_steps")

    @property
    def zero_stage(self) -> int:
        return int(self.config.get("zero_optimization", {}).get("stage", 0))

    def describe_batch(self, seq_len: int) -> str:
        b = self.global_batch_size
        return (f"global batch {b} sequences x {seq_len} tokens = {b * seq_len:,} tokens per step "
                f"(micro-batch {self.micro_batch_size} x accumulation {self.gradient_accumulation_steps} "
                f"x {self.world_size} processes)")


# ---------------------------------------------------------------------------------------------- loading

def read_json_object(path: Path, what: str, missing_hint: str) -> dict:
    """The JSON object in ``path``, or a ConfigError that starts with ``what`` (``"--model-config x.json"``)."""
    if not path.is_file():
        raise ConfigError(f"{what} does not exist; {missing_hint}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{what} is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} must hold a JSON object, not {type(data).__name__}")
    return data


def read_config_file(path) -> dict:
    path = Path(path)
    return read_json_object(path, f"DeepSpeed config {path}", "pass one of the files in ds_configs/ (for example "
                            "ds_configs/zero2.json or ds_configs/cpu.json)")


def check_top_level_keys(config: dict, source: str) -> None:
    removed = _removed_deepspeed_keys()
    for key in config:
        if key in removed:
            hint = ""
            if key == "sparse_attention":
                hint = (" Block-sparse attention is part of the model here: set \"attention_backend\": "
                        "\"block_sparse\" (and sparse_block_size, num_sliding_window_blocks, global_block_indices) "
                        "in the model config JSON instead.")
            raise ConfigError(f"{source}: the \"{key}\" block is not supported by DeepSpeed "
                              f"{deepspeed.__version__}: {removed[key]}{hint} Remove the block.")
        if key not in deepspeed_top_level_keys():
            suggestion = did_you_mean(key, deepspeed_top_level_keys())
            raise ConfigError(f"{source}: unknown top-level key \"{key}\"{suggestion}. DeepSpeed would silently "
                              "ignore it; fix the spelling or remove it.")


# The classes DeepSpeed may build for each of its optimizer names (which one depends on torch_adam, CPU offload and
# the accelerator), as "module:attribute"; any other name is looked up in torch.optim, as DeepSpeed does.
_DEEPSPEED_OPTIMIZER_CLASSES = {
    "adam": ("torch.optim:Adam", "deepspeed.ops.adam:FusedAdam", "deepspeed.ops.adam:DeepSpeedCPUAdam"),
    "adamw": ("torch.optim:AdamW", "deepspeed.ops.adam:FusedAdam", "deepspeed.ops.adam:DeepSpeedCPUAdam"),
    "adagrad": ("torch.optim:Adagrad", "deepspeed.ops.adagrad:DeepSpeedCPUAdagrad"),
    "lamb": ("deepspeed.ops.lamb:FusedLamb",),
    "lion": ("deepspeed.ops.lion:FusedLion", "deepspeed.ops.lion:DeepSpeedCPULion"),
    "muadam": ("mup:MuAdam",), "muadamw": ("mup:MuAdamW",), "musgd": ("mup:MuSGD",),
    "muon": (),  # its parameters are split between Muon and an auxiliary Adam; left to DeepSpeed
}
# Parameters DeepSpeed itself takes out of an Adam/AdamW "params" block before building the optimizer.
_DEEPSPEED_ADAM_EXTRA_PARAMS = ("torch_adam", "adam_w_mode", "fp32_optimizer_states")


def _import(spec: str):
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def _constructor_params(cls) -> dict[str, inspect.Parameter] | None:
    """Keyword parameters of ``cls(first, **params)`` (DeepSpeed gives the first: the model's parameters or the
    optimizer); None when the constructor takes any ``**kwargs``."""
    params = list(inspect.signature(cls.__init__).parameters.values())[2:]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name: p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _check_params(params, allowed: dict, where: str, source: str, required=()) -> None:
    if not isinstance(params, dict):
        raise ConfigError(f"{source}: \"{where}\" must be a JSON object of parameters")
    for key in params:
        if key not in allowed:
            suggestion = did_you_mean(key, allowed)
            raise ConfigError(f"{source}: unknown key \"{where}.{key}\"{suggestion}; it accepts "
                              f"{', '.join(sorted(allowed))}")
    missing = [name for name in required if name not in params]
    if missing:
        raise ConfigError(f"{source}: \"{where}\" lacks \"{missing[0]}\", which has no default")


def _check_block_keys(block, name: str, allowed: tuple, source: str) -> None:
    if not isinstance(block, dict):
        raise ConfigError(f"{source}: \"{name}\" must be a JSON object with \"type\" and \"params\"")
    for key in block:
        if key not in allowed:
            raise ConfigError(f"{source}: unknown key \"{name}.{key}\"; it accepts {', '.join(allowed)}")
    if "type" not in block:
        raise ConfigError(f"{source}: \"{name}\" has no \"type\"")


def check_optimizer_and_scheduler(config: dict, source: str) -> None:
    """The optimizer and scheduler names DeepSpeed knows, and only the parameters their constructors take:
    DeepSpeed would otherwise fail with a bare TypeError or AssertionError once the model is built."""
    if "optimizer" in config:
        block = config["optimizer"]
        _check_block_keys(block, "optimizer", ("type", "params", "legacy_fusion"), source)
        name = block["type"]
        torch_names = sorted(n for n, v in vars(torch.optim).items()
                             if isinstance(v, type) and issubclass(v, torch.optim.Optimizer) and n != "Optimizer")
        if str(name).lower() in DEEPSPEED_OPTIMIZERS:
            classes = [_import(spec) for spec in _DEEPSPEED_OPTIMIZER_CLASSES.get(str(name).lower(), ())]
        elif name in torch_names:
            classes = [getattr(torch.optim, name)]
        else:
            suggestion = did_you_mean(str(name), torch_names + DEEPSPEED_OPTIMIZERS)
            raise ConfigError(f"{source}: \"optimizer.type\": \"{name}\" is not an optimizer DeepSpeed "
                              f"knows{suggestion}; use one of DeepSpeed's ({', '.join(DEEPSPEED_OPTIMIZERS)}, any "
                              "case) or a torch.optim class name")
        params = block.get("params", {})
        if isinstance(params, dict) and "max_grad_norm" in params:
            raise ConfigError(f"{source}: \"optimizer.params.max_grad_norm\" is not supported by DeepSpeed; "
                              "use the top-level \"gradient_clipping\" instead")
        signatures = [_constructor_params(c) for c in classes if c is not None]
        if signatures and None not in signatures:
            allowed = dict.fromkeys(_DEEPSPEED_ADAM_EXTRA_PARAMS) if str(name).lower() in ("adam", "adamw") else {}
            for signature in signatures:
                allowed.update(signature)
            _check_params(params, allowed, "optimizer.params", source)
    if "scheduler" in config:
        block = config["scheduler"]
        _check_block_keys(block, "scheduler", ("type", "params"), source)
        name = block["type"]
        torch_names = sorted(n for n, v in vars(torch.optim.lr_scheduler).items()
                             if isinstance(v, type) and issubclass(v, torch.optim.lr_scheduler.LRScheduler)
                             and n not in ("LRScheduler", "_LRScheduler"))
        if name in lr_schedules.VALID_LR_SCHEDULES:
            cls = getattr(lr_schedules, name)
        elif name in torch_names:
            cls = getattr(torch.optim.lr_scheduler, name)
        else:
            suggestion = did_you_mean(str(name), list(lr_schedules.VALID_LR_SCHEDULES) + torch_names)
            raise ConfigError(f"{source}: \"scheduler.type\": \"{name}\" is not a scheduler DeepSpeed "
                              f"knows{suggestion}; use one of {', '.join(lr_schedules.VALID_LR_SCHEDULES)} or a "
                              "torch.optim.lr_scheduler class name")
        allowed = _constructor_params(cls)
        if allowed is not None:
            required = [n for n, p in allowed.items() if p.default is inspect.Parameter.empty]
            _check_params(block.get("params", {}), allowed, "scheduler.params", source, required)


def _removed_deepspeed_keys() -> dict[str, str]:
    """DeepSpeed's own list and wording of removed top-level blocks when it has one (0.19.7+)."""
    removed = getattr(deepspeed.runtime.config, "_REMOVED_TOP_LEVEL_CONFIG_KEYS", None)
    if removed is None:
        return {"sparse_attention": "DeepSpeed's sparse attention ops were removed in 0.19.7."}
    return dict(removed)


def resolve_batch_sizes(config: dict, world_size: int, source: str) -> None:
    """Fill in the three batch numbers DeepSpeed relates, or say which ones do not divide."""
    names = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
    for name in names:
        value = config.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise ConfigError(f"{source}: \"{name}\" must be a positive integer, got {value!r}")
    total, micro, accum = (config.get(n) for n in names)
    w = world_size
    if total is not None and micro is not None and accum is not None:
        if total != micro * accum * w:
            raise ConfigError(
                f"{source}: train_batch_size={total} must equal train_micro_batch_size_per_gpu={micro} x "
                f"gradient_accumulation_steps={accum} x {w} processes = {micro * accum * w}. Drop "
                "gradient_accumulation_steps to let it be derived, or change one of the numbers.")
    elif total is not None and micro is not None:
        if total % (micro * w):
            raise ConfigError(
                f"{source}: train_batch_size={total} does not divide by train_micro_batch_size_per_gpu={micro} x "
                f"{w} processes = {micro * w}; use a train_batch_size that is a multiple of {micro * w} "
                "or another micro-batch size.")
        accum = total // (micro * w)
    elif total is not None and accum is not None:
        if total % (accum * w):
            raise ConfigError(
                f"{source}: train_batch_size={total} does not divide by gradient_accumulation_steps={accum} x "
                f"{w} processes = {accum * w}; use a train_batch_size that is a multiple of {accum * w}.")
        micro = total // (accum * w)
    elif total is not None:
        if total % w:
            raise ConfigError(f"{source}: train_batch_size={total} does not divide by {w} processes; "
                              f"use a multiple of {w}.")
        micro, accum = total // w, 1
    elif micro is not None:
        accum = accum or 1
        total = micro * accum * w
    else:
        raise ConfigError(f"{source}: give \"train_batch_size\" or \"train_micro_batch_size_per_gpu\"")
    config.update(train_batch_size=total, train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum)


def adapt_to_accelerator(config: dict, source: str, notes: list[str]) -> None:
    """fp16 on the CPU accelerator (or one without fp16) falls back to fp32, said in one line.

    DeepSpeed's CPU accelerator reports fp16 as supported where oneDNN has fp16 kernels, but its fp16 path
    (loss scaling, fp16 master copies) is a GPU recipe: on CPU it is emulated, slower than fp32, and refused
    outright on CPUs without oneDNN fp16 ("Type fp16 is not supported on your device").
    """
    accelerator = get_accelerator()
    name = accelerator.device_name()
    fp16 = config.get("fp16", {})
    if fp16.get("enabled") and name == "cpu" and rehearsing_fp16_on_cpu():
        notes.append(f"{REHEARSE_FP16_ENV}=1: rehearsing the GPU fp16 recipe on the CPU accelerator (DeepSpeed's fp16 "
                     "optimizer and dynamic loss scaling; slower than fp32, for tests only)")
    elif fp16.get("enabled") and (name == "cpu" or not accelerator.is_fp16_supported()):
        config.pop("fp16")
        config.pop("amp", None)
        notes.append(f"fp16 is not available on the {name.upper()} accelerator: training in fp32 instead "
                     f"({source} asks for fp16; ds_configs/cpu.json selects fp32 or bf16 explicitly)")
    if name == "cpu":
        zero = config.get("zero_optimization", {})
        offloaded = [k for k in ("offload_optimizer", "offload_param") if zero.get(k, {}).get("device", "none") != "none"]
        if offloaded:  # the CPU accelerator's memory is already host memory
            for key in offloaded:
                zero.pop(key)
            notes.append(f"CPU accelerator: {' and '.join(offloaded)} dropped (there is no device memory to offload from)")
        params = config.get("optimizer", {}).get("params")
        if params is not None and "torch_adam" not in params:
            # FusedAdam is a CUDA kernel; on CPU DeepSpeed would JIT-build a C++ Adam for ~45 s per fresh machine.
            params["torch_adam"] = True
            notes.append("CPU accelerator: the optimizer uses torch's implementation (\"torch_adam\": true)")


def rehearsing_fp16_on_cpu() -> bool:
    return os.environ.get(REHEARSE_FP16_ENV, "") == "1"


def resolve_auto_values(config: dict, max_steps: int | None, source: str) -> None:
    """``total_num_steps: "auto"`` becomes --max-steps; a fixed one below --max-steps is refused (the schedule
    would sit at its minimum rate, 0 for the shipped configs, from that step on)."""
    params = config.get("scheduler", {}).get("params", {})
    total = params.get("total_num_steps")
    if total == AUTO:
        if max_steps is None:
            raise ConfigError(f"{source}: scheduler.params.total_num_steps is \"auto\" but no --max-steps was given")
        params["total_num_steps"] = max_steps
    elif isinstance(total, int) and max_steps is not None and max_steps > total:
        raise ConfigError(f"{source}: scheduler.params.total_num_steps is {total} but --max-steps is {max_steps}: "
                          f"the learning rate would reach its minimum at step {total} and stay there for the last "
                          f"{max_steps - total} steps. Set total_num_steps "
                          f"to at least {max_steps} (\"auto\" follows --max-steps), or lower --max-steps.")
    for key, value in _walk(config):
        if value == AUTO:
            raise ConfigError(f"{source}: \"{key}\": \"auto\" is only understood for scheduler.params.total_num_steps; "
                              "give a number")


def _walk(node, prefix=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{prefix}.{key}" if prefix else key)
    else:
        yield prefix, node


def place_outputs(config: dict, run_dir: Path | None) -> None:
    """TensorBoard events go to RUN_DIR/tensorboard unless the config names a folder."""
    board = config.get("tensorboard")
    if board and board.get("enabled") and run_dir is not None:
        if not board.get("output_path"):
            board["output_path"] = str(Path(run_dir) / TENSORBOARD_DIRNAME)
        board.setdefault("job_name", "pretrain")


def load_deepspeed_config(path, world_size: int, *, max_steps: int | None = None, run_dir=None,
                          overrides: dict | None = None) -> ResolvedConfig:
    """Steps 1-4 of the module docstring: everything that needs no torch.distributed."""
    source = str(path)
    config = read_config_file(path)
    check_top_level_keys(config, source)
    config = copy.deepcopy(config)
    for key, value in (overrides or {}).items():
        config[key] = value
    check_optimizer_and_scheduler(config, source)
    resolve_auto_values(config, max_steps, source)
    resolve_batch_sizes(config, world_size, source)
    notes: list[str] = []
    adapt_to_accelerator(config, source, notes)
    place_outputs(config, run_dir)
    return ResolvedConfig(source=source, config=config, world_size=world_size, notes=notes)


def validate_with_deepspeed(resolved: ResolvedConfig) -> None:
    """Step 5: DeepSpeed's own pydantic validation of every block (call after torch.distributed is up)."""
    try:
        DeepSpeedConfig(copy.deepcopy(resolved.config))
    except Exception as err:  # pydantic ValidationError, DeepSpeedConfigError, AssertionError
        message = " ".join(str(err).split())
        raise ConfigError(f"{resolved.source}: DeepSpeed rejects the config: {message}") from None

