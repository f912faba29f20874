"""Pre-training (harness/pretrain.py, harness/checkpoints.py): checkpoints of the whole backbone, and loading them for
fine-tuning with a load report that names every key left out (missing / unexpected / skipped)."""
from __future__ import annotations

import json

import pytest
import torch

from harness.backbones import build_backbone
from harness.backbones.late_fusion import LateFusionBackbone, LateFusionConfig
from harness.backbones.mmt import ALL_EXPERTS, PRETRAIN_EXPERTS
from harness.data import generate, load_dataset
from harness.errors import InputError
from harness.checkpoints import FORMAT, adopt_vocab, checkpoint_sha256, load_pretrained, read_checkpoint
from harness.pretrain import dataset_vocab, plan_pretrain, pretrain
from harness.settings import checkpoint_path, pretrained_for
from harness.text import Tokenized, WordVocab
from helpers import ROOT

LATE = {"width": 16, "depth": 1, "heads": 2}
MMT = {"preset": "tiny", "width": 16, "depth": 1, "heads": 2}
TRAIN = {"epochs": 2, "batch_size": 8, "lr": 1e-3, "step_size": 5}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    generate("mosei", root / "mosei", seed=0, n_train=24, n_valid=8, n_test=8, seq_len=4)
    # the pre-training source sees fewer words than MSR-VTT: the shared vocabulary is the union
    generate("howto100m", root / "howto100m", seed=0, n_train=8, n_valid=4, seq_len=4,
             vocab_size=40)
    generate("msrvtt", root / "msrvtt", seed=0, n_train=6, n_valid=3, n_test=3, seq_len=4)
    return root


@pytest.fixture(scope="module")
def late_checkpoint(data_dir):
    path = data_dir / "checkpoints" / "late_fusion-mosei.pt"
    meta = pretrain("mosei", path, LATE, TRAIN, seed=0, data={"path": str(data_dir / "mosei")},
                    progress=False)
    return path, meta


@pytest.fixture(scope="module")
def mmt_checkpoint(data_dir):
    path = data_dir / "checkpoints" / "mmt-howto100m.pt"
    extra = dataset_vocab("msrvtt", {"path": str(data_dir / "msrvtt")})
    meta = pretrain("howto100m", path, MMT, TRAIN, seed=0,
                    data={"path": str(data_dir / "howto100m"), "max_tokens": 4},
                    extra_vocab=extra, progress=False)
    return path, meta


def late_fusion(dims: dict[str, int], output_dim: int = 1, **overrides) -> LateFusionBackbone:
    torch.manual_seed(123)
    return LateFusionBackbone(LateFusionConfig(
        input_dims=dims, seq_lens={m: 4 for m in dims}, output_dim=output_dim, **{**LATE, **overrides}))


MOSI_DIMS = {"text": 10, "audio": 3, "vision": 5}  # differ from the generated MOSEI's 32 / 8 / 12


# ---------------------------------------------------------------------------------------------
# pre-training and the checkpoint
# ---------------------------------------------------------------------------------------------

def test_same_inputs_give_the_same_checkpoint_bytes(late_checkpoint, data_dir, tmp_path):
    """DVC and the fine-tuning run keys hash the file: a second pre-training with the same data,
    settings and seed (another time, another commit) must write the very same bytes."""
    path, meta = late_checkpoint
    again = pretrain("mosei", tmp_path / "again.pt", LATE, TRAIN, seed=0,
                     data={"path": str(data_dir / "mosei")}, progress=False)
    assert again["wall_s"] > 0 and "git_commit" in again  # in the report, not the file
    assert (tmp_path / "again.pt").read_bytes() == path.read_bytes()


def test_provenance_lives_beside_the_checkpoint(late_checkpoint, data_dir, tmp_path, monkeypatch):
    """Versions, device, host, code hash and times do not change the numbers: they are written to
    <checkpoint>.provenance.json, so another environment (a venv without the ray extra, another
    host) writes the same checkpoint bytes."""
    from harness import records

    path, meta = late_checkpoint
    provenance = json.loads((path.parent / (path.name + ".provenance.json")).read_text())
    assert provenance["sha256"] == checkpoint_sha256(path) and provenance["versions"]["torch"]
    assert {"device", "code_hash", "host", "git_commit", "wall_s", "packages"} <= set(provenance)
    monkeypatch.setattr(records, "versions", lambda: {"torch": "0.0", "ray": None})
    monkeypatch.setattr(records, "code_hash", lambda: "0" * 64)
    monkeypatch.setattr(records, "host", lambda: {"platform": "elsewhere"})
    other = pretrain("mosei", tmp_path / "other-env.pt", LATE, TRAIN, seed=0,
                     data={"path": str(data_dir / "mosei")}, progress=False)
    assert (tmp_path / "other-env.pt").read_bytes() == path.read_bytes()
    assert other["versions"] == {"torch": "0.0", "ray": None}
    assert read_checkpoint(tmp_path / "other-env.pt")["provenance"]["host"] == {"platform": "elsewhere"}
    dvcignore = (ROOT / ".dvcignore").read_text().splitlines()
    assert "*.provenance.json" in dvcignore  # DVC's hash of the checkpoint folder leaves it out


def test_checkpoint_holds_state_and_metadata(late_checkpoint, data_dir):
    path, meta = late_checkpoint
    document = read_checkpoint(path)
    assert document["format"] == FORMAT and document["backbone"] == "late_fusion"
    assert document["source"] == "mosei" and document["seed"] == 0
    assert document["config"]["input_dims"] == {"text": 32, "audio": 8, "vision": 12}
    assert document["data"]["hash"] and len(document["data"]["hash"]) == 64
    assert len(document["metrics"]["history"]) == TRAIN["epochs"]
    assert "mae" in document["metrics"]["valid"] and document["provenance"]["code_hash"]
    for field in ("git_commit", "wall_s", "code_hash", "versions", "device"):  # beside, not inside
        assert field not in torch.load(path, weights_only=True)
    assert meta["path"] == str(path) and "state_dict" not in meta
    # the whole backbone is in it
    model = LateFusionBackbone(LateFusionConfig(**{k: document["config"][k] for k in
                                                   ("input_dims", "seq_lens", "width", "depth",
                                                    "heads", "output_dim")}))
    assert sorted(document["state_dict"]) == sorted(model.state_dict())
    # written atomically: nothing but the checkpoints in the folder
    assert all(not p.name.startswith(".") for p in path.parent.iterdir())


def test_checkpoint_valid_metrics_are_the_selected_epochs_and_its_weights(late_checkpoint, data_dir):
    """metrics.valid is the selected epoch's validation (taken from training, not measured
    again), and the checkpoint's weights measure the very same metrics on the valid split."""
    from harness.pretrain import single_threaded
    from harness.tasks.tasks import TASKS
    from harness.train import TrainSettings, evaluate, run_loaders

    path, _ = late_checkpoint
    document = read_checkpoint(path)
    metrics = document["metrics"]
    assert metrics["valid"]["mae"] == metrics["history"][metrics["selected_epoch"]]["valid_mae"]
    model = LateFusionBackbone(LateFusionConfig(**document["config"]))
    model.load_state_dict(document["state_dict"])
    settings = TrainSettings(**TRAIN)
    valid = load_dataset("mosei", str(data_dir / "mosei")).split("valid")
    loader = run_loaders({"valid": valid}, settings, seed=0)["valid"]
    with single_threaded(torch.device("cpu")):  # as pre-training measured them
        measured = evaluate(model, TASKS["regression"], loader, settings)
    assert json.dumps(measured, sort_keys=True) == json.dumps(metrics["valid"], sort_keys=True)


def test_pretraining_trains_every_parameter(late_checkpoint, data_dir):
    path, _ = late_checkpoint
    document = read_checkpoint(path)
    torch.manual_seed(0)  # pretrain seeds everything with 0 before building: the initial weights
    initial = LateFusionBackbone(LateFusionConfig(
        input_dims=document["config"]["input_dims"], seq_lens=document["config"]["seq_lens"],
        **LATE)).state_dict()
    unchanged = [k for k, v in document["state_dict"].items() if torch.equal(v, initial[k])]
    assert unchanged == []


def test_pretraining_is_deterministic(late_checkpoint, data_dir, tmp_path):
    path, meta = late_checkpoint
    again = pretrain("mosei", tmp_path / "again.pt", LATE, TRAIN, seed=0,
                     data={"path": str(data_dir / "mosei")}, progress=False)
    first, second = read_checkpoint(path)["state_dict"], read_checkpoint(tmp_path / "again.pt")["state_dict"]
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert again["metrics"]["history"] == meta["metrics"]["history"]
    other = pretrain("mosei", tmp_path / "other.pt", LATE, TRAIN, seed=1,
                     data={"path": str(data_dir / "mosei")}, progress=False)
    assert other["metrics"]["history"] != meta["metrics"]["history"]


def test_unknown_source_and_bad_settings(tmp_path):
    with pytest.raises(InputError, match="food101"):
        pretrain("food101", tmp_path / "x.pt", LATE, TRAIN)
    with pytest.raises(InputError, match="epochs"):
        pretrain("mosei", tmp_path / "x.pt", LATE, {**TRAIN, "epochs": 0})
    with pytest.raises(InputError, match="epoch_count"):
        pretrain("mosei", tmp_path / "x.pt", LATE, {"epoch_count": 3})
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# late fusion: MOSEI -> MOSI / IEMOCAP
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("output_dim", [1, 8])  # MOSI regression, IEMOCAP 4 x binary
def test_late_fusion_load_skips_projections_and_output_layer(late_checkpoint, output_dim):
    path, _ = late_checkpoint
    state = read_checkpoint(path)["state_dict"]
    model = late_fusion(MOSI_DIMS, output_dim)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_pretrained(model, path)
    expected_skipped = sorted([f"projections.{m}.{p}" for m in MOSI_DIMS for p in ("weight", "bias")]
                              + ["head.out.bias", "head.out.weight"])
    assert report["skipped"] == expected_skipped and report["n_skipped"] == 3 * 2 + 2  # Conv1d w, b
    assert report["missing"] == [] and report["unexpected"] == []
    assert report["n_missing"] == report["n_unexpected"] == 0
    assert report["backbone"] == "late_fusion" and report["source"] == "mosei"
    after = model.state_dict()
    loaded = [k for k in after if k not in expected_skipped]
    assert report["n_loaded"] == len(loaded) > 0
    for key in loaded:
        assert torch.equal(after[key], state[key]), key
    for key in expected_skipped:  # left as freshly initialised
        assert torch.equal(after[key], fresh[key]), key


def test_late_fusion_load_with_custom_skip(late_checkpoint):
    path, _ = late_checkpoint
    model = late_fusion({"text": 32, "audio": 8, "vision": 12})  # MOSEI's own dims
    report = load_pretrained(model, path, skip_prefixes=())
    assert report["skipped"] == [] and report["missing"] == [] and report["unexpected"] == []


def test_wrong_shape_names_tensor_and_both_shapes(late_checkpoint, tmp_path):
    path, _ = late_checkpoint
    document = read_checkpoint(path)
    key = "encoders.audio.0.attn.q.weight"
    document["state_dict"][key] = torch.zeros(16, 12)
    bad = tmp_path / "bad.pt"
    torch.save(document, bad)
    with pytest.raises(InputError) as error:
        load_pretrained(late_fusion(MOSI_DIMS), bad)
    message = str(error.value)
    assert key in message and "(16, 16)" in message and "(16, 12)" in message and str(bad) in message


def _edited(path, tmp_path, edit):
    """A copy of the checkpoint at ``path`` with ``edit(document)`` applied (no provenance beside it)."""
    document = read_checkpoint(path)
    edit(document)
    copy = tmp_path / "edited.pt"
    torch.save({k: v for k, v in document.items() if k not in ("path", "provenance")}, copy)
    return copy


@pytest.mark.parametrize("edit, key_part", [
    # every tensor renamed (a DataParallel "module." prefix): nothing would load
    (lambda d: d.update(state_dict={"module." + k: v for k, v in d["state_dict"].items()}), "module."),
    # the text encoder's tensors left out: it would stay at its random start
    (lambda d: d.update(state_dict={k: v for k, v in d["state_dict"].items()
                                    if not k.startswith("encoders.text.")}), "no checkpoint tensor"),
    # a tensor the backbone lacks
    (lambda d: d["state_dict"].update({"encoders.text.extra.weight": torch.zeros(2)}), "encoders.text.extra"),
    # integer weights where the backbone holds floats
    (lambda d: d["state_dict"].update({"encoders.audio.0.attn.q.weight":
                                       d["state_dict"]["encoders.audio.0.attn.q.weight"].long()}), "int64"),
    (lambda d: d.update(format_version=99), "format_version"),
])
def test_a_checkpoint_that_does_not_fill_the_backbone_is_refused(late_checkpoint, tmp_path, edit, key_part):
    """Before, each of these loaded what it could with a warning and the run was recorded as
    pre-trained (a checkpoint whose keys were all renamed left the whole backbone random)."""
    path, _ = late_checkpoint
    bad = _edited(path, tmp_path, edit)
    with pytest.raises(InputError) as error:
        load_pretrained(late_fusion(MOSI_DIMS), bad, skip_prefixes=["projections.", "head.out."])
    assert str(bad) in str(error.value) and key_part in str(error.value)


def test_a_checkpoint_with_non_finite_weights_is_refused(late_checkpoint, tmp_path):
    """Refused when read, naming the tensor (the first run blamed its data for NaN outputs)."""
    path, _ = late_checkpoint
    key = "encoders.text.0.attn.q.weight"
    bad = _edited(path, tmp_path, lambda d: d["state_dict"][key].view(-1)[0].fill_(float("nan")))
    with pytest.raises(InputError, match=key):
        read_checkpoint(bad)


def test_a_skip_prefix_that_matches_nothing_is_refused(late_checkpoint):
    path, _ = late_checkpoint
    with pytest.raises(InputError, match="head.outt."):
        load_pretrained(late_fusion(MOSI_DIMS), path, skip_prefixes=["projections.", "head.outt."])


def test_wrong_width_fails(late_checkpoint):
    path, _ = late_checkpoint
    with pytest.raises(InputError, match=r"shape \(24,.*shape \(16,"):
        load_pretrained(late_fusion(MOSI_DIMS, width=24), path)


def test_heads_mismatch_fails(late_checkpoint):
    path, _ = late_checkpoint
    with pytest.raises(InputError, match="heads"):
        load_pretrained(late_fusion(MOSI_DIMS, heads=4), path)


def test_wrong_backbone_kind_fails(late_checkpoint, mmt_checkpoint):
    late_path, _ = late_checkpoint
    mmt_path, _ = mmt_checkpoint
    vocab = read_checkpoint(mmt_path)["vocab"]
    mmt = build_backbone("mmt", MMT, {"experts": list(PRETRAIN_EXPERTS),
                                      "dims": {"s3d": 16, "vggish": 8}, "max_tokens": 4},
                         0, vocab_size=len(vocab) + 3)
    with pytest.raises(InputError, match=r"late_fusion") as error:
        load_pretrained(mmt, late_path)
    assert "mmt" in str(error.value)
    with pytest.raises(InputError, match=r"expected late_fusion, found mmt"):
        load_pretrained(late_fusion(MOSI_DIMS), mmt_path)


def test_missing_and_corrupt_checkpoint(tmp_path):
    missing = tmp_path / "nowhere" / "ckpt.pt"
    with pytest.raises(InputError, match="not found") as error:
        load_pretrained(late_fusion(MOSI_DIMS), missing)
    assert str(missing) in str(error.value)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="cannot read") as error:
        load_pretrained(late_fusion(MOSI_DIMS), corrupt)
    assert str(corrupt) in str(error.value)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weight": torch.zeros(2)}, foreign)
    with pytest.raises(InputError, match="not an mmpetl"):
        load_pretrained(late_fusion(MOSI_DIMS), foreign)


# ---------------------------------------------------------------------------------------------
# MMT: HowTo100M (2 experts) -> MSR-VTT (7 experts)
# ---------------------------------------------------------------------------------------------

def test_mmt_two_experts_load_into_seven(mmt_checkpoint, data_dir):
    path, meta = mmt_checkpoint
    document = read_checkpoint(path)
    assert document["backbone"] == "mmt" and tuple(document["config"]["experts"]) == PRETRAIN_EXPERTS
    assert document["metrics"]["select_metric"] == "rsum"
    msrvtt = load_dataset("msrvtt", data_dir / "msrvtt", split_scheme="full", max_tokens=4)
    assert msrvtt.info["experts"] == list(ALL_EXPERTS)
    model = build_backbone("mmt", MMT, msrvtt.info, 0, vocab_size=len(WordVocab(document["vocab"])))
    report = load_pretrained(model, path)
    new = [e for e in ALL_EXPERTS if e not in PRETRAIN_EXPERTS]
    expected = sorted(k for e in new for k in model.expert_keys(e))
    assert report["missing"] == expected and report["n_missing"] == len(expected) > 0
    assert all(k.split(".")[0] in ("experts", "head") for k in expected)
    assert report["unexpected"] == [] and report["skipped"] == []
    after = model.state_dict()
    state = document["state_dict"]
    assert report["n_loaded"] == len(state)
    for key, value in state.items():
        assert torch.equal(after[key], value), key


def test_mmt_vocabulary_is_shared_with_msrvtt(mmt_checkpoint, data_dir):
    path, meta = mmt_checkpoint
    msrvtt_words = dataset_vocab("msrvtt", {"path": str(data_dir / "msrvtt")})
    howto_words = dataset_vocab("howto100m", {"path": str(data_dir / "howto100m")})
    assert len(howto_words) < len(msrvtt_words)  # the union matters
    assert set(meta["vocab"]) == set(howto_words) | set(msrvtt_words)
    assert meta["vocab_sources"]["extra_not_in_source"] == len(set(msrvtt_words) - set(howto_words))
    # fine-tuning tokenises with the checkpoint's vocabulary, whatever its own would be
    msrvtt = load_dataset("msrvtt", data_dir / "msrvtt", split_scheme="full", max_tokens=4)
    own = WordVocab(howto_words)  # a vocabulary with other ids
    splits = {n: Tokenized(msrvtt.split(n), own, 8, "caption") for n in ("train", "test")}
    vocab, shared, report = adopt_vocab(path, splits, own)
    assert vocab.index == WordVocab(meta["vocab"]).index
    assert report["size"] == len(vocab)
    item = shared["test"][0]  # test items carry their first caption (train: a random one)
    expected_ids, _ = vocab.encode(msrvtt.split("test")[0]["caption"], 8)
    assert torch.equal(item["text"], expected_ids)
    # no checkpoint vocabulary (late fusion): unchanged
    assert adopt_vocab(read_checkpoint(path) | {"vocab": None}, splits, own)[1] is splits


def test_mmt_wrong_vocab_size_fails(mmt_checkpoint, data_dir):
    path, meta = mmt_checkpoint
    msrvtt = load_dataset("msrvtt", data_dir / "msrvtt", split_scheme="full", max_tokens=4)
    model = build_backbone("mmt", MMT, msrvtt.info, 0, vocab_size=len(meta["vocab"]) + 10)
    with pytest.raises(InputError, match="text.embeddings.word_embeddings.weight"):
        load_pretrained(model, path)


# ---------------------------------------------------------------------------------------------
# params.yaml
# ---------------------------------------------------------------------------------------------

def test_plan_from_params(data_dir, tmp_path):
    params = {
        "_file": "params.yaml", "profile": "tiny",
        "profiles": {"tiny": {"late_fusion": LATE, "mmt": MMT}},
        "data": {"tiny": {"mosei": {"path": str(data_dir / "mosei")},
                          "howto100m": {"path": str(data_dir / "howto100m"), "max_tokens": 4},
                          "msrvtt": {"path": str(data_dir / "msrvtt"), "split_scheme": "full"}}},
        "pretrain": {
            "seed": 3, "use": {"mosi": "mosei", "iemocap": "mosei", "msrvtt": "howto100m"},
            "checkpoints": {"mosei": str(tmp_path / "{profile}" / "late_fusion-mosei.pt"),
                            "howto100m": str(tmp_path / "{profile}" / "mmt-howto100m.pt")},
            "share_vocab": {"howto100m": ["msrvtt"]},
            "train": {"mosei": {"lr": 1e-3, "epochs": 40}, "howto100m": {"epochs": 40}},
            "profiles": {"tiny": {"epochs": 1, "batch_size": 8}},
        },
    }
    plan = plan_pretrain(params, "mosei")
    assert plan["out_path"] == str(tmp_path / "tiny" / "late_fusion-mosei.pt")
    assert plan["train_settings"] == {"lr": 1e-3, "epochs": 1, "batch_size": 8}
    assert plan["seed"] == 3 and plan["profile_settings"] == LATE and plan["extra_vocab"] is None
    video = plan_pretrain(params, "howto100m")
    assert set(video["extra_vocab"]) == set(dataset_vocab("msrvtt", {"path": str(data_dir / "msrvtt")}))
    assert pretrained_for(params, "iemocap") == {"source": "mosei", "path": plan["out_path"]}
    assert pretrained_for(params, "food101") is None
    assert checkpoint_path(params, "howto100m") == video["out_path"]
    meta = pretrain(**plan, progress=False)
    assert read_checkpoint(meta["path"])["seed"] == 3
    params["pretrain"]["profiles"]["tiny"]["epoch"] = 2
    with pytest.raises(InputError, match="epoch"):
        plan_pretrain(params, "mosei")


def test_pretrain_sources_come_from_the_dataset_cards():
    from harness.checkpoints import pretrain_source
    from harness.errors import InputError

    assert pretrain_source("mosei") == ("late_fusion", "regression", 1)
    assert pretrain_source("howto100m") == ("mmt", "retrieval", 0)
    with pytest.raises(InputError, match="no dataset card") as unknown:
        pretrain_source("imagenet", key="pretrain.use.mosi")
    assert "pretrain.use.mosi" in str(unknown.value)
    # a classification source's head has one output per class of its data (known when loaded)
    assert pretrain_source("recipes") == ("two_tower", "classification", None)


def test_two_tower_pretrained_on_recipes_loads_into_food101(tmp_path):
    """pretrain@recipes: the whole two-tower trains on dishes that are not Food-101's; Food-101
    fine-tuning loads every tensor but the class layer (its class count differs) and tokenises
    with the checkpoint's word vocabulary (the source's and Food-101's words)."""
    generate("recipes", tmp_path / "recipes", seed=0, n_train=12, n_valid=6, n_classes=3,
             first_class=5)
    generate("food101", tmp_path / "food101", seed=0, n_train=8, n_valid=4, n_test=4)
    tower = {"preset": "tiny", "image_hidden": 16, "text_hidden": 16, "fusion_width": 16,
             "image_layers": 1, "text_layers": 1, "fusion_layers": 1}
    extra = dataset_vocab("food101", {"path": str(tmp_path / "food101")})
    meta = pretrain("recipes", tmp_path / "two_tower.pt", tower, {**TRAIN, "epochs": 1}, seed=0,
                    data={"path": str(tmp_path / "recipes"), "image_size": 32},
                    extra_vocab=extra, progress=False)
    assert meta["backbone"] == "two_tower" and meta["task"] == "classification"
    assert set(extra) <= set(meta["vocab"])
    food = load_dataset("food101", tmp_path / "food101", image_size=32)
    assert not set(food.info["classes"]) & set(load_dataset("recipes", tmp_path / "recipes").info["classes"])
    backbone = build_backbone("two_tower", tower, food.info, food.info["num_classes"],
                              vocab_size=len(WordVocab(meta["vocab"])))
    report = load_pretrained(backbone, tmp_path / "two_tower.pt")
    assert report["skipped"] == ["head.mlp.3.bias", "head.mlp.3.weight"]
    assert report["n_missing"] == 0 and report["n_unexpected"] == 0
    state = read_checkpoint(tmp_path / "two_tower.pt")["state_dict"]
    own = backbone.state_dict()
    assert all(torch.equal(own[k], v) for k, v in state.items() if not k.startswith("head.mlp.3."))
