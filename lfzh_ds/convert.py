"""Making models of other layouts into ours and back, with the model classes.

* ``convert_bert_to_longformer``: a short BERT / roberta_zh checkpoint (HF format, ``BertForMaskedLM``,
  ``BertForPreTraining`` or ``BertModel`` weights) -> a long ``LongformerZhForMaskedLM``: position rows
  tiled to the new length, global projections copied from the local ones, MLM head kept, BERT's pooler
  saved beside it (the MLM model ignores it; ``LongformerZhForSequenceClassification`` loads it).
* ``lengthen_longformer``: one of our long models (a model folder, a pretraining run or one of its ``step_N``
  folders, a fine-tuned classifier) with more positions: the trained rows tiled to the new length (the upstream's
  and the Longformer paper's recipe), everything else as it was, so inputs within the old length give the same
  logits; the per-layer windows are kept unless new ones are given.
* ``export_to_hf_longformer``: our model -> a directory that stock ``transformers.LongformerForMaskedLM``
  (or ``LongformerForSequenceClassification``, for our classifier) loads without this package and that
  gives the same logits (a block-sparse model in block mode: a different attention pattern, with a warning).

Converted models run the block kernel in token mode (``attention_backend="block_sparse"``,
``sparse_window_mode="token"``): Longformer's attention exactly, several times faster than
``sliding_chunks``; ``attention_backend="sliding_chunks"`` asks for transformers' code. Reading directories
and the key mappings of transformers' Longformer live in ``hf_layout``.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import BertConfig, LongformerForMaskedLM, LongformerForSequenceClassification

from .configuration import LongformerZhConfig
from .constants import DEFAULT_ATTENTION_WINDOW, DEFAULT_MAX_POSITIONS, VOCAB_MD5, VOCAB_SIZE
from .errors import ConfigError, ModelFolderError
from .hf_layout import hf_longformer_config, hf_longformer_state_dict, read_config_dict, read_state_dict
from .loading import config_of, load_model, save_model_folder
from .modeling import LongformerZhForMaskedLM, LongformerZhForSequenceClassification
from .tokenization import load_tokenizer, vocab_md5

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- short BERT -> long
@dataclass
class ConversionResult:
    model: torch.nn.Module
    head_kept: bool
    short_max_positions: int
    dropped_keys: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    pooler_kept: bool = False  # bert.pooler.* saved beside the MLM model, for LongformerZhForSequenceClassification

    def summary(self, short_dir, long_dir) -> str:
        """What the conversion did, for people (the lines ``lfzh-convert`` prints)."""
        config = self.model.config
        lines = [
            f"converted {short_dir} -> {long_dir}",
            f"  positions {self.short_max_positions} -> {config.max_position_embeddings} (rows tiled)",
            f"  attention window {config.attention_window}, backend {config.attention_backend}; "
            "query/key/value_global copied from query/key/value",
            f"  MLM head: {'kept' if self.head_kept else 'freshly initialised (no head in the short checkpoint)'}",
        ]
        if self.pooler_kept:
            lines.append("  pooler (bert.pooler.*): kept for LongformerZhForSequenceClassification; the MLM model ignores it")
        if self.dropped_keys:
            lines.append(f"  dropped (unused by the MLM model): {', '.join(self.dropped_keys)}")
        lines += [f"  warning: {warning}" for warning in self.warnings]
        lines.append("  tokenizer files written beside the weights")
        return "\n".join(lines)


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


def is_short_bert(path) -> bool:
    """A BERT checkpoint to convert (not one of the long models ``lengthen_longformer`` takes)."""
    config = config_of(Path(path))
    return config.get("model_type") == "bert" and "attention_window" not in config


def convert_bert_to_longformer(
    short_dir,
    long_dir=None,
    max_pos: int = DEFAULT_MAX_POSITIONS,
    attention_window: int = DEFAULT_ATTENTION_WINDOW,
    attention_backend: str = "block_sparse",
) -> ConversionResult:
    """Make a short BERT checkpoint long; save it (with tokenizer files) to ``long_dir`` if given."""
    short_dir = Path(short_dir)
    raw_config = read_config_dict(short_dir)  # a missing directory is an error here, not a hub lookup
    if raw_config.get("model_type") in ("longformer_zh", "longformer") or "attention_window" in raw_config:
        raise ModelFolderError(
            f"{short_dir} is already a long model (its config.json has model_type={raw_config.get('model_type')!r}, "
            f"attention_window={raw_config.get('attention_window')!r}); conversion takes a short BERT/roberta_zh "
            "checkpoint. Lengthen this one with lengthen_longformer (launch/convert.py does), load it with "
            "LongformerZhForMaskedLM.from_pretrained, or export it with launch/export.py"
        )
    short_config = BertConfig.from_pretrained(short_dir)
    warnings = []
    if short_config.vocab_size != VOCAB_SIZE:
        raise ModelFolderError(
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
        raise ModelFolderError(f"{short_dir}: no {position_key} in the weights; is this a BERT checkpoint?")
    short_positions = state[position_key].shape[0]
    state[position_key] = tile_positions(state[position_key], max_pos)

    for i in range(config.num_hidden_layers):
        prefix = f"bert.encoder.layer.{i}.attention.self."
        for name in ("query", "key", "value"):
            for part in ("weight", "bias"):
                if f"{prefix}{name}.{part}" not in state:
                    raise ModelFolderError(f"{short_dir}: weights do not fit a BERT of its own config: no "
                                           f"{prefix}{name}.{part} (config.json says {config.num_hidden_layers} layers)")
                state[f"{prefix}{name}_global.{part}"] = state[f"{prefix}{name}.{part}"].clone()

    head_kept = any(k.startswith("cls.predictions.") for k in state)
    model = LongformerZhForMaskedLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
    missing = [k for k in missing if k not in tied]
    allowed_missing = [] if head_kept else [k for k in missing if k.startswith("cls.")]
    missing = [k for k in missing if k not in allowed_missing]
    if missing or unexpected:
        raise ModelFolderError(f"{short_dir}: weights do not fit a BERT of its own config: missing {missing}, unexpected {unexpected}")
    if not head_kept:
        warnings.append("no MLM head in the short checkpoint (BertModel weights): cls.predictions.* is freshly initialised")
    model.tie_weights()
    model.eval()

    if long_dir is not None:
        long_dir = Path(long_dir)
        model.save_pretrained(long_dir, state_dict={**model.state_dict(), **pooler})
        load_tokenizer(model.config.max_position_embeddings).save_pretrained(long_dir)
    return ConversionResult(model, head_kept, short_positions, dropped, warnings, pooler_kept=bool(pooler))


# ---------------------------------------------------------------------------------------------- ours, longer
@dataclass
class LengtheningResult:
    model: torch.nn.Module
    old_max_positions: int
    old_attention_window: int | list[int]

    def summary(self, source, target) -> str:
        """What the lengthening did, for people (the lines ``lfzh-convert`` prints)."""
        config = self.model.config
        window = (f"{self.old_attention_window} -> {config.attention_window}"
                  if config.attention_window != self.old_attention_window else f"{config.attention_window} (kept)")
        return "\n".join([
            f"lengthened {source} -> {target} ({type(self.model).__name__})",
            f"  positions {self.old_max_positions} -> {config.max_position_embeddings} (trained rows tiled: row i is "
            f"old row i % {self.old_max_positions})",
            f"  attention window {window}, backend {config.attention_backend}; global projections and heads kept",
            "  tokenizer files written beside the weights",
        ])


def lengthen_longformer(source, target=None, max_pos: int = DEFAULT_MAX_POSITIONS,
                        attention_window: int | list[int] | None = None) -> LengtheningResult:
    """``source`` (anything ``load_model`` takes) with ``max_pos`` positions; saved to ``target`` if given.

    ``max_pos`` must exceed the model's positions and fit its attention (the block layout of block mode needs a
    multiple of its block; inputs are padded past the last position otherwise, which needs no position row).
    """
    model = load_model(source)
    config = model.config
    old_positions, old_window = config.max_position_embeddings, config.attention_window
    if max_pos <= old_positions:
        raise ConfigError(f"--max-pos {max_pos}: {source} already has {old_positions} positions; lengthening needs "
                          "more (to use fewer, give inputs of that length)")
    if attention_window is not None:
        config.attention_window = attention_window
    config.max_position_embeddings = max_pos
    try:  # what the windows allow: e.g. the block layout needs whole blocks of positions
        config.validate_longformer()
    except ValueError as err:
        raise ConfigError(f"{source} with --max-pos {max_pos}"
                          + (f" and --attention-window {attention_window}" if attention_window is not None else "")
                          + f": {err}") from None
    state = model.state_dict()
    position_key = f"{model.base_model_prefix}.embeddings.position_embeddings.weight"
    state[position_key] = tile_positions(state[position_key], max_pos)
    model = type(model)(config)  # the same model, built at the new length; every weight from the old one
    model.load_state_dict(state, strict=True)
    model.eval()
    if target is not None:
        save_model_folder(model, target)
    return LengtheningResult(model, old_positions, old_window)


# ---------------------------------------------------------------------------------------------- ours -> HF Longformer
def export_to_hf_longformer(model, out_dir, write_tokenizer: bool = True) -> Path:
    """Write ``model`` as a stock transformers model: a ``LongformerZhForMaskedLM`` as ``LongformerForMaskedLM``,
    a ``LongformerZhForSequenceClassification`` as ``LongformerForSequenceClassification`` (weights, labels).

    Both ``sliding_chunks`` and ``block_sparse`` in token mode compute what stock Longformer computes. Block
    mode has no stock counterpart: its model is exported with Longformer's token-level window of the same
    size, which is not the same computation (a warning says so).
    """
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
