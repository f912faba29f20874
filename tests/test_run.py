"""One fine-tuning run (`mmpetl run`): every method on every backbone, determinism, learning,
and bad input."""
import json
from pathlib import Path

import pytest
import torch
import yaml

from harness.cli import main
from harness.data import generate
from harness import run
from harness.errors import InputError
from harness.run import execute
from harness.settings import load_params, plan_run
from helpers import small_mosi_params
from methods import get_method, method_names

ROOT = Path(__file__).resolve().parent.parent
SMALL = {"mosi": dict(n_train=48, n_valid=16, n_test=16, interaction_scope="pooled"),
         "iemocap": dict(n_train=48, n_valid=16, n_test=16),
         "food101": dict(n_train=40, n_test=20), "msrvtt": dict(n_train=24, n_valid=8, n_test=8)}
# sizes that fit the tiny backbones (the defaults are the paper's)
FIT = {"wander": {"down_dim": 8, "fused_length": 8}, "adapter": {"down_dim": 8}, "lora": {"rank": 4},
       "aurora": {"rank": 4}, "uniadapter": {"down_dim": 8}, "pmf": {"translator_hidden": 16}}


@pytest.fixture(scope="module")
def params_file(tmp_path_factory):
    """params.yaml of the project, pointed at small generated data, one epoch."""
    folder = tmp_path_factory.mktemp("project")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for dataset, sizes in SMALL.items():
        generate(dataset, folder / dataset, seed=0, **sizes)
        params["data"]["tiny"][dataset]["path"] = str(folder / dataset)
    params["profiles"]["tiny"]["train"] = {"epochs": 1, "batch_size": 16}
    params["profiles"]["tiny"]["two_tower"] = {"preset": "tiny"}
    # the Food-101 rows that fit the tiny preset's width (64): params.yaml is checked whole
    params["grid"]["food101"] = [row for row in params["grid"]["food101"]
                                 if row["method"] == "wander" or row.get("down_dim", 0) <= 64
                                 and row.get("rank", 0) <= 64]
    params["pretrain"]["use"] = {}  # pre-training has its own tests
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def _settings(method, dataset):
    settings = dict(FIT.get(method, {}))
    if method == "uniadapter" and dataset == "msrvtt":
        settings["placement"] = "ffn"  # MMT's FFN is shared by all experts (no parallel slot)
    if method == "maple" and dataset == "food101":
        settings["source"] = "text"
    return settings


MATRIX = [(d, m, v) for d in SMALL for m in method_names() for v in get_method(m).variants]


@pytest.mark.slow
@pytest.mark.parametrize("dataset, method, variant", MATRIX)
def test_every_method_on_every_backbone(params_file, tmp_path, dataset, method, variant):
    plan = plan_run(load_params(params_file), dataset, method, variant, settings=_settings(method, dataset))
    record = execute(plan, tmp_path, progress=False)
    assert record["metrics"] and all(isinstance(v, float) for v in record["metrics"].values())
    assert record["tunable"]["head"] > 0
    assert len(list(tmp_path.glob("*/*.json"))) == 1


def test_same_command_twice_gives_identical_metrics(params_file, tmp_path):
    outputs = []
    for attempt in range(2):
        out = tmp_path / f"attempt{attempt}"
        assert main(["run", "--dataset", "mosi", "--method", "wander", "--set", "down_dim=8",
                     "--set", "fused_length=8", "--params", str(params_file), "--out", str(out),
                     "--json"]) == 0
        (record,) = out.glob("mosi/*.json")
        outputs.append(json.dumps(json.loads(record.read_text())["metrics"], sort_keys=True))
    assert outputs[0] == outputs[1]


def test_record_carries_provenance(params_file, tmp_path):
    record = execute(plan_run(load_params(params_file), "mosi", "lora", settings={"rank": 4}),
                     tmp_path, progress=False)
    for field in ("key", "row", "method_config", "train", "seed", "tunable", "wall_s", "device",
                  "host", "git_commit", "code_hash", "versions", "data_hash", "selected_epoch",
                  "checkpoint_load_report"):
        assert field in record
    assert record["row"] == {"method": "lora", "rank": 4}
    assert record["method_config"]["rank"] == 4 and record["versions"]["torch"]
    # the CPU it was computed on (another CPU rounds differently) and torch's vector instruction set
    assert record["host"]["cpu"] and record["host"]["cpu_capability"] == \
        torch.backends.cpu.get_cpu_capability()


def test_run_leaves_the_study_alone_and_says_when_it_reuses(params_file, tmp_path, monkeypatch,
                                                             capsys):
    """`mmpetl run` writes what it computes to .mmpetl/runs (not the committed results/runs),
    reuses a record of the same key from either folder, and says which it did."""
    monkeypatch.chdir(tmp_path)
    argv = ["run", "--dataset", "mosi", "--method", "linear", "--params", str(params_file)]
    assert main(argv + ["--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["run_status"]["reused"] is False
    (written,) = (tmp_path / ".mmpetl/runs").glob("mosi/*.json")
    assert first["run_status"]["record"] == str(written.relative_to(tmp_path))
    assert not (tmp_path / "results").exists()
    assert main(argv) == 0
    assert "reused the record .mmpetl/runs/mosi/" in capsys.readouterr().out
    study = tmp_path / "results/runs/mosi"  # a record the committed study holds is reused too
    study.mkdir(parents=True)
    written.rename(study / written.name)
    assert main(argv + ["--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["run_status"] == {"reused": True, "record": f"results/runs/mosi/{written.name}"}
    assert again["metrics"] == first["metrics"] and not list((tmp_path / ".mmpetl").rglob("*.json"))


@pytest.mark.parametrize("raised, said", [
    (InputError("pred contains non-finite values", key="pred", expected="only finite values",
                found="64 NaN and 0 inf of 64"), "mosi / lora_r4 / seed 0: pred contains non-finite"),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), "in the run mosi / lora_r4 / seed 0 "
                                                                "(method 'lora', module methods.lora)"),
])
def test_what_goes_wrong_inside_a_run_names_it(params_file, tmp_path, monkeypatch, raised, said):
    """An error of a method's outputs (NaN predictions) or a bug in a method (a shape it breaks)
    said neither which run nor which method."""
    def broken(*args, **kwargs):
        raise raised

    monkeypatch.setattr(run, "fine_tune", broken)
    plan = plan_run(load_params(params_file), "mosi", "lora", settings={"rank": 4})
    with pytest.raises(type(raised)) as error:
        execute(plan, tmp_path, progress=False)
    assert said in "\n".join([str(error.value), *getattr(error.value, "__notes__", [])])
    assert not list(tmp_path.rglob("*.json"))


def test_a_code_edit_during_a_run_does_not_reach_its_record(params_file, tmp_path, monkeypatch):
    """The record's code hash is the one its key was made from: a method edited while the run
    trained gave a record filed under the old key with the new code's hash (the next sweep then
    recomputed it and set the right record aside as other code)."""
    from harness import records

    hashes = iter(f"{n:064x}" for n in range(1, 100))  # the code "changes" at every read
    monkeypatch.setattr(records, "_code_hash", lambda sources: next(hashes))
    assert main(["run", "--dataset", "mosi", "--method", "linear", "--params", str(params_file),
                 "--out", str(tmp_path), "--json"]) == 0
    (path,) = tmp_path.glob("mosi/*.json")
    record = json.loads(path.read_text())
    assert record["code_hash"] == f"{1:064x}"


def test_a_checkpoint_replaced_after_planning_is_refused(tmp_path):
    """A run trains on the checkpoint its key names: one replaced mid-sweep (a git pull, another
    terminal's pretrain) trained runs that were filed under the old checkpoint's key."""
    from harness.pretrain import plan_pretrain, pretrain

    folder = tmp_path / "project"
    params = small_mosi_params(folder)
    generate("mosei", folder / "mosei", seed=0, n_train=48, n_valid=16, n_test=16)
    params["data"]["tiny"]["mosei"]["path"] = str(folder / "mosei")
    params["pretrain"]["use"] = {"mosi": "mosei"}
    params["pretrain"]["checkpoints"]["mosei"] = str(folder / "ckpt" / "{profile}.pt")
    params["pretrain"]["profiles"]["tiny"].update(epochs=1)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    pretrain(**plan_pretrain(load_params(path), "mosei"), progress=False)
    plan = plan_run(load_params(path), "mosi", "linear")
    pretrain(**{**plan_pretrain(load_params(path), "mosei"), "seed": 7}, progress=False)  # replaced
    with pytest.raises(InputError, match="changed after this run was planned"):
        execute(plan, tmp_path / "runs", progress=False)
    assert not list((tmp_path / "runs").rglob("*.json"))


def test_wander_run_uses_the_papers_main_setting(params_file, tmp_path, capsys):
    """run_defaults in params.yaml: d = 16 on MOSI unless --set says otherwise."""
    assert load_params(params_file)["run_defaults"]["wander"] == {
        "food101": {"down_dim": 64}, "iemocap": {"down_dim": 16}, "mosi": {"down_dim": 16},
        "msrvtt": {"down_dim": 8}}
    argv = ["run", "--dataset", "mosi", "--method", "wander", "--set", "fused_length=8",
            "--params", str(params_file), "--out", str(tmp_path), "--json"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["row"] == {"method": "wander", "down_dim": 16,
                                                          "fused_length": 8}
    assert main(argv + ["--set", "down_dim=8"]) == 0
    assert json.loads(capsys.readouterr().out)["method_config"]["down_dim"] == 8


def test_recorded_run_is_not_recomputed(params_file, tmp_path):
    plan = plan_run(load_params(params_file), "mosi", "linear")
    first = execute(plan, tmp_path, progress=False)
    (path,) = tmp_path.glob("mosi/*.json")
    stamp = path.stat().st_mtime_ns
    assert execute(plan, tmp_path, progress=False) == first
    assert path.stat().st_mtime_ns == stamp


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "cifar", "--method", "wander"], "unknown dataset"),
    (["--dataset", "mosi", "--method", "wandr"], "unknown method 'wandr'"),
    (["--dataset", "mosi", "--method", "wander", "--variant", "v2"], "no variant 'v2'"),
    (["--dataset", "mosi", "--method", "wander", "--set", "lr=abc"], "expected a number, found 'abc'"),
    (["--dataset", "mosi", "--method", "wander", "--set", "nonexistent=1"], "unknown --set key"),
    (["--dataset", "mosi", "--method", "wander", "--set", "rank_h=0"], "rank_h = 0"),
    (["--dataset", "mosi", "--method", "lora", "--set", "dropout=-0.5"], "dropout = -0.5"),
    (["--dataset", "mosi", "--method", "wander", "--set", "epochs"], "expected key=value"),
])
def test_bad_input_exits_2_and_writes_nothing(params_file, tmp_path, capsys, argv, message):
    code = main(["run", *argv, "--params", str(params_file), "--out", str(tmp_path / "runs")])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_missing_params_file_is_named(tmp_path, capsys):
    assert main(["run", "--dataset", "mosi", "--method", "wander", "--params",
                 str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


@pytest.mark.slow
def test_wander_learns_on_the_pretrained_late_fusion_backbone(tmp_path, monkeypatch):
    """A learning-signal check: after fine-tuning, Wander's test MAE is below the MAE of the same
    model at initialisation (untrained head and adapter), for every seed."""
    from harness.pretrain import plan_pretrain, pretrain

    monkeypatch.chdir(tmp_path)  # the feature cache goes to ./datasets/features, not the checkout's

    generate("mosi", tmp_path / "mosi", seed=0, n_train=384, interaction_scope="pooled")
    generate("mosei", tmp_path / "mosei", seed=0, n_train=1024, interaction_scope="pooled")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["tiny"]["mosi"]["path"] = str(tmp_path / "mosi")
    params["data"]["tiny"]["mosei"]["path"] = str(tmp_path / "mosei")
    params["pretrain"]["checkpoints"]["mosei"] = str(tmp_path / "mosei.pt")
    params["pretrain"]["use"] = {"mosi": "mosei"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    loaded = load_params(tmp_path / "params.yaml")
    pretrain(**plan_pretrain(loaded, "mosei"), progress=False)
    gains = []
    for seed in (0, 1, 2):
        record = execute(plan_run(loaded, "mosi", "wander", seed=seed, settings={"down_dim": 16}),
                         tmp_path / "runs", progress=False)
        gains.append(record["initial_test"]["mae"] - record["metrics"]["mae"])
    assert min(gains) > 0.05, gains
