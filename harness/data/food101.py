"""UPMC-Food101 loader (image + text classification).

Formats (names used by `format=`):
  raw    images/{split}/{class}/{file}.jpg + texts/{split}_titles.csv (no header; rows
         filename,title,label; read with the csv module, so quoted commas / quotes work;
         a row with unquoted commas is read as filename, title = middle fields, label)
  mmbt   {train,dev,test}.jsonl with id, label, text, img (relative path); dev -> "valid"
  cggm   {train,test}.json: list of {id, text_tokens, img_path, label}

Items (dicts): image (float32 3 x H x W in [0, 1], opened lazily in __getitem__, resized
to image_size x image_size when image_size is set), text (str), label (int64 class index
into info["classes"], the sorted class names of the train split), id (str), index (int64).
The decoded pixels are kept for the process while the file is unchanged (``_common.FILE_READS``):
a sweep worker's later runs on the same images read memory.
"""
from __future__ import annotations

import codecs
import csv
import io
import math
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import torch
from pydantic import Field
from torch.utils.data import Dataset

from harness.errors import InputError

from ._common import (FILE_READS, LoadedDataset, LoaderOptions, load_json, pick_format, read_manifest,
                      require_path, split_index)
from .cards import Card


# PIL modes of 16-bit or float pixels: Image.convert("RGB") clips them to 0..255 (a 16-bit PNG turns white)
WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


class ImageTextDataset(Dataset):
    """Records (image path, text, label, id); the image is opened only in __getitem__."""

    def __init__(self, records: list[tuple[str, str, int, str]], image_size: int | None = None):
        self.records = records
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.records)

    @property
    def labels(self) -> np.ndarray:
        return np.array([label for _, _, label, _ in self.records], dtype=np.int64)

    @property
    def ids(self) -> list[str]:
        return [rid for _, _, _, rid in self.records]

    def open_image(self, i: int):
        from PIL import Image, UnidentifiedImageError
        path, _, _, rid = self.records[i]
        try:
            with Image.open(path) as im:
                im.load()
                if im.mode in WIDE_MODES:  # convert("RGB") would clip them, not rescale
                    raise InputError("image of more than 8 bits per channel", file=path,
                                     key=f"id {rid}", expected="8 bits per channel (JPEG, 8-bit PNG)",
                                     found=f"PIL mode {im.mode}")
                return im.convert("RGB")
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError,
                SyntaxError) as e:  # a bomb: more pixels than PIL opens (Image.MAX_IMAGE_PIXELS x 2)
            raise InputError("unreadable image", file=path, key=f"id {rid}",
                             expected="a readable JPEG/PNG image",
                             found=f"{type(e).__name__}: {str(e)[:120]}") from None

    def pixels(self, i: int) -> torch.Tensor:
        """Image ``i``: float32 3 x H x W in [0, 1], resized to image_size x image_size if set."""
        im = self.open_image(i)
        if self.image_size:
            im = im.resize((self.image_size, self.image_size))
        arr = np.asarray(im, dtype=np.float32) / 255.0
        return torch.from_numpy(arr.transpose(2, 0, 1).copy())

    def __getitem__(self, i: int) -> dict:
        i = split_index(i, len(self.records), "samples")
        path, text, label, rid = self.records[i]
        # decoded once per process while the file is unchanged; a copy of the kept one
        image = FILE_READS.read(Path(path), ("image", self.image_size), lambda: self.pixels(i),
                                lambda pixels: pixels.nbytes).clone()
        return {"image": image, "text": text, "label": torch.tensor(label, dtype=torch.int64),
                "id": rid, "index": torch.tensor(i, dtype=torch.int64)}


# ----------------------------------------------------------------------------- layouts

def _describe(card: Card, fmt: str) -> str:
    return f"{fmt} ({', '.join(card.formats[fmt].get('files', []))})"


def _present(card: Card, root: Path, fmt: str) -> bool:
    return any((root / f).is_file() for f in card.formats[fmt].get("files", []))


def locate(card: Card, path: Path, forced: str | None) -> tuple[str, Path]:
    path = Path(path)
    if forced is not None:
        card.fmt(forced)
    require_path(path, "one of: " + "; ".join(_describe(card, f) for f in card.formats))
    root = path.parent if path.is_file() else path
    if path.is_file() and path.parent.name == "texts":
        root = path.parent.parent
    found = [(f, root) for f in card.formats if _present(card, root, f)]
    return pick_format(card, found, forced, root, lambda f: _describe(card, f))


def _require(file: Path, split: str) -> Path:
    if not file.is_file():
        raise InputError("missing split", file=str(file), key=split,
                         expected=f"{file.name} for split {split!r}", found="missing")
    return file


def _read_raw(root: Path, split: str, skey: str, stats: dict):
    f = _require(root / "texts" / f"{skey}_titles.csv", split)
    rows = []
    try:
        raw = f.read_bytes()
        utf16 = raw[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
        if utf16 or b"\0" in raw:
            raise InputError("not UTF-8 text (UTF-16?)", file=str(f), key="(whole file)",
                             expected="UTF-8 CSV rows filename,title,label",
                             found="a UTF-16 byte order mark" if utf16 else "NUL bytes")
        # utf-8-sig: a byte order mark is not part of the first file name
        table = list(csv.reader(io.StringIO(raw.decode("utf-8-sig", errors="replace"), newline="")))
    except (OSError, csv.Error) as e:
        raise InputError("cannot read CSV", file=str(f), key="(whole file)",
                         expected="CSV rows filename,title,label", found=str(e)) from None
    for lineno, row in enumerate(table, 1):
        if not row or all(not c.strip() for c in row):
            continue
        if lineno == 1 and [c.strip().lower() for c in row[:1]] in (["filename"], ["image"], ["img"]):
            stats["warnings"].append(f"{f.name}: first row looks like a header; skipped")
            continue
        if len(row) < 3:
            raise InputError("malformed row", file=str(f), key=f"line {lineno}",
                             expected="3 fields: filename,title,label", found=row)
        if len(row) > 3:
            stats["unquoted_comma_rows"] += 1
        fname, title, label = row[0].strip(), ",".join(row[1:-1]), row[-1].strip()
        if not fname or not label:
            raise InputError("empty filename or label", file=str(f), key=f"line {lineno}",
                             expected="filename,title,label", found=row)
        img = root / "images" / skey / label / fname
        rows.append((str(img), title, label, Path(fname).stem, f, f"line {lineno}"))
    return rows, f


def _read_mmbt(root: Path, split: str, skey: str, stats: dict):
    f = _require(root / f"{skey}.jsonl", split)
    rows = []
    for i, rec in enumerate(load_json(f, lines=True), 1):
        if not isinstance(rec, dict):
            raise InputError("record is not an object", file=str(f), key=f"line {i}",
                             expected="{id, label, text, img}", found=type(rec).__name__)
        for k in ("id", "label", "text", "img"):
            if k not in rec:
                raise InputError("missing key", file=str(f), key=f"line {i}.{k}",
                                 expected="id, label, text, img", found=sorted(rec))
        if not isinstance(rec["text"], str):
            raise InputError("text is not a string", file=str(f), key=f"line {i}.text",
                             expected="str", found=type(rec["text"]).__name__)
        rows.append((str(root / str(rec["img"])), rec["text"], str(rec["label"]),
                     str(rec["id"]), f, f"line {i}"))
    return rows, f


def _read_cggm(root: Path, split: str, skey: str, stats: dict):
    f = _require(root / f"{skey}.json", split)
    data = load_json(f)
    if not isinstance(data, list):
        raise InputError("json is not a list of records", file=str(f), key="(root)",
                         expected="[{id, text_tokens, img_path, label}, ...]",
                         found=type(data).__name__)
    rows = []
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise InputError("record is not an object", file=str(f), key=f"[{i}]",
                             expected="{id, text_tokens, img_path, label}",
                             found=type(rec).__name__)
        for k in ("id", "text_tokens", "img_path", "label"):
            if k not in rec:
                raise InputError("missing key", file=str(f), key=f"[{i}].{k}",
                                 expected="id, text_tokens, img_path, label", found=sorted(rec))
        toks = rec["text_tokens"]
        if not isinstance(toks, list) or not all(isinstance(t, str) for t in toks):
            raise InputError("text_tokens is not a list of words", file=str(f),
                             key=f"[{i}].text_tokens", expected="list of str",
                             found=type(toks).__name__)
        rows.append((str(root / str(rec["img_path"])), " ".join(toks), str(rec["label"]),
                     str(rec["id"]), f, f"[{i}]"))
    return rows, f


_READERS = {"raw": _read_raw, "mmbt": _read_mmbt, "cggm": _read_cggm}


class Options(LoaderOptions):
    """The keyword options of ``load``."""
    image_size: Optional[Annotated[int, Field(gt=0)]] = None  # resize to a square (pixels a side)
    # a stratified valid split carved from train when the format has none (0: none)
    valid_fraction: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)] = 0.0
    check_images_exist: bool = True


def load(card: Card, path: Path, format: str | None = None, *, image_size: int | None = None,
         valid_fraction: float = 0.0, check_images_exist: bool = True) -> LoadedDataset:
    fmt, root = locate(card, Path(path), format)
    spec = card.formats[fmt]
    stats = {"unquoted_comma_rows": 0, "warnings": []}
    raw_splits = {}
    files = []
    for split, skey in spec["split_keys"].items():
        rows, f = _READERS[fmt](root, split, skey, stats)
        files.append(str(f))
        if not rows:
            raise InputError("empty split", file=str(f), key=split, expected="at least 1 sample",
                             found="0 rows")
        raw_splits[split] = rows
    manifest = read_manifest(root)
    if manifest is not None and isinstance(manifest.get("classes"), list):
        classes = [str(c) for c in manifest["classes"]]       # generated: the full class list
    else:
        classes = sorted({r[2] for r in raw_splits["train"]})
    index = {c: k for k, c in enumerate(classes)}
    splits_rec: dict[str, list] = {}
    for split, rows in raw_splits.items():
        recs = []
        for img, text, label, rid, f, where in rows:
            if label not in index:
                raise InputError("label out of range (class not in train split)", file=str(f),
                                 key=where, expected=f"one of the {len(classes)} train classes",
                                 found=label)
            if check_images_exist and not Path(img).is_file():  # the list's row names it
                raise InputError("image file missing", file=str(f), key=where,
                                 expected=f"an image file at {img}",
                                 found="a folder" if Path(img).is_dir() else "missing")
            recs.append((img, text, index[label], rid))
        splits_rec[split] = recs
    if valid_fraction and "valid" not in splits_rec:
        train, valid = [], []
        by_class: dict[int, list] = {}
        for r in splits_rec["train"]:
            by_class.setdefault(r[2], []).append(r)
        for c in sorted(by_class):
            rs = by_class[c]
            k = int(math.ceil(valid_fraction * len(rs))) if len(rs) > 1 else 0
            train += rs[:len(rs) - k]
            valid += rs[len(rs) - k:]
        if not valid:
            raise InputError("valid_fraction carves an empty valid split",
                             file=str(raw_splits["train"][0][4]),
                             key="valid_fraction", expected="a valid split of at least 1 sample",
                             found=f"0 samples: each of the {len(by_class)} classes has one train "
                                   "sample, and a class with one train sample keeps it in train")
        splits_rec["train"], splits_rec["valid"] = train, valid
        stats["warnings"].append(f"valid split carved from train: last {valid_fraction:.0%} "
                                 f"of each class ({len(valid)} samples)")
    expected_classes = (card.get("label") or {}).get("num_classes")
    if manifest is None and expected_classes and len(classes) != expected_classes:
        stats["warnings"].append(f"{len(classes)} classes in train, card says {expected_classes}")
    splits = {s: ImageTextDataset(r, image_size) for s, r in splits_rec.items()}
    counts = {}
    for s, r in splits_rec.items():
        bc = np.bincount([x[2] for x in r], minlength=len(classes))
        counts[s] = {"n": len(r), "classes_present": int((bc > 0).sum())}
    report = {
        "dataset": card.name, "path": str(root), "format": fmt, "files": files,
        "splits": counts,
        "modalities": {"image": {"lazy": True, "image_size": image_size},
                       "text": {"kind": "string"}},
        "labels": {"kind": "class", "num_classes": len(classes), "min": 0,
                   "max": len(classes) - 1, "classes": classes},
        "unquoted_comma_rows": stats["unquoted_comma_rows"],
        "nonfinite": {"total": 0}, "audio_neg_inf_fixed": 0,
        "generated": manifest is not None, "warnings": stats["warnings"],
    }
    info = {"task": "classification", "modalities": ["image", "text"], "classes": classes,
            "num_classes": len(classes), "image_size": image_size, "label_kind": "class"}
    if manifest is not None:
        info["vocab"] = manifest.get("vocab")
    return LoadedDataset(card.name, fmt, str(root), splits, report, info)


def deep_check(ld: LoadedDataset) -> dict:
    """Open every image (unreadable -> InputError); report the range of image sizes."""
    ws, hs, n = [], [], 0
    for split, ds in ld.splits.items():
        for i in range(len(ds)):
            im = ds.open_image(i)
            ws.append(im.size[0])
            hs.append(im.size[1])
            n += 1
    return {"images_read": n, "image_width": {"min": min(ws), "max": max(ws)},
            "image_height": {"min": min(hs), "max": max(hs)}}
