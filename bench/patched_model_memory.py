"""Memory of the patched model: the adapter's tensors are counted once however often the MODEL is cloned.

ComfyUI clones a MODEL for every node that patches it (LoRA, other packs, a second
sampler...). A full-size SD1.5 ComfyUI model (random weights) gets the base and the plus
adapter applied, then is cloned N times and the first 10 clones run one UNet call each
(which would make any per-clone copy of the image keys/values). Counted: the unique storages of every tensor the
clones' attn2 patches reach (by data pointer), against what N independent copies would
hold; the memory in use before and after and its peak (on a GPU the CUDA allocator's
``memory_allocated`` / ``max_memory_allocated``, in fp16; on the CPU the process's resident
size and ``VmHWM``, in fp32). Usage:

    python bench/patched_model_memory.py [--clones 1 10 100] [--width 320] [--threads N] [--cpu]
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # ipadapter and devtools

from proc_memory import current_bytes, peak_bytes, reset_peak  # noqa: E402
from timing import device_name, free_memory, pick_device  # noqa: E402

CALLED_CLONES = 10  # clones that run a UNet call (which would make any per-clone device copy)


def patch_tensors(patcher) -> list:
    """Every tensor reachable from the model's attn2 patches: image keys/values and their device copies."""
    import torch

    found = []

    def walk(value, seen):
        if id(value) in seen:
            return
        seen.add(id(value))
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(key, seen)
                walk(item, seen)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item, seen)
        elif hasattr(value, "__dict__"):
            for item in vars(value).values():
                walk(item, seen)

    for patch in patcher.model_options["transformer_options"]["patches_replace"]["attn2"].values():
        walk(patch, set())
    return found


def patch_tensors_of(patch) -> list:
    class One:
        model_options = {"transformer_options": {"patches_replace": {"attn2": {0: patch}}}}

    return patch_tensors(One)


def storage_bytes(tensors, unique: bool) -> int:
    if not unique:
        return sum(t.untyped_storage().nbytes() for t in tensors)
    storages = {}
    for tensor in tensors:
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return sum(storages.values())


def patched_model(width: int, device, dtype):
    """A full-size (``width`` 320) SD1.5 ComfyUI model with a base and a plus adapter applied, after one UNet call."""
    from devtools.comfy_inprocess import pack_module
    from inference_step import build_model, image_prompt_term, unet_inputs

    apply = pack_module("patcher").apply_image_prompt
    model = build_model("sd15", width, device, dtype)
    patched = apply(apply(model, image_prompt_term("sd15", "base", width, 1)), image_prompt_term("sd15", "plus", width, 2))
    inputs, sigma = unet_inputs(model, "sd15", 8, device)
    inputs.predict(patched, sigma)  # the first call makes the device copies of K'/V'
    return patched, lambda clone: inputs.predict(clone, sigma)


def clone_figures(patched, count: int, call, one_bytes: int, device) -> dict:
    """Memory of ``count`` clones of ``patched``, the first ``CALLED_CLONES`` of them run once."""
    reset_peak(device)
    before = current_bytes(device)
    clones = [patched.clone() for _ in range(count)]
    for clone in clones[:CALLED_CLONES]:
        call(clone)
    peak = peak_bytes(device)
    grown = current_bytes(device) - before
    unique = storage_bytes([t for clone in clones for t in patch_tensors(clone)], unique=True)
    return {"adapter_tensors_bytes": unique, "if_copied_bytes": count * one_bytes, "held_over_one_model": unique / one_bytes,
            "memory_added_bytes": grown, "peak_bytes": peak, "unet_shared": all(clone.model is patched.model for clone in clones)}


def copied_clone_figures(patched, device, copies: int = 10) -> dict:
    """The counterfactual: what a clone that copied the image keys/values (and their device copies) would add."""
    before = current_bytes(device)
    options = [copy.deepcopy(patched.model_options["transformer_options"]["patches_replace"]["attn2"]) for _ in range(copies)]
    for patches in options:  # each image prompt term copied once, shared by its layers
        memo: dict = {}
        for patch in patches.values():
            patch.terms = tuple(copy.deepcopy(t, memo) for t in patch.terms)
    grown = (current_bytes(device) - before) / copies
    held = storage_bytes([t for patches in options for patch in patches.values() for t in patch_tensors_of(patch)], unique=True) / copies
    return {"storage_bytes": held, "memory_added_bytes": grown}


def measure_clones(counts, width: int, device, dtype) -> dict:
    patched, call = patched_model(width, device, dtype)
    one = patch_tensors(patched)
    one_bytes = storage_bytes(one, unique=True)
    rows = {count: clone_figures(patched, count, call, one_bytes, device) for count in counts}
    first_peak = rows[counts[0]]["peak_bytes"]
    for figures in rows.values():
        figures["peak_over_first"] = figures["peak_bytes"] / first_peak
    result = {
        "model_channels": width, "dtype": str(dtype).replace("torch.", ""),
        "memory_measure": "torch.cuda memory_allocated / max_memory_allocated" if device.type == "cuda" else "VmRSS / VmHWM",
        "one_model_adapter_bytes": one_bytes, "one_model_storages": len({t.untyped_storage().data_ptr() for t in one}),
        "copied_clone": copied_clone_figures(patched, device),
        **{f"clones_{count}": figures for count, figures in rows.items()},
    }
    del patched, call
    free_memory(device)
    return result


def markdown_table(result: dict) -> list[str]:
    mib = 2**20
    lines = [f"SD1.5 ComfyUI model (model_channels {result['model_channels']}, random weights, {result['dtype']}) + base and plus adapters, "
             f"one UNet call on each of the first {CALLED_CLONES} clones; memory: {result['memory_measure']}",
             f"image keys/values of one patched model: {result['one_model_adapter_bytes'] / mib:.2f} MiB in {result['one_model_storages']} storages; "
             f"a clone that copied them would hold {result['copied_clone']['storage_bytes'] / mib:.2f} MiB more "
             f"and add {result['copied_clone']['memory_added_bytes'] / mib:.2f} MiB",
             "",
             "| clones | adapter tensors held (MiB) | if each clone copied them (MiB) | held / one model | memory added (MiB) | peak memory (MiB) | peak / first | UNet weights shared |",
             "|---|---|---|---|---|---|---|---|"]
    for key, figures in result.items():
        if key.startswith("clones_"):
            lines.append(f"| {key[len('clones_'):]} | {figures['adapter_tensors_bytes'] / mib:.2f} | {figures['if_copied_bytes'] / mib:.2f} | "
                         f"{figures['held_over_one_model']:.2f}× | {figures['memory_added_bytes'] / mib:.1f} | {figures['peak_bytes'] / mib:.0f} | "
                         f"{figures['peak_over_first']:.3f}× | {'yes' if figures['unet_shared'] else 'no'} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clones", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--width", type=int, default=320, help="UNet model_channels (320 = SD1.5)")
    parser.add_argument("--cpu", action="store_true", help="the CPU even when there is a GPU")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = pick_device(args.cpu)
    result = measure_clones(args.clones, args.width, device, dtype)
    print(f"machine: {device_name(device)}, torch {torch.__version__}")
    print("\n".join(markdown_table(result)))


if __name__ == "__main__":
    main()
