"""Image projections: image-encoder features -> image tokens of the model's context width.

Parameter names match the official checkpoints' ``image_proj`` group, so the
released tensors load with strict key matching.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class LinearProjection(nn.Module):
    """Base / light adapter: one global embedding -> ``num_tokens`` tokens."""

    def __init__(self, embed_dim: int, cross_attention_dim: int, num_tokens: int = 4):
        super().__init__()
        self.num_tokens = num_tokens
        self.cross_attention_dim = cross_attention_dim
        self.proj = nn.Linear(embed_dim, num_tokens * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(image_embeds).reshape(-1, self.num_tokens, self.cross_attention_dim)
        return self.norm(tokens)


class MLPProjection(nn.Module):
    """Full-face adapter: every hidden state of the encoder becomes a token."""

    def __init__(self, hidden_width: int, cross_attention_dim: int):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Linear(hidden_width, hidden_width),
            nn.GELU(),
            nn.Linear(hidden_width, cross_attention_dim),
            nn.LayerNorm(cross_attention_dim),
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden_states)


def _feed_forward(dim: int, mult: int) -> nn.Sequential:
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, dim * mult, bias=False),
        nn.GELU(),
        nn.Linear(dim * mult, dim, bias=False),
    )


class PerceiverAttention(nn.Module):
    """Latents attend to the image features and to themselves."""

    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        inner_dim = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(dim, inner_dim * 2, bias=False)
        self.to_out = nn.Linear(inner_dim, dim, bias=False)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.heads, -1).transpose(1, 2)

    def forward(self, features: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        return self.attend(self.norm1(features), self.norm2(latents))

    def attend(self, features: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """The attention of normalised latents to normalised features and themselves."""
        batch, length, _ = latents.shape
        q = self._split_heads(self.to_q(latents))
        k, v = self.to_kv(torch.cat((features, latents), dim=-2)).chunk(2, dim=-1)
        k, v = self._split_heads(k), self._split_heads(v)
        # The reference scales q and k by dim_head**-0.25 each and takes the
        # softmax in fp32; keep both so fp16 results match it.
        scale = 1 / math.sqrt(math.sqrt(self.dim_head))
        weights = (q * scale) @ (k * scale).transpose(-2, -1)
        weights = torch.softmax(weights.float(), dim=-1).to(weights.dtype)
        out = (weights @ v).transpose(1, 2).reshape(batch, length, -1)
        return self.to_out(out)


class Resampler(nn.Module):
    """Plus / plus-face adapter: learned queries read the encoder's hidden states."""

    def __init__(
        self,
        dim: int,
        depth: int,
        dim_head: int,
        heads: int,
        num_queries: int,
        hidden_width: int,
        output_dim: int,
        ff_mult: int,
    ):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim**0.5)
        self.proj_in = nn.Linear(hidden_width, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, dim_head, heads), _feed_forward(dim, ff_mult)]) for _ in range(depth)
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        latents = self.latents.repeat(hidden_states.shape[0], 1, 1)
        features = self.proj_in(hidden_states)
        for attention, feed_forward in self.layers:
            latents = attention(features, latents) + latents
            latents = feed_forward(latents) + latents
        return self.norm_out(self.proj_out(latents))


class FacePerceiver(nn.Module):
    """faceid-plus's ``perceiver_resampler``: the face's id tokens, as the latents, read the CLIP hidden states of
    the aligned face crop (a Resampler without learned queries)."""

    def __init__(self, dim: int, depth: int, dim_head: int, heads: int, hidden_width: int, output_dim: int,
                 ff_mult: int):
        super().__init__()
        self.proj_in = nn.Linear(hidden_width, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, dim_head, heads), _feed_forward(dim, ff_mult)]) for _ in range(depth)
        )

    def forward(self, latents: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        features = self.proj_in(hidden_states)
        for attention, feed_forward in self.layers:
            latents = attention(features, latents) + latents
            latents = feed_forward(latents) + latents
        return self.norm_out(self.proj_out(latents))


class FaceIDPlusProjection(nn.Module):
    """faceid-plus / plusv2: the face embedding -> MLP + LayerNorm -> id tokens, which a perceiver refines with the
    CLIP penultimate hidden states of the aligned face crop. ``shortcut_scale`` s (plusv2): id tokens + s x the
    perceiver's output; None: the perceiver's output alone (plus v1)."""

    def __init__(self, face_width: int, hidden: int, num_tokens: int, dim: int, depth: int, dim_head: int, heads: int,
                 hidden_width: int, output_dim: int, ff_mult: int):
        super().__init__()
        self.num_tokens = num_tokens
        self.dim = dim
        self.proj = nn.Sequential(nn.Linear(face_width, hidden), nn.GELU(), nn.Linear(hidden, num_tokens * dim))
        self.norm = nn.LayerNorm(dim)
        self.perceiver_resampler = FacePerceiver(dim, depth, dim_head, heads, hidden_width, output_dim, ff_mult)

    def id_tokens(self, face_embeds: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(face_embeds).reshape(-1, self.num_tokens, self.dim))

    def forward(self, face_embeds: torch.Tensor, hidden_states: torch.Tensor,
                shortcut_scale: float | None = None) -> torch.Tensor:
        """Face embeddings [N, face width] and crop hidden states [N, T, hidden] -> tokens [N, tokens, output]."""
        tokens = self.id_tokens(face_embeds)
        out = self.perceiver_resampler(tokens, hidden_states)
        return out if shortcut_scale is None else tokens + shortcut_scale * out


class MLPTokens(nn.Module):
    """InstantX's Flux adapter: one pooled embedding -> MLP -> ``num_tokens`` tokens, each layer-normalised; the
    FaceID and FaceID portrait adapters: the face embedding, the same way."""

    def __init__(self, embed_dim: int, hidden: int, cross_attention_dim: int, num_tokens: int):
        super().__init__()
        self.num_tokens = num_tokens
        self.cross_attention_dim = cross_attention_dim
        self.proj = nn.Sequential(nn.Linear(embed_dim, hidden), nn.GELU(), nn.Linear(hidden, num_tokens * cross_attention_dim))
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(image_embeds).reshape(-1, self.num_tokens, self.cross_attention_dim))


def sinusoidal_embedding(timesteps: torch.Tensor, width: int, max_period: float = 10000.0) -> torch.Tensor:
    """The DDPM timestep embedding, cosines first: [N] -> [N, width]."""
    half = width // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    angles = timesteps.float()[:, None] * frequencies[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TimestepMLP(nn.Module):
    def __init__(self, in_width: int, width: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_width, width)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class TimeResampler(nn.Module):
    """InstantX's SD3.5 adapter: a Resampler whose latents are modulated by the denoising timestep (AdaLN before
    the attention and the feed-forward of every layer). Returns the tokens and the timestep embedding, which the
    attention layers' own AdaLN takes too."""

    def __init__(self, dim: int, depth: int, dim_head: int, heads: int, num_queries: int, hidden_width: int,
                 output_dim: int, ff_mult: int, timestep_width: int):
        super().__init__()
        self.timestep_width = timestep_width
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim**0.5)
        self.proj_in = nn.Linear(hidden_width, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.time_embedding = TimestepMLP(timestep_width, dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, dim_head, heads), _feed_forward(dim, ff_mult),
                           nn.Sequential(nn.SiLU(), nn.Linear(dim, 4 * dim))])
            for _ in range(depth)
        )

    def forward(self, hidden_states: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states [N, T, hidden] and timesteps [N] (0..1000) -> tokens [N, queries, output], embedding [N, dim]."""
        time = self.time_embedding(sinusoidal_embedding(timesteps, self.timestep_width).to(hidden_states.dtype))
        latents = self.latents.repeat(hidden_states.shape[0], 1, 1)
        features = self.proj_in(hidden_states) + time[:, None]
        for attention, feed_forward, modulation in self.layers:
            shift_attention, scale_attention, shift_ff, scale_ff = modulation(time)[:, None].chunk(4, dim=-1)
            modulated = attention.norm2(latents) * (1 + scale_attention) + shift_attention
            latents = attention.attend(attention.norm1(features), modulated) + latents
            modulated = feed_forward[0](latents) * (1 + scale_ff) + shift_ff
            latents = feed_forward[1:](modulated) + latents
        return self.norm_out(self.proj_out(latents)), time
