"""transformers CLIP vision towers (``CLIPVisionModelWithProjection``) with random weights, in any width.

What ComfyUI users have on disk as ``clip_vision`` files (``save_pretrained`` of such a
model); the encoder tests check ``ipadapter.encoder`` against them, the image-encoding
benchmark and the workflow tests write them under the released names.
"""
from __future__ import annotations

import torch


def randomise(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    """transformers' init makes near-identity towers; spread the weights so parity means something."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if parameter.dim() == 1 and ("norm" in name or "layrnorm" in name) and name.endswith("weight"):
                parameter.copy_(1 + 0.1 * noise)
            else:
                parameter.copy_(scale * noise)


def transformers_model(width, layers, heads, patch, image, embed_dim, seed=0, scale=0.05, activation="gelu",
                       intermediate=None):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(
        hidden_size=width, intermediate_size=intermediate or 4 * width, num_hidden_layers=layers, num_attention_heads=heads,
        image_size=image, patch_size=patch, projection_dim=embed_dim, hidden_act=activation, layer_norm_eps=1e-5,
    )
    model = CLIPVisionModelWithProjection(config).eval()
    randomise(model, seed, scale)
    return model
