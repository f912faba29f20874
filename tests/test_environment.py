"""The environment: a lock of exact versions that the README and CI install, the compute
packages' versions in every run key, a one-line warning when the installed packages differ from
the lock, files written with the user's umask, and a params.yaml that `dvc exp run -S` changes
one line at a time."""
import os
import re
from importlib import metadata

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from harness import records
from helpers import ROOT

LOCK = ROOT / "requirements-lock.txt"
TEST_COMMAND = ('python -m pip install torch==2.13.0 && python -m pip install -r requirements-lock.txt'
                ' && python -m pip install -e ".[test,ray]" --no-deps && python -m pytest -q')


def test_readme_and_ci_install_from_the_lock():
    ci = (ROOT / ".ci/run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert TEST_COMMAND in ci.splitlines()
    assert f"    {TEST_COMMAND}" in readme.splitlines()
    assert "bash scripts/refresh_lock.sh" in readme and (ROOT / "scripts/refresh_lock.sh").is_file()


def _closure() -> dict[str, str]:
    """{name: installed version} of mmpetl's requirements with its test and ray extras, and of
    theirs, recursively (markers evaluated here)."""
    found, todo = {}, [("mmpetl", ("test", "ray"))]
    while todo:
        name, extras = todo.pop()
        for text in metadata.requires(name) or []:
            requirement = Requirement(text)
            wanted = [e for e in extras or ("",)]
            if requirement.marker and not any(requirement.marker.evaluate({"extra": e}) for e in wanted):
                continue
            key = canonicalize_name(requirement.name)
            if key in found:
                continue
            found[key] = metadata.version(requirement.name)
            todo.append((requirement.name, tuple(requirement.extras)))
    return found


def test_lock_pins_every_package_of_the_install():
    pins = records.read_lock(LOCK)
    assert len(pins) > 50 and all(re.fullmatch(r"[0-9][0-9a-z.!+]*", v) for v in pins.values())
    closure = _closure()
    assert {"torch", "transformers", "peft", "numpy", "dvc", "ray", "pytest"} <= set(closure)
    missing = sorted(set(closure) - set(pins))
    assert not missing, f"installed by .[test,ray] but not in the lock: {missing}"
    for text in metadata.requires("mmpetl"):  # every pin satisfies pyproject's range
        requirement = Requirement(text)
        pinned = pins[canonicalize_name(requirement.name)]
        assert requirement.specifier.contains(Version(pinned), prereleases=True), (text, pinned)
    assert "+" not in pins["torch"]  # the public version: CPU and CUDA builds of one release


def test_warning_names_the_packages_that_differ(tmp_path):
    installed = {canonicalize_name(n): metadata.version(n) for n in ("numpy", "PyYAML", "torch")}
    lock = tmp_path / "lock.txt"
    lock.write_text("# a comment\n" + "".join(f"{n}=={v}\n" for n, v in installed.items()))
    assert records.lock_mismatches(lock) == [] and records.lock_warning(lock) is None
    lock.write_text(f"numpy==0.0.1\npyyaml=={installed['pyyaml']}\nno-such-package==1.0\n")
    assert records.lock_mismatches(lock) == [f"numpy {installed['numpy']} (lock 0.0.1)",
                                             "no-such-package missing (lock 1.0)"]
    warning = records.lock_warning(lock)
    assert "\n" not in warning and "numpy" in warning and "no-such-package" in warning
    assert "records may not be reused" in warning  # numpy's version is in every run key
    lock.write_text("no-such-package==1.0\n")  # none of the run key's packages: no consequence
    assert "records are reused" in records.lock_warning(lock)
    assert records.lock_warning(tmp_path / "absent.txt") is None


def test_cli_prints_the_warning_once(tmp_path, monkeypatch, capsys):
    from harness import cli

    lock = tmp_path / "lock.txt"
    lock.write_text("numpy==0.0.1\n")
    monkeypatch.setattr(records, "LOCK_FILE", lock)
    assert cli.main(["methods"]) == 0
    err = capsys.readouterr().err
    assert err.count("differ from") == 1 and "numpy" in err


def test_run_key_holds_the_compute_packages(monkeypatch, tmp_path):
    from harness.run import run_key
    from harness.settings import load_params, plan_run

    versions = records.compute_versions()
    assert set(versions) == {"torch", "transformers", "numpy"}
    assert versions["torch"] == metadata.version("torch").split("+")[0]
    plan = plan_run(load_params(ROOT / "params.yaml"), "mosi", "linear")
    key = run_key(plan)
    monkeypatch.setattr(records, "compute_versions", lambda: {**versions, "numpy": "0.0.1"})
    assert run_key(plan) != key


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_follow_the_umask(tmp_path, umask):
    from harness.tables.io import write_text_if_changed

    old = os.umask(umask)
    try:
        records.write_json_atomic(tmp_path / "record.json", {"a": 1})
        write_text_if_changed(tmp_path / "table.md", "x\n")
    finally:
        os.umask(old)
    for name in ("record.json", "table.md"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask


def test_dvc_set_param_changes_one_line(tmp_path):
    """`dvc exp run -S key=value` rewrites params.yaml through ruamel; the committed layout is
    the one it writes, so the change is one line and every comment stays."""
    from dvc.utils.hydra import apply_overrides

    original = (ROOT / "params.yaml").read_text()
    path = tmp_path / "params.yaml"
    path.write_text(original)
    apply_overrides(str(path), ["profile=tiny"])  # a no-op override: the file is a fixed point
    assert path.read_text() == original
    for override, old, new in (("method=wander", "method: all", "method: wander"),
                               ("train.mosi.epochs=10", "epochs: 40", "epochs: 10")):
        path.write_text(original)
        apply_overrides(str(path), [override])
        before, after = original.splitlines(), path.read_text().splitlines()
        assert len(before) == len(after)
        changed = [(a, b) for a, b in zip(before, after) if a != b]
        assert len(changed) == 1 and old in changed[0][0] and new in changed[0][1], changed


def test_readme_reliability_promises_name_tests_that_exist():
    """Each promise of the README's Reliability table names test functions that exist."""
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Reliability", 1)[1].split("\n## ", 1)[0]
    named = 0
    for line in (l for l in table.splitlines() if l.startswith("| ") and "::" in l):
        cell = line.rstrip(" |").rsplit("|", 1)[1]
        module = None
        for ref in re.findall(r"`([^`]+)`", cell):
            file, _, name = ref.rpartition("::")
            module = file or module
            source = (ROOT / "tests" / module).read_text()
            assert re.search(rf"^def {re.escape(name)}\(", source, re.M), (module, name)
            named += 1
    assert named >= 20, named
