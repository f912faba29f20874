"""Cached feature extraction (harness/features.py, stage harness/extract.py): the cached path reproduces the full forward,
only methods that leave the encoders untouched are cacheable, stale caches are recomputed, writes
are atomic and the progress bar is harmless off a terminal."""
from __future__ import annotations

import copy
import json
import time
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from harness.backbones.late_fusion import LateFusionBackbone, LateFusionConfig
from harness.backbones.two_tower import TwoTowerBackbone, TwoTowerConfig
from harness.errors import InputError
from harness.features import (CacheError, CachedFeatures, FromCache, NotCacheable, cache_problems,
                             cacheable, cached_splits, split_hash, encoder_hash,
                             extract_features, load_features)
from harness.tasks.tasks import TASKS
from harness.train import TrainSettings, fine_tune
from methods import apply_method

N = 20
# Sizes that fit the tiny backbones (two-tower: 17 + 16 tokens, width 64; late fusion: 3 x 16, 40).
METHODS = {"wander": {"down_dim": 8, "fused_length": 8}, "linear": {}}
NOT_CACHEABLE = {"lora": {"rank": 4}, "adapter": {"down_dim": 8}, "ptuning": {}, "full": {},
                 "wander-every": {"down_dim": 8, "fused_length": 8, "insert": "every"}}


class Items(Dataset):
    """A list of item dicts; ``fail_at`` raises while item ``fail_at`` is read."""

    def __init__(self, items, fail_at: int | None = None):
        self.items, self.fail_at = items, fail_at

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        if i == self.fail_at:
            raise RuntimeError(f"simulated failure at item {i}")
        return self.items[i]


def two_tower_items(backbone: TwoTowerBackbone, n: int = N) -> Items:
    batch = backbone.example_batch(n, seed=1)
    return Items([{"image": batch["image"][i], "text": batch["text"][i],
                   "mask_text": batch["mask_text"][i], "label": torch.tensor(i % 5),
                   "index": torch.tensor(i)} for i in range(n)])


def late_fusion_items(config: LateFusionConfig, n: int = N) -> Items:
    g = torch.Generator().manual_seed(1)
    items = []
    for i in range(n):
        item = {m: torch.randn(config.seq_lens[m], d, generator=g) for m, d in config.input_dims.items()}
        for m, length in config.seq_lens.items():
            mask = torch.ones(length, dtype=torch.bool)
            mask[length - 1 - i % 4:] = False  # some padding, never the first token
            item[f"mask_{m}"] = mask
        item["label"] = torch.tensor(float(i % 7) - 3.0)
        item["index"] = torch.tensor(i)
        items.append(item)
    return Items(items)


@pytest.fixture(scope="module")
def towers():
    torch.manual_seed(0)
    backbone = TwoTowerBackbone(TwoTowerConfig.tiny(num_classes=5))
    return backbone, two_tower_items(backbone)


@pytest.fixture(scope="module")
def late():
    torch.manual_seed(0)
    config = LateFusionConfig()
    return LateFusionBackbone(config), late_fusion_items(config)


def setup(kind, towers, late, method="wander", **overrides):
    backbone, items = towers if kind == "two_tower" else late
    backbone = copy.deepcopy(backbone)
    name = "wander" if method == "wander-every" else method
    settings = METHODS[method] if method in METHODS else NOT_CACHEABLE[method]
    apply_method(backbone, name, **{**settings, **overrides})
    return backbone, items


def extract(backbone, items, path, data_hash="data-v1", **kwargs):
    return extract_features(backbone, items, path, data_hash, batch_size=8, progress=False, **kwargs)


# --- the cached path equals the full forward ----------------------------------------------------
@pytest.mark.parametrize("kind", ["two_tower", "late_fusion"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_cached_path_matches_full_forward(kind, method, towers, late, tmp_path):
    backbone, items = setup(kind, towers, late, method)
    assert cacheable(backbone), cache_problems(backbone)
    features = extract(backbone, items, tmp_path / "train.h5")
    assert features.status == "computed: missing" and len(features) == N
    meta = features.meta
    assert meta["dtype"] == "float16" and meta["data_hash"] == "data-v1"
    assert meta["encoder_hash"] == encoder_hash(backbone)
    for m in backbone.modalities:
        assert meta["shapes"][f"feat_{m}"] == [N, backbone.seq_len(m), backbone.hidden_size(m)]
        assert features[0][f"feat_{m}"].dtype == torch.float16

    model = FromCache(backbone)
    assert model.head is backbone.head  # shared: training the cached model trains the backbone
    backbone.eval(), model.eval()
    raw, cached = default_collate(items.items), default_collate([features[i] for i in range(N)])
    with torch.no_grad():
        full, fast = backbone(raw), model(cached)
    assert full.shape == fast.shape
    assert torch.allclose(full, fast, atol=5e-3, rtol=1e-2), (full - fast).abs().max()

    # The same gradients for every trainable tensor (eval mode: no dropout on either path).
    grads = []
    for forward in (lambda: backbone(raw), lambda: model(cached)):
        backbone.zero_grad(set_to_none=True)
        forward().pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in backbone.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=5e-3, rtol=5e-2), name


def test_states_are_what_encode_gives_without_the_method(towers, tmp_path):
    backbone, items = setup("two_tower", towers, None, "wander")
    features = extract(backbone, items, tmp_path / "train.h5")
    bare = copy.deepcopy(towers[0]).eval()
    with torch.no_grad():
        states = bare.encode(default_collate(items.items))
    for m in bare.modalities:
        stored = torch.stack([features[i][f"feat_{m}"] for i in range(N)]).float()
        assert torch.allclose(stored, states[m], atol=1e-2, rtol=1e-3)
    assert torch.equal(torch.stack([features[i]["mask_text"] for i in range(N)]),
                       default_collate(items.items)["mask_text"])
    assert "fusion_hooks" in dict(backbone.named_children())
    assert str(backbone.depth - 1) in backbone.fusion_hooks  # restored after extraction
    assert backbone.training  # mode restored too


def test_fine_tune_runs_on_the_cache(towers, tmp_path):
    backbone, items = setup("two_tower", towers, None, "wander")
    splits = {"train": items, "valid": Items(items.items[:8]), "test": Items(items.items[8:])}
    hashes = {name: f"h-{name}" for name in splits}
    model, cached, info = cached_splits(backbone, splits, tmp_path, hashes, batch_size=8,
                                        progress=False)
    assert {s["status"] for s in info["splits"].values()} == {"computed: missing"}
    assert Path(info["folder"]).name.startswith(info["encoder_hash"][:16] + "-")
    before = {n: p.clone() for n, p in backbone.named_parameters()}
    settings = TrainSettings(optimizer="adamw", lr=1e-3, batch_size=8, epochs=1)
    result = fine_tune(model, TASKS["classification"], cached, settings, seed=0, progress=False)
    assert 0.0 <= result["test"]["acc"] <= 1.0
    changed = {n for n, p in backbone.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith(("head.", "fusion_hooks.")) for n in changed)
    # Training the head and the hook leaves the encoder hash (and so the cache) valid.
    _, _, again = cached_splits(backbone, splits, tmp_path, hashes, batch_size=8, progress=False)
    assert {s["status"] for s in again["splits"].values()} == {"reused"}
    # Another data folder of the dataset (a scratch run's): a cache of its own, not the first
    # one rewritten in place (concurrent experiments on two data folders recomputed each other's)
    other = {name: f"other-{name}" for name in splits}
    _, _, elsewhere = cached_splits(backbone, splits, tmp_path, other, batch_size=8, progress=False)
    assert elsewhere["folder"] != info["folder"]
    _, _, back = cached_splits(backbone, splits, tmp_path, hashes, batch_size=8, progress=False)
    assert {s["status"] for s in back["splits"].values()} == {"reused"}


# --- what is refused ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["two_tower", "late_fusion"])
@pytest.mark.parametrize("method", sorted(NOT_CACHEABLE))
def test_methods_that_change_the_encoders_are_not_cacheable(kind, method, towers, late, tmp_path):
    backbone, items = setup(kind, towers, late, method)
    assert not cacheable(backbone)
    problems = " ".join(cache_problems(backbone))
    expected = {"lora": "LoRA", "adapter": "adapter", "ptuning": "prompts",
                "full": "encoder parameter(s)", "wander-every": "fusion hook after layer 0"}
    assert expected[method] in problems, problems
    with pytest.raises(NotCacheable, match="cannot be cached"):
        FromCache(backbone)
    with pytest.raises(NotCacheable):
        cached_splits(backbone, {"train": items}, tmp_path, {"train": "h"}, progress=False)
    if method != "full":  # structure changed: extraction itself is refused as well
        with pytest.raises(NotCacheable):
            extract(backbone, items, tmp_path / "train.h5")
    assert not list(tmp_path.iterdir())


def test_a_bare_backbone_extracts_but_does_not_train_from_the_cache(towers, tmp_path):
    backbone, items = copy.deepcopy(towers[0]), towers[1]  # every parameter trainable
    assert cache_problems(backbone, require_frozen=False) == [] and not cacheable(backbone)
    assert extract(backbone, items, tmp_path / "train.h5").status == "computed: missing"


# --- invalidation --------------------------------------------------------------------------------
def test_cache_is_reused_and_invalidated(towers, tmp_path):
    backbone, items = setup("two_tower", towers, None, "wander")
    path = tmp_path / "train.h5"
    first = extract(backbone, items, path)
    stamp = path.stat().st_mtime_ns
    assert extract(backbone, items, path).status == "reused" and path.stat().st_mtime_ns == stamp

    data_changed = extract(backbone, items, path, data_hash="data-v2")
    assert data_changed.status.startswith("recomputed") and "data_hash" in data_changed.status
    assert data_changed.meta["data_hash"] == "data-v2"
    with pytest.raises(CacheError, match="stale"):
        load_features(path, data_hash="data-v1")

    old_hash = encoder_hash(backbone)
    with torch.no_grad():  # head and hook changes do not touch the encoder hash
        next(backbone.head.parameters()).add_(1.0)
        next(backbone.fusion_hooks.parameters()).add_(1.0)
    assert encoder_hash(backbone) == old_hash
    with torch.no_grad():  # (a constant shift would vanish on LayerNorm'd, zero-mean inputs)
        weight = backbone.encoders["text"].encoder.layer[0].intermediate.fc1.weight
        weight.add_(0.05 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
    assert encoder_hash(backbone) != old_hash
    weights_changed = extract(backbone, items, path, data_hash="data-v2")
    assert weights_changed.status.startswith("recomputed") and "encoder_hash" in weights_changed.status
    assert weights_changed.meta["encoder_hash"] == encoder_hash(backbone)
    assert not torch.equal(weights_changed[0]["feat_text"], first[0]["feat_text"])
    assert torch.equal(weights_changed[0]["feat_image"], first[0]["feat_image"])  # other tower


def test_same_encoder_and_data_give_the_same_bytes(towers, tmp_path):
    """DVC hashes the caches (stage extract): no timestamps or timings may change the file."""
    backbone, items = setup("two_tower", towers, None, "wander")
    extract(backbone, items, tmp_path / "a.h5")
    time.sleep(1.1)  # HDF5 object timestamps have one-second resolution
    extract(backbone, items, tmp_path / "b.h5")
    assert (tmp_path / "a.h5").read_bytes() == (tmp_path / "b.h5").read_bytes()


def test_encoder_hash_is_stable(towers, late):
    for backbone in (copy.deepcopy(towers[0]), copy.deepcopy(late[0])):
        h = encoder_hash(backbone)
        assert encoder_hash(copy.deepcopy(backbone)) == h
        backbone.eval()
        with torch.no_grad():
            backbone(default_collate((towers[1] if isinstance(backbone, TwoTowerBackbone)
                                      else late[1]).items[:2]))
        assert encoder_hash(backbone) == h


def test_corrupt_cache_is_recomputed(late, tmp_path):
    backbone, items = setup("late_fusion", None, late, "linear")
    path = tmp_path / "train.h5"
    path.write_bytes(b"not an HDF5 file")
    features = extract(backbone, items, path)
    assert features.status.startswith("recomputed") and "unreadable" in features.status
    with pytest.raises(CacheError):
        CachedFeatures(tmp_path / "missing.h5")


# --- atomic writes, bad input, progress ------------------------------------------------------------
def test_failed_extraction_leaves_no_partial_file(towers, tmp_path):
    backbone, items = setup("two_tower", towers, None, "wander")
    failing = Items(items.items, fail_at=N - 3)  # fails in the last batch, after rows were written
    path = tmp_path / "train.h5"
    with pytest.raises(RuntimeError, match="simulated failure"):
        extract(backbone, failing, path)
    assert list(tmp_path.iterdir()) == []
    # A valid cache is left intact when its recomputation fails.
    extract(backbone, items, path)
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="simulated failure"):
        extract(backbone, failing, path, data_hash="data-v2")
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]
    assert load_features(path, data_hash="data-v1").meta["n"] == N


def test_non_finite_states_are_refused(late, tmp_path):
    backbone, items = setup("late_fusion", None, late, "wander")
    bad = copy.deepcopy(items.items)
    bad[5]["audio"][0, 0] = float("nan")
    with pytest.raises(InputError, match="non-finite at item 5"):
        extract(backbone, Items(bad), tmp_path / "train.h5")
    for i, item in enumerate(bad):  # the data's own sample ids, when the items carry them
        item["id"] = f"clip{i}"
    with pytest.raises(InputError, match="audio outputs on the data's sample 'clip5'"):
        extract(backbone, Items(bad), tmp_path / "train.h5")
    assert list(tmp_path.iterdir()) == []


def test_progress_bar_off_a_terminal(towers, tmp_path, capfd):
    backbone, items = setup("two_tower", towers, None, "linear")
    assert not os.isatty(2)
    features = extract_features(backbone, items, tmp_path / "train.h5", "data-v1", batch_size=8,
                                progress=True, desc="extract train")
    out, err = capfd.readouterr()
    assert out == ""  # stdout stays clean for --json
    assert "extract train" in err and f"{N}/{N}" in err
    assert len(features) == N


def test_lazy_reading_matches_in_memory(late, tmp_path):
    backbone, items = setup("late_fusion", None, late, "wander")
    path = tmp_path / "train.h5"
    extract(backbone, items, path)
    eager, lazy = CachedFeatures(path), CachedFeatures(path, in_memory=False)
    assert eager.in_memory and not lazy.in_memory
    for a, b in zip(DataLoader(eager, batch_size=7), DataLoader(lazy, batch_size=7)):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(IndexError):
        lazy[N]


def test_data_hash_follows_the_files_split_and_options(tmp_path):
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "train.csv").write_text("a,b\n")
    data = SimpleNamespace(name="food101", format="raw", path=tmp_path, report={})
    h = split_hash(data, "train", max_text_len=16)
    assert h == split_hash(data, "train", max_text_len=16)
    assert h != split_hash(data, "test", max_text_len=16)
    assert h != split_hash(data, "train", max_text_len=32)
    (tmp_path / "texts" / "train.csv").write_text("a,cd\n")  # (new size: the memo keys on stat)
    assert h != split_hash(data, "train", max_text_len=16)
    given = SimpleNamespace(name="food101", format="raw", path=tmp_path, report={"data_hash": "x"})
    assert split_hash(given, "train") != split_hash(data, "train")


# --- the extract stage and a fine-tuning run agree on the caches ---------------------------------
def stage_params(dataset: str, sizes: dict, folder: Path) -> dict:
    """params.yaml with ``dataset`` generated small in ``folder`` and no pre-trained checkpoint."""
    import yaml

    from harness.data import generate
    from harness.settings import load_params

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "params.yaml")) as stream:
        params = yaml.safe_load(stream)
    generate(dataset, folder / "data", seed=0, **sizes)
    params["profile"] = "tiny"
    params["data"]["tiny"][dataset]["path"] = str(folder / "data")
    params["profiles"]["tiny"]["two_tower"] = {"preset": "tiny"}
    # the Food-101 rows that fit the tiny preset's width (64): params.yaml is checked whole
    params["grid"]["food101"] = [row for row in params["grid"]["food101"]
                                 if row["method"] == "wander" or row.get("down_dim", 0) <= 64
                                 and row.get("rank", 0) <= 64]
    params["pretrain"]["use"] = {}
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    return load_params(folder / "params.yaml")


@pytest.mark.parametrize("dataset, sizes", [("food101", dict(n_train=30, n_test=10)),
                                            ("mosi", dict(n_train=24, n_valid=8, n_test=8))])
def test_extract_stage_prepares_what_a_run_reads(dataset, sizes, tmp_path):
    from harness.extract import extract_dataset
    from harness.features import plan_data_hashes
    from harness.run import prepare
    from harness.settings import plan_run

    params = stage_params(dataset, sizes, tmp_path)
    stale = tmp_path / "features" / dataset / "0123456789abcdef"  # another encoder's cache
    stale.mkdir(parents=True)
    (stale / "train.h5").write_bytes(b"old")
    stage = extract_dataset(params, dataset, tmp_path / "features", progress=False)
    assert {s["status"] for s in stage["splits"].values()} == {"computed: missing"}
    assert stage["removed"] == [stale.name] and not stale.exists()
    assert [p.name for p in (tmp_path / "features" / dataset).iterdir()] == [Path(stage["folder"]).name]

    # What harness.run.execute does for another seed with Wander: the frozen encoders do not
    # depend on the seed, so the run reads the stage's caches.
    plan = plan_run(params, dataset, "wander", seed=2, settings={"down_dim": 8, "fused_length": 8})
    prepared = prepare(plan)
    backbone, splits = prepared.backbone, prepared.splits
    apply_method(backbone, "wander", **plan.method_overrides)
    _, cached, info = cached_splits(backbone, splits, tmp_path / "features" / dataset,
                                    plan_data_hashes(plan, prepared.data, prepared.vocab),
                                    progress=False)
    assert info["encoder_hash"] == stage["encoder_hash"]
    assert {s["status"] for s in info["splits"].values()} == {"reused"}
    assert {n: len(c) for n, c in cached.items()} == {n: len(s) for n, s in splits.items()}


def test_the_extract_stage_output_does_not_depend_on_the_features_last_bits(tmp_path, monkeypatch):
    """What DVC hashes (``<out>/<dataset>.json``) names the encoder and the data, not the fp16
    features, whose last bits another CPU's kernels change: here, the same stage again with every
    encoder output scaled by (1 + 2^-9), two fp16 steps, writes other cache bytes and the same
    identity, byte for byte."""
    import harness.features as features
    from harness.extract import extract_dataset, identity_path

    params = stage_params("mosi", dict(n_train=24, n_valid=8, n_test=8), tmp_path)
    first = extract_dataset(params, "mosi", tmp_path / "a", progress=False)
    encode = features._encode_with_masks

    def other_rounding(backbone, batch):
        states, masks = encode(backbone, batch)
        return {m: s * (1 + 2 ** -9) for m, s in states.items()}, masks

    monkeypatch.setattr(features, "_encode_with_masks", other_rounding)
    extract_dataset(params, "mosi", tmp_path / "b", progress=False)
    name = Path(first["folder"]).name
    for split in ("train", "valid", "test"):
        assert (tmp_path / "a/mosi" / name / f"{split}.h5").read_bytes() != \
            (tmp_path / "b/mosi" / name / f"{split}.h5").read_bytes()
    written = identity_path(tmp_path / "a", "mosi").read_bytes()
    assert written == identity_path(tmp_path / "b", "mosi").read_bytes()
    identity = json.loads(written)
    assert identity["encoder_hash"] == first["encoder_hash"]
    assert identity["folder"] == Path(first["folder"]).name
    assert identity["splits"] == {name: {k: v for k, v in split.items() if k != "status"}
                                  for name, split in first["splits"].items()}
    assert set(identity["splits"]) == {"train", "valid", "test"}
    assert {s["n"] for s in identity["splits"].values()} == {24, 8}
