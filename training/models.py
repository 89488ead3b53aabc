"""The frozen models: SD1.5 (UNet, VAE, CLIP text encoder) and the OpenCLIP image encoder.

Loaded offline from the user's files, or built as scaled-down random-weight copies
with SD1.5's layer layout for the embedded default run.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from transformers import CLIPTextConfig, CLIPTextModel

from ipadapter.encoder import EncoderFormatError, ImageEncoder, build_vision_tower, load_image_encoder
from ipadapter.files import read_weights
from ipadapter.architecture import SD15, Architecture, family_names, family_of_processor_names

from .errors import UserError

SD15_CONFIG_DIR = Path(__file__).parent / "configs" / "sd15"
VIT_H_EMBED_DIM = 1024
CONTEXT_LENGTH = 77
START_TOKEN, END_TOKEN = 49406, 49407

log = logging.getLogger("training")


class ModelFileError(UserError):
    """Missing or unusable model files; the message is one line."""


class PromptTokenizer:
    """Captions -> [B, 77] token ids the way SD1.5's tokenizer pads them (with the end token).

    Uses the model folder's own ``tokenizer/`` when there is one, otherwise the CLIP BPE
    vocabulary that ships with open_clip (same merges; the text clean-up can differ
    slightly from transformers' on unusual unicode).
    """

    def __init__(self, folder: Path | None = None):
        self.hf = None
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
        ids = torch.full((len(prompts), CONTEXT_LENGTH), END_TOKEN, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            tokens = [START_TOKEN, *self.bpe.encode(prompt)[: CONTEXT_LENGTH - 2], END_TOKEN]
            ids[row, : len(tokens)] = torch.tensor(tokens)
        return ids


@dataclass
class FrozenModels:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    image_encoder: ImageEncoder
    tokenizer: PromptTokenizer
    scheduler: DDPMScheduler
    dtype: torch.dtype
    empty_text: torch.Tensor | None = None  # text-encoder output of the empty prompt [77, 768]; computed once
    zero_image: torch.Tensor | None = None  # penultimate states of an all-zero CLIP input (plus: a dropped image); once

    def empty_text_embeds(self, device: torch.device) -> torch.Tensor:
        """The dropped-caption text condition, computed once (or read from the cache) and reused."""
        if self.empty_text is None:
            self.empty_text = self.encode_text(self.tokenizer([""]))[0]
        return self.empty_text.to(device)

    def to(self, device: torch.device, offload: tuple[str, ...] = ()) -> "FrozenModels":
        """Move to ``device`` and cast to the frozen dtype. Modules named in ``offload`` (``"text_encoder"``,
        ``"image_encoder"``) stay on the CPU: training from ``training.cache`` needs them only for sample grids."""
        for name in ("unet", "vae", "text_encoder", "image_encoder"):
            module = getattr(self, name)
            if module is None:  # left out (the cache pass has no UNet)
                continue
            if name not in offload:
                module.to(device)
            if self.dtype != torch.float32:
                module.to(self.dtype)
            module.requires_grad_(False).eval()
        return self

    @torch.no_grad()
    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Text-encoder output on the device of ``input_ids``, wherever the encoder is."""
        return self.text_encoder(input_ids.to(self.text_encoder.device))[0].to(input_ids.device)

    @torch.no_grad()
    def encode_moments(self, pixels: torch.Tensor) -> torch.Tensor:
        """The VAE posterior's parameters [B, 2 x latent channels, h, w] (mean, log-variance): what the cache stores."""
        return self.vae.encode(pixels.to(self.vae.device, self.dtype)).latent_dist.parameters

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


def sd15_scheduler(folder: Path | None = None) -> DDPMScheduler:
    """SD1.5's DDPM training schedule (scaled_linear 0.00085..0.012, 1000 steps, epsilon)."""
    if folder is not None and (folder / "scheduler" / "scheduler_config.json").is_file():
        config = DDPMScheduler.load_config(str(folder), subfolder="scheduler", local_files_only=True)
    else:
        config = DDPMScheduler.load_config(str(SD15_CONFIG_DIR), subfolder="scheduler", local_files_only=True)
    return DDPMScheduler.from_config(config)


# --- the user's files ------------------------------------------------------------


def load_frozen_models(sd15_path: str, image_encoder_path: str, dtype: torch.dtype,
                       encoder_embed_dim: int | None = VIT_H_EMBED_DIM) -> FrozenModels:
    """SD1.5 and the image encoder from the user's files; ``encoder_embed_dim`` None skips the embedding-width check."""
    sd15 = Path(sd15_path).expanduser()
    if sd15.is_dir():
        unet, vae, text_encoder, tokenizer_dir = _load_diffusers_folder(sd15)
        scheduler = sd15_scheduler(sd15)
    elif sd15.is_file():
        unet, vae, text_encoder = _load_single_file(sd15)
        tokenizer_dir, scheduler = None, sd15_scheduler()
    else:
        raise ModelFileError(
            f"SD1.5 model '{sd15}' does not exist; expected a diffusers model folder or a single-file .safetensors"
        )
    check_unet_layout(unet, str(sd15))
    for name, module in (("UNet", unet), ("VAE", vae), ("text encoder", text_encoder)):
        check_finite(module, f"SD1.5 {name} of '{sd15.name}'")
    encoder = _load_image_encoder(Path(image_encoder_path).expanduser(), encoder_embed_dim)
    return FrozenModels(unet, vae, text_encoder, encoder, PromptTokenizer(tokenizer_dir), scheduler, dtype)


def _load_diffusers_folder(folder: Path):
    missing = [name for name in ("unet", "vae", "text_encoder") if not (folder / name).is_dir()]
    if missing:
        raise ModelFileError(
            f"SD1.5 folder '{folder}' has no {', '.join(m + '/' for m in missing)}; "
            "expected a diffusers model folder (unet/, vae/, text_encoder/) or a single-file checkpoint"
        )
    loaded = {}
    for name, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL), ("text_encoder", CLIPTextModel)):
        try:
            model, info = cls.from_pretrained(str(folder), subfolder=name, local_files_only=True, output_loading_info=True)
        except (OSError, ValueError, RuntimeError, EnvironmentError) as error:
            raise ModelFileError(f"SD1.5 folder '{folder}': {name}/ could not be read ({_first_line(error)})") from None
        missing = [k for k in info.get("missing_keys", []) if not k.endswith("position_ids")]
        if missing:  # would silently train against randomly initialised weights
            raise ModelFileError(f"SD1.5 folder '{folder}': {name}/ lacks {len(missing)} weights (e.g. {sorted(missing)[0]}); expected complete SD1.5 weights")
        loaded[name] = model
    unet, vae, text_encoder = loaded["unet"], loaded["vae"], loaded["text_encoder"]
    tokenizer_dir = folder / "tokenizer"
    return unet, vae, text_encoder, tokenizer_dir if tokenizer_dir.is_dir() else None


SINGLE_FILE_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.")


def _load_single_file(path: Path):
    checkpoint = _read_weights(path)
    missing = [p for p in SINGLE_FILE_PREFIXES if not any(k.startswith(p) for k in checkpoint)]
    if missing:
        found = ", ".join(list(checkpoint)[:3]) or "nothing"
        raise ModelFileError(
            f"'{path.name}' is not an SD1.5 checkpoint (no {missing[0]}* keys; found {found}); "
            "expected UNet, VAE and CLIP text encoder weights in the original single-file layout"
        )
    config = str(SD15_CONFIG_DIR)
    try:
        unet = UNet2DConditionModel.from_single_file(checkpoint, config=config, subfolder="unet", local_files_only=True)
        vae = AutoencoderKL.from_single_file(checkpoint, config=config, subfolder="vae", local_files_only=True)
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        raise ModelFileError(f"'{path.name}' could not be converted as SD1.5 ({_first_line(error)})") from None
    text_encoder = CLIPTextModel(CLIPTextConfig.from_json_file(str(SD15_CONFIG_DIR / "text_encoder" / "config.json")))
    prefix = "cond_stage_model.transformer."
    tensors = {k[len(prefix):]: v for k, v in checkpoint.items() if k.startswith(prefix)}
    load_text_encoder_weights(text_encoder, tensors, path.name)
    return unet, vae, text_encoder


def load_text_encoder_weights(model: CLIPTextModel, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Strict load that accepts keys with or without the ``text_model.`` prefix (transformers 4 vs 5)."""
    own = model.state_dict()
    prefix = "text_model."
    if not any(k.startswith(prefix) for k in own):
        tensors = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in tensors.items()}
    elif not any(k.startswith(prefix) for k in tensors):
        tensors = {prefix + k: v for k, v in tensors.items()}
    tensors = {k: v for k, v in tensors.items() if not k.endswith("position_ids")}
    missing = sorted(set(own) - set(tensors) - {k for k in own if k.endswith("position_ids")})
    if missing:
        raise ModelFileError(f"'{source}': CLIP text encoder weights miss {missing[:2]}; expected SD1.5's ViT-L/14 text model")
    model.load_state_dict(tensors, strict=False)


def _load_image_encoder(path: Path, embed_dim: int | None = VIT_H_EMBED_DIM) -> ImageEncoder:
    if not path.is_file():
        raise ModelFileError(f"image encoder '{path}' does not exist; expected OpenCLIP ViT-H/14 weights (.safetensors or .bin)")
    try:
        encoder = load_image_encoder(str(path), device="cpu", dtype=torch.float32)
    except (EncoderFormatError, ValueError, OSError) as error:
        raise ModelFileError(f"image encoder '{path.name}': {_first_line(error)}") from None
    if embed_dim is not None and encoder.embed_dim != embed_dim:
        expected = "OpenCLIP ViT-H/14, the encoder of the SD1.5 adapters" if embed_dim == VIT_H_EMBED_DIM else "model.encoder_embed_dim"
        raise ModelFileError(
            f"image encoder '{path.name}' ({encoder.name}) gives {encoder.embed_dim}-d image embeddings; "
            f"expected {embed_dim} ({expected})"
        )
    return encoder


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    loaded, _ = read_weights(path, "SD1.5 checkpoint", ModelFileError)
    return loaded.get("state_dict", loaded) if isinstance(loaded.get("state_dict"), dict) else loaded


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


def build_embedded_models(seed: int = 0, dtype: torch.dtype = torch.float32) -> FrozenModels:
    """Random-weight SD1.5 / ViT-H copies, scaled down, with the same 16 cross-attention layers."""
    with seeded(seed):
        unet = UNet2DConditionModel(
            sample_size=8,
            block_out_channels=(EMBEDDED_BASE_WIDTH, 2 * EMBEDDED_BASE_WIDTH, 4 * EMBEDDED_BASE_WIDTH, 4 * EMBEDDED_BASE_WIDTH),
            layers_per_block=2,
            cross_attention_dim=SD15.context_dim,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=64,
            scaling_factor=0.18215,
        )
        text_config = CLIPTextConfig.from_json_file(str(SD15_CONFIG_DIR / "text_encoder" / "config.json"))
        text_config.num_hidden_layers, text_config.intermediate_size = 1, 512
        text_encoder = CLIPTextModel(text_config)
        image_encoder = build_vision_tower("ViT-H-14", **EMBEDDED_ENCODER)
    check_unet_layout(unet, "embedded")
    return FrozenModels(unet, vae, text_encoder, image_encoder, PromptTokenizer(), sd15_scheduler(), dtype)


@contextlib.contextmanager
def seeded(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:200] if lines else type(error).__name__
