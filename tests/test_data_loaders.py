"""Loaders on files in their real formats (hand-written and generated), quirks included,
and generator determinism / planted signal."""
from __future__ import annotations

import csv
import hashlib
import json
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from harness.data import (check_data, describe_datasets, detect_format, generate, list_cards,
                          load_card, load_dataset)
from harness.data.generate import World

# ----------------------------------------------------------------------------- writers

RNG = np.random.default_rng(0)


def mult_split(n, L=(6, 6, 6), dims=(5, 4, 3), labels=None, ids=True):
    t = RNG.standard_normal((n, L[0], dims[0])).astype(np.float32)
    a = RNG.standard_normal((n, L[1], dims[1])).astype(np.float32)
    v = RNG.standard_normal((n, L[2], dims[2])).astype(np.float32)
    d = {"text": t, "audio": a, "vision": v,
         "labels": (labels if labels is not None
                    else RNG.uniform(-3, 3, (n, 1, 1)).astype(np.float32))}
    if ids:
        d["id"] = np.array([[f"v{i}".encode(), b"1", str(i).encode()] for i in range(n)])
    return d


def write_pickle(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f)
    return path


def mmsa_split(n, L=8, La=10, Lv=12, dims=(6, 3, 4), aligned=False):
    tl = RNG.integers(1, L + 1, n)
    al = RNG.integers(1, La + 1, n) if not aligned else np.full(n, L)
    vl = RNG.integers(1, Lv + 1, n) if not aligned else np.full(n, L)
    if aligned:
        La = Lv = L
    tb = np.zeros((n, 3, L), dtype=np.float32)
    for i in range(n):
        tb[i, 0, :tl[i]] = RNG.integers(100, 2000, tl[i])
        tb[i, 1, :tl[i]] = 1
    return {
        "raw_text": [f"sentence {i}" for i in range(n)], "id": [f"vid$_${i}" for i in range(n)],
        "text": RNG.standard_normal((n, L, dims[0])).astype(np.float32), "text_bert": tb,
        "audio": RNG.standard_normal((n, La, dims[1])).astype(np.float32),
        "vision": RNG.standard_normal((n, Lv, dims[2])).astype(np.float32),
        "audio_lengths": list(al), "vision_lengths": list(vl),
        "regression_labels": RNG.uniform(-3, 3, n).astype(np.float32),
        "classification_labels": np.zeros(n), "annotations": ["Neutral"] * n,
    }


def write_video(root: Path, vid: str, experts: dict, captions=(["a", "man", "runs"],)):
    """experts: name -> array (n x d) or None (absent)."""
    p = root / "vid_feat_files" / "mult_h5" / vid[0] / vid[1] / vid[2] / f"{vid}.h5"
    p.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(p, "w") as f:
        for e, a in experts.items():
            if a is None:
                continue
            f[f"features.{e}"] = a
            f[f"features_t.{e}"] = np.stack([np.arange(len(a)), np.arange(len(a)) + 1], 1)
        for i, words in enumerate(captions):
            f[f"raw_captions.{i}"] = np.array([w.encode() for w in words])
            f[f"raw_captions_t.{i}"] = np.zeros((len(words), 2))
    return p


MSRVTT_DIMS = {"s3d": 1024, "vggish": 128, "face": 512, "rgb": 2048, "speech": 300,
               "ocr": 300, "scene": 2208}


def full_experts(n=4, skip=(), nan=()):
    out = {}
    for e, d in MSRVTT_DIMS.items():
        if e in skip:
            out[e] = None
        elif e in nan:
            out[e] = np.full((n, d), np.nan, dtype=np.float32)
        else:
            out[e] = RNG.standard_normal((n, d)).astype(np.float32)
    return out


def no_nan(item):
    for k, v in item.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            assert torch.isfinite(v).all(), k


# ----------------------------------------------------------------------------- cards

def test_cards_load_and_validate():
    names = list_cards()
    assert set(names) >= {"food101", "mosi", "mosei", "iemocap", "msrvtt", "howto100m"}
    for n in names:
        c = load_card(n)
        assert c.name == n and c.modalities and c.formats and c.path and c.get("licence")
    assert load_card("msrvtt").get("experts")["scene"]["dim"] == 2208
    assert load_card("mosi").get("label")["range"] == [-3.0, 3.0]
    rows = describe_datasets()
    assert {r["name"] for r in rows} == set(names)
    assert all("present" in r and "generated_present" in r for r in rows)


# ----------------------------------------------------------------------------- sentiment

def test_mosi_mult_aligned_audio_neg_inf(tmp_path):
    data = {s: mult_split(n) for s, n in (("train", 7), ("valid", 3), ("test", 4))}
    data["train"]["audio"][0, 1, 2] = -np.inf
    data["train"]["audio"][3, 0, 0] = -np.inf
    data["test"]["audio"][1, 5, 3] = -np.inf
    write_pickle(tmp_path / "mosi_data.pkl", data)
    ld = load_dataset("mosi", tmp_path)
    assert ld.format == "mult" and ld.report["aligned"]
    assert ld.report["audio_neg_inf_fixed"] == 3
    assert ld.report["splits"]["train"]["audio_neg_inf_fixed"] == 2
    assert {k: len(v) for k, v in ld.splits.items()} == {"train": 7, "valid": 3, "test": 4}
    it = ld.splits["train"][0]
    assert it["audio"][1, 2].item() == 0.0
    assert it["label"].shape == () and it["label"].dtype == torch.float32
    assert it["mask_audio"].all() and it["id"] == "v0/1/0"
    assert ld.info["dims"] == {"text": 5, "audio": 4, "vision": 3}
    batch = next(iter(DataLoader(ld.splits["train"], batch_size=4)))
    assert batch["text"].shape == (4, 6, 5) and torch.isfinite(batch["audio"]).all()
    rep = check_data("mosi", tmp_path)
    assert rep["audio_neg_inf_fixed"] == 3 and rep["nonfinite"]["total"] == 3
    json.dumps(rep)


def test_mosi_mult_noalign_masks_from_padding(tmp_path):
    data = {s: mult_split(4, L=(5, 9, 7)) for s in ("train", "valid", "test")}
    data["train"]["audio"][0, 6:] = 0.0        # 6 real frames
    data["train"]["vision"][1, :3] = 0.0       # left padding: 4 real frames
    write_pickle(tmp_path / "mosi_data_noalign.pkl", data)
    ld = load_dataset("mosi", tmp_path)
    assert ld.format == "mult_noalign" and not ld.report["aligned"]
    assert int(ld.splits["train"][0]["mask_audio"].sum()) == 6
    m = ld.splits["train"][1]["mask_vision"]
    assert m.tolist() == [False] * 3 + [True] * 4
    assert ld.info["lengths"] == {"text": 5, "audio": 9, "vision": 7}


def test_mmsa_unaligned_lengths_and_text_bert(tmp_path):
    data = {s: mmsa_split(5) for s in ("train", "valid", "test")}
    write_pickle(tmp_path / "MOSI" / "Processed" / "unaligned_50.pkl", data)
    ld = load_dataset("mosi", tmp_path)
    assert ld.format == "mmsa_unaligned"
    tr = data["train"]
    for i in range(5):
        it = ld.splits["train"][i]
        assert int(it["mask_audio"].sum()) == tr["audio_lengths"][i]
        assert int(it["mask_vision"].sum()) == tr["vision_lengths"][i]
        assert int(it["mask_text"].sum()) == int(tr["text_bert"][i, 1].sum())
        assert it["text_bert"].dtype == torch.int64 and it["text_bert"].shape == (3, 8)
        assert it["label"].item() == pytest.approx(float(tr["regression_labels"][i]))
    assert ld.info["has_text_bert"]
    # a file given directly: format read from the content
    ld2 = load_dataset("mosi", tmp_path / "MOSI" / "Processed" / "unaligned_50.pkl")
    assert ld2.format == "mmsa_unaligned"


def test_mmsa_aligned_without_lengths_and_format_choice(tmp_path):
    data = {s: mmsa_split(4, aligned=True) for s in ("train", "valid", "test")}
    for d in data.values():
        del d["audio_lengths"], d["vision_lengths"]
    write_pickle(tmp_path / "aligned_50.pkl", data)
    write_pickle(tmp_path / "mosi_data.pkl",
                 {s: mult_split(3) for s in ("train", "valid", "test")})
    assert detect_format("mosi", tmp_path) == "mult"     # MulT aligned preferred
    ld = load_dataset("mosi", tmp_path, format="mmsa_aligned")
    assert ld.format == "mmsa_aligned" and len(ld.splits["train"]) == 4
    assert ld.splits["test"][0]["mask_audio"].all()


def test_iemocap_mult_labels_4x2(tmp_path):
    def labels(n):
        lab = np.zeros((n, 4, 2), dtype=np.float32)
        lab[:, :, 0] = 1
        for i in range(n):
            lab[i, i % 4] = [0, 1]
        lab[n - 1, 2] = [0, 1]                       # two positives -> label_class -1
        return lab
    data = {s: mult_split(6, labels=labels(6), ids=False) for s in ("train", "valid", "test")}
    write_pickle(tmp_path / "iemocap_data.pkl", data)
    ld = load_dataset("iemocap", tmp_path)
    it = ld.splits["train"][1]
    assert it["label"].tolist() == [0, 1, 0, 0] and it["label_class"].item() == 1
    assert ld.splits["train"][5]["label_class"].item() == -1
    assert ld.info["classes"] == ["neutral", "happy", "sad", "angry"]
    assert ld.report["labels"]["positives"]["neutral"] == 3 * 2


def test_iemocap_mmin_folds_and_padding(tmp_path):
    m = generate("iemocap", tmp_path / "g", format="mmin", n_train=10, n_valid=4, n_test=5,
                 seq_len=6, n_folds=2)
    ld = load_dataset("iemocap", tmp_path / "g")
    assert ld.format == "mmin" and ld.report["folds"] == ["1", "2"]
    it = ld.splits["train"][0]
    L = ld.info["lengths"]
    assert it["audio"].shape == (L["audio"], 8) and it["label"].dtype == torch.int64
    assert 0 < int(it["mask_audio"].sum()) <= L["audio"]
    assert it["label"].shape == ()
    ld2 = load_dataset("iemocap", tmp_path / "g", fold=2)
    assert ld2.report["fold"] == "2" and len(ld2.splits["test"]) == 5
    capped = load_dataset("iemocap", tmp_path / "g", max_len={"audio": 3})
    assert capped.splits["train"][0]["audio"].shape[0] == 3
    rep = check_data("iemocap", tmp_path / "g")
    assert rep["items_read"] == 19 and m["dims"]["audio"] == 8


def test_iemocap_mmin_labels_one_hot_or_class_ids(tmp_path):
    """The card's two forms of {set}_label.npy, N x 4 one-hot and N class ids, read alike."""
    generate("iemocap", tmp_path / "g", format="mmin", n_train=10, n_valid=4, n_test=5, seq_len=4)
    one_hot = load_dataset("iemocap", tmp_path / "g").splits["train"].labels
    p = tmp_path / "g/target/1/trn_label.npy"
    np.save(p, np.load(p).argmax(1))
    assert load_dataset("iemocap", tmp_path / "g").splits["train"].labels.tolist() == one_hot.tolist()


@pytest.mark.parametrize("dataset,fmt,kw", [
    ("iemocap", "mmin", {}), ("msrvtt", None, {"split_scheme": "full"}),
    ("msrvtt", None, {"split_scheme": "jsfusion"}), ("food101", "mmbt", {}),
    ("food101", "raw", {"valid_fraction": 0.2}), ("mosi", "mult", {}),
])
def test_generated_splits_share_no_ids(tmp_path, dataset, fmt, kw):
    """Every pair of splits of the generated data is disjoint: check-data warns of none."""
    generate(dataset, tmp_path / "g", format=fmt, n_train=12, n_valid=4, n_test=4, seq_len=4)
    warnings = check_data(dataset, tmp_path / "g", **kw)["warnings"]
    assert not [w for w in warnings if "sample id(s)" in w], warnings


@pytest.mark.parametrize("fmt", ["mult", "mult_noalign", "mmsa_aligned", "mmsa_unaligned"])
def test_generated_mosi_every_format(tmp_path, fmt):
    m = generate("mosi", tmp_path / fmt, format=fmt, n_train=12, n_valid=4, n_test=4, seq_len=6)
    rep = check_data("mosi", tmp_path / fmt)
    assert rep["format"] == fmt and rep["generated"]
    assert rep["audio_neg_inf_fixed"] == m["quirks"]["audio_neg_inf"]
    if fmt.startswith("mult"):
        assert rep["audio_neg_inf_fixed"] > 0
    ld = load_dataset("mosi", tmp_path / fmt)
    for i in range(len(ld.splits["train"])):
        no_nan(ld.splits["train"][i])
    assert -3 <= rep["labels"]["min"] <= rep["labels"]["max"] <= 3


# ----------------------------------------------------------------------------- food101

def _img(path: Path, colour=(200, 10, 10), fmt="JPEG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (10, 8), colour).save(path, format=fmt)


def test_food101_raw_titles_with_commas_and_quotes(tmp_path, monkeypatch):
    rows = {"train": [("apple_pie_0.jpg", 'Grandma\'s "best" apple pie, with cream', "apple_pie"),
                      ("apple_pie_1.jpg", "plain", "apple_pie"),
                      ("baklava_0.jpg", 'Baklava, "honey", and nuts', "baklava")],
            "test": [("baklava_9.jpg", "baklava recipe", "baklava")]}
    for split, rs in rows.items():
        for fname, _, label in rs:
            _img(tmp_path / "images" / split / label / fname)
        (tmp_path / "texts").mkdir(exist_ok=True)
        with open(tmp_path / "texts" / f"{split}_titles.csv", "w", newline="") as f:
            csv.writer(f).writerows(rs)
    with open(tmp_path / "texts" / "train_titles.csv", "a") as f:   # an unquoted comma row
        f.write("baklava_1.jpg,crispy, flaky baklava,baklava\n")
    _img(tmp_path / "images" / "train" / "baklava" / "baklava_1.jpg", fmt="PNG")
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: (opened.append(a[0]), real_open(*a, **k))[1])
    ld = load_dataset("food101", tmp_path)
    assert opened == []                                   # nothing read at load time
    assert ld.format == "raw" and ld.info["classes"] == ["apple_pie", "baklava"]
    tr = ld.splits["train"]
    assert tr[0]["text"] == 'Grandma\'s "best" apple pie, with cream'
    assert tr[2]["text"] == 'Baklava, "honey", and nuts'
    assert tr[3]["text"] == "crispy, flaky baklava" and tr[3]["label"].item() == 1
    assert ld.report["unquoted_comma_rows"] == 1
    before = len(opened)
    it = tr[1]
    assert len(opened) == before + 1 and it["image"].shape == (3, 8, 10)
    assert it["image"][0].mean() > 0.6 and it["image"][1].mean() < 0.2
    it["image"].zero_()                                   # a copy of the kept pixels
    again = load_dataset("food101", tmp_path).splits["train"][1]
    assert len(opened) == before + 1                      # kept for the process: not read again
    assert again["image"][0].mean() > 0.6
    replaced = tmp_path / "images" / "train" / "apple_pie" / "new.jpg"
    _img(replaced, colour=(10, 10, 200))
    replaced.replace(tmp_path / "images" / "train" / "apple_pie" / "apple_pie_1.jpg")
    assert tr[1]["image"][2].mean() > 0.6 and len(opened) == before + 2   # a new file: read
    ld2 = load_dataset("food101", tmp_path, image_size=16)
    assert ld2.splits["test"][0]["image"].shape == (3, 16, 16)
    rep = check_data("food101", tmp_path)
    assert rep["images_read"] == 5 and rep["labels"]["num_classes"] == 2


@pytest.mark.parametrize("fmt", ["raw", "mmbt", "cggm"])
def test_food101_generated_formats(tmp_path, fmt):
    m = generate("food101", tmp_path / fmt, format=fmt, n_train=15, n_valid=5, n_test=6,
                 quirk_fraction=0.5)
    ld = load_dataset("food101", tmp_path / fmt)
    assert ld.format == fmt
    expect = {"train": 15, "valid": 5, "test": 6} if fmt == "mmbt" else {"train": 20, "test": 6}
    assert {k: len(v) for k, v in ld.splits.items()} == expect
    b = next(iter(DataLoader(ld.splits["train"], batch_size=5)))
    assert b["image"].shape == (5, 3, 16, 16) and len(b["text"]) == 5
    assert set(ld.info["classes"]) <= set(m["classes"])
    if fmt != "cggm":
        assert any('"' in ld.splits["train"][i]["text"] for i in range(20 if fmt == "raw" else 15))
    if fmt == "raw":
        v = load_dataset("food101", tmp_path / fmt, valid_fraction=0.25)
        assert len(v.splits["valid"]) > 0 and len(v.splits["train"]) + len(v.splits["valid"]) == 20
    check_data("food101", tmp_path / fmt)


def test_recipes_generated_without_test_split_and_first_class_checked(tmp_path):
    """The two-tower pre-training source: MMBT train / dev files only (no test split, no test
    file), dishes from FOOD_CLASSES[first_class:]; a first_class that leaves too few dishes is
    refused before anything is written."""
    from harness.data.generate import FOOD_CLASSES
    from harness.errors import InputError

    m = generate("recipes", tmp_path / "recipes", n_train=12, n_valid=4, n_classes=3, first_class=5)
    assert sorted(p.name for p in (tmp_path / "recipes").glob("*.jsonl")) == ["dev.jsonl", "train.jsonl"]
    assert m["classes"] == FOOD_CLASSES[5:8]
    ld = load_dataset("recipes", tmp_path / "recipes")
    assert {k: len(v) for k, v in ld.splits.items()} == {"train": 12, "valid": 4}
    with pytest.raises(InputError, match="first_class") as error:
        generate("recipes", tmp_path / "bad", n_classes=3, first_class=len(FOOD_CLASSES) - 2)
    assert f"[0, {len(FOOD_CLASSES) - 3}]" in str(error.value)
    assert not (tmp_path / "bad").exists()


# ----------------------------------------------------------------------------- msrvtt

def _msrvtt_tree(root: Path):
    write_video(root, "video0", full_experts(3))
    write_video(root, "video1", full_experts(4, skip=("face", "speech")),
                captions=(["a", "dog"], ["the", "dog", "barks"]))
    write_video(root, "video2", full_experts(40, nan=("ocr", "vggish")))
    write_video(root, "video3", full_experts(2, skip=("scene",)))
    (root / "train_list_jsfusion.txt").write_text("video0\nvideo1\n\n")
    (root / "val_list_jsfusion.txt").write_text("video2\nvideo3\n")


def test_msrvtt_missing_and_nan_experts(tmp_path):
    _msrvtt_tree(tmp_path)
    ld = load_dataset("msrvtt", tmp_path)
    assert ld.format == "mmt" and ld.info["split_scheme"] == "jsfusion"
    assert set(ld.splits) == {"train", "test"}
    it1 = ld.splits["train"][1]
    assert not it1["present_face"] and not it1["mask_face"].any()
    assert it1["face"].abs().sum() == 0 and it1["present_s3d"]
    assert int(it1["mask_s3d"].sum()) == 4 and it1["s3d"].shape == (30, 1024)
    it2 = ld.splits["test"][0]
    no_nan(it2)
    assert not it2["present_ocr"] and not it2["present_vggish"]
    assert int(it2["mask_rgb"].sum()) == 30                # 40 tokens subsampled to 30
    assert it2["time_rgb"][-1, 0].item() == 39.0
    assert it2["caption"] == "a man runs" and it2["id"] == "video2"
    a0 = h5py.File(tmp_path / "vid_feat_files/mult_h5/v/i/d/video0.h5")["features.rgb"][()]
    it0 = ld.splits["train"][0]
    assert np.allclose(it0["rgb_max"].numpy(), a0.max(0))
    assert np.allclose(it0["rgb_avg"].numpy(), a0.mean(0), atol=1e-6)
    b = next(iter(DataLoader(ld.splits["test"], batch_size=2)))
    assert b["scene"].shape == (2, 30, 2208) and b["present_scene"].tolist() == [True, False]
    rep = check_data("msrvtt", tmp_path)
    assert rep["missing_experts_per_video"] == {"video1": ["face", "speech"],
                                                "video2": ["vggish", "ocr"],
                                                "video3": ["scene"]}
    assert rep["experts"]["ocr"]["nan_filled"] == 1 and rep["experts"]["face"]["absent"] == 1
    allc = load_dataset("msrvtt", tmp_path, captions="all")
    assert len(allc.splits["train"]) == 3
    assert allc.splits["train"][2]["caption"] == "the dog barks"


def test_msrvtt_split_list_with_bom(tmp_path):
    """A UTF-8 byte order mark is not part of the first video id."""
    _msrvtt_tree(tmp_path)
    lst = tmp_path / "train_list_jsfusion.txt"
    lst.write_bytes(b"\xef\xbb\xbf" + lst.read_bytes())
    assert load_dataset("msrvtt", tmp_path).splits["train"].ids == ["video0", "video1"]


def test_msrvtt_generated_split_schemes(tmp_path):
    m = generate("msrvtt", tmp_path / "g", n_train=8, n_valid=2, n_test=3, seq_len=5,
                 n_captions=2, missing_rate=0.3, nan_rate=0.3)
    sizes = {}
    for scheme in ("jsfusion", "miech", "full"):
        ld = load_dataset("msrvtt", tmp_path / "g", split_scheme=scheme)
        sizes[scheme] = {k: len(v) for k, v in ld.splits.items()}
    assert sizes["jsfusion"] == {"train": 10, "test": 3} == sizes["miech"]
    assert sizes["full"] == {"train": 8, "valid": 2, "test": 3}
    ld = load_dataset("msrvtt", tmp_path / "g", max_tokens=5)
    assert ld.info["dims"]["s3d"] == 16
    for i in range(len(ld.splits["train"])):
        it = ld.splits["train"][i]
        no_nan(it)
        assert it["s3d"].shape == (5, 16)
    rep = check_data("msrvtt", tmp_path / "g", split_scheme="full")
    assert rep["missing_experts_per_video"] == m["missing_experts_per_video"]
    assert rep["nonfinite"]["nan_filled_experts"] == m["quirks"]["nan_filled_experts"]


def test_msrvtt_videos_read_once_per_process_while_unchanged(tmp_path, monkeypatch):
    """A sweep worker's later runs read each video from memory, not its file; a replaced file is
    read again."""
    import shutil

    from harness.data import msrvtt

    generate("msrvtt", tmp_path, n_train=4, n_valid=2, n_test=2, seq_len=4)
    read = []
    real_read = msrvtt.read_video
    monkeypatch.setattr(msrvtt, "read_video", lambda path, *a, **k: (read.append(path),
                                                                     real_read(path, *a, **k))[1])

    def test_item():
        return load_dataset("msrvtt", tmp_path, split_scheme="full").splits["test"][0]

    first, again = test_item(), test_item()
    assert len(read) == 1 and torch.equal(first["s3d"], again["s3d"])
    replacement = tmp_path / "replacement.h5"
    shutil.copy(read[0], replacement)
    with h5py.File(replacement, "a") as f:
        f["features.s3d"][...] = 7.0
    replacement.replace(read[0])
    assert (test_item()["s3d"][first["mask_s3d"]] == 7.0).all() and len(read) == 2


def test_howto100m_generated(tmp_path):
    generate("howto100m", tmp_path, n_train=6, n_valid=2, seq_len=4, n_captions=2)
    ld = load_dataset("howto100m", tmp_path)
    assert set(ld.splits) == {"train", "valid"} and ld.info["experts"] == ["s3d", "vggish"]
    it = ld.splits["valid"][0]
    assert set(k for k in it if k.startswith("present_")) == {"present_s3d", "present_vggish"}
    vid = it["id"]
    assert (tmp_path / "vid_feat_files/mult_h5" / vid[0] / vid[1] / vid[2] / f"{vid}.h5").is_file()
    check_data("howto100m", tmp_path)


# ----------------------------------------------------------------------------- generators

def _digest(root: Path) -> dict:
    out = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(root).as_posix()
        if p.suffix == ".h5":
            with h5py.File(p) as f:
                out[rel] = {k: hashlib.sha256(np.ascontiguousarray(f[k][()]).tobytes()).hexdigest()
                            for k in sorted(f)}
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.mark.parametrize("dataset,fmt,kw", [
    ("mosi", "mult", {}), ("mosi", "mmsa_unaligned", {}), ("mosei", "mult", {}),
    ("iemocap", "mmin", {}), ("food101", "raw", {}), ("food101", "mmbt", {}),
    ("msrvtt", "mmt", {"n_captions": 2}), ("howto100m", "mmt", {})])
def test_generator_determinism(tmp_path, dataset, fmt, kw):
    sizes = dict(n_train=6, n_valid=2, seq_len=5)
    if dataset != "howto100m":
        sizes["n_test"] = 3
    a = _digest(Path(generate(dataset, tmp_path / "a", seed=3, format=fmt, **sizes, **kw)["path"]))
    b = _digest(Path(generate(dataset, tmp_path / "b", seed=3, format=fmt, **sizes, **kw)["path"]))
    c = _digest(Path(generate(dataset, tmp_path / "c", seed=4, format=fmt, **sizes, **kw)["path"]))
    assert a == b
    assert a != c
    # regenerating into a generated directory replaces it atomically
    generate(dataset, tmp_path / "a", seed=3, format=fmt, **sizes, **kw)
    assert _digest(tmp_path / "a") == a


def _ridge_r2(Xtr, ytr, Xte, yte, lam=1.0):
    Xtr = np.c_[Xtr, np.ones(len(Xtr))]
    Xte = np.c_[Xte, np.ones(len(Xte))]
    w = np.linalg.solve(Xtr.T @ Xtr + lam * np.eye(Xtr.shape[1]), Xtr.T @ ytr)
    return 1 - ((Xte @ w - yte) ** 2).mean() / yte.var()


def _pair_feats(ld, split):
    d = ld.splits[split].arrays
    t, a, v = d["text"], d["audio"], d["vision"]
    uni = np.concatenate([t.mean(1), a.mean(1), v.mean(1)], 1)
    pair = np.einsum("nli,nlj->nij", t, a).reshape(len(t), -1) / np.sqrt(t.shape[1])
    return uni, np.concatenate([uni, pair], 1), d["label"]


def test_generated_labels_need_cross_modal_interaction_and_pretraining_transfers(tmp_path):
    generate("mosi", tmp_path / "mosi", n_train=1500, n_valid=10, n_test=300, seq_len=8,
             text=8, audio=6, vision=6, latent_dim=4, audio_neg_inf=False)
    generate("mosei", tmp_path / "mosei", n_train=1500, n_valid=10, n_test=10, seq_len=8,
             text=8, audio=6, vision=6, latent_dim=4, audio_neg_inf=False)
    mosi = load_dataset("mosi", tmp_path / "mosi")
    mosei = load_dataset("mosei", tmp_path / "mosei")
    utr, ptr, ytr = _pair_feats(mosi, "train")
    ute, pte, yte = _pair_feats(mosi, "test")
    assert _ridge_r2(utr, ytr, ute, yte) < 0.4            # unimodal pooling is not enough
    assert _ridge_r2(ptr, ytr, pte, yte) > 0.8            # text x audio token products are
    _, pse, yse = _pair_feats(mosei, "train")
    assert _ridge_r2(pse, yse, pte, yte) > 0.7            # a MOSEI-trained model transfers


def test_world_is_shared_and_prefix_stable():
    w = World("sentiment", 0, 8)
    assert np.array_equal(w.proj("audio", 16)[:8], w.proj("audio", 8))
    assert np.array_equal(World("video", 5, 8).mixing("s3d"), World("video", 5, 8).mixing("s3d"))
    assert not np.array_equal(w.coef("text", 0), World("sentiment", 1, 8).coef("text", 0))
