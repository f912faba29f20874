"""Planted-answer tasks: generated late-fusion datasets whose right answer is known by construction
(docs/planted.md says what each one predicts and why).

Each task is a sentiment-family dataset written as the MulT word-aligned pickle of CMU-MOSI
(``<name>_data.pkl``: split -> text / audio / vision N x L x D, labels N x 1 x 1 in [-3, 3]), so it
goes through the same loader, backbone (``late_fusion``) and methods as MOSI. Per sample, modality
m and position t there is a latent z_m[t] ~ N(0, I_r); the features are x_m[t] = P_m z_m[t] + 0.05 e
with a seed-derived projection P_m (D_m x r). The label reads the SIGNAL coordinate z_m[t][0]
only, which is one value c_m ~ N(0, 1) per sample and modality, carried by every token
(z_m[t][0] = c_m for every t; the other coordinates vary from token to token). So token 0, which
the late-fusion head reads, holds the signal as well as any pooling of the sequence does.

    s = the task's score (below);  label = clip(1.5 (s + noise e) / sqrt(1 + noise^2), -3, 3)

- ``unimodal`` (dataset ``planted_null``): s = (c_text + c_audio + c_vision) / sqrt(3), a sum of
  unimodal features: what the frozen encoders hand the head is already enough. Here every token
  of a modality carries the same whole latent, so no pooling over the tokens can clean up what
  token 0 holds (with per-token variation in the other coordinates, Wander's pooling did:
  docs/planted.md, "Measured").
- ``cross`` (dataset ``planted_cross``): s = sign(c_text) sign(c_audio) sign(c_vision), the parity
  of the three signs: flipping one modality's sign flips the label, so the label is independent
  of any one modality and of any two (E[s | two of the c_m] = 0), and only a function of all
  three, multiplicative across modalities, predicts it; the sign of a product of per-modality
  projections (Wander's Eq. 13) is that function.
"""
from __future__ import annotations

import json
import math
import pickle
import zlib
from pathlib import Path

import numpy as np

from harness.errors import InputError

from ._common import MANIFEST, AtomicDir, check_replaceable

PLANTED_VERSION = 1
TASKS = ("unimodal", "cross")   # planted_null is the unimodal task
MODALITIES = ("text", "audio", "vision")
DEFAULT_OPTIONS = {"latent_dim": 4, "text": 32, "audio": 8, "vision": 12}
FEATURE_NOISE = 0.05   # std of the feature noise e in x = P z + e
LABEL_SCALE = 1.5      # label = clip(LABEL_SCALE * s, -3, 3), as the MOSI generator


def _rng(seed: int, *tags) -> np.random.Generator:
    return np.random.default_rng([int(seed)] + [zlib.crc32(str(t).encode()) for t in tags])


def _bad(key, expected, found, message="invalid planted-task argument"):
    return InputError(message, file="harness.data.planted", key=key, expected=expected, found=found)


def _int(key, value, low, high):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise _bad(key, f"an integer in [{low}, {high}]", repr(value))
    return int(value)


def signal_latents(task: str, rng: np.random.Generator, n: int, length: int, rank: int) -> dict:
    """{modality: z (n, length, rank)}: standard normal, except the signal coordinate z[..., 0],
    one value per sample and modality repeated over the positions; for ``unimodal`` the whole
    latent is repeated (every token of a modality is the same but for the feature noise)."""
    z = {m: rng.standard_normal((n, length, rank)) for m in MODALITIES}
    for m in MODALITIES:
        z[m][:, :, 0] = rng.standard_normal((n, 1))
        if task == "unimodal":
            z[m][:] = z[m][:, :1]
    return z


def planted_score(task: str, z: dict) -> np.ndarray:
    """The unit-variance score s of the module docstring from the latents (n,)."""
    signal = {m: z[m][:, 0, 0] for m in MODALITIES}
    if task == "unimodal":
        return sum(signal.values()) / math.sqrt(len(MODALITIES))
    return math.prod(np.sign(signal[m]) for m in MODALITIES)


def generate_planted(card, out_dir: Path, seed: int, sizes: dict, seq_len: int, noise: float,
                     options: dict) -> dict:
    """Write the planted task named by ``card``'s ``generate.planted`` into ``out_dir`` (MulT
    pickle, atomically) and return its manifest (also ``out_dir/generated.json``). ``options``:
    latent_dim, text, audio, vision (feature dims). Deterministic in (seed, arguments)."""
    task = (card.get("generate") or {}).get("planted")
    if task not in TASKS:
        raise InputError("unknown planted task", file=card.file, key="generate.planted",
                         expected=list(TASKS), found=task)
    unknown = sorted(set(options) - set(DEFAULT_OPTIONS))
    if unknown:
        raise _bad(unknown[0], sorted(DEFAULT_OPTIONS), unknown[0],
                   f"unknown option for the {card.name} generator")
    opts = {**DEFAULT_OPTIONS, **options}
    rank = _int("latent_dim", opts["latent_dim"], 1, 256)
    dims = {m: _int(m, opts[m], 1, 100000) for m in MODALITIES}
    spec = card.fmt("mult")
    check_replaceable(out_dir)
    rng = _rng(seed, card.name, "data")
    n = sum(sizes.values())
    z = signal_latents(task, rng, n, seq_len, rank)
    score = planted_score(task, z) + noise * rng.standard_normal(n)
    labels = np.clip(LABEL_SCALE * score / math.sqrt(1 + noise * noise), -3.0, 3.0).astype(np.float32)
    features = {}
    for m in MODALITIES:   # the projections depend on the seed only: every task shares them
        projection = _rng(seed, "planted", "proj", m).standard_normal((dims[m], rank)) / math.sqrt(rank)
        x = z[m] @ projection.T + FEATURE_NOISE * rng.standard_normal((n, seq_len, dims[m]))
        features[m] = x.astype(np.float32)
    data, start = {}, 0
    for split, key in spec["split_keys"].items():
        rows = slice(start, start + sizes[split])
        start += sizes[split]
        data[key] = {**{m: features[m][rows] for m in MODALITIES},
                     "labels": labels[rows].reshape(-1, 1, 1),
                     "id": np.array([[f"{card.name}{i:05d}".encode(), b"0", str(i).encode()]
                                     for i in range(n)[rows]], dtype="S24")}
    manifest = {
        "generator": "harness.data.planted", "generator_version": PLANTED_VERSION,
        "dataset": card.name, "planted": task, "format": "mult", "seed": int(seed),
        "sizes": sizes, "seq_len": seq_len, "noise": noise, "options": opts,
        "dims": dims, "label_std": float(labels.std()),
        "note": "generated planted-answer task: NOT comparable to any paper's numbers",
    }
    with AtomicDir(Path(out_dir)) as tmp:
        with open(tmp / spec["files"][0], "wb") as f:
            pickle.dump(data, f, protocol=4)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return {**manifest, "path": str(out_dir)}
