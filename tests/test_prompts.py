"""Tests for the prompt-based baselines: ``ptuning`` (P-tuning v2 / deep prompts), ``maple``
(MaPLe with the Wander cascade) and ``pmf`` (PMF interactive prompting).

Trainable-parameter counts are written here from the method definitions (tokens x width per
prompt tensor, weight + bias per linear), not read back from the modules. A small backbone with a
different width per modality (``MixedWidth``) makes the width terms of every formula distinct.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import methods.maple  # noqa: F401  (importing registers the method)
import methods.pmf  # noqa: F401
import methods.ptuning  # noqa: F401
from harness.audit import audit_backbone, audit_one, random_batch
from harness.backbones.base import LockstepBackbone
from harness.backbones.layers import EncoderLayer
from methods import ConfigError, apply_method, count_parameters, get_method

# The AUDIT_OVERRIDES entries these methods need on the audit backbone (width 32, depth 2).
AUDIT = {"ptuning": {}, "maple": {}, "pmf": {"translator_hidden": 16}}

WIDTHS = {2: (16, 24), 3: (16, 24, 32), 7: (8, 12, 16, 20, 24, 28, 32)}
IN_DIM = 6


class MixedWidth(LockstepBackbone):
    """Lock-step encoders whose widths differ per modality; head on the first tokens."""

    def __init__(self, widths: tuple[int, ...], depth: int = 3):
        super().__init__()
        self.modalities = tuple(f"m{i}" for i in range(len(widths)))
        self.lengths = {m: 5 + i % 3 for i, m in enumerate(self.modalities)}
        self.inputs = nn.ModuleDict({m: nn.Linear(IN_DIM, w) for m, w in zip(self.modalities, widths)})
        self.encoders = nn.ModuleDict({
            m: nn.ModuleList(EncoderLayer(w, 2, 0.0, 0.0, 0.0) for _ in range(depth))
            for m, w in zip(self.modalities, widths)})
        self.final_norms = nn.ModuleDict({m: nn.LayerNorm(w) for m, w in zip(self.modalities, widths)})
        self.head = nn.Linear(sum(widths), 1)

    def seq_len(self, modality: str) -> int:
        return self.lengths[modality]

    def embed(self, batch):
        return {m: self.inputs[m](batch[m]) for m in self.modalities}

    def pool(self, states):
        return torch.cat([states[m][:, 0] for m in self.modalities], dim=-1)


def mixed(n: int, depth: int = 3, seed: int = 0) -> MixedWidth:
    torch.manual_seed(seed)
    return MixedWidth(WIDTHS[n], depth).eval()


def mixed_batch(backbone: MixedWidth, batch_size: int = 3, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(batch_size, backbone.seq_len(m), IN_DIM, generator=g)
            for m in backbone.modalities}


def method_count(backbone: nn.Module, name: str, variant: str = "paper", **overrides) -> int:
    apply_method(backbone, name, variant, **overrides)
    return count_parameters(backbone)["method"]


# ---------------------------------------------------------------------------------------------
# closed-form parameter counts
# ---------------------------------------------------------------------------------------------

def ptuning_count(widths, depth, prompts=10):
    # one (prompts, D_m) tensor per layer per modality
    return sum(depth * prompts * d for d in widths)


def maple_count(widths, depth, prompts=2, prompt_depth=9):
    j = min(prompt_depth, depth)
    language = j * prompts * widths[0]                       # (b, D_0) per coupled depth
    couplings = j * sum(a * b + b for a, b in zip(widths, widths[1:]))  # chain m_k -> m_{k+1}
    return language + couplings


def pmf_count(widths, fusion=2, tokens=(4, 4, 4), hidden=None, train_fusion_context=True):
    q, qc, fc = tokens
    per_layer = (q + qc + (fc if train_fusion_context else 0)) * sum(widths)
    translators = 0
    for i, d_src in enumerate(widths):
        for j, d_dst in enumerate(widths):
            if i != j:
                h = hidden if hidden is not None else min(384, max(d_src, d_dst) // 2)
                translators += d_src * h + h + h * d_dst + d_dst  # Linear, ReLU, Linear
    return fusion * per_layer + (fusion - 1) * translators


@pytest.mark.parametrize("n", [2, 3, 7])
def test_ptuning_count(n):
    assert method_count(mixed(n), "ptuning") == ptuning_count(WIDTHS[n], 3)
    assert method_count(mixed(n), "ptuning", num_prompts=3) == ptuning_count(WIDTHS[n], 3, 3)
    # audit backbone: width 32, depth 2: 2 * 10 * 32 * n
    assert method_count(audit_backbone(n), "ptuning") == 2 * 10 * 32 * n


@pytest.mark.parametrize("n", [2, 3, 7])
def test_maple_count(n):
    widths = WIDTHS[n]
    assert method_count(mixed(n), "maple") == maple_count(widths, 3)            # J = 9 clipped to 3
    assert method_count(mixed(n, depth=4), "maple", prompt_depth=2) == maple_count(widths, 4, 2, 2)
    assert method_count(mixed(n), "maple", num_prompts=5) == maple_count(widths, 3, 5)
    # audit backbone: J = 2, b = 2: 2*2*32 + 2*(n-1)*(32*32 + 32)
    assert method_count(audit_backbone(n), "maple") == 2 * 2 * 32 + 2 * (n - 1) * (32 * 32 + 32)


@pytest.mark.parametrize("n", [2, 3, 7])
def test_pmf_count(n):
    widths = WIDTHS[n]
    assert method_count(mixed(n), "pmf") == pmf_count(widths)
    assert method_count(mixed(n), "pmf", "code") == pmf_count(widths, train_fusion_context=False)
    assert method_count(mixed(n), "pmf", translator_hidden=7, fusion_layers=3,
                        num_query_context=2) == pmf_count(widths, 3, (4, 2, 4), hidden=7)
    # audit backbone with the audit override (hidden 16): 2 fusion layers * 12 tokens * 32 * n
    # + 1 translation step * n(n-1) ordered pairs * (32*16 + 16 + 16*32 + 32)
    assert method_count(audit_backbone(n), "pmf", **AUDIT["pmf"]) == \
        2 * 12 * 32 * n + n * (n - 1) * (32 * 16 + 16 + 16 * 32 + 32)


def test_pmf_default_translator_width_is_half_the_wider_width_as_released():
    # the released check_args: max(D_vit / 2, D_bert / 2), 384 for ViT-B / BERT-base
    from methods.pmf import PMFConfig, translator_width
    assert translator_width(PMFConfig(), 768, 768) == 384
    assert translator_width(PMFConfig(), 1024, 768) == 512
    assert translator_width(PMFConfig(), 40, 40) == 20
    assert translator_width(PMFConfig(translator_hidden=64), 32, 32) == 64


def test_pmf_translator_is_linear_relu_linear_as_released():
    from methods.pmf import Translator
    layers = [type(layer) for layer in Translator(8, 4, 6)]
    assert layers == [torch.nn.Linear, torch.nn.ReLU, torch.nn.Linear]


# ---------------------------------------------------------------------------------------------
# prompts change the output; removing the provider restores the frozen backbone
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,variant", [("ptuning", "paper"), ("maple", "paper"),
                                          ("pmf", "paper"), ("pmf", "code")])
@pytest.mark.parametrize("n", [2, 3])
def test_prompts_change_output_and_removal_restores(name, variant, n):
    backbone = mixed(n)
    frozen = copy.deepcopy(backbone)
    batch = mixed_batch(backbone)
    apply_method(backbone, name, variant)
    backbone.eval()
    with torch.no_grad():
        reference = frozen(batch)
        prompted = backbone(batch)
        assert not torch.allclose(prompted, reference, atol=1e-5)
        backbone.set_prompts(None)
        assert torch.equal(backbone(batch), reference)


# ---------------------------------------------------------------------------------------------
# method-specific structure
# ---------------------------------------------------------------------------------------------

def test_ptuning_prompts_are_fresh_at_every_depth():
    backbone = mixed(3)
    apply_method(backbone, "ptuning")
    provider = backbone.prompts.eval()
    states = {m: torch.zeros(2, backbone.seq_len(m), backbone.hidden_size(m)) for m in backbone.modalities}
    for depth in range(3):
        garbage = {m: torch.full((2, 10, backbone.hidden_size(m)), 7.0) for m in backbone.modalities}
        out = provider(depth, states, garbage)
        for m in backbone.modalities:
            assert out[m].shape == (2, 10, backbone.hidden_size(m))
            assert torch.equal(out[m][0], provider.prompts[str(depth)][m])  # not `previous`


def test_ptuning_drops_each_samples_prompts_in_training_as_released():
    backbone = mixed(2)
    apply_method(backbone, "ptuning", dropout=0.5)
    provider = backbone.prompts.train()
    states = {m: torch.zeros(4, backbone.seq_len(m), backbone.hidden_size(m)) for m in backbone.modalities}
    torch.manual_seed(0)
    out = provider(0, states, {})
    for m in backbone.modalities:
        prompts = provider.prompts["0"][m]
        kept = out[m] != 0
        assert 0 < kept.float().mean() < 1
        assert torch.allclose(out[m][kept], (2 * prompts.expand(4, -1, -1))[kept])  # scaled by 1/(1-p)
        assert not torch.equal(kept[0], kept[1])  # a mask per sample


def test_maple_cascade_and_carry_over():
    backbone = mixed(3, depth=4)
    apply_method(backbone, "maple", prompt_depth=2, source="m1")
    provider = backbone.prompts
    assert provider.order == ("m1", "m0", "m2") and provider.prompt_depth == 2
    states = {m: torch.zeros(2, backbone.seq_len(m), backbone.hidden_size(m)) for m in backbone.modalities}
    for depth in range(2):  # coupled: source learnt, m0 = F(source), m2 = F'(m0)
        out = provider(depth, states, {})
        src = provider.source[str(depth)]
        first = provider.couplings[str(depth)]["m0"](src)
        second = provider.couplings[str(depth)]["m2"](first)
        for m, expected in (("m1", src), ("m0", first), ("m2", second)):
            assert out[m].shape == (2, 2, backbone.hidden_size(m))
            assert torch.allclose(out[m][1], expected)
    carried = {m: torch.randn(2, 2, backbone.hidden_size(m)) for m in backbone.modalities}
    for depth in (2, 3):  # beyond J the previous layer's prompt outputs are carried on
        out = provider(depth, states, carried)
        assert all(out[m] is carried[m] for m in backbone.modalities)
    # the last modality of the chain depends on the source prompts (gradient through 2 couplings)
    provider(0, states, {})["m2"].sum().backward()
    assert provider.source["0"].grad is not None and provider.source["0"].grad.abs().sum() > 0


def test_maple_clips_prompt_depth_to_backbone():
    backbone = audit_backbone(3)
    config = apply_method(backbone, "maple")
    assert config.prompt_depth == 9 and backbone.prompts.prompt_depth == backbone.depth == 2
    assert sorted(backbone.prompts.source) == ["0", "1"]


def test_pmf_previous_query_outputs_reach_translators():
    backbone = mixed(3, depth=4)  # fusion layers 2 and 3; translators at 3
    apply_method(backbone, "pmf", translator_hidden=8)
    provider = backbone.prompts
    assert provider.fusion_depths == (2, 3) and list(provider.translators) == ["3"]

    # what the backbone hands the provider: the previous layer's prompt outputs
    seen = {}
    original = provider.forward

    def spy(depth, states, previous):
        seen[depth] = {m: p.shape for m, p in previous.items()}
        return original(depth, states, previous)

    provider.forward = spy
    batch = mixed_batch(backbone)
    out = backbone(batch)
    widths = dict(zip(backbone.modalities, WIDTHS[3]))
    assert seen[0] == seen[1] == seen[2] == {}                          # no prompts before layer 2
    assert seen[3] == {m: (3, 12, widths[m]) for m in backbone.modalities}  # 4 + 4 + 4 at layer 2
    out.pow(2).mean().backward()
    for name, p in provider.translators.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # the query prompts of layer 2 train (through attention at layer 2 and their translation)
    for m in backbone.modalities:
        assert provider.query["2"][m].grad.abs().sum() > 0

    # closed form of the block at the translating layer: [Q; C^Q; C^F; mean_n f_{n->m}(prev_n[:4])]
    provider.forward = original
    states = {m: torch.zeros(3, backbone.seq_len(m), widths[m]) for m in backbone.modalities}
    previous = {m: torch.randn(3, 12, widths[m]) for m in backbone.modalities}
    with torch.no_grad():
        block = provider(3, states, previous)
        first = provider(2, states, {})
        for m in backbone.modalities:
            assert first[m].shape == (3, 12, widths[m])   # first fusion layer: no translated queries
            assert block[m].shape == (3, 16, widths[m])
            expected = torch.stack([provider.translators["3"][m][n](previous[n][:, :4])
                                    for n in backbone.modalities if n != m]).mean(0)
            assert torch.allclose(block[m][:, 12:], expected, atol=1e-6)
            assert torch.equal(block[m][0, :4], provider.query["3"][m])
            assert torch.equal(block[m][0, 8:12], provider.fusion_context["3"][m])
        # the query-context / fusion-context outputs of the previous layer are not translated
        other = {m: p.clone() for m, p in previous.items()}
        for p in other.values():
            p[:, 4:] = 0
        assert all(torch.equal(provider(3, states, other)[m], block[m]) for m in backbone.modalities)
    assert provider(0, states, {}) == {}


def test_pmf_code_variant_freezes_fusion_context():
    backbone = audit_backbone(3)
    apply_method(backbone, "pmf", "code", **AUDIT["pmf"])
    frozen = {name for name, p in backbone.named_parameters() if not p.requires_grad
              and name.startswith("prompts.")}
    assert frozen == {f"prompts.fusion_context.{d}.{m}" for d in (0, 1) for m in backbone.modalities}
    backbone.eval()
    backbone(random_batch(backbone)).sum().backward()
    assert all(dict(backbone.named_parameters())[name].grad is None for name in frozen)
    assert "fusion_context" in get_method("pmf").variant("code").flag


# ---------------------------------------------------------------------------------------------
# the generic audit
# ---------------------------------------------------------------------------------------------

AUDIT_JOBS = [(name, variant) for name in ("ptuning", "maple", "pmf")
              for variant in get_method(name).variants]


@pytest.mark.parametrize("name,variant", AUDIT_JOBS)
@pytest.mark.parametrize("n", [2, 3, 7])
def test_audit(name, variant, n):
    result = audit_one(name, variant, n, overrides=AUDIT[name])
    assert result["ok"], result
    flag = get_method(name).variant(variant).flag
    if flag is None:
        assert result["dead_tensors"] == [] and result["zero_grad_at_init"] == [], result
        assert result["identity_at_init"] is False  # prompts change the output from step 0
    else:
        assert result["flag"] == flag and result["dead_tensors"] == []
    expected = {"ptuning": 2 * 10 * 32 * n,
                "maple": 2 * 2 * 32 + 2 * (n - 1) * (32 * 32 + 32),
                "pmf": 2 * (4 + 4 + (4 if variant == "paper" else 0)) * 32 * n
                       + n * (n - 1) * (32 * 16 + 16 + 16 * 32 + 32)}[name]
    assert result["trainable_method"] == expected


@pytest.mark.parametrize("n", [2, 7])
def test_audit_maple_carry_regime(n):
    # prompt depth 1 on the 2-layer audit backbone: coupled at layer 0, carried into layer 1
    result = audit_one("maple", "paper", n, overrides={"prompt_depth": 1})
    assert result["ok"] and result["dead_tensors"] == [] and result["zero_grad_at_init"] == []


# ---------------------------------------------------------------------------------------------
# seven modalities, padding masks, forward + backward
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,variant", AUDIT_JOBS)
def test_forward_backward_seven_modalities_with_masks(name, variant):
    backbone = mixed(7)
    apply_method(backbone, name, variant)
    backbone.train()
    batch = mixed_batch(backbone, batch_size=4)
    for i, m in enumerate(backbone.modalities):  # pad the tail of some sequences
        mask = torch.ones(4, backbone.seq_len(m), dtype=torch.bool)
        mask[i % 4, 2:] = False
        batch[f"mask_{m}"] = mask
    out = backbone(batch)
    assert out.shape == (4, 1) and torch.isfinite(out).all()
    out.pow(2).mean().backward()
    for pname, p in backbone.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), pname
            assert p.grad.abs().sum() > 0, pname


# ---------------------------------------------------------------------------------------------
# invalid configurations
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,overrides,field", [
    ("ptuning", {"num_prompts": 0}, "num_prompts"),
    ("ptuning", {"init_std": -1.0}, "init_std"),
    ("maple", {"num_prompts": 0}, "num_prompts"),
    ("maple", {"prompt_depth": -2}, "prompt_depth"),
    ("maple", {"init_std": 0.0}, "init_std"),
    ("maple", {"source": "smell"}, "source"),
    ("pmf", {"fusion_layers": 1}, "fusion_layers"),
    ("pmf", {"fusion_layers": 3}, "fusion_layers"),   # the audit backbone has 2 layers
    ("pmf", {"num_query": 0}, "num_query"),
    ("pmf", {"num_query_context": -1}, "num_query_context"),
    ("pmf", {"num_fusion_context": -4}, "num_fusion_context"),
    ("pmf", {"translator_hidden": 0}, "translator_hidden"),
    ("pmf", {"reduce": "max"}, "reduce"),
    ("pmf", {"init_std": 0.0}, "init_std"),
])
def test_invalid_config(name, overrides, field):
    with pytest.raises(ConfigError) as error:
        apply_method(audit_backbone(2), name, "paper", **overrides)
    message = str(error.value)
    assert f".{field} = {overrides[field]!r}" in message


def test_unknown_field_is_a_config_error():
    with pytest.raises(ConfigError, match="prompt_length"):
        apply_method(audit_backbone(2), "ptuning", prompt_length=4)


def test_pmf_sum_reduce_scales_with_other_modalities():
    backbone = mixed(3, depth=2)
    apply_method(backbone, "pmf", reduce="sum")
    mean = copy.deepcopy(backbone.prompts)
    mean.config = copy.copy(mean.config)
    mean.config.reduce = "mean"
    widths = dict(zip(backbone.modalities, WIDTHS[3]))
    states = {m: torch.zeros(1, backbone.seq_len(m), widths[m]) for m in backbone.modalities}
    previous = {m: torch.randn(1, 12, widths[m]) for m in backbone.modalities}
    with torch.no_grad():
        summed, averaged = backbone.prompts(1, states, previous), mean(1, states, previous)
        for m in backbone.modalities:
            assert torch.allclose(summed[m][:, 12:], 2 * averaged[m][:, 12:], atol=1e-6)


def test_maple_deep_couplings_start_as_clones_of_one_linear_as_released():
    # released trainers/maple.py: the depth-0 projection of its own, then _get_clones of one Linear
    from methods.maple import CoupledPrompts, MaPLeConfig
    provider = CoupledPrompts({"t": 8, "a": 6, "v": 4}, ("t", "a", "v"), 4, MaPLeConfig())
    for dst in ("a", "v"):
        layers = [provider.couplings[str(i)][dst] for i in range(4)]
        assert not torch.equal(layers[0].weight, layers[1].weight)
        for layer in layers[2:]:
            assert torch.equal(layer.weight, layers[1].weight) and torch.equal(layer.bias, layers[1].bias)
            assert layer.weight is not layers[1].weight  # copies: each depth trains its own
