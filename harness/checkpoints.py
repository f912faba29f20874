"""Pre-trained backbone checkpoints: their format, reading and checking one, loading it into a
freshly built backbone (``load_pretrained``), the fine-tuning side of the shared MMT vocabulary
(``adopt_vocab``) and the file's sha256 for run keys. ``harness.pretrain`` (the stage) writes them;
the format is described there. Provenance that does not change the numbers lives beside the
file, in ``<checkpoint>.provenance.json``."""
from __future__ import annotations

import dataclasses
import functools
import logging
import sys
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from harness.data.cards import list_cards, load_card
from harness.errors import InputError
from harness.records import provenance_path, read_json, sha256_file
from harness.text import Tokenized, WordVocab

log = logging.getLogger(__name__)

FORMAT, FORMAT_VERSION = "mmpetl.pretrained_backbone", 1
# a pre-training task -> the output size of the head it trains (the source's card names the task
# and the backbone); classification: the number of classes of the source's data (None here)
PRETRAIN_OUTPUT = {"regression": 1, "retrieval": 0, "classification": None}
# what a fine-tuning load leaves out by default, per backbone kind (two_tower: the class layer)
DEFAULT_SKIP = {"late_fusion": ("projections.", "head.out."), "mmt": (), "two_tower": ("head.mlp.3.",)}
# config fields that change the computation without changing any tensor shape
STRUCTURAL = {"late_fusion": ("heads",), "mmt": ("heads", "text.num_attention_heads"),
              "two_tower": ("image_heads", "text_heads", "fusion_heads")}


def pretrain_source(source: str, key: str = "source", file: str | None = None
                    ) -> tuple[str, str, int | None]:
    """(backbone kind, task, head output size) of the pre-training source ``source``, read from its
    dataset card (output size None: the number of classes of the source's data); ``key`` /
    ``file`` name where the source was given, for the error."""
    names = list_cards()
    if source not in names:
        raise InputError("unknown pre-training source (no dataset card)", file=file, key=key,
                         expected=names, found=source)
    card = load_card(source)
    if card.task not in PRETRAIN_OUTPUT:
        raise InputError("a pre-training source needs a regression, retrieval or classification task",
                         file=file,
                         key=key, expected=sorted(PRETRAIN_OUTPUT), found=f"{source}: {card.task}")
    return card.backbone, card.task, PRETRAIN_OUTPUT[card.task]


def backbone_kind(backbone: nn.Module) -> str:
    from harness.backbones.late_fusion import LateFusionBackbone
    from harness.backbones.mmt import MMTBackbone
    from harness.backbones.two_tower import TwoTowerBackbone
    for cls, kind in ((LateFusionBackbone, "late_fusion"), (MMTBackbone, "mmt"),
                      (TwoTowerBackbone, "two_tower")):
        if isinstance(backbone, cls):
            return kind
    return type(backbone).__name__


def read_checkpoint(checkpoint_path: str | Path) -> dict:
    """The checkpoint document, checked; InputError names the file when it is missing or bad."""
    path = Path(checkpoint_path)
    if not path.is_file():
        raise InputError("pre-trained checkpoint not found (run `mmpetl pretrain` first)",
                         file=str(path), key="checkpoint", expected="an existing checkpoint file",
                         found="missing")
    provenance = verify_checkpoint_bytes(path)  # before unpickling bytes that are not the recorded ones
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
    if document.get("format_version") != FORMAT_VERSION:
        raise InputError("pre-trained checkpoint of another format version", file=str(path),
                         key="format_version", expected=FORMAT_VERSION,
                         found=document.get("format_version"))
    state = document.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError("checkpoint has no state dict of tensors", file=str(path), key="state_dict",
                         expected="{name: tensor}", found=type(state).__name__)
    broken = next((k for k, v in state.items() if v.is_floating_point() and not v.isfinite().all()), None)
    if broken is not None:  # else the first run blames its data for NaN encoder outputs
        raise InputError("the pre-trained checkpoint holds non-finite values", file=str(path),
                         key=f"state_dict.{broken}", expected="finite weights",
                         found=f"{int((~state[broken].isfinite()).sum())} NaN or inf values")
    document["path"] = str(path)  # where it was read from (not stored in the file)
    document["provenance"] = provenance
    return document


@functools.lru_cache(maxsize=None)  # once per checkpoint and process
def _warn_unverified(path: Path, beside: Path) -> None:
    print(f"mmpetl: warning: {path} has no {beside.name} beside it, so its bytes are not checked "
          "against the sha256 pre-training recorded (an altered checkpoint would be used as it is)",
          file=sys.stderr)


def verify_checkpoint_bytes(checkpoint_path: str | Path) -> dict | None:
    """The checkpoint's provenance document (None when it has none), after checking that the
    file's sha256 equals the ``sha256`` recorded there when ``mmpetl pretrain`` wrote it: a
    checkpoint altered or replaced since is refused (InputError: file, expected and found hash)."""
    path = Path(checkpoint_path)
    beside = provenance_path(path)
    if not beside.is_file():
        _warn_unverified(path, beside)
        return None
    try:
        provenance = read_json(beside)
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise InputError("unreadable checkpoint provenance", file=str(beside),
                         expected="the JSON `mmpetl pretrain` wrote beside the checkpoint",
                         found=f"{type(error).__name__}: {error}") from None
    recorded = provenance.get("sha256") if isinstance(provenance, dict) else None
    if not isinstance(recorded, str):
        raise InputError("checkpoint provenance records no sha256", file=str(beside), key="sha256",
                         expected="the checkpoint's sha256", found=repr(recorded))
    actual = checkpoint_sha256(path)
    if actual != recorded:
        raise InputError(f"checkpoint bytes differ from the sha256 recorded in {beside.name} "
                         f"(altered or replaced since pre-training; rerun `mmpetl pretrain`)",
                         file=str(path), key="sha256", expected=recorded, found=actual)
    return provenance


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
    them are not loaded, and each must match some checkpoint tensor. Every other checkpoint tensor
    must have a place of the same shape and dtype in the backbone, and every backbone tensor must
    load (InputError naming the tensor), except an expert's that only one side has (MMT): the
    backbone's keep their fresh initialisation (``missing``), the checkpoint's are left out
    (``unexpected``). ``checkpoint_path`` may also be a document from ``read_checkpoint``."""
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
    unmatched = [p for p in prefixes if not any(k.startswith(p) for k in state)]
    if skip_prefixes is not None and unmatched:  # a typo would load what it meant to leave out
        raise InputError("a skip prefix matches no tensor of the checkpoint", file=where,
                         key=f"pretrain.skip ({kind})", expected="prefixes of checkpoint tensor "
                         f"names, e.g. {sorted(state)[-1]!r}", found=unmatched[0])
    considered = [k for k in state if k not in set(skipped)]
    unexpected = sorted(k for k in considered if k not in own)
    loaded = sorted(k for k in considered if k in own)
    missing = sorted(k for k in own if k not in state)
    _require_whole(document, backbone, where, loaded, missing, unexpected, prefixes, own)
    misfits = [(k, _shape_and_dtype(state[k]), _shape_and_dtype(own[k])) for k in loaded
               if _shape_and_dtype(state[k]) != _shape_and_dtype(own[k])]
    if misfits:
        name, theirs, mine = misfits[0]
        more = f" (and {len(misfits) - 1} more tensor(s))" if len(misfits) > 1 else ""
        raise InputError(f"checkpoint tensor {name!r} does not fit the backbone{more}", file=where,
                         key=name, expected=f"{mine} (backbone)", found=f"{theirs} (checkpoint)")
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


def _shape_and_dtype(tensor: torch.Tensor) -> str:
    return f"shape {tuple(tensor.shape)}, {str(tensor.dtype).removeprefix('torch.')}"


def _names(key: str, experts: set) -> bool:
    """Whether state-dict ``key`` belongs to one of ``experts`` (a dotted part names it)."""
    return bool(set(key.split(".")) & experts)


def _require_whole(document: dict, backbone: nn.Module, where: str, loaded: list, missing: list,
                   unexpected: list, prefixes: tuple, own: dict) -> None:
    """The checkpoint must fill the backbone: every tensor loads except those ``skip`` names and
    those of an expert only one side has (MMT: HowTo100M's 2 experts into MSR-VTT's 7). Anything
    else left fresh or left out means a checkpoint of another model or with renamed tensors."""
    experts = set((document.get("config") or {}).get("experts") or ())
    own_experts = set(getattr(backbone.config, "experts", None) or ())
    fresh = [k for k in missing if not k.startswith(prefixes) and not _names(k, own_experts - experts)]
    extra = [k for k in unexpected if not _names(k, experts - own_experts)]
    if not loaded or fresh or extra:
        raise InputError(
            f"the checkpoint does not fit the backbone: {len(loaded)} tensors load, {len(fresh)} of "
            f"the backbone's would stay fresh, {len(extra)} of the checkpoint's have no place "
            "(skip prefixes: pretrain.skip)", file=where,
            key=(extra or fresh or ["state_dict"])[0],
            expected=f"the backbone's tensor names (e.g. {next(iter(own))!r})",
            found=f"checkpoint tensor {extra[0]!r}" if extra else
            f"no checkpoint tensor {fresh[0]!r}" if fresh else f"e.g. {next(iter(document['state_dict']), None)!r}")


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
    return sha256_file(path)  # memoised on the file's size and modification time


def checkpoint_sha256(checkpoint_path: str | Path) -> str | None:
    """sha256 of the checkpoint file (for run keys; ``verify_checkpoint_bytes`` checks it against
    the one recorded in its provenance file), None when it does not exist yet."""
    path = Path(checkpoint_path)
    if not path.is_file():
        return None
    stat = path.stat()
    return _sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


__all__ = ["DEFAULT_SKIP", "FORMAT", "FORMAT_VERSION", "PRETRAIN_OUTPUT", "adopt_vocab", "backbone_kind",
           "checkpoint_sha256", "checkpoint_vocab", "load_pretrained",
           "read_checkpoint", "verify_checkpoint_bytes"]
