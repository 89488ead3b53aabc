"""Helpers that call this pack's modules inside an in-process ComfyUI (the tests, the benchmarks)."""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
from dataclasses import dataclass

from .comfy_import import REPO_ROOT, import_comfy  # noqa: F401
from .comfyui_harness import build_sd15_model_patcher, sd15_unet_config  # noqa: F401
from .sdxl_models import POOLED_WIDTH, sdxl_added_conditioning

PACK_NAME = "ipadapter_sd15_pack_under_test"


def pack_module(name: str):
    """A submodule of this repository, imported as part of a package with an unrelated name.

    The package's ``__init__`` is not run, so one submodule can be tested alone;
    ``comfy_import.import_pack`` imports the whole pack as ComfyUI does.
    """
    if PACK_NAME not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK_NAME, REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)])
        sys.modules[PACK_NAME] = importlib.util.module_from_spec(spec)
    return importlib.import_module(f"{PACK_NAME}.{name}")


def noise_prediction(patcher, latent, sigma, context, cond_or_uncond=(0, 1), **conditioning):
    """ε from ComfyUI's apply_model, with the transformer options a sampler would pass.

    ``conditioning`` holds the model's extra inputs, e.g. SDXL's added conditioning ``y``.
    """
    import torch

    options = {**patcher.model_options["transformer_options"], "cond_or_uncond": list(cond_or_uncond), "sigmas": sigma}
    with torch.no_grad():
        denoised = patcher.model.apply_model(latent, sigma, c_crossattn=context, transformer_options=options, **conditioning)
    return (latent - denoised) / sigma.view(-1, 1, 1, 1)


@dataclass
class UNetInputs:
    """One batch of UNet inputs: latent, text context and, for SDXL, the added conditioning ``y``."""

    latent: "torch.Tensor"
    context: "torch.Tensor"
    y: "torch.Tensor | None" = None

    def __getitem__(self, rows) -> "UNetInputs":
        return UNetInputs(self.latent[rows], self.context[rows], None if self.y is None else self.y[rows])

    def predict(self, patcher, sigma, cond_or_uncond=(0, 1)):
        conditioning = {} if self.y is None else {"y": self.y}
        return noise_prediction(patcher, self.latent, sigma, self.context, cond_or_uncond, **conditioning)


def random_unet_inputs(patcher, context_dim: int, batch: int = 2, seed: int = 0, size=8) -> UNetInputs:
    """Random latent (``size`` or (height, width)) and text tokens; models with added conditioning get SDXL's ``y``."""
    import torch

    height, width = (size, size) if isinstance(size, int) else size
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(batch, 4, height, width, generator=generator)
    context = torch.randn(batch, 77, context_dim, generator=generator)
    y = None
    if patcher.model.adm_channels:
        pooled = torch.randn(batch, POOLED_WIDTH, generator=generator)
        y = sdxl_added_conditioning(patcher.model, pooled, 8 * height, 8 * width)
    return UNetInputs(latent, context, y)


def sigma_at(patcher, t: int = 500, batch: int = 2):
    """The model's σ of timestep ``t``, one per sample (a fresh tensor, as a sampler passes)."""
    return patcher.model.model_sampling.sigmas[t].expand(batch).clone()


def diffusers_unet_from_comfy(comfy, patcher, width: int):
    """A diffusers UNet with the same weights as a scaled-down ComfyUI SD1.5 UNet (ComfyUI's own key map)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(width, 2 * width, 4 * width, 4 * width), layers_per_block=2,
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
    )
    comfy_weights = patcher.model.diffusion_model.state_dict()
    mapping = comfy.utils.unet_to_diffusers(sd15_unet_config(width))
    state = {dk: comfy_weights[ck] for dk, ck in mapping.items() if ck in comfy_weights}  # the map lists optional layers too
    missing, unexpected = unet.load_state_dict(state, strict=False)
    assert not unexpected and not missing, (missing[:3], unexpected[:3])
    return unet.eval()


@contextlib.contextmanager
def weights_patched(patcher):
    """The patcher's weight patches (a LoRA) on the shared model, as ComfyUI loads it to sample; then off again."""
    patcher.patch_model()
    try:
        yield
    finally:
        patcher.unpatch_model()


def small_sd15_apply_setup(source: str):
    """The pack's nodes module, a small SD1.5 UNet (width 64), a random base adapter for it named ``source``, and a
    small ViT-H-layout image encoder (56 px): what the in-process Apply tests patch with."""
    from ipadapter.encoder import build_vision_tower

    from .adapter_factory import random_adapter

    nodes = pack_module("nodes")
    model = build_sd15_model_patcher(64)
    checkpoint = pack_module("ipadapter.adapter_file").IPAdapterCheckpoint.from_state_dicts(
        **random_adapter("base", base_width=64), source=source, base_width=None)
    adapter = nodes.LoadedAdapter(checkpoint, checkpoint.build_projection())
    encoder = nodes.ManagedEncoder(build_vision_tower("ViT-H-14", width=128, layers=2, head_width=64, image_size=56,
                                                      embed_dim=1024))
    return nodes, model, adapter, encoder
