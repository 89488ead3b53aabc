"""Random DiT adapters in their released layouts: XLabs' Flux adapter (v1: 4 tokens, v2: 16), InstantX's Flux
adapter and InstantX's SD3.5 Large adapter, at any width (tests, benchmarks, workflows).

Defaults are the released files' widths; ``device="meta"`` gives shapes only (parameter counts of the full-size
files without their memory). Scales keep the attention logits moderate, so fp32 comparisons are well conditioned.
"""
from __future__ import annotations

import torch

FLUX_DOUBLE, FLUX_SINGLE, SD35_BLOCKS = 19, 38, 38
CLIP_L_EMBEDS, SIGLIP_WIDTH = 768, 1152


class Filler:
    """Random tensors from one seed; on ``meta``, shapes only."""

    def __init__(self, seed: int, dtype=torch.float32, device="cpu"):
        self.generator = torch.Generator().manual_seed(seed)
        self.dtype, self.device = dtype, device

    def __call__(self, *shape, scale=0.2, around=0.0):
        if self.device == "meta":
            return torch.empty(*shape, dtype=self.dtype, device="meta")
        tensor = torch.empty(*shape, dtype=self.dtype)
        return tensor.normal_(around, scale, generator=self.generator)


def xlabs_file_tensors(tokens: int = 16, context: int = 4096, width: int = 3072, embed: int = CLIP_L_EMBEDS,
                       seed: int = 0, dtype=torch.float32, device="cpu") -> dict[str, torch.Tensor]:
    """XLabs' ``ip_adapter.safetensors`` keys: ``ip_adapter_proj_model.*`` and the 19 double blocks' k/v projections."""
    fill = Filler(seed, dtype, device)
    tensors = {"ip_adapter_proj_model.proj.weight": fill(tokens * context, embed),
               "ip_adapter_proj_model.proj.bias": fill(tokens * context),
               "ip_adapter_proj_model.norm.weight": fill(context, around=1.0),
               "ip_adapter_proj_model.norm.bias": fill(context)}
    for block in range(FLUX_DOUBLE):
        for kind in "kv":
            prefix = f"double_blocks.{block}.processor.ip_adapter_double_stream_{kind}_proj"
            tensors[f"{prefix}.weight"] = fill(width, context, scale=2 / context**0.5)
            tensors[f"{prefix}.bias"] = fill(width)
    return tensors


def instantx_flux_state(tokens: int = 128, context: int = 4096, width: int = 3072, embed: int = SIGLIP_WIDTH,
                        hidden: int | None = None, seed: int = 0, dtype=torch.float32, device="cpu") -> dict:
    """InstantX's Flux ``ip-adapter.bin``: ``image_proj`` (MLP ``proj.0``/``proj.2`` to tokens x context, ``norm``) and
    ``ip_adapter`` (``0..56.to_{k,v}_ip.weight``, no bias; its per-head RMS norms carry no weights)."""
    fill = Filler(seed, dtype, device)
    hidden = hidden or 2 * embed
    image_proj = {"proj.0.weight": fill(hidden, embed), "proj.0.bias": fill(hidden),
                  "proj.2.weight": fill(tokens * context, hidden, scale=1 / hidden**0.5),
                  "proj.2.bias": fill(tokens * context),
                  "norm.weight": fill(context, around=1.0), "norm.bias": fill(context)}
    ip_adapter = {f"{key}.to_{kind}_ip.weight": fill(width, context, scale=2 / context**0.5)
                  for key in range(FLUX_DOUBLE + FLUX_SINGLE) for kind in "kv"}
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def sd35_state(width: int = 2432, heads: int = 38, features: int = SIGLIP_WIDTH, dim: int = 1280, queries: int = 64,
               depth: int = 4, blocks: int = SD35_BLOCKS, seed: int = 0, dtype=torch.float32, device="cpu") -> dict:
    """InstantX's SD3.5 ``ip-adapter.bin``: the timestep Resampler in its own names (``layers.{i}.0`` attention,
    ``.1`` feed-forward, ``.2`` AdaLN) and per block ``norm_ip.linear``, ``to_{k,v}_ip``, ``norm_q``, ``norm_k``,
    ``norm_ip_k`` (random, not ones)."""
    fill = Filler(seed, dtype, device)
    head = width // heads
    image_proj = {"latents": fill(1, queries, dim), "proj_in.weight": fill(dim, features, scale=1 / features**0.5),
                  "proj_in.bias": fill(dim), "proj_out.weight": fill(width, dim, scale=1 / dim**0.5),
                  "proj_out.bias": fill(width), "norm_out.weight": fill(width, around=1.0), "norm_out.bias": fill(width),
                  "time_embedding.linear_1.weight": fill(dim, 320, scale=0.05), "time_embedding.linear_1.bias": fill(dim),
                  "time_embedding.linear_2.weight": fill(dim, dim, scale=1 / dim**0.5),
                  "time_embedding.linear_2.bias": fill(dim)}
    scale = 1 / dim**0.5
    for layer in range(depth):
        p = f"layers.{layer}"
        image_proj.update({
            f"{p}.0.norm1.weight": fill(dim, around=1.0), f"{p}.0.norm1.bias": fill(dim),
            f"{p}.0.norm2.weight": fill(dim, around=1.0), f"{p}.0.norm2.bias": fill(dim),
            f"{p}.0.to_q.weight": fill(dim, dim, scale=scale), f"{p}.0.to_kv.weight": fill(2 * dim, dim, scale=scale),
            f"{p}.0.to_out.weight": fill(dim, dim, scale=scale),
            f"{p}.1.0.weight": fill(dim, around=1.0), f"{p}.1.0.bias": fill(dim),
            f"{p}.1.1.weight": fill(4 * dim, dim, scale=scale), f"{p}.1.3.weight": fill(dim, 4 * dim, scale=scale / 2),
            f"{p}.2.1.weight": fill(4 * dim, dim, scale=scale), f"{p}.2.1.bias": fill(4 * dim, scale=0.05),
        })
    ip_adapter = {}
    for key in range(blocks):
        ip_adapter.update({
            f"{key}.norm_ip.linear.weight": fill(2 * width, dim, scale=scale),
            f"{key}.norm_ip.linear.bias": fill(2 * width, scale=0.05),
            f"{key}.to_k_ip.weight": fill(width, width, scale=2 / width**0.5),
            f"{key}.to_v_ip.weight": fill(width, width, scale=2 / width**0.5),
            f"{key}.norm_q.weight": fill(head, around=1.0, scale=0.3),
            f"{key}.norm_k.weight": fill(head, around=1.0, scale=0.3),
            f"{key}.norm_ip_k.weight": fill(head, around=1.0, scale=0.3),
        })
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def count(tensors) -> int:
    """Parameters in a flat or nested dict of tensors."""
    return sum(count(value) if isinstance(value, dict) else value.numel() for value in tensors.values())
