"""This pack's nodes as ComfyUI shows them: per node id, the title, the inputs in widget order
(type or choices, default, range, tooltip) and the outputs.

The one definition of the nodes' interface: ``nodes.py`` renders each node's ``INPUT_TYPES``,
``RETURN_TYPES`` and ``RETURN_NAMES`` from :data:`NODES`, and the workflow migrator writes our
nodes by it. Plain data: importing it loads neither torch nor ComfyUI.
"""
from __future__ import annotations

from dataclasses import replace

from .node_spec import NodeSpec, combo, files, num, opt, sock, spec, text

if __package__ == "comfyui_glue":  # imported from the repository root (the workflow migrator, tools)
    from ipadapter import registry
    from ipadapter.choices import (
        C_PENALTY_WIDTH, COMBINE_MODES, CROP_MODES, EMBEDS_SCALING, FRAME_TIMINGS, WEIGHT_TYPES,
    )
else:  # inside ComfyUI, which imports the pack as a package named after its folder
    from ..ipadapter import registry
    from ..ipadapter.choices import (
        C_PENALTY_WIDTH, COMBINE_MODES, CROP_MODES, EMBEDS_SCALING, FRAME_TIMINGS, WEIGHT_TYPES,
    )

ADAPTER = "IPADAPTER_KIT"
ENCODER = "IPADAPTER_KIT_ENCODER"
EMBEDS = "IPADAPTER_KIT_EMBEDS"
REGIONS = "IPADAPTER_KIT_REGIONS"
FACES = "IPADAPTER_KIT_FACES"  # a face analysis: detector + recognition model of an InsightFace pack

# file lists: ComfyUI's model folders, and the embeddings Save Embeds wrote
MODEL_FOLDER = "ipadapter"  # models/ipadapter, which the pack adds to ComfyUI's folders
ENCODER_FOLDER = "clip_vision"
SAVED_EMBEDS = "saved embeds"
FACE_FOLDER = "insightface"  # models/insightface, cubiq's folder, which the pack adds to ComfyUI's folders
FACE_PACKS = "face model packs"  # the pack folders (buffalo_l, antelopev2) under models/insightface/models

# the glue's own options (the core's are in ipadapter/choices.py)
FACE_PRESETS = tuple(name for name, (variant, _) in registry.PRESETS.items()
                     if any(v.name == variant and v.takes_faces for v in registry.VARIANTS))
PRESETS = tuple(name for name in registry.PRESETS if name not in FACE_PRESETS)
FACE_PROVIDERS = ("auto", "CPU", "CUDA")
FACE_LORA = ("apply (sidecar or in the file)", "none (I use ComfyUI's LoRA loader)")
CROP_POSITIONS = ("center", "top", "bottom", "left", "right", "pad")
INTERPOLATIONS = ("LANCZOS", "BICUBIC", "HAMMING", "BILINEAR", "BOX", "NEAREST")
NOISE_TYPES = ("fade", "dissolve", "gaussian", "shuffle")
TILINGS = ("along the long side", "cubiq (256 px tiles)")
BATCH_MODES = ("all latents", "one per latent")

# What the tooltips say of the families and encoders, from the registry (the families built in when the pack loads).
FAMILIES = registry.families()
MODEL_FAMILIES = registry.family_names()  # "SD1.5 or SDXL or ..."
UNET_FAMILIES = tuple(family for family in FAMILIES if family.attach.is_unet)
DIT_FAMILIES = tuple(family for family in FAMILIES if not family.attach.is_unet)
LAYER_PRESETS = tuple(dict.fromkeys(name for family in FAMILIES for name in family.preset_names))


def per_family(describe, families=FAMILIES) -> str:
    """``"SD1.5: ...; SDXL: ..."``"""
    return "; ".join(f"{family.name}: {describe(family)}" for family in families)


def describe_preset(name: str) -> str:
    variant, encoder = registry.PRESETS[name]
    offered = [family.name for family in FAMILIES if name in family.released_adapters]
    only = f", {' and '.join(offered)} only" if len(offered) < len(FAMILIES) else ""
    return f"{name} ({variant} on {registry.encoder_by_id(encoder).name}{only})"


STYLE_BLOCKS = per_family(lambda f: f"{f.describe_blocks(f.style_blocks)} / {f.describe_blocks(f.composition_blocks)}",
                          UNET_FAMILIES)
DIT_PRESETS = per_family(lambda f: ", ".join(f"{name} = {f.describe_blocks(blocks)}"
                                             for name, blocks in f.block_presets.items()), DIT_FAMILIES)

WEIGHT = num("FLOAT", "weight", 1.0, -1.0, 3.0, step=0.05,
             tooltip="λ, the image prompt's weight: 0 gives the model without the adapter, 1 the paper's default.")
APPLY_WEIGHT = replace(WEIGHT, tooltip=WEIGHT.tooltip + " It scales everything Apply attaches, the regions' own weights "
                       "included: at 0 the regions are off too.")
WEIGHT_TYPE_TOOLTIP = (
    "How λ is spread over the layers (blocks counted in the order the UNet runs them; the layer preset multiplies it). "
    "linear: λ everywhere. ease in / ease out: from full to 5% / from 5% to full over the blocks; ease in-out: strongest "
    "in the middle; reverse in-out: weakest there. weak input / output / middle: that part at 20%; strong middle: input "
    f"and output at 20%. style transfer / composition: only the style / layout blocks ({STYLE_BLOCKS}); strong style transfer: every block but the layout ones; style and composition: both, "
    "the layout blocks at composition_weight. The precise forms also push away from the reference where it should not "
    "act: style transfer precise on the layout blocks, composition precise on all others (which keep 10%). "
    f"{' and '.join(f.name for f in DIT_FAMILIES)} (DiTs) take the first five, over their blocks in run order; the "
    "types named after UNet blocks or style/layout blocks are refused there."
)
WEIGHT_TYPE = combo("weight_type", WEIGHT_TYPES, "linear", tooltip=WEIGHT_TYPE_TOOLTIP)
EMBEDS_SCALING_TOOLTIP = (
    "Where the weight goes. V only: on the image attention's output (the paper's λ). K+V: into the image keys and values. "
    f"K+V w/ C penalty: the same, with narrow layers weighted less (width / {C_PENALTY_WIDTH}). K+mean(V) w/ C penalty: the keys and "
    "only the mean of the values."
)
ENCODER_INPUT = sock("image_encoder", ENCODER, tooltip="From Load IP-Adapter Image Encoder.")
# Apply's sockets, shared by its everyday and its advanced form
APPLY_MODEL = sock("model", "MODEL", tooltip=f"An {MODEL_FAMILIES} model; it is cloned, never changed.")
APPLY_ADAPTER = sock("ipadapter", ADAPTER, tooltip="From Load IP-Adapter.")
APPLY_REFERENCE = opt(
    sock("embeds", EMBEDS, tooltip="From IP-Adapter Encode Image, Encode Face (FaceID adapters) or Load Embeds."),
    sock("image", "IMAGE", tooltip="Instead of embeds: a reference image, encoded with image_encoder."),
    sock("image_encoder", ENCODER, tooltip="Needed with image."),
)
APPLY_MASK = opt(sock("attn_mask", "MASK", tooltip="Where the image prompt applies (1) and where not (0): regional prompting."))


FACE_PACK_INPUT = files("pack", FACE_PACKS, tooltip=(
    "A folder of models/insightface/models/ (or of an insightface: entry in extra_model_paths.yaml) with a face "
    "detector (det_*.onnx / scrfd*.onnx) and a recognition model (w600k*.onnx / glintr*.onnx): buffalo_l or "
    "antelopev2. Nothing is downloaded."))
FACE_PROVIDER_INPUT = combo("provider", FACE_PROVIDERS, "auto", tooltip=(
    "Where onnxruntime runs the face models. auto: CUDA when onnxruntime-gpu offers it, else the CPU."))


def window(what: str) -> list:
    """start_at and end_at: where in the denoising schedule ``what`` acts."""
    return [num("FLOAT", "start_at", 0.0, 0.0, 1.0, step=0.01,
                tooltip=f"Fraction of the denoising schedule where {what} starts."),
            num("FLOAT", "end_at", 1.0, 0.0, 1.0, step=0.01, tooltip="Fraction of the denoising schedule where it stops.")]


NODES: dict[str, NodeSpec] = {
    "IPAdapterKitLoader": spec(
        [files("ipadapter_file", MODEL_FOLDER, tooltip="A .safetensors or .bin file from models/ipadapter.")],
        [("ipadapter", ADAPTER)], "Load IP-Adapter"),
    "IPAdapterKitUnifiedLoader": spec([
        sock("model", "MODEL", tooltip="Passed through unchanged; its family picks the files."),
        combo("preset", PRESETS, "standard", tooltip=", ".join(describe_preset(name) for name in PRESETS) + "."),
    ], [("model", "MODEL"), ("ipadapter", ADAPTER), ("image_encoder", ENCODER)], "IP-Adapter Unified Loader"),
    "IPAdapterKitUnifiedLoaderFaceID": spec([
        sock("model", "MODEL", tooltip="Its family picks the files; with lora = apply it comes out with the FaceID LoRA."),
        combo("preset", FACE_PRESETS, "faceid-plusv2",
              tooltip=", ".join(describe_preset(name) for name in FACE_PRESETS) + "."),
        combo("lora", FACE_LORA, FACE_LORA[0], tooltip=(
            "faceid, faceid-plus and plusv2 need their LoRA. apply: <adapter name>_lora.safetensors beside the "
            "adapter (or in models/loras), else the LoRA inside the adapter file. none: the MODEL passes unchanged, "
            "for ComfyUI's LoraLoaderModelOnly on that sidecar, which gives the same model. The portrait adapters "
            "have no LoRA.")),
        num("FLOAT", "lora_strength", 1.0, -2.0, 2.0, step=0.05,
            tooltip="The LoRA's strength: 1 as the adapter was trained (cubiq's loader defaults to 0.6)."),
        FACE_PACK_INPUT,
        FACE_PROVIDER_INPUT,
    ], [("model", "MODEL"), ("ipadapter", ADAPTER), ("image_encoder", ENCODER), ("face_analysis", FACES)],
        "IP-Adapter Unified Loader FaceID"),
    "IPAdapterKitFaceAnalysisLoader": spec([
        FACE_PACK_INPUT,
        FACE_PROVIDER_INPUT,
        num("INT", "detector_size", 640, 64, 1920, step=32, tooltip=(
            "The face detector's input size (pixels, square). An image with no face found is tried again at "
            "smaller sizes, 64 less each time down to 320.")),
    ], [("face_analysis", FACES)], "IP-Adapter Face Analysis Loader"),
    "IPAdapterKitEncodeFace": spec([
        sock("face_analysis", FACES, tooltip="From IP-Adapter Face Analysis Loader or Unified Loader FaceID."),
        sock("image", "IMAGE", tooltip="One or more images, each with a face: the largest face of each is used."),
        sock("ipadapter", ADAPTER, tooltip=(
            "The FaceID adapter these embeds are for: it sets the face crop's size and whether the crop goes "
            "through the image encoder (faceid-plus, plusv2).")),
        num("FLOAT", "weight_faceidv2", 1.0, -1.0, 5.0, step=0.05, tooltip=(
            "faceid-plusv2 only: s in id tokens + s × the perceiver's output (cubiq's weight_faceidv2); kept in the "
            "embeds, so Apply uses it. Other adapters ignore it.")),
        *opt(
            sock("image_encoder", ENCODER, tooltip=(
                "Needed by faceid-plus / plusv2, which show the aligned face crop to it (OpenCLIP ViT-H/14).")),
            sock("negative_image", "IMAGE", tooltip=(
                "faceid-plus / plusv2: the image encoder's unconditional input instead of a blank image.")),
        ),
    ], [("embeds", EMBEDS), ("face_crops", "IMAGE")], "IP-Adapter Encode Face"),
    "IPAdapterKitEncoderLoader": spec(
        [files("clip_name", ENCODER_FOLDER, tooltip="e.g. " + " or ".join(
            f"{encoder.file_stems[0]}.safetensors (any case)" for encoder in registry.ENCODERS))],
        [("image_encoder", ENCODER)], "Load IP-Adapter Image Encoder"),
    "IPAdapterKitEncoderFromCLIPVision": spec(
        [sock("clip_vision", "CLIP_VISION",
              tooltip=f"The output of ComfyUI's Load CLIP Vision node ({' or '.join(e.name for e in registry.ENCODERS)}).")],
        [("image_encoder", ENCODER)], "IP-Adapter Encoder from CLIP Vision"),
    "IPAdapterKitEncode": spec([
        ENCODER_INPUT,
        sock("image", "IMAGE", tooltip="One or more reference images."),
        combo("crop", CROP_MODES, "crop",
              tooltip="How a non-square image becomes 224×224: center crop (the reference), pad, or stretch."),
        *opt(
            sock("negative_image", "IMAGE", tooltip=(
                "Replaces the unconditional image input (default: a zero embedding for base adapters, a blank image "
                "for plus/full-face).")),
            num("FLOAT", "weight", 1.0, -1.0, 3.0, step=0.05, tooltip=(
                "Multiplies the features of every image of this batch: how much these references count when "
                "combined with others.")),
            text("image_weights", "", tooltip=(
                "One number per image of the batch, comma-separated (e.g. '1, 0.5'), multiplied with weight; "
                "empty: 1 for each.")),
            num("INT", "detail_tiles", 1, 1, 4, tooltip=(
                "Enhancer: also cut each image's center square into N×N tiles, each seen at the encoder's full "
                "resolution, and blend their features in; 1: off.")),
            num("FLOAT", "detail_ratio", 0.5, 0.0, 1.0, step=0.05,
                tooltip="With detail tiles: the share of the whole view in the blend (the rest is the tiles' mean)."),
        ),
    ], [("embeds", EMBEDS)], "IP-Adapter Encode Image"),
    "IPAdapterKitCombineEmbeds": spec([
        sock("embeds_1", EMBEDS, tooltip="The first embeds; with subtract, the one the others are taken from."),
        combo("method", COMBINE_MODES, "concat", tooltip=(
            "concat keeps every reference (Apply's combine then decides); the other methods merge them into one "
            "reference here: average, add, subtract (the first minus the mean of the others), norm average.")),
        *opt(*(sock(f"embeds_{i}", EMBEDS, tooltip="More embeds, from the same image encoder.") for i in range(2, 6))),
    ], [("embeds", EMBEDS)], "Combine IP-Adapter Embeds"),
    "IPAdapterKitFrameWeights": spec([
        combo("timing", FRAME_TIMINGS, "linear", tooltip=(
            "The ramp's shape: linear, ease in (slow start), ease out (fast start), ease in-out (slow at both ends).")),
        num("INT", "frames", 16, 1, 9999, tooltip="How many frames the ramp covers; later frames keep the end value."),
        num("FLOAT", "start", 1.0, -1.0, 3.0, step=0.05, tooltip="The first frame's weight (a multiple of λ)."),
        num("FLOAT", "end", 0.0, -1.0, 3.0, step=0.05, tooltip="The last frame's weight."),
    ], [("frame_weights", "STRING")], "IP-Adapter Frame Weights"),
    "IPAdapterKitPrepImage": spec([
        sock("image", "IMAGE", tooltip="Reference images."),
        combo("interpolation", INTERPOLATIONS, "LANCZOS", tooltip="The resize filter (PIL's)."),
        combo("crop_position", CROP_POSITIONS, "center",
              tooltip="Which square of a non-square image to keep, or pad: the whole image with black bars."),
        num("FLOAT", "sharpening", 0.0, 0.0, 1.0, step=0.05,
            tooltip="Contrast-adaptive sharpening after the resize; 0: none."),
    ], [("image", "IMAGE")], "Prepare Image for IP-Adapter"),
    "IPAdapterKitNoise": spec([
        combo("type", NOISE_TYPES, "fade", tooltip=(
            "fade: the image mixed with noise; dissolve: a share of the pixels replaced; gaussian: the image plus "
            "normal noise; shuffle: its tiles shuffled and mirrored, plus noise.")),
        num("FLOAT", "strength", 1.0, 0.0, 1.0, step=0.05, tooltip="How much noise: 0 leaves the image (or black) as it is."),
        num("INT", "blur", 0, 0, 32, step=1, tooltip="Gaussian blur kernel size in pixels after the noise; 0: none."),
        num("INT", "seed", 0, 0, 2**31 - 1, tooltip="The same seed gives the same noise."),
        *opt(sock("image", "IMAGE",
                  tooltip="Make the noise from this image (its center square); without it, from black.")),
    ], [("noise", "IMAGE")], "IP-Adapter Noise (negative image)"),
    "IPAdapterKitEncodeTiled": spec([
        ENCODER_INPUT,
        sock("image", "IMAGE", tooltip="The reference; a square one gives a single tile (the whole image)."),
        combo("tiling", TILINGS, tooltip=(
            "along the long side: as few squares as cover a tall or wide reference, masks that split the picture "
            "between them; a square reference is one tile. cubiq (256 px tiles): the tiles and masks of cubiq's "
            "IPAdapter Tiled: a near-square reference becomes 2×2 tiles, others up to 4 along the long side, "
            "masks that overlap where the tiles do.")),
        *opt(sock("negative_image", "IMAGE", tooltip="Replaces the unconditional image input."),
             sock("mask", "MASK", tooltip="cubiq tiling: where the image prompt acts; each tile's mask is this mask "
                  "inside the tile (the other tiling ignores it).")),
    ], [("embeds", EMBEDS), ("tile_masks", "MASK"), ("regions", REGIONS)], "IP-Adapter Encode Tiled"),
    "IPAdapterKitRegion": spec([
        sock("embeds", EMBEDS, tooltip="This region's reference, from Encode Image."),
        WEIGHT,
        WEIGHT_TYPE,
        *window("this region's image prompt"),
        num("FLOAT", "prompt_strength", 1.0, 0.0, 10.0, step=0.05,
            tooltip="Strength of this region's text inside its mask."),
        *opt(
            sock("mask", "MASK", tooltip="Where this region is (1) and is not (0); without a mask, the whole picture."),
            sock("positive", "CONDITIONING", tooltip="This region's own text, limited to its mask."),
            sock("negative", "CONDITIONING", tooltip="This region's own negative text, limited to its mask."),
            sock("regions", REGIONS, tooltip="The regions before this one in the chain."),
        ),
    ], [("regions", REGIONS), ("positive", "CONDITIONING"), ("negative", "CONDITIONING")], "IP-Adapter Region"),
    "IPAdapterKitApplySimple": spec([
        APPLY_MODEL,
        APPLY_ADAPTER,
        WEIGHT,
        *window("the image prompt"),
        WEIGHT_TYPE,
        *APPLY_REFERENCE,
        *APPLY_MASK,
    ], ["MODEL"], "Apply IP-Adapter"),
    "IPAdapterKitApply": spec([
        APPLY_MODEL,
        APPLY_ADAPTER,
        APPLY_WEIGHT,
        *window("the image prompt"),
        combo("combine", COMBINE_MODES, "average", tooltip=(
            "Several references: average their features, concatenate their tokens (each keeps its own), add them, "
            "subtract (the first minus the mean of the others), or norm average (each scaled to the same length "
            "first, so none outweighs the others).")),
        combo("layers", (*LAYER_PRESETS, "custom"), "all", tooltip=(
            "Which layers take the image prompt: all; style / composition, the blocks of the weight types of the same "
            f"names ({STYLE_BLOCKS}); the DiTs' block ranges ({DIT_PRESETS}); or custom. A preset the MODEL's "
            "family does not define is refused.")),
        text("custom_layer_weights", "", tooltip=(
            "With layers = custom: one number per layer in key order ("
            + per_family(lambda f: f.describe_layers()) + "), or key:value pairs like '15:1, 11:0.5', where every "
            "layer not listed gets 0.")),
        *APPLY_REFERENCE,
        *APPLY_MASK,
        *opt(
            WEIGHT_TYPE,
            combo("embeds_scaling", EMBEDS_SCALING, "V only", tooltip=EMBEDS_SCALING_TOOLTIP),
            num("FLOAT", "composition_weight", 1.0, -1.0, 5.0, step=0.05, tooltip=(
                "With weight type 'style and composition': the composition blocks' weight, as a multiple of λ "
                "(so λ = 0 still turns everything off).")),
            combo("batch_mode", BATCH_MODES, "all latents", tooltip=(
                "all latents: every latent of the batch gets the same image prompt (references combined). one per "
                "latent: reference i conditions latent i, and latents beyond the last reference get the last one "
                "(animation, batches of variations); combine is then not used.")),
            sock("regions", REGIONS, tooltip=(
                "From IP-Adapter Region nodes: each region's reference is applied with its own mask, weight, "
                "weight type and window (combine, layers, scaling from this node), together with embeds if those "
                "are connected too. From Encode Tiled: each tile under its own mask, with this node's weight type "
                "and window.")),
            text("frame_weights", "", multiline=True, tooltip=(
                "A weight per latent of the batch (frame), comma-separated, multiplying λ; latents beyond the list "
                "get its last value; empty: 1. IP-Adapter Frame Weights makes such lists. Follows context windows "
                "(the frame numbers ComfyUI or AnimateDiff hand over).")),
        ),
    ], ["MODEL"], "Apply IP-Adapter (Advanced)"),
    "IPAdapterKitAttentionMap": spec([
        sock("model", "MODEL", tooltip="A MODEL patched by Apply IP-Adapter."),
        sock("positive", "CONDITIONING", tooltip="The prompt you sample with."),
        sock("negative", "CONDITIONING", tooltip="The negative prompt you sample with."),
        sock("latent_image", "LATENT", tooltip="The latent you sample (its first image is mapped)."),
        num("INT", "seed", 0, 0, 0xFFFFFFFFFFFFFFFF, tooltip="The noise seed."),
        num("INT", "steps", 20, 1, 1000, tooltip="The schedule's length (euler, normal)."),
        num("INT", "at_step", 0, 0, 999, tooltip="Which step to look at: 0 is the noisiest."),
        num("FLOAT", "cfg", 7.0, 0.0, 100.0, step=0.1, tooltip="Guidance scale."),
    ], [("heat_maps", "IMAGE"), ("average", "MASK")], "IP-Adapter Attention Map"),
    "IPAdapterKitSimple": spec([
        sock("model", "MODEL", tooltip=f"An {MODEL_FAMILIES} model."),
        sock("image", "IMAGE", tooltip="The reference image."),
        WEIGHT,
        files("ipadapter_file", MODEL_FOLDER, tooltip=(
            "e.g. " + " or ".join(f"{next(iter(family.released_adapters.values()))[0]}.safetensors" for family in FAMILIES)
            + " in models/ipadapter; it must match the MODEL's family.")),
        files("clip_name", ENCODER_FOLDER, tooltip=(
            "The image encoder the adapter was trained on, in models/clip_vision: "
            + " or ".join(encoder.name for encoder in registry.ENCODERS) + ".")),
    ], ["MODEL"], "IP-Adapter (simple)"),
    "IPAdapterKitSaveEmbeds": spec([
        sock("embeds", EMBEDS, tooltip="Embeddings to keep."),
        text("filename_prefix", "ipadapter_embeds", tooltip="File name prefix; a counter is added."),
    ], [], "Save IP-Adapter Embeds"),
    "IPAdapterKitLoadEmbeds": spec(
        [files("embeds_file", SAVED_EMBEDS, tooltip="A .safetensors file written by Save Embeds.")],
        [("embeds", EMBEDS)], "Load IP-Adapter Embeds"),
    "IPAdapterKitModelCheck": spec([], [("table", "STRING")], "IP-Adapter Model Check"),
}
