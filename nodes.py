"""ComfyUI nodes: sockets in, a call into ``ipadapter/``, sockets out.

One node set serves every family in ``ipadapter.architecture`` (SD1.5, SDXL):
the family is read from the MODEL and the adapter's tensors. Node ids and
socket types start with ``IPAdapterKit`` / ``IPADAPTER_KIT`` so this pack
installs next to other IP-Adapter packs without either overriding the other.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from .ipadapter.checkpoint import IPAdapterCheckpoint, check_encoder, load_adapter
from .ipadapter.choices import COMBINE_MODES, CROP_MODES, EMBEDS_SCALING, FRAME_TIMINGS, LAYER_PRESETS, WEIGHT_TYPES
from .ipadapter.encoder import ImageEncoder, load_image_encoder
from .ipadapter.files import atomic_path
from .ipadapter.image_prompt import (
    EncodedImages,
    check_mask,
    combine_embeds,
    image_tokens,
    tokens_per_reference,
    parse_layer_weights,
)
from .ipadapter.weighting import (
    frame_schedule,
    parse_frame_weights,
    parse_weights,
    weight_schedule,
)
from .comfyui_glue.heatmap import as_images, block_maps
from .comfyui_glue.model_files import PRESETS, preset_files
from .comfyui_glue.reference_prep import CROP_POSITIONS, INTERPOLATIONS, NOISE_TYPES, make_noise, prepare_reference
from .comfyui_glue.tiles import blend_detail, center_square, detail_tiles, tile_reference
from .patcher import ImagePromptTerm, apply_image_prompt, check_model_fits, record_attention, unet_family

ADAPTER = "IPADAPTER_KIT"
ENCODER = "IPADAPTER_KIT_ENCODER"
EMBEDS = "IPADAPTER_KIT_EMBEDS"
REGIONS = "IPADAPTER_KIT_REGIONS"
CATEGORY = "ipadapter_kit"
MODEL_FOLDER = "ipadapter"
EMBEDS_SUBFOLDER = "ipadapter_embeds"


def register_model_folder() -> None:
    """Add ``models/ipadapter`` to ComfyUI's folders, keeping paths from extra_model_paths.yaml."""
    try:
        import folder_paths
    except ModuleNotFoundError:  # imported outside ComfyUI (tools, tests of the core)
        return

    default = os.path.join(folder_paths.models_dir, MODEL_FOLDER)
    paths, extensions = folder_paths.folder_names_and_paths.get(MODEL_FOLDER, ([], set()))
    paths = list(paths) + ([default] if default not in paths else [])
    extensions = set(extensions) | set(folder_paths.supported_pt_extensions)
    folder_paths.folder_names_and_paths[MODEL_FOLDER] = (paths, extensions)


def model_file(folder: str, name: str) -> str:
    import folder_paths

    path = folder_paths.get_full_path(folder, name)
    if path is None:
        raise FileNotFoundError(f"'{name}' is not in models/{folder}; expected one of the files listed in that folder")
    return path


@dataclass
class LoadedAdapter:
    checkpoint: IPAdapterCheckpoint
    projection: torch.nn.Module


@functools.lru_cache(maxsize=4)
def _load_adapter_cached(path: str, modified: float) -> LoadedAdapter:
    checkpoint = load_adapter(path, base_width=None)
    return LoadedAdapter(checkpoint, checkpoint.build_projection())


def load_adapter_file(name: str) -> LoadedAdapter:
    path = model_file(MODEL_FOLDER, name)
    return _load_adapter_cached(path, os.path.getmtime(path))


class ManagedEncoder:
    """Our OpenCLIP encoder under ComfyUI's model management (loaded to the GPU to encode, then offloaded)."""

    def __init__(self, encoder: ImageEncoder):
        import comfy.model_management as mm
        import comfy.model_patcher

        self.encoder = encoder
        load_device = mm.get_torch_device()
        offload_device = mm.text_encoder_offload_device()
        half = mm.should_use_fp16(load_device, prioritize_performance=False)
        encoder.to(torch.float16 if half else torch.float32)
        self.patcher = comfy.model_patcher.ModelPatcher(encoder, load_device=load_device, offload_device=offload_device)
        self._blank = None

    def encode(self, images: torch.Tensor, crop: str) -> tuple[torch.Tensor, torch.Tensor]:
        import comfy.model_management as mm

        mm.load_models_gpu([self.patcher])
        with torch.no_grad():
            out = self.encoder.encode_images(images, mode=crop)
        return out.image_embeds.float().cpu(), out.penultimate.float().cpu()

    def blank_penultimate(self) -> torch.Tensor:
        """The reference's unconditional input for plus adapters: an all-zero normalised image."""
        if self._blank is None:
            import comfy.model_management as mm

            mm.load_models_gpu([self.patcher])
            with torch.no_grad():
                self._blank = self.encoder.encode(self.encoder.uncond_pixels(1)).penultimate.float().cpu()
        return self._blank


@functools.lru_cache(maxsize=2)
def _load_encoder_cached(path: str, modified: float) -> ManagedEncoder:
    return ManagedEncoder(load_image_encoder(path))


def load_encoder_file(name: str) -> ManagedEncoder:
    path = model_file("clip_vision", name)
    return _load_encoder_cached(path, os.path.getmtime(path))


def encode_images(encoder: ManagedEncoder, image, crop: str, negative_image=None, detail: int = 1,
                  detail_ratio: float = 0.5) -> EncodedImages:
    """Encoder features of a batch of references; ``detail`` > 1 blends in those of detail×detail tiles of each
    image's center square (each tile seen at the encoder's full resolution)."""
    if image is None or image.shape[0] == 0:
        raise ValueError("the image batch is empty; expected at least one reference image")
    embeds, penultimate = encoder.encode(image, crop)
    if detail > 1:
        tile_embeds, tile_penultimate = encoder.encode(detail_tiles(center_square(image), detail), "crop")
        embeds = blend_detail(embeds, tile_embeds, detail_ratio)
        penultimate = blend_detail(penultimate, tile_penultimate, detail_ratio)
    if negative_image is not None and negative_image.shape[0] > 0:
        uncond_embeds, uncond_penultimate = encoder.encode(negative_image, crop)
    else:
        uncond_embeds, uncond_penultimate = torch.zeros_like(embeds[:1]), encoder.blank_penultimate()
    return EncodedImages(embeds, penultimate, uncond_embeds, uncond_penultimate, encoder.encoder.name)


BATCH_MODES = ("all latents", "one per latent")


def patch_model(model, adapter: LoadedAdapter, embeds: EncodedImages, weight=1.0, start_at=0.0, end_at=1.0,
                combine="average", layer_weights="all", attn_mask=None, weight_type="linear",
                embeds_scaling="V only", composition_weight=1.0, batch_mode="all latents", frame_weights=""):
    architecture = check_model_fits(model.model.diffusion_model, adapter.checkpoint)
    if batch_mode not in BATCH_MODES:
        raise ValueError(f"batch mode '{batch_mode}' is unknown; expected one of {', '.join(BATCH_MODES)}")
    if batch_mode == "one per latent":
        cond, uncond = tokens_per_reference(adapter.checkpoint, adapter.projection, embeds, embeds.uncond_penultimate)
    else:
        cond, uncond = image_tokens(adapter.checkpoint, adapter.projection, embeds, embeds.uncond_penultimate, combine)
    sampling = model.model.model_sampling
    mask = check_mask(attn_mask) if attn_mask is not None else None
    schedule = weight_schedule(weight_type, architecture, weight, weight * composition_weight)
    multipliers = parse_layer_weights(layer_weights, architecture)
    term = ImagePromptTerm.build(
        adapter.checkpoint, cond, uncond, 1.0, {key: lw.weight * multipliers[key] for key, lw in schedule.items()},
        sampling.percent_to_sigma(start_at), sampling.percent_to_sigma(end_at), mask,
        embeds_scaling, {key for key, lw in schedule.items() if lw.swapped}, parse_frame_weights(frame_weights),
    )
    return apply_image_prompt(model, term)


# --- node classes ------------------------------------------------------------------


def _files(folder):
    import folder_paths

    return folder_paths.get_filename_list(folder)


WEIGHT = ("FLOAT", {"default": 1.0, "min": -1.0, "max": 3.0, "step": 0.05,
                    "tooltip": "λ, the image prompt's weight: 0 gives the model without the adapter, 1 the paper's default."})
WEIGHT_TYPE_TOOLTIP = (
    "How λ is spread over the layers (blocks counted in the order the UNet runs them; the layer preset multiplies it). "
    "linear: λ everywhere. ease in / ease out: from full to 5% / from 5% to full over the blocks; ease in-out: strongest "
    "in the middle; reverse in-out: weakest there. weak input / output / middle: that part at 20%; strong middle: input "
    "and output at 20%. style transfer / composition: only the style / layout blocks (SDXL: up_blocks.0.attentions.1 / "
    "down_blocks.2.attentions.1); strong style transfer: every block but the layout ones; style and composition: both, "
    "the layout blocks at composition_weight. The precise forms also push away from the reference where it should not "
    "act: style transfer precise on the layout blocks, composition precise on all others (which keep 10%)."
)
EMBEDS_SCALING_TOOLTIP = (
    "Where the weight goes. V only: on the image attention's output (the paper's λ). K+V: into the image keys and values. "
    "K+V w/ C penalty: the same, with narrow layers weighted less (width / 1280). K+mean(V) w/ C penalty: the keys and "
    "only the mean of the values."
)
CROP = (list(CROP_MODES), {"default": "crop", "tooltip": "How a non-square image becomes 224×224: center crop (the reference), pad, or stretch."})


class IPAdapterKitLoader:
    DESCRIPTION = ("Loads an IP-Adapter from models/ipadapter: SD1.5 or SDXL, base, light, plus, plus-face or full-face. "
                   "Family and variant are read from the tensors, never from the file name.")
    CATEGORY = f"{CATEGORY}/loaders"
    RETURN_TYPES = (ADAPTER,)
    RETURN_NAMES = ("ipadapter",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ipadapter_file": (_files(MODEL_FOLDER), {"tooltip": "A .safetensors or .bin file from models/ipadapter."})}}

    def load(self, ipadapter_file):
        return (load_adapter_file(ipadapter_file),)


class IPAdapterKitUnifiedLoader:
    DESCRIPTION = ("Finds the released adapter of a preset for the MODEL's family (SD1.5 or SDXL) in models/ipadapter, "
                   "and the image encoder it needs in models/clip_vision, by their usual file names; checks the pair "
                   "from the tensors. Loaded files stay cached across queues.")
    CATEGORY = f"{CATEGORY}/loaders"
    RETURN_TYPES = ("MODEL", ADAPTER, ENCODER)
    RETURN_NAMES = ("model", "ipadapter", "image_encoder")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "Passed through unchanged; its family picks the files."}),
            "preset": (list(PRESETS), {"default": "standard", "tooltip": "light (SD1.5 only, subtle), standard, vit-bigg (ViT-bigG/14 encoder), plus (16 tokens, stronger), plus-face (portraits), full-face (SD1.5 only)."}),
        }}

    def load(self, model, preset):
        import folder_paths

        family = unet_family(model.model.diffusion_model)
        files = preset_files(
            family, preset, folder_paths.get_filename_list(MODEL_FOLDER), folder_paths.get_filename_list("clip_vision"),
            folder_paths.get_folder_paths(MODEL_FOLDER), folder_paths.get_folder_paths("clip_vision"),
        )
        adapter = load_adapter_file(files.adapter)
        encoder = load_encoder_file(files.encoder)
        check_model_fits(model.model.diffusion_model, adapter.checkpoint)
        check_encoder(adapter.checkpoint.spec, encoder.encoder.embed_dim, encoder.encoder.hidden_width,
                      adapter.checkpoint.source, files.encoder)
        return (model, adapter, encoder)


class IPAdapterKitEncoderLoader:
    DESCRIPTION = ("Loads a CLIP image encoder from models/clip_vision (OpenCLIP or transformers format): "
                   "ViT-H/14 for SD1.5 and the SDXL _vit-h adapters, ViT-bigG/14 for ip-adapter_sdxl.")
    CATEGORY = f"{CATEGORY}/loaders"
    RETURN_TYPES = (ENCODER,)
    RETURN_NAMES = ("image_encoder",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip_name": (_files("clip_vision"), {"tooltip": "e.g. CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors or CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors"})}}

    def load(self, clip_name):
        return (load_encoder_file(clip_name),)


class IPAdapterKitEncoderFromCLIPVision:
    DESCRIPTION = "Uses the weights of ComfyUI's own Load CLIP Vision output as this pack's image encoder."
    CATEGORY = f"{CATEGORY}/loaders"
    RETURN_TYPES = (ENCODER,)
    RETURN_NAMES = ("image_encoder",)
    FUNCTION = "convert"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip_vision": ("CLIP_VISION", {"tooltip": "The output of ComfyUI's Load CLIP Vision node (ViT-H/14 or ViT-bigG/14)."})}}

    def convert(self, clip_vision):
        cached = getattr(clip_vision, "_ipadapter_kit_encoder", None)
        if cached is None:
            cached = ManagedEncoder(load_image_encoder(clip_vision.get_sd()))
            clip_vision._ipadapter_kit_encoder = cached
        return (cached,)


class IPAdapterKitEncode:
    DESCRIPTION = "Encodes reference images (a batch) into image-prompt embeddings."
    CATEGORY = CATEGORY
    RETURN_TYPES = (EMBEDS,)
    RETURN_NAMES = ("embeds",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image_encoder": (ENCODER, {"tooltip": "From Load IP-Adapter Image Encoder."}),
                "image": ("IMAGE", {"tooltip": "One or more reference images."}),
                "crop": CROP,
            },
            "optional": {
                "negative_image": ("IMAGE", {"tooltip": "Replaces the unconditional image input (default: a zero embedding for base adapters, a blank image for plus/full-face)."}),
                "weight": ("FLOAT", {"default": 1.0, "min": -1.0, "max": 3.0, "step": 0.05, "tooltip": "Multiplies the features of every image of this batch: how much these references count when combined with others."}),
                "image_weights": ("STRING", {"default": "", "tooltip": "One number per image of the batch, comma-separated (e.g. '1, 0.5'), multiplied with weight; empty: 1 for each."}),
                "detail_tiles": ("INT", {"default": 1, "min": 1, "max": 4, "tooltip": "Enhancer: also cut each image's center square into N×N tiles, each seen at the encoder's full resolution, and blend their features in; 1: off."}),
                "detail_ratio": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip": "With detail tiles: the share of the whole view in the blend (the rest is the tiles' mean)."}),
            },
        }

    def encode(self, image_encoder, image, crop, negative_image=None, weight=1.0, image_weights="", detail_tiles=1,
               detail_ratio=0.5):
        embeds = encode_images(image_encoder, image, crop, negative_image, detail_tiles, detail_ratio)
        weights = parse_weights(image_weights, "image weights") or [1.0]
        return (embeds.weighted([weight * w for w in weights]),)  # weighted() checks one weight or one per image


class IPAdapterKitFrameWeights:
    DESCRIPTION = "Makes a weight per frame (latent) for Apply's frame_weights: a ramp from start to end over the frames."
    CATEGORY = f"{CATEGORY}/utils"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("frame_weights",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "timing": (list(FRAME_TIMINGS), {"default": "linear", "tooltip": "The ramp's shape: linear, ease in (slow start), ease out (fast start), ease in-out (slow at both ends)."}),
            "frames": ("INT", {"default": 16, "min": 1, "max": 9999, "tooltip": "How many frames the ramp covers; later frames keep the end value."}),
            "start": ("FLOAT", {"default": 1.0, "min": -1.0, "max": 3.0, "step": 0.05, "tooltip": "The first frame's weight (a multiple of λ)."}),
            "end": ("FLOAT", {"default": 0.0, "min": -1.0, "max": 3.0, "step": 0.05, "tooltip": "The last frame's weight."}),
        }}

    def make(self, timing, frames, start, end):
        return (", ".join(f"{w:.4g}" for w in frame_schedule(timing, frames, start, end)),)


class IPAdapterKitPrepImage:
    DESCRIPTION = ("Chooses the square of a reference image that the encoder sees (224×224): where to crop a "
                   "non-square image, or pad it whole; the resize filter; optional sharpening.")
    CATEGORY = f"{CATEGORY}/utils"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    FUNCTION = "prepare"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "Reference images."}),
            "interpolation": (list(INTERPOLATIONS), {"default": "LANCZOS", "tooltip": "The resize filter (PIL's)."}),
            "crop_position": (list(CROP_POSITIONS), {"default": "center", "tooltip": "Which square of a non-square image to keep, or pad: the whole image with black bars."}),
            "sharpening": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip": "Contrast-adaptive sharpening after the resize; 0: none."}),
        }}

    def prepare(self, image, interpolation, crop_position, sharpening):
        return (prepare_reference(image, crop_position, interpolation, sharpening),)


class IPAdapterKitNoise:
    DESCRIPTION = ("Makes a negative image for Encode Image's negative_image: noise from black or from the reference. "
                   "The image prompt is then steered away from it instead of from an empty image.")
    CATEGORY = f"{CATEGORY}/utils"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("noise",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "type": (list(NOISE_TYPES), {"default": "fade", "tooltip": "fade: the image mixed with noise; dissolve: a share of the pixels replaced; gaussian: the image plus normal noise; shuffle: its tiles shuffled and mirrored, plus noise."}),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip": "How much noise: 0 leaves the image (or black) as it is."}),
                "blur": ("INT", {"default": 0, "min": 0, "max": 32, "step": 1, "tooltip": "Gaussian blur kernel size in pixels after the noise; 0: none."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip": "The same seed gives the same noise."}),
            },
            "optional": {"image": ("IMAGE", {"tooltip": "Make the noise from this image (its center square); without it, from black."})},
        }

    def make(self, type, strength, blur, seed, image=None):  # noqa: A002  (the widget's name)
        return (make_noise(type, strength, blur, image, seed),)


class IPAdapterKitCombineEmbeds:
    DESCRIPTION = "Joins or merges encoded references (from Encode Image or Load Embeds) into one embeds input."
    CATEGORY = f"{CATEGORY}/embeds"
    RETURN_TYPES = (EMBEDS,)
    RETURN_NAMES = ("embeds",)
    FUNCTION = "combine"

    @classmethod
    def INPUT_TYPES(cls):
        slot = {"tooltip": "More embeds, from the same image encoder."}
        return {
            "required": {
                "embeds_1": (EMBEDS, {"tooltip": "The first embeds; with subtract, the one the others are taken from."}),
                "method": (list(COMBINE_MODES), {"default": "concat", "tooltip": "concat keeps every reference (Apply's combine then decides); the other methods merge them into one reference here: average, add, subtract (the first minus the mean of the others), norm average."}),
            },
            "optional": {f"embeds_{i}": (EMBEDS, slot) for i in range(2, 6)},
        }

    def combine(self, embeds_1, method, **more):
        parts = [embeds_1, *(more[name] for name in sorted(more) if more[name] is not None)]
        return (combine_embeds(parts, method),)


class IPAdapterKitEncodeTiled:
    DESCRIPTION = ("Encodes a tall or wide reference as squares along its long side (each a reference of its own) "
                   "instead of cropping its sides away, and gives each square's mask over the picture for regional use.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (EMBEDS, "MASK")
    RETURN_NAMES = ("embeds", "tile_masks")
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image_encoder": (ENCODER, {"tooltip": "From Load IP-Adapter Image Encoder."}),
                "image": ("IMAGE", {"tooltip": "The reference; a square one gives a single tile (the whole image)."}),
            },
            "optional": {"negative_image": ("IMAGE", {"tooltip": "Replaces the unconditional image input."})},
        }

    def encode(self, image_encoder, image, negative_image=None):
        tiles, masks = tile_reference(image)
        return (encode_images(image_encoder, tiles, "crop", negative_image), masks)


@dataclass(frozen=True)
class Region:
    embeds: EncodedImages
    mask: torch.Tensor | None
    weight: float
    weight_type: str
    start_at: float
    end_at: float


@dataclass(frozen=True)
class RegionChain:
    """What IP-Adapter Region passes down the chain: the regions so far and their texts."""

    regions: tuple[Region, ...] = ()
    positive: tuple = ()
    negative: tuple = ()


def masked_conditioning(conditioning, mask, strength):
    """ComfyUI conditioning limited to a mask (what its Conditioning (Set Mask) node does)."""
    if conditioning is None:
        return []
    if mask is None:
        return list(conditioning)
    return [[tensor, {**options, "mask": mask, "set_area_to_bounds": False, "mask_strength": strength}]
            for tensor, options in conditioning]


class IPAdapterKitRegion:
    DESCRIPTION = ("One region of the picture: a reference with its own mask, weight, weight type and window, and "
                   "optionally its own text. Chain regions, then connect the last one to Apply's regions input and its "
                   "positive / negative to the sampler (combined with a global prompt if you like).")
    CATEGORY = CATEGORY
    RETURN_TYPES = (REGIONS, "CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("regions", "positive", "negative")
    FUNCTION = "region"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "embeds": (EMBEDS, {"tooltip": "This region's reference, from Encode Image."}),
                "weight": WEIGHT,
                "weight_type": (list(WEIGHT_TYPES), {"default": "linear", "tooltip": WEIGHT_TYPE_TOOLTIP}),
                "start_at": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "Fraction of the denoising schedule where this region's image prompt starts."}),
                "end_at": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "Fraction of the denoising schedule where it stops."}),
                "prompt_strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05, "tooltip": "Strength of this region's text inside its mask."}),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": "Where this region is (1) and is not (0); without a mask, the whole picture."}),
                "positive": ("CONDITIONING", {"tooltip": "This region's own text, limited to its mask."}),
                "negative": ("CONDITIONING", {"tooltip": "This region's own negative text, limited to its mask."}),
                "regions": (REGIONS, {"tooltip": "The regions before this one in the chain."}),
            },
        }

    def region(self, embeds, weight, weight_type, start_at, end_at, prompt_strength, mask=None, positive=None,
               negative=None, regions=None):
        mask = check_mask(mask) if mask is not None else None
        previous = regions or RegionChain()
        chain = RegionChain(
            (*previous.regions, Region(embeds, mask, weight, weight_type, start_at, end_at)),
            (*previous.positive, *masked_conditioning(positive, mask, prompt_strength)),
            (*previous.negative, *masked_conditioning(negative, mask, prompt_strength)),
        )
        return (chain, list(chain.positive), list(chain.negative))


class IPAdapterKitApply:
    DESCRIPTION = ("Gives a MODEL an image prompt: adds λ·Attention(Q, K', V') to every cross-attention layer "
                   "(16 in SD1.5, 70 in SDXL). The adapter must be of the MODEL's family.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "An SD1.5 or SDXL model; it is cloned, never changed."}),
                "ipadapter": (ADAPTER, {"tooltip": "From Load IP-Adapter."}),
                "weight": WEIGHT,
                "start_at": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "Fraction of the denoising schedule where the image prompt starts."}),
                "end_at": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "Fraction of the denoising schedule where it stops."}),
                "combine": (list(COMBINE_MODES), {"default": "average", "tooltip": "Several references: average their features, concatenate their tokens (each keeps its own), add them, subtract (the first minus the mean of the others), or norm average (each scaled to the same length first, so none outweighs the others)."}),
                "layers": ([*LAYER_PRESETS, "custom"], {"default": "all", "tooltip": "Which layers take the image prompt: all; style (SD1.5 up_blocks.1, SDXL up_blocks.0.attentions.1); composition (SD1.5 down_blocks.2, SDXL down_blocks.2.attentions.1); or custom."}),
                "custom_layer_weights": ("STRING", {"default": "", "tooltip": "With layers = custom: one number per layer in key order (16 for SD1.5, keys 1, 3, ..., 31; 70 for SDXL, keys 1, 3, ..., 139), or key:value pairs like '15:1, 11:0.5', where every layer not listed gets 0."}),
            },
            "optional": {
                "embeds": (EMBEDS, {"tooltip": "From IP-Adapter Encode Image or Load Embeds."}),
                "image": ("IMAGE", {"tooltip": "Instead of embeds: a reference image, encoded with image_encoder."}),
                "image_encoder": (ENCODER, {"tooltip": "Needed with image."}),
                "attn_mask": ("MASK", {"tooltip": "Where the image prompt applies (1) and where not (0): regional prompting."}),
                "weight_type": (list(WEIGHT_TYPES), {"default": "linear", "tooltip": WEIGHT_TYPE_TOOLTIP}),
                "embeds_scaling": (list(EMBEDS_SCALING), {"default": "V only", "tooltip": EMBEDS_SCALING_TOOLTIP}),
                "composition_weight": ("FLOAT", {"default": 1.0, "min": -1.0, "max": 5.0, "step": 0.05, "tooltip": "With weight type 'style and composition': the composition blocks' weight, as a multiple of λ (so λ = 0 still turns everything off)."}),
                "batch_mode": (list(BATCH_MODES), {"default": "all latents", "tooltip": "all latents: every latent of the batch gets the same image prompt (references combined). one per latent: reference i conditions latent i, and latents beyond the last reference get the last one (animation, batches of variations); combine is then not used."}),
                "regions": (REGIONS, {"tooltip": "From IP-Adapter Region nodes: each region's reference is applied with its own mask, weight, weight type and window (combine, layers, scaling from this node), together with embeds if those are connected too."}),
                "frame_weights": ("STRING", {"default": "", "multiline": True, "tooltip": "A weight per latent of the batch (frame), comma-separated, multiplying λ; latents beyond the list get its last value; empty: 1. IP-Adapter Frame Weights makes such lists. Follows context windows (the frame numbers ComfyUI or AnimateDiff hand over)."}),
            },
        }

    def apply(self, model, ipadapter, weight, start_at, end_at, combine, layers, custom_layer_weights,
              embeds=None, image=None, image_encoder=None, attn_mask=None, weight_type="linear",
              embeds_scaling="V only", composition_weight=1.0, batch_mode="all latents", frame_weights="", regions=None):
        layer_weights = custom_layer_weights if layers == "custom" else layers
        for region in regions.regions if regions else ():
            model = patch_model(model, ipadapter, region.embeds, region.weight, region.start_at, region.end_at, combine,
                                layer_weights, region.mask, region.weight_type, embeds_scaling, composition_weight)
        if embeds is None and image is not None and image_encoder is not None:
            embeds = encode_images(image_encoder, image, "crop")
        if embeds is None:
            if regions and regions.regions:
                return (model,)
            raise ValueError("Apply IP-Adapter got no embeds, no image + image_encoder and no regions; expected one of them")
        return (patch_model(model, ipadapter, embeds, weight, start_at, end_at, combine, layer_weights, attn_mask,
                            weight_type, embeds_scaling, composition_weight, batch_mode, frame_weights),)


class IPAdapterKitAttentionMap:
    DESCRIPTION = ("Shows where the image prompt lands: runs one sampling step of a patched MODEL and returns how "
                   "strongly the image term acts over the picture, averaged and per UNet block. Use it to tune masks "
                   "and layer weights.")
    CATEGORY = f"{CATEGORY}/utils"
    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("heat_maps", "average")
    FUNCTION = "map"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "A MODEL patched by Apply IP-Adapter."}),
            "positive": ("CONDITIONING", {"tooltip": "The prompt you sample with."}),
            "negative": ("CONDITIONING", {"tooltip": "The negative prompt you sample with."}),
            "latent_image": ("LATENT", {"tooltip": "The latent you sample (its first image is mapped)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "tooltip": "The noise seed."}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 1000, "tooltip": "The schedule's length (euler, normal)."}),
            "at_step": ("INT", {"default": 0, "min": 0, "max": 999, "tooltip": "Which step to look at: 0 is the noisiest."}),
            "cfg": ("FLOAT", {"default": 7.0, "min": 0.0, "max": 100.0, "step": 0.1, "tooltip": "Guidance scale."}),
        }}

    def map(self, model, positive, negative, latent_image, seed, steps, at_step, cfg):
        if at_step >= steps:
            raise ValueError(f"at_step {at_step} is past the schedule; expected a step below steps ({steps})")
        samples = latent_image["samples"]
        recorder = record_attention(model, positive, negative, samples, seed, steps, at_step, cfg)
        maps = block_maps(recorder.strength, unet_family(model.model.diffusion_model), *samples.shape[-2:])
        return as_images(maps, scale=8)


class IPAdapterKitSimple:
    DESCRIPTION = "The common path in one node: model + reference image + λ."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "An SD1.5 or SDXL model."}),
                "image": ("IMAGE", {"tooltip": "The reference image."}),
                "weight": WEIGHT,
                "ipadapter_file": (_files(MODEL_FOLDER), {"tooltip": "e.g. ip-adapter_sd15.safetensors or ip-adapter_sdxl_vit-h.safetensors in models/ipadapter; it must match the MODEL's family."}),
                "clip_name": (_files("clip_vision"), {"tooltip": "The adapter's image encoder in models/clip_vision (ViT-H/14, or ViT-bigG/14 for ip-adapter_sdxl)."}),
            }
        }

    def apply(self, model, image, weight, ipadapter_file, clip_name):
        embeds = encode_images(load_encoder_file(clip_name), image, "crop")
        return (patch_model(model, load_adapter_file(ipadapter_file), embeds, weight),)


class IPAdapterKitSaveEmbeds:
    DESCRIPTION = "Saves image-prompt embeddings as .safetensors in output/ipadapter_embeds."
    CATEGORY = f"{CATEGORY}/embeds"
    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "embeds": (EMBEDS, {"tooltip": "Embeddings to keep."}),
            "filename_prefix": ("STRING", {"default": "ipadapter_embeds", "tooltip": "File name prefix; a counter is added."}),
        }}

    def save(self, embeds, filename_prefix):
        import folder_paths
        from safetensors.torch import save_file

        folder = os.path.join(folder_paths.get_output_directory(), EMBEDS_SUBFOLDER)
        os.makedirs(folder, exist_ok=True)
        prefix = os.path.basename(filename_prefix) or "ipadapter_embeds"
        counter = 1
        while os.path.exists(os.path.join(folder, f"{prefix}_{counter:05d}.safetensors")):
            counter += 1
        path = os.path.join(folder, f"{prefix}_{counter:05d}.safetensors")
        with atomic_path(path) as temporary:  # Load Embeds lists the folder: never a half-written file there
            save_file(embeds.state_dict(), str(temporary), metadata={"encoder": embeds.encoder_name})
        return {"ui": {"text": [path]}}


class IPAdapterKitLoadEmbeds:
    DESCRIPTION = "Loads image-prompt embeddings saved by Save Embeds (from input/ or output/ipadapter_embeds)."
    CATEGORY = f"{CATEGORY}/embeds"
    RETURN_TYPES = (EMBEDS,)
    RETURN_NAMES = ("embeds",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        def listing(folder, annotation=""):
            if not os.path.isdir(folder):
                return []
            return [f"{name}{annotation}" for name in sorted(os.listdir(folder)) if name.endswith(".safetensors")]

        files = listing(folder_paths.get_input_directory())
        files += [f"{EMBEDS_SUBFOLDER}/{name}" for name in listing(os.path.join(folder_paths.get_output_directory(), EMBEDS_SUBFOLDER), " [output]")]
        return {"required": {"embeds_file": (files, {"tooltip": "A .safetensors file written by Save Embeds."})}}

    def load(self, embeds_file):
        import folder_paths
        from safetensors import safe_open

        path = folder_paths.get_annotated_filepath(embeds_file)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"embeddings file '{embeds_file}' does not exist; expected a file written by Save Embeds")
        with safe_open(path, framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
            encoder_name = (handle.metadata() or {}).get("encoder", "image encoder")
        return (EncodedImages.from_state_dict(tensors, encoder_name, os.path.basename(path)),)


NODE_CLASS_MAPPINGS = {
    "IPAdapterKitLoader": IPAdapterKitLoader,
    "IPAdapterKitUnifiedLoader": IPAdapterKitUnifiedLoader,
    "IPAdapterKitEncoderLoader": IPAdapterKitEncoderLoader,
    "IPAdapterKitEncoderFromCLIPVision": IPAdapterKitEncoderFromCLIPVision,
    "IPAdapterKitEncode": IPAdapterKitEncode,
    "IPAdapterKitCombineEmbeds": IPAdapterKitCombineEmbeds,
    "IPAdapterKitFrameWeights": IPAdapterKitFrameWeights,
    "IPAdapterKitPrepImage": IPAdapterKitPrepImage,
    "IPAdapterKitNoise": IPAdapterKitNoise,
    "IPAdapterKitEncodeTiled": IPAdapterKitEncodeTiled,
    "IPAdapterKitRegion": IPAdapterKitRegion,
    "IPAdapterKitApply": IPAdapterKitApply,
    "IPAdapterKitAttentionMap": IPAdapterKitAttentionMap,
    "IPAdapterKitSimple": IPAdapterKitSimple,
    "IPAdapterKitSaveEmbeds": IPAdapterKitSaveEmbeds,
    "IPAdapterKitLoadEmbeds": IPAdapterKitLoadEmbeds,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "IPAdapterKitLoader": "Load IP-Adapter",
    "IPAdapterKitUnifiedLoader": "IP-Adapter Unified Loader",
    "IPAdapterKitEncoderLoader": "Load IP-Adapter Image Encoder",
    "IPAdapterKitEncoderFromCLIPVision": "IP-Adapter Encoder from CLIP Vision",
    "IPAdapterKitEncode": "IP-Adapter Encode Image",
    "IPAdapterKitCombineEmbeds": "Combine IP-Adapter Embeds",
    "IPAdapterKitFrameWeights": "IP-Adapter Frame Weights",
    "IPAdapterKitPrepImage": "Prepare Image for IP-Adapter",
    "IPAdapterKitNoise": "IP-Adapter Noise (negative image)",
    "IPAdapterKitEncodeTiled": "IP-Adapter Encode Tiled",
    "IPAdapterKitRegion": "IP-Adapter Region",
    "IPAdapterKitApply": "Apply IP-Adapter",
    "IPAdapterKitAttentionMap": "IP-Adapter Attention Map",
    "IPAdapterKitSimple": "IP-Adapter (simple)",
    "IPAdapterKitSaveEmbeds": "Save IP-Adapter Embeds",
    "IPAdapterKitLoadEmbeds": "Load IP-Adapter Embeds",
}
