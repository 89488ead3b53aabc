"""A grid of sample images during training: validation images x prompts, at λ = 1 and λ = 0.

DDIM with classifier-free guidance as in the paper's inference:
ε̂ = w·ε(x_t, c_t, c_i) + (1 − w)·ε(x_t, "", unconditional image): a zero image embedding
for base adapters, the hidden states of an all-zero CLIP input for plus / full-face. Each row starts
with the reference image; then, per prompt, the λ = 1 sample and the λ = 0 sample
(λ = 0 is the frozen text-to-image model, a check that the adapter is decoupled).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler
from PIL import Image

from .adapter import IPAdapterModel
from .data import image_tensors, open_image
from .models import FrozenModels


@torch.no_grad()
def generate(
    model: IPAdapterModel,
    frozen: FrozenModels,
    clip_pixels: torch.Tensor,
    prompt: str | list[str],
    scale: float,
    resolution: int,
    steps: int,
    guidance: float,
    seed: int | list[int],
) -> torch.Tensor:
    """One image per reference in ``clip_pixels``, as [N, 3, H, W] in 0..1.

    ``prompt`` and ``seed`` are one for the batch or one per image (a list of N); per-image
    seeds make each image independent of what else is in the batch.
    """
    device = next(model.parameters()).device
    count = clip_pixels.shape[0]
    scheduler = DDIMScheduler.from_config(frozen.scheduler.config)
    scheduler.set_timesteps(steps, device=device)
    downsample = frozen.vae_scale_factor
    shape = (count, frozen.vae.config.latent_channels, resolution // downsample, resolution // downsample)
    if isinstance(seed, int):
        latents = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    else:
        latents = torch.cat([torch.randn((1, *shape[1:]), generator=torch.Generator().manual_seed(s)) for s in seed])
    latents = latents.to(device, frozen.dtype)
    prompts = [prompt] * count if isinstance(prompt, str) else list(prompt)
    kind = model.spec.encoder_input
    features = frozen.encode_images(clip_pixels.to(device), kind).float()
    if kind == "image_embeds":
        unconditional = torch.zeros_like(features)
    else:
        unconditional = frozen.zero_image_features(device).float().expand_as(features)
    features = torch.cat([features, unconditional])
    text, pooled = frozen.encode_text(frozen.tokenize(prompts + [""] * count).to(device))
    size = torch.tensor([[resolution, resolution]], device=device).expand(2 * count, 2)  # SDXL: uncropped, at size
    added_cond = frozen.added_conditioning(pooled, size, torch.zeros_like(size), resolution)
    for timestep in scheduler.timesteps:
        model_input = torch.cat([latents, latents])
        prediction = model(model_input, timestep.expand(2 * count), text, features, scale=scale, added_cond=added_cond)
        conditional, unconditional = prediction.chunk(2)
        guided = unconditional + guidance * (conditional - unconditional)
        latents = scheduler.step(guided.to(latents.dtype), timestep, latents).prev_sample
    images = frozen.vae.decode((latents / frozen.vae.config.scaling_factor).to(frozen.vae.dtype)).sample
    return ((images.float() + 1) / 2).clamp(0, 1).cpu()


def sample_grid(
    model: IPAdapterModel,
    frozen: FrozenModels,
    reference_files: list[str],
    prompts: list[str],
    resolution: int,
    steps: int,
    guidance: float,
    seed: int,
    path: str | Path,
) -> Path:
    references = [image_tensors(open_image(f), resolution) for f in reference_files]
    clip_pixels = torch.stack([r["clip_pixels"] for r in references])
    columns = [torch.stack([(r["pixels"] + 1) / 2 for r in references])]
    was_training = model.training
    model.eval()
    try:
        for prompt in prompts:
            for scale in (1.0, 0.0):
                columns.append(generate(model, frozen, clip_pixels, prompt, scale, resolution, steps, guidance, seed))
    finally:
        model.train(was_training)
    rows = [torch.cat([column[row] for column in columns], dim=2) for row in range(len(references))]
    grid = torch.cat(rows, dim=1).permute(1, 2, 0).numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((grid * 255).round().astype(np.uint8)).save(path)
    return path
