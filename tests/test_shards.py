"""The training-side reader (lfzh_ds.shards.ShardDataset) over shards written by the real pipeline."""
import json
import pickle
import shutil

import numpy as np
import pytest
import torch

from data_service.config import PipelineConfig
from data_service.corpora import write_inews_corpus
from data_service.pipeline import run
from lfzh_ds.constants import IGNORE_INDEX, MASK_ID, PAD_ID, SPECIAL_IDS
from lfzh_ds.shards import ShardDataset, ShardError

pytestmark = pytest.mark.timeout(300)
SEQ_LEN = 96


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """120 real news documents; the pipeline starts (and stops) its own local Ray."""
    folder = tmp_path_factory.mktemp("shards")
    corpus = write_inews_corpus(folder / "corpus", split="train")[0]
    small = folder / "small.jsonl"
    small.write_text("\n".join(corpus.read_text(encoding="utf-8").splitlines()[:120]) + "\n", encoding="utf-8")
    out = folder / "data"
    run(PipelineConfig(inputs=(str(small),), output=str(out), seq_len=SEQ_LEN, rows_per_shard=32, dupe_factor=3,
                       mask_prob=0.15, max_predictions=12, val_fraction=0.1, num_workers=1, progress=False))
    return out


def copy_of(dataset, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(dataset, target)
    return target


def test_static_samples_are_the_stored_copies_with_labels_at_masked_positions(dataset):
    ds = ShardDataset(dataset, "train", masking="static")
    assert ds.seq_len == SEQ_LEN and ds.dupe_factor == 3 and len(ds) == 3 * ds.num_rows
    assert ds.manifest["config"]["seq_len"] == SEQ_LEN
    for index in (0, 1, ds.num_rows - 1, ds.num_rows, 2 * ds.num_rows + 5):
        sample = ds[index]
        assert set(sample) == {"input_ids", "attention_mask", "labels"}
        for value in sample.values():
            assert value.dtype == torch.int64 and value.shape == (SEQ_LEN,)
        original, _, n = ds.sequence(index % ds.num_rows)
        original = torch.from_numpy(original.astype(np.int64))
        predicted = sample["labels"] != IGNORE_INDEX
        assert torch.equal(sample["labels"][predicted], original[predicted])
        assert torch.equal(sample["input_ids"][~predicted], original[~predicted])
        assert sample["attention_mask"][:n].eq(1).all() and sample["attention_mask"][n:].eq(0).all()
        assert not np.isin(original[predicted].numpy(), SPECIAL_IDS).any()
        maskable = int((~torch.from_numpy(np.isin(original.numpy(), SPECIAL_IDS))).sum())
        assert predicted.sum() == min(12, int(np.floor(0.15 * maskable + 0.5)))
        assert (sample["input_ids"][predicted] == MASK_ID).sum() == int(np.floor(0.8 * predicted.sum().item() + 0.5))
    copies = [ds[k * ds.num_rows]["labels"] for k in range(3)]
    assert not torch.equal(copies[0], copies[1]) and not torch.equal(copies[1], copies[2])


def test_dynamic_masks_depend_on_seed_epoch_and_index_only(dataset):
    a = ShardDataset(dataset, "train", masking="dynamic", seed=7)
    b = ShardDataset(dataset, "train", masking="dynamic", seed=7, verify=False)
    c = ShardDataset(dataset, "train", masking="dynamic", seed=8, verify=False)
    assert len(a) == a.num_rows
    same = [torch.equal(a[i]["labels"], b[i]["labels"]) for i in range(10)]
    assert all(same)
    assert not all(torch.equal(a[i]["labels"], c[i]["labels"]) for i in range(10))
    first = [a[i]["labels"].clone() for i in range(10)]
    a.set_epoch(1)
    assert not all(torch.equal(a[i]["labels"], first[i]) for i in range(10))
    a.set_epoch(0)
    assert all(torch.equal(a[i]["labels"], first[i]) for i in range(10))
    # the same whole-word rule as the static copies: exact counts, labels are the original ids
    original, _, _ = a.sequence(3)
    sample = a[3]
    predicted = sample["labels"] != IGNORE_INDEX
    assert torch.equal(sample["labels"][predicted], torch.from_numpy(original.astype(np.int64))[predicted])


def test_reader_is_memory_mapped_and_pickles_without_data(dataset):
    ds = ShardDataset(dataset, "validation")
    ds[0]
    ids, _, _ = ds.sequence(0)
    assert ids.dtype == np.uint16 and not ids.flags.owndata  # a view into the mapped file
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._open == {} and torch.equal(clone[0]["input_ids"], ds[0]["input_ids"])
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=0)
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (min(4, len(ds)), SEQ_LEN)


def test_a_corrupt_shard_is_a_clear_error_naming_the_file(dataset, tmp_path):
    data = copy_of(dataset, tmp_path)
    shard = sorted(data.glob("train-*.arrow"))[1]
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 3] ^= 0x01
    shard.write_bytes(bytes(raw))
    with pytest.raises(ShardError, match=f"shard {shard} is corrupt: sha256"):
        ShardDataset(data, "train")
    ShardDataset(data, "validation")  # the other split is fine


def test_a_truncated_shard_read_without_verification_still_names_the_file(dataset, tmp_path):
    data = copy_of(dataset, tmp_path)
    shard = sorted(data.glob("train-*.arrow"))[0]
    shard.write_bytes(shard.read_bytes()[:500])
    ds = ShardDataset(data, "train", verify=False)
    with pytest.raises(ShardError, match=f"shard {shard} cannot be read as an Arrow IPC file"):
        ds[0]


def test_missing_shard_or_manifest_and_other_schema_versions_are_refused(dataset, tmp_path):
    data = copy_of(dataset, tmp_path)
    shard = sorted(data.glob("validation-*.arrow"))[0]
    shard.unlink()
    with pytest.raises(ShardError, match=f"shard {shard} listed in .* is missing"):
        ShardDataset(data, "validation")
    manifest = json.loads((data / "manifest.json").read_text(encoding="utf-8"))
    manifest["schema_version"] = 99
    (data / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(ShardError, match="schema version 99"):
        ShardDataset(data, "train")
    manifest["schema_version"], manifest["vocab_md5"] = 1, "0" * 32
    (data / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(ShardError, match="vocab of md5 0000"):
        ShardDataset(data, "train")
    (data / "manifest.json").unlink()
    with pytest.raises(ShardError, match="no manifest.json in"):
        ShardDataset(data, "train")


def test_the_last_row_of_each_shard_is_padded_and_the_others_are_full(dataset):
    ds = ShardDataset(dataset, "train")
    ends = np.cumsum([s["rows"] for s in ds.shards])
    for row in range(ds.num_rows):
        ids, _, n = ds.sequence(row)
        if row + 1 in ends:
            assert n <= SEQ_LEN and np.all(ids[n:] == PAD_ID)
        else:
            assert n == SEQ_LEN


# ---------------------------------------------------------------------------------------------- shards built without Ray
def manifest_of(folder):
    return json.loads((folder / "manifest.json").read_text(encoding="utf-8"))


def test_a_shard_whose_row_count_disagrees_with_the_manifest_is_refused(shard_folder):
    """A manifest from another run (or edited by hand) that lists the right file with the wrong row count must not
    read past a shard's end or skip its last rows."""
    folder = shard_folder({"train": [[60, 70, 50]]})
    manifest = manifest_of(folder)
    entry = manifest["splits"]["train"]["shards"][0]
    assert entry["rows"] == 3  # 182 tokens, 62 per row
    for claimed in (2, 4):
        entry["rows"] = claimed
        (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
        ds = ShardDataset(folder, "train")  # the file itself is intact: its sha256 matches
        with pytest.raises(ShardError, match=f"{folder / entry['file']} has schema version 1, 3 rows"):
            ds[0]


def test_dynamic_masking_follows_the_manifests_whole_word_max_length(shard_folder):
    """--wwm-max-word-len is part of the masking config: dynamic masks re-drawn by the reader must honour it
    (words longer than it are masked token by token) and keep longer words whole without it."""

    def split_words(folder):
        ds = ShardDataset(folder, "train", masking="dynamic", seed=3)
        split = 0
        for epoch in range(3):
            ds.set_epoch(epoch)
            for i in range(len(ds)):
                ids, ws, _ = ds.sequence(i)
                predicted = (ds[i]["labels"] != IGNORE_INDEX).numpy()
                maskable = ~np.isin(ids, SPECIAL_IDS)
                word = np.cumsum((ws != 0) | ~np.concatenate(([False], maskable[:-1])))
                for w in np.unique(word[maskable]):
                    members = predicted[(word == w) & maskable]
                    split += bool(members.any() and not members.all())
        return split

    words_of_six = dict(word_len=6, max_predictions=20)
    assert split_words(shard_folder({"train": [[120, 90, 60]]}, name="whole", **words_of_six)) == 0
    assert split_words(shard_folder({"train": [[120, 90, 60]]}, name="max3", wwm_max_word_len=3, **words_of_six)) > 0


def test_a_shard_with_fewer_static_copies_than_the_manifest_says_is_an_error(shard_folder):
    folder = shard_folder({"train": [[100, 100]]}, dupe_factor=1)
    manifest = manifest_of(folder)
    manifest["config"]["dupe_factor"] = 2
    (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    ds = ShardDataset(folder, "train", masking="static")
    assert len(ds) == 2 * ds.num_rows
    ds[ds.num_rows - 1]
    with pytest.raises(IndexError, match="row 0 has no static mask copy 1"):
        ds[ds.num_rows]  # copy 1 of row 0 is not stored: not row 1's copy 0
