"""Random-weight Flux.1 dev and SD3.5 Large model files under the names the DiT workflows load (15-17 of
``workflows/``), small enough for a CPU, and the hooks that let a test ComfyUI load them with its own loaders.

What the workflows load, and what stands in for it here (``model_files``, cached on disk):

* ``diffusion_models/flux1-dev.safetensors`` (UNETLoader): a tiny Flux with Flux.1's 19 double and 38 single
  blocks (``devtools.dit_models``: 4 heads of 16, text tokens 4096 wide, pooled text 32), in the file's own keys;
* ``checkpoints/sd3.5_large.safetensors`` (CheckpointLoaderSimple): a tiny SD3.5-Large-layout MMDiT (2 joint blocks
  of 2 heads of 64, RMS q/k norms; ComfyUI's stock detection reads one block per head of 64) and the VAE, in the
  single-file keys, loaded by the stock node as it is;
* ``vae/ae.safetensors`` (VAELoader): a 16-channel VAE at full size (ComfyUI builds its VAEs at fixed widths);
* ``text_encoders/clip_l.safetensors``, ``clip_g.safetensors``, ``t5xxl_fp16.safetensors`` (DualCLIPLoader type
  flux, TripleCLIPLoader): ComfyUI's own CLIP-L, CLIP-G and T5 classes at small widths (:data:`TEXT_ENCODERS`;
  T5 keeps 4096, the width SD3's text encoder pads CLIP's tokens to before joining T5's).

ComfyUI's detection cannot read what a tiny model needs from the tensors: Flux's head count and RoPE axes are
fixed in ``comfy/model_detection.py``, the text encoders' widths come from JSON configs. Each such file carries
the missing facts as JSON in its safetensors metadata (:data:`HARNESS_KEY`), and :func:`install_loader_hooks`,
run by a test-only custom node pack in the server (``devtools.comfyui_harness.start_dit_server``), hands them
to ComfyUI: the detected Flux config gets the file's head count and RoPE axes; ``comfy.sd.load_clip`` gets the
files' text encoder configs as ``model_options`` (``<name>_model_config``, which ComfyUI's ``SDClipModel`` merges
into its config, and which its long-CLIP check, rewriting that entry, keeps). Files without the key load exactly
as before; the loader nodes, the sampler and everything else of a graph run unchanged.

:func:`write_adapters_and_encoders` writes random XLabs v2, InstantX Flux and InstantX SD3.5 adapters
(``devtools.dit_adapters``) and CLIP ViT-L / SigLIP image encoders, scaled to these models, under the names the
workflows use.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

HARNESS_KEY = "ipadapter_kit_harness"  # safetensors metadata: JSON {"unet_config": {...}} or {"model_options": {...}}
FORMAT_VERSION = 1  # bump when a file's content changes

# ComfyUI's text encoders at small widths: "<model_name>_model_config" entries of model_options (comfy/sd1_clip.py
# merges them into the JSON config). ComfyUI tells CLIP-G from CLIP-L by a 31st layer, so CLIP-G keeps 32; SD3
# reads CLIP-L's penultimate layer, which needs 3.
CLIP_L_WIDTH, CLIP_G_PROJECTION, T5_WIDTH = 32, 32, 4096
TEXT_ENCODERS = {
    "clip_l": {"hidden_size": CLIP_L_WIDTH, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 3,
               "projection_dim": CLIP_L_WIDTH},
    "clip_g": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 32,
               "projection_dim": CLIP_G_PROJECTION},
    "t5xxl": {"d_model": T5_WIDTH, "d_ff": 32, "d_kv": 8, "num_heads": 2, "num_layers": 2},
}
# Flux: FluxClipModel gives T5's tokens and CLIP-L's pooled output (its width: no projection)
FLUX = dict(num_layers=19, num_single_layers=38, joint_attention_dim=T5_WIDTH, pooled_projection_dim=CLIP_L_WIDTH)
# SD3: CLIP-L's and CLIP-G's tokens side by side, padded to 4096 and joined with T5's; pooled: CLIP-L's + CLIP-G's
SD3 = dict(num_layers=2, num_attention_heads=2, joint_attention_dim=T5_WIDTH,
           pooled_projection_dim=CLIP_L_WIDTH + CLIP_G_PROJECTION)
VAE_DDCONFIG = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}

# the image encoders, scaled down (the adapters below are made for their widths)
CLIP_L_ENCODER_SHAPE = dict(width=64, layers=2, heads=2, patch=14, image=224, embed_dim=48)
SIGLIP_ENCODER_SHAPE = dict(hidden_size=144, intermediate_size=200, num_hidden_layers=3, num_attention_heads=2,
                            patch_size=14, image_size=42)  # 72-wide heads, as so400m's
XLABS_CONTEXT = INSTANTX_CONTEXT = 64  # the adapters' image-token width (the released files: 4096)


# -- the model files -------------------------------------------------------------------------------------------

def _harness_metadata(facts: dict) -> dict:
    return {"format": "pt", HARNESS_KEY: json.dumps(facts, sort_keys=True)}


def text_encoder_state(name: str, seed: int) -> dict:
    """ComfyUI's own CLIP-L / CLIP-G / T5-XXL class at the widths of :data:`TEXT_ENCODERS`, random weights, in the
    keys of the released single files (``text_model.*``, ``encoder.block.*``, ``shared.weight``)."""
    import torch

    from .comfy_import import import_comfy, random_module

    import_comfy()
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.text_encoders.sd3_clip

    options = {f"{name}_model_config": dict(TEXT_ENCODERS[name])}
    build = {"clip_l": lambda: comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32, model_options=options),
             "clip_g": lambda: comfy.sdxl_clip.SDXLClipG(device="cpu", dtype=torch.float32, model_options=options),
             "t5xxl": lambda: comfy.text_encoders.sd3_clip.T5XXLModel(device="cpu", dtype=torch.float32,
                                                                      model_options=options)}[name]
    return dict(random_module(build, seed).transformer.state_dict())


def vae_state(seed: int) -> dict:
    """A 16-channel VAE (Flux's and SD3's layout: no quant convs) with random weights, in ``ae.safetensors``' keys."""
    from .comfy_import import import_comfy, random_module

    import_comfy()
    from comfy.ldm.models.autoencoder import AutoencodingEngine

    def build():
        return AutoencodingEngine(
            regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
            encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": dict(VAE_DDCONFIG)},
            decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": dict(VAE_DDCONFIG)})

    return dict(random_module(build, seed).state_dict())


def flux_state(seed: int) -> tuple[dict, dict]:
    """The tiny Flux's weights in ComfyUI's (BFL's) keys, and what ComfyUI's detection must be told of it."""
    from . import dit_models
    from .comfy_import import import_comfy

    comfy = import_comfy()
    model = dit_models.build_diffusers_flux(seed, **FLUX)
    config = dit_models.comfy_flux_unet_config(model.config)
    state = dict(dit_models.comfy_flux_from_diffusers(model).model.diffusion_model.state_dict())
    told = {"num_heads": config["num_heads"], "axes_dim": config["axes_dim"]}  # fixed to Flux.1's in its detection
    detected = comfy.model_detection.detect_unet_config(state, "")
    if {**detected, **told} != {**detected, **config}:
        raise RuntimeError(f"ComfyUI detects {detected}; with {told} that is not the model's {config}")
    return state, told


def sd3_state(seed: int) -> dict:
    """The tiny SD3.5-Large-layout MMDiT's weights in ComfyUI's keys (stock detection loads it as it is)."""
    from . import dit_models

    model = dit_models.build_diffusers_sd3(seed, **SD3)
    return dict(dit_models.comfy_sd3_from_diffusers(model).model.diffusion_model.state_dict())


def _save(path: Path, tensors: dict, dtype=None, metadata: dict | None = None) -> Path:
    import torch
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
               for k, v in tensors.items()}
    if not all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point()):
        raise RuntimeError(f"non-finite weights for {path.name}")
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")  # concurrent writers do not collide
    save_file(tensors, str(partial), metadata=metadata or {"format": "pt"})
    partial.rename(path)
    return path


def model_files(seed: int = 0) -> dict[str, dict[str, Path]]:
    """The model files of the DiT workflows, ``{model folder: {name the workflows use: path}}``, written on first
    use into the test cache (``<cache>/dit-workflows-v<version>-seed<seed>/``, ~0.6 GB: the full-size VAE twice,
    T5's 32128 x 4096 token table in fp16)."""
    import torch

    from .comfyui_setup import cache_root
    from .workflow_tools import CLIP_G_TEXT, CLIP_L_TEXT, FLUX_MODEL, FLUX_VAE, SD35_CHECKPOINT, T5XXL_TEXT

    folder = cache_root() / f"dit-workflows-v{FORMAT_VERSION}-seed{seed}"
    files = {"diffusion_models": {FLUX_MODEL: folder / FLUX_MODEL},
             "checkpoints": {SD35_CHECKPOINT: folder / SD35_CHECKPOINT},
             "vae": {FLUX_VAE: folder / FLUX_VAE},
             "text_encoders": {CLIP_L_TEXT: folder / CLIP_L_TEXT, CLIP_G_TEXT: folder / CLIP_G_TEXT,
                               T5XXL_TEXT: folder / T5XXL_TEXT}}
    for name, encoder in [(CLIP_L_TEXT, "clip_l"), (CLIP_G_TEXT, "clip_g"), (T5XXL_TEXT, "t5xxl")]:
        target = files["text_encoders"][name]
        if not target.is_file():
            _save(target, text_encoder_state(encoder, seed + 1), torch.float16,
                  _harness_metadata({"model_options": {f"{encoder}_model_config": TEXT_ENCODERS[encoder]}}))
    if not files["diffusion_models"][FLUX_MODEL].is_file():
        state, told = flux_state(seed + 2)
        _save(files["diffusion_models"][FLUX_MODEL], state, torch.float32, _harness_metadata({"unet_config": told}))
    vae_path, checkpoint_path = files["vae"][FLUX_VAE], files["checkpoints"][SD35_CHECKPOINT]
    if not vae_path.is_file() or not checkpoint_path.is_file():
        vae = vae_state(seed + 3)
        if not vae_path.is_file():
            _save(vae_path, vae, torch.float16)
        if not checkpoint_path.is_file():
            single_file = {**{f"model.diffusion_model.{k}": v for k, v in sd3_state(seed + 4).items()},
                           **{f"first_stage_model.{k}": v.half() for k, v in vae.items()}}
            _save(checkpoint_path, single_file)
    return files


def link_model_files(models_dir: Path, seed: int = 0) -> None:
    """Link the model files into a ComfyUI's ``models/`` folders under the workflows' names."""
    for folder, names in model_files(seed).items():
        (models_dir / folder).mkdir(parents=True, exist_ok=True)
        for name, path in names.items():
            link = models_dir / folder / name
            if not link.exists():
                link.symlink_to(path)


# -- adapters and image encoders -------------------------------------------------------------------------------

def write_adapters_and_encoders(models_dir: Path, seed: int = 0) -> None:
    """Random XLabs v2, InstantX Flux and InstantX SD3.5 adapters made for the tiny models, and the CLIP ViT-L /
    SigLIP image encoders they take, under the workflows' names in ``models/ipadapter`` and ``models/clip_vision``
    (a few MB; the encoders in the transformers format of Comfy-Org's files)."""
    import torch
    from safetensors.torch import save_file

    from . import dit_adapters
    from .clip_vision import transformers_model
    from .dit_models import TINY_FLUX
    from .workflow_tools import CLIP_L_ENCODER, INSTANTX_FLUX_ADAPTER, SD35_ADAPTER, SIGLIP_ENCODER, XLABS_ADAPTER

    ipadapter, clip_vision = models_dir / "ipadapter", models_dir / "clip_vision"
    for folder in (ipadapter, clip_vision):
        folder.mkdir(parents=True, exist_ok=True)
    clip_l = transformers_model(**CLIP_L_ENCODER_SHAPE, seed=seed + 5, activation="quick_gelu")
    save_file({k: v.contiguous() for k, v in clip_l.state_dict().items()}, str(clip_vision / CLIP_L_ENCODER))
    siglip = siglip_model(seed + 6)
    save_file(siglip_tensors(siglip), str(clip_vision / SIGLIP_ENCODER))

    flux_width = TINY_FLUX["num_attention_heads"] * TINY_FLUX["attention_head_dim"]
    save_file(dit_adapters.xlabs_file_tensors(16, XLABS_CONTEXT, flux_width, CLIP_L_ENCODER_SHAPE["embed_dim"],
                                              seed=seed + 7), str(ipadapter / XLABS_ADAPTER))
    torch.save(dit_adapters.instantx_flux_state(128, INSTANTX_CONTEXT, flux_width, SIGLIP_ENCODER_SHAPE["hidden_size"],
                                                seed=seed + 8), ipadapter / INSTANTX_FLUX_ADAPTER)
    sd3_width = SD3["num_attention_heads"] * 64
    torch.save(dit_adapters.sd35_state(sd3_width, SD3["num_attention_heads"], SIGLIP_ENCODER_SHAPE["hidden_size"],
                                       dim=128, seed=seed + 9), ipadapter / SD35_ADAPTER)


def siglip_model(seed: int):
    """A SigLIP vision tower (transformers' ``SiglipVisionModel``, with its pooling head) of
    :data:`SIGLIP_ENCODER_SHAPE`, random weights."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from .clip_vision import randomise

    model = SiglipVisionModel(SiglipVisionConfig(**SIGLIP_ENCODER_SHAPE, vision_use_head=True)).eval()
    randomise(model, seed)
    return model


def siglip_tensors(model) -> dict:
    """The tower's tensors under ``vision_model.`` (transformers 4 keeps that prefix in the model, 5 drops it)."""
    prefix = "vision_model."
    return {prefix + k.removeprefix(prefix): v.contiguous() for k, v in model.state_dict().items()}


# -- inside the test ComfyUI ---------------------------------------------------------------------------------------

def harness_facts(metadata: dict | None) -> dict:
    """The :data:`HARNESS_KEY` entry of a file's safetensors metadata, ``{}`` when it has none."""
    text = (metadata or {}).get(HARNESS_KEY)
    return json.loads(text) if text else {}


def file_metadata(path) -> dict:
    if not str(path).endswith((".safetensors", ".sft")):
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as file:
        return file.metadata() or {}


def install_loader_hooks() -> None:
    """Teach the ComfyUI of this process the facts its detection cannot read from these files' tensors (once).

    ``comfy.model_detection.detect_unet_config``: the detected config, updated with the file's ``unet_config``.
    ``comfy.sd.load_clip``: ``model_options`` updated with the files' ``model_options``, which
    ``comfy.text_encoders.long_clipl.model_options_long_clip`` (it rewrites a CLIP's ``<name>_model_config`` with
    the position count it reads from the file) keeps. All three are the stock functions for files without
    :data:`HARNESS_KEY`."""
    import comfy.model_detection
    import comfy.sd
    import comfy.text_encoders.long_clipl

    if getattr(comfy.sd.load_clip, HARNESS_KEY, False):
        return
    detect_unet_config = comfy.model_detection.detect_unet_config
    load_clip = comfy.sd.load_clip
    model_options_long_clip = comfy.text_encoders.long_clipl.model_options_long_clip

    def detect_with_file_facts(state_dict, key_prefix, metadata=None):
        config = detect_unet_config(state_dict, key_prefix, metadata=metadata)
        told = harness_facts(metadata).get("unet_config")
        return {**config, **told} if config is not None and told else config

    def load_clip_with_file_facts(ckpt_paths, embedding_directory=None, clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION,
                                  model_options={}):
        told = {}
        for path in ckpt_paths:
            told.update(harness_facts(file_metadata(path)).get("model_options", {}))
        if told:
            model_options = {**model_options, **told, HARNESS_KEY: told}
        return load_clip(ckpt_paths, embedding_directory=embedding_directory, clip_type=clip_type,
                         model_options=model_options)

    def long_clip_keeping_file_facts(sd, tokenizer_data, model_options):
        tokenizer_data, model_options = model_options_long_clip(sd, tokenizer_data, model_options)
        told = model_options.get(HARNESS_KEY)
        if told:
            model_options = {**model_options, **{key: {**config, **model_options.get(key, {})}
                                                 for key, config in told.items()}}
        return tokenizer_data, model_options

    setattr(load_clip_with_file_facts, HARNESS_KEY, True)
    comfy.model_detection.detect_unet_config = detect_with_file_facts
    comfy.sd.load_clip = load_clip_with_file_facts
    comfy.text_encoders.long_clipl.model_options_long_clip = long_clip_keeping_file_facts
