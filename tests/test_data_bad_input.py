"""Malformed data: every case raises InputError naming the file and the key, and writes
nothing."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from PIL import Image

from harness.data import check_data, generate, load_card, load_dataset
from harness.data.cards import cards_dir
from harness.errors import InputError

from test_data_loaders import full_experts, mmsa_split, mult_split, write_pickle, write_video


def snapshot(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(Path(root).rglob("*"))}


def expect_error(root: Path, fn, file_part: str, key_part: str) -> InputError:
    before = snapshot(root)
    with pytest.raises(InputError) as ei:
        fn()
    e = ei.value
    msg = str(e)
    assert e.file is not None and e.key is not None, msg
    assert file_part in msg, msg
    assert key_part in msg, msg
    assert "expected" in msg and "found" in msg, msg
    assert snapshot(root) == before, "something was written"
    return e


def mult(tmp_path, name="mosi_data.pkl", mutate=None, n=(5, 3, 3)):
    data = {s: mult_split(k) for s, k in zip(("train", "valid", "test"), n)}
    if mutate:
        mutate(data)
    return write_pickle(tmp_path / name, data)


# ----------------------------------------------------------------------------- sentiment

def test_missing_path(tmp_path):
    expect_error(tmp_path, lambda: load_dataset("mosi", tmp_path / "nope"), "nope", "'path'")


def test_empty_directory_no_format(tmp_path):
    expect_error(tmp_path, lambda: check_data("mosi", tmp_path), str(tmp_path), "'format'")


def test_truncated_pickle(tmp_path):
    p = mult(tmp_path)
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])
    e = expect_error(tmp_path, lambda: check_data("mosi", tmp_path), "mosi_data.pkl",
                     "(whole file)")
    assert "truncated" in str(e)


def test_corrupt_pickle(tmp_path):
    (tmp_path / "mosi_data.pkl").write_bytes(b"\x80\x04not a pickle at all" * 3)
    expect_error(tmp_path, lambda: load_dataset("mosi", tmp_path), "mosi_data.pkl", "(whole file)")


def test_missing_split(tmp_path):
    mult(tmp_path, mutate=lambda d: d.pop("test"))
    expect_error(tmp_path, lambda: check_data("mosi", tmp_path), "mosi_data.pkl", "'test'")


def test_missing_key(tmp_path):
    mult(tmp_path, mutate=lambda d: d["train"].pop("vision"))
    expect_error(tmp_path, lambda: load_dataset("mosi", tmp_path), "mosi_data.pkl",
                 "'train.vision'")


def test_dims_differ_between_splits(tmp_path):
    def m(d):
        d["test"]["audio"] = np.zeros((3, 6, 7), dtype=np.float32)
    mult(tmp_path, mutate=m)
    e = expect_error(tmp_path, lambda: load_dataset("mosi", tmp_path), "mosi_data.pkl",
                     "'test.audio'")
    assert "dim 4" in str(e) and "dim 7" in str(e)


def test_nan_in_features(tmp_path):
    def m(d):
        d["valid"]["vision"][1, 2, 0] = np.nan
    mult(tmp_path, mutate=m)
    e = expect_error(tmp_path, lambda: load_dataset("mosi", tmp_path), "mosi_data.pkl",
                     "'valid.vision'")
    assert "1 NaN" in str(e)


def test_posinf_in_audio_is_not_fixed(tmp_path):
    def m(d):
        d["train"]["audio"][0, 0, 0] = np.inf
    mult(tmp_path, mutate=m)
    expect_error(tmp_path, lambda: load_dataset("mosi", tmp_path), "mosi_data.pkl", "'train.audio'")


def test_labels_out_of_range(tmp_path):
    def m(d):
        d["train"]["labels"][2, 0, 0] = 4.2
    mult(tmp_path, mutate=m)
    e = expect_error(tmp_path, lambda: check_data("mosi", tmp_path), "mosi_data.pkl",
                     "'train.labels'")
    assert "[-3.0, 3.0]" in str(e) and "4.2" in str(e)


def test_empty_split(tmp_path):
    mult(tmp_path, n=(5, 0, 3))
    expect_error(tmp_path, lambda: load_dataset("mosi", tmp_path), "mosi_data.pkl", "'valid'")


def test_padded_lengths_differ_between_splits(tmp_path):
    """Aligned data padded to 6 steps in train but 4 in test: one backbone cannot take both
    (check-data said usable; a Wander run then failed in a matmul)."""
    def m(d):
        for key in ("text", "audio", "vision"):
            d["test"][key] = d["test"][key][:, :4]
    mult(tmp_path, mutate=m)
    e = expect_error(tmp_path, lambda: check_data("mosi", tmp_path), "mosi_data.pkl", "'test.")
    assert "padded lengths differ between splits" in str(e) and "as in train" in str(e)


def _cut(keys, steps=None, features=None):
    def m(d):
        for split in d.values():
            for key in keys:
                split[key] = split[key][:, :steps, :features]
    return m


@pytest.mark.parametrize("name,mutate,key,shape", [
    ("mosi_data_noalign.pkl", _cut(["audio"], steps=0), "'train.audio'", "(5, 0, 4)"),
    ("mosi_data.pkl", _cut(["vision"], features=0), "'train.vision'", "(5, 6, 0)"),
    ("mosi_data.pkl", _cut(["text", "audio", "vision"], steps=0), "'train.text'", "(5, 0, 5)"),
])
def test_modality_without_steps_or_features(tmp_path, name, mutate, key, shape):
    """A modality of padded length 0 or of dim 0: check-data stopped on an IndexError, or said
    usable and the run crashed."""
    mult(tmp_path, name=name, mutate=mutate)
    e = expect_error(tmp_path, lambda: check_data("mosi", tmp_path), name, key)
    assert "at least 1 time step and 1 feature" in str(e) and f"shape {shape}" in str(e)


def test_constant_labels_are_usable_with_a_warning(tmp_path):
    """Every test label the same: a run's correlation and binary accuracy would be NaN."""
    def m(d):
        d["test"]["labels"][:] = 1.0
    mult(tmp_path, mutate=m)
    warnings = check_data("mosi", tmp_path)["warnings"]
    assert [w for w in warnings if w.startswith("test: every label is 1.0")], warnings
    assert not [w for w in warnings if w.startswith(("train:", "valid:"))], warnings


def test_a_one_sample_split_is_usable_with_a_warning(tmp_path):
    mult(tmp_path, n=(5, 3, 1))
    warnings = check_data("mosi", tmp_path)["warnings"]
    assert [w for w in warnings if w.startswith("test: one sample only")], warnings


def test_sample_counts_differ(tmp_path):
    def m(d):
        d["train"]["labels"] = d["train"]["labels"][:4]
    mult(tmp_path, mutate=m)
    expect_error(tmp_path, lambda: load_dataset("mosi", tmp_path), "mosi_data.pkl",
                 "'train.labels'")


def test_iemocap_labels_wrong_shape(tmp_path):
    def m(d):
        for s in d.values():
            s["labels"] = np.zeros((len(s["text"]), 4), dtype=np.float32)
    mult(tmp_path, name="iemocap_data.pkl", mutate=m)
    e = expect_error(tmp_path, lambda: load_dataset("iemocap", tmp_path), "iemocap_data.pkl",
                     "'train.labels'")
    assert "4, 2" in str(e)


def test_mmsa_unaligned_missing_lengths(tmp_path):
    data = {s: mmsa_split(4) for s in ("train", "valid", "test")}
    del data["train"]["audio_lengths"]
    write_pickle(tmp_path / "unaligned_50.pkl", data)
    expect_error(tmp_path, lambda: load_dataset("mosi", tmp_path), "unaligned_50.pkl",
                 "'train.audio_lengths'")


def test_mmsa_lengths_out_of_range(tmp_path):
    data = {s: mmsa_split(4) for s in ("train", "valid", "test")}
    data["valid"]["vision_lengths"][0] = 99
    write_pickle(tmp_path / "unaligned_50.pkl", data)
    expect_error(tmp_path, lambda: load_dataset("mosi", tmp_path), "unaligned_50.pkl",
                 "'valid.vision_lengths'")


def test_wrong_format_forced_directory(tmp_path):
    mult(tmp_path)
    e = expect_error(tmp_path, lambda: load_dataset("mosi", tmp_path, format="mmsa_aligned"),
                     str(tmp_path), "'format'")
    assert "aligned_50.pkl" in str(e) and "mult" in str(e)


def test_wrong_format_forced_file(tmp_path):
    p = mult(tmp_path)
    e = expect_error(tmp_path, lambda: load_dataset("mosi", p, format="mmsa_aligned"),
                     "mosi_data.pkl", "'train.regression_labels'")
    assert "looks like mult" in str(e)


def test_aligned_format_forced_on_unaligned_data(tmp_path):
    data = {s: mult_split(3, L=(5, 9, 7)) for s in ("train", "valid", "test")}
    p = write_pickle(tmp_path / "x.pkl", data)
    expect_error(tmp_path, lambda: load_dataset("mosi", p, format="mult"), "x.pkl",
                 "'train.audio'")


def test_unknown_format_name(tmp_path):
    mult(tmp_path)
    expect_error(tmp_path, lambda: load_dataset("mosi", tmp_path, format="csv"), "mosi.yaml",
                 "'format'")


def test_unknown_dataset(tmp_path):
    expect_error(tmp_path, lambda: load_dataset("cifar10", tmp_path), "cifar10.yaml", "'dataset'")


def test_unknown_loader_option(tmp_path):
    mult(tmp_path)
    expect_error(tmp_path, lambda: load_dataset("mosi", tmp_path, image_size=3), "mosi.yaml",
                 "'image_size'")


@pytest.mark.parametrize("dataset,options,key", [
    ("msrvtt", {"max_tokens": 0}, "max_tokens"),         # was silently the card's 30
    ("msrvtt", {"max_tokens": 2.7}, "max_tokens"),       # was silently 2
    ("msrvtt", {"split_scheme": "bogus"}, "split_scheme"),
    ("msrvtt", {"experts": ["s3d", "nope"]}, "experts"),
    ("msrvtt", {"captions": {"train": "bogus"}}, "captions"),
    ("food101", {"image_size": -3}, "image_size"),       # was PIL's ValueError
    ("food101", {"valid_fraction": 1.5}, "valid_fraction"),
    ("food101", {"check_images_exist": "maybe"}, "check_images_exist"),  # was accepted
    ("iemocap", {"max_len": {"text": 0}}, "max_len.text"),
    ("mosi", {"max_len": {"text": 4}}, "max_len"),       # no mosi format reads it: was ignored
    ("mosei", {"feature_types": {"text": "bert"}}, "feature_types"),
])
def test_bad_loader_option_values_are_refused_before_reading(tmp_path, dataset, options, key):
    """Each family's ``Options``: checked before any file is read (the folder is empty)."""
    expect_error(tmp_path, lambda: load_dataset(dataset, tmp_path, **options), f"{dataset}.yaml",
                 f"'{key}'")


def test_mmin_name_missing_from_features(tmp_path):
    generate("iemocap", tmp_path / "g", format="mmin", n_train=4, n_valid=2, n_test=2, seq_len=4)
    with h5py.File(next((tmp_path / "g" / "V").glob("*.h5")), "a") as f:
        victim = sorted(f)[0]
        del f[victim]
    expect_error(tmp_path, lambda: load_dataset("iemocap", tmp_path / "g"), "denseface.h5", victim)


def test_mmin_missing_fold(tmp_path):
    generate("iemocap", tmp_path / "g", format="mmin", n_train=4, n_valid=2, n_test=2, seq_len=4)
    expect_error(tmp_path, lambda: load_dataset("iemocap", tmp_path / "g", fold=7), "target",
                 "'fold'")


def test_mmin_options_refused_for_a_format_that_ignores_them(tmp_path):
    """fold / max_len / feature_types are read by the mmin layout only: on a pickle they changed
    the run key, not the data."""
    generate("iemocap", tmp_path / "g", n_train=4, n_valid=2, n_test=2, seq_len=4)
    e = expect_error(tmp_path, lambda: load_dataset("iemocap", tmp_path / "g", format="mult", fold=2),
                     "iemocap.yaml", "'fold'")           # forced: refused before reading
    assert "only for format(s) ['mmin']" in str(e) and str(e).endswith("found 2")
    e = expect_error(tmp_path, lambda: load_dataset("iemocap", tmp_path / "g", max_len={"text": 3}),
                     "iemocap_data.pkl", "'max_len'")    # detected: refused once located
    assert "only for format(s) ['mmin']" in str(e) and "{'text': 3}" in str(e)


def test_mmin_options_refused_in_params_for_a_dataset_without_mmin():
    from harness.params_schema import check_data_block
    with pytest.raises(InputError) as error:
        check_data_block(load_card("mosi"), None, {"feature_types": {"text": "bert"}}, "params.yaml",
                         ("data", "tiny", "mosi"))
    assert error.value.key == "data.tiny.mosi.feature_types", str(error.value)
    assert "only for format(s) ['mmin']" in str(error.value), str(error.value)


def test_mmin_label_rows_not_one_hot(tmp_path):
    """One-hot rows with several 1s (or none) were read as class 0 (argmax)."""
    generate("iemocap", tmp_path / "g", format="mmin", n_train=8, n_valid=2, n_test=2, seq_len=4)
    p = tmp_path / "g/target/1/trn_label.npy"
    labels = np.load(p)
    labels[2:5] = 1
    labels[6] = 0
    np.save(p, labels)
    e = expect_error(tmp_path, lambda: check_data("iemocap", tmp_path / "g"), "trn_label.npy",
                     "'trn'")
    assert "exactly one 1 per row" in str(e), str(e)
    assert "3 rows with 4 ones, 1 row with 0 ones (first at row 2)" in str(e), str(e)


@pytest.mark.parametrize("cut,key,found", [
    (np.s_[:, :0], "'Ses01F_gen_00000'", ", 0)"),         # dim 0: the first utterance named
    (np.s_[:0], "'features.vision'", "0 steps in every utterance"),
])
def test_mmin_modality_without_steps_or_features(tmp_path, cut, key, found):
    generate("iemocap", tmp_path / "g", format="mmin", n_train=4, n_valid=2, n_test=2, seq_len=4)
    with h5py.File(tmp_path / "g/V/denseface.h5", "a") as f:
        for name in list(f):
            a = f[name][()]
            del f[name]
            f[name] = a[cut]
    e = expect_error(tmp_path, lambda: check_data("iemocap", tmp_path / "g"), "denseface.h5", key)
    assert found in str(e)


def test_mmin_labels_out_of_range(tmp_path):
    generate("iemocap", tmp_path / "g", format="mmin", n_train=4, n_valid=2, n_test=2, seq_len=4)
    np.save(tmp_path / "g/target/1/tst_label.npy", np.array([0, 5]))
    expect_error(tmp_path, lambda: load_dataset("iemocap", tmp_path / "g"), "tst_label.npy",
                 "'tst'")


# ----------------------------------------------------------------------------- food101

def _raw_food(root: Path, test_rows=None):
    rows = {"train": [("a_0.jpg", "t, \"q\"", "apple_pie"), ("b_0.jpg", "x", "baklava")],
            "test": test_rows or [("a_1.jpg", "y", "apple_pie")]}
    for split, rs in rows.items():
        for fname, _, label in rs:
            p = root / "images" / split / label / fname
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (4, 4)).save(p, format="JPEG")
        (root / "texts").mkdir(exist_ok=True)
        with open(root / "texts" / f"{split}_titles.csv", "w", newline="") as f:
            csv.writer(f).writerows(rs)


def test_food_unreadable_image(tmp_path):
    _raw_food(tmp_path)
    bad = tmp_path / "images/train/baklava/b_0.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage, not a jpeg")
    ld = load_dataset("food101", tmp_path)             # lazy: loading does not open images
    expect_error(tmp_path, lambda: ld.splits["train"][1], "b_0.jpg", "id b_0")
    expect_error(tmp_path, lambda: check_data("food101", tmp_path), "b_0.jpg", "id b_0")


def test_food_image_too_large_to_open(tmp_path, monkeypatch):
    """More pixels than PIL opens (a decompression bomb): refused like an unreadable image. The
    limit is lowered so that the 4 x 4 test images exceed it (twice the limit raises)."""
    from PIL import Image
    _raw_food(tmp_path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 7)
    e = expect_error(tmp_path, lambda: check_data("food101", tmp_path), ".jpg", "id ")
    assert "DecompressionBombError" in str(e)


def test_food_missing_image(tmp_path):
    """The error names the list file and its line, and the image path that row gives."""
    _raw_food(tmp_path)
    (tmp_path / "images/test/apple_pie/a_1.jpg").unlink()
    e = expect_error(tmp_path, lambda: load_dataset("food101", tmp_path), "test_titles.csv",
                     "line 1")
    assert e.file.endswith("test_titles.csv") and "a_1.jpg" in str(e) and str(e).endswith("found missing")


def test_food_image_path_is_a_folder(tmp_path):
    _raw_food(tmp_path)
    image = tmp_path / "images/test/apple_pie/a_1.jpg"
    image.unlink()
    image.mkdir()
    e = expect_error(tmp_path, lambda: load_dataset("food101", tmp_path), "test_titles.csv",
                     "line 1")
    assert str(e).endswith("found a folder")


def test_food_16_bit_image_is_refused(tmp_path):
    """A 16-bit PNG: PIL's convert("RGB") clipped it to near white; refused instead."""
    _raw_food(tmp_path)
    image = tmp_path / "images/train/baklava/b_0.jpg"
    Image.fromarray(np.full((4, 4), 30000, dtype=np.uint16)).save(image, format="PNG")
    expect_error(tmp_path, lambda: check_data("food101", tmp_path), "b_0.jpg", "id b_0")


def test_food_label_not_in_train(tmp_path):
    _raw_food(tmp_path, test_rows=[("a_1.jpg", "y", "apple_pie"), ("c_1.jpg", "z", "churros")])
    e = expect_error(tmp_path, lambda: load_dataset("food101", tmp_path), "test_titles.csv",
                     "line 2")
    assert "churros" in str(e)


def test_food_malformed_row(tmp_path):
    _raw_food(tmp_path)
    with open(tmp_path / "texts/train_titles.csv", "a") as f:
        f.write("only_two_fields.jpg,apple_pie\n")
    expect_error(tmp_path, lambda: load_dataset("food101", tmp_path), "train_titles.csv", "line 3")


def test_food_valid_fraction_carves_nothing(tmp_path):
    """One train row per class: each stays in train, the valid split was empty (a run then
    crashed in torch.cat)."""
    _raw_food(tmp_path)
    e = expect_error(tmp_path, lambda: load_dataset("food101", tmp_path, valid_fraction=0.2),
                     "train_titles.csv", "'valid_fraction'")
    assert "at least 1 sample" in str(e) and "found 0 samples" in str(e)
    assert "one train sample" in str(e), str(e)


def test_food_csv_with_bom_is_read(tmp_path):
    """A UTF-8 byte order mark was read into the first file name (an invisible character)."""
    _raw_food(tmp_path)
    f = tmp_path / "texts/train_titles.csv"
    f.write_bytes(b"\xef\xbb\xbf" + f.read_bytes())
    assert load_dataset("food101", tmp_path).splits["train"].ids == ["a_0", "b_0"]


def test_food_csv_in_utf16(tmp_path):
    _raw_food(tmp_path)
    f = tmp_path / "texts/test_titles.csv"
    f.write_text(f.read_text(), encoding="utf-16")
    e = expect_error(tmp_path, lambda: load_dataset("food101", tmp_path), "test_titles.csv",
                     "(whole file)")
    assert "not UTF-8 text (UTF-16?)" in str(e)


def test_food_missing_test_split(tmp_path):
    _raw_food(tmp_path)
    (tmp_path / "texts/test_titles.csv").unlink()
    expect_error(tmp_path, lambda: load_dataset("food101", tmp_path), "test_titles.csv", "'test'")


def test_food_mmbt_missing_key(tmp_path):
    generate("food101", tmp_path / "g", format="mmbt", n_train=6, n_valid=2, n_test=2)
    p = tmp_path / "g/dev.jsonl"
    recs = [json.loads(x) for x in p.read_text().splitlines()]
    del recs[1]["img"]
    p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    expect_error(tmp_path, lambda: load_dataset("food101", tmp_path / "g"), "dev.jsonl",
                 "'line 2.img'")


def test_food_cggm_invalid_json(tmp_path):
    generate("food101", tmp_path / "g", format="cggm", n_train=6, n_valid=2, n_test=2)
    (tmp_path / "g/test.json").write_text('[{"id": 1,')
    expect_error(tmp_path, lambda: load_dataset("food101", tmp_path / "g"), "test.json", "line 1")


def test_food_wrong_format_forced(tmp_path):
    _raw_food(tmp_path)
    e = expect_error(tmp_path, lambda: load_dataset("food101", tmp_path, format="mmbt"),
                     str(tmp_path), "'format'")
    assert "['raw']" in str(e)


# ----------------------------------------------------------------------------- msrvtt

def _tree(root: Path):
    write_video(root, "video0", full_experts(3))
    write_video(root, "video1", full_experts(3, skip=("face",)))
    (root / "train_list_jsfusion.txt").write_text("video0\n")
    (root / "val_list_jsfusion.txt").write_text("video1\n")


def _vpath(root, vid):
    return root / "vid_feat_files/mult_h5" / vid[0] / vid[1] / vid[2] / f"{vid}.h5"


def test_msrvtt_required_expert_missing(tmp_path):
    _tree(tmp_path)
    with h5py.File(_vpath(tmp_path, "video1"), "a") as f:
        del f["features.s3d"]
    expect_error(tmp_path, lambda: check_data("msrvtt", tmp_path), "video1.h5", "'features.s3d'")


@pytest.mark.parametrize("how", ["nan_first", "no_rows"])
def test_msrvtt_required_expert_absent(tmp_path, how):
    """A required expert NaN-filled or without rows (absent by MMT's rule) passed as absent."""
    _tree(tmp_path)
    with h5py.File(_vpath(tmp_path, "video1"), "a") as f:
        a = f["features.s3d"][()]
        a[0, 0] = np.nan
        del f["features.s3d"]
        f["features.s3d"] = a if how == "nan_first" else a[:0]
    e = expect_error(tmp_path, lambda: check_data("msrvtt", tmp_path), "video1.h5",
                     "'features.s3d'")
    assert "required" in str(e) and ("NaN" if how == "nan_first" else "0 rows") in str(e)
    ld = load_dataset("msrvtt", tmp_path)               # lazy: the item names it too
    expect_error(tmp_path, lambda: ld.splits["test"][0], "video1.h5", "'features.s3d'")


def test_msrvtt_split_list_names_missing_video(tmp_path):
    _tree(tmp_path)
    (tmp_path / "val_list_jsfusion.txt").write_text("video1\nvideo77\n")
    expect_error(tmp_path, lambda: load_dataset("msrvtt", tmp_path), "video77.h5",
                 "val_list_jsfusion.txt line 2")


def test_msrvtt_nan_inside_present_expert(tmp_path):
    _tree(tmp_path)
    with h5py.File(_vpath(tmp_path, "video0"), "a") as f:
        a = f["features.rgb"][()]
        a[2, 5] = np.nan
        del f["features.rgb"]
        f["features.rgb"] = a
    expect_error(tmp_path, lambda: check_data("msrvtt", tmp_path), "video0.h5", "'features.rgb'")


def test_msrvtt_expert_dim_mismatch(tmp_path):
    _tree(tmp_path)
    with h5py.File(_vpath(tmp_path, "video1"), "a") as f:
        del f["features.vggish"]
        f["features.vggish"] = np.zeros((3, 64), dtype=np.float32)
    ld = load_dataset("msrvtt", tmp_path)
    e = expect_error(tmp_path, lambda: ld.splits["test"][0], "video1.h5", "'features.vggish'")
    assert "n x 128" in str(e)


def test_msrvtt_truncated_h5(tmp_path):
    _tree(tmp_path)
    p = _vpath(tmp_path, "video0")
    raw = p.read_bytes()
    p.write_bytes(raw[:300])
    expect_error(tmp_path, lambda: check_data("msrvtt", tmp_path), "video0.h5", "(whole file)")


def test_msrvtt_missing_split_list(tmp_path):
    _tree(tmp_path)
    expect_error(tmp_path, lambda: load_dataset("msrvtt", tmp_path, split_scheme="full"),
                 "train_list.txt", "'train'")


def test_msrvtt_no_feature_tree_wrong_format(tmp_path):
    mult(tmp_path)
    expect_error(tmp_path, lambda: load_dataset("msrvtt", tmp_path, format="mmt"),
                 str(tmp_path), "'format'")


def test_msrvtt_video_without_captions(tmp_path):
    _tree(tmp_path)
    with h5py.File(_vpath(tmp_path, "video0"), "a") as f:
        del f["raw_captions.0"]
    expect_error(tmp_path, lambda: check_data("msrvtt", tmp_path), "video0.h5", "'raw_captions.0'")


# ----------------------------------------------------------------------------- cards, checksums

@pytest.fixture
def card_dir(tmp_path, monkeypatch):
    d = tmp_path / "cards" / "datasets"
    shutil.copytree(cards_dir(), d)
    monkeypatch.setenv("MMPETL_DATASETS_DIR", str(d))
    return d


def test_checksum_mismatch(tmp_path, card_dir):
    data = tmp_path / "data"
    data.mkdir()
    mult(data)
    card = yaml.safe_load((card_dir / "mosi.yaml").read_text())
    card["checksums"] = {"mosi_data.pkl": "0" * 64}
    (card_dir / "mosi.yaml").write_text(yaml.safe_dump(card))
    expect_error(data, lambda: check_data("mosi", data), "mosi_data.pkl",
                 "'checksums.mosi_data.pkl'")
    import hashlib
    card["checksums"] = {"mosi_data.pkl": hashlib.sha256((data / "mosi_data.pkl").read_bytes())
                         .hexdigest()}
    (card_dir / "mosi.yaml").write_text(yaml.safe_dump(card))
    assert check_data("mosi", data)["checksums"] == {"mosi_data.pkl": "ok"}


def test_card_missing_field_and_bad_yaml(tmp_path, card_dir):
    card = yaml.safe_load((card_dir / "mosi.yaml").read_text())
    del card["licence"]
    (card_dir / "mosi.yaml").write_text(yaml.safe_dump(card))
    expect_error(tmp_path, lambda: load_card("mosi"), "mosi.yaml", "'licence'")
    (card_dir / "mosei.yaml").write_text("name: [unclosed\n")
    expect_error(tmp_path, lambda: load_card("mosei"), "mosei.yaml", "(whole file)")


# ----------------------------------------------------------------------------- generator args

@pytest.mark.parametrize("kwargs,key", [
    ({"interaction_order": 4}, "interaction_order"),
    ({"n_train": 0}, "n_train"),
    ({"noise": float("nan")}, "noise"),
    ({"format": "mmin"}, "format"),
    ({"colour": 3}, "colour"),
    ({"audio": -1}, "audio"),
])
def test_generate_bad_arguments_write_nothing(tmp_path, kwargs, key):
    """The argument is named (``mmpetl data`` names the file: params.yaml's generate.<dataset>)."""
    out = tmp_path / "deep" / "out"
    with pytest.raises(InputError) as error:
        generate("mosi", out, **kwargs)
    assert error.value.key == key and error.value.expected is not None, str(error.value)
    assert not (tmp_path / "deep").exists()


def test_generate_refuses_to_overwrite_real_data(tmp_path):
    mult(tmp_path)
    expect_error(tmp_path, lambda: generate("mosi", tmp_path), str(tmp_path), "'out_dir'")


def test_generate_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    import importlib
    g = importlib.import_module("harness.data.generate")   # the module, not the function

    def boom(*a, **k):
        raise InputError("simulated failure", file="x", key="y", expected=1, found=2)
    monkeypatch.setattr(g, "_save_pickle", boom)
    expect_error(tmp_path, lambda: generate("mosi", tmp_path / "a" / "b"), "x", "'y'")
    assert list(tmp_path.iterdir()) == []


def test_repeated_and_shared_ids_are_usable_with_a_warning(tmp_path):
    """Test samples that are training samples (leakage), and ids repeated within a split."""
    def m(d):
        d["train"]["id"] = np.array([[b"t", b"1", b"0"]] * 5)
        d["test"]["id"] = np.array([[b"t", b"1", b"0"], [b"x", b"1", b"1"], [b"y", b"1", b"2"]])
        d["valid"]["id"] = np.array([[f"u{i}".encode(), b"1", b"0"] for i in range(3)])
    mult(tmp_path, mutate=m)
    warnings = check_data("mosi", tmp_path)["warnings"]
    assert [w for w in warnings if w.startswith("train: 4 repeated sample id(s)")], warnings
    assert [w for w in warnings if w.startswith("train and test share 1 sample id(s)")], warnings
    assert not [w for w in warnings if w.startswith("train and valid")], warnings


def test_features_beyond_float16_are_usable_with_a_warning(tmp_path):
    """1e38 in a feature: the encoder outputs overflow the feature cache's float16 (check-data said
    usable; the run stopped naming the cache file)."""
    def m(d):
        d["train"]["text"][0, 0, 0] = 1e38
    mult(tmp_path, mutate=m)
    warnings = check_data("mosi", tmp_path)["warnings"]
    assert [w for w in warnings if w.startswith("train: text reaches |x| = 1e+38 (first at sample v0")], warnings


def test_valid_and_test_sharing_ids_is_usable_with_a_warning(tmp_path):
    def m(d):
        d["valid"]["id"] = d["test"]["id"].copy()
        d["train"]["id"] = np.array([[f"u{i}".encode(), b"1", b"0"] for i in range(5)])
    mult(tmp_path, mutate=m)
    warnings = check_data("mosi", tmp_path)["warnings"]
    assert [w for w in warnings if w.startswith("valid and test share 3 sample id(s)")], warnings
    assert not [w for w in warnings if w.startswith("train and")], warnings


def test_msrvtt_videos_in_two_splits_are_usable_with_a_warning(tmp_path):
    _tree(tmp_path)
    (tmp_path / "val_list_jsfusion.txt").write_text("video1\nvideo0\nvideo1\n")
    warnings = check_data("msrvtt", tmp_path)["warnings"]
    assert [w for w in warnings if w.startswith("test: 1 repeated sample id(s), e.g. ['video1']")], warnings
    assert [w for w in warnings if w.startswith("train and test share 1 sample id(s), e.g. ['video0']")], warnings


def test_mmin_utterances_in_two_splits_are_usable_with_a_warning(tmp_path):
    generate("iemocap", tmp_path / "g", format="mmin", n_train=6, n_valid=2, n_test=2, seq_len=4)
    fold = tmp_path / "g/target/1"
    train_names = np.load(fold / "trn_int2name.npy")
    np.save(fold / "tst_int2name.npy", train_names[:2])
    np.save(fold / "val_int2name.npy", train_names[:2])
    warnings = check_data("iemocap", tmp_path / "g")["warnings"]
    for pair in ("train and valid", "train and test", "valid and test"):
        assert [w for w in warnings if w.startswith(f"{pair} share 2 sample id(s)")], warnings
