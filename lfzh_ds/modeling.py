"""LongformerZh: BERT (the Chinese BERT / roberta_zh layout) with Longformer self-attention.

Parameter names are BERT's plus ``query_global``, ``key_global``, ``value_global`` in every
``attention.self``, with the MLM head at ``cls.predictions.*`` and 0-based (BERT-style) positions, so
the released ``ValkyriaLenneth/longformer_zh`` checkpoint loads with ``from_pretrained`` as is.

Global attention is asked for with ``global_attention_mask == 1`` or, as in the released code, with
``attention_mask == 2``. Inputs of any length are padded to ``config.padding_multiple()`` inside the
model and every output is cut back to the input length.

Importing this module registers the classes with transformers' Auto classes.
"""
from __future__ import annotations

import tempfile

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling, MaskedLMOutput, SequenceClassifierOutput
from transformers.models.bert.modeling_bert import (
    BertEmbeddings,
    BertIntermediate,
    BertLMPredictionHead,
    BertOnlyMLMHead,
    BertOutput,
    BertPooler,
    BertSelfOutput,
)

from .attention import build_self_attention
from .configuration import LongformerZhConfig
from .constants import IGNORE_INDEX
from .errors import ModelFolderError
from .hf_layout import is_hf_longformer_dir, load_hf_longformer
from .run_folder import checkpoint_weights, is_training_checkpoint


# ---------------------------------------------------------------------------------------------- layers
class LongformerZhAttention(nn.Module):
    """``attention.self`` (a Longformer backend) followed by BERT's ``attention.output``."""

    def __init__(self, config: LongformerZhConfig, layer_id: int):
        super().__init__()
        self.self = build_self_attention(config, layer_id)
        self.output = BertSelfOutput(config)

    def forward(self, hidden_states, is_index_masked, is_index_global_attn, output_attentions=False):
        context, attn = self.self(hidden_states, is_index_masked, is_index_global_attn, output_attentions=output_attentions)
        return self.output(context, hidden_states), attn


class LongformerZhLayer(GradientCheckpointingLayer):
    def __init__(self, config: LongformerZhConfig, layer_id: int):
        super().__init__()
        self.attention = LongformerZhAttention(config, layer_id)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, hidden_states, is_index_masked, is_index_global_attn, output_attentions=False):
        attention_output, attn = self.attention(hidden_states, is_index_masked, is_index_global_attn, output_attentions)
        layer_output = self.output(self.intermediate(attention_output), attention_output)
        return layer_output, attn


class LongformerZhEncoder(nn.Module):
    """The stack of layers. ``forward`` returns ``(hidden_states, all_hidden_states, all_attentions)``: the last
    layer's output, then the embeddings and every layer's output if asked for (else ``None``), then every
    layer's local attention probabilities if asked for (else ``None``)."""

    def __init__(self, config: LongformerZhConfig):
        super().__init__()
        self.layer = nn.ModuleList([LongformerZhLayer(config, i) for i in range(config.num_hidden_layers)])

    def forward(self, hidden_states, is_index_masked, is_index_global_attn, output_attentions=False,
                output_hidden_states=False):
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.layer:
            hidden_states, attn = layer(hidden_states, is_index_masked, is_index_global_attn, output_attentions)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (attn,)
        return hidden_states, all_hidden_states, all_attentions


# ---------------------------------------------------------------------------------------------- base
class LongformerZhPreTrainedModel(PreTrainedModel):
    config_class = LongformerZhConfig
    config: LongformerZhConfig
    base_model_prefix = "bert"
    supports_gradient_checkpointing = True
    _no_split_modules = ["BertEmbeddings", "LongformerZhLayer"]
    # Older transformers saved this buffer; it is rebuilt on construction.
    _keys_to_ignore_on_load_unexpected = [r"embeddings\.position_ids"]

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, BertLMPredictionHead):
            init.zeros_(module.bias)
        elif isinstance(module, BertEmbeddings):
            init.copy_(module.position_ids, torch.arange(module.position_ids.shape[-1]).expand((1, -1)))
            init.zeros_(module.token_type_ids)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Also loads a local directory saved by transformers' ``LongformerForMaskedLM``/``LongformerModel``
        (prefix ``longformer.``, head ``lm_head.*``, positions shifted by ``pad_token_id + 1``), and a run folder
        of ``launch/pretrain.py``, its checkpoints folder or one ``step_N`` folder (that checkpoint's fp32
        weights, from any ZeRO stage), so ``AutoModelForMaskedLM.from_pretrained(RUN_DIR/checkpoints/step_N)``
        works like on an exported model."""
        if is_hf_longformer_dir(pretrained_model_name_or_path):
            return load_hf_longformer(pretrained_model_name_or_path, model_class=cls, **kwargs)
        if is_training_checkpoint(pretrained_model_name_or_path):
            with tempfile.TemporaryDirectory(prefix="lfzh_checkpoint_") as folder:
                masked_lm_from_checkpoint(pretrained_model_name_or_path).save_pretrained(folder)
                return super().from_pretrained(folder, *args, **kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)


def _pad_right(tensor: torch.Tensor | None, padding_len: int, value) -> torch.Tensor | None:
    if tensor is None or padding_len == 0:
        return tensor
    return F.pad(tensor, (0, padding_len), value=value)


class LongformerZhModel(LongformerZhPreTrainedModel):
    """The encoder: BERT embeddings, Longformer layers, optional BERT pooler over ``[CLS]``."""

    def __init__(self, config: LongformerZhConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        self.embeddings = BertEmbeddings(config)
        self.encoder = LongformerZhEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        global_attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ):
        """``attention_mask``: 0 padding, 1 local attention, 2 global attention (released convention);
        ``global_attention_mask``: 1 adds global attention. Any length; padded inside, cut back on output."""
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        batch_size, seq_len = input_ids.shape if input_ids is not None else inputs_embeds.shape[:2]
        device = input_ids.device if input_ids is not None else inputs_embeds.device

        if attention_mask is None:
            attention_mask = torch.ones(batch_size, seq_len, dtype=torch.long, device=device)
        is_index_masked = attention_mask == 0
        is_index_global_attn = attention_mask == 2
        if global_attention_mask is not None:
            is_index_global_attn = is_index_global_attn | (global_attention_mask != 0)
        is_index_global_attn = is_index_global_attn & ~is_index_masked  # padding never attends or is attended
        if token_type_ids is None:
            token_type_ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)
        if position_ids is None:
            if seq_len > self.config.max_position_embeddings:
                raise ValueError(
                    f"input has {seq_len} tokens but the model has max_position_embeddings="
                    f"{self.config.max_position_embeddings}; truncate the input or convert to a longer model"
                )
            position_ids = torch.arange(seq_len, device=device).expand(batch_size, seq_len)

        multiple = self.config.padding_multiple()
        padding_len = (multiple - seq_len % multiple) % multiple
        if padding_len:
            input_ids = _pad_right(input_ids, padding_len, self.config.pad_token_id)
            if inputs_embeds is not None:
                pad_ids = torch.full((batch_size, padding_len), self.config.pad_token_id, dtype=torch.long, device=device)
                inputs_embeds = torch.cat([inputs_embeds, self.embeddings.word_embeddings(pad_ids)], dim=1)
            is_index_masked = _pad_right(is_index_masked, padding_len, True)
            is_index_global_attn = _pad_right(is_index_global_attn, padding_len, False)
            token_type_ids = _pad_right(token_type_ids, padding_len, 0)
            # The padded tail is never attended: any valid position row will do.
            position_ids = _pad_right(position_ids, padding_len, 0)

        hidden_states = self.embeddings(
            input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids, inputs_embeds=inputs_embeds
        )
        hidden_states, all_hidden_states, all_attentions = self.encoder(
            hidden_states, is_index_masked, is_index_global_attn, output_attentions, output_hidden_states
        )

        sequence_output = hidden_states[:, :seq_len]
        if output_hidden_states:
            all_hidden_states = tuple(h[:, :seq_len] for h in all_hidden_states)
        if output_attentions:
            all_attentions = tuple(a[:, :seq_len] if a is not None else None for a in all_attentions)
        pooled_output = self.pooler(sequence_output) if self.pooler is not None else None

        if not return_dict:
            return tuple(v for v in (sequence_output, pooled_output, all_hidden_states, all_attentions) if v is not None)
        return BaseModelOutputWithPooling(
            last_hidden_state=sequence_output,
            pooler_output=pooled_output,
            hidden_states=all_hidden_states,
            attentions=all_attentions,
        )


# ---------------------------------------------------------------------------------------------- heads
class LongformerZhPreTrainedModelWithHead(LongformerZhPreTrainedModel):
    """The encoder ``self.bert`` with a task head: one ``forward`` for every head. A subclass gives
    ``output_class``, ``_head(outputs, labels, **kwargs) -> (loss, logits)`` and, if it marks global tokens of
    its own, ``_global_attention``."""

    output_class: type

    def forward(
        self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
        global_attention_mask: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None, output_attentions: bool | None = None,
        output_hidden_states: bool | None = None, return_dict: bool | None = None, **kwargs,
    ):
        """Inputs as ``LongformerZhModel.forward``; ``labels`` give a loss; other keyword arguments go to the head."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.bert(
            input_ids,
            attention_mask=attention_mask,
            global_attention_mask=self._global_attention(input_ids, inputs_embeds, attention_mask, global_attention_mask),
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        loss, logits = self._head(outputs, labels, **kwargs)
        if not return_dict:
            output = (logits,) + tuple(v for v in (outputs.hidden_states, outputs.attentions) if v is not None)
            return ((loss,) + output) if loss is not None else output
        return self.output_class(loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions)

    def _global_attention(self, input_ids, inputs_embeds, attention_mask, global_attention_mask):
        return global_attention_mask


class LongformerZhForMaskedLM(LongformerZhPreTrainedModelWithHead):
    """Masked-LM model. With ``labels``, the head runs only at labelled positions (``labels != -100``):
    ``logits`` is then ``[num_labelled, vocab]`` in row-major order of ``labels``, and ``loss`` is the mean
    cross-entropy over them (the same number as the full-logits loss, at a tenth of the head's cost).

    ``output_vocab`` (training only, with ``labels``): the token ids the softmax runs over, sorted, holding every
    label; ``logits`` then has one column per id. Pretraining passes the tokens that occur in its training data
    (about 9,000 of the 21,128 on Chinese news), which makes the head, the largest cost of a small model, that
    much cheaper: tokens that never occur as a label would only be pushed down."""

    output_class = MaskedLMOutput
    _tied_weights_keys = {
        "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
        "cls.predictions.decoder.bias": "cls.predictions.bias",
    }
    # The MLM model has no pooler; BERT checkpoints (e.g. BertForPreTraining) often carry one.
    _keys_to_ignore_on_load_unexpected = [r"embeddings\.position_ids", r"^bert\.pooler\.", r"^cls\.seq_relationship\."]

    def __init__(self, config: LongformerZhConfig):
        super().__init__(config)
        self.bert = LongformerZhModel(config, add_pooling_layer=False)
        self.cls = BertOnlyMLMHead(config)
        self.post_init()

    def get_output_embeddings(self):
        return self.cls.predictions.decoder

    def set_output_embeddings(self, new_embeddings):
        self.cls.predictions.decoder = new_embeddings
        self.cls.predictions.bias = new_embeddings.bias

    def _head(self, outputs, labels, output_vocab: torch.Tensor | None = None, **kwargs):
        if output_vocab is not None and labels is None:
            raise ValueError("output_vocab restricts the training softmax: it needs labels")
        sequence_output = outputs.last_hidden_state
        if labels is None:
            return None, self.cls(sequence_output)
        labelled = labels != IGNORE_INDEX
        targets = labels[labelled]
        if output_vocab is None:
            logits = self.cls(sequence_output[labelled])
        else:
            logits, targets = self._logits_over(output_vocab, sequence_output[labelled], targets)
        if targets.numel():
            return F.cross_entropy(logits.float(), targets), logits
        # no labelled token in this batch: a zero that still reaches every parameter's graph
        return logits.float().sum() * 0.0, logits

    def _logits_over(self, output_vocab: torch.Tensor, hidden: torch.Tensor, targets: torch.Tensor):
        """The head's logits over the ids ``output_vocab`` only, and the targets as columns of them."""
        head = self.cls.predictions
        columns = torch.searchsorted(output_vocab, targets).clamp(max=output_vocab.numel() - 1)
        missing = output_vocab[columns] != targets
        if bool(missing.any()):
            raise ValueError(f"label id {int(targets[missing][0])} is not in output_vocab")
        weight = head.decoder.weight.index_select(0, output_vocab)
        return F.linear(head.transform(hidden), weight, head.bias.index_select(0, output_vocab)), columns


# The upstream project's misspelt name, kept so its scripts keep working.
LongformerZhForMaksedLM = LongformerZhForMaskedLM


class LongformerZhForSequenceClassification(LongformerZhPreTrainedModelWithHead):
    """BERT's pooled-``[CLS]`` classifier; ``[CLS]`` (position 0) gets global attention unless the caller
    marks global tokens itself."""

    output_class = SequenceClassifierOutput

    def __init__(self, config: LongformerZhConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = LongformerZhModel(config, add_pooling_layer=True)
        classifier_dropout = (
            config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        )
        self.dropout = nn.Dropout(classifier_dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def _global_attention(self, input_ids, inputs_embeds, attention_mask, global_attention_mask):
        caller_marked_global = global_attention_mask is not None or (
            attention_mask is not None and bool((attention_mask == 2).any())
        )
        if caller_marked_global:
            return global_attention_mask
        reference = input_ids if input_ids is not None else inputs_embeds[..., 0]
        global_attention_mask = torch.zeros(reference.shape, dtype=torch.long, device=reference.device)
        global_attention_mask[:, 0] = 1
        return global_attention_mask

    def _head(self, outputs, labels, **kwargs):
        logits = self.classifier(self.dropout(outputs.pooler_output))
        if labels is None:
            return None, logits
        if self.config.problem_type is None:
            if self.num_labels == 1:
                self.config.problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int):
                self.config.problem_type = "single_label_classification"
            else:
                self.config.problem_type = "multi_label_classification"
        if self.config.problem_type == "regression":
            if self.num_labels == 1:
                return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype).view(-1)), logits
            return F.mse_loss(logits, labels.to(logits.dtype)), logits
        if self.config.problem_type == "single_label_classification":
            return F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1)), logits
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype)), logits


def masked_lm_from_checkpoint(path) -> LongformerZhForMaskedLM:
    """The ``LongformerZhForMaskedLM`` a training checkpoint holds (see ``run_folder.checkpoint_weights``)."""
    config_file, state_dict = checkpoint_weights(path)
    model = LongformerZhForMaskedLM(LongformerZhConfig.from_json_file(str(config_file)))
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    missing = [k for k in missing if k not in tied and not k.endswith("position_ids")]
    if missing or unexpected:
        raise ModelFolderError(f"{path} does not match {config_file}: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model.eval()


# ---------------------------------------------------------------------------------------------- Auto classes
AutoConfig.register(LongformerZhConfig.model_type, LongformerZhConfig, exist_ok=True)
AutoModel.register(LongformerZhConfig, LongformerZhModel, exist_ok=True)
AutoModelForMaskedLM.register(LongformerZhConfig, LongformerZhForMaskedLM, exist_ok=True)
AutoModelForSequenceClassification.register(LongformerZhConfig, LongformerZhForSequenceClassification, exist_ok=True)

__all__ = [
    "LongformerZhConfig",
    "LongformerZhForMaksedLM",
    "LongformerZhForMaskedLM",
    "LongformerZhForSequenceClassification",
    "LongformerZhModel",
    "LongformerZhPreTrainedModel",
    "LongformerZhPreTrainedModelWithHead",
]
