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

import dataclasses
import json
import math
import pickle
import zlib
from pathlib import Path

import numpy as np
import torch

from harness.backbones.late_fusion import LateFusionBackbone, LateFusionConfig
from harness.backbones.layers import fairseq_sinusoidal_table
from harness.errors import InputError
from harness.records import provenance_path, sha256_file

from ._common import MANIFEST, AtomicDir, check_replaceable

PLANTED_VERSION = 2
TASKS = ("unimodal", "cross", "depth")   # planted_null is the unimodal task
MODALITIES = ("text", "audio", "vision")
DEFAULT_OPTIONS = {"latent_dim": 4, "text": 32, "audio": 8, "vision": 12}
# the depth task's backbone: the tiny profile's late_fusion block (params.yaml
# profiles.tiny.late_fusion; tests/test_planted.py checks that they agree)
BACKBONE_OPTIONS = {"width": 64, "depth": 2, "heads": 8}
BACKBONE_FILE = "planted_backbone.pt"
# harness.checkpoints.FORMAT / FORMAT_VERSION (a layer above the data; tests/test_planted.py
# checks they agree and that harness.checkpoints reads the file)
CHECKPOINT_FORMAT, CHECKPOINT_FORMAT_VERSION = "mmpetl.pretrained_backbone", 1
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
    if task in ("unimodal", "depth"):
        return sum(signal.values()) / math.sqrt(len(MODALITIES))
    return math.prod(np.sign(signal[m]) for m in MODALITIES)


def lost_subspace(width: int, seq_len: int) -> tuple[list[int], np.ndarray]:
    """The residual channels S that the depth task's final LayerNorms zero (the last seq_len + 4)
    and the unit direction u in them that carries the signal, chosen with u . 1 = 0 and
    u . pos_S(t) = 0 at every position t = 1..seq_len (the sinusoidal rows the embedding adds), so
    that a token's channel mean and variance do not depend on the sign of the signal."""
    size = seq_len + 4   # seq_len + 1 constraints: a null space of >= 3 dimensions
    if size > width // 2:
        raise _bad("seq_len", f"at most {width // 2 - 4} for the depth task's width {width}",
                   seq_len)
    channels = list(range(width - size, width))
    positions = fairseq_sinusoidal_table(seq_len + 1, width)[1:, channels].double().numpy()
    _, singular, basis = np.linalg.svd(np.vstack([np.ones(size), positions]))
    null = basis[int((singular > singular[0] * 1e-10).sum()):]
    direction = null.T @ (null @ np.linspace(-1.0, 1.0, size))   # projector: basis-independent
    # rounded to float32, the backbone's precision: LAPACK's last bits differ between CPUs, and
    # the manifest that records u is part of the data's hash (every run key)
    return channels, (direction / np.linalg.norm(direction)).astype(np.float32)


def _write_provenance(path: Path) -> None:
    """The backbone's sha256 beside it, as pre-training records a checkpoint's: a run checks the
    bytes it loads (and does not warn that it cannot). Nothing else: the data stay deterministic."""
    document = {"checkpoint": path.name, "sha256": sha256_file(path),
                "made_by": "harness.data.planted: the depth task's drawn backbone, not pre-trained"}
    provenance_path(path).write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")


def planted_backbone(name: str, dims: dict, seq_len: int, seed: int, options: dict) -> dict:
    """The depth task's frozen late-fusion backbone as a checkpoint document (the format of
    ``harness.checkpoints``): random towers drawn from (seed, name), then cut in two blocks of
    residual channels, S (``lost_subspace``) and the rest R. Feature 0 (the signal) is embedded
    along u in S, the other features in R only; every frozen linear reads and writes within R,
    except one value channel of attention, which reads the u-component of the normed input and
    writes it back along u; the sub-layer norms keep gain 1 and bias 0 on S, the final norms have
    gain 0 and bias 0 on S. Flipping the sign of feature 0 then flips the S block and leaves R,
    every norm's statistics and so the final norms' output unchanged (docs/planted.md); channel 0,
    which the embedding's padding rule reads, is in R."""
    width, depth, heads = (_int(k, options[k], 1, 4096) for k in ("width", "depth", "heads"))
    if width % heads:
        raise _bad("heads", f"a divisor of width {width}", heads)
    config = LateFusionConfig(input_dims=dict(dims), seq_lens={m: seq_len for m in MODALITIES},
                              width=width, depth=depth, heads=heads)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(_rng(seed, name, "backbone").integers(2 ** 31)))
        backbone = LateFusionBackbone(config)
    channels, direction = lost_subspace(width, seq_len)
    lost, u = torch.tensor(channels), torch.tensor(direction, dtype=torch.float32)
    with torch.no_grad():
        for m in MODALITIES:
            embed = backbone.projections[m]            # Conv1d weight (width, D_m, 1)
            embed.weight[:, 0] = 0
            embed.weight[lost] = 0
            embed.weight[lost, 0, 0] = u
            embed.bias[lost] = 0
            for layer in backbone.encoders[m]:
                attn, ffn = layer.attn, layer.ffn
                for reader in (attn.q, attn.k, attn.v, ffn.fc1):
                    reader.weight[:, lost] = 0
                for writer in (attn.o, ffn.fc2):
                    writer.weight[lost] = 0
                    writer.bias[lost] = 0
                attn.v.weight[0] = 0                   # value channel 0: the signal path
                attn.v.weight[0, lost] = u
                attn.v.bias[0] = 0
                attn.o.weight[:, 0] = 0
                attn.o.weight[lost, 0] = u
                for norm in (layer.attn_norm, layer.ffn_norm):
                    norm.weight[lost] = 1
                    norm.bias[lost] = 0
            backbone.final_norms[m].weight[lost] = 0
            backbone.final_norms[m].bias[lost] = 0
    return {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_FORMAT_VERSION,
            "backbone": "late_fusion", "config": dataclasses.asdict(config),
            "state_dict": {k: v.detach().clone().contiguous()
                           for k, v in backbone.state_dict().items()},
            "source": name, "seed": int(seed), "vocab": None, "tokenizer": None,
            "planted": {"lost_channels": channels, "signal_direction": direction.tolist(),
                        "signal_value_channel": 0}}


def generate_planted(card, out_dir: Path, seed: int, sizes: dict, seq_len: int, noise: float,
                     options: dict) -> dict:
    """Write the planted task named by ``card``'s ``generate.planted`` into ``out_dir`` (MulT
    pickle, atomically) and return its manifest (also ``out_dir/generated.json``). ``options``:
    latent_dim, text, audio, vision (feature dims); the depth task also width, depth, heads (its
    backbone, ``BACKBONE_FILE`` beside the pickle). Deterministic in (seed, arguments)."""
    task = (card.get("generate") or {}).get("planted")
    if task not in TASKS:
        raise InputError("unknown planted task", file=card.file, key="generate.planted",
                         expected=list(TASKS), found=task)
    known = {**DEFAULT_OPTIONS, **(BACKBONE_OPTIONS if task == "depth" else {})}
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise _bad(unknown[0], sorted(known), unknown[0],
                   f"unknown option for the {card.name} generator")
    opts = {**known, **options}
    rank = _int("latent_dim", opts["latent_dim"], 1, 256)
    dims = {m: _int(m, opts[m], 1, 100000) for m in MODALITIES}
    spec = card.fmt("mult")
    check_replaceable(out_dir)
    backbone = (planted_backbone(card.name, dims, seq_len, seed, opts) if task == "depth"
                else None)   # before anything is written: a bad option writes nothing
    rng = _rng(seed, card.name, "data")
    n = sum(sizes.values())
    z = signal_latents(task, rng, n, seq_len, rank)
    score = planted_score(task, z) + noise * rng.standard_normal(n)
    labels = np.clip(LABEL_SCALE * score / math.sqrt(1 + noise * noise), -3.0, 3.0).astype(np.float32)
    features = {}
    for m in MODALITIES:   # the projections depend on the seed only: every task shares them
        projection = _rng(seed, "planted", "proj", m).standard_normal((dims[m], rank)) / math.sqrt(rank)
        if task == "depth":   # feature 0 holds the signal alone, the others the rest of z
            projection[0], projection[:, 0], projection[0, 0] = 0.0, 0.0, 1.0
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
    if backbone is not None:
        manifest["backbone"] = {"file": BACKBONE_FILE, **backbone["planted"]}
    with AtomicDir(Path(out_dir)) as tmp:
        with open(tmp / spec["files"][0], "wb") as f:
            pickle.dump(data, f, protocol=4)
        if backbone is not None:
            torch.save(backbone, tmp / BACKBONE_FILE)
            _write_provenance(tmp / BACKBONE_FILE)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return {**manifest, "path": str(out_dir)}
