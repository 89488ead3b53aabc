"""The node definitions that the migrator (``rules.py``) reads and writes, as data.

Three tables of ``node id -> NodeSpec``: cubiq's ComfyUI_IPAdapter_plus (every node of
its ``NODE_CLASS_MAPPINGS``, inputs as its ``INPUT_TYPES`` declares them), this pack's
nodes (their one definition, ``comfyui_glue/interface.py``), and the ComfyUI nodes the
migrator adds (Conditioning (Set Mask), EmptyImage). The editor stores a node's widget values by
position, so the order of the inputs here is the widget order. ``tests/test_migrate.py``
holds the tables to the live definitions: ours and ComfyUI's to ``/object_info`` of a
ComfyUI with this pack, cubiq's to its ``INPUT_TYPES`` where a copy of that pack is at hand
(``CUBIQ_PATH``). Plain data, so the migrator needs neither torch nor ComfyUI.
"""
from __future__ import annotations

from comfyui_glue.interface import NODES
from comfyui_glue.node_spec import FILES, Input, NodeSpec, combo, num, opt, sock, spec, text
from ipadapter.choices import EMBEDS_SCALING as SCALING, WEIGHT_TYPES  # cubiq's names too: ours took them, in order

# -- cubiq's ComfyUI_IPAdapter_plus ---------------------------------------------------------

CUBIQ_COMBINE = ("concat", "add", "subtract", "average", "norm average")
CUBIQ_PRESETS = ("LIGHT - SD1.5 only (low strength)", "STANDARD (medium strength)", "VIT-G (medium strength)",
                 "PLUS (high strength)", "PLUS FACE (portraits)", "FULL FACE - SD1.5 only (portraits stronger)")
FACEID_PRESETS = ("FACEID", "FACEID PLUS - SD1.5 only", "FACEID PLUS V2", "FACEID PORTRAIT (style transfer)",
                  "FACEID PORTRAIT UNNORM - SDXL only (strong)")

MODEL_IPA = [sock("model", "MODEL"), sock("ipadapter", "IPADAPTER")]
IMAGE = sock("image", "IMAGE")
WTYPE = combo("weight_type", WEIGHT_TYPES)
COMBINE_EMBEDS = combo("combine_embeds", CUBIQ_COMBINE)
WINDOW = [num("FLOAT", "start_at", 0.0, 0.0, 1.0), num("FLOAT", "end_at", 1.0, 0.0, 1.0)]
EMBEDS_SCALING = combo("embeds_scaling", SCALING)
BATCH_SIZE = num("INT", "encode_batch_size", 0, 0, 4096)
NEG_MASK_CV = opt(sock("image_negative", "IMAGE"), sock("attn_mask", "MASK"), sock("clip_vision", "CLIP_VISION"))
INSIGHTFACE = opt(sock("insightface", "INSIGHTFACE"))


def weight(high, name="weight"):
    return num("FLOAT", name, 1.0, -1, high)


ADVANCED = [*MODEL_IPA, IMAGE, weight(5), WTYPE, COMBINE_EMBEDS, *WINDOW, EMBEDS_SCALING, *NEG_MASK_CV]
FACEID = [*MODEL_IPA, IMAGE, weight(3), weight(5.0, "weight_faceidv2"), WTYPE, COMBINE_EMBEDS, *WINDOW,
          EMBEDS_SCALING, *NEG_MASK_CV, *INSIGHTFACE]
STYLE_COMPOSITION = [*MODEL_IPA, sock("image_style", "IMAGE"), sock("image_composition", "IMAGE"),
                     weight(5, "weight_style"), weight(5, "weight_composition"), Input("expand_style", "BOOLEAN", False),
                     combo("combine_embeds", CUBIQ_COMBINE, "average"), *WINDOW, EMBEDS_SCALING, *NEG_MASK_CV]
EMBEDS = [*MODEL_IPA, sock("pos_embed", "EMBEDS"), weight(3), WTYPE, *WINDOW, EMBEDS_SCALING,
          *opt(sock("neg_embed", "EMBEDS"), sock("attn_mask", "MASK"), sock("clip_vision", "CLIP_VISION"))]


def precise(boost, default):
    return [*MODEL_IPA, IMAGE, weight(5), num("FLOAT", boost, default, -5, 5), COMBINE_EMBEDS, *WINDOW,
            EMBEDS_SCALING, *NEG_MASK_CV]


WEIGHTS_OUT = [("weights", "FLOAT"), ("weights_invert", "FLOAT"), ("total_frames", "INT"), ("image_1", "IMAGE"),
               ("image_2", "IMAGE"), ("weights_strategy", "WEIGHTS_STRATEGY")]
UNIFIED_OUT = [("model", "MODEL"), ("ipadapter", "IPADAPTER")]

CUBIQ: dict[str, NodeSpec] = {
    "IPAdapter": spec([*MODEL_IPA, IMAGE, weight(3), *WINDOW,
                       combo("weight_type", ("standard", "prompt is more important", "style transfer")),
                       *opt(sock("attn_mask", "MASK"))], ["MODEL"]),
    "IPAdapterAdvanced": spec(ADVANCED, ["MODEL"]),
    "IPAdapterBatch": spec([*MODEL_IPA, IMAGE, weight(5), WTYPE, *WINDOW, EMBEDS_SCALING, BATCH_SIZE, *NEG_MASK_CV],
                           ["MODEL"]),
    "IPAdapterFaceID": spec(FACEID, ["MODEL", ("face_image", "IMAGE")]),
    "IPAdapterFaceIDKolors": spec([*FACEID[:5], weight(5.0, "weight_kolors"), *FACEID[5:]],
                                  ["MODEL", ("face_image", "IMAGE")]),
    "IPAAdapterFaceIDBatch": spec(FACEID, ["MODEL", ("face_image", "IMAGE")]),
    "IPAdapterTiled": spec([*MODEL_IPA, IMAGE, weight(3), WTYPE, COMBINE_EMBEDS, *WINDOW,
                            num("FLOAT", "sharpening", 0.0, 0.0, 1.0), EMBEDS_SCALING, *NEG_MASK_CV],
                           ["MODEL", ("tiles", "IMAGE"), ("masks", "MASK")]),
    "IPAdapterTiledBatch": spec([*MODEL_IPA, IMAGE, weight(3), WTYPE, *WINDOW, num("FLOAT", "sharpening", 0.0, 0.0, 1.0),
                                 EMBEDS_SCALING, BATCH_SIZE, *NEG_MASK_CV],
                                ["MODEL", ("tiles", "IMAGE"), ("masks", "MASK")]),
    "IPAdapterEmbeds": spec(EMBEDS, ["MODEL"]),
    "IPAdapterEmbedsBatch": spec(EMBEDS, ["MODEL"]),
    "IPAdapterStyleComposition": spec(STYLE_COMPOSITION, ["MODEL"]),
    "IPAdapterStyleCompositionBatch": spec([i for i in STYLE_COMPOSITION if i.name != "combine_embeds"], ["MODEL"]),
    "IPAdapterMS": spec([*MODEL_IPA, IMAGE, weight(5), *FACEID[4:10], Input("layer_weights", "STRING", ""), *FACEID[10:]],
                        ["MODEL"]),
    "IPAdapterClipVisionEnhancer": spec([*ADVANCED[:9], num("INT", "enhance_tiles", 2, 1, 16),
                                         num("FLOAT", "enhance_ratio", 1.0, 0.0, 1.0), *NEG_MASK_CV], ["MODEL"]),
    "IPAdapterClipVisionEnhancerBatch": spec([*MODEL_IPA, IMAGE, weight(5), WTYPE, *WINDOW, EMBEDS_SCALING,
                                              num("INT", "enhance_tiles", 2, 1, 16),
                                              num("FLOAT", "enhance_ratio", 0.5, 0.0, 1.0), BATCH_SIZE, *NEG_MASK_CV],
                                             ["MODEL"]),
    "IPAdapterFromParams": spec([*MODEL_IPA, sock("ipadapter_params", "IPADAPTER_PARAMS"), COMBINE_EMBEDS,
                                 EMBEDS_SCALING, *opt(sock("image_negative", "IMAGE"), sock("clip_vision", "CLIP_VISION"))],
                                ["MODEL"]),
    "IPAdapterPreciseStyleTransfer": spec(precise("style_boost", 1.0), ["MODEL"]),
    "IPAdapterPreciseStyleTransferBatch": spec(precise("style_boost", 1.0), ["MODEL"]),
    "IPAdapterPreciseComposition": spec(precise("composition_boost", 0.0), ["MODEL"]),
    "IPAdapterPreciseCompositionBatch": spec(precise("composition_boost", 0.0), ["MODEL"]),
    "IPAdapterUnifiedLoader": spec([sock("model", "MODEL"), combo("preset", CUBIQ_PRESETS),
                                    *opt(sock("ipadapter", "IPADAPTER"))], UNIFIED_OUT),
    "IPAdapterUnifiedLoaderFaceID": spec([sock("model", "MODEL"), combo("preset", FACEID_PRESETS),
                                          num("FLOAT", "lora_strength", 0.6, 0, 1),
                                          combo("provider", ("CPU", "CUDA", "ROCM", "DirectML", "OpenVINO", "CoreML")),
                                          *opt(sock("ipadapter", "IPADAPTER"))],
                                         [("MODEL", "MODEL"), ("ipadapter", "IPADAPTER")]),
    "IPAdapterModelLoader": spec([combo("ipadapter_file", FILES)], ["IPADAPTER"]),
    "IPAdapterInsightFaceLoader": spec([combo("provider", ("CPU", "CUDA", "ROCM")),
                                        combo("model_name", ("buffalo_l", "antelopev2"))], ["INSIGHTFACE"]),
    "IPAdapterUnifiedLoaderCommunity": spec([sock("model", "MODEL"), combo("preset", ("Composition", "Kolors")),
                                             *opt(sock("ipadapter", "IPADAPTER"))], UNIFIED_OUT),
    "IPAdapterEncoder": spec([sock("ipadapter", "IPADAPTER"), IMAGE, num("FLOAT", "weight", 1.0, -1.0, 3.0),
                              *opt(sock("mask", "MASK"), sock("clip_vision", "CLIP_VISION"))],
                             [("pos_embed", "EMBEDS"), ("neg_embed", "EMBEDS")]),
    "IPAdapterCombineEmbeds": spec([sock("embed1", "EMBEDS"), combo("method", (*CUBIQ_COMBINE, "max", "min")),
                                    *opt(*(sock(f"embed{i}", "EMBEDS") for i in range(2, 6)))], ["EMBEDS"]),
    "IPAdapterNoise": spec([combo("type", ("fade", "dissolve", "gaussian", "shuffle")),
                            num("FLOAT", "strength", 1.0, 0, 1), num("INT", "blur", 0, 0, 32),
                            *opt(sock("image_optional", "IMAGE"))], ["IMAGE"]),
    "PrepImageForClipVision": spec([IMAGE, combo("interpolation", ("LANCZOS", "BICUBIC", "HAMMING", "BILINEAR", "BOX", "NEAREST")),
                                    combo("crop_position", ("top", "bottom", "left", "right", "center", "pad")),
                                    num("FLOAT", "sharpening", 0.0, 0, 1)], ["IMAGE"]),
    "IPAdapterSaveEmbeds": spec([sock("embeds", "EMBEDS"), text("filename_prefix", "IP_embeds")], []),
    "IPAdapterLoadEmbeds": spec([combo("embeds", FILES)], ["EMBEDS"]),
    "IPAdapterWeights": spec([text("weights", "1.0, 0.0"),
                              combo("timing", ("custom", "linear", "ease_in_out", "ease_in", "ease_out", "random"), "linear"),
                              num("INT", "frames", 0, 0, 9999), num("INT", "start_frame", 0, 0, 9999),
                              num("INT", "end_frame", 9999, 0, 9999), num("INT", "add_starting_frames", 0, 0, 9999),
                              num("INT", "add_ending_frames", 0, 0, 9999),
                              combo("method", ("full batch", "shift batches", "alternate batches"), "full batch"),
                              *opt(IMAGE)], WEIGHTS_OUT),
    "IPAdapterCombineWeights": spec([num("FLOAT", "weights_1", 0.0, 0.0, 1.0), num("FLOAT", "weights_2", 0.0, 0.0, 1.0)],
                                    [("weights", "FLOAT"), ("count", "INT")]),
    "IPAdapterWeightsFromStrategy": spec([sock("weights_strategy", "WEIGHTS_STRATEGY"), *opt(IMAGE)], WEIGHTS_OUT),
    "IPAdapterPromptScheduleFromWeightsStrategy": spec([sock("weights_strategy", "WEIGHTS_STRATEGY"), text("prompt", "")],
                                                       [("prompt_schedule", "STRING")]),
    "IPAdapterRegionalConditioning": spec([IMAGE, num("FLOAT", "image_weight", 1.0, -1.0, 3.0),
                                           num("FLOAT", "prompt_weight", 1.0, 0.0, 10.0), WTYPE, *WINDOW,
                                           *opt(sock("mask", "MASK"), sock("positive", "CONDITIONING"),
                                                sock("negative", "CONDITIONING"))],
                                          [("IPADAPTER_PARAMS", "IPADAPTER_PARAMS"), ("POSITIVE", "CONDITIONING"),
                                           ("NEGATIVE", "CONDITIONING")]),
    "IPAdapterCombineParams": spec([sock("params_1", "IPADAPTER_PARAMS"), sock("params_2", "IPADAPTER_PARAMS"),
                                    *opt(*(sock(f"params_{i}", "IPADAPTER_PARAMS") for i in range(3, 6)))],
                                   ["IPADAPTER_PARAMS"]),
}
# Output types that only cubiq's nodes make or take: a node of that pack left in place needs them from that pack.
CUBIQ_TYPES = {"IPADAPTER", "EMBEDS", "IPADAPTER_PARAMS", "INSIGHTFACE", "WEIGHTS_STRATEGY"}

# -- this pack: its nodes' one definition -------------------------------------------------------

OURS: dict[str, NodeSpec] = NODES

# ComfyUI's own nodes that a migrated graph can gain: cubiq's regional texts are Conditioning (Set Mask)'s job;
# EmptyImage makes the black negative image cubiq's nodes give plus adapters (the faithful mode).
MAX_RESOLUTION = 16384  # ComfyUI's nodes.MAX_RESOLUTION
COMFY: dict[str, NodeSpec] = {
    "ConditioningSetMask": spec([sock("conditioning", "CONDITIONING"), sock("mask", "MASK"),
                                 num("FLOAT", "strength", 1.0, 0.0, 10.0),
                                 combo("set_cond_area", ("default", "mask bounds"))],
                                ["CONDITIONING"], "Conditioning (Set Mask)"),
    "EmptyImage": spec([num("INT", "width", 512, 1, MAX_RESOLUTION), num("INT", "height", 512, 1, MAX_RESOLUTION),
                        num("INT", "batch_size", 1, 1, 4096), num("INT", "color", 0, 0, 0xFFFFFF)],
                       ["IMAGE"], "EmptyImage"),
}
