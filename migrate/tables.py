"""The node definitions that the migrator (``rules.py``) reads and writes, as data.

Three tables of ``node id -> NodeSpec``: cubiq's ComfyUI_IPAdapter_plus (every node of
its ``NODE_CLASS_MAPPINGS``, inputs as its ``INPUT_TYPES`` declares them), this pack's
nodes, and the one ComfyUI node the migrator adds (Conditioning (Set Mask)). The
editor stores a node's widget values by position, so the order of the inputs here is
the widget order. ``tests/test_migrate.py`` holds the tables to the live definitions:
ours and ComfyUI's to ``/object_info`` of a ComfyUI with this pack, cubiq's to its
``INPUT_TYPES`` where a copy of that pack is at hand (``CUBIQ_PATH``). Plain data, so
the migrator needs neither torch nor ComfyUI.
"""
from __future__ import annotations

from dataclasses import dataclass

FILES = "FILES"  # a combo whose choices are the files of a model folder (they differ per installation)
WIDGET_KINDS = {"INT", "FLOAT", "STRING", "BOOLEAN"}
SEED_NAMES = {"seed", "noise_seed"}  # the editor adds a "control after generate" widget after these


@dataclass(frozen=True)
class Input:
    name: str
    kind: object  # a socket or widget type, the choices of a combo (a tuple), or FILES
    default: object = None  # as declared; None where the definition declares none
    low: float | None = None
    high: float | None = None
    optional: bool = False

    @property
    def is_widget(self) -> bool:
        return isinstance(self.kind, tuple) or self.kind in WIDGET_KINDS or self.kind == FILES

    @property
    def socket_type(self) -> str:
        """The type of the input's socket (a widget turned into a socket: its type, COMBO for a list)."""
        return "COMBO" if isinstance(self.kind, tuple) or self.kind == FILES else self.kind

    @property
    def initial(self):
        """The value a new node starts with."""
        if self.default is not None:
            return self.default
        return self.kind[0] if isinstance(self.kind, tuple) and self.kind else None


@dataclass(frozen=True)
class NodeSpec:
    inputs: tuple[Input, ...]
    outputs: tuple[tuple[str, str], ...]  # (name, type) per output slot
    title: str = ""

    def input(self, name: str) -> Input | None:
        return next((i for i in self.inputs if i.name == name), None)

    def widgets(self) -> list[str]:
        """``widgets_values`` order: widget inputs, each seed followed by its "control after generate"."""
        names = []
        for item in sorted(self.inputs, key=lambda i: i.optional):  # required first, each group in order
            if item.is_widget:
                names.append(item.name)
                if item.kind == "INT" and item.name in SEED_NAMES:
                    names.append("control_after_generate")
        return names

    def sockets(self) -> list[Input]:
        return [i for i in sorted(self.inputs, key=lambda i: i.optional) if not i.is_widget]


def sock(name, kind, optional=False):
    return Input(name, kind, optional=optional)


def num(kind, name, default, low, high, optional=False):
    return Input(name, kind, default, low, high, optional)


def combo(name, choices, default=None, optional=False):
    return Input(name, tuple(choices) if choices != FILES else FILES, default, optional=optional)


def text(name, default, optional=False):
    return Input(name, "STRING", default, optional=optional)


def spec(inputs, outputs, title=""):
    return NodeSpec(tuple(inputs), tuple((o, o) if isinstance(o, str) else o for o in outputs), title)


def opt(*inputs):
    return [Input(i.name, i.kind, i.default, i.low, i.high, True) for i in inputs]


# -- cubiq's ComfyUI_IPAdapter_plus ---------------------------------------------------------

WEIGHT_TYPES = ("linear", "ease in", "ease out", "ease in-out", "reverse in-out", "weak input", "weak output",
                "weak middle", "strong middle", "style transfer", "composition", "strong style transfer",
                "style and composition", "style transfer precise", "composition precise")
SCALING = ("V only", "K+V", "K+V w/ C penalty", "K+mean(V) w/ C penalty")
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

# -- this pack --------------------------------------------------------------------------------

ADAPTER, ENCODER, KIT_EMBEDS, REGIONS = "IPADAPTER_KIT", "IPADAPTER_KIT_ENCODER", "IPADAPTER_KIT_EMBEDS", "IPADAPTER_KIT_REGIONS"
OUR_COMBINE = ("average", "concat", "add", "subtract", "norm average")
PRESETS = ("light", "standard", "vit-bigg", "plus", "plus-face", "full-face")
OUR_WEIGHT = num("FLOAT", "weight", 1.0, -1.0, 3.0)
OUR_WINDOW = [num("FLOAT", "start_at", 0.0, 0.0, 1.0), num("FLOAT", "end_at", 1.0, 0.0, 1.0)]
OUR_WTYPE = combo("weight_type", WEIGHT_TYPES, "linear")

OURS: dict[str, NodeSpec] = {
    "IPAdapterKitLoader": spec([combo("ipadapter_file", FILES)], [("ipadapter", ADAPTER)], "Load IP-Adapter"),
    "IPAdapterKitUnifiedLoader": spec([sock("model", "MODEL"), combo("preset", PRESETS, "standard")],
                                      [("model", "MODEL"), ("ipadapter", ADAPTER), ("image_encoder", ENCODER)],
                                      "IP-Adapter Unified Loader"),
    "IPAdapterKitEncoderLoader": spec([combo("clip_name", FILES)], [("image_encoder", ENCODER)],
                                      "Load IP-Adapter Image Encoder"),
    "IPAdapterKitEncoderFromCLIPVision": spec([sock("clip_vision", "CLIP_VISION")], [("image_encoder", ENCODER)],
                                              "IP-Adapter Encoder from CLIP Vision"),
    "IPAdapterKitEncode": spec([sock("image_encoder", ENCODER), IMAGE, combo("crop", ("crop", "pad", "stretch"), "crop"),
                                *opt(sock("negative_image", "IMAGE"), OUR_WEIGHT, text("image_weights", ""),
                                     num("INT", "detail_tiles", 1, 1, 4), num("FLOAT", "detail_ratio", 0.5, 0.0, 1.0))],
                               [("embeds", KIT_EMBEDS)], "IP-Adapter Encode Image"),
    "IPAdapterKitCombineEmbeds": spec([sock("embeds_1", KIT_EMBEDS), combo("method", OUR_COMBINE, "concat"),
                                       *opt(*(sock(f"embeds_{i}", KIT_EMBEDS) for i in range(2, 6)))],
                                      [("embeds", KIT_EMBEDS)], "Combine IP-Adapter Embeds"),
    "IPAdapterKitFrameWeights": spec([combo("timing", ("linear", "ease in", "ease out", "ease in-out"), "linear"),
                                      num("INT", "frames", 16, 1, 9999), num("FLOAT", "start", 1.0, -1.0, 3.0),
                                      num("FLOAT", "end", 0.0, -1.0, 3.0)], [("frame_weights", "STRING")],
                                     "IP-Adapter Frame Weights"),
    "IPAdapterKitPrepImage": spec([IMAGE, combo("interpolation", ("LANCZOS", "BICUBIC", "HAMMING", "BILINEAR", "BOX", "NEAREST"), "LANCZOS"),
                                   combo("crop_position", ("center", "top", "bottom", "left", "right", "pad"), "center"),
                                   num("FLOAT", "sharpening", 0.0, 0.0, 1.0)], [("image", "IMAGE")],
                                  "Prepare Image for IP-Adapter"),
    "IPAdapterKitNoise": spec([combo("type", ("fade", "dissolve", "gaussian", "shuffle"), "fade"),
                               num("FLOAT", "strength", 1.0, 0.0, 1.0), num("INT", "blur", 0, 0, 32),
                               num("INT", "seed", 0, 0, 2**31 - 1), *opt(IMAGE)], [("noise", "IMAGE")],
                              "IP-Adapter Noise (negative image)"),
    "IPAdapterKitEncodeTiled": spec([sock("image_encoder", ENCODER), IMAGE, *opt(sock("negative_image", "IMAGE"))],
                                    [("embeds", KIT_EMBEDS), ("tile_masks", "MASK")], "IP-Adapter Encode Tiled"),
    "IPAdapterKitRegion": spec([sock("embeds", KIT_EMBEDS), OUR_WEIGHT, OUR_WTYPE, *OUR_WINDOW,
                                num("FLOAT", "prompt_strength", 1.0, 0.0, 10.0),
                                *opt(sock("mask", "MASK"), sock("positive", "CONDITIONING"),
                                     sock("negative", "CONDITIONING"), sock("regions", REGIONS))],
                               [("regions", REGIONS), ("positive", "CONDITIONING"), ("negative", "CONDITIONING")],
                               "IP-Adapter Region"),
    "IPAdapterKitApply": spec([sock("model", "MODEL"), sock("ipadapter", ADAPTER), OUR_WEIGHT, *OUR_WINDOW,
                               combo("combine", OUR_COMBINE, "average"),
                               combo("layers", ("all", "style", "composition", "custom"), "all"),
                               text("custom_layer_weights", ""),
                               *opt(sock("embeds", KIT_EMBEDS), IMAGE, sock("image_encoder", ENCODER),
                                    sock("attn_mask", "MASK"), OUR_WTYPE, combo("embeds_scaling", SCALING, "V only"),
                                    num("FLOAT", "composition_weight", 1.0, -1.0, 5.0),
                                    combo("batch_mode", ("all latents", "one per latent"), "all latents"),
                                    sock("regions", REGIONS), text("frame_weights", ""))],
                              ["MODEL"], "Apply IP-Adapter"),
    "IPAdapterKitAttentionMap": spec([sock("model", "MODEL"), sock("positive", "CONDITIONING"),
                                      sock("negative", "CONDITIONING"), sock("latent_image", "LATENT"),
                                      num("INT", "seed", 0, 0, 0xFFFFFFFFFFFFFFFF), num("INT", "steps", 20, 1, 1000),
                                      num("INT", "at_step", 0, 0, 999), num("FLOAT", "cfg", 7.0, 0.0, 100.0)],
                                     [("heat_maps", "IMAGE"), ("average", "MASK")], "IP-Adapter Attention Map"),
    "IPAdapterKitSimple": spec([sock("model", "MODEL"), IMAGE, OUR_WEIGHT, combo("ipadapter_file", FILES),
                                combo("clip_name", FILES)], ["MODEL"], "IP-Adapter (simple)"),
    "IPAdapterKitSaveEmbeds": spec([sock("embeds", KIT_EMBEDS), text("filename_prefix", "ipadapter_embeds")], [],
                                   "Save IP-Adapter Embeds"),
    "IPAdapterKitLoadEmbeds": spec([combo("embeds_file", FILES)], [("embeds", KIT_EMBEDS)], "Load IP-Adapter Embeds"),
}

# ComfyUI's own nodes that a migrated graph can gain (cubiq's regional texts are this node's job).
COMFY: dict[str, NodeSpec] = {
    "ConditioningSetMask": spec([sock("conditioning", "CONDITIONING"), sock("mask", "MASK"),
                                 num("FLOAT", "strength", 1.0, 0.0, 10.0),
                                 combo("set_cond_area", ("default", "mask bounds"))],
                                ["CONDITIONING"], "Conditioning (Set Mask)"),
}
