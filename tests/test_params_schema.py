"""params.yaml and the command line's values are checked whole, by type and range, before any
work: each bad value exits 2 naming its origin (the params file or the command line), its key
path, what was expected and what was found, and nothing is written (no record, no journal)."""
import sys
from pathlib import Path

import pytest
import torch
import yaml

from harness.cli import main
from harness.errors import InputError
from harness.params_schema import COMMAND_LINE, SEED_MAX, validate_params
from harness.search import study_name_for
from harness.settings import load_params, plan_run

ROOT = Path(__file__).resolve().parent.parent
# a small MOSI grid of the test's own (rows 0-3), so the key paths below do not depend on the
# study's grid
MOSI_ROWS = [{"method": "linear"}, {"method": "lora", "rank": 4},
             {"method": "adapter", "down_dim": 8}, {"method": "wander", "down_dim": 8}]


def write_params(folder: Path, edit=None, text_edit=None) -> Path:
    """The project's params.yaml with the MOSI grid above, changed by ``edit`` (on the parsed
    mapping) or ``text_edit`` (on the text, for YAML spellings), written to ``folder``."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["grid"]["mosi"] = [dict(row) for row in MOSI_ROWS]
    params["pretrain"]["use"] = {}
    if edit is not None:
        edit(params)
    text = yaml.safe_dump(params, sort_keys=False)
    path = folder / "params.yaml"
    path.write_text(text_edit(text) if text_edit else text)
    return path


def exit_code(argv: list[str]) -> int:
    """``mmpetl argv``'s exit status (argparse's own refusals exit through SystemExit)."""
    try:
        return main(argv)
    except SystemExit as stop:
        return stop.code


def refused(capsys, argv: list[str], out: Path, *named: str) -> str:
    """Run ``argv``: exit 2, every string of ``named`` in the message, nothing under ``out``."""
    assert exit_code(argv) == 2
    message = capsys.readouterr().err
    for text in named:
        assert text in message, (text, message)
    assert not out.exists() or not any(out.rglob("*")), f"written under {out}: {list(out.rglob('*'))}"
    return message


def setter(path: str, value):
    """An edit that sets the dotted/indexed ``path`` (``grid.mosi.3.down_dim``) to ``value``."""
    def edit(params):
        *parents, last = path.split(".")
        node = params
        for part in parents:
            node = node[int(part) if part.isdigit() else part]
        node[int(last) if last.isdigit() else last] = value
    return edit


# --- params.yaml: every value type- and range-checked, the whole grid before the first run ---

BAD_VALUES = [
    ("grid.mosi.3.down_dim", "abc", "grid.mosi[3].down_dim", "an integer"),
    ("train.mosi.epochs", 1.5, "train.mosi.epochs", "an integer"),
    ("executor.workers", "two", "executor.workers", "an integer"),
    ("executor.workers", -1, "executor.workers", "greater than 0"),
    ("grid.mosi", None, "grid.mosi", "a list"),
    ("grid.mosi.1.rank", 0, "grid.mosi[1].rank", "an integer > 0"),
    ("grid.mosi.1.rank", 1000, "grid.mosi[1].rank", "at most the smallest hidden size"),
    ("seeds", [0, -1], "seeds[1]", "greater than or equal to 0"),
    ("seeds", [SEED_MAX + 1], "seeds[0]", f"less than or equal to {SEED_MAX}"),
    ("profiles.tiny.train.lr", float("nan"), "profiles.tiny.train.lr", "a finite number"),
    ("train.mosi.batch_size", 0, "train.mosi.batch_size", "greater than 0"),
    ("executor.kind", "threads", "executor.kind", "'sequential', 'process' or 'ray'"),
    ("profile", "huge", "profile", "'tiny' or 'paper'"),
    ("grid.mosi.0.down_dimm", 8, "grid.mosi[0].down_dimm", "one of"),
    ("executor.worker", 2, "executor.worker", "one of ['cpus_per_trial'"),
    ("train.mosii", {"epochs": 2}, "train.mosii", "one of ['food101'"),
    ("profiles.tiny.late_fusion.width", 0, "profiles.tiny.late_fusion.width", "must be > 0"),
    ("profiles.tiny.late_fusion.heads", 5, "profiles.tiny.late_fusion", "not divisible by heads"),
    ("profiles.tiny.late_fusion.widht", 64, "profiles.tiny.late_fusion.widht", "one of"),
    ("profiles.tiny.two_tower.image_hidden", "big", "profiles.tiny.two_tower.image_hidden",
     "an integer"),
    # a union: one key, each way to be right (not the members' tags, threads.literal['auto'])
    ("threads", 0, "threads", "'auto' or greater than 0"),
    # loader options, each family's ``Options``: before any run (they failed late, or not at all)
    ("data.tiny.food101.image_size", -3, "data.tiny.food101.image_size", "greater than 0"),
    ("data.tiny.food101.check_images_exist", "maybe", "data.tiny.food101.check_images_exist",
     "true or false"),
    ("data.tiny.food101.valid_fraction", 1.5, "data.tiny.food101.valid_fraction", "less than 1"),
    ("data.tiny.food101.imgae_size", 32, "data.tiny.food101.imgae_size", "one of ['format'"),
    ("data.tiny.food101.format", "zip", "data.tiny.food101.format", "one of ['raw', 'mmbt', 'cggm']"),
    ("data.tiny.msrvtt.max_tokens", 0, "data.tiny.msrvtt.max_tokens", "greater than 0"),
    ("data.tiny.msrvtt.max_tokens", 2.7, "data.tiny.msrvtt.max_tokens", "an integer"),
    ("data.tiny.msrvtt.split_scheme", "bogus", "data.tiny.msrvtt.split_scheme",
     "one of the card's split schemes ['full', 'jsfusion', 'miech']"),
    ("data.tiny.msrvtt.experts", ["s3d", "nope"], "data.tiny.msrvtt.experts", "experts among"),
    ("data.tiny.msrvtt.captions", {"train": "bogus"}, "data.tiny.msrvtt.captions",
     "'first', 'random' or 'all'"),
    ("data.tiny.iemocap.max_len", {"txt": 3}, "data.tiny.iemocap.max_len.txt",
     "'text', 'audio' or 'vision'"),
    # a checkpoint path is formatted with {profile} alone (harness.settings.checkpoint_path)
    ("pretrain.checkpoints.mosei", "datasets/checkpoints/mosei/{profil}-late_fusion.pt",
     "pretrain.checkpoints.mosei", "{profile}"),
    ("pretrain.checkpoints.mosei", "datasets/checkpoints/{0}.pt", "pretrain.checkpoints.mosei",
     "{profile}"),
    # every backbone's dropouts in [0, 1) (torch refuses > 1 only when the run builds the model)
    ("profiles.tiny.late_fusion.attn_dropout", 1.5, "profiles.tiny.late_fusion.attn_dropout", "[0, 1)"),
    ("profiles.tiny.late_fusion.relu_dropout", -0.1, "profiles.tiny.late_fusion.relu_dropout", "[0, 1)"),
    ("profiles.tiny.late_fusion.out_dropout", 1.0, "profiles.tiny.late_fusion.out_dropout", "[0, 1)"),
    ("profiles.tiny.mmt.text", {"hidden_dropout_prob": 1.5}, "profiles.tiny.mmt.text", "[0, 1)"),
    # a data block's sizes against the backbone block its dataset's runs build
    ("data.tiny.food101.image_size", 33, "data.tiny.food101.image_size",
     "profiles.tiny.two_tower.image_size = 32"),
    ("data.tiny.food101.max_text_len", 5000, "data.tiny.food101.max_text_len",
     "profiles.tiny.two_tower.max_text_len = 16"),
    ("data.tiny.recipes.max_text_len", 17, "data.tiny.recipes.max_text_len",
     "profiles.tiny.two_tower.max_text_len = 16"),
    ("data.tiny.msrvtt.max_text_len", 5000, "data.tiny.msrvtt.max_text_len",
     "profiles.tiny.mmt.text.max_position_embeddings = 32"),
    ("data.tiny.msrvtt.experts", ["s3d", "s3d", "rgb"], "data.tiny.msrvtt.experts[1]",
     "each value once"),
    # a backbone whose parameters alone exceed this machine's memory (4 TB at this width)
    ("profiles.tiny.late_fusion.width", 1048576, "profiles.tiny.late_fusion.width",
     "parameters alone exceed this machine's memory"),
    # more intra-op threads than MAX_THREADS (1024); 100000 crashed the OpenMP runtime
    ("threads", 100000, "threads", "less than or equal to"),
]


@pytest.mark.parametrize("path, value, key, expected", BAD_VALUES,
                         ids=[f"{case[0]}={case[1]!r}" for case in BAD_VALUES])
def test_a_bad_value_in_params_exits_2_before_any_run(capsys, tmp_path, path, value, key, expected):
    params = write_params(tmp_path, setter(path, value))
    out = tmp_path / "runs"
    refused(capsys, ["sweep", "--params", str(params), "--out", str(out), "--executor", "sequential"],
            out, f"file {params}", f"key '{key}'", expected)


# --- YAML 1.2 numbers ---------------------------------------------------------------------------

def test_exponent_without_a_dot_is_a_number_in_params_and_on_the_command_line(tmp_path):
    params = load_params(write_params(tmp_path, text_edit=lambda text: text.replace(
        "lr: 0.001", "lr: 1e-3", 1)))
    assert params["train"]["food101"]["lr"] == 2e-3  # untouched
    assert sum(block.get("lr") == 1e-3 and isinstance(block["lr"], float)
               for block in params["train"].values()) >= 1
    plan = plan_run(params, "mosi", "linear", overrides={"lr": "1e-4", "grad_clip": "1"})
    assert plan.train.lr == 1e-4 and isinstance(plan.train.lr, float)
    assert plan.train.grad_clip == 1.0 and isinstance(plan.train.grad_clip, float)


def test_a_key_given_twice_exits_2_naming_both_lines(capsys, tmp_path):
    params = write_params(tmp_path, text_edit=lambda text: text + "seeds:\n- 5\n")
    out = tmp_path / "runs"
    refused(capsys, ["sweep", "--params", str(params), "--out", str(out)], out, f"file {params}",
            "found the key 'seeds' twice (first on line")


def test_a_params_file_that_is_not_utf8_exits_2_naming_the_line(capsys, tmp_path):
    params = write_params(tmp_path)
    lines = params.read_text().count("\n")
    params.write_bytes(params.read_bytes() + b"bad: \xff\n")
    out = tmp_path / "runs"
    for command in (["run", "--dataset", "mosi", "--method", "lora"], ["sweep"]):
        refused(capsys, [*command, "--params", str(params), "--out", str(out)], out, f"file {params}",
                f"key 'line {lines + 1}'", "not UTF-8", "byte 0xff")


# --- the command line: its values and where they came from ----------------------------------

COMMAND_LINE_CASES = [
    (["--set", "lr=.inf"], [COMMAND_LINE, "key 'lr'", "a finite number"]),
    (["--set", "lr=.nan"], [COMMAND_LINE, "key 'lr'", "a finite number"]),
    (["--set", "lr=NaN"], [COMMAND_LINE, "key 'lr'", "a number"]),
    (["--set", "lr=-1e-3"], [COMMAND_LINE, "key 'lr'", "greater than 0"]),
    (["--set", "epochs=1.5"], [COMMAND_LINE, "key 'epochs'", "an integer"]),
    (["--set", "rank=0"], [COMMAND_LINE, "key 'rank'", "an integer > 0"]),
    (["--set", "rank=1000"], [COMMAND_LINE, "key 'rank'", "at most the smallest hidden size"]),
    (["--set", "target_roles=qv"], [COMMAND_LINE, "key 'target_roles'", "a list"]),
    (["--set", "amp=yes"], [COMMAND_LINE, "key 'amp'", "true or false"]),  # YAML 1.1's yes: a string
    (["--set", "rank=1_6"], [COMMAND_LINE, "key 'rank'", "an integer"]),  # YAML 1.1's 16: a string
    (["--set", "lr=1e-3", "--set", "lr=2e-3"], ["key 'lr'", "each key once", "'1e-3' and '2e-3'"]),
    pytest.param(["--set", "device=cuda"], [COMMAND_LINE, "key 'device'", "no CUDA device"],
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here")),
    (["--seed", "-1"], ["--seed", "expected an integer in [0, "]),
    (["--seed", str(SEED_MAX + 1)], ["--seed", f"[0, {SEED_MAX}]"]),
]


@pytest.mark.parametrize("extra, named", COMMAND_LINE_CASES,
                         ids=[" ".join(getattr(case, "values", case)[0]) for case in COMMAND_LINE_CASES])
def test_a_bad_command_line_value_exits_2_naming_the_command_line(capsys, tmp_path, extra, named):
    params = write_params(tmp_path)
    out = tmp_path / "runs"
    message = refused(capsys, ["run", "--params", str(params), "--dataset", "mosi", "--method",
                               "lora", "--out", str(out), *extra], out, *named)
    assert "params.yaml" not in message  # the value came from the command line


@pytest.mark.parametrize("argv, named", [
    (["sweep", "--workers", "-1"], ["--workers", "expected an integer > 0"]),
    (["search", "--workers", "0"], ["--workers", "expected an integer > 0"]),
    (["pretrain", "--source", "mosei", "--seed", "-3"], ["--seed"]),
    (["pretrain", "--source", "mosei", "--set", "lr=.inf"], [COMMAND_LINE, "key 'lr'"]),
], ids=["sweep --workers -1", "search --workers 0", "pretrain --seed -3", "pretrain --set lr=.inf"])
def test_other_commands_check_their_options(capsys, tmp_path, argv, named):
    params = write_params(tmp_path)
    out = tmp_path / "out"
    refused(capsys, [*argv, "--params", str(params), "--out", str(out)], out, *named)


# --- grid rows ----------------------------------------------------------------------------------

def _duplicate(params):
    params["grid"]["mosi"].append({"method": "adapter", "down_dim": 8})


def _default_spelt_out(params):  # LoRA's default alpha written out: the same run as row 1
    params["grid"]["mosi"].append({"method": "lora", "rank": 4, "alpha": 16.0})


GRID_CASES = [
    ("unknown method", setter("grid.mosi.2.method", "adaptor"), "grid.mosi[2].method", "'adaptor'"),
    ("unknown variant", setter("grid.mosi.3.variant", "v2"), "grid.mosi[3].variant", "'v2'"),
    ("duplicate row", _duplicate, "grid.mosi[4]", "grid.mosi[2] is the same"),
    ("duplicate by defaults", _default_spelt_out, "grid.mosi[4]", "grid.mosi[1] is the same"),
    ("empty grid", setter("grid.mosi", []), "grid.mosi", "a non-empty list"),
    ("no grid at all", setter("grid", {}), "grid", "a non-empty mapping"),
    ("dataset without a grid", lambda p: p["grid"].pop("mosi"), "grid.mosi", "an entry"),
    ("fold without folds", setter("data.tiny.mosi.fold", 2), "data.tiny.mosi.fold", "no fold"),
    ("null where the field takes none", setter("grid.mosi.1.rank", None), "grid.mosi[1].rank",
     "an integer"),
    ("target_roles a string", setter("grid.mosi.1.target_roles", "qv"), "grid.mosi[1].target_roles",
     "a list"),
    ("unknown role", setter("grid.mosi.1.target_roles", ["q", "x"]), "grid.mosi[1].target_roles",
     "a non-empty subset"),
    ("duplicate seed", setter("seeds", [0, 1, 0]), "seeds[2]", "seeds[0] is the same"),
    ("pre-training source without a checkpoint", setter("pretrain.use", {"mosi": "mosi"}),
     "pretrain.use.mosi", "one of pretrain.checkpoints"),
    ("unknown top-level key", setter("seed", 3), "seed", "one of ['data', 'data_seed'"),
]


@pytest.mark.parametrize("edit, key, named", [case[1:] for case in GRID_CASES],
                         ids=[case[0] for case in GRID_CASES])
def test_a_bad_grid_exits_2_naming_the_row(capsys, tmp_path, edit, key, named):
    params = write_params(tmp_path, edit)
    out = tmp_path / "runs"
    refused(capsys, ["sweep", "--params", str(params), "--out", str(out), "--executor", "sequential"],
            out, f"file {params}", f"key '{key}'", named)


def test_a_fold_is_accepted_where_the_dataset_has_folds(tmp_path):
    load_params(write_params(tmp_path, setter("data.tiny.iemocap.fold", 2)))


def test_a_thread_count_beyond_the_bound_is_refused(monkeypatch):
    """``threads`` and OMP_NUM_THREADS: at most MAX_THREADS (1024); 100000 segfaulted in
    the first torch op."""
    from harness.train import MAX_THREADS, THREADS_ENV, thread_count

    monkeypatch.delenv(THREADS_ENV, raising=False)
    assert thread_count(MAX_THREADS, "tiny") == MAX_THREADS
    with pytest.raises(InputError, match="threads") as error:
        thread_count(100000, "tiny", "params.yaml")
    assert "params.yaml" in str(error.value) and f"at most {MAX_THREADS}" in str(error.value)
    monkeypatch.setenv(THREADS_ENV, "100000")
    with pytest.raises(InputError, match=THREADS_ENV) as error:
        thread_count("auto", "tiny")
    assert f"at most {MAX_THREADS}" in str(error.value) and "'100000'" in str(error.value)


def test_a_bad_thread_environment_exits_2_before_any_run(capsys, tmp_path, monkeypatch):
    params = write_params(tmp_path)
    out = tmp_path / "runs"
    for value in ("0", "-1", "abc", "100000"):
        monkeypatch.setenv("OMP_NUM_THREADS", value)
        refused(capsys, ["sweep", "--params", str(params), "--out", str(out), "--executor",
                         "sequential"], out, "key 'OMP_NUM_THREADS'", repr(value))


def test_the_committed_params_validate():
    validate_params(load_params(ROOT / "params.yaml"))


def test_a_row_checked_by_plan_run_too(tmp_path):
    """A params mapping changed after loading (as the tests and library callers do) is checked
    when a run is planned, before anything runs."""
    params = load_params(write_params(tmp_path))
    with pytest.raises(InputError, match="down_dim"):
        plan_run(params, "mosi", "adapter", settings={"down_dim": "abc"})


@pytest.mark.parametrize("failure", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: "
                 "you tried to allocate 256000000000 bytes"),  # torch's, for an adapter of d = 10^9
    MemoryError()])
def test_settings_too_large_for_memory_exit_2_naming_them(capsys, tmp_path, monkeypatch, failure):
    """The allocation fails when the method is attached (simulated: a real one would need settings
    no machine's memory holds, and a machine that overcommits memory would swap, not fail)."""
    import harness.run

    def attach(*args, **kwargs):
        raise failure
    monkeypatch.setattr(harness.run, "apply_method", attach)
    from harness.data import generate

    generate("mosi", tmp_path / "mosi", n_train=8, n_valid=4, n_test=4)  # a clean checkout has none
    params = write_params(tmp_path, setter("data.tiny.mosi.path", str(tmp_path / "mosi")))
    out = tmp_path / "runs"
    assert exit_code(["run", "--params", str(params), "--dataset", "mosi", "--method", "adapter",
                      "--set", "down_dim=1000000000", "--out", str(out)]) == 2
    message = capsys.readouterr().err
    for text in ("out of memory on cpu", "'down_dim': 1000000000", "fit in this machine's memory"):
        assert text in message, (text, message)
    assert not [path for path in out.rglob("*") if path.is_file()]  # no record (the lock's folder stays)


# --- the ray executor without Ray ---------------------------------------------------------------

@pytest.mark.parametrize("origin", ["command line", "params"])
def test_ray_executor_without_ray_says_how_to_install_it(capsys, tmp_path, monkeypatch, origin):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    params = write_params(tmp_path, setter("executor.kind", "ray") if origin == "params" else None)
    out = tmp_path / "runs"
    argv = ["sweep", "--params", str(params), "--out", str(out)]
    key = "executor.kind" if origin == "params" else "--executor"
    refused(capsys, argv + (["--executor", "ray"] if origin == "command line" else []), out,
            'pip install -e ".[ray]"', f"key '{key}'")


# --- search ---------------------------------------------------------------------------------------

SEARCH_CASES = [
    ("batch -1", setter("search.batch", -1), "search.batch", "greater than 0"),
    ("batch 0", setter("search.batch", 0), "search.batch", "greater than 0"),
    ("trials 0", setter("search.trials", 0), "search.trials", "greater than 0"),
    ("unknown metric", setter("search.metric", "acc3"), "search.metric", "acc2_non0"),
    ("metric of another task", setter("search.metric", "t2v_r5"), "search.metric", "mae"),
    ("unknown space field", setter("search.space.wander", {"down_dims": [8]}),
     "search.space.wander.down_dims", "one of"),
    ("bad space choice", setter("search.space.lora", {"rank": [2, 0]}), "search.space.lora.rank",
     "an integer > 0"),
    ("empty space choices", setter("search.space.lora", {"rank": []}), "search.space.lora.rank",
     "a non-empty list"),
    ("unknown space method", setter("search.space", {"lorax": {"rank": [2]}}), "search.space.lorax",
     "one of"),
    ("unknown sampler", setter("search.sampler", "grid"), "search.sampler", "'tpe' or 'random'"),
    ("space with no field", setter("search.space.lora", {}), "search.space.lora",
     "at least one config field"),
    ("choice twice", setter("search.space.lora", {"rank": [4, 8, 4]}), "search.space.lora.rank",
     "found 4 twice"),
]


@pytest.mark.parametrize("edit, key, named", [case[1:] for case in SEARCH_CASES],
                         ids=[case[0] for case in SEARCH_CASES])
def test_a_bad_search_setting_exits_2_before_any_trial_or_journal(capsys, tmp_path, edit, key, named):
    params = write_params(tmp_path, edit)
    out = tmp_path / "search"
    refused(capsys, ["search", "--params", str(params), "--out", str(out), "--executor", "sequential"],
            out, f"file {params}", f"key '{key}'", named)


def test_the_study_name_follows_what_defines_the_study(tmp_path):
    params = load_params(write_params(tmp_path))
    name = study_name_for(params, "wander")
    assert study_name_for(params, "wander") == name  # the same definition, the same study
    changes = {"metric": setter("search.metric", "mae"),
               "epochs": setter("profiles.tiny.train.epochs", 2),
               "space": setter("search.space.wander.down_dim", [16, 8]),
               "sampler": setter("search.sampler", "random")}
    names = {}
    for what, edit in changes.items():
        (tmp_path / what).mkdir()
        names[what] = study_name_for(load_params(write_params(tmp_path / what, edit)), "wander")
    assert all(other != name for other in names.values()), names
    assert len(set(names.values())) == len(names)


@pytest.mark.parametrize("profile", ["tiny", "paper"])
def test_the_shipped_params_validate_under_each_profile(tmp_path, profile):
    """Every grid row and the search space of the project's params.yaml fit the backbone of each
    profile it ships (the paper's Adapter (d=64) rows on the width-40 paper backbone included)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["profile"] = profile
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    assert load_params(path)["profile"] == profile
