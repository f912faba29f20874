"""Data-loading train settings (issue 17): ``loader_workers`` and ``pin_memory`` come from params,
are checked, change neither which items make a batch nor their order, and are recorded as in
effect (pinned memory only on CUDA). Workers are in the run key (an item drawing a random number
draws it from the worker's generator), pinned memory is not. The CUDA path is scripts/gpu_check.sh's (no GPU on the CI machine)."""
import os

import pytest
import torch
import yaml
from torch.utils.data import Dataset

from harness.errors import InputError
from harness.params_schema import check_train
from harness.run import execute, run_key
from harness.settings import load_params, plan_run
from harness.tasks.tasks import TASKS
from harness.train import TrainSettings, batches, fine_tune, loader_in_effect
from tests.helpers import small_mosi_params


class ItemDataset(Dataset):
    """Items one at a time (default_collate), like the loaders' datasets."""

    def __len__(self):
        return 37

    def __getitem__(self, index):
        return {"x": torch.full((3,), float(index)), "label": torch.tensor(index)}


class IndexedDataset(ItemDataset):
    """A batch at a time (``batch(indices)``), like the in-memory feature cache."""

    def batch(self, indices):
        return {"x": torch.tensor(indices, dtype=torch.float32)[:, None].repeat(1, 3),
                "label": torch.tensor(indices)}


@pytest.mark.parametrize("dataset", [ItemDataset(), IndexedDataset()], ids=["items", "indexed"])
@pytest.mark.parametrize("seed", [None, 5])
def test_loader_workers_give_the_same_batches_in_the_same_order(dataset, seed):
    """Epoch after epoch (workers kept across passes draw their base seed once, not per pass),
    and the global generator (dropout's) is drawn alike."""
    def three_epochs(loader):
        torch.manual_seed(0)
        passes = batches(dataset, 8, seed, loader)
        return [[b["label"].tolist() for b in passes] for _ in range(3)], torch.rand(1).item()

    alone, after_alone = three_epochs(None)
    with_workers, after_workers = three_epochs({"workers": 2, "pin_memory": False})
    assert with_workers == alone and after_workers == after_alone
    assert all(sorted(sum(epoch, [])) == list(range(len(dataset))) for epoch in alone)
    if seed is not None:
        assert sum(alone[0], []) != list(range(len(dataset)))  # shuffled
        assert alone[1] != alone[0]  # anew each epoch


class ReaderPid(ItemDataset):
    """Items that say which process read them: a worker's pid with loader_workers."""

    def __getitem__(self, index):
        return {"x": torch.full((3,), float(index)), "label": torch.tensor(float(index % 3)),
                "pid": torch.tensor(os.getpid())}


class ReaderProbe(torch.nn.Linear):
    """A regression probe noting the reader pids of every batch it evaluates."""

    def __init__(self):
        super().__init__(3, 1)
        self.evaluated = []

    def forward(self, batch):
        if not self.training:
            self.evaluated.append(set(batch["pid"].tolist()))
        return super().forward(batch["x"]).squeeze(-1)


def test_each_split_keeps_its_loader_workers_for_the_whole_run():
    """fine_tune builds each split's loader once: with a worker, the validation passes (one per
    epoch) are read by one worker process, and the initial and final test passes by another,
    instead of a worker started for every pass."""
    settings = TrainSettings(epochs=3, batch_size=8, loader_workers=1)
    model = ReaderProbe()
    fine_tune(model, TASKS["regression"], {"train": ReaderPid(), "valid": ReaderPid(),
                                           "test": ReaderPid()}, settings, seed=0, progress=False)
    test_first, *valid, test_last = model.evaluated  # one batch per pass (37 items <= 64)
    assert len(valid) == settings.epochs
    assert len(set().union(*valid)) == 1 and test_first == test_last
    assert os.getpid() not in test_first | valid[0] and test_first != valid[0]


def test_pinned_memory_is_in_effect_on_cuda_only():
    assert loader_in_effect(TrainSettings(loader_workers=3, pin_memory=True)) == \
        {"workers": 3, "pin_memory": False}  # nothing to pin for on CPU: ignored
    cuda = TrainSettings(device="cuda", pin_memory=True)  # not validated: no CUDA needed here
    assert loader_in_effect(cuda) == {"workers": 0, "pin_memory": True}


@pytest.mark.parametrize("key, value, expected", [
    ("loader_workers", -1, "greater than or equal to 0"), ("loader_workers", 1.5, "integer"),
    ("loader_workers", True, "integer"), ("pin_memory", "yes", "true or false")])
def test_bad_loader_settings_are_refused_naming_the_key(key, value, expected):
    with pytest.raises(InputError) as caught:
        check_train({key: value}, "params.yaml", "profiles.paper.train")
    message = str(caught.value)
    assert f"profiles.paper.train.{key}" in message and "params.yaml" in message
    assert expected in message.lower() and repr(value) in message


class RandomItemDataset(ItemDataset):
    """An item that draws a random number when read, as MSR-VTT's random train caption does."""

    def __getitem__(self, index):
        return {"draw": torch.randint(1000, (1,)), "label": torch.tensor(index)}


def test_items_drawing_random_numbers_differ_in_worker_processes():
    """Why loader_workers is in the run key: the workers' generators are not the training
    process's, so a random draw inside an item changes with them."""
    def draws(loader):
        torch.manual_seed(0)
        return [b["draw"].tolist() for b in batches(RandomItemDataset(), 8, 5, loader)]

    assert draws(None) == draws(None)
    assert draws({"workers": 2, "pin_memory": False}) != draws(None)


def test_pinned_memory_is_not_in_the_run_key_workers_and_amp_are_and_mosi_metrics_agree(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(small_mosi_params(tmp_path)))
    params = load_params(path)
    plain = plan_run(params, "mosi", "linear")
    loading = plan_run(params, "mosi", "linear", overrides={"loader_workers": "2", "pin_memory": "true"})
    assert (loading.train.loader_workers, loading.train.pin_memory) == (2, True)
    assert run_key(plan_run(params, "mosi", "linear", overrides={"pin_memory": "true"})) == run_key(plain)
    assert run_key(loading) != run_key(plain)
    assert loading.identity()["train"]["loader_workers"] == 2
    assert run_key(plan_run(params, "mosi", "linear", overrides={"amp": "true"})) != run_key(plain)
    with pytest.raises(InputError, match="loader_workers"):
        plan_run(params, "mosi", "linear", overrides={"loader_workers": "-2"})
    # a whole MOSI run (its items draw nothing): the same metrics; the record says how it loaded
    alone, with_workers = (execute(plan, tmp_path / name, progress=False)
                           for plan, name in ((plain, "alone"), (loading, "workers")))
    assert with_workers["metrics"] == alone["metrics"]
    assert with_workers["loader"] == {"workers": 2, "pin_memory": False}
    assert alone["loader"] == {"workers": 0, "pin_memory": False}


class Scale(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(10.0))

    def forward(self, batch):
        return batch["x"] * self.scale  # 3e38 x 10 overflows float32


class NamedItems(Dataset):
    """Items with ids; with ``overflow``, item 2's input overflows the loss."""

    def __init__(self, overflow: bool = False):
        self.overflow = overflow

    def __len__(self):
        return 8

    def __getitem__(self, i):
        x = 3e38 if self.overflow and i == 2 else float(i)
        return {"x": torch.tensor([x]), "label": torch.tensor(0.0), "index": torch.tensor(i),
                "id": f"clip{i}"}


def test_a_non_finite_loss_is_an_input_error_naming_the_samples():
    """Data too large for the model (1e38 in an input) made lora / full / adapter runs crash with a
    RuntimeError traceback; now exit 2 naming the batch's samples and the learning rate."""
    settings = TrainSettings(batch_size=8, epochs=1)
    splits = {"train": NamedItems(overflow=True), "valid": NamedItems(), "test": NamedItems()}
    with pytest.raises(InputError, match=r"not finite at epoch 0, on a batch with samples \['clip"):
        fine_tune(Scale(), TASKS["regression"], splits, settings, seed=0, progress=False)
