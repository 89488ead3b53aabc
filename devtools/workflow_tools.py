"""The shared workflows in ``workflows/``: check them against a live ComfyUI, convert them to API format.

A UI-format workflow (what ComfyUI's graph editor saves) stores each node's
widget values as a positional list, ``widgets_values``, in the order the editor
creates the widgets from the node's definition in ``GET /object_info``:
required then optional inputs, every input whose type is a list (a combo),
``INT``, ``FLOAT``, ``STRING`` or ``BOOLEAN`` (unless ``forceInput``) is a
widget, and so is a ``COMBO`` input (the node schema of later ComfyUIs, whose
choices are in its ``options``); an ``INT`` named ``seed`` / ``noise_seed`` (or with
``control_after_generate``) is followed by the "control after generate" value;
a node whose required ``image`` input has ``image_upload`` gets an ``upload``
button after its required widgets (its value is ``"image"``). Everything else
is a socket. This module reads that layout from the live definitions
(:func:`widget_layout`), and with it

* :func:`check_workflow` lists every problem of a UI workflow against those
  definitions (unknown node type, a link between sockets of different types, a
  widget value out of range or not in its combo list, a required input left
  unconnected), each message naming the node by id, title and type;
* :func:`ui_to_api` converts a UI workflow to the API format that
  ``POST /prompt`` takes (the twins in ``workflows/api/``);
* :func:`overlapping_nodes` lists the nodes of a UI workflow that lie over
  one another (title bars included);
* :func:`shrink`, :func:`with_weight`, :func:`with_references`,
  :func:`bypassed` derive the graphs the tests run.

Command line, from the repository root (starts a ComfyUI with this pack, like the tests)::

    python -m devtools.workflow_tools check [FILE ...]   # check UI workflows (default: all)
    python -m devtools.workflow_tools api                # rewrite workflows/api/ from the UI files

``--url http://127.0.0.1:8188`` checks against a running ComfyUI instead (your
own, with its other packs).
"""
from __future__ import annotations

import copy
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from ipadapter.faces import PACKS as FACE_PACK_NAMES

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKFLOW_DIR = REPO_ROOT / "workflows"
API_DIR = WORKFLOW_DIR / "api"

# Nodes that exist only in the editor (never sent to the server). Only the
# plain Note: the March-2024 editor has no MarkdownNote, and Reroute /
# PrimitiveNode would need rewiring in the conversion.
FRONTEND_ONLY = {"Note"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
SEED_NAMES = {"seed", "noise_seed"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}

# The files the workflows name, by model folder: the names users already have
# (and the trainer's export, copied under this name; README.md, "Workflows").
CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
ADAPTER = "ip-adapter_sd15.safetensors"
TRAINED_ADAPTER = "ip-adapter_sd15_trained.safetensors"
SDXL_CHECKPOINT = "sd_xl_base_1.0.safetensors"
SDXL_ADAPTER = "ip-adapter_sdxl_vit-h.safetensors"
SDXL_PLUS_ADAPTER = "ip-adapter-plus_sdxl_vit-h.safetensors"
ENCODER = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"  # SD1.5 and the SDXL _vit-h adapters
# Flux.1 dev and SD3.5 Large as ComfyUI's own examples load them (ComfyUI_examples flux/flux_dev_example.png,
# sd3/sd3.5_text_encoders_example.png): the transformer, the text encoders and the VAE in files of their own
# (SD3.5 Large's checkpoint holds its VAE, not its text encoders); the text encoders are shared by both.
FLUX_MODEL = "flux1-dev.safetensors"  # models/diffusion_models
FLUX_VAE = "ae.safetensors"  # models/vae
SD35_CHECKPOINT = "sd3.5_large.safetensors"  # models/checkpoints
CLIP_L_TEXT, CLIP_G_TEXT, T5XXL_TEXT = "clip_l.safetensors", "clip_g.safetensors", "t5xxl_fp16.safetensors"
# The DiT adapters under the first of their released names in the registry (ipadapter/registry/families.py), and
# the image encoders under the names of ComfyUI's own downloads (Comfy-Org's clip_vision files)
XLABS_ADAPTER = "flux-ip-adapter-v2.safetensors"  # XLabs-AI/flux-ip-adapter-v2
INSTANTX_FLUX_ADAPTER = "flux.1-dev-ip-adapter.bin"  # InstantX/FLUX.1-dev-IP-Adapter's ip-adapter.bin
SD35_ADAPTER = "sd3.5-large-ip-adapter.bin"  # InstantX/SD3.5-Large-IP-Adapter's ip-adapter.bin
CLIP_L_ENCODER = "clip_vision_l.safetensors"  # OpenAI CLIP ViT-L/14: XLabs
SIGLIP_ENCODER = "sigclip_vision_patch14_384.safetensors"  # SigLIP so400m-patch14-384: InstantX
# FaceID (h94/IP-Adapter-FaceID's names): plus v2 for SD1.5 with its LoRA, portrait for SDXL (no LoRA, no encoder);
# the face models: the InsightFace pack cubiq's users have in models/insightface/models/
FACEID_PLUSV2_ADAPTER = "ip-adapter-faceid-plusv2_sd15.bin"
FACEID_PLUSV2_LORA = "ip-adapter-faceid-plusv2_sd15_lora.safetensors"  # models/loras
SDXL_PORTRAIT_ADAPTER = "ip-adapter-faceid-portrait_sdxl.bin"
FACE_PACK = "buffalo_l"
REFERENCE_IMAGES = ("reference.png", "reference_b.png")
SOURCE_IMAGES = ("source.png", "source_masked.png")
# A workflow's family is that of its base model (a checkpoint, or Flux's diffusion model); each family has its
# own adapters, each adapter the image encoder it was trained with.
FAMILY_OF_CHECKPOINT = {CHECKPOINT: "sd15", SDXL_CHECKPOINT: "sdxl", SD35_CHECKPOINT: "sd35"}
FAMILY_OF_DIFFUSION_MODEL = {FLUX_MODEL: "flux"}
FAMILY_OF_BASE_MODEL = {**FAMILY_OF_CHECKPOINT, **FAMILY_OF_DIFFUSION_MODEL}
ADAPTERS_OF_FAMILY = {"sd15": {ADAPTER, TRAINED_ADAPTER, FACEID_PLUSV2_ADAPTER},
                      "sdxl": {SDXL_ADAPTER, SDXL_PLUS_ADAPTER, SDXL_PORTRAIT_ADAPTER},
                      "flux": {XLABS_ADAPTER, INSTANTX_FLUX_ADAPTER}, "sd35": {SD35_ADAPTER}}
ENCODER_OF_ADAPTER = {**{adapter: ENCODER for adapter in (ADAPTER, TRAINED_ADAPTER, SDXL_ADAPTER, SDXL_PLUS_ADAPTER,
                                                            FACEID_PLUSV2_ADAPTER)},
                      XLABS_ADAPTER: CLIP_L_ENCODER, INSTANTX_FLUX_ADAPTER: SIGLIP_ENCODER, SD35_ADAPTER: SIGLIP_ENCODER}
USER_FILES = {
    "checkpoints": set(FAMILY_OF_CHECKPOINT),
    "diffusion_models": set(FAMILY_OF_DIFFUSION_MODEL),
    "text_encoders": {CLIP_L_TEXT, CLIP_G_TEXT, T5XXL_TEXT},
    "vae": {FLUX_VAE},
    "ipadapter": set().union(*ADAPTERS_OF_FAMILY.values()),
    "clip_vision": set(ENCODER_OF_ADAPTER.values()),
    "loras": {FACEID_PLUSV2_LORA},
    "insightface": {FACE_PACK, *FACE_PACK_NAMES},  # the packs cubiq's loader offers: migrated graphs name them
    "input": {*REFERENCE_IMAGES, *SOURCE_IMAGES},
}
# Combo inputs whose choices are the files of a folder: on a test server the
# folder may lack the user's file, so the names above are accepted as well.
FILE_INPUTS = {
    ("CheckpointLoaderSimple", "ckpt_name"): "checkpoints",
    ("UNETLoader", "unet_name"): "diffusion_models",
    **{("DualCLIPLoader", f"clip_name{i}"): "text_encoders" for i in (1, 2)},
    **{("TripleCLIPLoader", f"clip_name{i}"): "text_encoders" for i in (1, 2, 3)},
    ("VAELoader", "vae_name"): "vae",
    ("IPAdapterKitLoader", "ipadapter_file"): "ipadapter",
    ("IPAdapterKitSimple", "ipadapter_file"): "ipadapter",
    ("IPAdapterKitEncoderLoader", "clip_name"): "clip_vision",
    ("IPAdapterKitSimple", "clip_name"): "clip_vision",
    ("CLIPVisionLoader", "clip_name"): "clip_vision",
    ("LoraLoaderModelOnly", "lora_name"): "loras",
    **{(kind, "pack"): "insightface" for kind in ("IPAdapterKitFaceAnalysisLoader", "IPAdapterKitUnifiedLoaderFaceID")},
    ("LoadImage", "image"): "input",
}
# The empty latents the workflows start from: SD1.5/SDXL's 4 channels, Flux/SD3's 16.
LATENT_NODES = ("EmptyLatentImage", "EmptySD3LatentImage")
OUR_PREFIX = "IPAdapterKit"
# Apply IP-Adapter, the everyday node and the advanced one
APPLY_NODES = {"IPAdapterKitApplySimple", "IPAdapterKitApply"}
# Our nodes that output a patched MODEL (their "model" input is the unpatched one).
OUR_MODEL_NODES = APPLY_NODES | {"IPAdapterKitSimple"}
# Our nodes with a λ of their own (a Region's weight acts through the Apply its chain feeds).
OUR_WEIGHTED_NODES = OUR_MODEL_NODES | {"IPAdapterKitRegion"}
TITLE_HEIGHT = 30  # LiteGraph.NODE_TITLE_HEIGHT: a node's title bar lies above its pos


class WorkflowError(ValueError):
    """A workflow that does not match the live node definitions."""


@dataclass(frozen=True)
class Widget:
    name: str
    spec: tuple | None  # the input's definition; None for the editor's extra widgets
    extra: str | None = None  # "control_after_generate" or "upload"

    @property
    def kind(self):
        return "COMBO" if isinstance(self.spec[0], list) else self.spec[0]

    @property
    def options(self) -> dict:
        return self.spec[1] if len(self.spec) > 1 and isinstance(self.spec[1], dict) else {}

    @property
    def choices(self) -> list:
        """A combo's choices: the list itself (``[[...], {...}]``), or the options of the later
        ``["COMBO", {"options": [...]}]`` form."""
        return list(self.spec[0]) if isinstance(self.spec[0], list) else list(self.options.get("options", []))


def node_inputs(definition: dict) -> dict:
    return {**definition["input"].get("required", {}), **definition["input"].get("optional", {})}


def is_widget(spec) -> bool:
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return (isinstance(spec[0], list) or spec[0] in WIDGET_TYPES or spec[0] == "COMBO") and not options.get("forceInput")


def widget_layout(definition: dict) -> list[Widget]:
    """The widgets the editor creates for a node definition, in ``widgets_values`` order."""
    layout = []
    required = definition["input"].get("required", {})
    for section in ("required", "optional"):
        for name, spec in definition["input"].get(section, {}).items():
            if not is_widget(spec):
                continue
            widget = Widget(name, tuple(spec))
            layout.append(widget)
            if widget.options.get("control_after_generate") or (widget.kind == "INT" and name in SEED_NAMES):
                layout.append(Widget("control_after_generate", None, "control_after_generate"))
        if section == "required" and any(
                len(spec) > 1 and isinstance(spec[1], dict) and spec[1].get("image_upload") for spec in required.values()):
            layout.append(Widget("upload", None, "upload"))
    return layout


def socket_inputs(definition: dict) -> dict[str, str]:
    """Input name -> socket type of the inputs that are sockets (not widgets)."""
    return {name: spec[0] for name, spec in node_inputs(definition).items() if not is_widget(spec)}


def node_label(node: dict, info: dict | None = None) -> str:
    kind = node.get("type")
    title = node.get("title") or ((info or {}).get(kind, {}).get("display_name")) or kind
    return f"node {node.get('id')} '{title}' ({kind})"


def check_value(widget: Widget, value, node_type: str) -> str | None:
    """Why a widget value is not acceptable for its input, or None."""
    if widget.extra == "control_after_generate":
        return None if value in CONTROL_VALUES else f"{widget.name} = {value!r} is not one of {sorted(CONTROL_VALUES)}"
    if widget.extra == "upload":
        return None
    kind, options, name = widget.kind, widget.options, widget.name
    if kind == "COMBO":
        choices = widget.choices
        folder = FILE_INPUTS.get((node_type, name))
        if value in choices or (folder and value in USER_FILES[folder]):
            return None
        shown = choices if len(choices) <= 12 else choices[:12] + ["..."]
        expected = f"one of {shown}" + (f" or a user file of models/{folder} {sorted(USER_FILES[folder])}" if folder else "")
        return f"{name} = {value!r} is not {expected}"
    if kind in ("INT", "FLOAT"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"{name} = {value!r} is not a number"
        if kind == "INT" and value != int(value):
            return f"{name} = {value!r} is not an integer"
        if "min" in options and value < options["min"]:
            return f"{name} = {value!r} is below the minimum {options['min']}"
        if "max" in options and value > options["max"]:
            return f"{name} = {value!r} is above the maximum {options['max']}"
        return None
    if kind == "STRING":
        return None if isinstance(value, str) else f"{name} = {value!r} is not a string"
    if kind == "BOOLEAN":
        return None if isinstance(value, bool) else f"{name} = {value!r} is not true/false"
    return None


def check_workflow(workflow: dict, info: dict) -> list[str]:
    """Every problem of a UI-format workflow against the live definitions ``info`` (``GET /object_info``)."""
    problems = []
    if not isinstance(workflow.get("nodes"), list) or not isinstance(workflow.get("links"), list):
        return ["not a UI-format workflow (no 'nodes' and 'links' lists)"]
    nodes = {node["id"]: node for node in workflow["nodes"]}
    for node in workflow["nodes"]:
        label = node_label(node, info)
        kind = node.get("type")
        if kind in FRONTEND_ONLY:
            continue
        if kind not in info:
            problems.append(f"{label}: unknown node type '{kind}': this ComfyUI has no such node (is the pack that provides it installed?)")
            continue
        definition = info[kind]
        layout = widget_layout(definition)
        values = node.get("widgets_values", [])
        if not isinstance(values, list) or len(values) != len(layout):
            problems.append(f"{label}: {len(values) if isinstance(values, list) else values!r} widget values, "
                            f"expected {len(layout)} ({', '.join(w.name for w in layout)})")
        else:
            for widget, value in zip(layout, values):
                if why := check_value(widget, value, kind):
                    problems.append(f"{label}: {why}")
        declared = socket_inputs(definition)
        all_inputs = node_inputs(definition)
        linked = set()
        for slot in node.get("inputs", []) or []:
            name = slot.get("name")
            if name not in all_inputs:
                problems.append(f"{label}: has an input '{name}' that {kind} does not have")
                continue
            expected = declared.get(name, "COMBO" if isinstance(all_inputs[name][0], list) else all_inputs[name][0])
            if slot.get("type") != expected:
                problems.append(f"{label}: input '{name}' has type {slot.get('type')}, the node declares {expected}")
            if slot.get("link") is not None:
                linked.add(name)
        for name in definition["input"].get("required", {}):
            if name in declared and name not in linked:
                problems.append(f"{label}: required input '{name}' ({declared[name]}) is not connected")
        outputs = definition.get("output", [])
        for index, slot in enumerate(node.get("outputs", []) or []):
            if index >= len(outputs):
                problems.append(f"{label}: has output {index} '{slot.get('name')}', {kind} has only {len(outputs)}")
            elif slot.get("type") != ("COMBO" if isinstance(outputs[index], list) else outputs[index]):
                problems.append(f"{label}: output {index} has type {slot.get('type')}, the node declares {outputs[index]}")
    for link in workflow["links"]:
        if not isinstance(link, list) or len(link) != 6:
            problems.append(f"link {link!r}: expected [id, from_node, from_slot, to_node, to_slot, type]")
            continue
        link_id, source_id, source_slot, target_id, target_slot, kind = link
        source, target = nodes.get(source_id), nodes.get(target_id)
        if source is None or target is None:
            problems.append(f"link {link_id}: joins node {source_id} to node {target_id}, and one of them does not exist")
            continue
        where = f"link {link_id} from {node_label(source, info)} to {node_label(target, info)}"
        if source.get("type") in info:
            outputs = info[source["type"]].get("output", [])
            declared = outputs[source_slot] if source_slot < len(outputs) else None
            if declared != kind:
                problems.append(f"{where}: carries {kind}, but output {source_slot} of {source['type']} is {declared}")
        if target.get("type") in info:
            slots = target.get("inputs", []) or []
            name = slots[target_slot].get("name") if target_slot < len(slots) else None
            spec = node_inputs(info[target["type"]]).get(name)
            declared = None if spec is None else ("COMBO" if isinstance(spec[0], list) else spec[0])
            if declared != kind:
                problems.append(f"{where}: carries {kind}, but input {target_slot} ('{name}') of {target['type']} takes {declared}")
            elif slots[target_slot].get("link") != link_id:
                problems.append(f"{where}: input '{name}' does not refer back to the link")
        source_outputs = source.get("outputs", []) or []
        if source_slot >= len(source_outputs) or link_id not in (source_outputs[source_slot].get("links") or []):
            problems.append(f"{where}: output {source_slot} of the source node does not list the link")
    return problems


def assert_workflow_valid(workflow: dict, info: dict, name: str = "workflow") -> None:
    problems = check_workflow(workflow, info)
    if problems:
        raise WorkflowError(f"{name}: " + "; ".join(problems))


# -- API format ---------------------------------------------------------------

def ui_to_api(workflow: dict, info: dict) -> dict:
    """The API-format graph (``POST /prompt``) of a UI workflow; node ids become strings."""
    assert_workflow_valid(workflow, info)
    links = {link[0]: link for link in workflow["links"]}
    graph = {}
    for node in sorted(workflow["nodes"], key=lambda n: n["id"]):
        if node["type"] in FRONTEND_ONLY:
            continue
        if node.get("mode", 0) != 0:
            raise WorkflowError(f"{node_label(node, info)}: muted or bypassed nodes are not supported here")
        inputs = {widget.name: value for widget, value in zip(widget_layout(info[node["type"]]), node.get("widgets_values", []))
                  if widget.extra is None}
        for slot in node.get("inputs", []) or []:
            if slot.get("link") is not None:
                link = links[slot["link"]]
                inputs[slot["name"]] = [str(link[1]), link[2]]
        title = node.get("title") or info[node["type"]].get("display_name") or node["type"]
        graph[str(node["id"])] = {"class_type": node["type"], "inputs": inputs, "_meta": {"title": title}}
    return graph


def load_workflow(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def ui_workflow_files() -> list[Path]:
    """The UI workflows in their numbers' order (1, 2, 3a, 3b, ..., 9, 10)."""
    return sorted(WORKFLOW_DIR.glob("*.json"), key=workflow_order)


def workflow_order(path: Path) -> tuple[int, str]:
    number = Path(path).name.split("-", 1)[0]
    digits = number.rstrip("abcdefghijklmnopqrstuvwxyz")
    return (int(digits) if digits.isdigit() else 10**6, Path(path).name)


BASE_MODEL_INPUTS = {"CheckpointLoaderSimple": "ckpt_name", "UNETLoader": "unet_name"}


def base_model_files(graph: dict) -> list[str]:
    """The files an API-format workflow loads its base model (MODEL) from: checkpoints, diffusion models."""
    return [node["inputs"][BASE_MODEL_INPUTS[node["class_type"]]] for node in graph.values()
            if node["class_type"] in BASE_MODEL_INPUTS]


def workflow_family(graph: dict) -> str:
    """``"sd15"``, ``"sdxl"``, ``"flux"`` or ``"sd35"``: the family of an API-format workflow's base model."""
    (family,) = {FAMILY_OF_BASE_MODEL[name] for name in base_model_files(graph)}
    return family


def api_twin_path(path: Path) -> Path:
    return API_DIR / Path(path).name.replace(".json", ".api.json")


def write_api_twins(info: dict) -> list[Path]:
    API_DIR.mkdir(exist_ok=True)
    written = []
    for path in ui_workflow_files():
        twin = api_twin_path(path)
        twin.write_text(json.dumps(ui_to_api(load_workflow(path), info), indent=2) + "\n")
        written.append(twin)
    return written


# -- graphs the tests derive --------------------------------------------------

def shrink(graph: dict, size: int = 64, steps: int = 2, prefix: str | None = None) -> dict:
    """A copy with small latents (batch size kept), few steps and (optionally) its own SaveImage prefix."""
    graph = copy.deepcopy(graph)
    for node in graph.values():
        inputs = node["inputs"]
        if node["class_type"] in LATENT_NODES:
            inputs.update(width=size, height=size)
        elif node["class_type"] in ("KSampler", "KSamplerAdvanced"):
            inputs["steps"] = steps
            if "end_at_step" in inputs:
                inputs["end_at_step"] = min(inputs["end_at_step"], steps)
        elif node["class_type"] == "SaveImage" and prefix:
            inputs["filename_prefix"] = prefix
    return graph


def with_weight(graph: dict, factor: float) -> dict:
    """A copy whose image-prompt weights (λ) are multiplied by ``factor`` (0: all λ = 0)."""
    graph = copy.deepcopy(graph)
    for node in graph.values():
        if node["class_type"] in OUR_WEIGHTED_NODES:
            node["inputs"]["weight"] = node["inputs"]["weight"] * factor
    return graph


def with_references(graph: dict, mapping: dict[str, str]) -> dict:
    """A copy whose LoadImage nodes load other files (``mapping``: old name -> new name)."""
    graph = copy.deepcopy(graph)
    for node in graph.values():
        if node["class_type"] == "LoadImage" and node["inputs"]["image"] in mapping:
            node["inputs"]["image"] = mapping[node["inputs"]["image"]]
    return graph


def with_weight_of(graph: dict, key: str, weight: float) -> dict:
    """A copy in which node ``key`` (an Apply) has λ = ``weight``."""
    graph = copy.deepcopy(graph)
    graph[key]["inputs"]["weight"] = weight
    return graph


def bypassed(graph: dict, key: str) -> dict:
    """A copy without node ``key``, a node that patches a MODEL: what took its MODEL takes its model input
    (ComfyUI's bypass). Nodes that fed only it are left in place; ComfyUI does not run them."""
    graph = copy.deepcopy(graph)
    if graph[key]["class_type"] not in OUR_MODEL_NODES:
        raise WorkflowError(f"node {key} ({graph[key]['class_type']}) does not patch a MODEL")
    source = graph.pop(key)["inputs"]["model"]
    for other, node in graph.items():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and value[0] == key:
                if value[1] != 0:
                    raise WorkflowError(f"node {other} takes output {value[1]} of node {key}, which has only a MODEL")
                node["inputs"][name] = list(source)
    return graph


def apply_nodes(graph: dict) -> list[str]:
    """The keys of an API-format graph's Apply IP-Adapter nodes (either kind), in the graph's order."""
    return [key for key, node in graph.items() if node["class_type"] in APPLY_NODES]


def overlapping_nodes(workflow: dict) -> list[str]:
    """Each pair of nodes of a UI-format workflow that lie over one another, title bars included (a node's box
    runs from ``pos`` less the title bar's height to ``pos + size``)."""
    def box(node):
        (x, y), (width, height) = node["pos"], node["size"]
        return x, y - TITLE_HEIGHT, x + width, y + height

    found = []
    nodes = workflow["nodes"]
    for i, first in enumerate(nodes):
        a = box(first)
        for second in nodes[i + 1:]:
            b = box(second)
            if a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]:
                found.append(f"{node_label(first)} and {node_label(second)} overlap")
    return found


def our_node_types(workflow: dict) -> set[str]:
    return {node["type"] for node in workflow["nodes"] if node["type"].startswith(OUR_PREFIX)}


# -- command line ---------------------------------------------------------------

def live_object_info(url: str | None = None) -> dict:
    """``GET /object_info`` of the ComfyUI at ``url``, or of a ComfyUI started here with this pack."""
    if url:
        import urllib.request

        with urllib.request.urlopen(url.rstrip("/") + "/object_info", timeout=60) as response:
            return json.loads(response.read())
    import tempfile

    from .comfy_import import PACK_FOLDER_NAME
    from .comfyui_harness import start_comfyui_server

    with tempfile.TemporaryDirectory(prefix="workflow-tools-") as temp:
        server = start_comfyui_server(Path(temp), {PACK_FOLDER_NAME: REPO_ROOT})
        try:
            return server.object_info()
        finally:
            server.stop()


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Check the UI workflows, or rewrite their API twins.")
    parser.add_argument("command", choices=("check", "api"))
    parser.add_argument("files", nargs="*", type=Path, help="UI workflows to check (default: workflows/*.json)")
    parser.add_argument("--url", help="a running ComfyUI to check against (default: start one with this pack)")
    options = parser.parse_intermixed_args(argv)
    info = live_object_info(options.url)
    if options.command == "api":
        for path in write_api_twins(info):
            print(path)
        return 0
    failed = 0
    for path in options.files or ui_workflow_files():
        problems = check_workflow(load_workflow(path), info)
        print(f"{path.name}: " + ("ok" if not problems else "\n  " + "\n  ".join(problems)))
        failed += bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
