"""The user's main job through DVC, in a temporary git + DVC copy of the project: `dvc repro`
twice (the second does nothing), `dvc exp run -S method=wander`, a queue of two experiments run
by `dvc queue start -j 2`, `dvc exp show` and `dvc metrics diff` between two commits. And what
dvc.yaml names, resolved by DVC against params.yaml: adding a dataset as docs/architecture.md
says makes its data and card deps of the stages that read them and leaves the others alone."""
import json
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from helpers import ROOT, copy_project, sh


@pytest.fixture(scope="module")
def repo(reproduced_inputs, tmp_path_factory):
    """The project with a small study, committed; its input stages already reproduced."""
    return copy_project(reproduced_inputs, tmp_path_factory.mktemp("repo"), datasets=["mosi"],
                        seeds=[0, 1], method="all",
                        grid={"mosi": [{"method": "linear"}, {"method": "lora", "rank": 4},
                                       {"method": "adapter", "down_dim": 8},
                                       {"method": "wander", "down_dim": 8}]})


@pytest.mark.slow
def test_repro_then_nothing_to_do(repo):
    sh("dvc", "repro", cwd=repo)
    assert (repo / "results/tables/table3_mosi.md").is_file()
    assert (repo / "results/metrics.json").is_file()
    again = sh("dvc", "repro", cwd=repo)
    assert "didn't change, skipping" in again.stdout or "up to date" in again.stdout.lower()
    for stage in ("finetune", "tables", "search", "leaderboard"):
        assert f"Running stage '{stage}'" not in again.stdout
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "first results", cwd=repo)


@pytest.mark.slow
def test_metrics_diff_between_commits(repo):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["seeds"] = [0, 2]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh("dvc", "repro", cwd=repo)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "seeds 0 and 2", cwd=repo)
    diff = json.loads(sh("dvc", "metrics", "diff", "HEAD~1", "HEAD", "--json", cwd=repo).stdout)
    changes = diff["results/metrics.json"]
    assert changes and all(isinstance(v["diff"], (int, float)) for v in changes.values()
                           if v.get("diff") is not None)
    markdown = sh("mmpetl", "diff", "HEAD~1", "HEAD", cwd=repo).stdout
    assert "table3_mosi" in markdown


@pytest.mark.slow
def test_exp_run_and_queue(repo):
    sh("dvc", "exp", "run", "-S", "method=wander", cwd=repo)
    sh("dvc", "exp", "run", "--queue", "-S", "method=lora,adapter", cwd=repo)
    sh("dvc", "queue", "start", "-j", "2", cwd=repo)
    deadline = time.time() + 900
    while time.time() < deadline:
        status = sh("dvc", "queue", "status", cwd=repo).stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(5)
    assert "Failed" not in status, status
    shown = json.loads(sh("dvc", "exp", "show", "--json", cwd=repo).stdout)
    methods = []
    for commit in shown:
        for exp in commit.get("experiments") or []:
            for revision in exp.get("revs", []):
                data = revision.get("data") or {}
                method = data.get("params", {}).get("params.yaml", {}).get("data", {}).get("method")
                metrics = data.get("metrics", {}).get("results/metrics.json", {}).get("data")
                if method and metrics:
                    methods.append(method)
    assert {"wander", "lora", "adapter"} <= set(methods), json.dumps(shown)[:3000]


def stage_params(folder) -> dict:
    """{stage name: {param key: value}} as DVC resolves dvc.yaml against params.yaml in ``folder``."""
    from dvc.repo import Repo

    with Repo(str(folder)) as dvc:
        return {stage.name: {key: value for dep in stage.deps if hasattr(dep, "read_params")
                             for key, value in dep.read_params().items()}
                for stage in dvc.index.stages}


def dvc_project(folder: Path, params: dict, pipeline: dict | None = None) -> Path:
    """A bare DVC project in ``folder``: ``pipeline`` (default: this dvc.yaml) and ``params``."""
    from dvc.repo import Repo

    if not (folder / ".dvc").is_dir():
        Repo.init(str(folder), no_scm=True)
    (folder / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text() if pipeline is None
                                     else yaml.safe_dump(pipeline, sort_keys=False))
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return folder


def with_dataset(params: dict, name: str = "mosi2") -> dict:
    """``params`` with a copy of MOSI added as docs/architecture.md "Adding a dataset" says: its
    generate, data, train and grid entries and its name in ``datasets``."""
    params = yaml.safe_load(yaml.safe_dump(params))
    params["datasets"].append(name)
    params["generate"][name] = dict(params["generate"]["mosi"])
    for profile in ("tiny", "paper"):
        params["data"][profile][name] = {"path": f"datasets/{profile}/{name}"}
    params["train"][name] = dict(params["train"]["mosi"])
    params["grid"][name] = [{"method": "linear"}]
    return params


def file_deps(stage) -> list[str]:
    return [dep.def_path for dep in stage.deps if not hasattr(dep, "read_params")]


def covers(stage, path: str) -> bool:
    """A dep of ``stage`` is ``path`` or a folder above it: dvc hashes ``path`` for the stage."""
    return any(Path(path).is_relative_to(dep) for dep in file_deps(stage))


def reaches_card(stages: dict, stage, card: str) -> bool:
    """``stage`` depends on the card file ``card``: directly, or on the copy of it (an output of
    the same file name) that a stage depending on the card writes."""
    copies = [out.def_path for other in stages.values() if card in file_deps(other)
              for out in other.outs if Path(out.def_path).name == Path(card).name]
    return covers(stage, card) or any(covers(stage, copy) for copy in copies)


def test_adding_a_dataset_leaves_the_other_stages_params_alone(tmp_path):
    """The pre-training, feature-cache and rank-search stages name the params their outputs
    depend on, not whole sections: adding a dataset as docs/architecture.md says (its data,
    train, generate and grid entries) must not make dvc rerun them; its own data stage appears."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    before = stage_params(dvc_project(tmp_path, params))
    after = stage_params(dvc_project(tmp_path, with_dataset(params)))

    assert "data@mosi2" in after and "data@mosi2" not in before
    unchanged = [name for name in before if name.startswith(("pretrain@", "extract@"))
                 or name == "search"]  # the rank search runs on search.dataset only
    assert len(unchanged) == 10
    assert {name: after[name] for name in unchanged} == {name: before[name] for name in unchanged}
    assert after["finetune"] != before["finetune"]  # it computes the new dataset's runs


def test_a_new_datasets_data_and_card_are_deps_of_the_stages_that_read_them(tmp_path):
    """dvc.yaml names no dataset in the stages that read every dataset: the finetune stage
    depends on the new dataset's generated data, and it and the leaderboard and tables on its card
    (main_metric ranks the leaderboard), after its data@ stage in the pipeline; otherwise a change
    to ``generate.<name>`` or to the card leaves `dvc status` up to date and the results stale."""
    from dvc.repo import Repo
    import networkx as nx

    dvc_project(tmp_path, with_dataset(yaml.safe_load((ROOT / "params.yaml").read_text())))
    with Repo(str(tmp_path)) as dvc:
        stages = {stage.name: stage for stage in dvc.index.stages}
        upstream = {name: {s.name for s in nx.descendants(dvc.index.graph, stage)}
                    for name, stage in stages.items()}
    assert covers(stages["finetune"], "datasets/generated/mosi2")
    for name in ("finetune", "leaderboard", "tables"):
        assert reaches_card(stages, stages[name], "datasets/mosi2.yaml"), name
        assert "data@mosi2" in upstream[name], name
    assert "datasets/mosi2.yaml" in file_deps(stages["data@mosi2"])
    pretraining = {name for name in stages if name.startswith("pretrain@")}
    assert len(pretraining) == 3 and pretraining <= upstream["finetune"]
    assert {"data@mosi", "pretrain@mosei"} <= upstream["search"]


def test_each_extract_item_names_what_params_yaml_and_its_card_say():
    """An extract@ item's ``kind`` is its card's backbone, and ``use`` the params key naming its
    pre-training source, pretrain.use.<dataset> (the whole pretrain.use where the dataset has
    none: it reads that absence); the checkpoint that source names lies in one of its deps."""
    from harness.data.cards import load_card

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    use, checkpoints = params["pretrain"]["use"], params["pretrain"]["checkpoints"]
    extract = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["extract"]
    for dataset, item in extract["foreach"].items():
        assert item["kind"] == load_card(dataset).backbone, dataset
        if dataset not in use:
            assert item["use"] == "pretrain.use", dataset
            continue
        assert item["use"] == f"pretrain.use.{dataset}", dataset
        path = Path(checkpoints[use[dataset]].format(profile=params["profile"]))
        assert any(path.is_relative_to(folder) for folder in
                   (item["backbone"], f"datasets/generated/{dataset}")), dataset


def test_pretraining_a_new_dataset_leaves_the_other_extract_stages_and_search_alone(tmp_path):
    """Optional step 3 of "Adding a dataset": ``pretrain.use.<name>`` and an extract@<name> item.
    The other feature caches and the rank search name only their own pretrain.use entry, so dvc
    leaves them up to date; the random-tower datasets (no entry) read the whole map."""
    params = with_dataset(yaml.safe_load((ROOT / "params.yaml").read_text()))
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    before = stage_params(dvc_project(tmp_path, params, pipeline))

    params["pretrain"]["use"]["mosi2"] = "mosei"
    pipeline["stages"]["extract"]["foreach"]["mosi2"] = {
        "backbone": "datasets/checkpoints/mosei", "kind": "late_fusion", "use": "pretrain.use.mosi2"}
    after = stage_params(dvc_project(tmp_path, params, pipeline))

    random_towers = {f"extract@{name}" for name in pipeline["stages"]["extract"]["foreach"]
                     if name not in params["pretrain"]["use"]}
    assert random_towers == {"extract@planted_cross", "extract@planted_null"}
    unchanged = [name for name in before if name not in random_towers
                 and (name.startswith(("pretrain@", "extract@")) or name == "search")]
    assert len(unchanged) == 8
    assert {name: after[name] for name in unchanged} == {name: before[name] for name in unchanged}
    assert after["extract@mosi2"]["pretrain.use.mosi2"] == "mosei" and "extract@mosi2" not in before
    for name in random_towers:
        assert {key for key in after[name] if after[name][key] != before[name][key]} == {"pretrain.use"}
    assert after["finetune"] != before["finetune"]  # its runs on the new dataset start from mosei


@pytest.mark.slow
def test_each_data_stage_copies_the_card_it_read(reproduced_inputs):
    """The card copy beside the generated data (what the stages reading every card depend on) is
    the card, for every data@ stage run there (those before an extract@ stage)."""
    generated = reproduced_inputs / "datasets/generated"
    params = yaml.safe_load((reproduced_inputs / "params.yaml").read_text())
    ran = [name for name in params["generate"] if (generated / name).is_dir()]
    assert "mosi" in ran and "planted_cross" in ran
    for name in ran:
        copy = generated / f"{name}.yaml"
        assert copy.read_text() == (reproduced_inputs / "datasets" / f"{name}.yaml").read_text(), name


def test_dvc_plots_output_is_ignored():
    """`dvc plots show` (README) writes dvc_plots/: git ignores it."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    ignored = subprocess.run(["git", "check-ignore", "-q", "--no-index", "dvc_plots/index.html"],
                             cwd=ROOT)
    assert ignored.returncode == 0


def test_records_set_aside_are_outside_the_hashes_dvc_records():
    """A sweep and the search move records of other code to <records>/.stale (ignored by git): DVC
    must not hash them into the finetune and search outputs, or a fresh clone (which has none)
    finds those stages changed and reruns them (the search did, rewriting dvc.lock)."""
    from dvc.repo import Repo

    from harness.sweep import STALE

    repo = Repo(str(ROOT))
    try:
        for records in ("results/runs", "results/search/runs"):
            assert repo.dvcignore.is_ignored_dir(repo.fs.join(repo.root_dir, records, STALE)), records
            assert not repo.dvcignore.is_ignored_dir(repo.fs.join(repo.root_dir, records)), records
    finally:
        repo.close()
