"""The migrator from cubiq's ComfyUI_IPAdapter_plus (``python -m migrate``, the ``migrate`` package).

The cubiq graphs are written here node by node (:class:`Graph`, builders below: the
graphs of that pack's published examples, and more), with its nodes' ids, widget order
and defaults as its ``INPUT_TYPES`` declares them, in the API format and, with the live
definitions of the session's ComfyUI for ComfyUI's own nodes, in the editor's format.
Checked:

* the migrator's tables of our nodes (and of the ComfyUI node it adds) equal the live
  ``/object_info``; its table of cubiq's nodes gives the widget order that pack's
  example files have, and, where a copy of that pack is at hand (``CUBIQ_PATH``; CI has
  none), equals its ``INPUT_TYPES``;
* each migrated editor workflow passes ``check_workflow`` (no cubiq node left for mapped
  ones, every link type-correct, widget values in range), its API conversion equals the
  migrated API graph, and each rule wires what its cubiq node meant;
* cubiq's FaceID examples (built here node by node, and the files themselves with ``CUBIQ_PATH``) leave no
  FaceID node in place but Kolors' own (with what it takes from cubiq's pack); FaceID nodes become Encode Face +
  Apply, the unified FaceID loader ours at cubiq's lora_strength, the InsightFace loader the Face Analysis Loader;
* nodes no rule maps stay, reported by id with the reason; bad input is a one-line error
  (exit 2); OUT is written atomically and IN is untouched;
* migrated graphs run headless (random-weight models under the workflows' names) and the
  image prompt acts; with ``CUBIQ_PATH``, the original graph through cubiq's nodes and the
  migrated one through ours give the same latents (the faithful migration leaves the middle
  block, which that pack never patches, off in ours); one migrated workflow loads in the
  graph editor without a missing-node dialog.

The faithful rules (the default mode) and ``--ours`` are checked in ``test_migrate_faithful.py``,
the layout of migrated editor workflows in ``test_migrate_layout.py``.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from devtools.comfy_import import REPO_ROOT
from migrate.rules import MIDDLE_BLOCK_NOTE, is_cubiq, migrate
from migrate.tables import COMFY, CUBIQ, FILES, OURS
from test_workflows import models_server  # noqa: F401  (fixture: random models under the workflows' names)
from devtools.workflow_tools import (
    ADAPTER, CHECKPOINT, ENCODER, FACEID_PLUSV2_ADAPTER, REFERENCE_IMAGES, SDXL_CHECKPOINT, check_workflow, node_inputs, shrink, socket_inputs, ui_to_api,
    widget_layout, with_weight,
)

CUBIQ_PATH = os.environ.get("CUBIQ_PATH")
REF_A, REF_B = REFERENCE_IMAGES
ARTIFACTS = REPO_ROOT / "test-artifacts" / "workflows"


# -- building cubiq graphs ----------------------------------------------------------------

class Graph:
    """A graph built node by node in the API format; :meth:`ui` writes the same graph in the editor's format.

    A cubiq node's widgets not given start at the values its definition declares (what the
    editor puts into a new node); links are ``(node, slot)`` tuples.
    """

    def __init__(self):
        self.nodes: dict[str, dict] = {}

    def add(self, kind: str, **inputs) -> str:
        key = str(len(self.nodes) + 1)
        spec = CUBIQ.get(kind)
        values = {name: spec.input(name).initial for name in spec.widgets()} if spec else {}
        values.update({name: list(v) if isinstance(v, tuple) else v for name, v in inputs.items() if v is not None})
        self.nodes[key] = {"class_type": kind, "inputs": values}
        return key

    def api(self) -> dict:
        return copy.deepcopy(self.nodes)

    def ui(self, info: dict, packed: bool = False) -> dict:
        """``packed``: laid out as tightly as cubiq's example files are (columns of nodes of cubiq's sizes, 20 px
        apart), where a node of ours, larger than cubiq's, covers its neighbours unless the migration moves them;
        else on a roomy grid."""
        nodes, links = [], []
        column_bottoms = [0.0] * 4
        for index, (key, entry) in enumerate(self.nodes.items()):
            kind, values = entry["class_type"], entry["inputs"]
            if kind in CUBIQ:
                spec = CUBIQ[kind]
                widgets = spec.widgets()
                sockets = [(item.name, item.kind) for item in spec.sockets()]
                types = {item.name: item.socket_type for item in spec.inputs}
                outputs = list(spec.outputs)
                initial = {name: spec.input(name).initial for name in widgets}
            else:
                definition = info[kind]
                widgets = [w.name if w.extra is None else w.extra for w in widget_layout(definition)]
                sockets = list(socket_inputs(definition).items())
                types = {name: "COMBO" if isinstance(s[0], list) else s[0] for name, s in node_inputs(definition).items()}
                outputs = list(zip(definition.get("output_name") or definition["output"], definition["output"]))
                initial = {}
            slots = [{"name": name, "type": kind_, "link": None} for name, kind_ in sockets]
            slots += [{"name": name, "type": types[name], "link": None, "widget": {"name": name}}
                      for name in widgets if isinstance(values.get(name), list)]
            for position, slot in enumerate(slots):
                value = values.get(slot["name"])
                if isinstance(value, list):
                    links.append([len(links) + 1, int(value[0]), value[1], int(key), position, slot["type"]])
                    slot["link"] = len(links)
            saved = [{"control_after_generate": "fixed", "upload": "image"}.get(name) or
                     (initial.get(name) if isinstance(values.get(name), list) else values.get(name)) for name in widgets]
            if packed:  # cubiq's sizes: 315 wide, a row per socket, a widget row each (LoadImage shows its picture)
                size = [315, 26 + 22 * max(len(sockets), len(outputs)) + 24 * len(widgets) + 240 * (kind == "LoadImage")]
                column = index % 4
                pos = [335 * column, column_bottoms[column] + 30]
                column_bottoms[column] = pos[1] + size[1] + 20
            else:
                size, pos = [320, 200], [400 * (index % 6), 350 * (index // 6)]
            nodes.append({"id": int(key), "type": kind, "pos": pos, "size": size,
                          "flags": {}, "order": index, "mode": 0, "inputs": slots,
                          "outputs": [{"name": n, "type": t, "links": [], "slot_index": i} for i, (n, t) in enumerate(outputs)],
                          "properties": {"Node name for S&R": kind}, "widgets_values": saved})
        by_id = {node["id"]: node for node in nodes}
        for link in links:
            by_id[link[1]]["outputs"][link[2]]["links"].append(link[0])
        return {"last_node_id": len(nodes), "last_link_id": len(links), "nodes": nodes, "links": links, "groups": [],
                "config": {}, "extra": {}, "version": 0.4}


def scene(g: Graph, batch: int = 1):
    """Checkpoint, prompts and latent of an SD1.5 text-to-image graph."""
    checkpoint = g.add("CheckpointLoaderSimple", ckpt_name=CHECKPOINT)
    positive = g.add("CLIPTextEncode", text="a photo of a cat", clip=(checkpoint, 1))
    negative = g.add("CLIPTextEncode", text="blurry", clip=(checkpoint, 1))
    latent = g.add("EmptyLatentImage", width=512, height=512, batch_size=batch)
    return checkpoint, positive, negative, latent


def sample(g: Graph, checkpoint: str, model, positive, negative, latent: str) -> str:
    sampler = g.add("KSampler", model=model, seed=42, steps=20, cfg=7.0, sampler_name="euler", scheduler="normal",
                    positive=positive, negative=negative, latent_image=(latent, 0), denoise=1.0)
    decoded = g.add("VAEDecode", samples=(sampler, 0), vae=(checkpoint, 2))
    g.add("SaveImage", images=(decoded, 0), filename_prefix="migrated")
    return sampler


def unified(g: Graph, checkpoint: str, preset: str = "STANDARD (medium strength)") -> str:
    return g.add("IPAdapterUnifiedLoader", model=(checkpoint, 0), preset=preset)


def reference(g: Graph, name: str = REF_A) -> tuple:
    return (g.add("LoadImage", image=name), 0)


def simple_graph():
    g = Graph()
    checkpoint, positive, negative, latent = scene(g)
    loader = unified(g, checkpoint)
    apply = g.add("IPAdapter", model=(loader, 0), ipadapter=(loader, 1), image=reference(g), weight=0.8,
                  weight_type="prompt is more important")
    sample(g, checkpoint, (apply, 0), (positive, 0), (negative, 0), latent)
    return g


def negative_image_graph(loader: str = "model"):
    """cubiq's advanced example with a negative image: model loader + Load CLIP Vision (or a unified loader)."""
    g = Graph()
    checkpoint, positive, negative, latent = scene(g)
    if loader == "model":
        ipadapter, model = (g.add("IPAdapterModelLoader", ipadapter_file=ADAPTER), 0), (checkpoint, 0)
        vision = (g.add("CLIPVisionLoader", clip_name=ENCODER), 0)
    else:
        key = unified(g, checkpoint)
        ipadapter, model, vision = (key, 1), (key, 0), None
    prep = g.add("PrepImageForClipVision", image=reference(g), interpolation="LANCZOS", crop_position="top", sharpening=0.15)
    noise = g.add("IPAdapterNoise", type="dissolve", strength=0.6, blur=3, image_optional=(prep, 0))
    apply = g.add("IPAdapterAdvanced", model=model, ipadapter=ipadapter, image=(prep, 0), image_negative=(noise, 0),
                  clip_vision=vision, weight=0.7, combine_embeds="average", embeds_scaling="K+V")
    sample(g, checkpoint, (apply, 0), (positive, 0), (negative, 0), latent)
    return g


def style_composition_graph():
    g = Graph()
    checkpoint, positive, negative, latent = scene(g)
    loader = unified(g, checkpoint, "PLUS (high strength)")
    apply = g.add("IPAdapterStyleComposition", model=(loader, 0), ipadapter=(loader, 1), image_style=reference(g, REF_A),
                  image_composition=reference(g, REF_B), weight_style=1.2, weight_composition=1.0)
    sample(g, checkpoint, (apply, 0), (positive, 0), (negative, 0), latent)
    return g


def regional_graph():
    g = Graph()
    checkpoint, positive, negative, latent = scene(g)
    loader = unified(g, checkpoint)
    left = g.add("SolidMask", value=1.0, width=512, height=512)
    right = g.add("SolidMask", value=0.5, width=512, height=512)
    red = g.add("CLIPTextEncode", text="a red cat", clip=(checkpoint, 1))
    first = g.add("IPAdapterRegionalConditioning", image=reference(g, REF_A), image_weight=0.7, prompt_weight=1.2,
                  mask=(left, 0), positive=(red, 0), negative=(negative, 0))
    second = g.add("IPAdapterRegionalConditioning", image=reference(g, REF_B), image_weight=0.9, weight_type="ease in",
                   start_at=0.1, mask=(right, 0))
    params = g.add("IPAdapterCombineParams", params_1=(first, 0), params_2=(second, 0))
    apply = g.add("IPAdapterFromParams", model=(loader, 0), ipadapter=(loader, 1), ipadapter_params=(params, 0))
    texts = g.add("ConditioningCombine", conditioning_1=(positive, 0), conditioning_2=(first, 1))
    negatives = g.add("ConditioningCombine", conditioning_1=(negative, 0), conditioning_2=(first, 2))
    sample(g, checkpoint, (apply, 0), (texts, 0), (negatives, 0), latent)
    return g


def batch_graph():
    g = Graph()
    checkpoint, positive, negative, latent = scene(g, batch=4)
    loader = unified(g, checkpoint)
    images = g.add("ImageBatch", image1=reference(g, REF_A), image2=reference(g, REF_B))
    weights = g.add("IPAdapterWeights", weights="1.0, 0.4", timing="ease_in_out", frames=4)
    apply = g.add("IPAdapterBatch", model=(loader, 0), ipadapter=(loader, 1), image=(images, 0), weight=(weights, 0))
    sample(g, checkpoint, (apply, 0), (positive, 0), (negative, 0), latent)
    return g


def tiled_graph():
    g = Graph()
    checkpoint, positive, negative, latent = scene(g)
    ipadapter = g.add("IPAdapterModelLoader", ipadapter_file=ADAPTER)
    vision = g.add("CLIPVisionLoader", clip_name=ENCODER)
    apply = g.add("IPAdapterTiled", model=(checkpoint, 0), ipadapter=(ipadapter, 0), image=reference(g),
                  clip_vision=(vision, 0), weight=0.7, weight_type="ease in", sharpening=0.1)
    masks = g.add("MaskToImage", mask=(apply, 2))
    g.add("SaveImage", images=(masks, 0), filename_prefix="tile-masks")
    sample(g, checkpoint, (apply, 0), (positive, 0), (negative, 0), latent)
    return g


def embeds_graph(load: bool = False):
    """Two weighted encodings averaged, saved, applied (cubiq's weighted-embeds example); ``load``: and a saved file."""
    g = Graph()
    checkpoint, positive, negative, latent = scene(g)
    loader = unified(g, checkpoint)
    first = g.add("IPAdapterEncoder", ipadapter=(loader, 1), image=reference(g, REF_A), weight=1.5)
    second = g.add("IPAdapterEncoder", ipadapter=(loader, 1), image=reference(g, REF_B), weight=0.6)
    both = g.add("IPAdapterCombineEmbeds", embed1=(first, 0), embed2=(second, 0), method="average")
    g.add("IPAdapterSaveEmbeds", embeds=(both, 0))
    model = g.add("IPAdapterEmbeds", model=(loader, 0), ipadapter=(loader, 1), pos_embed=(both, 0),
                  neg_embed=(second, 1), weight=0.8)
    if load:
        saved = g.add("IPAdapterLoadEmbeds", embeds="IP_embeds_00001_.ipadpt")
        model = g.add("IPAdapterEmbeds", model=(model, 0), ipadapter=(loader, 1), pos_embed=(saved, 0), weight=0.5)
    sample(g, checkpoint, (model, 0), (positive, 0), (negative, 0), latent)
    return g


def precise_graph():
    g = Graph()
    checkpoint, positive, negative, latent = scene(g)
    loader = unified(g, checkpoint)
    style = g.add("IPAdapterPreciseStyleTransfer", model=(loader, 0), ipadapter=(loader, 1), image=reference(g, REF_A),
                  weight=0.8, style_boost=1.0)
    composition = g.add("IPAdapterPreciseComposition", model=(style, 0), ipadapter=(loader, 1),
                        image=reference(g, REF_B), weight=0.8, composition_boost=0.35)
    sample(g, checkpoint, (composition, 0), (positive, 0), (negative, 0), latent)
    return g


def enhancer_graph():
    """The ClipVision enhancer and IPAdapter MS with layer weights (the adapter file names the family)."""
    g = Graph()
    checkpoint, positive, negative, latent = scene(g)
    ipadapter = g.add("IPAdapterModelLoader", ipadapter_file=ADAPTER)
    vision = g.add("CLIPVisionLoader", clip_name=ENCODER)
    enhanced = g.add("IPAdapterClipVisionEnhancer", model=(checkpoint, 0), ipadapter=(ipadapter, 0),
                     image=reference(g, REF_A), clip_vision=(vision, 0), enhance_tiles=2, enhance_ratio=1.0)
    ms = g.add("IPAdapterMS", model=(enhanced, 0), ipadapter=(ipadapter, 0), image=reference(g, REF_B),
               clip_vision=(vision, 0), layer_weights="3:0.8, 6:0.35, 13:1")
    sample(g, checkpoint, (ms, 0), (positive, 0), (negative, 0), latent)
    return g


def faceid_chain_graph():
    """A plain IPAdapter, then FaceID on its pipe with an InsightFace loader of its own."""
    g = Graph()
    checkpoint, positive, negative, latent = scene(g)
    loader = unified(g, checkpoint)
    plain = g.add("IPAdapter", model=(loader, 0), ipadapter=(loader, 1), image=reference(g), weight=0.6)
    faces = g.add("IPAdapterUnifiedLoaderFaceID", model=(plain, 0), preset="FACEID PLUS V2", ipadapter=(loader, 1))
    insightface = g.add("IPAdapterInsightFaceLoader", provider="CPU")
    face = g.add("IPAdapterFaceID", model=(faces, 0), ipadapter=(faces, 1), image=reference(g, REF_B),
                 insightface=(insightface, 0))
    sample(g, checkpoint, (face, 0), (positive, 0), (negative, 0), latent)
    return g


# cubiq's FaceID examples (examples/ipadapter_faceid.json, ipadapter_ideal_faceid_config.json,
# ipadapter_faceid_batch.json, ipadapter_portrait.json, IPAdapter_FaceIDv2_Kolors.json): their nodes, links and widget
# values; the checkpoints under the names the test server knows, Kolors' own loaders (MZ_*) as ComfyUI's.

def faceid_graph(weight: float = 1.0, v2: float = 2.0, images: int = 1, then_full_face: bool = False,
                 preset: str = "FACEID PLUS V2", checkpoint_name: str = CHECKPOINT):
    g = Graph()
    checkpoint = g.add("CheckpointLoaderSimple", ckpt_name=checkpoint_name)
    positive = g.add("CLIPTextEncode", text="closeup of a beautiful woman wearing a black dress on the seaside",
                     clip=(checkpoint, 1))
    negative = g.add("CLIPTextEncode", text="blurry, noisy, messy, lowres", clip=(checkpoint, 1))
    size = 1024 if checkpoint_name == SDXL_CHECKPOINT else 512
    latent = g.add("EmptyLatentImage", width=size, height=size, batch_size=1)
    faces = g.add("IPAdapterUnifiedLoaderFaceID", model=(checkpoint, 0), preset=preset, lora_strength=0.6, provider="CPU")
    image = reference(g, REF_A)
    if images == 4:  # three ImageBatch nodes: four pictures of one face
        pairs = [(g.add("ImageBatch", image1=image, image2=reference(g, REF_B)), 0),
                 (g.add("ImageBatch", image1=reference(g, REF_B), image2=reference(g, REF_A)), 0)]
        image = (g.add("ImageBatch", image1=pairs[0], image2=pairs[1]), 0)
    face = g.add("IPAdapterFaceID", model=(faces, 0), ipadapter=(faces, 1), image=image, weight=weight,
                 weight_faceidv2=v2)
    model = (face, 0)
    if then_full_face:  # the aligned faces through the full-face adapter, on FaceID's model
        full = g.add("IPAdapterUnifiedLoader", model=(face, 0), preset="FULL FACE - SD1.5 only (portraits stronger)",
                     ipadapter=(faces, 1))
        model = (g.add("IPAdapter", model=(full, 0), ipadapter=(full, 1), image=(face, 1), weight=0.4), 0)
    sample(g, checkpoint, model, (positive, 0), (negative, 0), latent)
    return g


def kolors_graph():
    g = Graph()
    checkpoint, positive, negative, latent = scene(g)
    adapter = g.add("IPAdapterModelLoader", ipadapter_file="Kolors-IP-Adapter-FaceID-Plus.bin")
    vision = g.add("CLIPVisionLoader", clip_name=ENCODER)
    insightface = g.add("IPAdapterInsightFaceLoader", provider="CPU", model_name="antelopev2")
    noise = g.add("IPAdapterNoise", type="gaussian", strength=0.6, blur=0)
    images = g.add("ImageBatch", image1=reference(g, REF_A), image2=reference(g, REF_B))
    face = g.add("IPAdapterFaceIDKolors", model=(checkpoint, 0), ipadapter=(adapter, 0), image=(images, 0),
                 image_negative=(noise, 0), clip_vision=(vision, 0), insightface=(insightface, 0), weight=1.0,
                 weight_faceidv2=0.95, weight_kolors=0.85, combine_embeds="average")
    sample(g, checkpoint, (face, 0), (positive, 0), (negative, 0), latent)
    return g


FACEID_EXAMPLES = {
    "ipadapter_faceid": lambda: faceid_graph(1.0, 2.0),
    "ipadapter_ideal_faceid_config": lambda: faceid_graph(0.8, 2.0, then_full_face=True),
    "ipadapter_faceid_batch": lambda: faceid_graph(0.8, 2.0, images=4, then_full_face=True),
    "ipadapter_portrait": lambda: faceid_graph(0.65, 1.0, preset="FACEID PORTRAIT (style transfer)",
                                               checkpoint_name=SDXL_CHECKPOINT),
    "IPAdapter_FaceIDv2_Kolors": kolors_graph,
}
# cubiq's FaceID nodes; of them only Kolors' own stays, with what it takes that only cubiq's pack gives (its
# InsightFace, its adapter file)
FACEID_KINDS = {"IPAdapterFaceID", "IPAAdapterFaceIDBatch", "IPAdapterUnifiedLoaderFaceID", "IPAdapterInsightFaceLoader",
                "IPAdapterFaceIDKolors"}
KOLORS_STAYS = {"IPAdapterFaceIDKolors", "IPAdapterInsightFaceLoader", "IPAdapterModelLoader"}


GRAPHS = {
    "simple": simple_graph, "advanced_negative_image": negative_image_graph,
    "unified_negative_image": lambda: negative_image_graph("unified"), "style_composition": style_composition_graph,
    "regional": regional_graph, "batch": batch_graph, "tiled": tiled_graph, "embeds": embeds_graph,
    "embeds_save_load": lambda: embeds_graph(load=True), "precise": precise_graph, "enhancer": enhancer_graph,
    "faceid_chain": faceid_chain_graph,
    **{name: builder for name, builder in FACEID_EXAMPLES.items() if builder is not kolors_graph},
    "kolors": kolors_graph,
}
PARTLY_MAPPED = {"embeds_save_load", "kolors"}
FULLY_MAPPED = [name for name in GRAPHS if name not in PARTLY_MAPPED]


@pytest.fixture(scope="module")
def info(comfyui_server):
    return comfyui_server.object_info()


def nodes_of(graph: dict, kind: str) -> list[dict]:
    return [node["inputs"] for node in graph.values() if node["class_type"] == kind]


def source(graph: dict, link) -> dict:
    return graph[link[0]]


def without_meta(graph: dict) -> dict:
    return {key: {k: v for k, v in node.items() if k != "_meta"} for key, node in graph.items()}


# -- the tables --------------------------------------------------------------------------

def declared_rows(inputs: dict, spec) -> list[tuple]:
    """(section, name, kind, default, min, max) of declared inputs (INPUT_TYPES or /object_info); file lists as FILES."""
    rows = []
    for section in ("required", "optional"):
        for name, item in (inputs.get(section) or {}).items():
            options = item[1] if len(item) > 1 and isinstance(item[1], dict) else {}
            kind = tuple(item[0]) if isinstance(item[0], (list, tuple)) else item[0]
            if spec.input(name) is not None and spec.input(name).kind == FILES and isinstance(kind, tuple):
                kind = FILES
            rows.append((section, name, kind, options.get("default"), options.get("min"), options.get("max")))
    return rows


def table_rows(spec) -> list[tuple]:
    return [("optional" if i.optional else "required", i.name, i.kind, i.default, i.low, i.high) for i in spec.inputs]


@pytest.mark.parametrize("kind", [*OURS, *COMFY])
def test_the_tables_of_our_nodes_are_their_live_definitions(kind, info):
    spec, live = {**OURS, **COMFY}[kind], info[kind]
    assert table_rows(spec) == declared_rows(live["input"], spec)
    assert list(spec.outputs) == list(zip(live["output_name"], live["output"]))
    assert spec.title == live["display_name"]
    assert spec.widgets() == [w.name if w.extra is None else w.extra for w in widget_layout(live)]


def test_the_table_has_every_node_of_ours(info):
    assert set(OURS) == {name for name in info if name.startswith("IPAdapterKit")}


# The widgets_values order of cubiq's nodes as its example workflows save them, written out by hand: it holds
# the table where no copy of that pack is at hand (CI).
SAVED_WIDGETS = {
    "IPAdapter": ["weight", "start_at", "end_at", "weight_type"],
    "IPAdapterAdvanced": ["weight", "weight_type", "combine_embeds", "start_at", "end_at", "embeds_scaling"],
    "IPAdapterBatch": ["weight", "weight_type", "start_at", "end_at", "embeds_scaling", "encode_batch_size"],
    "IPAdapterTiled": ["weight", "weight_type", "combine_embeds", "start_at", "end_at", "sharpening", "embeds_scaling"],
    "IPAdapterStyleComposition": ["weight_style", "weight_composition", "expand_style", "combine_embeds", "start_at",
                                  "end_at", "embeds_scaling"],
    "IPAdapterMS": ["weight", "weight_faceidv2", "weight_type", "combine_embeds", "start_at", "end_at", "embeds_scaling",
                    "layer_weights"],
    "IPAdapterPreciseComposition": ["weight", "composition_boost", "combine_embeds", "start_at", "end_at", "embeds_scaling"],
    "IPAdapterClipVisionEnhancer": ["weight", "weight_type", "combine_embeds", "start_at", "end_at", "embeds_scaling",
                                    "enhance_tiles", "enhance_ratio"],
    "IPAdapterEmbeds": ["weight", "weight_type", "start_at", "end_at", "embeds_scaling"],
    "IPAdapterRegionalConditioning": ["image_weight", "prompt_weight", "weight_type", "start_at", "end_at"],
    "IPAdapterFromParams": ["combine_embeds", "embeds_scaling"],
    "IPAdapterWeights": ["weights", "timing", "frames", "start_frame", "end_frame", "add_starting_frames",
                         "add_ending_frames", "method"],
    "IPAdapterEncoder": ["weight"], "IPAdapterCombineEmbeds": ["method"], "IPAdapterUnifiedLoader": ["preset"],
    "PrepImageForClipVision": ["interpolation", "crop_position", "sharpening"], "IPAdapterModelLoader": ["ipadapter_file"],
    "IPAdapterFaceID": ["weight", "weight_faceidv2", "weight_type", "combine_embeds", "start_at", "end_at",
                        "embeds_scaling"],
    "IPAdapterFaceIDKolors": ["weight", "weight_faceidv2", "weight_kolors", "weight_type", "combine_embeds", "start_at",
                              "end_at", "embeds_scaling"],
    "IPAdapterUnifiedLoaderFaceID": ["preset", "lora_strength", "provider"],
    "IPAdapterInsightFaceLoader": ["provider", "model_name"],
}


@pytest.mark.parametrize("kind", SAVED_WIDGETS)
def test_the_cubiq_table_gives_the_widget_order_its_files_have(kind):
    assert CUBIQ[kind].widgets() == SAVED_WIDGETS[kind]


@pytest.fixture(scope="module")
def cubiq(comfy):
    """cubiq's IPAdapterPlus module imported into the in-process ComfyUI (bench/cubiq_pack.py fills its gaps)."""
    if not CUBIQ_PATH:
        pytest.skip("CUBIQ_PATH is not set: no copy of cubiq's ComfyUI_IPAdapter_plus to compare with (CI has none)")
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    from cubiq_pack import fill_comfy_gaps, import_cubiq

    fill_comfy_gaps(comfy)
    return import_cubiq(Path(CUBIQ_PATH).expanduser().resolve())


def test_the_cubiq_table_is_its_declared_inputs(cubiq):
    assert set(cubiq.NODE_CLASS_MAPPINGS) == set(CUBIQ)
    for kind, cls in cubiq.NODE_CLASS_MAPPINGS.items():
        spec = CUBIQ[kind]
        assert table_rows(spec) == declared_rows(cls.INPUT_TYPES(), spec), kind
        names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
        assert list(spec.outputs) == list(zip(names, cls.RETURN_TYPES)), kind


# -- migrated graphs: valid, and wired as cubiq's nodes meant ------------------------------------

@pytest.mark.parametrize("mode", ["faithful", "ours"])
@pytest.mark.parametrize("name", FULLY_MAPPED)
def test_a_fully_mapped_graph_becomes_a_valid_workflow_of_ours_in_both_formats(name, mode, info):
    graph = GRAPHS[name]()
    for family in (None, "sd15"):  # the faithful rules that need the family's layer keys, and without them
        ui, report = migrate(graph.ui(info), mode, family)
        assert check_workflow(ui, info) == []
        assert not [node["type"] for node in ui["nodes"] if is_cubiq(node["type"])]
        assert report.left == {}
        api, api_report = migrate(graph.api(), mode, family)
        assert without_meta(ui_to_api(ui, info)) == without_meta(api)  # both formats migrate alike
        assert api_report.lines() == report.lines()


def test_simple(info):
    api, report = migrate(simple_graph().api(), "ours")
    (loader,) = nodes_of(api, "IPAdapterKitUnifiedLoader")
    (apply,) = nodes_of(api, "IPAdapterKitApply")
    assert loader["preset"] == "standard"
    assert (apply["weight"], apply["weight_type"], apply["combine"], apply["embeds_scaling"]) == (0.8, "ease out", "concat", "V only")
    assert api["5"]["class_type"] == "IPAdapterKitUnifiedLoader" and api["7"]["class_type"] == "IPAdapterKitApply"
    assert apply["model"] == ["5", 0] and apply["ipadapter"] == ["5", 1]  # the replacements keep the old ids
    encode = source(api, apply["embeds"])["inputs"]
    assert encode["image_encoder"] == ["5", 2] and source(api, encode["image"])["class_type"] == "LoadImage"
    assert nodes_of(api, "KSampler")[0]["model"] == ["7", 0]
    assert report.lines()[-2:] == [f"check: {MIDDLE_BLOCK_NOTE}", "summary: 2 cubiq nodes, 2 replaced by 3 nodes of "
                                                                  "this pack, 0 left in place, 1 to check (ours mode)"]


@pytest.mark.parametrize("preset, ours", [
    ("LIGHT - SD1.5 only (low strength)", "light"), ("STANDARD (medium strength)", "standard"),
    ("VIT-G (medium strength)", "vit-bigg"), ("PLUS (high strength)", "plus"), ("PLUS FACE (portraits)", "plus-face"),
    ("FULL FACE - SD1.5 only (portraits stronger)", "full-face"),
])
def test_unified_loader_presets(preset, ours):
    g = Graph()
    checkpoint, positive, negative, latent = scene(g)
    loader = unified(g, checkpoint, preset)
    sample(g, checkpoint, (loader, 0), (positive, 0), (negative, 0), latent)
    api, _ = migrate(g.api())
    assert nodes_of(api, "IPAdapterKitUnifiedLoader") == [{"model": ["1", 0], "preset": ours}]


def test_negative_image_and_clip_vision():
    api, report = migrate(negative_image_graph().api())
    (apply,) = nodes_of(api, "IPAdapterKitApply")
    assert (apply["weight"], apply["combine"], apply["embeds_scaling"]) == (0.7, "average", "K+V")
    assert source(api, apply["ipadapter"])["inputs"] == {"ipadapter_file": ADAPTER}
    encode = source(api, apply["embeds"])["inputs"]
    vision = source(api, encode["image_encoder"])
    assert vision["class_type"] == "IPAdapterKitEncoderFromCLIPVision"
    assert source(api, vision["inputs"]["clip_vision"])["class_type"] == "CLIPVisionLoader"
    noise = source(api, encode["negative_image"])
    assert noise["class_type"] == "IPAdapterKitNoise"
    assert {k: noise["inputs"][k] for k in ("type", "strength", "blur")} == {"type": "dissolve", "strength": 0.6, "blur": 3}
    prep = source(api, noise["inputs"]["image"])
    assert prep["class_type"] == "IPAdapterKitPrepImage" and encode["image"] == noise["inputs"]["image"]
    assert {k: prep["inputs"][k] for k in ("interpolation", "crop_position", "sharpening")} == \
        {"interpolation": "LANCZOS", "crop_position": "top", "sharpening": 0.15}
    assert any("seed" in line and "IPAdapterNoise" in line for line in report.lines())


def test_style_and_composition_become_two_chained_applies():
    api, _ = migrate(style_composition_graph().api())
    first, second = nodes_of(api, "IPAdapterKitApply")
    assert (first["weight"], first["weight_type"], second["weight"], second["weight_type"]) == \
        (1.2, "style transfer", 1.0, "composition")
    assert second["model"] == [next(k for k, n in api.items() if n["inputs"] is first), 0]
    assert first["combine"] == second["combine"] == "average"  # cubiq's default on that node
    images = [source(api, source(api, a["embeds"])["inputs"]["image"])["inputs"]["image"] for a in (first, second)]
    assert images == [REF_A, REF_B]
    assert nodes_of(api, "KSampler")[0]["model"][0] == next(k for k, n in api.items() if n["inputs"] is second)


def test_regional_conditioning_becomes_a_region_chain_and_masked_texts():
    graph = regional_graph()
    api, _ = migrate(graph.api())
    (apply,) = nodes_of(api, "IPAdapterKitApply")
    last = source(api, apply["regions"])
    first = source(api, last["inputs"]["regions"])
    assert "regions" not in first["inputs"] and "embeds" not in apply
    assert [(r["inputs"]["weight"], r["inputs"]["weight_type"], r["inputs"]["start_at"]) for r in (first, last)] == \
        [(0.7, "linear", 0.0), (0.9, "ease in", 0.1)]
    assert [source(api, r["inputs"]["mask"])["inputs"]["value"] for r in (first, last)] == [1.0, 0.5]
    assert [source(api, source(api, r["inputs"]["embeds"])["inputs"]["image"])["inputs"]["image"]
            for r in (first, last)] == [REF_A, REF_B]
    texts, negatives = nodes_of(api, "ConditioningCombine")
    for combined, text in ((texts, "a red cat"), (negatives, "blurry")):
        masked = source(api, combined["conditioning_2"])
        assert masked["class_type"] == "ConditioningSetMask"
        assert (masked["inputs"]["strength"], masked["inputs"]["set_cond_area"]) == (1.2, "default")
        assert source(api, masked["inputs"]["conditioning"])["inputs"]["text"] == text
        assert masked["inputs"]["mask"] == first["inputs"]["mask"]


def test_batch_with_ipadapter_weights_becomes_one_per_latent_with_frame_weights(info):
    api, report = migrate(batch_graph().api())
    (apply,) = nodes_of(api, "IPAdapterKitApply")
    assert (apply["batch_mode"], apply["weight"]) == ("one per latent", 1.0)
    ramp = source(api, apply["frame_weights"])
    assert ramp["class_type"] == "IPAdapterKitFrameWeights"
    assert ramp["inputs"] == {"timing": "ease in-out", "frames": 4, "start": 1.0, "end": 0.4}
    assert source(api, source(api, apply["embeds"])["inputs"]["image"])["class_type"] == "ImageBatch"
    ui, _ = migrate(batch_graph().ui(info))  # the weight widget turned socket becomes frame_weights, a socket too
    node = next(n for n in ui["nodes"] if n["type"] == "IPAdapterKitApply")
    slot = next(s for s in node["inputs"] if s["name"] == "frame_weights")
    assert slot["widget"] == {"name": "frame_weights"} and slot["link"] is not None


def test_tiled_becomes_encode_tiled_and_apply():
    """Faithful: cubiq's tiles, each under its own mask (Encode Tiled's regions); --ours: every tile's tokens on the
    whole picture (embeds, concat)."""
    for mode, tiling, wired in (("faithful", "cubiq (256 px tiles)", "regions"), ("ours", "along the long side", "embeds")):
        api, report = migrate(tiled_graph().api(), mode=mode)
        (apply,) = nodes_of(api, "IPAdapterKitApply")
        tiles = source(api, apply[wired])
        assert tiles["class_type"] == "IPAdapterKitEncodeTiled" and tiles["inputs"]["tiling"] == tiling
        if wired == "regions":
            assert apply["regions"][1] == 2 and "embeds" not in apply
        assert (apply["weight"], apply["weight_type"], apply["combine"]) == (0.7, "ease in", "concat")
        key = next(k for k, n in api.items() if n is tiles)
        assert nodes_of(api, "MaskToImage")[0]["mask"] == [key, 1]  # cubiq's masks output: our tile_masks
        notes = "\n".join(report.lines())
        assert "its own mask" in notes and "sharpening" in notes


def test_encoder_combine_save_and_embeds():
    api, report = migrate(embeds_graph().api())
    (apply,) = nodes_of(api, "IPAdapterKitApply")
    (combined,) = nodes_of(api, "IPAdapterKitCombineEmbeds")
    assert source(api, apply["embeds"])["inputs"] is combined and combined["method"] == "average"
    assert [source(api, combined[k])["inputs"]["weight"] for k in ("embeds_1", "embeds_2")] == [1.5, 0.6]
    assert (apply["weight"], apply["combine"]) == (0.8, "concat")
    (save,) = nodes_of(api, "IPAdapterKitSaveEmbeds")
    assert save["embeds"] == apply["embeds"] and save["filename_prefix"] == "IP_embeds"
    assert any(".safetensors" in line for line in report.lines())


def test_precise_boosts_are_kept_exactly():
    """--ours: a boost other than λ is a second Apply (tests/test_migrate_faithful.py: one Apply by default)."""
    api, report = migrate(precise_graph().api(), "ours")
    applies = nodes_of(api, "IPAdapterKitApply")
    assert [(a["weight"], a["weight_type"], a["layers"]) for a in applies] == [
        (0.8, "style transfer", "all"), (1.0, "style transfer precise", "composition"),  # style_boost on the layout blocks
        (0.35, "composition precise", "all"), (pytest.approx(0.45), "composition", "all"),  # the two add up to cubiq's
    ]
    assert not [line for line in report.lines() if "close otherwise" in line]  # exact: V only


def test_enhancer_and_layer_weights():
    api, report = migrate(enhancer_graph().api(), "ours")
    first, second = nodes_of(api, "IPAdapterKitApply")
    encode = source(api, first["embeds"])["inputs"]
    assert (encode["detail_tiles"], encode["detail_ratio"]) == (2, 0.5)
    # cubiq's blocks 3, 6 and 13 of SD1.5: input 5 (key 7), the middle block (key 31), output 9 (key 25)
    assert (second["layers"], second["custom_layer_weights"], second["weight_type"]) == ("custom", "7:0.8, 25:1, 31:0.35", "linear")
    assert any("middle block" in line and "IPAdapterMS" in line for line in report.lines())
    # faithful (the default): the middle block at 0, as cubiq never patches it
    api, report = migrate(enhancer_graph().api())
    first, second = nodes_of(api, "IPAdapterKitApply")
    assert (second["layers"], second["custom_layer_weights"], second["weight_type"]) == ("custom", "7:0.8, 25:1, 31:0", "linear")


# -- FaceID ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", FACEID_EXAMPLES)
def test_cubiqs_faceid_examples_leave_no_faceid_node_in_place_but_kolors_own(name, info):
    graph = FACEID_EXAMPLES[name]()
    for mode in ("faithful", "ours"):
        ui, report = migrate(graph.ui(info), mode)
        left = {report.left[key][0] for key in report.left}
        stays = {node["type"] for node in ui["nodes"] if is_cubiq(node["type"])}
        assert left == stays == (KOLORS_STAYS if name == "IPAdapter_FaceIDv2_Kolors" else set()), report.lines()
        problems = check_workflow(ui, info)  # valid but for the nodes left in place
        assert all("unknown node type" in p for p in problems), problems
        if not stays:  # both formats migrate alike (the editor's converts to the API's only without unknown nodes)
            assert without_meta(ui_to_api(ui, info)) == without_meta(migrate(graph.api(), mode)[0])


@pytest.mark.parametrize("name", FACEID_EXAMPLES)
def test_cubiqs_faceid_example_files_leave_no_faceid_node_in_place_but_kolors_own(name):
    """The files themselves, from a copy of cubiq's pack (``CUBIQ_PATH``; CI has none)."""
    if not CUBIQ_PATH:
        pytest.skip("CUBIQ_PATH is not set: no copy of cubiq's example workflows")
    workflow = json.loads((Path(CUBIQ_PATH).expanduser() / "examples" / f"{name}.json").read_text())
    migrated, report = migrate(workflow)
    stays = {node["type"] for node in migrated["nodes"] if node["type"] in FACEID_KINDS}
    assert stays == ({"IPAdapterFaceIDKolors", "IPAdapterInsightFaceLoader"} if "Kolors" in name else set())
    assert {kind for kind, _ in report.left.values()} == (KOLORS_STAYS if "Kolors" in name else set())
    assert "IPAdapterKitApply" in {node["type"] for node in migrated["nodes"]} or "Kolors" in name


def test_faceid_becomes_encode_face_and_apply():
    api, report = migrate(faceid_graph(0.8, 2.0).api(), family="sd15")
    (loader,) = nodes_of(api, "IPAdapterKitUnifiedLoaderFaceID")
    # cubiq's loader applies the LoRA at its lora_strength and loads buffalo_l
    assert loader == {"model": ["1", 0], "preset": "faceid-plusv2", "lora": "apply (sidecar or in the file)",
                      "lora_strength": 0.6, "pack": "buffalo_l", "provider": "CPU"}
    key = "5"  # the FaceID loader's id, which ours keeps
    (apply,) = nodes_of(api, "IPAdapterKitApply")
    assert (apply["model"], apply["ipadapter"], apply["weight"], apply["weight_type"]) == ([key, 0], [key, 1], 0.8, "linear")
    assert apply["layers"] == "custom" and apply["custom_layer_weights"].endswith("31:0")  # cubiq's middle block off
    (face,) = nodes_of(api, "IPAdapterKitEncodeFace")
    assert source(api, apply["embeds"])["inputs"] is face
    assert (face["face_analysis"], face["ipadapter"], face["image_encoder"], face["weight_faceidv2"]) == \
        ([key, 3], [key, 1], [key, 2], 2.0)
    assert source(api, face["negative_image"])["inputs"] == {"width": 224, "height": 224, "batch_size": 1, "color": 0}
    assert source(api, face["image"])["inputs"]["image"] == REF_A
    ours, _ = migrate(faceid_graph(0.8, 2.0).api(), "ours")
    (face,) = nodes_of(ours, "IPAdapterKitEncodeFace")
    assert "negative_image" not in face and nodes_of(ours, "IPAdapterKitApply")[0]["layers"] == "all"


def test_faceid_face_image_is_encode_faces_crops_and_portrait_needs_no_encoder():
    api, _ = migrate(FACEID_EXAMPLES["ipadapter_faceid_batch"]().api())
    face_key = next(k for k, n in api.items() if n["class_type"] == "IPAdapterKitEncodeFace")
    encodes = nodes_of(api, "IPAdapterKitEncode")  # the full-face adapter sees FaceID's aligned faces
    assert [e["image"] for e in encodes] == [[face_key, 1]]
    assert source(api, api[face_key]["inputs"]["image"])["class_type"] == "ImageBatch"
    api, _ = migrate(FACEID_EXAMPLES["ipadapter_portrait"]().api())
    (face,) = nodes_of(api, "IPAdapterKitEncodeFace")
    assert "image_encoder" not in face and "negative_image" not in face  # portrait: the face embedding only
    (loader,) = nodes_of(api, "IPAdapterKitUnifiedLoaderFaceID")
    (apply,) = nodes_of(api, "IPAdapterKitApply")
    assert loader["preset"] == "faceid-portrait" and apply["weight"] == 0.65
    assert apply["custom_layer_weights"].endswith("139:0")  # SDXL, from the checkpoint's name


def test_insightface_loader_model_loader_and_faceid_batch(info):
    g = Graph()
    checkpoint, positive, negative, latent = scene(g, batch=2)
    adapter = g.add("IPAdapterModelLoader", ipadapter_file=FACEID_PLUSV2_ADAPTER)
    vision = g.add("CLIPVisionLoader", clip_name=ENCODER)
    insightface = g.add("IPAdapterInsightFaceLoader", provider="ROCM", model_name="antelopev2")
    images = g.add("ImageBatch", image1=reference(g, REF_A), image2=reference(g, REF_B))
    negative_image = reference(g, REF_B)
    face = g.add("IPAAdapterFaceIDBatch", model=(checkpoint, 0), ipadapter=(adapter, 0), image=(images, 0),
                 insightface=(insightface, 0), clip_vision=(vision, 0), image_negative=negative_image, weight=0.7,
                 weight_type="ease in")
    sample(g, checkpoint, (face, 0), (positive, 0), (negative, 0), latent)
    ui, report = migrate(g.ui(info))
    assert check_workflow(ui, info) == [] and not report.left
    api, report = migrate(g.api())
    (analysis,) = nodes_of(api, "IPAdapterKitFaceAnalysisLoader")
    assert analysis == {"pack": "antelopev2", "provider": "auto", "detector_size": 640}
    (face,) = nodes_of(api, "IPAdapterKitEncodeFace")
    assert source(api, face["face_analysis"])["inputs"] is analysis
    assert source(api, face["ipadapter"])["inputs"] == {"ipadapter_file": FACEID_PLUSV2_ADAPTER}
    assert source(api, face["image_encoder"])["class_type"] == "IPAdapterKitEncoderFromCLIPVision"
    assert face["negative_image"] == list(negative_image)  # plusv2: the connected negative image, as cubiq's
    (apply,) = nodes_of(api, "IPAdapterKitApply")
    assert (apply["batch_mode"], apply["weight"], apply["weight_type"]) == ("one per latent", 0.7, "ease in")
    assert "provider 'ROCM' became auto" in "\n".join(report.lines())
    # faceid reads no CLIP features: no encoder, and cubiq's image_negative is not used
    g.nodes[adapter]["inputs"]["ipadapter_file"] = "ip-adapter-faceid_sd15.bin"
    api, report = migrate(g.api())
    (face,) = nodes_of(api, "IPAdapterKitEncodeFace")
    assert "image_encoder" not in face and "negative_image" not in face
    assert "image_negative is not used" in "\n".join(report.lines())


def test_faceid_without_insightface_stays_with_the_reason():
    g = Graph()
    checkpoint, positive, negative, latent = scene(g)
    adapter = g.add("IPAdapterModelLoader", ipadapter_file="ip-adapter-faceid-plusv2_sd15.bin")
    vision = g.add("CLIPVisionLoader", clip_name=ENCODER)
    face = g.add("IPAdapterFaceID", model=(checkpoint, 0), ipadapter=(adapter, 0), image=reference(g),
                 clip_vision=(vision, 0))
    sample(g, checkpoint, (face, 0), (positive, 0), (negative, 0), latent)
    api, report = migrate(g.api())
    assert api[face]["class_type"] == "IPAdapterFaceID" and "insightface is not connected" in report.left[face][1]
    g.nodes[face]["inputs"]["insightface"] = [g.add("IPAdapterInsightFaceLoader", provider="CUDA"), 0]
    api, report = migrate(g.api())
    assert not report.left
    (face,) = nodes_of(api, "IPAdapterKitEncodeFace")
    assert source(api, face["image_encoder"])["class_type"] == "IPAdapterKitEncoderFromCLIPVision"
    assert nodes_of(api, "IPAdapterKitFaceAnalysisLoader")[0]["provider"] == "CUDA"


def test_a_workflow_without_cubiq_nodes_comes_back_as_it_was(info):
    path = REPO_ROOT / "workflows" / "12-batch-frame-weights.json"
    workflow = json.loads(path.read_text())
    migrated, report = migrate(copy.deepcopy(workflow))
    assert ui_to_api(migrated, info) == ui_to_api(workflow, info)
    assert [n["id"] for n in migrated["nodes"]] == [n["id"] for n in workflow["nodes"]]
    assert [n["pos"] for n in migrated["nodes"]] == [n["pos"] for n in workflow["nodes"]]
    assert report.lines()[1:] == ["summary: 0 cubiq nodes, 0 replaced by 0 nodes of this pack, 0 left in place, "
                                  "0 to check (faithful mode)"]


def test_links_through_reroutes_from_cubiq_nodes_are_taken_straight(info):
    workflow = simple_graph().ui(info)
    apply = next(n for n in workflow["nodes"] if n["type"] == "IPAdapter")
    slot = next(s for s in apply["inputs"] if s["name"] == "ipadapter")
    link = next(link for link in workflow["links"] if link[0] == slot["link"])
    reroute = {"id": 99, "type": "Reroute", "pos": [0, 0], "size": [75, 26], "flags": {}, "order": 0, "mode": 0,
               "inputs": [{"name": "", "type": "*", "link": 100}],
               "outputs": [{"name": "", "type": "IPADAPTER", "links": [link[0]], "slot_index": 0}], "properties": {}}
    workflow["links"].append([100, link[1], link[2], 99, 0, "IPADAPTER"])
    loader = next(n for n in workflow["nodes"] if n["id"] == link[1])
    loader["outputs"][link[2]]["links"] = [100]
    link[1], link[2] = 99, 0
    workflow["nodes"].append(reroute)
    migrated, report = migrate(workflow)
    assert check_workflow(migrated, info) == [] and report.left == {}
    assert 99 not in {n["id"] for n in migrated["nodes"]}


# -- nodes left in place ----------------------------------------------------------------------

def test_nodes_no_rule_maps_stay_and_are_reported_by_id(info):
    graph = kolors_graph()
    ui, report = migrate(graph.ui(info))
    kinds = {key: node["class_type"] for key, node in graph.nodes.items()}
    left = {int(key) for key, kind in kinds.items() if kind in KOLORS_STAYS}
    assert set(report.left) == left
    lines = report.lines()
    for key in left:
        (line,) = [line for line in lines if line.startswith(f"left in place: node {key} ")]
        assert kinds[str(key)] in line
    assert "Kolors is not a model family" in next(line for line in lines if "(IPAdapterFaceIDKolors):" in line)
    assert "kept as well" in next(line for line in lines if "(IPAdapterInsightFaceLoader):" in line)
    assert lines[-1].startswith("summary: 4 cubiq nodes, 2 replaced by 1 nodes of this pack, 3 left in place")
    # what stays takes what it took; what ours replaced is valid; only the nodes left in place are unknown here
    problems = check_workflow(ui, info)
    assert problems and all("unknown node type" in p and any(f"node {key} " in p for key in left) for p in problems)
    kolors = next(n for n in ui["nodes"] if n["type"] == "IPAdapterFaceIDKolors")
    slot = next(s for s in kolors["inputs"] if s["name"] == "image_negative")
    link = next(link for link in ui["links"] if link[0] == slot["link"])
    assert next(n for n in ui["nodes"] if n["id"] == link[1])["type"] == "IPAdapterKitNoise"  # an IMAGE: rewired to ours


def test_pickled_embeds_stay_with_what_needs_them(info):
    graph = embeds_graph(load=True)
    ui, report = migrate(graph.ui(info))
    kinds = {int(key): node["class_type"] for key, node in graph.nodes.items()}
    assert {kinds[key] for key in report.left} == {"IPAdapterLoadEmbeds", "IPAdapterEmbeds", "IPAdapterUnifiedLoader"}
    assert "pickles" in next(line for line in report.lines() if "(IPAdapterLoadEmbeds)" in line)
    assert len(nodes_of(migrate(graph.api())[0], "IPAdapterKitApply")) == 1  # the first Embeds is ours
    problems = check_workflow(ui, info)
    assert problems and all("unknown node type" in p for p in problems)


@pytest.mark.parametrize("change, reason", [
    (lambda g, key: g.nodes[key]["inputs"].update(weight=4.5), "outside this pack's range"),
    (lambda g, key: g.nodes[key]["inputs"].update(combine_embeds="bogus"), "'bogus' has no counterpart"),
    (lambda g, key: g.nodes[key]["inputs"].pop("clip_vision"), "no CLIP vision"),
])
def test_options_ours_lacks_leave_the_node_in_place(change, reason):
    graph = negative_image_graph()
    key = next(k for k, n in graph.nodes.items() if n["class_type"] == "IPAdapterAdvanced")
    change(graph, key)
    api, report = migrate(graph.api())
    assert api[key]["class_type"] == "IPAdapterAdvanced" and reason in report.left[key][1]
    assert not nodes_of(api, "IPAdapterKitApply")


def test_combine_max_is_reported():
    graph = embeds_graph()
    key = next(k for k, n in graph.nodes.items() if n["class_type"] == "IPAdapterCombineEmbeds")
    graph.nodes[key]["inputs"]["method"] = "max"
    api, report = migrate(graph.api())
    assert "'max' has no counterpart" in report.left[key][1] and api[key]["class_type"] == "IPAdapterCombineEmbeds"


# -- the command line -------------------------------------------------------------------------

def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "migrate", *map(str, args)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


def test_command_line_writes_the_migrated_workflow_and_reports(tmp_path, info):
    source_path, target = tmp_path / "cubiq.json", tmp_path / "ours.json"
    source_path.write_text(json.dumps(kolors_graph().ui(info)))
    before = source_path.read_bytes()
    result = run_cli(source_path, target)
    assert result.returncode == 0, result.stderr
    assert source_path.read_bytes() == before
    written = json.loads(target.read_text())
    assert any(node["type"] == "IPAdapterKitNoise" for node in written["nodes"])
    lines = result.stdout.splitlines()
    assert lines[0] == f"wrote {target} (ui format)" and lines[-1].startswith("summary: 4 cubiq nodes")
    assert len([line for line in lines if line.startswith("left in place: node ")]) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cubiq.json", "ours.json"]


def test_the_migrator_loads_neither_torch_nor_comfyui():
    code = ("import sys, migrate.__main__; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'comfy', 'folder_paths', 'nodes'}))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not JSON"),
    ("[1, 2]", "not a ComfyUI workflow"),
    ('{"nodes": 3, "links": []}', "not a ComfyUI workflow"),
    ('{"nodes": [{"id": 1}], "links": []}', "not a ComfyUI workflow"),
    (None, "cannot read"),
    ("same", "is the input"),
])
def test_bad_input_is_a_one_line_error(tmp_path, content, message):
    source_path, target = tmp_path / "in.json", tmp_path / "out.json"
    if content == "same":
        source_path.write_text(json.dumps(simple_graph().api()))
        target = source_path
    elif content is not None:
        source_path.write_text(content)
    before = source_path.read_bytes() if source_path.exists() else None
    result = run_cli(source_path, target)
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: ") and message in line
    assert content == "same" or "expected" in line, line  # what was found, and what was expected
    assert (source_path.read_bytes() if source_path.exists() else None) == before
    assert content == "same" or not target.exists()


def test_out_appears_whole_or_not_at_all(tmp_path, monkeypatch, capsys):
    """A write that fails half way leaves the old OUT as it was, and no temporary file."""
    from migrate.__main__ import main

    source_path, target = tmp_path / "in.json", tmp_path / "out.json"
    source_path.write_text(json.dumps(simple_graph().api()))
    target.write_text("old")
    real_write = Path.write_text

    def fail_half_way(path, text, *args, **kwargs):
        real_write(path, text[: len(text) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", fail_half_way)
    assert main([str(source_path), str(target)]) == 2
    monkeypatch.undo()
    assert "No space left on device" in capsys.readouterr().err
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["in.json", "out.json"]
    assert main([str(source_path), str(target)]) == 0
    assert json.loads(target.read_text())["7"]["class_type"] == "IPAdapterKitApply"


# -- running migrated graphs ------------------------------------------------------------------

HEADLESS = ["unified_negative_image", "regional", "embeds", "ipadapter_faceid"]  # FaceID: the face pack of models_server


@pytest.mark.slow
@pytest.mark.parametrize("name", HEADLESS)
def test_a_migrated_graph_runs_headless_and_its_image_prompt_acts(name, models_server):
    api, report = migrate(GRAPHS[name]().api())
    assert not report.left

    def render(graph, tag):
        result = models_server.run_prompt(shrink(graph, 64, 1, prefix=f"migrated/{name}-{tag}"))
        return result.load_images()[0]

    image, off = render(api, "on"), render(with_weight(api, 0.0), "off")
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()
    assert np.abs(image - off).mean() > 1e-3, "the migrated image prompt has no effect"


def constant(value):
    """A test-only node that outputs ``value``."""
    return type("Constant", (), {"INPUT_TYPES": classmethod(lambda cls: {"required": {}}), "FUNCTION": "get",
                                 "get": lambda self: (value,)})


def execute(graph: dict, classes: dict) -> dict:
    """Run an API-format graph in this process, node by node as ComfyUI does (no cache, no validation)."""
    import torch

    done = {}

    def outputs(key):
        if key not in done:
            node = graph[key]
            kwargs = {name: outputs(v[0])[v[1]] if isinstance(v, list) else v for name, v in node["inputs"].items()}
            cls = classes[node["class_type"]]
            with torch.inference_mode():
                done[key] = getattr(cls(), cls.FUNCTION)(**kwargs)
        return done[key]

    return {key: outputs(key) for key in graph}


def test_the_migrated_graph_gives_the_latents_of_cubiqs(cubiq, comfy, tmp_path):
    """IPAdapterAdvanced (one reference, linear, V only) through cubiq's pack, and migrated through ours."""
    import folder_paths
    import torch
    from safetensors.torch import save_file

    from devtools.adapter_factory import random_adapter
    from devtools.comfy_import import import_pack
    from devtools.comfyui_harness import build_sd15_model_patcher
    from cubiq_pack import small_clip_vision

    pack = import_pack()
    folder = tmp_path / "ipadapter"
    folder.mkdir()
    adapter = random_adapter("base", base_width=64, seed=5)
    save_file({f"{group}.{k}": (v * 5 if group == "ip_adapter" else v).contiguous()
               for group, tensors in adapter.items() for k, v in tensors.items()}, str(folder / ADAPTER))
    folder_paths.add_model_folder_path("ipadapter", str(folder))
    context = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(1))

    class Sample:
        FUNCTION = "sample"

        def sample(self, model):
            import comfy.sample

            latent = torch.zeros(1, 4, 8, 8)
            noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(2))
            positive, negative = [[context, {}]], [[torch.zeros_like(context), {}]]
            return (comfy.sample.sample(model, noise, 3, 5.0, "euler", "normal", positive, negative, latent, seed=2),)

    pixels = torch.randint(0, 256, (1, 224, 224, 3), generator=torch.Generator().manual_seed(3)) / 255.0
    classes = {**cubiq.NODE_CLASS_MAPPINGS, **pack.NODE_CLASS_MAPPINGS, "Sample": Sample,
               "TestModel": constant(build_sd15_model_patcher(64, seed=0)), "TestImage": constant(pixels),
               "TestCLIPVision": constant(small_clip_vision(comfy, seed=0))}
    graph = {
        "1": {"class_type": "TestModel", "inputs": {}}, "2": {"class_type": "TestImage", "inputs": {}},
        "3": {"class_type": "TestCLIPVision", "inputs": {}},
        "4": {"class_type": "IPAdapterModelLoader", "inputs": {"ipadapter_file": ADAPTER}},
        "5": {"class_type": "IPAdapterAdvanced", "inputs": {
            "model": ["1", 0], "ipadapter": ["4", 0], "image": ["2", 0], "clip_vision": ["3", 0], "weight": 0.8,
            "weight_type": "linear", "combine_embeds": "concat", "start_at": 0.0, "end_at": 1.0, "embeds_scaling": "V only"}},
        "6": {"class_type": "Sample", "inputs": {"model": ["5", 0]}},
    }
    ours, report = migrate(copy.deepcopy(graph))
    assert not report.left and ours["5"]["class_type"] == "IPAdapterKitApply"
    # cubiq's pack never patches the middle block (SD1.5 key 31): the faithful migration leaves it out of ours too
    assert ours["5"]["inputs"]["layers"] == "custom" and ours["5"]["inputs"]["custom_layer_weights"].endswith("31:0")
    theirs_latent = execute(graph, classes)["6"][0]
    ours_latent = execute(ours, classes)["6"][0]
    plain = execute({**graph, "6": {"class_type": "Sample", "inputs": {"model": ["1", 0]}}}, classes)["6"][0]
    difference = (ours_latent - theirs_latent).abs().max().item()
    effect = (theirs_latent - plain).abs().max().item()
    assert effect > 1e-2, "cubiq's image prompt has no effect: the comparison would show nothing"
    assert difference <= 1e-4 * max(1.0, theirs_latent.abs().max().item()), (difference, effect)


# -- the graph editor -------------------------------------------------------------------------

try:  # the browser test's editor fixture and LOAD script; its module skips itself without Playwright / Chromium
    from test_workflows_browser import LOAD, editor, missing_nodes_dialog, named_links  # noqa: F401
except pytest.skip.Exception as missing:
    BROWSER_MISSING = str(missing)

    @pytest.fixture
    def editor():
        pytest.skip(BROWSER_MISSING)


def test_a_migrated_workflow_loads_in_the_graph_editor(editor, info):
    graph = regional_graph()  # with a plus adapter: the faithful rules add an EmptyImage and custom layer weights
    graph.nodes[next(k for k, n in graph.nodes.items() if n["class_type"] == "IPAdapterUnifiedLoader")]["inputs"].update(
        preset="PLUS (high strength)")
    workflow, _ = migrate(graph.ui(info, packed=True), family="sd15")
    assert {"EmptyImage", "IPAdapterKitRegion"} <= {node["type"] for node in workflow["nodes"]}
    editor.errors.clear()
    state = editor.evaluate(LOAD, workflow)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    editor.screenshot(path=str(ARTIFACTS / "browser-migrated-regional.png"))
    assert not [text for text in state["dialogs"] if missing_nodes_dialog(text)], state["dialogs"]
    assert not editor.errors, editor.errors
    shown = {node["id"]: node for node in state["nodes"]}
    saved = {node["id"]: node for node in state["saved"]["nodes"]}
    for node in workflow["nodes"]:
        assert shown[node["id"]]["type"] == node["type"] and node["type"] in state["registered"]
        assert saved[node["id"]].get("widgets_values", []) == node.get("widgets_values", []), node["type"]
    assert sorted(named_links(state["saved"])) == sorted(named_links(workflow))
