"""The trainable part of a DiT adapter: the projection and one IP attention processor per layer of the variant,
installed in a frozen diffusers transformer (Flux.1, SD3.5).

XLabs (Flux) and InstantX (SD3.5) train diffusers' own IP-Adapter processors, the ones ``load_ip_adapter``
installs, so what is trained is what diffusers runs. InstantX on Flux, which diffusers cannot load, trains ours
(``dit_processors``), whose term is our ComfyUI attach's. The projections are ours, with the released files' tensor
names.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ipadapter.projection import LinearProjection, MLPTokens, TimeResampler
from ipadapter.registry import variant_by_name

from .adapter import TrainableAdapter
from .dit_models import DiTParts
from .dit_processors import InstantXFluxProcessor
from .errors import ModelFileError

HEAD_WIDTH = 64  # the Resampler's heads, as diffusers' IPAdapterTimeImageProjection builds them


class DiTAdapterModel(TrainableAdapter):
    """The projection and one IP processor per layer of the variant, in a frozen transformer."""

    def __init__(self, transformer: nn.Module, family, variant: str, tokens: int, encoder_width: int,
                 reduced_depth: bool = False):
        """``reduced_depth``: the layers of the variant that ``transformer`` has (a shallow model for checks), not all."""
        super().__init__()
        self.transformer, self.family, self.tokens, self.encoder_width = transformer, family, tokens, encoder_width
        self.row, self.facts = variant_by_name(variant, family), family.training.variants[variant]
        self.image_proj, processor = projection_and_processor(self.row, family, transformer.config, tokens,
                                                              encoder_width, self.facts.timestep_width)
        current = transformer.attn_processors
        wanted = {family.layer_by_key[key].diffusers_processor: key for key in family.preset_keys(self.row.layers)}
        if reduced_depth:
            wanted = {name: key for name, key in wanted.items() if name in current}
        if set(wanted) - set(current):
            missing = sorted(set(wanted) - set(current))
            raise ModelFileError(f"the transformer has no {missing[0]} ({len(current)} attention layers); expected "
                                 f"{family.name}'s {family.describe_layers()}")
        layers = {str(key): processor() for _, key in sorted(wanted.items(), key=lambda item: item[1])}
        transformer.requires_grad_(False)
        self.layers = nn.ModuleDict(layers)  # keyed as the released files number the layers
        transformer.set_attn_processor({name: layers[str(wanted[name])] if name in wanted else current[name]
                                        for name in current})
        self.image_proj.float().requires_grad_(True)
        self.layers.to(next(transformer.parameters()).device).float().requires_grad_(True)

    def attention_kwargs(self, features: torch.Tensor, sigma: torch.Tensor) -> dict:
        """What the transformer's IP processors read: the image tokens (and SD3's timestep embedding)."""
        if self.row.projection == "time-resampler":
            tokens, time = self.image_proj(features.float(), 1000 * sigma.float())
            return {"ip_hidden_states": tokens, "temb": time}
        if self.row.projection == "mlp":
            return {"ip_hidden_states": self.image_proj(features.float())}
        return {"ip_hidden_states": [self.image_proj(features.float())]}  # diffusers' XLabs: one entry per adapter

    def forward(self, parts: DiTParts, latents, sigma, context, pooled, features):
        kwargs = self.attention_kwargs(features, sigma)
        autocast = (torch.autocast(latents.device.type, parts.dtype) if parts.dtype != torch.float32
                    else contextlib.nullcontext())
        with autocast:
            return parts.denoise(latents, sigma, context, pooled, kwargs)

    def released_name(self, name: str) -> str:
        return name.replace("_ip.0.", "_ip.")  # diffusers' Flux processor holds one K'/V' per adapter in a list


def projection_and_processor(row, family, config, tokens: int, encoder_width: int, timestep_width: int):
    """The variant's projection, and a maker of one layer's processor, for a transformer of this diffusers config."""
    from diffusers.models.attention_processor import SD3IPAdapterJointAttnProcessor2_0
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

    width = config.num_attention_heads * config.attention_head_dim
    if row.projection == "time-resampler":  # InstantX SD3.5: tokens as wide as the model
        dim = max(HEAD_WIDTH, round(family.resampler_width * width / family.base_width / HEAD_WIDTH) * HEAD_WIDTH)
        r = row.resampler
        projection = TimeResampler(dim, r["depth"], r["dim_head"], dim // r["dim_head"], tokens, encoder_width, width,
                                   r["ff_mult"], timestep_width)
        head = config.attention_head_dim
        return projection, lambda: SD3IPAdapterJointAttnProcessor2_0(width, width, head, dim, scale=1.0)
    text_width = config.joint_attention_dim  # the Flux adapters' tokens are as wide as the text tokens
    if row.projection == "mlp":  # InstantX Flux: an MLP, every block
        projection = MLPTokens(encoder_width, row.resampler["hidden_mult"] * encoder_width, text_width, tokens)
        return projection, lambda: InstantXFluxProcessor(width, text_width)
    if row.projection == "base":  # XLabs: Linear + LayerNorm, the double blocks
        projection = LinearProjection(encoder_width, text_width, tokens)
        return projection, lambda: FluxIPAdapterAttnProcessor(width, text_width, num_tokens=(tokens,), scale=1.0)
    raise ModelFileError(f"{family.name} {row.name}'s projection '{row.projection}' has no trainer; expected "
                         "time-resampler, mlp or base")
