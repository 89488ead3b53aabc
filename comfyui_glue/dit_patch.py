"""ComfyUI glue for the DiT families: ``patches_replace["dit"]`` block patches that add image terms.

A block patch runs the block as ComfyUI does (or the patch another pack set on it before ours) and reaches
inside it through ComfyUI's ``optimized_attention_override``: the block's one joint attention hands over its
query, keys and values, and returns its output before the output projection. Nothing of the model is copied
or changed; the math is ``ipadapter/dit_attention.py``.

What ComfyUI hands over, and what the adapters want (Flux ``comfy/ldm/flux``, SD3 ``mmdit.py``):
- Flux: q, k, v ``[B, heads, text + image tokens, head_dim]`` after the q/k norms and RoPE; the adapters
  take the query before RoPE, which the patch gets back by rotating with the transposed RoPE matrices.
- SD3: q, k ``[B, context + image tokens, heads * head_dim]`` after the block's q/k RMS norms (v may keep
  its heads axis); the
  adapter normalises the raw query with its own weights, which only rescales the block's output per channel.
"""
from __future__ import annotations

import copy

import torch

from ..ipadapter.dit_attention import image_attention, joint_image_attention, reweighted_rms
from ..ipadapter.image_prompt import layer_keys_values
from ..patcher import COND, RECORD_KEY, ImagePromptTerm, comfy_attention, dit_blocks, frame_indices, weigh_keys_values

LATENT_KEY = "ipadapter_kit_latent"  # transformer option: (latent height, latent width, text tokens) of this call
WRAPPER_KEY = "ipadapter_kit_latent_shape"


def record_latent_shape(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                        **kwargs):
    """APPLY_MODEL wrapper: a DiT block sees only tokens, so the latent's size (for masks, the attention map) and
    the text length (the joint sequence's split) are noted in the call's transformer options."""
    text = c_crossattn.shape[1] if c_crossattn is not None else 0
    transformer_options[LATENT_KEY] = (x.shape[-2], x.shape[-1], text)
    return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)


def undo_rope(x: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """The query before ComfyUI's Flux RoPE: ``pe`` holds 2x2 rotations per channel pair, their inverse is the
    transpose. ``x`` [B, H, L, D], ``pe`` [B, 1, L, D/2, 2, 2]."""
    inverse = pe.transpose(-1, -2)
    pairs = x.to(inverse.dtype).reshape(*x.shape[:-1], -1, 1, 2)
    out = inverse[..., 0] * pairs[..., 0] + inverse[..., 1] * pairs[..., 1]
    return out.reshape(x.shape).to(x.dtype)


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """[B, H, L, D] -> [B, L, H * D]."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


class TimedImagePromptTerm(ImagePromptTerm):
    """SD3.5 InstantX's term: the Resampler and each layer's AdaLN take the timestep, so K'/V' are made once per
    step (and per device and dtype) from the stored projection inputs."""

    def __init__(self, checkpoint, projection_module, cond_features, uncond_features, concat, layer_weights, scaling,
                 timestep_of, sigma_start, sigma_end, mask=None, frame_weights=None):
        if frame_weights is not None:
            frame_weights = torch.as_tensor(frame_weights, dtype=torch.float32).flatten()
        # the weights left for the output are set per step (the scaling may move them into K'/V'); zero stays zero
        super().__init__(checkpoint.spec.architecture, {}, {k: float(w.weight) for k, w in layer_weights.items()},
                         sigma_start, sigma_end, mask, frame_weights, checkpoint.spec.projection)
        self.checkpoint, self.projection_module = checkpoint, projection_module
        self.features = (cond_features, uncond_features)
        self.concat, self.scaling, self.weights_in, self.timestep_of = concat, scaling, layer_weights, timestep_of
        self._step = None
        self.norm_weights = {key: (checkpoint.layer_tensors(key)["norm_q.weight"], checkpoint.layer_tensors(key)["norm_k.weight"])
                             for key in checkpoint.spec.layer_keys}

    def prepare_step(self, sigmas, heads: int) -> None:
        """Make this step's K'/V' (on the CPU, fp32) unless they are the last step's."""
        timestep = float(self.timestep_of(sigmas.detach().flatten()[:1].float().cpu())[0])
        if self._step == timestep:
            return
        cond, uncond = self.features
        with torch.no_grad():
            times = torch.full((cond.shape[0],), timestep)
            cond_tokens, time_embedding = self.projection_module(cond, times)
            uncond_tokens, _ = self.projection_module(uncond, times[:1])
            if self.concat:
                cond_tokens = cond_tokens.reshape(1, -1, cond_tokens.shape[-1])
                uncond_tokens = uncond_tokens.repeat(1, cond.shape[0], 1)
                time_embedding = time_embedding[:1]
            tokens = torch.stack([cond_tokens, uncond_tokens.expand_as(cond_tokens)])
            embeddings = time_embedding[None].expand(2, *time_embedding.shape)
            keys_values = layer_keys_values(self.checkpoint, tokens, torch.device("cpu"), torch.float32, heads, embeddings)
        self.keys_values, self.layer_weights = weigh_keys_values(keys_values, self.weights_in, self.scaling)
        self._on_device = {}
        self._step = timestep


class DiTBlockPatch:
    """The ``patches_replace["dit"]`` entry of one block: the block plus every applied image prompt on it."""

    def __init__(self, key: int, block: tuple[str, int], terms: tuple, previous=None, model_norms=None):
        self.key = key
        self.block = block  # ("double_block", i) or ("single_block", i)
        self.terms = terms
        self.previous = previous
        self.model_norms = model_norms  # SD3: the block's own q/k RMS-norm weights (None: it has none)
        self._attention = None

    def with_term(self, term) -> "DiTBlockPatch":
        return DiTBlockPatch(self.key, self.block, (*self.terms, term), self.previous, self.model_norms)

    def _run(self, args, extra):
        if self.previous is not None:
            return self.previous(args, extra)
        return extra["original_block"](args)

    def __call__(self, args, extra):
        options = args.get("transformer_options") or {}
        sigmas = options.get("sigmas")
        terms = [term for term in self.terms if term.layer_weight(self.key) != 0 and term.is_active(sigmas)]
        if not terms:
            return self._run(args, extra)
        if self._attention is None:
            self._attention = comfy_attention()
        previous_override = options.get("optimized_attention_override")
        calls, end_terms = [], []

        def override(func, *positional, **keywords):
            out = previous_override(func, *positional, **keywords) if previous_override else func(*positional, **keywords)
            calls.append(None)
            if len(calls) == 1:  # the block's joint attention (SD3.5 Medium's second, image-only one is not)
                out = self._add_terms(out, positional, keywords, args, options, terms, end_terms)
            return out

        out = self._run({**args, "transformer_options": {**options, "optimized_attention_override": override}}, extra)
        if end_terms:  # XLabs: the term joins the image stream after the block
            out = {**out, "img": out["img"] + sum(end_terms).to(out["img"].dtype)}
        return out

    def _add_terms(self, out, positional, keywords, args, options, terms, end_terms):
        q, k, v = positional[:3]
        heads = positional[3] if len(positional) > 3 else keywords["heads"]
        flux = keywords.get("skip_reshape", False)
        text = args["txt"].shape[1] if "txt" in args else 0
        if flux:
            query = to_tokens(undo_rope(q, args["pe"])[:, :, text:])  # single blocks: text = 0, the whole sequence
        cond_or_uncond = options.get("cond_or_uncond") or [COND]
        frames = frame_indices(options, q.shape[0] // len(cond_or_uncond))
        latent = options.get(LATENT_KEY)

        def attention(q_, k_, v_, heads_):
            return self._attention(q_, k_, v_, heads_, options, None)

        out = out.clone()
        for term in terms:
            if isinstance(term, TimedImagePromptTerm):
                term.prepare_step(options["sigmas"], heads)
            k_ip, v_ip = term.batch_keys_values(self.key, cond_or_uncond, frames, q.device, q.dtype)
            weight = term.batch_weight(self.key, len(cond_or_uncond), frames, q.device, q.dtype)
            if flux:
                tokens = query.shape[1]
                mask = self._mask(term, latent, cond_or_uncond, frames, tokens, text if self.block[0] == "single_block" else 0,
                                  q.device, q.dtype)
                term_output = image_attention(query, k_ip, v_ip, heads, weight, mask, attention)
            else:
                own_q, own_k = (w.to(q.device) for w in term.norm_weights[self.key])
                block_q, block_k = (None, None) if self.model_norms is None else (w.to(q.device) for w in self.model_norms)
                image_q = reweighted_rms(q[:, text:], heads, block_q, own_q)
                image_k = reweighted_rms(k[:, text:], heads, block_k, own_k)
                mask = self._mask(term, latent, cond_or_uncond, frames, image_q.shape[1], 0, q.device, q.dtype)
                image_v = v[:, text:].reshape(v.shape[0], image_q.shape[1], -1)  # ComfyUI leaves v [B, L, heads, D]
                term_output = joint_image_attention(image_q, image_k, image_v, k_ip, v_ip, heads, weight, mask,
                                                    attention)
            self._record(options, term_output, text if self.block[0] == "single_block" else 0, cond_or_uncond, latent)
            if term.projection == "base":
                end_terms.append(term_output)
            else:
                out[:, text if self.block[0] != "single_block" else 0:] += term_output.to(out.dtype)
        return out

    def _mask(self, term, latent, cond_or_uncond, frames, tokens, text, device, dtype):
        """The term's mask over ``tokens`` query tokens whose image part starts at ``text`` (single blocks: the text
        tokens take no masked term)."""
        if term.mask is None:
            return None
        if latent is None:
            raise ValueError("an attention mask on a DiT needs the latent's size, which ComfyUI's sampling gives; "
                             "expected the model to run through apply_model")
        height, width = latent[0], latent[1]
        image_tokens = ((height + 1) // 2) * ((width + 1) // 2)
        shape = {"original_shape": (height, width), "cond_or_uncond": cond_or_uncond}
        image_mask = term.batch_mask(shape, image_tokens, frames, device, dtype)
        full = torch.zeros(image_mask.shape[0], tokens, device=device, dtype=dtype)
        full[:, text:text + image_tokens] = image_mask[:, : max(0, min(image_tokens, tokens - text))]
        return full

    def _record(self, options, term_output, text, cond_or_uncond, latent):
        if RECORD_KEY not in options or latent is None:
            return
        height, width = latent[0], latent[1]
        image_tokens = ((height + 1) // 2) * ((width + 1) // 2)
        options[RECORD_KEY].add(self.key, term_output[:, text:text + image_tokens], list(cond_or_uncond),
                                {"original_shape": (height, width)})

    def to(self, device_or_dtype):
        for term in self.terms:
            term.to(device_or_dtype)
        if hasattr(self.previous, "to"):
            self.previous.to(device_or_dtype)
        return self

    def __deepcopy__(self, memo):
        # ModelPatcher.clone() deep-copies model options: terms and the model's norm weights are shared
        clone = DiTBlockPatch(self.key, self.block, self.terms, copy.deepcopy(self.previous, memo), self.model_norms)
        memo[id(self)] = clone
        return clone


def model_norm_weights(diffusion_model, block: tuple[str, int]):
    """SD3: the joint block's image-stream q/k RMS-norm weights, or None where it has no q/k norm (SD3 Medium)."""
    if not hasattr(diffusion_model, "joint_blocks"):
        return None
    attention = diffusion_model.joint_blocks[block[1]].x_block.attn
    weight_q, weight_k = getattr(attention.ln_q, "weight", None), getattr(attention.ln_k, "weight", None)
    if weight_q is None or weight_k is None:
        return None
    return weight_q, weight_k


def apply_dit_image_prompt(model, term):
    """A clone of ``model`` (a ComfyUI ModelPatcher of a DiT) with ``term`` on every block its adapter carries."""
    import comfy.patcher_extension

    patched = model.clone()
    replace = patched.model_options["transformer_options"].get("patches_replace", {}).get("dit", {})
    family = term.architecture
    present = dit_blocks(patched.model.diffusion_model)
    for key in term.layer_weights:
        layer = family.layer_by_key[key]
        if layer.comfy_block not in present:  # a reduced-depth model: nothing to patch there
            continue
        existing = replace.get(layer.comfy_patch_key)
        if isinstance(existing, DiTBlockPatch) and existing.key == key:
            patch = existing.with_term(term)
        else:
            patch = DiTBlockPatch(key, layer.comfy_block, (term,), existing,
                                  model_norm_weights(patched.model.diffusion_model, layer.comfy_block))
        patched.set_model_patch_replace(patch, "dit", *layer.comfy_patch_key)
    if record_latent_shape not in patched.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY):
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, record_latent_shape)
    return patched
