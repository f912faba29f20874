"""Generators: small, deterministic data sets written in each dataset's REAL on-disk format,
so that generated data goes through the same loaders as real data.

Planted signal: each sample has per-modality token latents z_m[t] (r-dim,
r = latent_dim) and features x_m[t] = P_m z_m[t] + small noise, where the projections P_m,
the coefficient vectors a_m and the word embeddings are derived from (family, world_seed)
only. The label is built from

    s = [ sum_t prod_{m in K} <a_m, z_m[t]> / sqrt(len)      (order-k interaction)
          + w * sum_m sum_t <b_m, z_m[t]> / sqrt(len * M) ] / sqrt(1 + w^2)
        + noise * N(0, 1)

over aligned positions t, where K = the first `interaction_order` modalities (experts)
of the dataset. MOSI / MOSEI: label = clip(1.5 s, -3, 3). IEMOCAP: 4 heads s_c, class =
argmax. Food-101: n_classes heads over (title word, image patch) pairs, class = argmax;
images are tiny JPEGs whose 4x4 patches carry the image latents as colours; title words
carry the text latents. A class's heads are those of its index in FOOD_CLASSES, so a dish
means the same in every set of the family; the two-tower pre-training source (recipes) takes
other dishes than Food-101's (first_class), hence other heads over the same latents. MSR-VTT / HowTo100M: a caption meaning vector
c = sum_t prod_{e in K} (A_e z_e[t]) (+ unimodal terms), caption words sampled from
softmax(sharpness * <word embedding, c + noise>) so retrieval needs the expert interaction.

Datasets of one family share the world (same seed-derived P_m, a_m, embeddings), so the
pre-training stand-ins (mosei for mosi / iemocap, howto100m for msrvtt) help downstream.
"""
from __future__ import annotations

import csv
import json
import math
import pickle
import zlib
from pathlib import Path

import numpy as np

from harness.errors import InputError

from ._common import MANIFEST, AtomicDir, check_replaceable
from .cards import load_card

GENERATOR_VERSION = 1
SENT_MODS = ("text", "audio", "vision")
COMMON_OPTS = {"world_seed": None, "unimodal_weight": 0.3, "interaction_scope": "aligned"}
SCOPES = ("aligned", "pooled")
FAMILY_OPTS = {
    "sentiment": {"latent_dim": 4, "text": 32, "audio": 8, "vision": 12, "vocab_size": 64, "frames_per_word": 2,
                  "n_folds": 1, "audio_neg_inf": True},
    "food101": {"latent_dim": 4, "n_classes": 5, "first_class": 0, "image_size": 16, "patch": 4,
                "vocab_size": 48, "quirk_fraction": 0.15},
    "video": {"latent_dim": 8, "vocab_size": 64, "n_captions": 5, "missing_rate": 0.2, "nan_rate": 0.1,
              "caption_sharpness": 2.0,
              "s3d": 16, "vggish": 8, "face": 8, "rgb": 16, "speech": 8, "ocr": 8, "scene": 16},
}

SENT_WORDS = (
    "good bad great terrible love hate movie film story actor plot funny boring amazing awful "
    "really very not quite just like liked enjoyed hated acting music scene ending character "
    "best worst fine okay nice poor strong weak happy sad angry calm loud quiet slow fast "
    "beautiful ugly smart dumb fresh old new classic perfect mess brilliant dull exciting "
    "tense sweet bitter warm cold dark bright simple"
).split()
FOOD_WORDS = (
    "fresh grilled spicy sweet homemade crispy baked fried roasted creamy easy quick classic "
    "healthy vegan chicken beef pork cheese chocolate lemon garlic tomato potato rice salad "
    "soup cake bread pie sauce butter honey apple cream egg fish shrimp noodle curry bean "
    "mushroom onion pepper ginger vanilla berry corn"
).split()
FOOD_CLASSES = (
    "apple_pie baby_back_ribs baklava beef_carpaccio beef_tartare beet_salad beignets bibimbap "
    "bread_pudding breakfast_burrito bruschetta caesar_salad cannoli caprese_salad carrot_cake "
    "ceviche cheesecake cheese_plate chicken_curry chicken_quesadilla"
).split()
VIDEO_WORDS = (
    "man woman person dog cat car ball guitar song kitchen food cooking playing talking "
    "running dancing singing driving walking eating game video news street room water "
    "beach field stage crowd team player child girl boy people music show cartoon animal "
    "horse bike road city house table phone computer screen camera red blue green black "
    "white big small fast slow outside inside night day sport"
).split()


def _rng(seed: int, *tags) -> np.random.Generator:
    return np.random.default_rng([int(seed)] + [zlib.crc32(str(t).encode()) for t in tags])


class World:
    """Seed-derived latent directions shared by all datasets of a family."""

    def __init__(self, family: str, seed: int, r: int):
        self.family, self.seed, self.r = family, int(seed), int(r)

    def proj(self, name: str, dim: int) -> np.ndarray:          # dim x r (prefix-stable)
        return _rng(self.seed, self.family, "proj", name).standard_normal((dim, self.r)) \
            / math.sqrt(self.r)

    def coef(self, name: str, head, dim: int | None = None) -> np.ndarray:
        v = _rng(self.seed, self.family, "coef", name, head).standard_normal(dim or self.r)
        return v / np.linalg.norm(v)

    def vocab(self, V: int) -> np.ndarray:                      # V x r (prefix-stable)
        return _rng(self.seed, self.family, "vocab").standard_normal((V, self.r))

    def mixing(self, name: str) -> np.ndarray:                  # r x r orthogonal
        q, _ = np.linalg.qr(_rng(self.seed, self.family, "mix", name)
                            .standard_normal((self.r, self.r)))
        return q


# ----------------------------------------------------------------------------- validation

def _bad(key, expected, found, msg="invalid generator argument"):
    """A bad argument of ``generate``: no file (``mmpetl data`` names params.yaml's generate.<dataset>)."""
    return InputError(msg, key=key, expected=expected, found=found)


def _int(key, v, lo, hi=None):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo or (hi is not None and v > hi):
        raise _bad(key, f"an integer in [{lo}, {hi if hi is not None else 'inf'}]", repr(v))
    return int(v)


def _float(key, v, lo, hi=None):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
            or v < lo or (hi is not None and v > hi):
        raise _bad(key, f"a finite number in [{lo}, {hi if hi is not None else 'inf'}]", repr(v))
    return float(v)


def generate(dataset: str, out_dir=None, seed: int = 0, n_train: int | None = None,
             n_valid: int | None = None, n_test: int | None = None, seq_len: int | None = None,
             interaction_order: int = 2, noise: float = 0.1, format: str | None = None,
             **options) -> dict:
    """Write a generated `dataset` into `out_dir` (default: the card's generated_path) in one of its real formats (default: the
    card's generate.default_format) and return the manifest (also written to
    out_dir/generated.json). Deterministic in (seed, arguments). Options: per-modality /
    per-expert dims (text=32, audio=8, vision=12; s3d=16, ...), latent_dim, world_seed,
    unimodal_weight, vocab_size, and per family: frames_per_word, n_folds, audio_neg_inf
    (sentiment); n_classes, first_class, image_size, patch, quirk_fraction (food101); n_captions,
    missing_rate, nan_rate, caption_sharpness (video). Validates everything before writing;
    writes atomically (a failure leaves nothing behind)."""
    card = load_card(dataset)
    fam = card.family
    if fam not in FAMILY_OPTS:
        raise _bad("family", sorted(FAMILY_OPTS), fam, f"no generator for the family of {dataset}")
    gen = card.get("generate") or {}
    fmts = gen.get("formats", list(card.formats))
    fmt = format or gen.get("default_format") or fmts[0]
    if fmt not in fmts:
        raise _bad("format", fmts, fmt, f"no {dataset} generator for this format")
    seed = _int("seed", seed, 0)
    d = card.generator_defaults
    n_train = _int("n_train", d.get("n_train") if n_train is None else n_train, 2)
    n_valid = _int("n_valid", d.get("n_valid") if n_valid is None else n_valid, 1)
    if "test" not in card.splits:
        if n_test not in (None, 0):
            raise _bad("n_test", f"0 or None ({dataset} has splits {', '.join(card.splits)})",
                       n_test)
        n_test = 0
    else:
        n_test = _int("n_test", d.get("n_test") if n_test is None else n_test, 1)
    seq_len = _int("seq_len", d.get("seq_len") if seq_len is None else seq_len, 2, 512)
    noise = _float("noise", noise, 0.0, 100.0)
    if gen.get("planted"):  # a planted-answer task (harness.data.planted)
        from .load import resolve_path
        from .planted import generate_planted
        target = Path(out_dir) if out_dir is not None else resolve_path(card, None, generated=True)
        return generate_planted(card, target, seed, {"train": n_train, "valid": n_valid, "test": n_test},
                                seq_len, noise, options)
    opts = {**COMMON_OPTS, **FAMILY_OPTS[fam]}
    if fam == "video":
        experts = list(card.get("experts"))
        for e in list(opts):
            if e in FAMILY_OPTS["video"] and e in ("s3d", "vggish", "face", "rgb", "speech",
                                                   "ocr", "scene") and e not in experts:
                del opts[e]
    for k in options:
        if k not in opts:
            named = ["n_train", "n_valid", "n_test", "seq_len", "interaction_order", "noise", "format"]
            raise _bad(k, f"one of {sorted([*named, *opts])}", repr(k),
                       f"unknown option for the {dataset} generator")
    opts.update(options)
    opts["latent_dim"] = _int("latent_dim", opts["latent_dim"], 1, 256)
    opts["world_seed"] = seed if opts["world_seed"] is None else _int("world_seed", opts["world_seed"], 0)
    opts["unimodal_weight"] = _float("unimodal_weight", opts["unimodal_weight"], 0.0, 100.0)
    if opts["interaction_scope"] not in SCOPES:
        raise _bad("interaction_scope", SCOPES, opts["interaction_scope"])
    n_mods = {"sentiment": 3, "food101": 2, "video": len(card.get("experts") or {})}[fam]
    k = _int("interaction_order", interaction_order, 1, n_mods)
    if out_dir is None:
        from .load import resolve_path
        out_dir = resolve_path(card, None, generated=True)
    out_dir = Path(out_dir)
    check_replaceable(out_dir)
    sizes = {"train": n_train, "valid": n_valid, "test": n_test}
    writer = _check_family_options(fam, card, opts)
    manifest = {
        "generator": "harness.data.generate", "generator_version": GENERATOR_VERSION,
        "dataset": dataset, "format": fmt, "seed": seed, "sizes": sizes, "seq_len": seq_len,
        "interaction_order": k, "noise": noise,
        "options": {kk: (v if not isinstance(v, np.generic) else v.item()) for kk, v in opts.items()},
        "note": "generated data: NOT comparable to the paper's numbers",
    }
    with AtomicDir(out_dir) as tmp:
        writer(card, tmp, fmt, seed, sizes, seq_len, k, noise, opts, manifest)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return {**manifest, "path": str(out_dir)}


# ----------------------------------------------------------------------------- helpers

def _check_family_options(fam: str, card, opts: dict):
    """Check (in place, as integers / floats in range) the options of family ``fam``; returns the
    family's writer."""
    if fam == "sentiment":
        for m in SENT_MODS:
            opts[m] = _int(m, opts[m], 1, 100000)
        opts["vocab_size"] = _int("vocab_size", opts["vocab_size"], 2, len(SENT_WORDS))
        opts["frames_per_word"] = _int("frames_per_word", opts["frames_per_word"], 1, 64)
        opts["n_folds"] = _int("n_folds", opts["n_folds"], 1, 20)
        return _gen_sentiment
    elif fam == "food101":
        opts["n_classes"] = _int("n_classes", opts["n_classes"], 2, len(FOOD_CLASSES))
        opts["first_class"] = _int("first_class", opts["first_class"], 0,
                                   len(FOOD_CLASSES) - opts["n_classes"])
        opts["patch"] = _int("patch", opts["patch"], 1, 64)
        opts["image_size"] = _int("image_size", opts["image_size"], opts["patch"], 1024)
        if opts["image_size"] % opts["patch"]:
            raise _bad("image_size", f"a multiple of patch={opts['patch']}", opts["image_size"])
        opts["vocab_size"] = _int("vocab_size", opts["vocab_size"], 2, len(FOOD_WORDS))
        opts["quirk_fraction"] = _float("quirk_fraction", opts["quirk_fraction"], 0.0, 1.0)
        return _gen_food
    else:
        for e in card.get("experts"):
            opts[e] = _int(e, opts[e], 1, 100000)
        opts["vocab_size"] = _int("vocab_size", opts["vocab_size"], 2, len(VIDEO_WORDS))
        opts["n_captions"] = _int("n_captions", opts["n_captions"], 1, 100)
        opts["missing_rate"] = _float("missing_rate", opts["missing_rate"], 0.0, 1.0)
        opts["nan_rate"] = _float("nan_rate", opts["nan_rate"], 0.0, 1.0)
        if opts["missing_rate"] + opts["nan_rate"] > 1:
            raise _bad("nan_rate", "missing_rate + nan_rate <= 1",
                       opts["missing_rate"] + opts["nan_rate"])
        opts["caption_sharpness"] = _float("caption_sharpness", opts["caption_sharpness"], 0.0, 100.0)
        return _gen_video



def _split_slices(sizes: dict) -> dict:
    out, start = {}, 0
    for s in ("train", "valid", "test"):
        out[s] = slice(start, start + sizes[s])
        start += sizes[s]
    return out


def _save_pickle(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=4)


def _interaction(world: World, z: dict, valid: np.ndarray, K, mods, head, w,
                 scope: str = "aligned") -> np.ndarray:
    """Order-|K| token-level interaction + unimodal terms, unit scale. z[m]: N x L x r.

    scope "aligned": sum_t prod_m <a_m, z_m[t]> (tokens at the same position interact);
    "pooled": prod_m sum_t <a_m, z_m[t]> (every token of one modality with every token of the
    others: the product of per-modality token sums, the function class of Wander's Eq. 13)."""
    n = np.maximum(valid.sum(1), 1)
    if scope == "aligned":
        inter = np.ones(valid.shape)
        for m in K:
            inter = inter * (z[m] @ world.coef(m, head))
        inter = (inter * valid).sum(1) / np.sqrt(n)
    else:
        inter = np.ones(valid.shape[0])
        for m in K:
            inter = inter * ((z[m] @ world.coef(m, head)) * valid).sum(1) / np.sqrt(n)
    uni = np.zeros(valid.shape[0])
    for m in mods:
        uni += ((z[m] @ world.coef(f"uni_{m}", head)) * valid).sum(1) / np.sqrt(n)
    uni /= math.sqrt(len(mods))
    return (inter + w * uni) / math.sqrt(1 + w * w)


# ----------------------------------------------------------------------------- sentiment

def _gen_sentiment(card, out: Path, fmt, seed, sizes, L, k, noise, opts, manifest):
    """Write the sentiment set (MOSI, MOSEI, IEMOCAP layouts) in format ``fmt`` under ``out``. Long because it draws from one random
    stream in a fixed order, and the generated bytes depend on that order: it reads top to
    bottom as the draws happen."""
    name = card.name
    r, V, fpw = opts["latent_dim"], opts["vocab_size"], opts["frames_per_word"]
    world = World("sentiment", opts["world_seed"], r)
    rng = _rng(seed, name, "data")
    N = sum(sizes.values())
    unaligned = fmt in ("mult_noalign", "mmsa_unaligned", "mmin")
    words = rng.integers(0, V, size=(N, L))
    lengths = (rng.integers(max(2, L // 2), L + 1, size=N) if unaligned
               else np.full(N, L, dtype=np.int64))
    valid = np.arange(L)[None, :] < lengths[:, None]
    E = world.vocab(V)
    z = {"text": E[words], "audio": rng.standard_normal((N, L, r)),
         "vision": rng.standard_normal((N, L, r))}
    K = SENT_MODS[:k]
    iemocap = name == "iemocap"
    heads = 4 if iemocap else 1
    s = np.stack([_interaction(world, z, valid, K, SENT_MODS, h, opts["unimodal_weight"],
                               opts["interaction_scope"])
                  for h in range(heads)], 1)
    s = s + noise * rng.standard_normal(s.shape)
    if iemocap:
        cls = s.argmax(1).astype(np.int64)
    else:
        y = np.clip(1.5 * s[:, 0], -3.0, 3.0).astype(np.float32)
    feats, flen = {}, {}
    for m in SENT_MODS:
        D = opts[m]
        P = world.proj(m, D)
        if m == "text" or not unaligned:
            zz, vv, ll = z[m], valid, lengths
        else:
            zz = np.repeat(z[m], fpw, axis=1) + 0.3 * rng.standard_normal((N, L * fpw, r))
            vv, ll = np.repeat(valid, fpw, axis=1), lengths * fpw
        x = zz @ P.T + 0.05 * rng.standard_normal(zz.shape[:2] + (D,))
        x[~vv] = 0.0
        feats[m] = x.astype(np.float32)
        flen[m] = ll.astype(np.int64)
    quirks = {"audio_neg_inf": 0}
    if fmt.startswith("mult") and opts["audio_neg_inf"]:
        n_inf = max(1, N // 50)
        who = rng.choice(N, size=n_inf, replace=False)
        for n in who:
            t = int(rng.integers(0, flen["audio"][n]))
            j = int(rng.integers(0, opts["audio"]))
            feats["audio"][n, t, j] = -np.inf
        quirks["audio_neg_inf"] = int(n_inf)
    sl = _split_slices(sizes)
    vocab = SENT_WORDS[:V]
    raw_text = [" ".join(vocab[w] for w in words[n, :lengths[n]]) for n in range(N)]
    manifest.update(dims={m: opts[m] for m in SENT_MODS}, vocab=vocab, quirks=quirks,
                    interaction_modalities=list(K),
                    lengths={m: int(feats[m].shape[1]) for m in SENT_MODS})
    if iemocap:
        manifest["classes"] = list(card.get("label")["classes"])
    spec = card.formats[fmt]
    if fmt in ("mult", "mult_noalign"):
        data = {}
        for split, key in spec["split_keys"].items():
            idx = sl[split]
            d = {m: feats[m][idx] for m in SENT_MODS}
            if iemocap:
                c = cls[idx]
                lab = np.zeros((len(c), 4, 2), dtype=np.float32)
                lab[:, :, 0] = 1.0
                lab[np.arange(len(c)), c, 0] = 0.0
                lab[np.arange(len(c)), c, 1] = 1.0
                d["labels"] = lab
            else:
                d["labels"] = y[idx].reshape(-1, 1, 1)
                ns = np.arange(N)[idx]
                d["id"] = np.array([[f"gen{n // 4:05d}".encode(), str(n % 4).encode(),
                                     str(n).encode()] for n in ns], dtype="S16")
            data[key] = d
        _save_pickle(out / spec["files"][0], data)
    elif fmt in ("mmsa_aligned", "mmsa_unaligned"):
        data = {}
        for split, key in spec["split_keys"].items():
            idx = sl[split]
            ns = np.arange(N)[idx]
            n = len(ns)
            tb = np.zeros((n, 3, L), dtype=np.int64)
            tb[:, 0, :] = np.where(valid[idx], 1000 + words[idx], 0)
            tb[:, 1, :] = valid[idx]
            yy = y[idx]
            data[key] = {
                "raw_text": [raw_text[i] for i in ns],
                "audio": feats["audio"][idx], "vision": feats["vision"][idx],
                "id": [f"gen{i // 4:05d}$_${i % 4}" for i in ns],
                "text": feats["text"][idx], "text_bert": tb,
                "audio_lengths": flen["audio"][idx].copy(),
                "vision_lengths": flen["vision"][idx].copy(),
                "annotations": ["Positive" if v > 0 else "Negative" if v < 0 else "Neutral"
                                for v in yy],
                "classification_labels": np.sign(yy).astype(np.float32) + 1.0,
                "regression_labels": yy,
            }
        _save_pickle(out / spec["files"][0], data)
    elif fmt == "mmin":
        _write_mmin(out, spec, feats, flen, cls, sl, opts, seed)
    else:  # pragma: no cover - guarded by the card's generate.formats
        raise _bad("format", list(card.formats), fmt)


def _write_mmin(out: Path, spec, feats, flen, cls, sl, opts, seed):
    import h5py
    N = len(cls)
    names = [f"Ses0{1 + n % 5}{'FM'[n % 2]}_gen_{n:05d}" for n in range(N)]
    prefs = spec.get("preferred_features", {})
    for m, sub in spec["modality_dirs"].items():
        (out / sub).mkdir(parents=True, exist_ok=True)
        with h5py.File(out / sub / f"{prefs.get(m, m)}.h5", "w") as f:
            for n in range(N):
                f.create_dataset(names[n], data=feats[m][n, :flen[m][n]], track_times=False)
    rng = _rng(seed, "iemocap", "folds")
    onehot = np.eye(4, dtype=np.float32)[cls]
    for fold in range(1, opts["n_folds"] + 1):
        order = np.arange(N) if fold == 1 else rng.permutation(N)
        d = out / "target" / str(fold)
        d.mkdir(parents=True, exist_ok=True)
        for split, sname in spec["split_keys"].items():
            idx = order[sl[split]]
            np.save(d / f"{sname}_label.npy", onehot[idx])
            np.save(d / f"{sname}_int2name.npy",
                    np.array([[names[i].encode()] for i in idx], dtype="S32"))


# ----------------------------------------------------------------------------- food101

def _gen_food(card, out: Path, fmt, seed, sizes, L, k, noise, opts, manifest):
    """Write the Food-101 set (images and titles) in format ``fmt`` under ``out``. Long because it draws from one random
    stream in a fixed order, and the generated bytes depend on that order: it reads top to
    bottom as the draws happen."""
    from PIL import Image
    r, V, C = opts["latent_dim"], opts["vocab_size"], opts["n_classes"]
    heads = range(opts["first_class"], opts["first_class"] + C)   # FOOD_CLASSES indices
    S, p = opts["image_size"], opts["patch"]
    g = S // p
    n_patch = g * g
    T = min(L, n_patch)
    world = World("food101", opts["world_seed"], r)
    rng = _rng(seed, card.name, "data")
    N = sum(sizes.values())
    words = rng.integers(0, V, size=(N, L))
    u = rng.uniform(-1.0, 1.0, size=(N, n_patch, 3))
    E = world.vocab(V)
    zt = E[words]                                   # N x L x r
    order = ("text", "image")[:k]
    w = opts["unimodal_weight"]
    scores = np.zeros((N, C))
    for i, c in enumerate(heads):
        terms = {"text": zt[:, :T] @ world.coef("text", c),
                 "image": math.sqrt(3) * (u[:, :T] @ world.coef("image", c, 3))}
        inter = np.ones((N, T))
        for m in order:
            inter = inter * terms[m]
        inter = inter.sum(1) / math.sqrt(T)
        uni = (zt @ world.coef("uni_text", c)).sum(1) / math.sqrt(L) + \
            math.sqrt(3) * (u @ world.coef("uni_image", c, 3)).sum(1) / math.sqrt(n_patch)
        scores[:, i] = (inter + w * uni / math.sqrt(2)) / math.sqrt(1 + w * w)
    scores += noise * rng.standard_normal(scores.shape)
    cls = scores.argmax(1)
    classes = [FOOD_CLASSES[c] for c in heads]
    vocab = FOOD_WORDS[:V]
    quirky = rng.random(N) < opts["quirk_fraction"]
    titles, tokens = [], []
    for n in range(N):
        ws = [vocab[i] for i in words[n]]
        tokens.append(ws)
        if quirky[n] and len(ws) >= 3:
            titles.append(f'{ws[0]}, "{ws[1]}" ' + " ".join(ws[2:]))
        else:
            titles.append(" ".join(ws))
    colours = np.round((u + 1.0) * 127.5).clip(0, 255).astype(np.uint8)   # N x n_patch x 3
    sl = _split_slices(sizes)
    # file-level split of samples: raw / cggm have no valid split (valid goes into train)
    if fmt == "mmbt":
        groups = {"train": ("train", sl["train"]), "dev": ("train", sl["valid"]),
                  "test": ("test", sl["test"])}
    else:
        groups = {"train": ("train", slice(0, sizes["train"] + sizes["valid"])),
                  "test": ("test", sl["test"])}
    if not sizes["test"]:  # a set without a test split (a pre-training source) writes no test file
        del groups["test"]
    recs: dict[str, list] = {}
    for gname, (img_split, idx) in groups.items():
        recs[gname] = []
        for n in range(N)[idx]:
            cname = classes[cls[n]]
            fname = f"{cname}_{n}.jpg"
            rel = Path("images") / img_split / cname / fname
            arr = colours[n].reshape(g, g, 3).repeat(p, 0).repeat(p, 1)
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr, "RGB").save(out / rel, format="JPEG", quality=95, subsampling=0)
            recs[gname].append((n, fname, rel.as_posix(), cname))
    if fmt == "raw":
        (out / "texts").mkdir(parents=True, exist_ok=True)
        for gname, rows in recs.items():
            with open(out / "texts" / f"{gname}_titles.csv", "w", newline="", encoding="utf-8") as f:
                wr = csv.writer(f, lineterminator="\n")
                for n, fname, rel, cname in rows:
                    wr.writerow([fname, titles[n], cname])
    elif fmt == "mmbt":
        for gname, rows in recs.items():
            with open(out / f"{gname}.jsonl", "w", encoding="utf-8") as f:
                for n, fname, rel, cname in rows:
                    f.write(json.dumps({"id": Path(fname).stem, "label": cname,
                                        "text": titles[n], "img": rel}) + "\n")
    elif fmt == "cggm":
        for gname, rows in recs.items():
            data = [{"id": Path(fname).stem, "text_tokens": tokens[n], "img_path": rel,
                     "label": cname} for n, fname, rel, cname in rows]
            (out / f"{gname}.json").write_text(json.dumps(data), encoding="utf-8")
    manifest.update(classes=classes, vocab=vocab, dims={"image": [3, S, S], "patch": p},
                    interaction_modalities=list(order),
                    quirks={"titles_with_comma_and_quotes": int(quirky.sum())},
                    class_counts={c: int((cls == i).sum()) for i, c in enumerate(classes)})


# ----------------------------------------------------------------------------- video

def _video_ids(dataset: str, N: int, rng) -> list[str]:
    if dataset == "msrvtt":
        return [f"video{i}" for i in range(N)]
    alpha = np.array(list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"))
    ids, seen = [], set()
    while len(ids) < N:
        v = "".join(rng.choice(alpha, 11))
        if v not in seen:
            seen.add(v)
            ids.append(v)
    return ids


def _gen_video(card, out: Path, fmt, seed, sizes, L, k, noise, opts, manifest):
    """Write the video set (per-video HDF5 files and split lists) in format ``fmt`` under ``out``. Long because it draws from one random
    stream in a fixed order, and the generated bytes depend on that order: it reads top to
    bottom as the draws happen."""
    import h5py
    from .msrvtt import video_path
    experts = list(card.get("experts"))
    required = {e for e, s in card.get("experts").items() if s.get("required")}
    r, V = opts["latent_dim"], opts["vocab_size"]
    world = World("video", opts["world_seed"], r)
    rng = _rng(seed, card.name, "data")
    N = sum(sizes.values())
    K = experts[:k]
    A = {e: world.mixing(e) for e in experts}
    Au = {e: world.mixing(f"uni_{e}") for e in experts}
    P = {e: world.proj(e, opts[e]) for e in experts}
    E = world.vocab(V)
    vocab = VIDEO_WORDS[:V]
    w = opts["unimodal_weight"]
    ids = _video_ids(card.name, N, rng)
    optional = [e for e in experts if e not in K and e not in required]
    missing_per_video, n_absent, n_nan = {}, 0, 0
    for i, vid in enumerate(ids):
        T = int(rng.integers(max(2, L // 2), L + 1))
        z = {e: rng.standard_normal((T, r)) for e in experts}
        inter = np.ones((T, r))
        for e in K:
            inter = inter * (z[e] @ A[e].T)
        c_int = inter.sum(0) / math.sqrt(T)
        c_uni = sum((z[e] @ Au[e].T).sum(0) for e in K) / math.sqrt(T * len(K))
        c = (c_int + w * c_uni) / math.sqrt(1 + w * w)
        status = {}
        for e in experts:
            status[e] = "present"
            if e in optional:
                x = rng.random()
                if x < opts["missing_rate"]:
                    status[e] = "absent"
                elif x < opts["missing_rate"] + opts["nan_rate"]:
                    status[e] = "nan"
        miss = [e for e in experts if status[e] != "present"]
        if miss:
            missing_per_video[vid] = miss
        n_absent += sum(status[e] == "absent" for e in experts)
        n_nan += sum(status[e] == "nan" for e in experts)
        path = video_path(out, vid)
        path.parent.mkdir(parents=True, exist_ok=True)
        times = np.stack([np.arange(T), np.arange(T) + 1], 1).astype(np.float32)
        with h5py.File(path, "w") as f:
            for e in experts:
                D = opts[e]
                x = (z[e] @ P[e].T + 0.05 * rng.standard_normal((T, D))).astype(np.float32)
                if status[e] == "absent":
                    continue
                if status[e] == "nan":
                    x = np.full((T, D), np.nan, dtype=np.float32)
                f.create_dataset(f"features.{e}", data=x, track_times=False)
                f.create_dataset(f"features_t.{e}", data=times, track_times=False)
            for j in range(opts["n_captions"]):
                n_words = int(rng.integers(5, 11))
                cj = c + noise * rng.standard_normal(r)
                logits = opts["caption_sharpness"] * (E @ cj) / math.sqrt(r)
                pr = np.exp(logits - logits.max())
                pr /= pr.sum()
                ws = rng.choice(V, size=n_words, p=pr)
                f.create_dataset(f"raw_captions.{j}",
                                 data=np.array([vocab[t].encode() for t in ws], dtype="S16"),
                                 track_times=False)
                f.create_dataset(f"raw_captions_t.{j}",
                                 data=np.stack([np.arange(n_words) * 0.5,
                                                np.arange(n_words) * 0.5 + 0.5], 1)
                                 .astype(np.float32), track_times=False)
    sl = _split_slices(sizes)
    groups = {s: ids[sl[s]] for s in ("train", "valid", "test")}

    def write(name, vids):
        (out / name).write_text("".join(v + "\n" for v in vids))

    if card.name == "msrvtt":
        write("train_list.txt", groups["train"])
        write("val_list.txt", groups["valid"])
        write("test_list.txt", groups["test"])
        write("train_list_jsfusion.txt", groups["train"] + groups["valid"])
        write("val_list_jsfusion.txt", groups["test"])
        write("train_list_miech.txt", groups["train"] + groups["valid"])
        write("test_list_miech.txt", groups["test"])
    else:
        write("train_list.txt", groups["train"])
        write("val_list.txt", groups["valid"])
    manifest.update(dims={e: opts[e] for e in experts}, vocab=vocab, experts=experts,
                    interaction_modalities=list(K),
                    quirks={"absent_experts": int(n_absent), "nan_filled_experts": int(n_nan)},
                    missing_experts_per_video=missing_per_video)
