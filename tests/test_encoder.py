import os

import pytest
import torch
from safetensors.torch import save_file

from ipadapter.encoder import (
    EncoderFormatError,
    build_vision_tower,
    convert_transformers_to_open_clip,
    load_image_encoder,
)
from ipadapter.preprocess import CLIP_MEAN, CLIP_STD, preprocess

SMALL = dict(width=128, layers=3, heads=2, patch=14, image=56, embed_dim=32)  # 64-wide heads, like the default


def randomise(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    """transformers' init makes near-identity towers; spread the weights so parity means something."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if parameter.dim() == 1 and ("norm" in name or "layrnorm" in name) and name.endswith("weight"):
                parameter.copy_(1 + 0.1 * noise)
            else:
                parameter.copy_(scale * noise)


def transformers_model(width, layers, heads, patch, image, embed_dim, seed=0, scale=0.05):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(
        hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers, num_attention_heads=heads,
        image_size=image, patch_size=patch, projection_dim=embed_dim, hidden_act="gelu", layer_norm_eps=1e-5,
    )
    model = CLIPVisionModelWithProjection(config).eval()
    randomise(model, seed, scale)
    return model


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


def test_transformers_file_matches_transformers_model(tmp_path):
    reference = transformers_model(**SMALL)
    path = tmp_path / "clip_vision.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    encoder = assert_parity(reference, path, SMALL["image"], heads=SMALL["heads"])
    assert (encoder.embed_dim, encoder.hidden_width, encoder.num_tokens, encoder.image_size) == (32, 128, 17, 56)


@pytest.mark.slow
def test_full_vit_h_matches_transformers(vit_h_file):
    from transformers import CLIPVisionModelWithProjection

    reference = CLIPVisionModelWithProjection.from_pretrained(vit_h_file.parent, torch_dtype=torch.float32).eval()
    encoder = assert_parity(reference, vit_h_file, 224)  # heads inferred: ViT-H has 80-wide heads
    assert encoder.name == "OpenCLIP ViT-H/14"
    assert (encoder.embed_dim, encoder.hidden_width, encoder.num_tokens) == (1024, 1280, 257)


def small_tower():
    tower = build_vision_tower("ViT-H-14", width=128, layers=3, head_width=64, image_size=56, embed_dim=32)
    randomise(tower, seed=2)
    return tower


@pytest.mark.parametrize("layout", ["full_clip", "visual_prefix", "bare", "wrapped"])
def test_open_clip_files_load(tmp_path, layout):
    tower = small_tower()
    bare = {k: v.contiguous() for k, v in tower.visual.state_dict().items()}
    if layout == "bare":
        tensors = bare
    else:
        tensors = {f"visual.{k}": v for k, v in bare.items()}
    if layout == "full_clip":
        tensors.update({"token_embedding.weight": torch.zeros(10, 8), "text_projection": torch.zeros(8, 32), "logit_scale": torch.ones(())})
    path = tmp_path / "open_clip.bin"
    torch.save({"state_dict": tensors} if layout == "wrapped" else tensors, path)
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


def test_preprocessing_matches_clip_image_processor():
    from transformers import CLIPImageProcessor

    generator = torch.Generator().manual_seed(0)
    small = torch.rand(1, 3, 12, 18, generator=generator)
    image = torch.nn.functional.interpolate(small, size=(300, 450), mode="bilinear").clamp(0, 1)  # smooth, 2:3
    processor = CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": 224}, resample=3, do_center_crop=True,
        crop_size={"height": 224, "width": 224}, do_normalize=True, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
    )
    pil = (image[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    expected = torch.as_tensor(processor(images=pil, return_tensors="pt")["pixel_values"])
    ours = preprocess(torch.as_tensor(pil).float()[None] / 255, mode="crop")
    assert ours.shape == expected.shape == (1, 3, 224, 224)
    difference = (ours - expected).abs()
    assert difference.mean() < 0.01 and difference.max() < 0.1, (difference.mean(), difference.max())
    # a stretched image (no crop) is measurably different, so the check can fail
    assert (preprocess(torch.as_tensor(pil).float()[None] / 255, mode="stretch") - expected).abs().mean() > 0.05


def test_pad_and_stretch():
    image = torch.rand(2, 100, 200, 3)
    padded = preprocess(image, mode="pad")
    assert padded.shape == (2, 3, 224, 224)
    assert torch.allclose(padded[..., :50, :], torch.zeros(1), atol=1e-5)  # mean colour = 0 after normalising
    assert padded[..., 60:160, :].abs().mean() > 0.1
    stretched = preprocess(image, mode="stretch")
    assert stretched.shape == (2, 3, 224, 224)
    with pytest.raises(ValueError, match="empty"):
        preprocess(torch.zeros(0, 64, 64, 3))
    with pytest.raises(ValueError, match="expected \\[batch, height, width, 3\\]"):
        preprocess(torch.zeros(1, 1, 64, 64, 4))


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
