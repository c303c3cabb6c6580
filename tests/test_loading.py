"""The one loader (`lfzh_ds.loading.load_model`, and the models' `from_pretrained` under it) on every folder a user
has: a run folder of launch/pretrain.py, one of its step_N folders, a saved model; and the tokenizer saved beside a
model knows the model's length (stock transformers' fill-mask pipeline truncates to it)."""
import json

import pytest
import torch
from test_pretrain_phases import in_process, pretrain, setup  # noqa: F401 (fixtures)
from transformers import AutoModelForMaskedLM, LongformerForMaskedLM, pipeline

from launch.export import main as export_main
from lfzh_ds.configuration import LongformerZhConfig
from lfzh_ds.errors import MissingFileError, ModelFolderError
from lfzh_ds.loading import load_model, save_model_folder
from lfzh_ds.modeling import LongformerZhForMaskedLM, LongformerZhForSequenceClassification


@pytest.fixture
def run_of_four_steps(setup, in_process):  # noqa: F811
    tmp_path, short, _ = setup
    run_dir = tmp_path / "run"
    assert pretrain(tmp_path, short, run_dir, "--max-steps", "4") == 0
    return run_dir


def test_a_step_folder_loads_with_stock_auto_classes_and_equals_the_run_folders_latest(run_of_four_steps):
    step_4, step_2 = run_of_four_steps / "checkpoints" / "step_4", run_of_four_steps / "checkpoints" / "step_2"
    from_auto = AutoModelForMaskedLM.from_pretrained(step_4)
    latest = load_model(run_of_four_steps)
    assert isinstance(from_auto, LongformerZhForMaskedLM)
    for name, tensor in latest.state_dict().items():
        assert torch.equal(tensor, from_auto.state_dict()[name]), name
    earlier = load_model(step_2).state_dict()
    assert any(not torch.equal(tensor, earlier[name]) for name, tensor in latest.state_dict().items())


def test_a_classifier_starts_from_a_run_folder_with_a_new_head_only(run_of_four_steps):
    model, info = load_model(run_of_four_steps, label_names=["负面", "正面"], output_loading_info=True)
    assert isinstance(model, LongformerZhForSequenceClassification)
    assert model.config.id2label == {0: "负面", 1: "正面"}
    assert info["missing_keys"] and all(k.startswith(("classifier.", "bert.pooler.")) for k in info["missing_keys"])
    encoder = load_model(run_of_four_steps).bert.encoder.state_dict()
    for name, tensor in model.bert.encoder.state_dict().items():
        assert torch.equal(tensor, encoder[name]), name


def test_paths_that_hold_no_model_are_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; give a model folder.*checkpoints/step_N"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty has no config.json"):
        load_model(tmp_path / "empty")
    (tmp_path / "short").mkdir()
    (tmp_path / "short" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="a short BERT, convert it first"):
        load_model(tmp_path / "short")


def test_a_model_folder_without_weights_or_with_a_broken_config_is_the_users_to_fix(tmp_path):
    """Each is a UserError (the command lines' one line and status 2), not transformers' OSError or a JSON traceback."""
    LongformerZhConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(
        tmp_path / "no_weights")
    with pytest.raises(MissingFileError, match=r"no_weights: Error no file named model\.safetensors.*give a model folder"):
        load_model(tmp_path / "no_weights")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text('{"model_type": "longformer_zh",')
    with pytest.raises(ModelFolderError, match=r"broken/config\.json is not valid JSON"):
        load_model(tmp_path / "broken")


def test_saved_and_exported_tokenizers_carry_the_models_length_and_stock_fill_mask_truncates(tmp_path):
    config = LongformerZhConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                max_position_embeddings=64, attention_window=16)
    save_model_folder(LongformerZhForMaskedLM(config).eval(), tmp_path / "ours")
    export_main(["--from", str(tmp_path / "ours"), "--to", str(tmp_path / "stock")])
    for folder in ("ours", "stock"):
        assert json.loads((tmp_path / folder / "tokenizer_config.json").read_text())["model_max_length"] == 64
    fill = pipeline("fill-mask", model=str(tmp_path / "stock"), top_k=3)
    assert isinstance(fill.model, LongformerForMaskedLM)
    long_text = "今天天气很[MASK]。" + "我们去公园散步，看到很多花。" * 20  # about 290 tokens, the model has 64 positions
    answers = fill(long_text, tokenizer_kwargs={"truncation": True})
    assert len(answers) == 3 and all(a["token_str"] for a in answers)
