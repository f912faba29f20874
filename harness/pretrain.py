"""Stage ``pretrain@<source>``: pre-training of the late-fusion, MMT and two-tower backbones
(loading their checkpoints for fine-tuning is ``harness.checkpoints``).

Sources
-------
- ``mosei``     -> the late-fusion backbone, regression with the L1 loss (as MOSI). Fine-tuning on
  MOSI / IEMOCAP loads everything except the input projections (``projections.*``: the input dims
  differ) and the output layer (``head.out.*``: output sizes differ).
- ``howto100m`` -> MMT with its 2 experts (s3d, vggish) and ASR captions, the max-margin ranking
  loss. Fine-tuning on MSR-VTT (7 experts) is a ``strict=False`` load: the 5 new experts'
  parameters (projection, type embedding, GEU, mixture logit) start fresh.
- ``recipes``   -> the two-tower backbone (image and text towers, fusion head), classification of
  dishes that are not Food-101's classes, cross-entropy. Fine-tuning on Food-101 loads everything
  except the class layer (``head.mlp.3.*``: the class counts differ).

The WHOLE backbone trains (every parameter), with the fine-tuning loop's optimiser, StepLR
schedule and gradient clipping; the checkpoint holds the epoch selected on the validation split.

Vocabulary (MMT, two-tower)
---------------------------
The text encoder's word embedding table is indexed by a ``WordVocab``, whose ids depend on the
whole word set (it sorts it). Pre-training therefore fixes the vocabulary: the union of the
pre-training data's words (the generator's manifest vocabulary, else the training captions' words)
and the words of the datasets it is shared with (``extra_vocab``; ``dataset_vocab('msrvtt', ...)``
gives MSR-VTT's, ``dataset_vocab('food101', ...)`` Food-101's). The word list is stored in the
checkpoint (``vocab``), and fine-tuning MUST tokenise with it (``adopt_vocab``): same ids, same
table size. Downstream words missing from it become [UNK] and are counted in the load report.
Where the profile's ``mmt`` / ``two_tower`` block names a pretrained ``text_model``, its own tokenizer is used instead (pre-training and
fine-tuning alike): the checkpoint stores no word list, ``tokenizer`` identifies the tokenizer.

Checkpoint format (``torch.save`` of a dict, written atomically; ``torch.load(weights_only=True)``
reads it)::

    format: "mmpetl.pretrained_backbone", format_version: 1,
    backbone: "late_fusion" | "mmt" | "two_tower", config: the backbone config as a dict,
    state_dict: {name: tensor} (CPU, every parameter and persistent buffer),
    source, data: {path, format, hash, sizes}, seed, train: TrainSettings as a dict,
    profile_settings, task, metrics: {valid, initial_valid, selected_epoch, select_metric,
    history}, vocab: [words] | None, tokenizer: {kind, model, tokenizer_sha256} | None,
    vocab_sources, parameters (count)

The file is a function of its inputs alone (same data, settings, seed and code: the same bytes),
so DVC and the run keys (which hold its sha256) see the same checkpoint from every clone, commit
and environment. Provenance that does not change the numbers (device name, code hash, package
versions, host, git commit, wall time) is written BESIDE it, in ``<checkpoint>.provenance.json``
(``harness.records.provenance_path``; .dvcignore keeps it out of DVC's hash of the
checkpoint folder).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Iterable

import torch

from harness import records
from harness.backbones import build_backbone, load_named, plan_encoders
from harness.data import load_block, load_card
from harness.data._common import MANIFEST
from harness.checkpoints import FORMAT, FORMAT_VERSION, checkpoint_sha256, pretrain_source
from harness.errors import InputError
from harness.records import atomic_file, canonical_hash, provenance_path, update_with_file
from harness.settings import checkpoint_path, section
from harness.tasks.tasks import TASKS
from harness.text import SPECIALS, PretrainedTokenizer, Tokenized, WordVocab, words
from harness.train import TrainSettings, evaluate, run_loaders, seed_everything, train_and_select

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _plain(document):
    """JSON-representable copy (what ``torch.load(weights_only=True)`` can read back)."""
    return json.loads(json.dumps(document, default=str))


def vocab_words(vocab: WordVocab) -> list[str]:
    """The vocabulary's words in id order (``WordVocab(vocab_words(v))`` gives the same ids)."""
    return sorted(vocab.index, key=vocab.index.get)


def dataset_vocab(name: str, data: dict | None = None) -> list[str]:
    """The words of a text dataset as fine-tuning would see them: the generator's manifest
    vocabulary, else the training split's words (``data``: a params.yaml data block)."""
    loaded = load_block(name, dict(data or {}))
    if loaded.info.get("vocab"):
        return list(loaded.info["vocab"])
    field = load_card(name).text_field
    return sorted({w for item in loaded.split("train") for w in words(item[field])})


def source_content_hash(data) -> str:
    """The content hash of a loaded pre-training source (the checkpoint's ``data.hash``): the
    loader's ``data_hash`` when it gives one; else sha256 over the files it read (split lists,
    pickles), the generator's manifest, the format and the split sizes. (MMT per-video feature
    files are not read: with real HowTo100M that would be millions of files.)"""
    if data.report.get("data_hash"):
        return data.report["data_hash"]
    digest = hashlib.sha256()
    root = Path(data.path)
    files = [Path(f) for f in data.report.get("files", [])]
    manifest = (root if root.is_dir() else root.parent) / MANIFEST
    for path in sorted(set(files + ([manifest] if manifest.is_file() else []))):
        digest.update(path.name.encode())
        update_with_file(digest, path)
    digest.update(canonical_hash(  # location-independent: no paths
        {"name": data.name, "format": data.format,
         "sizes": {n: len(s) for n, s in data.splits.items()}}).encode())
    return digest.hexdigest()


@contextlib.contextmanager
def single_threaded(device: torch.device):
    """One intra-op thread on CPU, whatever the thread policy or OMP_NUM_THREADS say: CPU kernels
    split their reductions (matmul, sum, norm) into per-thread chunks, so another thread count
    sums in another order and changes the last bits of every tensor; the checkpoint must be the
    same bytes on every machine (DVC and the fine-tuning run keys hash it). The thread count in
    force before is restored afterwards."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _save_atomic(document: dict, path: Path) -> None:
    with atomic_file(path, "wb") as stream:
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
    loaded = load_block(source, dict(data or {}))
    splits = {name: loaded.split(name) for name in ("train", "valid")}
    field = load_card(source).text_field
    if field is None:  # no raw text to tokenise
        return loaded, splits, None, None
    max_len = data.get("max_text_len", 16)
    if tokenizer is not None:
        return (loaded, {n: Tokenized(s, tokenizer, max_len, field) for n, s in splits.items()},
                tokenizer, {"tokenizer": tokenizer.identity()})
    own = (list(loaded.info["vocab"]) if loaded.info.get("vocab")
           else sorted({w for item in splits["train"] for w in words(item[field])}))
    extra = sorted(set(extra_vocab or ()) - set(SPECIALS))
    vocab = WordVocab(own + extra)
    sources = {source: len(set(own)), "extra": len(extra),
               "extra_not_in_source": len(set(extra) - set(own)), "total": len(vocab)}
    return loaded, {n: Tokenized(s, vocab, max_len, field) for n, s in splits.items()}, vocab, sources


def pretrain(source: str, out_path: str | Path, profile_settings: dict, train_settings,
             seed: int = 0, *, data: dict | None = None, extra_vocab: Iterable[str] | None = None,
             progress: bool = True) -> dict:
    """Pre-train the whole backbone for ``source`` and save the checkpoint at ``out_path``.

    ``profile_settings``: the profile's block for the source's backbone kind (params.yaml
    ``profiles.<profile>.late_fusion`` / ``.mmt`` / ``.two_tower``), the SAME block fine-tuning builds from;
    ``train_settings``: a ``TrainSettings`` or a dict of its fields; ``data``: the source's data
    block (``path``, ``format``, loader options, ``max_text_len``; default: the card's path);
    ``extra_vocab``: words of the fine-tuning data sets that will share the MMT vocabulary.
    Returns the checkpoint's metadata (everything but the state dict) plus ``path``."""
    kind, task_name, output_dim = pretrain_source(source)
    task = TASKS[task_name]
    settings = _train_settings(train_settings)
    out_path = Path(out_path)
    started = time.perf_counter()
    text = load_named(kind, dict(profile_settings or {}), f"profiles.*.{kind}").get("text")
    tokenizer = (PretrainedTokenizer(text.tokenizer, text.name, text.tokenizer_sha256)
                 if text is not None else None)
    loaded, splits, vocab, vocab_sources = _load_source(source, data or {}, extra_vocab, tokenizer)
    if loaded.info.get("task") != task_name:
        raise InputError("pre-training data of the wrong task", file=loaded.path, key="task",
                         expected=task_name, found=loaded.info.get("task"))
    if output_dim is None:  # classification: one output per class of the source
        output_dim = int(loaded.info["num_classes"])

    seed_everything(seed)
    backbone = build_backbone(kind, dict(profile_settings or {}), loaded.info, output_dim,
                              vocab_size=len(vocab) if vocab is not None else None)
    for parameter in backbone.parameters():  # the whole backbone trains
        parameter.requires_grad_(True)
    device = torch.device(settings.device)
    backbone.to(device)
    with single_threaded(device):
        loaders = run_loaders(splits, settings, seed)
        initial_valid = evaluate(backbone, task, loaders["valid"], settings)
        trained = train_and_select(backbone, task, loaders, settings, progress,
                                   desc=f"pretrain {kind} on {source}")
    # the backbone is left at the selected epoch's weights, which these metrics measured
    final_valid, best_epoch, history = (trained["selected_valid"], trained["selected_epoch"],
                                        trained["history"])
    best_state = {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()}

    metadata = _plain({
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "backbone": kind, "config": dataclasses.asdict(backbone.config),
        "source": source, "task": task_name, "seed": seed,
        "data": {"path": loaded.path, "format": loaded.format, "hash": source_content_hash(loaded),
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


# ---------------------------------------------------------------------------------------------
# params.yaml
# ---------------------------------------------------------------------------------------------


def plan_pretrain(params: dict, source: str, overrides: dict | None = None) -> dict:
    """Keyword arguments of ``pretrain`` resolved from params.yaml: ``profiles.<p>.<kind>``,
    ``pretrain.train.<source>`` + ``pretrain.profiles.<p>`` (+ ``overrides``: typed train
    fields), ``data.<p>.<source>``, ``pretrain.seed``, ``pretrain.checkpoints.<source>``, and the
    vocabularies of ``pretrain.share_vocab.<source>`` (fine-tuning datasets)."""
    profile, file = params["profile"], params.get("_file")
    kind = pretrain_source(source)[0]
    pre = section(params, "pretrain")
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
    # refuses a bad text_model by its key
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


__all__ = ["dataset_vocab", "plan_pretrain", "pretrain", "source_content_hash", "vocab_words"]
