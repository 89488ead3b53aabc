"""cubiq's ComfyUI_IPAdapter_plus (a local copy the user gives, never committed) in the benchmark's ComfyUI.

Its IPAdapterAdvanced node applies random adapters with the same weights as ours (same
factory, same seeds) to the same model, so that the step benchmark times both packs' patches
on one UNet. cubiq's node needs a CLIP vision model: a ComfyUI one with ViT-H/14's output
widths but 2 layers (random weights); it encodes once per Apply, outside the timed step.

cubiq's current code expects a newer ComfyUI than the pinned March-2024 copy. The gaps it
meets outside the step are filled only where missing, and named in the report: the module
``node_helpers`` (only cubiq's conditioning nodes use it), ``ModelPatcher.get_model_object``
(later ComfyUI's lookup, used for ``model_sampling``) and ``model_base.SDXL_instructpix2pix``
(only named in an ``isinstance`` check). Anything else that fails stops the run
with one line that says what is missing.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import sys
import tempfile
import types
from pathlib import Path
from unittest import mock

from ipadapter.registry.families import SD15, SDXL

CUBIQ_VARIANTS = ("cubiq_base", "cubiq_plus", "cubiq_two_stacked_base")
CUBIQ_LABELS = {
    "cubiq_base": "cubiq IPAdapterAdvanced, base, λ = 1",
    "cubiq_plus": "cubiq IPAdapterAdvanced, plus, λ = 1",
    "cubiq_two_stacked_base": "cubiq IPAdapterAdvanced, two stacked base",
}
PACKAGE = "cubiq_ipadapter_plus_under_bench"
ARCHITECTURES = {"sd15": SD15, "sdxl": SDXL}
ENCODER_LAYERS = 2


def fill_comfy_gaps(comfy) -> list[str]:
    """Add what cubiq imports or calls outside the step and this ComfyUI lacks; return what was added."""
    added = []
    try:
        importlib.import_module("node_helpers")
    except ImportError:
        helpers = types.ModuleType("node_helpers")

        def conditioning_set_values(*args, **kwargs):
            raise NotImplementedError("node_helpers stand-in: cubiq's conditioning nodes are not part of the benchmark")

        helpers.conditioning_set_values = conditioning_set_values
        sys.modules["node_helpers"] = helpers
        added.append("node_helpers (stand-in)")
    patcher_class = comfy.model_patcher.ModelPatcher
    if not hasattr(patcher_class, "get_model_object"):
        def get_model_object(self, name):
            if name in self.object_patches:
                return self.object_patches[name]
            return comfy.utils.get_attr(self.model, name)

        patcher_class.get_model_object = get_model_object
        added.append("ModelPatcher.get_model_object")
    if not hasattr(comfy.model_base, "SDXL_instructpix2pix"):  # only named in an isinstance check
        comfy.model_base.SDXL_instructpix2pix = type("SDXL_instructpix2pix", (comfy.model_base.SDXL,), {})
        added.append("model_base.SDXL_instructpix2pix (a class no model is an instance of)")
    return added


def import_cubiq(folder: Path):
    """cubiq's IPAdapterPlus module, imported as part of a package named ``PACKAGE`` (its ``__init__`` not run)."""
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACKAGE, folder / "__init__.py", submodule_search_locations=[str(folder)])
        sys.modules[PACKAGE] = importlib.util.module_from_spec(spec)
    return importlib.import_module(f"{PACKAGE}.IPAdapterPlus")


@contextlib.contextmanager
def comfy_device(comfy, device, dtype):
    """ComfyUI's device and UNet dtype as a ComfyUI running on ``device`` reports them.

    The harness keeps comfy's device logic in CPU mode; cubiq builds its projection and image
    tokens on ``get_torch_device()`` in ``unet_dtype()``, as it would in a GPU ComfyUI.
    """
    management = comfy.model_management
    with mock.patch.object(management, "get_torch_device", lambda: device), mock.patch.object(management, "unet_dtype", lambda *a, **k: dtype):
        yield


def small_clip_vision(comfy, seed: int):
    """A ComfyUI CLIP vision model with ViT-H/14's widths (1280 hidden, 1024 projection) and 2 layers, random weights."""
    from devtools.comfy_import import reset_all_parameters

    config = json.loads((Path(comfy.clip_vision.__file__).parent / "clip_vision_config_h.json").read_text())
    config["num_hidden_layers"] = ENCODER_LAYERS
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "clip_vision_config.json"
        path.write_text(json.dumps(config))
        clip_vision = comfy.clip_vision.ClipVisionModel(str(path))
    reset_all_parameters(clip_vision.model, seed)
    return clip_vision


class CubiqPack:
    def __init__(self, folder: Path, module, comfy, gaps_filled: list[str]):
        self.folder = folder
        self.module = module
        self.comfy = comfy
        self.gaps_filled = gaps_filled

    @classmethod
    def load(cls, folder: str, device) -> "CubiqPack":
        """Import cubiq's pack into the benchmark's ComfyUI, or exit with one line saying what is missing."""
        from inference_step import import_comfy_for

        path = Path(folder).expanduser().resolve()
        if not (path / "IPAdapterPlus.py").is_file():
            raise SystemExit(f"--cubiq {path}: no IPAdapterPlus.py there; expected a copy of cubiq's ComfyUI_IPAdapter_plus")
        comfy = import_comfy_for(device)
        gaps = fill_comfy_gaps(comfy)
        try:
            module = import_cubiq(path)
        except Exception as error:
            raise SystemExit(f"--cubiq {path}: its IPAdapterPlus does not import in this ComfyUI: {type(error).__name__}: {error}") from None
        if not hasattr(module, "IPAdapterAdvanced"):
            raise SystemExit(f"--cubiq {path}: its IPAdapterPlus has no IPAdapterAdvanced node")
        return cls(path, module, comfy, gaps)

    def apply(self, model, family: str, variant: str, width: int, seed: int, clip_vision, device, dtype):
        """``model`` through cubiq's IPAdapterAdvanced with a random adapter (the weights ours gets for this seed)."""
        import torch

        from devtools.adapter_factory import random_adapter

        state = random_adapter(variant, base_width=width, seed=seed, family=family)
        image = torch.rand(1, 512, 512, 3, generator=torch.Generator().manual_seed(seed))  # square: no crop warning
        pipeline = {"ipadapter": {"model": state}, "clipvision": {"model": clip_vision}}
        with comfy_device(self.comfy, device, dtype):
            patched = self.module.IPAdapterAdvanced().apply_ipadapter(
                model, pipeline, weight=1.0, weight_type="linear", combine_embeds="concat", start_at=0.0, end_at=1.0,
                embeds_scaling="V only", image=image)[0]
        patched_layers = len(patched.model_options["transformer_options"].get("patches_replace", {}).get("attn2", {}))
        if patched_layers != len(ARCHITECTURES[family].layers):
            raise RuntimeError(f"cubiq's node patched {patched_layers} cross-attention layers of {len(ARCHITECTURES[family].layers)}")
        return patched

    def variants(self, model, family: str, width: int, device, dtype) -> dict:
        """The step benchmark's extra variants: cubiq's base, plus and two stacked base adapters."""
        try:
            clip_vision = small_clip_vision(self.comfy, seed=0)

            def apply(base_model, variant: str, seed: int):
                return self.apply(base_model, family, variant, width, seed, clip_vision, device, dtype)

            return {
                "cubiq_base": apply(model, "base", 1),
                "cubiq_plus": apply(model, "plus", 2),
                "cubiq_two_stacked_base": apply(apply(model, "base", 3), "base", 4),
            }
        except Exception as error:
            raise RuntimeError(f"cubiq's IPAdapterAdvanced failed on {family}: {type(error).__name__}: {error}") from error
