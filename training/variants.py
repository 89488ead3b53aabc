"""The adapter variants the trainer makes (the trainable rows of ``ipadapter.registry``'s variant table),
configured per model family as the authors' training scripts do.

- ``base``: the pooled image embedding -> ``LinearProjection`` -> 4 tokens (``tutorial_train.py``,
  ``tutorial_train_sdxl.py``);
- ``plus``: the encoder's penultimate hidden states -> ``Resampler`` (the family's Resampler width; depth 4,
  heads of 64, 16 queries, FF x4) -> 16 tokens (``tutorial_train_plus.py``);
- ``plus-face``: the plus architecture trained on face crops; only the name and metadata differ;
- ``full-face``: the penultimate hidden states -> ``MLPProjection`` -> one token per hidden state.
"""
from __future__ import annotations

from ipadapter.adapter_file import AdapterSpec
from ipadapter.registry import (
    Family, encoder_by_id, encoder_of_widths, export_stem, family_names, family_of_processor_names, variant_by_name,
)

EMBEDDED_ENCODER_KIND = "vit-h"  # the embedded run's image encoder is a scaled-down ViT-H/14 (training.models)


def encoder_input(variant: str) -> str:
    """What the projection reads: ``image_embeds`` (pooled, [B, D]) or ``penultimate`` ([B, tokens, width])."""
    return variant_by_name(variant).encoder_input


def adapter_spec(variant: str, num_tokens: int | None, embed_dim: int, hidden_width: int, unet) -> AdapterSpec:
    """The architecture of ``variant`` for ``unet`` (its family read from its layers) and an encoder of the given
    output widths."""
    family = family_of_diffusers_unet(unet)
    row = variant_by_name(variant)
    cross, base_width = unet.config.cross_attention_dim, unet.config.block_out_channels[0]
    tokens = num_tokens or row.tokens
    encoder_width = embed_dim if row.encoder_input == "image_embeds" else hidden_width
    resampler = {}
    if row.projection == "plus":
        resampler = {"dim": family.resampler_width, "heads": family.resampler_width // row.resampler["dim_head"],
                     **row.resampler}
    return AdapterSpec(row.projection, tokens if row.tokens else None, cross, row.encoder_input, encoder_width,
                       base_width, resampler, family)


def family_of_diffusers_unet(unet) -> Family:
    family = family_of_processor_names(unet.attn_processors)
    if family is None:
        raise ValueError(f"the UNet's cross-attention layers are not those of {family_names(trainable=True)}")
    return family


def export_name(variant: str, step: int, family: Family, embed_dim: int) -> str:
    """``ip-adapter_sd15_stepNNNNNNNN``, ``ip-adapter-plus_sd15_step...``, ``ip-adapter_sdxl_vit-h_step...``: as the
    released files are named (the encoder is named when it is not the family's own). An encoder of no known width
    is a scaled-down copy (the embedded run's), named as the encoder whose layout it has."""
    encoder = encoder_of_widths(embed_dim=embed_dim) or encoder_by_id(EMBEDDED_ENCODER_KIND)
    return f"{export_stem(variant_by_name(variant), family, encoder)}_step{step:08d}"
