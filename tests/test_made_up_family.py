"""A third UNet family, made up here and declared in one registry entry, goes through everything a family
goes through: detected (from an adapter file, a diffusers folder, a single file and a ComfyUI UNet),
patched in ComfyUI (every layer; λ = 0 exactly the unpatched model; the training model's output with
the image), trained one step and exported under the registry's name rule.

Its layout is none of the built-in ones: three levels 1x, 2x and 3x wide, transformer depths 2 and 3 on
the two attention levels and 2 in the middle (27 layers), and one 512-wide text encoder.
"""
import json

import pytest
import torch

from devtools.comfy_inprocess import noise_prediction, pack_module
from ipadapter.adapter_file import load_adapter
from ipadapter.image_prompt import EncodedImages
from ipadapter import registry
from ipadapter.registry import Family, TextEncoder, Training, unet_layers
from ipadapter.registry.families import LDM_NOISE_SCHEDULE, UNET_CROSS_ATTENTION
from training.adapter import IPAdapterModel
from training.base_models import detect_family
from training.models import build_embedded_models
from training.run import main

from test_training import small_run_args
from training_fixtures import write_fake_single_file

CONTEXT, WIDTH, HEADS = 512, 32, 8  # WIDTH: the trainer's embedded UNet width, and the ComfyUI UNet's here


def made_up_family(configs) -> Family:
    return Family(
        id="tri3",
        name="Tri-3",
        attach=UNET_CROSS_ATTENTION,
        layers=unet_layers([
            ("down_blocks.0.attentions.0", ("input", 1), 2, 1),
            ("down_blocks.0.attentions.1", ("input", 2), 2, 1),
            ("down_blocks.1.attentions.0", ("input", 4), 3, 2),
            ("down_blocks.1.attentions.1", ("input", 5), 3, 2),
            ("up_blocks.1.attentions.0", ("output", 3), 3, 2),
            ("up_blocks.1.attentions.1", ("output", 4), 3, 2),
            ("up_blocks.1.attentions.2", ("output", 5), 3, 2),
            ("up_blocks.2.attentions.0", ("output", 6), 2, 1),
            ("up_blocks.2.attentions.1", ("output", 7), 2, 1),
            ("up_blocks.2.attentions.2", ("output", 8), 2, 1),
            ("mid_block.attentions.0", ("middle", 0), 2, 3),
        ], base_width=256),
        context_dim=CONTEXT,
        base_width=256,
        resampler_width=512,
        encoders=("vit-h",),
        released_adapters={"standard": ("ip-adapter_tri3",)},
        style_blocks=(("output", 4),),
        composition_blocks={("input", 5): 1.0},
        training=Training(
            text_encoders=(TextEncoder(name="Tri-3 text encoder", folder="text_encoder", single_file_prefix="tri3.text.",
                                       layout="clip", width=CONTEXT, hidden_layer=-1),),
            vae_scaling_factor=0.2,
            time_ids=False,
            resolution=256,
            noise_schedule=LDM_NOISE_SCHEDULE,
            prediction="epsilon",
            embedded_unet=dict(
                sample_size=8, width_multipliers=(1, 2, 3), layers_per_block=2, heads=HEADS, norm_num_groups=32,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                transformer_layers_per_block=(2, 3, 2), use_linear_projection=True,
            ),
            shipped_configs=str(configs),
        ),
    )


def comfy_unet_config(width: int) -> dict:
    """The same layout as ComfyUI's UNetModel takes it."""
    return {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
        "adm_in_channels": None, "in_channels": 4, "model_channels": width, "num_res_blocks": [2, 2, 2],
        "transformer_depth": [2, 2, 3, 3, 0, 0], "channel_mult": [1, 2, 3], "transformer_depth_middle": 2,
        "use_linear_in_transformer": True, "context_dim": CONTEXT, "num_heads": HEADS, "num_head_channels": -1,
        "transformer_depth_output": [2, 2, 2, 3, 3, 3, 0, 0, 0],  # ComfyUI reads it from the end
        "use_temporal_attention": False, "use_temporal_resblock": False,
    }


@pytest.fixture(scope="module")
def family(comfy, tmp_path_factory):
    """The entry, registered in the registry the trainer reads and in the one of the pack ComfyUI loads."""
    from transformers import CLIPTextConfig

    configs = tmp_path_factory.mktemp("tri3-configs")
    (configs / "text_encoder").mkdir()
    config = CLIPTextConfig(hidden_size=CONTEXT, num_attention_heads=8, intermediate_size=1024, num_hidden_layers=12,
                            projection_dim=CONTEXT, hidden_act="quick_gelu", max_position_embeddings=77)
    (configs / "text_encoder" / "config.json").write_text(json.dumps(config.to_dict()))
    entry = made_up_family(configs)
    registries = (pack_module("ipadapter.registry"), registry)
    for each in registries:
        each.register_family(entry)
    yield entry
    for each in registries:
        each.unregister_family(entry)


@pytest.fixture(scope="module")
def trained(family, tmp_path_factory):
    """One training step of the embedded run of the family, exported."""
    from training.data import write_toy_dataset

    folder = tmp_path_factory.mktemp("tri3-run")
    data = write_toy_dataset(folder / "data", count=4, seed=0)
    result = main(small_run_args(folder / "run", data, 1, **{"model.family": family.id}))
    return result["export"][0]


def test_trained_one_step_and_exported_under_the_name_rule(family, trained):
    assert trained.name == "ip-adapter_tri3_step00000001.safetensors"
    checkpoint = load_adapter(trained, base_width=None)
    assert checkpoint.spec.architecture is family and checkpoint.spec.base_width == WIDTH
    assert len(checkpoint.ip_adapter) == 2 * len(family.layers) == 54
    assert {tuple(checkpoint.layer_weights(layer.key)[0].shape) for layer in family.layers} == {
        (multiplier * WIDTH, CONTEXT) for multiplier in (1, 2, 3)}


def test_detected_from_a_model_folder_and_a_single_file(family, tmp_path):
    frozen = build_embedded_models(family, seed=1)
    for name, module in {**frozen.modules(), "scheduler": frozen.scheduler}.items():
        if module is not None and name != "image_encoder":
            module.save_pretrained(str(tmp_path / "tri3" / name))
    assert detect_family(tmp_path / "tri3") is family
    assert detect_family(write_fake_single_file(tmp_path / "tri3.safetensors", family)) is family


def test_patched_in_comfyui_every_layer_weight_zero_exact_and_the_training_models_output(comfy, family, trained, tmp_path):
    import folder_paths

    nodes, patcher_module = pack_module("nodes"), pack_module("patcher")
    model_config = comfy.supported_models.SD15(comfy_unet_config(WIDTH))
    model_config.set_inference_dtype(torch.float32, None)
    base = model_config.get_model({})
    from devtools.comfy_import import reset_all_parameters

    reset_all_parameters(base.diffusion_model, seed=4)
    device = comfy.model_management.get_torch_device()
    model = comfy.model_patcher.ModelPatcher(base.eval(), load_device=device, offload_device=device)
    assert patcher_module.family_of_comfy_model(model.model.diffusion_model) is family

    folder_paths.add_model_folder_path(nodes.MODEL_FOLDER, str(trained.parent))
    (adapter,) = nodes.IPAdapterKitLoader().load(trained.name)
    generator = torch.Generator().manual_seed(0)
    embed_dim = adapter.checkpoint.spec.encoder_width
    image_embeds = torch.randn(1, embed_dim, generator=generator) * 3
    embeds = EncodedImages(image_embeds, torch.zeros(1, 2, 4), torch.zeros(1, embed_dim), torch.zeros(1, 2, 4), "stand-in")
    patched = nodes.patch_model(model, adapter, embeds, 1.0)
    attn2 = patched.model_options["transformer_options"]["patches_replace"]["attn2"]
    assert set(attn2) == {layer.comfy_patch_key for layer in family.layers}
    zero = nodes.patch_model(model, adapter, embeds, 0.0)

    latent = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 77, CONTEXT, generator=generator)
    t = 400
    sigma = model.model.model_sampling.sigmas[t].expand(2).clone()
    plain = noise_prediction(model, latent, sigma, context, cond_or_uncond=(0, 1))
    assert torch.equal(noise_prediction(zero, latent, sigma, context, cond_or_uncond=(0, 1)), plain)
    with_image = noise_prediction(patched, latent, sigma, context, cond_or_uncond=(0, 1))

    # the training model on the same UNet weights (ComfyUI's own key map), with the exported adapter
    from diffusers import UNet2DConditionModel

    from training.models import build_embedded_unet

    unet = build_embedded_unet(family, WIDTH)
    mapping = comfy.utils.unet_to_diffusers(comfy_unet_config(WIDTH))
    comfy_weights = model.model.diffusion_model.state_dict()
    wanted = unet.state_dict().keys()  # the map lists optional layers too
    state = {dk: comfy_weights[ck] for dk, ck in mapping.items() if ck in comfy_weights and dk in wanted}
    assert isinstance(unet, UNet2DConditionModel)
    unet.load_state_dict(state, strict=True)
    assert not set(comfy_weights) - {mapping[dk] for dk in state}  # every ComfyUI weight went across
    training_model = IPAdapterModel(unet.eval(), spec=adapter.checkpoint.spec)
    training_model.load_trainable_state_dict({k: v.float() for k, v in adapter.checkpoint.flat_state_dict().items()})
    scaled = latent / (sigma.view(-1, 1, 1, 1) ** 2 + 1) ** 0.5
    features = torch.cat([image_embeds, torch.zeros_like(image_embeds)])  # the unconditional row: a zero embedding
    with torch.no_grad():
        expected = training_model.eval()(scaled, torch.tensor([t, t]), context, features)
    relative = (with_image - expected).norm() / expected.norm()
    assert relative <= 1e-4, relative
    assert (with_image - plain).abs().max() > 1e-3  # the image prompt acts
