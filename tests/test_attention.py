"""Our decoupled attention and projections against diffusers' IP-Adapter code."""
import pytest
import torch
from diffusers.loaders.unet import UNet2DConditionLoadersMixin
from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0

from devtools.adapter_factory import random_adapter
from ipadapter.attention import decoupled_attention, image_attention, sdpa_attention
from ipadapter.adapter_file import IPAdapterCheckpoint


def diffusers_attention_with_adapter(width=640, heads=10, weight=0.7, seed=0):
    torch.manual_seed(seed)
    attn = Attention(query_dim=width, cross_attention_dim=768, heads=heads, dim_head=width // heads, bias=False)
    processor = IPAdapterAttnProcessor2_0(hidden_size=width, cross_attention_dim=768, num_tokens=(4,), scale=weight)
    for module in (attn, processor):
        for parameter in module.parameters():
            torch.nn.init.normal_(parameter, std=width**-0.5)
    attn.set_processor(processor)
    return attn.eval(), processor


@pytest.mark.parametrize("weight", [0.7, 1.0, -0.5])
def test_matches_diffusers_ip_adapter_processor(weight):
    attn, processor = diffusers_attention_with_adapter(weight=weight)
    hidden = torch.randn(2, 64, 640)
    text = torch.randn(2, 77, 768)
    image_tokens = torch.randn(2, 4, 768)
    with torch.no_grad():
        expected = attn(hidden, encoder_hidden_states=(text, [image_tokens[:, None]]))
        q, k, v = attn.to_q(hidden), attn.to_k(text), attn.to_v(text)
        k_ip, v_ip = processor.to_k_ip[0](image_tokens), processor.to_v_ip[0](image_tokens)
        ours = attn.to_out[0](decoupled_attention(q, k, v, k_ip, v_ip, attn.heads, weight))
    assert torch.allclose(ours, expected, atol=1e-5, rtol=0), (ours - expected).abs().max()
    # and the image term is really there
    text_only = attn.to_out[0](sdpa_attention(q, k, v, attn.heads))
    assert (ours - text_only).abs().max() > 1e-2


def test_weight_zero_is_exactly_text_only():
    q, k, v = torch.randn(2, 64, 320), torch.randn(2, 77, 320), torch.randn(2, 77, 320)
    k_ip, v_ip = torch.randn(2, 4, 320), torch.randn(2, 4, 320)
    text_only = sdpa_attention(q, k, v, 5)
    assert torch.equal(decoupled_attention(q, k, v, k_ip, v_ip, 5, weight=0.0), text_only)
    assert torch.equal(decoupled_attention(q, k, v, k_ip, v_ip, 5, weight=torch.zeros(2, 1, 1)), text_only)


def test_mask_and_per_sample_weight():
    q = torch.randn(2, 16, 320)
    k_ip, v_ip = torch.randn(1, 4, 320), torch.randn(1, 4, 320)
    full = image_attention(q, k_ip, v_ip, 5)
    mask = torch.zeros(2, 16)
    mask[:, :8] = 1
    masked = image_attention(q, k_ip, v_ip, 5, weight=torch.tensor([1.0, 2.0]).view(2, 1, 1), mask=mask)
    assert torch.equal(masked[:, 8:], torch.zeros_like(masked[:, 8:]))
    assert torch.allclose(masked[0, :8], full[0, :8])
    assert torch.allclose(masked[1, :8], 2 * full[1, :8])


def diffusers_projection(nested):
    class Host(UNet2DConditionLoadersMixin):  # the converter needs only a dtype and device
        dtype, device = torch.float32, torch.device("cpu")

    return Host()._convert_ip_adapter_image_proj_to_diffusers(nested["image_proj"], low_cpu_mem_usage=False).eval()


@pytest.mark.parametrize("variant", ["base", "plus", "full-face"])
def test_projection_matches_diffusers(variant):
    nested = random_adapter(variant, seed=1)
    ours = IPAdapterCheckpoint.from_state_dicts(**nested).build_projection()
    theirs = diffusers_projection(nested)
    features = torch.randn(2, 1024) if variant == "base" else torch.randn(2, 257, 1280)
    with torch.no_grad():
        expected, got = theirs(features), ours(features)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()
