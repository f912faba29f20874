"""Performance work (issue 16) that must not change what is computed, and what may: Wander's SF as
two matmuls (the einsum's numbers up to float summation order), short attention on CPU written
out (SDPA's numbers up to summation order), Aurora's Tucker slices as one matmul, the feature cache indexed a batch
at a time (the same batches in the same order), the thread policy, single-threaded pre-training
(the same checkpoint bytes whatever the thread count), opt-in bf16 autocast on CPU (in the run key),
and commands that do not import heavy packages they do not need."""
from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from harness.backbones.late_fusion import LateFusionBackbone, LateFusionConfig
from harness.backbones.layers import Attention
import torch.nn.functional as F
from harness.errors import InputError
from harness.features import CachedFeatures, extract_features
from harness.train import (DEFAULT_THREADS, THREADS_ENV, TrainSettings, _autocast, batches,
                           thread_count)
from helpers import ROOT
from methods.wander import Wander, WanderConfig

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


# --- Wander SF: two matmuls -------------------------------------------------------------------------
def einsum_sf(module: Wander, xs: list[torch.Tensor]) -> torch.Tensor:
    """Eq. 13, last line, written as the einsum the two-matmul form replaced."""
    terms = [torch.einsum("tl,bld,hd->bth", module.w_t[m].sum(0), x, module.w_h[m].sum(0))
             for m, x in zip(module.modalities, xs)]
    return math.prod(terms[1:], start=terms[0])


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-13)])
@pytest.mark.parametrize("form", ["sf", "vf"])
def test_sf_two_matmuls_equal_the_einsum_up_to_summation_order(form, dtype, tolerance):
    """SF and its gradients agree with the einsum of Eq. 13 up to rounding: within float32's
    precision, and within float64's (so only the summation order differs)."""
    torch.manual_seed(0)
    lengths = {"text": 12, "audio": 9, "vision": 7}
    config = WanderConfig(down_dim=8, fused_length=6, rank_h=3, rank_t=4, form=form)
    module = Wander({m: 16 for m in lengths}, lengths, 16, config, "gelu").to(dtype)
    xs = [torch.randn(5, 1 if form == "vf" else lengths[m], 8, dtype=dtype, requires_grad=True)
          for m in lengths]
    ours, reference = module.fuse(xs), einsum_sf(module, xs)
    assert ours.shape == (5, 6, 16) and ours.is_contiguous()
    assert (ours - reference).abs().max() <= tolerance * reference.abs().max()
    upstream = torch.randn_like(ours)
    grads = torch.autograd.grad(ours, [*xs, *module.parameters()], upstream, allow_unused=True)
    expected = torch.autograd.grad(reference, [*xs, *module.parameters()], upstream, allow_unused=True)
    for got, want in zip(grads, expected):
        if want is None:  # Down is not part of fuse
            assert got is None
            continue
        assert (got - want).abs().max() <= tolerance * want.abs().max()


# --- attention over fewer than 16 keys on CPU: written out ---------------------------------------
def sdpa_attention(layer: Attention, x: torch.Tensor, key_padding: torch.Tensor | None) -> torch.Tensor:
    """The layer's attention as scaled_dot_product_attention alone (no CPU path)."""
    batch, length, width = x.shape

    def split(t):
        return t.view(batch, length, layer.heads, width // layer.heads).transpose(1, 2)

    mask = None if key_padding is None else key_padding[:, None, None, :]
    out = F.scaled_dot_product_attention(split(layer.q(x)), split(layer.k(x)), split(layer.v(x)),
                                         attn_mask=mask)
    return layer.o(out.transpose(1, 2).reshape(batch, length, width))


@pytest.mark.parametrize("length", [1, 5, 12, 15, 16, 17])
@pytest.mark.parametrize("masked", [True, False])
def test_short_attention_on_cpu_gives_sdpa_and_its_gradients(length, masked):
    """In float64 the written-out path agrees with SDPA to rounding, outputs and gradients,
    including a sample whose every key is masked (SDPA answers zeros there, and no NaN gradient)."""
    torch.manual_seed(length)
    layer = Attention(32, 4, dropout=0.0).double()
    x = torch.randn(3, length, 32, dtype=torch.float64, requires_grad=True)
    key_padding = None
    if masked:
        key_padding = torch.rand(3, length) > 0.3
        key_padding[0, 0], key_padding[2] = True, False  # sample 2 attends to nothing
    upstream = torch.randn(3, length, 32, dtype=torch.float64)
    ours = layer(x, key_padding)
    reference = sdpa_attention(layer, x, key_padding)
    assert torch.allclose(ours, reference, rtol=0, atol=1e-12)
    params = [x, *layer.parameters()]
    ours_grads = torch.autograd.grad((ours * upstream).sum(), params)
    reference_grads = torch.autograd.grad((reference * upstream).sum(), params)
    for a, b in zip(ours_grads, reference_grads):
        assert torch.isfinite(a).all()
        assert torch.allclose(a, b, rtol=0, atol=1e-11)


def test_short_attention_drops_attention_weights_in_training_only():
    """Attention dropout acts on the weights when training (outputs change with the seed) and
    not in evaluation (the SDPA answer)."""
    layer = Attention(16, 2, dropout=0.5)
    x = torch.randn(2, 6, 16)
    layer.eval()
    assert torch.allclose(layer(x, None), sdpa_attention(layer, x, None), atol=1e-6)
    layer.train()
    torch.manual_seed(0)
    first = layer(x, None)
    torch.manual_seed(1)
    assert not torch.allclose(first, layer(x, None))


def test_aurora_tucker_slices_are_the_core_times_p():
    """C x_3 p (the Tucker form's slices) as one matmul equals the einsum of its definition."""
    from methods.aurora import AuroraConfig, AuroraFactors, AuroraLinear

    torch.manual_seed(0)
    factors = AuroraFactors(8, 6, "tucker")
    layer = AuroraLinear(torch.nn.Linear(8, 32), factors, "fc1", AuroraConfig(rank=6, form="tucker"))
    expected = torch.einsum("rsk,iok->iors", factors.core, layer.p)
    assert torch.allclose(layer.mixing(), expected, atol=1e-6)


# --- the optimiser without torch.optim.Optimizer -----------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("decoupled", [False, True])
def test_optimiser_gives_torch_optims_parameters_bit_for_bit(decoupled, dtype, seed):
    """harness.optim.Adam / StepLR (multi-tensor update) against torch.optim.Adam (AdamW) / StepLR
    with the per-tensor update (``foreach=False``, torch.optim's path on CPU): the same
    parameters after 60 steps over 6 epochs with clipping, weight decay, a decay every 2 epochs,
    parameters of several shapes (a scalar, vectors, matrices, a 3-d tensor) and a parameter
    that never gets a gradient."""
    from harness.optim import Adam, StepLR

    def train(make_optimizer, make_schedule) -> list[torch.Tensor]:
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.GELU(), torch.nn.LayerNorm(7),
                                    torch.nn.Linear(7, 3)).to(dtype)
        scale = torch.nn.Parameter(torch.ones((), dtype=dtype))
        mixing = torch.nn.Parameter(torch.randn(2, 3, 3, dtype=dtype))
        unused = torch.nn.Parameter(torch.randn(3, dtype=dtype))
        parameters = [*model.parameters(), scale, mixing, unused]
        optimizer = make_optimizer(parameters)
        schedule = make_schedule(optimizer)
        g = torch.Generator().manual_seed(seed + 1)
        for _ in range(6):
            for _ in range(10):
                out = scale * model(torch.randn(4, 5, generator=g, dtype=dtype))
                loss = torch.einsum("bi,kij,bj->", out, mixing, out).pow(2) / 100 + out.pow(2).mean()
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(parameters, 0.5)
                optimizer.step()
            schedule.step()
        return [p.detach().clone() for p in parameters]

    reference = torch.optim.AdamW if decoupled else torch.optim.Adam
    ours = train(lambda ps: Adam(ps, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=decoupled),
                 lambda optimizer: StepLR(optimizer, 2, 0.5))
    theirs = train(lambda ps: reference(ps, lr=1e-2, weight_decay=0.1, foreach=False),
                   lambda optimizer: torch.optim.lr_scheduler.StepLR(optimizer, 2, 0.5))
    assert not torch.equal(ours[0], train(lambda ps: Adam(ps, lr=1e-2), lambda o: StepLR(o, 2, 1.0))[0])
    for got, want in zip(ours, theirs):
        assert got.dtype == dtype and torch.equal(got, want)


# --- the cached-feature loop ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    torch.manual_seed(0)
    config = LateFusionConfig(input_dims={"text": 6, "audio": 4}, seq_lens={"text": 5, "audio": 3},
                              width=8, depth=1, heads=2)
    backbone = LateFusionBackbone(config)
    g = torch.Generator().manual_seed(1)
    items = [{"text": torch.randn(5, 6, generator=g), "audio": torch.randn(3, 4, generator=g),
              "label": torch.tensor(float(i)), "index": torch.tensor(i)} for i in range(37)]
    path = tmp_path_factory.mktemp("cache") / "train.h5"
    extract_features(backbone, items, path, "data", batch_size=8, progress=False)
    return path


@pytest.mark.parametrize("in_memory", [True, False])
def test_cache_gives_the_same_batches_in_the_same_order(cache, in_memory):
    """Indexed a batch at a time, the cache yields what the per-item Dataset + default_collate
    yielded, batch for batch, for the same seed (and in order without one)."""
    features = CachedFeatures(cache, in_memory=in_memory)
    per_item = [features[i] for i in range(len(features))]
    for seed in (None, 3):
        got = list(batches(features, 8, seed))
        want = list(batches(per_item, 8, seed))  # a list: item by item + default_collate
        assert len(got) == len(want) == 5
        for a, b in zip(got, want):
            assert a.keys() == b.keys()
            for key in a:
                assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key])
    shuffled = torch.cat([batch["index"] for batch in batches(features, 8, 3)])
    assert sorted(shuffled.tolist()) == list(range(37)) and shuffled.tolist() != list(range(37))


def test_in_memory_sentiment_split_gives_the_same_batches_in_the_same_order():
    """An in-memory MOSI-format split indexed a batch at a time yields what its items +
    default_collate yielded (ids included), batch for batch, for the same seed and in order."""
    from harness.data.sentiment import ArrayDataset

    g = np.random.default_rng(0)
    split = ArrayDataset({"text": g.standard_normal((37, 5, 6)).astype(np.float32),
                          "mask_text": g.random((37, 5)) > 0.3,
                          "label": g.standard_normal(37).astype(np.float32)},
                         [f"clip{i}" for i in range(37)])
    per_item = [split[i] for i in range(len(split))]
    for seed in (None, 3):
        got, want = list(batches(split, 8, seed)), list(batches(per_item, 8, seed))
        assert len(got) == len(want) == 5
        for a, b in zip(got, want):
            assert a.keys() == b.keys() and a["id"] == b["id"]
            for key in a.keys() - {"id"}:
                assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key])


def test_cache_refuses_items_outside_it(cache):
    features = CachedFeatures(cache, in_memory=True)
    with pytest.raises(IndexError, match="37-item"):
        features.batch([0, 37])
    with pytest.raises(IndexError, match="37-item"):
        features.batch([-1])


# --- the thread policy ----------------------------------------------------------------------------
def test_thread_policy(monkeypatch):
    monkeypatch.delenv(THREADS_ENV, raising=False)
    assert thread_count("auto", "tiny") == 1
    assert thread_count("auto", "paper") == DEFAULT_THREADS
    assert thread_count(3, "tiny") == 3
    monkeypatch.setenv(THREADS_ENV, "2")  # the user's environment wins
    assert thread_count("auto", "tiny") == 2 and thread_count(3, "paper") == 2


@pytest.mark.parametrize("setting", [0, -1, "two", 1.5, True])
def test_bad_thread_setting_names_the_key(monkeypatch, setting):
    monkeypatch.delenv(THREADS_ENV, raising=False)
    with pytest.raises(InputError, match="threads") as error:
        thread_count(setting, "tiny", "params.yaml")
    assert "params.yaml" in str(error.value) and repr(setting) in str(error.value)


@pytest.mark.parametrize("value", ["0", "x", "-2"])
def test_bad_thread_environment_names_the_variable(monkeypatch, value):
    monkeypatch.setenv(THREADS_ENV, value)
    with pytest.raises(InputError, match=THREADS_ENV):
        thread_count("auto", "tiny")


def test_commands_apply_the_thread_policy(tmp_path, monkeypatch):
    """A command under ``threads: auto`` (tiny) runs one thread; OMP_NUM_THREADS overrides it; a
    bad ``threads`` value exits 2 naming the key before anything runs."""
    from harness import cli
    from harness.settings import load_params

    params = (ROOT / "params.yaml").read_text()
    assert "\nthreads: auto\n" in params
    (tmp_path / "params.yaml").write_text(params)
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv(THREADS_ENV, raising=False)
        torch.set_num_threads(2)
        assert cli._use_threads(load_params(tmp_path / "params.yaml")) == 1
        assert torch.get_num_threads() == 1
        monkeypatch.setenv(THREADS_ENV, "2")
        assert cli._use_threads(load_params(tmp_path / "params.yaml")) == 2
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    monkeypatch.delenv(THREADS_ENV)
    (tmp_path / "params.yaml").write_text(params.replace("\nthreads: auto\n", "\nthreads: 0\n"))
    code = cli.main(["run", "--dataset", "mosi", "--method", "linear", "--params",
                     str(tmp_path / "params.yaml"), "--out", str(tmp_path / "runs")])
    assert code == 2 and not (tmp_path / "runs").exists()


# --- determinism of pre-training ------------------------------------------------------------------
def test_pretraining_gives_the_same_bytes_whatever_the_thread_count(tmp_path):
    """Run unpinned, these sizes give another checkpoint under 2 threads than under 1 (every
    tensor differs in its last bits); pre-training runs single-threaded, so the bytes agree."""
    from harness.data import generate
    from harness.pretrain import pretrain

    generate("mosei", tmp_path / "mosei", seed=0, n_train=64, n_valid=16, n_test=8)
    before, digests = torch.get_num_threads(), []
    try:
        for threads in (1, 2):  # what OMP_NUM_THREADS=1 / 2 or the thread policy would set
            torch.set_num_threads(threads)
            pretrain("mosei", tmp_path / f"ck{threads}.pt", {"width": 32, "depth": 2, "heads": 4},
                     {"epochs": 2, "batch_size": 32}, seed=0,
                     data={"path": str(tmp_path / "mosei")}, progress=False)
            assert torch.get_num_threads() == threads  # restored afterwards
            digests.append(hashlib.sha256((tmp_path / f"ck{threads}.pt").read_bytes()).hexdigest())
    finally:
        torch.set_num_threads(before)
    assert digests[0] == digests[1]


# --- bf16 autocast on CPU -------------------------------------------------------------------------
def test_bf16_autocast_on_cpu_is_opt_in_and_in_the_run_key():
    from harness.run import run_key
    from harness.settings import load_params, plan_run

    assert TrainSettings().amp is False
    settings = TrainSettings(amp=True, device="cpu")
    settings.validate()
    layer = torch.nn.Linear(4, 3)
    with _autocast(settings):
        assert layer(torch.randn(2, 4)).dtype == torch.bfloat16
    with _autocast(TrainSettings()):
        assert layer(torch.randn(2, 4)).dtype == torch.float32
    params = load_params(ROOT / "params.yaml")
    plain = plan_run(params, "mosi", "linear")
    mixed = plan_run(params, "mosi", "linear", overrides={"amp": "true"})
    assert plain.train.amp is False and mixed.train.amp is True
    assert mixed.identity()["train"]["amp"] is True  # the identity is stored in the record
    assert run_key(plain) != run_key(mixed)


# --- imports --------------------------------------------------------------------------------------
HEAVY = ("transformers", "torch._dynamo", "ray", "optuna", "pandas", "matplotlib")


def test_harness_imports_no_heavy_package_it_does_not_need():
    """Importing the run, sweep, pre-training and extraction code, hashing a late-fusion
    backbone's encoders (the feature cache key) and training a model (the optimiser: torch.optim's
    would import torch._dynamo) imports none of the heavy packages."""
    script = ("import sys, torch\nimport harness.cli, harness.run, harness.sweep, harness.pretrain, "
              "harness.extract\nfrom harness.features import encoder_hash\n"
              "from harness.backbones.late_fusion import LateFusionBackbone, LateFusionConfig\n"
              "from harness.tasks.tasks import TASKS\n"
              "from harness.train import TrainSettings, run_loaders, train_and_select\n"
              "encoder_hash(LateFusionBackbone(LateFusionConfig()))\n"
              "class Probe(torch.nn.Linear):\n"
              "    def forward(self, batch): return super().forward(batch['x']).squeeze(-1)\n"
              "items = [{'x': torch.randn(3), 'label': torch.tensor(1.0)} for _ in range(8)]\n"
              "settings = TrainSettings(epochs=2, batch_size=4)\n"
              "loaders = run_loaders({'train': items, 'valid': items}, settings, seed=0)\n"
              "train_and_select(Probe(3, 1), TASKS['regression'], loaders, settings, progress=False)\n"
              f"print([m for m in {HEAVY!r} if m in sys.modules])\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=ENV, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_data_stage_generates_without_torch(tmp_path):
    """A data@ stage reads its few params keys without importing torch (about 2 s of each of the
    ten stages); a profile it does not know exits 2 naming the key."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["generate"]["mosi"] = {**params["generate"]["mosi"], "n_train": 24, "n_valid": 8, "n_test": 8}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    script = ("import sys\nfrom harness.cli import main\ncode = main(['data', '--dataset', 'mosi'])\n"
              "print(code, 'torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=ENV, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-2:] == ["0", "False"]
    assert (tmp_path / "datasets" / "generated" / "mosi" / "generated.json").is_file()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({**params, "profile": "small"}))
    bad = subprocess.run([sys.executable, "-m", "harness.cli", "data", "--dataset", "mosi"], cwd=tmp_path,
                         env=ENV, capture_output=True, text=True)
    assert bad.returncode == 2
    assert "profile" in bad.stderr and "'small'" in bad.stderr


def test_lock_check_reads_what_the_full_metadata_parse_reads():
    """The lock check reads each installed package's name and version from its metadata's header
    block only: the same as ``importlib.metadata``'s full parse, for every installed package."""
    from importlib import metadata

    from harness.records import _name_and_version

    distributions = list(metadata.distributions())
    assert len(distributions) > 10
    for distribution in distributions:
        assert _name_and_version(distribution) == (distribution.metadata["Name"],
                                                    distribution.version)


# --- per-run work done once per process -----------------------------------------------------------
def test_card_is_parsed_once_per_text(tmp_path, monkeypatch):
    """A run reads its card several times: the YAML is parsed once per text, and an edited card is
    read afresh (the cache is keyed by the file's text)."""
    from harness.data import cards

    card = (cards.cards_dir() / "mosi.yaml").read_text()
    folder = tmp_path / "datasets"
    folder.mkdir()
    (folder / "mosi.yaml").write_text(card)
    monkeypatch.setattr(cards, "cards_dir", lambda: folder)
    parsed = cards._parsed.cache_info().misses
    first, second = cards.load_card("mosi"), cards.load_card("mosi")
    assert first.raw == second.raw and first.raw is not second.raw  # copies: callers may edit
    assert cards._parsed.cache_info().misses <= parsed + 1
    (folder / "mosi.yaml").write_text(card.replace("title:", "title: edited", 1))
    assert cards.load_card("mosi").raw["title"].startswith("edited")
