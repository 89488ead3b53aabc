"""Training the DiT adapters end to end on tiny random models (CPU): XLabs and InstantX on Flux.1, InstantX on SD3.5.

The exports have the released layouts, and those diffusers reads give the training model's output with diffusers'
own loaders; InstantX's Flux processor gives the published formula's output; a variant on another family's base,
or another family's settings of a variant, is a one-line error. (The exports in our ComfyUI nodes:
tests/test_training_dit_comfy.py.)"""
import json

import pytest
import torch
from safetensors.torch import load_file

from devtools import dit_models
from devtools.dit_models import RELEASED_TRANSFORMERS, released_encoder_width
from dit_training_fixtures import SIGLIP_WIDTH, files, instantx, instantx_flux, xlabs  # noqa: F401 (fixtures)
from ipadapter.registry import family_by_id
from training.config import ConfigError, load_config


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
    states = torch.randn(2, 9, SIGLIP_WIDTH)
    compare(files, "sd35", instantx, states, states)


def test_instantx_on_flux_trains_and_exports_the_released_layout(instantx_flux):
    """InstantX's processor on all 57 blocks, and an export with the released file's groups, names and shapes only
    (what InstantX's loader reads with strict keys), holding the trained weights."""
    from training.dit_processors import InstantXFluxProcessor

    model = instantx_flux["model"]
    exports = {p.suffix: p for p in instantx_flux["export"]}
    assert sorted(p.name for p in exports.values()) == ["ip-adapter_flux_siglip_step00000002.bin",
                                                        "ip-adapter_flux_siglip_step00000002.safetensors"]
    processors = model.transformer.attn_processors.values()
    assert len(processors) == 57 and all(isinstance(p, InstantXFluxProcessor) for p in processors)
    text, width, hidden = model.transformer.config.joint_attention_dim, model.transformer.inner_dim, 2 * SIGLIP_WIDTH
    expected = {"image_proj.proj.0.weight": (hidden, SIGLIP_WIDTH), "image_proj.proj.0.bias": (hidden,),
                "image_proj.proj.2.weight": (128 * text, hidden), "image_proj.proj.2.bias": (128 * text,),
                "image_proj.norm.weight": (text,), "image_proj.norm.bias": (text,),
                **{f"ip_adapter.{key}.to_{kind}_ip.weight": (width, text) for key in range(57) for kind in "kv"}}
    flat = load_file(str(exports[".safetensors"]))
    assert {name: tuple(tensor.shape) for name, tensor in flat.items()} == expected
    nested = torch.load(exports[".bin"], weights_only=True)
    unnested = {f"{group}.{name}": tensor for group, tensors in nested.items() for name, tensor in tensors.items()}
    assert unnested.keys() == expected.keys()
    trained = model.trainable_state_dict()
    assert all(torch.equal(flat[name], trained[name]) and torch.equal(unnested[name], trained[name]) for name in expected)
    assert changed(model)


def test_the_instantx_flux_processor_gives_the_published_formula():
    """On a tiny diffusers Flux, our trainable processor on every block against the published-formula reference
    (tests/test_dit_patch.py) with the same K'/V' weights and image tokens."""
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
    from test_dit_patch import InstantXFluxReference, relative_error

    from training.dit_processors import InstantXFluxProcessor

    model = dit_models.build_diffusers_flux(4)
    inputs = dit_models.flux_inputs(seed=5, size=4)
    text = model.config.joint_attention_dim
    generator = torch.Generator().manual_seed(6)
    tokens = torch.randn(1, 6, text, generator=generator)
    ours, reference = {}, {}
    for name in model.attn_processors:
        processor = InstantXFluxProcessor(model.inner_dim, text)
        with torch.no_grad():
            for linear in (processor.to_k_ip, processor.to_v_ip):
                linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) * 2 / text**0.5)
        ours[name] = processor
        weights = (processor.to_k_ip.weight.detach(), processor.to_v_ip.weight.detach())
        reference[name] = InstantXFluxReference(tokens, *weights, 1.0)
    model.set_attn_processor(ours)
    trained = dit_models.run_diffusers_flux(model, inputs, {"ip_hidden_states": tokens.expand(2, -1, -1)})
    model.set_attn_processor(reference)
    published = dit_models.run_diffusers_flux(model, inputs)
    model.set_attn_processor(FluxAttnProcessor())
    plain = dit_models.run_diffusers_flux(model, inputs)
    assert relative_error(trained, plain) > 1e-2
    assert relative_error(trained, published) <= 1e-5


def test_a_variant_on_another_familys_base_or_with_another_familys_settings_is_one_line(files, tmp_path):
    sdxl = tmp_path / "sdxl"
    (sdxl / "unet").mkdir(parents=True)
    (sdxl / "unet" / "config.json").write_text(json.dumps({"cross_attention_dim": 2048}))
    common = ["--model.image_encoder", str(files["clip"]), "--data.path", str(files["data"])]
    with pytest.raises(ConfigError) as error:
        load_config(["--model.base", str(sdxl), "--model.variant", "xlabs", *common])
    assert str(error.value).count("\n") == 0
    assert "xlabs trains Flux.1 adapters" in str(error.value) and "is an SDXL model" in str(error.value)
    instantx_on_flux = ["--model.base", str(files["flux"]), "--model.variant", "instantx", "--model.image_encoder",
                        str(files["siglip"]), "--data.path", str(files["data"])]
    config, _ = load_config(instantx_on_flux)
    assert (config.family.id, config.model.num_tokens) == ("flux", 128)
    # SD3.5's InstantX reads 64 tokens (its Resampler's queries); Flux.1's makes 128 with its MLP
    with pytest.raises(ConfigError) as error:
        load_config([*instantx_on_flux, "--model.num_tokens", "64"])
    assert str(error.value) == "model.num_tokens = 64 for Flux.1 instantx; expected 128"
    xlabs_on_flux = ["--model.base", str(files["flux"]), "--model.variant", "xlabs", *common]
    with pytest.raises(ConfigError, match="model.num_tokens = 8 for Flux.1 xlabs; expected 16 or 4"):
        load_config([*xlabs_on_flux, "--model.num_tokens", "8"])


# the released files' parameter counts (their sources: tests/test_dit_full_width.py)
RELEASED_TRAINABLE = {("flux", "xlabs", 4): 490_874_880, ("flux", "xlabs", 16): 528_672_768,
                      ("flux", "instantx", 128): 2_645_600_512, ("sd35", "instantx", 64): 797_925_888}


@pytest.mark.parametrize("family_id, variant, tokens", list(RELEASED_TRAINABLE), ids=lambda value: str(value))
def test_the_trainable_parameters_at_full_size_are_the_released_files(family_id, variant, tokens):
    """The training model on the released transformers (built on the meta device: shapes, no memory) trains exactly
    as many parameters as the released adapter files hold."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    from training.dit_adapter import DiTAdapterModel

    kind = FluxTransformer2DModel if family_id == "flux" else SD3Transformer2DModel
    with torch.device("meta"):
        transformer = kind(**RELEASED_TRANSFORMERS[family_id])
        model = DiTAdapterModel(transformer, family_by_id(family_id), variant, tokens, released_encoder_width(family_id, variant))
    assert model.num_trainable() == RELEASED_TRAINABLE[(family_id, variant, tokens)]
    assert not any(p.requires_grad for p in transformer.parameters() if not any(p is q for q in model.trainable_parameters()))


REDUCED_DEPTH = {"flux": dict(num_layers=1, num_single_layers=1), "sd35": dict(num_layers=2)}
SIGLIP_TOKENS = 729  # so400m-patch14-384: 27 x 27 patches, no class token


@pytest.mark.slow
@pytest.mark.parametrize("family_id, variant, tokens", [("flux", "xlabs", 16), ("flux", "instantx", 16),
                                                        ("sd35", "instantx", 64)], ids=str)
def test_one_training_step_at_full_width_and_reduced_depth_in_bf16(family_id, variant, tokens):
    """The released transformers' widths with one or two blocks of each kind, frozen in bf16, and the adapter at the
    released encoder widths in fp32 take one AdamW step through the trainer's model: a finite loss, every adapter
    tensor gets a gradient and moves, the transformer does not. InstantX Flux makes 16 of its 128 tokens here: its
    MLP's last layer alone is 1.2 billion parameters at 128 (19 GB with AdamW); the counts at 128 are checked above."""
    import diffusers

    from training.dit_adapter import DiTAdapterModel
    from training.dit_models import DiTParts

    family = family_by_id(family_id)
    torch.manual_seed(0)
    transformer = getattr(diffusers, family.training.denoiser_class)(
        **{**RELEASED_TRANSFORMERS[family_id], **REDUCED_DEPTH[family_id]}).to(torch.bfloat16).eval()
    frozen = {name: tensor.clone() for name, tensor in transformer.state_dict().items()}
    width = released_encoder_width(family_id, variant)
    model = DiTAdapterModel(transformer, family, variant, tokens, width, reduced_depth=True).train()
    assert len(model.layers) == {"xlabs": 1, "instantx": 2}[variant]
    parts = DiTParts(transformer, None, {}, {}, {}, dict(family.training.noise_schedule), family, torch.bfloat16)
    config = transformer.config
    latents = torch.randn(1, 16, 32, 32)  # 256 px: 256 image tokens
    context = torch.randn(1, 32, config.joint_attention_dim, dtype=torch.bfloat16)
    pooled = torch.randn(1, config.pooled_projection_dim, dtype=torch.bfloat16)
    features = torch.randn(1, width) if model.row.encoder_input == "image_embeds" else torch.randn(1, SIGLIP_TOKENS, width)
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4, weight_decay=0)  # moved = had a gradient
    prediction = model(parts, latents.to(torch.bfloat16), torch.tensor([0.6]), context, pooled, features)
    loss = torch.nn.functional.mse_loss(prediction.float(), torch.randn_like(latents))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and prediction.shape == latents.shape
    # an XLabs key bias shifts all of a query's logits equally: softmax gives it no gradient (InstantX normalises K')
    moved = {name: not torch.equal(p.detach(), before[name]) for name, p in model.named_parameters()
             if p.requires_grad and not (variant == "xlabs" and "to_k_ip" in name and name.endswith("bias"))}
    assert all(moved.values()), [name for name, ok in moved.items() if not ok]
    assert all(p.dtype == torch.float32 for p in model.trainable_parameters())
    assert all(torch.equal(tensor, frozen[name]) for name, tensor in transformer.state_dict().items() if name in frozen)
