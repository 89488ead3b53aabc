"""The two formats of a ComfyUI workflow, read into one graph model and written back (for ``rules.py``).

The editor's format keeps every node's place, size and widget values (by position) and a
list of links (``[id, from, slot, to, slot, type]``, or objects in the editor's newer
schema); the API format keeps each node's inputs by name, links as ``[node, slot]``.
Both are read into :class:`Node` records whose linked inputs are :class:`Out` values; the
writers keep the nodes that stay as they were (only their links are rewired) and add the
migration's nodes; in the editor's format ``layout.py`` places them by the cubiq node they
come from and moves the others apart where they would overlap. Links are written in the
form they were read in.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

from .layout import arrange, node_size
from .tables import COMFY, CUBIQ, OURS


class MigrationError(ValueError):
    """The input is not a workflow this module can read; the message is one line."""


@dataclass(frozen=True)
class Out:
    """Output ``slot`` of ``node``: an id of the input graph, or a :class:`Node` the migration adds."""

    node: object
    slot: int


@dataclass(eq=False)
class Node:
    id: object
    kind: str
    values: dict  # input name -> Out (linked) or widget value
    raw: dict | None = None  # as read: nodes that stay are written back from it
    widget_count: int | None = None  # UI: how many widget values the file had
    claim: object = None  # added nodes: the id of the old node whose id and place it takes
    owner: object = None  # added nodes: the cubiq node whose rule added it
    offset: tuple = (0, 0)  # added nodes: (id of the cubiq node it is placed by, dx, dy)


def is_cubiq(kind: str) -> bool:
    return kind in CUBIQ or (kind.startswith(("IPAdapter", "IPAAdapter")) and not kind.startswith("IPAdapterKit"))


def spec_of(kind: str):
    return OURS.get(kind) or COMFY.get(kind) or CUBIQ.get(kind)


def read(workflow) -> tuple[str, dict]:
    """("ui" or "api", {id: Node}) of a workflow; MigrationError if it is neither format."""
    if isinstance(workflow, dict) and isinstance(workflow.get("nodes"), list) and isinstance(workflow.get("links"), list):
        return "ui", read_ui(workflow)
    if isinstance(workflow, dict) and workflow and all(
            isinstance(e, dict) and isinstance(e.get("class_type"), str) and isinstance(e.get("inputs"), dict)
            for e in workflow.values()):
        return "api", read_api(workflow)
    raise MigrationError("not a ComfyUI workflow: expected the editor's format ('nodes' and 'links' lists) "
                         "or the API format ({id: {class_type, inputs}})")


def read_ui(workflow: dict) -> dict:
    links = {}
    for link in workflow["links"]:
        if isinstance(link, dict):  # the editor's newer schema
            link = [link.get(k) for k in LINK_FIELDS]
        if not isinstance(link, list) or len(link) < 6:
            raise MigrationError(f"not a ComfyUI workflow: link {link!r}; expected [id, from, slot, to, slot, type]")
        links[link[0]] = link
    nodes = {}
    for raw in workflow["nodes"]:
        if not isinstance(raw, dict) or "id" not in raw or not isinstance(raw.get("type"), str):
            raise MigrationError(f"not a ComfyUI workflow: node {str(raw)[:60]}; expected an object with an id and a type")
        values, count = {}, None
        if raw["type"] in CUBIQ:
            saved = raw.get("widgets_values") if isinstance(raw.get("widgets_values"), list) else []
            names = CUBIQ[raw["type"]].widgets()
            values = {name: CUBIQ[raw["type"]].input(name).initial for name in names}
            values.update(zip(names, saved))
            count = len(saved)
        for slot in raw.get("inputs") or []:
            link = links.get(slot.get("link"))
            if link is not None:
                values[slot.get("name")] = Out(link[1], link[2])
        nodes[raw["id"]] = Node(raw["id"], raw["type"], values, raw, count)
    see_through_reroutes(nodes)
    return nodes


def see_through_reroutes(nodes: dict) -> None:
    """Take links that run from a cubiq node through Reroute nodes straight from that node; drop those Reroutes."""
    def origin(out, seen=()):
        node = nodes.get(out.node)
        if node is None or node.kind != "Reroute" or out.node in seen:
            return out
        upstream = next((v for v in node.values.values() if isinstance(v, Out)), None)
        return None if upstream is None else origin(upstream, (*seen, out.node))

    from_cubiq = {}
    for key, node in nodes.items():
        if node.kind == "Reroute":
            source = origin(Out(key, 0))
            if source is not None and source.node in nodes and is_cubiq(nodes[source.node].kind):
                from_cubiq[key] = source
    for node in nodes.values():
        for name, value in node.values.items():
            if isinstance(value, Out) and value.node in from_cubiq:
                node.values[name] = from_cubiq[value.node]
    for key in from_cubiq:
        del nodes[key]


def read_api(graph: dict) -> dict:
    nodes = {}
    for key, entry in graph.items():
        values = {name: Out(str(v[0]), v[1]) if is_link(v) else v for name, v in entry["inputs"].items()}
        spec = CUBIQ.get(entry["class_type"])
        for name in spec.widgets() if spec else ():
            values.setdefault(name, spec.input(name).initial)
        nodes[key] = Node(key, entry["class_type"], values, entry)
    return nodes


def is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], (str, int)) and isinstance(value[1], int)



# -- writing --------------------------------------------------------------------------------------

def assign_ids(workflow: dict, kind: str, nodes: dict, stays: set, added: list[Node]) -> None:
    """An added node takes the id of the node it replaces (the first to claim it); the rest get new ones."""
    taken = set(nodes)
    for node in added:
        if node.claim is not None and node.claim not in stays and node.claim in taken:
            node.id = node.claim
            taken.discard(node.claim)
    numbers = [int(k) for k in nodes if str(k).isdigit()]
    if kind == "ui":
        numbers.append(int(workflow.get("last_node_id") or 0))
    fresh = max(numbers, default=0)
    for node in added:
        if node.id is None:
            fresh += 1
            node.id = fresh if kind == "ui" else str(fresh)


def write_api(workflow: dict, stays: set, added: list[Node], source) -> dict:
    """``source(key, name)``: what feeds input ``name`` of node ``key`` (which stays) now, an Out or None."""
    graph = {}
    for key, entry in workflow.items():
        if key not in stays:
            continue
        entry = copy.deepcopy(entry)
        for name, value in list(entry["inputs"].items()):
            if is_link(value):
                origin = source(key, name)
                if origin is None:
                    del entry["inputs"][name]
                else:
                    entry["inputs"][name] = [str(node_id(origin.node)), origin.slot]
        graph[key] = entry
    for node in added:
        spec = spec_of(node.kind)
        inputs = {}
        for item in spec.inputs:
            value = node.values.get(item.name)
            if isinstance(value, Out):
                inputs[item.name] = [str(node_id(value.node)), value.slot]
            elif value is not None:
                inputs[item.name] = value
        graph[node.id] = {"inputs": inputs, "class_type": node.kind, "_meta": {"title": spec.title}}
    return graph


def node_id(node) -> object:
    return node.id if isinstance(node, Node) else node


def write_ui(workflow: dict, stays: set, added: list[Node], source) -> dict:
    result = {k: copy.deepcopy(v) for k, v in workflow.items() if k not in ("nodes", "links")}
    nodes, links, wired = [], [], []  # wired: (source Out, target node dict, input index, type)
    for raw in workflow["nodes"]:
        if raw["id"] not in stays:
            continue
        raw = copy.deepcopy(raw)
        for index, slot in enumerate(raw.get("inputs") or []):
            slot["link"] = None
            origin = source(raw["id"], slot.get("name"))
            if origin is not None:
                wired.append((origin, raw, index, slot.get("type")))
        nodes.append(raw)
    anchors = {raw["id"]: raw for raw in workflow["nodes"]}
    placement = {}  # added node id -> (the cubiq node it comes from, took its id and place, side)
    for node in added:
        raw = ui_node(node, anchors.get(node.offset[0], {}))
        placement[node.id] = (node.offset[0], node.id == node.claim, "right" if node.offset[1] > 0 else "left")
        for index, slot in enumerate(raw.get("inputs", [])):
            value = node.values.get(slot["name"])
            if isinstance(value, Out):
                wired.append((value, raw, index, slot["type"]))
        nodes.append(raw)
    by_id = {raw["id"]: raw for raw in nodes}
    for raw in nodes:
        for output in raw.get("outputs") or []:
            output["links"] = []
    as_objects = any(isinstance(link, dict) for link in workflow["links"])
    for link_id, (source, target, index, kind) in enumerate(wired, start=1):
        source_id = node_id(source.node)
        target["inputs"][index]["link"] = link_id
        by_id[source_id]["outputs"][source.slot]["links"].append(link_id)
        link = [link_id, source_id, source.slot, target["id"], index, kind]
        links.append(dict(zip(LINK_FIELDS, link)) if as_objects else link)
    for order, raw in enumerate(nodes):
        raw["order"] = order
    groups = result.get("groups") if isinstance(result.get("groups"), list) else []
    arrange(nodes, groups, anchors, placement,
            [(node_id(source.node), target["id"]) for source, target, _, _ in wired])
    last = max([*(k for k in by_id if isinstance(k, int)), workflow.get("last_node_id") or 0,
                (workflow.get("state") or {}).get("lastNodeId") or 0])
    result.update(nodes=nodes, links=links)
    if isinstance(result.get("state"), dict):  # the newer schema keeps the counters here
        result["state"].update(lastNodeId=last, lastLinkId=len(links))
    if "last_node_id" in workflow or not isinstance(result.get("state"), dict):
        result.update(last_node_id=last, last_link_id=len(links))
    return result


LINK_FIELDS = ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")


def position(raw: dict) -> list:
    pos = raw.get("pos") or [0, 0]
    return [pos["0"], pos["1"]] if isinstance(pos, dict) else list(pos)


def ui_node(node: Node, anchor: dict) -> dict:
    """The editor's record of an added node, placed by the cubiq node it comes from (``anchor``)."""
    spec = spec_of(node.kind)
    _, dx, dy = node.offset
    x, y = position(anchor)
    inputs = [{"name": item.name, "type": item.kind, "link": None} for item in spec.sockets()]
    inputs += [{"name": name, "type": spec.input(name).socket_type, "link": None, "widget": {"name": name}}
               for name in spec.widgets() if isinstance(node.values.get(name), Out)]
    widgets = [("fixed" if name == "control_after_generate" else
                spec.input(name).initial if isinstance(node.values.get(name), Out) else node.values.get(name))
               for name in spec.widgets()]
    size = node_size(spec, spec.title or node.kind, inputs, list(zip(spec.widgets(), widgets)), spec.outputs)
    raw = {"id": node.id, "type": node.kind, "pos": [x + dx, y + dy], "size": size, "flags": {}, "order": 0,
           "mode": anchor.get("mode", 0)}
    if inputs:
        raw["inputs"] = inputs
    raw["outputs"] = [{"name": name, "type": kind, "links": [], "slot_index": i} for i, (name, kind) in enumerate(spec.outputs)]
    raw["properties"] = {"Node name for S&R": node.kind}
    raw["widgets_values"] = widgets
    return raw
