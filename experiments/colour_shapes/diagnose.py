"""Where the image prompt pays off in the training loss: ε-MSE per timestep, measured on the saved files.

For held-out images at fixed timesteps (same noise for every column): the adapter with the
image itself as the reference (what training optimises), with a reference of the same shape in
another colour, at λ = 0 (the base model alone), and a guess that knows nothing of the image but
the latents' mean (x0 = that mean). "match" below "other colour" means the adapter reads the
colour from the image prompt; where the base model does worse than the guess (high noise), its
loss is the UNet's own error, not what the noisy latent hides.
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import base, data

TIMESTEPS = (100, 400, 700, 800, 900, 950, 999)


@torch.no_grad()
def loss_by_timestep(sd_folder: Path, encoder_file: Path, adapter_file: Path, seed: int, count: int = 96,
                     timesteps=TIMESTEPS) -> list[dict]:
    from ipadapter.registry.families import SD15
    from training.eval import load_generator

    args = argparse.Namespace(adapter=str(adapter_file), base=str(sd_folder), family=SD15,
                              image_encoder=str(encoder_file), dtype="fp32")
    model, frozen = load_generator(args, torch.device("cpu"))
    rng = random.Random(seed)
    images, captions, shapes, colours = data.batch(rng, count)
    others = [data.COLOUR_NAMES[(data.COLOUR_NAMES.index(c) + rng.randint(1, len(data.COLOUR_NAMES) - 1)) % len(data.COLOUR_NAMES)]
              for c in colours]
    recoloured = np.stack([np.asarray(data.render(s, o, rng)) for s, o in zip(shapes, others)])
    match, other = base.image_embeddings(frozen.image_encoder, images), base.image_embeddings(frozen.image_encoder, recoloured)
    latents = frozen.vae.encode(base.pixels(images)).latent_dist.mean * frozen.vae.config.scaling_factor
    mean_latent = latents.mean((0, 2, 3), keepdim=True)
    text, _ = frozen.encode_text(frozen.tokenize(captions))
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for t in timesteps:
        steps = torch.full((count,), t)
        noise = torch.randn(latents.shape, generator=generator)
        noisy = frozen.scheduler.add_noise(latents, noise, steps)
        alpha = frozen.scheduler.alphas_cumprod[t]
        blind = (noisy - alpha.sqrt() * mean_latent) / (1 - alpha).sqrt()
        rows.append({
            "timestep": t,
            "match": F.mse_loss(model(noisy, steps, text, match, scale=1.0), noise).item(),
            "other_colour": F.mse_loss(model(noisy, steps, text, other, scale=1.0), noise).item(),
            "no_adapter": F.mse_loss(model(noisy, steps, text, match, scale=0.0), noise).item(),
            "mean_latent_guess": F.mse_loss(blind, noise).item(),
        })
    return rows
