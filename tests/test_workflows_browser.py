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
no value landed in the wrong widget). The layout as the editor draws it: each
node keeps the file's size, which is no smaller than the size the editor
computes for it (title, slots, widgets), no two nodes overlap (title bars
included), and no widget's label runs into its value (measured with the
editor's font). A screenshot of each workflow, the graph alone fitted into the
window, is kept in ``test-artifacts/workflows/browser-<name>.png`` (gitignored;
README.md's picture is the one of workflow 2). A workflow with a node type the
pack does not have must raise the dialog, naming the type.

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
from devtools.workflow_tools import (
    APPLY_NODES, FRONTEND_ONLY, load_workflow, overlapping_nodes, ui_workflow_files, widget_layout,
)

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
    const margin = 30;  // room for the links that curl out of the outermost nodes
    const scale = Math.min(canvas.width / (x1 - x0 + 2 * margin), canvas.height / (y1 - y0 + 2 * margin), 1);
    app.canvas.ds.scale = scale;
    app.canvas.ds.offset = [-x0 + margin, -y0 + margin];
    app.graph.setDirtyCanvas(true, true);
    app.canvas.draw(true, true);
    // text widths in the font the editor draws slots and widgets with
    const measure = document.createElement('canvas').getContext('2d');
    measure.font = app.canvas.inner_text_font || '12px Arial';
    const width = (text) => (text === undefined || text === null ? 0 : measure.measureText(String(text)).width);
    return {
        dialogs,
        registered: Object.keys(LiteGraph.registered_node_types),
        nodes: nodes.map((node) => ({
            id: node.id, type: node.type, title: node.title, comfyClass: node.comfyClass || null,
            pos: [...node.pos], size: [...node.size], computed_size: [...node.computeSize()],
            widgets: (node.widgets || []).map((widget) => ({
                name: widget.name, value: widget.value, kind: widget.type,
                label_width: width(widget.displayName ?? widget.label ?? widget.name),
                value_width: width(widget._displayValue),
            })),
        })),
        saved: app.graph.serialize(),
        box: {x: 0, y: 0, width: Math.min(canvas.width, (x1 - x0 + 2 * margin) * scale),
              height: Math.min(canvas.height, (y1 - y0 + 2 * margin) * scale)},
    };
}"""
# Only the graph in the screenshots: the editor's menus, side bars, banners and minimap hidden; the canvas and
# the text boxes on it (frontend 1.32's .dom-widget, the March-2024 editor's .comfy-multiline-input) shown.
GRAPH_ONLY = """body * { visibility: hidden !important; }
#graph-canvas, .dom-widget, .dom-widget *, .comfy-multiline-input { visibility: visible !important; }"""
# How frontend 1.32 draws a number or combo widget (BaseWidget.drawTruncatingText): its label from the left and its
# value from the right within the widget's width less 85 px (margins and arrows), 5 px apart; a one-line text
# widget the same within its width less 60 px. Where they do not fit, the editor cuts the label short.
WIDGET_TEXT_MARGINS = {"number": 85, "combo": 85, "text": 60}
LABEL_VALUE_GAP = 5


@pytest.fixture(scope="module")
def editor(comfyui_server):
    """A Chromium page with the graph editor of the session's ComfyUI, ready (our nodes registered)."""
    try:  # later editors open a template gallery on a first visit, over the graph, unless the tutorial is done
        comfyui_server.request("POST", "/settings/Comfy.TutorialCompleted", True)
        # the screenshots: no pack name (here the test's folder name) above each node, and their text drawn at
        # any zoom (a tall graph fitted into the window is drawn without it otherwise)
        comfyui_server.request("POST", "/settings/Comfy.NodeBadge.NodeSourceBadgeMode", "None")
        comfyui_server.request("POST", "/settings/LiteGraph.Canvas.MinFontSizeForLOD", 0)
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
    graph_screenshot(editor, ARTIFACTS / f"browser-{path.stem}.png", state["box"])

    assert not [text for text in state["dialogs"] if missing_nodes_dialog(text)], state["dialogs"]
    assert not editor.errors, editor.errors
    shown = {node["id"]: node for node in state["nodes"]}
    for live in shown.values():  # the editor's own widgets ($$canvas-image-preview, once an image is loaded) hold no value
        live["widgets"] = [widget for widget in live["widgets"] if not widget["name"].startswith("$$")]
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

    # the layout as drawn: the file's sizes, large enough for what each node holds, side by side, labels readable
    for node in workflow["nodes"]:
        live = shown[node["id"]]
        assert live["pos"] == node["pos"] and live["size"] == node["size"], (node["id"], node["type"], live["size"])
        assert all(have >= need - 0.5 for have, need in zip(node["size"], live["computed_size"])), \
            (node["id"], node["type"], node["size"], live["computed_size"])
        for widget in live["widgets"]:
            if widget["kind"] in WIDGET_TEXT_MARGINS:
                room = node["size"][0] - WIDGET_TEXT_MARGINS[widget["kind"]]
                needed = widget["label_width"] + LABEL_VALUE_GAP + widget["value_width"]
                assert needed <= room, f"node {node['id']} ({node['type']}): {widget['name']}'s label runs into its " \
                                       f"value ({needed:.0f} px of text in {room} px)"
    assert overlapping_nodes({"nodes": list(shown.values())}) == []


def graph_screenshot(editor, path: Path, box: dict) -> None:
    """The graph as LOAD fitted it into the window, without the editor's menus and panels around it."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    style = editor.add_style_tag(content=GRAPH_ONLY)
    # the March-2024 editor's floating queue panel would cover part of the graph in the picture
    editor.evaluate("() => { const menu = document.querySelector('.comfy-menu'); if (menu) menu.style.display = 'none'; }")
    # and the canvas' own frame counter in its corner
    info = editor.evaluate("() => { const shown = app.canvas.show_info; app.canvas.show_info = false; "
                           "app.canvas.draw(true, true); return shown; }")
    editor.screenshot(path=str(path), clip=box)
    editor.evaluate("(shown) => { app.canvas.show_info = shown; }", info)
    editor.evaluate("(style) => style.remove()", style)
    editor.evaluate("() => { const menu = document.querySelector('.comfy-menu'); if (menu) menu.style.display = ''; }")


def test_the_editor_names_a_node_type_the_pack_does_not_have(editor):
    broken = copy.deepcopy(load_workflow(WORKFLOWS[0]))
    node = next(node for node in broken["nodes"] if node["type"] in APPLY_NODES)
    node["type"] = "IPAdapterKitApplyTypo"
    state = editor.evaluate(LOAD, broken)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    editor.screenshot(path=str(ARTIFACTS / "browser-missing-node.png"))
    (dialog,) = [text for text in state["dialogs"] if missing_nodes_dialog(text)]
    assert "IPAdapterKitApplyTypo" in dialog
