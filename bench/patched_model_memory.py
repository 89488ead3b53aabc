"""Memory of the patched model: the adapter's tensors are counted once however often the MODEL is cloned.

ComfyUI clones a MODEL for every node that patches it (LoRA, other packs, a second
sampler...). A full-size SD1.5 ComfyUI model (random weights) gets the base and the plus
adapter applied, then is cloned N times and the first 10 clones run one UNet call each
(which would make any per-clone copy of the image keys/values). Counted: the unique storages of every tensor the
clones' attn2 patches reach (by data pointer), against what N independent copies would
hold, and the process's resident memory before and after. Usage:

    python bench/patched_model_memory.py [--clones 1 10 100] [--threads N]
"""
from __future__ import annotations

import argparse
import copy
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from proc_memory import release_memory, status_bytes  # noqa: E402


def rss_bytes() -> int:
    return status_bytes("VmRSS")


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clones", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--width", type=int, default=320, help="UNet model_channels (320 = SD1.5)")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from adapter_factory import random_adapter
    from comfy_inprocess import build_sd15_model_patcher, noise_prediction, pack_module
    from ipadapter.checkpoint import IPAdapterCheckpoint

    patcher_module = pack_module("patcher")
    model = build_sd15_model_patcher(args.width, seed=0)

    def term(variant: str, seed: int):
        checkpoint = IPAdapterCheckpoint.from_state_dicts(**random_adapter(variant, base_width=args.width, seed=seed), base_width=args.width)
        tokens = 4 if variant == "base" else 16
        generator = torch.Generator().manual_seed(seed)
        cond, uncond = (torch.randn(1, tokens, 768, generator=generator) for _ in range(2))
        return patcher_module.ImagePromptTerm.build(checkpoint, cond, uncond, 1.0, {}, 1e9, 0.0)

    patched = patcher_module.apply_image_prompt(patcher_module.apply_image_prompt(model, term("base", 1)), term("plus", 2))
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 77, 768, generator=generator)
    sigma = model.model.model_sampling.sigmas[500].expand(2).clone()
    noise_prediction(patched, latent, sigma, context)  # the first call makes the device copies of K'/V'
    one = patch_tensors(patched)
    one_bytes = storage_bytes(one, unique=True)

    rows = []
    for count in args.clones:
        release_memory()
        before = rss_bytes()
        clones = [patched.clone() for _ in range(count)]
        for clone in clones[:10]:  # UNet calls on up to 10 clones (they would make any per-clone copies)
            noise_prediction(clone, latent, sigma, context)
        release_memory()
        grown = rss_bytes() - before
        reached = [t for clone in clones for t in patch_tensors(clone)]
        unique = storage_bytes(reached, unique=True)
        if_copied = count * one_bytes
        same_unet = all(clone.model is patched.model for clone in clones)
        rows.append((count, unique, if_copied, grown, same_unet))
        del clones, reached

    # the counterfactual: what a clone that copied the image keys/values would cost
    release_memory()
    before = rss_bytes()
    copies = [copy.deepcopy(patched.model_options["transformer_options"]["patches_replace"]["attn2"]) for _ in range(10)]
    for options in copies:  # clones that copy each image prompt term once (shared by its 16 layers)
        memo: dict = {}
        for patch in options.values():
            patch.terms = tuple(copy.deepcopy(t, memo) for t in patch.terms)
    release_memory()
    copied_growth = (rss_bytes() - before) / 10
    copied_storage = storage_bytes([t for options in copies for patch in options.values() for t in patch_tensors_of(patch)], unique=True) / 10
    del copies

    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}; ComfyUI SD1.5 UNet "
          f"(model_channels {args.width}, random weights) + base and plus adapters applied, one UNet call on each of the first 10 clones")
    print(f"image keys/values of one patched model: {one_bytes / 2**20:.2f} MiB in {len({t.untyped_storage().data_ptr() for t in one})} storages; "
          f"a clone that copied them would hold {copied_storage / 2**20:.2f} MiB more and add {copied_growth / 2**20:.2f} MiB of resident memory")
    print("| clones | adapter tensors held (MiB) | if each clone copied them (MiB) | held / one model | resident memory added (MiB) | UNet weights shared |")
    print("|---|---|---|---|---|---|")
    for count, unique, if_copied, grown, same_unet in rows:
        print(f"| {count} | {unique / 2**20:.2f} | {if_copied / 2**20:.2f} | {unique / one_bytes:.2f}x | {grown / 2**20:.1f} | {'yes' if same_unet else 'no'} |")


if __name__ == "__main__":
    main()
