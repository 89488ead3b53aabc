"""The adapter variants the trainer makes for SD1.5, configured as the authors' training scripts do.

- ``base``: the pooled image embedding -> ``LinearProjection`` -> 4 tokens (``tutorial_train.py``);
- ``plus``: the encoder's penultimate hidden states -> ``Resampler`` (width = the UNet's cross-attention
  width, depth 4, 12 heads of 64, 16 queries, FF x4) -> 16 tokens (``tutorial_train_plus.py``);
- ``plus-face``: the plus architecture trained on face crops; only the name and metadata differ;
- ``full-face``: the penultimate hidden states -> ``MLPProjection`` -> one token per hidden state.
"""
from __future__ import annotations

from ipadapter.architecture import SD15
from ipadapter.checkpoint import AdapterSpec

VARIANTS = ("base", "plus", "plus-face", "full-face")
DEFAULT_TOKENS = {"base": 4, "plus": 16, "plus-face": 16, "full-face": None}
PLUS_RESAMPLER = {"depth": 4, "dim_head": 64, "heads": 12, "ff_mult": 4}


def encoder_input(variant: str) -> str:
    """What the projection reads: ``image_embeds`` (pooled, [B, D]) or ``penultimate`` ([B, tokens, width])."""
    return "image_embeds" if variant == "base" else "penultimate"


def adapter_spec(variant: str, num_tokens: int | None, embed_dim: int, hidden_width: int, unet) -> AdapterSpec:
    """The architecture of ``variant`` for ``unet`` and an encoder of the given output widths."""
    cross, base_width = unet.config.cross_attention_dim, unet.config.block_out_channels[0]
    tokens = num_tokens or DEFAULT_TOKENS[variant]
    if variant == "base":
        return AdapterSpec("base", tokens, cross, "image_embeds", embed_dim, base_width, architecture=SD15)
    if variant == "full-face":
        return AdapterSpec("full-face", None, cross, "penultimate", hidden_width, base_width, architecture=SD15)
    return AdapterSpec("plus", tokens, cross, "penultimate", hidden_width, base_width, {"dim": cross, **PLUS_RESAMPLER}, SD15)


def export_name(variant: str, step: int) -> str:
    """``ip-adapter_sd15_stepNNNNNNNN`` (base), ``ip-adapter-plus_sd15_step...``, as the released files are named."""
    prefix = "ip-adapter" if variant == "base" else f"ip-adapter-{variant}"
    return f"{prefix}_sd15_step{step:08d}"
