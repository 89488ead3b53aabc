"""The trainable part of a DiT adapter: the projection and one IP attention processor per layer of the variant,
installed in a frozen diffusers transformer (Flux.1, SD3.5).

XLabs (Flux) and InstantX (SD3.5) train diffusers' own IP-Adapter processors, the ones ``load_ip_adapter``
installs, so what is trained is what diffusers runs; the projection is ours, with the released files' tensor names.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ipadapter.projection import LinearProjection, TimeResampler
from ipadapter.registry import variant_by_name

from .dit_models import DiTParts
from .errors import ModelFileError

HEAD_WIDTH = 64  # the Resampler's heads, as diffusers' IPAdapterTimeImageProjection builds them


class DiTAdapterModel(nn.Module):
    """The projection and one diffusers IP processor per layer of the variant, in a frozen transformer."""

    def __init__(self, transformer: nn.Module, family, variant: str, tokens: int, encoder_width: int):
        super().__init__()
        from diffusers.models.attention_processor import SD3IPAdapterJointAttnProcessor2_0
        from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

        self.transformer, self.family, self.tokens, self.encoder_width = transformer, family, tokens, encoder_width
        self.row, self.facts = variant_by_name(variant, family), family.training.variants[variant]
        config = transformer.config
        width = config.num_attention_heads * config.attention_head_dim
        if self.row.projection == "time-resampler":  # InstantX SD3.5: tokens as wide as the model
            dim = max(HEAD_WIDTH, round(family.resampler_width * width / family.base_width / HEAD_WIDTH) * HEAD_WIDTH)
            r = self.row.resampler
            self.image_proj = TimeResampler(dim, r["depth"], r["dim_head"], dim // r["dim_head"], tokens, encoder_width,
                                            width, r["ff_mult"], self.facts.timestep_width)

            def processor():
                return SD3IPAdapterJointAttnProcessor2_0(width, width, config.attention_head_dim, dim, scale=1.0)
        else:  # XLabs: Linear + LayerNorm to tokens as wide as the text tokens
            self.image_proj = LinearProjection(encoder_width, config.joint_attention_dim, tokens)

            def processor():
                return FluxIPAdapterAttnProcessor(width, config.joint_attention_dim, num_tokens=(tokens,), scale=1.0)
        current = transformer.attn_processors
        wanted = {family.layer_by_key[key].diffusers_processor: key for key in family.preset_keys(self.row.layers)}
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

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [*self.image_proj.parameters(), *self.layers.parameters()]

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def attention_kwargs(self, features: torch.Tensor, sigma: torch.Tensor) -> dict:
        """What the transformer's IP processors read: the image tokens (and SD3's timestep embedding)."""
        if self.row.projection == "time-resampler":
            tokens, time = self.image_proj(features.float(), 1000 * sigma.float())
            return {"ip_hidden_states": tokens, "temb": time}
        return {"ip_hidden_states": [self.image_proj(features.float())]}

    def forward(self, parts: DiTParts, latents, sigma, context, pooled, features):
        kwargs = self.attention_kwargs(features, sigma)
        autocast = (torch.autocast(latents.device.type, parts.dtype) if parts.dtype != torch.float32
                    else contextlib.nullcontext())
        with autocast:
            return parts.denoise(latents, sigma, context, pooled, kwargs)

    def adapter_state_dicts(self) -> tuple[dict, dict]:
        """``image_proj`` and ``ip_adapter`` in the released files' names (``0.to_k_ip.weight``...)."""
        image_proj = {k: v.detach().clone() for k, v in self.image_proj.state_dict().items()}
        ip_adapter = {f"{key}.{name.replace('_ip.0.', '_ip.')}": tensor.detach().clone()
                      for key, layer in self.layers.items() for name, tensor in layer.state_dict().items()}
        return image_proj, ip_adapter

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        image_proj, ip_adapter = self.adapter_state_dicts()
        return {**{f"image_proj.{k}": v for k, v in image_proj.items()}, **{f"ip_adapter.{k}": v for k, v in ip_adapter.items()}}
