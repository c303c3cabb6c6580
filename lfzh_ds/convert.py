"""Moving weights between layouts.

* ``convert_bert_to_longformer``: a short BERT / roberta_zh checkpoint (HF format, ``BertForMaskedLM``,
  ``BertForPreTraining`` or ``BertModel`` weights) -> a long ``LongformerZhForMaskedLM``: position rows
  tiled to the new length, global projections copied from the local ones, MLM head kept, BERT's pooler
  saved beside it (the MLM model ignores it; ``LongformerZhForSequenceClassification`` loads it).
* ``load_hf_longformer``: a directory saved by transformers' ``LongformerForMaskedLM`` / ``LongformerModel``
  (prefix ``longformer.``, head ``lm_head.*``, RoBERTa-style positions) -> our model. Reached through
  ``LongformerZh*.from_pretrained(dir)``.
* ``export_to_hf_longformer``: our model -> a directory that stock ``transformers.LongformerForMaskedLM``
  (or ``LongformerForSequenceClassification``, for our classifier) loads without this package and that
  gives the same logits (a block-sparse model in block mode: a different attention pattern, with a warning).

Converted, released-layout and transformers-layout models run the block kernel in token mode
(``attention_backend="block_sparse"``, ``sparse_window_mode="token"``): Longformer's attention exactly,
several times faster than ``sliding_chunks``; ``attention_backend="sliding_chunks"`` asks for transformers' code.

The released ``ValkyriaLenneth/longformer_zh`` layout (``bert.`` prefix, ``cls.predictions.*``,
``query_global``/``key_global``/``value_global``, 0-based positions) is our own parameter layout, so it
needs no conversion: ``LongformerZhForMaskedLM.from_pretrained(dir)`` loads it directly.

Position numbering: BERT (and we) number positions 0, 1, 2, ...; transformers' Longformer numbers the
first real token ``pad_token_id + 1`` and reserves two extra rows (4,098 rows for 4,096 positions). Our
row ``i`` is therefore its row ``i + pad_token_id + 1``.
"""
from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file as load_safetensors

from .configuration import LongformerZhConfig, check_windows_nest
from .constants import DEFAULT_ATTENTION_WINDOW, DEFAULT_MAX_POSITIONS, VOCAB_MD5, VOCAB_SIZE
from .tokenization import load_tokenizer, vocab_md5

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
    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"{model_dir} does not exist or is not a directory: give a local model directory "
                                "(config.json + weights; the hub is never searched)")
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a model directory needs a config.json (HF format)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


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
    raise FileNotFoundError(
        f"no weights in {model_dir}: expected model.safetensors, pytorch_model.bin or a sharded *.index.json"
    )


def _load_bin(path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------- short BERT -> long
@dataclass
class ConversionResult:
    model: torch.nn.Module
    head_kept: bool
    short_max_positions: int
    dropped_keys: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    pooler_kept: bool = False  # bert.pooler.* saved beside the MLM model, for LongformerZhForSequenceClassification


def _canonical_bert_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BERT keys in ``BertForMaskedLM`` form: ``bert.`` prefix, LayerNorm ``weight``/``bias``."""
    out = {}
    has_prefix = any(k.startswith("bert.") for k in state)
    for key, value in state.items():
        key = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", key)
        key = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key)
        if not has_prefix and not key.startswith("cls."):
            key = "bert." + key
        out[key] = value
    return out


def tile_positions(table: torch.Tensor, new_rows: int) -> torch.Tensor:
    """Repeat a position table until it has ``new_rows`` rows (row ``i`` = old row ``i % old_rows``)."""
    repeats = math.ceil(new_rows / table.shape[0])
    return table.repeat(repeats, 1)[:new_rows].clone()


def convert_bert_to_longformer(
    short_dir,
    long_dir=None,
    max_pos: int = DEFAULT_MAX_POSITIONS,
    attention_window: int = DEFAULT_ATTENTION_WINDOW,
    attention_backend: str = "block_sparse",
) -> ConversionResult:
    """Make a short BERT checkpoint long; save it (with tokenizer files) to ``long_dir`` if given."""
    from transformers import BertConfig

    from .modeling import LongformerZhForMaskedLM

    short_dir = Path(short_dir)
    raw_config = read_config_dict(short_dir)  # a missing directory is an error here, not a hub lookup
    if raw_config.get("model_type") in ("longformer_zh", "longformer") or "attention_window" in raw_config:
        raise ValueError(
            f"{short_dir} is already a long model (its config.json has model_type={raw_config.get('model_type')!r}, "
            f"attention_window={raw_config.get('attention_window')!r}); conversion takes a short BERT/roberta_zh "
            "checkpoint. Load this one with LongformerZhForMaskedLM.from_pretrained, or export it with launch/export.py"
        )
    short_config = BertConfig.from_pretrained(short_dir)
    warnings = []
    if short_config.vocab_size != VOCAB_SIZE:
        raise ValueError(
            f"{short_dir}/config.json has vocab_size={short_config.vocab_size}, but this toolkit's Chinese tokenizer "
            f"has {VOCAB_SIZE} entries; convert a Chinese BERT/roberta_zh checkpoint built on the same vocab"
        )
    short_vocab = short_dir / "vocab.txt"
    if short_vocab.is_file() and vocab_md5(short_vocab) != VOCAB_MD5:
        warnings.append(f"{short_vocab} differs from the vendored vocab (md5 {vocab_md5(short_vocab)} != {VOCAB_MD5})")

    fields = short_config.to_dict()
    for name in ("model_type", "architectures", "transformers_version", "_name_or_path", "max_position_embeddings"):
        fields.pop(name, None)
    config = LongformerZhConfig(
        **fields,
        max_position_embeddings=max_pos,
        attention_window=attention_window,
        attention_backend=attention_backend,
    )
    config.architectures = ["LongformerZhForMaskedLM"]

    state = _canonical_bert_state(read_state_dict(short_dir))
    dropped = sorted(k for k in state if k.startswith("cls.seq_relationship.") or k == "bert.embeddings.position_ids")
    for key in dropped:
        del state[key]
    # BERT's pooler: not part of the MLM model, but saved beside it for the classifier (which pools [CLS] with it).
    pooler = {k: state.pop(k) for k in sorted(state) if k.startswith("bert.pooler.")}

    position_key = "bert.embeddings.position_embeddings.weight"
    if position_key not in state:
        raise KeyError(f"{short_dir}: no {position_key} in the weights; is this a BERT checkpoint?")
    short_positions = state[position_key].shape[0]
    state[position_key] = tile_positions(state[position_key], max_pos)

    for i in range(config.num_hidden_layers):
        prefix = f"bert.encoder.layer.{i}.attention.self."
        for name in ("query", "key", "value"):
            for part in ("weight", "bias"):
                state[f"{prefix}{name}_global.{part}"] = state[f"{prefix}{name}.{part}"].clone()

    head_kept = any(k.startswith("cls.predictions.") for k in state)
    model = LongformerZhForMaskedLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
    missing = [k for k in missing if k not in tied]
    allowed_missing = [] if head_kept else [k for k in missing if k.startswith("cls.")]
    missing = [k for k in missing if k not in allowed_missing]
    if missing or unexpected:
        raise KeyError(f"{short_dir}: weights do not fit a BERT of its own config: missing {missing}, unexpected {unexpected}")
    if not head_kept:
        warnings.append("no MLM head in the short checkpoint (BertModel weights): cls.predictions.* is freshly initialised")
    model.tie_weights()
    model.eval()

    if long_dir is not None:
        long_dir = Path(long_dir)
        model.save_pretrained(long_dir, state_dict={**model.state_dict(), **pooler})
        load_tokenizer(model.config.max_position_embeddings).save_pretrained(long_dir)
    return ConversionResult(model, head_kept, short_positions, dropped, warnings, pooler_kept=bool(pooler))


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


def load_hf_longformer(model_dir, model_class=None, **kwargs):
    """Build ``model_class`` (default ``LongformerZhForMaskedLM``) from a transformers-Longformer directory.

    The model runs the block kernel in token mode (the same attention). Keyword arguments that are config
    fields (``num_labels``, ``attention_backend``, ...) override the config; ``dtype``/``torch_dtype`` cast the model; ``output_loading_info=True`` also returns
    ``{"missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"}`` as ``from_pretrained`` does.
    The model comes back in eval mode, like ``from_pretrained``.
    """
    from .modeling import LongformerZhForMaskedLM

    model_class = model_class or LongformerZhForMaskedLM
    model_dir = Path(model_dir)
    hf = read_config_dict(model_dir)
    if hf.get("hidden_act", "gelu") != "gelu":
        raise ValueError(
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
    from transformers import LongformerConfig

    if architecture == "LongformerForMaskedLM" and config.hidden_act != "gelu":
        raise ValueError(
            f"hidden_act={config.hidden_act!r}: transformers' Longformer LM head always uses gelu, so only "
            "hidden_act='gelu' exports exactly"
        )
    windows = [config.layer_attention_window(i) for i in range(config.num_hidden_layers)]
    check_windows_nest(windows)  # stock Longformer pads to the largest window too (a block_sparse model may not nest)
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


def export_to_hf_longformer(model, out_dir, write_tokenizer: bool = True) -> Path:
    """Write ``model`` as a stock transformers model: a ``LongformerZhForMaskedLM`` as ``LongformerForMaskedLM``,
    a ``LongformerZhForSequenceClassification`` as ``LongformerForSequenceClassification`` (weights, labels).

    Both ``sliding_chunks`` and ``block_sparse`` in token mode compute what stock Longformer computes. Block
    mode has no stock counterpart: its model is exported with Longformer's token-level window of the same
    size, which is not the same computation (a warning says so).
    """
    from transformers import LongformerForMaskedLM, LongformerForSequenceClassification

    from .modeling import LongformerZhForMaskedLM, LongformerZhForSequenceClassification

    if isinstance(model, LongformerZhForMaskedLM):
        hf_class = LongformerForMaskedLM
    elif isinstance(model, LongformerZhForSequenceClassification):
        hf_class = LongformerForSequenceClassification
    else:
        raise TypeError(
            "export_to_hf_longformer exports a LongformerZhForMaskedLM or LongformerZhForSequenceClassification, "
            f"got {type(model).__name__}"
        )
    if model.config.attention_backend == "block_sparse" and model.config.sparse_window_mode == "block":
        logger.warning(
            "exporting a block_sparse model in block mode: stock Longformer uses a token-level sliding window, so "
            "its outputs will differ from this model's block layout (token mode would export exactly)"
        )
    hf_model = hf_class(hf_longformer_config(model.config, hf_class.__name__))
    missing, unexpected = hf_model.load_state_dict(hf_longformer_state_dict(model), strict=False)
    if missing or unexpected:
        raise KeyError(f"export does not fit transformers.{hf_class.__name__}: missing {missing}, unexpected {unexpected}")
    hf_model.to(next(model.parameters()).dtype)
    out_dir = Path(out_dir)
    hf_model.save_pretrained(out_dir)
    if write_tokenizer:
        load_tokenizer(model.config.max_position_embeddings).save_pretrained(out_dir)
    return out_dir
