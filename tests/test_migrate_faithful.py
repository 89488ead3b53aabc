"""The migrator's faithful mode (the default) and ``--ours`` (``migrate/faithful.py``, ``migrate/rules.py``).

cubiq's graphs are built as in ``test_migrate.py`` (its node definitions, its examples'
wiring). Checked, on the API format (the editor's format migrates alike: test_migrate.py):

* the middle block, which cubiq's pack never patches, is weighted 0 through Apply's custom
  layer weights (SD1.5 key 31, SDXL keys 121..139), combined with the weight type, where the
  type weights it; the model's family comes from the file names or ``--family``, and where
  the graph does not say it the report asks for it;
* plus / full-face adapters get cubiq's black 224×224 negative image (ComfyUI's EmptyImage
  on Encode's negative_image), one for the whole graph; base adapters and a connected
  negative image do not;
* precise nodes and the Mad Scientist's layer weights become one Apply whose per-layer
  weights and swapped layers, computed by the core (``ipadapter.weighting.layer_weights``),
  are cubiq's block weights (written out here from its source, per family);
* ``--ours`` leaves all of that out; the report names, per cubiq node, its new ids and the mode;
* with ``CUBIQ_PATH`` (a copy of cubiq's pack; CI has none), cubiq's nodes and the faithful
  migration give the same latents on a small random SD1.5 UNet (plus adapter with its black
  negative, precise boosts and layer weights as one Apply), where ``--ours`` does not.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from devtools.comfy_import import REPO_ROOT
from devtools.workflow_tools import ADAPTER, ENCODER
from migrate import faithful
from migrate.rules import migrate
from test_migrate import (  # noqa: F401  (cubiq: a fixture)
    CUBIQ_PATH, Graph, cubiq, embeds_graph, enhancer_graph, precise_graph, reference, sample, scene, style_composition_graph,
    tiled_graph, unified,
)

SD15, SDXL = (faithful.family_by_id(name) for name in ("sd15", "sdxl"))
SDXL_CHECKPOINT = "sdxl/AlbedoBaseXL.safetensors"  # cubiq's examples keep checkpoints in family folders
PLUS_ADAPTER = "ip-adapter-plus_sd15.safetensors"


def nodes_of(graph: dict, kind: str) -> list[tuple[str, dict]]:
    return [(key, node["inputs"]) for key, node in graph.items() if node["class_type"] == kind]


def applies(graph: dict) -> list[dict]:
    return [inputs for _, inputs in nodes_of(graph, "IPAdapterKitApply")]


def pairs(text: str) -> dict[int, float]:
    return {int(k): float(v) for k, v in (part.split(":") for part in text.split(","))}


def advanced_graph(weight_type: str = "linear", checkpoint: str | None = None, preset: str = "PLUS (high strength)"):
    g = Graph()
    ckpt, positive, negative, latent = scene(g)
    if checkpoint:
        g.nodes[ckpt]["inputs"]["ckpt_name"] = checkpoint
    loader = unified(g, ckpt, preset)
    apply = g.add("IPAdapterAdvanced", model=(loader, 0), ipadapter=(loader, 1), image=reference(g), weight=0.8,
                  weight_type=weight_type)
    sample(g, ckpt, (apply, 0), (positive, 0), (negative, 0), latent)
    return g


def with_preset(graph: Graph, preset: str) -> Graph:
    for node in graph.nodes.values():
        if node["class_type"] == "IPAdapterUnifiedLoader":
            node["inputs"]["preset"] = preset
    return graph


def model_loader_graph(adapter_file: str, kind: str = "IPAdapterAdvanced", **widgets):
    g = Graph()
    ckpt, positive, negative, latent = scene(g)
    ipadapter = g.add("IPAdapterModelLoader", ipadapter_file=adapter_file)
    vision = g.add("CLIPVisionLoader", clip_name=ENCODER)
    apply = g.add(kind, model=(ckpt, 0), ipadapter=(ipadapter, 0), image=reference(g), clip_vision=(vision, 0), **widgets)
    sample(g, ckpt, (apply, 0), (positive, 0), (negative, 0), latent)
    return g


# -- the weight types' shapes: the migrator's copy is the core's ------------------------------------------

def test_the_weight_types_shapes_are_the_cores():
    from ipadapter.choices import WEIGHT_TYPES
    from ipadapter.weighting import weight_schedule

    for family in faithful.families():
        for weight_type in WEIGHT_TYPES:
            factors = faithful.block_factors(weight_type, family, composition_weight=0.7)
            schedule = weight_schedule(weight_type, family, 1.0, 0.7)
            mine = {layer.key: factors.get(layer.comfy_block, 0.0) for layer in family.layers}
            assert mine == pytest.approx({key: entry.weight for key, entry in schedule.items()}), (family.id, weight_type)


# -- cubiq's weights, written out from its source (IPAdapterPlus.py: ipadapter_execute) -----------------------

def cubiq_blocks(family, kind: str, weight: float, boost: float = 0.0, layer_weights=None) -> tuple[dict, set]:
    """(block position -> weight, the positions whose cond and uncond swap) of one of cubiq's nodes; its middle
    block (SD1.5: position 6, SDXL: 4) is never patched, so it is left out."""
    b, w = boost, weight
    if family.id == "sd15":
        middle = 6
        if kind == "precise style":
            weights = {**dict.fromkeys((0, 1, 2, 3, *range(9, 16)), w), 4: b * 0.25, 5: b}
            swapped = {4, 5}
        elif kind == "precise composition":
            weights = {**dict.fromkeys((0, 1, 2, 3, *range(9, 16)), b), 4: w * 0.25, 5: w, 6: b * .1, 7: b * .1, 8: b * .1}
            swapped = set(range(16)) - {4, 5}
        else:
            weights, swapped = {}, set()
    else:
        middle = 4
        if kind == "precise style":
            weights, swapped = {3: b, 6: w}, {3}
        elif kind == "precise composition":
            weights = {**dict.fromkeys((0, 1, 2, 4, 5, 7, 8, 9, 10), b * .1), 3: w, 6: b}
            swapped = set(range(11)) - {3}
        else:
            weights, swapped = {}, set()
    if layer_weights is not None:  # the Mad Scientist: its per-block weights times λ, the precise types' swaps kept
        weights = {t: v * w for t, v in layer_weights.items()}
        swapped = swapped if kind.startswith("precise") else set()
    weights.pop(middle, None)
    return weights, swapped


def ours_blocks(apply: dict, family) -> tuple[dict, set]:
    """The same, of one Apply of ours, as the core computes it from the Apply's widgets."""
    from ipadapter.weighting import layer_weights

    layers = apply["custom_layer_weights"] if apply["layers"] == "custom" else apply["layers"]
    per_layer = layer_weights(family, apply["weight"], apply["weight_type"], layers)
    weights, swapped = {}, set()
    for layer in family.layers:
        t = family.block_position(layer)
        entry = per_layer[layer.key]
        if entry.weight:
            assert weights.setdefault(t, entry.weight) == pytest.approx(entry.weight)  # a block's layers alike
            if entry.swapped:
                swapped.add(t)
    return weights, swapped


def assert_same_blocks(ours: tuple, cubiqs: tuple) -> None:
    weights, swapped = cubiqs
    weights = {t: v for t, v in weights.items() if v}
    assert ours[0] == pytest.approx(weights)
    assert ours[1] == swapped & set(weights)


def precise_node_graph(kind: str, weight: float, boost: float, checkpoint: str):
    g = Graph()
    ckpt, positive, negative, latent = scene(g)
    g.nodes[ckpt]["inputs"]["ckpt_name"] = checkpoint
    loader = unified(g, ckpt, "PLUS (high strength)")
    node, name = (("IPAdapterPreciseStyleTransfer", "style_boost") if kind == "precise style"
                  else ("IPAdapterPreciseComposition", "composition_boost"))
    apply = g.add(node, model=(loader, 0), ipadapter=(loader, 1), image=reference(g), weight=weight, **{name: boost})
    sample(g, ckpt, (apply, 0), (positive, 0), (negative, 0), latent)
    return g


# -- the middle block -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family, checkpoint", [(SD15, "sd15/realisticVisionV51_v51VAE.safetensors"),
                                                (SDXL, SDXL_CHECKPOINT), (SDXL, "sd_xl_base_1.0.safetensors")])
@pytest.mark.parametrize("weight_type", ["linear", "ease in", "strong style transfer", "weak middle"])
def test_the_middle_block_is_weighted_0_through_custom_layer_weights(family, checkpoint, weight_type):
    graph = advanced_graph(weight_type, checkpoint)
    (apply,) = applies(migrate(graph.api())[0])
    assert (apply["layers"], apply["weight_type"], apply["weight"]) == ("custom", weight_type, 0.8)
    custom = pairs(apply["custom_layer_weights"])
    middle = faithful.middle_keys(family)
    assert middle == ([31] if family is SD15 else list(range(121, 140, 2)))
    assert custom == {key: 0.0 if key in middle else 1.0 for key in family.keys}
    weights, _ = ours_blocks(apply, family)
    shares = faithful.block_factors(weight_type, family)
    assert weights == pytest.approx({t: 0.8 * shares[block] for t, block in enumerate(family.blocks)
                                     if block[0] != "middle" and shares.get(block)})
    (ours,) = applies(migrate(graph.api(), "ours")[0])
    assert (ours["layers"], ours["custom_layer_weights"]) == ("all", "")


@pytest.mark.parametrize("weight_type", ["style transfer", "composition", "style transfer precise"])
def test_weight_types_that_leave_the_middle_block_out_keep_all_layers(weight_type):
    (apply,) = applies(migrate(advanced_graph(weight_type, SDXL_CHECKPOINT).api())[0])
    assert (apply["layers"], apply["weight_type"]) == ("all", weight_type)


def test_where_the_graph_does_not_say_the_family_the_report_asks_for_it():
    graph = advanced_graph("linear")  # v1-5-pruned-emaonly and a preset both families offer
    api, report = migrate(graph.api())
    (apply,) = applies(api)
    assert apply["layers"] == "all"
    key = next(k for k, n in graph.nodes.items() if n["class_type"] == "IPAdapterAdvanced")
    (line,) = [line for line in report.lines() if line.startswith(f"check: node {key} (IPAdapterAdvanced)")]
    assert "--family" in line and "middle block" in line
    (apply,) = applies(migrate(graph.api(), family="sd15")[0])
    assert apply["custom_layer_weights"].endswith("29:1, 31:0")
    light = advanced_graph("linear", preset="LIGHT - SD1.5 only (low strength)")  # a one-family preset says it
    assert applies(migrate(light.api())[0])[0]["custom_layer_weights"].endswith("31:0")


def test_regions_share_the_applys_custom_layer_weights():
    g = Graph()
    ckpt, positive, negative, latent = scene(g)
    loader = unified(g, ckpt, "PLUS (high strength)")
    mask = g.add("SolidMask", value=1.0, width=512, height=512)
    first = g.add("IPAdapterRegionalConditioning", image=reference(g), weight_type="style transfer", mask=(mask, 0))
    second = g.add("IPAdapterRegionalConditioning", image=reference(g), weight_type="ease out", mask=(mask, 0))
    params = g.add("IPAdapterCombineParams", params_1=(first, 0), params_2=(second, 0))
    apply = g.add("IPAdapterFromParams", model=(loader, 0), ipadapter=(loader, 1), ipadapter_params=(params, 0))
    sample(g, ckpt, (apply, 0), (positive, 0), (negative, 0), latent)
    api, _ = migrate(g.api(), family="sd15")
    (apply,) = applies(api)
    assert apply["layers"] == "custom" and pairs(apply["custom_layer_weights"])[31] == 0.0
    (black,) = nodes_of(api, "EmptyImage")
    assert all(encode["negative_image"] == [black[0], 0] for _, encode in nodes_of(api, "IPAdapterKitEncode"))


# -- the black negative image -------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda: advanced_graph(), lambda: style_composition_graph(), lambda: model_loader_graph(PLUS_ADAPTER),
    lambda: model_loader_graph("ip-adapter-full-face_sd15.safetensors"), lambda: with_preset(embeds_graph(), "PLUS (high strength)"),
    lambda: model_loader_graph(PLUS_ADAPTER, "IPAdapterTiled"),
], ids=["unified-plus", "style-composition", "plus-file", "full-face-file", "encoder-nodes", "tiled"])
def test_plus_adapters_get_cubiqs_black_negative_image(make):
    graph = make()
    api, report = migrate(graph.api())
    (black,) = nodes_of(api, "EmptyImage")  # one for the whole graph
    assert black[1] == {"width": 224, "height": 224, "batch_size": 1, "color": 0}
    encodes = nodes_of(api, "IPAdapterKitEncode") + nodes_of(api, "IPAdapterKitEncodeTiled")
    assert encodes and all(inputs["negative_image"] == [black[0], 0] for _, inputs in encodes)
    assert any("black 224×224 EmptyImage" in line and "[faithful]" in line for line in report.lines())
    ours, ours_report = migrate(graph.api(), "ours")
    assert not nodes_of(ours, "EmptyImage")
    assert not [i for _, i in nodes_of(ours, "IPAdapterKitEncode") + nodes_of(ours, "IPAdapterKitEncodeTiled")
                if "negative_image" in i]
    assert not [line for line in ours_report.lines() if "EmptyImage" in line]


@pytest.mark.parametrize("make", [
    lambda: advanced_graph(preset="STANDARD (medium strength)"), lambda: model_loader_graph(ADAPTER),
    lambda: model_loader_graph("ip-adapter_sd15_vit-G.safetensors"), lambda: precise_graph(),
], ids=["unified-standard", "base-file", "vit-g-file", "standard-precise"])
def test_base_adapters_keep_a_zero_negative(make):
    api, _ = migrate(make().api())
    assert not nodes_of(api, "EmptyImage")
    assert all("negative_image" not in inputs for _, inputs in nodes_of(api, "IPAdapterKitEncode"))


def test_a_connected_negative_image_stays_and_an_unknown_adapter_is_a_check():
    from test_migrate import negative_image_graph

    graph = negative_image_graph("unified")
    graph.nodes["5"]["inputs"]["preset"] = "PLUS (high strength)"
    api, _ = migrate(graph.api())
    (_, encode), = nodes_of(api, "IPAdapterKitEncode")
    assert api[encode["negative_image"][0]]["class_type"] == "IPAdapterKitNoise" and not nodes_of(api, "EmptyImage")
    api, report = migrate(model_loader_graph("my-adapter.safetensors").api())
    assert not nodes_of(api, "EmptyImage")
    assert any("plus / full-face" in line and line.startswith("check: node") for line in report.lines())


# -- precise nodes and layer weights as one Apply -------------------------------------------------------------------

@pytest.mark.parametrize("family, checkpoint", [(SD15, "sd15/x.safetensors"), (SDXL, SDXL_CHECKPOINT)])
@pytest.mark.parametrize("kind", ["precise style", "precise composition"])
@pytest.mark.parametrize("weight, boost", [(0.8, 0.35), (1.0, 1.0), (0.0, 0.6), (0.7, 2.5)])
def test_precise_nodes_become_one_apply_with_cubiqs_block_weights(family, checkpoint, kind, weight, boost):
    graph = precise_node_graph(kind, weight, boost, checkpoint)
    api, report = migrate(graph.api())
    (apply,) = applies(api)
    assert_same_blocks(ours_blocks(apply, family), cubiq_blocks(family, kind, weight, boost))
    if apply["layers"] == "custom":
        assert all(pairs(apply["custom_layer_weights"])[key] == 0.0 for key in faithful.middle_keys(family))
    if weight and boost and weight != boost:
        assert apply["weight"] == weight  # λ stays on the Apply, the boost goes into the layer weights
        assert any("one Apply instead of two" in line for line in report.lines())
        ours, ours_report = migrate(graph.api(), "ours")  # --ours: a second Apply, where λ − boost is in range
        assert len(applies(ours)) == 2 if -1 <= weight - boost or kind == "precise style" else ours_report.left


@pytest.mark.parametrize("family, checkpoint, layer_weights", [
    (SD15, "sd15/x.safetensors", {0: 1.0, 3: 0.8, 4: 0.5, 5: 1.2, 6: 0.35, 13: 1.0}),
    (SDXL, SDXL_CHECKPOINT, {0: 0.3, 3: 1.5, 4: 1.0, 6: 1.0, 10: 0.2}),
])
@pytest.mark.parametrize("weight_type", ["linear", "ease in", "composition precise"])
def test_layer_weights_become_one_apply_with_cubiqs_block_weights(family, checkpoint, layer_weights, weight_type):
    g = Graph()
    ckpt, positive, negative, latent = scene(g)
    g.nodes[ckpt]["inputs"]["ckpt_name"] = checkpoint
    loader = unified(g, ckpt, "PLUS (high strength)")
    text = ", ".join(f"{t}:{v}" for t, v in layer_weights.items())
    ms = g.add("IPAdapterMS", model=(loader, 0), ipadapter=(loader, 1), image=reference(g), weight=0.9,
               weight_type=weight_type, layer_weights=text)
    sample(g, ckpt, (ms, 0), (positive, 0), (negative, 0), latent)
    (apply,) = applies(migrate(g.api())[0])
    kind = "precise composition" if weight_type == "composition precise" else "linear"
    assert_same_blocks(ours_blocks(apply, family), cubiq_blocks(family, kind, 0.9, layer_weights=layer_weights))
    ours, ours_report = migrate(g.api(), "ours")
    if weight_type == "composition precise":  # --ours cannot express it
        assert ours[ms]["class_type"] == "IPAdapterMS" and "cannot be expressed" in ours_report.left[ms][1]
    else:  # --ours: the middle block takes the weight cubiq's never uses
        (mine,) = applies(ours)
        middle = family.blocks.index(faithful.middle_blocks(family)[0])
        assert {pairs(mine["custom_layer_weights"])[key] for key in faithful.middle_keys(family)} == {layer_weights[middle]}


def test_layer_weights_on_a_block_the_precise_type_leaves_out_stay_in_place():
    graph = enhancer_graph()
    key = next(k for k, n in graph.nodes.items() if n["class_type"] == "IPAdapterMS")
    graph.nodes[key]["inputs"].update(weight_type="style transfer precise", layer_weights="0:1, 7:1")
    api, report = migrate(graph.api())
    assert api[key]["class_type"] == "IPAdapterMS" and "leaves that block out" in report.left[key][1]


# -- Tiled ---------------------------------------------------------------------------------------------------------

def test_tiled_puts_each_tile_under_its_own_mask():
    """Faithful: Encode Tiled cuts cubiq's tiles and its regions put each under its own mask (tests/test_tiles.py:
    the same as one Apply per tile); --ours: every tile's tokens on the whole picture, and the report says so."""
    api, report = migrate(tiled_graph().api(), family="sd15")
    (apply,) = applies(api)
    assert apply["layers"] == "custom" and "embeds" not in apply and apply["regions"][1] == 2
    assert api[apply["regions"][0]]["inputs"]["tiling"] == "cubiq (256 px tiles)"
    assert any("each under its own mask" in line and "[faithful]" in line for line in report.lines())
    assert not [line for line in report.lines() if "whole picture" in line]
    api, report = migrate(tiled_graph().api(), mode="ours")
    (apply,) = applies(api)
    assert apply["combine"] == "concat" and "regions" not in apply
    (line,) = [line for line in report.lines() if "whole picture" in line]
    assert line.startswith("check: node") and "its own mask" in line


# -- the report and the command lines ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["faithful", "ours"])
def test_the_report_maps_every_cubiq_node_with_its_mode(mode):
    graph = precise_graph()
    api, report = migrate(graph.api(), mode, "sd15")
    lines = report.lines()
    assert lines[0].startswith(f"mode: {mode}")
    for key, node in graph.nodes.items():
        if node["class_type"].startswith("IPAdapter"):
            (line,) = [line for line in lines if line.startswith(f"node {key} ({node['class_type']}) → ")]
            assert f"[{mode}]" in line
            new_ids = [part.split(" (")[0] for part in line.split(" → ")[1].split(f" [{mode}]")[0].split(", ")]
            assert new_ids[0] == key and all(new in api for new in new_ids)
    assert lines[-1].endswith(f"({mode} mode)")


def run(module: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)


def test_the_command_lines_take_ours_and_family(tmp_path):
    source = tmp_path / "cubiq.json"
    source.write_text(json.dumps(advanced_graph().api()))
    result = run("migrate", source, tmp_path / "faithful.json", "--family", "sdxl")
    assert result.returncode == 0, result.stderr
    faithful_api = json.loads((tmp_path / "faithful.json").read_text())
    (apply,) = applies(faithful_api)
    assert pairs(apply["custom_layer_weights"])[139] == 0.0 and nodes_of(faithful_api, "EmptyImage")
    assert "[faithful]" in result.stdout
    result = run("ipadapter", "migrate", source, tmp_path / "ours.json", "--ours")
    assert result.returncode == 0, result.stderr
    ours_api = json.loads((tmp_path / "ours.json").read_text())
    assert applies(ours_api)[0]["layers"] == "all" and not nodes_of(ours_api, "EmptyImage")
    assert result.stdout.splitlines()[0] == f"wrote {tmp_path / 'ours.json'} (api format)" and "[ours]" in result.stdout
    result = run("ipadapter", "migrate", tmp_path / "missing.json", tmp_path / "out.json")
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "cannot read" in result.stderr


# -- the pictures: cubiq's nodes and the faithful migration give the same latents (with CUBIQ_PATH) ---------------------

PICTURES = {  # name -> (adapter variant, cubiq node, its widgets)
    "plus: black negative image, middle block off": (
        "plus", "IPAdapterAdvanced", {"weight": 0.8, "weight_type": "ease in", "embeds_scaling": "V only"}),
    "precise composition, boost other than λ, one Apply": (
        "plus", "IPAdapterPreciseComposition", {"weight": 0.8, "composition_boost": 0.35, "embeds_scaling": "K+V"}),
    "precise style transfer, boost other than λ, one Apply": (
        "base", "IPAdapterPreciseStyleTransfer", {"weight": 0.6, "style_boost": 1.4}),
    "layer weights under composition precise, one Apply": (
        "base", "IPAdapterMS", {"weight": 0.9, "weight_type": "composition precise",
                                "layer_weights": "0:1, 3:0.8, 4:0.5, 5:1.2, 6:0.35, 9:0.7, 13:1"}),
}


@pytest.fixture(scope="module")
def picture_setup(request, tmp_path_factory):
    """cubiq's and our node classes, a small SD1.5 UNet, CLIP vision and reference; random adapters saved under
    released names (the name tells the migrator the family and whether the adapter is a plus one)."""
    if not CUBIQ_PATH:  # before importing ComfyUI, which takes seconds
        pytest.skip("CUBIQ_PATH is not set: no copy of cubiq's ComfyUI_IPAdapter_plus to compare with (CI has none)")
    cubiq, comfy = request.getfixturevalue("cubiq"), request.getfixturevalue("comfy")
    import folder_paths
    import torch
    from safetensors.torch import save_file

    import nodes as comfy_nodes
    from cubiq_pack import small_clip_vision
    from devtools.adapter_factory import random_adapter
    from devtools.comfy_import import import_pack
    from devtools.comfyui_harness import build_sd15_model_patcher
    from test_migrate import constant

    folder = tmp_path_factory.mktemp("ipadapter")
    files = {}
    for variant, name in (("base", "ip-adapter_sd15.safetensors"), ("plus", PLUS_ADAPTER)):
        adapter = random_adapter(variant, base_width=64, encoder_width=1280 if variant == "plus" else None, seed=5)
        save_file({f"{group}.{k}": (v * 5 if group == "ip_adapter" else v).contiguous()
                   for group, tensors in adapter.items() for k, v in tensors.items()}, str(folder / name))
        files[variant] = name
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
    classes = {**cubiq.NODE_CLASS_MAPPINGS, **import_pack().NODE_CLASS_MAPPINGS, "Sample": Sample,
               "EmptyImage": comfy_nodes.EmptyImage,
               "TestModel": constant(build_sd15_model_patcher(64, seed=0)), "TestImage": constant(pixels),
               "TestCLIPVision": constant(small_clip_vision(comfy, seed=0))}
    plain = {}  # the latents without an adapter, once
    return classes, files, plain


@pytest.mark.parametrize("case", PICTURES)
def test_faithful_graphs_give_cubiqs_latents(case, picture_setup):
    from test_migrate import CUBIQ, execute

    classes, files, plain = picture_setup
    variant, kind, widgets = PICTURES[case]
    spec = CUBIQ[kind]
    inputs = {name: spec.input(name).initial for name in spec.widgets()}
    inputs.update(widgets, model=["1", 0], ipadapter=["4", 0], image=["2", 0], clip_vision=["3", 0])
    graph = {
        "1": {"class_type": "TestModel", "inputs": {}}, "2": {"class_type": "TestImage", "inputs": {}},
        "3": {"class_type": "TestCLIPVision", "inputs": {}},
        "4": {"class_type": "IPAdapterModelLoader", "inputs": {"ipadapter_file": files[variant]}},
        "5": {"class_type": kind, "inputs": inputs},
        "6": {"class_type": "Sample", "inputs": {"model": ["5", 0]}},
    }
    faithful_graph, report = migrate(json.loads(json.dumps(graph)))
    ours_graph, _ = migrate(json.loads(json.dumps(graph)), "ours")
    assert not report.left and len(applies(faithful_graph)) == 1
    assert bool(nodes_of(faithful_graph, "EmptyImage")) == (variant == "plus")
    theirs = execute(graph, classes)["6"][0]
    faithful_latent = execute(faithful_graph, classes)["6"][0]
    if not plain:
        plain[0] = execute({"1": graph["1"], "6": {"class_type": "Sample", "inputs": {"model": ["1", 0]}}}, classes)["6"][0]
    scale = max(1.0, theirs.abs().max().item())
    effect = (theirs - plain[0]).abs().max().item()
    assert effect > 1e-2, "cubiq's image prompt has no effect: the comparison would show nothing"
    assert (faithful_latent - theirs).abs().max().item() <= 1e-4 * scale, case
    if kind == "IPAdapterAdvanced":  # --ours gives this pack's own picture: the middle block, the blank negative
        ours_latent = execute(ours_graph, classes)["6"][0]
        assert (ours_latent - theirs).abs().max().item() > 1e-3 * scale, case
