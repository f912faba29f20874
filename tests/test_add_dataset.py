"""Adding a dataset of an existing family is its card and its params.yaml entries: a copy of the
MOSI card under a new name goes through `mmpetl data` and a sweep with no code change."""
import json
import shutil
from pathlib import Path

import yaml

from harness.cli import main
from harness.data.cards import cards_dir

ROOT = Path(__file__).resolve().parent.parent


def test_a_dataset_of_an_existing_family_needs_its_card_and_params_only(tmp_path, monkeypatch):
    cards = tmp_path / "datasets"
    shutil.copytree(cards_dir(), cards)
    card = yaml.safe_load((cards / "mosi.yaml").read_text())
    card.update(name="mosi_copy", title="a copy of CMU-MOSI", path="datasets/mosi_copy/raw",
                generated_path="datasets/generated/mosi_copy")
    (cards / "mosi_copy.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
    monkeypatch.setenv("MMPETL_DATASETS_DIR", str(cards))
    monkeypatch.chdir(tmp_path)  # generated data and feature caches land here

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params.update(datasets=["mosi_copy"], seeds=[0], method="all")
    params["grid"]["mosi_copy"] = [{"method": "linear"}, {"method": "wander", "down_dim": 8}]
    params["generate"]["mosi_copy"] = {"n_train": 48, "interaction_scope": "pooled"}
    params["train"]["mosi_copy"] = params["train"]["mosi"]
    params["data"]["tiny"]["mosi_copy"] = {"path": "datasets/generated/mosi_copy"}
    params["profiles"]["tiny"]["train"].update(epochs=1)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    assert main(["data", "--dataset", "mosi_copy"]) == 0
    assert (tmp_path / "datasets/generated/mosi_copy/generated.json").is_file()
    assert main(["sweep", "--executor", "sequential", "--out", "runs"]) == 0
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "runs/mosi_copy").glob("*.json"))]
    assert sorted(r["method"] for r in records) == ["linear", "wander"]
    for record in records:
        assert record["dataset"] == "mosi_copy" and record["backbone_kind"] == "late_fusion"
        assert record["task"] == "regression" and record["metrics"]["mae"] > 0
