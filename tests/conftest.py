import pytest
import torch
from model_helpers import torch_threads


@pytest.fixture
def frugal_torch():
    """One thread and a fixed seed for small in-process model tests (the CPU is shared with Ray and launcher
    subprocesses); the thread count is restored afterwards."""
    torch.manual_seed(0)
    with torch_threads(1):
        yield


@pytest.fixture
def shard_folder(tmp_path):
    """Factory for a small dataset folder in the real shard format, without Ray: documents of random real
    token ids (words of ``word_len`` tokens) packed and statically masked by the data service's own
    ``build_shard``, plus a manifest. ``shards`` maps a split to a list of shards, each a list of document
    lengths in tokens; ``tokens`` (optional) maps a split to each shard's token ids instead of random ones.
    Returns the folder."""
    import json

    import numpy as np

    from data_service.pack import build_shard
    from lfzh_ds.constants import FIRST_REAL_TOKEN_ID, SCHEMA_VERSION, VOCAB_MD5, VOCAB_SIZE
    from lfzh_ds.shards import MANIFEST_NAME, shard_name

    def make(shards, name="data", seq_len=64, dupe_factor=2, mask_prob=0.15, max_predictions=20,
             wwm_max_word_len=None, seed=0, word_len=2, tokens=None):
        folder = tmp_path / name
        folder.mkdir()
        config = {"seq_len": seq_len, "dupe_factor": dupe_factor, "mask_prob": mask_prob,
                  "max_predictions": max_predictions, "wwm_max_word_len": wwm_max_word_len, "seed": seed}
        rng = np.random.default_rng(1234)
        splits = {}
        for split in ("train", "validation"):
            entries = []
            for index, doc_lengths in enumerate(shards.get(split, [])):
                n = int(sum(doc_lengths))
                ids = (rng.integers(FIRST_REAL_TOKEN_ID, VOCAB_SIZE, size=n) if tokens is None
                       else np.asarray(tokens[split][index])).astype(np.uint16)
                starts = np.concatenate([(np.arange(d) % word_len == 0) for d in doc_lengths]).astype(np.uint8)
                data, stats = build_shard(split, index, ids, starts, np.asarray(doc_lengths, np.int64), config)
                (folder / shard_name(split, index)).write_bytes(data)
                entries.append({"file": shard_name(split, index), "rows": stats["rows"], "tokens": stats["tokens"],
                                "documents": len(doc_lengths), "sha256": stats["sha256"]})
            splits[split] = {"shards": entries, "rows": sum(e["rows"] for e in entries)}
        (folder / MANIFEST_NAME).write_text(json.dumps({"schema_version": SCHEMA_VERSION, "vocab_md5": VOCAB_MD5,
                                                        "config": config, "splits": splits}))
        return folder

    return make
