"""Pre-training of the late-fusion and MMT backbones, and loading their checkpoints for fine-tuning.

Sources (data-and-metrics.md, "Pre-training")
---------------------------------------------
- ``mosei``     -> the late-fusion backbone, regression with the L1 loss (as MOSI). Fine-tuning on
  MOSI / IEMOCAP loads everything except the input projections (``projections.*``: the input dims
  differ) and the output layer (``head.out.*``: output sizes differ).
- ``howto100m`` -> MMT with its 2 experts (s3d, vggish) and ASR captions, the max-margin ranking
  loss. Fine-tuning on MSR-VTT (7 experts) is a ``strict=False`` load: the 5 new experts'
  parameters (projection, type embedding, GEU, mixture logit) start fresh.

The WHOLE backbone trains (every parameter), with the fine-tuning loop's optimiser, StepLR
schedule and gradient clipping; the checkpoint holds the epoch selected on the validation split.

Vocabulary (MMT)
----------------
The text encoder's word embedding table is indexed by a ``WordVocab``, whose ids depend on the
whole word set (it sorts it). Pre-training therefore fixes the vocabulary: the union of the
pre-training data's words (the generator's manifest vocabulary, else the training captions' words)
and the words of the datasets it is shared with (``extra_vocab``; ``dataset_vocab('msrvtt', ...)``
gives MSR-VTT's the same way). The word list is stored in the checkpoint (``vocab``), and
fine-tuning MUST tokenise with it (``adopt_vocab``): same ids, same table size. Downstream words
missing from it become [UNK] and are counted in the load report. Where the profile's ``mmt`` block
names a pretrained ``text_model``, its own tokenizer is used instead (pre-training and
fine-tuning alike): the checkpoint stores no word list, ``tokenizer`` identifies the tokenizer.

Checkpoint format (``torch.save`` of a dict, written atomically; ``torch.load(weights_only=True)``
reads it)::

    format: "mmpetl.pretrained_backbone", format_version: 1,
    backbone: "late_fusion" | "mmt", config: the backbone config as a dict,
    state_dict: {name: tensor} (CPU, every parameter and persistent buffer),
    source, data: {path, format, hash, sizes}, seed, train: TrainSettings as a dict,
    profile_settings, task, metrics: {valid, initial_valid, selected_epoch, select_metric,
    history}, vocab: [words] | None, tokenizer: {kind, model, tokenizer_sha256} | None,
    vocab_sources, parameters (count)

The file is a function of its inputs alone (same data, settings, seed and code: the same bytes),
so DVC and the run keys (which hold its sha256) see the same checkpoint from every clone, commit
and environment. Provenance that does not change the numbers (device name, code hash, package
versions, host, git commit, wall time) is written BESIDE it, in ``<checkpoint>.provenance.json``
(``provenance_path``; .dvcignore keeps it out of DVC's hash of the checkpoint folder).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from harness import records
from harness.backbones import build_backbone
from harness.data import load_dataset
from harness.data._common import MANIFEST
from harness.errors import InputError
from harness.settings import RUN_OPTIONS
from harness.tasks.tasks import TASKS
from harness.text import SPECIALS, PretrainedTokenizer, Tokenized, WordVocab, words
from harness.train import TrainSettings, evaluate, train_and_select

log = logging.getLogger(__name__)

FORMAT, FORMAT_VERSION = "mmpetl.pretrained_backbone", 1
PROVENANCE_SUFFIX = ".provenance.json"  # beside the checkpoint; .dvcignore leaves it out of DVC's hash
# source -> (backbone kind, task, output size)
SOURCES = {"mosei": ("late_fusion", "regression", 1), "howto100m": ("mmt", "retrieval", 0)}
# what a fine-tuning load leaves out by default, per backbone kind
DEFAULT_SKIP = {"late_fusion": ("projections.", "head.out."), "mmt": ()}
TEXT_FIELD = "caption"
# config fields that change the computation without changing any tensor shape
STRUCTURAL = {"late_fusion": ("heads",), "mmt": ("heads", "text.num_attention_heads")}


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def backbone_kind(backbone: nn.Module) -> str:
    from harness.backbones.late_fusion import LateFusionBackbone
    from harness.backbones.mmt import MMTBackbone
    from harness.backbones.two_tower import TwoTowerBackbone
    for cls, kind in ((LateFusionBackbone, "late_fusion"), (MMTBackbone, "mmt"),
                      (TwoTowerBackbone, "two_tower")):
        if isinstance(backbone, cls):
            return kind
    return type(backbone).__name__


def _plain(document):
    """JSON-representable copy (what ``torch.load(weights_only=True)`` can read back)."""
    return json.loads(json.dumps(document, default=str))


def vocab_words(vocab: WordVocab) -> list[str]:
    """The vocabulary's words in id order (``WordVocab(vocab_words(v))`` gives the same ids)."""
    return sorted(vocab.index, key=vocab.index.get)


def dataset_vocab(name: str, data: dict | None = None) -> list[str]:
    """The words of a text dataset as fine-tuning would see them: the generator's manifest
    vocabulary, else the training split's words (``data``: a params.yaml data block)."""
    data = dict(data or {})
    options = {k: v for k, v in data.items() if k not in RUN_OPTIONS}
    loaded = load_dataset(name, data.get("path"), data.get("format"), **options)
    if loaded.info.get("vocab"):
        return list(loaded.info["vocab"])
    return sorted({w for item in loaded.split("train") for w in words(item[TEXT_FIELD])})


def data_hash(data) -> str:
    """The loader's ``data_hash`` when it gives one; else sha256 over the files it read (split
    lists, pickles), the generator's manifest, the format and the split sizes. (MMT per-video
    feature files are not read: with real HowTo100M that would be millions of files.)"""
    if data.report.get("data_hash"):
        return data.report["data_hash"]
    digest = hashlib.sha256()
    root = Path(data.path)
    files = [Path(f) for f in data.report.get("files", [])]
    manifest = (root if root.is_dir() else root.parent) / MANIFEST
    for path in sorted(set(files + ([manifest] if manifest.is_file() else []))):
        digest.update(path.name.encode())
        with open(path, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    digest.update(records.canonical_hash(  # location-independent: no paths
        {"name": data.name, "format": data.format,
         "sizes": {n: len(s) for n, s in data.splits.items()}}).encode())
    return digest.hexdigest()


def _save_atomic(document: dict, path: Path) -> None:
    with records.atomic_file(path, "wb") as stream:
        torch.save(document, stream)


def _train_settings(settings) -> TrainSettings:
    if isinstance(settings, dict):
        known = {f.name for f in dataclasses.fields(TrainSettings)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise InputError("unknown pre-training train setting", key=unknown[0],
                             expected=f"one of {sorted(known)}", found=unknown[0])
        settings = TrainSettings(**settings)
    try:
        settings.validate()
    except ValueError as error:
        raise InputError(f"pre-training: {error}") from error
    return settings


# ---------------------------------------------------------------------------------------------
# pre-training
# ---------------------------------------------------------------------------------------------

def _load_source(source: str, data: dict, extra_vocab: Iterable[str] | None,
                 tokenizer: PretrainedTokenizer | None = None):
    """The loaded source, its {train, valid} splits (captions tokenised) and the vocabulary
    (``tokenizer``, the pretrained text tower's, when given: no word vocabulary then)."""
    data = dict(data or {})
    options = {k: v for k, v in data.items() if k not in RUN_OPTIONS}
    loaded = load_dataset(source, data.get("path"), data.get("format"), **options)
    splits = {name: loaded.split(name) for name in ("train", "valid")}
    if SOURCES[source][0] != "mmt":
        return loaded, splits, None, None
    max_len = data.get("max_text_len", 16)
    if tokenizer is not None:
        return (loaded, {n: Tokenized(s, tokenizer, max_len, TEXT_FIELD) for n, s in splits.items()},
                tokenizer, {"tokenizer": tokenizer.identity()})
    own = (list(loaded.info["vocab"]) if loaded.info.get("vocab")
           else sorted({w for item in splits["train"] for w in words(item[TEXT_FIELD])}))
    extra = sorted(set(extra_vocab or ()) - set(SPECIALS))
    vocab = WordVocab(own + extra)
    sources = {source: len(set(own)), "extra": len(extra),
               "extra_not_in_source": len(set(extra) - set(own)), "total": len(vocab)}
    return loaded, {n: Tokenized(s, vocab, max_len, TEXT_FIELD) for n, s in splits.items()}, vocab, sources


def pretrain(source: str, out_path: str | Path, profile_settings: dict, train_settings,
             seed: int = 0, *, data: dict | None = None, extra_vocab: Iterable[str] | None = None,
             progress: bool = True) -> dict:
    """Pre-train the whole backbone for ``source`` and save the checkpoint at ``out_path``.

    ``profile_settings``: the profile's block for the source's backbone kind (params.yaml
    ``profiles.<profile>.late_fusion`` / ``.mmt``), the SAME block fine-tuning builds from;
    ``train_settings``: a ``TrainSettings`` or a dict of its fields; ``data``: the source's data
    block (``path``, ``format``, loader options, ``max_text_len``; default: the card's path);
    ``extra_vocab``: words of the fine-tuning data sets that will share the MMT vocabulary.
    Returns the checkpoint's metadata (everything but the state dict) plus ``path``."""
    if source not in SOURCES:
        raise InputError("unknown pre-training source", key="source", expected=sorted(SOURCES),
                         found=source)
    kind, task_name, output_dim = SOURCES[source]
    task = TASKS[task_name]
    settings = _train_settings(train_settings)
    out_path = Path(out_path)
    started = time.perf_counter()
    from harness.backbones.pretrained import load_named

    text = load_named(kind, dict(profile_settings or {}), f"profiles.*.{kind}").get("text")
    tokenizer = (PretrainedTokenizer(text.tokenizer, text.name, text.tokenizer_sha256)
                 if text is not None else None)
    loaded, splits, vocab, vocab_sources = _load_source(source, data or {}, extra_vocab, tokenizer)
    if loaded.info.get("task") != ("regression" if task_name == "regression" else "retrieval"):
        raise InputError("pre-training data of the wrong task", file=loaded.path, key="task",
                         expected=task_name, found=loaded.info.get("task"))

    from harness.run import seed_everything  # late import: run.py may import this module
    seed_everything(seed)
    backbone = build_backbone(kind, dict(profile_settings or {}), loaded.info, output_dim,
                              vocab_size=len(vocab) if vocab is not None else None)
    for parameter in backbone.parameters():  # the whole backbone trains
        parameter.requires_grad_(True)
    device = torch.device(settings.device)
    backbone.to(device)
    initial_valid = evaluate(backbone, task, splits["valid"], settings)
    trained = train_and_select(backbone, task, splits, settings, seed, progress,
                               desc=f"pretrain {kind} on {source}")
    best_epoch, history = trained["selected_epoch"], trained["history"]
    best_state = {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()}
    final_valid = evaluate(backbone, task, splits["valid"], settings)

    metadata = _plain({
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "backbone": kind, "config": dataclasses.asdict(backbone.config),
        "source": source, "task": task_name, "seed": seed,
        "data": {"path": loaded.path, "format": loaded.format, "hash": data_hash(loaded),
                 "sizes": {n: len(s) for n, s in splits.items()}},
        "train": dataclasses.asdict(settings), "profile_settings": dict(profile_settings or {}),
        "metrics": {"valid": final_valid, "initial_valid": initial_valid,
                    "selected_epoch": best_epoch, "select_metric": task.select_metric,
                    "history": history},
        "vocab": vocab_words(vocab) if isinstance(vocab, WordVocab) else None,
        "tokenizer": vocab.identity() if isinstance(vocab, PretrainedTokenizer) else None,
        "vocab_sources": vocab_sources,
        "parameters": sum(p.numel() for p in backbone.parameters()),
    })
    _save_atomic({**metadata, "state_dict": best_state}, out_path)
    provenance = {
        "checkpoint": out_path.name, "sha256": checkpoint_sha256(out_path),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "code_hash": records.code_hash(), "versions": records.versions(),
        "packages": records.compute_versions(), "host": records.host(),
        "git_commit": records.git_commit(), "wall_s": round(time.perf_counter() - started, 1),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    records.write_json_atomic(provenance_path(out_path), provenance)
    return {**metadata, **provenance, "path": str(out_path),
            "provenance": str(provenance_path(out_path)), "wall_s": time.perf_counter() - started}


def provenance_path(checkpoint_path: str | Path) -> Path:
    """``<checkpoint>.provenance.json``: how and where the checkpoint was made (not its inputs)."""
    path = Path(checkpoint_path)
    return path.with_name(path.name + PROVENANCE_SUFFIX)


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------

def read_checkpoint(checkpoint_path: str | Path) -> dict:
    """The checkpoint document, checked; InputError names the file when it is missing or bad."""
    path = Path(checkpoint_path)
    if not path.is_file():
        raise InputError("pre-trained checkpoint not found (run `mmpetl pretrain` first)",
                         file=str(path), key="checkpoint", expected="an existing checkpoint file",
                         found="missing")
    try:
        document = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated / not a torch file / foreign pickle
        raise InputError("cannot read the pre-trained checkpoint", file=str(path), key="(whole file)",
                         expected="a checkpoint written by `mmpetl pretrain`",
                         found=f"{type(error).__name__}: {str(error)[:200]}") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        found = document.get("format") if isinstance(document, dict) else type(document).__name__
        raise InputError("not an mmpetl pre-trained backbone checkpoint", file=str(path),
                         key="format", expected=FORMAT, found=found)
    state = document.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError("checkpoint has no state dict of tensors", file=str(path), key="state_dict",
                         expected="{name: tensor}", found=type(state).__name__)
    document["path"] = str(path)  # where it was read from (not stored in the file)
    beside = provenance_path(path)
    document["provenance"] = records.read_json(beside) if beside.is_file() else None
    return document


def _as_document(checkpoint) -> tuple[dict, str]:
    if isinstance(checkpoint, dict):
        return checkpoint, str(checkpoint.get("path", "<in memory>"))
    return read_checkpoint(checkpoint), str(checkpoint)


def _config_value(config, dotted: str):
    node = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def load_pretrained(backbone: nn.Module, checkpoint_path, skip_prefixes: Iterable[str] | None = None
                    ) -> dict:
    """Load a pre-trained checkpoint into a freshly built ``backbone`` (before ``apply_method``)
    and return the load report (for the run record's ``checkpoint_load_report``).

    ``skip_prefixes`` (default per kind, ``DEFAULT_SKIP``): checkpoint keys starting with one of
    them are not loaded. Every other checkpoint tensor that the backbone has must fit its shape
    (InputError naming the tensor and both shapes); the backbone's keys the checkpoint lacks
    keep their fresh initialisation (``missing``); checkpoint keys the backbone lacks are left
    out (``unexpected``). ``checkpoint_path`` may also be a document from ``read_checkpoint``."""
    document, where = _as_document(checkpoint_path)
    kind = backbone_kind(backbone)
    if document.get("backbone") != kind:
        raise InputError("checkpoint is for another backbone kind", file=where, key="backbone",
                         expected=kind, found=document.get("backbone"))
    for field in STRUCTURAL.get(kind, ()):
        mine, theirs = _config_value(backbone.config, field), _config_value(document.get("config", {}), field)
        if theirs is not None and mine is not None and mine != theirs:
            raise InputError("checkpoint backbone config does not fit", file=where,
                             key=f"config.{field}", expected=f"{mine} (backbone)",
                             found=f"{theirs} (checkpoint)")
    prefixes = tuple(DEFAULT_SKIP.get(kind, ()) if skip_prefixes is None else skip_prefixes)
    state = document["state_dict"]
    own = backbone.state_dict()
    skipped = sorted(k for k in state if k.startswith(prefixes)) if prefixes else []
    considered = [k for k in state if k not in set(skipped)]
    unexpected = sorted(k for k in considered if k not in own)
    loaded = sorted(k for k in considered if k in own)
    missing = sorted(k for k in own if k not in state)
    misfits = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in loaded
               if state[k].shape != own[k].shape]
    if misfits:
        name, theirs, mine = misfits[0]
        more = f" (and {len(misfits) - 1} more tensor(s))" if len(misfits) > 1 else ""
        raise InputError(f"checkpoint tensor {name!r} does not fit the backbone{more}", file=where,
                         key=name, expected=f"shape {mine} (backbone)",
                         found=f"shape {theirs} (checkpoint)")
    result = backbone.load_state_dict({k: state[k] for k in loaded}, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    report = {
        "checkpoint": where, "backbone": kind, "source": document.get("source"),
        "checkpoint_seed": document.get("seed"),
        "checkpoint_data_hash": (document.get("data") or {}).get("hash"),
        "checkpoint_code_hash": (document.get("provenance") or {}).get("code_hash",
                                                                       document.get("code_hash")),
        "skip_prefixes": list(prefixes),
        "n_loaded": len(loaded), "loaded_values": sum(state[k].numel() for k in loaded),
        "missing": missing, "n_missing": len(missing),
        "unexpected": unexpected, "n_unexpected": len(unexpected),
        "skipped": skipped, "n_skipped": len(skipped),
        "fresh_values": sum(own[k].numel() for k in missing)
        + sum(own[k].numel() for k in skipped if k in own),
    }
    if missing or unexpected or skipped:
        log.warning("checkpoint %s: loaded %d tensors; %d missing (fresh), %d unexpected, "
                    "%d skipped", where, len(loaded), len(missing), len(unexpected), len(skipped))
    return report


def checkpoint_vocab(checkpoint) -> WordVocab | None:
    document, _ = _as_document(checkpoint)
    return WordVocab(document["vocab"]) if document.get("vocab") else None


def adopt_vocab(checkpoint, splits: dict, vocab: WordVocab | None):
    """Fine-tuning side of the shared vocabulary: re-tokenise ``splits`` (``Tokenized`` datasets
    from ``run.load_splits``) with the checkpoint's vocabulary. Returns (vocab, splits, report);
    unchanged when the checkpoint or the data has no vocabulary."""
    document, _ = _as_document(checkpoint)
    if vocab is None or not document.get("vocab"):
        return vocab, splits, None
    shared = WordVocab(document["vocab"])
    downstream = set(vocab.index)
    unknown = sorted(downstream - set(shared.index))
    retokenised = {n: Tokenized(s.split, shared, s.max_len, s.field) if isinstance(s, Tokenized) else s
                   for n, s in splits.items()}
    report = {"size": len(shared), "downstream_words": len(downstream),
              "downstream_words_not_in_checkpoint": len(unknown), "examples_unknown": unknown[:20]}
    if unknown:
        log.warning("%d downstream words are not in the checkpoint's vocabulary (mapped to [UNK])",
                    len(unknown))
    return shared, retokenised, report


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_sha256(checkpoint_path: str | Path) -> str | None:
    """sha256 of the checkpoint file (for run keys), None when it does not exist yet."""
    path = Path(checkpoint_path)
    if not path.is_file():
        return None
    stat = path.stat()
    return _sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


# ---------------------------------------------------------------------------------------------
# params.yaml
# ---------------------------------------------------------------------------------------------

def _pretrain_section(params: dict) -> dict:
    from harness.settings import section
    return section(params, "pretrain")


def checkpoint_path(params: dict, source: str) -> str:
    """``pretrain.checkpoints.<source>`` with ``{profile}`` filled in."""
    from harness.settings import section
    paths = section(params, "pretrain", "checkpoints")
    if source not in paths:
        raise InputError("no checkpoint path for this pre-training source", file=params.get("_file"),
                         key=f"pretrain.checkpoints.{source}", expected="a path", found="nothing")
    return str(paths[source]).format(profile=params["profile"])


def pretrained_for(params: dict, dataset: str) -> dict | None:
    """{source, path} of the checkpoint a fine-tuning run on ``dataset`` starts from, or None
    (``pretrain.use`` maps fine-tuning datasets to sources)."""
    if "pretrain" not in params:
        return None
    use = _pretrain_section(params).get("use") or {}
    source = use.get(dataset)
    if source is None:
        return None
    if source not in SOURCES:
        raise InputError("unknown pre-training source", file=params.get("_file"),
                         key=f"pretrain.use.{dataset}", expected=sorted(SOURCES), found=source)
    return {"source": source, "path": checkpoint_path(params, source)}


def plan_pretrain(params: dict, source: str, overrides: dict | None = None) -> dict:
    """Keyword arguments of ``pretrain`` resolved from params.yaml: ``profiles.<p>.<kind>``,
    ``pretrain.train.<source>`` + ``pretrain.profiles.<p>`` (+ ``overrides``: typed train
    fields), ``data.<p>.<source>``, ``pretrain.seed``, ``pretrain.checkpoints.<source>``, and the
    vocabularies of ``pretrain.share_vocab.<source>`` (fine-tuning datasets)."""
    from harness.settings import section
    if source not in SOURCES:
        raise InputError("unknown pre-training source", key="source", expected=sorted(SOURCES),
                         found=source)
    profile, file = params["profile"], params.get("_file")
    kind = SOURCES[source][0]
    pre = _pretrain_section(params)
    base = (pre.get("train") or {}).get(source) or {}
    on_top = (pre.get("profiles") or {}).get(profile) or {}
    for key, block in ((f"pretrain.train.{source}", base), (f"pretrain.profiles.{profile}", on_top)):
        if not isinstance(block, dict):
            raise InputError("expected a mapping", file=file, key=key, expected="a mapping",
                             found=repr(block))
    train = {**base, **on_top, **(overrides or {})}
    known = {f.name for f in dataclasses.fields(TrainSettings)}
    for key in train:
        if key not in known:
            raise InputError("unknown pre-training train setting", file=file,
                             key=f"pretrain.train.{source}.{key}", expected=f"one of {sorted(known)}",
                             found=key)
    data = dict(section(params, "data", profile, source))
    from harness.backbones.pretrained import plan_encoders  # refuses a bad text_model by its key
    plan_encoders(kind, dict(section(params, "profiles", profile, kind)),
                  f"profiles.{profile}.{kind}", file)
    shared = (pre.get("share_vocab") or {}).get(source) or []
    extra: list[str] = []
    for name in [shared] if isinstance(shared, str) else shared:
        extra += dataset_vocab(name, dict(section(params, "data", profile, name)))
    return {"source": source, "out_path": checkpoint_path(params, source),
            "profile_settings": dict(section(params, "profiles", profile, kind)),
            "train_settings": train, "seed": int(pre.get("seed", 0)), "data": data,
            "extra_vocab": sorted(set(extra)) or None}


__all__ = ["DEFAULT_SKIP", "FORMAT", "SOURCES", "adopt_vocab", "backbone_kind", "checkpoint_path",
           "checkpoint_sha256", "checkpoint_vocab", "data_hash", "dataset_vocab", "load_pretrained",
           "plan_pretrain", "pretrain", "pretrained_for", "read_checkpoint", "vocab_words"]
