"""ComfyUI glue for the FaceID LoRA: weight patches on a ModelPatcher, added the way ComfyUI's own LoRA loaders
add them (``comfy.sd.load_lora_for_models``: the UNet's LoRA key map from ``comfy.lora.model_lora_keys_unet``,
``comfy.lora.load_lora``, ``ModelPatcher.add_patches`` on a clone). So the LoRA inside a FaceID adapter file,
applied here, and its ``<adapter stem>_lora.safetensors`` sidecar (the released layout, which
``save_lora_sidecar`` writes), applied by LoraLoaderModelOnly at the same strength, patch the same weights by the
same amounts. ComfyUI patches the weights when it loads the model for sampling; the clone shares the model.

The math and the files are ``ipadapter/faceid.py``; this module only speaks ComfyUI.
"""
from __future__ import annotations

import inspect
import os

from ..ipadapter.adapter_file import IPAdapterCheckpoint
from ..ipadapter.faceid import FaceIDLoRA, find_lora_sidecar, load_lora_sidecar, lora_sidecar_name, save_lora_sidecar
from ..patcher import family_of_comfy_model

__all__ = ["lora_patches", "apply_faceid_lora", "apply_adapter_lora", "apply_lora_sidecar", "find_lora_sidecar",
           "load_lora_sidecar", "lora_sidecar_name", "save_lora_sidecar"]


def lora_patches(model, lora: FaceIDLoRA) -> dict:
    """ComfyUI's weight patches ({model key: LoRA adapter}) of ``lora`` for ``model`` (a ModelPatcher), after
    refusing, in one line, a model of another family or whose layers the LoRA does not fit."""
    import comfy.lora

    family = family_of_comfy_model(model.model.diffusion_model)
    if family is not lora.family:
        raise ValueError(f"'{lora.source}' is the FaceID LoRA of an {lora.family.name} adapter, but the MODEL is "
                         f"{family.name}; expected the LoRA of an {family.name} FaceID adapter")
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    unmapped = [weight for weight in lora.weights if weight.kohya_name not in key_map]
    if unmapped:
        raise ValueError(f"the MODEL has no layer {unmapped[0].linear} for '{lora.source}' ({len(unmapped)} of "
                         f"{len(lora.weights)} LoRA layers unmatched); expected an {family.name} UNet")
    model_weights = model.model.state_dict()
    for weight in lora.weights:
        found = tuple(model_weights[key_map[weight.kohya_name]].shape)
        wanted = (weight.up.shape[0], weight.down.shape[1])
        if found != wanted:
            raise ValueError(f"'{lora.source}' changes {weight.linear} as {list(wanted)}, but the MODEL's layer is "
                             f"{list(found)}; expected the LoRA of an adapter made for this model's width")
    to_load = {weight.kohya_name: key_map[weight.kohya_name] for weight in lora.weights}
    # ComfyUI before 2025 takes no log_missing; every key here is mapped, so nothing is logged either way
    quiet = {"log_missing": False} if "log_missing" in inspect.signature(comfy.lora.load_lora).parameters else {}
    return comfy.lora.load_lora(lora.kohya_state_dict(), to_load, **quiet)


def apply_faceid_lora(model, lora: FaceIDLoRA, strength: float = 1.0):
    """A clone of ``model`` with the LoRA's weight patches at ``strength`` (cubiq's ``lora_strength``; the
    reference: 1). Strength 0 returns ``model`` itself, as ComfyUI's LoraLoader does."""
    if strength == 0:
        return model
    patches = lora_patches(model, lora)
    patched = model.clone()
    applied = patched.add_patches(patches, strength)
    if len(applied) != len(patches):
        missing = sorted(set(patches) - set(applied))[0]
        raise ValueError(f"the MODEL took {len(applied)} of the {len(patches)} LoRA patches of '{lora.source}' "
                         f"(not {missing}); expected a model whose weights ComfyUI can patch")
    return patched


def apply_adapter_lora(model, checkpoint: IPAdapterCheckpoint, strength: float = 1.0):
    """``model`` with the LoRA a FaceID adapter file carries (faceid, faceid-plus, faceid-plusv2)."""
    return apply_faceid_lora(model, FaceIDLoRA.from_checkpoint(checkpoint), strength)


def apply_lora_sidecar(model, path: str | os.PathLike, strength: float = 1.0):
    """``model`` with the LoRA of a ``_lora.safetensors`` sidecar (the released layout)."""
    family = family_of_comfy_model(model.model.diffusion_model)
    return apply_faceid_lora(model, load_lora_sidecar(path, family), strength)
