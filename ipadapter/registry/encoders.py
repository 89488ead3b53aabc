"""The image encoders that the families' adapters are trained on, one entry each."""
from __future__ import annotations

from .schema import ImageEncoderKind

VIT_H = ImageEncoderKind(
    id="vit-h", name="OpenCLIP ViT-H/14", embed_dim=1024, hidden_width=1280, layers=32, patch_size=14, head_width=80,
    file_tag="vit-h",
    file_stems=("clip-vit-h-14-laion2b-s32b-b79k", "vit-h-14-laion2b-s32b-b79k", "clip-vit-h-14", "vit-h-14",
                "models/image_encoder/model", "models/image_encoder/pytorch_model"),
)
VIT_BIGG = ImageEncoderKind(
    id="vit-bigg", name="OpenCLIP ViT-bigG/14", embed_dim=1280, hidden_width=1664, layers=48, patch_size=14,
    head_width=104, file_tag="vit-g",
    file_stems=("clip-vit-bigg-14-laion2b-39b-b160k", "vit-bigg-14-laion2b-39b-b160k", "clip-vit-bigg-14", "vit-bigg-14",
                "sdxl_models/image_encoder/model", "sdxl_models/image_encoder/pytorch_model"),
)

# The DiT adapters' encoders. OpenAI's CLIP ViT-L/14 (XLabs' Flux adapter): QuickGELU, which a renamed file
# without its config.json cannot tell; its widths pick this entry.
CLIP_L = ImageEncoderKind(
    id="clip-l", name="OpenAI CLIP ViT-L/14", embed_dim=768, hidden_width=1024, layers=24, patch_size=14, head_width=64,
    file_tag="vit-l", activation="quick_gelu",
    file_stems=("clip_vision_l", "clip-vit-large-patch14", "openai/clip-vit-large-patch14/model",
                "clip-vit-large-patch14/model"),
)
# SigLIP so400m (InstantX's Flux and SD3.5 adapters): no class token, a pooling head instead of a projection,
# so its image embedding is as wide as its hidden states.
SIGLIP = ImageEncoderKind(
    id="siglip", name="SigLIP so400m-patch14-384", embed_dim=1152, hidden_width=1152, layers=27, patch_size=14,
    head_width=72, file_tag="siglip", activation="gelu_pytorch_tanh", layout="siglip",
    file_stems=("sigclip_vision_patch14_384", "siglip-so400m-patch14-384", "siglip-so400m-patch14-384/model",
                "google/siglip-so400m-patch14-384/model"),
)

ENCODERS: tuple[ImageEncoderKind, ...] = (VIT_H, VIT_BIGG, CLIP_L, SIGLIP)
