"""ComfyUI node definitions as data: a node's title, its inputs in widget order, its outputs.

:meth:`NodeSpec.input_types` renders what a node's ``INPUT_TYPES`` returns; :meth:`NodeSpec.widgets`
gives the order in which the graph editor stores widget values (the workflow migrator reads and
writes them by it). Plain data: importing it loads neither torch nor ComfyUI.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

FILES = "FILES"  # a combo whose choices are the files of a model folder (they differ per installation)
WIDGET_KINDS = {"INT", "FLOAT", "STRING", "BOOLEAN"}
SEED_NAMES = {"seed", "noise_seed"}  # the editor adds a "control after generate" widget after these


@dataclass(frozen=True)
class Input:
    name: str
    kind: object  # a socket or widget type, the choices of a combo (a tuple), or FILES
    default: object = None  # as declared; None where the definition declares none
    low: float | None = None
    high: float | None = None
    optional: bool = False
    step: float | None = None
    multiline: bool = False
    tooltip: str | None = None
    listing: str | None = None  # with FILES: which file list (a model folder's name)

    @property
    def is_widget(self) -> bool:
        return isinstance(self.kind, tuple) or self.kind in WIDGET_KINDS or self.kind == FILES

    @property
    def socket_type(self) -> str:
        """The type of the input's socket (a widget turned into a socket: its type, COMBO for a list)."""
        return "COMBO" if isinstance(self.kind, tuple) or self.kind == FILES else self.kind

    @property
    def initial(self):
        """The value a new node starts with."""
        if self.default is not None:
            return self.default
        return self.kind[0] if isinstance(self.kind, tuple) and self.kind else None

    def declared(self, list_files: Callable[[str], list[str]]) -> tuple:
        """The input as ``INPUT_TYPES`` declares it: its type or choices, and its options."""
        if self.kind == FILES:
            kind = list_files(self.listing)
        else:
            kind = list(self.kind) if isinstance(self.kind, tuple) else self.kind
        options = {"default": self.default, "min": self.low, "max": self.high, "step": self.step,
                   "multiline": self.multiline or None, "tooltip": self.tooltip}
        options = {key: value for key, value in options.items() if value is not None}
        return (kind, options) if options else (kind,)


@dataclass(frozen=True)
class NodeSpec:
    inputs: tuple[Input, ...]
    outputs: tuple[tuple[str, str], ...]  # (name, type) per output slot
    title: str = ""

    def input(self, name: str) -> Input | None:
        return next((i for i in self.inputs if i.name == name), None)

    def widgets(self) -> list[str]:
        """``widgets_values`` order: widget inputs, each seed followed by its "control after generate"."""
        names = []
        for item in sorted(self.inputs, key=lambda i: i.optional):  # required first, each group in order
            if item.is_widget:
                names.append(item.name)
                if item.kind == "INT" and item.name in SEED_NAMES:
                    names.append("control_after_generate")
        return names

    def sockets(self) -> list[Input]:
        return [i for i in sorted(self.inputs, key=lambda i: i.optional) if not i.is_widget]

    def input_types(self, list_files: Callable[[str], list[str]]) -> dict:
        """What the node's ``INPUT_TYPES`` returns; ``list_files`` gives the choices of a FILES input."""
        declared = {"required": {i.name: i.declared(list_files) for i in self.inputs if not i.optional}}
        optional = {i.name: i.declared(list_files) for i in self.inputs if i.optional}
        if optional:
            declared["optional"] = optional
        return declared


def sock(name, kind, *, tooltip=None, optional=False):
    return Input(name, kind, optional=optional, tooltip=tooltip)


def num(kind, name, default, low, high, *, step=None, tooltip=None, optional=False):
    return Input(name, kind, default, low, high, optional, step, tooltip=tooltip)


def combo(name, choices, default=None, *, tooltip=None, optional=False):
    return Input(name, tuple(choices) if choices != FILES else FILES, default, optional=optional, tooltip=tooltip)


def files(name, listing, *, tooltip=None):
    return Input(name, FILES, tooltip=tooltip, listing=listing)


def text(name, default, *, multiline=False, tooltip=None, optional=False):
    return Input(name, "STRING", default, optional=optional, multiline=multiline, tooltip=tooltip)


def spec(inputs, outputs, title=""):
    return NodeSpec(tuple(inputs), tuple((o, o) if isinstance(o, str) else o for o in outputs), title)


def opt(*inputs):
    return [replace(i, optional=True) for i in inputs]
