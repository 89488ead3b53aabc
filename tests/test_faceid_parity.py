"""FaceID in ComfyUI gives diffusers' noise prediction (fp32, scaled-down SD1.5 and SDXL UNets with the same
weights): the same face embedding (and, for plusv2, the same crop features and shortcut scale) through our
tokens, our attn2 patches and our LoRA weight patches, against diffusers' ``_load_ip_adapter_weights`` (what
``load_ip_adapter`` calls), ``ip_adapter_image_embeds`` and the plus projection's ``clip_embeds`` / ``shortcut``
/ ``shortcut_scale``.

diffusers applies the FaceID LoRA through PEFT (``load_ip_adapter`` -> ``_load_ip_adapter_loras`` ->
``load_lora_weights``). Where PEFT is installed the test runs ``load_ip_adapter`` itself (on a pipeline around the
UNet); else (the test extra does not install it) it takes diffusers' own map of the LoRA (``_load_ip_adapter_loras``:
processor -> tensors) and adds ``up @ down`` to each linear layer it names, which is what that PEFT LoRA (alpha =
rank, adapter weight 1) computes: both were checked to give the same UNet to 1e-6.
"""
import copy

import pytest
import torch
from diffusers.models.modeling_utils import no_init_weights

from devtools.adapter_factory import random_faceid_adapter
from devtools.comfy_inprocess import (build_sd15_model_patcher, diffusers_unet_from_comfy, pack_module, random_unet_inputs,
                                      sigma_at, weights_patched)
from devtools.sdxl_models import POOLED_WIDTH, build_sdxl_model_patcher, diffusers_sdxl_unet_from_comfy, sdxl_time_ids

WIDTH = 64
CONTEXT = {"sd15": 768, "sdxl": 2048}
WEIGHT, SHORTCUT, T = 0.7, 1.3, 400
CROP_TOKENS = 17  # the perceiver reads any number of CLIP hidden states (ViT-H/14 at 224: 257)


@pytest.fixture(scope="module")
def models(comfy):
    """{family id: (ComfyUI ModelPatcher, diffusers UNet with its weights)}, built on first use."""
    import comfy.utils  # noqa: F401

    built, plain = {}, {}

    def get(family):
        if family not in built:
            model = build_sd15_model_patcher(WIDTH, seed=3) if family == "sd15" else build_sdxl_model_patcher(WIDTH, seed=3)
            copy_weights = diffusers_unet_from_comfy if family == "sd15" else diffusers_sdxl_unet_from_comfy
            with no_init_weights():  # every weight is loaded from the ComfyUI model (checked there)
                built[family] = (model, copy_weights(comfy, model, WIDTH))
        return built[family]

    def plain_prediction(family, predict):  # the same inputs in every case: the model's own output, once
        if family not in plain:
            plain[family] = predict()
        return plain[family]

    get.plain = plain_prediction
    return get




def load_into_diffusers(unet, nested) -> int:
    """The adapter and its LoRA into a diffusers UNet as ``load_ip_adapter`` puts them; returns the number of
    attention processors the LoRA reached."""
    from diffusers.utils import USE_PEFT_BACKEND

    if USE_PEFT_BACKEND:
        from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

        pipeline = StableDiffusionXLPipeline if unet.config.addition_embed_type == "text_time" else StableDiffusionPipeline
        parts = dict(vae=None, text_encoder=None, tokenizer=None, unet=unet, scheduler=DDPMScheduler(),
                     image_encoder=None, feature_extractor=None)
        if pipeline is StableDiffusionPipeline:
            parts.update(safety_checker=None, requires_safety_checker=False)
        else:
            parts.update(text_encoder_2=None, tokenizer_2=None)
        with no_init_weights():
            pipeline(**parts).load_ip_adapter(copy.deepcopy(nested), subfolder=None, weight_name="-",
                                              image_encoder_folder=None)
        return sum(name.endswith(".to_q.lora_A.faceid_0.weight") for name, _ in unet.named_parameters())
    with no_init_weights():  # load_state_dict(strict=True) fills the projection (what accelerate would skip too)
        unet._load_ip_adapter_weights([nested], low_cpu_mem_usage=False)
    return add_diffusers_loras(unet, nested)


def add_diffusers_loras(unet, nested):
    """diffusers' FaceID LoRA map (``unet.<processor>.to_q_lora.down.weight`` ...) added to the linear layers."""
    loras = unet._load_ip_adapter_loras([nested])[0]
    with torch.no_grad():
        for name, down in loras.items():
            if ".down." not in name:
                continue
            attention, rest = name[len("unet."):].split(".processor.")
            projection = rest.split("_lora")[0]
            module = unet.get_submodule(attention)
            linear = module.to_out[0] if projection == "to_out" else getattr(module, projection)
            linear.weight += loras[name.replace(".down.", ".up.")] @ down
    return len(loras) // 8


CASES = {
    "sd15 faceid": ("sd15", "faceid", "ip-adapter-faceid_sd15.bin"),
    "sd15 faceid-plusv2": ("sd15", "faceid-plus", "ip-adapter-faceid-plusv2_sd15.bin"),
    "sdxl faceid": ("sdxl", "faceid", "ip-adapter-faceid_sdxl.bin"),
    "sdxl faceid-plusv2": ("sdxl", "faceid-plus", "ip-adapter-faceid-plusv2_sdxl.bin"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_faceid_in_comfyui_matches_diffusers(models, case):
    family, variant, name = CASES[case]
    model, diffusers_unet = models(family)
    adapter_file = pack_module("ipadapter.adapter_file")
    faceid = pack_module("ipadapter.faceid")
    faces_module = pack_module("ipadapter.faces")
    image_prompt = pack_module("ipadapter.image_prompt")
    patcher_module = pack_module("patcher")
    glue = pack_module("comfyui_glue.faceid_lora")
    layer_weights = pack_module("ipadapter.weighting").layer_weights

    nested = random_faceid_adapter(variant, base_width=WIDTH, family=family, seed=4, lora_scale=0.5)
    checkpoint = adapter_file.IPAdapterCheckpoint.from_state_dicts(**nested, source=name, base_width=None)
    assert faceid.variant_of(checkpoint).name == ("faceid" if variant == "faceid" else "faceid-plusv2")

    generator = torch.Generator().manual_seed(5)
    face = torch.nn.functional.normalize(torch.randn(1, 512, generator=generator), dim=-1)
    faces = faces_module.FaceEmbeds(embeds=face, norms=torch.tensor([23.0]), crops=torch.zeros(1, 8, 8, 3),
                                    boxes=torch.zeros(1, 4), landmarks=torch.zeros(1, 5, 2), scores=torch.ones(1),
                                    detector_sizes=(640,))
    unet = copy.deepcopy(diffusers_unet)
    reached = load_into_diffusers(unet, nested)
    # every attention processor of the UNet, self-attention too (the plus projection's own come after them)
    assert reached == sum(not name.startswith("encoder_hid_proj") for name in unet.attn_processors)
    for processor in unet.attn_processors.values():
        if hasattr(processor, "scale"):
            processor.scale = [WEIGHT]
    clip = None
    if variant == "faceid-plus":
        crop = torch.randn(1, CROP_TOKENS, 1280, generator=generator)
        blank = torch.randn(1, CROP_TOKENS, 1280, generator=generator)  # stands for a blank image's hidden states
        clip = image_prompt.EncodedImages(torch.randn(1, 1024, generator=generator), crop, uncond_penultimate=blank)
        projection = unet.encoder_hid_proj.image_projection_layers[0]
        projection.clip_embeds = torch.stack([crop, blank])  # [batch (cond, uncond), images, tokens, width]
        projection.shortcut, projection.shortcut_scale = True, SHORTCUT

    images = faceid.faceid_embeds(faces, clip)
    cond, uncond = image_prompt.image_tokens(checkpoint, checkpoint.build_projection(), images, None, "concat",
                                             shortcut_scale=SHORTCUT)
    term = patcher_module.ImagePromptTerm.build(checkpoint, cond, uncond,
                                                layer_weights(checkpoint.spec.architecture, WEIGHT), 1e9, 0.0)
    patched = patcher_module.apply_image_prompt(glue.apply_adapter_lora(model, checkpoint, 1.0), term)

    inputs = random_unet_inputs(model, CONTEXT[family], seed=6)
    sigma = sigma_at(model, T)
    with weights_patched(patched):
        ours = inputs.predict(patched, sigma, cond_or_uncond=(0, 1))  # row 0 conditional, row 1 unconditional
    plain = models.plain(family, lambda: inputs.predict(model, sigma))

    scaled = inputs.latent / (sigma.view(-1, 1, 1, 1) ** 2 + 1) ** 0.5
    added = {"image_embeds": [torch.stack([face, torch.zeros_like(face)])]}  # [batch, images, 512]; uncond: zeros
    if family == "sdxl":
        # ComfyUI's y starts with the pooled text embedding; diffusers takes it and the sizes apart
        added.update(text_embeds=inputs.y[:, :POOLED_WIDTH], time_ids=sdxl_time_ids(64, 64, 2))
    with torch.no_grad():
        theirs = unet(scaled, torch.tensor([T, T]), encoder_hidden_states=inputs.context, added_cond_kwargs=added).sample

    relative = (ours - theirs).norm() / theirs.norm()
    assert relative <= 1e-4, relative
    assert (ours - plain).norm() / plain.norm() > 1e-2  # adapter and LoRA matter here
