"""The adapter variants, one table for the checkpoint reader, the trainer and the unified loader.

The tensors tell three projections apart (``Variant.projection``); light is a base adapter
and plus-face a plus one, told apart only by their names. FaceID variants will be rows here.
"""
from __future__ import annotations

from .schema import Variant

PLUS_RESAMPLER = dict(depth=4, dim_head=64, ff_mult=4)  # heads of 64: the head count follows the family's width

VARIANTS: tuple[Variant, ...] = (
    Variant("base", "base", "image_embeds", 4, "ip-adapter",
            description="the pooled image embedding -> Linear + LayerNorm -> 4 tokens"),
    Variant("light", "base", "image_embeds", 4, "ip-adapter", "_light", trainable=False,
            description="a base adapter trained to weigh the text prompt more"),
    Variant("plus", "plus", "penultimate", 16, "ip-adapter-plus", resampler=PLUS_RESAMPLER,
            description="the encoder's penultimate hidden states -> Resampler -> 16 tokens"),
    Variant("plus-face", "plus", "penultimate", 16, "ip-adapter-plus-face", resampler=PLUS_RESAMPLER,
            description="the plus architecture trained on face crops"),
    Variant("full-face", "full-face", "penultimate", None, "ip-adapter-full-face",
            description="the penultimate hidden states -> MLP -> one token per hidden state"),
    # DiT adapters: the projection kinds name their layouts; the token counts are read from the tensors
    Variant("xlabs", "base", "image_embeds", None, "ip_adapter", trainable=False, families=("flux",),
            layers="double blocks", layer_tensors=("to_k_ip.weight", "to_k_ip.bias", "to_v_ip.weight", "to_v_ip.bias"),
            description="XLabs: CLIP ViT-L/14 image_embeds -> Linear + LayerNorm -> 4 (v1) or 16 (v2) tokens, "
                        "on the double blocks"),
    Variant("instantx", "mlp", "image_embeds", 128, "ip-adapter", trainable=False, families=("flux",),
            description="InstantX: SigLIP pooled output -> MLP + LayerNorm -> 128 tokens, on every block"),
    Variant("instantx", "time-resampler", "penultimate", 64, "ip-adapter", trainable=False, families=("sd35",),
            resampler=dict(depth=4, dim_head=64, ff_mult=4),
            layer_tensors=("norm_ip.linear.weight", "norm_ip.linear.bias", "to_k_ip.weight", "to_v_ip.weight",
                           "norm_q.weight", "norm_k.weight", "norm_ip_k.weight"),
            description="InstantX: SigLIP penultimate hidden states -> timestep-conditioned Resampler -> 64 tokens"),
)

# The unified loader's presets: the variant and the image encoder of each.
PRESETS: dict[str, tuple[str, str]] = {
    "light": ("light", "vit-h"),
    "standard": ("base", "vit-h"),
    "vit-bigg": ("base", "vit-bigg"),
    "plus": ("plus", "vit-h"),
    "plus-face": ("plus-face", "vit-h"),
    "full-face": ("full-face", "vit-h"),
    "flux-xlabs": ("xlabs", "clip-l"),
    "flux-instantx": ("instantx", "siglip"),
    "sd35-instantx": ("instantx", "siglip"),
}
