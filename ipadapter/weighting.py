"""How strongly each layer takes the image prompt: weight types and embeds scaling.

A *weight type* turns the user's λ into one weight per cross-attention layer,
defined over the family's table (``Family.blocks`` runs input, middle,
output; a block's position there is ComfyUI's ``transformer_index``). The names
and numbers are the ones ComfyUI users know from cubiq's ComfyUI_IPAdapter_plus;
where that pack leaves the middle block unpatched, ours patches it with the
weight its definition gives the middle block's position.

*Embeds scaling* says where the weight goes: on the attention's output (V only,
the paper's λ), or into the image keys and values themselves.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .choices import C_PENALTY_WIDTH, EMBEDS_SCALING, FRAME_TIMINGS, WEIGHT_TYPES
from .registry import Family
from .weight_types import block_weights



@dataclass(frozen=True)
class LayerWeight:
    weight: float
    # "precise" types: at this layer the reference conditions the unconditional half of the
    # CFG batch and the conditional half gets empty image tokens, which pushes the sample away
    # from what this layer takes from the reference
    swapped: bool = False


def weight_schedule(weight_type: str, architecture: Family, weight: float,
                    composition_weight: float = 1.0) -> dict[int, LayerWeight]:
    """Each layer's weight (by official key) for a weight type; λ = ``weight``.

    ``composition_weight`` is the composition blocks' weight for "style and composition"
    (the other types that touch those blocks use ``weight``).
    """
    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"weight type '{weight_type}' is unknown; expected one of {', '.join(WEIGHT_TYPES)}")
    if weight_type not in weight_types_of(architecture):
        reason = ("names UNet blocks (input / middle / output)" if weight_type in UNET_GROUP_TYPES
                  else "needs the family's style and layout blocks, which are known for UNets only")
        raise ValueError(f"weight type '{weight_type}' {reason}; {architecture.name} is a DiT: expected one of "
                         f"{', '.join(weight_types_of(architecture))}")
    by_block = block_weights(weight_type, architecture, weight, composition_weight)
    swapped = _swapped_blocks(weight_type, architecture)
    return {
        layer.key: LayerWeight(by_block.get(layer.comfy_block, 0.0), layer.comfy_block in swapped)
        for layer in architecture.layers
    }


UNET_GROUP_TYPES = ("weak input", "weak output", "weak middle", "strong middle")
RAMP_TYPES = ("linear", "ease in", "ease out", "ease in-out", "reverse in-out")


def weight_types_of(architecture: Family) -> tuple[str, ...]:
    """The weight types that mean something for a family: all for a UNet with style blocks, the ramps over the
    blocks (in the order the model runs them) for a DiT."""
    if architecture.attach.is_unet and architecture.style_blocks:
        return WEIGHT_TYPES
    return tuple(name for name in WEIGHT_TYPES if name in RAMP_TYPES or (architecture.attach.is_unet and name in UNET_GROUP_TYPES))


def layer_weights(architecture: Family, weight: float, weight_type: str = "linear", layers: str = "all",
                  composition_weight: float = 1.0) -> dict[int, LayerWeight]:
    """λ as each layer's weight and swap flag, by official key: the weight type spreads ``weight`` over the blocks,
    the layer preset or custom weights (``layers``, see :func:`parse_layer_weights`) multiply it, and
    ``composition_weight`` is the composition blocks' share of λ for "style and composition". The one place where
    λ becomes per-layer weights."""
    schedule = weight_schedule(weight_type, architecture, weight, weight * composition_weight)
    multipliers = parse_layer_weights(layers, architecture)
    return {key: LayerWeight(entry.weight * multipliers[key], entry.swapped) for key, entry in schedule.items()}


def parse_layer_weights(text: str, architecture: Family) -> dict[int, float]:
    """Per-layer multipliers from a preset name, one number per layer (in key order), or ``key:value`` pairs.

    With ``key:value`` pairs (``"15:1, 11:0.5"``) the layers not named get 0.
    """
    text = text.strip()
    if not text:
        return architecture.preset_weights("all")
    if text in architecture.preset_names:
        return architecture.preset_weights(text)
    if not any(character.isdigit() or character in ",:" for character in text):  # a name: another family's preset
        raise ValueError(f"layer preset '{text[:40]}' is not defined for {architecture.name}; expected one of "
                         f"{', '.join(architecture.preset_names)}, or numbers per layer")
    parts = [part.strip() for part in text.replace("\n", ",").split(",") if part.strip()]
    keys = architecture.keys
    try:
        if all(":" in part for part in parts):
            pairs = {int(k): float(v) for k, v in (part.split(":") for part in parts)}
            unknown = sorted(set(pairs) - set(keys))
            if unknown:
                raise ValueError(f"layer keys {unknown} are not {architecture.name} cross-attention keys")
            return {key: pairs.get(key, 0.0) for key in keys}
        values = [float(part) for part in parts]
    except ValueError as error:
        raise ValueError(f"layer weights '{text[:60]}' are not readable ({error}); expected a preset "
                         f"({', '.join(architecture.preset_names)}), {len(keys)} numbers or key:value pairs") from None
    if len(values) != len(keys):
        raise ValueError(f"layer weights give {len(values)} numbers; expected {len(keys)}, one per layer of the "
                         f"{architecture.name} model's {architecture.describe_layers()}")
    return dict(zip(keys, values))


def _swapped_blocks(weight_type, architecture) -> set[tuple[str, int]]:
    composition = set(architecture.composition_blocks)
    if weight_type == "style transfer precise":
        return composition
    if weight_type == "composition precise":
        return set(architecture.blocks) - composition
    return set()


def scale_keys_values(k: torch.Tensor, v: torch.Tensor, weight: float, scaling: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Image keys and values with the weight moved into them, and the weight left for the output.

    V only: the output is scaled, ``w·Attn(q, K', V')``. K+V: ``Attn(q, w·K', w·V')``.
    The C-penalty modes first multiply w by (layer width / C_PENALTY_WIDTH), so narrow layers get
    less; K+mean(V) scales only the mean of V' over the image tokens.
    """
    if scaling not in EMBEDS_SCALING:
        raise ValueError(f"embeds scaling '{scaling}' is unknown; expected one of {', '.join(EMBEDS_SCALING)}")
    if scaling == "V only":
        return k, v, weight
    if scaling != "K+V":
        weight = weight * k.shape[-1] / C_PENALTY_WIDTH
    if scaling == "K+mean(V) w/ C penalty":
        mean = v.mean(dim=-2, keepdim=True)
        return k * weight, v - mean + mean * weight, 1.0
    return k * weight, v * weight, 1.0


def frame_schedule(timing: str, frames: int, start: float, end: float) -> list[float]:
    """A weight per frame going from ``start`` to ``end``.

    ease in starts slowly (1 − cos), ease out starts fast (sin), ease in-out is slow at
    both ends: the usual easing names. (cubiq's pack calls the sine curve "ease_in" and
    the cosine one "ease_out".)
    """
    if timing not in FRAME_TIMINGS:
        raise ValueError(f"timing '{timing}' is unknown; expected one of {', '.join(FRAME_TIMINGS)}")
    if frames < 1:
        raise ValueError(f"{frames} frames; expected at least 1")
    curve = {
        "linear": lambda x: x,
        "ease in": lambda x: 1 - math.cos(x * math.pi / 2),
        "ease out": lambda x: math.sin(x * math.pi / 2),
        "ease in-out": lambda x: (1 - math.cos(x * math.pi)) / 2,
    }[timing]
    steps = max(frames - 1, 1)
    return [start + (end - start) * curve(i / steps) for i in range(frames)]


def parse_weights(text: str, what: str) -> list[float] | None:
    """'1, 0.8, 0.5' (commas or new lines) -> numbers; empty -> None. ``what`` names them in the error."""
    parts = [part.strip() for part in text.replace("\n", ",").split(",") if part.strip()]
    if not parts:
        return None
    try:
        return [float(part) for part in parts]
    except ValueError:
        raise ValueError(f"{what} '{text[:60]}' are not numbers; expected comma-separated numbers like '1, 0.8, 0.5'") from None


def parse_frame_weights(text: str) -> list[float] | None:
    """A weight per frame; empty -> None (every frame 1)."""
    return parse_weights(text, "frame weights")
