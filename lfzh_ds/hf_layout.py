"""Checkpoint layouts on disk and transformers' Longformer layout, without the model classes.

* Reading an HF-format model directory: ``read_config_dict``, ``is_classifier_config``, ``read_state_dict``.
* transformers' Longformer -> ours: ``is_hf_longformer_dir`` and ``load_hf_longformer`` (a directory saved by
  ``LongformerForMaskedLM`` / ``LongformerModel``: prefix ``longformer.``, head ``lm_head.*``, RoBERTa-style
  positions), reached through ``LongformerZh*.from_pretrained(dir)``, which passes its own class.
* Ours -> transformers' Longformer: ``hf_longformer_config`` and ``hf_longformer_state_dict``, which
  ``convert.export_to_hf_longformer`` writes out.

The released ``ValkyriaLenneth/longformer_zh`` layout (``bert.`` prefix, ``cls.predictions.*``,
``query_global``/``key_global``/``value_global``, 0-based positions) is our own parameter layout, so it
needs no mapping: ``LongformerZhForMaskedLM.from_pretrained(dir)`` loads it directly.

Position numbering: BERT (and we) number positions 0, 1, 2, ...; transformers' Longformer numbers the
first real token ``pad_token_id + 1`` and reserves two extra rows (4,098 rows for 4,096 positions). Our
row ``i`` is therefore its row ``i + pad_token_id + 1``.

Models loaded from transformers' layout run the block kernel in token mode (``attention_backend="block_sparse"``,
``sparse_window_mode="token"``): Longformer's attention exactly, several times faster than ``sliding_chunks``.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file as load_safetensors
from transformers import LongformerConfig

from .configuration import LongformerZhConfig, check_windows_nest
from .errors import ConfigError, MissingFileError, ModelFolderError

logger = logging.getLogger(__name__)

# Rows transformers' Longformer/RoBERTa keeps beyond the positions it can use (padding row + one spare).
HF_EXTRA_POSITION_ROWS = 2

# Our heads (BERT's) <-> transformers' Longformer heads (RoBERTa's): the MLM head <-> LongformerLMHead, and the
# classifier (BERT's pooler, dense + tanh over [CLS], then a linear layer) <-> LongformerClassificationHead
# (dense + tanh over the first token, then out_proj; the same in eval mode, its dropout sits elsewhere).
_HEAD_OURS_TO_HF = {
    "cls.predictions.transform.dense.weight": "lm_head.dense.weight",
    "cls.predictions.transform.dense.bias": "lm_head.dense.bias",
    "cls.predictions.transform.LayerNorm.weight": "lm_head.layer_norm.weight",
    "cls.predictions.transform.LayerNorm.bias": "lm_head.layer_norm.bias",
    "cls.predictions.decoder.weight": "lm_head.decoder.weight",
    "cls.predictions.decoder.bias": "lm_head.decoder.bias",
    "cls.predictions.bias": "lm_head.bias",
    "bert.pooler.dense.weight": "classifier.dense.weight",
    "bert.pooler.dense.bias": "classifier.dense.bias",
    "classifier.weight": "classifier.out_proj.weight",
    "classifier.bias": "classifier.out_proj.bias",
}
_HEAD_HF_TO_OURS = {hf: ours for ours, hf in _HEAD_OURS_TO_HF.items()}

# Fields that mean the same thing in BertConfig and LongformerConfig.
_SHARED_CONFIG_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "type_vocab_size",
    "initializer_range",
    "layer_norm_eps",
    "pad_token_id",
)


# ---------------------------------------------------------------------------------------------- reading
def read_config_dict(model_dir) -> dict:
    """The ``config.json`` of a local model directory, as a dict (one-line errors for a missing folder or file)."""
    if not Path(model_dir).is_dir():
        raise MissingFileError(f"{model_dir} does not exist or is not a directory: give a local model directory "
                               "(config.json + weights; the hub is never searched)")
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise MissingFileError(f"{path} not found: a model directory needs a config.json (HF format)")
    return load_config_json(path)


def load_config_json(path) -> dict:
    """A model's ``config.json`` as a dict; a file that is not a JSON object is the user's to fix, not a traceback."""
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelFolderError(f"{path} is not valid JSON ({err}): save or copy the model folder again") from None
    if not isinstance(config, dict):
        raise ModelFolderError(f"{path} holds a JSON {type(config).__name__}, not the object of a model config")
    return config


def is_classifier_config(config: dict) -> bool:
    """Whether a ``config.json`` (as a dict) was saved by a sequence classifier (ours or transformers')."""
    return any(name.endswith("ForSequenceClassification") for name in config.get("architectures") or [])


def read_state_dict(model_dir) -> dict[str, torch.Tensor]:
    """All weights of an HF-format directory: ``model.safetensors``, ``pytorch_model.bin`` or their
    sharded ``*.index.json`` forms."""
    model_dir = Path(model_dir)
    for index_name, loader in (("model.safetensors.index.json", load_safetensors), ("pytorch_model.bin.index.json", _load_bin)):
        index = model_dir / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            state = {}
            for shard in shards:
                state.update(loader(model_dir / shard))
            return state
    if (model_dir / "model.safetensors").is_file():
        return load_safetensors(model_dir / "model.safetensors")
    if (model_dir / "pytorch_model.bin").is_file():
        return _load_bin(model_dir / "pytorch_model.bin")
    raise MissingFileError(
        f"no weights in {model_dir}: expected model.safetensors, pytorch_model.bin or a sharded *.index.json"
    )


def _load_bin(path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------- HF Longformer -> ours
def is_hf_longformer_dir(path) -> bool:
    """A local directory whose config says it was saved by transformers' Longformer classes."""
    try:
        config_path = Path(path) / "config.json"
    except TypeError:
        return False
    if not config_path.is_file():
        return False
    with open(config_path, encoding="utf-8") as f:
        return json.load(f).get("model_type") == "longformer"


def hf_position_offset(pad_token_id: int) -> int:
    return pad_token_id + 1


def load_hf_longformer(model_dir, model_class, **kwargs):
    """Build ``model_class`` (a ``LongformerZh*`` class) from a transformers-Longformer directory.

    The model runs the block kernel in token mode (the same attention). Keyword arguments that are config
    fields (``num_labels``, ``attention_backend``, ...) override the config; ``dtype``/``torch_dtype`` cast the
    model; ``output_loading_info=True`` also returns ``{"missing_keys", "unexpected_keys", "mismatched_keys",
    "error_msgs"}`` as ``from_pretrained`` does.
    The model comes back in eval mode, like ``from_pretrained``.
    """
    model_dir = Path(model_dir)
    hf = read_config_dict(model_dir)
    if hf.get("hidden_act", "gelu") != "gelu":
        raise ConfigError(
            f"{model_dir}/config.json: hidden_act={hf['hidden_act']!r}; transformers' Longformer LM head always uses "
            "gelu, so only hidden_act='gelu' maps onto the BERT head exactly"
        )
    pad = hf.get("pad_token_id", 1)
    offset = hf_position_offset(pad)
    positions = hf["max_position_embeddings"] - max(offset, HF_EXTRA_POSITION_ROWS)

    dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None)
    output_loading_info = kwargs.pop("output_loading_info", False)
    config = kwargs.pop("config", None)
    if config is None:
        fields = {name: hf[name] for name in _SHARED_CONFIG_FIELDS if name in hf}
        config = LongformerZhConfig(**fields, max_position_embeddings=positions, attention_window=hf["attention_window"],
                                    attention_backend="block_sparse", sparse_window_mode="token")
        for name in ("bos_token_id", "eos_token_id", "sep_token_id", "label2id", "problem_type"):
            if name in hf:
                setattr(config, name, hf[name])
        if "id2label" in hf:  # JSON keys are strings; class indices are ints
            config.id2label = {int(i): label for i, label in hf["id2label"].items()}
    for name in list(kwargs):
        if hasattr(config, name):
            setattr(config, name, kwargs.pop(name))
    if kwargs:
        logger.warning("load_hf_longformer(%s): ignoring arguments %s", model_dir, sorted(kwargs))
    config.validate_longformer()

    state = {}
    for key, value in read_state_dict(model_dir).items():
        key = key.removeprefix("longformer.")
        if key in _HEAD_HF_TO_OURS:
            state[_HEAD_HF_TO_OURS[key]] = value
        elif key == "embeddings.position_embeddings.weight":
            state["bert." + key] = value[offset : offset + positions]
        elif key == "embeddings.position_ids":
            continue
        else:
            state["bert." + key] = value

    model = model_class(config)
    base_only = not hasattr(model, model.base_model_prefix)
    if base_only:  # LongformerZhModel itself: no prefix, no head
        state = {k.removeprefix("bert."): v for k, v in state.items() if k.startswith("bert.")}
    if getattr(model.bert if not base_only else model, "pooler", None) is None:
        state = {k: v for k, v in state.items() if "pooler." not in k}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")]
    if unexpected:
        logger.warning("%s: weights not used by %s: %s", model_dir, model_class.__name__, unexpected)
    if missing:
        logger.warning("%s: %s weights not in the checkpoint, freshly initialised: %s", model_dir, model_class.__name__, missing)
    model.tie_weights()
    if dtype is not None:
        model = model.to(dtype)
    model.eval()
    if output_loading_info:
        info = {"missing_keys": set(missing), "unexpected_keys": set(unexpected), "mismatched_keys": set(), "error_msgs": []}
        return model, info
    return model


# ---------------------------------------------------------------------------------------------- ours -> HF Longformer
def hf_longformer_config(config: LongformerZhConfig, architecture: str = "LongformerForMaskedLM"):
    """The stock ``LongformerConfig`` describing the same network (``architecture``: the stock class)."""
    if architecture == "LongformerForMaskedLM" and config.hidden_act != "gelu":
        raise ConfigError(
            f"hidden_act={config.hidden_act!r}: transformers' Longformer LM head always uses gelu, so only "
            "hidden_act='gelu' exports exactly"
        )
    windows = [config.layer_attention_window(i) for i in range(config.num_hidden_layers)]
    check_windows_nest(windows)  # stock Longformer pads to the largest window too (a block_sparse model may not nest)
    if min(windows) < 4:
        raise ConfigError(f"attention_window {min(windows)}: transformers' Longformer cannot compute a window under 4 "
                          "(its chunks of one token each side come out empty); train with 4 or more to export")
    fields = {name: getattr(config, name) for name in _SHARED_CONFIG_FIELDS}
    return LongformerConfig(
        **fields,
        max_position_embeddings=config.max_position_embeddings + max(hf_position_offset(config.pad_token_id), HF_EXTRA_POSITION_ROWS),
        attention_window=windows,
        bos_token_id=getattr(config, "bos_token_id", None),
        eos_token_id=getattr(config, "eos_token_id", None),
        sep_token_id=getattr(config, "sep_token_id", None),
        id2label=config.id2label,
        label2id=config.label2id,
        problem_type=config.problem_type,
        architectures=[architecture],
    )


def hf_longformer_state_dict(model) -> dict[str, torch.Tensor]:
    """Our MLM model's (classifier's) weights renamed (and positions shifted) for ``transformers.LongformerForMaskedLM``
    (``LongformerForSequenceClassification``)."""
    config = model.config
    offset = hf_position_offset(config.pad_token_id)
    rows = config.max_position_embeddings + max(offset, HF_EXTRA_POSITION_ROWS)
    out = {}
    for key, value in model.state_dict().items():
        value = value.detach().clone()
        if key in _HEAD_OURS_TO_HF:
            out[_HEAD_OURS_TO_HF[key]] = value
        elif key == "bert.embeddings.position_embeddings.weight":
            table = value.new_zeros(rows, value.shape[1])
            table[offset : offset + value.shape[0]] = value
            out["longformer.embeddings.position_embeddings.weight"] = table
        elif key.startswith("bert.embeddings.") and key.endswith(("position_ids", "token_type_ids")):
            continue  # buffers
        elif key.startswith("bert."):
            out["longformer." + key.removeprefix("bert.")] = value
        else:
            raise KeyError(f"{key}: no counterpart in transformers' Longformer")
    return out
