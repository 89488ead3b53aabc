"""The shared workflows (``workflows/``) against a real ComfyUI with this pack loaded.

* every UI workflow matches the live node definitions (``GET /object_info``):
  node types exist, links join sockets of the same type, widget values are in
  range and in their combo lists; broken copies fail with the node named;
* every API twin is the conversion of its UI workflow;
* each uses its family's files (SD1.5 or SDXL checkpoint, Flux.1 dev's diffusion
  model or SD3.5 Large's checkpoint, adapters of that family with the image
  encoder each was trained with), image size and sampling;
* every workflow runs headless (random-weight models under the names the
  workflows use, 64x64, 1 step): it saves its image, the image changes with the
  reference image, and for each Apply IP-Adapter of it (either kind, one at a
  time, the others as they are) λ = 0 gives exactly the image of the same graph
  with that Apply bypassed (its MODEL input wired straight through), and λ = 1
  another one. SD1.5 and SDXL: models of the real
  architectures. The SDXL workflows run in a server of their own
  (:func:`devtools.comfyui_harness.start_sdxl_server`: UNet weights fp16, ~10 GiB
  while it loads the full-size random SDXL checkpoint), started for them and
  stopped after; ComfyUI's loaded weights are checked against that file there.
  Flux and SD3.5 (:mod:`devtools.dit_workflow_models`): tiny models with the
  families' block counts (SD3.5: 2 of its 38 joint blocks, as ComfyUI's
  detection reads one per head) and small text encoders, in a server of their
  own (:func:`devtools.comfyui_harness.start_dit_server`) where ComfyUI's own
  loader nodes load them (their files carry the widths its detection fixes);
  the graphs run as they are in the files.

The layout is checked here too: no two nodes of a workflow overlap (title bars
included); the browser test checks the sizes against the editor's.
"""
from __future__ import annotations

import copy
import json
import re
import shutil
import time
import types

import numpy as np
import pytest
from safetensors.torch import save_file

from devtools.adapter_factory import random_adapter, write_flat_adapter
from devtools.comfy_import import REPO_ROOT
from devtools.comfyui_harness import sdxl_checkpoint_path, start_dit_server, start_sdxl_server, with_checkpoint_check
from devtools.workflow_tools import (
    ADAPTER, ADAPTERS_OF_FAMILY, APPLY_NODES, CHECKPOINT, CLIP_G_TEXT, CLIP_L_ENCODER, CLIP_L_TEXT, ENCODER, ENCODER_OF_ADAPTER,
    FACE_PACK, FACEID_PLUSV2_ADAPTER, FACEID_PLUSV2_LORA, FAMILY_OF_BASE_MODEL, SDXL_PORTRAIT_ADAPTER, FLUX_MODEL, FLUX_VAE, FRONTEND_ONLY, INSTANTX_FLUX_ADAPTER, LATENT_NODES, REFERENCE_IMAGES,
    SD35_ADAPTER, SD35_CHECKPOINT, SDXL_ADAPTER, SDXL_CHECKPOINT, SDXL_PLUS_ADAPTER, SIGLIP_ENCODER, SOURCE_IMAGES,
    T5XXL_TEXT, TRAINED_ADAPTER, USER_FILES, XLABS_ADAPTER, WorkflowError, api_twin_path, apply_nodes,
    base_model_files, bypassed, check_workflow, load_workflow, our_node_types, overlapping_nodes, shrink, ui_to_api,
    ui_workflow_files, with_references, with_weight_of, workflow_family,
)

WORKFLOWS = ui_workflow_files()
NAMES = [path.name for path in WORKFLOWS]
FAMILY = {path.name: workflow_family(load_workflow(api_twin_path(path))) for path in WORKFLOWS}
SD15_NAMES = [name for name in NAMES if FAMILY[name] == "sd15"]
SDXL_NAMES = [name for name in NAMES if FAMILY[name] == "sdxl"]
DIT_NAMES = [name for name in NAMES if FAMILY[name] in ("flux", "sd35")]
# (sampler, scheduler, steps, CFG) and image size of each family: the paper's sampling for SD1.5; for SDXL the
# IP-Adapter repository's SDXL examples (30 steps, diffusers' SDXL defaults: Euler, 5.0); Flux.1 dev and SD3.5
# Large as ComfyUI's examples sample them (sources in workflows/build.py; Flux's guidance 3.5 on FluxGuidance).
SAMPLING = {"sd15": ("ddim", "ddim_uniform", 50, 7.5), "sdxl": ("euler", "normal", 30, 5.0),
            "flux": ("euler", "simple", 20, 1.0), "sd35": ("euler", "sgm_uniform", 28, 4.5)}
IMAGE_SIZE = {"sd15": 512, "sdxl": 1024, "flux": 1024, "sd35": 1024}
# The loaders each family's workflows use, with their files (FluxGuidance and the empty latents checked apart).
BASE_LOADERS = {
    "sd15": {"CheckpointLoaderSimple": {"ckpt_name": CHECKPOINT}},
    "sdxl": {"CheckpointLoaderSimple": {"ckpt_name": SDXL_CHECKPOINT}},
    "flux": {"UNETLoader": {"unet_name": FLUX_MODEL, "weight_dtype": "default"},
             "DualCLIPLoader": {"clip_name1": T5XXL_TEXT, "clip_name2": CLIP_L_TEXT, "type": "flux", "device": "default"},
             "VAELoader": {"vae_name": FLUX_VAE}},
    "sd35": {"CheckpointLoaderSimple": {"ckpt_name": SD35_CHECKPOINT},
             "TripleCLIPLoader": {"clip_name1": CLIP_L_TEXT, "clip_name2": CLIP_G_TEXT, "clip_name3": T5XXL_TEXT}},
}
LOADER_TYPES = {"CheckpointLoaderSimple", "UNETLoader", "CLIPLoader", "DualCLIPLoader", "TripleCLIPLoader", "VAELoader"}
SIZE, STEPS = 64, 1
ARTIFACTS = REPO_ROOT / "test-artifacts" / "workflows"
COMPAT_WORKFLOW = "1-image-prompt.json"  # the one headless run of the March 2024 compatibility subset
REFERENCE_SIZE = (96, 128)  # height, width of the test's reference images (wide, for the tiled workflow)
FACE_DETECTOR_SIZE = 640  # the Face Analysis Loader's detector_size in the FaceID workflows (its default)
ENCODER_WIDTH = 128  # the test encoder's tower (ViT-H/14's 1024-d output): the plus adapter's input width
# The headline workflows (one reference, no advanced control) use the everyday Apply; the others show the advanced one.
EVERYDAY_APPLY = {"1-image-prompt.json", "2-image-and-text.json", "7-sdxl-image-prompt.json",
                  "8-sdxl-image-and-text.json", "15-flux-image-prompt.json", "16-flux-image-and-text.json",
                  "17-sd35-image-prompt.json", "18-faceid-plusv2.json"}
# Workflows whose two references are one batch of faces side by side (combine = concat): swapping them changes
# nothing (attention does not see the tokens' order), so their headless run puts reference_b in both places.
ONE_BATCH_OF_REFERENCES = {"19-sdxl-faceid-portrait.json"}


@pytest.fixture(scope="module")
def info(comfyui_server):
    return comfyui_server.object_info()


# -- static checks --------------------------------------------------------------------

def test_the_issue_workflows_are_all_there():
    stems = [name.split("-", 1)[0] for name in NAMES]
    assert stems == ["1", "2", "3a", "3b", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
                     "17", "18", "19"], NAMES
    assert [name.split("-", 1)[0] for name in SDXL_NAMES] == ["7", "8", "9", "10", "11", "19"]
    assert all("-sdxl-" in name for name in SDXL_NAMES) and not any("sdxl" in name for name in SD15_NAMES)
    assert {name: FAMILY[name] for name in DIT_NAMES} == {
        "15-flux-image-prompt.json": "flux", "16-flux-image-and-text.json": "flux", "17-sd35-image-prompt.json": "sd35"}
    for path in WORKFLOWS:
        assert api_twin_path(path).is_file(), f"{path.name} has no API twin"


@pytest.mark.parametrize("name", NAMES)
def test_workflow_matches_the_live_node_definitions(name, info):
    workflow = load_workflow(REPO_ROOT / "workflows" / name)
    assert check_workflow(workflow, info) == []
    notes = [node for node in workflow["nodes"] if node["type"] in FRONTEND_ONLY]
    assert len(notes) == 1 and len(notes[0]["widgets_values"][0]) > 100, "each workflow explains itself in one note"
    ours = our_node_types(workflow)
    assert "IPAdapterKitLoader" in ours and ours & APPLY_NODES, ours
    assert ours & APPLY_NODES == {"IPAdapterKitApplySimple" if name in EVERYDAY_APPLY else "IPAdapterKitApply"}, ours
    assert ours & {"IPAdapterKitEncode", "IPAdapterKitEncodeTiled", "IPAdapterKitEncodeFace"}, ours
    # the file names are the ones users have (README: where each goes), all of the workflow's family: its base
    # model loaded as that family's workflows load it, its adapters, each with the encoder it was trained with
    api = ui_to_api(workflow, info)
    family = workflow_family(api)
    assert [FAMILY_OF_BASE_MODEL[name] for name in base_model_files(api)] == [family]
    loaders = {node["class_type"]: {k: v for k, v in node["inputs"].items() if not isinstance(v, list)}
               for node in api.values() if node["class_type"] in LOADER_TYPES}
    assert loaders == BASE_LOADERS[family], loaders
    adapters = {node["inputs"]["ipadapter_file"] for node in api.values() if node["class_type"] == "IPAdapterKitLoader"}
    encoders = {node["inputs"]["clip_name"] for node in api.values() if node["class_type"] == "IPAdapterKitEncoderLoader"}
    assert adapters and adapters <= ADAPTERS_OF_FAMILY[family], (family, adapters)
    # the FaceID portrait adapter reads the face embedding only: no image encoder
    assert encoders == {ENCODER_OF_ADAPTER[a] for a in adapters if a in ENCODER_OF_ADAPTER}, (adapters, encoders)
    sampler = next(node["inputs"] for node in api.values() if node["class_type"] == "KSampler")
    assert (sampler["sampler_name"], sampler["scheduler"], sampler["steps"], sampler["cfg"]) == SAMPLING[family]
    latents = [node for node in api.values() if node["class_type"] in LATENT_NODES]  # none in img2img, inpainting
    assert all(node["class_type"] == ("EmptyLatentImage" if family in ("sd15", "sdxl") else "EmptySD3LatentImage")
               for node in latents)
    for latent in (node["inputs"] for node in latents):
        assert latent["width"] == latent["height"] == IMAGE_SIZE[family]
    guidance = [node["inputs"]["guidance"] for node in api.values() if node["class_type"] == "FluxGuidance"]
    assert guidance == ([3.5] if family == "flux" else []), guidance


def test_workflow_1_is_the_papers_image_prompt_only_setting(info):
    api = ui_to_api(load_workflow(WORKFLOWS[0]), info)
    texts = [node["inputs"]["text"] for node in api.values() if node["class_type"] == "CLIPTextEncode"]
    (apply,) = [api[key]["inputs"] for key in apply_nodes(api)]
    assert texts == ["", ""] and apply["weight"] == 1.0 and apply["weight_type"] == "linear"
    assert (apply["start_at"], apply["end_at"]) == (0.0, 1.0)


def test_no_two_nodes_overlap():
    """Each node's box, its title bar included, apart from every other's (the editor's sizes: the browser test)."""
    overlaps = {path.name: overlapping_nodes(load_workflow(path)) for path in WORKFLOWS}
    assert not any(overlaps.values()), {name: found for name, found in overlaps.items() if found}


def test_overlapping_nodes_are_named():
    first, second = load_workflow(WORKFLOWS[1])["nodes"][:2]
    workflow = {"nodes": [first, second]}
    # one pixel left of the first one's right edge, its title bar one pixel over the first one's body
    second["pos"] = [first["pos"][0] + first["size"][0] - 1, first["pos"][1] + first["size"][1] + 29]
    (found,) = overlapping_nodes(workflow)
    assert f"node {first['id']}" in found and f"node {second['id']}" in found
    second["pos"][0] += 1
    assert overlapping_nodes(workflow) == []
    second["pos"] = [first["pos"][0], first["pos"][1] + first["size"][1] + 30]  # right below, title bar included
    assert overlapping_nodes(workflow) == []


def test_our_nodes_carry_the_pack_and_its_version(info):
    """What current editors and ComfyUI-Manager read to name (and offer to install) the pack a node came from."""
    import tomllib

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    for path in WORKFLOWS:
        for node in load_workflow(path)["nodes"]:
            if node["type"].startswith("IPAdapterKit"):
                assert node["properties"]["cnr_id"] == project["name"], (path.name, node["id"])
                assert node["properties"]["ver"] == project["version"], (path.name, node["id"])


def applies(api: dict) -> list[tuple[str, float, str, str]]:
    """(adapter file, λ, layers, reference image) of each Apply IP-Adapter (either kind: the everyday one patches
    all layers), in the order they patch the model."""
    def source(key, name):
        return api[api[key]["inputs"][name][0]]

    found = []
    for key in apply_nodes(api):
        node = api[key]
        image = source(node["inputs"]["embeds"][0], "image")["inputs"].get("image")  # None: a batch of images
        adapter = source(key, "ipadapter")["inputs"]["ipadapter_file"]
        found.append((adapter, node["inputs"]["weight"], node["inputs"].get("layers", "all"), image))
    return found


@pytest.mark.parametrize("name, texts, expected", [
    ("7-sdxl-image-prompt.json", False, [(SDXL_ADAPTER, 1.0, "all", REFERENCE_IMAGES[0])]),
    ("8-sdxl-image-and-text.json", True, [(SDXL_ADAPTER, 0.6, "all", REFERENCE_IMAGES[0])]),
    ("9-sdxl-style-and-composition.json", True, [(SDXL_ADAPTER, 1.0, "style", REFERENCE_IMAGES[0]),
                                                 (SDXL_ADAPTER, 1.0, "composition", REFERENCE_IMAGES[1])]),
    ("10-sdxl-plus.json", True, [(SDXL_PLUS_ADAPTER, 0.7, "all", REFERENCE_IMAGES[0])]),
    ("11-sdxl-style-transfer-precise.json", True, [(SDXL_ADAPTER, 1.0, "all", REFERENCE_IMAGES[0])]),
    ("19-sdxl-faceid-portrait.json", True, [(SDXL_PORTRAIT_ADAPTER, 1.0, "all", None)]),
])
def test_the_sdxl_workflows_show_what_their_names_say(name, texts, expected, info):
    api = ui_to_api(load_workflow(REPO_ROOT / "workflows" / name), info)
    prompts = [node["inputs"]["text"] for node in api.values() if node["class_type"] == "CLIPTextEncode"]
    assert workflow_family(api) == "sdxl" and any(prompts) == texts, prompts
    # chained in this order: the second Apply takes the first one's MODEL
    assert applies(api) == expected


@pytest.mark.parametrize("name, text, encoder, expected", [
    ("15-flux-image-prompt.json", "", CLIP_L_ENCODER, [(XLABS_ADAPTER, 1.0, "all", REFERENCE_IMAGES[0])]),
    ("16-flux-image-and-text.json", "wearing a hat on the beach", SIGLIP_ENCODER,
     [(INSTANTX_FLUX_ADAPTER, 0.7, "all", REFERENCE_IMAGES[0])]),
    ("17-sd35-image-prompt.json", "", SIGLIP_ENCODER, [(SD35_ADAPTER, 1.0, "all", REFERENCE_IMAGES[0])]),
])
def test_the_dit_workflows_show_what_their_names_say(name, text, encoder, expected, info):
    """The adapter, its image encoder, λ and reference each names; the text prompt reaches the sampler (Flux:
    through FluxGuidance), Apply patches the loaded MODEL that the sampler runs, the family's VAE decodes."""
    api = ui_to_api(load_workflow(REPO_ROOT / "workflows" / name), info)
    assert applies(api) == expected
    assert [node["inputs"]["clip_name"] for node in api.values()
            if node["class_type"] == "IPAdapterKitEncoderLoader"] == [encoder]
    (sampler_key,) = [key for key, node in api.items() if node["class_type"] == "KSampler"]
    sampler = api[sampler_key]["inputs"]
    positive, negative = api[sampler["positive"][0]], api[sampler["negative"][0]]
    flux = workflow_family(api) == "flux"
    if flux:
        assert positive["class_type"] == "FluxGuidance"
        positive = api[positive["inputs"]["conditioning"][0]]
    assert positive["class_type"] == negative["class_type"] == "CLIPTextEncode"
    assert (positive["inputs"]["text"], negative["inputs"]["text"]) == (text, "")
    apply = api[sampler["model"][0]]
    assert apply["class_type"] == "IPAdapterKitApplySimple"
    assert api[apply["inputs"]["model"][0]]["class_type"] == ("UNETLoader" if flux else "CheckpointLoaderSimple")
    (decode,) = [node["inputs"] for node in api.values() if node["class_type"] == "VAEDecode"]
    vae = api[decode["vae"][0]]
    assert (vae["class_type"], decode["vae"][1]) == (("VAELoader", 0) if flux else ("CheckpointLoaderSimple", 2))


def test_the_faceid_workflows_show_what_their_names_say(info):
    """18: Face Analysis Loader -> Encode Face (with the image encoder, plus v2's weight) -> the everyday Apply, on the
    checkpoint with the FaceID LoRA from ComfyUI's LoraLoaderModelOnly; 19: two face photos as one batch -> Encode Face
    (no encoder: portrait) -> Apply (Advanced) with combine = concat, no LoRA."""
    def graph(name):
        return ui_to_api(load_workflow(REPO_ROOT / "workflows" / name), info)

    def source(api, link):
        return api[link[0]]

    api = graph("18-faceid-plusv2.json")
    (apply,) = [api[key]["inputs"] for key in apply_nodes(api)]
    lora = source(api, apply["model"])
    assert lora["class_type"] == "LoraLoaderModelOnly" and lora["inputs"]["lora_name"] == FACEID_PLUSV2_LORA
    assert source(api, lora["inputs"]["model"])["class_type"] == "CheckpointLoaderSimple"
    face = source(api, apply["embeds"])
    assert face["class_type"] == "IPAdapterKitEncodeFace" and face["inputs"]["weight_faceidv2"] == 1.0
    assert source(api, face["inputs"]["ipadapter"])["inputs"] == {"ipadapter_file": FACEID_PLUSV2_ADAPTER}
    assert face["inputs"]["ipadapter"] == apply["ipadapter"]
    assert source(api, face["inputs"]["image_encoder"])["inputs"] == {"clip_name": ENCODER}
    assert source(api, face["inputs"]["face_analysis"])["inputs"]["pack"] == FACE_PACK
    assert source(api, face["inputs"]["image"])["inputs"]["image"] == REFERENCE_IMAGES[0]
    assert (apply["weight"], apply["weight_type"]) == (1.0, "linear")

    api = graph("19-sdxl-faceid-portrait.json")
    (apply,) = [api[key]["inputs"] for key in apply_nodes(api)]
    assert source(api, apply["model"])["class_type"] == "CheckpointLoaderSimple"  # the portrait adapter has no LoRA
    assert (apply["combine"], apply["weight"]) == ("concat", 1.0)
    face = source(api, apply["embeds"])
    assert face["class_type"] == "IPAdapterKitEncodeFace" and "image_encoder" not in face["inputs"]
    batch = source(api, face["inputs"]["image"])
    assert batch["class_type"] == "ImageBatch"
    assert [source(api, batch["inputs"][k])["inputs"]["image"] for k in ("image1", "image2")] == list(REFERENCE_IMAGES)
    assert not [node for node in api.values() if node["class_type"].startswith("Lora")]


def test_the_control_workflows_use_the_controls_their_names_say(info):
    def api(name):
        return ui_to_api(load_workflow(REPO_ROOT / "workflows" / name), info)

    def nodes(graph, kind):
        return [node["inputs"] for node in graph.values() if node["class_type"] == kind]

    def source(graph, link):
        return graph[link[0]]

    precise = api("11-sdxl-style-transfer-precise.json")
    (apply,) = nodes(precise, "IPAdapterKitApply")
    assert apply["weight_type"] == "style transfer precise" and workflow_family(precise) == "sdxl"

    batch = api("12-batch-frame-weights.json")
    (apply,) = nodes(batch, "IPAdapterKitApply")
    assert apply["batch_mode"] == "one per latent"
    ramp = source(batch, apply["frame_weights"])  # the widget turned into a socket, fed by the ramp node
    assert ramp["class_type"] == "IPAdapterKitFrameWeights" and ramp["inputs"]["frames"] == 4
    references = source(batch, source(batch, apply["embeds"])["inputs"]["image"])
    assert references["class_type"] == "ImageBatch"
    assert [source(batch, references["inputs"][k])["inputs"]["image"] for k in ("image1", "image2")] == list(REFERENCE_IMAGES)
    assert [latent["batch_size"] for latent in nodes(batch, "EmptyLatentImage")] == [4]

    tiled = api("13-tiled-reference.json")
    (apply,) = nodes(tiled, "IPAdapterKitApply")
    assert source(tiled, apply["embeds"])["class_type"] == "IPAdapterKitEncodeTiled" and apply["combine"] == "concat"

    regional = api("14-regional-with-text.json")
    (apply,) = nodes(regional, "IPAdapterKitApply")
    assert "embeds" not in apply
    last = source(regional, apply["regions"])
    first = source(regional, last["inputs"]["regions"])
    assert "regions" not in first["inputs"]
    for region in (first, last):  # each with its own reference, mask and text
        assert {"embeds", "mask", "positive"} <= set(region["inputs"]) and region["inputs"]["weight"] == 0.8
    (sampler,) = nodes(regional, "KSampler")
    prompt = source(regional, sampler["positive"])
    assert prompt["class_type"] == "ConditioningCombine" and prompt["inputs"]["conditioning_2"][0] == apply["regions"][0]


@pytest.mark.parametrize("name", NAMES)
def test_api_twin_is_the_conversion_of_the_ui_workflow(name, info):
    path = REPO_ROOT / "workflows" / name
    assert load_workflow(api_twin_path(path)) == ui_to_api(load_workflow(path), info), \
        "the API twin is out of date: run `python workflows/build.py` (or `python -m devtools.workflow_tools api`)"


def find(workflow, kind):
    return next(node for node in workflow["nodes"] if node["type"] == kind)


def find_apply(workflow):
    return next(node for node in workflow["nodes"] if node["type"] in APPLY_NODES)


def test_broken_workflows_fail_with_the_node_named(info):
    original = load_workflow(WORKFLOWS[1])  # its Apply is the everyday one

    unknown = copy.deepcopy(original)
    node = find(unknown, "IPAdapterKitEncode")
    node["type"] = "IPAdapterKitEncodeTypo"
    problems = check_workflow(unknown, info)
    assert any(f"node {node['id']}" in p and "IPAdapterKitEncodeTypo" in p and "unknown node type" in p for p in problems), problems
    with pytest.raises(WorkflowError, match="IPAdapterKitEncodeTypo"):
        ui_to_api(unknown, info)

    too_strong = copy.deepcopy(original)
    node = find(too_strong, "IPAdapterKitApplySimple")
    node["widgets_values"][0] = 7.5  # λ; the node allows -1..3
    (problem,) = check_workflow(too_strong, info)
    assert f"node {node['id']}" in problem and "IPAdapterKitApplySimple" in problem and "weight = 7.5 is above the maximum 3.0" in problem

    bad_choice = copy.deepcopy(original)
    node = find(bad_choice, "IPAdapterKitApplySimple")
    node["widgets_values"][3] = "everything"  # weight type
    (problem,) = check_workflow(bad_choice, info)
    assert "IPAdapterKitApplySimple" in problem and "weight_type = 'everything'" in problem

    advanced = load_workflow(REPO_ROOT / "workflows" / "5-style-and-composition.json")
    node = find(advanced, "IPAdapterKitApply")
    node["widgets_values"][4] = "everything"  # layers
    (problem,) = check_workflow(advanced, info)
    assert f"node {node['id']}" in problem and "IPAdapterKitApply" in problem and "layers = 'everything'" in problem

    missing_file = copy.deepcopy(original)
    node = find(missing_file, "IPAdapterKitLoader")
    node["widgets_values"][0] = "ip-adapter_not_downloaded.safetensors"
    (problem,) = check_workflow(missing_file, info)
    assert "IPAdapterKitLoader" in problem and "ip-adapter_not_downloaded.safetensors" in problem

    shifted = copy.deepcopy(original)
    node = find(shifted, "KSampler")
    del node["widgets_values"][1]  # the "control after generate" value: everything after it shifts
    (problem,) = check_workflow(shifted, info)
    assert "KSampler" in problem and "6 widget values, expected 7" in problem

    crossed = copy.deepcopy(original)  # the embeds socket fed from the adapter loader
    apply, loader = find_apply(crossed), find(crossed, "IPAdapterKitLoader")
    embeds_link = next(slot["link"] for slot in apply["inputs"] if slot["name"] == "embeds")
    link = next(link for link in crossed["links"] if link[0] == embeds_link)
    link[1], link[2], link[5] = loader["id"], 0, "IPADAPTER_KIT"
    loader["outputs"][0]["links"].append(embeds_link)
    problems = check_workflow(crossed, info)
    assert any("IPAdapterKitApply" in p and "'embeds'" in p and "IPADAPTER_KIT_EMBEDS" in p for p in problems), problems

    unconnected = copy.deepcopy(original)
    apply = find_apply(unconnected)
    next(slot for slot in apply["inputs"] if slot["name"] == "ipadapter")["link"] = None
    assert any("IPAdapterKitApply" in p and "required input 'ipadapter'" in p for p in check_workflow(unconnected, info))


def test_a_dit_loader_with_a_file_users_do_not_have_is_named(info):
    """The loaders of the later node schema (TripleCLIPLoader's ``["COMBO", {"options": [...]}]`` inputs) are
    widgets whose values are checked like the others'."""
    broken = load_workflow(REPO_ROOT / "workflows" / "17-sd35-image-prompt.json")
    node = find(broken, "TripleCLIPLoader")
    node["widgets_values"][2] = "t5xxl_not_downloaded.safetensors"
    (problem,) = check_workflow(broken, info)
    assert f"node {node['id']}" in problem and "TripleCLIPLoader" in problem
    assert "clip_name3 = 't5xxl_not_downloaded.safetensors'" in problem and "models/text_encoders" in problem
    flux = load_workflow(REPO_ROOT / "workflows" / "15-flux-image-prompt.json")
    find(flux, "UNETLoader")["widgets_values"][0] = "flux1-schnell.safetensors"
    (problem,) = check_workflow(flux, info)
    assert "UNETLoader" in problem and "unet_name = 'flux1-schnell.safetensors'" in problem


def test_the_command_line_check_fails_on_a_broken_file(tmp_path, comfyui_server):
    import subprocess
    import sys

    broken = load_workflow(WORKFLOWS[0])
    find_apply(broken)["widgets_values"][0] = -4.0
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(broken))
    result = subprocess.run([sys.executable, "-m", "devtools.workflow_tools", "check", "--url", comfyui_server.url,
                             str(path), str(WORKFLOWS[0])],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "broken.json:" in result.stdout and "IPAdapterKitApply" in result.stdout and "below the minimum -1.0" in result.stdout
    assert f"{WORKFLOWS[0].name}: ok" in result.stdout


# -- headless runs --------------------------------------------------------------------

def write_trained_adapter(path, seed):
    """A file written by the trainer's export (official layout with step and config metadata), random weights."""
    from ipadapter.registry.families import SD15
    from training.run_files import export_adapter

    tensors = random_adapter("base", seed=seed)
    ip_adapter = {k: v * 5 for k, v in tensors["ip_adapter"].items()}
    model = types.SimpleNamespace(adapter_state_dicts=lambda: (tensors["image_proj"], ip_adapter),
                                  unet=types.SimpleNamespace(config=types.SimpleNamespace(block_out_channels=[320])),
                                  spec=types.SimpleNamespace(family=SD15.name, architecture=SD15, variant="base"))
    return export_adapter(model, path, 300, "train: {max_steps: 300}", "fp16", variant="base")


def write_encoder_and_input_images(server):
    """The image encoder under its real name and the images the workflows' Load Image nodes name."""
    from devtools.clip_vision import transformers_model

    # a narrow tower with ViT-H/14's 1024-d output, in the transformers format of the real file
    encoder = transformers_model(width=ENCODER_WIDTH, layers=2, heads=2, patch=14, image=224, embed_dim=1024, seed=3)
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(server.models_dir("clip_vision") / ENCODER))
    write_input_images(server)


def write_input_images(server):
    """The images the workflows' Load Image nodes name: two references, a source and a masked source."""
    rng = np.random.default_rng(0)
    red, blue = REFERENCE_IMAGES
    shape = (*REFERENCE_SIZE, 3)
    server.write_input_image(red, np.tile([0.9, 0.1, 0.1], shape[:2] + (1,)) + rng.normal(0, 0.05, shape))
    server.write_input_image(blue, np.tile([0.1, 0.2, 0.9], shape[:2] + (1,)) + rng.normal(0, 0.05, shape))
    source, masked = SOURCE_IMAGES
    ramp = np.linspace(0.2, 0.8, SIZE)
    pixels = np.stack([ramp[None, :].repeat(SIZE, 0), ramp[:, None].repeat(SIZE, 1), np.full((SIZE, SIZE), 0.5)], -1)
    server.write_input_image(source, pixels)
    from PIL import Image

    rgba = np.concatenate([(pixels * 255).astype(np.uint8), np.full((SIZE, SIZE, 1), 255, np.uint8)], -1)
    rgba[16:48, 16:48, 3] = 0  # transparent square: LoadImage's MASK is 1 there (the region to inpaint)
    Image.fromarray(rgba, "RGBA").save(server.input_dir / masked)
    assert set(USER_FILES["input"]) == {red, blue, source, masked}


def write_faceid_models(server, family: str):
    """The face pack (its detector finds a face in the middle of each reference image) and the family's FaceID
    adapter under the workflows' names: SD1.5 plus v2 (and its LoRA sidecar in models/loras), SDXL portrait; random
    weights, K'/V' scaled up as :func:`write_flat_adapter`'s, fp16, nested as the released .bin files."""
    import torch

    from devtools.adapter_factory import random_faceid_adapter
    from devtools.face_models import face_from_template, letterbox_scale, write_face_pack
    from ipadapter.adapter_file import IPAdapterCheckpoint
    from ipadapter.faceid import FaceIDLoRA, save_lora_sidecar

    height, width = REFERENCE_SIZE
    scale = letterbox_scale(height, width, FACE_DETECTOR_SIZE)
    face = face_from_template((width / 2 * scale, height / 2 * scale), 0.3 * height * scale, 5.0, score=0.9, stride=32)
    write_face_pack(server.models_dir("insightface") / "models", [face], pack=FACE_PACK)
    variant, name, widths = (("faceid-plus", FACEID_PLUSV2_ADAPTER, dict(clip_width=ENCODER_WIDTH)) if family == "sd15"
                             else ("faceid-portrait", SDXL_PORTRAIT_ADAPTER, {}))
    nested = random_faceid_adapter(variant, family=family, seed=13, **widths)
    nested["ip_adapter"] = {k: v * 5 if "_ip." in k else v for k, v in nested["ip_adapter"].items()}
    torch.save({group: {k: v.half() for k, v in part.items()} for group, part in nested.items()},
               server.models_dir("ipadapter") / name)
    if family == "sd15":
        checkpoint = IPAdapterCheckpoint.from_state_dicts(**nested, source=name, base_width=None)
        save_lora_sidecar(FaceIDLoRA.from_checkpoint(checkpoint), server.models_dir("loras") / FACEID_PLUSV2_LORA)


@pytest.fixture(scope="module")
def models_server(comfyui_server, sd15_checkpoint):
    """The session's ComfyUI with random-weight SD1.5 models under the names the workflows use, and their input images."""
    server = comfyui_server
    link = server.models_dir("checkpoints") / CHECKPOINT
    if not link.exists():
        link.symlink_to(sd15_checkpoint)
    write_flat_adapter(server.models_dir("ipadapter") / ADAPTER, seed=7)
    write_trained_adapter(server.models_dir("ipadapter") / TRAINED_ADAPTER, seed=11)
    write_encoder_and_input_images(server)
    write_faceid_models(server, "sd15")
    return server


@pytest.fixture(scope="module")
def sdxl_models_server(comfyui_path, comfyui_server, tmp_path_factory):
    """A ComfyUI for full-size SDXL with random-weight models under the SDXL workflows' names.

    Started by the first test that asks for it (the last tests of this module),
    stopped when the module ends; its time and peak memory go to
    ``test-artifacts/workflows/sdxl-server.json``. The session's server lets go
    of its SD1.5 models first (later tests load them again).
    """
    started = time.monotonic()
    comfyui_server.free_memory()
    checkpoint = sdxl_checkpoint_path()
    server = start_sdxl_server(tmp_path_factory.mktemp("comfyui-sdxl"), comfyui_path)
    try:
        (server.models_dir("checkpoints") / SDXL_CHECKPOINT).symlink_to(checkpoint)
        write_flat_adapter(server.models_dir("ipadapter") / SDXL_ADAPTER, seed=7, family="sdxl")
        write_flat_adapter(server.models_dir("ipadapter") / SDXL_PLUS_ADAPTER, seed=8, variant="plus", family="sdxl",
                           encoder_width=ENCODER_WIDTH)
        write_encoder_and_input_images(server)
        write_faceid_models(server, "sdxl")
        yield server
    finally:
        report = {"seconds": round(time.monotonic() - started, 1),
                  "server_peak_memory_gib": round(server.peak_memory_gib(), 2) if server.is_alive() else None}
        server.stop()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "sdxl-server.json").write_text(json.dumps(report) + "\n")
        print(f"SDXL server: {report}")


def render(server, graph, tag):
    """The first image of the graph's batch (64 px, 1 step), and the run's result."""
    graph = shrink(graph, SIZE, STEPS, prefix=f"workflows/{tag}")
    result = server.run_prompt(graph)
    batch = max([node["inputs"]["batch_size"] for node in graph.values() if node["class_type"] in LATENT_NODES],
                default=1)
    assert len(result.images) == batch, result.history.get("outputs")
    return result.load_images()[0], result


@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param(name, marks=[pytest.mark.comfyui_2024] if name == COMPAT_WORKFLOW else [])
                                  for name in SD15_NAMES])
def test_workflow_runs_headless_and_responds_to_lambda_and_reference(name, models_server):
    assert_runs_and_responds_to_lambda_and_reference(models_server, name)


@pytest.fixture(scope="class")
def dit_models_server(comfyui_path, tmp_path_factory):
    """A ComfyUI for the Flux and SD3.5 workflows, with tiny random models under their names
    (:mod:`devtools.dit_workflow_models`: cached on disk, ~0.6 GB, ~20 s to write the first time) that ComfyUI's own
    loaders load, the adapters and encoders, and the input images; stopped after its tests (before
    the SDXL server starts)."""
    from devtools import dit_workflow_models

    started = time.monotonic()
    base = tmp_path_factory.mktemp("comfyui-dit")
    dit_workflow_models.model_files()  # written before the server starts, so the two do not share the CPU
    server = start_dit_server(base, comfyui_path)
    try:
        dit_workflow_models.link_model_files(server.base / "models")
        dit_workflow_models.write_adapters_and_encoders(server.base / "models")
        write_input_images(server)
        yield server
    finally:
        report = {"seconds": round(time.monotonic() - started, 1), "server_started_in_s": round(server.started_in_s, 1),
                  "server_peak_memory_gib": round(server.peak_memory_gib(), 2) if server.is_alive() else None}
        server.stop()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "dit-server.json").write_text(json.dumps(report) + "\n")
        print(f"DiT server: {report}")


@pytest.mark.slow
class TestDiTWorkflowsHeadless:
    """The Flux and SD3.5 workflows as they are in their files, on tiny models in a server of their own."""

    @pytest.mark.parametrize("name", DIT_NAMES)
    def test_runs_headless_and_responds_to_lambda_and_reference(self, name, dit_models_server):
        """ComfyUI's own loaders load the models completely (its log names no missing weight), and the image
        checks of every workflow hold."""
        assert_runs_and_responds_to_lambda_and_reference(dit_models_server, name)
        missing = [line for line in dit_models_server.log_text().splitlines()
                   if re.search(r"(clip|unet) missing:|Missing VAE keys", line)]
        assert not missing, missing[:3]


@pytest.mark.slow
def test_the_sdxl_server_loads_every_weight_of_the_checkpoint(sdxl_models_server):
    """ComfyUI detects SDXL in the random file and loads all of it: every weight is the file's and finite."""
    graph = load_workflow(api_twin_path(REPO_ROOT / "workflows" / SDXL_NAMES[0]))
    result = sdxl_models_server.run_prompt(with_checkpoint_check(shrink(graph, SIZE, STEPS, prefix="workflows/check"), "SDXL"))
    (report,) = result.history["outputs"]["harness_check"]["report"]
    assert report["model"] == "SDXL" and report["weights_checked"] == 2515, report  # the keys of sd_xl_base_1.0
    assert report["text_embedding_shape"] == [1, 77, 2048], report


@pytest.mark.slow
@pytest.mark.parametrize("name", SDXL_NAMES)
def test_sdxl_workflow_runs_headless_and_responds_to_lambda_and_reference(name, sdxl_models_server):
    assert_runs_and_responds_to_lambda_and_reference(sdxl_models_server, name)


def assert_runs_and_responds_to_lambda_and_reference(server, name):
    """The workflow saves an image that changes with the reference image; for each Apply (the others as they are),
    λ = 0 gives exactly the image with that Apply bypassed, and λ = 1 another one (so λ acts)."""
    stem = name.removesuffix(".json")
    graph = load_workflow(api_twin_path(REPO_ROOT / "workflows" / name))

    image, result = render(server, graph, f"{stem}-base")
    assert image.shape == (SIZE, SIZE, 3) and np.isfinite(image).all() and image.std() > 0.01
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(result.images[0], ARTIFACTS / f"{stem}-{SIZE}px-{STEPS}step.png")
    first, second = REFERENCE_IMAGES
    swap = {first: second} if name in ONE_BATCH_OF_REFERENCES else {first: second, second: first}
    swapped, _ = render(server, with_references(graph, swap), f"{stem}-swapped")
    assert np.abs(swapped - image).mean() > 1e-3, "the reference image has no effect"

    applies = apply_nodes(graph)
    assert applies, "the workflow has no Apply IP-Adapter"
    for key in applies:
        label = f"Apply {key} ({graph[key]['class_type']})"
        zero, _ = render(server, with_weight_of(graph, key, 0.0), f"{stem}-{key}-zero")
        plain, _ = render(server, bypassed(graph, key), f"{stem}-{key}-bypassed")
        one = image if graph[key]["inputs"]["weight"] == 1.0 else \
            render(server, with_weight_of(graph, key, 1.0), f"{stem}-{key}-one")[0]
        assert np.array_equal(zero, plain), f"λ = 0 on {label} must give exactly the image with it bypassed"
        assert np.abs(one - plain).mean() > 1e-3, f"{label} at λ = 1 has no effect"
