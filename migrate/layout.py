"""Where the nodes of a migrated editor workflow go (for ``formats.write_ui``).

Our nodes are larger than cubiq's (Apply about 360×530 as the editor draws it, where
cubiq's IPAdapter Advanced is 315×278) and a migration adds nodes (Encode, an encoder from
CLIP vision, a black EmptyImage, ...). The pass keeps every node that stays where it was
unless something must make room, and never leaves two nodes overlapping:

1. a replacement takes the old node's place; where it is taller or wider, everything below
   (right of) the old node's edge moves down (right) by as much as the new size needs;
2. the nodes a rule added go in columns left of the node they feed (the replacement of the
   cubiq node they come from), the farthest feeder farthest left; Conditioning (Set Mask)
   and other nodes placed right of it in a column on its right. Where the columns' place
   is taken, the replacement and everything right of its left edge move right (a column
   is inserted), so nothing there is covered;
3. any overlap left that involves a node of the migration (one that stretched across an
   edge) is undone by moving the lower (or, at the same height, the right) one and
   everything beyond it. Overlaps the input had between its own nodes stay as they were.

Every move is a *shift*: everything beyond a line moves by the same amount, groups beyond it
move with their nodes and a group the line crosses grows. Two things that did not overlap
never come to, and a group keeps every node it held (added nodes belong to the groups of the
node they come from, and a group grows to hold them). Boxes include the node's title bar,
which the editor draws above ``pos``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

TITLE = 30  # LiteGraph's node title height: a node's box starts this far above its pos
GAP = 40  # between columns
VGAP = 20  # between nodes stacked in a column
PAD = 10  # between a group's edge and its nodes
GROUP_TITLE = 40  # a group's title bar, above its first node


@dataclass
class Box:
    x: float
    y: float  # the top of the box, the title bar included
    w: float
    h: float

    @property
    def right(self) -> float:
        return self.x + self.w

    @property
    def bottom(self) -> float:
        return self.y + self.h

    def centre(self) -> tuple[float, float]:
        return self.x + self.w / 2, self.y + self.h / 2

    def holds(self, point) -> bool:
        return self.x <= point[0] <= self.right and self.y <= point[1] <= self.bottom


def overlaps(a: Box, b: Box) -> bool:
    return a.x < b.right and b.x < a.right and a.y < b.bottom and b.y < a.bottom


def pair(value, default=(0.0, 0.0)) -> list:
    """[x, y] of a pos or size saved as a list or as {"0": x, "1": y}."""
    if isinstance(value, dict):
        return [float(value.get("0", default[0])), float(value.get("1", default[1]))]
    if isinstance(value, (list, tuple)) and len(value) >= 2:
        return [float(value[0]), float(value[1])]
    return list(default)


def like(old, x: float, y: float):
    """``[x, y]`` in the form ``old`` was saved in (integers where they are whole)."""
    x, y = (int(v) if float(v).is_integer() else v for v in (x, y))
    return {"0": x, "1": y} if isinstance(old, dict) else [x, y]


def node_box(raw: dict) -> Box:
    x, y = pair(raw.get("pos"))
    w, h = pair(raw.get("size"), (200.0, 100.0))
    return Box(x, y - TITLE, w, h + TITLE)


# A new node's size as the editor (frontend 1.32) needs it: rows of 22 px per socket, 26 px per widget, 60 px more
# per multiline text; wide enough for its title, and for each widget's label beside its value (a number or combo
# keeps 85 px of its width for margins and arrows, a one-line text 60 px; 12 px Arial at most 6.5 px a character,
# the 14 px title 8 px). The editor cuts long texts short, so a text counts with its first TEXT_SHOWN characters.
NODE_WIDTH, CHAR_WIDTH, TITLE_CHAR_WIDTH = 320, 6.5, 8.0
STEPPED_MARGINS, TEXT_MARGINS, LABEL_GAP, TEXT_SHOWN, MOST_WIDTH = 85, 60, 5, 24, 480


def node_size(spec, title: str, inputs: list[dict], widgets: list[tuple], outputs: list) -> list[int]:
    """``[width, height]`` of a new node: ``inputs`` its slots, ``widgets`` (name, value) in widget order."""
    multiline = sum(1 for item in spec.inputs if item.multiline)
    height = 30 + 22 * max(len(inputs), len(outputs)) + 26 * len(widgets) + 60 * multiline
    needs = [NODE_WIDTH, 40 + TITLE_CHAR_WIDTH * len(title)]
    for name, value in widgets:
        item = spec.input(name)
        if item is not None and item.kind == "STRING":
            if item.multiline:
                continue
            needs.append(TEXT_MARGINS + CHAR_WIDTH * (len(name) + min(len(str(value)), TEXT_SHOWN)) + LABEL_GAP)
            continue
        shown = f"{value:.2f}" if item is not None and item.kind == "FLOAT" and isinstance(value, (int, float)) else str(value)
        needs.append(STEPPED_MARGINS + CHAR_WIDTH * (len(name) + len(shown)) + LABEL_GAP)
    slots = max((len(slot["name"]) for slot in inputs), default=0) + max((len(name) for name, _ in outputs), default=0)
    needs.append(60 + CHAR_WIDTH * slots)
    return [int(min(MOST_WIDTH, -(-max(needs) // 10) * 10)), int(height)]


class Layout:
    """The boxes of one migrated graph: nodes placed, nodes to place, groups, and the old nodes' boxes."""

    def __init__(self, nodes: list[dict], groups: list[dict], anchors: dict, added: dict):
        self.raws = {raw["id"]: raw for raw in nodes}
        self.added = added  # node id -> (anchor id, claimed, side)
        self.placed: dict = {}
        self.pending: dict = {}
        for raw in nodes:
            info = added.get(raw["id"])
            (self.pending if info is not None and not info[1] else self.placed)[raw["id"]] = node_box(raw)
        self.groups = [(group, Box(*map(float, group["bounding"][:4]))) for group in groups
                       if isinstance(group, dict) and isinstance(group.get("bounding"), list)
                       and len(group["bounding"]) >= 4]
        # the old nodes' boxes, moved as everything else is: where an anchor's added nodes go
        self.phantoms = {key: node_box(raw) for key, raw in anchors.items()}
        self.members = {index: set() for index in range(len(self.groups))}
        for key, box in self.placed.items():
            info = added.get(key)
            where = self.phantoms[info[0]] if info is not None and info[0] in self.phantoms else box
            self.members_add(key, where)
        for key in self.pending:
            anchor = self.phantoms.get(self.added[key][0])
            if anchor is not None:
                self.members_add(key, anchor)

    def members_add(self, key, box: Box) -> None:
        for index, (_, group) in enumerate(self.groups):
            if group.holds(box.centre()):
                self.members[index].add(key)

    def groups_of(self, key) -> set:
        return {index for index, keys in self.members.items() if key in keys}

    def anchor_box(self, anchor) -> Box:
        return self.placed[anchor] if anchor in self.placed else self.phantoms[anchor]

    # -- the one kind of move ---------------------------------------------------------------------

    def shift(self, axis: str, line: float, distance: float, exclude=()) -> None:
        """Move everything whose near edge is at or beyond ``line`` by ``distance`` along ``axis`` ("x" or "y");
        a group the line crosses grows by as much."""
        distance = math.ceil(distance)
        if distance <= 0:
            return
        for key, box in [*self.placed.items(), *self.phantoms.items()]:
            if key not in exclude and getattr(box, axis) >= line:
                setattr(box, axis, getattr(box, axis) + distance)
        for _, group in self.groups:
            start = getattr(group, axis)
            size = "w" if axis == "x" else "h"
            if start >= line:
                setattr(group, axis, start + distance)
            elif line <= start + getattr(group, size):
                setattr(group, size, getattr(group, size) + distance)

    # -- 1. replacements larger than the old node ---------------------------------------------------

    def grow(self, key) -> None:
        old, box = self.phantoms[key], self.placed[key]
        inside = self.groups_of(key)
        if box.bottom > old.bottom:
            need = 0.0
            for other, b in self.placed.items():
                if other != key and b.y >= old.bottom and b.x < box.right and box.x < b.right:
                    need = max(need, box.bottom + VGAP - b.y)
            for index, (_, group) in enumerate(self.groups):
                if index in inside:
                    need = max(need, box.bottom + PAD - group.bottom)
                elif group.y >= old.bottom and group.x < box.right and box.x < group.right:
                    need = max(need, box.bottom + VGAP - group.y)
            self.shift("y", old.bottom, need, exclude={key})
        if box.right > old.right:
            need = 0.0
            for other, b in self.placed.items():
                if other != key and b.x >= old.right and b.y < box.bottom and box.y < b.bottom:
                    need = max(need, box.right + GAP - b.x)
            for index, (_, group) in enumerate(self.groups):
                if index in inside:
                    need = max(need, box.right + PAD - group.right)
                elif group.x >= old.right and group.y < box.bottom and box.y < group.bottom:
                    need = max(need, box.right + GAP - group.x)
            self.shift("x", old.right, need, exclude={key})

    # -- 2. added nodes in columns beside the node they feed --------------------------------------------

    def columns(self, anchor, keys: list, edges: dict) -> tuple[list, list]:
        """The left columns (nearest first) and the right column of the nodes added at ``anchor``."""
        depth = {}

        def column(key, seen=()):
            if key == anchor:
                return 0
            if key not in depth:
                feeds = [target for target in edges.get(key, ()) if (target in keys or target == anchor)
                         and target not in seen]
                depth[key] = 1 + max(column(target, (*seen, key)) or 0 for target in feeds) if feeds else None
            return depth[key]

        left, right = {}, []
        for key in keys:
            level = column(key)
            if level is None and self.added[key][2] == "right":
                right.append(key)
            else:
                left.setdefault(level or 1, []).append(key)
        return [left[level] for level in sorted(left)], right

    def place(self, anchor, columns: list, side: str) -> None:
        box = self.anchor_box(anchor)
        widths = [max(self.pending[key].w for key in column) for column in columns]
        heights = [sum(self.pending[key].h for key in column) + VGAP * (len(column) - 1) for column in columns]
        total = sum(widths) + GAP * len(widths)
        inside = set().union(*(self.groups_of(key) for column in columns for key in column))
        need = 0.0
        if side == "left":
            area = Box(box.x - total, box.y, total - GAP, max(heights))
            for key, b in self.placed.items():
                if b.x < box.x and overlaps(b, area):
                    need = max(need, b.right + GAP - area.x)
            for index, (_, group) in enumerate(self.groups):
                if index in inside:
                    need = max(need, group.x + PAD - area.x)
                elif group.x < box.x and overlaps(group, area):
                    need = max(need, group.right + GAP - area.x)
            self.shift("x", box.x, need)
        else:
            area = Box(box.right + GAP, box.y, total - GAP, max(heights))
            for key, b in self.placed.items():
                if key != anchor and b.x >= box.right and overlaps(b, area):
                    need = max(need, area.right + GAP - b.x)
            for index, (_, group) in enumerate(self.groups):
                if index in inside:
                    need = max(need, area.right + PAD - group.right)
                elif group.x >= box.right and overlaps(group, area):
                    need = max(need, area.right + GAP - group.x)
            self.shift("x", box.right, need, exclude={anchor})
        box = self.anchor_box(anchor)
        bottom = box.y + max(heights)
        for index in inside:
            group = self.groups[index][1]
            if bottom + PAD > group.bottom:
                self.shift("y", group.bottom, bottom + PAD - group.bottom)
        x = box.x if side == "left" else box.right + GAP
        for column, width in zip(columns, widths):
            if side == "left":
                x -= width + GAP
            y = box.y
            for key in column:
                placed = self.pending.pop(key)
                placed.x, placed.y = x, y
                self.placed[key] = placed
                y += placed.h + VGAP
            if side != "left":
                x += width + GAP

    # -- 3. anything still overlapping ---------------------------------------------------------------

    def separate(self, limit: int = 5000) -> None:
        """Undo every overlap that involves a node of the migration (the input's own overlaps stay as they were)."""
        for _ in range(limit):
            order = sorted(self.placed.items(), key=lambda item: (item[1].y, item[1].x, str(item[0])))
            found = next(((p, q) for i, p in enumerate(order) for q in order[i + 1:]
                          if (p[0] in self.added or q[0] in self.added) and overlaps(p[1], q[1])), None)
            if found is None:
                return
            (first, a), (_, b) = found
            if b.y > a.y:
                self.shift("y", b.y, a.bottom + VGAP - b.y)
            elif b.x > a.x:
                self.shift("x", b.x, a.right + GAP - b.x)
            else:  # the same place: the second goes below the first
                self.shift("y", b.y, a.bottom + VGAP - b.y, exclude={first})

    def write(self) -> None:
        for key, box in self.placed.items():
            raw = self.raws[key]
            raw["pos"] = like(raw.get("pos"), box.x, box.y + TITLE)
        for group, box in self.groups:
            group["bounding"] = [int(v) if float(v).is_integer() else v for v in (box.x, box.y, box.w, box.h)]


def arrange(nodes: list[dict], groups: list[dict], anchors: dict, added: dict, links) -> None:
    """Place the added nodes of a migrated graph and move the others apart (in place).

    ``nodes``: the output's node records (a replacement already at the old node's ``pos``); ``groups``: the
    output's groups (moved and grown in place); ``anchors``: the input's node records by id; ``added``: per added
    node id, (the id of the cubiq node it comes from, whether it took that node's id and place, "left" or "right");
    ``links``: (source id, target id) of the output's links.
    """
    layout = Layout(nodes, groups, anchors, added)
    edges: dict = {}
    for source, target in links:
        edges.setdefault(source, []).append(target)
    claimed = sorted((key for key, info in added.items() if info[1] and key in layout.phantoms),
                     key=lambda key: (layout.placed[key].y, layout.placed[key].x))
    for key in claimed:
        layout.grow(key)
    by_anchor: dict = {}
    for key in layout.pending:
        by_anchor.setdefault(added[key][0], []).append(key)
    for anchor, keys in by_anchor.items():
        if anchor not in layout.phantoms and anchor not in layout.placed:  # no place known: beside the first node
            layout.phantoms[anchor] = Box(0.0, 0.0, 0.0, 0.0)
        left, right = layout.columns(anchor, keys, edges)
        if left:
            layout.place(anchor, left, "left")
        if right:
            layout.place(anchor, [right], "right")
    layout.separate()
    layout.write()
