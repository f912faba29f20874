"""The generic checks every method x variant must pass (the method contract, methods/base.py)."""
import copy
import inspect
import json
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig, get_peft_model, inject_adapter_in_model

from harness.audit import AUDIT_MODALITIES, AUDIT_OVERRIDES, audit_backbone, audit_one, random_batch
from harness.backbones.mmt import MMTBackbone, MMTConfig
from harness.backbones.two_tower import TwoTowerBackbone, TwoTowerConfig
from harness.cli import main
from methods import apply_method, count_parameters, get_method, method_names
from methods.base import Backbone, LinearSite
from methods.lora import ROLES, LoraConfig, target_paths

CASES = [(m, v) for m in method_names() for v in get_method(m).variants]


@pytest.mark.parametrize("method, variant", CASES)
@pytest.mark.parametrize("n", AUDIT_MODALITIES)
def test_gradient_health_and_identity(method, variant, n):
    row = audit_one(method, variant, n)
    if row["flag"] is None:
        assert row["dead_tensors"] == [], row["dead_tensors"]
    if row["identity_expected"] is not None:
        assert row["identity_at_init"] == row["identity_expected"]
    assert row["ok"]


@pytest.mark.parametrize("method, variant", CASES)
def test_seven_modalities_forward_backward(method, variant):
    backbone = audit_backbone(7)
    apply_method(backbone, method, variant, **AUDIT_OVERRIDES.get(method, {}))
    out = backbone(random_batch(backbone))
    out.pow(2).mean().backward()
    assert torch.isfinite(out).all()
    trainable = [p for p in backbone.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)


@pytest.mark.parametrize("method, variant", CASES)
def test_count_split_into_method_and_head(method, variant):
    backbone = audit_backbone(3)
    head = sum(p.numel() for p in backbone.head.parameters())
    apply_method(backbone, method, variant, **AUDIT_OVERRIDES.get(method, {}))
    counts = count_parameters(backbone)
    if backbone.head_choice != "default":  # the variant asked for another head (Wander code)
        head = sum(p.numel() for p in backbone.make_head(backbone.head_choice).parameters())
    assert counts["head"] == head
    everything = sum(p.numel() for p in backbone.parameters() if p.requires_grad)
    assert counts["method"] + counts["head"] == everything


def peft_config(backbone, config: LoraConfig) -> PeftLoraConfig:
    """``config`` as the peft library's LoRA config on the same linears (the reference that
    ``methods/lora.py`` matches)."""
    return PeftLoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                          target_modules=target_paths(backbone, config.target_roles))


@pytest.mark.parametrize("roles", [("q", "v"), ROLES])
def test_lora_count_equals_peft_count(roles):
    ours = audit_backbone(3)
    theirs = copy.deepcopy(ours)
    apply_method(ours, "lora", rank=4, target_roles=roles)
    peft_model = get_peft_model(theirs, peft_config(theirs, LoraConfig(rank=4, target_roles=roles)))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert count_parameters(ours)["method"] == trainable


def late_fusion_and_batch():
    backbone = audit_backbone(3)
    return backbone, random_batch(backbone)


def two_tower_and_batch():  # Hugging Face BERT and ViT towers (random weights)
    torch.manual_seed(0)
    backbone = TwoTowerBackbone(TwoTowerConfig.tiny())
    return backbone, backbone.example_batch(3)


@pytest.mark.parametrize("build", [late_fusion_and_batch, two_tower_and_batch])
@pytest.mark.parametrize("roles, dropout", [(("q", "v"), 0.0), (ROLES, 0.25)])
def test_lora_equals_peft_bit_for_bit(build, roles, dropout):
    """Our LoRA and peft's, applied after the same seed: the same parameters (names, order,
    trainable flags, values), then the same outputs and gradients in training (dropout's draws
    included) once B is moved off zero."""
    ours, batch = build()
    theirs = copy.deepcopy(ours)
    fields = {"rank": 4, "dropout": dropout, "target_roles": roles}
    torch.manual_seed(1)
    apply_method(ours, "lora", **fields)
    torch.manual_seed(1)
    inject_adapter_in_model(peft_config(theirs, LoraConfig(**fields)), theirs)
    for name, parameter in theirs.named_parameters():  # apply_method's trainable set
        parameter.requires_grad_("lora_" in name or name.startswith("head."))
    ours_named, theirs_named = list(ours.named_parameters()), list(theirs.named_parameters())
    assert [(n, p.requires_grad) for n, p in ours_named] == [(n, p.requires_grad) for n, p in theirs_named]
    assert any("lora_A.default" in n for n, _ in ours_named)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(ours_named, theirs_named))
    torch.manual_seed(2)
    for (name, a), (_, b) in zip(ours_named, theirs_named):
        if "lora_B" in name:
            with torch.no_grad():
                b.copy_(a.copy_(torch.randn_like(a)))
    outputs = []
    for model in (ours, theirs):
        model.train()
        torch.manual_seed(3)
        out = model(batch)
        out.square().mean().backward()
        outputs.append(out)
    assert torch.equal(outputs[0], outputs[1])
    assert all(torch.equal(a.grad, b.grad) for (_, a), (_, b) in zip(ours_named, theirs_named)
               if a.requires_grad)


def test_lora_refuses_a_target_that_is_not_a_linear():
    backbone = audit_backbone(2)
    path = target_paths(backbone, ("q",))[0]
    parent, _, attribute = path.rpartition(".")
    setattr(backbone.get_submodule(parent), attribute, torch.nn.Identity())
    with pytest.raises(TypeError, match=rf"LoRA target {path} is a Identity, not an nn.Linear"):
        apply_method(backbone, "lora", rank=4, target_roles=("q",))


def test_full_and_linear_counts():
    backbone = audit_backbone(2)
    total = sum(p.numel() for p in backbone.parameters())
    head = sum(p.numel() for p in backbone.head.parameters())
    apply_method(backbone, "full")
    assert count_parameters(backbone) == {"method": total - head, "head": head}
    backbone = audit_backbone(2)
    apply_method(backbone, "linear")
    assert count_parameters(backbone) == {"method": 0, "head": head}


def test_unknown_method_and_variant_list_known_names(capsys):
    assert main(["audit", "grads", "--method", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown method 'nope'" in err and "wander" in err and "lora" in err
    with pytest.raises(KeyError, match=r"no variant 'released'.*\['code', 'paper'\]"):
        apply_method(audit_backbone(2), "wander", "released")


def test_unknown_config_field_is_refused():
    with pytest.raises(ValueError, match=r"no config field\(s\) \['rnak'\]"):
        apply_method(audit_backbone(2), "lora", rnak=4)


@pytest.mark.parametrize("method, overrides, field", [
    ("lora", {"rank": 0}, "rank"), ("lora", {"dropout": -0.1}, "dropout"),
    ("lora", {"target_roles": ("qq",)}, "target_roles"), ("lora", {"rank": 33}, "rank"),
    ("adapter", {"down_dim": 0}, "down_dim"),
])
def test_invalid_baseline_configs(method, overrides, field):
    with pytest.raises(ValueError, match=rf"{field} = "):
        apply_method(audit_backbone(2), method, **overrides)


def test_adapter_wider_than_the_backbone_builds():
    """The paper's Adapter (d=64) on a width-40 backbone: a down dimension above the width (32
    here) is accepted, and the adapter still starts as the identity (its up projection is zero)."""
    backbone = audit_backbone(2).eval()
    batch = random_batch(backbone)
    with torch.no_grad():
        before = backbone(batch)
        apply_method(backbone, "adapter", down_dim=33)
        after = backbone.eval()(batch)
    downs = [m for name, m in backbone.named_modules() if name.endswith(".down")]
    assert downs and all(m.out_features == 33 for m in downs)
    assert torch.equal(before, after)


def test_methods_json_lists_every_method():
    out = subprocess.run([sys.executable, "-m", "harness.cli", "methods", "--json"],
                         capture_output=True, text=True, check=True).stdout
    rows = {row["name"]: row for row in json.loads(out)}
    assert set(rows) == set(method_names())
    assert rows["wander"]["variants"] == ["paper", "code"]
    assert rows["wander"]["modalities"] == "any"
    assert rows["wander"]["config"]["rank_h"] == 8


def test_audit_grads_json_exit_status():
    result = subprocess.run([sys.executable, "-m", "harness.cli", "audit", "grads", "--json",
                             "--method", "wander", "--method", "lora"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert {(r["method"], r["variant"], r["modalities"]) for r in rows} == {
        (m, v, n) for m in ("wander", "lora") for v in get_method(m).variants for n in (2, 3, 7)}
    flagged = [r for r in rows if r["flag"]]
    assert {(r["method"], r["variant"]) for r in flagged} == {("wander", "code")}


@pytest.fixture
def broken_method():
    """A method with a parameter that never reaches the output: the audit must fail on it."""
    from dataclasses import dataclass

    from methods import registry
    from methods.base import MethodConfig, Variant

    @dataclass
    class Empty(MethodConfig):
        pass

    def apply(backbone, config):
        backbone.unused = torch.nn.Linear(2, 2)

    registry.register("broken_for_test", config=Empty, summary="test only",
                      variants={"paper": Variant("never used", starts_as_identity=True)})(apply)
    yield "broken_for_test"
    registry._REGISTRY.pop("broken_for_test")


@pytest.mark.parametrize("name", ["bi|as/x", "Bias", "2bias", "bi-as"])
def test_register_refuses_a_name_that_is_not_a_plain_identifier(name):
    """Names make up record file names and leaderboard rows as they are: no silent sanitising."""
    from methods import registry
    from methods.base import ConfigError, MethodConfig, Variant

    with pytest.raises(ConfigError, match="lowercase letters, digits and underscores"):
        registry.register(name, config=MethodConfig, summary="test only",
                          variants={"paper": Variant("never used")})
    with pytest.raises(ConfigError, match="variant name 'Code'"):
        registry.register("fine_name", config=MethodConfig, summary="test only",
                          variants={"Code": Variant("never used")})
    assert name not in registry.method_names() and "fine_name" not in registry.method_names()


def test_register_refuses_a_name_that_another_methods_results_have(monkeypatch):
    """A method "wander_code" would put its results under the name of Wander's released-code
    variant (it was accepted, and refused only by the leaderboard once both were grid rows), and
    a method with a variant "code" named "x" clashes with a method "x_code" registered before."""
    from methods import registry
    from methods.base import ConfigError, MethodConfig, Variant

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    paper = {"paper": Variant("never used")}
    with pytest.raises(ConfigError, match="'wander_code', as those of method 'wander'"):
        registry.register("wander_code", config=MethodConfig, summary="test only", variants=paper)
    registry.register("mine_code", config=MethodConfig, summary="test only", variants=paper)(
        lambda backbone, config: None)
    with pytest.raises(ConfigError, match="'mine_code', as those of method 'mine_code'"):
        registry.register("mine", config=MethodConfig, summary="test only",
                          variants={**paper, "code": Variant("never used")})
    assert "wander_code" not in registry.method_names() and "mine" not in registry.method_names()


def test_audit_fails_on_a_dead_tensor(broken_method, capsys):
    row = audit_one(broken_method, "paper", 2)
    assert row["dead_tensors"] == ["unused.bias", "unused.weight"] and not row["ok"]
    assert main(["audit", "grads", "--method", broken_method]) == 1
    assert "FAIL" in capsys.readouterr().out


CONTRACT_BACKBONES = {
    "late_fusion": lambda: audit_backbone(3),
    "two_tower": lambda: TwoTowerBackbone(TwoTowerConfig.tiny(num_classes=5)),
    "mmt": lambda: MMTBackbone(MMTConfig.tiny()),
}


def contract_problems(backbone) -> list[str]:
    """How ``backbone`` breaks the ``methods.base.Backbone`` contract (empty: it does not)."""
    if not isinstance(backbone, Backbone):
        return ["not a methods.base.Backbone (a name of the contract is missing)"]
    problems = []
    for name, member in vars(Backbone).items():
        if callable(member) and not name.startswith("_"):
            ours = list(inspect.signature(getattr(type(backbone), name)).parameters)
            contract = list(inspect.signature(member).parameters)
            if ours != contract:
                problems.append(f"{name}{tuple(ours)} is not {name}{tuple(contract)}")
    if backbone.activation not in ("relu", "gelu"):
        problems.append(f"activation {backbone.activation!r}")
    if not (isinstance(backbone.depth, int) and backbone.depth >= 1):
        problems.append(f"depth {backbone.depth!r}")
    if len(backbone.modalities) < 2:
        problems.append(f"modalities {backbone.modalities}")
    for m in backbone.modalities:
        sizes = (backbone.hidden_size(m), backbone.seq_len(m))
        if not all(isinstance(v, int) and v > 0 for v in sizes):
            problems.append(f"hidden_size / seq_len of {m}: {sizes}")
        if backbone.num_layers(m) != backbone.depth:
            problems.append(f"num_layers({m}) {backbone.num_layers(m)} != depth {backbone.depth}")
    sites = backbone.linear_sites()
    if not sites or not all(isinstance(s, LinearSite) for s in sites):
        problems.append("linear_sites() is not a non-empty list of LinearSite")
    elif not all(type(backbone.get_submodule(s.path)) is torch.nn.Linear for s in sites):
        problems.append("a linear site is not an nn.Linear")
    if not isinstance(backbone.head, torch.nn.Module):
        problems.append("head is not a module")
    return problems


@pytest.mark.parametrize("kind", sorted(CONTRACT_BACKBONES))
def test_every_backbone_meets_the_contract(kind):
    assert contract_problems(CONTRACT_BACKBONES[kind]()) == []


def test_the_contract_check_can_fail():
    backbone = audit_backbone(2)
    backbone.activation = "swish"
    assert contract_problems(backbone) == ["activation 'swish'"]

    class NoHooks(torch.nn.Module):
        modalities, activation, depth = ("a", "b"), "relu", 1

    assert contract_problems(NoHooks()) == ["not a methods.base.Backbone (a name of the contract is missing)"]


def test_only_input_errors_exit_2_a_bug_is_a_traceback(monkeypatch, capsys):
    from harness import cli
    from harness.errors import InputError

    def bug(args):
        raise ValueError("a bug, not bad input")

    def bad_input(args):
        raise InputError("bad input", key="k", expected="x", found="y")

    monkeypatch.setattr(cli, "cmd_methods", bug)
    with pytest.raises(ValueError, match="a bug"):
        main(["methods"])
    monkeypatch.setattr(cli, "cmd_methods", bad_input)
    assert main(["methods"]) == 2
    assert "mmpetl: error: bad input [key 'k']: expected x, found y" in capsys.readouterr().err
