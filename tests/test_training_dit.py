"""Training the DiT adapters end to end on tiny random models (CPU): XLabs on Flux.1, InstantX on SD3.5.

The exports load with diffusers' own loaders and give the training model's output; a variant on another
family's base is a one-line error."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from devtools.dit_models import write_tiny_clip_encoder, write_tiny_siglip_encoder, write_trainer_folder
from ipadapter.registry import family_by_id
from training.config import ConfigError, load_config
from training.data import write_toy_dataset
from training.run import main

COMMON = ["--data.resolution", "32", "--data.num_workers", "0", "--train.batch_size", "2", "--train.max_steps", "2",
          "--train.log_every", "1", "--train.progress", "false", "--sample.every", "0", "--train.export_dtype", "fp32"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit")
    return {"flux": write_trainer_folder(root / "flux", family_by_id("flux")),
            "sd35": write_trainer_folder(root / "sd35", family_by_id("sd35")),
            "clip": write_tiny_clip_encoder(root / "clip.safetensors"),
            "siglip": write_tiny_siglip_encoder(root / "siglip.safetensors"),
            "data": write_toy_dataset(root / "data", 6), "root": root}


def train(files, family, encoder, width, variant, *extra):
    out = files["root"] / f"out-{family}-{variant}"
    result = main(["--model.base", str(files[family]), "--model.image_encoder", str(files[encoder]),
                   "--model.encoder_embed_dim", str(width), "--model.variant", variant, "--data.path",
                   str(files["data"]), "--train.output_dir", str(out), *COMMON, *extra])
    assert result["step"] == 2 and all(math.isfinite(loss) for loss in result["history"]), result["history"]
    return result


@pytest.fixture(scope="module")
def xlabs(files):
    return train(files, "flux", "clip", 32, "xlabs", "--model.num_tokens", "4")


@pytest.fixture(scope="module")
def instantx(files):
    return train(files, "sd35", "siglip", 144, "instantx")


def changed(model):
    """Whether training moved the adapter from its seeded start (the same construction, seed 42)."""
    from training.dit_adapter import DiTAdapterModel
    from training.models import seeded

    transformer = type(model.transformer).from_config(model.transformer.config)
    row = model.row
    with seeded(42):
        start = DiTAdapterModel(transformer, model.family, row.name, model.tokens, model.encoder_width)
    before, after = start.trainable_state_dict(), model.trainable_state_dict()
    assert before.keys() == after.keys()
    return all(not torch.equal(before[k], after[k]) for k in after if k.endswith("to_k_ip.weight"))


class Holder:
    """The part of a pipeline diffusers' ``load_ip_adapter`` uses: the transformer (no image encoder)."""

    def __init__(self, transformer):
        self.transformer = transformer


def diffusers_transformer(files, family, export):
    from diffusers.loaders.ip_adapter import FluxIPAdapterMixin, SD3IPAdapterMixin

    facts = family_by_id(family).training
    import diffusers

    transformer = getattr(diffusers, facts.denoiser_class).from_pretrained(str(files[family] / facts.denoiser_folder))
    mixin = FluxIPAdapterMixin if family == "flux" else SD3IPAdapterMixin
    holder = type("Pipe", (Holder, mixin), {})(transformer)
    kwargs = {"image_encoder_pretrained_model_name_or_path": None} if family == "flux" else {}
    mixin.load_ip_adapter(holder, str(export.parent), weight_name=export.name, **kwargs)
    for processor in transformer.attn_processors.values():
        if hasattr(processor, "scale"):
            processor.scale = [1.0] if isinstance(processor.scale, list) else 1.0
    return transformer.eval()




def compare(files, family, result, image_input, diffusers_input):
    model = result["model"].eval()
    export = next(p for p in result["export"] if p.suffix == ".safetensors")
    from training.dit_models import load_dit_parts

    parts = load_dit_parts(files[family], family_by_id(family), torch.float32)
    torch.manual_seed(3)
    latents, sigma = torch.randn(2, 16, 4, 4), torch.tensor([0.3, 0.8])
    context, pooled = parts.encode_text(["a red square", "a blue circle"])
    with torch.no_grad():
        parts.transformer = model.transformer
        ours = model(parts, latents, sigma, context, pooled, image_input)
        assert (model(parts, latents, sigma, context, pooled, image_input + 1) - ours).abs().max() > 1e-4  # it matters
        parts.transformer = diffusers_transformer(files, family, export)
        theirs = parts.denoise(latents, sigma, context, pooled, {"ip_adapter_image_embeds": diffusers_input})
    assert (ours - theirs).abs().max() < 1e-5 * max(1.0, ours.abs().max())


def test_xlabs_on_flux_trains_and_loads_in_diffusers(files, xlabs):
    model = xlabs["model"]
    assert xlabs["export"][0].name == "ip_adapter_flux_step00000002.safetensors"
    keys = set(load_file(str(xlabs["export"][0])))
    assert "ip_adapter_proj_model.proj.weight" in keys
    assert "double_blocks.18.processor.ip_adapter_double_stream_v_proj.bias" in keys and len(keys) == 4 + 19 * 4
    assert load_file(str(xlabs["export"][0]))["ip_adapter_proj_model.proj.weight"].shape[0] == 4 * 32
    assert changed(model)
    embeds = torch.randn(2, 32)
    compare(files, "flux", xlabs, embeds, [embeds[:, None]])  # diffusers: [batch, images, width] per adapter


def test_instantx_on_sd35_trains_and_loads_in_diffusers(files, instantx):
    model = instantx["model"]
    names = sorted(p.name for p in instantx["export"])
    assert names == ["ip-adapter_sd35_step00000002.bin", "ip-adapter_sd35_step00000002.safetensors"]
    assert changed(model)
    states = torch.randn(2, 9, 144)
    compare(files, "sd35", instantx, states, states)


def test_a_variant_on_another_familys_base_is_one_line(files, tmp_path):
    sdxl = tmp_path / "sdxl"
    (sdxl / "unet").mkdir(parents=True)
    (sdxl / "unet" / "config.json").write_text(json.dumps({"cross_attention_dim": 2048}))
    common = ["--model.image_encoder", str(files["clip"]), "--data.path", str(files["data"])]
    with pytest.raises(ConfigError) as error:
        load_config(["--model.base", str(sdxl), "--model.variant", "xlabs", *common])
    assert str(error.value).count("\n") == 0
    assert "xlabs trains Flux.1 adapters" in str(error.value) and "is an SDXL model" in str(error.value)
    with pytest.raises(ConfigError) as error:
        load_config(["--model.base", str(files["flux"]), "--model.variant", "instantx", *common])
    assert "instantx trains SD3.5 Large adapters" in str(error.value) and "expected one of xlabs" in str(error.value)
    with pytest.raises(ConfigError, match="model.num_tokens = 8 for xlabs; expected 16 or 4"):
        load_config(["--model.base", str(files["flux"]), "--model.variant", "xlabs", "--model.num_tokens", "8", *common])


# the released files' parameter counts (their sources: tests/test_dit_full_width.py)
RELEASED_TRAINABLE = {("flux", "xlabs", 4): 490_874_880, ("flux", "xlabs", 16): 528_672_768,
                      ("sd35", "instantx", 64): 797_925_888}
# the released transformers' configs (black-forest-labs/FLUX.1-dev, stabilityai/stable-diffusion-3.5-large)
FULL_CONFIGS = {
    "flux": dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                 num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                 axes_dims_rope=(16, 56, 56)),
    "sd35": dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                 num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                 pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm"),
}
ENCODER_WIDTH = {"xlabs": 768, "instantx": 1152}  # CLIP ViT-L/14 image embeds; SigLIP so400m hidden states


@pytest.mark.parametrize("family_id, variant, tokens", list(RELEASED_TRAINABLE), ids=lambda value: str(value))
def test_the_trainable_parameters_at_full_size_are_the_released_files(family_id, variant, tokens):
    """The training model on the released transformers (built on the meta device: shapes, no memory) trains exactly
    as many parameters as the released adapter files hold."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    from training.dit_adapter import DiTAdapterModel

    kind = FluxTransformer2DModel if family_id == "flux" else SD3Transformer2DModel
    with torch.device("meta"):
        transformer = kind(**FULL_CONFIGS[family_id])
        model = DiTAdapterModel(transformer, family_by_id(family_id), variant, tokens, ENCODER_WIDTH[variant])
    assert model.num_trainable() == RELEASED_TRAINABLE[(family_id, variant, tokens)]
    assert not any(p.requires_grad for p in transformer.parameters() if not any(p is q for q in model.trainable_parameters()))
