"""Tiled references and detail tiles: the functions, and the nodes with a real encoder; cubiq's tiling against a
reference written here from cubiq's IPAdapterTiled (torchvision's transforms, as it calls them), and Encode Tiled's
regions in Apply against one Apply per tile."""
import math

import pytest
import torch

from comfyui_glue.tiles import blend_detail, cubiq_tiles, detail_tiles, tile_offsets, tile_reference
from test_nodes import encoder, nodes  # noqa: F401  (module fixtures)


def test_tile_offsets_cover_the_long_side():
    assert tile_offsets(300, 100) == [0, 100, 200]
    assert tile_offsets(250, 100) == [0, 75, 150]  # overlapping, evenly spaced, the last flush with the end
    assert tile_offsets(100, 100) == [0]


def test_tiles_and_their_masks_split_the_picture():
    image = torch.rand(1, 60, 180, 3)
    tiles, masks = tile_reference(image)
    assert tiles.shape == (3, 60, 60, 3) and masks.shape == (3, 60, 180)
    assert torch.equal(tiles[1], image[0, :, 60:120])
    assert torch.equal(masks.sum(0), torch.ones(60, 180))  # every point belongs to exactly one tile
    assert masks[0, :, :60].all() and not masks[0, :, 60:].any()
    tall_tiles, tall_masks = tile_reference(torch.rand(2, 150, 100, 3))
    assert tall_tiles.shape == (4, 100, 100, 3) and tall_masks.shape == (2, 150, 100)


def test_detail_tiles_and_blend():
    square = torch.arange(2 * 4 * 4 * 3, dtype=torch.float32).reshape(2, 4, 4, 3)
    tiles = detail_tiles(square, 2)
    assert tiles.shape == (8, 2, 2, 3) and torch.equal(tiles[1], square[0, :2, 2:]) and torch.equal(tiles[4], square[1, :2, :2])
    view, parts = torch.ones(2, 5), torch.arange(8.0)[:, None].expand(8, 5)
    assert torch.equal(blend_detail(view, parts, 0.25)[1], torch.full((5,), 0.25 + 0.75 * 5.5))


def test_tiled_encoding_differs_from_the_center_crop_unless_the_image_is_square(nodes, encoder):
    generator = torch.Generator().manual_seed(0)
    wide = torch.rand(1, 56, 168, 3, generator=generator)  # 3:1
    (tiled, masks, _), crop = nodes.IPAdapterKitEncodeTiled().encode(encoder, wide), nodes.encode_images(encoder, wide, "crop")
    assert len(tiled) == 3 and masks.shape == (3, 56, 168)
    assert torch.allclose(tiled.image_embeds[1], crop.image_embeds[0], atol=1e-5)  # the middle tile is the crop
    assert not torch.allclose(tiled.image_embeds.mean(0), crop.image_embeds[0], atol=1e-3)
    square = wide[:, :, :56]
    (one, _, _), square_crop = nodes.IPAdapterKitEncodeTiled().encode(encoder, square), nodes.encode_images(encoder, square, "crop")
    assert len(one) == 1 and torch.equal(one.image_embeds, square_crop.image_embeds)


def test_detail_tiles_enrich_the_single_embedding(nodes, encoder):
    image = torch.rand(1, 112, 112, 3, generator=torch.Generator().manual_seed(1))
    plain = nodes.encode_images(encoder, image, "crop")
    (enhanced,) = nodes.IPAdapterKitEncode().encode(encoder, image, "crop", detail_tiles=2, detail_ratio=0.5)
    assert len(enhanced) == 1 and not torch.allclose(enhanced.image_embeds, plain.image_embeds, atol=1e-3)
    (only_view,) = nodes.IPAdapterKitEncode().encode(encoder, image, "crop", detail_tiles=2, detail_ratio=1.0)
    assert torch.allclose(only_view.image_embeds, plain.image_embeds, atol=1e-6)


def cubiq_reference(image, attn_mask=None, tile_size=256):
    """The tiles and masks of cubiq's IPAdapterTiled (ComfyUI_IPAdapter_plus, IPAdapterPlus.py, step "2. Extract the
    tiles"), step by step with the torchvision / PIL calls it makes; sharpening left out."""
    from PIL import Image
    import torchvision.transforms as T

    _, oh, ow, _ = image.shape
    if attn_mask is None:
        attn_mask = torch.ones([1, oh, ow])
    image = image.permute([0, 3, 1, 2])
    attn_mask = T.Resize((oh, ow), interpolation=T.InterpolationMode.BICUBIC, antialias=True)(attn_mask.unsqueeze(1))
    if 0.75 < oh / ow < 1.33:
        image = T.CenterCrop(min(oh, ow))(image)
        resize = (tile_size * 2, tile_size * 2)
        attn_mask = T.CenterCrop(min(oh, ow))(attn_mask)
    else:
        resize = (int(tile_size * ow / oh), tile_size) if oh < ow else (tile_size, int(tile_size * oh / ow))
    image = torch.stack([T.ToTensor()(T.ToPILImage()(img).resize(resize, resample=Image.Resampling.LANCZOS))
                         for img in image])
    attn_mask = T.Resize(resize[::-1], interpolation=T.InterpolationMode.BICUBIC, antialias=True)(attn_mask)
    if oh / ow > 4 or oh / ow < 0.25:
        crop = (tile_size, tile_size * 4) if oh < ow else (tile_size * 4, tile_size)
        image, attn_mask = T.CenterCrop(crop)(image), T.CenterCrop(crop)(attn_mask)
    attn_mask = attn_mask.squeeze(1)
    image = image.permute([0, 2, 3, 1])
    _, oh, ow, _ = image.shape
    tiles_x, tiles_y = math.ceil(ow / tile_size), math.ceil(oh / tile_size)
    overlap_x = max(0, (tiles_x * tile_size - ow) / (tiles_x - 1 if tiles_x > 1 else 1))
    overlap_y = max(0, (tiles_y * tile_size - oh) / (tiles_y - 1 if tiles_y > 1 else 1))
    tiles, masks = [], []
    for y in range(tiles_y):
        for x in range(tiles_x):
            start_x, start_y = int(x * (tile_size - overlap_x)), int(y * (tile_size - overlap_y))
            tiles.append(image[:, start_y:start_y + tile_size, start_x:start_x + tile_size, :])
            mask = torch.zeros([attn_mask.shape[0], oh, ow])
            mask[:, start_y:start_y + tile_size, start_x:start_x + tile_size] = \
                attn_mask[:, start_y:start_y + tile_size, start_x:start_x + tile_size]
            masks.append(mask)
    return tiles, masks


@pytest.mark.parametrize("shape", [(1, 300, 310), (2, 200, 500), (1, 700, 300), (1, 90, 1000)],
                         ids=["near-square 2x2", "wide", "tall", "beyond 4:1, cropped"])
def test_cubiq_tiling_is_cubiqs(shape):
    generator = torch.Generator().manual_seed(sum(shape))
    image = torch.rand(*shape, 3, generator=generator)
    mask = (torch.rand(1, *shape[1:], generator=generator) > 0.3).float()
    for attn_mask in (None, mask):
        ours, our_masks = cubiq_tiles(image, attn_mask)
        tiles, masks = cubiq_reference(image, attn_mask)
        assert len(ours) == len(tiles) == our_masks.shape[0]
        for mine, theirs in zip(ours, tiles):
            assert mine.shape == theirs.shape == (shape[0], 256, 256, 3)
            assert torch.equal(mine, theirs)
        assert torch.allclose(our_masks, torch.stack(masks), atol=1e-6)
    if shape == (1, 300, 310):  # 2x2 tiles of 256 on 512: they touch, no overlap, and cover the picture
        assert len(tiles) == 4 and torch.allclose(cubiq_tiles(image)[1].sum(0), torch.ones(1, 512, 512))


def test_encode_tiled_regions_in_apply_are_one_apply_per_tile(comfy):
    """Apply (Advanced) with Encode Tiled's regions (cubiq tiling) patches the model as one Apply per tile, each
    with its tile's embeds under its tile's mask at Apply's weight type and window; λ = 0 is the model itself."""
    from devtools.comfy_inprocess import random_unet_inputs, sigma_at, small_sd15_apply_setup

    nodes, model, adapter, encoder = small_sd15_apply_setup("tiled.safetensors")
    image = torch.rand(1, 64, 160, 3, generator=torch.Generator().manual_seed(3))
    embeds, masks, regions = nodes.IPAdapterKitEncodeTiled().encode(encoder, image, "cubiq (256 px tiles)")
    assert len(regions.regions) == masks.shape[0] == len(embeds) == 3 and masks.shape[1:] == (256, 640)
    settings = dict(weight_type="ease in", embeds_scaling="K+V")
    (tiled,) = nodes.IPAdapterKitApply().apply(model, adapter, 0.8, 0.0, 0.7, "concat", "all", "", regions=regions,
                                               **settings)
    by_hand = model
    for index in range(3):
        tile = nodes.encode_images(encoder, cubiq_tiles(image)[0][index], "crop")
        (by_hand,) = nodes.IPAdapterKitApply().apply(by_hand, adapter, 0.8, 0.0, 0.7, "concat", "all", "",
                                                     embeds=tile, attn_mask=masks[index], **settings)
    inputs, sigma = random_unet_inputs(model, 768), sigma_at(model, 800)
    expected = inputs.predict(by_hand, sigma)
    assert torch.allclose(inputs.predict(tiled, sigma), expected, atol=1e-5)
    assert (expected - inputs.predict(model, sigma)).abs().mean() > 1e-4
    (off,) = nodes.IPAdapterKitApply().apply(model, adapter, 0.0, 0.0, 0.7, "concat", "all", "", regions=regions, **settings)
    assert torch.equal(inputs.predict(off, sigma), inputs.predict(model, sigma))
