"""Tiled references and detail tiles: the functions, and the nodes with a real encoder."""
import torch

from comfyui_glue.tiles import blend_detail, detail_tiles, tile_offsets, tile_reference
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
    (tiled, masks), crop = nodes.IPAdapterKitEncodeTiled().encode(encoder, wide), nodes.encode_images(encoder, wide, "crop")
    assert len(tiled) == 3 and masks.shape == (3, 56, 168)
    assert torch.allclose(tiled.image_embeds[1], crop.image_embeds[0], atol=1e-5)  # the middle tile is the crop
    assert not torch.allclose(tiled.image_embeds.mean(0), crop.image_embeds[0], atol=1e-3)
    square = wide[:, :, :56]
    (one, _), square_crop = nodes.IPAdapterKitEncodeTiled().encode(encoder, square), nodes.encode_images(encoder, square, "crop")
    assert len(one) == 1 and torch.equal(one.image_embeds, square_crop.image_embeds)


def test_detail_tiles_enrich_the_single_embedding(nodes, encoder):
    image = torch.rand(1, 112, 112, 3, generator=torch.Generator().manual_seed(1))
    plain = nodes.encode_images(encoder, image, "crop")
    (enhanced,) = nodes.IPAdapterKitEncode().encode(encoder, image, "crop", detail_tiles=2, detail_ratio=0.5)
    assert len(enhanced) == 1 and not torch.allclose(enhanced.image_embeds, plain.image_embeds, atol=1e-3)
    (only_view,) = nodes.IPAdapterKitEncode().encode(encoder, image, "crop", detail_tiles=2, detail_ratio=1.0)
    assert torch.allclose(only_view.image_embeds, plain.image_embeds, atol=1e-6)
