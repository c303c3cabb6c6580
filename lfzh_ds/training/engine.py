"""Building the DeepSpeed engine from a checked config (``ds_config.ResolvedConfig``): BERT's parameter groups,
activation checkpointing, and the fp16 rehearsal switch on the CPU accelerator."""
from __future__ import annotations

import deepspeed
from deepspeed.accelerator import get_accelerator

from .ds_config import ResolvedConfig


def allow_fp16_on_cpu_accelerator() -> None:
    """Let DeepSpeed's engine accept fp16 on the CPU accelerator (its sanity check asks ``is_fp16_supported``; the
    accelerator already lists torch.float16 among its dtypes)."""
    type(get_accelerator()).is_fp16_supported = lambda self: True


def no_weight_decay(name: str) -> bool:
    return name.endswith(".bias") or "LayerNorm" in name or "layer_norm" in name


def parameter_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups as BERT trains them: no weight decay on biases and LayerNorm weights."""
    decay, plain = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (plain if no_weight_decay(name) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def build_engine(model, resolved: ResolvedConfig):
    """``deepspeed.initialize`` with BERT's parameter groups (activation checkpointing first when the config has an
    ``activation_checkpointing`` block); returns the engine."""
    if resolved.precision == "fp16" and get_accelerator().device_name() == "cpu":  # kept only when rehearsing
        allow_fp16_on_cpu_accelerator()
    if uses_activation_checkpointing(resolved):
        enable_activation_checkpointing(model)
    weight_decay = resolved.config.get("optimizer", {}).get("params", {}).get("weight_decay", 0.0)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=parameter_groups(model, weight_decay),
                                           config=resolved.config)
    return engine


def uses_activation_checkpointing(resolved: ResolvedConfig) -> bool:
    """An ``activation_checkpointing`` block turns on gradient checkpointing of the encoder layers."""
    return "activation_checkpointing" in resolved.config


def enable_activation_checkpointing(model) -> None:
    """Recompute each encoder layer in the backward pass (torch.utils.checkpoint, non-reentrant)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
