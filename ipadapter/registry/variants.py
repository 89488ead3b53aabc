"""The adapter variants, one table for the checkpoint reader, the trainer and the unified loader.

The tensors tell the projections apart (``Variant.projection``); light is a base adapter
and plus-face a plus one, told apart only by their names, and so is faceid-plusv2 from faceid-plus.

The FaceID adapters take InsightFace's ArcFace identity embedding of a face (``face_input``): faceid through an MLP
to 4 tokens, with a LoRA on every attention processor of the UNet; faceid-plus / plusv2 refine those tokens with a
perceiver over the CLIP penultimate hidden states of the aligned face crop (v2: id tokens + s x its output);
faceid-portrait makes 16 tokens per face, several faces side by side, without a LoRA; faceid-portrait-unnorm reads
the unnormalised embedding with the plus Resampler.
"""
from __future__ import annotations

from .schema import Variant

PLUS_RESAMPLER = dict(depth=4, dim_head=64, ff_mult=4)  # heads of 64: the head count follows the family's width
FACEID_PERCEIVER = dict(depth=4, dim_head=64, ff_mult=4)  # faceid-plus: as wide as the image tokens
ARCFACE_WIDTH = 512  # InsightFace's ArcFace identity embedding (buffalo_l's w600k_r50, antelopev2's glintr100)
# the aligned face crop the image encoder sees (cubiq's norm_crop image_size; CLIP resizes it to its own 224)
FACE_CROP_SIZES = {"sd15": 224, "sdxl": 256}
FACEID = dict(trainable=False, face_width=ARCFACE_WIDTH, face_crop_sizes=FACE_CROP_SIZES)

VARIANTS: tuple[Variant, ...] = (
    Variant("base", "base", "image_embeds", 4, "ip-adapter",
            description="the pooled image embedding -> Linear + LayerNorm -> 4 tokens"),
    Variant("light", "base", "image_embeds", 4, "ip-adapter", "_light", trainable=False,
            description="a base adapter trained to weigh the text prompt more"),
    Variant("plus", "plus", "penultimate", 16, "ip-adapter-plus", resampler=PLUS_RESAMPLER,
            description="the encoder's penultimate hidden states -> Resampler -> 16 tokens"),
    Variant("plus-face", "plus", "penultimate", 16, "ip-adapter-plus-face", resampler=PLUS_RESAMPLER,
            description="the plus architecture trained on face crops"),
    Variant("full-face", "full-face", "penultimate", None, "ip-adapter-full-face",
            description="the penultimate hidden states -> MLP -> one token per hidden state"),
    # FaceID (InsightFace face embeddings); projection kinds: "faceid" an MLP + LayerNorm of the face embedding (with
    # the LoRA), "faceid-portrait" the same of 16 tokens (no LoRA), "faceid-plus" faceid's tokens refined by a
    # perceiver over CLIP hidden states, "faceid-resampler" the plus Resampler over the face embedding
    Variant("faceid", "faceid", "face_embeds", 4, "ip-adapter-faceid", face_input="normed", lora=True, **FACEID,
            description="the face embedding -> MLP + LayerNorm -> 4 tokens, and a LoRA on every attention processor"),
    Variant("faceid-plus", "faceid-plus", "penultimate", 4, "ip-adapter-faceid-plus", resampler=FACEID_PERCEIVER,
            face_input="normed", lora=True, **FACEID,
            description="faceid's 4 tokens refined by a perceiver over the CLIP penultimate hidden states of the "
                        "aligned face crop, and a LoRA"),
    Variant("faceid-plusv2", "faceid-plus", "penultimate", 4, "ip-adapter-faceid-plusv2", resampler=FACEID_PERCEIVER,
            face_input="normed", lora=True, shortcut=True, name_word="plusv2", **FACEID,
            description="faceid-plus whose tokens are the id tokens + s x the perceiver's (s set when applied)"),
    Variant("faceid-portrait", "faceid-portrait", "face_embeds", 16, "ip-adapter-faceid-portrait", face_input="normed",
            **FACEID, description="the face embedding -> MLP -> 16 tokens per face, several faces side by side; "
                                  "no LoRA"),
    Variant("faceid-portrait-unnorm", "faceid-resampler", "face_embeds", 16, "ip-adapter-faceid-portrait", "_unnorm",
            resampler=PLUS_RESAMPLER, face_input="raw", **FACEID,
            description="the unnormalised face embedding -> Resampler -> 16 tokens; no LoRA"),
    # DiT adapters: the projection kinds name their layouts; the token counts are read from the tensors
    Variant("xlabs", "base", "image_embeds", None, "ip_adapter", trainable=False, families=("flux",),
            layers="double blocks", layer_tensors=("to_k_ip.weight", "to_k_ip.bias", "to_v_ip.weight", "to_v_ip.bias"),
            description="XLabs: CLIP ViT-L/14 image_embeds -> Linear + LayerNorm -> 4 (v1) or 16 (v2) tokens, "
                        "on the double blocks"),
    # InstantX Flux's MLP: a hidden layer twice the encoder's width (SigLIP's 1152 -> 2304), as the released file
    Variant("instantx", "mlp", "image_embeds", 128, "ip-adapter", trainable=False, families=("flux",),
            resampler=dict(hidden_mult=2),
            description="InstantX: SigLIP pooled output -> MLP + LayerNorm -> 128 tokens, on every block"),
    Variant("instantx", "time-resampler", "penultimate", 64, "ip-adapter", trainable=False, families=("sd35",),
            resampler=dict(depth=4, dim_head=64, ff_mult=4),
            layer_tensors=("norm_ip.linear.weight", "norm_ip.linear.bias", "to_k_ip.weight", "to_v_ip.weight",
                           "norm_q.weight", "norm_k.weight", "norm_ip_k.weight"),
            description="InstantX: SigLIP penultimate hidden states -> timestep-conditioned Resampler -> 64 tokens"),
)

# The unified loader's presets: the variant and the image encoder of each.
PRESETS: dict[str, tuple[str, str]] = {
    "light": ("light", "vit-h"),
    "standard": ("base", "vit-h"),
    "vit-bigg": ("base", "vit-bigg"),
    "plus": ("plus", "vit-h"),
    "plus-face": ("plus-face", "vit-h"),
    "full-face": ("full-face", "vit-h"),
    "flux-xlabs": ("xlabs", "clip-l"),
    "flux-instantx": ("instantx", "siglip"),
    "sd35-instantx": ("instantx", "siglip"),
    # cubiq's FaceID presets (FACEID, FACEID PLUS, FACEID PLUS V2, FACEID PORTRAIT, FACEID PORTRAIT UNNORM): the
    # encoder is the one the plus adapters show the face crop to (cubiq's FaceID loader loads it for all)
    "faceid": ("faceid", "vit-h"),
    "faceid-plus": ("faceid-plus", "vit-h"),
    "faceid-plusv2": ("faceid-plusv2", "vit-h"),
    "faceid-portrait": ("faceid-portrait", "vit-h"),
    "faceid-portrait-unnorm": ("faceid-portrait-unnorm", "vit-h"),
}
