"""Builders shared by several test modules (pytest puts this folder on sys.path)."""
import os
import shutil
import subprocess
from pathlib import Path

import torch
import yaml

from harness.backbones.late_fusion import LateFusionBackbone, LateFusionConfig
from harness.data import generate

ROOT = Path(__file__).resolve().parent.parent
DVC_ENV = {"DVC_NO_ANALYTICS": "1", "RAY_USAGE_STATS_ENABLED": "0"}


def sized_backbone(size: str, n: int) -> tuple[LateFusionBackbone, int, int]:
    """(backbone, width, depth) of the ``audit`` (32 x 2) or ``wide`` (40 x 3) size."""
    from harness.audit import audit_backbone

    return (audit_backbone(n), 32, 2) if size == "audit" else (wide_backbone(n), 40, 3)


def wide_backbone(n: int, seed: int = 1) -> LateFusionBackbone:
    """A second size next to the audit backbone: width 40, depth 3, ffn multiplier 4 (the
    late-fusion default), ``n`` modalities."""
    names = [f"m{i}" for i in range(n)]
    torch.manual_seed(seed)
    return LateFusionBackbone(LateFusionConfig(input_dims={m: 4 + i for i, m in enumerate(names)},
                                               seq_lens={m: 3 + i % 2 for i, m in enumerate(names)},
                                               width=40, depth=3, heads=4))


def small_mosi_params(folder: Path) -> dict:
    """params.yaml pointed at a small generated MOSI in ``folder`` (48/16/16 samples), one epoch
    of batch 16, no pre-trained checkpoint (pre-training has its own tests)."""
    generate("mosi", folder / "mosi", seed=0, n_train=48, n_valid=16, n_test=16)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["tiny"]["mosi"]["path"] = str(folder / "mosi")
    params["profiles"]["tiny"]["train"] = {"epochs": 1, "batch_size": 16}
    params["pretrain"]["use"] = {}
    return params


def sh(*command, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """``command`` in the project copy ``cwd``, whose code runs (PYTHONPATH puts it before the
    editable install); an AssertionError with its output tails when it fails."""
    env = {**os.environ, **DVC_ENV,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(cwd), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-5000:]}")
    return result


def project_with_inputs(folder: Path) -> Path:
    """A git + DVC copy of the project in ``folder`` without its results (the checkout's files,
    untracked ones included), one epoch of pre-training and of fine-tuning, a 2-trial search, its
    data@, pretrain@ and extract@ stages reproduced. The end-to-end DVC tests copy it
    (``copy_project``) rather than each reproducing these stages (about two minutes on 2 cores)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in listed:
        if name.startswith("results/") or not (ROOT / name).is_file():
            continue  # start from no results
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, folder / name)
    params = yaml.safe_load((folder / "params.yaml").read_text())
    params["profiles"]["tiny"]["train"].update(epochs=1)
    params["pretrain"]["profiles"]["tiny"].update(epochs=1)
    params["search"].update(trials=2, space={"wander": {"down_dim": [4, 8]}})
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for command in (("git", "init", "-q"), ("git", "config", "user.email", "test@example.com"),
                    ("git", "config", "user.name", "test")):
        sh(*command, cwd=folder)
    sh("dvc", "repro", "extract", cwd=folder)
    return folder


def copy_project(base: Path, folder: Path, **params_update) -> Path:
    """``base`` (``project_with_inputs``) copied into ``folder`` (DVC's temporary files left
    out), params.yaml updated with ``params_update``, committed: its input stages are up to date."""
    shutil.copytree(base, folder, symlinks=True, dirs_exist_ok=True,
                    ignore=lambda where, names: ["tmp"] if Path(where).name == ".dvc" else [])
    params = yaml.safe_load((folder / "params.yaml").read_text())
    params.update(params_update)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh("git", "add", "-A", cwd=folder)
    sh("git", "commit", "-qm", "a small study", cwd=folder)
    return folder


def mmpetl(capsys, *argv) -> tuple[int, str]:
    """Run the command line in-process: (exit code, stderr)."""
    from harness.cli import main

    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err
