"""The rules that rewrite cubiq's nodes as this pack's (``python -m migrate IN.json OUT.json``).

:func:`migrate` takes a workflow in the editor's format (``nodes`` / ``links``) or the API
format (``{id: {class_type, inputs}}``) and returns the same format and a :class:`Report`.
Each cubiq node is rewritten by the rule for its type (:data:`RULES`), widget by widget, by
name and meaning (``tables.py`` holds both packs' node definitions, ``formats.py``
reads and writes the two formats, ``layout.py`` places the nodes of the editor's format).

Two modes. *faithful* (the default) reproduces the pictures of cubiq's nodes where our nodes
can express them (``faithful.py``): the middle block weighted 0 through Apply's custom layer
weights, a black EmptyImage as the negative image of plus adapters, the precise nodes and the
Mad Scientist's layer weights as one Apply. *ours* (``--ours``) keeps this pack's own meaning
(the migration as it was before the faithful rules). Where ours still means something else,
the report says so. A node that no rule can map (Kolors, pickled embeds, an option
ours lacks) stays as it is and the report gives the reason; a replaced node also stays where
such a node still takes an output of it that only cubiq's pack gives. The main replacement
takes the old node's id and place, every consumer of a replaced output is wired to ours.
Plain Python: no torch, no ComfyUI.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from comfyui_glue.interface import FACE_PRESETS, FACE_PROVIDERS, PRESETS, TILINGS
from ipadapter.choices import COMBINE_MODES, EMBEDS_SCALING, WEIGHT_TYPES

from . import faithful as cubiqs
from .faithful import families
from .formats import MigrationError  # noqa: F401  (callers catch it from here)
from .formats import Node, Out, assign_ids, is_cubiq, read, spec_of, write_api, write_ui
from .tables import CUBIQ, CUBIQ_PRESETS, CUBIQ_TYPES, FACEID_PRESETS

MODES = ("faithful", "ours")
PRESET = dict(zip(CUBIQ_PRESETS, PRESETS))
FACE_PRESET = dict(zip(FACEID_PRESETS, FACE_PRESETS))
FACE_PACK = "buffalo_l"  # the pack cubiq's unified FaceID loader loads (its insightface_loader's default)
SIMPLE_WEIGHT_TYPES = {"standard": "linear", "prompt is more important": "ease out", "style transfer": "style transfer"}
# cubiq's "ease_in" is the sine ramp (fast start), our "ease out"; its "ease_out" the cosine one, our "ease in"
FRAME_TIMINGS = {"linear": "linear", "ease_in_out": "ease in-out", "ease_in": "ease out", "ease_out": "ease in"}
BATCH = {"IPAdapterBatch", "IPAdapterTiledBatch", "IPAdapterEmbedsBatch", "IPAdapterStyleCompositionBatch",
         "IPAdapterClipVisionEnhancerBatch", "IPAdapterPreciseStyleTransferBatch", "IPAdapterPreciseCompositionBatch",
         "IPAAdapterFaceIDBatch"}
FACEID_NODES = ("IPAdapterFaceID", "IPAAdapterFaceIDBatch")
PRECISE = ("style transfer precise", "composition precise")
KOLORS = "Kolors is not a model family this pack patches (its ChatGLM text encoder, its own FaceID adapter)"
STRATEGY = "weight strategies and prompt schedules have no counterpart here (IP-Adapter Frame Weights makes ramps)"
LEFT = {
    "IPAdapterFaceIDKolors": KOLORS,
    "IPAdapterUnifiedLoaderCommunity": "its presets (Composition, Kolors) load adapters this pack has no preset for",
    "IPAdapterLoadEmbeds": "cubiq's .ipadpt files are torch pickles; this pack loads .safetensors written by "
                           "Save IP-Adapter Embeds (encode the image again and save it with ours)",
    "IPAdapterWeightsFromStrategy": STRATEGY, "IPAdapterPromptScheduleFromWeightsStrategy": STRATEGY,
    "IPAdapterCombineWeights": "lists of frame weights are joined by hand here (Apply's frame_weights text)",
}
MIDDLE_BLOCK_NOTE = ("Apply IP-Adapter also patches the UNet's middle block, which cubiq's nodes leave unpatched "
                     "(set layers = custom to leave it out, or migrate without --ours)")
MODE_LINES = {
    "faithful": "mode: faithful (the default): the graph reproduces cubiq's pictures where our nodes can express them "
                "(middle block off, black negative image for plus adapters, precise / layer weights as one Apply); "
                "--ours keeps this pack's own behaviour",
    "ours": "mode: ours (--ours): this pack's own behaviour (its middle block patched, its blank negative input, "
            "precise boosts as a second Apply); the pictures differ from cubiq's",
}
UNKNOWN_FAMILY = ("the graph does not say the model's family (no {ids} in the adapter's or the checkpoint's file "
                  "name, a preset both offer), so the middle block, which cubiq never patches, is patched here: "
                  "migrate again with --family {choices}, or set layers = custom by hand")
UNKNOWN_KIND = ("the adapter file's name does not say whether it is a plus / full-face adapter; if it is, connect "
                "a black {size}×{size} EmptyImage to negative_image of its Encode node: cubiq's unconditional "
                "input for those adapters")


class Unmapped(Exception):
    """Why a cubiq node stays as it is."""


# What cubiq's nodes pass between each other that is not a socket of ours.
@dataclass(frozen=True)
class Pipe:
    """cubiq's IPADAPTER: our adapter, and from a unified loader also the image encoder (its CLIP vision)."""

    adapter: Out
    encoder: Out | None
    family: object = None  # the registry's Family, where the graph says it (file names, a one-family preset)
    plus: bool | None = None  # a plus / full-face adapter (cubiq's black negative image); None: unknown
    faceid: bool | None = False  # a FaceID adapter (its images go through Encode Face); None: the name does not say
    faces: Out | None = None  # the face analysis of a unified FaceID loader (cubiq's pipe carries its InsightFace)


@dataclass(frozen=True)
class Params:
    """cubiq's IPADAPTER_PARAMS: its regional conditioning nodes, in order."""

    regions: tuple


@dataclass(frozen=True)
class NegEmbeds:
    """IPAdapter Encoder's neg_embed: always the adapter's default unconditional embeds (what ours uses too)."""


@dataclass(frozen=True)
class FrameList:
    """IPAdapter Weights' list: our frame_weights text, or the output of IP-Adapter Frame Weights."""

    source: object


@dataclass
class Mapped:
    """One cubiq node in the report: the nodes of ours that took its place, what the faithful rules changed."""

    kind: str
    new: list = field(default_factory=list)  # (id, type) of the nodes placed by it
    changes: list = field(default_factory=list)


@dataclass
class Report:
    kind: str  # "ui" or "api"
    mode: str = "faithful"
    mapped: dict = field(default_factory=dict)  # cubiq node id -> Mapped
    order: list = field(default_factory=list)  # the cubiq nodes' ids in the graph's order
    left: dict = field(default_factory=dict)  # cubiq node id -> (its type, why it stays)
    notes: list = field(default_factory=list)  # (node id, its type, text): what to check; id None: the whole graph
    cubiq: int = 0
    replaced: int = 0
    added: int = 0

    def lines(self) -> list[str]:
        """The mode; per cubiq node: old id → new ids [mode]: what changed, or why it stays, then what to check;
        notes on the whole graph; a summary."""
        lines = [MODE_LINES[self.mode]]
        for key in dict.fromkeys([*self.order, *self.mapped, *self.left, *(k for k, _, _ in self.notes if k is not None)]):
            if key in self.left:
                lines.append(f"left in place: node {key} ({self.left[key][0]}): {self.left[key][1]}")
            if key in self.mapped:
                entry = self.mapped[key]
                new = ", ".join(f"{i} ({kind})" for i, kind in entry.new) or "no node (what it gave is wired straight on)"
                lines.append(f"node {key} ({entry.kind}) → {new} [{self.mode}]: "
                             + ("; ".join(entry.changes) or "the same meaning"))
            lines += [f"check: node {k} ({kind}): {text}" for k, kind, text in self.notes if k == key]
        lines += [f"check: {text}" for k, _, text in self.notes if k is None]
        lines.append(f"summary: {self.cubiq} cubiq nodes, {self.replaced} replaced by {self.added} nodes of this pack, "
                     f"{len(self.left)} left in place, {len(self.notes)} to check ({self.mode} mode)")
        return lines


# -- the migration --------------------------------------------------------------------------------

class Migration:
    def __init__(self, nodes: dict, mode: str = "faithful", family=None):
        if mode not in MODES:
            raise ValueError(f"mode '{mode}' is unknown; expected one of {', '.join(MODES)}")
        self.nodes = nodes
        self.mode = mode
        self.faithful = mode == "faithful"
        self.family = cubiqs.family_by_id(family) if isinstance(family, str) else family  # --family
        self.added: list[Node] = []
        self.outputs: dict = {}  # replaced cubiq node id -> {slot: what ours gives there}
        self.left: dict = {}  # cubiq node id -> why no rule maps it
        self.kept: dict = {}  # replaced cubiq node id -> why it stays as well
        self.notes: list = []  # (node id, text)
        self.changes: dict = {}  # cubiq node id -> what the faithful rules changed
        self.cache: dict = {}  # shared added nodes (one image encoder per CLIP vision, one black image)
        self.stack: list = []

    def run(self) -> None:
        for key, node in self.nodes.items():
            if is_cubiq(node.kind):
                self.migrate(key)

    def migrate(self, key) -> bool:
        """Replace cubiq node ``key`` (once); False if it stays."""
        if key in self.outputs or key in self.left:
            return key in self.outputs
        node = self.nodes[key]
        self.stack.append(key)
        try:
            rule = RULES.get(node.kind)
            if rule is None:
                raise Unmapped(LEFT.get(node.kind, "not a node this migrator knows (from another version of cubiq's pack?)"))
            self.outputs[key] = rule(self, node)
            expected = len(CUBIQ[node.kind].widgets())
            if node.widget_count is not None and node.widget_count < expected:
                self.note(node, f"the file has {node.widget_count} of the node's {expected} widget values (saved by an "
                                "older version of cubiq's pack); the missing ones took cubiq's defaults")
        except Unmapped as reason:
            self.left[key] = str(reason)
            self.added = [n for n in self.added if n.owner != key]
            self.cache = {k: n for k, n in self.cache.items() if n.owner != key}
            self.notes = [n for n in self.notes if n[0] != key]
            self.changes.pop(key, None)
        finally:
            self.stack.pop()
        return key in self.outputs

    def add(self, kind: str, at: Node, values: dict, claim: bool = False, offset=(0, 0)) -> Node:
        """A node of ours at cubiq node ``at``'s place (``claim``: taking its id), widgets not given at their defaults."""
        spec = spec_of(kind)
        full = {name: spec.input(name).initial for name in spec.widgets() if name != "control_after_generate"}
        full.update({name: value for name, value in values.items() if value is not None})
        node = Node(None, kind, full, claim=at.id if claim else None, owner=self.stack[-1], offset=(at.id, *offset))
        self.added.append(node)
        return node

    def note(self, node: Node, text: str) -> None:
        """Something the user must check about ``node``'s migration."""
        if (node.id, text) not in self.notes:
            self.notes.append((node.id, text))

    def change(self, text: str) -> None:
        """What a faithful rule changed for the cubiq node being migrated (for the report)."""
        changes = self.changes.setdefault(self.stack[-1], [])
        if text not in changes:
            changes.append(text)

    def get(self, node: Node, name: str):
        """What feeds input ``name`` of ``node`` once its sources are migrated: Out, a cubiq value, a widget value, None."""
        value = node.values.get(name)
        if not isinstance(value, Out):
            return value
        source = self.nodes.get(value.node)
        if source is None or not is_cubiq(source.kind):
            return value if source is not None else None
        out_name, out_type = output_of(source.kind, value.slot)
        if source.id in self.stack:
            raise Unmapped(f"its {name} comes from node {source.id}, which it feeds")
        if self.migrate(source.id):
            mapped = self.outputs[source.id].get(value.slot)
            if mapped is None:
                raise Unmapped(f"its {name} comes from output '{out_name}' of node {source.id} ({source.kind}), "
                               "which this pack does not give")
            return mapped
        if out_type in CUBIQ_TYPES or out_type is None:
            raise Unmapped(f"its {name} comes from node {source.id} ({source.kind}), which stays in place")
        return value

    def literal(self, node: Node, name: str):
        value = self.get(node, name)
        if isinstance(value, (Out, Pipe, Params, NegEmbeds, FrameList)):
            raise Unmapped(f"its {name} comes from a link; set the value on the node to migrate it")
        return value

    def number(self, node: Node, name: str, low: float, high: float, value=None):
        """A number for one of our widgets (or the link that gives it), checked against our range."""
        value = self.get(node, name) if value is None else value
        if isinstance(value, Out):
            return value
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise Unmapped(f"its {name} is {value!r}, not a number this pack can take")
        if not low <= value <= high:
            raise Unmapped(f"its {name} {value:g} is outside this pack's range {low:g}…{high:g}")
        return value

    def choice(self, node: Node, name: str, choices, what: str = ""):
        value = self.get(node, name)
        if isinstance(value, Out):  # a primitive's value: the editor checks it against our list
            return value
        if value not in choices:
            raise Unmapped(f"its {name} '{value}' has no counterpart here{what}")
        return value

    def pipe(self, node: Node) -> Pipe:
        pipe = self.get(node, "ipadapter")
        if not isinstance(pipe, Pipe):
            raise Unmapped("its ipadapter does not come from IPAdapter Model Loader or IPAdapter Unified Loader")
        return pipe

    def encoder(self, node: Node, pipe: Pipe) -> Out:
        """Our image encoder for an apply node: its clip_vision if connected (as in cubiq), else its unified loader's."""
        vision = self.get(node, "clip_vision")
        if isinstance(vision, Out):
            if vision not in self.cache:
                self.cache[vision] = self.add("IPAdapterKitEncoderFromCLIPVision", node, {"clip_vision": vision},
                                              offset=(-700, 0))
            return Out(self.cache[vision], 0)
        if pipe.encoder is None:
            raise Unmapped("it has no CLIP vision: clip_vision is not connected and its ipadapter comes from "
                           "IPAdapter Model Loader (cubiq's node stops there too)")
        return pipe.encoder

    # -- what the graph says of the model (faithful mode needs its family for the layer keys) --

    def family_of(self, node: Node, pipe: Pipe | None = None, model=None):
        """The family of the model an apply node patches: --family, else the adapter's (file name, preset), else
        the one a loader upstream of its model names in its file name; None when the graph does not say."""
        if self.family is not None:
            return self.family
        if pipe is not None and pipe.family is not None:
            return pipe.family
        return self.family_upstream(self.get(node, "model") if model is None else model)

    def family_upstream(self, value, seen=None):
        """The family named by a file name of a node upstream of ``value`` along MODEL links, or None."""
        seen = set() if seen is None else seen
        for _ in range(64):
            if isinstance(value, Pipe):
                return value.family
            if not isinstance(value, Out):
                return None
            if isinstance(value.node, Node):  # ours: an added Apply or unified loader takes a model
                value = value.node.values.get("model")
                continue
            if value.node in seen or value.node not in self.nodes:
                return None
            seen.add(value.node)
            source = self.nodes[value.node]
            if is_cubiq(source.kind):
                if source.id in self.outputs and isinstance(self.outputs[source.id].get(1), Pipe):
                    family = self.outputs[source.id][1].family
                    if family is not None:
                        return family
                value = source.values.get("model")
                continue
            found = {f for text in texts_of(source) if (f := cubiqs.family_in_name(text)) is not None}
            if len(found) == 1:
                return found.pop()
            value = source.values.get("model")
        return None

    # -- what the apply nodes share --

    def negative(self, node: Node, pipe: Pipe, given):
        """The negative image for an Encode: the one connected, else (faithful) cubiq's black one for plus adapters."""
        if given is not None or not self.faithful or pipe.plus is False:
            return given
        if pipe.plus is None:
            self.note(node, UNKNOWN_KIND.format(size=cubiqs.BLACK_SIZE))
            return None
        if "black" not in self.cache:
            size = cubiqs.BLACK_SIZE
            self.cache["black"] = self.add("EmptyImage", node, {"width": size, "height": size, "batch_size": 1,
                                                                "color": 0}, offset=(-700, 0))
        self.change(f"negative image: a black {cubiqs.BLACK_SIZE}×{cubiqs.BLACK_SIZE} EmptyImage on Encode's "
                    "negative_image (cubiq's unconditional input for plus adapters)")
        return Out(self.cache["black"], 0)

    def encode(self, node: Node, pipe: Pipe, image: str = "image", claim: bool = False, offset=(-350, 0),
               image_encoder: Out | None = None, **more) -> Out:
        source = self.get(node, image)
        if not isinstance(source, Out):
            raise Unmapped(f"its {image} is not connected")
        if pipe.faceid or (pipe.faceid is None and node.kind in FACEID_NODES):
            if more:
                raise Unmapped(f"its adapter is a FaceID one, and Encode Face has no counterpart of its "
                               f"{', '.join(sorted(more))}")
            return self.encode_face(node, pipe, source, claim, offset)
        image_encoder = image_encoder or self.encoder(node, pipe)
        negative = more.pop("negative_image") if "negative_image" in more else self.get(node, "image_negative")
        values = {"image_encoder": image_encoder, "image": source, "crop": "crop",
                  "negative_image": self.negative(node, pipe, negative), **more}
        return Out(self.add("IPAdapterKitEncode", node, values, claim=claim, offset=offset), 0)

    def encode_face(self, node: Node, pipe: Pipe, image: Out, claim: bool, offset) -> Out:
        """Encode Face for a cubiq node whose adapter is a FaceID one: its insightface input, else the pipe's."""
        faces = self.get(node, "insightface") or pipe.faces
        if not isinstance(faces, Out):
            raise Unmapped("its adapter is a FaceID one, and it has no InsightFace: insightface is not connected and "
                           "its ipadapter does not come from IPAdapter Unified Loader FaceID (cubiq's node stops there too)")
        if "weight_faceidv2" in node.values:
            shortcut = self.number(node, "weight_faceidv2", -1.0, 5.0)
        else:  # cubiq's nodes without the widget give plusv2 twice their weight
            weight = self.get(node, "weight")
            if not isinstance(weight, (int, float)) or isinstance(weight, bool):
                raise Unmapped("its weight, of which cubiq gives plusv2's shortcut twice, is not a number on the node")
            shortcut = self.number(node, "weight", -1.0, 5.0, weight * 2)
        given = self.get(node, "image_negative")
        values = {"face_analysis": faces, "image": image, "ipadapter": pipe.adapter, "weight_faceidv2": shortcut}
        if pipe.plus is not False:  # faceid-plus / plusv2 show the face crop to the image encoder
            values.update(image_encoder=self.encoder(node, pipe), negative_image=self.negative(node, pipe, given))
        elif given is not None:
            self.note(node, "its image_negative is not used: cubiq's FaceID adapters without CLIP features (faceid, "
                            "portrait) ignore it, and so does Encode Face")
        return Out(self.add("IPAdapterKitEncodeFace", node, values, claim=claim, offset=offset), 0)

    def weight_type(self, node: Node, name: str = "weight_type"):
        return self.choice(node, name, WEIGHT_TYPES)

    def weight(self, node: Node, name: str = "weight"):
        """(λ, frame weights) of an apply node: a list from IPAdapter Weights becomes frame weights under λ = 1."""
        value = self.get(node, name)
        if isinstance(value, FrameList):
            if node.kind not in BATCH:
                raise Unmapped(f"its {name} is a list from IPAdapter Weights, of which cubiq uses only the first value "
                               "outside its Batch nodes")
            return 1.0, value.source
        return self.number(node, name, -1.0, 3.0, value), None

    def combine(self, node: Node) -> str:
        if "combine_embeds" not in node.values:
            return "concat"  # cubiq's default where the node has no widget for it
        method = self.choice(node, "combine_embeds", COMBINE_MODES)
        if method == "norm average":
            self.note(node, "norm average here scales each reference to the same length; cubiq's normalises each "
                            "feature across the references")
        return method

    def apply(self, node: Node, pipe: Pipe, embeds, weight, weight_type, model=None, claim: bool = True,
              combine: str | None = None, region_types=(), **more) -> Out:
        values = {
            "model": self.get(node, "model") if model is None else model, "ipadapter": pipe.adapter, "embeds": embeds,
            "weight": weight, "weight_type": weight_type, "start_at": self.get(node, "start_at"),
            "end_at": self.get(node, "end_at"), "combine": combine or self.combine(node),
            "embeds_scaling": self.choice(node, "embeds_scaling", EMBEDS_SCALING) if "embeds_scaling" in node.values else "V only",
            "attn_mask": self.get(node, "attn_mask"),
            "batch_mode": "one per latent" if node.kind in BATCH else "all latents", **more,
        }
        if self.faithful and values.get("layers", "all") == "all":
            self.middle_off(node, pipe, values, [values["weight_type"], *region_types])
        return Out(self.add("IPAdapterKitApply", node, values, claim=claim), 0)

    def middle_off(self, node: Node, pipe: Pipe, values: dict, weight_types) -> None:
        """Faithful: custom layer weights that leave the middle block out, where the weight types weight it."""
        family = self.family_of(node, pipe, values["model"])
        if not any(cubiqs.weights_middle(t, family) for t in weight_types):
            return
        if family is None:
            self.note(node, UNKNOWN_FAMILY.format(ids=" or ".join(f.id for f in families()),
                                                  choices="|".join(f.id for f in families())))
            return
        values.update(layers="custom", custom_layer_weights=cubiqs.without_middle(family))
        self.change(f"middle block off: layers = custom, {family.name} keys "
                    f"{', '.join(map(str, cubiqs.middle_keys(family)))} at 0, the others at 1 under weight type "
                    f"'{values['weight_type'] if isinstance(values['weight_type'], str) else 'from its link'}' "
                    "(cubiq never patches the middle block)")

    # -- the result --

    def finish(self) -> tuple[set, list[Node]]:
        """The old nodes that stay, and the added nodes that are kept."""
        stays = {key for key in self.nodes if key not in self.outputs}
        queue = list(stays)
        while queue:  # a replaced node stays too where a node that stays takes an output ours does not give
            node = self.nodes[queue.pop()]
            for name, value in node.values.items():
                if isinstance(value, Out) and value.node in self.outputs and value.node not in stays \
                        and self.rewired(value) is None:
                    source = self.nodes[value.node]
                    out_name, out_type = output_of(source.kind, value.slot)
                    self.kept[source.id] = (f"replaced, and kept as well: node {node.id} ({node.kind}), which stays, "
                                            f"takes its output '{out_name}' ({out_type}), which this pack does not give")
                    stays.add(source.id)
                    queue.append(source.id)
        sources = (final_source(self, stays, v) for key in stays for v in self.nodes[key].values.values())
        used = {id(source.node) for source in sources if source is not None}
        kept = list(self.added)
        while True:  # drop added nodes that nothing uses, unless they take the place of a replaced node
            used_now = used | {id(v.node) for n in kept for v in n.values.values() if isinstance(v, Out)}
            keep = [n for n in kept if id(n) in used_now or (n.claim is not None and n.claim not in stays)
                    or not spec_of(n.kind).outputs]
            if len(keep) == len(kept):
                return stays, kept
            kept = keep

    def rewired(self, value: Out):
        """Where a node that stays takes output ``value`` of a replaced node from now: ours if its type is the same."""
        mapped = self.outputs[value.node].get(value.slot)
        if not isinstance(mapped, Out):
            return None
        old_type = output_of(self.nodes[value.node].kind, value.slot)[1]
        if isinstance(mapped.node, Node):
            return mapped if spec_of(mapped.node.kind).outputs[mapped.slot][1] == old_type else None
        return mapped  # passed through unchanged (a regional node's text without a mask)


def output_of(kind: str, slot: int) -> tuple:
    spec = CUBIQ.get(kind)
    return spec.outputs[slot] if spec and slot < len(spec.outputs) else (f"#{slot}", None)


def texts_of(node: Node) -> list[str]:
    """The text values a node that is not cubiq's was saved with (its file names, for the model's family)."""
    raw = node.raw or {}
    values = raw.get("widgets_values") if "widgets_values" in raw else (raw.get("inputs") or {})
    values = values.values() if isinstance(values, dict) else values if isinstance(values, list) else ()
    return [value for value in values if isinstance(value, str)]


# -- rules: one per cubiq node type -----------------------------------------------------------------

def model_loader(m: Migration, node: Node) -> dict:
    name = m.get(node, "ipadapter_file")
    lower = name.lower() if isinstance(name, str) else ""
    if "kolors" in lower:
        raise Unmapped(f"'{name}' is a Kolors adapter, which this pack does not load: {KOLORS}")
    loader = m.add("IPAdapterKitLoader", node, {"ipadapter_file": name}, claim=True)
    family = next((family for family in families() if family.id in lower), None)  # the released names say it
    faceid = True if "faceid" in lower or "portrait" in lower else None if cubiqs.plus_of_file(name) is None else False
    return {0: Pipe(Out(loader, 0), None, family, cubiqs.plus_of_file(name), faceid)}


def unified_loader(m: Migration, node: Node) -> dict:
    preset = m.choice(node, "preset", PRESET)
    if isinstance(preset, Out):
        raise Unmapped("its preset comes from a link; set it on the node to migrate it")
    if isinstance(node.values.get("ipadapter"), Out):
        m.note(node, "its ipadapter input (a pipe whose models it reuses) has no counterpart: ours keeps loaded files cached")
    model = m.get(node, "model")
    loader = m.add("IPAdapterKitUnifiedLoader", node, {"model": model, "preset": PRESET[preset]}, claim=True)
    family = cubiqs.family_of_preset(PRESET[preset]) or m.family_upstream(model)
    return {0: Out(loader, 0), 1: Pipe(Out(loader, 1), Out(loader, 2), family, cubiqs.plus_of_preset(PRESET[preset]))}


def provider(m: Migration, node: Node) -> str:
    """cubiq's onnxruntime provider as ours: CPU and CUDA by name, the others (ROCM, DirectML, ...) auto."""
    value = m.literal(node, "provider")
    if value in FACE_PROVIDERS:
        return value
    m.note(node, f"its provider '{value}' became auto (CUDA when onnxruntime-gpu offers it, else the CPU): this pack "
                 f"runs the face models on {' or '.join(p for p in FACE_PROVIDERS if p != 'auto')}")
    return "auto"


def unified_loader_faceid(m: Migration, node: Node) -> dict:
    """The FaceID preset, its LoRA at cubiq's lora_strength (0: none, as cubiq), buffalo_l's face analysis."""
    preset = m.choice(node, "preset", FACE_PRESET)
    if isinstance(preset, Out):
        raise Unmapped("its preset comes from a link; set it on the node to migrate it")
    if isinstance(node.values.get("ipadapter"), Out):
        m.note(node, "its ipadapter input (a pipe whose models it reuses) has no counterpart: ours keeps loaded files cached")
    ours = FACE_PRESET[preset]
    model = m.get(node, "model")
    values = {"model": model, "preset": ours, "lora": "apply (sidecar or in the file)",
              "lora_strength": m.number(node, "lora_strength", -2.0, 2.0), "pack": FACE_PACK,
              "provider": provider(m, node)}
    loader = m.add("IPAdapterKitUnifiedLoaderFaceID", node, values, claim=True)
    family = cubiqs.family_of_preset(ours) or m.family_upstream(model)
    return {0: Out(loader, 0), 1: Pipe(Out(loader, 1), Out(loader, 2), family, cubiqs.plus_of_preset(ours), True,
                                       Out(loader, 3))}


def insightface_loader(m: Migration, node: Node) -> dict:
    values = {"pack": m.literal(node, "model_name"), "provider": provider(m, node)}
    return {0: Out(m.add("IPAdapterKitFaceAnalysisLoader", node, values, claim=True), 0)}


def faceid(m: Migration, node: Node) -> dict:
    """IPAdapterFaceID (+Batch): Encode Face (weight_faceidv2, the face crops) and Apply (Advanced)."""
    pipe = m.pipe(node)
    weight, frames = m.weight(node)
    embeds = m.encode(node, pipe)
    model = m.apply(node, pipe, embeds, weight, m.weight_type(node), frame_weights=frames)
    return {0: model, 1: Out(embeds.node, 1) if embeds.node.kind == "IPAdapterKitEncodeFace" else None}


def simple(m: Migration, node: Node) -> dict:
    pipe = m.pipe(node)
    weight_type = m.literal(node, "weight_type")
    if weight_type not in SIMPLE_WEIGHT_TYPES:
        raise Unmapped(f"its weight_type '{weight_type}' is not one of {', '.join(SIMPLE_WEIGHT_TYPES)}")
    weight, _ = m.weight(node)
    return {0: m.apply(node, pipe, m.encode(node, pipe), weight, SIMPLE_WEIGHT_TYPES[weight_type])}


def advanced(m: Migration, node: Node) -> dict:
    """IPAdapterAdvanced, IPAdapterBatch, IPAdapterMS, IPAdapterClipVisionEnhancer (+Batch); on a FaceID pipe
    through Encode Face, as cubiq's nodes take the pipe's InsightFace."""
    pipe = m.pipe(node)
    weight, frames = m.weight(node)
    more = layer_weights(m, node, pipe) if node.kind == "IPAdapterMS" else {}
    detail = enhancer(m, node) if "enhance_tiles" in node.values else {}
    embeds = m.encode(node, pipe, **detail)
    weight_type = more.pop("weight_type", None) or m.weight_type(node)
    return {0: m.apply(node, pipe, embeds, weight, weight_type, frame_weights=frames, **more)}


def enhancer(m: Migration, node: Node) -> dict:
    tiles = m.get(node, "enhance_tiles")
    ratio = m.literal(node, "enhance_ratio")
    if isinstance(tiles, int) and tiles > 4:
        m.note(node, f"enhance_tiles {tiles} became detail_tiles 4, this pack's most")
        tiles = 4
    m.note(node, "detail_ratio = enhance_ratio / (1 + enhance_ratio): the view's share when cubiq's two references "
                 "(view, tiles) are averaged; ours averages the tiles' features where cubiq pools them over the grid")
    return {"detail_tiles": tiles, "detail_ratio": round(ratio / (1 + ratio), 4)}


def layer_weights(m: Migration, node: Node, pipe: Pipe) -> dict:
    """IPAdapterMS's layer_weights ("index:weight" per block, in cubiq's block order) as our custom layer weights.

    cubiq weights block t with weight_t · λ under "linear" (or under a precise type, whose swapped blocks it
    keeps); ours multiplies the weight type's own share of each block by the custom weight, so the custom weight
    is cubiq's divided by that share. Faithful: the middle block, which cubiq never patches, at 0.
    """
    text = m.literal(node, "layer_weights")
    if not str(text).strip():
        return {}
    try:
        pairs = {int(k): float(v) for k, v in (part.split(":") for part in str(text).split(",") if part.strip())}
    except ValueError:
        raise Unmapped(f"its layer_weights '{str(text)[:40]}' are not 'index:weight' pairs") from None
    weight_type = m.literal(node, "weight_type")
    if weight_type in PRECISE and not m.faithful:
        raise Unmapped(f"layer_weights with weight type '{weight_type}' cannot be expressed: ours multiplies the "
                       "type's own weights by the layer weights (the faithful mode divides them out)")
    family = m.family_of(node, pipe)
    if family is None:  # the block numbers tell when only one family has that many
        fitting = [family for family in families() if max(pairs) < len(family.blocks)]
        family = fitting[0] if len(fitting) == 1 else None
    if family is None:
        counts = ", ".join(f"{len(f.blocks)} in {f.name}" for f in families())
        names = " or ".join(f"…{f.id}…" for f in families())
        raise Unmapped(f"its layer_weights are per block, {counts}, and the graph does not say which "
                       f"family (name the adapter file {names}, migrate with --family, or set Apply's custom "
                       "layers by hand)")
    if max(pairs) >= len(family.blocks) or min(pairs) < 0:
        raise Unmapped(f"its layer_weights name block {max(pairs)}; {family.name} has {len(family.blocks)}")
    middle = [family.blocks.index(block) for block in cubiqs.middle_blocks(family)]
    if not m.faithful:
        for t in middle:
            if pairs.get(t):
                m.note(node, f"layer_weights give block {t}, the middle block, {pairs[t]:g}; cubiq never patches it, "
                             "ours does")
        keys = [f"{layer.key}:{pairs[t]:g}" for layer in family.layers if pairs.get(t := family.block_position(layer))]
        return {"layers": "custom", "custom_layer_weights": ", ".join(keys) or f"{family.keys[0]}:0",
                "weight_type": "linear"}
    ours = weight_type if weight_type in PRECISE else "linear"
    shares = cubiqs.block_factors(ours, family)
    multipliers = {}
    for t, value in pairs.items():
        block = family.blocks[t]
        if t in middle or not value:
            continue
        if not shares.get(block):
            raise Unmapped(f"its layer_weights give block {t} {value:g} under '{ours}', which leaves that block out "
                           "here (ours can only scale the blocks a weight type weights)")
        multipliers[block] = value / shares[block]
    m.change(f"layer weights per block → layers = custom under weight type '{ours}' (cubiq's block weights divided by "
             f"the type's own share of each block; {family.name} keys); the middle block at 0 (cubiq never patches it)")
    return {"layers": "custom", "custom_layer_weights": cubiqs.custom_layers(family, lambda b: multipliers.get(b, 0.0)),
            "weight_type": ours}


def precise_inputs(m: Migration, node: Node, boost_name: str):
    """(pipe, λ, boost, embeds) of a precise node; its λ and boost must be plain numbers on the node."""
    pipe = m.pipe(node)
    weight, frames = m.weight(node)
    boost = m.number(node, boost_name, -1.0, 3.0)
    if frames is not None:
        raise Unmapped(f"its weight is a list of frame weights, which cubiq does not apply to {boost_name}")
    if isinstance(weight, Out) or isinstance(boost, Out):
        raise Unmapped(f"its weight or {boost_name} comes from a link; set them on the node to migrate it")
    return pipe, weight, boost, m.encode(node, pipe)


def precise_style(m: Migration, node: Node) -> dict:
    """cubiq's style_boost is the weight of the composition blocks (which push away from the reference)."""
    pipe, weight, boost, embeds = precise_inputs(m, node, "style_boost")
    if boost == weight:
        return {0: m.apply(node, pipe, embeds, weight, "style transfer precise")}
    family = m.family_of(node, pipe) if m.faithful else None
    if family is not None:  # one Apply: the composition blocks' custom weight is style_boost / λ
        return {0: one_precise(m, node, pipe, embeds, family, "style transfer precise", weight, boost, weight)}
    if m.faithful:
        m.note(node, "two Applies (style blocks at λ, composition blocks at style_boost): one Apply needs custom layer "
                     "weights, whose keys depend on the model's family, which the graph does not say (--family)")
    # the style blocks at λ, then the composition blocks alone at style_boost: two Applies, disjoint layers
    style = m.apply(node, pipe, embeds, weight, "style transfer", claim=False)
    return {0: m.apply(node, pipe, embeds, boost, "style transfer precise", model=style, layers="composition")}


def precise_composition(m: Migration, node: Node) -> dict:
    """cubiq's composition_boost is the weight of every block but the composition ones (which get λ)."""
    pipe, weight, boost, embeds = precise_inputs(m, node, "composition_boost")
    if boost == 0:
        return {0: m.apply(node, pipe, embeds, weight, "composition")}
    family = m.family_of(node, pipe) if m.faithful else None
    if family is not None:  # one Apply: every other block's custom weight is composition_boost / λ
        return {0: one_precise(m, node, pipe, embeds, family, "composition precise", weight, weight, boost)}
    if boost == weight:
        return {0: m.apply(node, pipe, embeds, weight, "composition precise")}
    if m.faithful:
        m.note(node, "two Applies whose weights add up: one Apply needs custom layer weights, whose keys depend on "
                     "the model's family, which the graph does not say (--family)")
    # "composition precise" at the boost plus "composition" at λ − boost: the sum is cubiq's weights
    m.number(node, "weight", -1.0, 3.0, weight - boost)
    if node.values.get("embeds_scaling", "V only") != "V only":
        m.note(node, "split into two Applies whose weights add up; exact with embeds scaling 'V only', close otherwise")
    first = m.apply(node, pipe, embeds, boost, "composition precise", claim=False)
    return {0: m.apply(node, pipe, embeds, weight - boost, "composition", model=first)}


def one_precise(m: Migration, node: Node, pipe: Pipe, embeds, family, weight_type: str, weight: float,
                composition: float, others: float) -> Out:
    """One Apply of a precise type whose composition blocks get ``composition`` and every other block it weights
    ``others`` (cubiq's weights before the type's own shares): λ stays the Apply's weight where it is not 0, the
    rest goes into the custom layer weights; the middle block, which cubiq never patches, at 0."""
    scale = weight or composition or others or 1.0
    shares = cubiqs.block_factors(weight_type, family)
    middle = set(cubiqs.middle_blocks(family))
    composition_blocks = family.composition_blocks

    def multiplier(block):
        if block in middle or not shares.get(block):
            return 0.0
        return (composition if block in composition_blocks else others) / scale

    text = cubiqs.custom_layers(family, multiplier)
    m.change(f"one Apply instead of two: weight type '{weight_type}' at {scale:g} with layers = custom "
             f"({family.name} keys: the composition blocks × {cubiqs.number(composition / scale)}, the others "
             f"× {cubiqs.number(others / scale)}, the middle block 0)")
    return m.apply(node, pipe, embeds, scale, weight_type, layers="custom", custom_layer_weights=text)


def style_composition(m: Migration, node: Node) -> dict:
    pipe = m.pipe(node)
    style_weight = m.number(node, "weight_style", -1.0, 3.0)
    composition_weight = m.number(node, "weight_composition", -1.0, 3.0)
    expand = m.literal(node, "expand_style")
    style = m.encode(node, pipe, "image_style")
    same = node.values.get("image_composition") == node.values.get("image_style")
    composition = style if same else m.encode(node, pipe, "image_composition", offset=(-350, 300))
    first = m.apply(node, pipe, style, style_weight, "strong style transfer" if expand else "style transfer", claim=False)
    return {0: m.apply(node, pipe, composition, composition_weight, "composition", model=first)}


def tiled(m: Migration, node: Node) -> dict:
    pipe = m.pipe(node)
    if pipe.faceid:
        raise Unmapped("its adapter is a FaceID one: Encode Face takes whole faces, not tiles")
    weight, frames = m.weight(node)
    image = m.get(node, "image")
    if not isinstance(image, Out):
        raise Unmapped("its image is not connected")
    values = {"image_encoder": m.encoder(node, pipe), "image": image,
              "negative_image": m.negative(node, pipe, m.get(node, "image_negative"))}
    if m.get(node, "sharpening") not in (0, 0.0, None):
        m.note(node, "its sharpening is not applied: Encode Tiled has none")
    if m.faithful and node.kind not in BATCH and not frames:
        # each tile under its own mask, as cubiq applies them: Encode Tiled's regions into Apply (Advanced)
        values.update(tiling=TILINGS[1], mask=m.get(node, "attn_mask"))
        tiles = m.add("IPAdapterKitEncodeTiled", node, values, offset=(-350, 0))
        m.change("tiles as cubiq cuts them (tiling = cubiq), each under its own mask through Encode Tiled's regions "
                 "(the attention mask is cut along with the tiles)")
        model = m.apply(node, pipe, None, weight, m.weight_type(node), regions=Out(tiles, 2), attn_mask=None)
        return {0: model, 2: Out(tiles, 1)}
    tiles = m.add("IPAdapterKitEncodeTiled", node, values, offset=(-350, 0))
    m.note(node, "cubiq applies each tile only inside its own mask; here every tile's tokens act on the whole picture "
                 "(combine = concat)" + (" (one per latent and frame weights do not reach regions, so the faithful "
                 "per-tile masks are not used)" if m.faithful else "; without --ours, Encode Tiled's regions (tiling "
                 "= cubiq) put each tile under its own mask") + "; the masks are Encode Tiled's tile_masks")
    if node.values.get("combine_embeds", "concat") != "concat":
        m.note(node, f"its combine_embeds '{node.values['combine_embeds']}' (per tile, over a batch of images) is not used")
    model = m.apply(node, pipe, Out(tiles, 0), weight, m.weight_type(node), combine="concat", frame_weights=frames)
    return {0: model, 2: Out(tiles, 1)}


def embeds_apply(m: Migration, node: Node) -> dict:
    pipe = m.pipe(node)
    embeds = m.get(node, "pos_embed")
    if not (isinstance(embeds, Out) and isinstance(embeds.node, Node)):
        raise Unmapped("its pos_embed does not come from a node this migration replaces")
    if m.get(node, "neg_embed") not in (None, NegEmbeds()):
        raise Unmapped("its neg_embed is not an IPAdapter Encoder's neg_embed; here the negative image goes to Encode Image")
    weight, frames = m.weight(node)
    return {0: m.apply(node, pipe, embeds, weight, m.weight_type(node), frame_weights=frames)}


def from_params(m: Migration, node: Node) -> dict:
    pipe = m.pipe(node)
    params = m.get(node, "ipadapter_params")
    if not isinstance(params, Params):
        raise Unmapped("its ipadapter_params do not come from IPAdapter Regional Conditioning / Combine Params")
    chain, image_encoder, types = None, m.encoder(node, pipe), []
    for region in params.regions:
        embeds = m.encode(region, pipe, image_encoder=image_encoder, negative_image=m.get(node, "image_negative"))
        values = {"embeds": embeds, "weight": m.number(region, "image_weight", -1.0, 3.0),
                  "weight_type": m.weight_type(region), "start_at": m.get(region, "start_at"),
                  "end_at": m.get(region, "end_at"), "mask": m.get(region, "mask"), "regions": chain}
        types.append(values["weight_type"])
        chain = Out(m.add("IPAdapterKitRegion", region, values, claim=True), 0)
    return {0: m.apply(node, pipe, None, 1.0, "linear", regions=chain, region_types=types)}


def regional(m: Migration, node: Node) -> dict:
    """Its reference goes into the Region chain of the From Params node it feeds; its texts through Set Mask."""
    outputs = {0: Params((node,))}
    mask = m.get(node, "mask")
    for slot, name in ((1, "positive"), (2, "negative")):
        text = m.get(node, name)
        if text is not None and mask is not None:
            values = {"conditioning": text, "mask": mask, "strength": m.get(node, "prompt_weight"), "set_cond_area": "default"}
            text = Out(m.add("ConditioningSetMask", node, values, offset=(350, 150 * slot)), 0)
        outputs[slot] = text
    return outputs


def combine_params(m: Migration, node: Node) -> dict:
    regions = []
    for i in range(1, 6):
        params = m.get(node, f"params_{i}")
        if params is not None and not isinstance(params, Params):
            raise Unmapped(f"its params_{i} do not come from IPAdapter Regional Conditioning / Combine Params")
        regions += params.regions if params else []
    return {0: Params(tuple(regions))}


def encoder(m: Migration, node: Node) -> dict:
    if isinstance(node.values.get("mask"), Out):
        raise Unmapped("its mask (the part of the image the encoder sees) has no counterpart here")
    pipe = m.pipe(node)
    embeds = m.encode(node, pipe, claim=True, offset=(0, 0), weight=m.number(node, "weight", -1.0, 3.0))
    return {0: embeds, 1: NegEmbeds()}


def combine_embeds(m: Migration, node: Node) -> dict:
    method = m.choice(node, "method", COMBINE_MODES, " (concat, add, subtract, average, norm average)")
    if method == "norm average":
        m.note(node, "norm average here scales each reference to the same length; cubiq's normalises each feature "
                     "across the references")
    values = {"method": method}
    for i in range(1, 6):
        embeds = m.get(node, f"embed{i}")
        if embeds is not None and not (isinstance(embeds, Out) and isinstance(embeds.node, Node)):
            raise Unmapped(f"its embed{i} does not come from a node this migration replaces")
        values[f"embeds_{i}"] = embeds
    return {0: Out(m.add("IPAdapterKitCombineEmbeds", node, values, claim=True), 0)}


def noise(m: Migration, node: Node) -> dict:
    values = {"type": m.choice(node, "type", ("fade", "dissolve", "gaussian", "shuffle")),
              "strength": m.number(node, "strength", 0.0, 1.0), "blur": m.number(node, "blur", 0, 32),
              "image": m.get(node, "image_optional")}
    m.note(node, "the noise comes from Noise's seed (0); cubiq's pack seeds it from the image, so the pattern differs")
    return {0: Out(m.add("IPAdapterKitNoise", node, values, claim=True), 0)}


def prep_image(m: Migration, node: Node) -> dict:
    values = {"image": m.get(node, "image"), "interpolation": m.get(node, "interpolation"),
              "crop_position": m.get(node, "crop_position"), "sharpening": m.number(node, "sharpening", 0.0, 1.0)}
    return {0: Out(m.add("IPAdapterKitPrepImage", node, values, claim=True), 0)}


def save_embeds(m: Migration, node: Node) -> dict:
    embeds = m.get(node, "embeds")
    if not (isinstance(embeds, Out) and isinstance(embeds.node, Node)):
        raise Unmapped("its embeds do not come from a node this migration replaces")
    m.add("IPAdapterKitSaveEmbeds", node, {"embeds": embeds, "filename_prefix": m.get(node, "filename_prefix")}, claim=True)
    m.note(node, "writes .safetensors to output/ipadapter_embeds (cubiq's pack: .ipadpt pickles in output/)")
    return {}


def weights(m: Migration, node: Node) -> dict:
    """IPAdapter Weights without an image: a ramp (IP-Adapter Frame Weights) or a custom list (frame_weights text)."""
    if isinstance(node.values.get("image"), Out):
        raise Unmapped("with an image it also repeats and cross-fades images per frame, which no node here does")
    timing = m.literal(node, "timing")
    text = str(m.literal(node, "weights"))
    try:
        values = [float(w) for w in text.replace("\n", ",").split(",") if w.strip()]
    except ValueError:
        raise Unmapped(f"its weights '{text[:40]}' are not numbers") from None
    if timing == "custom":
        return {0: FrameList(", ".join(f"{w:g}" for w in values or [0.0]))}
    if timing not in FRAME_TIMINGS:
        raise Unmapped(f"its timing '{timing}' has no counterpart here")
    frames = m.get(node, "frames")
    frames = max(frames, 2) if isinstance(frames, int) else frames  # cubiq's least
    if m.literal(node, "start_frame") != 0 or m.literal(node, "end_frame") < (frames if isinstance(frames, int) else 9999):
        raise Unmapped("its start_frame / end_frame hold the first / last weight over some frames; "
                       "IP-Adapter Frame Weights ramps over all of them")
    start, end = (values[0], values[-1]) if values else (0.0, 1.0)
    values = {"timing": FRAME_TIMINGS[timing], "frames": frames,
              "start": m.number(node, "weights", -1.0, 3.0, start), "end": m.number(node, "weights", -1.0, 3.0, end)}
    if timing in ("ease_in", "ease_out"):
        m.note(node, f"cubiq's {timing} is our '{FRAME_TIMINGS[timing]}' (the usual easing names)")
    return {0: FrameList(Out(m.add("IPAdapterKitFrameWeights", node, values, claim=True), 0))}


RULES = {
    "IPAdapterModelLoader": model_loader, "IPAdapterUnifiedLoader": unified_loader, "IPAdapter": simple,
    "IPAdapterUnifiedLoaderFaceID": unified_loader_faceid, "IPAdapterInsightFaceLoader": insightface_loader,
    **dict.fromkeys(FACEID_NODES, faceid),
    **dict.fromkeys(("IPAdapterAdvanced", "IPAdapterBatch", "IPAdapterMS", "IPAdapterClipVisionEnhancer",
                     "IPAdapterClipVisionEnhancerBatch"), advanced),
    **dict.fromkeys(("IPAdapterPreciseStyleTransfer", "IPAdapterPreciseStyleTransferBatch"), precise_style),
    **dict.fromkeys(("IPAdapterPreciseComposition", "IPAdapterPreciseCompositionBatch"), precise_composition),
    **dict.fromkeys(("IPAdapterStyleComposition", "IPAdapterStyleCompositionBatch"), style_composition),
    **dict.fromkeys(("IPAdapterTiled", "IPAdapterTiledBatch"), tiled),
    **dict.fromkeys(("IPAdapterEmbeds", "IPAdapterEmbedsBatch"), embeds_apply),
    "IPAdapterFromParams": from_params, "IPAdapterRegionalConditioning": regional,
    "IPAdapterCombineParams": combine_params, "IPAdapterEncoder": encoder, "IPAdapterCombineEmbeds": combine_embeds,
    "IPAdapterNoise": noise, "PrepImageForClipVision": prep_image, "IPAdapterSaveEmbeds": save_embeds,
    "IPAdapterWeights": weights,
}


# -- the whole migration --------------------------------------------------------------------------

def migrate(workflow: dict, mode: str = "faithful", family=None) -> tuple[dict, Report]:
    """The workflow with this pack's nodes in place of cubiq's (same format), and what was done.

    ``mode``: "faithful" (cubiq's pictures where our nodes can express them) or "ours" (this pack's own
    behaviour); ``family``: the model family's id where the graph does not say it (the faithful custom layer
    weights need its layer keys).
    """
    kind, nodes = read(workflow)
    m = Migration(nodes, mode, family)
    m.run()
    stays, added = m.finish()
    assign_ids(workflow, kind, nodes, stays, added)
    out = (write_ui if kind == "ui" else write_api)(workflow, stays, added,
                                                     lambda key, name: final_source(m, stays, nodes[key].values.get(name)))
    report = Report(kind, mode, cubiq=sum(is_cubiq(n.kind) for n in nodes.values()), replaced=len(m.outputs),
                    added=len(added))
    report.order = [key for key, node in nodes.items() if is_cubiq(node.kind)]
    for key in nodes:
        if key in m.outputs:
            new = [(n.id, n.kind) for n in added if n.offset[0] == key]
            report.mapped[key] = Mapped(nodes[key].kind, sorted(new, key=lambda item: (item[0] != key, len(str(item[0])), str(item[0]))),
                                        m.changes.get(key, []))
    report.left = {key: (nodes[key].kind, reason) for key, reason in {**m.left, **m.kept}.items()}
    report.notes = [(key, nodes[key].kind, text) for key, text in m.notes]
    if not m.faithful and any(n.kind == "IPAdapterKitApply" for n in added):
        report.notes.append((None, None, MIDDLE_BLOCK_NOTE))
    return out, report


def final_source(m: Migration, stays: set, value):
    """The source a kept node's input has in the output graph (an Out), or None."""
    if not isinstance(value, Out):
        return None
    if isinstance(value.node, Node) or value.node in stays:
        return value
    if value.node in m.outputs:
        return m.rewired(value)
    return None
