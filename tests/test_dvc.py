"""The user's main job through DVC, in a temporary git + DVC copy of the project: `dvc repro`
twice (the second does nothing), `dvc exp run -S method=wander`, a queue of two experiments run
by `dvc queue start -j 2`, `dvc exp show` and `dvc metrics diff` between two commits."""
import json
import time

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


def test_adding_a_dataset_leaves_the_other_stages_params_alone(tmp_path):
    """The pre-training, feature-cache and rank-search stages name the params their outputs
    depend on, not whole sections: adding a dataset as docs/architecture.md says (its data,
    train, generate and grid entries) must not make dvc rerun them; its own data stage appears."""
    from dvc.repo import Repo

    Repo.init(str(tmp_path), no_scm=True)
    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    before = stage_params(tmp_path)

    params["datasets"].append("mosi2")
    params["generate"]["mosi2"] = dict(params["generate"]["mosi"])
    for profile in ("tiny", "paper"):
        params["data"][profile]["mosi2"] = {"path": f"datasets/{profile}/mosi2"}
    params["train"]["mosi2"] = dict(params["train"]["mosi"])
    params["grid"]["mosi2"] = [{"method": "linear"}]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    after = stage_params(tmp_path)

    assert "data@mosi2" in after and "data@mosi2" not in before
    unchanged = [name for name in before if name.startswith(("pretrain@", "extract@"))
                 or name == "search"]  # the rank search runs on search.dataset only
    assert len(unchanged) == 10
    assert {name: after[name] for name in unchanged} == {name: before[name] for name in unchanged}
    assert after["finetune"] != before["finetune"]  # it computes the new dataset's runs
