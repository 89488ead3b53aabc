"""The image encoder: OpenCLIP's vision transformer, from the files users have.

Weights come from the user's file, never from a download: an OpenCLIP
checkpoint (``visual.*`` keys, a full CLIP state dict, or bare tower keys) or
the transformers ``CLIPVisionModelWithProjection`` format most ComfyUI users
have (``CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors``), converted in memory.
A SigLIP tower (no class token) goes to ``siglip.py``, behind the same interface.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import open_clip
import torch
from torch import nn

from .files import read_weights
from .preprocess import preprocess
from .registry import ENCODERS, encoder_of_widths

if TYPE_CHECKING:
    from .siglip import SiglipEncoder

DEFAULT_HEAD_WIDTH = 64  # an unknown tower's (the head width cannot be read from the tensors)


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
        block = visual.transformer.resblocks[0]
        # what the weights do not fix: equal weights with another head count or activation give other outputs
        self.architecture = f"{block.attn.num_heads} heads, {type(block.mlp.gelu).__name__}"
        known = next((e.name for e in ENCODERS if (e.hidden_width, e.layers, e.patch_size) ==
                      (self.hidden_width, layers, self.patch_size)), None)
        self.name = name or known or f"OpenCLIP ViT (width {self.hidden_width}, {layers} layers, patch {self.patch_size})"

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
    visual = open_clip.model._build_vision_tower(embed_dim, vision_cfg, quick_gelu=config.get("quick_gelu", False))
    return ImageEncoder(visual)


def convert_transformers_to_open_clip(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers ``CLIPVisionModelWithProjection`` (or ``CLIPModel``) keys -> OpenCLIP vision tower keys.

    Accepts the usual ``vision_model.``-prefixed keys and the prefix-less ones that
    transformers 5 saves for a bare ``CLIPVisionModel``; ``position_ids`` and any
    text-model keys are ignored.
    """
    prefix = "vision_model."
    if any(k.startswith(prefix) for k in state_dict):
        tensors = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    else:
        tensors = dict(state_dict)
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
    if state_dict and all(k.startswith("module.") for k in state_dict):  # OpenCLIP's DDP training checkpoints
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    keys = list(state_dict)
    transformers_layout = any(
        k.startswith(("vision_model.embeddings.patch_embedding.", "embeddings.patch_embedding.")) for k in keys
    )
    if transformers_layout:
        if "visual_projection.weight" not in state_dict:
            raise EncoderFormatError(
                f"'{source}' is a transformers CLIP vision model without its projection (visual_projection.weight); "
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
    text_only = any("token_embedding" in k or k.startswith(("text_model.", "transformer.resblocks.")) for k in keys)
    what = "a CLIP text model without a vision tower" if text_only else "not a CLIP vision model"
    raise EncoderFormatError(
        f"'{source}' is {what} (found keys like {found}); expected an OpenCLIP ViT checkpoint or transformers "
        "CLIPVisionModelWithProjection or SiglipVisionModel weights"
    )


def _vision_config(tower: dict[str, torch.Tensor], source: str, heads: int | None) -> tuple[int, dict]:
    """The OpenCLIP ``vision_cfg`` (and embed_dim) that the tensors' shapes imply."""
    try:
        width, channels, patch, patch_w = tower["conv1.weight"].shape
        tokens, _ = tower["positional_embedding"].shape
        proj_in, embed_dim = tower["proj"].shape
        mlp_width = tower["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    except KeyError as missing:
        raise EncoderFormatError(f"'{source}' lacks {missing} of an OpenCLIP vision tower") from None
    except (ValueError, AttributeError):
        raise EncoderFormatError(f"'{source}' has tensors of the wrong rank for a CLIP vision tower") from None
    grid = math.isqrt(tokens - 1)
    if channels != 3 or patch != patch_w or grid * grid != tokens - 1 or proj_in != width:
        raise EncoderFormatError(
            f"'{source}' has a patch embedding {list(tower['conv1.weight'].shape)} and {tokens} positions; "
            "expected an RGB ViT with square patches and a square grid plus a class token"
        )
    if heads is not None and (heads <= 0 or width % heads):
        raise EncoderFormatError(f"heads={heads} does not divide the width {width} of '{source}'")
    layers = len({k.split(".")[2] for k in tower if k.startswith("transformer.resblocks.")})
    vision_cfg = {
        "image_size": grid * patch, "layers": layers, "width": width, "patch_size": patch,
        "head_width": width // heads if heads else getattr(encoder_of_widths(hidden_width=width), "head_width",
                                                             DEFAULT_HEAD_WIDTH),
        # open_clip takes int(width * mlp_ratio): the half keeps a ratio like 8192/1664 from rounding down
        "mlp_ratio": (mlp_width + 0.5) / width,
    }
    return embed_dim, vision_cfg


def encoder_from_state_dict(state_dict: dict, source: str = "<memory>", heads: int | None = None,
                            quick_gelu: bool | None = None) -> ImageEncoder:
    tower = _tower_state_dict(state_dict, source)
    embed_dim, vision_cfg = _vision_config(tower, source, heads)
    if quick_gelu is None:  # no config says: the known encoder of these widths does (OpenAI's ViT-L/14: QuickGELU)
        known = encoder_of_widths(embed_dim, vision_cfg["width"])
        quick_gelu = known is not None and known.activation == "quick_gelu"
    try:
        with torch.device("meta"):  # no random initialisation, no storage: the tensors below become its weights
            visual = open_clip.model._build_vision_tower(embed_dim, vision_cfg, quick_gelu=quick_gelu)
    except (AssertionError, ValueError, RuntimeError):
        raise EncoderFormatError(
            f"'{source}' gives a tower that cannot be built (width {vision_cfg['width']}, "
            f"head width {vision_cfg['head_width']}); pass heads= with the model's attention head count"
        ) from None
    expected = visual.state_dict()
    missing = [k for k in expected if k not in tower]
    unexpected = [k for k in tower if k not in expected]
    wrong_shape = [
        f"'{k}' is {list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}, expected {list(expected[k].shape)}"
        for k, v in tower.items()
        if k in expected and (not isinstance(v, torch.Tensor) or v.shape != expected[k].shape)
    ]
    if missing or unexpected or wrong_shape:
        detail = (f"missing {missing[:2]}" if missing else f"unexpected {unexpected[:2]}" if unexpected
                  else wrong_shape[0])
        raise EncoderFormatError(
            f"'{source}' does not match an OpenCLIP ViT of width {vision_cfg['width']} with "
            f"{vision_cfg['layers']} layers ({detail}); expected a complete CLIP vision tower"
        )
    visual.load_state_dict(tower, strict=True, assign=True)
    unset = [name for name, tensor in visual.state_dict(keep_vars=True).items() if tensor.is_meta]
    if unset:  # a buffer that no file carries
        raise EncoderFormatError(f"'{source}' leaves {unset[0]} of the OpenCLIP tower unset; expected a complete tower")
    return ImageEncoder(visual)


def load_image_encoder(
    source: str | os.PathLike | dict, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
    heads: int | None = None,
) -> ImageEncoder | SiglipEncoder:
    """An ImageEncoder from a file (or a state dict already in memory).

    The tensors do not record the attention head count nor the activation. For
    the file names the libraries save (``CONFIG_OF_WEIGHTS``) the config beside
    the weights gives them; any other file gets those of the registry's encoder
    of its widths (ViT-H/14, ViT-bigG/14: GELU; OpenAI's ViT-L/14: QuickGELU),
    else GELU and 64-wide heads. ``heads`` overrides the head count.
    A SigLIP tower gives a :class:`~ipadapter.siglip.SiglipEncoder`.
    """
    from .siglip import is_siglip, saved_config, siglip_encoder_from_state_dict  # siglip.py imports this module

    if isinstance(source, dict):  # the caller's tensors (ComfyUI's model): the encoder gets its own copies
        state_dict, path = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in source.items()}, None
    else:
        path = Path(source)
        state_dict, _ = read_weights(path, "image encoder", EncoderFormatError)
    name = path.name if path is not None else "<state dict>"
    if is_siglip(state_dict):
        encoder = siglip_encoder_from_state_dict(state_dict, name, heads, saved_config(path))
    else:
        config = config_beside(path) if path is not None else {}
        encoder = encoder_from_state_dict(state_dict, name, heads or config.get("heads"), config.get("quick_gelu"))
    return encoder.to(device=device, dtype=dtype)


# The config file that the library saves beside weights of these names; a file renamed (as ComfyUI users do,
# many in one folder) is not tied to any config there.
CONFIG_OF_WEIGHTS = {
    "model.safetensors": "config.json", "pytorch_model.bin": "config.json",
    "open_clip_model.safetensors": "open_clip_config.json", "open_clip_pytorch_model.bin": "open_clip_config.json",
}


def config_beside(path: Path) -> dict:
    """``{"heads": int, "quick_gelu": bool}``, as far as the CLIP config saved with ``path`` says; else ``{}``.

    A file that is not a CLIP config (another model's ``config.json``, broken JSON) is not ours to judge: ignored.
    """
    name = CONFIG_OF_WEIGHTS.get(path.name)
    try:
        config = json.loads((path.parent / name).read_text()) if name else None
    except (OSError, ValueError):
        config = None
    if isinstance(config, dict) and isinstance(config.get("model_cfg"), dict):  # OpenCLIP
        return {"quick_gelu": bool(config["model_cfg"].get("quick_gelu", False))}
    if isinstance(config, dict) and str(config.get("model_type", "")).startswith("clip"):
        vision = config.get("vision_config", config)  # transformers CLIPModel or CLIPVisionModel
        if not isinstance(vision, dict):
            return {}
        activation = vision.get("hidden_act", "quick_gelu")  # transformers' default, left out of a saved config
        if activation not in ("gelu", "quick_gelu"):
            raise EncoderFormatError(f"'{path.parent / name}' gives the activation '{activation}'; "
                                     "expected gelu or quick_gelu (a CLIP vision tower)")
        found = {"quick_gelu": activation == "quick_gelu"}
        if isinstance(vision.get("num_attention_heads"), int):
            found["heads"] = vision["num_attention_heads"]
        return found
    return {}
