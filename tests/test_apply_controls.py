"""The controls users tune (weight types, embeds scaling, combining references) through the nodes, in a real ComfyUI UNet."""
import pytest
import torch

from devtools.comfy_inprocess import noise_prediction
from ipadapter.weighting import EMBEDS_SCALING, WEIGHT_TYPES as ALL_WEIGHT_TYPES
from test_nodes import adapter, encoder, model, nodes  # noqa: F401  (module fixtures)

WEIGHT_TYPES = ("linear", "ease in", "weak middle", "style transfer", "style and composition",
                "style transfer precise", "composition precise")


@pytest.fixture(scope="module")
def embeds(nodes, encoder):
    return nodes.encode_images(encoder, torch.rand(1, 56, 56, 3, generator=torch.Generator().manual_seed(3)), "crop")


@pytest.fixture(scope="module")
def sample(model):
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 77, 768, generator=generator)
    sigma = model.model.model_sampling.sigmas[500].expand(2).clone()
    return latent, sigma, context


def prediction(patched, sample):
    return noise_prediction(patched, *sample, cond_or_uncond=(0, 1))


def term_of(patched):
    return patched.model_options["transformer_options"]["patches_replace"]["attn2"][("input", 1, 0)].terms[-1]


def test_weight_zero_is_exact_for_every_weight_type_and_scaling(nodes, adapter, model, embeds, sample):
    plain = prediction(model, sample)
    for weight_type in ALL_WEIGHT_TYPES:
        for scaling in EMBEDS_SCALING:
            patched = nodes.patch_model(model, adapter, embeds, 0.0, weight_type=weight_type, embeds_scaling=scaling,
                                        composition_weight=2.0)
            assert torch.equal(prediction(patched, sample), plain), (weight_type, scaling)
    per_latent = nodes.patch_model(model, adapter, embeds, 0.0, batch_mode="one per latent", frame_weights="1, 0.5")
    assert torch.equal(prediction(per_latent, sample), plain)


@pytest.mark.parametrize("weight_type", WEIGHT_TYPES)
def test_each_weight_type_changes_the_prediction_its_own_way(nodes, adapter, model, embeds, sample, weight_type):
    linear = prediction(nodes.patch_model(model, adapter, embeds, 1.0), sample)
    ours = prediction(nodes.patch_model(model, adapter, embeds, 1.0, weight_type=weight_type), sample)
    plain = prediction(model, sample)
    assert not torch.equal(ours, plain)
    assert torch.equal(ours, linear) == (weight_type == "linear")


def test_precise_types_give_the_reference_to_the_unconditional_half(nodes, adapter, model, embeds):
    straight = term_of(nodes.patch_model(model, adapter, embeds, 1.0, weight_type="style and composition"))
    precise = term_of(nodes.patch_model(model, adapter, embeds, 1.0, weight_type="style transfer precise"))
    for key in (9, 11):  # the composition blocks, down_blocks.2: cond empty, uncond = the reference
        k, v = precise.keys_values[key]
        assert not k[0].any() and not v[0].any()
        assert torch.equal(k[1], straight.keys_values[key][0][0])
    assert torch.equal(precise.keys_values[1][0], straight.keys_values[1][0])  # a style block: unchanged
    composition = term_of(nodes.patch_model(model, adapter, embeds, 1.0, weight_type="composition precise"))
    assert not composition.keys_values[1][0][0].any() and composition.keys_values[9][0][0].any()


def test_k_plus_v_scaling_moves_the_weight_into_keys_and_values(nodes, adapter, model, embeds):
    v_only = term_of(nodes.patch_model(model, adapter, embeds, 0.5))
    k_and_v = term_of(nodes.patch_model(model, adapter, embeds, 0.5, embeds_scaling="K+V"))
    penalty = term_of(nodes.patch_model(model, adapter, embeds, 0.5, embeds_scaling="K+V w/ C penalty"))
    k, v = v_only.keys_values[1]
    assert v_only.layer_weight(1) == 0.5 and k_and_v.layer_weight(1) == 1.0
    assert torch.allclose(k_and_v.keys_values[1][0], 0.5 * k) and torch.allclose(k_and_v.keys_values[1][1], 0.5 * v)
    width = k.shape[-1]  # 64 in this scaled-down UNet: the C penalty is width / 1280
    assert torch.allclose(penalty.keys_values[1][0], 0.5 * width / 1280 * k)


def test_layer_presets_multiply_the_weight_type(nodes, adapter, model, embeds):
    term = term_of(nodes.patch_model(model, adapter, embeds, 1.0, layer_weights="style", weight_type="weak output"))
    on = {key: term.layer_weight(key) for key in range(1, 32, 2) if term.layer_weight(key)}
    # SD1.5's style blocks: the input ones at λ, the output ones at the weak output factor
    assert on == pytest.approx({1: 1.0, 3: 1.0, 5: 1.0, 7: 1.0, **{key: 0.2 for key in range(17, 30, 2)}})


def test_encode_weights_and_combine_node(nodes, encoder, adapter, model, sample):
    images = torch.rand(2, 56, 56, 3, generator=torch.Generator().manual_seed(4))
    (plain,) = nodes.IPAdapterKitEncode().encode(encoder, images, "crop")
    (weighted,) = nodes.IPAdapterKitEncode().encode(encoder, images, "crop", weight=0.5, image_weights="1, 0.2")
    assert torch.allclose(weighted.image_embeds, plain.image_embeds * torch.tensor([[0.5], [0.1]]))
    (other,) = nodes.IPAdapterKitEncode().encode(encoder, images[:1], "crop")
    (joined,) = nodes.IPAdapterKitCombineEmbeds().combine(plain, "concat", embeds_3=other)
    assert len(joined) == 3
    (merged,) = nodes.IPAdapterKitCombineEmbeds().combine(plain, "average", embeds_2=other)
    assert len(merged) == 1 and torch.allclose(merged.image_embeds[0], joined.image_embeds.mean(0))
    # merging in the node or at Apply gives the same image prompt
    at_apply = prediction(nodes.patch_model(model, adapter, joined, 1.0, combine="average"), sample)
    assert torch.allclose(prediction(nodes.patch_model(model, adapter, merged, 1.0), sample), at_apply, atol=1e-6)
    with pytest.raises(ValueError, match="3 image weights for 2 images"):
        nodes.IPAdapterKitEncode().encode(encoder, images, "crop", image_weights="1, 1, 1")


def test_noise_as_negative_image_changes_only_the_unconditional_tokens(nodes, encoder, adapter, model):
    image = torch.rand(1, 80, 120, 3, generator=torch.Generator().manual_seed(5))
    (prepared,) = nodes.IPAdapterKitPrepImage().prepare(image, "BICUBIC", "left", 0.3)
    assert prepared.shape == (1, 224, 224, 3)
    (noise,) = nodes.IPAdapterKitNoise().make("dissolve", 0.6, 3, 1, image=prepared)
    (plain,) = nodes.IPAdapterKitEncode().encode(encoder, prepared, "crop")
    (negative,) = nodes.IPAdapterKitEncode().encode(encoder, prepared, "crop", negative_image=noise)
    a, b = term_of(nodes.patch_model(model, adapter, plain, 1.0)), term_of(nodes.patch_model(model, adapter, negative, 1.0))
    assert torch.equal(a.keys_values[1][0][0], b.keys_values[1][0][0])  # the reference's side is the same
    assert not torch.allclose(a.keys_values[1][0][1], b.keys_values[1][0][1])  # the unconditional side is the noise


def test_batch_mode_and_frame_weights_through_the_node(nodes, encoder, adapter, model):
    images = torch.rand(2, 56, 56, 3, generator=torch.Generator().manual_seed(6))
    (embeds,) = nodes.IPAdapterKitEncode().encode(encoder, images, "crop")
    (weights,) = nodes.IPAdapterKitFrameWeights().make("linear", 3, 1.0, 0.0)
    assert weights == "1, 0.5, 0"
    (patched,) = nodes.IPAdapterKitApply().apply(model, adapter, 0.8, 0.0, 1.0, "average", "all", "", embeds=embeds,
                                                 batch_mode="one per latent", frame_weights=weights)
    term = term_of(patched)
    assert term.keys_values[1][0].shape[:2] == (2, 2)  # (cond, uncond) x one entry per reference
    assert term.frame_weights.tolist() == [1.0, 0.5, 0.0]
    with pytest.raises(ValueError, match="batch mode 'sideways' is unknown"):
        nodes.patch_model(model, adapter, embeds, batch_mode="sideways")


def test_regions_chain_into_one_apply(nodes, encoder, adapter, model):
    left, right = torch.zeros(8, 8), torch.zeros(8, 8)
    left[:, :4], right[:, 4:] = 1.0, 1.0
    (a,) = nodes.IPAdapterKitEncode().encode(encoder, torch.rand(1, 56, 56, 3), "crop")
    (b,) = nodes.IPAdapterKitEncode().encode(encoder, torch.rand(1, 56, 56, 3), "crop")
    text = [[torch.zeros(1, 77, 768), {"pooled_output": None}]]
    chain, positive, negative = nodes.IPAdapterKitRegion().region(a, 0.7, "linear", 0.0, 1.0, 1.5, mask=left, positive=text)
    chain, positive, negative = nodes.IPAdapterKitRegion().region(b, 0.4, "style transfer", 0.0, 0.8, 1.0, mask=right,
                                                                  positive=text, regions=chain)
    assert len(chain.regions) == 2 and len(positive) == 2 and negative == []
    assert torch.equal(positive[0][1]["mask"][0], left) and positive[0][1]["mask_strength"] == 1.5
    assert torch.equal(positive[1][1]["mask"][0], right) and text[0][1] == {"pooled_output": None}  # input untouched
    (patched,) = nodes.IPAdapterKitApply().apply(model, adapter, 1.0, 0.0, 1.0, "average", "all", "", regions=chain)
    terms = patched.model_options["transformer_options"]["patches_replace"]["attn2"][("output", 5, 0)].terms
    assert [t.layer_weight(17) for t in terms] == pytest.approx([0.7, 0.4])  # output 5 is a style block in SD1.5
    assert torch.equal(terms[0].mask[0], left) and torch.equal(terms[1].mask[0], right)
    assert terms[0].layer_weight(9) == pytest.approx(0.7) and terms[1].layer_weight(9) == 0  # down_blocks.2: not style
    # λ scales the regions too: 0.5 halves them, 0 turns them off
    (half,) = nodes.IPAdapterKitApply().apply(model, adapter, 0.5, 0.0, 1.0, "average", "all", "", regions=chain)
    terms = half.model_options["transformer_options"]["patches_replace"]["attn2"][("output", 5, 0)].terms
    assert [t.layer_weight(17) for t in terms] == pytest.approx([0.35, 0.2])
    (off,) = nodes.IPAdapterKitApply().apply(model, adapter, 0.0, 0.0, 1.0, "average", "all", "", regions=chain)
    terms = off.model_options["transformer_options"]["patches_replace"]["attn2"][("output", 5, 0)].terms
    assert all(t.layer_weight(key) == 0 for t in terms for key in t.layer_weights)
    with pytest.raises(ValueError, match="no embeds, no image \\+ image_encoder and no regions"):
        nodes.IPAdapterKitApply().apply(model, adapter, 1.0, 0.0, 1.0, "average", "all", "")


def test_attention_map_is_near_zero_outside_the_mask(nodes, encoder, adapter, model):
    (embeds,) = nodes.IPAdapterKitEncode().encode(encoder, torch.rand(1, 56, 56, 3, generator=torch.Generator().manual_seed(8)), "crop")
    mask = torch.zeros(16, 16)
    mask[:, :8] = 1.0  # the left half
    (patched,) = nodes.IPAdapterKitApply().apply(model, adapter, 1.0, 0.0, 1.0, "average", "all", "", embeds=embeds,
                                                 attn_mask=mask)
    generator = torch.Generator().manual_seed(9)
    positive = [[torch.randn(1, 77, 768, generator=generator), {}]]
    negative = [[torch.randn(1, 77, 768, generator=generator), {}]]
    latent = {"samples": torch.zeros(1, 4, 16, 16)}
    images, average = nodes.IPAdapterKitAttentionMap().map(patched, positive, negative, latent, 0, 4, 1, 5.0)
    blocks = 1 + 16  # the average, then every SD1.5 block with cross-attention
    assert images.shape == (blocks, 128, 128, 3) and average.shape == (1, 128, 128)
    inside, outside = average[0, :, :56].mean(), average[0, :, 72:].mean()  # away from the blurred edge
    assert inside > 0.2 and outside < 0.02 * inside
    (unmasked,) = nodes.IPAdapterKitApply().apply(model, adapter, 1.0, 0.0, 1.0, "average", "all", "", embeds=embeds)
    _, spread = nodes.IPAdapterKitAttentionMap().map(unmasked, positive, negative, latent, 0, 4, 1, 5.0)
    assert spread[0, :, 72:].mean() > 0.2  # without the mask the right half takes the image prompt too
    with pytest.raises(ValueError, match="no image-prompt attention was recorded"):
        nodes.IPAdapterKitAttentionMap().map(model, positive, negative, latent, 0, 4, 1, 5.0)
