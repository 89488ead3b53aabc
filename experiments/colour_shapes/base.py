"""The base model: a scaled-down SD1.5 (VAE, CLIP text encoder, UNet with the 16 cross-attention layers)
trained here on the shapes with text conditioning only, and the frozen image encoder.

- VAE: diffusers ``AutoencoderKL`` with SD1.5's layout (4 blocks, 8x downsampling, 4 latent
  channels), narrower, trained briefly on the shapes (reconstruction + a small KL term + latent
  channels 0-2 pulled towards the 8x8 average colour).
- Text encoder: transformers ``CLIPTextModel`` with SD1.5's width (768) and one layer, random
  and frozen: the captions tokenise differently, so their embeddings differ, and the UNet
  learns to read them.
- UNet: diffusers ``UNet2DConditionModel`` in SD1.5's block layout (CrossAttnDownBlock2D x3 +
  DownBlock2D, UNetMidBlock2DCrossAttn, UpBlock2D + CrossAttnUpBlock2D x3; 8 heads, 32 norm
  groups, 768-d context) at ``width`` channels instead of 320; epsilon prediction on SD1.5's
  DDPM schedule, captions dropped 10% of the time for classifier-free guidance, EMA weights.
- Image encoder: an OpenCLIP ViT (ViT-H/14's code path, 2 layers of width 128, patch 32) with a
  1024-d embedding like ViT-H/14's, pretrained CLIP-style on captions that name the colour, then
  frozen; ``colour_probe`` checks that its embedding carries the colour.
"""
from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.training_utils import EMAModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from ipadapter.encoder import build_vision_tower
from ipadapter.preprocess import preprocess
from ipadapter.registry.families import SD15
from training.base_models import config_dir
from training.models import PromptTokenizer, check_unet_layout, family_scheduler

from . import data

log = logging.getLogger("colour_shapes")


def pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> [B, 3, H, W] in [-1, 1] (the VAE's input)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def optimise(optimiser, loss: torch.Tensor, losses: list[float], what: str) -> None:
    """One AdamW step on ``loss``; logs the mean of the last 100 losses every 100 steps."""
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    optimiser.step()
    losses.append(loss.item())
    if len(losses) % 100 == 0:
        log.info("%s step %d  loss %.4f", what, len(losses), float(np.mean(losses[-100:])))


def build_vae(seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
        sample_size=data.SIZE,
    )


def train_vae(vae: AutoencoderKL, steps: int, batch_size: int, seed: int, lr: float = 1e-3, kl_weight: float = 1e-6,
              colour_weight: float = 1.0) -> dict:
    """Reconstruction + a small KL term + ``colour_weight`` x a pull of latent channels 0-2 towards the RGB image
    averaged over each latent pixel's 8x8 patch. SD's VAE latents are close to a linear map of the downsampled colours (ComfyUI's latent
    previews rely on it); a few hundred steps of reconstruction alone squeeze the six hues onto nearly one line
    of the latent (yellow next to green, red next to blue), where the diffusion model can hardly tell them apart.
    """
    rng = random.Random(seed)
    optimiser = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    vae.train()
    started, losses = time.perf_counter(), []
    for _ in range(steps):
        images, *_ = data.batch(rng, batch_size)
        x = pixels(images)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(recon, x) + kl_weight * posterior.kl().mean()
        if colour_weight:
            loss = loss + colour_weight * F.mse_loss(posterior.mean[:, :3], F.adaptive_avg_pool2d(x, posterior.mean.shape[-2:]))
        optimise(optimiser, loss, losses, "vae")
    vae.eval().requires_grad_(False)
    with torch.no_grad():  # SD1.5's convention: latents * scaling_factor have unit variance
        images, *_ = data.batch(random.Random(seed + 1), 256)
        std = vae.encode(pixels(images)).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    return {"steps": steps, "final_loss": float(np.mean(losses[-50:])), "seconds": time.perf_counter() - started,
            "scaling_factor": 1.0 / std}


def build_text_encoder(seed: int) -> CLIPTextModel:
    config = CLIPTextConfig.from_json_file(str(config_dir(SD15) / "text_encoder" / "config.json"))
    config.num_hidden_layers, config.intermediate_size = 1, 512
    torch.manual_seed(seed)
    return CLIPTextModel(config).eval().requires_grad_(False)


def build_unet(width: int, seed: int) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=data.SIZE // 8, block_out_channels=(width, 2 * width, 4 * width, 4 * width), layers_per_block=2,
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
    )
    check_unet_layout(unet, "colour_shapes base UNet", SD15)
    return unet


def build_image_encoder(seed: int):
    torch.manual_seed(seed)
    return build_vision_tower("ViT-H-14", width=128, layers=2, head_width=64, patch_size=32, embed_dim=1024).eval()


def image_embeddings(encoder, images: np.ndarray) -> torch.Tensor:
    clip = preprocess(torch.from_numpy(images).float() / 255, encoder.image_size, "crop")
    with torch.set_grad_enabled(encoder.training):
        return encoder.encode(clip).image_embeds


def pretrain_image_encoder(encoder, steps: int, batch_size: int, seed: int, lr: float = 1e-3) -> dict:
    """CLIP-style image-text pretraining against *full* captions ("a red circle"), which the base model never sees.

    The text side is one learned embedding per distinct caption (6 colours x 3 shapes), and each
    image's embedding is scored against all of them (cosine x learned temperature, softmax): CLIP's
    image-to-text loss with the whole caption set as the candidates. Like a real CLIP, the encoder
    then knows colours by name; a random tower's embeddings are nearly parallel (mean cosine ~0.98
    between images), which leaves the adapter little to read in CPU minutes.
    """
    torch.manual_seed(seed)
    rng = random.Random(seed)
    captions = [(shape, colour) for colour in data.COLOUR_NAMES for shape in data.SHAPES]
    text_table = torch.nn.Parameter(torch.randn(len(captions), encoder.embed_dim) * 0.02)
    log_temperature = torch.nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))  # CLIP's initial 1/0.07
    optimiser = torch.optim.AdamW([*encoder.parameters(), text_table, log_temperature], lr=lr, weight_decay=0.1)
    encoder.train().requires_grad_(True)
    started, losses = time.perf_counter(), []
    for _ in range(steps):
        images, _, shapes, colours = data.batch(rng, batch_size)
        target = torch.tensor([captions.index(pair) for pair in zip(shapes, colours)])
        image_side = F.normalize(image_embeddings(encoder, images), dim=-1)
        logits = log_temperature.exp().clamp(max=100) * image_side @ F.normalize(text_table, dim=-1).T
        optimise(optimiser, F.cross_entropy(logits, target), losses, "image encoder")
    encoder.eval().requires_grad_(False)
    return {"steps": steps, "batch_size": batch_size, "final_loss": float(np.mean(losses[-50:])) if losses else None,
            "seconds": time.perf_counter() - started}


@torch.no_grad()
def colour_probe(encoder, seed: int, train: int = 300, test: int = 300) -> float:
    """Nearest-centroid colour accuracy on the encoder's embeddings (held-out images): does it see colour?"""
    rng = random.Random(seed)
    images, _, _, colours = data.batch(rng, train)
    embeds = image_embeddings(encoder, images)
    centroids = torch.stack([embeds[[c == name for c in colours]].mean(0) for name in data.COLOUR_NAMES])
    images, _, _, colours = data.batch(rng, test)
    predicted = torch.cdist(image_embeddings(encoder, images), centroids).argmin(1)
    return float(np.mean([data.COLOUR_NAMES[int(p)] == c for p, c in zip(predicted, colours)]))


@torch.no_grad()
def text_embeddings(text_encoder: CLIPTextModel, tokenizer: PromptTokenizer, captions: list[str]) -> torch.Tensor:
    return text_encoder(tokenizer(captions))[0]


@torch.no_grad()
def encode_dataset(vae: AutoencoderKL, images: np.ndarray, chunk: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image (the base training samples the posterior from these)."""
    means, stds = [], []
    for start in range(0, len(images), chunk):
        posterior = vae.encode(pixels(images[start:start + chunk])).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


class SharedContextAttnProcessor:
    """SDPA attention where the batch's text contexts are rows of a small table (one per caption).

    K and V of the 77 text tokens are computed once per distinct caption and then indexed, which
    is the same math as computing them per sample (the base training has 4 distinct contexts,
    so this saves most of the UNet's time on CPU). Self-attention is plain SDPA.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, context_index=None, **kwargs):
        batch = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        source = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        key, value = attn.to_k(source), attn.to_v(source)
        if encoder_hidden_states is not None and context_index is not None:
            key, value = key[context_index], value[context_index]

        def heads(x):
            return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(query), heads(key), heads(value))
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * out.shape[-1])
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def train_base(unet, vae, text_encoder, images: np.ndarray, captions: list[str], steps: int, batch_size: int, seed: int,
               lr: float = 1e-3, caption_drop: float = 0.1, ema_decay: float = 0.999) -> dict:
    """Text-to-image training of the UNet on the dataset: epsilon MSE on SD1.5's DDPM schedule, captions dropped for CFG.

    The saved UNet is the exponential moving average of the weights (diffusers' ``EMAModel``,
    decay warming up to ``ema_decay``), as diffusion models are usually released: the raw
    weights of a short run are noisy at high noise levels, where the colour is decided.
    """
    tokenizer = PromptTokenizer()
    scheduler = family_scheduler(SD15)
    prompts = sorted(set(captions)) + [""]
    contexts = text_embeddings(text_encoder, tokenizer, prompts)
    processors = unet.attn_processors
    unet.set_attn_processor(SharedContextAttnProcessor())
    means, stds = encode_dataset(vae, images)
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01)
    warmup = min(100, steps // 10 + 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: min(1.0, (s + 1) / warmup))
    ema = EMAModel(unet.parameters(), decay=ema_decay) if ema_decay else None
    unet.train()
    started, losses = time.perf_counter(), []
    for step in range(steps):
        index = torch.randint(0, len(captions), (batch_size,), generator=generator)
        drop = torch.rand(batch_size, generator=generator) < caption_drop
        rows = [prompts.index("" if d else captions[i]) for i, d in zip(index.tolist(), drop.tolist())]
        posterior_noise = torch.randn(means[index].shape, generator=generator)
        latents = (means[index] + stds[index] * posterior_noise) * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        prediction = unet(scheduler.add_noise(latents, noise, timesteps), timesteps, encoder_hidden_states=contexts,
                          cross_attention_kwargs={"context_index": torch.tensor(rows)}).sample
        loss = F.mse_loss(prediction, noise)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        if ema is not None:
            ema.step(unet.parameters())
        losses.append(loss.item())
        if (step + 1) % 100 == 0:
            log.info("base step %d  loss %.4f  (%.0f s)", step + 1, float(np.mean(losses[-100:])), time.perf_counter() - started)
    if ema is not None:
        ema.copy_to(unet.parameters())
    unet.set_attn_processor(processors)
    unet.eval().requires_grad_(False)
    return {"steps": steps, "batch_size": batch_size, "lr": lr, "ema_decay": ema_decay, "final_loss": float(np.mean(losses[-100:])),
            "seconds": time.perf_counter() - started}


def save_models(folder: Path, unet, vae, text_encoder, image_encoder) -> tuple[Path, Path]:
    """A diffusers SD1.5 folder (unet/, vae/, text_encoder/, scheduler/) and an OpenCLIP encoder file: what the trainer reads."""
    folder.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text_encoder.save_pretrained(folder / "text_encoder")
    family_scheduler(SD15).save_pretrained(folder / "scheduler")
    encoder_path = folder / "image_encoder.safetensors"
    save_file({f"visual.{k}": v.contiguous() for k, v in image_encoder.visual.state_dict().items()}, str(encoder_path))
    return folder, encoder_path


def load_models(folder: Path):
    """What ``save_models`` wrote, plus the training reports in ``done.json``."""
    import json

    from ipadapter.encoder import load_image_encoder

    unet = UNet2DConditionModel.from_pretrained(str(folder / "unet")).eval().requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(str(folder / "vae")).eval().requires_grad_(False)
    text_encoder = CLIPTextModel.from_pretrained(str(folder / "text_encoder")).eval().requires_grad_(False)
    image_encoder = load_image_encoder(str(folder / "image_encoder.safetensors"))
    return unet, vae, text_encoder, image_encoder, json.loads((folder / "done.json").read_text())
