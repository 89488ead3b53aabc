"""The frozen models: the base model (UNet, VAE, text encoders) and the OpenCLIP image encoder.

SD1.5 has one text encoder (CLIP ViT-L, its last layer's output is the context); SDXL two
(CLIP ViT-L and OpenCLIP ViT-bigG, their penultimate layers concatenated to a 2048-wide
context, and bigG's pooled, projected output for the UNet's added conditioning). Loaded
offline from the user's files, or built as scaled-down random-weight copies with the
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
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ipadapter.files import first_line
from ipadapter.encoder import EncoderFormatError, ImageEncoder, build_vision_tower, load_image_encoder
from ipadapter.architecture import SD15, SDXL, Architecture, family_names, family_of_processor_names

from .checkpoint_files import diffusers_part, load_folder_part, open_checkpoint, text_encoder_part
from .errors import ModelFileError
from .sdxl_files import SDXL_CONFIG_DIR, detect_base_model_family, load_sdxl_folder, load_sdxl_single_file

SD15_CONFIG_DIR = Path(__file__).parent / "configs" / "sd15"
VIT_H_EMBED_DIM = 1024
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
    text_encoder: CLIPTextModel
    image_encoder: ImageEncoder
    tokenizer: PromptTokenizer
    scheduler: DDPMScheduler
    dtype: torch.dtype
    family: Architecture = SD15
    text_encoder_2: CLIPTextModelWithProjection | None = None  # SDXL's OpenCLIP ViT-bigG text model
    tokenizer_2: PromptTokenizer | None = None
    empty_text: torch.Tensor | None = None  # text-encoder output of the empty prompt [77, context]; computed once
    empty_pooled: torch.Tensor | None = None  # SDXL: its pooled embedding [1280]
    zero_image: torch.Tensor | None = None  # penultimate states of an all-zero CLIP input (plus: a dropped image); once

    TEXT_ENCODERS = ("text_encoder", "text_encoder_2")

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel (8)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Token ids: [B, 77], or [B, 2, 77] for SDXL's two tokenizers."""
        ids = self.tokenizer(prompts)
        return ids if self.tokenizer_2 is None else torch.stack([ids, self.tokenizer_2(prompts)], dim=1)

    def empty_text_embeds(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The dropped-caption text condition (context, pooled or None), computed once (or read from the cache)."""
        if self.empty_text is None:
            context, pooled = self.encode_text(self.tokenize([""]))
            self.empty_text, self.empty_pooled = context[0], None if pooled is None else pooled[0]
        pooled = None if self.empty_pooled is None else self.empty_pooled.to(device)
        return self.empty_text.to(device), pooled

    def to(self, device: torch.device, offload: tuple[str, ...] = ()) -> "FrozenModels":
        """Move to ``device`` and cast to the frozen dtype. Modules named in ``offload`` (``"text_encoder"``,
        ``"image_encoder"``) stay on the CPU: training from ``training.cache`` needs them only for sample grids.
        SDXL's VAE stays fp32 under fp16 (it overflows there; the authors' script keeps it fp32 too)."""
        for name in ("unet", "vae", *self.TEXT_ENCODERS, "image_encoder"):
            module = getattr(self, name)
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
        """(context [B, 77, width], pooled [B, 1280] or None) on the device of ``input_ids``, wherever the encoders
        are. SD1.5: the text encoder's last layer. SDXL: both encoders' penultimate layers, concatenated, and
        bigG's projected pooled output."""
        device = input_ids.device
        if self.text_encoder_2 is None:
            return self.text_encoder(input_ids.to(self.text_encoder.device))[0].to(device), None
        first = self.text_encoder(input_ids[:, 0].to(self.text_encoder.device), output_hidden_states=True)
        second = self.text_encoder_2(input_ids[:, 1].to(self.text_encoder_2.device), output_hidden_states=True)
        context = torch.cat([first.hidden_states[-2], second.hidden_states[-2].to(first.hidden_states[-2])], dim=-1)
        return context.to(device), second.text_embeds.to(device)

    def added_conditioning(self, pooled: torch.Tensor | None, original_size: torch.Tensor | None,
                           crop_top_left: torch.Tensor | None, resolution: int) -> dict | None:
        """SDXL's added conditioning: the pooled text and the time ids (original height, width, crop top, left,
        target height, width), as the authors' SDXL training script builds them; None for SD1.5."""
        if self.family.pooled_text_width is None:
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


def family_scheduler(family: Architecture = SD15, folder: Path | None = None) -> DDPMScheduler:
    """The DDPM training schedule (SD1.5 and SDXL alike: scaled_linear 0.00085..0.012, 1000 steps, epsilon), from
    the model folder's ``scheduler/`` when it has one (SDXL's holds its Euler inference config: same betas and
    steps; DDPMScheduler keeps the keys it knows), else from the configs shipped here."""
    if folder is None or not (folder / "scheduler" / "scheduler_config.json").is_file():
        folder = SDXL_CONFIG_DIR if family is SDXL else SD15_CONFIG_DIR
    config = DDPMScheduler.load_config(str(folder), subfolder="scheduler", local_files_only=True)
    return DDPMScheduler.from_config(config)


# --- the user's files ------------------------------------------------------------


def load_frozen_models(base_path: str, image_encoder_path: str, dtype: torch.dtype,
                       encoder_embed_dim: int | None = VIT_H_EMBED_DIM, family: Architecture = SD15,
                       skip: tuple[str, ...] = (), check_embed_dim: bool = True) -> FrozenModels:
    """The base model of ``family`` and the image encoder from the user's files; ``encoder_embed_dim`` None allows
    the family's encoders (``check_embed_dim`` False: any encoder). The modules named in ``skip`` (``unet``,
    ``text_encoder``, ``text_encoder_2``, ``image_encoder``) are not read: the cache pass never runs the UNet, a run
    from the cache without sample grids never runs the encoders."""
    base = Path(base_path).expanduser()
    option = f"model.{family.id}"
    if not base.exists():
        raise ModelFileError(f"{family.name} model '{base}' ({option}) does not exist; "
                             "expected a diffusers model folder or a single-file .safetensors")
    found = detect_base_model_family(base)
    if found is not None and found != family.id:
        raise ModelFileError(f"'{base.name}' is a {found} model, given as {option}; expected a {family.name} model "
                             f"(pass it as model.{found})")
    text_encoder_2 = tokenizer_2 = None
    if family is SDXL:  # loaded in the frozen dtype: SDXL in fp32 is 13 GB
        load = load_sdxl_folder if base.is_dir() else load_sdxl_single_file
        parts = load(base, dtype, skip)
        unet, vae, text_encoder, text_encoder_2 = parts.unet, parts.vae, parts.text_encoder, parts.text_encoder_2
        tokenizer_dir, tokenizer_2 = parts.tokenizer_dir, PromptTokenizer(parts.tokenizer_2_dir, pad=0)
        scheduler = family_scheduler(family, base if base.is_dir() else None)
    elif base.is_dir():
        unet, vae, text_encoder, tokenizer_dir = _load_diffusers_folder(base, dtype, skip)
        scheduler = family_scheduler(family, base)
    else:
        unet, vae, text_encoder = _load_single_file(base, dtype, skip)
        tokenizer_dir, scheduler = None, family_scheduler(family)
    if unet is not None:
        check_unet_layout(unet, str(base), family)
    modules = (("UNet", unet), ("VAE", vae), ("text encoder", text_encoder), ("second text encoder", text_encoder_2))
    for name, module in modules:
        if module is not None:
            check_finite(module, f"{family.name} {name} of '{base.name}'")
    encoder = None
    if "image_encoder" not in skip:
        encoder = _load_image_encoder(Path(image_encoder_path).expanduser(), encoder_embed_dim, family, check_embed_dim)
    if skip:
        log.info("models: not read (never run here): %s", ", ".join(name.replace("_", " ") for name in skip))
    return FrozenModels(unet, vae, text_encoder, encoder, PromptTokenizer(tokenizer_dir), scheduler, dtype, family,
                        text_encoder_2, tokenizer_2)


def _load_diffusers_folder(folder: Path, dtype: torch.dtype, skip: tuple[str, ...] = ()):
    missing = [name for name in ("unet", "vae", "text_encoder") if not (folder / name).is_dir()]
    if missing:
        raise ModelFileError(
            f"SD1.5 folder '{folder}' has no {', '.join(m + '/' for m in missing)}; "
            "expected a diffusers model folder (unet/, vae/, text_encoder/) or a single-file checkpoint"
        )
    unet, vae, text_encoder = (None if name in skip else load_folder_part(cls, folder, name, dtype, "SD1.5")
                               for name, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL),
                                                 ("text_encoder", CLIPTextModel)))
    tokenizer_dir = folder / "tokenizer"
    return unet, vae, text_encoder, tokenizer_dir if tokenizer_dir.is_dir() else None


UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."


def _load_single_file(path: Path, dtype: torch.dtype, skip: tuple[str, ...] = ()):
    """UNet, VAE and text encoder from an SD1.5 single file, part by part in ``dtype`` (no second copy), with the
    configs shipped in ``configs/sd15``; modules in ``skip`` are not read."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    name, expected = path.name, "SD1.5's UNet, VAE and CLIP text encoder in the original single-file layout"
    with open_checkpoint(path) as weights:
        missing = [p for p in (UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX) if not any(k.startswith(p) for k in weights.keys)]
        if missing:
            found = ", ".join(weights.keys[:3]) or "nothing"
            raise ModelFileError(f"'{name}' is not an SD1.5 checkpoint (no {missing[0]}* keys; found {found}); expected {expected}")
        unet = vae = text_encoder = None
        if "unet" not in skip:
            unet = diffusers_part(weights, UNet2DConditionModel, SD15_CONFIG_DIR / "unet", UNET_PREFIX,
                                  convert_ldm_unet_checkpoint, "UNet", "SD1.5", expected, dtype)
        vae = diffusers_part(weights, AutoencoderKL, SD15_CONFIG_DIR / "vae", VAE_PREFIX, convert_ldm_vae_checkpoint,
                             "VAE", "SD1.5", expected, dtype)
        if "text_encoder" not in skip:
            text_encoder = text_encoder_part(weights, CLIPTextModel, SD15_CONFIG_DIR / "text_encoder" / "config.json",
                                             TEXT_PREFIX, lambda part, _: convert_ldm_clip_checkpoint(part),
                                             "CLIP text encoder", expected, dtype)
    return unet, vae, text_encoder


ENCODER_EMBED_DIMS = {"sd15": (VIT_H_EMBED_DIM,), "sdxl": (1280, VIT_H_EMBED_DIM)}  # the released adapters' encoders
ENCODER_NAMES = {"sd15": "OpenCLIP ViT-H/14, the encoder of the SD1.5 adapters",
                 "sdxl": "OpenCLIP ViT-bigG/14 or ViT-H/14, the encoders of the SDXL adapters"}


def _load_image_encoder(path: Path, embed_dim: int | None = VIT_H_EMBED_DIM, family: Architecture = SD15,
                        check_embed_dim: bool = True) -> ImageEncoder:
    if not path.is_file():
        raise ModelFileError(f"image encoder '{path}' does not exist; expected {ENCODER_NAMES[family.id]} (.safetensors or .bin)")
    try:
        encoder = load_image_encoder(str(path), device="cpu", dtype=torch.float32)
    except (EncoderFormatError, ValueError, OSError) as error:
        raise ModelFileError(f"image encoder '{path.name}': {first_line(error)}") from None
    allowed = ENCODER_EMBED_DIMS[family.id] if embed_dim is None else (embed_dim,)
    if check_embed_dim and encoder.embed_dim not in allowed:
        expected = ENCODER_NAMES[family.id] if embed_dim is None else "model.encoder_embed_dim"
        raise ModelFileError(
            f"image encoder '{path.name}' ({encoder.name}) gives {encoder.embed_dim}-d image embeddings; "
            f"expected {' or '.join(map(str, allowed))} ({expected})"
        )
    return encoder


def check_finite(module: torch.nn.Module, what: str) -> None:
    for name, parameter in module.named_parameters():
        if not torch.isfinite(parameter).all():
            raise ModelFileError(f"{what} has NaN/inf in {name}; the file is damaged, expected finite weights")


def check_unet_layout(unet: UNet2DConditionModel, source: str, expected: Architecture = SD15) -> dict[str, int]:
    """The official key of each cross-attention processor; refuse a UNet not laid out like ``expected``."""
    processor_names = list(unet.attn_processors)
    family = family_of_processor_names(processor_names)
    if family is not expected:
        crosses = sum(name.endswith("attn2.processor") for name in processor_names)
        found = f"is laid out like {family.name}" if family else f"has {crosses} cross-attention layers, not those of {family_names()}"
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


def build_embedded_models(seed: int = 0, dtype: torch.dtype = torch.float32, family: Architecture = SD15) -> FrozenModels:
    """Random-weight copies of ``family``'s models and a ViT-H-layout encoder, scaled down, with the family's
    cross-attention layers (SD1.5: 16; SDXL: 70, transformer depths 2 and 10, 2048-wide context)."""
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
            scaling_factor=0.18215 if family is SD15 else 0.13025,
        )
        text_config = CLIPTextConfig.from_json_file(str(SD15_CONFIG_DIR / "text_encoder" / "config.json"))
        text_config.intermediate_size = 512
        text_config.num_hidden_layers = 1 if family is SD15 else 2  # SDXL reads the penultimate layer
        text_encoder = CLIPTextModel(text_config)
        text_encoder_2 = tokenizer_2 = None
        if family is SDXL:  # OpenCLIP ViT-bigG's text model (width 1280, pooled output projected to 1280), 2 layers
            bigg_config = CLIPTextConfig.from_json_file(str(SDXL_CONFIG_DIR / "text_encoder_2" / "config.json"))
            bigg_config.num_hidden_layers, bigg_config.intermediate_size = 2, 512
            text_encoder_2 = CLIPTextModelWithProjection(bigg_config)
            tokenizer_2 = PromptTokenizer(pad=0)
        image_encoder = build_vision_tower("ViT-H-14", **EMBEDDED_ENCODER)
    check_unet_layout(unet, "embedded", family)
    return FrozenModels(unet, vae, text_encoder, image_encoder, PromptTokenizer(), family_scheduler(family), dtype, family,
                        text_encoder_2, tokenizer_2)


def build_embedded_unet(family: Architecture = SD15, width: int = EMBEDDED_BASE_WIDTH) -> UNet2DConditionModel:
    """A random UNet with ``family``'s block layout and context width, ``width`` channels in the first block."""
    if family is SD15:
        return UNet2DConditionModel(
            sample_size=8, block_out_channels=(width, 2 * width, 4 * width, 4 * width), layers_per_block=2,
            cross_attention_dim=family.context_dim, attention_head_dim=8, norm_num_groups=8,
        )
    channels = (width, 2 * width, 4 * width)
    return UNet2DConditionModel(
        sample_size=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=channels, layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=tuple(max(1, c // 64) for c in channels),  # diffusers' name for the head count; heads of 64
        cross_attention_dim=family.context_dim, use_linear_projection=True, norm_num_groups=32,
        addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=family.pooled_text_width + 6 * 256,
    )


@contextlib.contextmanager
def seeded(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
