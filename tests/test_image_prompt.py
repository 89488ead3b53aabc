import pytest
import torch

from devtools.adapter_factory import random_adapter
from ipadapter.registry.families import SD15, SDXL
from ipadapter.adapter_file import AdapterFormatError, IPAdapterCheckpoint
from ipadapter.weighting import parse_layer_weights, weight_schedule
from ipadapter.image_prompt import (
    EncodedImages,
    check_mask,
    combine_embeds,
    combine_features,
    image_tokens,
    layer_keys_values,
    mask_to_tokens,
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
    # the style and composition presets are the blocks of the weight types of the same names (cubiq's SD1.5 sets):
    # the first two down levels and the last up levels, and down_blocks.2
    style = parse_layer_weights("style", SD15)
    assert [k for k, w in style.items() if w] == [1, 3, 5, 7, *range(17, 30, 2)]
    assert [k for k, w in parse_layer_weights("composition", SD15).items() if w] == [9, 11]
    for preset, weight_type in (("style", "style transfer"), ("composition", "composition")):
        by_type = weight_schedule(weight_type, SD15, 1.0)
        assert [k for k, w in parse_layer_weights(preset, SD15).items() if w] == [k for k, w in by_type.items() if w.weight]
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


def test_combine_modes_merge_the_features_before_the_projection(base):
    checkpoint, projection = base
    images = encoded(3, seed=7)
    x = images.image_embeds
    expected = {  # written out: the peer pack's add / subtract / average, and our norm average
        "add": x[0] + x[1] + x[2],
        "subtract": x[0] - (x[1] + x[2]) / 2,
        "average": (x[0] + x[1] + x[2]) / 3,
        "norm average": sum(x[i] / x[i].norm() for i in range(3)) / 3 * (x.norm(dim=1).mean()),
    }
    results = {}
    for mode, features in expected.items():
        tokens, uncond = image_tokens(checkpoint, projection, images, None, mode)
        assert torch.allclose(tokens, projection(features[None]), atol=1e-5), mode
        assert uncond.shape == tokens.shape == (1, 4, 768)
        results[mode] = tokens
    assert all(not torch.allclose(results[a], results[b], atol=1e-3) for a in results for b in results if a < b)


def test_norm_average_gives_each_reference_the_same_say():
    small, large = torch.randn(1, 1024), torch.randn(1, 1024)
    large = large / large.norm() * 100 * small.norm()
    merged = combine_features(torch.cat([small, large]), "norm average")
    direction = merged / merged.norm()
    cosines = [float(direction @ (v / v.norm()).T) for v in (small, large)]
    assert cosines[0] == pytest.approx(cosines[1], abs=1e-5)  # a plain average would follow the large one
    average = combine_features(torch.cat([small, large]), "average")
    assert float((average / average.norm()) @ (large / large.norm()).T) > 0.99


def test_combine_embeds_and_per_image_weights():
    a, b = encoded(2, seed=1), encoded(1, seed=2)
    both = combine_embeds([a, b], "concat")
    assert len(both) == 3 and torch.equal(both.image_embeds[2], b.image_embeds[0])
    merged = combine_embeds([a, b], "subtract")
    assert len(merged) == 1
    assert torch.allclose(merged.penultimate[0], a.penultimate[0] - (a.penultimate[1] + b.penultimate[0]) / 2)
    weighted = a.weighted([1.0, 0.5])
    assert torch.equal(weighted.image_embeds[1], a.image_embeds[1] * 0.5) and torch.equal(weighted.penultimate[0], a.penultimate[0])
    with pytest.raises(ValueError, match="3 image weights for 2 images"):
        a.weighted([1.0, 1.0, 1.0])
    other = EncodedImages(torch.randn(1, 1280), torch.randn(1, 257, 1664), encoder_name="OpenCLIP ViT-bigG/14")
    with pytest.raises(ValueError, match="different widths"):
        combine_embeds([a, other], "average")
    with pytest.raises(ValueError, match="cannot merge"):
        combine_features(a.image_embeds, "concat")
