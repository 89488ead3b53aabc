"""The 16 cross-attention layers of SD1.5, in one place.

Each layer is known by three names: the official checkpoint key (the position
of its ``attn2`` processor in diffusers' ``unet.attn_processors`` order, where
the middle block comes last), the diffusers module path, and the ComfyUI block
id that ``transformer_options["block"]`` reports while the layer runs.
"""
from __future__ import annotations

from dataclasses import dataclass

SD15_CROSS_ATTENTION_DIM = 768
SDXL_CROSS_ATTENTION_DIM = 2048
SD15_BASE_WIDTH = 320


@dataclass(frozen=True)
class CrossAttentionLayer:
    key: int  # index in the official checkpoint (1, 3, ..., 31)
    diffusers_name: str  # module path of the attn2 Attention in diffusers' UNet
    comfy_block: tuple[str, int]  # ("input", 1) ... ("middle", 0)
    width_multiplier: int  # layer width = multiplier * base width (320 in SD1.5)

    @property
    def width(self) -> int:
        return self.width_multiplier * SD15_BASE_WIDTH

    @property
    def diffusers_processor(self) -> str:
        return self.diffusers_name + ".processor"

    @property
    def comfy_patch_key(self) -> tuple[str, int, int]:
        """Key of ComfyUI's ``patches_replace["attn2"]``: (block, id, index inside the block's transformer)."""
        return (*self.comfy_block, 0)


def _layer(key: int, diffusers_block: str, comfy_block: tuple[str, int], multiplier: int) -> CrossAttentionLayer:
    return CrossAttentionLayer(key, f"{diffusers_block}.transformer_blocks.0.attn2", comfy_block, multiplier)


SD15_LAYERS: tuple[CrossAttentionLayer, ...] = (
    _layer(1, "down_blocks.0.attentions.0", ("input", 1), 1),
    _layer(3, "down_blocks.0.attentions.1", ("input", 2), 1),
    _layer(5, "down_blocks.1.attentions.0", ("input", 4), 2),
    _layer(7, "down_blocks.1.attentions.1", ("input", 5), 2),
    _layer(9, "down_blocks.2.attentions.0", ("input", 7), 4),
    _layer(11, "down_blocks.2.attentions.1", ("input", 8), 4),
    _layer(13, "up_blocks.1.attentions.0", ("output", 3), 4),
    _layer(15, "up_blocks.1.attentions.1", ("output", 4), 4),
    _layer(17, "up_blocks.1.attentions.2", ("output", 5), 4),
    _layer(19, "up_blocks.2.attentions.0", ("output", 6), 2),
    _layer(21, "up_blocks.2.attentions.1", ("output", 7), 2),
    _layer(23, "up_blocks.2.attentions.2", ("output", 8), 2),
    _layer(25, "up_blocks.3.attentions.0", ("output", 9), 1),
    _layer(27, "up_blocks.3.attentions.1", ("output", 10), 1),
    _layer(29, "up_blocks.3.attentions.2", ("output", 11), 1),
    _layer(31, "mid_block.attentions.0", ("middle", 0), 4),
)

LAYER_BY_KEY = {layer.key: layer for layer in SD15_LAYERS}
LAYER_BY_COMFY_BLOCK = {layer.comfy_block: layer for layer in SD15_LAYERS}
LAYER_BY_DIFFUSERS_NAME = {layer.diffusers_name: layer for layer in SD15_LAYERS}


def layer_widths(base_width: int = SD15_BASE_WIDTH) -> dict[int, int]:
    """Width of each layer by official key, for SD1.5 or a scaled-down copy of its layout."""
    return {layer.key: layer.width_multiplier * base_width for layer in SD15_LAYERS}


def official_keys_from_processor_names(processor_names: list[str]) -> dict[str, int]:
    """Number the cross-attention processors the way the official checkpoints do.

    ``processor_names`` is diffusers' ``list(unet.attn_processors)``; the key of a
    layer is its position in that list. Only ``attn2`` (cross-attention) entries
    carry adapter weights.
    """
    return {name: index for index, name in enumerate(processor_names) if name.endswith("attn2.processor")}
