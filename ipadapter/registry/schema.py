"""What a registry entry holds: a model family, an image encoder, an adapter variant.

The classes know no family: every number lives in the entries (``families.py``,
``encoders.py``, ``variants.py``). A family's layers are named four ways: the official
checkpoint key, the diffusers module, the ComfyUI block and the position inside that
block; *how* the image term reaches them (which ComfyUI patch, which order the blocks
run) is the family's :class:`AttachKind`, one per kind of model (UNet cross-attention,
DiT blocks).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property


@dataclass(frozen=True)
class AttachKind:
    """How the image term is attached to a kind of model."""

    name: str  # "UNet cross-attention"
    comfy_patch: str  # the transformer_options["patches_replace"] entry that replaces the layers
    block_groups: tuple[str, ...]  # the ComfyUI block groups in the order the model runs them
    layer_noun: str  # "cross-attention layers", for messages

    @property
    def is_unet(self) -> bool:
        """Whether the blocks are a UNet's input / middle / output groups (the weight types named after them)."""
        return set(self.block_groups) == {"input", "middle", "output"}


@dataclass(frozen=True)
class Layer:
    """One layer that takes the image term."""

    key: int  # index in the official checkpoint (1, 3, 5, ... in a UNet; 0, 1, 2, ... in a DiT)
    diffusers_name: str  # module path of the attention in diffusers' model
    comfy_block: tuple[str, int]  # ("input", 4) ... ("middle", 0); ("double_block", 0), ("single_block", 3)
    transformer_index: int | None  # position inside the block's transformer (ComfyUI's block_index); None: a DiT block
    width_multiplier: int  # layer width = multiplier x the model's first-block width
    width: int  # at the family's full size

    @property
    def diffusers_processor(self) -> str:
        return self.diffusers_name + ".processor"

    @property
    def comfy_patch_key(self) -> tuple:
        """Key of the layer's ComfyUI patch: (block, id, transformer index) in a UNet, (block, id) in a DiT."""
        return self.comfy_block if self.transformer_index is None else (*self.comfy_block, self.transformer_index)


def dit_layers(blocks: list[tuple[str, str, int]], width: int) -> tuple[Layer, ...]:
    """DiT layers keyed 0, 1, 2, ... in the order the model runs them, from (diffusers blocks, ComfyUI block kind,
    count): the numbering the released DiT adapters use for their per-block tensors."""
    layers = []
    for diffusers_blocks, comfy_kind, count in blocks:
        for index in range(count):
            layers.append(Layer(len(layers), f"{diffusers_blocks}.{index}.attn", (comfy_kind, index), None, 1, width))
    return tuple(layers)


def unet_layers(blocks: list[tuple[str, tuple[str, int], int, int]], base_width: int) -> tuple[Layer, ...]:
    """Layers in official key order from (diffusers block, ComfyUI block, transformer depth, width multiplier).

    The official key of a UNet layer is the position of its ``attn2`` processor in diffusers'
    ``attn_processors`` order (down blocks, up blocks, then the middle block): every
    transformer block has a self-attention processor before it, so the keys are 1, 3, 5, ...
    """
    layers, key = [], 1
    for diffusers_block, comfy_block, depth, multiplier in blocks:
        for index in range(depth):
            name = f"{diffusers_block}.transformer_blocks.{index}.attn2"
            layers.append(Layer(key, name, comfy_block, index, multiplier, multiplier * base_width))
            key += 2
    return tuple(layers)


@dataclass(frozen=True)
class TextEncoder:
    """One text encoder of a base model, as the trainer reads and runs it."""

    name: str  # "CLIP ViT-L/14 text encoder", for messages
    folder: str  # subfolder of a diffusers model folder; the trainer's name for it
    single_file_prefix: str  # its tensors' prefix in the original single-file layout
    layout: str  # "clip": transformers CLIP keys in the file; "open_clip": OpenCLIP's (fused in_proj)
    width: int
    hidden_layer: int  # the context is this layer's output: -1 the last, -2 the penultimate
    pooled: bool = False  # its projected pooled output goes to the UNet's added conditioning
    pad_id: int | None = None  # what pads a caption: None the end token, else this id
    max_length: int = 77  # tokens per caption
    in_context: bool = True  # its hidden states are part of the text tokens (Flux's CLIP gives the pooled vector only)


@dataclass(frozen=True)
class DiTVariant:
    """A DiT adapter variant as the trainer makes it for one family."""

    encoder: str  # id of the image encoder it is trained on
    dropped_image: str  # the unconditional image its inference uses: "black" (the encoder's output for a black
    # image) or "zeros" (all-zero encoder features)
    tokens: tuple[int, ...] = ()  # the token counts offered, the default first; (): the variant's own
    timestep_width: int = 0  # a timestep-conditioned projection: the width of its sinusoidal timestep input
    file_layout: str = "ip-adapter"  # the exported keys: "ip-adapter" (image_proj / ip_adapter groups) or "xlabs"


@dataclass(frozen=True)
class Training:
    """What the trainer needs to know of a family's base model."""

    text_encoders: tuple[TextEncoder, ...]
    vae_scaling_factor: float
    time_ids: bool  # added conditioning: pooled text + (original size, crop top-left, target size)
    resolution: int  # default training resolution
    noise_schedule: dict  # diffusers DDPMScheduler arguments (the training schedule); flow matching: how the
    # noise level is drawn ("sampling": "shifted" by the image's token count, or "logit_normal") and its numbers
    prediction: str  # what the model predicts: "epsilon", or "flow" (the velocity noise - latent); the loss is the MSE to it
    embedded_unet: dict  # the scaled-down UNet of the embedded run: diffusers UNet2DConditionModel arguments,
    # with ``width_multipliers`` (x the base width) for block_out_channels and ``head_width`` (channels per head)
    # or ``heads`` for attention_head_dim
    unet_prefix: str = "model.diffusion_model."  # the UNet's and VAE's tensors in the original single-file layout
    vae_prefix: str = "first_stage_model."
    shipped_configs: str = ""  # the trainer's config folder for the parts (training/configs/<this>); "": the family id
    # DiTs (flow matching): the denoiser's folder and diffusers class in a model folder, the distilled guidance a
    # guidance-embedding model is trained at, and per trainable variant what the trainer needs (``DiTVariant``)
    denoiser_folder: str = "unet"
    latent_packing: int = 1  # the pipeline packs n x n latent pixels into one token before the transformer (Flux: 2)
    denoiser_class: str = "UNet2DConditionModel"
    guidance: float | None = None
    variants: dict[str, "DiTVariant"] = field(default_factory=dict)

    @property
    def context_width(self) -> int:
        return sum(encoder.width for encoder in self.text_encoders)

    @property
    def pooled_width(self) -> int | None:
        return next((encoder.width for encoder in self.text_encoders if encoder.pooled), None)


@dataclass(frozen=True, eq=False, repr=False)
class Family:
    """A model family that takes an IP-Adapter: its layers, how they are patched, and its files."""

    id: str  # "sd15": option values, file names
    name: str  # "SD1.5": messages
    attach: AttachKind
    layers: tuple[Layer, ...]
    context_dim: int  # width of the text tokens, and so of the image tokens
    base_width: int  # channels of the model's first block
    resampler_width: int  # the plus Resampler's width as the authors train it (heads of 64)
    encoders: tuple[str, ...]  # ids of the image encoders its adapters are trained on; the first is the family's
    # own (export names leave it out: ip-adapter_sdxl is on ViT-bigG/14, ip-adapter_sdxl_vit-h on ViT-H/14)
    released_adapters: dict[str, tuple[str, ...]]  # unified-loader preset -> released file stems, first match wins
    # The blocks that carry style and layout (InstantStyle): the "style" / "composition" layer presets and
    # weight types; composition blocks carry their share of the composition weight.
    style_blocks: tuple[tuple[str, int], ...]
    composition_blocks: dict[tuple[str, int], float]
    training: Training | None  # None: the trainer does not make this family's adapters yet
    # Named block ranges offered as ``layers`` presets beside "all" (DiTs: no style/composition blocks are known)
    block_presets: dict[str, tuple[tuple[str, int], ...]] = field(default_factory=dict)
    image_token_width: int | None = None  # width of the image tokens when it is not context_dim (SD3.5: the model's)

    def __repr__(self) -> str:
        return f"Family({self.id!r})"

    @property
    def native_encoder(self) -> str:
        return self.encoders[0]

    @property
    def token_width(self) -> int:
        """Width of the image tokens its adapters make."""
        return self.image_token_width or self.context_dim

    @cached_property
    def layer_by_key(self) -> dict[int, Layer]:
        return {layer.key: layer for layer in self.layers}

    @cached_property
    def layer_by_diffusers_name(self) -> dict[str, Layer]:
        return {layer.diffusers_name: layer for layer in self.layers}

    @cached_property
    def layer_by_patch_key(self) -> dict[tuple[str, int, int], Layer]:
        return {layer.comfy_patch_key: layer for layer in self.layers}

    @cached_property
    def blocks(self) -> list[tuple[str, int]]:
        """The ComfyUI blocks with image layers in the order the model runs them."""
        order = {group: position for position, group in enumerate(self.attach.block_groups)}
        return sorted({layer.comfy_block for layer in self.layers}, key=lambda block: (order[block[0]], block[1]))

    def block_position(self, layer: Layer) -> int:
        """Where the layer's block runs among the blocks with image layers (ComfyUI's transformer_index)."""
        return self.blocks.index(layer.comfy_block)

    @property
    def keys(self) -> list[int]:
        return [layer.key for layer in self.layers]

    def describe_layers(self) -> str:
        """``"70 cross-attention layers (keys 1, 3, ..., 139)"``, for messages."""
        keys = self.keys
        return f"{len(keys)} {self.attach.layer_noun} (keys {keys[0]}, {keys[1]}, ..., {keys[-1]})"

    def adapter_tensor_names(self) -> set[str]:
        return {f"{layer.key}.{name}.weight" for layer in self.layers for name in ("to_k_ip", "to_v_ip")}

    def layer_widths(self, base_width: int | None = None) -> dict[int, int]:
        """Width of each layer by official key, at full size or for a scaled-down copy of the layout."""
        base = self.base_width if base_width is None else base_width
        return {layer.key: layer.width_multiplier * base for layer in self.layers}

    @cached_property
    def layer_presets(self) -> dict[str, tuple[tuple[str, int], ...]]:
        """The ``layers`` presets beside "all": the style and the composition blocks, where known, and the
        family's named block ranges."""
        presets = {"style": self.style_blocks, "composition": tuple(self.composition_blocks)} if self.style_blocks else {}
        return {**presets, **self.block_presets}

    def preset_keys(self, preset: str) -> list[int]:
        """The official keys of the layers in a preset."""
        return [key for key, multiplier in self.preset_weights(preset).items() if multiplier]

    def preset_weights(self, preset: str) -> dict[int, float]:
        """Per-layer multipliers of a layer preset: 1 on the preset's blocks, 0 elsewhere."""
        if preset == "all":
            return {key: 1.0 for key in self.keys}
        if preset not in self.layer_presets:
            raise ValueError(f"layer preset '{preset}' is not defined for {self.name}; expected one of "
                             f"{', '.join(self.preset_names)}")
        blocks = set(self.layer_presets[preset])
        return {layer.key: float(layer.comfy_block in blocks) for layer in self.layers}

    @property
    def preset_names(self) -> list[str]:
        return ["all", *self.layer_presets]

    def describe_blocks(self, blocks) -> str:
        """Some ComfyUI blocks in diffusers' names, for tooltips: a whole level (``down_blocks.2``) where every one
        of its attentions is in, else the attentions (``up_blocks.0.attentions.1``); DiT blocks as index ranges
        (``transformer_blocks.0-18``)."""
        blocks, levels = set(blocks), {}
        if not self.attach.is_unet:
            ranges: dict[str, list[int]] = {}
            for layer in self.layers:
                if layer.comfy_block in blocks:
                    prefix, index = layer.diffusers_name.rsplit(".attn", 1)[0].rsplit(".", 1)
                    ranges.setdefault(prefix, []).append(int(index))
            return ", ".join(f"{prefix}.{min(found)}-{max(found)}" for prefix, found in ranges.items())
        for layer in self.layers:
            attention = layer.diffusers_name.split(".transformer_blocks.")[0]
            levels.setdefault(attention.rsplit(".attentions.", 1)[0], {})[attention] = layer.comfy_block in blocks
        names = []
        for level, chosen in levels.items():
            names += [level] if all(chosen.values()) else [attention for attention, is_in in chosen.items() if is_in]
        return ", ".join(names)


@dataclass(frozen=True)
class ImageEncoderKind:
    """An image encoder that adapters are trained on."""

    id: str  # "vit-h"
    name: str  # "OpenCLIP ViT-H/14"
    embed_dim: int  # the projected image embedding (base adapters' input)
    hidden_width: int  # the hidden states (plus / full-face adapters' input)
    layers: int
    patch_size: int
    head_width: int  # channels per attention head (not recorded in a weights file)
    file_tag: str  # in released adapter names on another family's encoder: ip-adapter_sdxl_vit-h
    file_stems: tuple[str, ...] = ()  # the names users give its weights file (lower case, folders allowed)
    activation: str = "gelu"  # transformers' hidden_act: "gelu", "quick_gelu", "gelu_pytorch_tanh" (not in the file)
    layout: str = "clip"  # "clip": class token and projection; "siglip": no class token, an attention-pooling head


@dataclass(frozen=True)
class Variant:
    """An adapter variant: what the trainer makes and the unified loader offers."""

    name: str  # "base", "light", "plus", "plus-face", "full-face"
    projection: str  # what its tensors show: "base" (Linear + LayerNorm), "plus" (Resampler), "full-face" (MLP)
    encoder_input: str  # "image_embeds" (the projected embedding) or "penultimate" (hidden states)
    tokens: int | None  # image tokens per reference; None: one per encoder hidden state
    file_prefix: str  # ip-adapter, ip-adapter-plus, ...
    file_suffix: str = ""  # _light
    trainable: bool = True  # the trainer makes it
    description: str = ""
    resampler: dict = field(default_factory=dict)  # plus: depth, dim_head, ff_mult (the width is the family's)
    families: tuple[str, ...] = ()  # the families it is made for; (): every UNet family
    layers: str = "all"  # the layer preset of its family whose layers it carries (XLabs: the double blocks)
    layer_tensors: tuple[str, ...] = ("to_k_ip.weight", "to_v_ip.weight")  # each layer's tensors in the file
    # FaceID: the adapter takes an identity embedding of a face (InsightFace's ArcFace), beside the CLIP features of
    # the aligned face crop where ``encoder_input`` is "penultimate" (faceid-plus), else instead of CLIP features
    face_input: str = ""  # "": no face input; "normed": the L2-normalised embedding; "raw": the unnormalised one
    face_width: int = 0  # the face embedding's width
    lora: bool = False  # it carries a LoRA on every attention processor (to_q/k/v/out, self-attention too)
    shortcut: bool = False  # faceid-plusv2: tokens = id tokens + s x the perceiver's output, s set when applied
    name_word: str = ""  # told from a variant with the same tensors only by this word in the file name
    # FaceID: the size of the aligned face crop shown to the image encoder, by family id (cubiq: 224 for SD1.5,
    # 256 for SDXL); a family not listed takes the face analysis' default
    face_crop_sizes: dict[str, int] = field(default_factory=dict)

    @property
    def takes_faces(self) -> bool:
        return bool(self.face_input)

    def layer_shapes(self, width: int, token_width: int) -> dict[str, tuple[int, ...] | None]:
        """The shape of each layer tensor for a layer this wide (None: not fixed by the two widths)."""
        known = {"to_k_ip.weight": (width, token_width), "to_v_ip.weight": (width, token_width),
                 "to_k_ip.bias": (width,), "to_v_ip.bias": (width,), "norm_ip.linear.bias": (2 * token_width,)}
        return {name: known.get(name) for name in self.layer_tensors}

    def serves(self, family: "Family") -> bool:
        return family.id in self.families if self.families else family.attach.is_unet
