"""ComfyUI glue: attn2 replace patches that add image-prompt terms to a UNet's cross-attention layers
(a DiT's blocks: ``comfyui_glue/dit_patch.py``).

The math lives in ``ipadapter/``; this module only speaks ComfyUI's patch
protocol (``patches_replace["attn2"]`` callables get projected q, k, v and the
transformer options) and its model-patch ``to()`` convention.
"""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field

import torch

from .ipadapter.attention import image_attention
from .ipadapter.adapter_file import AdapterFormatError, IPAdapterCheckpoint
from .ipadapter.image_prompt import layer_keys_values, mask_to_tokens
from .ipadapter.weighting import LayerWeight, scale_keys_values
from .ipadapter.registry import Family, family_names, family_of_comfy_layout

COND, UNCOND = 0, 1  # the values of ComfyUI's cond_or_uncond list
RECORD_KEY = "ipadapter_kit_attention_record"  # transformer option: an AttentionRecorder for one sampling step


class AttentionRecorder:
    """Collects how strongly each layer's image terms act at each query position (the first latent's conditional half).

    Copies of the model options share it, so what the sampler's copies record reaches the node that asked.
    """

    def __init__(self):
        self.strength: dict[int, torch.Tensor] = {}  # layer key -> [tokens]
        self.latent_shape: tuple[int, int] | None = None

    def add(self, key: int, term_output: torch.Tensor, cond_or_uncond, extra_options) -> None:
        if COND not in cond_or_uncond:
            return
        row = cond_or_uncond.index(COND) * (term_output.shape[0] // len(cond_or_uncond))
        strength = term_output[row].float().norm(dim=-1).cpu()
        self.strength[key] = self.strength.get(key, 0) + strength
        shape = extra_options.get("original_shape") or extra_options.get("activations_shape")
        self.latent_shape = (shape[-2], shape[-1])

    def __deepcopy__(self, memo):
        return self


def comfy_attention():
    """ComfyUI's optimised attention as ``fn(q, k, v, heads, extra_options)``.

    Newer ComfyUI versions take extra keyword arguments (``attn_precision``,
    ``transformer_options``); pass them only where the signature has them.
    """
    from comfy.ldm.modules.attention import optimized_attention

    parameters = inspect.signature(optimized_attention).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters.values())

    def attention(q, k, v, heads, extra_options, attn_precision=None):
        kwargs = {}
        if attn_precision is not None and ("attn_precision" in parameters or takes_any):
            kwargs["attn_precision"] = attn_precision
        if "transformer_options" in parameters:
            kwargs["transformer_options"] = extra_options
        return optimized_attention(q, k, v, heads, **kwargs)

    return attention


@dataclass(eq=False)
class ImagePromptTerm:
    """One applied image prompt: its image keys/values and weight per layer, window and mask.

    K'/V' do not depend on the step, so they are computed once here (fp32, on
    the CPU) and then copied once per device and dtype the UNet runs in.
    """

    architecture: Family
    keys_values: dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer key -> [2 (cond, uncond), references, T, C]
    layer_weights: dict[int, float]  # what multiplies each layer's attention output
    sigma_start: float
    sigma_end: float
    mask: torch.Tensor | None = None  # [M, H, W] in 0..1
    frame_weights: torch.Tensor | None = None  # [F]: a weight per latent of the batch
    projection: str = "base"  # the adapter's projection kind (Variant.projection): how a DiT block takes the term
    _on_device: dict = field(default_factory=dict, repr=False)
    _window: tuple = field(default=(None, False), repr=False)
    _masks: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, checkpoint: IPAdapterCheckpoint, cond_tokens, uncond_tokens, layer_weights: dict[int, LayerWeight],
              sigma_start, sigma_end, mask=None, scaling="V only", frame_weights=None, heads=None) -> "ImagePromptTerm":
        """``cond_tokens`` [N, T, C]: N = 1 conditions every latent alike, N > 1 conditions latent i with
        reference i (the last one for the latents beyond N). ``layer_weights``: each layer's weight and swap
        flag (``ipadapter.weighting.layer_weights``). ``scaling`` says where the weight goes
        (``ipadapter.weighting.scale_keys_values``); on the swapped layers the conditional half gets
        empty image tokens and the unconditional half the reference's. ``frame_weights`` [F] multiply
        the weight of latent i by entry i (the last one beyond F). ``heads``: a DiT's head count (its adapters
        may normalise K' per head)."""
        tokens = torch.stack([cond_tokens, uncond_tokens.to(cond_tokens).expand_as(cond_tokens)])
        keys_values = layer_keys_values(checkpoint, tokens, torch.device("cpu"), torch.float32, heads)
        keys_values, output_weights = weigh_keys_values(keys_values, layer_weights, scaling)
        if frame_weights is not None:
            frame_weights = torch.as_tensor(frame_weights, dtype=torch.float32).flatten()
        return cls(checkpoint.spec.architecture, keys_values, output_weights, sigma_start, sigma_end, mask, frame_weights,
                   checkpoint.spec.projection)

    def layer_weight(self, key: int) -> float:
        return self.layer_weights[key]

    def is_active(self, sigmas: torch.Tensor | None) -> bool:
        """Whether this step is inside [start_at, end_at]; one host sync per step, not per layer."""
        if sigmas is None:
            return True
        # All layers of one model call share the sigmas tensor, and samplers make a
        # new one per call; holding a reference keeps its identity from being reused.
        last, active = self._window
        if last is not sigmas:
            sigma = float(sigmas.detach().flatten()[0])
            active = self.sigma_end <= sigma <= self.sigma_start
            self._window = (sigmas, active)
        return active

    def batch_keys_values(self, key, cond_or_uncond, frames, device, dtype):
        """K', V' for a batch of ``cond_or_uncond`` chunks (0: conditional, 1: unconditional), each
        holding the latents ``frames``; reference i goes to latent i (the last reference beyond)."""
        cache = self._device_copy(device, dtype)
        layout = (key, tuple(cond_or_uncond))
        cached = cache.get(layout)
        if cached is None or cached[0] != frames:  # keep one frame window per layer: windows change per call
            k, v = cache[key]
            if k.shape[1] == 1:
                pick = [x[:, 0:1].expand(-1, len(frames), -1, -1) for x in (k, v)]
            else:
                refs = torch.tensor([min(f, k.shape[1] - 1) for f in frames], device=k.device)
                pick = [x[:, refs] for x in (k, v)]
            cached = (frames, *(torch.cat([x[c] for c in cond_or_uncond]) for x in pick))
            cache[layout] = cached
        return cached[1], cached[2]

    def batch_weight(self, key, chunks, frames, device, dtype):
        """The layer's weight, a tensor [batch, 1, 1] when there are frame weights."""
        weight = self.layer_weights[key]
        if self.frame_weights is None:
            return weight
        per_frame = self.frame_weights[[min(f, len(self.frame_weights) - 1) for f in frames]]
        return (weight * per_frame.repeat(chunks)).view(-1, 1, 1).to(device, dtype)

    def _device_copy(self, device, dtype):
        cache = self._on_device.get((device, dtype))
        if cache is None:
            cache = {k: (kk.to(device, dtype), vv.to(device, dtype)) for k, (kk, vv) in self.keys_values.items()}
            self._on_device = {(device, dtype): cache}  # keep one copy: the device and dtype in use
        return cache

    def batch_mask(self, extra_options, tokens, frames, device, dtype):
        if self.mask is None:
            return None
        shape = extra_options.get("original_shape") or extra_options.get("activations_shape")
        height, width = shape[-2], shape[-1]
        cached = self._masks.get((tokens, height, width, device, dtype))
        if cached is None:
            cached = mask_to_tokens(self.mask, height, width, tokens).to(device, dtype)
            self._masks = {(tokens, height, width, device, dtype): cached}
        chunks = len(extra_options.get("cond_or_uncond") or [COND])
        if cached.shape[0] == 1:
            return cached.expand(chunks * len(frames), -1)
        if cached.shape[0] <= max(frames):
            raise ValueError(
                f"the attention mask has {cached.shape[0]} frames; expected 1 or one per latent ({max(frames) + 1})"
            )
        return cached[list(frames)].repeat(chunks, 1)

    def to(self, device_or_dtype):
        """Follow the UNet when ComfyUI loads or offloads it (``model_patches_to``); batch layouts are remade."""
        def moved(copy_):
            return {k: (a.to(device_or_dtype), b.to(device_or_dtype)) for k, (a, b) in
                    ((k, pair) for k, pair in copy_.items() if isinstance(k, int))}

        if isinstance(device_or_dtype, torch.dtype):
            self._on_device = {(device, device_or_dtype): moved(c) for (device, _), c in self._on_device.items()}
        else:
            device = torch.device(device_or_dtype)
            self._on_device = {(device, dtype): moved(c) for (_, dtype), c in self._on_device.items()}
            self._masks = {}
        return self


def weigh_keys_values(keys_values, layer_weights: dict[int, LayerWeight], scaling: str):
    """Each layer's K'/V' with its weight moved in as ``scaling`` says, and the weight left for its output.

    On the swapped layers the conditional half gets empty image tokens and the unconditional half the reference's."""
    weighted, output_weights = {}, {}
    for key, (k, v) in keys_values.items():
        layer_weight = float(layer_weights[key].weight)
        if layer_weights[key].swapped:
            k, v = (torch.stack([torch.zeros_like(x[0]), x[0]]) for x in (k, v))
        if layer_weight == 0:  # skipped at sampling time, so λ = 0 stays exact whatever the scaling
            output_weights[key] = 0.0
            weighted[key] = (k, v)
            continue
        k, v, output_weights[key] = scale_keys_values(k, v, layer_weight, scaling)
        weighted[key] = (k, v)
    return weighted, output_weights


def record_attention(model, positive, negative, latent: torch.Tensor, seed: int, steps: int, at_step: int,
                     cfg: float) -> AttentionRecorder:
    """Run sampling step ``at_step`` of ``steps`` (euler, normal schedule) once and record the image terms."""
    import comfy.sample

    recorder = AttentionRecorder()
    probe = model.clone()
    probe.model_options.setdefault("transformer_options", {})[RECORD_KEY] = recorder
    noise = comfy.sample.prepare_noise(latent, seed)
    comfy.sample.sample(probe, noise, steps, cfg, "euler", "normal", positive, negative, latent,
                        start_step=at_step, last_step=at_step + 1, force_full_denoise=False, disable_pbar=True, seed=seed)
    return recorder


def frame_indices(extra_options, per_chunk: int) -> tuple[int, ...]:
    """Which latents of the whole batch this call holds: all of them, or a context window's.

    ComfyUI's own context windows put the window (its ``index_list``) in the transformer
    options; AnimateDiff-Evolved puts ``ad_params["sub_idxs"]``.
    """
    window = extra_options.get("context_window")
    indices = getattr(window, "index_list", None) if getattr(window, "dim", 0) == 0 else None
    if indices is None:
        indices = (extra_options.get("ad_params") or {}).get("sub_idxs")
    if indices is not None and len(indices) == per_chunk:
        return tuple(int(i) for i in indices)
    return tuple(range(per_chunk))


class AttentionPatch:
    """The attn2 replacement of one layer: text attention plus every applied image prompt.

    A patch set earlier by another node pack on the same layer computes the text
    part, so it keeps working under ours.
    """

    def __init__(self, key: int, terms: tuple[ImagePromptTerm, ...], previous=None, attn_precision=None):
        self.key = key
        self.terms = terms
        self.previous = previous
        self.attn_precision = attn_precision
        self._attention = None

    def with_term(self, term: ImagePromptTerm) -> "AttentionPatch":
        return AttentionPatch(self.key, (*self.terms, term), self.previous, self.attn_precision)

    def __call__(self, q, k, v, extra_options):
        if self._attention is None:
            self._attention = comfy_attention()
        heads = extra_options["n_heads"]
        # newer ComfyUI hands the layer's precision over; older ones only have the module's
        precision = extra_options.get("attn_precision", self.attn_precision)
        if self.previous is not None:
            out = self.previous(q, k, v, extra_options)
        else:
            out = self._attention(q, k, v, heads, extra_options, precision)
        cond_or_uncond = extra_options.get("cond_or_uncond") or [COND]
        sigmas = extra_options.get("sigmas")
        def attention(q_, k_, v_, heads_):
            return self._attention(q_, k_, v_, heads_, extra_options, precision)

        frames = frame_indices(extra_options, q.shape[0] // len(cond_or_uncond))
        for term in self.terms:
            if term.layer_weight(self.key) == 0 or not term.is_active(sigmas):
                continue
            k_ip, v_ip = term.batch_keys_values(self.key, cond_or_uncond, frames, q.device, q.dtype)
            mask = term.batch_mask(extra_options, q.shape[1], frames, q.device, q.dtype)
            weight = term.batch_weight(self.key, len(cond_or_uncond), frames, q.device, q.dtype)
            term_output = image_attention(q, k_ip, v_ip, heads, weight, mask, attention)
            if RECORD_KEY in extra_options:
                extra_options[RECORD_KEY].add(self.key, term_output, list(cond_or_uncond), extra_options)
            out = out + term_output
        return out

    def to(self, device_or_dtype):
        for term in self.terms:
            term.to(device_or_dtype)
        if hasattr(self.previous, "to"):
            self.previous.to(device_or_dtype)
        return self

    def __deepcopy__(self, memo):
        # ModelPatcher.clone() deep-copies model options; the image keys/values
        # are shared, never copied, however often the model is cloned.
        clone = AttentionPatch(self.key, self.terms, copy.deepcopy(self.previous, memo), self.attn_precision)
        memo[id(self)] = clone
        return clone


def _spatial_transformers(diffusion_model):
    """(ComfyUI block, transformer module) for every block of a ComfyUI UNet that has one."""
    blocks = [(("input", i), b) for i, b in enumerate(diffusion_model.input_blocks)]
    blocks.append((("middle", 0), diffusion_model.middle_block))
    blocks += [(("output", i), b) for i, b in enumerate(diffusion_model.output_blocks)]
    for name, block in blocks:
        transformer = next((m for m in block if hasattr(m, "transformer_blocks")), None) if block is not None else None
        if transformer is not None:
            yield name, transformer


def dit_blocks(diffusion_model) -> dict[tuple[str, int], torch.nn.Module]:
    """The blocks of a ComfyUI DiT by their ``patches_replace["dit"]`` key: Flux's double and single blocks,
    SD3's joint blocks (which ComfyUI patches as "double_block")."""
    if hasattr(diffusion_model, "joint_blocks"):
        return {("double_block", i): block for i, block in enumerate(diffusion_model.joint_blocks)}
    blocks = {("double_block", i): block for i, block in enumerate(getattr(diffusion_model, "double_blocks", ()))}
    blocks.update({("single_block", i): block for i, block in enumerate(getattr(diffusion_model, "single_blocks", ()))})
    return blocks


def dit_width_and_heads(diffusion_model) -> tuple[int, int]:
    """A ComfyUI DiT's hidden width and attention head count."""
    if hasattr(diffusion_model, "joint_blocks"):
        attention = diffusion_model.joint_blocks[0].x_block.attn
        return attention.qkv.weight.shape[1], attention.num_heads
    block = diffusion_model.double_blocks[0]
    return block.hidden_size, block.num_heads


def family_of_comfy_model(diffusion_model) -> Family:
    """The family of a ComfyUI model: a UNet's from where its cross-attention layers are and their context width,
    a DiT's from its blocks."""
    blocks = dit_blocks(diffusion_model)
    if blocks:
        family = family_of_comfy_layout(blocks, None)
        if family is None:
            counts = ", ".join(f"{sum(1 for b in blocks if b[0] == kind)} {kind}s" for kind in sorted({b[0] for b in blocks}))
            raise ValueError(f"the MODEL is a DiT with {counts}; expected {family_names()} "
                             "(Flux.1: 19 double + 38 single blocks, SD3.5 Large: 38 joint blocks)")
        return family
    patch_keys, context = set(), set()
    for name, transformer in _spatial_transformers(diffusion_model):
        for index, block in enumerate(transformer.transformer_blocks):
            patch_keys.add((*name, index))
            context.add(block.attn2.to_k.weight.shape[1])
    context_dim = context.pop() if len(context) == 1 else None
    family = family_of_comfy_layout(patch_keys, context_dim)
    if family is None:
        raise ValueError(
            f"the MODEL's UNet has {len(patch_keys)} cross-attention layers with context width {context_dim}; "
            f"expected {family_names()} (an SDXL refiner, SD2 or a video model takes no IP-Adapter here)"
        )
    return family


def check_model_fits(diffusion_model, checkpoint: IPAdapterCheckpoint) -> Family:
    """The model's family, after refusing an adapter of another family or of another width."""
    family = family_of_comfy_model(diffusion_model)
    spec = checkpoint.spec
    if spec.architecture is not family:
        raise AdapterFormatError(
            f"'{checkpoint.source}' is an {spec.family} adapter, but the MODEL is {family.name} "
            f"({family.describe_layers()}, context width {family.context_dim}); expected an {family.name} adapter"
        )
    if not family.attach.is_unet:
        width, _ = dit_width_and_heads(diffusion_model)
        if width != spec.base_width:
            raise AdapterFormatError(f"the MODEL's blocks are {width} wide; '{checkpoint.source}' was made for "
                                     f"{spec.base_width} ({family.name} is {family.base_width})")
        return family
    first = family.layers[0]
    found = cross_attention_modules(diffusion_model, family)[first.key].to_q.weight.shape[0] // first.width_multiplier
    if found != spec.base_width:
        raise AdapterFormatError(
            f"the MODEL's UNet starts {found} channels wide; '{checkpoint.source}' was made for "
            f"{spec.base_width} ({family.name} is {family.base_width})"
        )
    return family


def cross_attention_modules(diffusion_model, architecture: Family):
    """The attn2 module of each layer of the family in a ComfyUI UNet, by official key."""
    transformers = dict(_spatial_transformers(diffusion_model))
    return {
        layer.key: transformers[layer.comfy_block].transformer_blocks[layer.transformer_index].attn2
        for layer in architecture.layers
    }


def apply_image_prompt(model, term: ImagePromptTerm):
    """A clone of ``model`` (a ComfyUI ModelPatcher) with ``term`` added to every layer its adapter carries."""
    if not term.architecture.attach.is_unet:
        from .comfyui_glue.dit_patch import apply_dit_image_prompt

        return apply_dit_image_prompt(model, term)
    patched = model.clone()
    replace = patched.model_options["transformer_options"].get("patches_replace", {}).get("attn2", {})
    attention_modules = cross_attention_modules(patched.model.diffusion_model, term.architecture)
    for layer in term.architecture.layers:
        # ComfyUI looks up (block, id, transformer index) first, then (block, id)
        existing = replace.get(layer.comfy_patch_key) or replace.get(layer.comfy_block)
        if isinstance(existing, AttentionPatch) and existing.key == layer.key:
            patch = existing.with_term(term)
        else:
            precision = getattr(attention_modules[layer.key], "attn_precision", None)
            patch = AttentionPatch(layer.key, (term,), existing, precision)
        patched.set_model_attn2_replace(patch, *layer.comfy_patch_key)
    return patched
