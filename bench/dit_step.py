"""Cost of a Flux.1 / SD3.5 Large sampling step with the adapter vs without, in a real ComfyUI: the DiT half of
bench/inference_step.py (its ``--family flux|sd35``) and of bench/gpu.py's inference section.

The model is ComfyUI's own (``comfy.model_base.Flux`` / ``SD3``), configured by ComfyUI's stock detection from
the released checkpoints' key shapes (``devtools.dit_models.FLUX_DEV_PROBE`` / ``SD35_LARGE_PROBE``), built on
the device and filled with random weights there; ``Shape`` may narrow it (the dry run) or drop blocks (the CPU).
One step is ``BaseModel.apply_model`` with the transformer options a sampler passes (the patches, ``cond_or_uncond``,
``sigmas``), a fresh σ per call from a sampling schedule shared by every variant: SD3.5 InstantX's K'/V' depend on
the step (``TimedImagePromptTerm.prepare_step``), so each call pays for them as in sampling.

Variants (random adapters in the released layouts, λ = 1, applied as the Apply node applies them):
- Flux: no adapter; XLabs v2 (CLIP ViT-L/14 image_embeds -> 16 tokens, the 19 double blocks, its term joining the
  image stream after the block); InstantX (SigLIP pooled -> MLP -> 128 tokens, all 57 blocks, inside the attention).
  Batch 1: Flux dev is sampled at cfg 1 (guidance 3.5 embedded), so ComfyUI runs the conditional row only.
- SD3.5 Large: no adapter; InstantX (SigLIP penultimate [729, 1152] -> timestep Resampler -> 64 tokens, all 38
  joint blocks). CFG batch 2 (cond + uncond).

With fewer blocks than the released model the adapter carries the same layers it would on those blocks (its
tensors for the blocks that are not there are not used, nor are their K'/V' made), so the per-block costs keep
their proportion; fixed costs (embedders, the final layer, SD3.5's per-step Resampler) weigh more than at full depth.
"""
from __future__ import annotations

import dataclasses
import itertools
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # ipadapter and devtools

from timing import free_memory, interleaved, median  # noqa: E402

FLUX, SD35 = "flux", "sd35"
DIT_VARIANTS = {FLUX: ("no_adapter", "xlabs_v2", "instantx"), SD35: ("no_adapter", "instantx")}
LABELS = {
    FLUX: {"no_adapter": "no adapter", "xlabs_v2": "XLabs v2 (16 tokens, 19 double blocks), λ = 1",
           "instantx": "InstantX (128 tokens, all 57 blocks), λ = 1"},
    SD35: {"no_adapter": "no adapter", "instantx": "InstantX (64 tokens from the timestep Resampler, all 38 blocks), λ = 1"},
}
FAMILY_LABELS = {FLUX: "Flux.1", SD35: "SD3.5 Large"}
LATENT_CHANNELS = 16
FLUX_GUIDANCE = 3.5


@dataclass(frozen=True)
class Shape:
    """A DiT and its adapters' widths; the released models' by default (``FLUX_DEV``, ``SD35_LARGE``)."""

    family: str
    width: int  # hidden width (Flux 3072, SD3.5 Large 2432)
    heads: int
    double: int  # Flux: double blocks; SD3.5: joint blocks
    single: int  # Flux: single blocks; SD3.5: 0
    context: int = 4096  # T5-XXL tokens' width
    pooled: int = 768  # Flux: CLIP-L pooled; SD3.5: CLIP-L + bigG pooled, 2048
    axes: tuple = (16, 56, 56)  # Flux RoPE axes (they sum to the head width)
    pos_embed: int = 192  # SD3.5: the position embedding's side
    text_tokens: int = 256  # Flux: T5 padded to 256 (ComfyUI's Flux tokenizer); SD3.5: 77 CLIP + 77 T5
    batch: int = 1
    clip_l: int = 768  # XLabs' image encoder: CLIP ViT-L/14 image_embeds
    siglip: int = 1152  # InstantX's: SigLIP so400m pooled output / hidden states
    siglip_tokens: int = 729  # SigLIP so400m patch14-384: 27 x 27 hidden states
    # InstantX Flux's MLPProjModel hidden width: 2304 (2 x SigLIP) released, narrowed here; the projection runs once
    # per Apply, outside the step, and its output keeps the released shape (128 tokens x 4096)
    mlp_hidden: int = 256
    resampler: int = 1280  # InstantX SD3.5's Resampler width (heads of 64)
    timestep_width: int = 320

    @property
    def released(self) -> bool:
        full = FLUX_DEV if self.family == FLUX else SD35_LARGE
        return dataclasses.replace(self, double=full.double, single=full.single) == full

    @property
    def full_depth(self) -> bool:
        full = FLUX_DEV if self.family == FLUX else SD35_LARGE
        return (self.double, self.single) == (full.double, full.single)

    def describe(self) -> str:
        blocks = f"{self.double} double + {self.single} single blocks" if self.family == FLUX else f"{self.double} joint blocks"
        full = FLUX_DEV if self.family == FLUX else SD35_LARGE
        if self.full_depth:
            blocks += " (full depth)"
        elif self.width == full.width:
            total = f"{full.double} + {full.single}" if self.family == FLUX else f"{full.double}"
            blocks += f" of {total}"
        return f"width {self.width}{'' if self.width == full.width else ' (narrowed)'}, {self.heads} heads, {blocks}"


FLUX_DEV = Shape(FLUX, 3072, 24, 19, 38)
SD35_LARGE = Shape(SD35, 2432, 38, 38, 0, pooled=2048, text_tokens=154, batch=2)
# the dry run's: the released block counts at toy widths (every block patched, seconds on a CPU)
FLUX_TINY = dataclasses.replace(FLUX_DEV, width=64, heads=4, context=32, pooled=24, axes=(4, 6, 6), text_tokens=7,
                                clip_l=24, siglip=24, siglip_tokens=10, mlp_hidden=48)
SD35_TINY = dataclasses.replace(SD35_LARGE, width=128, heads=2, context=48, pooled=32, pos_embed=16, text_tokens=9,
                                siglip=24, siglip_tokens=10, resampler=128)
RELEASED = {FLUX: FLUX_DEV, SD35: SD35_LARGE}
TINY = {FLUX: FLUX_TINY, SD35: SD35_TINY}


# --- the model -------------------------------------------------------------------------


def _model_config(comfy, shape: Shape):
    """ComfyUI's model config for ``shape``, from its stock detection on a meta state dict of the keys it reads."""
    import torch

    from devtools.dit_models import FLUX_DEV_PROBE, SD35_LARGE_PROBE

    if shape.family == FLUX:
        probe_shapes, blocks = FLUX_DEV_PROBE, {"double_blocks": shape.double, "single_blocks": shape.single}
    else:
        w = shape.width
        probe_shapes = {**SD35_LARGE_PROBE, "x_embedder.proj.weight": (w, LATENT_CHANNELS, 2, 2), "final_layer.linear.weight": (64, w),
                        "y_embedder.mlp.0.weight": (w, shape.pooled), "context_embedder.weight": (w, shape.context),
                        "pos_embed": (1, shape.pos_embed**2, w), "joint_blocks.{}.context_block.attn.qkv.weight": (3 * w, w)}
        blocks = {"joint_blocks": shape.double}
    probe = {}
    for key, size in probe_shapes.items():
        for index in range(blocks.get(key.split(".")[0], 1)):
            probe[key.format(index)] = torch.empty(size, device="meta")
    config = comfy.model_detection.model_config_from_unet(probe, "")
    if shape.family == FLUX:
        # Flux's detection takes the widths as Flux dev's: set a narrowed shape's
        config.unet_config.update(hidden_size=shape.width, num_heads=shape.heads, context_in_dim=shape.context,
                                  vec_in_dim=shape.pooled, axes_dim=list(shape.axes))
    else:
        config.unet_config["num_blocks"] = shape.double  # its detection takes one block per head of 64
    return config


def _fill(module, device, seed: int) -> None:
    """Random weights in place: q/k norm scales 1, matrices U(±1/√fan_in), the rest U(±0.02) (``dit_models._fast_fill``)."""
    import torch

    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, tensor in itertools.chain(module.named_parameters(), module.named_buffers()):
            if not tensor.is_floating_point():
                continue
            if tensor.dim() == 1 and (name.endswith(".scale") or ".ln_" in name):
                tensor.fill_(1.0)
            else:
                bound = tensor[0].numel() ** -0.5 if tensor.dim() >= 2 and tensor.shape[0] > 1 else 0.02
                tensor.uniform_(-bound, bound, generator=generator)


def dit_model(shape: Shape, device, dtype):
    """ComfyUI's model (``comfy.model_base.Flux`` / ``SD3``) of ``shape`` on ``device``, its weights unset, computing in
    ``dtype`` (no manual cast: ComfyUI in CPU mode would otherwise cast a bf16 model to fp32 layer by layer)."""
    from inference_step import import_comfy_for

    comfy = import_comfy_for(device)
    config = _model_config(comfy, shape)
    config.set_inference_dtype(dtype, None)
    return config.get_model({}, "", device=device)


def build_dit(shape: Shape, device, dtype, seed: int = 0):
    """A ComfyUI ModelPatcher around a random DiT of ``shape``, built and filled on ``device`` in ``dtype``."""
    from devtools.comfy_import import import_comfy

    model = dit_model(shape, device, dtype)
    _fill(model.diffusion_model, device, seed)
    comfy = import_comfy()
    model.to(device).eval()  # model_sampling's buffers too
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


# --- the adapters ----------------------------------------------------------------------


def _random(generator, *size, bound=None, offset=0.0):
    import torch

    bound = size[-1] ** -0.5 if bound is None else bound
    return torch.empty(size).uniform_(-bound, bound, generator=generator) + offset


def _layers(generator, keys, tensors: dict) -> dict:
    """Every layer ``keys`` with the same random ``tensors`` (name -> size): one layer's memory however many layers."""
    one = {name: _random(generator, *size, bound=0.02 if len(size) == 1 else None,
                         offset=1.0 if name.startswith("norm_") and name.endswith("weight") and len(size) == 1 else 0.0)
           for name, size in tensors.items()}
    return {f"{key}.{name}": tensor for key in keys for name, tensor in one.items()}


def adapter_state(shape: Shape, variant: str, seed: int) -> tuple[dict, dict]:
    """(image_proj, ip_adapter) of a random adapter in its released layout, at ``shape``'s widths and every layer."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    context, width = shape.context, shape.width
    if variant == "xlabs_v2":
        tokens = 16
        image_proj = {"proj.weight": _random(generator, tokens * context, shape.clip_l), "proj.bias": _random(generator, tokens * context, bound=0.02),
                      "norm.weight": _random(generator, context, bound=0.02, offset=1.0), "norm.bias": _random(generator, context, bound=0.02)}
        layers = {"to_k_ip.weight": (width, context), "to_k_ip.bias": (width,), "to_v_ip.weight": (width, context),
                  "to_v_ip.bias": (width,)}
        return image_proj, _layers(generator, range(shape_of_released(shape).double), layers)
    if shape.family == FLUX:  # InstantX's MLPProjModel: Linear, GELU, Linear, reshape to 128 tokens, LayerNorm
        tokens, hidden = 128, shape.mlp_hidden
        image_proj = {"proj.0.weight": _random(generator, hidden, shape.siglip), "proj.0.bias": _random(generator, hidden, bound=0.02),
                      "proj.2.weight": _random(generator, tokens * context, hidden), "proj.2.bias": _random(generator, tokens * context, bound=0.02),
                      "norm.weight": _random(generator, context, bound=0.02, offset=1.0), "norm.bias": _random(generator, context, bound=0.02)}
        released = shape_of_released(shape)
        layers = {"to_k_ip.weight": (width, context), "to_v_ip.weight": (width, context)}
        return image_proj, _layers(generator, range(released.double + released.single), layers)
    # SD3.5 InstantX: a Resampler (depth 4, heads of 64, 64 queries) whose latents and LayerNorms take the timestep
    dim, queries = shape.resampler, 64
    image_proj = {"latents": _random(generator, 1, queries, dim, bound=dim**-0.5), "proj_in.weight": _random(generator, dim, shape.siglip),
                  "proj_in.bias": _random(generator, dim, bound=0.02), "proj_out.weight": _random(generator, width, dim),
                  "proj_out.bias": _random(generator, width, bound=0.02), "norm_out.weight": _random(generator, width, bound=0.02, offset=1.0),
                  "norm_out.bias": _random(generator, width, bound=0.02),
                  "time_embedding.linear_1.weight": _random(generator, dim, shape.timestep_width),
                  "time_embedding.linear_1.bias": _random(generator, dim, bound=0.02),
                  "time_embedding.linear_2.weight": _random(generator, dim, dim), "time_embedding.linear_2.bias": _random(generator, dim, bound=0.02)}
    for layer in range(4):
        p = f"layers.{layer}"
        image_proj.update({
            f"{p}.0.norm1.weight": _random(generator, dim, bound=0.02, offset=1.0), f"{p}.0.norm1.bias": _random(generator, dim, bound=0.02),
            f"{p}.0.norm2.weight": _random(generator, dim, bound=0.02, offset=1.0), f"{p}.0.norm2.bias": _random(generator, dim, bound=0.02),
            f"{p}.0.to_q.weight": _random(generator, dim, dim), f"{p}.0.to_kv.weight": _random(generator, 2 * dim, dim),
            f"{p}.0.to_out.weight": _random(generator, dim, dim),
            f"{p}.1.0.weight": _random(generator, dim, bound=0.02, offset=1.0), f"{p}.1.0.bias": _random(generator, dim, bound=0.02),
            f"{p}.1.1.weight": _random(generator, 4 * dim, dim), f"{p}.1.3.weight": _random(generator, dim, 4 * dim),
            f"{p}.2.1.weight": _random(generator, 4 * dim, dim), f"{p}.2.1.bias": _random(generator, 4 * dim, bound=0.02),
        })
    head = width // shape.heads
    layers = {"norm_ip.linear.weight": (2 * width, dim), "norm_ip.linear.bias": (2 * width,), "to_k_ip.weight": (width, width),
              "to_v_ip.weight": (width, width), "norm_q.weight": (head,), "norm_k.weight": (head,), "norm_ip_k.weight": (head,)}
    return image_proj, _layers(generator, range(shape_of_released(shape).double), layers)


def shape_of_released(shape: Shape) -> Shape:
    """The released model's block counts (an adapter file carries every block's layers)."""
    return RELEASED[shape.family]


def present_keys(checkpoint, diffusion_model) -> list[int]:
    """The adapter's layer keys whose blocks the model has."""
    from devtools.comfy_inprocess import pack_module

    blocks = set(pack_module("patcher").dit_blocks(diffusion_model))
    family = checkpoint.spec.architecture
    return [key for key in checkpoint.spec.layer_keys if family.layer_by_key[key].comfy_block in blocks]


def random_checkpoint(shape: Shape, variant: str, seed: int):
    """A random ``variant`` adapter for ``shape``'s widths, every layer of the released model, as the loader reads it."""
    from devtools.comfy_inprocess import pack_module

    adapter_file = pack_module("ipadapter.adapter_file")
    image_proj, ip_adapter = adapter_state(shape, variant, seed)
    return adapter_file.IPAdapterCheckpoint.from_state_dicts(
        image_proj, ip_adapter, f"random {variant}", adapter_file.FULL_SIZE if shape.released else None)


def timed_term(checkpoint, projection, shape: Shape, weights, timestep_of, window: dict, seed: int):
    """SD3.5 InstantX's term (its K'/V' made per step from the Resampler's output), on random SigLIP hidden states."""
    import torch

    from devtools.comfy_inprocess import pack_module

    generator = torch.Generator().manual_seed(seed)
    cond = torch.randn(1, shape.siglip_tokens, shape.siglip, generator=generator)
    uncond = torch.randn(1, shape.siglip_tokens, shape.siglip, generator=generator)  # a zero image's states
    return pack_module("comfyui_glue.dit_patch").TimedImagePromptTerm(
        checkpoint, projection, cond, uncond, False, weights, "V only", timestep_of, **window)


def apply_adapter(patcher, shape: Shape, variant: str, seed: int):
    """``patcher`` with a random ``variant`` adapter applied as ``nodes.patch_model`` applies it (λ = 1, the whole
    sampling window, "V only" scaling), on the blocks the model has."""
    import torch

    from devtools.comfy_inprocess import pack_module

    checkpoint = random_checkpoint(shape, variant, seed)
    ip_adapter = checkpoint.ip_adapter
    diffusion_model = patcher.model.diffusion_model
    keys = present_keys(checkpoint, diffusion_model)
    if keys != list(checkpoint.spec.layer_keys):  # fewer blocks: the layers on them only
        checkpoint = dataclasses.replace(checkpoint, spec=dataclasses.replace(checkpoint.spec, layer_keys=tuple(keys)),
                                         ip_adapter={k: v for k, v in ip_adapter.items() if int(k.split(".")[0]) in keys})
    weights = pack_module("ipadapter.weighting").layer_weights(checkpoint.spec.architecture, 1.0)
    weights = {key: weights[key] for key in keys}
    projection = checkpoint.build_projection()
    sampling = patcher.model.model_sampling
    window = dict(sigma_start=sampling.percent_to_sigma(0.0), sigma_end=sampling.percent_to_sigma(1.0))
    patcher_module = pack_module("patcher")
    heads = patcher_module.dit_width_and_heads(diffusion_model)[1]
    if checkpoint.spec.projection == "time-resampler":
        term = timed_term(checkpoint, projection, shape, weights, sampling.timestep, window, seed + 1000)
    else:
        generator = torch.Generator().manual_seed(seed + 1000)
        embeds = torch.randn(1, checkpoint.spec.encoder_width, generator=generator)
        with torch.no_grad():
            cond, uncond = projection(embeds), projection(torch.zeros_like(embeds))
        term = patcher_module.ImagePromptTerm.build(checkpoint, cond, uncond, weights, window["sigma_start"], window["sigma_end"],
                                                    None, "V only", None, heads)
    return patcher_module.apply_image_prompt(patcher, term)


def kv_per_step_seconds(shape: Shape, reps: int, seed: int = 5) -> float:
    """Median time SD3.5 InstantX's term takes to make one step's K'/V' for all 38 layers (its Resampler on the
    conditional and unconditional states, then each layer's AdaLN, to_k_ip, to_v_ip and norms), where the product
    makes them: on the CPU, in fp32, once per step. A part of the adapter's step time, timed alone."""
    import time

    import torch

    from devtools.comfy_inprocess import pack_module

    checkpoint = random_checkpoint(shape, "instantx", seed)
    weights = pack_module("ipadapter.weighting").layer_weights(checkpoint.spec.architecture, 1.0)
    term = timed_term(checkpoint, checkpoint.build_projection(), shape, weights, lambda sigma: sigma * 1000,
                      {"sigma_start": 1.0, "sigma_end": 0.0}, seed + 1000)
    times = []
    for index, sigma in enumerate(step_sigmas(reps + 1)):
        started = time.perf_counter()
        term.prepare_step(torch.tensor([sigma]), shape.heads)
        if index:  # the first call is a warm-up
            times.append(time.perf_counter() - started)
    return median(times)


# --- the step --------------------------------------------------------------------------


@dataclass
class DiTInputs:
    latent: object
    context: object
    pooled: object
    guidance: object | None


def dit_inputs(shape: Shape, latent: int, device, seed: int = 0) -> DiTInputs:
    import torch

    generator = torch.Generator().manual_seed(seed)
    batch = shape.batch
    latent_tensor = torch.randn(batch, LATENT_CHANNELS, latent, latent, generator=generator)
    context = torch.randn(batch, shape.text_tokens, shape.context, generator=generator)
    pooled = torch.randn(batch, shape.pooled, generator=generator)
    guidance = torch.full((batch,), FLUX_GUIDANCE) if shape.family == FLUX else None
    return DiTInputs(*(None if t is None else t.to(device) for t in (latent_tensor, context, pooled, guidance)))


def step_sigmas(count: int) -> list[float]:
    """σ of ``count`` sampling steps from near 1 down (flow matching), inside every adapter's window."""
    return [0.95 - 0.75 * i / max(1, count - 1) for i in range(count)]


def predict(patcher, inputs: DiTInputs, sigma: float, cond_or_uncond):
    """One model call as ComfyUI's sampler makes it: ``apply_model`` with the patcher's transformer options."""
    import torch

    sigmas = torch.full((inputs.latent.shape[0],), sigma, device=inputs.latent.device)  # a fresh tensor per step
    options = {**patcher.model_options["transformer_options"], "cond_or_uncond": list(cond_or_uncond), "sigmas": sigmas}
    extra = {"y": inputs.pooled}
    if inputs.guidance is not None:
        extra["guidance"] = inputs.guidance
    with torch.no_grad():
        return patcher.model.apply_model(inputs.latent, sigmas, c_crossattn=inputs.context, transformer_options=options, **extra)


def measure(shape: Shape, latent: int, reps: int, device, dtype, warmup: int = 1) -> dict:
    """Median step time of each variant and its ratio to no adapter (interleaved rounds, as the UNet rows)."""
    model = build_dit(shape, device, dtype)
    variants = {"no_adapter": model}
    for index, variant in enumerate(DIT_VARIANTS[shape.family][1:]):
        variants[variant] = apply_adapter(model, shape, variant, seed=index + 1)
    inputs = dit_inputs(shape, latent, device)
    cond_or_uncond = (0, 1) if shape.batch == 2 else (0,) * shape.batch
    schedule = step_sigmas(warmup + reps)

    first = {}  # each variant's first output (the same σ for all): the adapter must change it

    def step(name, patched):
        sigmas = iter(schedule)

        def call():
            out = predict(patched, inputs, next(sigmas), cond_or_uncond)
            first.setdefault(name, out)
        return call

    times = interleaved({name: step(name, patched) for name, patched in variants.items()}, reps, device, warmup)
    baseline = median(times["no_adapter"])
    plain = first["no_adapter"].float()
    change = {name: ((out.float() - plain).abs().max() / plain.abs().max()).item() for name, out in first.items()}
    image_tokens = (latent // 2) ** 2
    result = {
        "width": shape.width, "heads": shape.heads, "double_blocks": shape.double, "single_blocks": shape.single,
        "full_depth": shape.full_depth, "resolution": 8 * latent, "latent": latent, "image_tokens": image_tokens,
        "text_tokens": shape.text_tokens, "batch": shape.batch, "reps": reps, "dtype": str(dtype).replace("torch.", ""),
        "parameters": sum(p.numel() for p in model.model.diffusion_model.parameters()),
        "variants": {name: {"median_s": median(values), "ratio": median(values) / baseline, "output_change": change[name],
                            "reason": None} for name, values in times.items()},
    }
    if shape.family == SD35:
        result["kv_per_step_s"] = kv_per_step_seconds(shape, reps)
    del model, variants, first, plain
    free_memory(device)
    return result


def markdown_table(family: str, result: dict) -> list[str]:
    batch = "batch 1 (cond only: cfg 1, guidance 3.5)" if family == FLUX else "batch 2 (cond+uncond)"
    lines = [f"{FAMILY_LABELS[family]}, {result['resolution']}x{result['resolution']} ({result['latent']}x{result['latent']} latent: "
             f"{result['image_tokens']} image + {result['text_tokens']} text tokens), {shape_text(result, family)}, "
             f"{result['parameters'] / 1e9:.2f} B parameters, {result['dtype']}, {batch}, {result['reps']} interleaved reps",
             "",
             "| variant | median step (s) | ratio to no adapter | output change (max, relative) |",
             "|---|---|---|---|"]
    for name, figures in result["variants"].items():
        label = LABELS[family].get(name, name)
        if figures["median_s"] is None:
            lines.append(f"| {label} | – | – ({figures['reason']}) | – |")
        else:
            lines.append(f"| {label} | {figures['median_s']:.4f} | {figures['ratio']:.3f}× | {figures['output_change']:.3g} |")
    if result.get("kv_per_step_s") is not None:
        lines += ["", f"InstantX's K'/V' for one step, all 38 layers (Resampler, then each layer's AdaLN and projections; "
                      f"made on the CPU in fp32 once per step, part of its step above), timed alone: {result['kv_per_step_s']:.4f} s"]
    return lines


def shape_text(result: dict, family: str) -> str:
    """``Shape.describe`` from a result's figures (the JSON of a run)."""
    base = RELEASED[family]
    shape = dataclasses.replace(base, width=result["width"], heads=result["heads"], double=result["double_blocks"],
                                single=result["single_blocks"])
    return shape.describe()
