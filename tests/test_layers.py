import pytest

from ipadapter.layers import (
    LAYER_BY_COMFY_BLOCK,
    SD15_LAYERS,
    layer_widths,
    official_keys_from_processor_names,
)


def test_sixteen_layers_with_the_recipe_table():
    assert [layer.key for layer in SD15_LAYERS] == list(range(1, 32, 2))
    assert [layer.width for layer in SD15_LAYERS] == [320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320, 1280]
    blocks = [layer.comfy_block for layer in SD15_LAYERS]
    assert blocks == [("input", i) for i in (1, 2, 4, 5, 7, 8)] + [("output", i) for i in range(3, 12)] + [("middle", 0)]
    assert len(set(blocks)) == 16
    assert LAYER_BY_COMFY_BLOCK[("middle", 0)].key == 31
    assert LAYER_BY_COMFY_BLOCK[("middle", 0)].diffusers_name == "mid_block.attentions.0.transformer_blocks.0.attn2"


def test_parameter_count_matches_recipe():
    widths = layer_widths()
    adapter = sum(2 * width * 768 for width in widths.values())
    projection = 1024 * 3072 + 3072 + 768 + 768
    assert adapter == 19_169_280
    assert adapter + projection == 22_319_616


@pytest.fixture(scope="module")
def diffusers_processor_names():
    from diffusers import UNet2DConditionModel

    # SD1.5's layout at 1/10 of the width: the processor order does not depend on it.
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64, 128, 128),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    return list(unet.attn_processors)


def test_keys_follow_diffusers_processor_order(diffusers_processor_names):
    keys = official_keys_from_processor_names(diffusers_processor_names)
    assert len(keys) == 16
    by_name = {name.removesuffix(".processor"): key for name, key in keys.items()}
    assert by_name == {layer.diffusers_name: layer.key for layer in SD15_LAYERS}
    # the middle block comes last in diffusers' order
    assert diffusers_processor_names[-1] == "mid_block.attentions.0.transformer_blocks.0.attn2.processor"
