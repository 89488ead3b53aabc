"""Training the DiT adapters (Flux.1 XLabs, SD3.5 InstantX) with flow matching (the model: ``dit_adapter``).

One step: the latent x and noise n give x_σ = (1 - σ)·x + σ·n at a noise level σ drawn as the family's diffusers
examples draw it, and the loss is the MSE between the transformer's prediction and the velocity n - x. Only the
adapter trains; the frozen transformer runs in the frozen dtype (under autocast on GPUs).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ipadapter.adapter_file import OFFICIAL, IPAdapterCheckpoint, save_adapter
from ipadapter.registry import encoder_by_id, export_stem, variant_by_name

from .cache import DROPPED_IMAGE, open_cache
from .cli import open_data
from .data import DataPosition, make_loader
from .distributed import Engine, check_same_weights
from .dit_adapter import DiTAdapterModel
from .dit_models import DiTParts, load_dit_parts
from .config import ConfigError
from .errors import ModelFileError
from .loop import train
from .models import open_image_encoder, resolve_dtype, seeded
from .run_files import EXPORT_DTYPES, open_run, save_final_state, save_hook

log = logging.getLogger("training")


# --- the objective ------------------------------------------------------------------


def sigma_of(u: torch.Tensor, normal: torch.Tensor, schedule: dict, image_tokens: int) -> torch.Tensor:
    """Noise levels from a uniform draw ``u`` and a normal draw ``normal`` per sample, as the family's schedule says:

    - ``logit_normal`` (diffusers' SD3 examples, ``compute_density_for_timestep_sampling``): σ₀ = sigmoid(m + s·z),
      then the schedule's fixed shift σ = k·σ₀ / (1 + (k - 1)·σ₀);
    - ``shifted`` (Flux's schedule): σ = e^μ / (e^μ + 1/u - 1), μ linear in the image's token count between
      (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift).
    """
    if schedule["sampling"] == "logit_normal":
        base = torch.sigmoid(schedule["logit_mean"] + schedule["logit_std"] * normal)
        shift = schedule["shift"]
        return shift * base / (1 + (shift - 1) * base)
    if schedule["sampling"] == "shifted":
        slope = (schedule["max_shift"] - schedule["base_shift"]) / (schedule["max_image_seq_len"] - schedule["base_image_seq_len"])
        mu = schedule["base_shift"] + slope * (image_tokens - schedule["base_image_seq_len"])
        u = u.clamp(1e-5, 1 - 1e-5)
        return math.exp(mu) / (math.exp(mu) + (1 / u - 1))
    raise ValueError(f"noise-level sampling '{schedule['sampling']}' is unknown; expected logit_normal or shifted")


def draws(seed: int, positions: list[int], latent_shape: tuple, config) -> dict:
    """Per-sample draws from (seed, position), as the UNet trainer makes them: the drop band, u, z, noise."""
    image_below = config.data.drop_image
    text_below = image_below + config.data.drop_text
    both_below = text_below + config.data.drop_both
    keep, drop_text, u, normal, noise, posterior = [], [], [], [], [], []
    for position in positions:
        state = np.random.SeedSequence([seed, position]).generate_state(2, dtype=np.uint32)
        generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        draw = torch.rand((), generator=generator).item()  # one draw in exclusive bands: image, text, both
        keep.append(not (draw < image_below or text_below <= draw < both_below))
        drop_text.append(image_below <= draw < both_below)
        u.append(torch.rand((), generator=generator))
        normal.append(torch.randn((), generator=generator))
        noise.append(torch.randn(latent_shape, generator=generator))
        posterior.append(torch.randn(latent_shape, generator=generator))
    return {"keep_image": torch.tensor(keep), "drop_text": drop_text, "u": torch.stack(u), "normal": torch.stack(normal),
            "noise": torch.stack(noise), "posterior": torch.stack(posterior)}


class DiTEncoders:
    """A DiT family's frozen encoders (text and VAE from the base model, the variant's image encoder): the batch's
    conditioning online, and what ``training.cache`` stores (``encode`` per sample, ``once`` for the dropped ones)."""

    def __init__(self, parts: DiTParts, encoder, key: str, dropped_image: str):
        self.parts, self.encoder, self.key, self.dropped_image = parts, encoder, key, dropped_image
        self.dtype = parts.dtype
        self.widths = {"embed_dim": encoder.embed_dim, "hidden_width": encoder.hidden_width}

    @classmethod
    def open(cls, config, device: torch.device, transformer: bool = False) -> "DiTEncoders":
        """The encoders of ``config``'s run on ``device`` (the transformer only where asked: the cache pass has none)."""
        check_cache_text(config)
        facts = config.family.training.variants[config.model.variant]
        dtype = resolve_dtype(config.model.frozen_dtype, device)
        parts = load_dit_parts(config.base_model, config.family, dtype, transformer=transformer).to(device)
        encoder = open_encoder(config, facts.encoder).to(device, dtype)
        key = variant_by_name(config.model.variant, config.family).encoder_input
        return cls(parts, encoder, key, facts.dropped_image)

    @torch.no_grad()
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Encoder features of images in -1..1 [B, 3, H, W] (the encoder resizes and normalises them itself)."""
        images = ((pixels.float() + 1) / 2).permute(0, 2, 3, 1)
        return getattr(self.encoder.encode_images(images.to(self.parts.device)), self.key).to(self.dtype)

    def encode(self, samples: list[dict]) -> dict:
        pixels = torch.stack([s["pixels"] for s in samples]).to(self.parts.device)
        context, pooled = self.parts.encode_text([s["caption"] for s in samples])
        return {"moments": self.parts.encode_moments(pixels).cpu(), self.key: self.image_features(pixels).cpu(),
                "text_embeds": context.cpu(), "pooled_text": pooled.cpu()}

    def once(self) -> dict:
        """The empty prompt's outputs and the dropped image's features, as the family's inference makes them."""
        context, pooled = self.parts.encode_text([""])
        size = self.encoder.image_size
        dropped = self.image_features(torch.zeros(1, 3, size, size) - 1)  # black
        if self.dropped_image == "zeros":
            dropped = torch.zeros_like(dropped)
        return {"text_embeds": context.cpu(), "pooled_text": pooled.cpu(), DROPPED_IMAGE: dropped.cpu()}


class Conditions:
    """The batch's text and image conditioning and latents, from the cache's outputs or encoded here (the same
    values), with the dropped text and image as the family's inference makes them."""

    def __init__(self, parts: DiTParts, key: str, encoders: DiTEncoders | None, cache=None):
        self.parts, self.key, self.encoders = parts, key, encoders
        stored = encoders.once() if cache is None else {"text_embeds": cache.empty_text, "pooled_text": cache.empty_pooled,
                                                         DROPPED_IMAGE: cache.dropped_image}
        self.empty = (stored["text_embeds"].to(parts.device), stored["pooled_text"].to(parts.device))
        self.dropped = stored[DROPPED_IMAGE].to(parts.device)

    def __call__(self, batch: dict, drawn: dict):
        device = self.parts.device
        if "text_embeds" in batch:
            context, pooled = batch["text_embeds"].to(device), batch["pooled_text"].to(device)
        else:
            context, pooled = self.parts.encode_text(batch["captions"])
        drop = torch.tensor(drawn["drop_text"], device=device)
        context = torch.where(drop[:, None, None], self.empty[0].to(context), context)
        pooled = torch.where(drop[:, None], self.empty[1].to(pooled), pooled)
        features = batch[self.key].to(device) if self.key in batch else self.encoders.image_features(batch["pixels"])
        keep = drawn["keep_image"].to(device).view(-1, *[1] * (features.dim() - 1))
        return context, pooled, torch.where(keep, features, self.dropped.to(features)).float()

    def latents(self, batch: dict, drawn: dict) -> torch.Tensor:
        moments = batch["moments"].to(self.parts.device) if "moments" in batch else self.parts.encode_moments(batch["pixels"])
        return self.parts.latents_from_moments(moments, drawn["posterior"]).float()


def flow_loss(engine, parts: DiTParts, conditions: Conditions, batch: dict, drawn: dict) -> torch.Tensor:
    """MSE between the prediction at x_σ = (1 - σ)·x + σ·n and the velocity n - x."""
    device = parts.device
    context, pooled, features = conditions(batch, drawn)
    latents = conditions.latents(batch, drawn)
    noise = drawn["noise"].to(device)
    sigma = sigma_of(drawn["u"], drawn["normal"], parts.schedule, parts.image_tokens(latents.shape[-1])).to(device)
    noisy = (1 - sigma[:, None, None, None]) * latents + sigma[:, None, None, None] * noise
    prediction = engine(parts, noisy.to(parts.dtype), sigma, context, pooled, features)
    return F.mse_loss(prediction.float(), noise - latents)


# --- the run ---------------------------------------------------------------------------


def run_dit(config, flags: dict, process, extra_hooks: list) -> dict:
    """``training.run`` for a family trained with flow matching: train (resumable), then export in the released layout."""
    family, variant = config.family, config.model.variant
    row = variant_by_name(variant, family)
    dtype = resolve_dtype(config.model.frozen_dtype, process.device)
    check_cache_text(config)
    source = open_data(config, process.is_main, process.barrier)
    cache = open_cache(config, source, dtype)  # from the cache only the transformer is loaded
    if cache is None:
        encoders = DiTEncoders.open(config, process.device, transformer=True)
        parts, widths = encoders.parts, encoders.widths
    else:
        encoders, widths = None, {"embed_dim": cache.image_embed_dim, "hidden_width": cache.image_hidden_width}
        parts = load_dit_parts(config.base_model, family, dtype, encoders=False).to(process.device)
    check_resolution(config.data.resolution, parts)
    width = widths["embed_dim"] if row.encoder_input == "image_embeds" else widths["hidden_width"]
    with seeded(config.train.seed):
        model = DiTAdapterModel(parts.transformer, family, variant, config.model.num_tokens, width)
    if config.train.gradient_checkpointing:
        parts.transformer.enable_gradient_checkpointing()
    parts.to(process.device)
    model.to(process.device)
    log.info("trainable parameters: %s (%s %s adapter, %d tokens, %d layers); frozen models in %s%s",
             f"{model.num_trainable():,}", family.name, variant, config.model.num_tokens, len(model.layers),
             str(dtype).replace("torch.", ""), ", blocks recomputed in backward" if config.train.gradient_checkpointing else "")
    conditions = Conditions(parts, row.encoder_input, encoders, cache)
    engine = Engine(model, config, process)
    start_step, position = open_run(config, flags, engine, process)
    data_position = DataPosition(config.data.num_workers, position)
    loader = make_loader(source, config.data.resolution, config.train.batch_size, config.train.seed, process.rank,
                         process.world_size, config.data.num_workers, position, cache=cache,
                         random_crop=config.data.crop == "random")
    latent = config.data.resolution // parts.vae_scale_factor
    latent_shape = (parts.latent_channels, latent, latent)

    def loss_of(batch: dict, positions: list[int]) -> torch.Tensor:
        return flow_loss(engine, parts, conditions, batch, draws(config.train.seed, positions, latent_shape, config))

    exports: list[Path] = []

    def export(step: int) -> None:
        every = config.train.export_every
        if every and step % every == 0 and step != config.train.max_steps and process.is_main:
            exports.extend(export_dit(config, model, step))

    history = train(config, process, engine, loader, start_step, data_position,
                    [save_hook(config, process, engine, data_position), export, *extra_hooks], loss_of)
    check_same_weights(process, model)
    step = save_final_state(config, process, engine, start_step, data_position)
    if process.is_main:
        final = export_dit(config, model, step)
        exports.extend(final)
        for path in final:
            print(f"exported adapter: {path.resolve()}", flush=True)
    return {"export": exports, "history": history, "step": step, "model": model, "parts": parts}


def check_cache_text(config) -> None:
    if config.cache.text != "embeds":  # token ids would leave T5-XXL in every step: the point of the cache is lost
        raise ConfigError(f"cache.text = {config.cache.text} for {config.family.name}; expected embeds (the text "
                          "encoders' outputs: a DiT run from the cache loads no text encoder)")


def check_resolution(resolution: int, parts: DiTParts) -> None:
    """The VAE downsamples by its factor and the transformer patches the latent: the image must divide into both."""
    step_pixels = parts.vae_scale_factor * parts.patch
    if resolution % step_pixels:
        raise ModelFileError(f"data.resolution = {resolution}; expected a multiple of {step_pixels} ({parts.family.name}: "
                             f"the VAE's {parts.vae_scale_factor}x and the transformer's {parts.patch}x{parts.patch} patches)")


def open_encoder(config, encoder_id: str):
    """The image encoder the variant is trained on (or, for scaled-down tests, one of ``model.encoder_embed_dim``)."""
    kind = encoder_by_id(encoder_id)
    expected = f"{kind.name}, the encoder of {config.family.name} {config.model.variant}"
    encoder = open_image_encoder(Path(config.model.image_encoder).expanduser(),
                                 (config.model.encoder_embed_dim or kind.embed_dim,), expected)
    return encoder.eval().requires_grad_(False)


def export_dit(config, model: DiTAdapterModel, step: int) -> list[Path]:
    """The adapter in its released layout (XLabs' keys in a .safetensors; InstantX's groups), named by the registry."""
    family, facts = model.family, model.facts
    layout = facts.file_layout
    image_proj, ip_adapter = model.adapter_state_dicts()
    metadata = {"step": str(step), "config": config.to_yaml(), "variant": model.row.name}
    checkpoint = IPAdapterCheckpoint.from_state_dicts(image_proj, ip_adapter, "export", None, metadata, family, layout)
    stem = f"{export_stem(model.row, family, encoder_by_id(facts.encoder))}_step{step:08d}"
    formats = [f for f in config.train.export_formats if layout == OFFICIAL or f == "safetensors"] or ["safetensors"]
    output = Path(config.train.output_dir)
    return [save_adapter(checkpoint, output / f"{stem}.{extension}", EXPORT_DTYPES[config.train.export_dtype])
            for extension in formats]
