"""The names of the core's options, as plain tuples: the node interface and the workflow
migrator read them without loading torch. The modules that act on them check against these.
"""
# weighting.py: how λ is spread over the layers, and where it goes
WEIGHT_TYPES = (
    "linear", "ease in", "ease out", "ease in-out", "reverse in-out",
    "weak input", "weak output", "weak middle", "strong middle",
    "style transfer", "composition", "strong style transfer", "style and composition",
    "style transfer precise", "composition precise",
)
EMBEDS_SCALING = ("V only", "K+V", "K+V w/ C penalty", "K+mean(V) w/ C penalty")
C_PENALTY_WIDTH = 1280  # the C-penalty scalings weigh a layer by its width over this one (cubiq's definition)
FRAME_TIMINGS = ("linear", "ease in", "ease out", "ease in-out")

# image_prompt.py: how several references are combined
COMBINE_MODES = ("average", "concat", "add", "subtract", "norm average")

# preprocess.py: how a non-square image becomes the encoder's square
CROP_MODES = ("crop", "pad", "stretch")
