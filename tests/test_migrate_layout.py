"""Where the migrator puts the nodes of an editor workflow (``migrate/layout.py``).

cubiq's graphs are laid out as tightly as that pack's example files (``Graph.ui(packed=True)``:
columns of nodes of cubiq's sizes, 20 px apart), so that our larger nodes and the nodes a
migration adds cover their neighbours unless the layout pass moves them. Checked, for every
graph of ``test_migrate.py`` in both modes: no two nodes overlap (title bars included); a
group keeps its nodes, and the nodes that replace them, inside it and no other node; links
saved as objects (the editor's newer schema) stay objects; a node far from the migrated
ones keeps its place.
"""
from __future__ import annotations

import copy

import pytest

from devtools.workflow_tools import check_workflow
from migrate.layout import TITLE, node_box, overlaps
from migrate.rules import migrate
from test_migrate import GRAPHS, info  # noqa: F401  (fixture: the live node definitions)


def boxes(workflow: dict) -> dict:
    return {node["id"]: node_box(node) for node in workflow["nodes"]}


def overlapping(workflow: dict) -> list[tuple]:
    items = sorted(boxes(workflow).items())
    return [(a, b) for i, (a, box) in enumerate(items) for b, other in items[i + 1:] if overlaps(box, other)]


def inside(box, bounding) -> bool:
    x, y, w, h = bounding
    return x <= box.x and box.right <= x + w and y <= box.y and box.bottom <= y + h


@pytest.mark.parametrize("mode", ["faithful", "ours"])
@pytest.mark.parametrize("name", GRAPHS)
def test_migrated_graphs_have_no_overlapping_nodes(name, mode, info):
    workflow = GRAPHS[name]().ui(info, packed=True)
    assert overlapping(workflow) == []
    for family in (None, "sd15"):
        migrated, _ = migrate(copy.deepcopy(workflow), mode, family)
        assert overlapping(migrated) == [], name
        sizes = {node["type"]: node["size"] for node in migrated["nodes"]}
        if "IPAdapterKitApply" in sizes:  # ours are larger than cubiq's 315 × 278: the pass had something to do
            assert sizes["IPAdapterKitApply"][0] >= 320 and sizes["IPAdapterKitApply"][1] >= 478


def grouped(workflow: dict, column_of: int) -> tuple[list, dict]:
    """The workflow with a group around the packed column that holds node ``column_of``, and the group's nodes."""
    x = node_box(next(n for n in workflow["nodes"] if n["id"] == column_of)).x
    members = [n["id"] for n in workflow["nodes"] if node_box(n).x == x]
    held = [node_box(n) for n in workflow["nodes"] if n["id"] in members]
    top = min(b.y for b in held) - 40
    group = {"title": "IP-Adapter", "bounding": [x - 10, top, 335, max(b.bottom for b in held) + 10 - top],
             "color": "#3f789e", "font_size": 24, "flags": {}}
    return members, group


@pytest.mark.parametrize("name", ["advanced_negative_image", "style_composition", "regional", "precise", "tiled"])
def test_groups_keep_their_nodes_and_the_nodes_that_replace_them(name, info):
    graph = GRAPHS[name]()
    workflow = graph.ui(info, packed=True)
    apply = max(int(k) for k, n in graph.nodes.items() if n["class_type"].startswith("IPAdapter"))
    members, group = grouped(workflow, apply)
    others, far = grouped(workflow, next(n["id"] for n in workflow["nodes"] if n["id"] not in members))
    workflow["groups"] = [group, far]
    migrated, report = migrate(workflow, family="sd15")
    assert overlapping(migrated) == []
    placed = boxes(migrated)
    for keys, saved in ((members, migrated["groups"][0]), (others, migrated["groups"][1])):
        held = set()  # the group's nodes that stay, and the nodes that took the place of the others
        for key in keys:
            held |= {new for new, _ in report.mapped[key].new} if key in report.mapped else set()
            held |= {key} if key in placed else set()  # stays, or its replacement took its id
        bounding = saved["bounding"]
        assert held and all(inside(placed[key], bounding) for key in held), (held, bounding)
        assert not [key for key, box in placed.items() if key not in held and overlaps(box, type(box)(*bounding))]


def test_links_saved_as_objects_stay_objects(info):
    workflow = GRAPHS["style_composition"]().ui(info, packed=True)
    fields = ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")
    workflow["links"] = [dict(zip(fields, link)) for link in workflow["links"]]
    workflow["state"] = {"lastNodeId": workflow.pop("last_node_id"), "lastLinkId": workflow.pop("last_link_id"),
                         "lastGroupId": 0, "lastRerouteId": 0}
    workflow["version"] = 1
    migrated, report = migrate(workflow)
    assert not report.left and all(isinstance(link, dict) and set(link) == set(fields) for link in migrated["links"])
    assert migrated["state"]["lastLinkId"] == len(migrated["links"]) and "last_node_id" not in migrated
    assert migrated["state"]["lastNodeId"] == max(node["id"] for node in migrated["nodes"])
    by_id = {node["id"]: node for node in migrated["nodes"]}
    for link in migrated["links"]:
        assert by_id[link["target_id"]]["inputs"][link["target_slot"]]["link"] == link["id"]
        assert link["id"] in by_id[link["origin_id"]]["outputs"][link["origin_slot"]]["links"]
    as_lists = {**migrated, "links": [[link[f] for f in fields] for link in migrated["links"]]}
    assert check_workflow(as_lists, info) == []


def test_nodes_away_from_the_migrated_ones_keep_their_place(info):
    workflow = GRAPHS["simple"]().ui(info, packed=True)
    lonely = {"id": 99, "type": "Note", "pos": [-2000, -2000], "size": [300, 100], "flags": {}, "order": 99,
              "mode": 0, "properties": {}, "widgets_values": ["far away"]}
    workflow["nodes"].append(lonely)
    migrated, _ = migrate(copy.deepcopy(workflow))
    assert next(n for n in migrated["nodes"] if n["id"] == 99)["pos"] == [-2000, -2000]
    before, after = boxes(workflow), boxes(migrated)
    assert after[1].x == before[1].x and after[1].y == before[1].y  # the checkpoint loader, top left, stays
    assert all(after[key].y + TITLE >= before[key].y + TITLE for key in before)  # things move down or right only
    assert all(after[key].x >= before[key].x for key in before)
