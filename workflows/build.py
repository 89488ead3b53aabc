"""Write the UI-format workflows of this folder (and their API twins) from the short descriptions below.

One node set serves SD1.5, SDXL, Flux.1 and SD3.5 Large; a workflow's family only
sets the files it loads (base model, adapter), the image size and the sampling
(:data:`SD15`, :data:`SDXL`, :data:`FLUX`, :data:`SD35`). The DiT workflows load their
base models with the nodes ComfyUI's own examples use for them (:func:`flux_base`,
:func:`sd35_base`).

The JSON files are what users load; this script is how they were made, so a
change to a workflow is a change here, then::

    python workflows/build.py

It starts a ComfyUI with this pack (``devtools/comfyui_harness.py``; the pinned
one, or ``$COMFYUI_PATH``), reads the live node definitions, lays out each
graph in the editor's format (``widgets_values`` in widget order, typed
sockets, links ``[id, from_node, from_slot, to_node, to_slot, type]``) and
writes ``workflows/*.json`` and ``workflows/api/*.api.json``. The tests check
the committed files, not this script.
"""
from __future__ import annotations

import json
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # devtools

from devtools.workflow_tools import (  # noqa: E402
    ADAPTER, CHECKPOINT, CLIP_G_TEXT, CLIP_L_ENCODER, CLIP_L_TEXT, ENCODER, FACE_PACK, FACEID_PLUSV2_ADAPTER,
    FACEID_PLUSV2_LORA, FLUX_MODEL, FLUX_VAE, INSTANTX_FLUX_ADAPTER, REFERENCE_IMAGES, SDXL_PORTRAIT_ADAPTER, REPO_ROOT, SD35_ADAPTER, SD35_CHECKPOINT, SDXL_ADAPTER, SDXL_CHECKPOINT, SDXL_PLUS_ADAPTER,
    SIGLIP_ENCODER, SOURCE_IMAGES, T5XXL_TEXT, TRAINED_ADAPTER, WORKFLOW_DIR, XLABS_ADAPTER, live_object_info,
    socket_inputs, widget_layout, write_api_twins,
)

PROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
# What current editors save on a node of a registry pack: which pack (the registry id) and version made it
PACK_PROPERTIES = {"cnr_id": PROJECT["name"], "ver": PROJECT["version"]}
REFERENCE, REFERENCE_B = REFERENCE_IMAGES
SOURCE, SOURCE_MASKED = SOURCE_IMAGES
SEED = 42


@dataclass(frozen=True)
class Family:
    """What a family's workflows load, at which size they draw, and how they sample."""

    checkpoint: str  # the base model's file: a checkpoint, or Flux's diffusion model
    adapter: str
    size: int  # width and height of the empty latent, in pixels
    sampling: dict  # the KSampler's widget values
    latent: str = "EmptyLatentImage"  # the node that makes the empty latent (Flux and SD3: 16 channels)


# The paper's sampling: DDIM, 50 steps, guidance 7.5.
SD15 = Family(CHECKPOINT, ADAPTER, 512,
              dict(seed=SEED, steps=50, cfg=7.5, sampler_name="ddim", scheduler="ddim_uniform", denoise=1.0))
# The IP-Adapter repository's SDXL examples: 30 steps with diffusers' SDXL defaults (Euler, guidance 5.0), 1024 px.
SDXL = Family(SDXL_CHECKPOINT, SDXL_ADAPTER, 1024,
              dict(seed=SEED, steps=30, cfg=5.0, sampler_name="euler", scheduler="normal", denoise=1.0))
# Flux.1 dev as ComfyUI's own examples run it (comfyanonymous/ComfyUI_examples, flux/flux_dev_example.png: Load
# Diffusion Model flux1-dev, DualCLIPLoader t5xxl_fp16 + clip_l type flux, Load VAE ae, FluxGuidance 3.5, Empty SD3
# Latent 1024 x 1024, euler, simple, 20 steps; flux/flux_dev_checkpoint_example.png: the same on a KSampler at CFG
# 1.0 with an empty negative prompt, which ComfyUI does not evaluate at CFG 1).
FLUX_GUIDANCE = 3.5
FLUX = Family(FLUX_MODEL, XLABS_ADAPTER, 1024,
              dict(seed=SEED, steps=20, cfg=1.0, sampler_name="euler", scheduler="simple", denoise=1.0),
              "EmptySD3LatentImage")
# SD3.5 Large as ComfyUI's own example loads it (ComfyUI_examples, sd3/sd3.5_text_encoders_example.png: Load
# Checkpoint sd3.5_large, whose file holds the model and the VAE but no text encoders, TripleCLIPLoader clip_l +
# clip_g + t5xxl_fp16, Empty SD3 Latent 1024 x 1024, euler, sgm_uniform; 20 steps at CFG 5.45 there). 28 steps as
# Stability AI's model card for SD3.5 Large samples, CFG 4.5 between its 3.5 and ComfyUI's examples (4.0, 5.45).
SD35 = Family(SD35_CHECKPOINT, SD35_ADAPTER, 1024,
              dict(seed=SEED, steps=28, cfg=4.5, sampler_name="euler", scheduler="sgm_uniform", denoise=1.0),
              "EmptySD3LatentImage")


# The layout: each node goes into a column and stacks below the nodes put there before it (or lower, level with
# another node); a column is as wide as its widest node, and every node of it gets that width. Sizes as the
# editor (frontend 1.32) needs them: no smaller than what it computes for the node, and wide enough that no widget's
# label runs into its value (tests/test_workflows_browser.py measures both in the editor; tests/test_workflows.py
# checks that no two nodes overlap).
TITLE_HEIGHT = 30  # LiteGraph.NODE_TITLE_HEIGHT: the title bar sits above a node's pos
GAP = 40  # between a node and the title bar of the one below it, and between columns
NODE_WIDTH = 320  # the narrowest column
CHAR_WIDTH = 6.5  # a character of the widgets' and slots' 12 px Arial, rounded up (measured: 5.1 to 6.1 px)
TITLE_CHAR_WIDTH = 8.0  # a character of the title's 14 px Arial, rounded up
# The editor's widget drawing (frontend 1.32, BaseWidget.drawTruncatingText): a number or combo keeps 85 px of its
# width for its margins and arrows, a one-line text 60 px; label and value are 5 px apart.
STEPPED_MARGINS, TEXT_MARGINS, LABEL_GAP = 85, 60, 5


def shown_value(widget, value) -> str:
    """About the text the editor shows for a widget value (floats with two decimals: the longest it shows here)."""
    if widget.kind == "FLOAT":
        return f"{value:.2f}"
    return str(value)


def needed_width(title: str, layout, values: list, inputs: list, outputs: list) -> int:
    """How wide a node must be for its title, its slot names, and each widget's label beside its value."""
    needs = [NODE_WIDTH, 40 + TITLE_CHAR_WIDTH * len(title)]
    for widget, value in zip(layout, values):
        if widget.extra == "upload":
            continue
        name = widget.name
        if widget.extra is None and widget.kind == "STRING":
            if widget.options.get("multiline"):
                continue
            margins = TEXT_MARGINS
        else:
            margins = STEPPED_MARGINS
        text = shown_value(widget, value) if widget.extra is None else str(value)
        needs.append(margins + CHAR_WIDTH * (len(name) + len(text)) + LABEL_GAP)
    longest = max((len(slot["name"]) for slot in inputs), default=0) + max((len(slot["name"]) for slot in outputs), default=0)
    needs.append(60 + CHAR_WIDTH * longest)
    return int(-(-max(needs) // 10) * 10)  # rounded up to 10 px


class Graph:
    def __init__(self, info: dict, family: Family):
        self.info = info
        self.family = family
        self.nodes: list[dict] = []
        self.links: list[list] = []
        self.places: dict[int, tuple[int, dict | None, int]] = {}  # node id -> (column, level with, width it needs)

    def node(self, kind: str, column: int, title: str | None = None, level: dict | None = None, box_width: int = 0,
             **values) -> dict:
        """A node of type ``kind`` in ``column``, below the nodes put there before it (and not above ``level``)."""
        definition = self.info[kind]
        layout = widget_layout(definition)
        widgets = []
        for widget in layout:
            if widget.extra == "control_after_generate":
                widgets.append("fixed")
            elif widget.extra == "upload":
                widgets.append("image")
            elif widget.name in values:
                widgets.append(values.pop(widget.name))
            else:
                default = widget.options.get("default")
                first = widget.choices[0] if widget.kind == "COMBO" and widget.choices else None
                widgets.append(default if default is not None else first)
        if values:
            raise KeyError(f"{kind} has no widgets {sorted(values)}")
        inputs = [{"name": name, "type": kind_, "link": None} for name, kind_ in socket_inputs(definition).items()]
        outputs = [{"name": definition["output_name"][i] or output, "type": output, "links": [], "slot_index": i}
                   for i, output in enumerate(definition["output"])]
        rows = max(len(inputs), len(outputs))
        multiline = sum(1 for w in layout if w.extra is None and w.kind == "STRING" and w.options.get("multiline"))
        height = 30 + 22 * rows + 26 * len(widgets) + 60 * multiline + (260 if kind == "LoadImage" else 0)
        shown_title = title or definition.get("display_name") or kind
        need = max(box_width, needed_width(shown_title, layout, widgets, inputs, outputs))
        node = {"id": len(self.nodes) + 1, "type": kind, "pos": [0, 0], "size": [need, height], "flags": {},
                "order": 0, "mode": 0, "inputs": inputs, "outputs": outputs,
                "properties": {"Node name for S&R": kind, **(PACK_PROPERTIES if kind.startswith("IPAdapterKit") else {})},
                "widgets_values": widgets}
        if title:
            node["title"] = title
        if not widgets:  # the editor saves no widgets_values for a node without widgets
            del node["widgets_values"]
        if not inputs:
            del node["inputs"]
        if not outputs:
            del node["outputs"]
        self.nodes.append(node)
        self.places[node["id"]] = (column, level, need)
        return node

    def note(self, column: int, text: str, height: int = 300) -> dict:
        node = {"id": len(self.nodes) + 1, "type": "Note", "pos": [0, 0], "size": [NODE_WIDTH, height], "flags": {},
                "order": 0, "mode": 0, "title": "About this workflow", "properties": {"text": ""},
                "widgets_values": [text], "color": "#432", "bgcolor": "#653"}
        self.nodes.append(node)
        self.places[node["id"]] = (column, None, NODE_WIDTH)
        return node

    def widget_socket(self, node: dict, name: str) -> None:
        """The editor's "convert widget to input": a socket for widget ``name``, whose value stays in widgets_values."""
        kind = next(w.spec[0] for w in widget_layout(self.info[node["type"]]) if w.name == name)
        node.setdefault("inputs", []).append({"name": name, "type": kind, "link": None, "widget": {"name": name}})
        node["size"][1] += 22

    def link(self, source: dict, output: str, target: dict, input_name: str) -> None:
        slot = next(i for i, o in enumerate(source["outputs"]) if o["name"] == output)
        target_slot = next(i for i, s in enumerate(target["inputs"]) if s["name"] == input_name)
        kind = source["outputs"][slot]["type"]
        if target["inputs"][target_slot]["type"] != kind:
            raise TypeError(f"{source['type']}.{output} ({kind}) -> {target['type']}.{input_name}")
        link_id = len(self.links) + 1
        self.links.append([link_id, source["id"], slot, target["id"], target_slot, kind])
        source["outputs"][slot]["links"].append(link_id)
        target["inputs"][target_slot]["link"] = link_id

    def lay_out(self) -> None:
        """Positions and widths from the columns: left to right, each node below the previous one of its column."""
        columns = sorted({column for column, _, _ in self.places.values()})
        widths = {c: max(need for column, _, need in self.places.values() if column == c) for c in columns}
        x, left = 0, {}
        for c in columns:
            left[c] = x
            x += widths[c] + GAP
        bottoms = {c: 0 for c in columns}  # where the next node's body may start
        for c in columns:
            for node in self.nodes:
                column, level, _ = self.places[node["id"]]
                if column != c:
                    continue
                if level is not None and self.places[level["id"]][0] > c:
                    raise ValueError(f"node {node['id']} is levelled with a node of a later column")
                y = max(bottoms[c], level["pos"][1] if level is not None else 0)
                node["pos"] = [left[c], y]
                node["size"][0] = widths[c]
                bottoms[c] = y + node["size"][1] + GAP + TITLE_HEIGHT

    def workflow(self) -> dict:
        self.lay_out()
        # execution order as the editor stores it: sources first
        order, placed = {}, set()
        while len(placed) < len(self.nodes):
            for node in self.nodes:
                if node["id"] in placed:
                    continue
                sources = {link[1] for link in self.links if link[3] == node["id"]}
                if sources <= placed:
                    order[node["id"]] = len(order)
                    placed.add(node["id"])
        for node in self.nodes:
            node["order"] = order[node["id"]]
            for output in node.get("outputs", []):
                if not output["links"]:
                    output["links"] = None
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": [], "config": {},
                "extra": {"ds": {"scale": 0.6, "offset": [40, 40]}}, "version": 0.4}


# -- pieces shared by the workflows -------------------------------------------------

# The columns, left to right: loaders (and the note); the prompts and the images; the encoders; the latent and the
# Apply nodes; the sampler, the decoder and the saved image. A workflow with more steps uses more columns.
LOADERS, INPUTS, ENCODERS, APPLY, SAMPLER = range(5)


def base(g: Graph, positive: str, negative: str = "", adapter_file: str | None = None):
    """Checkpoint, the two text prompts, the adapter, the encoder; returns them."""
    ckpt = g.node("CheckpointLoaderSimple", LOADERS, ckpt_name=g.family.checkpoint)
    pos, neg = prompts(g, positive, negative)
    g.link(ckpt, "CLIP", pos, "clip")
    g.link(ckpt, "CLIP", neg, "clip")
    adapter, encoder = adapter_loaders(g, adapter_file or g.family.adapter, ENCODER)
    return ckpt, pos, neg, adapter, encoder


def prompts(g: Graph, positive: str, negative: str, negative_title: str = "Negative prompt"):
    pos = g.node("CLIPTextEncode", INPUTS, title="Text prompt", text=positive, box_width=380)
    neg = g.node("CLIPTextEncode", INPUTS, title=negative_title, text=negative, box_width=380)
    return pos, neg


def adapter_loaders(g: Graph, adapter_file: str, encoder_file: str):
    adapter = g.node("IPAdapterKitLoader", LOADERS, ipadapter_file=adapter_file)
    encoder = g.node("IPAdapterKitEncoderLoader", LOADERS, clip_name=encoder_file)
    return adapter, encoder


def reference(g: Graph, name: str, encoder: dict, title: str = "Reference image", tiled: bool = False):
    """Load Image and its encoder node beside it: Encode Image (center crop), or Encode Tiled with ``tiled``."""
    image = g.node("LoadImage", INPUTS, title=title, image=name)
    encode = (g.node("IPAdapterKitEncodeTiled", ENCODERS, level=image) if tiled
              else g.node("IPAdapterKitEncode", ENCODERS, level=image, crop="crop"))
    g.link(encoder, "image_encoder", encode, "image_encoder")
    g.link(image, "IMAGE", encode, "image")
    return image, encode


def apply(g: Graph, model_source: tuple[dict, str], adapter: dict, embeds: dict | None, advanced: bool = False,
          column: int = APPLY, title: str | None = None, **values):
    """Apply IP-Adapter (the everyday node), or with ``advanced`` Apply IP-Adapter (Advanced)."""
    node = g.node("IPAdapterKitApply" if advanced else "IPAdapterKitApplySimple", column, title=title, **values)
    g.link(model_source[0], model_source[1], node, "model")
    g.link(adapter, "ipadapter", node, "ipadapter")
    if embeds is not None:
        g.link(embeds, "embeds", node, "embeds")
    return node


def sample_and_save(g: Graph, model: tuple[dict, str], pos: dict, neg: dict, latent: tuple[dict, str],
                    vae_source: dict, prefix: str, column: int = SAMPLER, **sampling):
    """KSampler, VAE Decode (with the VAE output of ``vae_source``: the checkpoint, or a VAE loader) and Save Image,
    one below the other in ``column``."""
    sampler = g.node("KSampler", column, **{**g.family.sampling, **sampling})
    g.link(model[0], model[1], sampler, "model")
    g.link(pos, "CONDITIONING", sampler, "positive")
    g.link(neg, "CONDITIONING", sampler, "negative")
    g.link(latent[0], latent[1], sampler, "latent_image")
    decode = g.node("VAEDecode", column)
    g.link(sampler, "LATENT", decode, "samples")
    g.link(vae_source, "VAE", decode, "vae")
    save = g.node("SaveImage", column, filename_prefix=f"ipadapter_kit/{prefix}", box_width=420)
    save["size"][1] = 460
    g.link(decode, "IMAGE", save, "images")
    return sampler


def half_masks(g: Graph, solid_column: int, mask_column: int) -> tuple[dict, dict]:
    """Masks of the left and the right half of a 512 x 512 picture, from solid masks (the MASK outputs)."""
    empty = g.node("SolidMask", solid_column, title="Canvas (0)", value=0.0, width=512, height=512)
    half = g.node("SolidMask", solid_column, title="Left half (1)", value=1.0, width=256, height=512)
    left = g.node("MaskComposite", mask_column, title="Left mask", level=empty, x=0, y=0, operation="add")
    g.link(empty, "MASK", left, "destination")
    g.link(half, "MASK", left, "source")
    right = g.node("InvertMask", mask_column, title="Right mask")
    g.link(left, "MASK", right, "mask")
    return left, right


def empty_latent(g: Graph, column: int = APPLY, batch_size: int = 1):
    return g.node(g.family.latent, column, width=g.family.size, height=g.family.size, batch_size=batch_size)


def one_reference(g: Graph, positive: str, negative: str, weight: float, prefix: str, adapter_file: str | None = None,
                  title: str = "Reference image", tiled: bool = False, advanced: bool = False, **apply_values):
    """Text to image with one reference image through Apply IP-Adapter (λ = ``weight``; with ``advanced`` Apply
    IP-Adapter (Advanced), other widgets in ``apply_values``); returns the adapter loader."""
    ckpt, pos, neg, adapter, encoder = base(g, positive, negative, adapter_file)
    _, embeds = reference(g, REFERENCE, encoder, title, tiled)
    latent = empty_latent(g)
    patched = apply(g, (ckpt, "MODEL"), adapter, embeds, advanced, weight=weight, **apply_values)
    sample_and_save(g, (patched, "MODEL"), pos, neg, (latent, "LATENT"), ckpt, prefix)
    return adapter


def style_and_composition(g: Graph, style_blocks: str, composition_blocks: str, prefix: str):
    """One reference's style (layers = style), another's layout (layers = composition), a text prompt."""
    ckpt, pos, neg, adapter, encoder = base(g, "best quality, a house in the mountains", "lowres, worst quality")
    _, style_embeds = reference(g, REFERENCE, encoder, "Style reference")
    _, layout_embeds = reference(g, REFERENCE_B, encoder, "Composition reference")
    latent = empty_latent(g)
    style = apply(g, (ckpt, "MODEL"), adapter, style_embeds, advanced=True, title=f"Style: {style_blocks} only",
                  weight=1.0, layers="style")
    layout = apply(g, (style, "MODEL"), adapter, layout_embeds, advanced=True,
                   title=f"Composition: {composition_blocks} only", weight=1.0, layers="composition")
    sample_and_save(g, (layout, "MODEL"), pos, neg, (latent, "LATENT"), ckpt, prefix)


# -- the SD1.5 workflows -----------------------------------------------------------------

def image_prompt_only(g: Graph):
    one_reference(g, "", "", 1.0, "image_prompt")
    g.note(LOADERS, "Image prompt only (the paper's setting).\n\nThe text prompts are empty: the reference image is "
           "the whole prompt. λ (weight on Apply IP-Adapter) = 1.0, the paper's default; DDIM, 50 steps, CFG 7.5 as in "
           "the paper.\n\nModels: v1-5-pruned-emaonly.safetensors in models/checkpoints, ip-adapter_sd15.safetensors in "
           "models/ipadapter, CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors in models/clip_vision. Pick your reference "
           "in Load Image.\n\nApply IP-Adapter has the everyday controls (λ, start / end, weight type, an optional "
           "attention mask); Apply IP-Adapter (Advanced) adds the rest (combine, layers, embeds scaling, batch mode, "
           "frame weights, regions).")


def image_and_text(g: Graph):
    one_reference(g, "best quality, wearing a hat on the beach", "monochrome, lowres, bad anatomy, worst quality, low quality",
                  0.6, "image_and_text")
    g.note(LOADERS, "Image + text prompt (the paper's headline use).\n\nThe reference image gives the subject, the text "
           "edits it ('wearing a hat on the beach'). λ = 0.6: below 1.0 the text gets more say, as in the paper's "
           "multimodal examples; raise it to follow the image more closely. DDIM, 50 steps, CFG 7.5.")


def img2img(g: Graph):
    ckpt, pos, neg, adapter, encoder = base(g, "best quality, high quality", "lowres, worst quality")
    source = g.node("LoadImage", ENCODERS, title="Image to change", image=SOURCE)
    _, embeds = reference(g, REFERENCE, encoder)
    encode = g.node("VAEEncode", APPLY)
    patched = apply(g, (ckpt, "MODEL"), adapter, embeds, advanced=True, weight=0.8)
    g.link(source, "IMAGE", encode, "pixels")
    g.link(ckpt, "VAE", encode, "vae")
    sample_and_save(g, (patched, "MODEL"), pos, neg, (encode, "LATENT"), ckpt, "img2img", denoise=0.6)
    g.note(LOADERS, "Image-to-image with an image prompt.\n\n'Image to change' is encoded by the VAE and re-noised "
           "(denoise 0.6 on the KSampler: lower keeps more of it); the reference image steers what it becomes through "
           "the IP-Adapter (λ = 0.8). The output has the size of the image to change (SD1.5 works best near 512 px).")


def inpainting(g: Graph):
    ckpt, pos, neg, adapter, encoder = base(g, "best quality, high quality", "lowres, worst quality")
    source = g.node("LoadImage", ENCODERS, title="Image to inpaint (paint the mask)", image=SOURCE_MASKED)
    _, embeds = reference(g, REFERENCE, encoder)
    encode = g.node("VAEEncode", APPLY)
    g.link(source, "IMAGE", encode, "pixels")
    g.link(ckpt, "VAE", encode, "vae")
    masked = g.node("SetLatentNoiseMask", APPLY)
    patched = apply(g, (ckpt, "MODEL"), adapter, embeds, advanced=True, weight=1.0)
    g.link(source, "MASK", patched, "attn_mask")
    g.link(encode, "LATENT", masked, "samples")
    g.link(source, "MASK", masked, "mask")
    sample_and_save(g, (patched, "MODEL"), pos, neg, (masked, "LATENT"), ckpt, "inpaint")
    g.note(LOADERS, "Inpainting with an image prompt.\n\nOpen 'Image to inpaint' in the mask editor (right click > Open "
           "in MaskEditor) and paint the region to replace; the mask comes from the image's alpha channel. Only the "
           "masked region is re-generated (Set Latent Noise Mask), and the same mask is the IP-Adapter's attn_mask, so "
           "the reference image acts only there. Works with the plain SD1.5 checkpoint.")


def regional(g: Graph):
    ckpt, pos, neg, adapter, encoder = base(g, "best quality, two animals side by side", "lowres, worst quality")
    _, left_embeds = reference(g, REFERENCE, encoder, "Reference for the left half")
    _, right_embeds = reference(g, REFERENCE_B, encoder, "Reference for the right half")
    left, right = half_masks(g, ENCODERS, ENCODERS)
    latent = empty_latent(g)
    first = apply(g, (ckpt, "MODEL"), adapter, left_embeds, advanced=True, weight=0.8)
    g.link(left, "MASK", first, "attn_mask")
    second = apply(g, (first, "MODEL"), adapter, right_embeds, advanced=True, weight=0.8)
    g.link(right, "MASK", second, "attn_mask")
    sample_and_save(g, (second, "MODEL"), pos, neg, (latent, "LATENT"), ckpt, "regional")
    g.note(LOADERS, "Two reference images, each with its own weight and attention mask (regional prompting).\n\n"
           "The first Apply IP-Adapter (Advanced) puts the left reference in the left half, the second (chained on the first's "
           "MODEL) the right reference in the right half; each has its own λ. The masks are made here from solid "
           "masks (512 x 512, the image size; any size with the same aspect works); a painted MASK works as well.")


def style_composition(g: Graph):
    style_and_composition(g, "up_blocks.1", "down_blocks.2", "style_composition")
    g.note(LOADERS, "Style and composition through per-layer weights.\n\nThe first Apply takes only the style of "
           "its reference (layers = style: the three layers of up_blocks.1, keys 13, 15, 17), the second only the "
           "layout of another (layers = composition: down_blocks.2, keys 9, 11); the text says what to draw. "
           "layers = custom takes 16 numbers (keys 1, 3, ..., 31) or pairs like '15:1, 11:0.5' in "
           "custom_layer_weights.")


def trained_checkpoint(g: Graph):
    adapter = one_reference(g, "best quality, high quality", "lowres, worst quality", 1.0, "trained", TRAINED_ADAPTER,
                            advanced=True)
    adapter["title"] = "Your trained adapter"
    g.note(LOADERS, "A checkpoint trained with `python -m training.run`.\n\nThe trainer exports "
           "<output_dir>/ip-adapter_sd15_stepNNNNNNNN.safetensors in the official layout (a plus run, "
           "--model.variant plus: ip-adapter-plus_sd15_stepNNNNNNNN.safetensors; the loader reads the variant from "
           "the tensors). Copy it to "
           "models/ipadapter/ip-adapter_sd15_trained.safetensors (or pick its own name in the loader); the rest is "
           "the image-prompt workflow. Train on SD1.5 and ViT-H/14 (the default run's scaled-down toy models give a "
           "file that this SD1.5 checkpoint refuses, with a one-line reason).")


def batch_with_frame_weights(g: Graph):
    ckpt, pos, neg, adapter, encoder = base(g, "best quality, high quality", "lowres, worst quality")
    first = g.node("LoadImage", INPUTS, title="Reference for latent 1", image=REFERENCE)
    second = g.node("LoadImage", INPUTS, title="Reference for latents 2-4", image=REFERENCE_B)
    batch = g.node("ImageBatch", ENCODERS, level=first)
    g.link(first, "IMAGE", batch, "image1")
    g.link(second, "IMAGE", batch, "image2")
    embeds = g.node("IPAdapterKitEncode", ENCODERS, crop="crop")
    g.link(encoder, "image_encoder", embeds, "image_encoder")
    g.link(batch, "IMAGE", embeds, "image")
    ramp = g.node("IPAdapterKitFrameWeights", ENCODERS, level=second, timing="ease in-out", frames=4, start=1.0,
                  end=0.4)
    latent = empty_latent(g, batch_size=4)
    patched = apply(g, (ckpt, "MODEL"), adapter, embeds, advanced=True, weight=0.8, batch_mode="one per latent",
                    frame_weights="1, 0.85, 0.55, 0.4")
    g.widget_socket(patched, "frame_weights")
    g.link(ramp, "frame_weights", patched, "frame_weights")
    sample_and_save(g, (patched, "MODEL"), pos, neg, (latent, "LATENT"), ckpt, "batch_frame_weights")
    g.note(LOADERS, "A batch where each latent has its own reference and its own weight (batches of variations, "
           "animation).\n\nImage Batch joins the two references; batch mode 'one per latent' on Apply IP-Adapter "
           "(Advanced) gives reference i to latent i, and the latents after the last reference keep the last one "
           "(here latents 2-4 get the second). IP-Adapter Frame Weights makes one weight per latent (an ease in-out ramp from 1.0 to "
           "0.4 over 4 frames: 1, 0.85, 0.55, 0.4), multiplying λ = 0.8; it feeds Apply's frame_weights, turned into "
           "an input. Typing such a list there instead does the same. With AnimateDiff's context windows each window gets "
           "the weights and references of its own frames.")


def tiled_reference(g: Graph):
    one_reference(g, "best quality, high quality", "lowres, worst quality", 0.8, "tiled_reference",
                  title="Wide or tall reference", tiled=True, advanced=True, combine="concat")
    g.note(LOADERS, "A reference that is not square, seen whole.\n\nEncode Image crops a wide or tall reference to "
           "its center square; Encode Tiled instead cuts it into squares along its long side (2 for a 2:1 image, "
           "overlapping when the ratio is not a whole number) and encodes each as a reference of its own. Apply's "
           "combine = concat keeps every tile's tokens (λ = 0.8); average merges them into one. tile_masks gives "
           "each tile's place in the picture, for IP-Adapter Region masks when the layout should follow the "
           "reference's.")


def regional_with_text(g: Graph):
    ckpt, pos, neg, adapter, encoder = base(g, "best quality, two animals in a meadow", "lowres, worst quality")
    _, left_embeds = reference(g, REFERENCE, encoder, "Reference for the left half")
    _, right_embeds = reference(g, REFERENCE_B, encoder, "Reference for the right half")
    left, right = half_masks(g, LOADERS, INPUTS)
    left_text = g.node("CLIPTextEncode", ENCODERS, title="Left half's text", text="a fox, red fur", box_width=380)
    right_text = g.node("CLIPTextEncode", ENCODERS, title="Right half's text", text="a bird, blue feathers", box_width=380)
    for text in (left_text, right_text):
        g.link(ckpt, "CLIP", text, "clip")
    first = g.node("IPAdapterKitRegion", APPLY, title="Left region", level=left_embeds, weight=0.8)
    g.link(left_embeds, "embeds", first, "embeds")
    g.link(left, "MASK", first, "mask")
    g.link(left_text, "CONDITIONING", first, "positive")
    second = g.node("IPAdapterKitRegion", APPLY, title="Right region", weight=0.8)
    g.link(right_embeds, "embeds", second, "embeds")
    g.link(right, "MASK", second, "mask")
    g.link(right_text, "CONDITIONING", second, "positive")
    g.link(first, "regions", second, "regions")
    latent = empty_latent(g, APPLY + 1)
    patched = apply(g, (ckpt, "MODEL"), adapter, None, advanced=True, column=APPLY + 1)
    g.link(second, "regions", patched, "regions")
    prompt = g.node("ConditioningCombine", APPLY + 1, title="Global text + the regions' texts")
    g.link(pos, "CONDITIONING", prompt, "conditioning_1")
    g.link(second, "positive", prompt, "conditioning_2")
    sample_and_save(g, (patched, "MODEL"), prompt, neg, (latent, "LATENT"), ckpt, "regional_with_text",
                    column=SAMPLER + 1)
    g.note(LOADERS, "Regions, each with its own reference, weight, mask and text, in one chain.\n\nEach IP-Adapter "
           "Region takes a reference, a mask and (optionally) its own text; the second takes the first's regions, "
           "and Apply IP-Adapter (Advanced) applies them all at once (each with its own λ = 0.8 and mask). The last region's "
           "positive output holds every region's text limited to its mask; Conditioning Combine adds the global "
           "prompt. The masks are made from solid masks here (512 x 512, the image size); a painted MASK works as "
           "well.")


# -- the SDXL workflows: the same nodes, SDXL files, 1024 px -----------------------------

SDXL_SETTINGS = ("Euler, 30 steps, CFG 5.0 at 1024 x 1024 (the IP-Adapter repository's SDXL examples: 30 steps "
                 "with diffusers' SDXL defaults).")
SDXL_MODELS = ("Models: sd_xl_base_1.0.safetensors in models/checkpoints, {adapter} in models/ipadapter, "
               "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors in models/clip_vision (the _vit-h SDXL adapters take the "
               "same ViT-H/14 encoder as SD1.5; ip-adapter_sdxl.safetensors takes CLIP-ViT-bigG-14-laion2B-39B-b160k "
               "instead). Pick your reference in Load Image.")


def sdxl_image_prompt(g: Graph):
    one_reference(g, "", "", 1.0, "sdxl_image_prompt")
    g.note(LOADERS, "SDXL, image prompt only.\n\nThe same nodes as the SD1.5 workflows: the family comes from the "
           "MODEL and the adapter file. The text prompts are empty: the reference image is the whole prompt. λ (weight "
           f"on Apply IP-Adapter) = 1.0. {SDXL_SETTINGS}\n\n" + SDXL_MODELS.format(adapter=SDXL_ADAPTER))


def sdxl_image_and_text(g: Graph):
    one_reference(g, "best quality, wearing a hat on the beach", "monochrome, lowres, bad anatomy, worst quality, low quality",
                  0.6, "sdxl_image_and_text")
    g.note(LOADERS, "SDXL, image + text prompt.\n\nThe reference image gives the subject, the text edits it "
           "('wearing a hat on the beach'). λ = 0.6: below 1.0 the text gets more say; raise it to follow the image "
           f"more closely. {SDXL_SETTINGS}\n\n" + SDXL_MODELS.format(adapter=SDXL_ADAPTER))


def sdxl_style_composition(g: Graph):
    style_and_composition(g, "up_blocks.0.attentions.1", "down_blocks.2.attentions.1", "sdxl_style_composition")
    g.note(LOADERS, "SDXL style and composition through per-layer weights (the blocks InstantStyle found).\n\n"
           "The first Apply takes only the style of its reference (layers = style: the ten layers of "
           "up_blocks.0.attentions.1, keys 69, 71, ..., 87), the second only the layout of another (layers = "
           "composition: down_blocks.2.attentions.1, keys 29, 31, ..., 47); the text says what to draw. layers = "
           "custom takes 70 numbers (keys 1, 3, ..., 139) or pairs like '69:1, 29:0.5' in custom_layer_weights. "
           f"{SDXL_SETTINGS}")


def sdxl_plus(g: Graph):
    one_reference(g, "best quality, high quality", "monochrome, lowres, bad anatomy, worst quality, low quality",
                  0.7, "sdxl_plus", SDXL_PLUS_ADAPTER, advanced=True)
    g.note(LOADERS, "SDXL with the plus adapter.\n\nip-adapter-plus_sdxl_vit-h makes 16 image tokens from the "
           "encoder's patch features (a Resampler over its penultimate layer) where the base adapter makes 4 from the "
           "pooled image embedding, so the result follows the reference more closely. λ = 0.7 with a plain quality "
           f"prompt; lower it if the image copies the reference too much. {SDXL_SETTINGS}\n\n"
           + SDXL_MODELS.format(adapter=SDXL_PLUS_ADAPTER))


def sdxl_style_transfer_precise(g: Graph):
    one_reference(g, "best quality, a cat sitting on a windowsill", "lowres, worst quality", 1.0,
                  "sdxl_style_transfer_precise", title="Style reference", advanced=True,
                  weight_type="style transfer precise")
    g.note(LOADERS, "SDXL style transfer, precise: the reference's style without its layout.\n\nweight type = "
           "'style transfer precise' gives the reference to the style layers (up_blocks.0.attentions.1, keys 69-87) "
           "and, on the composition layers (down_blocks.2.attentions.1, keys 29-47), to the unconditional half of "
           "classifier-free guidance only, so the sample is pushed away from the reference's composition while it "
           "takes its colours and texture. The text says what to draw. 'style transfer' (style layers only) leaks "
           f"more of the reference's layout. {SDXL_SETTINGS}\n\n" + SDXL_MODELS.format(adapter=SDXL_ADAPTER))


# -- the FaceID workflows: a face's identity embedding (InsightFace) instead of CLIP image features ---------------

FACE_MODELS = ("The face models: an InsightFace pack in models/insightface/models/{pack}/ (det_10g.onnx, "
               "w600k_r50.onnx; antelopev2 works too), as cubiq's users have it; nothing is downloaded. Face analysis "
               "needs insightface 2.1 or later: pip install \".[faceid]\" in this pack's folder.")


def face_loaders(g: Graph, adapter_file: str):
    """The FaceID adapter and the face analysis (an InsightFace pack, CPU or CUDA by onnxruntime)."""
    adapter = g.node("IPAdapterKitLoader", LOADERS, ipadapter_file=adapter_file)
    faces = g.node("IPAdapterKitFaceAnalysisLoader", LOADERS, pack=FACE_PACK)
    return adapter, faces


def encode_faces(g: Graph, faces: dict, adapter: dict, images: tuple[dict, str], level: dict, **values):
    encode = g.node("IPAdapterKitEncodeFace", ENCODERS, level=level, **values)
    g.link(faces, "face_analysis", encode, "face_analysis")
    g.link(images[0], images[1], encode, "image")
    g.link(adapter, "ipadapter", encode, "ipadapter")
    return encode


def faceid_plusv2(g: Graph):
    ckpt = g.node("CheckpointLoaderSimple", LOADERS, ckpt_name=g.family.checkpoint)
    lora = g.node("LoraLoaderModelOnly", LOADERS, title="FaceID LoRA", lora_name=FACEID_PLUSV2_LORA,
                  strength_model=1.0)
    g.link(ckpt, "MODEL", lora, "model")
    adapter, faces = face_loaders(g, FACEID_PLUSV2_ADAPTER)
    encoder = g.node("IPAdapterKitEncoderLoader", LOADERS, clip_name=ENCODER)
    pos, neg = prompts(g, "best quality, a portrait photo of a person wearing a hat on the beach",
                       "monochrome, lowres, bad anatomy, worst quality, low quality, blurry")
    g.link(ckpt, "CLIP", pos, "clip")
    g.link(ckpt, "CLIP", neg, "clip")
    face = g.node("LoadImage", INPUTS, title="Face", image=REFERENCE)
    embeds = encode_faces(g, faces, adapter, (face, "IMAGE"), face, weight_faceidv2=1.0)
    g.link(encoder, "image_encoder", embeds, "image_encoder")
    latent = empty_latent(g)
    patched = apply(g, (lora, "MODEL"), adapter, embeds, weight=1.0)
    sample_and_save(g, (patched, "MODEL"), pos, neg, (latent, "LATENT"), ckpt, "faceid_plusv2")
    g.note(LOADERS, "FaceID plus v2: a person's face from one photo, the text says the rest.\n\nIP-Adapter Face "
           "Analysis Loader finds the face (the largest in the picture); Encode Face turns its identity embedding "
           "(InsightFace) and the face aligned and cropped, seen by the image encoder, into the adapter's tokens; "
           "weight_faceidv2 (1.0) weighs the crop's part. Apply IP-Adapter takes them like any image prompt (λ = "
           "1.0). FaceID plus v2 was trained with a LoRA on the UNet: ComfyUI's LoraLoaderModelOnly applies it "
           "(strength 1.0); IP-Adapter Unified Loader FaceID (preset faceid-plusv2) does the loading and the LoRA in "
           "one node instead. DDIM, 50 steps, CFG 7.5.\n\nModels: v1-5-pruned-emaonly.safetensors in "
           f"models/checkpoints, {FACEID_PLUSV2_ADAPTER} in models/ipadapter, {FACEID_PLUSV2_LORA} in models/loras, "
           f"{ENCODER} in models/clip_vision. " + FACE_MODELS.format(pack=FACE_PACK), height=420)


def sdxl_faceid_portrait(g: Graph):
    ckpt = g.node("CheckpointLoaderSimple", LOADERS, ckpt_name=g.family.checkpoint)
    adapter, faces = face_loaders(g, SDXL_PORTRAIT_ADAPTER)
    pos, neg = prompts(g, "best quality, a watercolor painting of a person on the beach",
                       "photo, monochrome, lowres, bad anatomy, worst quality, low quality, blurry")
    g.link(ckpt, "CLIP", pos, "clip")
    g.link(ckpt, "CLIP", neg, "clip")
    first = g.node("LoadImage", INPUTS, title="Face, first photo", image=REFERENCE)
    second = g.node("LoadImage", INPUTS, title="Face, second photo", image=REFERENCE_B)
    batch = g.node("ImageBatch", ENCODERS, title="The photos as one batch", level=first)
    g.link(first, "IMAGE", batch, "image1")
    g.link(second, "IMAGE", batch, "image2")
    embeds = encode_faces(g, faces, adapter, (batch, "IMAGE"), batch)
    latent = empty_latent(g)
    patched = apply(g, (ckpt, "MODEL"), adapter, embeds, advanced=True, weight=1.0, combine="concat")
    sample_and_save(g, (patched, "MODEL"), pos, neg, (latent, "LATENT"), ckpt, "sdxl_faceid_portrait")
    g.note(LOADERS, "SDXL FaceID portrait: one person from several photos of their face, in the style the text "
           "asks for.\n\nImage Batch joins the photos (add more with further Image Batch nodes); Encode Face "
           "embeds the largest face of each, and Apply IP-Adapter (Advanced) with combine = concat keeps each "
           "face's 16 tokens side by side (average would merge them into one face's). The portrait adapter reads "
           "the identity embedding only: no image encoder, no LoRA. λ = 1.0. " + SDXL_SETTINGS + "\n\nModels: "
           f"sd_xl_base_1.0.safetensors in models/checkpoints, {SDXL_PORTRAIT_ADAPTER} in models/ipadapter. "
           + FACE_MODELS.format(pack=FACE_PACK), height=420)


# -- the DiT workflows: the same nodes of this pack, the base models loaded as ComfyUI's examples load them ---------

def flux_base(g: Graph, positive: str, adapter_file: str, encoder_file: str):
    """Flux.1 dev's three loaders, the text prompt with FluxGuidance, an empty negative prompt (unused at CFG 1),
    the adapter and the encoder; returns (MODEL source, positive, negative, VAE source, adapter, encoder)."""
    unet = g.node("UNETLoader", LOADERS, unet_name=FLUX_MODEL, weight_dtype="default")
    clip = g.node("DualCLIPLoader", LOADERS, clip_name1=T5XXL_TEXT, clip_name2=CLIP_L_TEXT, type="flux")
    vae = g.node("VAELoader", LOADERS, vae_name=FLUX_VAE)
    pos, neg = prompts(g, positive, "", "Negative prompt (unused at CFG 1)")
    g.link(clip, "CLIP", pos, "clip")
    g.link(clip, "CLIP", neg, "clip")
    guided = g.node("FluxGuidance", ENCODERS, guidance=FLUX_GUIDANCE)
    g.link(pos, "CONDITIONING", guided, "conditioning")
    adapter, encoder = adapter_loaders(g, adapter_file, encoder_file)
    return (unet, "MODEL"), guided, neg, vae, adapter, encoder


def sd35_base(g: Graph, positive: str, negative: str, adapter_file: str, encoder_file: str):
    """SD3.5 Large's checkpoint (model and VAE) and TripleCLIPLoader, the two text prompts, the adapter and the
    encoder; returns (MODEL source, positive, negative, VAE source, adapter, encoder)."""
    ckpt = g.node("CheckpointLoaderSimple", LOADERS, ckpt_name=SD35_CHECKPOINT)
    clip = g.node("TripleCLIPLoader", LOADERS, clip_name1=CLIP_L_TEXT, clip_name2=CLIP_G_TEXT, clip_name3=T5XXL_TEXT)
    pos, neg = prompts(g, positive, negative)
    g.link(clip, "CLIP", pos, "clip")
    g.link(clip, "CLIP", neg, "clip")
    adapter, encoder = adapter_loaders(g, adapter_file, encoder_file)
    return (ckpt, "MODEL"), pos, neg, ckpt, adapter, encoder


def dit_one_reference(g: Graph, bases, weight: float, prefix: str):
    """Text to image with one reference image through Apply IP-Adapter (λ = ``weight``) on a DiT's loaders."""
    model, pos, neg, vae, adapter, encoder = bases
    _, embeds = reference(g, REFERENCE, encoder)
    latent = empty_latent(g)
    patched = apply(g, model, adapter, embeds, weight=weight)
    sample_and_save(g, (patched, "MODEL"), pos, neg, (latent, "LATENT"), vae, prefix)


FLUX_SETTINGS = ("Flux.1 dev as ComfyUI's own examples run it: Load Diffusion Model, DualCLIPLoader (type flux), "
                 "Load VAE, FluxGuidance 3.5, euler / simple, 20 steps, CFG 1 (ComfyUI does not evaluate the "
                 "negative prompt at CFG 1), 1024 x 1024.")
FLUX_MODELS = ("Models: flux1-dev.safetensors in models/diffusion_models, t5xxl_fp16.safetensors and "
               "clip_l.safetensors in models/text_encoders, ae.safetensors in models/vae, {adapter} ({released}, "
               "renamed) in models/ipadapter, {encoder} in models/clip_vision. IP-Adapter Unified Loader's preset "
               "{preset} finds these two by their names.")


def flux_image_prompt(g: Graph):
    dit_one_reference(g, flux_base(g, "", XLABS_ADAPTER, CLIP_L_ENCODER), 1.0, "flux_image_prompt")
    g.note(LOADERS, "Flux.1 dev, image prompt only, with XLabs' IP-Adapter v2.\n\nThe text prompt is empty: the "
           "reference image is the whole prompt (λ, the weight on Apply IP-Adapter, = 1.0). XLabs' adapter turns the "
           "CLIP ViT-L/14 image embedding into 16 image tokens and acts on Flux's 19 double blocks; lower λ if the "
           f"image copies the reference too closely. {FLUX_SETTINGS}\n\n" + FLUX_MODELS.format(
               adapter=XLABS_ADAPTER, released="XLabs-AI/flux-ip-adapter-v2's ip_adapter.safetensors",
               encoder=CLIP_L_ENCODER, preset="flux-xlabs"))


def flux_image_and_text(g: Graph):
    dit_one_reference(g, flux_base(g, "wearing a hat on the beach", INSTANTX_FLUX_ADAPTER, SIGLIP_ENCODER), 0.7,
                      "flux_image_and_text")
    g.note(LOADERS, "Flux.1 dev, image + text prompt, with InstantX's IP-Adapter.\n\nThe reference image gives "
           "the subject, the text edits it ('wearing a hat on the beach'). λ = 0.7: below 1.0 the text gets more "
           "say; raise it to follow the image more closely. InstantX's adapter turns SigLIP's pooled image embedding "
           "into 128 image tokens and acts on all 57 blocks of Flux (19 double, 38 single). "
           f"{FLUX_SETTINGS}\n\n" + FLUX_MODELS.format(
               adapter=INSTANTX_FLUX_ADAPTER, released="InstantX/FLUX.1-dev-IP-Adapter's ip-adapter.bin",
               encoder=SIGLIP_ENCODER, preset="flux-instantx"))


def sd35_image_prompt(g: Graph):
    dit_one_reference(g, sd35_base(g, "", "", SD35_ADAPTER, SIGLIP_ENCODER), 1.0, "sd35_image_prompt")
    g.note(LOADERS, "SD3.5 Large, image prompt only, with InstantX's IP-Adapter.\n\nThe text prompts are empty: "
           "the reference image is the whole prompt (λ = 1.0). InstantX's adapter reads SigLIP's penultimate hidden "
           "states through a Resampler that also takes the timestep, so its 64 image tokens change from step to "
           "step, and acts on all 38 joint blocks. SD3.5 Large as ComfyUI's own example loads it: Load Checkpoint "
           "(the model and its VAE; the file holds no text encoders) and TripleCLIPLoader; euler / sgm_uniform, 28 "
           "steps, CFG 4.5, 1024 x 1024.\n\nModels: sd3.5_large.safetensors in models/checkpoints, "
           "clip_l.safetensors, clip_g.safetensors and t5xxl_fp16.safetensors in models/text_encoders, "
           f"{SD35_ADAPTER} (InstantX/SD3.5-Large-IP-Adapter's ip-adapter.bin, renamed) in models/ipadapter, "
           f"{SIGLIP_ENCODER} in models/clip_vision. IP-Adapter Unified Loader's preset sd35-instantx finds these "
           "two by their names.")


WORKFLOWS = {
    "1-image-prompt.json": (SD15, image_prompt_only),
    "2-image-and-text.json": (SD15, image_and_text),
    "3a-img2img.json": (SD15, img2img),
    "3b-inpainting.json": (SD15, inpainting),
    "4-regional-two-references.json": (SD15, regional),
    "5-style-and-composition.json": (SD15, style_composition),
    "6-trained-checkpoint.json": (SD15, trained_checkpoint),
    "7-sdxl-image-prompt.json": (SDXL, sdxl_image_prompt),
    "8-sdxl-image-and-text.json": (SDXL, sdxl_image_and_text),
    "9-sdxl-style-and-composition.json": (SDXL, sdxl_style_composition),
    "10-sdxl-plus.json": (SDXL, sdxl_plus),
    "11-sdxl-style-transfer-precise.json": (SDXL, sdxl_style_transfer_precise),
    "12-batch-frame-weights.json": (SD15, batch_with_frame_weights),
    "13-tiled-reference.json": (SD15, tiled_reference),
    "14-regional-with-text.json": (SD15, regional_with_text),
    "15-flux-image-prompt.json": (FLUX, flux_image_prompt),
    "16-flux-image-and-text.json": (FLUX, flux_image_and_text),
    "17-sd35-image-prompt.json": (SD35, sd35_image_prompt),
    "18-faceid-plusv2.json": (SD15, faceid_plusv2),
    "19-sdxl-faceid-portrait.json": (SDXL, sdxl_faceid_portrait),
}


def build_all(info: dict) -> list[Path]:
    written = []
    for name, (family, builder) in WORKFLOWS.items():
        graph = Graph(info, family)
        builder(graph)
        path = WORKFLOW_DIR / name
        path.write_text(json.dumps(graph.workflow(), indent=2) + "\n")
        written.append(path)
    return written + write_api_twins(info)


def main() -> int:
    for path in build_all(live_object_info()):
        print(path.relative_to(REPO_ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
