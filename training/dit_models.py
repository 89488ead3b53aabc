"""The frozen parts of a DiT base model (Flux.1, SD3.5) from a diffusers model folder, and how to call them.

What the family's text encoders give comes from its registry entry: each one's pooled output (joined) is the
vector input, and the hidden states of those ``in_context`` are the text tokens: encoders of one kind side by side
on channels (SD3's two CLIPs), each group zero-padded to the widest and the groups one after another (then T5).
How the transformer is called follows the family's entry (Flux.1 packs 2x2 latent pixels per token, SD3.5 does
not), as diffusers' pipelines and training examples call it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ipadapter.files import first_line
from ipadapter.registry import Family

from .base_models import tokenizer_folder
from .errors import ModelFileError
from .weight_files import _load_transformers_part



@dataclass
class DiTParts:
    """What a run holds of the base model: a run from ``training.cache`` has no VAE and no text encoders, and the
    cache pass no transformer (None, and empty dicts)."""

    transformer: torch.nn.Module | None
    vae: torch.nn.Module | None
    vae_config: dict
    text_encoders: dict[str, torch.nn.Module]
    tokenizers: dict
    schedule: dict  # the family's noise-level draw, with the folder's scheduler config where it sets the same keys
    family: Family
    dtype: torch.dtype
    device: torch.device = torch.device("cpu")

    def to(self, device: torch.device) -> "DiTParts":
        for module in (self.transformer, self.vae, *self.text_encoders.values()):
            if module is not None:
                module.to(device)
        self.device = device
        return self

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(text tokens [B, T, C], pooled [B, P]) as the family's pipeline builds them."""
        groups, pooled = [], []
        for encoder in self.family.training.text_encoders:
            ids = self.tokenizers[encoder.folder](list(captions), padding="max_length", max_length=encoder.max_length,
                                                  truncation=True, return_tensors="pt").input_ids.to(self.device)
            output = self.text_encoders[encoder.folder](ids, output_hidden_states=True)
            if encoder.pooled:
                pooled.append(output.text_embeds if hasattr(output, "text_embeds") else output.pooler_output)
            if encoder.in_context:
                states = output.last_hidden_state if encoder.hidden_layer == -1 else output.hidden_states[encoder.hidden_layer]
                if groups and groups[-1][0] == encoder.layout:
                    groups[-1][1].append(states)
                else:
                    groups.append((encoder.layout, [states]))
        blocks = [torch.cat(states, dim=-1) for _, states in groups]
        width = max(block.shape[-1] for block in blocks)
        context = torch.cat([F.pad(block, (0, width - block.shape[-1])) for block in blocks], dim=1)
        return context.to(self.dtype), torch.cat(pooled, dim=-1).to(self.dtype)

    @torch.no_grad()
    def encode_moments(self, pixels: torch.Tensor) -> torch.Tensor:
        """The VAE posterior's parameters [B, 2 x latent channels, h, w] (mean, log-variance): what the cache stores."""
        return self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist.parameters.to(self.dtype)

    def latents_from_moments(self, moments: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """A sample of the VAE posterior (``noise`` given), shifted and scaled as the VAE's config says."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        posterior = DiagonalGaussianDistribution(moments.float())
        latents = posterior.mean + posterior.std * noise.to(posterior.mean)
        shift = self.vae_config.get("shift_factor") or 0.0
        return ((latents - shift) * self.vae_config["scaling_factor"]).to(self.dtype)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_config["block_out_channels"]) - 1)

    @property
    def latent_channels(self) -> int:
        return self.vae_config["latent_channels"]

    def image_tokens(self, latent_size: int) -> int:
        """How many tokens the transformer makes of a square latent of this size."""
        return (latent_size // self.patch) ** 2

    @property
    def patch(self) -> int:
        return getattr(self.transformer.config, "patch_size", 1) * self.family.training.latent_packing

    def denoise(self, latents: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
                attention_kwargs: dict) -> torch.Tensor:
        """The transformer's velocity [B, C, H, W] for noisy latents at noise level ``sigma`` [B] in (0, 1)."""
        model, config = self.transformer, self.transformer.config
        pack = self.family.training.latent_packing
        if pack > 1:  # FluxPipeline: packed latents, position ids, timestep and guidance as given
            b, c, h, w = latents.shape
            packed = latents.view(b, c, h // pack, pack, w // pack, pack).permute(0, 2, 4, 1, 3, 5)
            ids = torch.zeros(h // pack, w // pack, 3, device=latents.device)
            ids[..., 1] += torch.arange(h // pack, device=latents.device)[:, None]
            ids[..., 2] += torch.arange(w // pack, device=latents.device)[None, :]
            guidance = self.family.training.guidance
            guidance = torch.full((b,), guidance, device=latents.device) if config.guidance_embeds and guidance else None
            out = model(hidden_states=packed.reshape(b, (h // pack) * (w // pack), c * pack * pack),
                        encoder_hidden_states=context, pooled_projections=pooled, timestep=sigma, guidance=guidance,
                        img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(context.shape[1], 3, device=latents.device),
                        joint_attention_kwargs=attention_kwargs, return_dict=False)[0]
            out = out.view(b, h // pack, w // pack, c, pack, pack).permute(0, 3, 1, 4, 2, 5)
            return out.reshape(b, c, h, w)
        # SD3: the scheduler's timesteps are 1000 sigma
        return model(hidden_states=latents, encoder_hidden_states=context, pooled_projections=pooled,
                     timestep=1000 * sigma, joint_attention_kwargs=attention_kwargs, return_dict=False)[0]


def load_dit_parts(folder: str | Path, family: Family, dtype: torch.dtype, transformer: bool = True,
                   encoders: bool = True) -> DiTParts:
    """The transformer, VAE, text encoders and tokenizers of a diffusers folder of ``family``, without the
    transformer or without the encoders (VAE, text) where asked; one-line errors."""
    import diffusers
    from transformers import AutoTokenizer

    folder, facts = Path(folder).expanduser(), family.training
    if not folder.is_dir():
        raise ModelFileError(f"'{folder.name}' (model.base) is a single file; expected a diffusers {family.name} folder "
                             f"({facts.denoiser_folder}/, vae/, text encoders): single files are not read for it yet")
    names = [facts.denoiser_folder, "vae", *(e.folder for e in facts.text_encoders),
             *(tokenizer_folder(e) for e in facts.text_encoders)]
    missing = [name + "/" for name in names if not (folder / name).is_dir()]
    if missing:
        raise ModelFileError(f"{family.name} folder '{folder}' has no {', '.join(missing)}; expected {', '.join(n + '/' for n in names)}")

    def diffusers_part(cls, name):
        try:
            return cls.from_pretrained(str(folder), subfolder=name, torch_dtype=dtype, local_files_only=True).eval()
        except (OSError, ValueError, RuntimeError, KeyError) as reason:
            raise ModelFileError(f"{family.name} folder '{folder}': {name}/ could not be read ({first_line(reason)})") from None

    denoiser = diffusers_part(getattr(diffusers, facts.denoiser_class), facts.denoiser_folder) if transformer else None
    vae = diffusers_part(diffusers.AutoencoderKL, "vae") if encoders else None
    try:
        vae_config = dict(diffusers.AutoencoderKL.load_config(str(folder), subfolder="vae", local_files_only=True))
    except (OSError, ValueError) as reason:
        raise ModelFileError(f"{family.name} folder '{folder}': vae/config.json could not be read ({first_line(reason)})") from None
    text_encoders, tokenizers = {}, {}
    for encoder in facts.text_encoders if encoders else ():
        text_encoders[encoder.folder] = _load_transformers_part(_declared_class(folder / encoder.folder), folder,
                                                                encoder.folder, dtype, family.name)
        try:
            tokenizers[encoder.folder] = AutoTokenizer.from_pretrained(str(folder / tokenizer_folder(encoder)))
        except (OSError, ValueError) as reason:
            raise ModelFileError(f"{family.name} folder '{folder}': {tokenizer_folder(encoder)}/ could not be read "
                                 f"({first_line(reason)})") from None
    for module in (denoiser, vae, *text_encoders.values()):
        if module is not None:
            module.requires_grad_(False)
    schedule = dict(facts.noise_schedule)
    try:
        saved = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        schedule.update({key: value for key, value in saved.items() if key in schedule})
    except (OSError, ValueError):
        pass  # no scheduler config: the family's numbers
    return DiTParts(denoiser, vae, vae_config, text_encoders, tokenizers, schedule, family, dtype)


def _declared_class(part: Path):
    """The transformers class a text encoder's config declares (CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel)."""
    import transformers

    try:
        name = json.loads((part / "config.json").read_text())["architectures"][0]
        return getattr(transformers, name)
    except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError) as reason:
        raise ModelFileError(f"'{part}': config.json names no transformers model class ({first_line(reason)}); "
                             "expected a text encoder saved with save_pretrained") from None
