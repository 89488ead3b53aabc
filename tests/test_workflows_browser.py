"""The shared workflows in ComfyUI's own graph editor, in a real browser.

Debian's Chromium, driven by Playwright (headless), opens the editor that the
test session's ComfyUI serves (with this pack loaded) and loads each file of
``workflows/`` with the editor's own ``app.loadGraphData``, as opening the file
does. Checked: no "node types were not found" dialog; every node of the file is
in the editor's graph with a registered type; our nodes show the widgets of
their live definition with the file's values, and ComfyUI's own nodes (the
Flux / SD3.5 loaders among them) the widgets, in the order, that the API
conversion reads from ``widgets_values``; saving the graph again
(``app.graph.serialize()``) gives the file's widget values and links back (so
no value landed in the wrong widget). A screenshot of each workflow is kept in
``test-artifacts/workflows/browser-<name>.png`` (gitignored). A workflow with a
node type the pack does not have must raise the dialog, naming the type.

Skipped, with the reason, when Playwright or Chromium is not installed
(``scripts/setup.sh`` installs both; CI runs it).
"""
from __future__ import annotations

import copy
import math
import os
import shutil
from pathlib import Path

import pytest

from devtools.comfy_import import REPO_ROOT
from devtools.comfyui_harness import ComfyUIError
from devtools.workflow_tools import FRONTEND_ONLY, load_workflow, ui_workflow_files, widget_layout

CHROMIUM = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
ARTIFACTS = REPO_ROOT / "test-artifacts" / "workflows"
WORKFLOWS = ui_workflow_files()
# the missing-node dialog: the March-2024 editor's wording, and v0.3.75's (frontend 1.32)
MISSING_NODES_TEXTS = ("node types were not found", "This workflow has missing nodes")

# CI (.ci/run) sets this: there a missing browser is a failure, not a skip.
REQUIRED = os.environ.get("IPADAPTER_REQUIRE_BROWSER") == "1"


def unavailable(reason: str) -> None:
    if REQUIRED:
        raise RuntimeError(f"IPADAPTER_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason, allow_module_level=True)


try:
    from playwright import sync_api
except ImportError:
    unavailable("playwright is not installed (pip install playwright; scripts/setup.sh does)")
if not Path(CHROMIUM).is_file():
    unavailable(f"no Chromium at {CHROMIUM} (apt-get install chromium; scripts/setup.sh does as root)")

LOAD = """async (workflow) => {
    for (const modal of document.querySelectorAll('.comfy-modal')) modal.style.display = 'none';
    await app.loadGraphData(workflow);
    await new Promise((done) => setTimeout(done, 300));
    // the March-2024 editor's dialogs are .comfy-modal; later editors use [role=dialog]
    const dialogs = [...document.querySelectorAll('.comfy-modal, [role=dialog]')]
        .filter((modal) => getComputedStyle(modal).display !== 'none' && modal.innerText)
        .map((modal) => modal.innerText);
    // fit the whole graph into the window for the screenshot
    const nodes = app.graph._nodes;
    let [x0, y0, x1, y1] = [Infinity, Infinity, -Infinity, -Infinity];
    for (const node of nodes) {
        x0 = Math.min(x0, node.pos[0]); y0 = Math.min(y0, node.pos[1] - 30);
        x1 = Math.max(x1, node.pos[0] + node.size[0]); y1 = Math.max(y1, node.pos[1] + node.size[1]);
    }
    const canvas = app.canvas.canvas;
    const scale = Math.min(canvas.width / (x1 - x0 + 40), canvas.height / (y1 - y0 + 40), 1);
    app.canvas.ds.scale = scale;
    app.canvas.ds.offset = [-x0 + 20, -y0 + 20];
    app.graph.setDirtyCanvas(true, true);
    app.canvas.draw(true, true);
    return {
        dialogs,
        registered: Object.keys(LiteGraph.registered_node_types),
        nodes: nodes.map((node) => ({
            id: node.id, type: node.type, title: node.title, comfyClass: node.comfyClass || null,
            widgets: (node.widgets || []).map((widget) => ({name: widget.name, value: widget.value})),
        })),
        saved: app.graph.serialize(),
    };
}"""


@pytest.fixture(scope="module")
def editor(comfyui_server):
    """A Chromium page with the graph editor of the session's ComfyUI, ready (our nodes registered)."""
    try:  # later editors open a template gallery on a first visit, over the graph, unless the tutorial is done
        comfyui_server.request("POST", "/settings/Comfy.TutorialCompleted", True)
    except ComfyUIError:  # an editor without user settings (March 2024) has no gallery either
        pass
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.errors = []
            page.on("pageerror", lambda error: page.errors.append(str(error)))
            page.goto(comfyui_server.url, wait_until="load", timeout=60_000)
            page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph"
                                   " && LiteGraph.registered_node_types['IPAdapterKitApply']", timeout=60_000)
            # Later editors open a template gallery on a first visit, and some raise errors of their own while
            # they start (seen: a settings hook in frontend 1.27); neither comes from a workflow, so the
            # gallery is closed and only errors raised while a workflow loads count.
            page.wait_for_timeout(1000)
            page.keyboard.press("Escape")
            page.startup_errors = list(page.errors)
            yield page
        finally:
            browser.close()


@pytest.fixture(scope="module")
def info(comfyui_server):
    return comfyui_server.object_info()


def missing_nodes_dialog(text: str) -> bool:
    return any(phrase in text for phrase in MISSING_NODES_TEXTS)


def named_links(graph: dict) -> list[tuple]:
    """Each link as (id, origin node, origin slot, target node, target input's name, type)."""
    inputs = {node["id"]: [entry["name"] for entry in node.get("inputs", [])] for node in graph["nodes"]}
    return [(link_id, origin, slot, target, inputs[target][target_slot], kind)
            for link_id, origin, slot, target, target_slot, kind in graph["links"]]


def same_value(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
    return a == b


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_the_editor_loads_the_workflow_without_missing_nodes(path, editor, info):
    workflow = load_workflow(path)
    editor.errors.clear()
    state = editor.evaluate(LOAD, workflow)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    # the March-2024 editor's floating queue panel would cover part of the graph in the picture
    editor.evaluate("() => { const menu = document.querySelector('.comfy-menu'); if (menu) menu.style.display = 'none'; }")
    editor.screenshot(path=str(ARTIFACTS / f"browser-{path.stem}.png"))
    editor.evaluate("() => { const menu = document.querySelector('.comfy-menu'); if (menu) menu.style.display = ''; }")

    assert not [text for text in state["dialogs"] if missing_nodes_dialog(text)], state["dialogs"]
    assert not editor.errors, editor.errors
    shown = {node["id"]: node for node in state["nodes"]}
    saved = {node["id"]: node for node in state["saved"]["nodes"]}
    for node in workflow["nodes"]:
        assert node["id"] in shown, f"node {node['id']} ({node['type']}) is not in the editor's graph"
        live = shown[node["id"]]
        assert live["type"] == node["type"] and live["type"] in state["registered"]
        values, saved_values = node.get("widgets_values", []), saved[node["id"]].get("widgets_values", [])
        assert len(saved_values) == len(values) and all(map(same_value, saved_values, values)), \
            (node["id"], node["type"], saved_values, values)
        if node["type"].startswith("IPAdapterKit"):
            assert live["comfyClass"] == node["type"]
            expected = [widget.name for widget in widget_layout(info[node["type"]])]
            assert [widget["name"] for widget in live["widgets"]] == expected, node["type"]
            assert all(same_value(w["value"], v) for w, v in zip(live["widgets"], values))
        elif node["type"] in FRONTEND_ONLY:
            assert live["widgets"][0]["value"] == node["widgets_values"][0]
        else:  # ComfyUI's own nodes, the DiT loaders among them: the editor's widgets are the layout the API
            # conversion reads (widgets_values by position), the later schema's COMBO inputs included
            expected = [widget.extra or widget.name for widget in widget_layout(info[node["type"]])]
            assert [widget["name"] for widget in live["widgets"]] == expected, (node["type"], live["widgets"])
    # a link's target slot counts the node's inputs, which later editors list with every widget: compare by name
    assert sorted(named_links(state["saved"])) == sorted(named_links(workflow))


def test_the_editor_names_a_node_type_the_pack_does_not_have(editor):
    broken = copy.deepcopy(load_workflow(WORKFLOWS[0]))
    node = next(node for node in broken["nodes"] if node["type"] == "IPAdapterKitApply")
    node["type"] = "IPAdapterKitApplyTypo"
    state = editor.evaluate(LOAD, broken)
    editor.screenshot(path=str(ARTIFACTS / "browser-missing-node.png"))
    (dialog,) = [text for text in state["dialogs"] if missing_nodes_dialog(text)]
    assert "IPAdapterKitApplyTypo" in dialog
