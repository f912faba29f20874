"""Adding a method as a user would, end to end through DVC, in a temporary git + DVC copy of the
project (the copy's code is the one that runs: PYTHONPATH puts it before the editable install).

A small study (MOSI, rows linear and lora, seed 0, 1 epoch) is reproduced and committed; then
- one new file, methods/bitfit.py (bias-only), and its grid row: `dvc repro` computes that
  method's run only and removes no record;
- an edit of an existing method's file (methods/lora.py): only lora's run is recomputed, and its
  old record is set aside in results/runs/.stale, not deleted.
"""
import csv
import json
import re
from pathlib import Path

import pytest
import yaml

from helpers import copy_project, sh

RUNS = Path("results/runs")

# What a user writes: one file in methods/, found by the package (no other edit).
BITFIT = '''"""BitFit: only the bias terms of the backbone's adaptable linears train (not the attention
keys': softmax ignores a key bias, so its gradient is exactly zero)."""
from dataclasses import dataclass

from torch import nn

from methods.base import MethodConfig, Variant
from methods.registry import register


@dataclass
class BitFitConfig(MethodConfig):
    """BitFit has no settings."""


@register("bitfit", config=BitFitConfig, summary="BitFit: bias terms only",
          variants={"paper": Variant("bias terms of the adaptable linears", starts_as_identity=True)})
def apply_bitfit(backbone: nn.Module, config: BitFitConfig) -> None:
    modules = dict(backbone.named_modules())
    for site in backbone.linear_sites():
        bias = modules[site.path].bias
        if bias is not None and site.role != "k":
            bias.requires_grad_(True)
'''


def record_names(repo: Path) -> set[str]:
    return {str(p.relative_to(repo / RUNS)) for p in (repo / RUNS).glob("*/*.json")}


def sweep_counts(output: str) -> dict:
    """What the sweep said it did, from ``mmpetl sweep``'s line in the pipeline's output: runs,
    computed, already recorded, set aside (0 when not said)."""
    line = re.search(r"(\d+) runs: (\d+) computed, (\d+) already recorded(?: \(\d+ moved back from "
                     r"\.stale\))?(?:; (\d+) records of other code set aside)?", output)
    assert line, output[-2000:]
    return dict(zip(("runs", "computed", "reused", "set_aside"), (int(g or 0) for g in line.groups())))


@pytest.fixture(scope="module")
def repo(reproduced_inputs, tmp_path_factory):
    """The project with a 2-run study, reproduced up to the finetune stage and committed."""
    folder = copy_project(reproduced_inputs, tmp_path_factory.mktemp("repo"), datasets=["mosi"],
                          seeds=[0], method="all",
                          grid={"mosi": [{"method": "linear"}, {"method": "lora", "rank": 4}]})
    assert sweep_counts(sh("dvc", "repro", "finetune", cwd=folder).stdout)["computed"] == 2
    sh("git", "add", "-A", cwd=folder)
    sh("git", "commit", "-qm", "a 2-run study", cwd=folder)
    return folder


@pytest.mark.slow
def test_a_new_method_file_computes_its_runs_only(repo):
    before = record_names(repo)
    (repo / "methods/bitfit.py").write_text(BITFIT)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["grid"]["mosi"].append({"method": "bitfit"})
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    summary = sweep_counts(sh("dvc", "repro", cwd=repo).stdout)
    assert summary == {"runs": 3, "computed": 1, "reused": 2, "set_aside": 0}
    after = record_names(repo)
    assert before <= after, f"records removed: {sorted(before - after)}"
    (new,) = after - before
    assert new.startswith("mosi/bitfit-seed0-")
    assert not (repo / RUNS / ".stale").exists()
    record = json.loads((repo / RUNS / new).read_text())
    assert record["code_modules"] == ["methods.base", "methods.bitfit", "methods.registry"]
    assert 0 < record["tunable"]["method"]
    listed = json.loads(sh("mmpetl", "methods", "--json", cwd=repo).stdout)
    assert "bitfit" in {m["name"] for m in listed}
    # The pipeline after the sweep reaches the new method with no table code edited: the MOSI
    # leaderboard ranks it (with its records and the paired-test columns), the headline metrics
    # file has its main metric and #tunable, and `dvc exp show` shows them.
    board = [line for line in csv.DictReader(open(repo / "results/leaderboards/mosi.csv"))
             if line["row"] == "bitfit"]
    assert {"leaderboard", "all metrics"} <= {line["section"] for line in board}
    ranked = next(line for line in board if line["section"] == "leaderboard")
    assert ranked["records"] == new and ranked["mean"] != ""
    assert {"p_t", "p_holm", "verdict"} <= set(ranked)
    headline = json.loads((repo / "results/metrics.json").read_text())
    assert set(headline["mosi"]["bitfit"]) == {"acc2_non0", "tunable"}
    assert headline["mosi"]["bitfit"]["tunable"] == sum(record["tunable"].values())
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "bitfit", cwd=repo)
    shown = json.loads(sh("dvc", "exp", "show", "--json", cwd=repo).stdout)
    workspace = next(rev for rev in shown if rev["rev"] == "workspace")
    metrics = workspace["data"]["metrics"]["results/metrics.json"]["data"]
    assert metrics["mosi"]["bitfit"] == headline["mosi"]["bitfit"]


@pytest.mark.slow
def test_editing_one_method_recomputes_its_runs_only(repo):
    before = record_names(repo)
    (lora_record,) = [n for n in before if n.startswith("mosi/lora")]
    lora = repo / "methods/lora.py"
    lora.write_text(lora.read_text() + "\n# an edit of LoRA's file only\n")

    summary = sweep_counts(sh("dvc", "repro", "finetune", cwd=repo).stdout)
    assert (summary["computed"], summary["reused"], summary["set_aside"]) == (1, len(before) - 1, 1)
    after = record_names(repo)
    assert before - after == {lora_record}
    (new,) = after - before
    assert new.split("-seed0-")[0] == lora_record.split("-seed0-")[0]
    assert (repo / RUNS / ".stale" / lora_record).is_file()  # set aside, not deleted
    stale = json.loads(sh("mmpetl", "records", "stale", "--json", cwd=repo).stdout)
    assert [Path(r["path"]).name for r in stale] == [Path(lora_record).name]
