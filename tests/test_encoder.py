import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from devtools.clip_vision import randomise, transformers_model
from ipadapter.encoder import (
    EncoderFormatError,
    build_vision_tower,
    convert_transformers_to_open_clip,
    load_image_encoder,
)
from ipadapter.preprocess import CLIP_MEAN, CLIP_STD, preprocess

SMALL = dict(width=128, layers=3, heads=2, patch=14, image=56, embed_dim=32)  # 64-wide heads, like the default


def assert_parity(reference, path, image_size, heads=None, tolerance=1e-4):
    encoder = load_image_encoder(path, heads=heads)
    pixels = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(pixel_values=pixels, output_hidden_states=True)
        ours = encoder.encode(pixels)
    assert torch.isfinite(expected.image_embeds).all()
    assert ours.image_embeds.shape == expected.image_embeds.shape
    assert ours.penultimate.shape == expected.hidden_states[-2].shape
    assert (ours.image_embeds - expected.image_embeds).abs().max() <= tolerance
    assert (ours.penultimate - expected.hidden_states[-2]).abs().max() <= tolerance
    # the two outputs really differ from other layers' states: the check can fail
    assert (ours.penultimate - expected.hidden_states[-1]).abs().max() > 1e-2
    return encoder


def transformers_layout(reference, layout: str, folder) -> dict:
    """The state dict a file of this layout holds."""
    if layout == "save_pretrained":  # transformers 5 keeps 'vision_model.' for the model with projection
        reference.save_pretrained(folder)
        from safetensors.torch import load_file

        return load_file(str(folder / "model.safetensors"))
    tensors = {k: v.contiguous() for k, v in reference.state_dict().items()}
    if layout == "no_prefix":
        tensors = {k.removeprefix("vision_model."): v for k, v in tensors.items()}
    elif layout == "clip_model":  # a whole CLIPModel: text tower and projections beside the vision ones
        tensors.update({"text_model.embeddings.token_embedding.weight": torch.zeros(10, 8),
                        "text_projection.weight": torch.zeros(32, 8), "logit_scale": torch.ones(())})
    elif layout == "legacy_position_ids":  # transformers 4 files carry this buffer
        tensors["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    return tensors


@pytest.mark.parametrize("layout", ["state_dict", "save_pretrained", "no_prefix", "clip_model", "legacy_position_ids"])
def test_transformers_file_matches_transformers_model(tmp_path, layout):
    reference = transformers_model(**SMALL)
    tensors = transformers_layout(reference, layout, tmp_path)
    path = tmp_path / "clip_vision.safetensors"
    save_file(tensors, str(path))
    # heads left to inference (64-wide for an unknown width) except in one layout
    encoder = assert_parity(reference, path, SMALL["image"], heads=SMALL["heads"] if layout == "state_dict" else None)
    assert (encoder.embed_dim, encoder.hidden_width, encoder.num_tokens, encoder.image_size) == (32, 128, 17, 56)


def test_config_json_beside_the_file_gives_the_activation_and_head_count(tmp_path):
    """Shapes do not record QuickGELU or the heads: transformers' config.json does, and the tower follows it."""
    reference = transformers_model(**{**SMALL, "heads": 4}, activation="quick_gelu")  # 32-wide heads, not the 64 guessed
    reference.save_pretrained(tmp_path / "clip")
    encoder = assert_parity(reference, tmp_path / "clip" / "model.safetensors", SMALL["image"])
    assert encoder.architecture == "4 heads, QuickGELU"

    (tmp_path / "alone").mkdir()  # the same weights without their config: GELU and a guessed head count
    shutil.copy(tmp_path / "clip" / "model.safetensors", tmp_path / "alone" / "model.safetensors")
    (tmp_path / "alone" / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')  # not a CLIP config
    guessed = load_image_encoder(tmp_path / "alone" / "model.safetensors")
    assert guessed.architecture == "2 heads, GELU"
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (guessed.encode(pixels).image_embeds - encoder.encode(pixels).image_embeds).abs().max() > 1e-3
    assert load_image_encoder(tmp_path / "alone" / "model.safetensors", heads=4).architecture == "4 heads, GELU"
    # a renamed file (a ComfyUI models folder) is not tied to a config.json that happens to lie beside it
    shutil.copy(tmp_path / "clip" / "model.safetensors", tmp_path / "clip" / "CLIP-ViT-renamed.safetensors")
    assert load_image_encoder(tmp_path / "clip" / "CLIP-ViT-renamed.safetensors").architecture == "2 heads, GELU"

    (tmp_path / "alone" / "config.json").write_text('{"model_type": "clip_vision_model", "hidden_act": "relu"}')
    with pytest.raises(EncoderFormatError) as error:
        load_image_encoder(tmp_path / "alone" / "model.safetensors")
    assert_one_line(error, "config.json", "'relu'", "expected gelu or quick_gelu")


def test_open_clip_config_beside_the_file_gives_quick_gelu(tmp_path):
    tower = build_vision_tower("ViT-H-14-quickgelu", width=128, layers=3, head_width=64, image_size=56, embed_dim=32)
    randomise(tower, seed=4)
    assert tower.architecture == "2 heads, QuickGELU"
    save_file({f"visual.{k}": v.contiguous() for k, v in tower.visual.state_dict().items()}, str(tmp_path / "open_clip_model.safetensors"))
    (tmp_path / "open_clip_config.json").write_text('{"model_cfg": {"embed_dim": 32, "quick_gelu": true}}')
    loaded = load_image_encoder(tmp_path / "open_clip_model.safetensors")
    assert loaded.architecture == "2 heads, QuickGELU"
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(tower.encode(pixels).image_embeds, loaded.encode(pixels).image_embeds)


@pytest.mark.slow
def test_full_vit_h_matches_transformers(vit_h_file):
    from transformers import CLIPVisionModelWithProjection

    reference = CLIPVisionModelWithProjection.from_pretrained(vit_h_file.parent, torch_dtype=torch.float32).eval()
    encoder = assert_parity(reference, vit_h_file, 224)  # heads inferred: ViT-H has 80-wide heads
    assert encoder.name == "OpenCLIP ViT-H/14"
    assert (encoder.embed_dim, encoder.hidden_width, encoder.num_tokens) == (1024, 1280, 257)


def test_vit_bigg_layout_matches_transformers(tmp_path):
    # ViT-bigG/14's width, heads (16 of 104), MLP (8192) and projection (1280), with 2 of its 48 layers and a
    # 56-pixel image; a renamed file, as in models/clip_vision, so the head width comes from the width table
    reference = transformers_model(width=1664, layers=2, heads=16, patch=14, image=56, embed_dim=1280,
                                   intermediate=8192, scale=0.02)
    path = tmp_path / "CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    encoder = assert_parity(reference, path, 56)
    assert (encoder.embed_dim, encoder.hidden_width, encoder.architecture) == (1280, 1664, "16 heads, GELU")
    # the tower really is bigG's: the MLP is 8192 wide, not width x 4
    assert encoder.visual.transformer.resblocks[0].mlp.c_fc.out_features == 8192


def small_tower():
    tower = build_vision_tower("ViT-H-14", width=128, layers=3, head_width=64, image_size=56, embed_dim=32)
    randomise(tower, seed=2)
    return tower


@pytest.mark.parametrize("layout", ["full_clip", "visual_prefix", "bare", "wrapped", "ddp_training_checkpoint", "safetensors"])
def test_open_clip_files_load(tmp_path, layout):
    tower = small_tower()
    bare = {k: v.contiguous() for k, v in tower.visual.state_dict().items()}
    if layout in ("bare", "safetensors"):
        tensors = bare
    else:
        tensors = {f"visual.{k}": v for k, v in bare.items()}
    if layout == "full_clip":
        tensors.update({"token_embedding.weight": torch.zeros(10, 8), "text_projection": torch.zeros(8, 32),
                        "transformer.resblocks.0.ln_1.weight": torch.ones(8), "logit_scale": torch.ones(())})
    if layout == "ddp_training_checkpoint":  # what open_clip's trainer writes
        tensors = {"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in tensors.items()}}
    elif layout == "wrapped":
        tensors = {"state_dict": tensors}
    path = tmp_path / ("open_clip.safetensors" if layout == "safetensors" else "open_clip.bin")
    if layout == "safetensors":
        save_file(tensors, str(path))
    else:
        torch.save(tensors, path)
    loaded = load_image_encoder(path)
    pixels = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        a, b = tower.encode(pixels), loaded.encode(pixels)
        assert torch.equal(a.image_embeds, b.image_embeds) and torch.equal(a.penultimate, b.penultimate)
        # open_clip's own forward gives the same embedding
        assert torch.allclose(tower.visual(pixels), a.image_embeds, atol=1e-5)


def test_conversion_round_trip_equals_open_clip_weights():
    reference = transformers_model(**SMALL)
    converted = convert_transformers_to_open_clip(reference.state_dict())
    q = reference.state_dict()["vision_model.encoder.layers.1.self_attn.q_proj.weight"]
    v = reference.state_dict()["vision_model.encoder.layers.1.self_attn.v_proj.weight"]
    assert torch.equal(converted["transformer.resblocks.1.attn.in_proj_weight"][: SMALL["width"]], q)
    assert torch.equal(converted["transformer.resblocks.1.attn.in_proj_weight"][-SMALL["width"]:], v)
    assert torch.equal(converted["proj"], reference.state_dict()["visual_projection.weight"].T)
    tower = build_vision_tower("ViT-H-14", width=128, layers=3, head_width=64, image_size=56, embed_dim=32)
    assert set(converted) == set(tower.visual.state_dict())


def test_mlp_width_that_a_float_ratio_would_round_down(tmp_path):
    # int(88 * (120 / 88)) == 119 in floating point; ViT-bigG's 8192 / 1664 is the real-world case
    tower = build_vision_tower("ViT-H-14", width=88, layers=2, head_width=44, image_size=28, embed_dim=16, mlp_ratio=120.5 / 88)
    assert tower.visual.transformer.resblocks[0].mlp.c_fc.out_features == 120
    save_file({k: v.contiguous() for k, v in tower.visual.state_dict().items()}, str(tmp_path / "odd.safetensors"))
    assert load_image_encoder(tmp_path / "odd.safetensors", heads=2).visual.transformer.resblocks[0].mlp.c_fc.out_features == 120


def smooth_image(height, width, detail, seed=0):
    """8-bit pixels of a smooth random image [H, W, 3], and the same as ComfyUI floats [1, H, W, 3]."""
    small = torch.rand(1, 3, *detail, generator=torch.Generator().manual_seed(seed))
    image = torch.nn.functional.interpolate(small, size=(height, width), mode="bilinear").clamp(0, 1)
    pixels = (image[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    return pixels, torch.as_tensor(pixels).float()[None] / 255


# downscales (landscape, portrait, a long side that is not a whole number) and an upscale
@pytest.mark.parametrize("shape", [(300, 450, 12, 18), (500, 333, 40, 30), (600, 1000, 300, 500), (160, 120, 16, 12)])
def test_preprocessing_matches_clip_image_processor(shape):
    # The reference ran transformers 4's PIL CLIPImageProcessor; in transformers 5 that is CLIPImageProcessorPil
    # (plain CLIPImageProcessor is now the torchvision backend).
    from transformers import CLIPImageProcessorPil

    height, width, *detail = shape
    pil, images = smooth_image(height, width, detail)
    processor = CLIPImageProcessorPil(
        do_resize=True, size={"shortest_edge": 224}, resample=3, do_center_crop=True,
        crop_size={"height": 224, "width": 224}, do_normalize=True, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
    )
    expected = torch.as_tensor(processor(images=pil, return_tensors="pt")["pixel_values"])
    ours = preprocess(images, mode="crop")
    assert ours.shape == expected.shape == (1, 3, 224, 224)
    # PIL rounds its resized pixels to 8 bits: one step is 1/255/0.2613 = 0.015 in normalised units
    difference = (ours - expected).abs()
    assert difference.mean() < 0.008 and difference.max() < 0.02, (difference.mean(), difference.max())
    # the check can fail: no crop, a crop one pixel off, or a wrong mean are all far outside it
    assert (preprocess(images, mode="stretch") - expected).abs().mean() > 0.03
    shifted = preprocess(torch.nn.functional.pad(images, (0, 0, 1, 0, 1, 0)), mode="crop")
    assert (shifted - expected).abs().max() > 0.02
    assert ((ours * torch.tensor(CLIP_STD).view(3, 1, 1) + 0.02) / torch.tensor(CLIP_STD).view(3, 1, 1) - expected).abs().mean() > 0.05
    # channels-first input is the same image
    assert torch.equal(preprocess(images.permute(0, 3, 1, 2).contiguous(), mode="crop"), ours)


def test_pad_and_stretch():
    ramp = torch.linspace(0, 1, 200).view(1, 1, 200, 1)  # left to right, so cut-off edges show in the means
    image = (ramp * torch.tensor([1.0, 0.6, 0.3]) + 0.1 * torch.rand(2, 100, 200, 3, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    padded = preprocess(image, mode="pad")
    assert padded.shape == (2, 3, 224, 224)
    assert torch.allclose(padded[..., :56, :], torch.zeros(1), atol=1e-5)  # mean colour = 0 after normalising
    assert torch.allclose(padded[..., 168:, :], torch.zeros(1), atol=1e-5)
    assert padded[..., 60:160, :].abs().mean() > 0.1
    # the whole image is inside, resized to 112x224
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    inner = padded[..., 56:168, :] * std + mean
    assert (inner.mean(dim=(-1, -2)) - image.mean(dim=(1, 2))).abs().max() < 0.01
    stretched = preprocess(image, mode="stretch")
    assert stretched.shape == (2, 3, 224, 224)
    # stretch keeps the whole image: its left and right quarters are the image's, which crop cuts off
    left_right_quarters = [slice(0, 56), slice(168, 224)]
    for resized, original in zip(left_right_quarters, [slice(0, 50), slice(150, 200)]):
        restored = (stretched[..., resized] * std + mean).mean(dim=(-1, -2))
        assert (restored - image[:, :, original].mean(dim=(1, 2))).abs().max() < 0.01
    cropped = preprocess(image, mode="crop")[..., :56] * std + mean
    assert (cropped.mean(dim=(-1, -2)) - image[:, :, :50].mean(dim=(1, 2))).abs().max() > 0.1
    with pytest.raises(ValueError, match="empty"):
        preprocess(torch.zeros(0, 64, 64, 3))
    with pytest.raises(ValueError, match="expected \\[batch, height, width, 3\\]"):
        preprocess(torch.zeros(1, 1, 64, 64, 4))
    with pytest.raises(ValueError, match="expected \\[batch, height, width, 3\\]"):
        preprocess(torch.zeros(64, 64, 3))
    with pytest.raises(ValueError, match="expected floats"):
        preprocess(torch.zeros(1, 64, 64, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="unknown"):
        preprocess(image, mode="fill")


def test_uncond_pixels_are_zero_and_encode_deterministically():
    tower = small_tower()
    pixels = tower.uncond_pixels(2)
    assert pixels.shape == (2, 3, 56, 56) and not pixels.any()
    with torch.no_grad():
        first, second = tower.encode(pixels), tower.encode(pixels)
    assert torch.equal(first.penultimate, second.penultimate) and torch.isfinite(first.penultimate).all()


def assert_one_line(error, *fragments):
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_errors(tmp_path):
    with pytest.raises(EncoderFormatError) as error:
        load_image_encoder(tmp_path / "missing.safetensors")
    assert_one_line(error, "missing.safetensors", "does not exist")

    reference = transformers_model(**SMALL)
    path = tmp_path / "cut.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(EncoderFormatError) as error:
        load_image_encoder(path)
    assert_one_line(error, "cut.safetensors", "truncated or corrupt")

    marker = tmp_path / "pwned"
    torch.save({"conv1.weight": RunsCode(str(marker))}, tmp_path / "evil.bin")
    with pytest.raises(EncoderFormatError) as error:
        load_image_encoder(tmp_path / "evil.bin")
    assert_one_line(error, "evil.bin", "refused")
    assert not marker.exists()

    save_file({"image_proj.proj.weight": torch.zeros(8, 4), "ip_adapter.1.to_k_ip.weight": torch.zeros(4, 4)}, str(tmp_path / "ip-adapter_sd15.safetensors"))
    with pytest.raises(EncoderFormatError) as error:
        load_image_encoder(tmp_path / "ip-adapter_sd15.safetensors")
    assert_one_line(error, "ip-adapter_sd15.safetensors", "not a CLIP vision model", "image_proj.proj.weight")

    save_file({"text_model.embeddings.token_embedding.weight": torch.zeros(8, 4)}, str(tmp_path / "clip_l.safetensors"))
    with pytest.raises(EncoderFormatError) as error:
        load_image_encoder(tmp_path / "clip_l.safetensors")
    assert_one_line(error, "clip_l.safetensors", "text model without a vision tower")


def test_malicious_pickle_payload_is_real(tmp_path):
    """The payload used in test_errors does run under a plain unpickler, so its refusal there means something."""
    marker = tmp_path / "ran"
    torch.save({"conv1.weight": RunsCode(str(marker))}, tmp_path / "evil.bin")
    torch.load(tmp_path / "evil.bin", weights_only=False)
    assert marker.exists()


def small_transformers_tensors(**changes) -> dict:
    tensors = {k: v.contiguous() for k, v in transformers_model(**SMALL).state_dict().items()}
    for key, value in changes.items():
        if value is None:
            del tensors[key]
        else:
            tensors[key] = value
    return tensors


@pytest.mark.parametrize(
    "case, fragments",
    [
        ("sd_unet", ["not a CLIP vision model", "model.diffusion_model"]),
        ("text_model_v5", ["text model without a vision tower"]),
        ("vision_without_projection", ["without its projection", "visual_projection.weight"]),
        ("layer_of_wrong_width", ["does not match", "mlp.c_fc.weight"]),
        ("missing_layer_norm", ["lacks", "layer_norm2"]),
        ("not_square_grid", ["square grid"]),
        ("heads_not_dividing", ["heads=3 does not divide the width 128"]),
        ("list_in_pickle", ["holds a list"]),
    ],
)
def test_wrong_models_give_one_line_errors(tmp_path, case, fragments):
    name = f"{case}.safetensors"
    heads = None
    if case == "sd_unet":
        tensors = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3), "first_stage_model.decoder.conv_in.weight": torch.zeros(2)}
    elif case == "text_model_v5":  # transformers 5 saves CLIPTextModel without 'text_model.'
        tensors = {"embeddings.token_embedding.weight": torch.zeros(8, 4), "encoder.layers.0.layer_norm1.weight": torch.ones(4)}
    elif case == "vision_without_projection":  # transformers 5's CLIPVisionModel: no prefix, no projection
        tensors = {k.removeprefix("vision_model."): v for k, v in small_transformers_tensors(**{"visual_projection.weight": None}).items()}
    elif case == "layer_of_wrong_width":
        tensors = small_transformers_tensors(**{"vision_model.encoder.layers.1.mlp.fc1.weight": torch.zeros(256, 128)})
    elif case == "missing_layer_norm":
        tensors = small_transformers_tensors(**{"vision_model.encoder.layers.2.layer_norm2.weight": None})
    elif case == "not_square_grid":
        tensors = small_transformers_tensors(**{"vision_model.embeddings.position_embedding.weight": torch.zeros(18, 128)})
    elif case == "heads_not_dividing":
        tensors, heads = small_transformers_tensors(), 3
    else:
        name = "list.bin"
        torch.save([torch.zeros(2)], tmp_path / name)
    if not name.endswith(".bin"):
        save_file(tensors, str(tmp_path / name))
    with pytest.raises(EncoderFormatError) as error:
        load_image_encoder(tmp_path / name, heads=heads)
    assert_one_line(error, name, *fragments)
