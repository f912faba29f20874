"""A method from outside the package: a user's module listed under params.yaml ``methods`` (a
module beside params.yaml imports) or an entry point of group ``mmpetl.methods``; `mmpetl methods`
says where each came from, a bad entry exits 2 naming it, and a sweep runs the method."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from harness.cli import main
from harness.settings import load_params
from harness.sweep import sweep
from helpers import ROOT, small_mosi_params
from methods import registry

METHOD = '''
from dataclasses import dataclass

from methods.base import MethodConfig, Variant
from methods.registry import register


@dataclass
class BiasConfig(MethodConfig):
    """No settings."""


@register("{name}", config=BiasConfig, summary="biases of the adaptable linears",
          variants={{"paper": Variant("bias terms", starts_as_identity=True)}})
def apply_bias(backbone, config):
    modules = dict(backbone.named_modules())
    for site in backbone.linear_sites():
        bias = modules[site.path].bias
        if bias is not None and site.role != "k":
            bias.requires_grad_(True)
'''


@pytest.fixture
def isolated(monkeypatch):
    """The registry, its origins, sys.path, sys.modules' user modules and the environment as the
    test found them, afterwards."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_ORIGINS", dict(registry._ORIGINS))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv(registry.ENV_MODULES, "")  # removed again afterwards
    yield
    for name in [m for m in sys.modules if m.split(".")[0] in ("usermeths", "epmeths")]:
        del sys.modules[name]


def write_params(folder, **changes):
    params = small_mosi_params(folder)
    params.update(datasets=["mosi"], seeds=[0], method="all", **changes)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_a_module_listed_in_params_is_registered_listed_and_swept(isolated, tmp_path, capsys):
    package = tmp_path / "usermeths"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "bias.py").write_text(METHOD.format(name="bias_user"))
    path = write_params(tmp_path, methods=["usermeths.bias"],
                        grid={"mosi": [{"method": "bias_user"}]})

    assert main(["methods", "--params", str(path), "--json"]) == 0
    listed = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    assert listed["bias_user"]["origin"] == {"source": "params.yaml methods",
                                             "module": "usermeths.bias",
                                             "file": str(package / "bias.py")}
    assert listed["wander"]["origin"]["source"] == "built-in"
    assert main(["methods", "--params", str(path)]) == 0
    assert "[params.yaml methods: usermeths.bias, " in capsys.readouterr().out

    summary = sweep(load_params(path), out_dir=tmp_path / "runs")
    assert summary["computed"] == 1
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "runs/mosi").glob("*.json")]
    assert record["method"] == "bias_user" and record["tunable"]["method"] > 0
    assert record["code_modules"] == ["methods.base", "methods.registry", "usermeths.bias"]


@pytest.mark.parametrize("listed", [["no_such_module_xyz"], "usermeths.bias"])
def test_a_bad_methods_entry_exits_2_naming_it(isolated, tmp_path, capsys, listed):
    path = write_params(tmp_path, methods=listed)
    assert main(["sweep", "--params", str(path), "--out", str(tmp_path / "runs")]) == 2
    error = capsys.readouterr().err
    assert "params.yaml" in error and ("methods[0]" in error and "no_such_module_xyz" in error
                                       if isinstance(listed, list) else "methods" in error)


def test_an_entry_point_registers_its_method(isolated, tmp_path):
    site = tmp_path / "site"
    (site / "epmeths").mkdir(parents=True)
    (site / "epmeths/__init__.py").write_text(METHOD.format(name="bias_ep"))
    info = site / "epmeths_dist-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: epmeths-dist\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[mmpetl.methods]\nbias_ep = epmeths\n")
    sys.path.insert(0, str(site))
    registry.load_entry_points()
    assert "bias_ep" in registry.method_names()
    origin = registry.method_origin("bias_ep")
    assert origin == {"source": "entry point bias_ep (epmeths-dist)", "module": "epmeths",
                      "file": str(site / "epmeths/__init__.py")}
    assert sorted(registry.method_sources("bias_ep")) == ["epmeths", "methods.base",
                                                          "methods.registry"]


@pytest.mark.parametrize("broken, said", [
    ("def apply(:\n", "SyntaxError"),
    ("from methods.base import Variant\nfrom methods.lora import LoraConfig\n"
     "from methods.registry import register\n"
     "register('lora', config=LoraConfig, summary='x', variants={'paper': Variant('x')})"
     "(lambda backbone, config: None)\n", "registered twice"),
])
def test_a_broken_file_in_methods_exits_2_naming_it(tmp_path, broken, said):
    """A file added to ``methods/`` (README, Add your method) that does not import: every command
    exits 2 naming it, not with a traceback. Run on a copy of the package."""
    shutil.copytree(ROOT / "methods", tmp_path / "methods",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "methods" / "mine.py").write_text(broken)
    done = subprocess.run([sys.executable, "-m", "harness.cli", "methods"], cwd=tmp_path,
                          capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": f"{tmp_path}:{ROOT}"})
    assert done.returncode == 2, done.stderr[-2000:]
    assert "methods.mine" in done.stderr and said in done.stderr and "Traceback" not in done.stderr
