"""Flux and SD3 transformers with random weights: tiny ones with the same weights in diffusers and in
ComfyUI, and full-width, shallow ones built by ComfyUI's stock detection.

The tiny pairs let a test put an IP-Adapter into ComfyUI (our patches) and into diffusers (its
loaders) and compare the velocity each predicts. Both sides run in fp32 and agree to ~1e-6.

Conventions both ``run_*`` functions share: ``sigma`` is the flow-matching time in (0, 1) and the
output is the raw transformer output (the velocity) in ComfyUI's latent layout [B, 16, H, W].

- Flux: ComfyUI's Flux takes timestep = sigma (``ModelSamplingFlux.timestep``) and guidance as the
  user sets it (3.5), and multiplies both by 1000 in its ``timestep_embedding``; diffusers'
  ``FluxTransformer2DModel`` takes the same two numbers (FluxPipeline passes ``t / 1000``) and
  multiplies them by 1000 in its ``forward``.
- SD3: both take timestep = 1000 * sigma (ComfyUI's ``ModelSamplingDiscreteFlow.timestep``; the
  scheduler's timesteps in diffusers) and embed it unscaled.

The full-width models keep the released widths (what a patch's shapes depend on) with one or two
blocks: about 1 GB each in bf16, 2 GB while loading.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .clip_vision import randomise
from .comfy_import import import_comfy

TINY_FLUX = {
    "patch_size": 1, "in_channels": 64, "num_layers": 2, "num_single_layers": 2, "attention_head_dim": 16,
    "num_attention_heads": 4, "joint_attention_dim": 32, "pooled_projection_dim": 24, "guidance_embeds": True,
    "axes_dims_rope": (4, 6, 6),
}
TINY_SD3 = {
    "sample_size": 16, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 2,
    "num_attention_heads": 2, "attention_head_dim": 64, "joint_attention_dim": 48, "caption_projection_dim": 128,
    "pooled_projection_dim": 32, "pos_embed_max_size": 16, "qk_norm": "rms_norm", "dual_attention_layers": (),
}
LATENT_CHANNELS = 16
# the released transformers' diffusers configs (black-forest-labs/FLUX.1-dev, stabilityai/stable-diffusion-3.5-large)
RELEASED_TRANSFORMERS = {
    "flux": dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                 num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                 axes_dims_rope=(16, 56, 56)),
    "sd35": dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                 num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                 pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm"),
}


def released_encoder_width(family_id: str, variant: str) -> int:
    """The width of what the released adapter's projection reads: its encoder's embedding or hidden states."""
    from ipadapter.registry import encoder_by_id, family_by_id, variant_by_name

    family = family_by_id(family_id)
    encoder = encoder_by_id(family.training.variants[variant].encoder)
    return encoder.embed_dim if variant_by_name(variant, family).encoder_input == "image_embeds" else encoder.hidden_width
FLUX_PACK = 2  # diffusers packs 2x2 latent pixels into one token; ComfyUI's Flux patchifies them itself

# The inputs ComfyUI's detection reads, at the released widths; the shapes of the rest come from ComfyUI's modules.
FLUX_DEV_PROBE = {
    "img_in.weight": (3072, 64), "txt_in.weight": (3072, 4096), "vector_in.in_layer.weight": (3072, 768),
    "guidance_in.in_layer.weight": (3072, 256),
    "double_blocks.{}.img_attn.norm.key_norm.scale": (128,), "single_blocks.{}.norm.key_norm.scale": (128,),
}
SD35_LARGE_PROBE = {
    "x_embedder.proj.weight": (2432, 16, 2, 2), "final_layer.linear.weight": (64, 2432),
    "y_embedder.mlp.0.weight": (2432, 2048), "context_embedder.weight": (2432, 4096), "pos_embed": (1, 192 * 192, 2432),
    "joint_blocks.{}.context_block.attn.qkv.weight": (3 * 2432, 2432), "joint_blocks.{}.context_block.attn.ln_q.weight": (64,),
}


@dataclass
class DiTInputs:
    """One batch for a Flux or SD3 transformer: latent [B, 16, H, W], text tokens, pooled text, σ and Flux's guidance."""

    latent: torch.Tensor
    context: torch.Tensor
    pooled: torch.Tensor
    sigma: torch.Tensor
    guidance: torch.Tensor | None = None

    def __getitem__(self, rows) -> DiTInputs:
        guidance = None if self.guidance is None else self.guidance[rows]
        return DiTInputs(self.latent[rows], self.context[rows], self.pooled[rows], self.sigma[rows], guidance)


def _random_inputs(seed, batch, size, tokens, context_dim, pooled_dim, sigma, guidance):
    height, width = (size, size) if isinstance(size, int) else size
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(batch, LATENT_CHANNELS, height, width, generator=generator)
    context = torch.randn(batch, tokens, context_dim, generator=generator)
    pooled = torch.randn(batch, pooled_dim, generator=generator)
    sigmas = torch.full((batch,), float(sigma))
    guidances = None if guidance is None else torch.full((batch,), float(guidance))
    return DiTInputs(latent, context, pooled, sigmas, guidances)


def _comfy_options(patcher, inputs, cond_or_uncond):
    """The transformer options a ComfyUI sampler passes, with the patcher's patches (``patches_replace``…)."""
    return {**patcher.model_options["transformer_options"], "cond_or_uncond": list(cond_or_uncond), "sigmas": inputs.sigma}


def _compute_dtype(patcher):
    return patcher.model.manual_cast_dtype or patcher.model.get_dtype()


def _model_patcher(comfy, model):
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def _diffusers_to_comfy_keys(comfy, state_dict):
    """A diffusers Flux/SD3 state dict in ComfyUI's keys, through ComfyUI's own map (which fuses q, k, v).

    Copies first: for the entries it transforms (``swap_scale_shift`` of the final modulation) ComfyUI's
    converter writes the result back into the tensor it was given, the diffusers model's own weight.
    """
    state = {key: tensor.detach().clone() for key, tensor in state_dict.items()}
    converted = comfy.model_detection.convert_diffusers_mmdit(state, "")
    if state:
        raise ValueError(f"ComfyUI's map has no place for {sorted(state)[:5]}")
    return converted


def _load_strict(module, state):
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"missing {missing[:5]}, unexpected {unexpected[:5]}")


# ---------------------------------------------------------------- tiny Flux


def build_diffusers_flux(seed: int = 0, **overrides):
    """A tiny Flux.1-dev-layout ``FluxTransformer2DModel`` (fp32, eval) with random weights, q/k norms included.

    ``overrides`` change ``TINY_FLUX``; keep ``patch_size`` 1 and ``in_channels`` 16 * 2 * 2, FluxPipeline's packing.
    """
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(**{**TINY_FLUX, **overrides}).float().eval()
    randomise(model, seed)
    return model


def comfy_flux_unet_config(config) -> dict:
    """ComfyUI's Flux ``unet_config`` (``FluxParams``) for a diffusers Flux config; its detection assumes full widths."""
    if config.patch_size != 1 or config.in_channels % FLUX_PACK**2:
        raise ValueError("diffusers Flux must take 2x2-packed latents (patch_size 1)")
    out_channels = config.out_channels or config.in_channels
    return {
        "image_model": "flux", "in_channels": config.in_channels // FLUX_PACK**2,
        "out_channels": out_channels // FLUX_PACK**2, "vec_in_dim": config.pooled_projection_dim,
        "context_in_dim": config.joint_attention_dim, "hidden_size": config.num_attention_heads * config.attention_head_dim,
        "mlp_ratio": 4.0, "num_heads": config.num_attention_heads, "depth": config.num_layers,
        "depth_single_blocks": config.num_single_layers, "axes_dim": list(config.axes_dims_rope), "theta": 10000,
        "patch_size": FLUX_PACK, "qkv_bias": True, "guidance_embed": config.guidance_embeds,
    }


def comfy_flux_from_diffusers(model):
    """A ComfyUI ``ModelPatcher`` around ``comfy.model_base.Flux`` (fp32) with the weights of diffusers Flux ``model``."""
    comfy = import_comfy()
    unet_config = comfy_flux_unet_config(model.config)
    model_class = comfy.supported_models.Flux if unet_config["guidance_embed"] else comfy.supported_models.FluxSchnell
    model_config = model_class(unet_config)
    model_config.set_inference_dtype(torch.float32, None)
    base = model_config.get_model({})
    _load_strict(base.diffusion_model, _diffusers_to_comfy_keys(comfy, model.state_dict()))
    return _model_patcher(comfy, base.eval())


def flux_inputs(seed: int = 0, batch: int = 2, size=8, tokens: int = 7, context_dim: int = 32, pooled_dim: int = 24,
                sigma: float = 0.6, guidance: float | None = 3.5) -> DiTInputs:
    """Random Flux inputs: latent [B, 16, H, W] (``size``: H = W, or (H, W), even), text [B, tokens, context_dim]."""
    return _random_inputs(seed, batch, size, tokens, context_dim, pooled_dim, sigma, guidance)


def run_comfy_flux(patcher, inputs: DiTInputs, cond_or_uncond=(0, 1)) -> torch.Tensor:
    """ComfyUI Flux's velocity [B, 16, H, W], the patcher's transformer options applied, as its sampler calls it."""
    dtype = _compute_dtype(patcher)
    latent, context, pooled = (tensor.to(dtype) for tensor in (inputs.latent, inputs.context, inputs.pooled))
    guidance = None if inputs.guidance is None else inputs.guidance.to(dtype)
    options = _comfy_options(patcher, inputs, cond_or_uncond)
    with torch.no_grad():
        out = patcher.model.diffusion_model(latent, inputs.sigma.float(), context, pooled, guidance, transformer_options=options)
    return out.float()


def pack_flux_latents(latent: torch.Tensor) -> torch.Tensor:
    """FluxPipeline._pack_latents: [B, C, H, W] -> [B, H/2 * W/2, C * 4]."""
    b, c, h, w = latent.shape
    packed = latent.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return packed.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_flux_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of ``pack_flux_latents``: [B, H/2 * W/2, C * 4] -> [B, C, H, W]."""
    b, _, channels = tokens.shape
    latent = tokens.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return latent.reshape(b, channels // 4, height, width)


def flux_image_ids(height: int, width: int) -> torch.Tensor:
    """FluxPipeline._prepare_latent_image_ids for a latent of H x W: [(H/2)(W/2), 3] of (0, row, column)."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] += torch.arange(height // 2)[:, None]
    ids[..., 2] += torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3)


def run_diffusers_flux(model, inputs: DiTInputs, joint_attention_kwargs=None) -> torch.Tensor:
    """diffusers Flux's velocity, unpacked to [B, 16, H, W]; ids, packing and scaling as FluxPipeline passes them."""
    height, width = inputs.latent.shape[-2:]
    with torch.no_grad():
        tokens = model(
            hidden_states=pack_flux_latents(inputs.latent), encoder_hidden_states=inputs.context,
            pooled_projections=inputs.pooled, timestep=inputs.sigma, guidance=inputs.guidance,
            img_ids=flux_image_ids(height, width), txt_ids=torch.zeros(inputs.context.shape[1], 3),
            joint_attention_kwargs=None if joint_attention_kwargs is None else dict(joint_attention_kwargs),
            return_dict=False,
        )[0]
    return unpack_flux_latents(tokens.float(), height, width)


# ---------------------------------------------------------------- tiny SD3


def build_diffusers_sd3(seed: int = 0, **overrides):
    """A tiny SD3.5-Large-layout ``SD3Transformer2DModel`` (fp32, eval; RMS q/k norms, no dual attention), random weights.

    ComfyUI reads the depth as width / 64 and makes one head of 64 per block: keep
    ``num_layers == num_attention_heads`` and ``attention_head_dim`` 64 so its detection loads the model unchanged.
    """
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel(**{**TINY_SD3, **overrides}).float().eval()
    randomise(model, seed)
    return model


def comfy_sd3_from_diffusers(model):
    """A ComfyUI ``ModelPatcher`` (``comfy.model_base.SD3``, fp32) from ``model``'s weights, configured by ComfyUI's
    own detection. That detection takes one block per head of 64; a model with another block count (a scaled-down
    SD3.5 Large keeps its 38 blocks) gets ``num_blocks`` set, as ``full_width_sd35_comfy`` does."""
    comfy = import_comfy()
    config = model.config
    if config.attention_head_dim != 64:
        raise ValueError("ComfyUI's MMDiT has heads of 64")
    state = _diffusers_to_comfy_keys(comfy, model.state_dict())
    keys = set(state)
    if config.num_layers == config.num_attention_heads:
        patcher = comfy.sd.load_diffusion_model_state_dict(state, model_options={"dtype": torch.float32})
    else:
        # ComfyUI's map swaps the last block's context modulation (shift, scale) at block depth - 1, one per
        # head: move that swap (it undoes itself) to the real last block
        width = config.num_attention_heads
        for index in (width - 1, config.num_layers - 1):
            for name in ("weight", "bias"):
                key = f"joint_blocks.{index}.context_block.adaLN_modulation.1.{name}"
                state[key] = torch.cat(state[key].chunk(2, dim=0)[::-1], dim=0)
        model_config = _shallow(comfy.model_detection.model_config_from_unet(state, ""), config.num_layers)
        model_config.set_inference_dtype(torch.float32, None)
        built = model_config.get_model(state, "")
        _load_strict(built.diffusion_model, state)
        patcher = _model_patcher(comfy, built)
    built = set(patcher.model.diffusion_model.state_dict())
    if built != keys:
        raise ValueError(f"ComfyUI built {sorted(built - keys)[:5]}, left {sorted(keys - built)[:5]}")
    return patcher


def sd3_inputs(seed: int = 0, batch: int = 2, size=8, tokens: int = 9, context_dim: int = 48, pooled_dim: int = 32,
               sigma: float = 0.6) -> DiTInputs:
    """Random SD3 inputs: latent [B, 16, H, W] (``size``: H = W, or (H, W), even), text [B, tokens, context_dim]."""
    return _random_inputs(seed, batch, size, tokens, context_dim, pooled_dim, sigma, None)


def run_comfy_sd3(patcher, inputs: DiTInputs, cond_or_uncond=(0, 1)) -> torch.Tensor:
    """ComfyUI SD3's velocity [B, 16, H, W] at timestep 1000σ (``model_sampling.timestep``), the patcher's options applied."""
    dtype = _compute_dtype(patcher)
    timestep = patcher.model.model_sampling.timestep(inputs.sigma).float()
    options = _comfy_options(patcher, inputs, cond_or_uncond)
    with torch.no_grad():
        out = patcher.model.diffusion_model(inputs.latent.to(dtype), timestep, context=inputs.context.to(dtype),
                                            y=inputs.pooled.to(dtype), transformer_options=options)
    return out.float()


def run_diffusers_sd3(model, inputs: DiTInputs, joint_attention_kwargs=None) -> torch.Tensor:
    """diffusers SD3's velocity [B, 16, H, W] at timestep 1000σ, as StableDiffusion3Pipeline passes the scheduler's t."""
    with torch.no_grad():
        out = model(
            hidden_states=inputs.latent, encoder_hidden_states=inputs.context, pooled_projections=inputs.pooled,
            timestep=1000 * inputs.sigma,
            joint_attention_kwargs=None if joint_attention_kwargs is None else dict(joint_attention_kwargs),
            return_dict=False,
        )[0]
    return out.float()


# ---------------------------------------------------------------- full width, few blocks


def _fast_fill(name: str, tensor: torch.Tensor, generator) -> torch.Tensor:
    """Cheap random values: q/k norm scales 1, matrices U(±1/√fan_in) as torch's Linear, the rest U(±0.02)."""
    if tensor.dim() == 1 and (name.endswith(".scale") or ".ln_" in name):
        return tensor.fill_(1.0)
    if tensor.dim() >= 2 and tensor.shape[0] > 1:
        bound = tensor[0].numel() ** -0.5
    else:
        bound = 0.02
    return tensor.uniform_(-bound, bound, generator=generator)


def _probe(comfy, widths: dict, blocks: dict):
    """ComfyUI's model config for a meta state dict of the inputs its detection reads, ``{}`` keys repeated per block."""
    probe = {}
    for key, shape in widths.items():
        for index in range(blocks.get(key.split(".")[0], 1)):
            probe[key.format(index)] = torch.empty(shape, device="meta")
    return comfy.model_detection.model_config_from_unet(probe, "")


def _random_state(model_config, dtype, seed: int) -> dict:
    """A random state dict with the keys and shapes of the ComfyUI model ``model_config`` builds (built on meta)."""
    model_config.set_inference_dtype(dtype, None)
    layout = model_config.get_model({}, device="meta").diffusion_model.state_dict()
    generator = torch.Generator().manual_seed(seed)
    return {key: _fast_fill(key, torch.empty(meta.shape, dtype=dtype), generator) for key, meta in layout.items()}


def _shallow(model_config, blocks: int):
    """An MMDiT model config with ``blocks`` joint blocks instead of the one per head its detection assumes."""
    model_config.unet_config["num_blocks"] = blocks
    return model_config


def full_width_flux_comfy(double: int = 1, single: int = 1, dtype=torch.bfloat16, seed: int = 0):
    """Flux.1-dev at full width (3072 = 24 heads of 128, context 4096, pooled 768, guidance on), ``double`` and
    ``single`` blocks, random weights, loaded by ``comfy.sd.load_diffusion_model_state_dict`` (stock detection)."""
    comfy = import_comfy()
    config = _probe(comfy, FLUX_DEV_PROBE, {"double_blocks": double, "single_blocks": single})
    state = _random_state(config, dtype, seed)
    patcher = comfy.sd.load_diffusion_model_state_dict(state, model_options={"dtype": dtype})
    if state:
        raise ValueError(f"ComfyUI did not load {sorted(state)[:5]}")
    return patcher


def full_width_sd35_comfy(blocks: int = 2, dtype=torch.bfloat16, seed: int = 0):
    """SD3.5 Large at full width (2432 = 38 heads of 64, context 4096, pooled 2048, RMS q/k norms), ``blocks`` joint
    blocks, random weights, detected by ComfyUI's stock detection.

    That detection derives the block count from the width (38) rather than counting blocks, so this
    follows ``comfy.sd.load_diffusion_model_state_dict`` step by step and sets ``num_blocks``.
    """
    comfy = import_comfy()
    state = _random_state(_shallow(_probe(comfy, SD35_LARGE_PROBE, {"joint_blocks": blocks}), blocks), dtype, seed)
    model_config = _shallow(comfy.model_detection.model_config_from_unet(state, ""), blocks)
    device = comfy.model_management.get_torch_device()
    model_config.set_inference_dtype(dtype, comfy.model_management.unet_manual_cast(dtype, device, model_config.supported_inference_dtypes))
    model = model_config.get_model(state, "")
    _load_strict(model.diffusion_model, state)
    return _model_patcher(comfy, model)


# ---------------------------------------------------------------- tiny model folders for the trainer

TRAINER_FLUX = {"num_layers": 19, "num_single_layers": 1}  # every double block XLabs' adapter patches
TRAINER_SD3 = {"num_layers": 38}  # every joint block InstantX's adapter patches
TINY_T5 = dict(d_kv=8, d_ff=32, num_layers=1, num_heads=2, relative_attention_num_buckets=8)
TINY_VOCAB = ["<pad>", "<unk>", "</s>", *"a an the of red green blue square circle triangle on in photo".split()]


def _tiny_tokenizer(folder, max_length: int):
    """A word-level fast tokenizer (what AutoTokenizer reads back from a model folder); no vocabulary download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(TINY_VOCAB)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", eos_token="</s>",
                                   model_max_length=max_length)
    fast.save_pretrained(str(folder))


def _tiny_clip_text(hidden: int, projection: int | None, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(TINY_VOCAB), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                            projection_dim=projection or hidden, eos_token_id=2)
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()
    randomise(model, seed, 0.2)
    return model


def _tiny_t5(width: int, seed: int):
    from transformers import T5Config, T5EncoderModel

    model = T5EncoderModel(T5Config(vocab_size=len(TINY_VOCAB), d_model=width, **TINY_T5)).eval()
    randomise(model, seed, 0.2)
    return model


def _tiny_vae(seed: int, scaling_factor: float, shift_factor: float):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(8, 16, 16, 16), layers_per_block=1, latent_channels=LATENT_CHANNELS,
                        norm_num_groups=8, sample_size=32, scaling_factor=scaling_factor, shift_factor=shift_factor)
    randomise(vae.eval(), seed, 0.05)
    return vae


def write_trainer_folder(root, family, seed: int = 0):
    """A diffusers model folder of ``family`` (a registry entry with DiT training facts) with tiny random parts:
    ``transformer/`` at full depth, ``vae/``, the family's text encoders and word-level tokenizers."""
    from pathlib import Path

    root = Path(root)
    facts = family.training
    if facts.denoiser_class.startswith("Flux"):
        transformer = build_diffusers_flux(seed, **TRAINER_FLUX)
    else:
        transformer = build_diffusers_sd3(seed, **TRAINER_SD3)
    config = transformer.config
    transformer.save_pretrained(str(root / facts.denoiser_folder))
    _tiny_vae(seed + 1, facts.vae_scaling_factor, 0.1).save_pretrained(str(root / "vae"))
    pooled = [encoder for encoder in facts.text_encoders if encoder.pooled]
    clip_widths = iter([16, 16] if len(pooled) > 1 else [config.pooled_projection_dim])
    for index, encoder in enumerate(facts.text_encoders):
        if encoder.layout == "t5":
            model = _tiny_t5(config.joint_attention_dim, seed + 10 + index)
        else:
            width = next(clip_widths)
            model = _tiny_clip_text(width, width if len(pooled) > 1 else None, seed + 10 + index)
        model.save_pretrained(str(root / encoder.folder))
        _tiny_tokenizer(root / encoder.folder.replace("text_encoder", "tokenizer"), encoder.max_length)
    return root


def write_tiny_clip_encoder(path, seed: int = 0):
    """An OpenCLIP-layout ViT (64 wide, 32-d embeddings) as a ``visual.*`` safetensors file."""
    from safetensors.torch import save_file

    from ipadapter.encoder import build_vision_tower

    torch.manual_seed(seed)
    encoder = build_vision_tower("ViT-H-14", width=64, layers=2, head_width=16, patch_size=14, embed_dim=32)
    save_file({f"visual.{k}": v.contiguous() for k, v in encoder.visual.state_dict().items()}, str(path))
    return path


def write_tiny_siglip_encoder(path, seed: int = 0):
    """A SigLIP vision tower (144 wide, heads of 72 as so400m's, 42 px) as a ``vision_model.*`` safetensors file."""
    from safetensors.torch import save_file
    from transformers import SiglipVisionConfig, SiglipVisionModel

    model = SiglipVisionModel(SiglipVisionConfig(hidden_size=144, intermediate_size=200, num_hidden_layers=3,
                                                 num_attention_heads=2, patch_size=14, image_size=42)).eval()
    randomise(model, seed)
    prefix = "vision_model."
    save_file({prefix + k.removeprefix(prefix): v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path
