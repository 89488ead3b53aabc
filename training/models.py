"""The frozen models: the base model (UNet, VAE, text encoders) and the OpenCLIP image encoder.

What a family's text encoders give comes from its registry entry: each encoder's output (the last
layer, or the penultimate one), concatenated into the context, and the pooled, projected output of
the one marked ``pooled`` for the UNet's added conditioning with the time ids. Loaded offline from
the user's files (``training.base_models``), or built as scaled-down random-weight copies with the
family's layer layout for the embedded default run.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from transformers import CLIPTextConfig

from ipadapter.encoder import EncoderFormatError, ImageEncoder, build_vision_tower, load_image_encoder
from ipadapter.files import first_line
from ipadapter.registry import Family, encoder_by_id, family_names, family_of_processor_names

from .base_models import TIME_IDS, config_dir, load_base_model, text_encoder_class
from .errors import ModelFileError

CONTEXT_LENGTH = 77
START_TOKEN, END_TOKEN = 49406, 49407

log = logging.getLogger("training")


class PromptTokenizer:
    """Captions -> [B, 77] token ids the way SD1.5's tokenizer pads them (with the end token; SDXL's second
    tokenizer pads with 0, ``pad=0``).

    Uses the model folder's own ``tokenizer/`` when there is one, otherwise the CLIP BPE
    vocabulary that ships with open_clip (same merges; the text clean-up can differ
    slightly from transformers' on unusual unicode).
    """

    def __init__(self, folder: Path | None = None, pad: int = END_TOKEN):
        self.hf, self.pad = None, pad
        if folder is not None and (folder / "vocab.json").is_file():
            from transformers import CLIPTokenizer

            self.hf = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
        else:
            from open_clip.tokenizer import SimpleTokenizer

            self.bpe = SimpleTokenizer()

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        if self.hf is not None:
            return self.hf(
                list(prompts), padding="max_length", max_length=CONTEXT_LENGTH, truncation=True, return_tensors="pt"
            ).input_ids
        ids = torch.full((len(prompts), CONTEXT_LENGTH), self.pad, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            tokens = [START_TOKEN, *self.bpe.encode(prompt)[: CONTEXT_LENGTH - 2], END_TOKEN]
            ids[row, : len(tokens)] = torch.tensor(tokens)
        return ids


@dataclass
class FrozenModels:
    unet: UNet2DConditionModel | None
    vae: AutoencoderKL
    text_encoders: dict[str, torch.nn.Module | None]  # by the family's text-encoder folder name, in its order
    image_encoder: ImageEncoder | None
    tokenizers: dict[str, PromptTokenizer]
    scheduler: DDPMScheduler
    dtype: torch.dtype
    family: Family
    empty_text: torch.Tensor | None = None  # text-encoder output of the empty prompt [77, context]; computed once
    empty_pooled: torch.Tensor | None = None  # its pooled embedding (families with time ids)
    zero_image: torch.Tensor | None = None  # penultimate states of an all-zero CLIP input (plus: a dropped image); once

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel (8)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Token ids: [B, 77] for one text encoder, [B, encoders, 77] for several."""
        ids = [tokenizer(prompts) for tokenizer in self.tokenizers.values()]
        return ids[0] if len(ids) == 1 else torch.stack(ids, dim=1)

    def empty_text_embeds(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The dropped-caption text condition (context, pooled or None), computed once (or read from the cache)."""
        if self.empty_text is None:
            context, pooled = self.encode_text(self.tokenize([""]))
            self.empty_text, self.empty_pooled = context[0], None if pooled is None else pooled[0]
        pooled = None if self.empty_pooled is None else self.empty_pooled.to(device)
        return self.empty_text.to(device), pooled

    def modules(self) -> dict[str, torch.nn.Module | None]:
        return {"unet": self.unet, "vae": self.vae, **self.text_encoders, "image_encoder": self.image_encoder}

    def to(self, device: torch.device, offload: tuple[str, ...] = ()) -> "FrozenModels":
        """Move to ``device`` and cast to the frozen dtype. Modules named in ``offload`` (a text encoder's folder
        name, ``"image_encoder"``) stay on the CPU: training from ``training.cache`` needs them only for sample
        grids. A VAE that asks for it (``force_upcast``, SDXL's) stays fp32 under fp16: it overflows there."""
        for name, module in self.modules().items():
            if module is None:  # left out (the cache pass has no UNet)
                continue
            if name not in offload:
                module.to(device)
            keep_fp32 = name == "vae" and self.dtype == torch.float16 and getattr(module.config, "force_upcast", False)
            if self.dtype != torch.float32 and not keep_fp32:
                module.to(self.dtype)
            module.requires_grad_(False).eval()
        return self

    @torch.no_grad()
    def encode_text(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(context [B, 77, width], pooled [B, width] or None) on the device of ``input_ids``, wherever the encoders
        are: each encoder's chosen layer (its output, or a hidden state), concatenated; the pooled one's projected
        pooled output."""
        device, encoders = input_ids.device, self.family.training.text_encoders
        ids = [input_ids] if len(encoders) == 1 else input_ids.unbind(1)
        states, pooled = [], None
        for encoder, encoder_ids in zip(encoders, ids):
            model = self.text_encoders[encoder.folder]
            output = model(encoder_ids.to(model.device), output_hidden_states=encoder.hidden_layer != -1)
            state = output.last_hidden_state if encoder.hidden_layer == -1 else output.hidden_states[encoder.hidden_layer]
            states.append(state.to(states[0]) if states else state)
            if encoder.pooled:
                pooled = output.text_embeds.to(device)
        return torch.cat(states, dim=-1).to(device), pooled

    def added_conditioning(self, pooled: torch.Tensor | None, original_size: torch.Tensor | None,
                           crop_top_left: torch.Tensor | None, resolution: int) -> dict | None:
        """The added conditioning of families with time ids: the pooled text and the time ids (original height,
        width, crop top, left, target height, width), as the authors' SDXL training script builds them."""
        if not self.family.training.time_ids:
            return None
        target = torch.tensor([resolution, resolution], device=pooled.device).expand(len(pooled), 2)
        time_ids = torch.cat([original_size.to(pooled.device), crop_top_left.to(pooled.device), target], dim=1)
        return {"text_embeds": pooled, "time_ids": time_ids.to(pooled.dtype)}

    @torch.no_grad()
    def encode_moments(self, pixels: torch.Tensor) -> torch.Tensor:
        """The VAE posterior's parameters [B, 2 x latent channels, h, w] (mean, log-variance): what the cache stores."""
        return self.vae.encode(pixels.to(self.vae.device, self.vae.dtype)).latent_dist.parameters.to(self.dtype)

    def latents_from_moments(self, moments: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Sample of the VAE posterior (noise given, for reproducibility), scaled like SD1.5's."""
        posterior = DiagonalGaussianDistribution(moments)
        latents = posterior.mean + posterior.std * noise.to(posterior.mean)
        return latents * self.vae.config.scaling_factor

    @torch.no_grad()
    def encode_latents(self, pixels: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.latents_from_moments(self.encode_moments(pixels), noise)

    @torch.no_grad()
    def encode_images(self, clip_pixels: torch.Tensor, kind: str = "image_embeds") -> torch.Tensor:
        """Image embeddings [B, D] (``kind`` ``image_embeds``) or penultimate hidden states [B, tokens, width]
        (``penultimate``), on the device of ``clip_pixels``, wherever the encoder is."""
        parameter = next(self.image_encoder.parameters())
        return getattr(self.image_encoder.encode(clip_pixels.to(parameter)), kind).to(clip_pixels.device)

    def zero_image_features(self, device: torch.device) -> torch.Tensor:
        """The plus variants' unconditional image input: the penultimate states of an all-zero (normalised) CLIP
        input, as the authors' training code encodes for a dropped image; computed once (or read from the cache)."""
        if self.zero_image is None:
            zeros = torch.zeros(1, 3, self.image_encoder.image_size, self.image_encoder.image_size)
            self.zero_image = self.encode_images(zeros, "penultimate")[0]
        return self.zero_image.to(device)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type != "cuda":
            return torch.float32  # bf16 matmuls are slow on most CPUs; the CPU path is for toy runs
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def family_scheduler(family: Family, folder: Path | None = None) -> DDPMScheduler:
    """The DDPM training schedule: the model folder's ``scheduler/`` when it has one (SDXL's holds its Euler
    inference config: same betas and steps; DDPMScheduler keeps the keys it knows), else the family's."""
    if folder is not None and (folder / "scheduler" / "scheduler_config.json").is_file():
        config = DDPMScheduler.load_config(str(folder), subfolder="scheduler", local_files_only=True)
        return DDPMScheduler.from_config(config)
    return DDPMScheduler(**family.training.noise_schedule)


def text_encoder_names(family: Family) -> tuple[str, ...]:
    """The family's text encoders by folder name: what ``skip`` and ``offload`` call them."""
    return tuple(encoder.folder for encoder in family.training.text_encoders)


def tokenizers_for(family: Family, folders: dict[str, Path | None] | None = None) -> dict[str, PromptTokenizer]:
    """One tokenizer per text encoder: the model folder's own where it has one; each pads as its encoder was trained."""
    return {encoder.folder: PromptTokenizer((folders or {}).get(encoder.folder),
                                            pad=END_TOKEN if encoder.pad_id is None else encoder.pad_id)
            for encoder in family.training.text_encoders}


# --- the user's files ------------------------------------------------------------


def load_frozen_models(base_path: str, image_encoder_path: str, dtype: torch.dtype, family: Family,
                       encoder_embed_dim: int | None = None, skip: tuple[str, ...] = (),
                       check_embed_dim: bool = True) -> FrozenModels:
    """The base model of ``family`` and the image encoder from the user's files; ``encoder_embed_dim`` None allows
    the family's encoders (``check_embed_dim`` False: any encoder). The modules named in ``skip`` (``unet``, a text
    encoder's folder name, ``image_encoder``) are not read: the cache pass never runs the UNet, a run from the cache
    without sample grids never runs the encoders."""
    base = Path(base_path).expanduser()  # its family was read from it already (training.config, training.eval)
    parts = load_base_model(base, family, dtype, skip)  # another family's files are refused, saying what they look like
    if parts.unet is not None:
        check_unet_layout(parts.unet, str(base), family)
    for name, module in {"UNet": parts.unet, "VAE": parts.vae, **parts.text_encoders}.items():
        if module is not None:
            check_finite(module, f"{family.name} {name.replace('_', ' ')} of '{base.name}'")
    encoder = None
    if "image_encoder" not in skip:
        allowed = tuple(encoder_by_id(e).embed_dim for e in family.encoders) if encoder_embed_dim is None else (encoder_embed_dim,)
        expected = family_encoders(family) if encoder_embed_dim is None else "model.encoder_embed_dim"
        encoder = open_image_encoder(Path(image_encoder_path).expanduser(), allowed if check_embed_dim else None, expected)
    if skip:
        log.info("models: not read (never run here): %s", ", ".join(name.replace("_", " ") for name in skip))
    scheduler = family_scheduler(family, base if base.is_dir() else None)
    return FrozenModels(parts.unet, parts.vae, parts.text_encoders, encoder,
                        tokenizers_for(family, parts.tokenizer_dirs), scheduler, dtype, family)


def family_encoders(family: Family) -> str:
    """``OpenCLIP ViT-H/14, the encoder of the SD1.5 adapters``, for messages."""
    names = [encoder_by_id(encoder).name for encoder in family.encoders]
    return f"{' or '.join(names)}, the encoder{'s' if len(names) > 1 else ''} of the {family.name} adapters"


def open_image_encoder(path: Path, allowed: tuple[int, ...] | None, expected: str) -> ImageEncoder:
    """An image encoder file, in fp32 on the CPU; one-line errors name ``expected`` (the encoder the run wants) when
    the file is missing or unreadable, or when its embeddings are not of an ``allowed`` width (None: any)."""
    if not path.is_file():
        raise ModelFileError(f"image encoder '{path}' does not exist; expected {expected} (.safetensors or .bin)")
    try:
        encoder = load_image_encoder(str(path), device="cpu", dtype=torch.float32)
    except (EncoderFormatError, ValueError, OSError) as error:
        raise ModelFileError(f"image encoder '{path.name}': {first_line(error)}") from None
    if allowed is not None and encoder.embed_dim not in allowed:
        raise ModelFileError(f"image encoder '{path.name}' ({encoder.name}) gives {encoder.embed_dim}-d image "
                             f"embeddings; expected {' or '.join(map(str, allowed))} ({expected})")
    return encoder


def check_finite(module: torch.nn.Module, what: str) -> None:
    for name, parameter in module.named_parameters():
        if not torch.isfinite(parameter).all():
            raise ModelFileError(f"{what} has NaN/inf in {name}; the file is damaged, expected finite weights")


def check_unet_layout(unet: UNet2DConditionModel, source: str, expected: Family) -> dict[str, int]:
    """The official key of each cross-attention processor; refuse a UNet not laid out like ``expected``."""
    processor_names = list(unet.attn_processors)
    family = family_of_processor_names(processor_names)
    if family is not expected:
        crosses = sum(name.endswith("attn2.processor") for name in processor_names)
        found = f"is laid out like {family.name}" if family else f"has {crosses} cross-attention layers, not those of {family_names(trainable=True)}"
        raise ModelFileError(f"UNet of '{source}' {found}; expected {expected.name}'s {expected.describe_layers()}")
    if unet.config.cross_attention_dim != expected.context_dim:
        raise ModelFileError(
            f"UNet of '{source}' takes {unet.config.cross_attention_dim}-d text tokens; "
            f"expected {expected.context_dim} ({expected.name})"
        )
    return {layer.diffusers_processor: layer.key for layer in expected.layers}


# --- the embedded default ---------------------------------------------------------

EMBEDDED_BASE_WIDTH = 32
EMBEDDED_ENCODER = dict(width=64, layers=2, head_width=16, patch_size=14, embed_dim=32)
EMBEDDED_TEXT_MLP = 512  # the text encoders' MLP width (their own width and heads stay the family's)


def build_embedded_models(family: Family, seed: int = 0, dtype: torch.dtype = torch.float32) -> FrozenModels:
    """Random-weight copies of ``family``'s models and a ViT-H-layout encoder, scaled down, with the family's
    layers: the UNet of its registry entry, each text encoder with as many layers as the one it reads."""
    with seeded(seed):
        unet = build_embedded_unet(family)
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=64,
            scaling_factor=family.training.vae_scaling_factor,
        )
        text_encoders = {}
        for encoder in family.training.text_encoders:
            config = CLIPTextConfig.from_json_file(str(config_dir(family) / encoder.folder / "config.json"))
            config.num_hidden_layers, config.intermediate_size = -encoder.hidden_layer, EMBEDDED_TEXT_MLP
            text_encoders[encoder.folder] = text_encoder_class(encoder)(config)
        image_encoder = build_vision_tower("ViT-H-14", **EMBEDDED_ENCODER)  # variants.EMBEDDED_ENCODER_KIND
    check_unet_layout(unet, "embedded", family)
    return FrozenModels(unet, vae, text_encoders, image_encoder, tokenizers_for(family), family_scheduler(family),
                        dtype, family)


def build_embedded_unet(family: Family, width: int = EMBEDDED_BASE_WIDTH) -> UNet2DConditionModel:
    """A random UNet with ``family``'s block layout and context width, ``width`` channels in the first block."""
    arguments = dict(family.training.embedded_unet)
    channels = tuple(multiplier * width for multiplier in arguments.pop("width_multipliers"))
    head_width, heads = arguments.pop("head_width", None), arguments.pop("heads", None)
    heads = heads if head_width is None else tuple(max(1, c // head_width) for c in channels)  # diffusers' name: head count
    if family.training.time_ids:
        arguments["projection_class_embeddings_input_dim"] = (family.training.pooled_width
                                                              + TIME_IDS * arguments["addition_time_embed_dim"])
    return UNet2DConditionModel(block_out_channels=channels, attention_head_dim=heads,
                                cross_attention_dim=family.context_dim, **arguments)


@contextlib.contextmanager
def seeded(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
