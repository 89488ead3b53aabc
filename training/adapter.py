"""The trainable part: image projection + one (to_k_ip, to_v_ip) per cross-attention layer, in a frozen UNet.

The attn2 processors call ``ipadapter.attention.decoupled_attention`` so training and
inference share one implementation of the math. Trainable weights stay fp32 while the
frozen UNet may run in bf16/fp16; image tokens go to K'/V' in fp32 and are cast after.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0
from torch import nn

from ipadapter.attention import decoupled_attention
from ipadapter.adapter_file import AdapterFormatError, AdapterSpec, build_projection, load_adapter

from .models import ModelFileError, check_unet_layout
from .variants import family_of_diffusers_unet


class ImageTokens:
    """What the attn2 processors read during one UNet call: image tokens and λ."""

    def __init__(self):
        self.tokens: torch.Tensor | None = None
        self.scale: float | torch.Tensor = 1.0


class AdapterLayer(nn.Module):
    """K'/V' of one cross-attention layer; state-dict names match the official checkpoints."""

    def __init__(self, hidden_size: int, cross_attention_dim: int):
        super().__init__()
        self.to_k_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)


class DecoupledAttnProcessor:
    """diffusers attn2 processor: text attention + λ · image attention.

    A plain object (not an ``nn.Module``) so the trainable weights are registered once,
    in ``IPAdapterModel.layers``, and never aliased inside the UNet's state dict.
    """

    def __init__(self, layer: AdapterLayer, image: ImageTokens):
        self.layer = layer
        self.image = image

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if self.image.tokens is None:
            raise RuntimeError("the adapter's attn2 processor ran without image tokens; call IPAdapterModel, not the UNet")
        residual = hidden_states
        text = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attn.norm_cross:
            text = attn.norm_encoder_hidden_states(text)
        q = attn.to_q(hidden_states)
        k, v = attn.to_k(text), attn.to_v(text)
        tokens = self.image.tokens.to(self.layer.to_k_ip.weight.dtype)
        k_ip = F.linear(tokens, self.layer.to_k_ip.weight).to(q.dtype)
        v_ip = F.linear(tokens, self.layer.to_v_ip.weight).to(q.dtype)
        out = decoupled_attention(q, k, v, k_ip, v_ip, attn.heads, weight=self.image.scale)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class TrainableAdapter(nn.Module):
    """What every trainer's adapter model shares: a projection ``image_proj`` and adapter ``layers`` train, and their
    state reads and writes in the released files' names (``image_proj.*``, ``ip_adapter.<layer>.*``)."""

    image_proj: nn.Module
    layers: nn.ModuleDict

    def released_name(self, name: str) -> str:
        """A tensor of ``layers`` as the released files name it."""
        return name

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [*self.image_proj.parameters(), *self.layers.parameters()]

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def adapter_state_dicts(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``image_proj`` and ``ip_adapter`` groups in the released layout, detached copies."""
        image_proj = {k: v.detach().clone() for k, v in self.image_proj.state_dict().items()}
        ip_adapter = {self.released_name(k): v.detach().clone() for k, v in self.layers.state_dict().items()}
        return image_proj, ip_adapter

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        image_proj, ip_adapter = self.adapter_state_dicts()
        return {**{f"image_proj.{k}": v for k, v in image_proj.items()}, **{f"ip_adapter.{k}": v for k, v in ip_adapter.items()}}

    def load_trainable_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """The inverse of ``trainable_state_dict`` (a resumed training state, an adapter file's weights)."""
        self.image_proj.load_state_dict({k[len("image_proj."):]: v for k, v in tensors.items() if k.startswith("image_proj.")})
        own_name = {f"ip_adapter.{self.released_name(name)}": name for name in self.layers.state_dict()}
        self.layers.load_state_dict({own_name.get(k, k[len("ip_adapter."):]): v  # unknown names: load_state_dict says
                                     for k, v in tensors.items() if k.startswith("ip_adapter.")})


class IPAdapterModel(TrainableAdapter):
    """Frozen UNet + trainable projection and adapter layers; ``forward`` predicts the noise.

    The projection is built from ``spec`` (``training.variants.adapter_spec``); without one, the base
    adapter's: ``num_tokens`` tokens from ``embed_dim``-d image embeddings.
    """

    def __init__(self, unet: nn.Module, embed_dim: int | None = None, num_tokens: int = 4, spec: AdapterSpec | None = None):
        super().__init__()
        self.unet = unet
        cross = unet.config.cross_attention_dim
        if spec is None:
            spec = AdapterSpec("base", num_tokens, cross, "image_embeds", embed_dim, unet.config.block_out_channels[0],
                               architecture=family_of_diffusers_unet(unet))
        self.spec = spec
        self.num_tokens = spec.num_tokens
        self.image_proj = build_projection(spec)
        self.image = ImageTokens()
        keys = check_unet_layout(unet, "training UNet", spec.architecture)
        modules = dict(unet.named_modules())
        layers, processors = {}, {}
        for name in unet.attn_processors:
            if name not in keys:
                processors[name] = AttnProcessor2_0()  # self-attention: PyTorch SDPA
                continue
            attn = modules[name[: -len(".processor")]]
            layer = AdapterLayer(attn.to_k.out_features, cross)
            with torch.no_grad():  # the reference initialises K'/V' from the layer's text K/V
                layer.to_k_ip.weight.copy_(attn.to_k.weight)
                layer.to_v_ip.weight.copy_(attn.to_v.weight)
            layers[str(keys[name])] = layer
            processors[name] = DecoupledAttnProcessor(layer, self.image)
        self.layers = nn.ModuleDict(layers)  # keyed by official key: "1", "3", ..., "31"
        unet.set_attn_processor(processors)
        unet.requires_grad_(False)
        self.image_proj.float().requires_grad_(True)
        self.layers.float().requires_grad_(True)

    def forward(self, noisy_latents, timesteps, text_embeds, image_features, scale: float | torch.Tensor = 1.0,
                added_cond: dict | None = None):
        """``image_features``: what ``spec.encoder_input`` names, image embeddings or penultimate hidden states.
        ``added_cond``: SDXL's added conditioning (``text_embeds``: pooled text, ``time_ids``); None for SD1.5."""
        tokens = self.image_proj(image_features.float())
        with self.image_prompt(tokens, scale):
            return self.unet(noisy_latents, timesteps, encoder_hidden_states=text_embeds, added_cond_kwargs=added_cond).sample

    @contextlib.contextmanager
    def image_prompt(self, tokens: torch.Tensor, scale: float | torch.Tensor = 1.0):
        self.image.tokens, self.image.scale = tokens, scale
        try:
            yield
        finally:
            self.image.tokens, self.image.scale = None, 1.0


def start_from_adapter_file(model: IPAdapterModel, path) -> None:
    """Load an adapter file's weights into ``model``; its family, variant and shapes must be the model's."""
    try:
        checkpoint = load_adapter(path, base_width=None, architecture=model.spec.architecture)
    except (AdapterFormatError, OSError) as error:
        raise ModelFileError(f"model.init_adapter: {error}") from None
    found, expected = checkpoint.spec, model.spec
    fields = ("variant", "num_tokens", "encoder_input", "encoder_width", "base_width", "resampler")
    if any(getattr(found, name) != getattr(expected, name) for name in fields):
        raise ModelFileError(f"model.init_adapter: '{checkpoint.source}' is an {found.family} {describe(found)}; "
                             f"expected a {describe(expected)}, as this run trains")
    model.load_trainable_state_dict({k: v.float() for k, v in checkpoint.flat_state_dict().items()})


def describe(spec: AdapterSpec) -> str:
    """``plus adapter (Resampler width 768, depth 4, 12 heads) with 16 tokens from 1280-d hidden states for a UNet
    of width 320``, for messages."""
    tokens = f"{spec.num_tokens} tokens" if spec.num_tokens is not None else "one token per hidden state"
    features = "image embeddings" if spec.encoder_input == "image_embeds" else "hidden states"
    resampler = spec.resampler
    shape = f" (Resampler width {resampler['dim']}, depth {resampler['depth']}, {resampler['heads']} heads)" if resampler else ""
    return f"{spec.variant} adapter{shape} with {tokens} from {spec.encoder_width}-d {features} for a UNet of width {spec.base_width}"
