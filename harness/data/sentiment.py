"""CMU-MOSI / CMU-MOSEI / IEMOCAP loaders.

Formats (names used by `format=`):
  mult            MulT pickle, aligned (mosi_data.pkl, mosei_senti_data.pkl, iemocap_data.pkl)
  mult_noalign    MulT pickle, unaligned (*_data_noalign.pkl): masks = non-zero rows
  mmsa_aligned    MMSA aligned_50.pkl (MOSI / MOSEI)
  mmsa_unaligned  MMSA unaligned_50.pkl: masks from audio_lengths / vision_lengths and the
                  text_bert attention mask
  mmin            IEMOCAP MMIN / CGGM layout: {A,V,L}/<features>.h5 (one dataset per
                  utterance) + target/{fold}/{trn,val,tst}_{label,int2name}.npy

Items (dicts): text, audio, vision (float32, L_m x D_m), mask_text, mask_audio,
mask_vision (bool, L_m; True = real step), label, id (str), index (int64);
`text_bert` (int64, 3 x L) when an MMSA file has it; IEMOCAP adds `label_class`.
Audio -inf values are set to 0 and counted (MulT does the same); any other non-finite
value is an InputError.
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

import numpy as np
import torch
from pydantic import Field, ValidationInfo, field_validator
from torch.utils.data import Dataset

from harness.errors import InputError

from ._common import (LoadedDataset, LoaderOptions, check_finite, decode, float_array, length_stats,
                      list_dir, load_npy, load_pickle, pick_format, read_manifest, require_path,
                      split_index)
from .cards import Card

MODALITIES = ("text", "audio", "vision")
Modality = Literal["text", "audio", "vision"]


MMIN_OPTIONS = ("fold", "max_len", "feature_types")  # the options only the mmin layout reads


class Options(LoaderOptions):
    """The keyword options of ``load`` (all three for IEMOCAP's mmin layout)."""
    fold: Optional[Union[int, str]] = None  # the cross-validation fold
    max_len: Optional[dict[Modality, Annotated[int, Field(gt=0)]]] = None  # steps kept per modality
    feature_types: Optional[dict[Modality, str]] = None  # the feature file per modality

    @field_validator(*MMIN_OPTIONS)
    @classmethod
    def _mmin_only(cls, value, info: ValidationInfo):
        """Refused where no format the dataset can be read in (the forced one, if any) reads it."""
        card, forced = info.context["card"], info.context.get("format")
        if value is not None and "mmin" not in card.formats:
            raise ValueError(f"no {info.field_name}: only for format(s) ['mmin'] ({card.name} has none)")
        if value is not None and forced in card.formats and forced != "mmin":
            raise ValueError(f"no {info.field_name}: only for format(s) ['mmin'] (format {forced!r} "
                             "is forced)")
        return value


# ----------------------------------------------------------------------------- datasets

class ArrayDataset(Dataset):
    """In-memory split: per-key numpy arrays indexed along the first axis."""

    def __init__(self, arrays: dict[str, np.ndarray], ids: list[str]):
        self.arrays = arrays
        self.ids = ids

    @property
    def labels(self) -> np.ndarray:
        return self.arrays["label"]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        i = split_index(i, len(self.ids), "samples")
        item = {k: torch.from_numpy(np.asarray(v[i])) for k, v in self.arrays.items()}
        item["id"] = self.ids[i]
        item["index"] = torch.tensor(i, dtype=torch.int64)
        return item

    def batch(self, indices: list[int]) -> dict:
        """The items ``indices`` as ``default_collate`` stacks them, indexed at once."""
        rows = [split_index(i, len(self.ids), "samples") for i in indices]
        found = {k: torch.from_numpy(v[rows]) for k, v in self.arrays.items()}  # indexing copies
        return {**found, "id": [self.ids[i] for i in rows], "index": torch.tensor(rows, dtype=torch.int64)}


class _H5Handles:
    """Per-process cache of read-only h5 handles (safe with DataLoader workers)."""

    def __init__(self, paths: dict[str, str]):
        self.paths = paths
        self._h: dict = {}
        self._pid = None

    def get(self, key: str):
        import h5py
        if self._pid != os.getpid():
            self._h, self._pid = {}, os.getpid()
        if key not in self._h:
            try:
                self._h[key] = h5py.File(self.paths[key], "r")
            except OSError as e:
                raise InputError("cannot open HDF5 file", file=self.paths[key],
                                 key="(whole file)", expected="a readable HDF5 file",
                                 found=str(e)[:200]) from None
        return self._h[key]

    def __getstate__(self):
        return {"paths": self.paths, "_h": {}, "_pid": None}


class MminDataset(Dataset):
    """IEMOCAP MMIN split: features read lazily from the per-modality h5 files."""

    def __init__(self, handles: _H5Handles, names: list[str], labels: np.ndarray,
                 max_len: dict[str, int], dims: dict[str, int]):
        self.h, self.names, self.labels = handles, names, labels
        self.max_len, self.dims = max_len, dims

    def __len__(self) -> int:
        return len(self.names)

    @property
    def ids(self) -> list[str]:
        """The utterance names (int2name)."""
        return self.names

    def read(self, i: int, m: str) -> np.ndarray:
        name = self.names[i]
        f = self.h.get(m)
        try:
            a = np.asarray(f[name][()], dtype=np.float32)
        except (KeyError, OSError, ValueError, TypeError) as e:
            raise InputError("cannot read utterance features", file=self.h.paths[m],
                             key=name, expected=f"a len x {self.dims[m]} float dataset",
                             found=f"{type(e).__name__}: {str(e)[:120]}") from None
        if a.ndim == 1:
            a = a[None, :]
        if a.ndim != 2 or a.shape[1] != self.dims[m]:
            raise InputError("feature dims differ", file=self.h.paths[m], key=name,
                             expected=f"len x {self.dims[m]}", found=f"shape {a.shape}")
        check_finite(a, file=self.h.paths[m], key=name)
        return a

    def __getitem__(self, i: int) -> dict:
        i = split_index(i, len(self.names), "samples")
        item = {}
        for m in MODALITIES:
            a = self.read(i, m)
            L = self.max_len[m]
            out = np.zeros((L, self.dims[m]), dtype=np.float32)
            k = min(L, a.shape[0])
            out[:k] = a[:k]
            mask = np.zeros(L, dtype=bool)
            mask[:max(k, 1)] = True
            item[m] = torch.from_numpy(out)
            item[f"mask_{m}"] = torch.from_numpy(mask)
        item["label"] = torch.tensor(int(self.labels[i]), dtype=torch.int64)
        item["label_class"] = item["label"].clone()
        item["id"] = self.names[i]
        item["index"] = torch.tensor(i, dtype=torch.int64)
        return item


# ----------------------------------------------------------------------------- locating

def _describe(card: Card, fmt: str) -> str:
    spec = card.formats[fmt]
    if fmt == "mmin":
        dirs = "/".join(spec.get("modality_dirs", {}).values())
        return f"mmin ({dirs} feature dirs + target/<fold>/)"
    return f"{fmt} ({' or '.join(spec.get('files', []))})"


def _find(card: Card, root: Path, fmt: str):
    spec = card.formats[fmt]
    if fmt == "mmin":
        dirs = spec.get("modality_dirs", {})
        if (root / "target").is_dir() and all((root / d).is_dir() for d in dirs.values()):
            return root
        return None
    for rel in spec.get("files", []):
        if (root / rel).is_file():
            return root / rel
    return None


def locate(card: Card, path: Path, forced: str | None):
    """-> (format or None when it must be read from the content, file or directory)."""
    path = Path(path)
    if forced is not None:
        card.fmt(forced)
    require_path(path, "one of: " + "; ".join(_describe(card, f) for f in card.formats))
    if path.is_file():
        if forced == "mmin":
            raise InputError("format mmin is a directory layout, not a file", file=str(path),
                             key="format", expected=_describe(card, "mmin"), found="a file")
        if forced is None:
            for fmt, spec in card.formats.items():
                if path.name in [Path(r).name for r in spec.get("files", [])]:
                    return fmt, path
        return forced, path
    found = [(f, hit) for f in card.formats if (hit := _find(card, path, f)) is not None]
    return pick_format(card, found, forced, path, lambda f: _describe(card, f))


# ----------------------------------------------------------------------------- pickles

def _infer_format(card: Card, file: Path, data: dict) -> str:
    first = next((v for v in data.values() if isinstance(v, dict)), None)
    fs = str(file)
    if first is None:
        raise InputError("pickle holds no split dicts", file=fs, key="(root)",
                         expected="dict split -> dict of arrays", found=sorted(map(str, data)))
    if "regression_labels" in first:
        fam = "mmsa"
    elif "labels" in first:
        fam = "mult"
    else:
        raise InputError("pickle format not recognised", file=fs, key="(split).labels",
                         expected="'labels' (MulT) or 'regression_labels' (MMSA)",
                         found=f"keys {sorted(map(str, first))}")
    name = file.name.lower()
    if "noalign" in name or "unaligned" in name:
        aligned = False
    else:
        try:
            lens = {np.asarray(first[m]).shape[1] for m in MODALITIES}
            aligned = len(lens) == 1
        except Exception:
            aligned = True
    fmt = {("mult", True): "mult", ("mult", False): "mult_noalign",
           ("mmsa", True): "mmsa_aligned", ("mmsa", False): "mmsa_unaligned"}[(fam, aligned)]
    if fmt not in card.formats:
        raise InputError(f"format {fmt} is not a {card.name} format", file=fs, key="format",
                         expected=list(card.formats), found=fmt)
    return fmt


def _labels_regression(raw, key, N, fs, lo, hi):
    try:
        a = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise InputError("labels are not numeric", file=fs, key=key, expected="floats",
                         found=str(e)[:120]) from None
    if a.size != N or (a.ndim >= 1 and a.shape[0] != N):
        raise InputError("wrong label shape", file=fs, key=key,
                         expected=f"{N} labels (N x 1 x 1 or N)", found=f"shape {a.shape}")
    a = a.reshape(N).astype(np.float32)
    if not np.isfinite(a).all():
        raise InputError("non-finite labels", file=fs, key=key, expected="finite values",
                         found=f"{int((~np.isfinite(a)).sum())} non-finite")
    bad = (a < lo - 1e-6) | (a > hi + 1e-6)
    if bad.any():
        raise InputError("labels out of range", file=fs, key=key, expected=f"values in [{lo}, {hi}]",
                         found=f"{int(bad.sum())} outside (min {a.min():.4g}, max {a.max():.4g})")
    return a


def _labels_iemocap(raw, key, N, fs):
    try:
        a = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise InputError("labels are not numeric", file=fs, key=key, expected="N x 4 x 2",
                         found=str(e)[:120]) from None
    if a.shape != (N, 4, 2):
        raise InputError("wrong label shape", file=fs, key=key,
                         expected=f"({N}, 4, 2): a two-way one-hot per emotion",
                         found=f"shape {a.shape}")
    ok = np.isin(a, (0.0, 1.0)).all() and np.all(a.sum(-1) == 1)
    if not ok:
        raise InputError("labels out of range", file=fs, key=key,
                         expected="per emotion a one-hot pair ([1,0] or [0,1])",
                         found=f"values {np.unique(a)[:6].tolist()}, pair sums "
                               f"{np.unique(a.sum(-1))[:6].tolist()}")
    binary = a.argmax(-1).astype(np.int64)                       # N x 4, 1 = positive
    cls = np.where(binary.sum(1) == 1, binary.argmax(1), -1).astype(np.int64)
    return binary, cls


def _ids(d, skey, N, fs):
    if "id" not in d:
        return [f"{skey}_{i}" for i in range(N)]
    raw = d["id"]
    try:
        ids = [decode(x) for x in list(raw)]
    except TypeError:
        raise InputError("ids are not a sequence", file=fs, key=f"{skey}.id",
                         expected=f"{N} ids", found=type(raw).__name__) from None
    if len(ids) != N:
        raise InputError("id count differs from sample count", file=fs, key=f"{skey}.id",
                         expected=f"{N} ids", found=f"{len(ids)} ids")
    return ids


def _lengths(raw, key, N, L, fs):
    try:
        a = np.asarray(raw).reshape(-1)
    except (TypeError, ValueError) as e:
        raise InputError("lengths are not an array", file=fs, key=key, expected=f"{N} ints",
                         found=str(e)[:120]) from None
    if a.shape[0] != N or a.dtype.kind not in "iuf":
        raise InputError("wrong lengths", file=fs, key=key, expected=f"{N} ints",
                         found=f"shape {a.shape}, dtype {a.dtype}")
    a = a.astype(np.int64)
    if (a < 0).any() or (a > L).any():
        raise InputError("lengths out of range", file=fs, key=key, expected=f"0 .. {L}",
                         found=f"min {a.min()}, max {a.max()}")
    return a


def _load_pickle_format(card: Card, file: Path, fmt: str | None) -> LoadedDataset:
    """Load a MulT or MMSA pickle (aligned or not). Long because one pass over the splits
    validates and converts every array while it accumulates the report (dims, lengths, fixed
    values, warnings); each check names the split and key it read."""
    fs = str(file)
    data = load_pickle(file)
    if not isinstance(data, dict):
        raise InputError("pickle is not a dict of splits", file=fs, key="(root)",
                         expected="dict with train / valid / test", found=type(data).__name__)
    if fmt is None:
        fmt = _infer_format(card, file, data)
    spec = card.fmt(fmt)
    mmsa = fmt.startswith("mmsa")
    aligned = bool(spec.get("aligned"))
    label_key = "regression_labels" if mmsa else "labels"
    is_iemocap = card.task == "classification"
    lo, hi = (card.get("label") or {}).get("range", [-3.0, 3.0]) if not is_iemocap else (0, 1)

    splits, report_splits, warnings = {}, {}, []
    dims, padded = {}, {}
    total_ninf = 0
    zero_fixed = 0
    label_vals = []
    for split, skey in spec["split_keys"].items():
        if skey not in data:
            raise InputError("missing split", file=fs, key=skey,
                             expected=list(spec["split_keys"].values()),
                             found=sorted(map(str, data)))
        d = data[skey]
        if not isinstance(d, dict):
            raise InputError("split is not a dict of arrays", file=fs, key=skey,
                             expected="dict", found=type(d).__name__)
        if label_key not in d:
            other = "labels" if mmsa else "regression_labels"
            if other in d:
                raise InputError(f"file is not in format {fmt} (wrong format forced?)", file=fs,
                                 key=f"{skey}.{label_key}",
                                 expected=f"{fmt} keys incl. {label_key!r}",
                                 found=f"keys {sorted(map(str, d))} "
                                       f"(looks like {'mult' if mmsa else 'mmsa'})")
            raise InputError("missing key", file=fs, key=f"{skey}.{label_key}",
                             expected=f"{label_key!r} in the split dict",
                             found=f"keys {sorted(map(str, d))}")
        feats = {}
        for m in MODALITIES:
            if m not in d:
                raise InputError("missing key", file=fs, key=f"{skey}.{m}",
                                 expected=f"{m!r}: N x L x D float array",
                                 found=f"keys {sorted(map(str, d))}")
            feats[m] = float_array(d[m], file=fs, key=f"{skey}.{m}", ndim=3,
                                   what="N x L x D float array")
        N = feats["text"].shape[0]
        if N == 0:
            raise InputError("empty split", file=fs, key=skey, expected="at least 1 sample",
                             found="0 samples")
        for m in MODALITIES:
            if feats[m].shape[0] != N:
                raise InputError("sample counts differ between modalities", file=fs,
                                 key=f"{skey}.{m}", expected=f"{N} samples (as {skey}.text)",
                                 found=f"shape {feats[m].shape}")
            D, L = feats[m].shape[2], feats[m].shape[1]
            if L == 0 or D == 0:
                raise InputError("modality without time steps or features", file=fs,
                                 key=f"{skey}.{m}", expected="N x L x D with at least 1 time step "
                                 "and 1 feature (L, D >= 1)", found=f"shape {feats[m].shape}")
            if m in dims and dims[m] != D:
                raise InputError("feature dims differ between splits", file=fs,
                                 key=f"{skey}.{m}", expected=f"dim {dims[m]} (as in train)",
                                 found=f"dim {D} (shape {feats[m].shape})")
            dims.setdefault(m, D)
            first = next(iter(padded.get(m, {}).items()), None)
            if first is not None and first[1] != L:  # the backbone is built for one length per modality
                raise InputError("padded lengths differ between splits", file=fs, key=f"{skey}.{m}",
                                 expected=f"length {first[1]} (as in {first[0]})",
                                 found=f"length {L} (shape {feats[m].shape})")
            padded.setdefault(m, {})[split] = L
        if aligned:
            Ls = {m: feats[m].shape[1] for m in MODALITIES}
            if len(set(Ls.values())) != 1:
                bad = next(m for m in MODALITIES if Ls[m] != Ls["text"])
                raise InputError(f"data is not aligned but format {fmt} is (wrong format "
                                 f"forced?)", file=fs, key=f"{skey}.{bad}",
                                 expected=f"length {Ls['text']} (as {skey}.text)",
                                 found=f"length {Ls[bad]}")
        # MulT: audio -inf -> 0, counted
        ninf = np.isneginf(feats["audio"])
        n_fixed = int(ninf.sum())
        feats["audio"][ninf] = 0.0
        total_ninf += n_fixed
        for m in MODALITIES:
            check_finite(feats[m], file=fs, key=f"{skey}.{m}")

        # labels
        arrays: dict[str, np.ndarray] = {}
        if is_iemocap:
            binary, cls = _labels_iemocap(d[label_key], f"{skey}.{label_key}", N, fs)
            arrays["label"] = binary
            arrays["label_class"] = cls
            label_vals.append(binary)
        else:
            y = _labels_regression(d[label_key], f"{skey}.{label_key}", N, fs, lo, hi)
            arrays["label"] = y
            label_vals.append(y)

        # masks / lengths
        lengths = {}
        if mmsa:
            for m in ("audio", "vision"):
                key = f"{m}_lengths"
                L = feats[m].shape[1]
                if key in d:
                    lengths[m] = _lengths(d[key], f"{skey}.{key}", N, L, fs)
                elif not aligned:
                    raise InputError("missing key", file=fs, key=f"{skey}.{key}",
                                     expected=f"{key!r} (required for unaligned MMSA data)",
                                     found=f"keys {sorted(map(str, d))}")
                else:
                    lengths[m] = np.full(N, L, dtype=np.int64)
            Lt = feats["text"].shape[1]
            if "text_bert" in d:
                tb = np.asarray(d["text_bert"])
                if tb.ndim != 3 or tb.shape[0] != N or tb.shape[1] != 3 or tb.dtype.kind not in "iuf":
                    raise InputError("wrong text_bert shape", file=fs, key=f"{skey}.text_bert",
                                     expected=f"({N}, 3, L): token ids, mask, segment ids",
                                     found=f"shape {tb.shape}, dtype {tb.dtype}")
                tb = tb.astype(np.int64)
                arrays["text_bert"] = tb
                if tb.shape[2] == Lt:
                    lengths["text"] = np.clip(tb[:, 1, :].sum(1), 0, Lt)
                else:
                    warnings.append(f"{skey}.text_bert length {tb.shape[2]} != text length "
                                    f"{Lt}; text mask is all True")
                    lengths["text"] = np.full(N, Lt, dtype=np.int64)
            else:
                lengths["text"] = np.full(N, Lt, dtype=np.int64)
            for m in MODALITIES:
                L = feats[m].shape[1]
                mask = np.arange(L)[None, :] < lengths[m][:, None]
                zero = ~mask.any(1)
                if zero.any():
                    mask[zero, 0] = True
                    zero_fixed += int(zero.sum())
                arrays[f"mask_{m}"] = mask
        else:
            for m in MODALITIES:
                L = feats[m].shape[1]
                if aligned:
                    mask = np.ones((N, L), dtype=bool)
                else:
                    mask = np.any(feats[m] != 0, axis=-1)
                    zero = ~mask.any(1)
                    if zero.any():
                        mask[zero, 0] = True
                        zero_fixed += int(zero.sum())
                arrays[f"mask_{m}"] = mask
                lengths[m] = mask.sum(1)
        for m in MODALITIES:
            arrays[m] = feats[m]
        ids = _ids(d, skey, N, fs)
        splits[split] = ArrayDataset(arrays, ids)
        report_splits[split] = {
            "n": N, "key": skey,
            "lengths": {m: length_stats(lengths[m]) for m in MODALITIES},
            "padded_length": {m: int(feats[m].shape[1]) for m in MODALITIES},
            "audio_neg_inf_fixed": n_fixed,
        }

    labels_report: dict
    if is_iemocap:
        allb = np.concatenate(label_vals)
        classes = (card.get("label") or {}).get("classes", ["c0", "c1", "c2", "c3"])
        labels_report = {"kind": "4 x binary", "classes": classes,
                         "positives": {c: int(allb[:, k].sum()) for k, c in enumerate(classes)},
                         "min": 0, "max": 1}
    else:
        ally = np.concatenate(label_vals)
        labels_report = {"kind": "regression", "range": [lo, hi], "min": float(ally.min()),
                         "max": float(ally.max()), "mean": round(float(ally.mean()), 4)}
    manifest = read_manifest(file)
    report = {
        "dataset": card.name, "path": fs, "format": fmt, "aligned": aligned, "files": [fs],
        "splits": report_splits,
        "modalities": {m: {"dim": dims[m], "padded_length": padded[m]} for m in MODALITIES},
        "labels": labels_report,
        "nonfinite": {"total": total_ninf, "audio_neg_inf": total_ninf},
        "audio_neg_inf_fixed": total_ninf,
        "zero_length_fixed": zero_fixed,
        "extra_keys": sorted(set(map(str, data[spec["split_keys"]["train"]]))
                             - set(MODALITIES) - {label_key, "id", "text_bert",
                                                  "audio_lengths", "vision_lengths"}),
        "generated": manifest is not None,
        "warnings": warnings,
    }
    info = _info(card, fmt, aligned, dims, {m: padded[m]["train"] for m in MODALITIES},
                 has_text_bert="text_bert" in splits["train"].arrays)
    return LoadedDataset(card.name, fmt, fs, splits, report, info)


def _info(card, fmt, aligned, dims, lengths, has_text_bert=False):
    info = {"task": card.task, "modalities": list(MODALITIES), "dims": dict(dims),
            "lengths": dict(lengths), "aligned": aligned, "has_text_bert": has_text_bert}
    if card.task == "classification":
        classes = (card.get("label") or {}).get("classes", ["c0", "c1", "c2", "c3"])
        info["classes"] = list(classes)
        info["num_classes"] = len(classes)
        info["label_kind"] = "4 x binary" if fmt != "mmin" else "4-class"
    else:
        info["label_range"] = list((card.get("label") or {}).get("range", [-3.0, 3.0]))
        info["label_kind"] = "regression"
    return info


# ----------------------------------------------------------------------------- MMIN

def _load_npy_any(p: Path) -> np.ndarray:
    try:
        return load_npy(p)
    except InputError as e:
        if "Object arrays" in str(e):
            return np.load(p, allow_pickle=True)
        raise


def _not_one_hot(ones: np.ndarray) -> str:
    """``ones`` (the count of 1s per label row), as the rows that are not one-hot:
    "3 rows with 4 ones, 1 row with 0 ones (first at row 2)"."""
    bad = np.flatnonzero(ones != 1)
    parts = [f"{n} row{'s' if n > 1 else ''} with {k} ones"
             for k, n in Counter(ones[bad].tolist()).most_common()]
    return f"{', '.join(parts)} (first at row {bad[0]})"


def _load_mmin(card: Card, root: Path, fold=None, max_len=None, feature_types=None) -> LoadedDataset:
    """Load the MMIN h5 + folds layout of IEMOCAP. Long because it validates each modality's h5
    file, the fold lists and the labels in one pass that builds the report as it goes (each
    check names the file and key it read)."""
    import h5py
    spec = card.fmt("mmin")
    fold = str(fold if fold is not None else spec.get("default_fold", 1))
    tdir = root / "target"
    folds = sorted((p.name for p in tdir.iterdir() if p.is_dir()),
                   key=lambda s: (len(s), s)) if tdir.is_dir() else []
    if fold not in folds:
        raise InputError("fold not found", file=str(tdir), key="fold", expected=folds,
                         found=fold)
    feature_types = feature_types or {}
    files: dict[str, str] = {}
    for m, sub in spec["modality_dirs"].items():
        d = root / sub
        h5s = sorted(d.glob("*.h5"))
        want = feature_types.get(m)
        pick = None
        if want:
            pick = d / (want if want.endswith(".h5") else f"{want}.h5")
            if not pick.is_file():
                raise InputError("feature file not found", file=str(pick), key=f"features.{m}",
                                 expected=f"one of {[p.name for p in h5s]}", found="missing")
        elif len(h5s) == 1:
            pick = h5s[0]
        elif not h5s:
            raise InputError("no feature file", file=str(d), key=f"features.{m}",
                             expected="an .h5 file with one dataset per utterance",
                             found=list_dir(d))
        else:
            pref = d / f"{spec.get('preferred_features', {}).get(m, '')}.h5"
            if pref.is_file():
                pick = pref
            else:
                raise InputError("several feature files; choose one with feature_types=",
                                 file=str(d), key=f"features.{m}", expected="one .h5 file",
                                 found=[p.name for p in h5s])
        files[m] = str(pick)
    handles = _H5Handles(files)

    splits, report_splits = {}, {}
    dims: dict[str, int] = {}
    dim_src: dict[str, str] = {}
    all_lengths: dict[str, list] = {m: [] for m in MODALITIES}
    split_lengths = {}
    class_counts = np.zeros(4, dtype=np.int64)
    split_data = {}
    for split, sname in spec["split_keys"].items():
        lp = tdir / fold / f"{sname}_label.npy"
        np_ = tdir / fold / f"{sname}_int2name.npy"
        if not lp.is_file():
            raise InputError("missing split", file=str(lp), key=sname,
                             expected=f"{sname}_label.npy in target/{fold}",
                             found=list_dir(tdir / fold))
        lab = load_npy(lp)
        names_raw = _load_npy_any(np_)
        if lab.dtype.kind not in "iufb":
            raise InputError("labels are not numeric", file=str(lp), key=sname,
                             expected="N x 4 one-hot or N ints", found=f"dtype {lab.dtype}")
        if lab.ndim == 2 and lab.shape[1] == 4:
            if not np.isfinite(lab).all() or not np.isin(lab, (0, 1)).all():
                raise InputError("labels out of range", file=str(lp), key=sname,
                                 expected="one-hot rows of 0/1", found=f"values {np.unique(lab)[:6].tolist()}")
            ones = lab.sum(1).astype(np.int64)
            if (ones != 1).any():  # argmax would read such a row as class 0
                raise InputError("label rows are not one-hot", file=str(lp), key=sname,
                                 expected="exactly one 1 per row", found=_not_one_hot(ones))
            y = lab.argmax(1).astype(np.int64)
        elif lab.ndim == 1 or (lab.ndim == 2 and lab.shape[1] == 1):
            y = lab.reshape(-1).astype(np.int64)
            if (lab.reshape(-1) != y).any():
                raise InputError("labels are not integers", file=str(lp), key=sname,
                                 expected="class ids 0..3", found="fractional values")
        else:
            raise InputError("wrong label shape", file=str(lp), key=sname,
                             expected="N x 4 one-hot or N class ids", found=f"shape {lab.shape}")
        if y.size and ((y < 0) | (y > 3)).any():
            raise InputError("labels out of range", file=str(lp), key=sname, expected="0 .. 3",
                             found=f"min {y.min()}, max {y.max()}")
        names = [decode(x) if not (isinstance(x, np.ndarray) and x.ndim == 1 and x.size == 1)
                 else decode(x[0]) for x in names_raw]
        if len(names) != len(y):
            raise InputError("int2name and label counts differ", file=str(np_), key=sname,
                             expected=f"{len(y)} names", found=f"{len(names)} names")
        if len(y) == 0:
            raise InputError("empty split", file=str(lp), key=sname, expected="at least 1 sample",
                             found="0 samples")
        lens = {m: [] for m in MODALITIES}
        for m in MODALITIES:
            f = handles.get(m)
            for name in names:
                if name not in f:
                    raise InputError("utterance missing from the features", file=files[m],
                                     key=name, expected=f"a dataset per name in {np_.name}",
                                     found="missing")
                ds = f[name]
                if not isinstance(ds, h5py.Dataset):
                    raise InputError("utterance entry is not a dataset", file=files[m],
                                     key=name, expected="len x dim dataset",
                                     found=type(ds).__name__)
                shp = ds.shape
                if len(shp) == 1:
                    shp = (1, shp[0])
                if len(shp) != 2 or shp[1] == 0:
                    raise InputError("wrong feature shape", file=files[m], key=name,
                                     expected="len x dim with dim >= 1", found=f"shape {ds.shape}")
                if m in dims and shp[1] != dims[m]:
                    raise InputError("feature dims differ between utterances/splits",
                                     file=files[m], key=name,
                                     expected=f"dim {dims[m]} (as {dim_src[m]})",
                                     found=f"dim {shp[1]}")
                dims.setdefault(m, shp[1])
                dim_src.setdefault(m, f"{name} in split {split}")
                lens[m].append(shp[0])
                all_lengths[m].append(shp[0])
        split_lengths[split] = lens
        class_counts += np.bincount(y, minlength=4)[:4]
        split_data[split] = (names, y)
    max_len = dict(max_len or {})
    L = {m: int(min(max(all_lengths[m]), max_len.get(m, 10 ** 9))) for m in MODALITIES}
    for m in MODALITIES:
        if L[m] == 0:
            raise InputError("modality without time steps", file=files[m], key=f"features.{m}",
                             expected="at least 1 time step in some utterance",
                             found="0 steps in every utterance")
    truncated = {m: int(sum(n > L[m] for n in all_lengths[m])) for m in MODALITIES}
    for split, (names, y) in split_data.items():
        splits[split] = MminDataset(handles, names, y, L, dims)
        report_splits[split] = {"n": len(names), "key": spec["split_keys"][split],
                                "lengths": {m: length_stats(split_lengths[split][m])
                                            for m in MODALITIES}}
    classes = (card.get("label") or {}).get("classes", ["c0", "c1", "c2", "c3"])
    manifest = read_manifest(root)
    report = {
        "dataset": card.name, "path": str(root), "format": "mmin", "aligned": False,
        "fold": fold, "folds": folds, "files": list(files.values()), "splits": report_splits,
        "modalities": {m: {"dim": dims[m], "padded_length": L[m], "truncated": truncated[m]}
                       for m in MODALITIES},
        "labels": {"kind": "4-class", "min": 0, "max": 3,
                   "counts": {f"class_{k}": int(c) for k, c in enumerate(class_counts)},
                   "class_order_note": "order of the label files"},
        "nonfinite": {"total": 0, "audio_neg_inf": 0}, "audio_neg_inf_fixed": 0,
        "generated": manifest is not None, "warnings": [],
    }
    info = _info(card, "mmin", False, dims, L)
    info["classes"] = list(classes)
    return LoadedDataset(card.name, "mmin", str(root), splits, report, info)


# ----------------------------------------------------------------------------- entry

def load(card: Card, path: Path, format: str | None = None, *, fold=None, max_len=None,
         feature_types=None) -> LoadedDataset:
    fmt, target = locate(card, Path(path), format)
    if fmt == "mmin":
        return _load_mmin(card, Path(target), fold, max_len, feature_types)
    for key, value in zip(MMIN_OPTIONS, (fold, max_len, feature_types)):
        if value is not None:  # a pickle was found: it would change the run key, not the data
            raise InputError(f"option {key} is not read by the {fmt or 'pickle'} format found",
                             file=str(target), key=key, expected="only for format(s) ['mmin']",
                             found=repr(value))
    return _load_pickle_format(card, Path(target), fmt)


def deep_check(ld: LoadedDataset) -> dict:
    """Read every item that is read lazily (MMIN h5 features); pickles are checked at load."""
    out = {"items_read": 0}
    if ld.format != "mmin":
        return out
    for split, ds in ld.splits.items():
        for i in range(len(ds)):
            for m in MODALITIES:
                ds.read(i, m)
            out["items_read"] += 1
    return out
