"""The image encoder: OpenCLIP's vision transformer, from the files users have.

Weights come from the user's file, never from a download: an OpenCLIP
checkpoint (``visual.*`` keys, a full CLIP state dict, or bare tower keys) or
the transformers ``CLIPVisionModelWithProjection`` format most ComfyUI users
have (``CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors``), converted in memory.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import NamedTuple

import open_clip
import torch
from torch import nn

from .files import read_weights
from .preprocess import preprocess

# Head width by tower width: it cannot be read from the tensors.
HEAD_WIDTHS = {1280: 80, 1664: 104}
KNOWN_TOWERS = {(1280, 32, 14): "OpenCLIP ViT-H/14", (1664, 48, 14): "OpenCLIP ViT-bigG/14"}


class EncoderFormatError(ValueError):
    """A file that is not a usable CLIP vision model; the message is one line."""


class EncoderOutput(NamedTuple):
    image_embeds: torch.Tensor  # [B, embed_dim]: the projected CLS token, not L2-normalised
    penultimate: torch.Tensor  # [B, tokens, width]: hidden states after the second-to-last block


class ImageEncoder(nn.Module):
    def __init__(self, visual: nn.Module, name: str | None = None):
        super().__init__()
        self.visual = visual.eval().requires_grad_(False)
        self.hidden_width = visual.conv1.weight.shape[0]
        self.embed_dim = visual.proj.shape[1]
        self.num_tokens = visual.positional_embedding.shape[0]
        self.patch_size = visual.conv1.weight.shape[-1]
        self.image_size = int(math.isqrt(self.num_tokens - 1)) * self.patch_size
        layers = len(visual.transformer.resblocks)
        self.name = name or KNOWN_TOWERS.get(
            (self.hidden_width, layers, self.patch_size),
            f"OpenCLIP ViT (width {self.hidden_width}, {layers} layers, patch {self.patch_size})",
        )

    # Not named ``device``/``dtype``: ComfyUI's ModelPatcher assigns ``model.device``.
    @property
    def parameter_dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    @property
    def parameter_device(self) -> torch.device:
        return self.visual.conv1.weight.device

    def encode(self, pixels: torch.Tensor) -> EncoderOutput:
        """Normalised pixels [B, 3, S, S] -> image embedding and penultimate hidden states, in one pass."""
        visual = self.visual
        x = visual.conv1(pixels.to(self.parameter_device, self.parameter_dtype))
        x = x.flatten(2).transpose(1, 2)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
        x = visual.ln_pre(x)
        batch_first = getattr(visual.transformer, "batch_first", True)
        if not batch_first:
            x = x.transpose(0, 1)
        blocks = visual.transformer.resblocks
        for block in blocks[:-1]:
            x = block(x)
        penultimate = x
        x = blocks[-1](x)
        if not batch_first:
            x, penultimate = x.transpose(0, 1), penultimate.transpose(0, 1)
        pooled = visual.ln_post(x[:, 0])
        return EncoderOutput(pooled @ visual.proj, penultimate)

    def encode_images(self, images: torch.Tensor, mode: str = "crop") -> EncoderOutput:
        """ComfyUI-style images [B, H, W, 3] in 0..1 -> encoder outputs."""
        return self.encode(preprocess(images, self.image_size, mode))

    def uncond_pixels(self, batch: int = 1) -> torch.Tensor:
        """The reference's unconditional input for plus adapters: an all-zero normalised image."""
        return torch.zeros(batch, 3, self.image_size, self.image_size, device=self.parameter_device, dtype=self.parameter_dtype)


def build_vision_tower(name: str = "ViT-H-14", **overrides) -> ImageEncoder:
    """OpenCLIP's vision tower with random weights (no download, no text tower).

    ``overrides`` change the config, e.g. ``width=64, layers=4, head_width=16,
    embed_dim=32`` for a scaled-down tower with the same layout.
    """
    config = open_clip.get_model_config(name)
    if config is None:
        raise ValueError(f"OpenCLIP has no model config '{name}'; expected a name like 'ViT-H-14'")
    embed_dim = overrides.pop("embed_dim", config["embed_dim"])
    vision_cfg = {**config["vision_cfg"], **overrides}
    visual = open_clip.model._build_vision_tower(embed_dim, vision_cfg)
    return ImageEncoder(visual)


def convert_transformers_to_open_clip(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers ``CLIPVisionModelWithProjection`` keys -> OpenCLIP vision tower keys."""
    prefix = "vision_model."
    tensors = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    converted = {
        "class_embedding": tensors["embeddings.class_embedding"],
        "conv1.weight": tensors["embeddings.patch_embedding.weight"],
        "positional_embedding": tensors["embeddings.position_embedding.weight"],
        "ln_pre.weight": tensors["pre_layrnorm.weight"],
        "ln_pre.bias": tensors["pre_layrnorm.bias"],
        "ln_post.weight": tensors["post_layernorm.weight"],
        "ln_post.bias": tensors["post_layernorm.bias"],
        "proj": state_dict["visual_projection.weight"].T.contiguous(),
    }
    renames = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
               "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    layers = sorted({int(m.group(1)) for k in tensors if (m := re.match(r"encoder\.layers\.(\d+)\.", k))})
    for i in layers:
        source, target = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for old, new in renames.items():
            for kind in ("weight", "bias"):
                converted[f"{target}{new}.{kind}"] = tensors[f"{source}{old}.{kind}"]
        for kind in ("weight", "bias"):
            converted[f"{target}attn.in_proj_{kind}"] = torch.cat(
                [tensors[f"{source}self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")]
            )
    return converted


def _tower_state_dict(state_dict: dict, source: str) -> dict[str, torch.Tensor]:
    """Bare OpenCLIP vision-tower keys from any of the accepted layouts."""
    if isinstance(state_dict.get("state_dict"), dict):
        state_dict = state_dict["state_dict"]
    keys = list(state_dict)
    if any(k.startswith("embeddings.patch_embedding") for k in keys):  # transformers without its prefix
        state_dict = {("" if k.startswith("visual_projection") else "vision_model.") + k: v for k, v in state_dict.items()}
        keys = list(state_dict)
    if "vision_model.embeddings.patch_embedding.weight" in state_dict:
        if "visual_projection.weight" not in state_dict:
            raise EncoderFormatError(
                f"'{source}' is a CLIP vision model without its projection (visual_projection.weight); "
                "expected CLIPVisionModelWithProjection weights"
            )
        try:
            return convert_transformers_to_open_clip(state_dict)
        except KeyError as missing:
            raise EncoderFormatError(f"'{source}' lacks {missing} of a transformers CLIP vision model") from None
    if "visual.conv1.weight" in state_dict:
        return {k[len("visual."):]: v for k, v in state_dict.items() if k.startswith("visual.")}
    if "conv1.weight" in state_dict:
        return dict(state_dict)
    found = ", ".join(f"'{k}'" for k in keys[:3]) or "nothing"
    text_only = any(k.startswith(("text_model.", "token_embedding", "transformer.resblocks")) for k in keys)
    what = "a CLIP text model without a vision tower" if text_only else "not a CLIP vision model"
    raise EncoderFormatError(
        f"'{source}' is {what} (found keys like {found}); "
        "expected an OpenCLIP ViT checkpoint or transformers CLIPVisionModelWithProjection weights"
    )


def encoder_from_state_dict(state_dict: dict, source: str = "<memory>", heads: int | None = None) -> ImageEncoder:
    tower = _tower_state_dict(state_dict, source)
    try:
        width, _, patch, _ = tower["conv1.weight"].shape
        tokens = tower["positional_embedding"].shape[0]
        embed_dim = tower["proj"].shape[1]
        layers = len({k.split(".")[2] for k in tower if k.startswith("transformer.resblocks.")})
        mlp_width = tower["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    except (KeyError, ValueError) as missing:
        raise EncoderFormatError(f"'{source}' lacks {missing} of an OpenCLIP vision tower") from None
    head_width = width // heads if heads else HEAD_WIDTHS.get(width, 64)
    vision_cfg = {
        "image_size": math.isqrt(tokens - 1) * patch, "layers": layers, "width": width,
        "head_width": head_width, "patch_size": patch, "mlp_ratio": mlp_width / width,
    }
    visual = open_clip.model._build_vision_tower(embed_dim, vision_cfg)
    tower = {k: v for k, v in tower.items() if not k.startswith("attn_pool")}
    missing, unexpected = visual.load_state_dict(tower, strict=False)
    if missing or unexpected:
        detail = f"missing {missing[:2]}" if missing else f"unexpected {unexpected[:2]}"
        raise EncoderFormatError(f"'{source}' does not match an OpenCLIP ViT of width {width} ({detail})")
    return ImageEncoder(visual)


def load_image_encoder(
    source: str | os.PathLike | dict, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
    heads: int | None = None,
) -> ImageEncoder:
    """An ImageEncoder from a file (or a state dict already in memory)."""
    if isinstance(source, dict):
        encoder = encoder_from_state_dict(source, "<state dict>", heads)
    else:
        path = Path(source)
        state_dict, _ = read_weights(path, "image encoder", EncoderFormatError)
        encoder = encoder_from_state_dict(state_dict, path.name, heads)
    return encoder.to(device=device, dtype=dtype)
