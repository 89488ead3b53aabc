"""Sampling through ComfyUI: the base UNet as a ComfyUI SD1.5 model, our nodes for the image prompt,
ComfyUI's KSampler node for the denoising loop.

Runs ComfyUI's ``comfy`` package in this process on the CPU (the pinned copy the tests use, or
``COMFYUI_PATH``), and imports this repository as a custom-node pack the way ComfyUI does
(``devtools.comfy_import``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class ComfySampler:
    """ComfyUI model + our pack's nodes, with the adapter and encoder files registered in ComfyUI's model folders."""

    def __init__(self, unet, vae, adapter_file: Path, encoder_file: Path):
        from devtools.comfy_import import import_comfy, import_pack

        self.comfy = comfy = import_comfy()
        pack = import_pack()
        import comfy.latent_formats
        import folder_paths
        import nodes as comfyui_nodes  # ComfyUI's own nodes.py (its folder is first on sys.path)

        comfy.utils.PROGRESS_BAR_ENABLED = False
        if not hasattr(comfyui_nodes, "KSampler"):
            raise RuntimeError(f"'nodes' resolved to {comfyui_nodes.__file__}, not ComfyUI's nodes.py")
        self.nodes = pack.NODE_CLASS_MAPPINGS
        self.ksampler = comfyui_nodes.KSampler()
        folder_paths.add_model_folder_path("ipadapter", str(Path(adapter_file).parent))
        folder_paths.add_model_folder_path("clip_vision", str(Path(encoder_file).parent))
        self.adapter_name, self.encoder_name = Path(adapter_file).name, Path(encoder_file).name
        self.vae = vae
        self.model = self._comfy_model(unet, vae.config.scaling_factor)
        (self.adapter,) = self.nodes["IPAdapterKitLoader"]().load(self.adapter_name)
        (self.encoder,) = self.nodes["IPAdapterKitEncoderLoader"]().load(self.encoder_name)

    def _comfy_model(self, unet, scaling_factor: float):
        """ComfyUI's SD1.5 model class with the UNet's config (ComfyUI's detection assumes full size), weights mapped by ComfyUI's own key map."""
        comfy = self.comfy
        width = unet.config.block_out_channels[0]
        from devtools.comfyui_harness import sd15_unet_config

        unet_config = sd15_unet_config(width)
        model_config = comfy.supported_models.SD15(unet_config)
        model_config.set_inference_dtype(torch.float32, None)
        model = model_config.get_model({})
        mapping = comfy.utils.unet_to_diffusers(unet_config)  # diffusers name -> ComfyUI name
        weights = unet.state_dict()
        state = {comfy_key: weights[name] for name, comfy_key in mapping.items() if name in weights}
        missing, unexpected = model.diffusion_model.load_state_dict(state, strict=False)
        if missing or unexpected or len(state) != len(weights):
            raise RuntimeError(f"UNet -> ComfyUI mapping incomplete: missing {missing[:3]}, unexpected {unexpected[:3]}, "
                               f"{len(weights) - len(state)} diffusers weights unmapped")
        model.latent_format = comfy.latent_formats.SD15(scale_factor=scaling_factor)  # this VAE's, not SD1.5's 0.18215
        model.eval()
        device = comfy.model_management.get_torch_device()
        return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=comfy.model_management.unet_offload_device())

    def sample(self, reference: np.ndarray, positive: torch.Tensor, negative: torch.Tensor, weight: float, count: int,
               seed: int, steps: int, cfg: float, sampler: str = "euler", scheduler: str = "normal") -> np.ndarray:
        """``count`` images [count, H, W, 3] uint8 for one reference (uint8 [H, W, 3]) and text context at λ = weight."""
        image = torch.from_numpy(np.array(reference)).float().div(255)[None]  # a copy: the reference may be read-only
        (embeds,) = self.nodes["IPAdapterKitEncode"]().encode(self.encoder, image, "crop")
        (model,) = self.nodes["IPAdapterKitApply"]().apply(
            self.model, self.adapter, weight, 0.0, 1.0, "average", "all", "", embeds=embeds)
        size = reference.shape[0] // 8
        latent = {"samples": torch.zeros(count, 4, size, size)}
        (out,) = self.ksampler.sample(model, seed, steps, cfg, sampler, scheduler,
                                      [[positive, {}]], [[negative, {}]], latent, denoise=1.0)
        with torch.no_grad():  # KSampler's output is the VAE's own latent (ComfyUI divides by the scale factor)
            decoded = self.vae.decode(out["samples"].float()).sample
        return ((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
