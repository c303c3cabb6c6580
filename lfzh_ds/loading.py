"""The one way to load a model from a path: ``load_model``.

It takes every folder the toolkit and its users have: a ``save_pretrained`` folder of ours (masked LM or
classifier), the released ``ValkyriaLenneth/longformer_zh`` layout (``bert`` with ``attention_window``), an export
to transformers' Longformer, a fine-tuning run's ``best`` folder, and a run folder of ``launch/pretrain.py``, its
checkpoints folder or one ``step_N`` folder (the models' ``from_pretrained`` reads all of these). Which class it
builds: a classifier when ``label_names`` are given (a new head on a masked-LM checkpoint) or when the folder's
``architectures`` say so; else the masked LM.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

from transformers.utils import logging as hf_logging

from .errors import MissingFileError, ModelFolderError
from .hf_layout import is_classifier_config, load_config_json
from .modeling import LongformerZhForMaskedLM, LongformerZhForSequenceClassification, masked_lm_from_checkpoint
from .run_folder import WHAT_TO_GIVE, is_training_checkpoint, resolve_checkpoint
from .tokenization import load_tokenizer

TASKS = ("auto", "masked_lm", "classification")


def config_of(path: Path) -> dict:
    """The ``config.json`` of a model folder or of the checkpoint a run/step folder resolves to, as a dict."""
    if is_training_checkpoint(path):
        ckpt_dir, tag = resolve_checkpoint(path)
        path = ckpt_dir / tag
    config_file = path / "config.json"
    if not config_file.is_file():
        raise MissingFileError(f"{path} has no config.json: give {WHAT_TO_GIVE}")
    return load_config_json(config_file)


def check_is_longformer(path: Path, config: dict) -> None:
    model_type = config.get("model_type")
    if model_type in ("longformer_zh", "longformer") or (model_type == "bert" and "attention_window" in config):
        return
    raise ModelFolderError(
        f"{path}/config.json has model_type {model_type!r}"
        + (" and no attention_window: a short BERT, convert it first (launch/convert.py)" if model_type == "bert" else "")
        + "; expected 'longformer_zh', 'longformer' (an export) or the released 'bert' layout with attention_window")


def load_model(path, *, task: str = "auto", label_names: list[str] | None = None, output_loading_info: bool = False):
    """The model at ``path`` in eval mode (with transformers' loading info when ``output_loading_info``).

    ``task``: ``"masked_lm"``, ``"classification"`` or ``"auto"`` (a classifier when ``label_names`` are given or
    the folder's ``architectures`` say so). A classifier keeps its head only if it has ``len(label_names)``
    classes (another count is refused); a masked-LM checkpoint gets a new, randomly initialised head. Without
    ``label_names`` (or with ``output_loading_info``), weights the folder lacks are refused rather than silently
    initialised at random.
    """
    if task not in TASKS:
        raise ValueError(f"task {task!r}: expected one of {', '.join(TASKS)}")
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"{path} does not exist; give {WHAT_TO_GIVE}")
    config = config_of(path)
    check_is_longformer(path, config)
    classifier = task == "classification" or (task == "auto" and (label_names is not None or is_classifier_config(config)))
    kwargs = {}
    if classifier and label_names is not None:
        num_labels = len(config.get("id2label") or {}) or config.get("num_labels", 2)
        if is_classifier_config(config) and num_labels != len(label_names):
            raise ModelFolderError(f"{path} is a classifier with {num_labels} classes but the task has {len(label_names)}; "
                                   "start from the pretrained (masked LM) checkpoint instead")
        kwargs = {"id2label": dict(enumerate(label_names)), "label2id": {name: i for i, name in enumerate(label_names)}}
    if not classifier and is_training_checkpoint(path):  # the weights as they are: no from_pretrained round trip
        model = masked_lm_from_checkpoint(path)
        info = {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
        return (model, info) if output_loading_info else model
    model_class = LongformerZhForSequenceClassification if classifier else LongformerZhForMaskedLM
    with quiet_transformers():
        try:
            model, info = model_class.from_pretrained(path, output_loading_info=True, **kwargs)
        except OSError as err:  # transformers' answer for a folder without weights ("Error no file named ...")
            raise MissingFileError(f"{path}: {err}; give {WHAT_TO_GIVE}") from None
    if info["missing_keys"] and not (classifier and label_names is not None):
        raise ModelFolderError(f"{path}: its config.json says architectures={config.get('architectures')}, but the weights "
                               f"lack {', '.join(sorted(info['missing_keys']))} of {model_class.__name__}; using it would "
                               "mean random weights")
    model.eval()
    return (model, info) if output_loading_info else model


def save_model_folder(model, out_dir) -> Path:
    """``model`` as a ``from_pretrained`` folder: config, safetensors weights and the tokenizer, whose
    ``model_max_length`` is the model's number of positions."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    load_tokenizer(model.config.max_position_embeddings).save_pretrained(out_dir)
    return out_dir


@contextlib.contextmanager
def quiet_transformers():
    """No per-key load report or progress bar from transformers: callers report what matters (new weights)."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
