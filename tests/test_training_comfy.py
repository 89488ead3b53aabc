"""The trainer's export, loaded by our ComfyUI loader node, patches a real ComfyUI UNet
to give the training model's noise prediction."""
import torch

from devtools.comfy_inprocess import build_sd15_model_patcher, diffusers_unet_from_comfy, noise_prediction, pack_module
from training.adapter import IPAdapterModel
from training.checkpointing import export_adapter

WIDTH = 64


def test_export_loads_in_the_comfyui_loader_node_and_gives_the_training_models_output(comfy, tmp_path):
    import comfy.utils  # noqa: F401
    import folder_paths

    nodes = pack_module("nodes")
    patcher_module = pack_module("patcher")
    image_prompt = pack_module("ipadapter.image_prompt")
    patcher = build_sd15_model_patcher(WIDTH, seed=3)
    generator = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        training_model = IPAdapterModel(diffusers_unet_from_comfy(comfy, patcher, WIDTH), embed_dim=1024).eval()
    with torch.no_grad():  # trained-looking weights
        for parameter in training_model.trainable_parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    export_adapter(training_model, tmp_path / "trained_adapter.safetensors", 10, "config: test", dtype="fp32")

    folder_paths.add_model_folder_path(nodes.MODEL_FOLDER, str(tmp_path))
    (adapter,) = nodes.IPAdapterKitLoader().load("trained_adapter.safetensors")
    image_embeds = torch.randn(1, 1024, generator=generator) * 3
    images = image_prompt.EncodedImages(image_embeds, torch.zeros(1, 257, 1280))
    cond, uncond = image_prompt.image_tokens(adapter.checkpoint, adapter.projection, images, None)
    term = patcher_module.ImagePromptTerm.build(adapter.checkpoint, cond, uncond, 1.0, {}, 1e9, 0.0)
    patched = patcher_module.apply_image_prompt(patcher, term)

    latent = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 77, 768, generator=generator)
    t = 400
    sigma = patcher.model.model_sampling.sigmas[t].expand(2).clone()
    from_comfy = noise_prediction(patched, latent, sigma, context, cond_or_uncond=(0, 1))

    # the training model: the conditional sample gets the image, the unconditional one a zero embedding
    scaled = latent / (sigma.view(-1, 1, 1, 1) ** 2 + 1) ** 0.5
    embeds = torch.cat([image_embeds, torch.zeros_like(image_embeds)])
    with torch.no_grad():
        from_training = training_model(scaled, torch.tensor([t, t]), context, embeds)
        text_only = training_model(scaled, torch.tensor([t, t]), context, embeds, scale=0.0)
    relative = (from_comfy - from_training).norm() / from_training.norm()
    assert relative <= 1e-4, relative
    assert (from_training - text_only).norm() / from_training.norm() > 1e-2  # the image prompt matters here
