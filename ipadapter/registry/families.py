"""The model families, one entry each: everything the nodes and the trainer know of a family.

A new family is one more entry here (and ``FAMILIES``); a new kind of model also adds its
:class:`AttachKind` once (UNet cross-attention; DiT blocks).
"""
from __future__ import annotations

from .schema import AttachKind, DiTVariant, Family, TextEncoder, Training, dit_layers, unet_layers

UNET_CROSS_ATTENTION = AttachKind("UNet cross-attention", "attn2", ("input", "middle", "output"),
                                  "cross-attention layers")
# A DiT's image term rides on its transformer blocks: ComfyUI's patches_replace["dit"] replaces a whole block
DIT_BLOCKS = AttachKind("DiT blocks", "dit", ("double_block", "single_block"), "transformer blocks")

# SD1.5 and SDXL train on the same DDPM schedule (the authors' scripts keep it for both)
LDM_NOISE_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          prediction_type="epsilon", clip_sample=False, steps_offset=1)
CLIP_L = dict(name="CLIP ViT-L/14 text encoder", folder="text_encoder", layout="clip", width=768)
# The DiTs' encoders as their single files bundle them (ComfyUI's names); T5-XXL v1.1's encoder gives the text tokens
DIT_CLIP_L = dict(CLIP_L, single_file_prefix="text_encoders.clip_l.transformer.")
T5_XXL = dict(name="T5-XXL text encoder", layout="t5", width=4096, hidden_layer=-1,
              single_file_prefix="text_encoders.t5xxl.transformer.")

SD15 = Family(
    id="sd15",
    name="SD1.5",
    attach=UNET_CROSS_ATTENTION,
    layers=unet_layers([
        ("down_blocks.0.attentions.0", ("input", 1), 1, 1),
        ("down_blocks.0.attentions.1", ("input", 2), 1, 1),
        ("down_blocks.1.attentions.0", ("input", 4), 1, 2),
        ("down_blocks.1.attentions.1", ("input", 5), 1, 2),
        ("down_blocks.2.attentions.0", ("input", 7), 1, 4),
        ("down_blocks.2.attentions.1", ("input", 8), 1, 4),
        ("up_blocks.1.attentions.0", ("output", 3), 1, 4),
        ("up_blocks.1.attentions.1", ("output", 4), 1, 4),
        ("up_blocks.1.attentions.2", ("output", 5), 1, 4),
        ("up_blocks.2.attentions.0", ("output", 6), 1, 2),
        ("up_blocks.2.attentions.1", ("output", 7), 1, 2),
        ("up_blocks.2.attentions.2", ("output", 8), 1, 2),
        ("up_blocks.3.attentions.0", ("output", 9), 1, 1),
        ("up_blocks.3.attentions.1", ("output", 10), 1, 1),
        ("up_blocks.3.attentions.2", ("output", 11), 1, 1),
        ("mid_block.attentions.0", ("middle", 0), 1, 4),
    ], base_width=320),
    context_dim=768,
    base_width=320,
    resampler_width=768,
    encoders=("vit-h",),
    released_adapters={
        "light": ("ip-adapter_sd15_light_v11", "ip-adapter_sd15_light"),
        "standard": ("ip-adapter_sd15",),
        "vit-bigg": ("ip-adapter_sd15_vit-g",),
        "plus": ("ip-adapter-plus_sd15",),
        "plus-face": ("ip-adapter-plus-face_sd15",),
        "full-face": ("ip-adapter-full-face_sd15",),
        "faceid": ("ip-adapter-faceid_sd15",),
        "faceid-plus": ("ip-adapter-faceid-plus_sd15",),
        "faceid-plusv2": ("ip-adapter-faceid-plusv2_sd15",),
        "faceid-portrait": ("ip-adapter-faceid-portrait-v11_sd15", "ip-adapter-faceid-portrait_sd15"),
    },
    # as cubiq's ComfyUI_IPAdapter_plus defines them for SD1.5 (by transformer_index 0-3, 9-15 and 4, 5): the
    # first two down levels and the last up levels carry style, down_blocks.2 the layout
    style_blocks=(("input", 1), ("input", 2), ("input", 4), ("input", 5), *(("output", i) for i in range(5, 12))),
    composition_blocks={("input", 7): 0.25, ("input", 8): 1.0},
    training=Training(
        text_encoders=(TextEncoder(**CLIP_L, single_file_prefix="cond_stage_model.transformer.", hidden_layer=-1),),
        vae_scaling_factor=0.18215,
        time_ids=False,
        resolution=512,
        noise_schedule=LDM_NOISE_SCHEDULE,
        prediction="epsilon",
        embedded_unet=dict(sample_size=8, width_multipliers=(1, 2, 4, 4), layers_per_block=2, heads=8, norm_num_groups=8),
    ),
)

SDXL = Family(
    id="sdxl",
    name="SDXL",
    attach=UNET_CROSS_ATTENTION,
    layers=unet_layers([
        ("down_blocks.1.attentions.0", ("input", 4), 2, 2),
        ("down_blocks.1.attentions.1", ("input", 5), 2, 2),
        ("down_blocks.2.attentions.0", ("input", 7), 10, 4),
        ("down_blocks.2.attentions.1", ("input", 8), 10, 4),
        ("up_blocks.0.attentions.0", ("output", 0), 10, 4),
        ("up_blocks.0.attentions.1", ("output", 1), 10, 4),
        ("up_blocks.0.attentions.2", ("output", 2), 10, 4),
        ("up_blocks.1.attentions.0", ("output", 3), 2, 2),
        ("up_blocks.1.attentions.1", ("output", 4), 2, 2),
        ("up_blocks.1.attentions.2", ("output", 5), 2, 2),
        ("mid_block.attentions.0", ("middle", 0), 10, 4),
    ], base_width=320),
    context_dim=2048,
    base_width=320,
    resampler_width=1280,
    encoders=("vit-bigg", "vit-h"),
    released_adapters={
        "standard": ("ip-adapter_sdxl_vit-h",),
        "vit-bigg": ("ip-adapter_sdxl",),
        "plus": ("ip-adapter-plus_sdxl_vit-h",),
        "plus-face": ("ip-adapter-plus-face_sdxl_vit-h",),
        "faceid": ("ip-adapter-faceid_sdxl",),
        "faceid-plusv2": ("ip-adapter-faceid-plusv2_sdxl",),
        "faceid-portrait": ("ip-adapter-faceid-portrait_sdxl",),
        "faceid-portrait-unnorm": ("ip-adapter-faceid-portrait_sdxl_unnorm",),
    },
    # InstantStyle: up_blocks.0.attentions.1 (keys 69-87) carries style, down_blocks.2.attentions.1 (keys 29-47) layout
    style_blocks=(("output", 1),),
    composition_blocks={("input", 8): 1.0},
    training=Training(
        text_encoders=(
            TextEncoder(**CLIP_L, single_file_prefix="conditioner.embedders.0.transformer.", hidden_layer=-2),
            TextEncoder(name="OpenCLIP ViT-bigG/14 text encoder", folder="text_encoder_2", single_file_prefix="conditioner.embedders.1.model.", layout="open_clip",
                        width=1280, hidden_layer=-2, pooled=True, pad_id=0),
        ),
        vae_scaling_factor=0.13025,
        time_ids=True,
        resolution=1024,
        noise_schedule=LDM_NOISE_SCHEDULE,
        prediction="epsilon",
        embedded_unet=dict(
            sample_size=8, width_multipliers=(1, 2, 4), layers_per_block=2, head_width=64, norm_num_groups=32,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256,
        ),
    ),
)

FLUX_DOUBLE_BLOCKS, FLUX_SINGLE_BLOCKS = 19, 38

# Flux.1 dev / schnell: 19 double-stream blocks (image and text apart), then 38 single-stream blocks. The released
# adapters: XLabs' (CLIP ViT-L/14, 4 or 16 tokens, double blocks only) and InstantX's (SigLIP, 128 tokens, all 57).
FLUX = Family(
    id="flux",
    name="Flux.1",
    attach=DIT_BLOCKS,
    layers=dit_layers([("transformer_blocks", "double_block", FLUX_DOUBLE_BLOCKS),
                       ("single_transformer_blocks", "single_block", FLUX_SINGLE_BLOCKS)], width=3072),
    context_dim=4096,  # T5-XXL: the adapters' image tokens are as wide as the text tokens
    base_width=3072,
    resampler_width=0,
    encoders=("clip-l", "siglip"),
    released_adapters={
        "flux-xlabs": ("flux-ip-adapter-v2", "ip_adapter", "xlabs-flux-ip-adapter-v2", "flux-ip-adapter",
                       "xlabs-flux-ip-adapter"),
        "flux-instantx": ("flux.1-dev-ip-adapter", "instantx-flux-ip-adapter", "flux-instantx-ip-adapter",
                          "ip-adapter_flux", "ip-adapter"),
    },
    style_blocks=(),
    composition_blocks={},
    # as diffusers' Flux examples train: T5's 512 tokens as the text, CLIP's pooled output as the vector input, the
    # dev model's distilled guidance at 3.5, noise levels shifted by the image's token count (FLUX.1-dev's
    # scheduler config)
    training=Training(
        text_encoders=(TextEncoder(**DIT_CLIP_L, hidden_layer=-1, pooled=True, in_context=False),
                       TextEncoder(**T5_XXL, folder="text_encoder_2", max_length=512)),
        vae_scaling_factor=0.3611,
        time_ids=False,
        resolution=1024,
        noise_schedule=dict(sampling="shifted", base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                            max_image_seq_len=4096),
        prediction="flow",
        embedded_unet={},
        denoiser_folder="transformer",
        denoiser_class="FluxTransformer2DModel",
        latent_packing=2,
        guidance=3.5,
        # XLabs v2 (16 tokens) by default, v1 with model.num_tokens 4; inference's unconditional image is a black one.
        # InstantX: SigLIP's pooled output to 128 tokens; unconditionally a zero embedding, what our nodes give a
        # pooled-embedding adapter (InstantX's own node runs no unconditional image prompt)
        variants={"xlabs": DiTVariant(encoder="clip-l", dropped_image="black", tokens=(16, 4), file_layout="xlabs"),
                  "instantx": DiTVariant(encoder="siglip", dropped_image="zeros", tokens=(128,),
                                         file_layout="ip-adapter")},
    ),
    # structural ranges, no claim about what each carries: the double blocks see image and text apart (the only
    # ones XLabs' adapter patches), the single blocks the joint sequence
    block_presets={"double blocks": tuple(("double_block", i) for i in range(FLUX_DOUBLE_BLOCKS)),
                   "single blocks": tuple(("single_block", i) for i in range(FLUX_SINGLE_BLOCKS))},
)

SD35_BLOCKS = 38

# SD3.5 Large: 38 joint (MMDiT) blocks, 38 heads of 64. InstantX's adapter: SigLIP hidden states through a
# timestep-conditioned Resampler to 64 tokens as wide as the model, on every block.
SD35 = Family(
    id="sd35",
    name="SD3.5 Large",
    attach=DIT_BLOCKS,
    layers=dit_layers([("transformer_blocks", "double_block", SD35_BLOCKS)], width=2432),
    context_dim=4096,
    base_width=2432,
    resampler_width=1280,
    encoders=("siglip",),
    released_adapters={"sd35-instantx": ("sd3.5-large-ip-adapter", "instantx-sd3.5-large-ip-adapter",
                                         "ip-adapter_sd35", "ip-adapter")},
    style_blocks=(),
    composition_blocks={},
    # as diffusers' SD3 examples train: both CLIPs' penultimate states side by side, padded to T5's width, then T5's
    # tokens; their pooled outputs joined; logit-normal noise levels through the schedule's shift of 3
    training=Training(
        text_encoders=(TextEncoder(**DIT_CLIP_L, hidden_layer=-2, pooled=True),
                       TextEncoder(name="OpenCLIP ViT-bigG/14 text encoder", folder="text_encoder_2", layout="clip",
                                   width=1280, hidden_layer=-2, pooled=True,
                                   single_file_prefix="text_encoders.clip_g.transformer."),
                       TextEncoder(**T5_XXL, folder="text_encoder_3", max_length=256)),
        vae_scaling_factor=1.5305,
        time_ids=False,
        resolution=1024,
        noise_schedule=dict(sampling="logit_normal", logit_mean=0.0, logit_std=1.0, shift=3.0),
        prediction="flow",
        embedded_unet={},
        denoiser_folder="transformer",
        denoiser_class="SD3Transformer2DModel",
        # InstantX's and diffusers' SD3 pipelines use all-zero SigLIP states as the unconditional image
        variants={"instantx": DiTVariant(encoder="siglip", dropped_image="zeros", timestep_width=320)},
    ),
    image_token_width=2432,
    block_presets={"first half": tuple(("double_block", i) for i in range(SD35_BLOCKS // 2)),
                   "second half": tuple(("double_block", i) for i in range(SD35_BLOCKS // 2, SD35_BLOCKS))},
)

FAMILIES: tuple[Family, ...] = (SD15, SDXL, FLUX, SD35)

# Base models that look like a family's but take no IP-Adapter here: (what tells them, what they are).
UNSUPPORTED_SINGLE_FILES = (
    ("conditioner.embedders.0.model.", "an SDXL refiner checkpoint (OpenCLIP bigG only, no CLIP-L), not a base model"),
    ("cond_stage_model.model.", "an SD2.x checkpoint (OpenCLIP ViT-H text encoder), which the trainer does not support"),
)
UNSUPPORTED_CONTEXT_WIDTHS = {1024: "an SD2.x model folder", 1280: "an SDXL refiner model folder"}
