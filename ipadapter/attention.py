"""The decoupled cross-attention of IP-Adapter.

    out = Attention(q, k, v) + weight * mask * Attention(q, k_ip, v_ip)

Tensors are in the ``[batch, tokens, heads * head_dim]`` layout that both
diffusers' projections and ComfyUI's attention patches use. ``attention`` can
be swapped for a framework's optimised kernel with the same signature.
"""
from __future__ import annotations

from typing import Callable, Union

import torch
import torch.nn.functional as F

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
Weight = Union[float, torch.Tensor]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head attention with PyTorch's scaled_dot_product_attention."""
    batch, q_len, inner = q.shape
    head_dim = inner // heads

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], -1, heads, head_dim).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(batch, q_len, inner).to(q.dtype)


def image_attention(
    q: torch.Tensor,
    k_ip: torch.Tensor,
    v_ip: torch.Tensor,
    heads: int,
    weight: Weight = 1.0,
    mask: torch.Tensor | None = None,
    attention: AttentionFn = sdpa_attention,
) -> torch.Tensor:
    """The image-prompt term ``weight * mask * Attention(q, k_ip, v_ip)``.

    ``weight`` is a number or a tensor broadcastable to ``[batch, 1, 1]`` (a weight
    per sample). ``mask`` weights each query token, shape ``[batch, q_tokens]`` or
    ``[batch, q_tokens, 1]``: 1 where the image prompt applies, 0 where it does not.
    """
    if k_ip.shape[0] != q.shape[0]:
        k_ip = k_ip.expand(q.shape[0], -1, -1)
        v_ip = v_ip.expand(q.shape[0], -1, -1)
    term = attention(q, k_ip, v_ip, heads)
    if mask is not None:
        term = term * (mask.unsqueeze(-1) if mask.dim() == 2 else mask).to(term.dtype)
    return term * (weight.to(term.dtype) if isinstance(weight, torch.Tensor) else weight)


def decoupled_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_ip: torch.Tensor,
    v_ip: torch.Tensor,
    heads: int,
    weight: Weight = 1.0,
    mask: torch.Tensor | None = None,
    attention: AttentionFn = sdpa_attention,
) -> torch.Tensor:
    """Text attention plus the weighted image attention; ``weight == 0`` is exactly text-only."""
    out = attention(q, k, v, heads)
    if not isinstance(weight, torch.Tensor) and weight == 0:
        return out
    return out + image_attention(q, k_ip, v_ip, heads, weight, mask, attention)
