"""What the migrator needs to reproduce the pictures of cubiq's nodes with ours (the default; ``--ours`` skips it).

cubiq's pack differs from ours in three places that the migrated graph can express:

* it never patches the UNet's middle block (its patch key ``("middle", 1)`` never matches
  ComfyUI's ``("middle", 0)``), so its weight types leave that block out; ours weights it.
  Our Apply's custom layer weights (key:value pairs, multiplied with the weight type's own
  weights) give the middle block's keys 0 — which needs the model's family (the keys differ);
* for plus / full-face adapters its unconditional image input is a black picture (zeros, then
  the encoder's normalisation); ours encodes a zero tensor after normalisation. A black
  224×224 ``EmptyImage`` on Encode's ``negative_image`` gives cubiq's;
* its precise nodes and the Mad Scientist's layer weights are per-block weights on top of a
  weight type: one Apply with custom layer weights whose multipliers are cubiq's block weights
  divided by the weight type's own (:func:`block_factors`).

Plain Python on the registry's data: no torch (``ipadapter.weighting`` imports it, so the
weight types' shapes are written out again here; ``tests/test_migrate_faithful.py`` holds
them to ``ipadapter.weighting.weight_schedule``).
"""
from __future__ import annotations

import re

from ipadapter import registry
from ipadapter.choices import WEIGHT_TYPES
from ipadapter.weight_types import block_weights
from ipadapter.registry import families as all_families

MIDDLE = "middle"  # the UNet block group cubiq's pack never patches
BLACK_SIZE = 224  # cubiq's clipvision_size for the encoders our families use: its black negative image's side


def families():
    """The families cubiq's graphs can be of: its pack patches UNets only."""
    return tuple(family for family in all_families() if family.attach.is_unet)


def family_by_id(family_id: str):
    found = next((family for family in families() if family.id == family_id), None)
    if found is None:
        raise ValueError(f"family '{family_id}' is not one cubiq's nodes patch; expected one of "
                         f"{', '.join(f.id for f in families())}")
    return found


def block_factors(weight_type: str, family, composition_weight: float = 1.0) -> dict:
    """Each block's share of λ under a weight type of ours (block -> factor; absent: 0): the core's at λ = 1."""
    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"weight type '{weight_type}' is unknown")
    return block_weights(weight_type, family, 1.0, composition_weight)


def middle_blocks(family) -> list:
    return [block for block in family.blocks if block[0] == MIDDLE]


def middle_keys(family) -> list[int]:
    return [layer.key for layer in family.layers if layer.comfy_block[0] == MIDDLE]


def weights_middle(weight_type, family=None) -> bool:
    """Whether a weight type gives the middle block a weight (in ``family``, or in any of cubiq's families);
    a type that comes from a link (not a name) may."""
    if not isinstance(weight_type, str):
        return True
    for each in (family,) if family is not None else families():
        factors = block_factors(weight_type, each)
        if any(factors.get(block, 0.0) != 0.0 for block in middle_blocks(each)):
            return True
    return False


def number(value: float) -> str:
    """A multiplier as the custom layer weights write it (6 significant digits, no trailing zeros)."""
    text = f"{value:.6g}"
    return "0" if text in ("-0", "0") else text


def custom_layers(family, multiplier_of_block) -> str:
    """Apply's custom_layer_weights: ``key:value`` for every layer with a multiplier, the middle block's keys
    written out at 0 (cubiq never patches them); layers not named get 0."""
    parts = []
    for layer in family.layers:
        if layer.comfy_block[0] == MIDDLE:
            parts.append(f"{layer.key}:0")
            continue
        value = multiplier_of_block(layer.comfy_block)
        if value:
            parts.append(f"{layer.key}:{number(value)}")
    return ", ".join(sorted(parts, key=lambda part: int(part.split(":")[0])))


def without_middle(family) -> str:
    """Every layer at 1 but the middle block's at 0: a weight type as cubiq applies it."""
    return custom_layers(family, lambda block: 1.0)


# -- what the graph says of the model and the adapter --------------------------------------------------

def plain(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def family_in_name(text) -> object:
    """The one family a file name names (its id or its name, ignoring case and punctuation: 'sdxl/x.safetensors',
    'sd_xl_base_1.0', 'sd15/...'), or None."""
    if not isinstance(text, str) or not text:
        return None
    name = plain(text)
    found = [family for family in families() if plain(family.id) in name or plain(family.name) in name]
    return found[0] if len(found) == 1 else None


def family_of_preset(preset: str):
    """The one family that offers one of our unified-loader presets (light and full-face: SD1.5 only), or None."""
    offering = [family for family in families() if preset in family.released_adapters]
    return offering[0] if len(offering) == 1 else None


def is_plus_variant(variant_name: str) -> bool:
    """Whether a variant encodes the reference's hidden states (plus, plus-face, full-face): the adapters whose
    unconditional input cubiq makes from a black picture."""
    return registry.variant_by_name(variant_name).encoder_input == "penultimate"


def plus_of_preset(preset: str) -> bool:
    return is_plus_variant(registry.PRESETS[preset][0])


def plus_of_file(name) -> bool | None:
    """Whether an adapter file is a plus / full-face one, from its name: a released name, else the longest
    variant prefix it starts with (ip-adapter-plus-face_…, ip-adapter_…); None when the name does not say."""
    if not isinstance(name, str) or not name:
        return None
    stem = re.split(r"[\\/]", name.lower())[-1].rsplit(".", 1)[0]
    for family in families():
        for preset, stems in family.released_adapters.items():
            if stem in stems and preset in registry.PRESETS:
                return plus_of_preset(preset)
    variants = [v for v in registry.VARIANTS if any(v.serves(f) for f in families())]
    matching = [v for v in variants if stem.startswith(v.file_prefix)]
    if not matching:
        return None
    longest = max(len(v.file_prefix) for v in matching)
    kinds = {v.encoder_input == "penultimate" for v in matching if len(v.file_prefix) == longest}
    return kinds.pop() if len(kinds) == 1 else None
