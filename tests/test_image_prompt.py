import pytest
import torch

from adapter_factory import random_adapter
from ipadapter.architecture import SD15, SDXL
from ipadapter.checkpoint import AdapterFormatError, IPAdapterCheckpoint
from ipadapter.image_prompt import (
    EncodedImages,
    check_mask,
    image_tokens,
    layer_keys_values,
    mask_to_tokens,
    parse_layer_weights,
    token_grid,
)


def encoded(n=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return EncodedImages(torch.randn(n, 1024, generator=generator), torch.randn(n, 257, 1280, generator=generator))


@pytest.fixture(scope="module")
def base():
    checkpoint = IPAdapterCheckpoint.from_state_dicts(**random_adapter("base"))
    return checkpoint, checkpoint.build_projection()


def test_base_uncond_is_projection_of_zero_embedding(base):
    checkpoint, projection = base
    cond, uncond = image_tokens(checkpoint, projection, encoded(1), None)
    assert cond.shape == uncond.shape == (1, 4, 768)
    assert torch.allclose(uncond, projection(torch.zeros(1, 1024)), atol=1e-5)


def test_average_and_concat(base):
    checkpoint, projection = base
    images = encoded(3)
    averaged, _ = image_tokens(checkpoint, projection, images, None, "average")
    assert torch.allclose(averaged, projection(images.image_embeds.mean(0, keepdim=True)), atol=1e-5)
    concat, uncond = image_tokens(checkpoint, projection, images, None, "concat")
    assert concat.shape == uncond.shape == (1, 12, 768)
    assert torch.allclose(concat[:, 4:8], projection(images.image_embeds[1:2]), atol=1e-5)


def test_negative_image_replaces_uncond(base):
    checkpoint, projection = base
    images = encoded(1)
    images.uncond_image_embeds = torch.randn(1, 1024)
    images.uncond_penultimate = torch.randn(1, 257, 1280)
    _, uncond = image_tokens(checkpoint, projection, images, None)
    assert torch.allclose(uncond, projection(images.uncond_image_embeds), atol=1e-5)


def test_plus_uses_blank_image_features():
    checkpoint = IPAdapterCheckpoint.from_state_dicts(**random_adapter("plus"))
    projection = checkpoint.build_projection()
    blank = torch.randn(1, 257, 1280)
    cond, uncond = image_tokens(checkpoint, projection, encoded(1), blank)
    assert cond.shape == (1, 16, 768)
    assert torch.allclose(uncond, projection(blank), atol=1e-6)
    with pytest.raises(ValueError, match="blank image"):
        image_tokens(checkpoint, projection, encoded(1), None)


def test_refuses_features_of_another_encoder(base):
    checkpoint, projection = base
    images = EncodedImages(torch.randn(1, 1280), torch.randn(1, 257, 1664), encoder_name="ViT-bigG/14")
    with pytest.raises(AdapterFormatError, match="image embeddings of width 1024, but the image encoder \\(ViT-bigG/14\\) gives 1280"):
        image_tokens(checkpoint, projection, images, None)
    with pytest.raises(ValueError, match="no image"):
        image_tokens(checkpoint, projection, EncodedImages(torch.zeros(0, 1024), torch.zeros(0, 257, 1280)), None)


def test_layer_keys_values_are_token_projections(base):
    checkpoint, _ = base
    tokens = torch.randn(1, 4, 768)
    kv = layer_keys_values(checkpoint, tokens, torch.device("cpu"), torch.float16)
    assert sorted(kv) == list(range(1, 32, 2))
    k, v = kv[31]
    assert k.dtype == torch.float16 and k.shape == (1, 4, 1280)
    assert torch.allclose(v.float(), tokens @ checkpoint.layer_weights(31)[1].T, atol=1e-2)


def test_mask_follows_each_unet_level():
    assert token_grid(64, 48, 64 * 48) == (64, 48)
    assert token_grid(9, 7, 5 * 4) == (5, 4)  # odd latents round up like the UNet's strided convs
    mask = torch.zeros(1, 512, 384)
    mask[:, :, :192] = 1  # left half
    tokens = mask_to_tokens(mask, 64, 48, 32 * 24).reshape(32, 24)
    assert torch.all(tokens[:, :11] == 1) and torch.all(tokens[:, 13:] == 0)
    assert check_mask(torch.ones(8, 8)).shape == (1, 8, 8)
    with pytest.raises(ValueError, match="expected \\[height, width\\] or \\[batch, height, width\\]"):
        check_mask(torch.ones(1, 1, 8, 8))


def test_layer_weights():
    assert parse_layer_weights("", SD15) == {k: 1.0 for k in range(1, 32, 2)}
    style = parse_layer_weights("style", SD15)
    assert [k for k, w in style.items() if w] == [13, 15, 17]
    assert [k for k, w in parse_layer_weights("composition", SD15).items() if w] == [9, 11]
    values = parse_layer_weights(",".join(str(i) for i in range(16)), SD15)
    assert values[1] == 0 and values[31] == 15
    assert parse_layer_weights("15:1, 31:0.5", SD15) == {**{k: 0.0 for k in range(1, 32, 2)}, 15: 1.0, 31: 0.5}
    for bad, message in [("1,2,3", "expected 16"), ("2:1", "not SD1.5"), ("a,b", "not readable")]:
        with pytest.raises(ValueError, match=message):
            parse_layer_weights(bad, SD15)


def test_sdxl_layer_weights_follow_instantstyle():
    # InstantStyle: up_blocks.0.attentions.1 carries style, down_blocks.2.attentions.1 the layout
    assert [k for k, w in parse_layer_weights("style", SDXL).items() if w] == list(range(69, 88, 2))
    assert [k for k, w in parse_layer_weights("composition", SDXL).items() if w] == list(range(29, 48, 2))
    assert len(parse_layer_weights("all", SDXL)) == 70
    assert parse_layer_weights(",".join(["0.5"] * 70), SDXL)[139] == 0.5
    for bad, message in [(",".join(["1"] * 16), "expected 70"), ("141:1", "not SDXL")]:
        with pytest.raises(ValueError, match=message):
            parse_layer_weights(bad, SDXL)
