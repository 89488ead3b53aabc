"""The image-prompt term of the DiT adapters (Flux.1: XLabs, InstantX; SD3.5: InstantX).

A DiT has no cross-attention to the text: text and image tokens attend jointly. The
adapters add a second attention whose keys and values come from the image tokens:

- XLabs (Flux double blocks): ``λ · Attn(q_img, K', V')`` with the image stream's query after
  its q-norm and before RoPE, added to the image stream at the end of the block;
- InstantX Flux (double and single blocks): the same query, with K' and V' RMS-normalised per
  head, added to the attention output (the image part in double blocks, the whole joint
  sequence in single blocks) before the block's output projection;
- InstantX SD3.5 (every joint block): the image tokens are layer-normalised with a shift and
  scale from the timestep, the query and the image's own keys get the adapter's RMS norms, and
  the image stream attends to its own keys and values *and* the adapter's:
  ``λ · Attn(q', [k_img'; K'], [v_img; V'])``, added before the output projection.

Tensors are ``[batch, tokens, heads * head_dim]``; ``attention`` is the framework's kernel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import AttentionFn, Weight, image_attention, sdpa_attention

FLUX_INSTANTX_NORM_EPS = 1e-5  # its weightless per-head RMS norms of K' and V'
SD3_NORM_EPS = 1e-6  # SD3.5 InstantX's RMS norms and the AdaLN of the image tokens


def head_rms_norm(x: torch.Tensor, heads: int, weight: torch.Tensor | None = None, eps: float = SD3_NORM_EPS):
    """RMSNorm over each head's channels of ``[..., heads * head_dim]`` (in fp32), times ``weight`` [head_dim]."""
    shape = x.shape
    per_head = x.reshape(*shape[:-1], heads, -1).float()
    per_head = per_head * torch.rsqrt(per_head.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        per_head = per_head * weight.float()
    return per_head.reshape(shape).to(x.dtype)


def reweighted_rms(normed: torch.Tensor, heads: int, weight_in: torch.Tensor | None, weight_out: torch.Tensor):
    """``RMSNorm_out(x)`` from ``RMSNorm_in(x)`` (same eps): only the per-channel weight differs. A model hands its
    own q-norm's output over; the adapter wants its own norm of the same raw query. ``weight_in`` None: the model
    has no q-norm and ``normed`` is the raw query."""
    if weight_in is None:
        return head_rms_norm(normed, heads, weight_out)
    shape = normed.shape
    per_head = normed.reshape(*shape[:-1], heads, -1).float() * (weight_out.float() / weight_in.float())
    return per_head.reshape(shape).to(normed.dtype)


def adaptive_layer_norm(tokens: torch.Tensor, time_embedding: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
    """SD3.5 InstantX's ``norm_ip``: LayerNorm (no affine) then shift and scale from the timestep embedding.

    ``tokens`` [N, T, C], ``time_embedding`` [N, E]; ``weight`` [2C, E] gives (shift, scale) in that order."""
    shift, scale = F.linear(F.silu(time_embedding), weight, bias).chunk(2, dim=-1)
    normed = F.layer_norm(tokens, tokens.shape[-1:], eps=SD3_NORM_EPS)
    return normed * (1 + scale[:, None]) + shift[:, None]


def dit_keys_values(projection: str, layer: dict[str, torch.Tensor], tokens: torch.Tensor, heads: int,
                    time_embedding: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """K' and V' of one DiT layer from image tokens [N, T, C], in fp32 (``layer``: its tensors by name).

    ``projection`` tells the adapter apart (``Variant.projection``): "base" XLabs, "mlp" InstantX Flux,
    "time-resampler" InstantX SD3.5 (which needs the timestep embedding its Resampler gave)."""
    def linear(x, name):
        bias = layer.get(f"{name}.bias")
        return F.linear(x, layer[f"{name}.weight"].float(), None if bias is None else bias.float())

    tokens = tokens.float()
    if projection == "time-resampler":
        tokens = adaptive_layer_norm(tokens, time_embedding.float(), layer["norm_ip.linear.weight"].float(),
                                     layer["norm_ip.linear.bias"].float())
        return head_rms_norm(linear(tokens, "to_k_ip"), heads, layer["norm_ip_k.weight"]), linear(tokens, "to_v_ip")
    k, v = linear(tokens, "to_k_ip"), linear(tokens, "to_v_ip")
    if projection == "mlp":
        return (head_rms_norm(k, heads, eps=FLUX_INSTANTX_NORM_EPS),
                head_rms_norm(v, heads, eps=FLUX_INSTANTX_NORM_EPS))
    return k, v


def joint_image_attention(q: torch.Tensor, k_img: torch.Tensor, v_img: torch.Tensor, k_ip: torch.Tensor,
                          v_ip: torch.Tensor, heads: int, weight: Weight = 1.0, mask: torch.Tensor | None = None,
                          attention: AttentionFn = sdpa_attention) -> torch.Tensor:
    """SD3.5 InstantX's term: the image stream attends to its own keys and values and the adapter's together."""
    if k_ip.shape[0] != q.shape[0]:
        k_ip, v_ip = k_ip.expand(q.shape[0], -1, -1), v_ip.expand(q.shape[0], -1, -1)
    keys = torch.cat([k_img, k_ip.to(k_img.dtype)], dim=1)
    values = torch.cat([v_img, v_ip.to(v_img.dtype)], dim=1)
    return image_attention(q, keys, values, heads, weight, mask, attention)


__all__ = ["head_rms_norm", "reweighted_rms", "adaptive_layer_norm", "dit_keys_values", "joint_image_attention",
           "image_attention"]
