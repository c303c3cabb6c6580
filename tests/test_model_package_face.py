"""The package's face: the model classes import from ``lfzh_ds`` itself, lazily (light modules never import
torch), and ``import lfzh_ds`` is all transformers' Auto classes need to load a model the toolkit saved.

Each check runs in a fresh interpreter (what a module imports, and what transformers has registered, is
per process), on this checkout's code.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lfzh_ds.configuration import LongformerZhConfig
from lfzh_ds.modeling import LongformerZhForMaskedLM, LongformerZhForSequenceClassification

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=64, attention_window=8, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)

pytestmark = pytest.mark.usefixtures("frugal_torch")


def run_fresh(script: str) -> dict:
    """Runs ``script`` in a new interpreter on this checkout; it prints one JSON object as its last line."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=REPO, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_import_lfzh_ds_is_enough_for_the_auto_classes_to_load_a_saved_model(tmp_path):
    torch.manual_seed(0)
    mlm = LongformerZhForMaskedLM(LongformerZhConfig(**SMALL)).eval()
    classifier = LongformerZhForSequenceClassification(LongformerZhConfig(num_labels=3, **SMALL)).eval()
    mlm.save_pretrained(tmp_path / "mlm")
    classifier.save_pretrained(tmp_path / "classifier")
    input_ids = torch.randint(5, 300, (1, 21))
    torch.save(input_ids, tmp_path / "input_ids.pt")
    script = f"""
import json, torch
import lfzh_ds
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification
input_ids = torch.load({str(tmp_path / "input_ids.pt")!r})
mlm = AutoModelForMaskedLM.from_pretrained({str(tmp_path / "mlm")!r}).eval()
classifier = AutoModelForSequenceClassification.from_pretrained({str(tmp_path / "classifier")!r}).eval()
with torch.no_grad():
    print(json.dumps(dict(
        config=type(AutoConfig.from_pretrained({str(tmp_path / "mlm")!r})).__name__,
        base=type(AutoModel.from_pretrained({str(tmp_path / "mlm")!r})).__name__,
        mlm=type(mlm).__name__, classifier=type(classifier).__name__,
        mlm_logits=mlm(input_ids).logits.tolist(), classifier_logits=classifier(input_ids).logits.tolist(),
    )))
"""
    loaded = run_fresh(script)
    assert (loaded["config"], loaded["base"], loaded["mlm"], loaded["classifier"]) == (
        "LongformerZhConfig", "LongformerZhModel", "LongformerZhForMaskedLM", "LongformerZhForSequenceClassification")
    with torch.no_grad():
        assert torch.allclose(torch.tensor(loaded["mlm_logits"]), mlm(input_ids).logits, atol=1e-5)
        assert torch.allclose(torch.tensor(loaded["classifier_logits"]), classifier(input_ids).logits, atol=1e-5)


def test_the_auto_classes_learn_the_model_when_transformers_was_imported_first(tmp_path):
    LongformerZhForMaskedLM(LongformerZhConfig(**SMALL)).save_pretrained(tmp_path)
    script = f"""
import json
from transformers import AutoModelForMaskedLM
import lfzh_ds
print(json.dumps(type(AutoModelForMaskedLM.from_pretrained({str(tmp_path)!r})).__name__))
"""
    assert run_fresh(script) == "LongformerZhForMaskedLM"


def test_light_modules_and_the_package_itself_do_not_import_torch_or_the_model():
    script = """
import json, sys
import lfzh_ds, lfzh_ds.masking, lfzh_ds.shards
before = dict(torch="torch" in sys.modules, transformers="transformers" in sys.modules)
from lfzh_ds.tokenization import load_tokenizer
load_tokenizer()
print(json.dumps(dict(before=before, torch_after_tokenizer="torch" in sys.modules,
                      model_after_tokenizer="lfzh_ds.modeling" in sys.modules)))
"""
    assert run_fresh(script) == dict(before=dict(torch=False, transformers=False), torch_after_tokenizer=False,
                                     model_after_tokenizer=False)


def test_the_model_classes_import_from_the_package_itself():
    import lfzh_ds
    from lfzh_ds import (
        LongformerZhConfig as Config,
    )
    from lfzh_ds import (
        LongformerZhForMaskedLM as MaskedLM,
    )
    from lfzh_ds import (
        LongformerZhForSequenceClassification as Classifier,
    )
    from lfzh_ds import (
        LongformerZhModel as Model,
    )
    from lfzh_ds.modeling import LongformerZhModel

    assert (Config, MaskedLM, Classifier, Model) == (
        LongformerZhConfig, LongformerZhForMaskedLM, LongformerZhForSequenceClassification, LongformerZhModel)
    with pytest.raises(AttributeError, match="module 'lfzh_ds' has no attribute 'LongformerZhForMaksedLM'"):
        lfzh_ds.LongformerZhForMaksedLM  # noqa: B018 - the upstream's misspelling stays in lfzh_ds.modeling only
