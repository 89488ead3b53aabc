"""The training step and loop: condition drops, DDPM noise, epsilon MSE, AdamW; progress and logs."""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .config import Config
from .data import DataPosition, describe_skips
from .distributed import Engine, Process
from .models import FrozenModels

log = logging.getLogger("training")


@dataclass
class SampleDraws:
    """Everything random about a batch, drawn per sample from (seed, global position).

    One process with batch 2B and two with batch B draw the same values for the same
    samples, and a resumed run draws what the uninterrupted run would have.
    """

    keep_image: torch.Tensor  # [B] 1.0 or 0.0
    drop_text: list[bool]
    timesteps: torch.Tensor  # [B] long
    noise: torch.Tensor  # [B, 4, h, w]
    posterior_noise: torch.Tensor  # [B, 4, h, w], samples the VAE posterior


def sample_draws(seed: int, positions: list[int], latent_shape: tuple[int, int, int], num_timesteps: int, config: Config) -> SampleDraws:
    drop_image_below = config.data.drop_image
    drop_text_below = drop_image_below + config.data.drop_text
    drop_both_below = drop_text_below + config.data.drop_both
    keep_image, drop_text, timesteps, noise, posterior_noise = [], [], [], [], []
    for position in positions:
        state = np.random.SeedSequence([seed, position]).generate_state(2, dtype=np.uint32)
        generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        # One draw in exclusive bands, as the reference: image, then text, then both.
        draw = torch.rand((), generator=generator).item()
        image_dropped = draw < drop_image_below or drop_text_below <= draw < drop_both_below
        keep_image.append(0.0 if image_dropped else 1.0)
        drop_text.append(drop_image_below <= draw < drop_both_below)
        timesteps.append(torch.randint(0, num_timesteps, (), generator=generator))
        noise.append(torch.randn(latent_shape, generator=generator))
        posterior_noise.append(torch.randn(latent_shape, generator=generator))
    return SampleDraws(torch.tensor(keep_image), drop_text, torch.stack(timesteps), torch.stack(noise), torch.stack(posterior_noise))


def batch_positions(step: int, process: Process, batch_size: int) -> list[int]:
    first = step * batch_size * process.world_size + process.rank * batch_size
    return list(range(first, first + batch_size))


def compute_loss(engine: Engine, frozen: FrozenModels, batch: dict, draws: SampleDraws, device: torch.device) -> torch.Tensor:
    """The MSE to the family's prediction target (ε) of one batch: images are encoded here, or their encoders' outputs come from ``training.cache``.

    Both ways are the same computation: the cache holds what the encoders give (VAE
    posterior moments, image embedding or hidden states, text-encoder output or token ids), and every
    random draw (posterior sample, drops, timestep, noise) is made here from ``draws``.
    """
    text_embeds, pooled = text_condition(frozen, batch, draws.drop_text, device)
    if engine.module.spec.encoder_input == "image_embeds":
        image_features = image_embeddings(frozen, batch, draws.keep_image, device)
    else:
        image_features = hidden_states(frozen, batch, draws.keep_image, device)
    if "moments" in batch:
        latents = frozen.latents_from_moments(batch["moments"].to(device), draws.posterior_noise.to(device))
    else:
        latents = frozen.encode_latents(batch["pixels"].to(device), draws.posterior_noise.to(device))
    noise = draws.noise.to(device, latents.dtype)
    timesteps = draws.timesteps.to(device)
    noisy_latents = frozen.scheduler.add_noise(latents, noise, timesteps)
    added_cond = frozen.added_conditioning(pooled, batch.get("original_size"), batch.get("crop_top_left"),
                                           latents.shape[-1] * frozen.vae_scale_factor)
    prediction = engine(noisy_latents, timesteps, text_embeds, image_features, added_cond=added_cond)
    return F.mse_loss(prediction.float(), training_target(frozen.family.training.prediction, noise).float(), reduction="mean")


def training_target(prediction: str, noise: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict, as its family's registry entry says: the noise (epsilon prediction)."""
    if prediction != "epsilon":
        raise ValueError(f"the family predicts '{prediction}'; the trainer trains epsilon prediction")
    return noise


def image_embeddings(frozen: FrozenModels, batch: dict, keep_image: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Base: the pooled image embedding per sample; a dropped image is a zero embedding."""
    if "image_embeds" in batch:
        image_embeds = batch["image_embeds"].to(device).float()
    else:
        image_embeds = frozen.encode_images(batch["clip_pixels"].to(device)).float()
    return image_embeds * keep_image.to(device)[:, None]


def hidden_states(frozen: FrozenModels, batch: dict, keep_image: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Plus, full-face: the penultimate hidden states per sample; a dropped image is an all-zero CLIP input,
    encoded (tutorial_train_plus.py zeroes the clip image itself, not its features)."""
    keep = keep_image.to(device) > 0
    if "penultimate" in batch:  # cached; the zero image's states are computed once
        cached = batch["penultimate"].to(device)
        return torch.where(keep[:, None, None], cached, frozen.zero_image_features(device).to(cached.dtype)).float()
    clip_pixels = batch["clip_pixels"].to(device)
    clip_pixels = torch.where(keep[:, None, None, None], clip_pixels, torch.zeros_like(clip_pixels))
    return frozen.encode_images(clip_pixels, "penultimate").float()


def text_condition(frozen: FrozenModels, batch: dict, drop_text: list[bool], device: torch.device):
    """(text-encoder output, SDXL's pooled text embedding or None) per sample; a dropped caption gets the empty
    prompt's."""
    dropped = torch.tensor(drop_text, device=device)
    if "text_embeds" in batch:  # cached outputs; the empty prompt's are computed once
        context, pooled = batch["text_embeds"].to(device), batch.get("pooled_text")
        pooled = None if pooled is None else pooled.to(device)
        if not any(drop_text):
            return context, pooled
        empty_context, empty_pooled = frozen.empty_text_embeds(device)
        context = torch.where(dropped[:, None, None], empty_context.to(context.dtype), context)
        if pooled is not None:
            pooled = torch.where(dropped[:, None], empty_pooled.to(pooled.dtype), pooled)
        return context, pooled
    if "input_ids" in batch:  # cached token ids ([B, 77], SDXL [B, 2, 77])
        ids = batch["input_ids"].to(device)
        empty = frozen.tokenize([""])[0].to(device)
        return frozen.encode_text(torch.where(dropped.view(-1, *[1] * (ids.dim() - 1)), empty, ids))
    captions = ["" if dropped else caption for caption, dropped in zip(batch["captions"], drop_text)]
    return frozen.encode_text(frozen.tokenize(captions).to(device))


@dataclass
class Progress:
    """Progress bar (main rank), loss window, TensorBoard and the loss history."""

    config: Config
    process: Process
    start_step: int
    history: list[float] = field(default_factory=list)
    window: list[float] = field(default_factory=list)
    reported_skips: Counter = field(default_factory=Counter)

    def __post_init__(self):
        self.bar = self.writer = None
        self.started = self.window_started = time.perf_counter()
        total = self.config.train.max_steps
        if self.process.is_main and self.config.train.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=self.start_step, unit="step", dynamic_ncols=True, desc="training")
        if self.process.is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(Path(self.config.train.output_dir) / "tensorboard"), purge_step=self.start_step or None)
            except ImportError:
                log.info("tensorboard is not installed; logging to the console only")

    def update(self, step: int, loss: torch.Tensor, data_position: DataPosition) -> None:
        """``loss`` stays on the device; the host waits for it only every ``train.log_every`` steps."""
        self.window.append(loss.detach())
        if self.bar is not None:
            self.bar.update(1)
        train = self.config.train
        saving = train.save_every and step % train.save_every == 0  # never save a state past a non-finite loss
        if step % train.log_every and step != train.max_steps and not saving:
            return
        losses = torch.stack(self.window).float().cpu()
        if not torch.isfinite(losses).all():
            bad = int((~torch.isfinite(losses)).nonzero()[0, 0])
            raise FloatingPointError(f"loss is {losses[bad].item()} at step {step - len(self.window) + bad + 1}; "
                                     "lower optim.lr or use model.frozen_dtype fp32")
        mean_loss = self.process.mean(losses.mean().item())
        elapsed = time.perf_counter() - self.window_started
        samples_per_second = len(self.window) * self.config.train.batch_size * self.process.world_size / max(elapsed, 1e-9)
        self.history.append(mean_loss)
        self.window, self.window_started = [], time.perf_counter()
        skipped = sum(self.process.gather(data_position.skipped), Counter())
        if self.process.is_main:
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{mean_loss:.4f}", samples_s=f"{samples_per_second:.1f}")
            else:
                log.info("step %d  loss %.4f  %.1f samples/s", step, mean_loss, samples_per_second)
            if self.writer is not None:
                self.writer.add_scalar("train/loss", mean_loss, step)
                self.writer.add_scalar("train/samples_per_second", samples_per_second, step)
                self.writer.add_scalar("data/skipped", sum(skipped.values()), step)
            if skipped != self.reported_skips:
                self._write(f"data: skipped {sum(skipped.values())} samples so far ({describe_skips(skipped)})")
                self.reported_skips = skipped

    def _write(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message)
        else:
            log.info(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


StepHook = Callable[[int], None]


LossOf = Callable[[dict, list[int]], torch.Tensor]  # (batch, its samples' global positions) -> loss


def train(config: Config, process: Process, engine: Engine, loader, start_step: int, data_position: DataPosition,
          on_step: list[StepHook], loss_of: LossOf) -> list[float]:
    """Run from ``start_step`` to ``train.max_steps``; ``on_step`` hooks run after each step (saves, samples)."""
    progress = Progress(config, process, start_step)
    engine.module.train()
    step = start_step
    try:
        batches = iter(loader)
        while step < config.train.max_steps:
            batch = next(batches)
            loss = loss_of(batch, batch_positions(step, process, config.train.batch_size))
            engine.step(loss)
            step += 1
            data_position.consumed(batch)
            progress.update(step, loss, data_position)  # checks the window's losses are finite at each log step
            hooks_started = time.perf_counter()
            for hook in on_step:
                hook(step)
            progress.window_started += time.perf_counter() - hooks_started  # samples/s counts training only
    finally:
        progress.close()
    return progress.history


def epsilon_loss(config: Config, frozen: FrozenModels, engine: Engine, device: torch.device) -> LossOf:
    """The UNet families' loss of a batch: per-sample draws from (seed, position), then ``compute_loss``."""
    resolution, downsample = config.data.resolution, frozen.vae_scale_factor
    latent_shape = (frozen.vae.config.latent_channels, resolution // downsample, resolution // downsample)
    num_timesteps = frozen.scheduler.config.num_train_timesteps

    def loss_of(batch: dict, positions: list[int]) -> torch.Tensor:
        draws = sample_draws(config.train.seed, positions, latent_shape, num_timesteps, config)
        return compute_loss(engine, frozen, batch, draws, device)

    return loss_of
