"""Peak memory per GPU of training the DiT adapters (issue 22: "memory is the product").

A run from cached encoder outputs: only the frozen transformer (bf16) and the adapter (fp32, AdamW) on the GPU, one
GPU (torch's AdamW) or eight (ZeRO-2: gradients and Adam's moments sharded, fp32 weights on every GPU). What the
encoders would add to a run that encodes every step is printed apart.

- Weights: parameter counts of the released transformers built on the meta device (diffusers, the released configs)
  and of the adapters the trainer builds on them (``DiTAdapterModel``).
- Activations, measured on the CPU: the released width at reduced depth (Flux.1: 1 double + 1 single block; SD3.5
  Large: 2 joint blocks), bf16 under autocast as the trainer runs it, 512 px, batch 1, forward and backward, with and
  without checkpointing. Counted: the bytes of every tensor alive at the end of the forward pass (what backward holds
  on to), by the block that made it, and the peak during backward above that. Scaled to the released depth, 1024 px
  and batch 4 by each tensor's token axis (image, text or both): linear in tokens because the attention kernel keeps
  no tokens x tokens matrix (checked).

    python -m bench.dit_memory [--json out.json]
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from devtools.dit_models import RELEASED_TRANSFORMERS, released_encoder_width  # noqa: E402 (after the path)

GIB = 2**30
REDUCED_DEPTH = {"flux": dict(num_layers=1, num_single_layers=1), "sd35": dict(num_layers=2)}
# the reduced model's blocks: (module, label, how many the released model has); SD3.5's last block has no text output
BLOCKS = {"flux": (("transformer_blocks.0", "double", 19), ("single_transformer_blocks.0", "single", 38)),
          "sd35": (("transformer_blocks.0", "joint", 37), ("transformer_blocks.1", "last joint", 1))}
TEXT_TOKENS = {"flux": 512, "sd35": 77 + 256}  # T5 at max_length 512; CLIP's 77 then T5's 256
LATENT_CHANNELS = 16
MEASURED_SIDE = 512
SIDES, BATCHES, GPUS = (512, 1024), (1, 4), (1, 8)

WEIGHT_BYTES, GRAD_BYTES, ADAM_BYTES = 4, 4, 8  # fp32 weights, fp32 gradients, AdamW's two fp32 moments
# bytes per frozen nn.Linear weight (the rest stays bf16); NF4 with double quantisation: 4.127 bits (QLoRA, §3)
FROZEN_FORMATS = {"bf16": 2.0, "int8": 1.0, "nf4": 4.127 / 8}
DEEPSPEED_BUCKET = 500_000_000  # reduce_bucket_size's default (elements): training/distributed.py does not set it
CARDS = (80, 24)  # GiB
RESERVE_GIB = 2  # CUDA context, cuBLAS / NCCL workspaces, allocator fragmentation


@dataclass(frozen=True)
class Variant:
    name: str
    family: str  # "flux" | "sd35"
    layout: str  # "xlabs" | "instantx"
    tokens: int


VARIANTS = (Variant("Flux.1 XLabs v2", "flux", "xlabs", 16), Variant("Flux.1 InstantX", "flux", "instantx", 128),
            Variant("SD3.5 Large InstantX", "sd35", "instantx", 64))


# --- parameters -------------------------------------------------------------------------------------------------


def transformer_class(family: str):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    return FluxTransformer2DModel if family == "flux" else SD3Transformer2DModel


def released_transformer(family: str) -> nn.Module:
    with torch.device("meta"):
        return transformer_class(family)(**RELEASED_TRANSFORMERS[family])


def training_adapter(variant: Variant, transformer: nn.Module):
    """The trainer's adapter on ``transformer``: it installs its processors there."""
    from ipadapter.registry import family_by_id
    from training.dit_adapter import DiTAdapterModel

    with torch.device(next(transformer.parameters()).device):
        return DiTAdapterModel(transformer, family_by_id(variant.family), variant.layout, variant.tokens,
                               released_encoder_width(variant.family, variant.layout))


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def trainable_parameters(variant: Variant) -> int:
    return training_adapter(variant, released_transformer(variant.family)).num_trainable()


# the frozen encoders' released configs: google/t5-v1_1-xxl's encoder, openai/clip-vit-large-patch14's text and image
# towers, CLIP ViT-bigG/14's text tower (SD3.5), google/siglip-so400m-patch14-384's image tower, the 16-channel VAE
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu")
CLIP_L_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   projection_dim=768)
CLIP_G_TEXT = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                   projection_dim=1280)
CLIP_L_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     patch_size=14, image_size=224, projection_dim=768)
SIGLIP_VISION = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                     patch_size=14, image_size=384)
VAE = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
           block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16, use_quant_conv=False,
           use_post_quant_conv=False)


def online_encoder_parameters(variant: Variant) -> int:
    """The frozen models a run that encodes every step also holds: the text encoders, the VAE and the image encoder."""
    import transformers
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        models = [transformers.T5EncoderModel(transformers.T5Config(**T5_XXL)),
                  transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**CLIP_L_TEXT)),
                  AutoencoderKL(**VAE)]
        if variant.family == "sd35":
            models.append(transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**CLIP_G_TEXT)))
        if variant.layout == "xlabs":
            models.append(transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**CLIP_L_VISION)))
        else:
            models.append(transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**SIGLIP_VISION)))
    return sum(count(model) for model in models)


def linear_weight_parameters(module: nn.Module) -> int:
    """What a weight-only quantiser (bitsandbytes' int8 / NF4 layers) stores quantised: the nn.Linear weights."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


# --- measuring activations --------------------------------------------------------------------------------------


@contextlib.contextmanager
def cuda_autocast_norms():
    """CUDA's autocast runs layer_norm and rms_norm in fp32 (it casts their inputs); CPU's autocast leaves them in bf16,
    which would keep other tensors for backward than a GPU keeps. Patched where nn.LayerNorm and nn.RMSNorm look them up
    (not a TorchFunctionMode: backward, which recomputes checkpointed blocks, runs with such modes off)."""
    def in_fp32(norm):
        def call(*args, **kwargs):
            if torch.is_autocast_enabled("cpu"):
                args, kwargs = tree_map(to_fp32, (args, kwargs))
            return norm(*args, **kwargs)
        return call

    with mock.patch.multiple(F, layer_norm=in_fp32(F.layer_norm), rms_norm=in_fp32(F.rms_norm)):
        yield


def to_fp32(value):
    return value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value


class TensorMemory(TorchDispatchMode):
    """Bytes of the storages the ops make while it is on: alive now, and at their peak. Each storage is labelled with
    the block that made it (``where``) and the token axis of its tensor."""

    def __init__(self, weights: set[int], tokens: dict[str, int]):
        super().__init__()
        self.weights, self.tokens = weights, tokens  # weights: storages that are parameters, not activations
        self.where = ["outside"]
        self.storages: dict[int, tuple] = {}
        self.outputs: dict[str, dict[str, int]] = {}  # {block label: {token axis: bytes}} of its outputs
        self.now = self.peak = 0
        self.quadratic: list[tuple] = []  # shapes with two token axes: an attention matrix kept

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.release_freed()
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.track(tensor)
        return out

    def track(self, tensor: torch.Tensor) -> None:
        from torch.multiprocessing.reductions import StorageWeakRef

        storage = tensor.untyped_storage()
        ref = StorageWeakRef(storage)
        if ref.cdata in self.storages or storage.data_ptr() in self.weights or storage.nbytes() == 0:
            return
        if sum(size in self.tokens.values() for size in tensor.shape) > 1:
            self.quadratic.append(tuple(tensor.shape))
        self.storages[ref.cdata] = (ref, storage.nbytes(), self.where[-1], self.axis(tensor.shape))
        self.now += storage.nbytes()
        self.peak = max(self.peak, self.now)

    def record_outputs(self, label: str, out) -> None:
        if label in self.outputs:  # a checkpointed block runs again in backward
            return
        storages = {t.untyped_storage().data_ptr(): t for t in tree_leaves(out) if isinstance(t, torch.Tensor)}
        self.outputs[label] = {}
        for tensor in storages.values():
            axis = self.axis(tensor.shape)
            self.outputs[label][axis] = self.outputs[label].get(axis, 0) + tensor.untyped_storage().nbytes()

    def axis(self, shape) -> str:
        return next((name for name, length in self.tokens.items() if length in shape), "none")

    def release_freed(self) -> None:
        for key, (ref, nbytes, _, _) in list(self.storages.items()):
            if ref.expired():
                self.now -= nbytes
                del self.storages[key]

    def alive(self) -> dict[str, dict[str, int]]:
        """{block label: {token axis: bytes}} of what is alive now."""
        self.release_freed()
        table: dict[str, dict[str, int]] = {}
        for _, nbytes, label, axis in self.storages.values():
            table.setdefault(label, {}).setdefault(axis, 0)
            table[label][axis] += nbytes
        return table


def token_counts(family: str, side: int) -> dict[str, int]:
    """Image tokens: the latent (side / 8) in 2 x 2 patches; the joint sequence is text then image."""
    image = (side // 16) ** 2
    return {"joint": image + TEXT_TOKENS[family], "image": image, "text": TEXT_TOKENS[family]}


def reduced_transformer(family: str) -> nn.Module:
    """The released width, a few blocks, random bf16 weights, frozen."""
    with torch.device("meta"):
        model = transformer_class(family)(**{**RELEASED_TRANSFORMERS[family], **REDUCED_DEPTH[family]})
    model.to_empty(device="cpu")
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.normal_(0, 0.02)
            else:
                tensor.zero_()
    return model.to(torch.bfloat16).requires_grad_(False)


def install_adapter(variant: Variant, model: nn.Module) -> list[nn.Parameter]:
    """The trainer's processors for the reduced model's attention layers (taken from its adapter on the released
    transformer, where they are named alike), fp32, trainable."""
    released = released_transformer(variant.family)
    training_adapter(variant, released)
    chosen = {name: released.attn_processors[name] for name in model.attn_processors}
    trainable = []
    for processor in chosen.values():
        if isinstance(processor, nn.Module):
            processor.to_empty(device="cpu").float().requires_grad_(True)
            with torch.no_grad():
                for p in processor.parameters():
                    p.normal_(0, 0.02)
            trainable.extend(processor.parameters())
    model.set_attn_processor(chosen)
    for p in trainable:  # gradients leave as they arrive (ZeRO-2 reduces them away): counted with the optimiser
        p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    return trainable


def model_inputs(variant: Variant, side: int, batch: int) -> tuple:
    """What DiTParts.denoise takes. Latents and text states require grad, so that the first block keeps what every later
    block keeps (in the released model the adapter's term reaches both streams from the second block on)."""
    from ipadapter.registry import family_by_id

    config, latent = RELEASED_TRANSFORMERS[variant.family], side // 8
    latents = torch.randn(batch, LATENT_CHANNELS, latent, latent, dtype=torch.bfloat16, requires_grad=True)
    context = torch.randn(batch, TEXT_TOKENS[variant.family], config["joint_attention_dim"], dtype=torch.bfloat16,
                          requires_grad=True)
    pooled = torch.randn(batch, config["pooled_projection_dim"], dtype=torch.bfloat16)
    sigma = torch.full((batch,), 0.5)
    if variant.family == "flux":  # the projection's tokens, as wide as the text tokens, fp32
        tokens = torch.randn(batch, variant.tokens, config["joint_attention_dim"], requires_grad=True)
        # diffusers' XLabs processor takes one entry per adapter
        return latents, sigma, context, pooled, {"ip_hidden_states": [tokens] if variant.layout == "xlabs" else tokens}
    width = config["num_attention_heads"] * config["attention_head_dim"]
    tokens = torch.randn(batch, variant.tokens, width, requires_grad=True)
    time = torch.randn(batch, family_by_id("sd35").resampler_width, requires_grad=True)
    return latents, sigma, context, pooled, {"ip_hidden_states": tokens, "temb": time}


def label_blocks(model: nn.Module, family: str, memory: TensorMemory) -> list:
    def enter(module, args, label: str) -> None:
        memory.where.append(label)

    def leave(module, args, out, label: str) -> None:  # a forward hook's return value would replace the block's output
        memory.where.pop()
        memory.record_outputs(label, out)

    modules = dict(model.named_modules())
    handles = []
    for path, label, _ in BLOCKS[family]:
        handles.append(modules[path].register_forward_pre_hook(functools.partial(enter, label=label)))
        handles.append(modules[path].register_forward_hook(functools.partial(leave, label=label)))
    return handles


def measure_step(variant: Variant, model: nn.Module, checkpointing: bool, side: int = MEASURED_SIDE) -> dict:
    """One forward and backward at ``side``, batch 1: what is alive at the end of the forward pass ("held": {label:
    {axis: bytes}}), the backward's peak above it ("backward") and each block's outputs ("outputs")."""
    from ipadapter.registry import family_by_id
    from training.dit_models import DiTParts

    if checkpointing:
        model.enable_gradient_checkpointing()
    else:
        model.disable_gradient_checkpointing()
    parts = DiTParts(model, None, {}, {}, {}, family_by_id(variant.family), torch.bfloat16)
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    memory = TensorMemory(weights, token_counts(variant.family, side))
    handles = label_blocks(model, variant.family, memory)
    try:
        with cuda_autocast_norms(), memory:
            inputs = model_inputs(variant, side, 1)
            with torch.autocast("cpu", torch.bfloat16):
                prediction = parts.denoise(*inputs)
            loss = F.mse_loss(prediction.float(), torch.zeros(prediction.shape))
            held = memory.alive()
            memory.peak = memory.now
            loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    if memory.quadratic:
        raise RuntimeError(f"tokens x tokens tensors kept {memory.quadratic[:3]}: the attention is not flash-style")
    return {"side": side, "held": held, "outputs": memory.outputs,
            "backward": memory.peak - sum(b for axes in held.values() for b in axes.values())}


def measure_activations(variants=VARIANTS) -> dict[str, dict]:
    """{variant name: {"plain": step, "checkpointed": step, "seconds": s}}; one reduced model per family."""
    results, models = {}, {}
    for variant in variants:
        start = time.perf_counter()
        model = models.setdefault(variant.family, reduced_transformer(variant.family))
        install_adapter(variant, model)
        results[variant.name] = {"plain": measure_step(variant, model, False),
                                 "checkpointed": measure_step(variant, model, True)}
        results[variant.name]["seconds"] = round(time.perf_counter() - start, 1)
    return results


# --- the table --------------------------------------------------------------------------------------------------


def scaled(nbytes: float, axis: str, family: str, measured_side: int, side: int, batch: int) -> float:
    """Bytes measured at ``measured_side``, batch 1, at ``side`` and ``batch``: linear in the tensor's tokens and in the
    batch; tensors without a token axis (the adapter's weights cast to bf16 by autocast) stay as they are."""
    if axis == "none":
        return nbytes
    return nbytes * batch * token_counts(family, side)[axis] / token_counts(family, measured_side)[axis]


def held_per_block(step: dict, family: str, checkpointing: bool) -> list[tuple[int, dict[str, int]]]:
    """[(how many in the released model, {axis: bytes} each)]. Without checkpointing: what each block made and backward
    holds. With it: each block's outputs, which the next block's checkpoint holds as its inputs; the last block's go to
    the final layer (measured with "outside", as the reduced model's last block's are)."""
    rows = [(1, step["held"].get("outside", {}))]
    for index, (_, label, n) in enumerate(BLOCKS[family]):
        if not checkpointing:
            rows.append((n, step["held"].get(label, {})))
        else:
            rows.append((n - 1 if index == len(BLOCKS[family]) - 1 else n, step["outputs"][label]))
    return rows


def activation_bytes(step: dict, family: str, side: int, batch: int, checkpointing: bool) -> float:
    """Held for backward at the released depth, plus the backward's working set above it (scaled as image tokens, the
    fastest-growing axis: an upper bound)."""
    held = sum(n * scaled(nbytes, axis, family, step["side"], side, batch)
               for n, axes in held_per_block(step, family, checkpointing) for axis, nbytes in axes.items())
    return held + scaled(step["backward"], "image", family, step["side"], side, batch)


def adapter_bytes(trainable: int, gpus: int) -> float:
    """fp32 weights on every GPU; fp32 gradients and AdamW's moments divided over the GPUs (ZeRO-2)."""
    return trainable * (WEIGHT_BYTES + (GRAD_BYTES + ADAM_BYTES) / gpus)


def deepspeed_bytes(trainable: int, gpus: int) -> float:
    """What DeepSpeed adds as training/distributed.py configures it (one GPU: no DeepSpeed, torch's AdamW): the fp32
    copy of this GPU's partition its optimiser steps on, and two fp32 reduce buckets (overlap_comm on CUDA)."""
    return 0.0 if gpus == 1 else trainable * WEIGHT_BYTES / gpus + 2 * DEEPSPEED_BUCKET * 4


def frozen_bytes(parameters: int, linear_weights: int, frozen_format: str) -> float:
    return linear_weights * FROZEN_FORMATS[frozen_format] + (parameters - linear_weights) * 2


def fits(total: float, card_gib: int) -> str:
    gib = total / GIB
    return "yes" if gib + RESERVE_GIB <= card_gib else "tight" if gib <= card_gib else "no"


def row(variant: Variant, counts: dict, steps: dict, side: int, batch: int, gpus: int, checkpointing: bool,
        frozen_format: str = "bf16") -> dict:
    frozen = frozen_bytes(counts["frozen"], counts["linear"], frozen_format)
    adapter = adapter_bytes(counts["trainable"], gpus)
    deepspeed = deepspeed_bytes(counts["trainable"], gpus)
    step = steps["checkpointed" if checkpointing else "plain"]
    activations = activation_bytes(step, variant.family, side, batch, checkpointing)
    total = frozen + adapter + deepspeed + activations
    return {"variant": variant.name, "side": side, "batch": batch, "gpus": gpus, "checkpointing": checkpointing,
            "frozen_format": frozen_format,
            "frozen": frozen, "adapter": adapter, "deepspeed": deepspeed, "activations": activations, "total": total,
            **{f"fits_{card}": fits(total, card) for card in CARDS}}


def parameter_counts(variant: Variant) -> dict[str, int]:
    released = released_transformer(variant.family)
    return {"frozen": count(released), "linear": linear_weight_parameters(released),
            "trainable": trainable_parameters(variant), "online_encoders": online_encoder_parameters(variant)}


def table(counts: dict, measured: dict, variants=VARIANTS) -> list[dict]:
    rows = []
    for variant in variants:
        for side in SIDES:
            for batch in BATCHES:
                for gpus in GPUS:
                    for checkpointing in (False, True):
                        rows.append(row(variant, counts[variant.name], measured[variant.name], side, batch, gpus,
                                        checkpointing))
    return rows


def small_card_rows(counts: dict, measured: dict, variants=VARIANTS) -> list[dict]:
    """Quantised frozen weights, checkpointing on, batch 1: the configurations that could fit 24 GiB."""
    return [row(variant, counts[variant.name], measured[variant.name], side, 1, gpus, True, frozen_format)
            for variant in variants for frozen_format in ("int8", "nf4") for gpus in GPUS for side in SIDES]


# --- output -----------------------------------------------------------------------------------------------------


def gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.1f}"


def markdown(rows: list[dict], frozen_column: bool = False) -> str:
    head = ["variant", "px", "batch", "GPUs", "checkpointing", *(["frozen as"] if frozen_column else []),
            "frozen weights", "adapter + AdamW", "DeepSpeed buffers", "activations", "total per GPU", "fits 80 GB",
            "fits 24 GB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["variant"], r["side"], r["batch"], r["gpus"], "on" if r["checkpointing"] else "off",
                 *([r["frozen_format"]] if frozen_column else []), gib(r["frozen"]), gib(r["adapter"]),
                 gib(r["deepspeed"]) if r["gpus"] > 1 else "–", gib(r["activations"]), gib(r["total"]),
                 r["fits_80"], r["fits_24"]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def measured_markdown(measured: dict, variants=VARIANTS) -> str:
    """Per block of the reduced model, as held_per_block counts them, and the backward's working set."""
    lines = ["| variant | part | in the released model | no checkpointing (MiB each) | checkpointing (MiB each) |",
             "|---|---|---|---|---|"]
    for variant in variants:
        steps, family = measured[variant.name], variant.family
        labels = ["outside", *(label for _, label, _ in BLOCKS[family])]
        plain, kept = (held_per_block(steps[mode], family, mode == "checkpointed")
                       for mode in ("plain", "checkpointed"))
        for label, (n, axes), (kept_n, kept_axes) in zip(labels, plain, kept):
            lines.append(f"| {variant.name} | {label} | {n} | {sum(axes.values()) / 2**20:.1f} | "
                         f"{sum(kept_axes.values()) / 2**20:.1f} (x {kept_n}) |")
        lines.append(f"| {variant.name} | backward working set | 1 | {steps['plain']['backward'] / 2**20:.1f} | "
                     f"{steps['checkpointed']['backward'] / 2**20:.1f} |")
    return "\n".join(lines)


def check_scaling(measured: dict, side: int) -> str:
    """XLabs measured again at ``side``: the released depth's activations from it against those scaled from 512 px."""
    variant, lines = VARIANTS[0], []
    model = reduced_transformer(variant.family)
    install_adapter(variant, model)
    for checkpointing in (False, True):
        mode = "checkpointed" if checkpointing else "plain"
        step = measure_step(variant, model, checkpointing, side)
        direct = activation_bytes(step, variant.family, side, 1, checkpointing)
        scaled_up = activation_bytes(measured[variant.name][mode], variant.family, side, 1, checkpointing)
        lines.append(f"{variant.name} at {side} px, batch 1, checkpointing {'on' if checkpointing else 'off'}: "
                     f"measured there {direct / GIB:.2f} GiB, scaled from {MEASURED_SIDE} px {scaled_up / GIB:.2f} GiB")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="also write the counts, the measurements and the rows here")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--check-side", type=int, help="also measure XLabs at this side (px) to check the scaling")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    counts = {variant.name: parameter_counts(variant) for variant in VARIANTS}
    measured = measure_activations()
    rows, small = table(counts, measured), small_card_rows(counts, measured)
    print("Parameters:", json.dumps(counts))
    for name, found in counts.items():
        encoders = found["online_encoders"] * 2 / GIB
        print(f"{name}: a run that encodes every step also holds {encoders:.1f} GiB of encoders (bf16)")
    print("\nMeasured at 512 px, batch 1 (CPU, bf16, full width):\n" + measured_markdown(measured))
    print("\n" + markdown(rows))
    print("\nQuantised frozen weights:\n" + markdown(small, frozen_column=True))
    result = {"counts": counts, "measured": measured, "rows": rows, "quantised": small}
    if args.check_side:
        result["check"] = check_scaling(measured, args.check_side)
        print("\n" + result["check"])
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
