"""Code identity per run: a run key hashes the harness code every run executes and, of methods/,
only its own method (its modules, what they import, the shared contract). Editing or adding one
method changes that method's keys only; editing shared harness code changes every key. Records of
other code are set aside in <records>/.stale (listed, brought back, deleted only on request)."""
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from harness import records
from harness.cli import main
from harness.run import run_code_hash
from harness.sweep import STALE, stale_records, sweep, write_index
from harness.settings import load_params
from helpers import small_mosi_params
from methods import method_names, registry

BITFIT = '''
"""A user's bias-only method (BitFit), in a package of the user's own."""
from dataclasses import dataclass

from methods.base import MethodConfig, Variant
from methods.registry import register
from {package}.common import unfreeze_biases


@dataclass
class BitFitConfig(MethodConfig):
    """No settings."""


@register("{name}", config=BitFitConfig, summary="bias terms only",
          variants={{"paper": Variant("biases trainable")}})
def apply_bitfit(backbone, config):
    unfreeze_biases(backbone)
'''
COMMON = '''
def unfreeze_biases(backbone):
    for name, parameter in backbone.named_parameters():
        if name.endswith("bias"):
            parameter.requires_grad_(True)
'''


@pytest.fixture
def user_method(tmp_path, monkeypatch):
    """A method ``bitfit_test`` registered from a package of the user's (``usermeths``, outside
    methods/), in a copy of the registry that the test leaves behind."""
    package = tmp_path / "usermeths"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "common.py").write_text(COMMON)
    (package / "bitfit.py").write_text(BITFIT.format(package="usermeths", name="bitfit_test"))
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m.split(".")[0] == "usermeths"]:
        monkeypatch.delitem(sys.modules, name)
    yield package
    for name in [m for m in sys.modules if m.split(".")[0] == "usermeths"]:
        del sys.modules[name]


def test_a_method_hashes_its_own_modules_what_they_import_and_the_contract(user_method):
    assert sorted(registry.method_sources("wander")) == ["methods.base", "methods.registry",
                                                         "methods.wander"]
    assert sorted(registry.method_sources("linear")) == ["methods.base", "methods.full",
                                                         "methods.registry"]
    __import__("usermeths.bitfit")
    sources = registry.method_sources("bitfit_test")
    assert sorted(sources) == ["methods.base", "methods.registry", "usermeths.bitfit",
                               "usermeths.common"]
    assert sources["usermeths.common"] == user_method / "common.py"


def test_editing_or_adding_one_method_changes_its_keys_only(user_method):
    built_in = {m: run_code_hash(m) for m in method_names()}
    __import__("usermeths.bitfit")  # adding a method leaves every other method's identity
    assert {m: run_code_hash(m) for m in built_in} == built_in
    assert len(set(built_in.values())) == len(built_in) - 1  # full and linear share methods/full.py
    before = run_code_hash("bitfit_test")
    for edited in ("bitfit.py", "common.py"):  # its module, then a module it imports
        (user_method / edited).write_text((user_method / edited).read_text() + "\n# edited\n")
        after = run_code_hash("bitfit_test")
        assert after != before, edited
        assert {m: run_code_hash(m) for m in built_in} == built_in
        before = after


def test_editing_shared_harness_code_changes_every_key(user_method, tmp_path, monkeypatch):
    __import__("usermeths.bitfit")
    names = method_names()
    current = {m: run_code_hash(m) for m in names}
    copy = tmp_path / "project"
    for path in records.harness_code_files():
        target = copy / path.relative_to(records.PROJECT_ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    assert not any(p.parts[0] == "methods" for p in
                   (f.relative_to(records.PROJECT_ROOT) for f in records.harness_code_files()))
    monkeypatch.setattr(records, "PROJECT_ROOT", copy)
    assert {m: run_code_hash(m) for m in names} == current  # the same files: the same keys
    (copy / "harness/train.py").write_text((copy / "harness/train.py").read_text() + "\n# edited\n")
    changed = {m: run_code_hash(m) for m in names}
    assert all(changed[m] != current[m] for m in names)


@pytest.fixture
def one_run(tmp_path):
    params = small_mosi_params(tmp_path)
    params.update(datasets=["mosi"], seeds=[0], method="all", grid={"mosi": [{"method": "linear"}]})
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return load_params(path)


def test_records_of_other_code_are_set_aside_listed_restored_and_pruned_on_request(
        one_run, tmp_path, capsys):
    out = tmp_path / "runs"
    first = sweep(one_run, out_dir=out)
    assert (first["computed"], first["set_aside"]) == (1, 0)
    assert write_index(out, first)
    index = (out / "index.json").read_bytes()
    (record_path,) = (out / "mosi").glob("*.json")
    old = json.loads(record_path.read_text())
    old.update(code_hash="0" * 64, key="0" * 64)  # a record of other code
    other = out / "mosi" / "linear-seed0-000000000000.json"  # run.record_path's name, other key
    other.write_text(json.dumps(old))

    second = sweep(one_run, out_dir=out)
    assert (second["computed"], second["set_aside"]) == (0, 1)
    assert not other.exists() and (out / STALE / "mosi" / other.name).is_file()
    assert [p.name for p in (out / "mosi").glob("*.json")] == [record_path.name]
    (listed,) = stale_records(out)
    assert listed["method"] == "linear" and listed["why"] == "other code (harness or method 'linear')"
    assert main(["records", "stale", "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [listed]

    # a record set aside whose key is asked for again (an edit undone) is moved back, not recomputed
    record_path.rename(out / STALE / "mosi" / record_path.name)
    third = sweep(one_run, out_dir=out)
    assert (third["computed"], third["restored"], third["set_aside"]) == (0, 1, 0)
    assert record_path.is_file()
    write_index(out, third)  # the folder's state is the first sweep's again: so is its index
    assert (out / "index.json").read_bytes() == index

    assert main(["records", "prune", "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"removed": 1}
    assert stale_records(out) == [] and record_path.is_file()


def test_every_command_knows_the_params_files_methods(user_method, tmp_path, capsys, monkeypatch):
    """A method listed under ``methods`` in the parameters file: ``mmpetl audit`` and ``mmpetl run``
    know it (the sweep did; ``run --method`` and ``audit grads --method`` called it unknown)."""
    # loading it names it for workers: restored after (delenv of an unset name would not be)
    monkeypatch.setenv(registry.ENV_MODULES, os.environ.get(registry.ENV_MODULES, ""))
    monkeypatch.setattr(sys, "path", list(sys.path))
    params = yaml.safe_load((Path(records.PROJECT_ROOT) / "params.yaml").read_text())
    params["methods"] = ["usermeths.bitfit"]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    capsys.readouterr()
    code = main(["audit", "grads", "--params", str(path), "--method", "bitfit_test", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert {row["method"] for row in json.loads(out)} == {"bitfit_test"}
    code = main(["run", "--params", str(path), "--dataset", "nosuch", "--method", "bitfit_test"])
    err = capsys.readouterr().err
    assert code == 2 and "'--method'" not in err and "nosuch" in err, err  # past the method check
