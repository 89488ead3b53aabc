"""A weight type's share of λ per block: plain Python (the workflow migrator reads it without torch).

``ipadapter.weighting`` turns these per-block weights into per-layer weights for a model.
"""
from __future__ import annotations

WEAK = 0.2  # the "weak" / "strong" types' factor
FAINT = 0.1  # "composition precise" on the blocks that are neither style nor composition


def block_weights(weight_type, architecture, weight, composition_weight) -> dict[tuple[str, int], float]:
    """λ per block under a weight type (block -> weight; a block left out gets 0)."""
    blocks = architecture.blocks
    count = len(blocks)
    half = count / 2
    ramps = {
        "linear": lambda t: 1.0,
        "ease in": lambda t: 0.05 + 0.95 * (1 - t / count),
        "ease out": lambda t: 0.05 + 0.95 * (t / count),
        "ease in-out": lambda t: 0.05 + 0.95 * (1 - abs(t - half) / half),
        "reverse in-out": lambda t: 0.05 + 0.95 * (abs(t - half) / half),
    }
    if weight_type in ramps:
        return {block: weight * ramps[weight_type](t) for t, block in enumerate(blocks)}
    weak = {"weak input": {"input"}, "weak output": {"output"}, "weak middle": {"middle"},
            "strong middle": {"input", "output"}}
    if weight_type in weak:
        return {block: weight * (WEAK if block[0] in weak[weight_type] else 1.0) for block in blocks}

    style = {block: weight for block in architecture.style_blocks}
    composition = architecture.composition_blocks
    if weight_type == "style transfer":
        return style
    if weight_type == "composition":
        return {block: weight * share for block, share in composition.items()}
    if weight_type == "strong style transfer":
        return {block: weight for block in blocks if block not in composition}
    if weight_type == "style and composition":
        return {**style, **{block: composition_weight * share for block, share in composition.items()}}
    with_composition = {**style, **{block: weight * share for block, share in composition.items()}}
    if weight_type == "style transfer precise":
        return with_composition
    # composition precise: the other blocks keep a tenth
    return {**{block: weight * FAINT for block in blocks}, **with_composition}
