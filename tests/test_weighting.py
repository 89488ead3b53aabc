"""Weight types and embeds scaling: our numbers against the definitions ComfyUI users know.

The expected values are written here from cubiq's ComfyUI_IPAdapter_plus definitions, which
number the blocks with cross-attention by ComfyUI's transformer_index (16 in SD1.5, 11 in SDXL,
the middle block at 6 / 4). That pack never patches the middle block, so the peer check covers
every other layer; the middle block's own value is checked separately.
"""
import pytest
import torch

from ipadapter.registry.families import SD15, SDXL
from ipadapter.weighting import EMBEDS_SCALING, WEIGHT_TYPES, scale_keys_values, weight_schedule

W, WC = 0.8, 0.6  # λ and the composition weight


def peer_weights(weight_type: str, sdxl: bool) -> dict[int, float]:
    """cubiq's weight per transformer_index (indices not listed: 0), for λ = W, composition weight WC."""
    n = 11 if sdxl else 16
    if weight_type in ("linear", "ease in", "ease out", "ease in-out", "reverse in-out"):
        ramp = {
            "linear": lambda t: 1.0,
            "ease in": lambda t: 0.05 + 0.95 * (1 - t / n),
            "ease out": lambda t: 0.05 + 0.95 * (t / n),
            "ease in-out": lambda t: 0.05 + 0.95 * (1 - abs(t - n / 2) / (n / 2)),
            "reverse in-out": lambda t: 0.05 + 0.95 * (abs(t - n / 2) / (n / 2)),
        }[weight_type]
        return {t: W * ramp(t) for t in range(n)}
    inputs = range(4) if sdxl else range(6)
    outputs = range(5, 11) if sdxl else range(7, 16)
    middle = 4 if sdxl else 6
    if weight_type.startswith(("weak", "strong middle")):
        weak = {"weak input": set(inputs), "weak output": set(outputs), "weak middle": {middle},
                "strong middle": set(inputs) | set(outputs)}[weight_type]
        return {t: W * (0.2 if t in weak else 1.0) for t in range(n)}
    tables = {  # transcribed from the pack's definitions
        "style transfer": ({6: W}, {0: W, 1: W, 2: W, 3: W, 9: W, 10: W, 11: W, 12: W, 13: W, 14: W, 15: W}),
        "composition": ({3: W}, {4: W * 0.25, 5: W}),
        "strong style transfer": ({0: W, 1: W, 2: W, 4: W, 5: W, 6: W, 7: W, 8: W, 9: W, 10: W},
                                  {0: W, 1: W, 2: W, 3: W, 6: W, 7: W, 8: W, 9: W, 10: W, 11: W, 12: W, 13: W, 14: W, 15: W}),
        "style and composition": ({3: WC, 6: W},
                                  {0: W, 1: W, 2: W, 3: W, 4: WC * 0.25, 5: WC, 9: W, 10: W, 11: W, 12: W, 13: W, 14: W, 15: W}),
        "style transfer precise": ({3: W, 6: W},
                                   {0: W, 1: W, 2: W, 3: W, 4: W * 0.25, 5: W, 9: W, 10: W, 11: W, 12: W, 13: W, 14: W, 15: W}),
        "composition precise": ({0: W * .1, 1: W * .1, 2: W * .1, 3: W, 4: W * .1, 5: W * .1, 6: W, 7: W * .1, 8: W * .1, 9: W * .1, 10: W * .1},
                                {0: W, 1: W, 2: W, 3: W, 4: W * 0.25, 5: W, 6: W * .1, 7: W * .1, 8: W * .1, 9: W, 10: W, 11: W, 12: W, 13: W, 14: W, 15: W}),
    }
    return tables[weight_type][0 if sdxl else 1]


def peer_swapped(weight_type: str, sdxl: bool) -> set[int]:
    """Where the pack's "precise" types hand the reference to the unconditional side."""
    composition = {3} if sdxl else {4, 5}
    if weight_type == "style transfer precise":
        return composition
    if weight_type == "composition precise":
        return set(range(11 if sdxl else 16)) - composition
    return set()


@pytest.mark.parametrize("family", [SD15, SDXL], ids=lambda f: f.id)
@pytest.mark.parametrize("weight_type", WEIGHT_TYPES)
def test_weight_types_equal_the_peer_definition_on_the_layers_it_patches(family, weight_type):
    schedule = weight_schedule(weight_type, family, W, WC)
    expected = peer_weights(weight_type, family is SDXL)
    swapped = peer_swapped(weight_type, family is SDXL)
    assert set(schedule) == set(family.keys)
    for layer in family.layers:
        t = family.block_position(layer)
        if layer.comfy_block[0] == "middle":
            continue  # never patched by that pack
        assert schedule[layer.key].weight == pytest.approx(expected.get(t, 0.0)), (weight_type, layer.key, t)
        assert schedule[layer.key].swapped == (t in swapped), (weight_type, layer.key)


@pytest.mark.parametrize("family", [SD15, SDXL], ids=lambda f: f.id)
def test_the_middle_block_gets_its_position_in_the_definition(family):
    middle = family.layer_by_key[family.keys[-1]]
    assert middle.comfy_block == ("middle", 0)
    t = family.block_position(middle)
    assert t == (4 if family is SDXL else 6)  # ComfyUI's transformer_index of the middle block
    for weight_type in ("linear", "ease in", "weak middle", "strong middle", "strong style transfer"):
        expected = peer_weights(weight_type, family is SDXL).get(t, 0.0)
        assert weight_schedule(weight_type, family, W, WC)[middle.key].weight == pytest.approx(expected)
    assert weight_schedule("linear", family, W)[middle.key].weight == W  # patched, unlike that pack


def test_sdxl_style_and_composition_are_instantstyle_blocks():
    schedule = weight_schedule("style and composition", SDXL, W, WC)
    on = {key: lw.weight for key, lw in schedule.items() if lw.weight}
    assert on == {**{k: WC for k in range(29, 48, 2)}, **{k: W for k in range(69, 88, 2)}}


def test_unknown_names_are_one_line_errors():
    with pytest.raises(ValueError, match="weight type 'sideways' is unknown; expected one of linear"):
        weight_schedule("sideways", SD15, 1.0)
    with pytest.raises(ValueError, match="embeds scaling 'Q' is unknown; expected one of V only"):
        scale_keys_values(torch.zeros(1, 4, 8), torch.zeros(1, 4, 8), 1.0, "Q")


def attention(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v


@pytest.mark.parametrize("scaling", EMBEDS_SCALING)
def test_embeds_scaling_equals_the_peer_formula(scaling):
    generator = torch.Generator().manual_seed(0)
    width, w = 640, 0.7
    q = torch.randn(2, 16, width, generator=generator)
    k = torch.randn(2, 4, width, generator=generator)
    v = torch.randn(2, 4, width, generator=generator) + 0.5  # a mean over the tokens that K+mean(V) can scale
    scaled_k, scaled_v, output_weight = scale_keys_values(k, v, w, scaling)
    ours = output_weight * attention(q, scaled_k, scaled_v)
    penalty = w * width / 1280.0
    mean = v.mean(1, keepdim=True)
    modes = {  # the pack's four modes, written out
        "V only": attention(q, k, v) * w,
        "K+V": attention(q, k * w, v * w),
        "K+V w/ C penalty": attention(q, k * penalty, v * penalty),
        "K+mean(V) w/ C penalty": attention(q, k * penalty, v - mean + mean * penalty),
    }
    assert torch.allclose(ours, modes[scaling], atol=1e-5)
    for other, expected in modes.items():  # the four really differ, so the check can fail
        if other != scaling:
            assert not torch.allclose(ours, expected, atol=1e-3), other


def test_frame_schedules():
    from ipadapter.weighting import frame_schedule, parse_frame_weights

    assert frame_schedule("linear", 5, 1.0, 0.0) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    ease_in = frame_schedule("ease in", 5, 0.0, 1.0)
    ease_out = frame_schedule("ease out", 5, 0.0, 1.0)
    in_out = frame_schedule("ease in-out", 5, 0.0, 1.0)
    assert ease_in[0] == 0 and ease_in[-1] == pytest.approx(1) and ease_in[1] < 0.25 < ease_out[1]  # slow / fast start
    assert in_out[2] == pytest.approx(0.5) and in_out[1] < 0.25 and in_out[3] > 0.75
    assert frame_schedule("linear", 1, 0.7, 0.0) == [0.7]
    assert parse_frame_weights("1, 0.5\n0.25") == [1.0, 0.5, 0.25] and parse_frame_weights(" ") is None
    with pytest.raises(ValueError, match="frame weights 'a, b' are not numbers"):
        parse_frame_weights("a, b")


@pytest.mark.parametrize("family", [SD15, SDXL], ids=lambda f: f.id)
def test_layer_weights_is_the_weight_type_times_the_layer_preset_with_the_swap_flags(family):
    from ipadapter.weighting import layer_weights, parse_layer_weights

    weights = layer_weights(family, W, "style transfer precise", "style", composition_weight=2.0)
    schedule, preset = weight_schedule("style transfer precise", family, W, 2.0 * W), parse_layer_weights("style", family)
    assert set(weights) == set(family.keys)
    for key, entry in weights.items():
        assert entry.weight == pytest.approx(schedule[key].weight * preset[key]) and entry.swapped == schedule[key].swapped
    assert any(entry.swapped for entry in weights.values())  # the precise type's layout blocks
    assert all(entry.weight == 0 for entry in layer_weights(family, 0.0, "composition precise", "all").values())
