"""The family tables: keys, names, blocks and widths, checked against diffusers' and ComfyUI's own UNets."""
import pytest

from ipadapter.registry import family_of_adapter_keys, family_of_processor_names, official_keys_from_processor_names
from ipadapter.registry.families import SD15, SDXL


def test_sd15_table():
    assert SD15.keys == list(range(1, 32, 2))
    assert [layer.width for layer in SD15.layers] == [320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320, 1280]
    blocks = [layer.comfy_block for layer in SD15.layers]
    assert blocks[:6] == [("input", i) for i in (1, 2, 4, 5, 7, 8)]
    assert blocks[6:15] == [("output", i) for i in range(3, 12)]
    middle = SD15.layer_by_key[31]
    assert middle.comfy_patch_key == ("middle", 0, 0)
    assert middle.diffusers_name == "mid_block.attentions.0.transformer_blocks.0.attn2"
    assert SD15.describe_layers() == "16 cross-attention layers (keys 1, 3, ..., 31)"


def test_sd15_parameter_count_matches_recipe():
    adapter = sum(2 * width * 768 for width in SD15.layer_widths().values())
    projection = 1024 * 3072 + 3072 + 768 + 768
    assert adapter == 19_169_280
    assert adapter + projection == 22_319_616


def test_sdxl_table():
    assert SDXL.keys == list(range(1, 140, 2)) and SDXL.context_dim == 2048
    depth = {}
    for layer in SDXL.layers:
        depth[layer.comfy_block] = depth.get(layer.comfy_block, 0) + 1
    assert depth == {("input", 4): 2, ("input", 5): 2, ("input", 7): 10, ("input", 8): 10, ("output", 0): 10,
                     ("output", 1): 10, ("output", 2): 10, ("output", 3): 2, ("output", 4): 2, ("output", 5): 2,
                     ("middle", 0): 10}
    assert SDXL.layer_by_key[1].diffusers_name == "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    assert SDXL.layer_by_key[3].comfy_patch_key == ("input", 4, 1)
    assert SDXL.layer_by_key[139].comfy_patch_key == ("middle", 0, 9)
    assert {SDXL.layer_by_key[k].width for k in (1, 7, 109, 119)} == {640}
    assert {SDXL.layer_by_key[k].width for k in (9, 49, 107, 121)} == {1280}
    # the released SDXL adapters: 70 layers x 2 x width x 2048
    assert sum(2 * w * 2048 for w in SDXL.layer_widths().values()) == 2 * 2048 * (10 * 640 + 60 * 1280)


def test_family_from_adapter_keys():
    assert family_of_adapter_keys(SD15.adapter_tensor_names()) is SD15
    assert family_of_adapter_keys(SDXL.adapter_tensor_names()) is SDXL
    assert family_of_adapter_keys({"1.to_k_ip.weight"}) is None


def diffusers_unet(family):
    from diffusers import UNet2DConditionModel

    # the real layouts at 1/10 of the width: the processor order does not depend on it
    if family is SD15:
        return UNet2DConditionModel(block_out_channels=(32, 64, 128, 128), layers_per_block=2, cross_attention_dim=768,
                                    attention_head_dim=8, norm_num_groups=8)
    return UNet2DConditionModel(
        block_out_channels=(32, 64, 128), layers_per_block=2, cross_attention_dim=2048, attention_head_dim=(2, 4, 8),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), use_linear_projection=True, norm_num_groups=8,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 1280,
    )


@pytest.mark.parametrize("family", [SD15, SDXL], ids=lambda f: f.id)
def test_keys_follow_diffusers_processor_order(family):
    names = list(diffusers_unet(family).attn_processors)
    keys = official_keys_from_processor_names(names)
    assert {name.removesuffix(".processor"): key for name, key in keys.items()} == {
        layer.diffusers_name: layer.key for layer in family.layers}
    assert family_of_processor_names(names) is family
    # the middle block comes last in diffusers' order
    assert names[-1] == family.layers[-1].diffusers_processor
