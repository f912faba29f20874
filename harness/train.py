"""One fine-tuning run: the paper's optimiser and StepLR schedule, gradient clipping, model
selection on the validation split, final metrics on the TEST split at the selected epoch (the
released Wander code only ever reported validation numbers; we do not)."""
from __future__ import annotations

import contextlib
import math
import os
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler
from tqdm import tqdm

from harness.errors import InputError
from harness.optim import Adam, StepLR
from harness.tasks.tasks import Task

THREADS_ENV = "OMP_NUM_THREADS"
DEFAULT_THREADS = torch.get_num_threads()  # torch's own choice (one per core), read at import
# The most intra-op threads a command accepts, the same on every machine (a params.yaml written for
# a larger one still runs): above any CPU's hardware threads, far below the counts that exhaust the
# OpenMP runtime (100000 segfaulted in the first op)
MAX_THREADS = 1024


def thread_count(setting: int | str = "auto", profile: str = "tiny", file: str | None = None) -> int:
    """Intra-op threads for a command, at most ``MAX_THREADS``: ``OMP_NUM_THREADS`` when set and
    not empty (the user's choice wins; OpenMP ignores an empty one too); else the params
    ``threads`` key: a positive integer, or ``auto``: 1 for the tiny profile's
    models (too small to gain from a second thread; on a shared machine every parallel region
    waits for a preempted thread: 2 threads ran 3-5x slower than 1 with one other busy process),
    torch's default (one per core) for the paper profile."""
    env = os.environ.get(THREADS_ENV)
    if env:
        if not env.strip().isdigit() or not 1 <= int(env) <= MAX_THREADS:
            raise InputError("bad thread count in the environment", key=THREADS_ENV,
                             expected=f"a positive integer, at most {MAX_THREADS}",
                             found=repr(env))
        return int(env)
    if setting == "auto":
        return 1 if profile == "tiny" else DEFAULT_THREADS
    if isinstance(setting, bool) or not isinstance(setting, int) or not 1 <= setting <= MAX_THREADS:
        raise InputError("bad thread count", file=file, key="threads",
                         expected=f"'auto' or a positive integer, at most {MAX_THREADS}",
                         found=repr(setting))
    return setting


def use_threads(setting: int | str = "auto", profile: str = "tiny", file: str | None = None) -> int:
    """Apply ``thread_count`` to torch; returns the count."""
    count = thread_count(setting, profile, file)
    torch.set_num_threads(count)
    return count


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

class SettingError(ValueError):
    """A train setting out of its range: which one, what it should be and what it is."""

    def __init__(self, field: str, expected: str, found):
        super().__init__(f"train setting {field} = {found!r} is invalid: expected {expected}")
        self.field, self.expected, self.found = field, expected, found


@dataclass
class TrainSettings:
    optimizer: str = "adam"      # adam | adamw
    lr: float = 1e-3
    weight_decay: float = 0.0
    step_size: int = 10          # StepLR step (epochs)
    gamma: float = 0.1           # StepLR decay
    batch_size: int = 24
    epochs: int = 40
    grad_clip: float = 0.8       # max gradient norm; 0 disables
    device: str = "cpu"          # cpu | cuda
    amp: bool = False            # bf16 autocast (CUDA or CPU; changes the numbers, so off by default)
    feature_cache: bool = False  # read cached frozen-encoder outputs when the method allows it
    # Data loading, recorded as in effect (``loader_in_effect``). The sampler's batches and their
    # order do not depend on the workers, but an item that draws a random number (MSR-VTT's random
    # train caption) draws it from the worker's generator: loader_workers is in the run key;
    # pin_memory (LOADER_FIELDS) changes no number and is not
    loader_workers: int = 0      # DataLoader worker processes; 0 loads in the training process
    pin_memory: bool = False     # page-locked batches for faster copies to the GPU; no-op on CPU

    def validate(self) -> None:
        checks = [
            (self.optimizer in ("adam", "adamw"), "optimizer", "'adam' or 'adamw'"),
            (self.lr > 0, "lr", "> 0"), (self.weight_decay >= 0, "weight_decay", ">= 0"),
            (self.step_size > 0, "step_size", "> 0"), (0 < self.gamma <= 1, "gamma", "in (0, 1]"),
            (self.batch_size > 0, "batch_size", "> 0"), (self.epochs > 0, "epochs", "> 0"),
            (self.grad_clip >= 0, "grad_clip", ">= 0"),
            (self.device in ("cpu", "cuda"), "device", "'cpu' or 'cuda'"),
        ]
        for ok, field, rule in checks:
            if not ok:
                raise SettingError(field, rule, getattr(self, field))
        if self.device == "cuda" and not torch.cuda.is_available():
            raise SettingError("device", "'cpu' (no CUDA device is available here)", self.device)


def _to_device(batch: dict, device: torch.device) -> dict:
    if device.type == "cpu":  # the loaders' batches are on the CPU already
        return batch
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _autocast(settings: TrainSettings):
    if settings.amp:
        return torch.autocast(settings.device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# The train settings that say how batches are loaded, not which: left out of the run key
LOADER_FIELDS = ("pin_memory",)


def loader_in_effect(settings: TrainSettings) -> dict:
    """How a run loads its batches: worker processes, and pinned memory only on CUDA (there is
    nothing to pin for on CPU, so ``pin_memory: true`` is ignored there)."""
    return {"workers": settings.loader_workers,
            "pin_memory": settings.pin_memory and settings.device == "cuda"}


class IndexedBatches:
    """A DataLoader's batches of a dataset with ``batch(indices)``, cut in this process: the same
    index lists from the same sampler, without the loader's per-batch machinery (its iterator,
    fetcher and worker seed draw from its own generator; none touches a global generator)."""

    def __init__(self, dataset: Dataset, batch_size: int, sampler):
        self.dataset, self.index_lists = dataset, BatchSampler(sampler, batch_size, drop_last=False)

    def __iter__(self):
        return (self.dataset.batch(indices) for indices in self.index_lists)

    def __len__(self) -> int:
        return len(self.index_lists)


def batches(dataset: Dataset, batch_size: int, seed: int | None = None,
            loader: dict | None = None) -> DataLoader | IndexedBatches:
    """The batches of ``dataset``: shuffled by a generator seeded with ``seed``, in order when
    None. A dataset with ``batch(indices)`` (the in-memory feature cache) is indexed a batch at a
    time instead of item by item + ``default_collate``, in this process (``IndexedBatches``)
    unless ``loader`` asks for workers or pinned memory; the sampler and its draws are the same
    either way, so a seed gives the same batches in the same order. ``loader``
    (``loader_in_effect``): worker processes (kept across epochs) and pinned memory; they change
    neither which items make a batch nor their order, epoch after epoch. The sampler has a
    generator of its own: a DataLoader draws its workers' base seed from its ``generator`` (the
    global one when None) each time it starts a pass, but only once with workers kept across
    passes, so a shared generator would order epoch 2 on by the worker setting, and the global
    one (dropout's) would be drawn a different number of times."""
    workers, pin = (loader or {}).get("workers", 0), (loader or {}).get("pin_memory", False)
    indexed = callable(getattr(dataset, "batch", None))
    source = range(len(dataset)) if indexed else dataset
    sampler = (RandomSampler(source, generator=torch.Generator().manual_seed(seed))
               if seed is not None else SequentialSampler(source))
    if indexed and not workers and not pin:
        return IndexedBatches(dataset, batch_size, sampler)
    return DataLoader(source, batch_size=batch_size, sampler=sampler,
                      generator=torch.Generator().manual_seed(0 if seed is None else seed),
                      collate_fn=dataset.batch if indexed else None,
                      num_workers=workers, persistent_workers=workers > 0, pin_memory=pin)


def run_loaders(splits: dict[str, Dataset], settings: TrainSettings,
                seed: int) -> dict[str, DataLoader | IndexedBatches]:
    """A run's loaders, built once per run: ``train`` shuffled by ``seed`` in batches of
    ``batch_size``, every other split in order in batches of ``max(batch_size, 64)`` for
    ``evaluate``. With ``loader_workers``, each keeps its worker processes from one pass to the
    next (a loader built per evaluation would start them again on every validation pass)."""
    loader = loader_in_effect(settings)
    return {name: batches(split, settings.batch_size, seed, loader) if name == "train"
            else batches(split, max(settings.batch_size, 64), loader=loader)
            for name, split in splits.items()}


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, loader: DataLoader, settings: TrainSettings) -> dict:
    """``task``'s metrics of ``model`` on one pass over ``loader`` (``run_loaders``)."""
    model.eval()
    device = torch.device(settings.device)
    outputs, labels = [], []
    for batch in loader:
        batch = _to_device(batch, device)
        with _autocast(settings):
            if task.name == "retrieval":  # embed both sides; score every caption against every video
                outputs.append([t.float().cpu() for t in (*model.encode_text(batch),
                                                          *model.encode_video(batch))])
            else:
                outputs.append(model(batch).float().cpu())
        labels.append(batch["label"].cpu())
    if task.name == "retrieval":
        text, logits, video, present = (torch.cat(parts) for parts in zip(*outputs))
        similarity = model.similarity(text, logits, video, present.bool())
        return task.evaluate(similarity, torch.arange(len(similarity)))  # one caption per video
    return task.evaluate(torch.cat(outputs), torch.cat(labels))


def train_and_select(model: nn.Module, task: Task, loaders: dict[str, DataLoader],
                     settings: TrainSettings, progress: bool = True, desc: str = "fine-tune") -> dict:
    """Train ``model``'s trainable parameters with the settings' optimiser and StepLR schedule on
    ``loaders["train"]`` (``run_loaders``), evaluate on ``loaders["valid"]`` after every epoch and
    leave the model at the best epoch's weights (its trainable parameters and buffers: the model
    the selected validation metrics measured). Returns the selected epoch, its validation
    metrics, the per-epoch history and the training wall time."""
    device = torch.device(settings.device)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    # torch.optim's Adam / AdamW update and StepLR without its torch._dynamo import (harness.optim)
    optimizer = Adam(trainable.values(), lr=settings.lr, weight_decay=settings.weight_decay,
                     decoupled_weight_decay=settings.optimizer == "adamw")
    scheduler = StepLR(optimizer, settings.step_size, settings.gamma)
    kept = [*trainable.values(), *model.buffers()]  # what the best epoch's state holds
    best_value, best_epoch, best_state, best_valid, history = None, -1, None, None, []
    started = time.perf_counter()
    epochs = tqdm(range(settings.epochs), desc=desc, unit="epoch", disable=not progress)
    for epoch in epochs:
        model.train()
        total, count = 0.0, 0
        for batch in loaders["train"]:
            batch = _to_device(batch, device)
            with _autocast(settings):
                loss = task.loss(model(batch).float(), batch["label"])
            loss_value = loss.item()
            if not math.isfinite(loss_value):  # the data's scale or the settings, not a bug
                samples = list(batch.get("id", ()))[:3] or batch["index"][:3].tolist()
                raise InputError(f"{desc}: the loss is not finite at epoch {epoch}, on a batch "
                                 f"with samples {samples}: inputs too large for the model "
                                 "(mmpetl check-data warns of values beyond float16) or a too "
                                 "large learning rate", key="lr", expected="a finite loss",
                                 found=f"{loss_value} at lr {settings.lr}")
            optimizer.zero_grad()
            loss.backward()
            if settings.grad_clip > 0:
                nn.utils.clip_grad_norm_(trainable.values(), settings.grad_clip)
            optimizer.step()
            total += loss_value * len(batch["label"])
            count += len(batch["label"])
        scheduler.step()
        valid = evaluate(model, task, loaders["valid"], settings)
        value = valid[task.select_metric]
        history.append({"epoch": epoch, "train_loss": total / count, f"valid_{task.select_metric}": value})
        if task.better(value, best_value):
            best_value, best_epoch, best_valid = value, epoch, valid
            best_state = [t.detach().clone() for t in kept]
        epochs.set_postfix(loss=f"{total / count:.4f}", **{task.select_metric: f"{value:.4f}"})
    wall = time.perf_counter() - started
    with torch.no_grad():
        for tensor, best in zip(kept, best_state):
            tensor.copy_(best)
    return {"selected_epoch": best_epoch, "selected_valid": best_valid, "history": history,
            "train_wall_s": wall}


def fine_tune(model: nn.Module, task: Task, splits: dict[str, Dataset], settings: TrainSettings,
              seed: int, progress: bool = True) -> dict:
    """Train the trainable parameters of ``model``; returns metrics and the training history."""
    device = torch.device(settings.device)
    model.to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    loaders = run_loaders(splits, settings, seed)
    initial_test = evaluate(model, task, loaders["test"], settings)
    trained = train_and_select(model, task, loaders, settings, progress)
    return {
        "test": evaluate(model, task, loaders["test"], settings),
        "valid": trained.pop("selected_valid"),  # measured on the same weights at that epoch
        "initial_test": initial_test,
        "select_metric": task.select_metric,
        **trained,
        "peak_gpu_memory_mb": (torch.cuda.max_memory_allocated(device) / 2**20
                               if device.type == "cuda" else None),
        "loader": loader_in_effect(settings),  # pin_memory is not in the run key (LOADER_FIELDS)
    }
