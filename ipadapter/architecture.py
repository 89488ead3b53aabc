"""Model families as data: one table per family of UNet that takes an IP-Adapter.

Each cross-attention layer is known by four names: the official checkpoint key
(the position of its ``attn2`` processor in diffusers' ``unet.attn_processors``
order: down blocks, then up blocks, then the middle block), the diffusers module
path, the ComfyUI block that ``transformer_options["block"]`` reports while the
layer runs, and the layer's index inside that block's transformer. Everything
else (checkpoint validation, image prompts, the ComfyUI patch, the trainer)
takes an :class:`Architecture` as an argument; a new family is a new table.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterable


@dataclass(frozen=True)
class CrossAttentionLayer:
    key: int  # index in the official checkpoint (1, 3, 5, ...)
    diffusers_name: str  # module path of the attn2 Attention in diffusers' UNet
    comfy_block: tuple[str, int]  # ("input", 4) ... ("middle", 0)
    transformer_index: int  # position inside the block's transformer (SDXL blocks hold 2 or 10); ComfyUI's block_index
    width_multiplier: int  # layer width = multiplier x the UNet's first-block width
    width: int  # at the family's full size

    @property
    def diffusers_processor(self) -> str:
        return self.diffusers_name + ".processor"

    @property
    def comfy_patch_key(self) -> tuple[str, int, int]:
        """Key of ComfyUI's ``patches_replace["attn2"]``: (block, id, transformer index)."""
        return (*self.comfy_block, self.transformer_index)


@dataclass(frozen=True, eq=False)
class Architecture:
    name: str  # "SD1.5"
    id: str  # "sd15": config values, file names
    layers: tuple[CrossAttentionLayer, ...]
    context_dim: int  # width of the text tokens, and so of the image tokens
    base_width: int  # channels of the UNet's first block
    plus_width: int  # the width of the plus adapters' Resampler as the authors train it (heads of 64)
    pooled_text_width: int | None = None  # SDXL: the pooled text embedding in the UNet's added conditioning
    presets: dict[str, tuple[str, ...]] = field(default_factory=dict)  # name -> diffusers block prefixes
    # The blocks that the "style transfer" / "composition" weight types use (ipadapter.weighting), with the
    # composition blocks' share of the composition weight.
    style_blocks: tuple[tuple[str, int], ...] = ()
    composition_blocks: dict[tuple[str, int], float] = field(default_factory=dict)

    @cached_property
    def layer_by_key(self) -> dict[int, CrossAttentionLayer]:
        return {layer.key: layer for layer in self.layers}

    @cached_property
    def layer_by_diffusers_name(self) -> dict[str, CrossAttentionLayer]:
        return {layer.diffusers_name: layer for layer in self.layers}

    @cached_property
    def layer_by_patch_key(self) -> dict[tuple[str, int, int], CrossAttentionLayer]:
        return {layer.comfy_patch_key: layer for layer in self.layers}

    @cached_property
    def blocks(self) -> list[tuple[str, int]]:
        """The ComfyUI blocks with cross-attention in the order the UNet runs them: input, middle, output."""
        order = {"input": 0, "middle": 1, "output": 2}
        return sorted({layer.comfy_block for layer in self.layers}, key=lambda block: (order[block[0]], block[1]))

    def block_position(self, layer: CrossAttentionLayer) -> int:
        """Where the layer's block runs among the blocks with cross-attention (ComfyUI's transformer_index)."""
        return self.blocks.index(layer.comfy_block)

    @property
    def keys(self) -> list[int]:
        return [layer.key for layer in self.layers]

    def describe_layers(self) -> str:
        """``"70 cross-attention layers (keys 1, 3, ..., 139)"``, for messages."""
        keys = self.keys
        return f"{len(keys)} cross-attention layers (keys {keys[0]}, {keys[1]}, ..., {keys[-1]})"

    def adapter_tensor_names(self) -> set[str]:
        return {f"{layer.key}.{name}.weight" for layer in self.layers for name in ("to_k_ip", "to_v_ip")}

    def layer_widths(self, base_width: int | None = None) -> dict[int, int]:
        """Width of each layer by official key, at full size or for a scaled-down copy of the layout."""
        base = self.base_width if base_width is None else base_width
        return {layer.key: layer.width_multiplier * base for layer in self.layers}

    def preset_weights(self, preset: str) -> dict[int, float]:
        """Per-layer multipliers of a layer preset: 1 on the preset's blocks, 0 elsewhere."""
        if preset == "all":
            return {key: 1.0 for key in self.keys}
        prefixes = tuple(prefix + "." for prefix in self.presets[preset])
        return {layer.key: float(layer.diffusers_name.startswith(prefixes)) for layer in self.layers}

    @property
    def preset_names(self) -> list[str]:
        return ["all", *self.presets]

    def matches_processor_names(self, processor_names: Iterable[str]) -> bool:
        """Whether a diffusers UNet's ``attn_processors`` order gives exactly this table's keys and names."""
        found = official_keys_from_processor_names(list(processor_names))
        return found == {layer.diffusers_processor: layer.key for layer in self.layers}

    def matches_comfy_layout(self, patch_keys: Iterable[tuple[str, int, int]], context_dim: int | None) -> bool:
        """Whether a ComfyUI UNet with cross-attention at ``patch_keys`` and this context width is of this family."""
        return context_dim == self.context_dim and set(patch_keys) == set(self.layer_by_patch_key)


def official_keys_from_processor_names(processor_names: list[str]) -> dict[str, int]:
    """Number the cross-attention processors the way the official checkpoints do.

    ``processor_names`` is diffusers' ``list(unet.attn_processors)``; the key of a
    layer is its position in that list. Only ``attn2`` (cross-attention) entries
    carry adapter weights.
    """
    return {name: index for index, name in enumerate(processor_names) if name.endswith("attn2.processor")}


def _table(blocks: list[tuple[str, tuple[str, int], int, int]], base_width: int) -> tuple[CrossAttentionLayer, ...]:
    """Layers in official key order from (diffusers block, ComfyUI block, transformer depth, width multiplier)."""
    layers, key = [], 1
    for diffusers_block, comfy_block, depth, multiplier in blocks:
        for index in range(depth):
            name = f"{diffusers_block}.transformer_blocks.{index}.attn2"
            layers.append(CrossAttentionLayer(key, name, comfy_block, index, multiplier, multiplier * base_width))
            key += 2  # every transformer block has a self-attention processor before its cross-attention one
    return tuple(layers)


SD15 = Architecture(
    name="SD1.5",
    id="sd15",
    layers=_table([
        ("down_blocks.0.attentions.0", ("input", 1), 1, 1),
        ("down_blocks.0.attentions.1", ("input", 2), 1, 1),
        ("down_blocks.1.attentions.0", ("input", 4), 1, 2),
        ("down_blocks.1.attentions.1", ("input", 5), 1, 2),
        ("down_blocks.2.attentions.0", ("input", 7), 1, 4),
        ("down_blocks.2.attentions.1", ("input", 8), 1, 4),
        ("up_blocks.1.attentions.0", ("output", 3), 1, 4),
        ("up_blocks.1.attentions.1", ("output", 4), 1, 4),
        ("up_blocks.1.attentions.2", ("output", 5), 1, 4),
        ("up_blocks.2.attentions.0", ("output", 6), 1, 2),
        ("up_blocks.2.attentions.1", ("output", 7), 1, 2),
        ("up_blocks.2.attentions.2", ("output", 8), 1, 2),
        ("up_blocks.3.attentions.0", ("output", 9), 1, 1),
        ("up_blocks.3.attentions.1", ("output", 10), 1, 1),
        ("up_blocks.3.attentions.2", ("output", 11), 1, 1),
        ("mid_block.attentions.0", ("middle", 0), 1, 4),
    ], base_width=320),
    context_dim=768,
    base_width=320,
    plus_width=768,
    # InstantStyle found style in one SDXL up block and layout in one down block; in SD1.5
    # the blocks of the same role and width are up_blocks.1 (keys 13-17) and down_blocks.2 (keys 9, 11).
    presets={"style": ("up_blocks.1",), "composition": ("down_blocks.2",)},
    # the weight types' blocks as cubiq's ComfyUI_IPAdapter_plus defines them for SD1.5 (by transformer_index 0-3, 9-15
    # and 4, 5): the first two down levels and the last up levels carry style, down_blocks.2 the layout
    style_blocks=(("input", 1), ("input", 2), ("input", 4), ("input", 5),
                  *(("output", i) for i in range(5, 12))),
    composition_blocks={("input", 7): 0.25, ("input", 8): 1.0},
)

SDXL = Architecture(
    name="SDXL",
    id="sdxl",
    layers=_table([
        ("down_blocks.1.attentions.0", ("input", 4), 2, 2),
        ("down_blocks.1.attentions.1", ("input", 5), 2, 2),
        ("down_blocks.2.attentions.0", ("input", 7), 10, 4),
        ("down_blocks.2.attentions.1", ("input", 8), 10, 4),
        ("up_blocks.0.attentions.0", ("output", 0), 10, 4),
        ("up_blocks.0.attentions.1", ("output", 1), 10, 4),
        ("up_blocks.0.attentions.2", ("output", 2), 10, 4),
        ("up_blocks.1.attentions.0", ("output", 3), 2, 2),
        ("up_blocks.1.attentions.1", ("output", 4), 2, 2),
        ("up_blocks.1.attentions.2", ("output", 5), 2, 2),
        ("mid_block.attentions.0", ("middle", 0), 10, 4),
    ], base_width=320),
    context_dim=2048,
    base_width=320,
    plus_width=1280,
    pooled_text_width=1280,
    # InstantStyle: up_blocks.0.attentions.1 (keys 69-87) carries style, down_blocks.2.attentions.1 (keys 29-47) layout.
    presets={"style": ("up_blocks.0.attentions.1",), "composition": ("down_blocks.2.attentions.1",)},
    style_blocks=(("output", 1),),  # up_blocks.0.attentions.1
    composition_blocks={("input", 8): 1.0},  # down_blocks.2.attentions.1
)

FAMILIES: tuple[Architecture, ...] = (SD15, SDXL)
FAMILY_BY_ID = {family.id: family for family in FAMILIES}


def family_names() -> str:
    return " or ".join(family.name for family in FAMILIES)


def family_of_adapter_keys(tensor_names: Iterable[str]) -> Architecture | None:
    """The family whose layer table gives exactly these ``ip_adapter`` tensor names, if any."""
    names = set(tensor_names)
    return next((family for family in FAMILIES if family.adapter_tensor_names() == names), None)


def family_of_comfy_layout(patch_keys: Iterable[tuple[str, int, int]], context_dim: int | None) -> Architecture | None:
    patch_keys = set(patch_keys)
    return next((family for family in FAMILIES if family.matches_comfy_layout(patch_keys, context_dim)), None)


def family_of_processor_names(processor_names: Iterable[str]) -> Architecture | None:
    processor_names = list(processor_names)
    return next((family for family in FAMILIES if family.matches_processor_names(processor_names)), None)


def family_by_id(family_id: str) -> Architecture:
    try:
        return FAMILY_BY_ID[family_id]
    except KeyError:
        raise ValueError(f"model family '{family_id}' is unknown; expected one of {', '.join(FAMILY_BY_ID)}") from None
