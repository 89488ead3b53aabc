"""Trainable attention processors for adapters diffusers has none for: InstantX's on Flux.1.

InstantX's image term, as our ComfyUI attach computes it (``ipadapter.dit_attention``): the block's query after its
q-norm and before RoPE attends to K' = to_k_ip(tokens) and V' = to_v_ip(tokens), each RMS-normalised per head
without weights; ``scale ·`` that attention joins the block's attention output before the output projection (the
image stream's in a double block, the whole text + image sequence's in a single block).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ipadapter.dit_attention import FLUX_INSTANTX_NORM_EPS, head_rms_norm


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, L, heads * D] -> [B, L, heads, D]."""
    return x.unflatten(-1, (heads, -1))


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask=None) -> torch.Tensor:
    """SDPA over [B, L, heads, D] inputs -> [B, L, heads * D]."""
    out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                         attn_mask=mask)
    return out.transpose(1, 2).flatten(2, 3).to(query.dtype)


class InstantXFluxProcessor(nn.Module):
    """A diffusers ``FluxAttention`` processor: the block's own joint attention (as diffusers' ``FluxAttnProcessor``)
    plus InstantX's image term from ``ip_hidden_states`` [B, tokens, token width]."""

    def __init__(self, width: int, token_width: int, scale: float = 1.0):
        super().__init__()
        self.to_k_ip = nn.Linear(token_width, width, bias=False)
        self.to_v_ip = nn.Linear(token_width, width, bias=False)
        self.scale = scale

    def image_term(self, image_query: torch.Tensor, tokens: torch.Tensor, heads: int) -> torch.Tensor:
        """scale · Attn(q, RMS(K'), RMS(V')) for the query [B, L, heads, D] -> [B, L, heads * D]."""
        keys = head_rms_norm(self.to_k_ip(tokens), heads, eps=FLUX_INSTANTX_NORM_EPS)
        values = head_rms_norm(self.to_v_ip(tokens), heads, eps=FLUX_INSTANTX_NORM_EPS)
        keys, values = (split_heads(x, heads).to(image_query.dtype) for x in (keys, values))
        return self.scale * attend(image_query, keys, values)

    # diffusers passes joint_attention_kwargs by the names this signature has: __call__, not forward
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 ip_hidden_states=None):
        from diffusers.models.embeddings import apply_rotary_emb

        if ip_hidden_states is None:
            raise ValueError("InstantX's Flux processor got no ip_hidden_states; expected the image tokens "
                             "[batch, tokens, width] in joint_attention_kwargs")
        heads = attn.heads
        query = attn.norm_q(split_heads(attn.to_q(hidden_states), heads))
        key = attn.norm_k(split_heads(attn.to_k(hidden_states), heads))
        value = split_heads(attn.to_v(hidden_states), heads)
        image_query = query
        if encoder_hidden_states is not None:  # a double block: the text stream's q, k, v go first
            query = torch.cat([attn.norm_added_q(split_heads(attn.add_q_proj(encoder_hidden_states), heads)), query], 1)
            key = torch.cat([attn.norm_added_k(split_heads(attn.add_k_proj(encoder_hidden_states), heads)), key], 1)
            value = torch.cat([split_heads(attn.add_v_proj(encoder_hidden_states), heads), value], 1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        out = attend(query, key, value, attention_mask)
        term = self.image_term(image_query, ip_hidden_states, heads)
        if encoder_hidden_states is None:  # a single block: its output projection is the block's, after the MLP
            return out + term
        text, image = out.split_with_sizes([encoder_hidden_states.shape[1], image_query.shape[1]], dim=1)
        image = attn.to_out[1](attn.to_out[0](image + term))
        return image, attn.to_add_out(text)
