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

ENCODERS: tuple[ImageEncoderKind, ...] = (VIT_H, VIT_BIGG)
