"""Execute one planned fine-tuning run and write its record (atomically)."""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset, default_collate

from harness import records
from harness.backbones import build_backbone, load_named
from harness.checkpoints import adopt_vocab, checkpoint_sha256, load_pretrained, read_checkpoint
from harness.data import LoadedDataset, load_block, load_card
from harness.errors import InputError
from harness.features import FEATURES_DIR, cache_problems, cached_splits, plan_data_hashes
from harness.records import canonical_hash, tree_hash, write_json_atomic
from harness.settings import RunPlan, plan_from_dict
from harness.tasks.tasks import TASKS
from harness.text import DEFAULT_MAX_TEXT_LEN, PretrainedTokenizer, Tokenized, WordVocab
from harness.train import fine_tune, seed_everything, use_threads
from methods import apply_method, count_parameters, get_method, method_origin, method_sources
from methods.registry import load_env_methods

RUNS_DIR = Path("results/runs")


def task_for(info: dict) -> tuple[str, int]:
    """(task name, output size) from what the loader found."""
    kind = info.get("label_kind")
    if kind == "regression":
        return "regression", 1
    if kind == "4 x binary":
        return "emotion_binary", 8
    if kind == "4-class":
        return "emotion4", 4
    if info.get("task") == "classification":
        return "classification", int(info["num_classes"])
    if info.get("task") == "retrieval":
        return "retrieval", 0
    raise InputError("no fine-tuning task for this data", key="label_kind",
                     expected="regression, 4 x binary, 4-class or classification", found=kind)


class InMemory(Dataset):
    """Keeps every item after its first read: for small splits whose loader streams from disk
    (per-video HDF5 files, images), so each epoch after the first reads memory, not files. Items
    are read when first asked for, in the order they are asked for (a loader may draw from the
    global generator while reading, e.g. MSR-VTT's random train caption). Once every item has
    been read, ``batch`` cuts batches from the items collated once instead of collating each
    batch item by item: the same tensors (``default_collate`` stacks them either way)."""

    def __init__(self, split: Dataset):
        self.split, self.items, self.collated = split, {}, None

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> dict:
        if index not in self.items:
            self.items[index] = self.split[index]
        return self.items[index]

    def batch(self, indices: list[int]) -> dict:
        if self.collated is None and len(self.items) == len(self):
            self.collated = default_collate([self.items[i] for i in range(len(self))])
        if self.collated is None:
            return default_collate([self[i] for i in indices])
        rows = torch.as_tensor(indices, dtype=torch.int64)  # index_select: ``[rows]``, faster
        return {key: torch.index_select(value, 0, rows) if isinstance(value, torch.Tensor)
                else [value[i] for i in indices] for key, value in self.collated.items()}


def text_vocab(plan: RunPlan) -> PretrainedTokenizer | None:
    """The pretrained text tower's tokenizer when the plan's backbone block names one
    (``text_model``, or ``text_encoder: minilm``), else None (a word vocabulary is used)."""
    text = load_named(plan.backbone_kind, plan.backbone, f"profiles.{plan.profile}.{plan.backbone_kind}"
                      ).get("text")
    return PretrainedTokenizer(text.tokenizer, text.name, text.tokenizer_sha256) if text else None


def load_splits(plan: RunPlan):
    """The loaded dataset, its train/valid/test splits (raw text tokenised), and the vocabulary:
    the pretrained text tower's tokenizer where the backbone names one, else a word vocabulary."""
    data = load_block(plan.dataset, plan.data)
    splits = {name: data.split(name) for name in ("train", "valid", "test")}
    if plan.data.get("in_memory"):
        splits = {name: InMemory(split) for name, split in splits.items()}
    field = load_card(plan.dataset).text_field
    if field is None:
        return data, splits, None
    vocab = text_vocab(plan) or (WordVocab(data.info["vocab"]) if data.info.get("vocab")
                                 else WordVocab.from_texts(item[field] for item in splits["train"]))
    max_len = plan.data.get("max_text_len", DEFAULT_MAX_TEXT_LEN)
    return data, {n: Tokenized(s, vocab, max_len, field) for n, s in splits.items()}, vocab


def run_code_hash(method: str) -> str:
    """The code identity of a run of ``method``: the harness code every run executes and, of
    ``methods/``, only this method's modules, what they import and the shared contract
    (``methods.method_sources``). Editing one method recomputes that method's runs only."""
    get_method(method)  # an unknown name: the registry's error, not a missing file
    return records.code_hash(method_sources(method))


def run_key(plan: RunPlan) -> str:
    # the data's content (tree hash; None before the data exist): regenerated or replaced data
    # are new runs, and their old records are set aside as stale. The compute packages' versions:
    # a record made under another torch / transformers / numpy is never read back as this run's
    data = Path(plan.data["path"])
    return canonical_hash({"run": plan.identity(), "data": tree_hash(data) if data.exists() else None,
                           "code": run_code_hash(plan.method), "packages": records.compute_versions()})


def record_path(plan: RunPlan, key: str, out_dir: Path = RUNS_DIR) -> Path:
    """<out_dir>/<dataset>/<grid row slug>-seed<k>-<key[:12]>.json, e.g.
    results/runs/mosi/wander_code_d16-seed0-1a2b3c4d5e6f.json: dataset, grid row (method, variant
    unless paper, config fields; ``records.row_slug``), seed and run key read from the name."""
    return Path(out_dir) / plan.dataset / f"{records.row_slug(plan.row)}-seed{plan.seed}-{key[:12]}.json"


# The frozen encoders are drawn once, the same for every seed, as a pre-trained model would be;
# the run's seed draws the task head, the method's modules, the data order and dropout.
BACKBONE_SEED = 0


@dataclass
class Prepared:
    data: LoadedDataset
    splits: dict
    vocab: WordVocab | None
    task_name: str
    backbone: torch.nn.Module
    load_report: dict | None


def prepare(plan: RunPlan) -> Prepared:
    """Data (tokenised), the backbone (pre-trained where ``plan.pretrained`` says), a fresh head
    drawn from the run's seed; no method attached yet."""
    data, splits, vocab = load_splits(plan)
    task_name, output_dim = task_for(data.info)
    checkpoint = read_checkpoint(plan.pretrained["path"]) if plan.pretrained else None
    if checkpoint is not None:  # a checkpoint replaced mid-sweep would train a run of another key
        found = checkpoint_sha256(plan.pretrained["path"])
        if found != plan.pretrained["sha256"]:
            raise InputError("the pre-training checkpoint changed after this run was planned (its "
                             "sha256 is in the run key): run the command again",
                             file=plan.pretrained["path"], key="sha256",
                             expected=plan.pretrained["sha256"], found=found)
    vocab_report = None
    if checkpoint is not None and isinstance(vocab, PretrainedTokenizer):
        if checkpoint.get("vocab"):
            raise InputError("the pre-training checkpoint was trained on a word vocabulary, this "
                             "run tokenises with the pretrained text model's tokenizer",
                             file=plan.pretrained["path"], key=f"pretrain.use.{plan.dataset}",
                             expected=f"a checkpoint pre-trained with text_model {vocab.name!r} "
                                      f"(mmpetl pretrain under the same profile)",
                             found=f"a word vocabulary of {len(checkpoint['vocab'])} words")
        stored = checkpoint.get("tokenizer") or {}
        if stored.get("tokenizer_sha256") not in (None, vocab.sha256):
            raise InputError("the pre-training checkpoint was trained with another tokenizer",
                             file=plan.pretrained["path"], key="tokenizer.tokenizer_sha256",
                             expected=f"{vocab.sha256[:16]}... (text_model {vocab.name!r})",
                             found=f"{stored['tokenizer_sha256'][:16]}...")
        vocab_report = {"tokenizer": vocab.identity(), "checkpoint_tokenizer": stored or None}
    elif checkpoint is not None:  # text is tokenised with the pre-training vocabulary
        vocab, splits, vocab_report = adopt_vocab(checkpoint, splits, vocab)
    if plan.data.get("in_memory"):  # the tokenised items too: later epochs cut batches from memory
        splits = {name: InMemory(split) for name, split in splits.items()}
    seed_everything(BACKBONE_SEED)
    backbone = build_backbone(plan.backbone_kind, plan.backbone, data.info, output_dim,
                              vocab_size=len(vocab) if vocab else None)
    load_report = None
    if checkpoint is not None:  # before apply_method: the keys are still the backbone's own
        load_report = {**load_pretrained(backbone, checkpoint, plan.pretrained["skip"]),
                       "sha256": plan.pretrained["sha256"], "vocab": vocab_report}
    seed_everything(plan.seed)
    for module in backbone.head.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return Prepared(data, splits, vocab, task_name, backbone, load_report)


def encoder_sources(plan: RunPlan) -> dict | None:
    """Where each pretrained tower was read from (directory or hub id) and its load report."""
    if not plan.encoders:
        return None
    loaded = load_named(plan.backbone_kind, plan.backbone,
                        f"profiles.{plan.profile}.{plan.backbone_kind}")
    return {m: {"source": e.source, "load_report": e.load_report} for m, e in loaded.items()}


@contextlib.contextmanager
def refuse_out_of_memory(plan: RunPlan):
    """An allocation that fails (settings too large for this machine, e.g. a down_dim of 10^9)
    becomes an InputError naming the run's settings instead of torch's traceback."""
    try:
        yield
    except (MemoryError, RuntimeError) as error:
        if not isinstance(error, MemoryError) and "allocate" not in str(error):
            raise  # another RuntimeError: a bug, not the settings
        settings = {**plan.method_overrides, "batch_size": plan.train.batch_size}
        raise InputError(f"{plan.dataset} / {plan.method}: out of memory on {plan.train.device}",
                         key=records.row_slug(plan.row), expected="settings whose model and batches "
                         "fit in this machine's memory", found=f"{settings} ({(str(error) or type(error).__name__).splitlines()[0][:160]})"
                         ) from None


@contextlib.contextmanager
def naming_the_run(plan: RunPlan):
    """What goes wrong inside a run names it: an input error that names no file (a method whose
    outputs are NaN) says which run, any other error (a user method's bug keeps its traceback)
    gets a note naming the run and the method's module."""
    run = f"{plan.dataset} / {records.row_slug(plan.row)} / seed {plan.seed}"
    try:
        yield
    except InputError as error:
        if error.file is not None:
            raise
        raise InputError(f"{run}: {error.message}", key=error.key, expected=error.expected,
                         found=error.found) from None
    except Exception as error:
        error.add_note(f"in the run {run} (method {plan.method!r}, module "
                       f"{method_origin(plan.method)['module']})")
        raise


def execute(plan: RunPlan, out_dir: Path = RUNS_DIR, progress: bool = True) -> dict:
    """Run ``plan`` unless a record under its key exists (then it is read, and must be whole:
    ``records.read_run_record``); return the record. The records folder must be writable before anything
    is computed."""
    key = run_key(plan)
    path = record_path(plan, key, out_dir)
    if path.exists() or path.is_symlink():
        return records.read_run_record(path)
    records.require_writable_folder(path.parent)
    started = time.perf_counter()
    prepared = prepare(plan)
    data, splits, vocab, backbone = prepared.data, prepared.splits, prepared.vocab, prepared.backbone
    task_name, load_report = prepared.task_name, prepared.load_report
    with naming_the_run(plan), refuse_out_of_memory(plan):
        config = apply_method(backbone, plan.method, plan.variant, **plan.method_overrides)
    model, fit_splits, features = backbone, splits, {"cached": False}
    if plan.train.feature_cache:  # encoders untouched by the method: read their cached outputs
        problems = cache_problems(backbone)
        if problems:
            features["why_not"] = problems
        else:
            backbone.to(plan.train.device)
            model, fit_splits, info = cached_splits(
                backbone, splits, FEATURES_DIR / plan.dataset, plan_data_hashes(plan, data, vocab),
                batch_size=max(plan.train.batch_size, 64), progress=progress, checked=True)
            features = {"cached": True, **info}
    seed_everything(plan.seed)  # training draws the same numbers whether the cache was just built or not
    with naming_the_run(plan), refuse_out_of_memory(plan):
        result = fine_tune(model, TASKS[task_name], fit_splits, plan.train, plan.seed, progress=progress)
    record = {
        "key": key,
        **plan.identity(),
        "method_config": config.to_dict(),
        "task": task_name,
        "metrics": result.pop("test"),
        "valid_metrics": result.pop("valid"),
        **result,
        "tunable": count_parameters(backbone),
        "wall_s": time.perf_counter() - started,
        "device": torch.cuda.get_device_name() if plan.train.device == "cuda" else "cpu",
        "host": records.host(),  # not in the key: another CPU rounds differently (records.host)
        "threads": torch.get_num_threads(),  # not in the key: the thread policy's choice
        "data_format": data.format,
        "data_hash": tree_hash(plan.data["path"]),
        "features": features,
        "checkpoint_load_report": load_report,
        "encoder_sources": encoder_sources(plan),
        "git_commit": records.git_commit(),
        "code_hash": run_code_hash(plan.method),  # in the key
        "code_modules": sorted(method_sources(plan.method)),  # the methods' code it hashes
        "versions": records.versions(),
        "packages": records.compute_versions(),  # in the key
    }
    write_json_atomic(path, record)
    return record


def run_trial(plan_values: dict, out_dir: str, root: str) -> dict:
    """The one trial function of every executor (``harness.sweep``, ``harness.ray_executor``): run
    one plan given as ``plan_to_dict`` values (or read its record). Paths in the plan are relative
    to ``root``, the project folder the sweep was started in."""
    use_threads(1)  # one core per trial (OMP_NUM_THREADS wins): executors run trials side by side
    os.chdir(root)
    load_env_methods()  # a worker started afresh (spawn, Ray): the user's method modules too
    return execute(plan_from_dict(plan_values), Path(out_dir), progress=False)
