"""SigLIP's vision tower (transformers' ``SiglipVisionModel``) behind the ImageEncoder interface.

InstantX's adapters read it two ways: the Flux adapter takes the attention-pooling head's output
(``pooler_output``, our ``image_embeds``), the SD3.5 adapter the hidden states after the second-to-last
layer (``hidden_states[-2]``, no final LayerNorm: our ``penultimate``). The files users have, all loaded
from their tensors: ComfyUI's ``sigclip_vision_patch14_384`` (``vision_model.*`` keys),
``siglip-so400m-patch14-384/model.safetensors`` (a whole SiglipModel: its text tower is left out),
transformers 5's ``save_pretrained`` of a SiglipVisionModel (no prefix), and the state dict of
ComfyUI's Load CLIP Vision model, which has no pooling head and so gives no image embedding.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from .encoder import CONFIG_OF_WEIGHTS, EncoderFormatError, EncoderOutput
from .preprocess import as_channels_first, preprocess
from .registry import ENCODERS, ImageEncoderKind

SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
PREFIX = "vision_model."
# what a saved transformers config says that the tensors do not
SAVED_SETTINGS = {"num_attention_heads": int, "hidden_act": str, "layer_norm_eps": float}


def vision_tensors(state_dict: dict) -> dict:
    """The vision tower's tensors without the ``vision_model.`` prefix; a whole SiglipModel's text tower left out."""
    if any(isinstance(k, str) and k.startswith(PREFIX) for k in state_dict):
        return {k[len(PREFIX):]: v for k, v in state_dict.items() if isinstance(k, str) and k.startswith(PREFIX)}
    return dict(state_dict)


def is_siglip(state_dict: dict) -> bool:
    """A transformers-layout vision tower without a class token: SigLIP's (CLIP's has one)."""
    keys = vision_tensors(state_dict)
    return "embeddings.patch_embedding.weight" in keys and "embeddings.class_embedding" not in keys


def preprocess_siglip(images: torch.Tensor, size: int, mode: str = "crop") -> torch.Tensor:
    """Images in 0..1 -> SiglipImageProcessor's pixels: straight to ``size``×``size`` (bicubic), mean = std = 0.5.

    SiglipImageProcessor itself stretches a non-square image (our ``stretch``); ``crop`` cuts the center
    square first, ``pad`` pads to a square with the mean grey, as for CLIP.
    """
    if mode == "crop":
        images = as_channels_first(images)
        height, width = images.shape[-2:]
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        images, mode = images[..., top : top + side, left : left + side].permute(0, 2, 3, 1), "stretch"
    return preprocess(images, size, mode, SIGLIP_MEAN, SIGLIP_STD)


def siglip_kind(width: int) -> ImageEncoderKind:
    """The registry's SigLIP of this width, else the first SigLIP: its head width and activation are the guess."""
    siglips = [encoder for encoder in ENCODERS if encoder.layout == "siglip"]
    return next((encoder for encoder in siglips if encoder.hidden_width == width), siglips[0])


class SiglipEncoder(nn.Module):
    """A SiglipVisionModel with ImageEncoder's interface: image_embeds = pooler_output, penultimate = hidden_states[-2]."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        config = model.config
        self.hidden_width = config.hidden_size
        self.patch_size = config.patch_size
        self.image_size = config.image_size
        self.num_tokens = (config.image_size // config.patch_size) ** 2
        self.has_head = config.vision_use_head
        # no head (ComfyUI's Load CLIP Vision): no image embedding; a width of 0 says so to the adapter's check
        self.embed_dim = self.hidden_width if self.has_head else 0
        self.architecture = f"{config.num_attention_heads} heads, {config.hidden_act}"
        shape = (self.hidden_width, config.num_hidden_layers, self.patch_size)
        known = next((e.name for e in ENCODERS
                      if e.layout == "siglip" and (e.hidden_width, e.layers, e.patch_size) == shape), None)
        self.name = known or f"SigLIP ViT (width {shape[0]}, {shape[1]} layers, patch {shape[2]})"
        if not self.has_head:
            self.name += " without its pooling head"

    @property
    def _penultimate_source(self) -> nn.Module:
        """The module whose output is hidden_states[-2] (a property: an attribute would register it twice)."""
        tower = getattr(self.model, "vision_model", self.model)  # transformers 4 nests the tower, 5 does not
        layers = tower.encoder.layers
        return layers[-2] if len(layers) > 1 else tower.embeddings

    @property
    def parameter_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def parameter_device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, pixels: torch.Tensor) -> EncoderOutput:
        """Normalised pixels [B, 3, S, S] -> pooled output and penultimate hidden states, in one pass."""
        captured = []
        hook = self._penultimate_source.register_forward_hook(
            lambda module, args, output: captured.append(output[0] if isinstance(output, tuple) else output))
        try:
            out = self.model(pixel_values=pixels.to(self.parameter_device, self.parameter_dtype))
        finally:
            hook.remove()
        pooled = out.pooler_output if self.has_head else captured[0].new_zeros(pixels.shape[0], 0)
        return EncoderOutput(pooled, captured[0])

    def encode_images(self, images: torch.Tensor, mode: str = "crop") -> EncoderOutput:
        """ComfyUI-style images [B, H, W, 3] in 0..1 -> encoder outputs."""
        return self.encode(preprocess_siglip(images, self.image_size, mode))

    def uncond_pixels(self, batch: int = 1) -> torch.Tensor:
        """An all-zero normalised image (mid grey), as for CLIP."""
        size = self.image_size
        return torch.zeros(batch, 3, size, size, device=self.parameter_device, dtype=self.parameter_dtype)


def saved_config(path: Path | None) -> dict:
    """The SigLIP vision settings of the transformers config saved with ``path`` (``SAVED_SETTINGS``); else ``{}``."""
    name = CONFIG_OF_WEIGHTS.get(path.name) if path is not None else None
    try:
        config = json.loads((path.parent / name).read_text()) if name else None
    except (OSError, ValueError):
        config = None
    if not isinstance(config, dict) or not str(config.get("model_type", "")).startswith("siglip"):
        return {}
    vision = config.get("vision_config", config)  # SiglipModel or SiglipVisionModel
    if not isinstance(vision, dict):
        return {}
    return {key: vision[key] for key, kind in SAVED_SETTINGS.items() if isinstance(vision.get(key), kind)}


def _siglip_config(tensors: dict, source: str, heads: int | None, saved: dict):
    from transformers import SiglipVisionConfig

    try:
        width, channels, patch, patch_w = tensors["embeddings.patch_embedding.weight"].shape
        positions, _ = tensors["embeddings.position_embedding.weight"].shape
        intermediate = tensors["encoder.layers.0.mlp.fc1.weight"].shape[0]
    except KeyError as missing:
        raise EncoderFormatError(f"'{source}' lacks {missing} of a SigLIP vision tower") from None
    except (ValueError, AttributeError):
        raise EncoderFormatError(f"'{source}' has tensors of the wrong rank for a SigLIP vision tower") from None
    grid = math.isqrt(positions)
    if channels != 3 or patch != patch_w or grid * grid != positions:
        raise EncoderFormatError(
            f"'{source}' has a patch embedding {list(tensors['embeddings.patch_embedding.weight'].shape)} and "
            f"{positions} positions; expected an RGB ViT with square patches on a square grid (SigLIP: no class token)"
        )
    kind = siglip_kind(width)
    heads = heads or saved.get("num_attention_heads")
    if heads is None and width % kind.head_width:
        raise EncoderFormatError(f"'{source}' is a SigLIP tower of width {width}, which {kind.head_width}-wide heads "
                                 "do not divide; expected heads= with its attention head count")
    heads = heads or width // kind.head_width
    if heads <= 0 or width % heads:
        raise EncoderFormatError(f"heads={heads} does not divide the width {width} of '{source}'")
    layers = len({k.split(".")[2] for k in tensors if k.startswith("encoder.layers.")})
    settings = {"layer_norm_eps": saved["layer_norm_eps"]} if "layer_norm_eps" in saved else {}  # else SigLIP's own
    return SiglipVisionConfig(
        hidden_size=width, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
        image_size=grid * patch, patch_size=patch, hidden_act=saved.get("hidden_act", kind.activation),
        vision_use_head=any(k.startswith("head.") for k in tensors), **settings,
    )


def siglip_encoder_from_state_dict(state_dict: dict, source: str = "<memory>", heads: int | None = None,
                                   saved: dict | None = None) -> SiglipEncoder:
    """A SiglipEncoder from a SigLIP vision tower's tensors; ``saved``: what :func:`saved_config` found."""
    from transformers import SiglipVisionModel  # ComfyUI ships transformers; the CLIP encoders do without it

    tensors = vision_tensors(state_dict)
    tensors.pop("embeddings.position_ids", None)  # a buffer that transformers 4 files carry
    config = _siglip_config(tensors, source, heads, saved or {})
    with torch.device("meta"):  # no random initialisation, no storage: the file's tensors become the weights
        model = SiglipVisionModel(config)
    expected = model.state_dict()
    prefix = PREFIX if all(k.startswith(PREFIX) for k in expected) else ""  # transformers 4 keeps it in the model
    tensors = {prefix + k: v for k, v in tensors.items()}
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    wrong_shape = [
        f"'{k}' is {list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}, expected {list(expected[k].shape)}"
        for k, v in tensors.items()
        if k in expected and (not isinstance(v, torch.Tensor) or v.shape != expected[k].shape)
    ]
    if missing or unexpected or wrong_shape:
        detail = f"missing {missing[:2]}" if missing else f"unexpected {unexpected[:2]}" if unexpected else wrong_shape[0]
        raise EncoderFormatError(f"'{source}' does not match a SigLIP vision tower of width {config.hidden_size} with "
                                 f"{config.num_hidden_layers} layers ({detail}); expected a complete SigLIP vision tower")
    model.load_state_dict(tensors, strict=True, assign=True)
    embeddings = getattr(model, "vision_model", model).embeddings
    embeddings.register_buffer("position_ids", torch.arange(embeddings.num_positions).expand(1, -1), persistent=False)
    unset = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if unset:  # a buffer that no file carries
        raise EncoderFormatError(f"'{source}' leaves {unset[0]} of the SigLIP tower unset; expected a complete tower")
    return SiglipEncoder(model)
