"""The MMT backbone (harness/backbones/mmt.py) and the retrieval loss: shapes, missing experts,
the method contract on a joint encoder (every method x variant), checkpoints across expert sets."""
from __future__ import annotations

import copy
import importlib

import pytest
import torch
from torch import nn

from harness.audit import AUDIT_OVERRIDES, audit_model
from harness.backbones.mmt import (ALL_EXPERTS, PRETRAIN_EXPERTS, MMTBackbone, MMTConfig,
                                   random_batch)
from harness.errors import InputError
from harness.tasks.retrieval_loss import max_margin_ranking_loss
from methods import ConfigError, apply_method, count_parameters, get_method, method_names

# Methods that live in their own modules register on import; take whatever exists.
for _name in ("aurora", "maple", "pmf", "ptuning", "uniadapter"):
    try:
        importlib.import_module(f"methods.{_name}")
    except ModuleNotFoundError:
        pass

# Sizes for the tiny MMT (width 32) on top of the audit's, and the one structural override:
# UniAdapter's default placement runs in parallel with a per-modality FFN block, which a joint
# encoder shared by all experts does not have (see test_uniadapter_parallel_is_refused).
MMT_OVERRIDES: dict[str, dict] = {
    "aurora": {"rank": 4},
    "uniadapter": {"down_dim": 8, "placement": "ffn"},
    "pmf": {"translator_hidden": 16},
}
CASES = [(m, v) for m in method_names() for v in get_method(m).variants]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices gain nothing from intra-op threads, and on a shared 2-core machine the
    thread pool's contention makes every matmul ~100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def overrides_for(method: str) -> dict:
    return {**AUDIT_OVERRIDES.get(method, {}), **MMT_OVERRIDES.get(method, {})}


def tiny(seed: int = 0, **config) -> MMTBackbone:
    torch.manual_seed(seed)
    return MMTBackbone(MMTConfig.tiny(**config)).eval()


# ---------------------------------------------------------------------------------------------
# shapes and missing experts
# ---------------------------------------------------------------------------------------------

def test_similarity_shape_and_modalities():
    model = tiny()
    assert model.modalities == ALL_EXPERTS and len(model.modalities) == 7
    assert all(model.seq_len(e) == 1 + model.config.max_tokens[e] for e in model.modalities)
    assert all(model.seq_len(e) <= 9 for e in model.modalities)
    sim = model(random_batch(model, batch_size=4))
    assert sim.shape == (4, 4) and torch.isfinite(sim).all()
    text, logits = model.encode_text(random_batch(model, batch_size=3, seed=1))
    video, present = model.encode_video(random_batch(model, batch_size=5, seed=2))
    assert text.shape == (3, 7, 32) and logits.shape == (3, 7) and video.shape == (5, 7, 32)
    assert model.similarity(text, logits, video, present).shape == (3, 5)
    assert torch.allclose(video.norm(dim=-1), torch.ones(5, 7), atol=1e-5)


def test_absent_expert_features_never_matter_and_stay_nan_free():
    model = tiny()
    batch = random_batch(model, batch_size=4)
    k, e = 2, "face"
    batch["present"][:, k] = torch.tensor([True, False, True, False])
    poisoned = copy.deepcopy(batch)
    absent = ~poisoned["present"][:, k]
    poisoned[e][absent] = float("nan")
    poisoned[f"{e}_time"][absent] = 999
    poisoned[f"mask_{e}"][absent] = True
    with torch.no_grad():
        sim, sim_poisoned = model(batch), model(poisoned)
        video, present = model.encode_video(batch)
        video_p, _ = model.encode_video(poisoned)
        text, logits = model.encode_text(batch)
    assert torch.isfinite(sim_poisoned).all()
    assert torch.equal(sim, sim_poisoned)
    others = [j for j in range(7) if j != k]
    assert torch.equal(video[:, others], video_p[:, others])
    # The absent expert's term is out and the mixture weights renormalise over the present ones.
    terms = torch.einsum("ied,jed->ije", text, video)
    expected = torch.zeros(4, 4)
    for i in range(4):
        for j in range(4):
            here = present[j]
            w = torch.softmax(logits[i][here], dim=0)
            expected[i, j] = (w * terms[i, j][here]).sum()
    assert torch.allclose(sim, expected, atol=1e-6)
    weights = model.mixture_weights(logits, present)
    assert torch.all(weights[:, absent, k] == 0)
    assert torch.allclose(weights.sum(-1), torch.ones(4, 4))
    # the backward pass through the NaN-filled expert is NaN-free as well
    model.train()
    max_margin_ranking_loss(model(poisoned)).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.experts[e].proj.weight.grad.abs().sum() > 0


def test_absent_expert_is_the_model_without_it():
    """Presence False masks an expert out exactly: a 7-expert model with 'ocr' absent everywhere
    gives the similarity of the same weights built without 'ocr'; an expert missing from the
    batch is absent too."""
    full = tiny()
    batch = random_batch(full, batch_size=4)
    batch["present"][:, ALL_EXPERTS.index("ocr")] = False
    without = tuple(e for e in ALL_EXPERTS if e != "ocr")
    small = MMTBackbone(MMTConfig.tiny(experts=without)).eval()
    result = small.load_state_dict(full.state_dict(), strict=False)
    assert result.missing_keys == [] and sorted(result.unexpected_keys) == sorted(full.expert_keys("ocr"))
    small_batch = {k: v for k, v in batch.items() if "ocr" not in k}
    small_batch["present"] = batch["present"][:, [ALL_EXPERTS.index(e) for e in without]]
    dropped = {k: v for k, v in batch.items() if k != "ocr" and k != "present"}
    dropped["present_ocr"] = torch.ones(4, dtype=torch.bool)  # claimed, but no features: absent
    for e in without:
        dropped[f"present_{e}"] = small_batch["present"][:, without.index(e)]
    with torch.no_grad():
        ours, theirs = full(batch), small(small_batch)
        assert torch.allclose(ours, theirs, atol=1e-6)
        assert torch.allclose(full(dropped), ours, atol=1e-6)


def test_nan_in_a_present_expert_is_an_input_error():
    model = tiny()
    batch = random_batch(model)
    j = int(torch.nonzero(batch["present"][:, 0])[0])
    batch["s3d"][j, 0, 0] = float("nan")
    batch["mask_s3d"][j, 0] = True
    with pytest.raises(InputError, match="s3d"):
        model(batch)
    batch = random_batch(model)
    batch["rgb"] = batch["rgb"][..., :5]
    with pytest.raises(InputError, match="rgb"):
        model(batch)


def test_time_ids():
    model = tiny()
    B, T = 1, 4
    seconds = torch.tensor([[-1, 0, 5, 999]])
    ids = model._time_ids({"s3d_time": seconds}, "s3d", B, T, "cpu")
    last = model.config.time_embeddings - 1
    assert ids.tolist() == [[1, 2, 7, last]]
    start_end = torch.tensor([[[0.5, 1.5], [2.9, 3.9], [float("nan"), 0.0], [3.0, 4.0]]])
    assert model._time_ids({"time_s3d": start_end}, "s3d", B, T, "cpu").tolist() == [[2, 4, 1, 5]]


# ---------------------------------------------------------------------------------------------
# the loss
# ---------------------------------------------------------------------------------------------

def test_ranking_loss_hand_computed_2x2():
    # Positives beat every negative by more than the margin in both directions: zero loss.
    s = torch.tensor([[0.9, 0.2], [0.3, 0.8]])
    assert max_margin_ranking_loss(s).item() == 0.0
    # a = 0.5, b = 0.48, c = 0.1, d = 0.6, margin 0.05:
    # t2v: relu(.05 + b - a) = .03, relu(.05 + c - d) = 0; v2t: relu(.05 + c - a) = 0,
    # relu(.05 + b - d) = 0 -> (mean(.03, 0) + mean(0, 0)) / 2 = .0075
    s = torch.tensor([[0.5, 0.48], [0.1, 0.6]], requires_grad=True)
    loss = max_margin_ranking_loss(s)
    assert loss.item() == pytest.approx(0.0075, abs=1e-7)
    loss.backward()
    assert torch.allclose(s.grad, torch.tensor([[-0.25, 0.25], [0.0, 0.0]]))
    # A negative above its positive in both directions.
    s = torch.tensor([[0.1, 0.4], [0.0, 0.2]])
    # t2v: relu(.05+.4-.1)=.35, relu(.05+0-.2)=0; v2t: relu(.05+0-.1)=0, relu(.05+.4-.2)=.25
    assert max_margin_ranking_loss(s).item() == pytest.approx((0.35 / 2 + 0.25 / 2) / 2)
    assert max_margin_ranking_loss(torch.ones(1, 1)).item() == 0.0
    with pytest.raises(ValueError, match="square"):
        max_margin_ranking_loss(torch.zeros(2, 3))


def test_loss_trains_the_tiny_model():
    model = tiny()
    model.train()
    loss = max_margin_ranking_loss(model(random_batch(model)))
    assert loss.item() > 0
    loss.backward()
    assert model.head.units["s3d"].fc.weight.grad is not None


# ---------------------------------------------------------------------------------------------
# every method x variant on the 7-expert tiny MMT
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, variant", CASES)
def test_every_method_applies_and_trains(method, variant):
    model = tiny()
    head = sum(p.numel() for p in model.head.parameters())
    batch = random_batch(model, batch_size=4)
    report = audit_model(model, batch, method, variant, overrides_for(method))
    with torch.no_grad():
        out = model.eval()(batch)
    assert out.shape == (4, 4) and torch.isfinite(out).all()
    assert report["trainable_head"] == head  # the task head stays whole and trainable
    assert report["identity_at_init"] == report["identity_expected"]
    if report["flag"] is None:
        assert report["dead_tensors"] == [], report["dead_tensors"]


def test_uniadapter_parallel_is_refused():
    if "uniadapter" not in method_names():
        pytest.skip("uniadapter not registered")
    with pytest.raises(ConfigError, match="placement"):
        apply_method(tiny(), "uniadapter", down_dim=8)


def test_lora_can_adapt_both_towers():
    model = tiny(adapt_text=True)
    frozen = copy.deepcopy(model)
    roles = {s.modality for s in model.linear_sites()}
    assert roles == {"video", "text"}
    apply_method(model, "lora", rank=4, target_roles=("q", "v"))
    names = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    assert any(n.startswith("text.") for n in names) and any(n.startswith("layers.") for n in names)
    batch = random_batch(model)
    with torch.no_grad():
        assert torch.allclose(model(batch), frozen(batch), atol=1e-6)
    # paper preset default: video tower only
    assert {s.modality for s in tiny().linear_sites()} == {"video"}


class Probe(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(width))
        self.seen: list[tuple] = []

    def forward(self, x):
        self.seen.append(tuple(x.shape))
        return x + self.shift


def test_segment_adapters_see_their_segment_and_share_weights():
    model = tiny()
    shared = Probe(32)
    model.set_adapter("ffn", "face", 1, shared)
    model.set_adapter("ffn", "ocr", 1, shared)
    with torch.no_grad():
        before = model.encode_video(random_batch(model))[0]
        shared.shift.copy_(torch.linspace(-1.0, 1.0, 32))  # not uniform: the final LayerNorm
        # would remove a constant shift
        after = model.encode_video(random_batch(model))[0]
    assert (4, model.seq_len("face"), 32) in shared.seen and (4, model.seq_len("ocr"), 32) in shared.seen
    assert len(shared.seen) == 4
    # the shared module counts once
    assert sum(p.numel() for p in model.parameters()) == \
        sum(p.numel() for p in tiny().parameters()) + 32
    # after the last layer only the adapted experts' outputs move
    moved = (before - after).abs().amax(dim=(0, 2)) > 1e-6
    assert moved.tolist() == [e in ("face", "ocr") for e in ALL_EXPERTS]


def test_fusion_hook_and_prompts_see_segments():
    model = tiny()
    seen = {}

    class Hook(nn.Module):
        def forward(self, states):
            seen.update({e: tuple(x.shape) for e, x in states.items()})
            return {e: x + 1.0 for e, x in states.items()}

    class Prompts(nn.Module):
        def forward(self, depth, states, previous):
            seen[f"prev{depth}"] = {e: tuple(x.shape) for e, x in previous.items()}
            return {e: x[:, :2] * 0 for e, x in states.items() if e in ("s3d", "scene")}

    model.set_fusion_hook(0, Hook())
    model.set_prompts(Prompts())
    assert torch.isfinite(model(random_batch(model))).all()
    assert all(seen[e] == (4, model.seq_len(e), 32) for e in ALL_EXPERTS)
    assert seen["prev0"] == {} and seen["prev1"] == {"s3d": (4, 2, 32), "scene": (4, 2, 32)}
    with pytest.raises(ValueError):
        model.set_fusion_hook(2, Hook())


# ---------------------------------------------------------------------------------------------
# presets and checkpoints
# ---------------------------------------------------------------------------------------------

def test_paper_preset_instantiates():
    model = MMTBackbone(MMTConfig.paper())
    assert model.modalities == ALL_EXPERTS
    assert model.text.config.hidden_size == 768 and model.text.config.num_hidden_layers == 12
    assert model.config.width == 512 and model.depth == 4 and model.config.heads == 4
    assert {e: model.seq_len(e) for e in ALL_EXPERTS} == {e: 31 for e in ALL_EXPERTS}
    head = sum(p.numel() for p in model.head.parameters())
    assert head == 7 * (768 * 512 + 512 + 512 * 512 + 512) + 7 * (768 + 1) == 4_600_071
    total = sum(p.numel() for p in model.parameters())
    assert 125e6 < total < 140e6  # the Wander paper's MSR-VTT "Full fine-tuning" row: 134M
    apply_method(model, "wander", down_dim=8)  # the paper's "Wander (d=8)" row
    counts = count_parameters(model)
    assert counts["head"] == 4_600_071
    assert counts["method"] == 7 * (512 * 8 + 8 + 8 * 512 * 8 + 8 * 8 * 31)


def test_two_expert_checkpoint_loads_into_seven():
    pretrained = tiny(experts=PRETRAIN_EXPERTS)
    model = tiny(seed=1)
    result = model.load_state_dict(pretrained.state_dict(), strict=False)
    new = [e for e in ALL_EXPERTS if e not in PRETRAIN_EXPERTS]
    expected = sorted(k for e in new for k in model.expert_keys(e))
    assert sorted(result.missing_keys) == expected and result.unexpected_keys == []
    assert expected and all(any(f".{e}." in k for e in new) for k in expected)
    state = model.state_dict()
    for key, value in pretrained.state_dict().items():
        assert torch.equal(state[key], value)
