"""The DiT adapters' image encoders, OpenAI's CLIP ViT-L/14 and SigLIP so400m, against transformers' own models.

Random towers, scaled down (fewer layers, small images; SigLIP also narrower), saved the way users keep
them; our outputs must equal ``CLIPVisionModelWithProjection``'s (image_embeds, hidden_states[-2]) and
``SiglipVisionModel``'s (pooler_output, hidden_states[-2]) on the same pixels.
"""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from devtools.clip_vision import randomise, transformers_model
from ipadapter.encoder import EncoderFormatError, ImageEncoder, load_image_encoder
from ipadapter.preprocess import CLIP_MEAN, CLIP_STD, preprocess
from ipadapter.registry import ENCODERS, encoder_by_id, encoder_of_widths
from ipadapter.siglip import SIGLIP_MEAN, SiglipEncoder, preprocess_siglip

CLIP_L = encoder_by_id("clip-l")
SIGLIP = encoder_by_id("siglip")
RELATIVE = 1e-5
SMALL_SIGLIP = dict(width=144, layers=3, heads=2, image=42, intermediate=200)  # 72-wide heads, as so400m's


def clip_l_model(seed=0, activation="quick_gelu"):
    """ViT-L/14's widths (so the registry knows it), 2 of its 24 layers, a 28-pixel image."""
    return transformers_model(width=CLIP_L.hidden_width, layers=2, heads=CLIP_L.hidden_width // CLIP_L.head_width,
                              patch=14, image=28, embed_dim=CLIP_L.embed_dim, seed=seed, scale=0.02, activation=activation)


def siglip_config(width, layers, heads, image, intermediate, head=True):
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(hidden_size=width, intermediate_size=intermediate, num_hidden_layers=layers,
                              num_attention_heads=heads, patch_size=14, image_size=image, vision_use_head=head)


def siglip_model(seed=0, scale=0.05, **shape):
    from transformers import SiglipVisionModel

    model = SiglipVisionModel(siglip_config(**{**SMALL_SIGLIP, **shape})).eval()
    randomise(model, seed, scale)
    return model


def half_exact(model):
    """Weights that float16 holds exactly, so ComfyUI's half-precision copy is the same tower."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter.half().float())
    return model


def tensors_of(model, prefix=""):
    """The model's tensors under ``prefix`` (transformers 4 keeps 'vision_model.' in a SiglipVisionModel, 5 drops it)."""
    return {prefix + k.removeprefix(prefix): v.contiguous() for k, v in model.state_dict().items()}


def pil_processor(name):
    """transformers 5's PIL image processor (transformers 4's only one, under the plain name)."""
    import transformers

    return getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)


def pixels_for(encoder, batch=2, seed=1):
    return torch.randn(batch, 3, encoder.image_size, encoder.image_size, generator=torch.Generator().manual_seed(seed))


def assert_close(ours, expected):
    assert ours.shape == expected.shape
    assert torch.isfinite(expected).all()
    assert (ours - expected).abs().max() <= RELATIVE * expected.abs().max(), (ours - expected).abs().max()


def assert_clip_parity(reference, encoder):
    pixels = pixels_for(encoder)
    with torch.no_grad():
        expected = reference(pixel_values=pixels, output_hidden_states=True)
        ours = encoder.encode(pixels)
    assert_close(ours.image_embeds, expected.image_embeds)
    assert_close(ours.penultimate, expected.hidden_states[-2])
    assert (ours.penultimate - expected.hidden_states[-1]).abs().max() > 1e-2  # the check can fail


def assert_siglip_parity(reference, encoder, pooled=True):
    pixels = pixels_for(encoder)
    with torch.no_grad():
        expected = reference(pixel_values=pixels, output_hidden_states=True)
        ours = encoder.encode(pixels)
        normed = getattr(reference, "vision_model", reference).post_layernorm(expected.hidden_states[-2])
    assert_close(ours.penultimate, expected.hidden_states[-2])
    # the penultimate states are the layer's output as it is: no final LayerNorm (that comes after the last layer)
    assert (ours.penultimate - normed).abs().max() > 1e-2
    if pooled:
        assert_close(ours.image_embeds, expected.pooler_output)
        assert (ours.image_embeds - expected.last_hidden_state.mean(dim=1)).abs().max() > 1e-2
    else:
        assert ours.image_embeds.shape == (pixels.shape[0], 0)
    return ours


def test_registry_widths_pick_each_encoder():
    assert [e.id for e in ENCODERS][-2:] == ["clip-l", "siglip"]
    pairs = [(e.embed_dim, e.hidden_width) for e in ENCODERS]
    assert len(set(pairs)) == len(pairs)
    for encoder in ENCODERS:
        assert encoder_of_widths(encoder.embed_dim, encoder.hidden_width) is encoder
        assert encoder_of_widths(hidden_width=encoder.hidden_width) is encoder
        assert encoder_of_widths(embed_dim=encoder.embed_dim) is encoder
        assert encoder.hidden_width % encoder.head_width == 0
    assert (CLIP_L.activation, SIGLIP.activation, SIGLIP.layout) == ("quick_gelu", "gelu_pytorch_tanh", "siglip")
    assert (CLIP_L.hidden_width // CLIP_L.head_width, SIGLIP.hidden_width // SIGLIP.head_width) == (16, 16)


# --- OpenAI CLIP ViT-L/14 ------------------------------------------------------------


@pytest.mark.parametrize("layout", ["clip_vision_l", "clip_model_with_config"])
def test_clip_l_files_are_quick_gelu_with_16_heads(tmp_path, layout):
    """ComfyUI's renamed clip_vision_l.safetensors has no config: its widths make it ViT-L/14 (QuickGELU, 16 heads);
    openai/clip-vit-large-patch14's model.safetensors is a whole CLIPModel with its config.json beside."""
    reference = clip_l_model()
    tensors = tensors_of(reference)
    if layout == "clip_vision_l":
        path = tmp_path / "clip_vision_l.safetensors"
    else:
        path = tmp_path / "clip-vit-large-patch14" / "model.safetensors"
        path.parent.mkdir()
        tensors.update({"text_model.embeddings.token_embedding.weight": torch.zeros(10, 8),
                        "text_projection.weight": torch.zeros(CLIP_L.embed_dim, 8), "logit_scale": torch.ones(())})
        (path.parent / "config.json").write_text(json.dumps({"model_type": "clip", "vision_config": {
            "hidden_act": "quick_gelu", "num_attention_heads": 16}}))
    save_file(tensors, str(path))
    encoder = load_image_encoder(path)
    assert isinstance(encoder, ImageEncoder)
    assert (encoder.architecture, encoder.embed_dim, encoder.hidden_width) == ("16 heads, QuickGELU", 768, 1024)
    assert_clip_parity(reference, encoder)


def test_clip_l_config_beside_wins_over_the_registry(tmp_path):
    """A LAION ViT-L/14 has the same widths but GELU: its config.json says so, and the outputs differ."""
    reference = clip_l_model(seed=3, activation="gelu")
    reference.save_pretrained(tmp_path)
    encoder = load_image_encoder(tmp_path / "model.safetensors")
    assert encoder.architecture == "16 heads, GELU"
    assert_clip_parity(reference, encoder)
    shutil.copy(tmp_path / "model.safetensors", tmp_path / "laion-vit-l-renamed.safetensors")  # no config: QuickGELU
    guessed = load_image_encoder(tmp_path / "laion-vit-l-renamed.safetensors")
    assert guessed.architecture == "16 heads, QuickGELU"
    pixels = pixels_for(encoder)
    with torch.no_grad():
        assert (guessed.encode(pixels).image_embeds - encoder.encode(pixels).image_embeds).abs().max() > 1e-3


def comfy_clip_vision(tmp_path, config_name, path, **overrides):
    """ComfyUI's Load CLIP Vision model of a scaled-down tower: its own config file with our shape (its loader picks
    configs by the full-size layer count), loaded from the file as its loader does."""
    import comfy.clip_vision

    config = json.loads((Path(comfy.clip_vision.__file__).parent / config_name).read_text())
    config_path = tmp_path / f"comfy_{config_name}"
    config_path.write_text(json.dumps({**config, **overrides}))
    clip_vision = comfy.clip_vision.ClipVisionModel(str(config_path))
    missing, _ = clip_vision.load_sd(load_file(str(path)))
    assert missing == []
    return clip_vision


def test_clip_l_from_comfyui_load_clip_vision(comfy, tmp_path):
    reference = half_exact(clip_l_model(seed=5))
    path = tmp_path / "clip_vision_l.safetensors"
    save_file(tensors_of(reference), str(path))
    clip_vision = comfy_clip_vision(tmp_path, "clip_vision_config_vitl.json", path, num_hidden_layers=2,
                                    image_size=28)
    encoder = load_image_encoder(clip_vision.get_sd())
    assert encoder.architecture == "16 heads, QuickGELU"
    assert_clip_parity(reference, encoder)


def test_clip_l_preprocessing_matches_clip_image_processor():
    """openai/clip-vit-large-patch14's preprocessor: shortest side 224 (bicubic), center crop, OpenAI's mean/std."""
    pil, images = smooth_image(300, 450, (12, 18))
    processor = pil_processor("CLIPImageProcessor")(size={"shortest_edge": 224}, resample=3,
                                                    crop_size={"height": 224, "width": 224},
                                                    image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    expected = torch.as_tensor(processor(images=pil, return_tensors="pt")["pixel_values"])
    difference = (preprocess(images, 224, "crop") - expected).abs()
    assert difference.mean() < 0.008 and difference.max() < 0.02  # PIL's 8-bit rounding, as in test_encoder


# --- SigLIP so400m ---------------------------------------------------------------------


def siglip_file(tmp_path, layout, reference):
    """A SigLIP file as users have it; the reference is the vision tower the file holds."""
    if layout == "sigclip_vision":  # ComfyUI's file: transformers 4 keys with 'vision_model.', head included
        path = tmp_path / "sigclip_vision_patch14_384.safetensors"
        save_file(tensors_of(reference, "vision_model."), str(path))
    elif layout == "legacy_position_ids":  # transformers 4 saved the position_ids buffer too
        path = tmp_path / "siglip_renamed.safetensors"
        tensors = tensors_of(reference, "vision_model.")
        tensors["vision_model.embeddings.position_ids"] = torch.arange((reference.config.image_size // 14) ** 2)[None]
        save_file(tensors, str(path))
    elif layout == "save_pretrained":  # transformers 5: no prefix, and the config beside (4 heads: no guess gives it)
        reference.save_pretrained(tmp_path / "siglip")
        path = tmp_path / "siglip" / "model.safetensors"
    return path


@pytest.mark.parametrize("layout", ["sigclip_vision", "legacy_position_ids", "save_pretrained"])
def test_siglip_files_match_siglip_vision_model(tmp_path, layout):
    heads = 4 if layout == "save_pretrained" else 2
    reference = siglip_model(seed=1, heads=heads)
    encoder = load_image_encoder(siglip_file(tmp_path, layout, reference))
    assert isinstance(encoder, SiglipEncoder)
    assert encoder.architecture == f"{heads} heads, gelu_pytorch_tanh"
    assert (encoder.embed_dim, encoder.hidden_width, encoder.image_size, encoder.num_tokens) == (144, 144, 42, 9)
    ours = assert_siglip_parity(reference, encoder)
    assert ours.penultimate.shape == (2, 9, 144)  # no class token


def test_whole_siglip_model_file_keeps_the_vision_tower(tmp_path):
    """google/siglip-so400m-patch14-384's model.safetensors: a SiglipModel, text tower and logit scale beside."""
    from transformers import SiglipConfig, SiglipModel

    vision = siglip_config(**SMALL_SIGLIP).to_dict()
    text = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    whole = SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).eval()
    randomise(whole, seed=2)
    whole.save_pretrained(tmp_path)
    keys = load_file(str(tmp_path / "model.safetensors")).keys()
    assert any(k.startswith("text_model.") for k in keys) and any(k.startswith("vision_model.head.") for k in keys)
    encoder = load_image_encoder(tmp_path / "model.safetensors")
    assert encoder.architecture == "2 heads, gelu_pytorch_tanh"
    assert_siglip_parity(whole.vision_model, encoder)


def test_siglip_so400m_widths_from_a_renamed_file(tmp_path):
    """so400m's width, MLP and heads (16 of 72), 2 of its 27 layers, a 28-pixel image: the registry gives the heads."""
    reference = siglip_model(seed=3, scale=0.02, width=SIGLIP.hidden_width, layers=2, heads=16, image=28,
                             intermediate=4304)
    path = tmp_path / "sigclip_vision_patch14_384.safetensors"
    save_file(tensors_of(reference, "vision_model."), str(path))
    encoder = load_image_encoder(path)
    assert (encoder.architecture, encoder.embed_dim, encoder.hidden_width) == ("16 heads, gelu_pytorch_tanh", 1152, 1152)
    assert_siglip_parity(reference, encoder)
    assert {key.split(".")[0] for key in encoder.state_dict()} == {"model"}  # each tensor once, for ComfyUI's sizes
    half = load_image_encoder(path, dtype=torch.float16)
    assert half.parameter_dtype == torch.float16 and half.uncond_pixels(1).dtype == torch.float16


def test_siglip_from_comfyui_load_clip_vision(comfy, tmp_path):
    """ComfyUI's SigLIP model drops the pooling head (vision_model.head.*): the penultimate states still match, and
    the missing image embedding shows as a width of 0 and in the name."""
    reference = half_exact(siglip_model(seed=4))
    path = tmp_path / "sigclip_vision_patch14_384.safetensors"
    save_file(tensors_of(reference, "vision_model."), str(path))
    clip_vision = comfy_clip_vision(tmp_path, "clip_vision_siglip_384.json", path, hidden_size=144,
                                    intermediate_size=200, num_hidden_layers=3, num_attention_heads=2, image_size=42)
    state_dict = clip_vision.get_sd()
    assert not any(".head." in k for k in state_dict)
    encoder = load_image_encoder(state_dict)
    assert (encoder.embed_dim, encoder.hidden_width) == (0, 144)
    assert encoder.name.endswith("without its pooling head")
    ours = assert_siglip_parity(reference, encoder, pooled=False)
    # ComfyUI's own penultimate states (its LayerNorms keep torch's eps, 1e-5, not SigLIP's 1e-6: a small difference)
    with torch.no_grad():
        _, all_states, _, _ = clip_vision.model(pixel_values=pixels_for(encoder), intermediate_output="all")
    assert (all_states[:, -2].float() - ours.penultimate).abs().max() < 1e-3 * ours.penultimate.abs().max()


def smooth_image(height, width, detail, seed=0):
    """8-bit pixels of a smooth random image [H, W, 3], and the same as ComfyUI floats [1, H, W, 3]."""
    small = torch.rand(1, 3, *detail, generator=torch.Generator().manual_seed(seed))
    image = torch.nn.functional.interpolate(small, size=(height, width), mode="bilinear").clamp(0, 1)
    pixels = (image[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    return pixels, torch.as_tensor(pixels).float()[None] / 255


def siglip_processor_pixels(processor_class, pixels):
    processor = processor_class(size={"height": 384, "width": 384}, resample=3, image_mean=list(SIGLIP_MEAN),
                                image_std=list(SIGLIP_MEAN))
    return torch.as_tensor(processor(images=pixels, return_tensors="pt")["pixel_values"])


# a landscape downscale and a portrait upscale
@pytest.mark.parametrize("shape", [(500, 700, 20, 28), (300, 200, 12, 8)])
def test_siglip_preprocessing_matches_siglip_image_processor(shape):
    """SiglipImageProcessor stretches to 384x384 (our ``stretch``); our ``crop`` is the processor on the center square.

    Both processors (PIL, which InstantX ran under transformers 4, and transformers 5's torchvision default) resize
    with the same antialiased bicubic kernel as ours but round the resized pixels to 8 bits (PIL in fixed point);
    we keep floats. One 8-bit step is 1/255/0.5 = 0.0078 here: on average under a third of a step apart, at most
    one and a half.
    """
    from transformers import SiglipImageProcessor

    height, width, *detail = shape
    pil, images = smooth_image(height, width, detail)
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    for mode, source in [("stretch", pil), ("crop", pil[top : top + side, left : left + side])]:
        ours = preprocess_siglip(images, 384, mode)
        assert ours.shape == (1, 3, 384, 384)
        for processor_class in (pil_processor("SiglipImageProcessor"), SiglipImageProcessor):
            difference = (ours - siglip_processor_pixels(processor_class, source)).abs()
            assert difference.mean() < 0.0025 and difference.max() < 0.012, (mode, difference.mean(), difference.max())
    # the check can fail: crop and stretch of this image are far apart
    assert (preprocess_siglip(images, 384, "crop") - preprocess_siglip(images, 384, "stretch")).abs().mean() > 0.02


def test_siglip_pad_uncond_and_encode_images(tmp_path):
    image = 0.8 + 0.2 * torch.rand(2, 100, 200, 3, generator=torch.Generator().manual_seed(0))  # > 0.6 normalised
    padded = preprocess_siglip(image, 42, "pad")
    assert padded.shape == (2, 3, 42, 42)
    assert not padded[..., :10, :].any() and not padded[..., 32:, :].any()  # mean grey, zero after normalising
    assert padded[..., 11:31, :].min() > 0.5  # the whole image, 21 rows high, in between
    with pytest.raises(ValueError, match="unknown"):
        preprocess_siglip(image, 42, "fill")

    reference = siglip_model(seed=6)
    path = tmp_path / "sigclip_vision_patch14_384.safetensors"
    save_file(tensors_of(reference, "vision_model."), str(path))
    encoder = load_image_encoder(path)
    blank = encoder.uncond_pixels(2)
    assert blank.shape == (2, 3, 42, 42) and not blank.any()
    out = encoder.encode_images(image, mode="crop")
    assert out.image_embeds.shape == (2, 144) and out.penultimate.shape == (2, 9, 144)
    with torch.no_grad():
        expected = reference(pixel_values=preprocess_siglip(image, 42, "crop"), output_hidden_states=True)
    assert_close(out.image_embeds, expected.pooler_output)


# --- errors ------------------------------------------------------------------------------


def assert_one_line(error, *fragments):
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def small_siglip_tensors(**changes):
    tensors = tensors_of(siglip_model(), "vision_model.")
    for key, value in changes.items():
        if value is None:
            del tensors[key]
        else:
            tensors[key] = value
    return tensors


@pytest.mark.parametrize(
    "case, fragments",
    [
        ("dinov2", ["not a CLIP vision model", "embeddings.cls_token", "SiglipVisionModel"]),
        ("siglip_text_only", ["text model without a vision tower"]),
        ("missing_layer", ["does not match a SigLIP vision tower", "missing", "encoder.layers.1.mlp.fc2.bias"]),
        ("wrong_width", ["does not match a SigLIP vision tower", "mlp.fc1.weight"]),
        ("class_token_grid", ["10 positions", "square grid (SigLIP: no class token)"]),
        ("width_no_head_width_divides", ["SigLIP tower of width 100", "72-wide heads", "expected heads="]),
        ("heads_not_dividing", ["heads=5 does not divide the width 144"]),
    ],
)
def test_wrong_files_give_one_line_errors(tmp_path, case, fragments):
    heads = None
    if case == "dinov2":  # neither CLIP nor SigLIP
        tensors = {"embeddings.cls_token": torch.zeros(1, 1, 8),
                   "embeddings.patch_embeddings.projection.weight": torch.zeros(8, 3, 14, 14),
                   "encoder.layer.0.norm1.weight": torch.ones(8)}
    elif case == "siglip_text_only":
        tensors = {"text_model.embeddings.token_embedding.weight": torch.zeros(8, 4), "logit_bias": torch.zeros(1)}
    elif case == "missing_layer":
        tensors = small_siglip_tensors(**{"vision_model.encoder.layers.1.mlp.fc2.bias": None})
    elif case == "wrong_width":
        tensors = small_siglip_tensors(**{"vision_model.encoder.layers.2.mlp.fc1.weight": torch.zeros(300, 144)})
    elif case == "class_token_grid":
        tensors = small_siglip_tensors(**{"vision_model.embeddings.position_embedding.weight": torch.zeros(10, 144)})
    elif case == "width_no_head_width_divides":
        tensors = small_siglip_tensors(**{"vision_model.embeddings.patch_embedding.weight": torch.zeros(100, 3, 14, 14)})
    else:
        tensors, heads = small_siglip_tensors(), 5
    name = f"{case}.safetensors"
    save_file(tensors, str(tmp_path / name))
    with pytest.raises(EncoderFormatError) as error:
        load_image_encoder(tmp_path / name, heads=heads)
    assert_one_line(error, name, *fragments)
