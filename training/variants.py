"""The adapter variants the trainer makes, configured per model family as the authors' training scripts do.

- ``base``: the pooled image embedding -> ``LinearProjection`` -> 4 tokens (``tutorial_train.py``,
  ``tutorial_train_sdxl.py``);
- ``plus``: the encoder's penultimate hidden states -> ``Resampler`` (the family's plus width: 768 for SD1.5,
  1280 for SDXL; depth 4, heads of 64, 16 queries, FF x4) -> 16 tokens (``tutorial_train_plus.py``);
- ``plus-face``: the plus architecture trained on face crops; only the name and metadata differ;
- ``full-face``: the penultimate hidden states -> ``MLPProjection`` -> one token per hidden state.
"""
from __future__ import annotations

from ipadapter.architecture import Architecture, family_names, family_of_processor_names
from ipadapter.checkpoint import AdapterSpec

VARIANTS = ("base", "plus", "plus-face", "full-face")
DEFAULT_TOKENS = {"base": 4, "plus": 16, "plus-face": 16, "full-face": None}
PLUS_RESAMPLER = {"depth": 4, "dim_head": 64, "ff_mult": 4}
BIGG_EMBED_DIM = 1280  # OpenCLIP ViT-bigG/14's image embedding (SDXL's own encoder); ViT-H/14 gives 1024


def encoder_input(variant: str) -> str:
    """What the projection reads: ``image_embeds`` (pooled, [B, D]) or ``penultimate`` ([B, tokens, width])."""
    return "image_embeds" if variant == "base" else "penultimate"


def adapter_spec(variant: str, num_tokens: int | None, embed_dim: int, hidden_width: int, unet) -> AdapterSpec:
    """The architecture of ``variant`` for ``unet`` (its family read from its layers) and an encoder of the given
    output widths."""
    family = unet_family(unet)
    cross, base_width = unet.config.cross_attention_dim, unet.config.block_out_channels[0]
    tokens = num_tokens or DEFAULT_TOKENS[variant]
    if variant == "base":
        return AdapterSpec("base", tokens, cross, "image_embeds", embed_dim, base_width, architecture=family)
    if variant == "full-face":
        return AdapterSpec("full-face", None, cross, "penultimate", hidden_width, base_width, architecture=family)
    resampler = {"dim": family.plus_width, "heads": family.plus_width // PLUS_RESAMPLER["dim_head"], **PLUS_RESAMPLER}
    return AdapterSpec("plus", tokens, cross, "penultimate", hidden_width, base_width, resampler, family)


def unet_family(unet) -> Architecture:
    family = family_of_processor_names(unet.attn_processors)
    if family is None:
        raise ValueError(f"the UNet's cross-attention layers are not those of {family_names()}")
    return family


def export_name(variant: str, step: int, family: Architecture, embed_dim: int) -> str:
    """``ip-adapter_sd15_stepNNNNNNNN``, ``ip-adapter-plus_sd15_step...``, ``ip-adapter_sdxl_vit-h_step...``: as the
    released files are named (an SDXL adapter on another encoder than SDXL's own ViT-bigG/14 says ``_vit-h``)."""
    prefix = "ip-adapter" if variant == "base" else f"ip-adapter-{variant}"
    encoder = "_vit-h" if family.id == "sdxl" and embed_dim != BIGG_EMBED_DIM else ""
    return f"{prefix}_{family.id}{encoder}_step{step:08d}"
