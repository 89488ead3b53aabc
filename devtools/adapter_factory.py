"""Random tensors with the exact shapes of the released SD1.5 and SDXL adapters.

The key tables are written out here, independently of ``ipadapter.projection``,
so that a strict load of them checks our module names against the official ones.
"""
from __future__ import annotations

import torch

# width multiplier of each layer in key order (1, 3, 5, ...); widths are multiplier x 320 at full size
LAYER_MULTIPLIERS = {
    "sd15": [1, 1, 2, 2, 4, 4, 4, 4, 4, 2, 2, 2, 1, 1, 1, 4],
    # down_blocks.1 (2 x 2), down_blocks.2 (2 x 10), up_blocks.0 (3 x 10), up_blocks.1 (3 x 2), mid_block (10)
    "sdxl": [2] * 4 + [4] * 20 + [4] * 30 + [2] * 6 + [4] * 10,
}
CONTEXT_WIDTH = {"sd15": 768, "sdxl": 2048}
RESAMPLER_WIDTH = {"sd15": 768, "sdxl": 1280}  # plus: 12 / 20 heads of 64


def image_proj_shapes(variant: str, cross: int = 768, encoder_width: int | None = None,
                      resampler_width: int | None = None) -> dict[str, tuple]:
    if variant == "base":
        width = encoder_width or 1024
        return {"proj.weight": (4 * cross, width), "proj.bias": (4 * cross,), "norm.weight": (cross,), "norm.bias": (cross,)}
    if variant == "full-face":
        width = encoder_width or 1280
        return {
            "proj.0.weight": (width, width), "proj.0.bias": (width,),
            "proj.2.weight": (cross, width), "proj.2.bias": (cross,),
            "proj.3.weight": (cross,), "proj.3.bias": (cross,),
        }
    if variant == "plus":
        width = encoder_width or 1280
        dim = resampler_width or cross  # depth 4, 16 queries, heads of 64 filling dim
        shapes = {
            "latents": (1, 16, dim),
            "proj_in.weight": (dim, width), "proj_in.bias": (dim,),
            "proj_out.weight": (cross, dim), "proj_out.bias": (cross,),
            "norm_out.weight": (cross,), "norm_out.bias": (cross,),
        }
        for i in range(4):
            shapes.update({
                f"layers.{i}.0.norm1.weight": (dim,), f"layers.{i}.0.norm1.bias": (dim,),
                f"layers.{i}.0.norm2.weight": (dim,), f"layers.{i}.0.norm2.bias": (dim,),
                f"layers.{i}.0.to_q.weight": (dim, dim),
                f"layers.{i}.0.to_kv.weight": (2 * dim, dim),
                f"layers.{i}.0.to_out.weight": (dim, dim),
                f"layers.{i}.1.0.weight": (dim,), f"layers.{i}.1.0.bias": (dim,),
                f"layers.{i}.1.1.weight": (4 * dim, dim),
                f"layers.{i}.1.3.weight": (dim, 4 * dim),
            })
        return shapes
    raise ValueError(variant)


def random_tensors(shapes: dict[str, tuple], generator: torch.Generator, dtype=torch.float32) -> dict[str, torch.Tensor]:
    tensors = {}
    for key, shape in shapes.items():
        if key.endswith("weight") and len(shape) == 1:  # LayerNorm gains
            tensors[key] = (1 + 0.1 * torch.randn(shape, generator=generator)).to(dtype)
        else:
            tensors[key] = (0.02 * torch.randn(shape, generator=generator)).to(dtype)
    return tensors


def random_adapter(
    variant: str = "base",
    base_width: int = 320,
    cross: int | None = None,
    encoder_width: int | None = None,
    seed: int = 0,
    dtype=torch.float32,
    family: str = "sd15",
) -> dict[str, dict[str, torch.Tensor]]:
    """A nested ``{"image_proj", "ip_adapter"}`` dict like the official ``.bin``.

    ``family`` "sd15" or "sdxl" sets the layer keys and widths; ``cross`` (default:
    the family's context width) the width of the image tokens.
    """
    generator = torch.Generator().manual_seed(seed)
    cross = cross or CONTEXT_WIDTH[family]
    image_proj = random_tensors(image_proj_shapes(variant, cross, encoder_width, RESAMPLER_WIDTH[family]), generator, dtype)
    ip_adapter = {}
    multipliers = LAYER_MULTIPLIERS[family]
    for key, multiplier in zip(range(1, 2 * len(multipliers), 2), multipliers):
        for name in ("to_k_ip", "to_v_ip"):
            ip_adapter[f"{key}.{name}.weight"] = (0.02 * torch.randn(multiplier * base_width, cross, generator=generator)).to(dtype)
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def write_flat_adapter(path, seed: int, variant: str = "base", family: str = "sd15", encoder_width: int | None = None) -> None:
    """A random full-size adapter (K'/V' scaled up so that its effect shows after 2 steps), fp16, flat keys."""
    from safetensors.torch import save_file

    flat = {}
    for group, tensors in random_adapter(variant, seed=seed, family=family, encoder_width=encoder_width).items():
        flat.update({f"{group}.{k}": (v * 5 if group == "ip_adapter" else v).half() for k, v in tensors.items()})
    save_file(flat, str(path))


# --- FaceID ------------------------------------------------------------------------

FACE_WIDTH = 512  # InsightFace's ArcFace embedding
FACEID_TOKENS = {"faceid": 4, "faceid-plus": 4, "faceid-portrait": 16, "faceid-portrait-unnorm": 16}
FACEID_LORA = ("faceid", "faceid-plus")  # the variants that carry a LoRA (plusv2 has plus's tensors)


def faceid_image_proj_shapes(variant: str, cross: int = 768, clip_width: int = 1280,
                             resampler_width: int = 1280) -> dict[str, tuple]:
    """The official ``image_proj`` shapes of a FaceID adapter: faceid / faceid-portrait an MLP of the face embedding
    (512 -> 1024 -> tokens x cross) + LayerNorm; faceid-plus that MLP + ``perceiver_resampler`` (as wide as the
    tokens, depth 4, heads of 64) over CLIP hidden states; faceid-portrait-unnorm the plus Resampler over the face
    embedding (``resampler_width`` wide)."""
    tokens = FACEID_TOKENS[variant]
    if variant == "faceid-portrait-unnorm":
        return image_proj_shapes("plus", cross, FACE_WIDTH, resampler_width)
    shapes = {"proj.0.weight": (2 * FACE_WIDTH, FACE_WIDTH), "proj.0.bias": (2 * FACE_WIDTH,),
              "proj.2.weight": (tokens * cross, 2 * FACE_WIDTH), "proj.2.bias": (tokens * cross,),
              "norm.weight": (cross,), "norm.bias": (cross,)}
    if variant == "faceid-plus":
        perceiver = {f"perceiver_resampler.{key}": shape
                     for key, shape in image_proj_shapes("plus", cross, clip_width, cross).items() if key != "latents"}
        shapes.update(perceiver)
    return shapes


def faceid_lora_shapes(family: str, base_width: int, rank: int) -> dict[str, tuple]:
    """``{key}.to_{q,k,v,out}_lora.{down,up}.weight`` on every attention processor: key 2i the self-attention of
    layer i's transformer block, 2i + 1 its cross-attention (keys and values from the text context)."""
    shapes = {}
    for index, multiplier in enumerate(LAYER_MULTIPLIERS[family]):
        width = multiplier * base_width
        for key, kv_width in ((2 * index, width), (2 * index + 1, CONTEXT_WIDTH[family])):
            for projection in ("q", "k", "v", "out"):
                inputs = kv_width if projection in ("k", "v") else width
                shapes[f"{key}.to_{projection}_lora.down.weight"] = (rank, inputs)
                shapes[f"{key}.to_{projection}_lora.up.weight"] = (width, rank)
    return shapes


def random_faceid_adapter(variant: str = "faceid", base_width: int = 320, family: str = "sd15", seed: int = 0,
                          rank: int = 4, clip_width: int = 1280, lora_scale: float = 0.02,
                          dtype=torch.float32) -> dict[str, dict[str, torch.Tensor]]:
    """A nested ``{"image_proj", "ip_adapter"}`` dict like the released FaceID ``.bin`` files (faceid,
    faceid-plus — plusv2's tensors are the same —, faceid-portrait, faceid-portrait-unnorm), at full size or for a
    scaled-down UNet (``base_width``); the LoRA (faceid, faceid-plus) of rank ``rank``, its up weights
    ``lora_scale`` x N(0, 1) (larger: a LoRA whose effect shows)."""
    generator = torch.Generator().manual_seed(seed)
    cross = CONTEXT_WIDTH[family]
    image_proj = random_tensors(faceid_image_proj_shapes(variant, cross, clip_width, RESAMPLER_WIDTH[family]),
                                generator, dtype)
    ip_adapter = random_adapter("base", base_width, seed=seed + 1, family=family, dtype=dtype)["ip_adapter"]
    if variant in FACEID_LORA:
        for key, shape in faceid_lora_shapes(family, base_width, rank).items():
            scale = lora_scale if ".up." in key else 0.02
            ip_adapter[key] = (scale * torch.randn(shape, generator=generator)).to(dtype)
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}
