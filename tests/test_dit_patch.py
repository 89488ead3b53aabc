"""The DiT adapters in ComfyUI against their references, fp32, on tiny random Flux / SD3 transformers that keep the
real block counts (19 double + 38 single, 38 joint) and random q/k norm weights:

- XLabs v1 / v2 (Flux): diffusers' ``FluxIPAdapterMixin.load_ip_adapter`` on the same file;
- InstantX SD3.5: diffusers' ``SD3IPAdapterMixin.load_ip_adapter`` on the same file;
- InstantX Flux, which diffusers cannot load: diffusers' Flux with attention processors written here from the
  published code (Shakker-Labs/ComfyUI-IPAdapter-Flux, ``attention_processor.py`` and ``flux/layers.py``).

Each comparison runs a conditional and an unconditional row (diffusers gets zero embeddings for the latter, what
our nodes take when no negative image is given).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import pytest
from safetensors.torch import save_file

from devtools import dit_adapters, dit_models
from devtools.comfy_inprocess import pack_module

TOLERANCE = 1e-4
FLUX_BLOCKS = dict(num_layers=19, num_single_layers=38)
XLABS_CONTEXT = 4096  # diffusers tells XLabs v2 (16 tokens) from v1 by proj.weight having 16 x 4096 rows
EMBED = 24  # the image encoder's embedding width in these tests


def relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def patcher_module():
    return pack_module("patcher")


@pytest.fixture(scope="module")
def nodes_module():
    return pack_module("nodes")


@pytest.fixture(scope="module")
def xlabs_flux():
    model = dit_models.build_diffusers_flux(1, joint_attention_dim=XLABS_CONTEXT, **FLUX_BLOCKS)
    return model, dit_models.comfy_flux_from_diffusers(model)


@pytest.fixture(scope="module")
def flux():
    model = dit_models.build_diffusers_flux(2, **FLUX_BLOCKS)
    return model, dit_models.comfy_flux_from_diffusers(model)


@pytest.fixture(scope="module")
def sd3():
    model = dit_models.build_diffusers_sd3(3, num_layers=38)
    return model, dit_models.comfy_sd3_from_diffusers(model)


def xlabs_file(path, tokens: int, context: int, width: int, seed: int = 0):
    save_file(dit_adapters.xlabs_file_tensors(tokens, context, width, EMBED, seed), str(path))
    return path


def loaded(nodes_module, path):
    checkpoint = pack_module("ipadapter.adapter_file").load_adapter(path, base_width=None)
    return nodes_module.LoadedAdapter(checkpoint, checkpoint.build_projection())


def encoded(embeds, penultimate):
    images = pack_module("ipadapter.image_prompt").EncodedImages
    return images(embeds, penultimate, None, None, "test encoder")


class MixinHost:
    """What diffusers' IP-Adapter loaders need of a pipeline: its transformer, and no image encoder to fetch."""

    def __init__(self, transformer):
        self.transformer = transformer
        self.image_encoder = None
        self.feature_extractor = None

    def register_modules(self, **modules):
        for name, module in modules.items():
            setattr(self, name, module)


def diffusers_host(mixin, transformer):
    return type("Host", (MixinHost, mixin), {})(transformer)


@pytest.mark.parametrize("tokens", [4, 16], ids=["v1", "v2"])
def test_xlabs_matches_diffusers(tmp_path, xlabs_flux, nodes_module, tokens):
    from diffusers.loaders.ip_adapter import FluxIPAdapterMixin

    model, comfy_model = xlabs_flux
    path = xlabs_file(tmp_path / "ip_adapter.safetensors", tokens, XLABS_CONTEXT, model.inner_dim, seed=tokens)
    adapter = loaded(nodes_module, path)
    assert (adapter.checkpoint.spec.variant, adapter.checkpoint.spec.num_tokens) == ("xlabs", tokens)
    embeds = torch.randn(1, EMBED, generator=torch.Generator().manual_seed(5))
    patched = nodes_module.patch_model(comfy_model, adapter, encoded(embeds, torch.zeros(1, 1, 8)), weight=0.8)
    inputs = dit_models.flux_inputs(seed=1, context_dim=XLABS_CONTEXT)
    ours = dit_models.run_comfy_flux(patched, inputs, cond_or_uncond=(0, 1))

    host = diffusers_host(FluxIPAdapterMixin, model)
    host.load_ip_adapter(str(tmp_path), weight_name=path.name, subfolder="", image_encoder_pretrained_model_name_or_path=None)
    host.set_ip_adapter_scale(0.8)
    rows = torch.cat([embeds, torch.zeros_like(embeds)])  # conditional row, then the unconditional one
    reference = dit_models.run_diffusers_flux(model, inputs, {"ip_adapter_image_embeds": [rows[:, None]]})
    plain = dit_models.run_comfy_flux(comfy_model, inputs)
    assert relative_error(ours, plain) > 1e-2  # the adapter acts
    assert relative_error(ours, reference) <= TOLERANCE


def test_sd35_instantx_matches_diffusers(tmp_path, sd3, nodes_module):
    from diffusers.loaders.ip_adapter import SD3IPAdapterMixin

    model, comfy_model = sd3
    width, heads = model.inner_dim, model.config.num_attention_heads
    state = dit_adapters.sd35_state(width, heads, features=32, dim=128, queries=8, seed=7)
    assert not torch.allclose(state["ip_adapter"]["0.norm_q.weight"], torch.ones(width // heads))
    path = tmp_path / "ip-adapter.bin"
    torch.save(state, path)
    adapter = loaded(nodes_module, path)
    assert (adapter.checkpoint.spec.variant, adapter.checkpoint.spec.num_tokens) == ("instantx", 8)
    features = torch.randn(1, 10, 32, generator=torch.Generator().manual_seed(6))
    patched = nodes_module.patch_model(comfy_model, adapter, encoded(torch.zeros(1, 8), features), weight=0.6)
    inputs = dit_models.sd3_inputs(seed=2)
    ours = dit_models.run_comfy_sd3(patched, inputs, cond_or_uncond=(0, 1))

    host = diffusers_host(SD3IPAdapterMixin, model)
    host.load_ip_adapter(str(tmp_path), weight_name=path.name, image_encoder_folder=None)
    host.set_ip_adapter_scale(0.6)
    rows = torch.cat([features, torch.zeros_like(features)])
    reference = dit_models.run_diffusers_sd3(model, inputs, {"ip_adapter_image_embeds": rows})
    plain = dit_models.run_comfy_sd3(comfy_model, inputs)
    assert relative_error(ours, plain) > 1e-2
    assert relative_error(ours, reference) <= TOLERANCE


class InstantXFluxReference:
    """A diffusers Flux attention processor with InstantX's image term, from its published code: the query is the
    block's after its q-norm and before RoPE (``ip_hidden_states = adapter(num_heads, img_q, ...)`` in
    ``flux/layers.py``); K' and V' are ``to_k_ip`` / ``to_v_ip`` of the tokens, each RMS-normalised per head
    without weights, eps 1e-5 (``norm_added_k/v = RMSNorm(128, eps=1e-5, elementwise_affine=False)``); the term
    ``scale · SDPA(q, K', V')`` joins the attention output before the output projection: the image stream's in
    double blocks (``img_attn = img_attn + ip``), the whole sequence's in single blocks (``attn = attn + ip``)."""

    def __init__(self, tokens, to_k, to_v, scale):
        self.tokens, self.to_k, self.to_v, self.scale = tokens, to_k, to_v, scale

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        def heads(x):
            return x.unflatten(-1, (attn.heads, -1))

        query, key, value = (heads(proj(hidden_states)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        query, key = attn.norm_q(query), attn.norm_k(key)
        image_query = query  # [B, L, H, D], before RoPE
        if encoder_hidden_states is not None:
            text_q, text_k, text_v = (heads(proj(encoder_hidden_states))
                                      for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            query = torch.cat([attn.norm_added_q(text_q), query], dim=1)
            key = torch.cat([attn.norm_added_k(text_k), key], dim=1)
            value = torch.cat([text_v, value], dim=1)
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
        out = out.transpose(1, 2).flatten(2, 3)

        def rms(x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)

        k_ip = rms(heads(self.tokens @ self.to_k.T)).transpose(1, 2)
        v_ip = rms(heads(self.tokens @ self.to_v.T)).transpose(1, 2)
        term = F.scaled_dot_product_attention(image_query.transpose(1, 2), k_ip.expand(query.shape[0], -1, -1, -1),
                                              v_ip.expand(query.shape[0], -1, -1, -1))
        term = self.scale * term.transpose(1, 2).flatten(2, 3)
        if encoder_hidden_states is None:  # single block: the whole joint sequence takes it, no output projection
            return out + torch.cat([torch.zeros_like(out[:, : out.shape[1] - term.shape[1]]), term], dim=1) \
                if term.shape[1] != out.shape[1] else out + term
        text, image = out[:, : encoder_hidden_states.shape[1]], out[:, encoder_hidden_states.shape[1]:]
        image = attn.to_out[1](attn.to_out[0](image + term))
        return image, attn.to_add_out(text)


def test_instantx_flux_matches_the_published_formula(tmp_path, flux, nodes_module):
    model, comfy_model = flux
    context = model.config.joint_attention_dim
    state = dit_adapters.instantx_flux_state(tokens=6, context=context, width=model.inner_dim, embed=EMBED, hidden=48,
                                             seed=9)
    path = tmp_path / "ip-adapter.bin"
    torch.save(state, path)
    adapter = loaded(nodes_module, path)
    assert (adapter.checkpoint.spec.variant, adapter.checkpoint.spec.num_tokens) == ("instantx", 6)
    embeds = torch.randn(1, EMBED, generator=torch.Generator().manual_seed(8))
    patched = nodes_module.patch_model(comfy_model, adapter, encoded(embeds, torch.zeros(1, 1, 8)), weight=0.7)
    inputs = dit_models.flux_inputs(seed=3, batch=1)
    ours = dit_models.run_comfy_flux(patched, inputs, cond_or_uncond=(0,))

    with torch.no_grad():  # InstantX's MLPProjModel: Linear, GELU, Linear, reshape, LayerNorm
        image_proj = state["image_proj"]
        hidden = F.gelu(F.linear(embeds, image_proj["proj.0.weight"], image_proj["proj.0.bias"]))
        tokens = F.linear(hidden, image_proj["proj.2.weight"], image_proj["proj.2.bias"]).reshape(1, 6, context)
        tokens = F.layer_norm(tokens, (context,), image_proj["norm.weight"], image_proj["norm.bias"])
    processors = {}
    for name in model.attn_processors:
        single = name.startswith("single_transformer_blocks")
        key = int(name.split(".")[1]) + (19 if single else 0)
        processors[name] = InstantXFluxReference(tokens, state["ip_adapter"][f"{key}.to_k_ip.weight"],
                                                 state["ip_adapter"][f"{key}.to_v_ip.weight"], 0.7)
    original = model.attn_processors
    model.set_attn_processor(processors)
    try:
        reference = dit_models.run_diffusers_flux(model, inputs)
    finally:
        model.set_attn_processor(original)
    plain = dit_models.run_comfy_flux(comfy_model, inputs, cond_or_uncond=(0,))
    assert relative_error(ours, plain) > 1e-2
    assert relative_error(ours, reference) <= TOLERANCE
