"""ComfyUI nodes: sockets in, a call into ``ipadapter/``, sockets out.

Each node's inputs and outputs are defined in ``comfyui_glue/interface.py`` (shared with the
workflow migrator); a class here holds what the node does.

One node set serves every family in ``ipadapter.registry``:
the family is read from the MODEL and the adapter's tensors. Node ids and
socket types start with ``IPAdapterKit`` / ``IPADAPTER_KIT`` so this pack
installs next to other IP-Adapter packs without either overriding the other.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace

import torch

from .ipadapter.adapter_file import IPAdapterCheckpoint, check_encoder, load_adapter
from .ipadapter.encoder import ImageEncoder, load_image_encoder
from .ipadapter.files import atomic_path
from .ipadapter.faces import DETECTOR_SIZE
from .ipadapter.model_scan import NotFound, format_table, model_table, pick_adapter, pick_encoder
from .ipadapter.registry import ENCODERS, PRESETS, VARIANTS
from .ipadapter.image_prompt import (
    EncodedImages,
    check_mask,
    combine_embeds,
    image_tokens,
    projection_inputs,
    tokens_per_reference,
)
from .ipadapter.weighting import frame_schedule, parse_frame_weights, parse_weights
from .ipadapter.weighting import layer_weights as per_layer_weights
from .comfyui_glue.heatmap import as_images, block_maps
from .comfyui_glue.interface import (BATCH_MODES, ENCODER_FOLDER, FACE_FOLDER, FACE_PACKS, FACE_PRESETS, FAMILIES,
                                     MODEL_FAMILIES, MODEL_FOLDER, NODES, SAVED_EMBEDS, TILINGS)
from .comfyui_glue.face_nodes import encode_faces, list_packs, load_face_analysis, with_faceid_lora
from .comfyui_glue.reference_prep import make_noise, prepare_reference
from .comfyui_glue.tiles import blend_detail, center_square, cubiq_tiles, detail_tiles, tile_reference
from .comfyui_glue.dit_patch import TimedImagePromptTerm
from .patcher import (ImagePromptTerm, apply_image_prompt, check_model_fits, dit_width_and_heads, family_of_comfy_model,
                      record_attention)

CATEGORY = "ipadapter_kit"
EMBEDS_SUBFOLDER = "ipadapter_embeds"


def register_model_folder() -> None:
    """Add ``models/ipadapter`` and ``models/insightface`` to ComfyUI's folders, keeping paths from
    extra_model_paths.yaml."""
    try:
        import folder_paths
    except ModuleNotFoundError:  # imported outside ComfyUI (tools, tests of the core)
        return

    for folder, kinds in ((MODEL_FOLDER, folder_paths.supported_pt_extensions), (FACE_FOLDER, {".onnx"})):
        default = os.path.join(folder_paths.models_dir, folder)
        paths, extensions = folder_paths.folder_names_and_paths.get(folder, ([], set()))
        paths = list(paths) + ([default] if default not in paths else [])
        folder_paths.folder_names_and_paths[folder] = (paths, set(extensions) | set(kinds))


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


def patch_model(model, adapter: LoadedAdapter, embeds: EncodedImages, weight=1.0, start_at=0.0, end_at=1.0,
                combine="average", layer_weights="all", attn_mask=None, weight_type="linear",
                embeds_scaling="V only", composition_weight=1.0, batch_mode="all latents", frame_weights=""):
    architecture = check_model_fits(model.model.diffusion_model, adapter.checkpoint)
    if batch_mode not in BATCH_MODES:
        raise ValueError(f"batch mode '{batch_mode}' is unknown; expected one of {', '.join(BATCH_MODES)}")
    sampling = model.model.model_sampling
    weights = per_layer_weights(architecture, weight, weight_type, layer_weights, composition_weight)
    window = dict(sigma_start=sampling.percent_to_sigma(start_at), sigma_end=sampling.percent_to_sigma(end_at),
                  mask=check_mask(attn_mask) if attn_mask is not None else None,
                  frame_weights=parse_frame_weights(frame_weights))
    if adapter.checkpoint.spec.projection == "time-resampler":  # its tokens change with the step
        per_reference = batch_mode == "one per latent"
        cond, uncond = projection_inputs(adapter.checkpoint, adapter.projection, embeds, embeds.uncond_penultimate,
                                         "concat" if per_reference else combine)
        term = TimedImagePromptTerm(adapter.checkpoint, adapter.projection, cond, uncond, combine == "concat"
                                    and not per_reference, weights, embeds_scaling, sampling.timestep, **window)
        return apply_image_prompt(model, term)
    if batch_mode == "one per latent":
        cond, uncond = tokens_per_reference(adapter.checkpoint, adapter.projection, embeds, embeds.uncond_penultimate,
                                            embeds.shortcut_scale)
    else:
        cond, uncond = image_tokens(adapter.checkpoint, adapter.projection, embeds, embeds.uncond_penultimate, combine,
                                    embeds.shortcut_scale)
    heads = None if architecture.attach.is_unet else dit_width_and_heads(model.model.diffusion_model)[1]
    term = ImagePromptTerm.build(adapter.checkpoint, cond, uncond, weights, window["sigma_start"], window["sigma_end"],
                                 window["mask"], embeds_scaling, window["frame_weights"], heads)
    return apply_image_prompt(model, term)


# --- node classes ------------------------------------------------------------------


def list_files(listing: str) -> list[str]:
    """The choices of a file input: a model folder's files, or the embeddings Save Embeds wrote."""
    import folder_paths

    if listing == FACE_PACKS:
        return list_packs()
    if listing != SAVED_EMBEDS:
        return folder_paths.get_filename_list(listing)

    def safetensors_in(folder, annotation=""):
        if not os.path.isdir(folder):
            return []
        return [f"{name}{annotation}" for name in sorted(os.listdir(folder)) if name.endswith(".safetensors")]

    saved = os.path.join(folder_paths.get_output_directory(), EMBEDS_SUBFOLDER)
    return safetensors_in(folder_paths.get_input_directory()) + [
        f"{EMBEDS_SUBFOLDER}/{name}" for name in safetensors_in(saved, " [output]")]


class InterfaceNode:
    """A node whose sockets and widgets are ``NODES[its class name]``: the class name is the node id."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        outputs = NODES[cls.__name__].outputs
        cls.RETURN_TYPES = tuple(kind for _, kind in outputs)
        cls.RETURN_NAMES = tuple(name for name, _ in outputs)

    @classmethod
    def INPUT_TYPES(cls):
        return NODES[cls.__name__].input_types(list_files)


class IPAdapterKitLoader(InterfaceNode):
    DESCRIPTION = (f"Loads an IP-Adapter from models/ipadapter: {MODEL_FAMILIES}, {', '.join(v.name for v in VARIANTS)}. "
                   "Family and variant are read from the tensors, never from the file name.")
    CATEGORY = f"{CATEGORY}/loaders"
    FUNCTION = "load"

    def load(self, ipadapter_file):
        return (load_adapter_file(ipadapter_file),)


class IPAdapterKitUnifiedLoader(InterfaceNode):
    DESCRIPTION = (f"Finds the adapter of a preset for the MODEL's family ({MODEL_FAMILIES}) in models/ipadapter, and "
                   "the image encoder it needs in models/clip_vision, by what the files hold (any name, any folder "
                   "of extra_model_paths.yaml; released names win ties). Loaded files stay cached across queues.")
    CATEGORY = f"{CATEGORY}/loaders"
    FUNCTION = "load"

    def load(self, model, preset):
        if preset in FACE_PRESETS:
            raise ValueError(f"preset '{preset}' is a FaceID preset; expected IP-Adapter Unified Loader FaceID for it "
                             "(it also applies the LoRA and loads the face analysis)")
        return (model, *find_preset_files(model, preset)[:2])


def find_preset_files(model, preset: str, faceid: bool = False):
    """The preset's adapter and image encoder for the MODEL's family, found by content, and the adapter's path. With
    ``faceid``, a missing encoder is None for the adapters that read no CLIP features (faceid, the portraits)."""
    family = family_of_comfy_model(model.model.diffusion_model)
    adapter_files, adapter_folders = listed(MODEL_FOLDER)
    encoder_files, encoder_folders = listed(ENCODER_FOLDER)
    found = pick_adapter(family, preset, adapter_files, adapter_folders)
    adapter = load_adapter_file(found.name)
    check_model_fits(model.model.diffusion_model, adapter.checkpoint)
    try:
        encoder_file = pick_encoder(PRESETS[preset][1], found, encoder_files, encoder_folders)
    except NotFound:
        if faceid and adapter.checkpoint.spec.encoder_input != "penultimate":
            return adapter, None, adapter_files[found.name]
        raise
    encoder = load_encoder_file(encoder_file.name)
    check_encoder(adapter.checkpoint.spec, encoder.encoder.embed_dim, encoder.encoder.hidden_width,
                  adapter.checkpoint.source, encoder_file.name)
    return adapter, encoder, adapter_files[found.name]


class IPAdapterKitUnifiedLoaderFaceID(InterfaceNode):
    DESCRIPTION = ("Finds a FaceID preset's adapter for the MODEL's family in models/ipadapter by what the files hold, "
                   "the image encoder the plus adapters show the face crop to, applies the adapter's LoRA (or leaves "
                   "that to ComfyUI's LoRA loader) and loads the face analysis (insightface).")
    CATEGORY = f"{CATEGORY}/loaders"
    FUNCTION = "load"

    def load(self, model, preset, lora, lora_strength, pack, provider):
        import folder_paths

        if preset not in FACE_PRESETS:
            raise ValueError(f"preset '{preset}' is not a FaceID preset; expected one of {', '.join(FACE_PRESETS)}")
        adapter, encoder, path = find_preset_files(model, preset, faceid=True)
        patched = with_faceid_lora(model, adapter.checkpoint, path, lora, lora_strength,
                                   folder_paths.get_folder_paths("loras"))
        return (patched, adapter, encoder, load_face_analysis(pack, provider, DETECTOR_SIZE))


def listed(folder: str) -> tuple[dict[str, str], list[str]]:
    """A model folder's files (name as ComfyUI lists it -> path), extra_model_paths.yaml included, and its folders."""
    import folder_paths

    names = folder_paths.get_filename_list(folder)
    return {name: folder_paths.get_full_path(folder, name) for name in names}, folder_paths.get_folder_paths(folder)


class IPAdapterKitModelCheck(InterfaceNode):
    DESCRIPTION = ("Lists what every file in models/ipadapter and models/clip_vision is (read from its tensors, "
                   "whatever its name): family, variant, the image encoder it needs, the unified-loader presets it "
                   "serves, and whether that encoder is there.")
    CATEGORY = f"{CATEGORY}/utils"
    FUNCTION = "check"
    OUTPUT_NODE = True

    def check(self):
        table = format_table(model_table(listed(MODEL_FOLDER)[0], listed(ENCODER_FOLDER)[0]))
        return {"ui": {"text": [table]}, "result": (table,)}


class IPAdapterKitFaceAnalysisLoader(InterfaceNode):
    DESCRIPTION = ("Loads the face detector and recognition model of an InsightFace pack (models/insightface/models/"
                   "<pack>, nothing downloaded) for IP-Adapter Encode Face. Needs insightface >= 2.1 and onnxruntime.")
    CATEGORY = f"{CATEGORY}/loaders"
    FUNCTION = "load"

    def load(self, pack, provider, detector_size):
        return (load_face_analysis(pack, provider, detector_size),)


class IPAdapterKitEncodeFace(InterfaceNode):
    DESCRIPTION = ("Turns the largest face of each image into embeds for a FaceID adapter (Apply takes them like any "
                   "embeds); the plus adapters also show the aligned face crop to the image encoder.")
    CATEGORY = CATEGORY
    FUNCTION = "encode"

    def encode(self, face_analysis, image, ipadapter, weight_faceidv2, image_encoder=None, negative_image=None):
        clip = None
        if image_encoder is not None:
            clip = functools.partial(encode_images, image_encoder, crop="crop", negative_image=negative_image)
        return encode_faces(face_analysis, image, ipadapter.checkpoint, weight_faceidv2, clip)


class IPAdapterKitEncoderLoader(InterfaceNode):
    DESCRIPTION = ("Loads a CLIP image encoder from models/clip_vision (OpenCLIP or transformers format): "
                   f"{' or '.join(encoder.name for encoder in ENCODERS)}, the one the adapter was trained on.")
    CATEGORY = f"{CATEGORY}/loaders"
    FUNCTION = "load"

    def load(self, clip_name):
        return (load_encoder_file(clip_name),)


class IPAdapterKitEncoderFromCLIPVision(InterfaceNode):
    DESCRIPTION = "Uses the weights of ComfyUI's own Load CLIP Vision output as this pack's image encoder."
    CATEGORY = f"{CATEGORY}/loaders"
    FUNCTION = "convert"

    def convert(self, clip_vision):
        cached = getattr(clip_vision, "_ipadapter_kit_encoder", None)
        if cached is None:
            cached = ManagedEncoder(load_image_encoder(clip_vision.get_sd()))
            clip_vision._ipadapter_kit_encoder = cached
        return (cached,)


class IPAdapterKitEncode(InterfaceNode):
    DESCRIPTION = "Encodes reference images (a batch) into image-prompt embeddings."
    CATEGORY = CATEGORY
    FUNCTION = "encode"

    def encode(self, image_encoder, image, crop, negative_image=None, weight=1.0, image_weights="", detail_tiles=1,
               detail_ratio=0.5):
        embeds = encode_images(image_encoder, image, crop, negative_image, detail_tiles, detail_ratio)
        weights = parse_weights(image_weights, "image weights") or [1.0]
        return (embeds.weighted([weight * w for w in weights]),)  # weighted() checks one weight or one per image


class IPAdapterKitFrameWeights(InterfaceNode):
    DESCRIPTION = "Makes a weight per frame (latent) for Apply's frame_weights: a ramp from start to end over the frames."
    CATEGORY = f"{CATEGORY}/utils"
    FUNCTION = "make"

    def make(self, timing, frames, start, end):
        return (", ".join(f"{w:.4g}" for w in frame_schedule(timing, frames, start, end)),)


class IPAdapterKitPrepImage(InterfaceNode):
    DESCRIPTION = ("Chooses the square of a reference image that the encoder sees (224×224): where to crop a "
                   "non-square image, or pad it whole; the resize filter; optional sharpening.")
    CATEGORY = f"{CATEGORY}/utils"
    FUNCTION = "prepare"

    def prepare(self, image, interpolation, crop_position, sharpening):
        return (prepare_reference(image, crop_position, interpolation, sharpening),)


class IPAdapterKitNoise(InterfaceNode):
    DESCRIPTION = ("Makes a negative image for Encode Image's negative_image: noise from black or from the reference. "
                   "The image prompt is then steered away from it instead of from an empty image.")
    CATEGORY = f"{CATEGORY}/utils"
    FUNCTION = "make"

    def make(self, type, strength, blur, seed, image=None):  # noqa: A002  (the widget's name)
        return (make_noise(type, strength, blur, image, seed),)


class IPAdapterKitCombineEmbeds(InterfaceNode):
    DESCRIPTION = "Joins or merges encoded references (from Encode Image or Load Embeds) into one embeds input."
    CATEGORY = f"{CATEGORY}/embeds"
    FUNCTION = "combine"

    def combine(self, embeds_1, method, **more):
        parts = [embeds_1, *(more[name] for name in sorted(more) if more[name] is not None)]
        return (combine_embeds(parts, method),)


class IPAdapterKitEncodeTiled(InterfaceNode):
    DESCRIPTION = ("Encodes a tall or wide reference as squares along its long side (each a reference of its own) "
                   "instead of cropping its sides away, and gives each square's mask over the picture for regional use.")
    CATEGORY = CATEGORY
    FUNCTION = "encode"

    def encode(self, image_encoder, image, tiling=TILINGS[0], negative_image=None, mask=None):
        if tiling not in TILINGS:
            raise ValueError(f"tiling '{tiling}' is unknown; expected one of {', '.join(TILINGS)}")
        if image is None or image.shape[0] == 0:
            raise ValueError("the image batch is empty; expected at least one reference image")
        references = image.shape[0]
        if tiling == TILINGS[0]:  # image 0's tiles, then image 1's, ...
            tiles, masks = tile_reference(image)
            positions = len(masks)
            of_position = [list(range(position, len(tiles), positions)) for position in range(positions)]
        else:  # tile 0 of every image, then tile 1, ... as cubiq concatenates them
            per_position, masks = cubiq_tiles(image, check_mask(mask) if mask is not None else None)
            tiles = torch.cat(per_position)
            of_position = [list(range(p * references, (p + 1) * references)) for p in range(len(per_position))]
            masks = masks.flatten(0, 1) if masks.shape[1] == 1 else masks
        embeds = encode_images(image_encoder, tiles, "crop", negative_image)
        regions = RegionChain(tuple(
            Region(replace(embeds, image_embeds=embeds.image_embeds[rows], penultimate=embeds.penultimate[rows]),
                   tile_mask, 1.0, None, None, None)
            for rows, tile_mask in zip(of_position, masks)))
        return (embeds, masks if masks.dim() == 3 else masks.flatten(0, 1), regions)


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


class IPAdapterKitRegion(InterfaceNode):
    DESCRIPTION = ("One region of the picture: a reference with its own mask, weight, weight type and window, and "
                   "optionally its own text. Chain regions, then connect the last one to Apply's regions input and its "
                   "positive / negative to the sampler (combined with a global prompt if you like).")
    CATEGORY = CATEGORY
    FUNCTION = "region"

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


class IPAdapterKitApply(InterfaceNode):
    DESCRIPTION = ("Gives a MODEL an image prompt: adds λ·Attention(Q, K', V') to every cross-attention layer "
                   f"({', '.join(f'{len(f.layers)} in {f.name}' for f in FAMILIES)}). The adapter must be of the MODEL's family. "
                   "Apply IP-Adapter is this node with the everyday controls only.")
    CATEGORY = CATEGORY
    FUNCTION = "apply"

    def apply(self, model, ipadapter, weight, start_at, end_at, combine, layers, custom_layer_weights,
              embeds=None, image=None, image_encoder=None, attn_mask=None, weight_type="linear",
              embeds_scaling="V only", composition_weight=1.0, batch_mode="all latents", frame_weights="", regions=None):
        layer_weights = custom_layer_weights if layers == "custom" else layers
        for region in regions.regions if regions else ():
            # λ scales everything this node attaches: at 0 the regions are off too
            # Encode Tiled's regions leave weight type and window to this node (None)
            model = patch_model(model, ipadapter, region.embeds, weight * region.weight,
                                start_at if region.start_at is None else region.start_at,
                                end_at if region.end_at is None else region.end_at, combine, layer_weights, region.mask,
                                region.weight_type or weight_type, embeds_scaling, composition_weight)
        if embeds is None and image is not None and image_encoder is not None:
            embeds = encode_images(image_encoder, image, "crop")
        if embeds is None:
            if regions and regions.regions:
                return (model,)
            raise ValueError("Apply IP-Adapter got no embeds, no image + image_encoder and no regions; expected one of them")
        return (patch_model(model, ipadapter, embeds, weight, start_at, end_at, combine, layer_weights, attn_mask,
                            weight_type, embeds_scaling, composition_weight, batch_mode, frame_weights),)


class IPAdapterKitApplySimple(InterfaceNode):
    DESCRIPTION = ("Gives a MODEL an image prompt with the everyday controls: λ, where in the schedule it acts, how "
                   "it is spread over the layers (weight type), an optional attention mask. Apply IP-Adapter "
                   "(Advanced) has the rest (combine, layers, embeds scaling, batch mode, frame weights, regions) and "
                   "gives the same MODEL at its defaults.")
    CATEGORY = CATEGORY
    FUNCTION = "apply"

    def apply(self, model, ipadapter, weight, start_at, end_at, weight_type, embeds=None, image=None,
              image_encoder=None, attn_mask=None):
        if embeds is None and (image is None or image_encoder is None):
            raise ValueError("Apply IP-Adapter got neither embeds nor image + image_encoder; expected one of them")
        return IPAdapterKitApply().apply(model, ipadapter, weight, start_at, end_at, "average", "all", "",
                                         embeds=embeds, image=image, image_encoder=image_encoder, attn_mask=attn_mask,
                                         weight_type=weight_type)


class IPAdapterKitAttentionMap(InterfaceNode):
    DESCRIPTION = ("Shows where the image prompt lands: runs one sampling step of a patched MODEL and returns how "
                   "strongly the image term acts over the picture, averaged and per UNet block. Use it to tune masks "
                   "and layer weights.")
    CATEGORY = f"{CATEGORY}/utils"
    FUNCTION = "map"

    def map(self, model, positive, negative, latent_image, seed, steps, at_step, cfg):
        if at_step >= steps:
            raise ValueError(f"at_step {at_step} is past the schedule; expected a step below steps ({steps})")
        samples = latent_image["samples"]
        recorder = record_attention(model, positive, negative, samples, seed, steps, at_step, cfg)
        maps = block_maps(recorder.strength, family_of_comfy_model(model.model.diffusion_model), *samples.shape[-2:])
        return as_images(maps, scale=8)


class IPAdapterKitSimple(InterfaceNode):
    DESCRIPTION = "The common path in one node: model + reference image + λ."
    CATEGORY = CATEGORY
    FUNCTION = "apply"

    def apply(self, model, image, weight, ipadapter_file, clip_name):
        embeds = encode_images(load_encoder_file(clip_name), image, "crop")
        return (patch_model(model, load_adapter_file(ipadapter_file), embeds, weight),)


class IPAdapterKitSaveEmbeds(InterfaceNode):
    DESCRIPTION = "Saves image-prompt embeddings as .safetensors in output/ipadapter_embeds."
    CATEGORY = f"{CATEGORY}/embeds"
    FUNCTION = "save"
    OUTPUT_NODE = True

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


class IPAdapterKitLoadEmbeds(InterfaceNode):
    DESCRIPTION = "Loads image-prompt embeddings saved by Save Embeds (from input/ or output/ipadapter_embeds)."
    CATEGORY = f"{CATEGORY}/embeds"
    FUNCTION = "load"

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
    "IPAdapterKitUnifiedLoaderFaceID": IPAdapterKitUnifiedLoaderFaceID,
    "IPAdapterKitFaceAnalysisLoader": IPAdapterKitFaceAnalysisLoader,
    "IPAdapterKitEncodeFace": IPAdapterKitEncodeFace,
    "IPAdapterKitEncoderLoader": IPAdapterKitEncoderLoader,
    "IPAdapterKitEncoderFromCLIPVision": IPAdapterKitEncoderFromCLIPVision,
    "IPAdapterKitEncode": IPAdapterKitEncode,
    "IPAdapterKitCombineEmbeds": IPAdapterKitCombineEmbeds,
    "IPAdapterKitFrameWeights": IPAdapterKitFrameWeights,
    "IPAdapterKitPrepImage": IPAdapterKitPrepImage,
    "IPAdapterKitNoise": IPAdapterKitNoise,
    "IPAdapterKitEncodeTiled": IPAdapterKitEncodeTiled,
    "IPAdapterKitRegion": IPAdapterKitRegion,
    "IPAdapterKitApplySimple": IPAdapterKitApplySimple,
    "IPAdapterKitApply": IPAdapterKitApply,
    "IPAdapterKitAttentionMap": IPAdapterKitAttentionMap,
    "IPAdapterKitSimple": IPAdapterKitSimple,
    "IPAdapterKitSaveEmbeds": IPAdapterKitSaveEmbeds,
    "IPAdapterKitLoadEmbeds": IPAdapterKitLoadEmbeds,
    "IPAdapterKitModelCheck": IPAdapterKitModelCheck,
}

NODE_DISPLAY_NAME_MAPPINGS = {node_id: NODES[node_id].title for node_id in NODE_CLASS_MAPPINGS}
